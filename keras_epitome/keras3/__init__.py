"""keras_epitome for Keras 3: epitome layers, the model transform and the export.

``import keras_epitome.keras3 as ke`` gives the Keras 3 API on any backend
(TensorFlow, JAX, PyTorch); it never imports Keras 2. docs/keras3.md says what
works on which backend and what stays Keras-2-only.

Example:
  >>> import keras
  >>> import keras_epitome.keras3 as ke
  >>> model = keras.Sequential([
  ...     keras.Input((28, 28, 1)),
  ...     keras.layers.Conv2D(32, 3, activation="relu"),
  ...     ke.EpitomeConv2D(64, 3, activation="relu", compression=4),
  ... ])
"""

from keras_epitome.geometry import RoutingMap, epitome_shape_for_ratio
from keras_epitome.keras3.distillation import Distiller, distill
from keras_epitome.keras3.export import export_tflite
from keras_epitome.keras3.harden import harden_layer, harden_routing
from keras_epitome.keras3.layers import (
  EPITOME_LAYERS,
  EpitomeConv1D,
  EpitomeConv2D,
  EpitomeDense,
  epitome_layers,
)
from keras_epitome.keras3.learners import FeatureOffsetLearner
from keras_epitome.keras3.transform import (
  epitomize,
  materialize_layer,
  strip_epitome,
  summarize,
)

__all__ = [
  "Distiller",
  "EPITOME_LAYERS",
  "EpitomeConv1D",
  "EpitomeConv2D",
  "EpitomeDense",
  "FeatureOffsetLearner",
  "RoutingMap",
  "distill",
  "epitome_layers",
  "epitome_shape_for_ratio",
  "epitomize",
  "export_tflite",
  "harden_layer",
  "harden_routing",
  "materialize_layer",
  "strip_epitome",
  "summarize",
]
