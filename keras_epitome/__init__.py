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
are available.

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

if _HAS_KERAS2:
  # isort: off
  # The backend must come first: it imports Keras 2 and TF-MOT without
  # changing what tf.keras means for the user.
  from keras_epitome.backend import keras
  # isort: on

  from keras_epitome import compression, pruning  # noqa: E402
  from keras_epitome.allocation import Allocation  # noqa: E402
  from keras_epitome.backend import custom_objects  # noqa: E402
  from keras_epitome.calibration import (  # noqa: E402
    CalibrationConfig,
    ExperimentalCalibration,
    calibrate,
  )
  from keras_epitome.distillation import Distiller, distill  # noqa: E402
  from keras_epitome.export import (  # noqa: E402
    export_tflite,
    run_tflite,
    tflite_tensor_report,
  )
  from keras_epitome.factored import (  # noqa: E402
    FactoredConv1D,
    FactoredConv2D,
    FactoredDense,
  )
  from keras_epitome.form_choice import factorize  # noqa: E402
  from keras_epitome.harden import harden_layer, harden_routing  # noqa: E402
  from keras_epitome.layers import (  # noqa: E402
    EPITOME_LAYERS,
    EpitomeConv1D,
    EpitomeConv2D,
    EpitomeDense,
  )
  from keras_epitome.pruning import prune_epitomes, sparsity_for_size  # noqa: E402
  from keras_epitome.quantization import (  # noqa: E402
    EpitomeQuantizeConfig,
    EpitomeQuantizeScheme,
    quantize_model,
    quantize_scope,
  )
  from keras_epitome.transform import (  # noqa: E402
    allocate,
    epitomize,
    materialize_layer,
    strip_epitome,
    summarize,
  )
from keras_epitome.geometry import RoutingMap, epitome_shape_for_ratio  # noqa: E402


def __getattr__(name):
  # ``keras_epitome.keras3`` on first use (it imports Keras 3, which picks its
  # backend), and a clear error for the Keras 2 API where TensorFlow is absent.
  if name == "keras3":
    import importlib

    return importlib.import_module("keras_epitome.keras3")
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
