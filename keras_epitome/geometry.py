"""The index math of epitome layers, in NumPy: shapes, routing maps, ratio rule, fits.

A kernel ``K`` of Keras layout ``(*S, Cin, Cout)`` is sampled from a smaller
epitome ``E`` of shape ``(*S_E, Cin_E, Cout_E)`` through a *routing map*
(docs/design.md has the full statement):

* input channels are cut into ``A = ceil(Cin / Cin_E)`` chunks and output
  channels into ``B = ceil(Cout / Cout_E)`` chunks (the last may be partial);
* input chunk ``a`` has a channel offset ``p_a``, output chunk ``b`` a channel
  offset ``q_b`` and a spatial offset ``sigma_b`` (one per spatial axis), and
  output chunk ``b`` reads the epitome's input channels rolled by the static
  ``r_b = b * channel_roll mod Cin_E``;
* ``K[s, a*Cin_E + u, b*Cout_E + v] = E~[s + sigma_b, (u + p_a + r_b) mod Cin_E,
  (v + q_b) mod Cout_E]``, where ``E~`` reads ``E`` at fractional coordinates by
  linear interpolation along each axis.

This module imports neither TensorFlow nor Keras, so the Keras 2 layers
(:mod:`keras_epitome.layers`), the Keras 3 layers on any backend
(:mod:`keras_epitome.keras3`), the conversion and the exporters share one
statement of the geometry, the ratio rule, the fixed (WSNet) routing and the
closed-form fit. The differentiable samplers live in
:mod:`keras_epitome.sampling` (TensorFlow) and
:mod:`keras_epitome.keras3.ops_sampling` (``keras.ops``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from keras_epitome import spec


class RoutingMap(NamedTuple):
  """Offsets of one epitome layer, as NumPy arrays.

  Attributes:
    in_offsets: ``(A,)`` channel offset of each input chunk, in ``[0, Cin_E)``.
    out_offsets: ``(B,)`` channel offset of each output chunk, in
      ``[0, Cout_E)``.
    spatial_offsets: ``(B, rank)`` spatial offset of each output chunk, each in
      ``[0, S_E[i] - S[i]]``.
  """

  in_offsets: np.ndarray
  out_offsets: np.ndarray
  spatial_offsets: np.ndarray

  def normalized(self, geometry: "EpitomeGeometry") -> "RoutingMap":
    """The same map in its canonical range, as float64 arrays.

    Channel offsets wrap into ``[0, Cin_E)`` / ``[0, Cout_E)`` and spatial
    offsets clip to ``[0, S_E - S]`` (the sampler reads them that way), and
    ``spatial_offsets`` gets its full ``(B, rank)`` shape.

    Example:
      >>> g = EpitomeGeometry((3, 8, 8), (4, 4, 4))
      >>> r = RoutingMap([5.5, -1.0], [4.0, 2.0], [[3.0], [-1.0]]).normalized(g)
      >>> r.in_offsets.tolist(), r.out_offsets.tolist(), r.spatial_offsets.tolist()
      ([1.5, 3.0], [0.0, 2.0], [[1.0], [0.0]])
    """
    g = geometry
    sp_o = np.asarray(self.spatial_offsets, np.float64).reshape(
      g.num_out_chunks, g.rank
    )
    return RoutingMap(
      np.mod(np.asarray(self.in_offsets, np.float64), g.cin_e),
      np.mod(np.asarray(self.out_offsets, np.float64), g.cout_e),
      np.clip(sp_o, 0.0, np.asarray(g.slack, np.float64)[np.newaxis]),
    )


@dataclasses.dataclass(frozen=True)
class EpitomeGeometry:
  """Shapes of a kernel and its epitome, and everything derived from them.

  Args:
    kernel_shape: ``(*S, Cin, Cout)``.
    epitome_shape: ``(*S_E, Cin_E, Cout_E)``.
    channel_roll: output chunk ``b`` reads the epitome's input channels
      rolled by ``r_b = b * channel_roll mod Cin_E`` (a static pattern, not
      stored): ``K[s, a*Cin_E + u, b*Cout_E + v] = E~[s + sigma_b,
      (u + p_a + r_b) mod Cin_E, (v + q_b) mod Cout_E]``. With ``0`` (the
      separable map of docs/design.md) every output chunk holds the same
      ``Cout_E`` filters, so the kernel has rank at most ``Cout_E`` and the
      layer is a thin layer in disguise; a non-zero roll makes the output
      chunks distinct filters.

  Raises:
    ValueError: if the shapes have different ranks, a size is not positive, or
      the epitome is larger than the kernel's channels or smaller than its
      spatial window. The message names the axis and the valid range; layers
      prefix it with their own name.

  Example:
    >>> g = EpitomeGeometry((3, 3, 64, 64), (3, 3, 32, 32))
    >>> g.num_in_chunks, g.num_out_chunks
    (2, 2)
  """

  kernel_shape: Tuple[int, ...]
  epitome_shape: Tuple[int, ...]
  channel_roll: int = 0

  def __post_init__(self):
    # Integer entries only: 3.7 or "3" is refused, not truncated or parsed.
    k = spec.int_tuple(self.kernel_shape, "kernel shape")
    e = spec.int_tuple(self.epitome_shape, "epitome shape")
    object.__setattr__(self, "kernel_shape", k)
    object.__setattr__(self, "epitome_shape", e)
    object.__setattr__(self, "channel_roll", spec.check_channel_roll(self.channel_roll))
    if len(k) < 2:
      raise ValueError(f"kernel shape {k} must have at least 2 axes (Cin, Cout)")
    if len(e) != len(k):
      raise ValueError(
        f"epitome shape {e} must have the kernel's rank {len(k)} "
        f"(kernel shape {k}: {len(k) - 2} spatial axes, then Cin, Cout)"
      )
    if any(d < 1 for d in k):
      raise ValueError(f"kernel shape {k} must have positive sizes")
    if any(d < 1 for d in e):
      raise ValueError(f"epitome shape {e} must have positive sizes")
    for i, (kd, ed) in enumerate(zip(k[:-2], e[:-2], strict=True)):
      if ed < kd:
        raise ValueError(
          f"epitome spatial size {ed} on axis {i} must be at least the kernel's {kd}"
        )
    if e[-2] > k[-2]:
      raise ValueError(
        f"epitome input channels ({e[-2]}) must not exceed the kernel's ({k[-2]})"
      )
    if e[-1] > k[-1]:
      raise ValueError(
        f"epitome output channels ({e[-1]}) must not exceed the kernel's ({k[-1]})"
      )

  @property
  def rank(self) -> int:
    """Number of spatial axes (0 for Dense, 1 for Conv1D, 2 for Conv2D)."""
    return len(self.kernel_shape) - 2

  @property
  def spatial(self) -> Tuple[int, ...]:
    return self.kernel_shape[:-2]

  @property
  def spatial_e(self) -> Tuple[int, ...]:
    return self.epitome_shape[:-2]

  @property
  def cin(self) -> int:
    return self.kernel_shape[-2]

  @property
  def cout(self) -> int:
    return self.kernel_shape[-1]

  @property
  def cin_e(self) -> int:
    return self.epitome_shape[-2]

  @property
  def cout_e(self) -> int:
    return self.epitome_shape[-1]

  @property
  def num_in_chunks(self) -> int:
    return -(-self.cin // self.cin_e)

  @property
  def num_out_chunks(self) -> int:
    return -(-self.cout // self.cout_e)

  @property
  def in_pad(self) -> int:
    """Zero channels that complete the last (partial) input chunk."""
    return self.num_in_chunks * self.cin_e - self.cin

  @property
  def out_chunk_of_channel(self) -> np.ndarray:
    """``(Cout,)`` output chunk ``b`` of each output channel."""
    return np.arange(self.cout) // self.cout_e

  @property
  def in_roll_shifts(self) -> Tuple[int, ...]:
    """Static roll ``r_b = b * channel_roll mod Cin_E`` of the input channels read by output chunk ``b``.

    Python ints, computed without NumPy (a tracing compiler, such as
    PyTorch's, sees constants).
    """
    return tuple(b * self.channel_roll % self.cin_e for b in range(self.num_out_chunks))

  @property
  def in_rolls(self) -> np.ndarray:
    """``(B,)`` :attr:`in_roll_shifts` as an int64 array."""
    return np.asarray(self.in_roll_shifts, dtype=np.int64)

  @property
  def slack(self) -> Tuple[int, ...]:
    """``S_E - S`` per spatial axis: the range of each spatial offset."""
    return tuple(se - s for se, s in zip(self.spatial_e, self.spatial, strict=True))

  @property
  def slack_axes(self) -> Tuple[int, ...]:
    """Spatial axes along which offsets exist (``S_E > S``)."""
    return tuple(i for i, d in enumerate(self.slack) if d > 0)

  @property
  def kernel_size(self) -> int:
    return int(np.prod(self.kernel_shape))

  @property
  def epitome_size(self) -> int:
    return int(np.prod(self.epitome_shape))

  @property
  def routing_size(self) -> int:
    """Numbers stored in the routing map.

    ``A`` input offsets, ``B`` output offsets and ``B`` spatial offsets per
    spatial axis with slack (an axis with ``S_E == S`` has no offset to store).
    """
    return self.num_in_chunks + self.num_out_chunks * (1 + len(self.slack_axes))

  @property
  def stored_size(self) -> int:
    """Numbers the layer stores instead of its kernel: epitome plus routing map."""
    return self.epitome_size + self.routing_size

  @property
  def compression_ratio(self) -> float:
    """Kernel size over stored size (epitome plus routing map)."""
    return self.kernel_size / self.stored_size

  # -- the routing-map vector: ``A`` input offsets, ``B`` output offsets, then
  # ``B`` spatial offsets per axis with slack (what the feature learner
  # predicts and the moving routing map stores).

  def full_spatial(self, columns):
    """``(B, len(slack_axes))`` stored spatial offsets -> ``(B, rank)``, zeros elsewhere."""
    import tensorflow as tf  # the TF tensor helpers; the index math needs no TF

    columns = tf.convert_to_tensor(columns)
    b = self.num_out_chunks
    if not self.rank:
      return tf.zeros([b, 0], columns.dtype)
    zeros = tf.zeros([b], columns.dtype)
    by_axis = dict(zip(self.slack_axes, tf.unstack(columns, axis=1), strict=True))
    return tf.stack([by_axis.get(d, zeros) for d in range(self.rank)], axis=1)

  def pack_offsets(self, in_offsets, out_offsets, spatial_offsets):
    """Offsets (spatial as ``(B, rank)``) -> the ``(routing_size,)`` vector.

    Example:
      >>> g = EpitomeGeometry((3, 8, 8), (4, 4, 4))
      >>> g.pack_offsets([1.0, 2.0], [0.0, 3.0], [[0.5], [1.0]]).numpy().tolist()
      [1.0, 2.0, 0.0, 3.0, 0.5, 1.0]
    """
    import tensorflow as tf

    in_o = tf.reshape(tf.convert_to_tensor(in_offsets), [-1])
    dtype = in_o.dtype
    sp_o = tf.reshape(tf.cast(spatial_offsets, dtype), [self.num_out_chunks, self.rank])
    columns = tf.gather(sp_o, tf.constant(self.slack_axes, tf.int32), axis=1)
    return tf.concat(
      [in_o, tf.reshape(tf.cast(out_offsets, dtype), [-1]), tf.reshape(columns, [-1])],
      axis=0,
    )

  def unpack_offsets(self, packed):
    """The ``(routing_size,)`` vector -> ``(in, out, spatial (B, rank))`` tensors."""
    import tensorflow as tf

    packed = tf.convert_to_tensor(packed)
    a, b = self.num_in_chunks, self.num_out_chunks
    columns = tf.reshape(packed[a + b :], [b, len(self.slack_axes)])
    return packed[:a], packed[a : a + b], self.full_spatial(columns)

  def macs_per_position(self) -> dict:
    """Multiply-adds per output position of each inference form.

    Returns:
      ``{"stock": ..., "factored": ...}``. The factored form runs one
      epitome-sized convolution per distinct window (spatial window and
      input-channel roll; counted as the worst case, one per output chunk,
      when there is spatial slack) and two
      linear channel remixes of two taps each.
    """
    s = int(np.prod(self.spatial)) if self.rank else 1
    stock = s * self.cin * self.cout
    if self.slack_axes:
      windows = self.num_out_chunks
    else:
      windows = len(np.unique(self.in_rolls))
    factored = s * self.cin_e * self.cout_e * windows
    factored += 2 * self.num_in_chunks * self.cin_e + 2 * self.cout
    return {"stock": stock, "factored": factored}


def epitome_shape_for_ratio(
  kernel_shape: Sequence[int], compression: float
) -> Tuple[int, ...]:
  """Turns a compression ratio into an epitome shape (the default rule).

  The rule keeps the spatial window (``S_E = S``) and shrinks channels: the
  larger of ``Cin``/``Cout`` shrinks first, down to the size of the smaller;
  if that is not enough, both shrink together, staying as square as possible.
  Sizes are rounded down so the epitome holds at most ``1/compression`` of the
  kernel; the routing map then costs a little more (see
  :attr:`EpitomeGeometry.compression_ratio` for the achieved ratio).

  Args:
    kernel_shape: ``(*S, Cin, Cout)``.
    compression: ratio ``>= 1``.

  Returns:
    ``(*S, Cin_E, Cout_E)``.

  Raises:
    ValueError: if the ratio is below 1, not finite, or needs fewer than one
      channel on either side (too large for the kernel), or the kernel has no
      input or output channel.

  Example:
    >>> epitome_shape_for_ratio((3, 3, 64, 64), 4)
    (3, 3, 32, 32)
    >>> epitome_shape_for_ratio((3, 3, 16, 64), 4)
    (3, 3, 16, 16)
  """
  kernel_shape = spec.check_channels(kernel_shape)
  compression = spec.check_compression(compression)
  cin, cout = kernel_shape[-2:]
  budget = cin * cout / compression  # channel pairs the epitome may hold
  small, large = min(cin, cout), max(cin, cout)
  large_e = min(large, math.floor(budget / small + 1e-9))
  if large_e >= small:
    small_e = small
  else:
    side = math.floor(math.sqrt(budget) + 1e-9)
    small_e = large_e = side
    # Use the spare budget along one side, still no larger than the kernel.
    large_e = min(small, math.floor(budget / max(side, 1) + 1e-9))
  if small_e < 1 or large_e < 1:
    raise ValueError(
      f"compression {compression:g} is too large for kernel shape "
      f"{kernel_shape}: at most {cin * cout} (one input and one output "
      "channel in the epitome)"
    )
  if cout >= cin:
    cin_e, cout_e = small_e, large_e
  else:
    cin_e, cout_e = large_e, small_e
  return kernel_shape[:-2] + (cin_e, cout_e)


# A layer whose achieved ratio is below this fraction of the requested one
# warns (:func:`ratio_shortfall`).
RATIO_SHORTFALL = 2.0 / 3.0


def ratio_shortfall(geometry: EpitomeGeometry, compression: float) -> Optional[str]:
  """Why ``geometry`` falls short of the requested ``compression``, or ``None``.

  The ratio rule sizes the epitome alone to ``1/compression`` of the kernel
  (rounding down), but the routing map stores ``A + B`` offsets (more with
  spatial slack) whatever the epitome's size, and the epitome cannot shrink
  below one input and one output channel: on a small kernel a large ratio is
  not reached. Returns ``None`` when the achieved ratio is at least
  :data:`RATIO_SHORTFALL` of the request.

  Example:
    >>> g = layer_geometry((3, 13), compression=27.6)
    >>> print(ratio_shortfall(g, 27.6))  # doctest: +ELLIPSIS
    compression=27.6 requested, 2.29x achieved (kernel (3, 13), epitome (1, 1)...
  """
  achieved = geometry.compression_ratio
  if achieved >= RATIO_SHORTFALL * float(compression):
    return None
  g = geometry
  s = int(np.prod(g.spatial)) if g.rank else 1
  # The smallest epitome the rule can give: the window, one channel each way.
  best = g.kernel_size / (s + g.cin + g.cout)
  floor = (
    ", at its floor of one input and one output channel"
    if g.cin_e == 1 and g.cout_e == 1
    else ""
  )
  return (
    f"compression={float(compression):g} requested, {achieved:.3g}x achieved "
    f"(kernel {g.kernel_shape}, epitome {g.epitome_shape}, routing map "
    f"{g.routing_size} offsets): the routing map's {g.routing_size} offsets "
    f"are stored next to a {g.epitome_size}-entry epitome (the epitome alone "
    f"is {g.kernel_size / g.epitome_size:.3g}x{floor}); this kernel reaches at "
    f"most about {best:.3g}x, so ask for less or leave the layer stock"
  )


def layer_geometry(
  kernel_shape: Sequence[int],
  compression: Optional[float] = None,
  epitome_shape: Optional[Sequence[int]] = None,
  channel_roll: int = 0,
  desc: Optional[str] = None,
) -> EpitomeGeometry:
  """The geometry a layer builds: its explicit epitome shape, else the ratio rule's.

  Checks that the kernel has channels on both sides
  (:func:`keras_epitome.spec.check_channels`), that the epitome shape's
  entries are integers and that the epitome and its routing map store no more
  than the kernel (:func:`keras_epitome.spec.check_stored_size`).

  Args:
    kernel_shape: ``(*S, Cin, Cout)``.
    compression: the requested ratio (used when ``epitome_shape`` is
      ``None``).
    epitome_shape: an explicit ``(*S_E, Cin_E, Cout_E)``.
    channel_roll: see :class:`EpitomeGeometry`.
    desc: the layer being built (``"EpitomeDense 'fc'"``). When given, a
      requested ratio the kernel falls well short of (:func:`ratio_shortfall`)
      emits a ``UserWarning`` naming it; without it (trial geometries, early
      checks) nothing is emitted.

  Raises:
    ValueError: the message names the value and what is valid (layers prefix
      their own name).

  Example:
    >>> layer_geometry((3, 3, 64, 64), compression=4).epitome_shape
    (3, 3, 32, 32)
  """
  kernel_shape = spec.check_channels(kernel_shape)
  if epitome_shape is None:
    epitome_shape = epitome_shape_for_ratio(kernel_shape, compression)
  else:
    epitome_shape = spec.check_epitome_shape(epitome_shape, len(kernel_shape) - 2)
  geometry = EpitomeGeometry(kernel_shape, epitome_shape, channel_roll=channel_roll)
  spec.check_stored_size(geometry)
  if desc is not None and compression is not None:
    shortfall = ratio_shortfall(geometry, compression)
    if shortfall is not None:
      warnings.warn(f"{desc}: {shortfall}", UserWarning, stacklevel=2)
  return geometry


# ----------------------------------------------------------------------------
# Routing maps that need no training.


def fixed_routing(
  geometry: EpitomeGeometry, spatial_stride: Optional[Sequence[int]] = None
) -> RoutingMap:
  """WSNet's hand-set sampling: channels tiled, filters strided in space.

  Channel offsets are 0 (every chunk reads the epitome's channels in order).
  Along a spatial axis with slack, output chunk ``b`` starts at
  ``b * stride``; with ``Cout_E = 1`` and ``S_E = S + (Cout - 1) * stride``
  this is WSNet's sampling of 1D filters from one condensed filter.

  Args:
    geometry: the layer's geometry.
    spatial_stride: one stride per spatial axis (``0`` for axes without slack).
      ``None`` spreads the chunks evenly: ``slack // (B - 1)``.

  Returns:
    A :class:`RoutingMap` of integers (as floats).

  Raises:
    ValueError: if a stride is negative or ``(B - 1) * stride`` exceeds the
      axis's slack ``S_E - S``.
  """
  g = geometry
  b = g.num_out_chunks
  if spatial_stride is None:
    spatial_stride = [d // (b - 1) if b > 1 else 0 for d in g.slack]
  spatial_stride = [int(s) for s in spatial_stride]
  if len(spatial_stride) != g.rank:
    raise ValueError(
      f"spatial stride {tuple(spatial_stride)} must have one entry per "
      f"spatial axis ({g.rank})"
    )
  for d, st in enumerate(spatial_stride):
    if st < 0:
      raise ValueError(f"spatial stride {st} on axis {d} must be >= 0")
    if (b - 1) * st > g.slack[d]:
      raise ValueError(
        f"spatial stride {st} on axis {d} does not fit: {b} output chunks "
        f"need (B - 1) * stride = {(b - 1) * st} <= S_E - S = {g.slack[d]}; "
        f"use a stride <= {g.slack[d] // max(b - 1, 1)} or a longer epitome"
      )
  spatial = np.zeros((b, g.rank), np.float32)
  for d, st in enumerate(spatial_stride):
    spatial[:, d] = np.arange(b) * st
  return RoutingMap(
    np.zeros(g.num_in_chunks, np.float32),
    np.zeros(b, np.float32),
    spatial,
  )


# ----------------------------------------------------------------------------
# A routing map as the layers store it.


def spatial_columns(spatial_offsets, geometry: EpitomeGeometry) -> np.ndarray:
  """``(B, rank)`` spatial offsets -> the ``(B, len(slack_axes))`` stored columns.

  Axes without slack (``S_E == S``) store no offset.
  """
  return np.asarray(spatial_offsets)[:, list(geometry.slack_axes)]


def pack_routing(
  in_offsets, out_offsets, spatial_offsets, geometry: EpitomeGeometry
) -> np.ndarray:
  """Offsets (spatial as ``(B, rank)``) -> the ``(routing_size,)`` NumPy vector.

  ``A`` input offsets, ``B`` output offsets, then the stored spatial columns
  row by row: what the feature learner predicts and the moving routing map
  stores (:meth:`EpitomeGeometry.pack_offsets` is the TensorFlow twin).

  Example:
    >>> g = EpitomeGeometry((3, 8, 8), (4, 4, 4))
    >>> pack_routing([1.0, 2.0], [0.0, 3.0], [[0.5], [1.0]], g).tolist()
    [1.0, 2.0, 0.0, 3.0, 0.5, 1.0]
  """
  sp_o = np.asarray(spatial_offsets).reshape(geometry.num_out_chunks, geometry.rank)
  return np.concatenate(
    [
      np.asarray(in_offsets).reshape(-1),
      np.asarray(out_offsets).reshape(-1),
      spatial_columns(sp_o, geometry).reshape(-1),
    ]
  )


class StoredOffsets(NamedTuple):
  """One routing-map variable of an epitome layer and its initial value.

  ``limit`` is the upper bound of each stored spatial column (the lower is 0;
  ``None`` for the channel offsets, which wrap).
  """

  name: str
  shape: Tuple[int, ...]
  initial: np.ndarray
  limit: Optional[np.ndarray]


def stored_offsets(
  geometry: EpitomeGeometry, routing: RoutingMap, scale: float = 1.0
) -> Tuple[StoredOffsets, ...]:
  """The routing-map variables a layer stores, in order, divided by ``scale``.

  ``in_offsets`` ``(A,)``, ``out_offsets`` ``(B,)`` and, where a spatial axis
  has slack, ``spatial_offsets`` ``(B, len(slack_axes))``.

  Example:
    >>> g = EpitomeGeometry((3, 8, 8), (4, 4, 4))
    >>> [(v.name, v.shape) for v in stored_offsets(g, fixed_routing(g))]
    [('in_offsets', (2,)), ('out_offsets', (2,)), ('spatial_offsets', (2, 1))]
  """
  g = geometry
  out = [
    StoredOffsets("in_offsets", (g.num_in_chunks,), routing.in_offsets / scale, None),
    StoredOffsets(
      "out_offsets", (g.num_out_chunks,), routing.out_offsets / scale, None
    ),
  ]
  if g.slack_axes:
    # One column per spatial axis with slack; axes with S_E == S store none.
    limit = np.asarray([g.slack[d] for d in g.slack_axes], np.float32) / scale
    columns = spatial_columns(routing.spatial_offsets, g) / scale
    shape = (g.num_out_chunks, len(g.slack_axes))
    out.append(StoredOffsets("spatial_offsets", shape, columns, limit))
  return tuple(out)


def routing_arrays(
  routing: Sequence, geometry: EpitomeGeometry, desc: str = ""
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks a routing map against a geometry; returns its float32 arrays.

  What ``set_routing_map`` of both layer families assigns: the offsets must
  be finite and shaped ``(A,)``, ``(B,)`` and ``(B, rank)`` (any shape of
  ``B * rank`` entries is taken for the spatial offsets; where no spatial
  axis has slack they are ignored and returned as zeros).

  Args:
    routing: ``(in_offsets, out_offsets, spatial_offsets)``, e.g. a
      :class:`RoutingMap`.
    geometry: the layer's geometry.
    desc: what is configured, prefixed to error messages.

  Returns:
    ``(in_offsets, out_offsets, spatial_offsets (B, rank))``, float32.

  Raises:
    ValueError: for a non-finite offset or a shape that does not match.

  Example:
    >>> g = EpitomeGeometry((3, 8, 8), (4, 4, 4))
    >>> routing_arrays(([0.0], [0.0, 1.0], [0.0, 1.0]), g, "layer")
    Traceback (most recent call last):
    ...
    ValueError: layer: routing map in_offsets has shape (1,), expected (2,)
  """
  g = geometry
  spec.check_finite_offsets(routing, desc)
  in_o = np.asarray(routing[0], np.float32)
  out_o = np.asarray(routing[1], np.float32)
  sp_o = np.asarray(routing[2], np.float32)
  if sp_o.size == g.num_out_chunks * g.rank:  # also (B, 0) for Dense
    sp_o = sp_o.reshape(g.num_out_chunks, g.rank)
  for name, arr, want in (
    ("in_offsets", in_o, (g.num_in_chunks,)),
    ("out_offsets", out_o, (g.num_out_chunks,)),
    ("spatial_offsets", sp_o, (g.num_out_chunks, g.rank)),
  ):
    if arr.shape != want and not (name == "spatial_offsets" and not g.slack_axes):
      raise ValueError(
        f"{desc + ': ' if desc else ''}routing map {name} has shape {arr.shape}, "
        f"expected {want}"
      )
  if not g.slack_axes:
    sp_o = np.zeros((g.num_out_chunks, g.rank), np.float32)
  return in_o, out_o, sp_o


# ----------------------------------------------------------------------------
# Closed-form fit (docs/design.md).


def epitome_reads(
  routing: RoutingMap, geometry: EpitomeGeometry, what: str = "epitome_reads"
) -> np.ndarray:
  """The epitome entry each kernel entry reads, for an integer routing map.

  Args:
    routing: integer-valued :class:`RoutingMap`.
    geometry: the layer's geometry.
    what: the caller's name, for error messages.

  Returns:
    A kernel-shaped ``int64`` array of flat indices into the epitome.

  Raises:
    ValueError: if an offset is fractional or not finite.

  Example:
    >>> g = EpitomeGeometry((4, 2), (2, 2))
    >>> r = RoutingMap(np.array([0.0, 1.0]), np.zeros(1), np.zeros((1, 0)))
    >>> epitome_reads(r, g).tolist()
    [[0, 1], [2, 3], [2, 3], [0, 1]]
  """
  g = geometry
  spec.check_finite_offsets(routing, what)
  for name, arr in zip(RoutingMap._fields, routing, strict=True):
    arr = np.asarray(arr, np.float64)
    if arr.size and not np.allclose(arr, np.round(arr)):
      raise ValueError(
        f"{what} needs integer offsets; {name} has fractional values "
        f"{arr[np.abs(arr - np.round(arr)) > 1e-9][:4]}"
      )
  # With integer offsets every kernel entry reads exactly one epitome entry:
  # K[s, a*Cin_E + u, b*Cout_E + v] = E[s + sigma_b, (u + p_a + r_b) mod Cin_E,
  # (v + q_b) mod Cout_E] (docs/design.md), spatial offsets clipped to the slack.
  r = routing.normalized(g)
  p = np.rint(r.in_offsets).astype(np.int64)
  q = np.rint(r.out_offsets).astype(np.int64)
  sigma = np.rint(r.spatial_offsets).astype(np.int64)  # (B, rank)
  ci = np.arange(g.cin)
  co = np.arange(g.cout)
  a, u = ci // g.cin_e, ci % g.cin_e
  b, v = co // g.cout_e, co % g.cout_e
  e_in = (u[:, None] + p[a][:, None] + g.in_rolls[b][None, :]) % g.cin_e  # (Cin, Cout)
  e_out = (v + q[b]) % g.cout_e  # (Cout,)
  flat = e_in * g.cout_e + e_out[None, :]  # index within one spatial position
  if not g.rank:
    return flat.astype(np.int64)
  grids = np.meshgrid(*[np.arange(s) for s in g.spatial], indexing="ij")
  pos = np.zeros(g.spatial + (1, g.cout), np.int64)
  for d in range(g.rank):  # row-major flat spatial index into S_E
    coord = grids[d][..., None, None] + sigma[b, d][None, :]
    pos = pos * g.spatial_e[d] + coord
  return (pos * (g.cin_e * g.cout_e) + flat).astype(np.int64)


def fit_epitome(
  kernel, routing: RoutingMap, geometry: EpitomeGeometry, fill=None
) -> np.ndarray:
  """Least-squares epitome for a kernel under an integer routing map.

  With integer offsets every kernel entry reads exactly one epitome entry, so
  the least-squares epitome is the mean of the kernel entries that read each
  epitome entry. Epitome entries that no kernel entry reads keep ``fill``
  (zeros by default).

  Args:
    kernel: ``(*S, Cin, Cout)`` array (e.g. a trained kernel).
    routing: integer-valued :class:`RoutingMap`.
    geometry: the layer's geometry.
    fill: optional epitome-shaped array for entries no kernel entry reads.

  Returns:
    The epitome as a NumPy array of the kernel's dtype.

  Raises:
    ValueError: if the kernel has the wrong shape or an offset is fractional.

  Example:
    >>> g = EpitomeGeometry((4, 4), (2, 2))
    >>> r = RoutingMap(np.zeros(2), np.zeros(2), np.zeros((2, 0)))
    >>> k = np.tile(np.eye(2), (2, 2))
    >>> fit_epitome(k, r, g)
    array([[1., 0.],
           [0., 1.]])
  """
  g = geometry
  kernel = np.asarray(kernel)
  if tuple(kernel.shape) != g.kernel_shape:
    raise ValueError(
      f"kernel shape {tuple(kernel.shape)} does not match the geometry's "
      f"{g.kernel_shape}"
    )
  dtype = kernel.dtype if kernel.dtype.kind == "f" else np.float32
  reads = epitome_reads(routing, g, "fit_epitome").reshape(-1)
  sums = np.bincount(
    reads, weights=kernel.astype(np.float64).reshape(-1), minlength=g.epitome_size
  ).reshape(g.epitome_shape)
  counts = np.bincount(reads, minlength=g.epitome_size).reshape(g.epitome_shape)
  out = np.zeros(g.epitome_shape) if fill is None else np.array(fill, np.float64)
  read = counts > 0
  out[read] = sums[read] / counts[read]
  return out.astype(dtype)


# ----------------------------------------------------------------------------
# Taps for the factored inference form (docs/design.md).


class ChannelTaps(NamedTuple):
  """Two-tap remix of one channel axis with a frozen offset per chunk.

  ``shift[c]`` and ``frac[c]`` per chunk ``c``: the chunk is rolled by
  ``shift`` (its element ``u`` meets epitome channel ``(u + shift) mod size``)
  and blended with the roll by ``shift + 1`` with weight ``frac``.
  """

  shift: np.ndarray
  frac: np.ndarray


def channel_taps(offsets, size: int) -> ChannelTaps:
  """Integer shift and fraction of frozen channel offsets (wrapped to ``size``)."""
  offsets = np.asarray(offsets, np.float64)
  base = np.floor(offsets)
  return ChannelTaps(np.mod(base, size).astype(np.int64), offsets - base)


def spatial_taps(offsets, slack: int) -> Tuple[np.ndarray, np.ndarray]:
  """Start and fraction of frozen spatial offsets, as :func:`sample_kernel` reads them."""
  offsets = np.clip(np.asarray(offsets, np.float64), 0.0, float(slack))
  if slack == 0:
    return np.zeros(offsets.shape, np.int64), np.zeros(offsets.shape)
  base = np.minimum(np.floor(offsets), slack - 1)
  return base.astype(np.int64), offsets - base
