"""What a calibration did to each layer: :class:`LayerCalibration`."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional


@dataclasses.dataclass
class LayerCalibration:
  """What :func:`keras_epitome.calibrate` did to one layer (or the model).

  Attributes:
    name: the layer's name (``"<model> (output)"``, ``"<model> (batchnorm)"``
      and ``"<model> (check)"`` for the model-level records).
    output_error: relative output error on the calibration data after the
      data-aware fit: ``|X_s K + b - Y| / |Y - mean(Y)|`` (pre-activation),
      with ``X_s`` the converted model's own inputs to the layer and ``Y``
      the original layer's output in the original model, so the errors of
      the layers before it are included.
    weight_fit_output_error: the same error for the weight-space fit
      (``init="fit"``) with the same inputs, for comparison.
    routing_searched: whether the routing map was chosen with the data
      (``False`` for the fixed sampler, or without
      ``ExperimentalCalibration.search``).
    output_order: with ``permute_channels``, the layer's output channel
      ``j`` reproduces the original layer's channel ``output_order[j]``
      (``None``: same order).
    reconstructed_to: with ``reconstruct_steps``, the last layer of the
      block whose output the reconstruction matched (e.g. the ReLU after the
      layer's BatchNorm); for ``"<model> (output)"`` and ``"<model>
      (check)"``, the model's last layer.
    block_error_before: relative error of that block's output (post-
      activation) on the calibration data after the least-squares fit,
      ``|B_s - B_t| / |B_t - mean(B_t)|``.
    block_error: the same error after the reconstruction (never above
      ``block_error_before``: a reconstruction that does not lower it is
      undone); for ``"<model> (check)"``, the converted model's output
      error against the original model's.
    seconds: wall time of this layer's fit.
    layer_errors: for ``"<model> (check)"``, the relative error of each
      layer's output (from the first fitted layer on, in network order)
      against the original model's same layer on the first 64 calibration
      samples,
      ``|A_s - A_t| / |A_t - mean(A_t)|``: it includes the errors of all
      layers before it, so a jump marks where a conversion went wrong.
    note: why the layer kept its weight fit, if it did, or what a
      model-level record says.
  """

  name: str
  output_error: Optional[float] = None
  weight_fit_output_error: Optional[float] = None
  routing_searched: bool = False
  output_order: Optional[List[int]] = None
  reconstructed_to: Optional[str] = None
  block_error_before: Optional[float] = None
  block_error: Optional[float] = None
  seconds: Optional[float] = None
  layer_errors: Optional[Dict[str, float]] = None
  note: str = ""
