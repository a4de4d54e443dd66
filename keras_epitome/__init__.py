"""keras_epitome: Neural Epitome Search (NES) layers for Keras 3 and Keras 2.

Two front doors, one package (docs/keras3.md says which to pick):

* ``import keras_epitome.keras3 as ke`` for Keras 3 (``import keras``, on the
  TensorFlow, JAX or PyTorch backend): the layers, the transform and the
  export for Keras 3 models.
* ``import keras_epitome as ke`` for Keras 2 (``tf_keras``), TF-MOT pruning and
  quantization-aware training: ``ke.keras`` is ``tf_keras``. The model
  transforms here (``ke.epitomize``, ``ke.strip_epitome``, ``ke.export_tflite``,
  ...) also accept a Keras 3 model and hand it to :mod:`keras_epitome.keras3`.

Importing the package does not choose a Keras for the user: ``tf.keras`` stays
what TensorFlow and ``TF_USE_LEGACY_KERAS`` make it. Without TensorFlow and
``tf_keras`` installed (a JAX or PyTorch machine) only
:mod:`keras_epitome.keras3` and the index math (:mod:`keras_epitome.geometry`)
are available. Where Keras 3 runs on JAX or PyTorch, the Keras 2 API
loads on first use, so ``import keras_epitome.keras3`` does not import
TensorFlow.

Example (Keras 2):
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((28, 28, 1)),
  ...     keras.layers.Conv2D(32, 3, activation="relu"),
  ...     ke.EpitomeConv2D(64, 3, activation="relu", compression=4),
  ... ])
"""

import importlib.util as _util

_HAS_KERAS2 = all(
  _util.find_spec(name) is not None
  for name in ("tensorflow", "tf_keras", "tensorflow_model_optimization")
)


def _keras3_backend() -> str:
  """The backend Keras 3 has or will pick (``KERAS_BACKEND``, then keras.json), without importing it."""
  import json
  import os
  import sys

  if "keras" in sys.modules and hasattr(sys.modules["keras"], "backend"):
    return sys.modules["keras"].backend.backend()
  if os.environ.get("KERAS_BACKEND"):
    return os.environ["KERAS_BACKEND"]
  home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
  try:
    with open(os.path.join(home, "keras.json")) as f:
      return json.load(f).get("backend", "tensorflow")
  except (OSError, ValueError):
    return "tensorflow"


_KERAS2_API = {"loading": False, "loaded": False}


def _load_keras2() -> None:
  """Imports the Keras 2 API into this module's namespace (once)."""
  if _KERAS2_API["loading"] or _KERAS2_API["loaded"]:
    return
  _KERAS2_API["loading"] = True
  try:
    _import_keras2()
  finally:
    _KERAS2_API["loading"] = False
  _KERAS2_API["loaded"] = True


def _import_keras2() -> None:
  """The Keras 2 API's imports, published as this module's names (hence noqa: F401)."""
  # isort: off
  # The backend must come first: it imports Keras 2 and TF-MOT without
  # changing what tf.keras means for the user.
  from keras_epitome.backend import keras  # noqa: F401
  # isort: on

  from keras_epitome import compression, pruning  # noqa: F401
  from keras_epitome.allocation import Allocation  # noqa: F401
  from keras_epitome.backend import custom_objects  # noqa: F401
  from keras_epitome.calibration import (  # noqa: F401
    CalibrationConfig,
    ExperimentalCalibration,
    calibrate,
  )
  from keras_epitome.distillation import Distiller, distill  # noqa: F401
  from keras_epitome.export import (  # noqa: F401
    export_tflite,
    run_tflite,
    tflite_tensor_report,
  )
  from keras_epitome.factored import (  # noqa: F401
    FactoredConv1D,
    FactoredConv2D,
    FactoredDense,
  )
  from keras_epitome.form_choice import factorize  # noqa: F401
  from keras_epitome.harden import harden_layer, harden_routing  # noqa: F401
  from keras_epitome.layers import (  # noqa: F401
    EPITOME_LAYERS,
    EpitomeConv1D,
    EpitomeConv2D,
    EpitomeDense,
  )
  from keras_epitome.pruning import prune_epitomes, sparsity_for_size  # noqa: F401
  from keras_epitome.quantization import (  # noqa: F401
    EpitomeQuantizeConfig,
    EpitomeQuantizeScheme,
    quantize_model,
    quantize_scope,
  )
  from keras_epitome.transform import (  # noqa: F401
    allocate,
    epitomize,
    materialize_layer,
    strip_epitome,
    summarize,
  )
  imported = dict(locals())
  globals().update(imported)


# The Keras 2 API loads with the package where Keras 3 runs on TensorFlow (so
# that its layers are registered for loading Keras 2 files); on a JAX or
# PyTorch backend it loads on first use, and `import keras_epitome.keras3`
# does not import TensorFlow.
if _HAS_KERAS2 and _keras3_backend() == "tensorflow":
  _load_keras2()

from keras_epitome.geometry import RoutingMap, epitome_shape_for_ratio  # noqa: E402


def __getattr__(name):
  # ``keras_epitome.keras3`` on first use (it imports Keras 3, which picks its
  # backend), and a clear error for the Keras 2 API where TensorFlow is absent.
  if name == "keras3":
    import importlib

    return importlib.import_module("keras_epitome.keras3")
  if name in __all__ and _HAS_KERAS2:
    # During the load, `from keras_epitome import compression` asks here
    # before it imports the submodule: say "no such attribute (yet)".
    if not _KERAS2_API["loading"]:
      _load_keras2()
      if name in globals():
        return globals()[name]
    raise AttributeError(f"module 'keras_epitome' has no attribute {name!r}")
  if name in __all__:
    raise ImportError(
      f"keras_epitome.{name} is part of the Keras 2 API, which needs "
      "tensorflow, tf-keras and tensorflow-model-optimization (pip install "
      "keras-epitome installs them); on a JAX or PyTorch machine use "
      "`import keras_epitome.keras3 as ke`"
    )
  raise AttributeError(f"module 'keras_epitome' has no attribute {name!r}")


__version__ = "0.1.0"

# The user's nouns only. Internals (the sampler, geometry, mixins, learners)
# are importable from their modules: keras_epitome.sampling, .layers, ...
__all__ = [
  "Allocation",
  "CalibrationConfig",
  "EPITOME_LAYERS",
  "Distiller",
  "EpitomeConv1D",
  "EpitomeConv2D",
  "EpitomeDense",
  "EpitomeQuantizeConfig",
  "EpitomeQuantizeScheme",
  "ExperimentalCalibration",
  "FactoredConv1D",
  "FactoredConv2D",
  "FactoredDense",
  "RoutingMap",
  "allocate",
  "calibrate",
  "compression",
  "custom_objects",
  "distill",
  "epitome_shape_for_ratio",
  "epitomize",
  "export_tflite",
  "factored_training",
  "factorize",
  "harden_layer",
  "harden_routing",
  "keras",
  "keras3",
  "materialize_layer",
  "prune_epitomes",
  "pruning",
  "quantize_model",
  "quantize_scope",
  "run_tflite",
  "sparsity_for_size",
  "strip_epitome",
  "summarize",
  "tflite_tensor_report",
]
