"""``EpitomeCompressor``: neural epitomes under the weight-compression contract.

A kernel becomes an epitome plus a routing map (Neural Epitome Search).
Training samples the kernel with the package's differentiable sampler, so the
epitome and the offsets are fine-tuned together; inference stores the epitome
and rebuilds the kernel from it with static slices at the frozen routing map.

Example:
  >>> import keras_epitome as ke
  >>> from keras_epitome import compression
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 1)),
  ...     keras.layers.Conv2D(32, 3, activation="relu"),
  ...     keras.layers.Conv2D(64, 3, activation="relu"),
  ...     keras.layers.Flatten(),
  ...     keras.layers.Dense(10),
  ... ])
  >>> algorithm = compression.EpitomeCompressor(compression=4)
  >>> training_model = compression.compress_model_for_training(model, algorithm)
  >>> # ... fine-tune training_model ...
  >>> inference_model = compression.compress_model_for_inference(training_model)
"""

from __future__ import annotations

from typing import List

import numpy as np
import tensorflow as tf

from keras_epitome import sampling, spec
from keras_epitome.backend import keras
from keras_epitome.compression.algorithm import (
  StaticWeight,
  WeightCompressor,
  kernel_weight,
)

_PACKAGE = "keras_epitome"


def _static_value(tensor, what: str):
  value = tf.get_static_value(tensor)
  if value is None:
    raise ValueError(
      f"{what} must be a static weight (a constant when the graph is built); "
      "got a tensor whose value is only known at run time"
    )
  return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EpitomeCompressor(WeightCompressor):
  """Compresses kernels into neural epitomes (the TF-MOT contract).

  Per compressible kernel ``(*S, Cin, Cout)`` (``kernel`` or
  ``depthwise_kernel`` of ``Conv1D``, ``Conv2D``, ``Conv3D``,
  ``DepthwiseConv2D``, ``Dense``, ...):

  * ``init_training_weights``: the epitome shape follows the ratio rule of
    :func:`~keras_epitome.sampling.epitome_shape_for_ratio`; the routing map
    starts as :func:`~keras_epitome.sampling.fixed_routing`, and the epitome
    is the closed-form least-squares fit of the pretrained kernel
    (:func:`~keras_epitome.sampling.fit_epitome`), so the wrapped model starts
    from the trained model's best epitome approximation. Training weights:
    the kernel shape (static), the epitome, the input-chunk, output-chunk and
    (when the epitome has spatial slack) spatial offsets.
  * ``project_training_weights``: :func:`~keras_epitome.sampling.sample_kernel`
    (differentiable in the epitome and the offsets).
  * ``compress_training_weights``: freezes the routing map (channel offsets
    wrapped, spatial offsets clipped) into static weights; only the epitome
    stays a variable.
  * ``decompress_weights``: :func:`~keras_epitome.sampling.sample_kernel_frozen`
    (static slices and concats, no index tensor).

  Args:
    compression: target ratio of each kernel (``>= 1``).
    learn_offsets: train the routing map's offsets along with the epitome
      (NES); ``False`` keeps the fixed (WSNet) routing.
    min_kernel_size: kernels with fewer entries are left alone.
    channel_roll: output chunk ``b`` reads the epitome's input channels
      rolled by ``b * channel_roll`` (as the epitome layers' argument of the
      same name; default 1). ``0`` is the separable map, whose output chunks
      hold the same filters. Configs saved without it load with ``0``, as they
      were trained.

  Raises:
    ValueError: for a ratio below 1, a negative minimum size or roll.

  Example:
    >>> dense = keras.layers.Dense(64)
    >>> dense.build((None, 64))
    >>> from keras_epitome import compression
    >>> algorithm = compression.EpitomeCompressor(compression=4)
    >>> wrapped = compression.create_layer_for_training(dense, algorithm)
    >>> wrapped.training_weights["kernel"][1].shape
    TensorShape([32, 32])
  """

  def __init__(
    self,
    compression: float = 4.0,
    learn_offsets: bool = True,
    min_kernel_size: int = 0,
    channel_roll: int = 1,
  ):
    compression = spec.check_compression(compression, "EpitomeCompressor")
    self.channel_roll = spec.check_channel_roll(channel_roll, "EpitomeCompressor")
    if int(min_kernel_size) < 0:
      raise ValueError(
        f"EpitomeCompressor: min_kernel_size must be >= 0, got {min_kernel_size!r}"
      )
    self.compression = float(compression)
    self.learn_offsets = bool(learn_offsets)
    self.min_kernel_size = int(min_kernel_size)

  def geometry_for(self, kernel_shape) -> sampling.EpitomeGeometry:
    """The epitome geometry this algorithm gives a kernel of ``kernel_shape``."""
    kernel_shape = tuple(int(d) for d in kernel_shape)
    return sampling.EpitomeGeometry(
      kernel_shape,
      sampling.epitome_shape_for_ratio(kernel_shape, self.compression),
      channel_roll=self.channel_roll,
    )

  def get_compressible_weights(self, original_layer) -> List[tf.Variable]:
    kernel = kernel_weight(original_layer)
    if kernel is None or int(np.prod(kernel.shape)) < self.min_kernel_size:
      return []
    try:
      self.geometry_for(kernel.shape)
    except ValueError:  # ratio too large for this kernel: leave it alone
      return []
    return [kernel]

  def init_training_weights(self, pretrained_weight):
    g = self.geometry_for(pretrained_weight.shape)
    routing = sampling.fixed_routing(g)
    kernel = np.asarray(pretrained_weight)
    if np.any(kernel):
      epitome = sampling.fit_epitome(kernel, routing, g)
    else:
      # A zero placeholder (a wrapper rebuilt from its config, whose trained
      # values are loaded afterwards): its fit is zero.
      epitome = np.zeros(g.epitome_shape, kernel.dtype)
    dtype = pretrained_weight.dtype
    self.add_static_weight("kernel_shape", g.kernel_shape, dtype="int64")
    self.add_training_weight(
      name="epitome",
      shape=g.epitome_shape,
      dtype=dtype,
      initializer=keras.initializers.Constant(epitome),
    )
    offsets = [("in_offsets", routing.in_offsets), ("out_offsets", routing.out_offsets)]
    if g.slack_axes:
      offsets.append(("spatial_offsets", routing.spatial_offsets))
    for name, value in offsets:
      self.add_training_weight(
        name=name,
        shape=value.shape,
        dtype=dtype,
        initializer=keras.initializers.Constant(value),
        trainable=self.learn_offsets,
      )

  def _geometry(self, kernel_shape, epitome) -> sampling.EpitomeGeometry:
    shape = _static_value(kernel_shape, "EpitomeCompressor: kernel_shape")
    return sampling.EpitomeGeometry(
      tuple(shape), tuple(epitome.shape), channel_roll=self.channel_roll
    )

  def project_training_weights(
    self, kernel_shape, epitome, in_offsets, out_offsets, *spatial_offsets
  ):
    g = self._geometry(kernel_shape, epitome)
    spatial = spatial_offsets[0] if spatial_offsets else None
    return sampling.sample_kernel(epitome, in_offsets, out_offsets, spatial, g)

  def compress_training_weights(
    self, kernel_shape, epitome, in_offsets, out_offsets, *spatial_offsets
  ):
    g = self._geometry(kernel_shape, epitome)
    spec.check_finite_offsets(
      [in_offsets, out_offsets, *spatial_offsets],
      "EpitomeCompressor.compress_training_weights",
    )
    sp_o = (
      spatial_offsets[0] if spatial_offsets else np.zeros((g.num_out_chunks, g.rank))
    )
    frozen = sampling.RoutingMap(in_offsets, out_offsets, sp_o).normalized(g)
    routing = [
      StaticWeight(g.kernel_shape, dtype="int64"),
      tf.convert_to_tensor(epitome),
      StaticWeight(frozen.in_offsets),
      StaticWeight(frozen.out_offsets),
    ]
    if spatial_offsets:
      routing.append(StaticWeight(frozen.spatial_offsets))
    return routing

  def decompress_weights(
    self, kernel_shape, epitome, in_offsets, out_offsets, *spatial_offsets
  ):
    g = self._geometry(kernel_shape, epitome)
    what = "EpitomeCompressor.decompress_weights: the routing map"
    spatial = (
      _static_value(spatial_offsets[0], what)
      if spatial_offsets
      else np.zeros((g.num_out_chunks, g.rank))
    )
    routing = sampling.RoutingMap(
      _static_value(in_offsets, what), _static_value(out_offsets, what), spatial
    )
    return sampling.sample_kernel_frozen(epitome, routing, g)

  def get_config(self) -> dict:
    return {
      "compression": self.compression,
      "learn_offsets": self.learn_offsets,
      "min_kernel_size": self.min_kernel_size,
      "channel_roll": self.channel_roll,
    }

  @classmethod
  def from_config(cls, config: dict) -> "EpitomeCompressor":
    # Saved before the roll existed: trained with the separable map.
    return cls(**{"channel_roll": 0, **config})
