"""keras_epitome: Neural Epitome Search (NES) layers for Keras 2 / TF-MOT.

Importing this package selects Keras 2 (``tf_keras``) for TensorFlow; use
``keras_epitome.keras`` as your Keras module.

Example:
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((28, 28, 1)),
  ...     keras.layers.Conv2D(32, 3, activation="relu"),
  ...     ke.EpitomeConv2D(64, 3, activation="relu", compression=4),
  ... ])
"""

# isort: off
# The backend must come first: it selects Keras 2 before TensorFlow is touched.
from keras_epitome.backend import keras
# isort: on

from keras_epitome import compression, pruning  # noqa: E402
from keras_epitome.allocation import Allocation  # noqa: E402
from keras_epitome.backend import custom_objects  # noqa: E402
from keras_epitome.calibration import calibrate  # noqa: E402
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
from keras_epitome.sampling import RoutingMap, epitome_shape_for_ratio  # noqa: E402
from keras_epitome.transform import (  # noqa: E402
  allocate,
  epitomize,
  materialize_layer,
  strip_epitome,
  summarize,
)

__version__ = "0.1.0"

# The user's nouns only. Internals (the sampler, geometry, mixins, learners)
# are importable from their modules: keras_epitome.sampling, .layers, ...
__all__ = [
  "Allocation",
  "EPITOME_LAYERS",
  "Distiller",
  "EpitomeConv1D",
  "EpitomeConv2D",
  "EpitomeDense",
  "EpitomeQuantizeConfig",
  "EpitomeQuantizeScheme",
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
