"""Epitome sampling: the one module where the index math lives.

A kernel ``K`` of Keras layout ``(*S, Cin, Cout)`` is sampled from a smaller
epitome ``E`` of shape ``(*S_E, Cin_E, Cout_E)`` through a *routing map*:

* input channels are cut into ``A = ceil(Cin / Cin_E)`` chunks and output
  channels into ``B = ceil(Cout / Cout_E)`` chunks (the last may be partial);
* input chunk ``a`` has a channel offset ``p_a``, output chunk ``b`` has a
  channel offset ``q_b`` and a spatial offset ``sigma_b`` (one per spatial axis);
* ``K[s, a*Cin_E + u, b*Cout_E + v] =
  E~[s + sigma_b, (u + p_a) mod Cin_E, (v + q_b) mod Cout_E]``, where ``E~``
  reads ``E`` at fractional coordinates by linear interpolation along each
  axis. Channel offsets wrap around; spatial offsets are clipped to
  ``[0, S_E - S]``.

The training-time sampler (:func:`sample_kernel`) is separable: it expands
the output-channel axis, then each spatial axis, then the input-channel axis,
so each stage costs the size of its output. Every stage is a
:func:`_window_lerp` under ``tf.custom_gradient``: each chunk reads one
contiguous window (a gather of consecutive indices; channel axes are doubled
so windows wrap) and blends its two neighbouring views. The epitome gradient
is the segment sum of the interpolation-weighted kernel gradient; because each
chunk's read is a shift, that sum is computed as shifts back (again contiguous
gathers) summed over chunks, with no scatter. The gradient of each chunk's interpolation weight is
``sum(dK * (E[hi] - E[lo]))``, from which TensorFlow chains to the offsets.

The same module provides what the other forms need: the closed-form epitome
fit (:func:`fit_epitome`), the channel remix coefficients of the factored
inference form (:func:`channel_taps`, :func:`spatial_taps`) and the compression
bookkeeping (:class:`EpitomeGeometry`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

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
      separable map of DESIGN.md section 1) every output chunk holds the same
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
    k = tuple(int(d) for d in self.kernel_shape)
    e = tuple(int(d) for d in self.epitome_shape)
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
  def in_rolls(self) -> np.ndarray:
    """``(B,)`` static roll ``r_b`` of the input channels read by output chunk ``b``."""
    b = np.arange(self.num_out_chunks, dtype=np.int64)
    return (b * self.channel_roll) % self.cin_e

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
      channel on either side (too large for the kernel).

  Example:
    >>> epitome_shape_for_ratio((3, 3, 64, 64), 4)
    (3, 3, 32, 32)
    >>> epitome_shape_for_ratio((3, 3, 16, 64), 4)
    (3, 3, 16, 16)
  """
  kernel_shape = tuple(int(d) for d in kernel_shape)
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


def layer_geometry(
  kernel_shape: Sequence[int],
  compression: Optional[float] = None,
  epitome_shape: Optional[Sequence[int]] = None,
  channel_roll: int = 0,
) -> EpitomeGeometry:
  """The geometry a layer builds: its explicit epitome shape, else the ratio rule's.

  Checks that the epitome and its routing map store no more than the kernel
  (:func:`keras_epitome.spec.check_stored_size`).

  Example:
    >>> layer_geometry((3, 3, 64, 64), compression=4).epitome_shape
    (3, 3, 32, 32)
  """
  if epitome_shape is None:
    epitome_shape = epitome_shape_for_ratio(kernel_shape, compression)
  geometry = EpitomeGeometry(
    kernel_shape, tuple(int(d) for d in epitome_shape), channel_roll=channel_roll
  )
  spec.check_stored_size(geometry)
  return geometry


# ----------------------------------------------------------------------------
# Index tables (NumPy, once per geometry).


def _finite_or_nan(offsets):
  """``(safe, nan)``: non-finite offsets replaced by 0, and NaN where they were.

  A diverged offset must not become an index (an int cast of NaN is
  ``-2**31``: an index error on CPU, a silent 0 on GPU). It reads index 0 and
  its interpolation weight is NaN, so the kernel, and the layer's output, is
  NaN, as a stock layer's would be (and ``TerminateOnNaN`` can act).
  """
  finite = tf.math.is_finite(offsets)
  zeros = tf.zeros_like(offsets)
  safe = tf.where(finite, offsets, zeros)
  return safe, tf.where(finite, zeros, tf.constant(np.nan, offsets.dtype))


def _split_channel_offset(offsets, size: int):
  """Integer part (wrapped) and fractional part of channel offsets.

  The integer part is wrapped in floating point before the int32 cast, so
  offsets beyond ``2**31`` wrap as the NumPy paths (``np.mod`` in float64) do.
  """
  offsets = tf.convert_to_tensor(offsets)
  offsets, nan = _finite_or_nan(offsets)
  base = tf.floor(offsets)
  frac = offsets - base + nan
  n = tf.cast(tf.math.floormod(base, tf.constant(size, base.dtype)), tf.int32)
  # floormod in floating point may round up to ``size`` itself.
  n = tf.where(n >= size, n - size, n)
  return n, frac


def _split_spatial_offset(offsets, slack: int):
  """Integer start and fraction of clipped spatial offsets in ``[0, slack]``.

  The start is clipped to the last valid start ``slack - 1`` so that
  ``start + 1`` stays inside the epitome; at ``offset == slack`` the fraction
  is then exactly 1. A non-finite offset gives a NaN fraction.
  """
  offsets, nan = _finite_or_nan(tf.convert_to_tensor(offsets))
  offsets = tf.clip_by_value(offsets, 0.0, float(slack))
  base = tf.minimum(tf.floor(offsets), float(slack - 1))
  frac = offsets - base + nan
  return tf.cast(base, tf.int32), frac


# ----------------------------------------------------------------------------
# The sampling primitive: interpolated windows.
#
# A chunk's channel offset rolls a whole channel axis (wrapping): two
# ``tf.roll`` per chunk, blended (:func:`_circular_lerp`). A spatial offset
# moves a window along a spatial axis (no wrapping): a chunk reads a
# contiguous window of ``length + 1`` entries and blends its two overlapping
# views ``[0, length)`` and ``[1, length + 1)``. So the forward pass is one
# contiguous read per chunk plus
# dense elementwise work, and the backward pass, the segment sum of the
# interpolation-weighted kernel gradient, is its transpose: blend the gradient
# with itself rolled by one, then roll it back by each chunk's offset (again
# one contiguous read per chunk) and sum. No scatter, no transpose of
# a kernel-sized tensor: scatters run single-threaded on CPU and XLA fuses
# transposes into strided reads.


def _static_slice(x, axis: int, start: int, stop: int):
  index = [slice(None)] * x.shape.rank
  index[axis] = slice(start, stop)
  return x[tuple(index)]


def _roll_by_one(x, axis: int):
  """``y[t] = x[t - 1]`` along ``axis``, wrapping."""
  n = x.shape[axis]
  if n == 1:
    return x
  return tf.concat(
    [_static_slice(x, axis, n - 1, n), _static_slice(x, axis, 0, n - 1)], axis
  )


def _window_lerp(x, starts, frac, axis: int, length: int, batch_axis, wrap: bool):
  """Per-chunk interpolated windows along one axis.

  For chunk ``b`` with start ``n_b`` and fraction ``f_b``:
  ``y_b[j] = (1 - f_b) * x_b[n_b + j] + f_b * x_b[n_b + j + 1]`` for
  ``j < length``, indices taken mod ``L = x.shape[axis]`` when ``wrap``.

  Args:
    x: input tensor.
    starts: ``(B,)`` int32 window starts, in ``[0, L)`` when ``wrap``, else
      with ``start + length + 1 <= L``.
    frac: ``(B,)`` float weights of the second view.
    axis: the axis the windows run along.
    length: window length (``<= L``).
    batch_axis: ``None``: every chunk reads all of ``x``, and the chunks are
      stacked on a new axis just before ``axis``. An int: ``x`` has ``B``
      entries along ``batch_axis`` and chunk ``b`` reads entry ``b``.
    wrap: channel wrapping (read the axis as a circle; ``length`` must be
      ``L``, and the windows are rolls: :func:`_circular_lerp`).

  Returns:
    The windows; ``axis`` has length ``length`` (and, for ``batch_axis=None``,
    the new chunk axis sits at ``axis`` and the window axis at ``axis + 1``).
  """
  num = int(starts.shape[0])
  big = x.shape[axis]
  rank = x.shape.rank
  stacked = batch_axis is None
  out_axis = axis + 1 if stacked else axis
  chunk_axis = axis if stacked else batch_axis
  w_shape = [1] * (rank + int(stacked))
  w_shape[chunk_axis] = num
  if wrap:  # every caller wraps a whole channel axis
    if length != big:
      raise ValueError(f"a wrapping window ({length}) must span its axis ({big})")
    return _circular_lerp(x, starts, frac, axis, batch_axis, w_shape)

  # Reads are gathers of contiguous indices, not tf.slice: XLA takes a slice's
  # begin as a compile-time constant and would recompile whenever an offset
  # changes (every training step).
  reads = starts[:, tf.newaxis] + np.arange(length + 1, dtype=np.int32)
  back = (big - starts)[:, tf.newaxis] + np.arange(big, dtype=np.int32)

  @tf.custom_gradient
  def _fn(x, frac):
    if stacked:
      win = tf.gather(x, reads, axis=axis)  # (.., B, length + 1, ..)
    else:
      sources = tf.split(x, num, axis=batch_axis) if num > 1 else [x]
      pieces = [tf.gather(src, reads[b], axis=axis) for b, src in enumerate(sources)]
      win = tf.concat(pieces, batch_axis) if num > 1 else pieces[0]
    lo = _static_slice(win, out_axis, 0, length)
    diff = _static_slice(win, out_axis, 1, length + 1) - lo
    w = tf.reshape(tf.cast(frac, x.dtype), w_shape)
    y = lo + w * diff

    def grad(dy):
      if length < big:  # entries no window position reads as "lo" get zeros
        pads = [[0, 0]] * dy.shape.rank
        pads[out_axis] = [0, big - length]
        d = tf.pad(dy, pads)
      else:
        d = dy
      # x entry t is "lo" of position t - n and "hi" of position t - n - 1:
      # blend, then shift each chunk back by its start (and sum the chunks).
      a = d - w * d + w * _roll_by_one(d, out_axis)
      aa = tf.concat([a, a], out_axis)
      if stacked:
        shape = aa.shape.as_list()
        merged = shape[:chunk_axis] + [num * 2 * big] + shape[out_axis + 1 :]
        merged = [-1 if d is None else d for d in merged]  # an unknown batch
        flat = back + (2 * big * np.arange(num, dtype=np.int32))[:, tf.newaxis]
        dxs = tf.gather(tf.reshape(aa, merged), flat, axis=chunk_axis)
        dx = tf.reduce_sum(dxs, axis=chunk_axis)
      else:
        sources = tf.split(aa, num, axis=chunk_axis) if num > 1 else [aa]
        dxs = [tf.gather(src, back[b], axis=out_axis) for b, src in enumerate(sources)]
        dx = tf.concat(dxs, batch_axis) if num > 1 else dxs[0]
      sum_axes = [i for i in range(dy.shape.rank) if i != chunk_axis]
      dfrac = tf.reduce_sum(dy * diff, axis=sum_axes)
      return dx, tf.cast(dfrac, frac.dtype)

    return y, grad

  return _fn(x, frac)


def _circular_lerp(x, starts, frac, axis: int, batch_axis, w_shape):
  """:func:`_window_lerp` of whole circular axes: two ``tf.roll`` per chunk.

  ``y_b = (1 - f_b) * roll(x_b, -n_b) + f_b * roll(x_b, -n_b - 1)``. A roll
  with a run-time shift is one contiguous pass (XLA lowers it to dynamic
  slices, no recompilation when the shift changes), and its gradient is the
  roll back, so autodiff needs no scatter; about 3x faster than the gathers
  of the general windows on CPU (forward and backward).
  """
  num = int(starts.shape[0])
  stacked = batch_axis is None
  sources = (
    [x] * num if stacked else (tf.split(x, num, axis=batch_axis) if num > 1 else [x])
  )
  los, his = [], []
  for b, src in enumerate(sources):
    los.append(tf.roll(src, -starts[b], axis))
    his.append(tf.roll(src, -starts[b] - 1, axis))
  if stacked:
    lo, hi = tf.stack(los, axis), tf.stack(his, axis)
  elif num > 1:
    lo, hi = tf.concat(los, batch_axis), tf.concat(his, batch_axis)
  else:
    lo, hi = los[0], his[0]
  w = tf.reshape(tf.cast(frac, x.dtype), w_shape)
  return lo + w * (hi - lo)


def _roll_chunks(x, rolls, axis: int, chunk_axis: int):
  """Rolls ``axis`` of each entry along ``chunk_axis`` by its static roll.

  ``y[.., b, ..][e] = x[.., b, ..][(e + rolls[b]) mod n]``: a split along the
  chunks, one ``tf.roll`` per chunk with a static shift, a concat. Their
  gradients are a concat, rolls back and a split: whole-tensor passes, where
  the per-chunk slices this replaced back-propagated as one zero-padded
  kernel-sized tensor per slice (10x slower on CPU). XLA compiles static
  rolls into slices once.
  """
  n = x.shape[axis]
  rolls = [int(r) % n for r in rolls]
  pieces = tf.split(x, len(rolls), axis=chunk_axis) if len(rolls) > 1 else [x]
  pieces = [
    tf.roll(p, -r, axis) if r else p for p, r in zip(pieces, rolls, strict=True)
  ]
  return tf.concat(pieces, chunk_axis) if len(pieces) > 1 else pieces[0]


def _expand_channels(x, offsets, size: int, chunk: int, axis: int):
  """Expands channel ``axis`` of ``x`` from ``chunk`` to ``size`` entries.

  Output channel ``b*chunk + v`` reads epitome channel ``(v + o_b) mod chunk``
  (interpolated); chunk ``b``'s offset is ``offsets[b]``.
  """
  n, frac = _split_channel_offset(offsets, chunk)
  y = _window_lerp(x, n, frac, axis, chunk, batch_axis=None, wrap=True)
  shape = x.shape.as_list()
  shape[axis] = -1
  y = tf.reshape(y, shape)  # merge (B, chunk) -> B*chunk
  num = int(n.shape[0])
  if num * chunk > size:  # partial last chunk
    y = _static_slice(y, axis, 0, size)
  return y


# ----------------------------------------------------------------------------
# Training-time sampler.


def sample_kernel(
  epitome,
  in_offsets,
  out_offsets,
  spatial_offsets,
  geometry: EpitomeGeometry,
):
  """Samples the full kernel from an epitome and a routing map.

  Args:
    epitome: ``(*S_E, Cin_E, Cout_E)`` tensor.
    in_offsets: ``(A,)`` input-chunk channel offsets (any real; wrapped).
    out_offsets: ``(B,)`` output-chunk channel offsets (any real; wrapped).
    spatial_offsets: ``(B, rank)`` spatial offsets (clipped to
      ``[0, S_E - S]``), or ``None`` when the epitome has no spatial slack.
    geometry: the layer's :class:`EpitomeGeometry`.

  Returns:
    The kernel, ``(*S, Cin, Cout)``, differentiable with respect to the
    epitome and all offsets.

  Example:
    >>> g = EpitomeGeometry((4, 6), (2, 3))
    >>> e = tf.reshape(tf.range(6, dtype=tf.float32), (2, 3))
    >>> k = sample_kernel(e, [0.0, 1.0], [0.0, 0.5], None, g)
    >>> k.shape
    TensorShape([4, 6])
  """
  g = geometry
  epitome = tf.convert_to_tensor(epitome)
  dtype = epitome.dtype
  rank = g.rank
  b = g.num_out_chunks
  if g.slack_axes and spatial_offsets is None:
    raise ValueError(
      f"geometry {g.kernel_shape} <- {g.epitome_shape} has spatial slack "
      f"{g.slack} and needs spatial offsets"
    )

  # Stage 1: output channels, kept as (*S_E, Cin_E, B, Cout_E) so that the
  # spatial stage can give each output chunk its own window.
  n, frac = _split_channel_offset(tf.cast(out_offsets, dtype), g.cout_e)
  x = _window_lerp(epitome, n, frac, rank + 1, g.cout_e, batch_axis=None, wrap=True)

  # Stage 2: spatial axes with slack, one window per output chunk.
  if g.slack_axes:
    spatial_offsets = tf.cast(spatial_offsets, dtype)
    for d in g.slack_axes:
      start, frac = _split_spatial_offset(spatial_offsets[:, d], g.slack[d])
      x = _window_lerp(x, start, frac, d, g.spatial[d], batch_axis=rank + 1, wrap=False)
  # Spatial axes without slack: S_E == S, nothing to do.
  if g.in_rolls.any():
    x = _roll_chunks(x, g.in_rolls, axis=rank, chunk_axis=rank + 1)
  x = tf.reshape(x, list(g.spatial) + [g.cin_e, b * g.cout_e])
  if b * g.cout_e > g.cout:
    x = x[..., : g.cout]

  # Stage 3: input channels, (*S, Cin_E, Cout) -> (*S, Cin, Cout).
  return _expand_channels(x, tf.cast(in_offsets, dtype), g.cin, g.cin_e, axis=rank)


# ----------------------------------------------------------------------------
# Channel remixes with live offsets (training in the factored form).


def remix_matrix_in(in_offsets, geometry: EpitomeGeometry, dtype=tf.float32):
  """``R_in`` as a ``(Cin, Cin_E)`` matrix: the sampled kernel of an identity epitome.

  ``conv(x, K) == conv(x @ R_in, K')`` where ``K'`` is ``K`` sampled with zero
  input offsets. Differentiable in ``in_offsets`` (through
  :func:`sample_kernel`).

  Example:
    >>> g = EpitomeGeometry((3, 3, 6, 4), (3, 3, 3, 4))
    >>> remix_matrix_in(tf.constant([1.0, 0.5]), g).shape
    TensorShape([6, 3])
  """
  g = geometry
  ident = EpitomeGeometry((g.cin, g.cin_e), (g.cin_e, g.cin_e))
  return sample_kernel(
    tf.eye(g.cin_e, dtype=dtype), in_offsets, tf.zeros([1], dtype), None, ident
  )


def remix_matrix_out(out_offsets, geometry: EpitomeGeometry, dtype=tf.float32):
  """``R_out`` as a ``(Cout_E, Cout)`` matrix: the sampled kernel of an identity epitome.

  Example:
    >>> g = EpitomeGeometry((3, 3, 6, 4), (3, 3, 3, 2))
    >>> remix_matrix_out(tf.constant([1.0, 0.5]), g).shape
    TensorShape([2, 4])
  """
  g = geometry
  ident = EpitomeGeometry((g.cout_e, g.cout), (g.cout_e, g.cout_e))
  return sample_kernel(
    tf.eye(g.cout_e, dtype=dtype), tf.zeros([1], dtype), out_offsets, None, ident
  )


def _with_channels(x, channels):
  """``x``'s shape with the last axis replaced by ``channels`` (a list)."""
  static = x.shape.as_list()[:-1]
  if all(d is not None for d in static):
    return static + list(channels)
  return tf.concat([tf.shape(x)[:-1], channels], axis=0)


def remix_in(x, in_offsets, geometry: EpitomeGeometry):
  """``R_in`` applied to activations: ``(..., Cin) -> (..., Cin_E)``.

  ``x'[e] = sum_a (1 - f_a) x_a[(e - n_a) mod Cin_E] + f_a x_a[(e - n_a - 1)
  mod Cin_E]`` (``x`` zero-padded to ``A * Cin_E`` channels): each chunk reads
  a window that starts at ``-n_a - 1`` and blends its two views with weights
  ``(f_a, 1 - f_a)``, one :func:`_window_lerp` with a chunk axis. The
  transpose of the input-channel stage of :func:`sample_kernel`.
  """
  g = geometry
  a = g.num_in_chunks
  n, frac = _split_channel_offset(tf.cast(in_offsets, x.dtype), g.cin_e)
  pad = g.in_pad
  if pad:
    x = tf.pad(x, [[0, 0]] * (x.shape.rank - 1) + [[0, pad]])
  x = tf.reshape(x, _with_channels(x, [a, g.cin_e]))
  axis = x.shape.rank - 1
  starts = tf.math.floormod(-n - 1, g.cin_e)
  y = _window_lerp(x, starts, 1.0 - frac, axis, g.cin_e, batch_axis=axis - 1, wrap=True)
  return tf.reduce_sum(y, axis=axis - 1)


def remix_out(y, out_offsets, geometry: EpitomeGeometry):
  """``R_out`` applied to activations: ``(..., Cout_E) -> (..., Cout)``.

  ``out[b*Cout_E + v] = (1 - g_b) y[(v + m_b) mod Cout_E] + g_b y[(v + m_b + 1)
  mod Cout_E]``: the output-channel stage of :func:`sample_kernel` run on the
  activations.
  """
  g = geometry
  n, frac = _split_channel_offset(tf.cast(out_offsets, y.dtype), g.cout_e)
  axis = y.shape.rank - 1
  out = _window_lerp(y, n, frac, axis, g.cout_e, batch_axis=None, wrap=True)
  out = tf.reshape(out, _with_channels(y, [g.num_out_chunks * g.cout_e]))
  if g.num_out_chunks * g.cout_e > g.cout:
    out = out[..., : g.cout]
  return out


def stack_rolls(epitome, geometry: EpitomeGeometry):
  """The rolled epitomes of every output chunk, ``(*S_E, Cin_E, B * Cout_E)``.

  Used by training in the factored form with a channel roll
  (:mod:`keras_epitome.factored_training`).

  Block ``b`` is the epitome with its input channels read from ``r_b`` on
  (``(u + r_b) mod Cin_E``): ``conv(x', stack_rolls(E))`` gives every output
  chunk's epitome convolution before its output remix. One ``tf.roll`` per
  chunk (static shifts) and a concat; the gradient is their transpose.

  Example:
    >>> g = EpitomeGeometry((4, 4), (2, 2), channel_roll=1)
    >>> stack_rolls(tf.constant([[1.0, 2.0], [3.0, 4.0]]), g).numpy().tolist()
    [[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 1.0, 2.0]]
  """
  g = geometry
  e = tf.convert_to_tensor(epitome)
  blocks = [tf.roll(e, -int(r), g.rank) if r else e for r in g.in_rolls]
  return tf.concat(blocks, axis=-1) if len(blocks) > 1 else blocks[0]


def remix_out_chunks(y, out_offsets, geometry: EpitomeGeometry, mode: str):
  """``R_out`` of per-chunk outputs: ``(..., B * Cout_E) -> (..., Cout)``.

  The counterpart of :func:`remix_out` when every output chunk has its own
  epitome convolution (the convolution with :func:`stack_rolls`'s kernel).

  Chunk ``b`` reads its own ``Cout_E`` channels (``"lerp"``: an interpolated
  window at its offset; ``"matrix"``: its block of the ``R_out`` matrix).
  """
  g = geometry
  b, coe = g.num_out_chunks, g.cout_e
  if mode == "lerp":
    chunks = tf.reshape(y, _with_channels(y, [b, coe]))
    axis = chunks.shape.rank - 1
    n, frac = _split_channel_offset(tf.cast(out_offsets, y.dtype), coe)
    out = _window_lerp(chunks, n, frac, axis, coe, batch_axis=axis - 1, wrap=True)
    out = tf.reshape(out, _with_channels(y, [b * coe]))
    return out[..., : g.cout] if b * coe > g.cout else out
  # "matrix": chunk b's columns of R_out applied to chunk b's outputs, one
  # matmul per chunk (a batched einsum transposes the activations: 20x slower).
  m = remix_matrix_out(out_offsets, g, y.dtype)  # (Cout_E, Cout)
  widths = [min(coe, g.cout - i * coe) for i in range(b)]
  ys = tf.split(y, b, axis=-1) if b > 1 else [y]
  ms = tf.split(m, widths, axis=-1) if b > 1 else [m]
  outs = [
    tf.tensordot(yb, mb, [[y.shape.rank - 1], [0]])
    for yb, mb in zip(ys, ms, strict=True)
  ]
  return tf.concat(outs, axis=-1) if b > 1 else outs[0]


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
# Closed-form fit (DESIGN.md section 5).


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
  # sampling an epitome that holds its own flat indices gives, per kernel
  # entry, the entry it reads (exactly: the interpolation weights are 0).
  # Eager under init_scope, so this also works while a graph is being built
  # and without a gradient tape (Keras builds layers with tapes paused).
  with tf.init_scope():
    ids = tf.reshape(tf.range(g.epitome_size, dtype=tf.float64), g.epitome_shape)
    k = sample_kernel(
      ids,
      tf.constant(np.round(routing.in_offsets), tf.float64),
      tf.constant(np.round(routing.out_offsets), tf.float64),
      tf.constant(np.round(routing.spatial_offsets), tf.float64)
      if g.slack_axes
      else None,
      g,
    )
    return np.rint(k.numpy()).astype(np.int64)


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
# Taps for the factored inference form (DESIGN.md section 4.2).


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


def epitome_windows(epitome, routing: RoutingMap, geometry: EpitomeGeometry):
  """Epitome windows, one per distinct (spatial offset, input-channel roll).

  Returns:
    ``(windows, window_of_chunk)``: ``windows`` is ``(W, *S, Cin_E, Cout_E)``
    (each the epitome read at one chunk's spatial offset, interpolated), and
    ``window_of_chunk[b]`` the window output chunk ``b`` uses.
  """
  g = geometry
  e = np.asarray(epitome, np.float64)
  rolls = g.in_rolls
  if not g.slack_axes and not rolls.any():
    return e[np.newaxis], np.zeros(g.num_out_chunks, np.int64)
  if g.slack_axes:
    sp = np.asarray(routing.spatial_offsets, np.float64)
    sp = np.round(sp.reshape(g.num_out_chunks, g.rank), 9)
  else:
    sp = np.zeros((g.num_out_chunks, g.rank))
  # One window per distinct (spatial offsets, input-channel roll).
  keyed = np.concatenate([sp, rolls[:, np.newaxis].astype(np.float64)], axis=1)
  keys, window_of_chunk = np.unique(keyed, axis=0, return_inverse=True)
  windows = []
  for key in keys:
    w = e
    for d in range(g.rank):
      start, frac = spatial_taps(key[d], g.slack[d])
      n = g.spatial[d]
      lo = np.take(w, np.arange(start, start + n), axis=d)
      if g.slack[d]:
        hi = np.take(w, np.arange(start + 1, start + 1 + n), axis=d)
        w = (1 - frac) * lo + frac * hi
      else:
        w = lo
    # E_w[.., e, :] = E[.., (e + r) mod Cin_E, :].
    windows.append(np.roll(w, -int(key[-1]), axis=-2))
  return np.stack(windows), np.asarray(window_of_chunk).reshape(-1)


def roll_slices(shift: int, size: int, length: Optional[int] = None):
  """Contiguous ranges that read ``[(u + shift) mod size for u in range(length)]``.

  A channel roll written as static slices (and one concat), which LiteRT's
  XNNPACK delegate runs, unlike a gather.

  Args:
    shift: any integer (wrapped to ``size``).
    size: length of the rolled axis.
    length: how many entries to read (default ``size``; at most ``size``).

  Returns:
    A list of ``(start, stop)`` pairs, at most two.

  Example:
    >>> roll_slices(3, 8)
    [(3, 8), (0, 3)]
    >>> roll_slices(3, 8, length=4)
    [(3, 7)]
  """
  length = size if length is None else int(length)
  start = int(shift) % size
  first = min(length, size - start)
  out = [(start, start + first)]
  if length > first:
    out.append((0, length - first))
  return out


class FactoredPlan(NamedTuple):
  """Everything the factored inference form needs (DESIGN.md section 4.2).

  ``conv(x, K) = R_out(conv(R_in(x), windows))`` with, for ``x`` zero-padded to
  ``A * Cin_E`` channels and ``x_a`` its chunk ``a``:

  * ``R_in``: ``x'[e] = sum_a (1 - in_frac[a]) x_a[(e - in_shift[a]) mod Cin_E]
    + in_frac[a] x_a[(e - in_shift[a] - 1) mod Cin_E]``;
  * the convolution with window ``window_of_chunk[b]`` gives ``Y`` (``Cout_E``
    channels);
  * ``R_out``: ``y[b*Cout_E + v] = (1 - out_frac[b]) Y[(v + out_shift[b]) mod
    Cout_E] + out_frac[b] Y[(v + out_shift[b] + 1) mod Cout_E]``.

  The windows are pre-rolled along both channel axes by the most common shift,
  so the chunks with that shift need no roll at all; ``in_base`` is that
  input-channel shift (``in_shift`` is relative to it).
  """

  windows: np.ndarray
  window_of_chunk: np.ndarray
  in_shift: np.ndarray
  in_frac: np.ndarray
  out_shift: np.ndarray
  out_frac: np.ndarray
  in_base: int = 0


def factored_plan(epitome, routing: RoutingMap, geometry: EpitomeGeometry):
  """Builds the :class:`FactoredPlan` of a frozen routing map.

  Args:
    epitome: ``(*S_E, Cin_E, Cout_E)`` array.
    routing: the inference routing map.
    geometry: the layer's geometry.

  Returns:
    A :class:`FactoredPlan` (float64 windows).

  Example:
    >>> g = EpitomeGeometry((4, 6), (2, 3))
    >>> r = RoutingMap(np.array([1.0, 1.0]), np.array([0.0, 2.5]), np.zeros((2, 0)))
    >>> p = factored_plan(np.ones((2, 3)), r, g)
    >>> p.in_shift.tolist(), p.out_shift.tolist(), p.out_frac.tolist()
    ([0, 0], [0, 2], [0.0, 0.5])
  """
  g = geometry
  spec.check_finite_offsets(routing, "factored_plan")
  windows, window_of_chunk = epitome_windows(epitome, routing, g)
  n, f = channel_taps(routing.in_offsets, g.cin_e)
  m, h = channel_taps(routing.out_offsets, g.cout_e)
  n0 = int(np.bincount(n, minlength=g.cin_e).argmax())
  m0 = int(np.bincount(m, minlength=g.cout_e).argmax())
  # E'[e, v] = E[(e + n0) mod Cin_E, (v + m0) mod Cout_E].
  windows = np.roll(windows, (-n0, -m0), axis=(-2, -1))
  return FactoredPlan(
    windows,
    window_of_chunk,
    np.mod(n - n0, g.cin_e),
    f,
    np.mod(m - m0, g.cout_e),
    h,
    n0,
  )


# ----------------------------------------------------------------------------
# Kernel from a frozen routing map, as static slices (DESIGN.md section 4.3).


def sample_kernel_frozen(epitome, routing: RoutingMap, geometry: EpitomeGeometry):
  """Samples the kernel at a frozen routing map with static slices only.

  The same function as :func:`sample_kernel`, but the routing map is NumPy
  (known when the graph is built), so every read is a static slice, every roll
  a concat of at most two slices (:func:`roll_slices`) and every fractional
  offset a blend of two such reads with a Python constant. The graph holds no
  index tensor, and TFLite runs it with SLICE, CONCATENATION, MUL and ADD.
  Chunks with the same offsets share one read.

  Args:
    epitome: ``(*S_E, Cin_E, Cout_E)`` tensor.
    routing: the :class:`RoutingMap` (channel offsets wrap, spatial offsets
      clip, as in :func:`sample_kernel`).
    geometry: the layer's geometry.

  Returns:
    The kernel, ``(*S, Cin, Cout)``.

  Raises:
    ValueError: if the routing map's sizes do not match the geometry.

  Example:
    >>> g = EpitomeGeometry((4, 6), (2, 3))
    >>> r = RoutingMap(np.array([0.0, 1.0]), np.array([0.0, 0.5]), np.zeros((2, 0)))
    >>> e = tf.reshape(tf.range(6, dtype=tf.float32), (2, 3))
    >>> k = sample_kernel_frozen(e, r, g)
    >>> bool(np.allclose(k, sample_kernel(e, r.in_offsets, r.out_offsets, None, g)))
    True
  """
  g = geometry
  spec.check_finite_offsets(routing, "sample_kernel_frozen")
  x = tf.convert_to_tensor(epitome)
  in_o = np.asarray(routing.in_offsets, np.float64).reshape(-1)
  out_o = np.asarray(routing.out_offsets, np.float64).reshape(-1)
  if in_o.size != g.num_in_chunks or out_o.size != g.num_out_chunks:
    raise ValueError(
      f"routing map has {in_o.size} input and {out_o.size} output offsets; "
      f"geometry {g.kernel_shape} <- {g.epitome_shape} needs "
      f"{g.num_in_chunks} and {g.num_out_chunks}"
    )
  if g.slack_axes:
    sp = np.asarray(routing.spatial_offsets, np.float64)
    if sp.shape != (g.num_out_chunks, g.rank):
      raise ValueError(
        f"spatial offsets of shape {sp.shape} do not match "
        f"({g.num_out_chunks}, {g.rank}) for geometry {g.kernel_shape} <- "
        f"{g.epitome_shape}"
      )
  cin_axis, cout_axis = g.rank, g.rank + 1

  def take(t, axis, start, stop):
    begin = [0] * len(t.shape)
    size = [-1] * len(t.shape)
    begin[axis], size[axis] = start, stop - start
    return tf.slice(t, begin, size)

  def rolled(t, axis, shift, length):
    size = int(t.shape[axis])
    parts = [take(t, axis, a, b) for a, b in roll_slices(shift, size, length)]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis)

  def blend(lo, hi, frac):
    if frac == 0.0:
      return lo
    return lo + tf.constant(frac, lo.dtype) * (hi - lo)

  def channel_read(t, axis, shift, frac, length):
    lo = rolled(t, axis, shift, length)
    if frac == 0.0:
      return lo
    return blend(lo, rolled(t, axis, shift + 1, length), frac)

  # Output chunks: channel roll, then the spatial window of the chunk.
  out_shift, out_frac = channel_taps(out_o, g.cout_e)
  starts = np.zeros((g.num_out_chunks, g.rank), np.int64)
  fracs = np.zeros((g.num_out_chunks, g.rank))
  for d in g.slack_axes:
    starts[:, d], fracs[:, d] = spatial_taps(sp[:, d], g.slack[d])
  rolls = g.in_rolls
  cache = {}
  blocks = []
  for b in range(g.num_out_chunks):
    length = min(g.cout_e, g.cout - b * g.cout_e)
    key = (
      int(out_shift[b]),
      float(out_frac[b]),
      length,
      tuple(starts[b]),
      tuple(fracs[b]),
      int(rolls[b]),
    )
    if key not in cache:
      block = channel_read(x, cout_axis, key[0], key[1], length)
      for d in g.slack_axes:
        s0, f = int(starts[b, d]), float(fracs[b, d])
        lo = take(block, d, s0, s0 + g.spatial[d])
        if f != 0.0:
          lo = blend(lo, take(block, d, s0 + 1, s0 + 1 + g.spatial[d]), f)
        block = lo
      if key[-1]:
        block = rolled(block, cin_axis, key[-1], g.cin_e)
      cache[key] = block
    blocks.append(cache[key])
  x = blocks[0] if len(blocks) == 1 else tf.concat(blocks, cout_axis)

  # Input chunks: channel roll along Cin_E.
  in_shift, in_frac = channel_taps(in_o, g.cin_e)
  cache = {}
  blocks = []
  for a in range(g.num_in_chunks):
    length = min(g.cin_e, g.cin - a * g.cin_e)
    key = (int(in_shift[a]), float(in_frac[a]), length)
    if key not in cache:
      cache[key] = channel_read(x, cin_axis, key[0], key[1], length)
    blocks.append(cache[key])
  return blocks[0] if len(blocks) == 1 else tf.concat(blocks, cin_axis)
