"""Data-aware conversion: fit epitomes to a trained layer's outputs, not its weights.

:func:`keras_epitome.epitomize` with ``calibration_data`` (or :func:`calibrate`
on an already converted model) fits every epitome layer so that, on a few
hundred calibration samples, it reproduces what the ORIGINAL layer computed.
The method is in ``docs/design.md`` (data-aware conversion); what it gains,
measured, in ``docs/results.md``.

The layers are fitted one at a time in network order. Layer ``l`` of the
converted model sees the converted model's own activations (so the errors of
the layers before it are corrected, not compounded) and its target is the
original layer's pre-activation output on the original model's activations:
a linear least-squares problem in the epitome
(:mod:`~keras_epitome.calibration.least_squares`), solved per epitome output
channel (:mod:`~keras_epitome.calibration.routing`). With integer offsets and
``channel_roll=0`` the output channels of all output chunks are copies of the
same epitome filters; the original layer's output channels are then reordered
so that the copies are the most correlated channels (``permute_channels``).
After each layer, the BatchNormalization layers that follow it are re-fitted
(:mod:`~keras_epitome.calibration.batchnorm`); stock Conv/Dense layers after
the first epitome layer (e.g. the classifier) are refitted by the same least
squares without the epitome constraint. Optional gradient passes follow
(:mod:`~keras_epitome.calibration.gradient`), and the converted model's output
is checked against the original's.

The modules:

* :mod:`~keras_epitome.calibration.config`: :class:`CalibrationConfig`, every
  option, checked when made;
* :mod:`~keras_epitome.calibration.data`: :func:`calibration_array`, batching;
* :mod:`~keras_epitome.calibration.least_squares`: one layer's fit;
* :mod:`~keras_epitome.calibration.routing`: integer routing maps, solves;
* :mod:`~keras_epitome.calibration.batchnorm`: BatchNorm refits;
* :mod:`~keras_epitome.calibration.gradient`: the Adam passes;
* :mod:`~keras_epitome.calibration.graph`: the model graph and its
  activations;
* :mod:`~keras_epitome.calibration.driver`: :func:`calibrate`.

Example:
  >>> import numpy as np
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 4)),
  ...     keras.layers.Conv2D(32, 3, activation="relu", name="c1"),
  ...     keras.layers.Conv2D(32, 3, name="c2"),
  ... ])
  >>> x = np.random.default_rng(0).normal(size=(64, 8, 8, 4)).astype("float32")
  >>> small = ke.epitomize(model, 4, calibration_data=x, verbose=False)
  >>> c = small.epitome_report.converted[0]
  >>> c.init, c.output_error <= c.weight_fit_output_error
  ('data', True)
"""

from keras_epitome.calibration.batchnorm import (
  input_moments,
  restandardize_batchnorms,
)
from keras_epitome.calibration.config import (
  DEFAULT_MAX_SAMPLES,
  CalibrationConfig,
  ExperimentalCalibration,
  config_from_options,
  spelled,
)
from keras_epitome.calibration.data import calibration_array
from keras_epitome.calibration.driver import calibrate
from keras_epitome.calibration.gradient import relative_error
from keras_epitome.calibration.least_squares import layer_patches
from keras_epitome.calibration.report import LayerCalibration

# The names of the single module this package was; benchmarks read them.
_input_moments = input_moments
_relative_error = relative_error
_restandardize_batchnorms = restandardize_batchnorms

__all__ = [
  "DEFAULT_MAX_SAMPLES",
  "CalibrationConfig",
  "ExperimentalCalibration",
  "LayerCalibration",
  "calibrate",
  "calibration_array",
  "config_from_options",
  "layer_patches",
  "spelled",
]
