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
from keras_epitome.keras3.bridge import to_keras2
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
  allocate,
  epitomize,
  materialize_layer,
  strip_epitome,
  summarize,
)

# Names that live in TensorFlow-backed modules: imported on first use, so this
# package imports on a machine without TensorFlow.
_LAZY = {
  "CalibrationConfig": "keras_epitome.calibration.config",
  "ExperimentalCalibration": "keras_epitome.calibration.config",
  "run_tflite": "keras_epitome.litert",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'keras_epitome.keras3' has no attribute {name!r}")


__all__ = [
  "CalibrationConfig",
  "Distiller",
  "EPITOME_LAYERS",
  "EpitomeConv1D",
  "EpitomeConv2D",
  "EpitomeDense",
  "ExperimentalCalibration",
  "FeatureOffsetLearner",
  "RoutingMap",
  "allocate",
  "distill",
  "epitome_layers",
  "epitome_shape_for_ratio",
  "epitomize",
  "export_tflite",
  "harden_layer",
  "harden_routing",
  "materialize_layer",
  "run_tflite",
  "strip_epitome",
  "summarize",
  "to_keras2",
]
