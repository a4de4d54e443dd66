"""The sampler in ``keras.ops``: the kernel from an epitome and a routing map, on any backend.

The same function as :func:`keras_epitome.sampling.sample_kernel` (the
TensorFlow sampler, which the Keras 3 layers use on the TensorFlow backend),
written with ``keras.ops`` so that it runs, and differentiates, on JAX and
PyTorch too. It follows the TensorFlow sampler stage by stage (output
channels, spatial windows, input channels; the static input-channel roll, a
permutation, is applied first here and after the spatial stage there), so
both compute the same blends of the same entries; ``tests/test_keras3.py``
checks values and gradients against it. The index math (the geometry, the
routing map's canonical ranges) is :mod:`keras_epitome.geometry`.

Each stage reads two neighbouring views of one axis (channel axes: rolls
with run-time shifts; spatial axes: slices with run-time starts) and blends
them with the fractional parts, ``lo + f * (hi - lo)``. Autodiff gives the
epitome gradient (rolls and slices back, no scatter: scatters run
single-threaded on CPU) and the offsets' gradient ``sum(dK * (hi - lo))``
without a custom gradient, except for one backend detail: on JAX a roll
with a run-time shift differentiates through a concatenation and a dynamic
slice, and XLA's CPU backend compiles two such stages in a row into an
update loop many times slower than the stages apart, so there the roll
carries its exact gradient, the roll back (:func:`_roll`; docs/results.md,
the Keras 3 training step).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from keras_epitome.geometry import EpitomeGeometry


def _finite_or_nan(offsets):
  """``(safe, nan)``: a diverged offset reads index 0 with a NaN weight (a NaN kernel)."""
  finite = ops.isfinite(offsets)
  zeros = ops.zeros_like(offsets)
  safe = ops.where(finite, offsets, zeros)
  return safe, ops.where(finite, zeros, ops.full_like(offsets, np.nan))


def _channel_taps(offsets, size: int):
  """Integer start in ``[0, size)`` (int32) and fraction of channel offsets."""
  offsets, nan = _finite_or_nan(offsets)
  base = ops.floor(offsets)
  frac = offsets - base + nan
  n = ops.cast(ops.mod(base, float(size)), "int32")
  n = ops.where(n >= size, n - size, n)  # mod in floating point may round up
  return n, frac


def _spatial_taps(offsets, slack: int):
  """Start (clipped to ``slack - 1``) and fraction of offsets clipped to ``[0, slack]``."""
  offsets, nan = _finite_or_nan(offsets)
  offsets = ops.clip(offsets, 0.0, float(slack))
  base = ops.minimum(ops.floor(offsets), float(slack - 1))
  return ops.cast(base, "int32"), offsets - base + nan


@functools.cache
def _jax_roll():
  """``roll(x, shift, axis)`` whose gradient is the roll back (JAX only)."""
  import jax
  import jax.numpy as jnp

  def forward(x, shift, axis):
    return jnp.roll(x, shift, axis=axis), shift

  def backward(axis, shift, upstream):
    return jnp.roll(upstream, -shift, axis=axis), None

  roll = jax.custom_vjp(
    lambda x, shift, axis: jnp.roll(x, shift, axis=axis), nondiff_argnums=(2,)
  )
  roll.defvjp(forward, backward)
  return roll


def _roll(x, shift, axis: int):
  """``ops.roll`` with a run-time integer ``shift`` (see the module note on JAX)."""
  if keras.backend.backend() == "jax":
    return _jax_roll()(x, shift, axis)
  return ops.roll(x, shift, axis=axis)


def _shape(rank: int, axis: int, size: int):
  shape = [1] * rank
  shape[axis] = size
  return shape


def _expand_channels(x, offsets, size: int, chunk: int, axis: int):
  """Channel ``axis`` of ``x`` from ``chunk`` to ``size`` entries, chunk ``b`` rolled by ``offsets[b]``.

  Entry ``b*chunk + v`` reads ``x[(v + o_b) mod chunk]`` blended with
  ``x[(v + o_b + 1) mod chunk]`` (weight ``frac(o_b)``): two rolls per chunk
  with run-time shifts, whose gradients are rolls back (no scatter), as in
  the TensorFlow sampler. ``x`` may be a list, one source per chunk.
  """
  num = int(offsets.shape[0])
  sources = x if isinstance(x, (list, tuple)) else [x] * num
  n, frac = _channel_taps(offsets, chunk)
  los = [_roll(sources[b], -n[b], axis) for b in range(num)]
  his = [_roll(sources[b], -n[b] - 1, axis) for b in range(num)]
  lo = ops.concatenate(los, axis=axis) if num > 1 else los[0]
  hi = ops.concatenate(his, axis=axis) if num > 1 else his[0]
  if num * chunk > size:  # partial last chunk
    lo = _slice(lo, axis, 0, size)
    hi = _slice(hi, axis, 0, size)
  w = ops.repeat(ops.cast(frac, lo.dtype), chunk, axis=0)[:size]
  w = ops.reshape(w, _shape(len(lo.shape), axis, min(size, num * chunk)))
  return lo + w * (hi - lo)


def _slice(x, axis: int, start: int, stop: int):
  index = [slice(None)] * len(x.shape)
  index[axis] = slice(start, stop)
  return x[tuple(index)]


def sample_kernel(
  epitome, in_offsets, out_offsets, spatial_offsets, geometry: EpitomeGeometry
):
  """Samples the full kernel from an epitome and a routing map (``keras.ops``).

  Args:
    epitome: ``(*S_E, Cin_E, Cout_E)`` tensor.
    in_offsets: ``(A,)`` input-chunk channel offsets (any real; wrapped).
    out_offsets: ``(B,)`` output-chunk channel offsets (any real; wrapped).
    spatial_offsets: ``(B, rank)`` spatial offsets (clipped to
      ``[0, S_E - S]``), or ``None`` when the epitome has no spatial slack.
    geometry: the layer's :class:`~keras_epitome.geometry.EpitomeGeometry`.

  Returns:
    The kernel, ``(*S, Cin, Cout)``, differentiable with respect to the
    epitome and all offsets.

  Raises:
    ValueError: if the geometry has spatial slack and no spatial offsets are
      given.

  Example:
    >>> g = EpitomeGeometry((4, 6), (2, 3))
    >>> e = ops.reshape(ops.arange(6, dtype="float32"), (2, 3))
    >>> tuple(sample_kernel(e, [0.0, 1.0], [0.0, 0.5], None, g).shape)
    (4, 6)
  """
  g = geometry
  epitome = ops.convert_to_tensor(epitome)
  dtype = epitome.dtype
  rank = g.rank
  ndim = rank + 2
  b = g.num_out_chunks
  if g.slack_axes and spatial_offsets is None:
    raise ValueError(
      f"geometry {g.kernel_shape} <- {g.epitome_shape} has spatial slack "
      f"{g.slack} and needs spatial offsets"
    )

  # Stage 1: output channels, (*S_E, Cin_E, Cout_E) -> (*S_E, Cin_E, B*Cout_E)
  # (every chunk complete, so the spatial stage can give each its window).
  # With a channel roll, output chunk b reads the epitome's input channels
  # rolled by r_b: entry (e, b*Cout_E + v) reads input channel
  # (e + r_b) mod Cin_E. The roll is static and acts on another axis than
  # the later stages, so it is applied to chunk b's source here (the
  # TensorFlow sampler applies it after the spatial stage; the same
  # permutation, the same numbers). Rolling the epitome-sized source, rather
  # than slicing and rolling the expanded tensor, also keeps XLA's CPU
  # backend off a slow fused gradient (the same trap as the rolls').
  out_offsets = ops.cast(ops.convert_to_tensor(out_offsets), dtype)
  sources = epitome
  if any(g.in_roll_shifts):
    sources = [
      ops.roll(epitome, -r, axis=rank) if r else epitome for r in g.in_roll_shifts
    ]
  x = _expand_channels(sources, out_offsets, b * g.cout_e, g.cout_e, axis=rank + 1)

  # Stage 2: spatial axes with slack, one window per output chunk: chunk b
  # reads entries [start_b, start_b + length] of axis d (a slice with a
  # run-time start; its gradient pads back, no scatter) and blends the two
  # overlapping views.
  if g.slack_axes:
    sp = ops.cast(ops.convert_to_tensor(spatial_offsets), dtype)
    coe = g.cout_e
    for d in g.slack_axes:
      start, frac = _spatial_taps(sp[:, d], g.slack[d])
      length = g.spatial[d]
      shape = list(x.shape)
      shape[d] = length + 1
      shape[-1] = coe
      pieces = []
      for c in range(b):
        begin = [0] * ndim
        begin[d] = start[c]
        begin[-1] = c * coe
        pieces.append(ops.slice(x, begin, shape))
      win = ops.concatenate(pieces, axis=-1) if b > 1 else pieces[0]
      lo = _slice(win, d, 0, length)
      hi = _slice(win, d, 1, length + 1)
      w = ops.reshape(ops.repeat(frac, coe, axis=0), _shape(ndim, ndim - 1, b * coe))
      x = lo + w * (hi - lo)

  if b * g.cout_e > g.cout:
    x = x[..., : g.cout]

  # Stage 3: input channels, (*S, Cin_E, Cout) -> (*S, Cin, Cout).
  in_offsets = ops.cast(ops.convert_to_tensor(in_offsets), dtype)
  return _expand_channels(x, in_offsets, g.cin, g.cin_e, axis=rank)


def full_spatial(columns, geometry: EpitomeGeometry):
  """``(B, len(slack_axes))`` stored spatial offsets -> ``(B, rank)``, zeros elsewhere."""
  g = geometry
  b = g.num_out_chunks
  if not g.rank:
    return ops.zeros((b, 0), columns.dtype)
  zeros = ops.zeros((b,), columns.dtype)
  by_axis = {d: columns[:, i] for i, d in enumerate(g.slack_axes)}
  return ops.stack([by_axis.get(d, zeros) for d in range(g.rank)], axis=1)


def pack_offsets(in_offsets, out_offsets, spatial_offsets, geometry: EpitomeGeometry):
  """Offsets (spatial ``(B, rank)``) -> the ``(routing_size,)`` vector (ops version of
  :meth:`~keras_epitome.geometry.EpitomeGeometry.pack_offsets`)."""
  g = geometry
  in_o = ops.reshape(in_offsets, [-1])
  sp = ops.reshape(ops.cast(spatial_offsets, in_o.dtype), (g.num_out_chunks, g.rank))
  parts = [in_o, ops.reshape(ops.cast(out_offsets, in_o.dtype), [-1])]
  if g.slack_axes:
    cols = ops.stack([sp[:, d] for d in g.slack_axes], axis=1)
    parts.append(ops.reshape(cols, [-1]))
  return ops.concatenate(parts, axis=0)


def unpack_offsets(packed, geometry: EpitomeGeometry):
  """The ``(routing_size,)`` vector -> ``(in, out, spatial (B, rank))``."""
  g = geometry
  a, b = g.num_in_chunks, g.num_out_chunks
  columns = ops.reshape(packed[a + b :], (b, len(g.slack_axes)))
  return packed[:a], packed[a : a + b], full_spatial(columns, g)
