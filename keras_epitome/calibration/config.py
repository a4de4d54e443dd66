"""The options of a data-aware conversion: :class:`CalibrationConfig`.

One frozen dataclass holds every option :func:`keras_epitome.calibrate`
takes besides the models and the data; it checks its values when it is made,
so a bad option fails where it is written, naming the field. The options that
measured as no help on the project's benchmarks (``docs/results.md``) sit in
:class:`ExperimentalCalibration`, under ``CalibrationConfig.experimental``.

:func:`config_from_options` turns the older ``calibration_options`` dict
(the keyword arguments ``calibrate`` used to take) into a config.

Example:
  >>> from keras_epitome.calibration import CalibrationConfig
  >>> CalibrationConfig(output_steps=1000).output_steps
  1000
  >>> CalibrationConfig(output_steps=-3)
  Traceback (most recent call last):
  ...
  ValueError: CalibrationConfig.output_steps: -3 must be an integer >= 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Tuple

import numpy as np

DEFAULT_MAX_SAMPLES = 2048
OUTPUT_CHECKS = ("warn", "raise", "off")


def _check_int(owner: str, name: str, value, low: int) -> int:
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, (int, np.integer))
    or value < low
  ):
    raise ValueError(f"{owner}.{name}: {value!r} must be an integer >= {low}")
  return int(value)


def _check_bool(owner: str, name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{owner}.{name}: {value!r} must be True or False")
  return bool(value)


def _check_float(owner: str, name: str, value, *, positive: bool) -> float:
  ok = (
    isinstance(value, (int, float, np.integer, np.floating))
    and not isinstance(value, (bool, np.bool_))
    and math.isfinite(float(value))
    and (float(value) > 0 if positive else float(value) >= 0)
  )
  if not ok:
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{owner}.{name}: {value!r} must be a finite number {bound}")
  return float(value)


def _set(obj, name: str, value) -> None:
  object.__setattr__(obj, name, value)  # frozen dataclass: normalize in place


@dataclasses.dataclass(frozen=True)
class ExperimentalCalibration:
  """Options kept for experiments: none helped on the benchmarks.

  Attributes:
    search: choose the learned sampler's routing map with the data
      (coordinate descent over integer offsets, scored by the layer's output
      error). It lowers each layer's error but measured no gain in accuracy,
      at several times the cost (``docs/results.md``).
    search_sweeps: coordinate-descent sweeps of the search.
    max_candidates: offsets tried per coordinate (evenly spaced if fewer
      than the range).
    reconstruct_steps: after each epitome layer's least-squares fit (and the
      BatchNorm refit after it), this many Adam steps that fit the layer's
      block (the layer and the BatchNorm/activation layers right after it) to
      the original block's post-activation output, with the converted
      model's own activations as inputs. Trains the epitome, the layer's bias
      and the scale and offset of the block's BatchNorms; undone when it does
      not lower the block's error. Measured: nothing on top of
      ``CalibrationConfig.output_steps``. Its learning rate is
      ``CalibrationConfig.learning_rate``.
  """

  search: bool = False
  search_sweeps: int = 2
  max_candidates: int = 64
  reconstruct_steps: int = 0

  def __post_init__(self):
    owner = "ExperimentalCalibration"
    _set(self, "search", _check_bool(owner, "search", self.search))
    _set(
      self, "search_sweeps", _check_int(owner, "search_sweeps", self.search_sweeps, 1)
    )
    _set(
      self,
      "max_candidates",
      _check_int(owner, "max_candidates", self.max_candidates, 1),
    )
    _set(
      self,
      "reconstruct_steps",
      _check_int(owner, "reconstruct_steps", self.reconstruct_steps, 0),
    )


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """How :func:`keras_epitome.calibrate` fits a converted model to the data.

  Attributes:
    ridge: ``lambda`` of the least squares, relative to the mean input
      variance (``trace(H) / P``); pulls each kernel towards the original one
      where the calibration data leave it free.
    permute_channels: reorder the output channels of epitome layers with
      ``channel_roll=0`` (and the BatchNorm after them, and the inputs of the
      layers they feed) so that the channels that share an epitome filter are
      the most correlated ones. The model computes the same kind of function
      in a different internal channel order; only done where every consumer
      of the output is refitted.
    refit_batchnorm: re-estimate the moving statistics of the
      BatchNormalization layers after the first epitome layer on the
      converted model's activations.
    batchnorm_affine: with ``refit_batchnorm``, also refit each such
      BatchNorm's scale and offset (per-channel least squares) to reproduce
      the original BatchNorm's outputs.
    refit_stock_layers: also refit the stock ``Conv1D``/``Conv2D``/``Dense``
      layers after the first epitome layer (e.g. the classifier) to the
      original layers' outputs, with the converted model's activations as
      inputs (full kernels, no size change).
    batch_size: batch size of the forward passes and of the gradient steps.
    max_samples: calibration samples used at most (the first ones; a larger
      set is cut, with a logged warning).
    output_steps: after all layers are fitted, this many Adam steps that fit
      the converted model's output to the original model's output on the
      calibration data (mean squared error; no labels). Undone when it does
      not lower the output error. 0: least squares only. Costs minutes where
      the least squares takes seconds.
    learning_rate: Adam's peak learning rate (cosine decay to 0) of
      ``output_steps`` and of ``experimental.reconstruct_steps``.
    seed: seed of the mini-batch order of the gradient steps.
    output_check: after the conversion, the converted model's output is
      compared with the original's on the calibration data (relative error,
      top-1 agreement for class scores); when it is non-finite or far worse
      than the layer-by-layer errors imply, ``"warn"`` logs a warning and
      ``"raise"`` raises a ``RuntimeError``, each naming the first layer
      whose error jumped. ``"off"``: no check.
    experimental: options that measured as no help
      (:class:`ExperimentalCalibration`).
  """

  ridge: float = 1e-3
  permute_channels: bool = True
  refit_batchnorm: bool = True
  batchnorm_affine: bool = True
  refit_stock_layers: bool = True
  batch_size: int = 64
  max_samples: int = DEFAULT_MAX_SAMPLES
  output_steps: int = 0
  learning_rate: float = 1e-3
  seed: int = 0
  output_check: str = "warn"
  experimental: ExperimentalCalibration = dataclasses.field(
    default_factory=ExperimentalCalibration
  )

  def __post_init__(self):
    owner = "CalibrationConfig"
    _set(self, "ridge", _check_float(owner, "ridge", self.ridge, positive=False))
    for name in (
      "permute_channels",
      "refit_batchnorm",
      "batchnorm_affine",
      "refit_stock_layers",
    ):
      _set(self, name, _check_bool(owner, name, getattr(self, name)))
    _set(self, "batch_size", _check_int(owner, "batch_size", self.batch_size, 1))
    _set(self, "max_samples", _check_int(owner, "max_samples", self.max_samples, 1))
    _set(self, "output_steps", _check_int(owner, "output_steps", self.output_steps, 0))
    _set(
      self,
      "learning_rate",
      _check_float(owner, "learning_rate", self.learning_rate, positive=True),
    )
    _set(self, "seed", _check_int(owner, "seed", self.seed, 0))
    if self.output_check not in OUTPUT_CHECKS:
      raise ValueError(
        f"{owner}.output_check: {self.output_check!r} must be one of "
        f"{', '.join(repr(c) for c in OUTPUT_CHECKS)}"
      )
    if not isinstance(self.experimental, ExperimentalCalibration):
      raise ValueError(
        f"{owner}.experimental: {self.experimental!r} must be an "
        "ExperimentalCalibration"
      )


# The keys of the older ``calibration_options`` dict (``calibrate``'s keyword
# arguments) and where each one lives now.
_LEGACY_KEYS: Dict[str, Tuple[str, ...]] = {
  "ridge": ("ridge",),
  "permute_channels": ("permute_channels",),
  "refit_batchnorm": ("refit_batchnorm",),
  "batchnorm_affine": ("batchnorm_affine",),
  "refit_stock_layers": ("refit_stock_layers",),
  "batch_size": ("batch_size",),
  "max_samples": ("max_samples",),
  "output_steps": ("output_steps",),
  "reconstruct_lr": ("learning_rate",),
  "learning_rate": ("learning_rate",),
  "seed": ("seed",),
  "output_check": ("output_check",),
  "search": ("experimental", "search"),
  "search_sweeps": ("experimental", "search_sweeps"),
  "max_candidates": ("experimental", "max_candidates"),
  "reconstruct_steps": ("experimental", "reconstruct_steps"),
}
VALID_OPTION_KEYS = tuple(sorted(_LEGACY_KEYS))


def config_from_options(options: Mapping[str, Any], where: str) -> CalibrationConfig:
  """The :class:`CalibrationConfig` of an older ``calibration_options`` dict.

  Args:
    options: ``{name: value}`` with the names ``calibrate`` used to take
      (``reconstruct_lr`` is now ``learning_rate``; ``search``,
      ``search_sweeps``, ``max_candidates`` and ``reconstruct_steps`` are in
      ``experimental``).
    where: the caller's name, for the error message.

  Raises:
    ValueError: for a key that names no option (the message lists the valid
      keys) or a bad value (the field's own message).
  """
  if not isinstance(options, Mapping):
    raise ValueError(
      f"{where}: calibration_options must be a dict, got {type(options).__name__}"
    )
  unknown = sorted(str(k) for k in options if k not in _LEGACY_KEYS)
  if unknown:
    raise ValueError(
      f"{where}: calibration_options has unknown key(s) {unknown}; valid keys: "
      f"{', '.join(VALID_OPTION_KEYS)}"
    )
  top: Dict[str, Any] = {}
  experimental: Dict[str, Any] = {}
  for key, value in options.items():
    path = _LEGACY_KEYS[key]
    (experimental if path[0] == "experimental" else top)[path[-1]] = value
  if experimental:
    top["experimental"] = ExperimentalCalibration(**experimental)
  return CalibrationConfig(**top)


def spelled(config) -> str:
  """``config`` as the Python that makes it, its default fields left out."""
  parts = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    default = f.default if f.default_factory is dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
      default = f.default_factory()
    if value == default:
      continue
    text = spelled(value) if dataclasses.is_dataclass(value) else repr(value)
    parts.append(f"{f.name}={text}")
  return f"{type(config).__name__}({', '.join(parts)})"
