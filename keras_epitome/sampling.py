"""The TensorFlow sampler: the kernel from an epitome and a routing map, differentiably.

The index math (shapes, routing map, ratio rule, fixed routing, closed-form
fit) is in :mod:`keras_epitome.geometry`, which this module re-exports; the
formula is in docs/design.md:
``K[s, a*Cin_E + u, b*Cout_E + v] = E~[s + sigma_b, (u + p_a + r_b) mod Cin_E,
(v + q_b) mod Cout_E]``, ``E~`` read by linear interpolation.

The training-time sampler (:func:`sample_kernel`) is separable: it expands
the output-channel axis, then each spatial axis, then the input-channel axis,
so each stage costs the size of its output. Every stage is a
:func:`_window_lerp` under ``tf.custom_gradient``: each chunk reads one
contiguous window (a gather of consecutive indices; channel axes are doubled
so windows wrap) and blends its two neighbouring views. The epitome gradient
is the segment sum of the interpolation-weighted kernel gradient; because each
chunk's read is a shift, that sum is computed as shifts back (again contiguous
gathers) summed over chunks, with no scatter. The gradient of each chunk's
interpolation weight is ``sum(dK * (E[hi] - E[lo]))``, from which TensorFlow
chains to the offsets.

The module also provides what the other TensorFlow forms need: the channel
remixes of training in the factored form, the factored inference plan
(:func:`factored_plan`) and the kernel at a frozen routing map as static
slices (:func:`sample_kernel_frozen`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from keras_epitome import spec
from keras_epitome.geometry import (  # noqa: F401  (the index math, re-exported)
  ChannelTaps,
  EpitomeGeometry,
  RoutingMap,
  channel_taps,
  epitome_reads,
  epitome_shape_for_ratio,
  fit_epitome,
  fixed_routing,
  layer_geometry,
  spatial_taps,
)

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
  """Everything the factored inference form needs (docs/design.md).

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
# Kernel from a frozen routing map, as static slices (docs/design.md).


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
