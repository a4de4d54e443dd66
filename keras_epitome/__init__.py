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

from keras_epitome import factored_training, form_choice, sampling  # noqa: E402
from keras_epitome.export import (  # noqa: E402
  export_tflite,
  run_tflite,
  tflite_tensor_report,
)
from keras_epitome.factored import (  # noqa: E402
  FACTORED_LAYERS,
  FactoredConv1D,
  FactoredConv2D,
  FactoredDense,
  factorize,
)
from keras_epitome.layers import (  # noqa: E402
  EPITOME_LAYERS,
  EpitomeConv1D,
  EpitomeConv2D,
  EpitomeDense,
  EpitomeMixin,
)
from keras_epitome.learners import FeatureOffsetLearner  # noqa: E402
from keras_epitome.quantization import (  # noqa: E402
  EpitomeQuantizeConfig,
  EpitomeQuantizeScheme,
  quantize_model,
  quantize_scope,
)
from keras_epitome.sampling import (  # noqa: E402
  EpitomeGeometry,
  RoutingMap,
  epitome_shape_for_ratio,
  fit_epitome,
  sample_kernel,
)
from keras_epitome.transform import (  # noqa: E402
  EpitomeReport,
  epitomize,
  materialize_layer,
  strip_epitome,
  summarize,
)

__version__ = "0.1.0"

__all__ = [
  "EPITOME_LAYERS",
  "FACTORED_LAYERS",
  "EpitomeConv1D",
  "EpitomeConv2D",
  "EpitomeDense",
  "EpitomeGeometry",
  "EpitomeMixin",
  "EpitomeQuantizeConfig",
  "EpitomeQuantizeScheme",
  "EpitomeReport",
  "FactoredConv1D",
  "FactoredConv2D",
  "FactoredDense",
  "FeatureOffsetLearner",
  "RoutingMap",
  "custom_objects",
  "epitome_shape_for_ratio",
  "epitomize",
  "export_tflite",
  "factored_training",
  "factorize",
  "fit_epitome",
  "form_choice",
  "keras",
  "materialize_layer",
  "quantize_model",
  "quantize_scope",
  "run_tflite",
  "sample_kernel",
  "sampling",
  "strip_epitome",
  "summarize",
  "tflite_tensor_report",
]


def custom_objects():
  """Classes to pass as ``custom_objects`` when loading outside the package's scope.

  The layers are registered with Keras when the package is imported, so
  ``keras.models.load_model`` finds them; this is for tools that take an
  explicit mapping (e.g. TF-MOT's ``quantize_scope``).

  Returns:
    A dict from class name to class.
  """
  return {
    "EpitomeConv1D": EpitomeConv1D,
    "EpitomeConv2D": EpitomeConv2D,
    "EpitomeDense": EpitomeDense,
    "FeatureOffsetLearner": FeatureOffsetLearner,
    "FactoredConv1D": FactoredConv1D,
    "FactoredConv2D": FactoredConv2D,
    "FactoredDense": FactoredDense,
  }
