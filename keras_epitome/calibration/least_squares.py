"""Output-space least squares of one layer: statistics, fit, channel grouping.

Layer ``l`` of the converted model sees the converted model's own activations
``X_s`` (its im2col patches; Dense: its inputs) and its target is the
original layer's pre-activation output ``Y = X_t K + b`` on the original
model's activations ``X_t``. The problem

  ``min_E || X_s K(E) - Y ||^2 + lambda || K(E) - K_orig ||^2``

is linear least squares in the epitome (``docs/design.md``, data-aware
conversion). Only ``H = X_s^T X_s`` (``P x P``, ``P = prod(S) * Cin``) and
``X_s^T Y`` (``P x Cout``) are accumulated over the data; the solves
(:mod:`keras_epitome.calibration.routing`) are in the epitome's size. Where
the layer has a bias, or feeds only a BatchNormalization whose moving mean is
re-estimated, the statistics are centred and the shift is fitted in closed
form.

The sums are accumulated in float64 about a per-feature reference point (the
first batch's mean), so that centring them afterwards cancels nothing: inputs
with a large mean and a small spread (``10 + 1e-3 * noise``) keep a positive
definite covariance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_epitome import layers as epitome_layers
from keras_epitome import sampling
from keras_epitome.backend import keras
from keras_epitome.calibration import data, graph
from keras_epitome.calibration.routing import Problem


def supported(layer) -> str:
  """'' if the layer's output is ``patches @ kernel``, else why not."""
  if getattr(layer, "groups", 1) != 1:
    return f"groups={layer.groups} is not supported by the data-aware fit"
  return ""


def layer_patches(layer, x):
  """Rows ``X`` with ``X @ layer.kernel.reshape(-1, Cout) = conv(x, kernel)``.

  Args:
    layer: a (stock or epitome) ``Conv1D``, ``Conv2D`` or ``Dense``.
    x: the layer's input batch.

  Returns:
    A ``(rows, prod(S) * Cin)`` float32 tensor, rows in output order.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  if isinstance(layer, keras.layers.Dense):
    return tf.reshape(x, [-1, x.shape[-1]])
  kernel_size = tuple(layer.kernel_size)
  strides = tuple(layer.strides)
  dilation = tuple(layer.dilation_rate)
  padding = layer.padding
  if isinstance(layer, keras.layers.Conv1D):
    if padding == "causal":
      x = tf.pad(x, [[0, 0], [dilation[0] * (kernel_size[0] - 1), 0], [0, 0]])
      padding = "valid"
    x = x[:, tf.newaxis]
    kernel_size, strides, dilation = (1,) + kernel_size, (1,) + strides, (1,) + dilation
  if all(k == 1 for k in kernel_size) and padding != "causal":
    # A 1x1 convolution: the patches are the (strided) pixels themselves.
    x = x[:, :: strides[0], :: strides[1]]
    return tf.reshape(x, [-1, x.shape[-1]])
  patches = tf.image.extract_patches(
    x,
    sizes=[1, *kernel_size, 1],
    strides=[1, *strides, 1],
    rates=[1, *dilation, 1],
    padding=padding.upper(),
  )
  return tf.reshape(patches, [-1, patches.shape[-1]])


@dataclasses.dataclass
class Stats:
  """Sufficient statistics of one layer's output-space least squares.

  Sums about reference points ``rx`` (inputs) and ``ry`` (targets): ``h =
  sum (x - rx)(x - rx)^T``, ``c = sum (x - rx)(y - ry)^T``, ``yy = sum (y -
  ry)^2`` per channel, ``yyt = sum (y - ry)(y - ry)^T``, ``sx = sum (x -
  rx)``, ``sy = sum (y - ry)``. :meth:`centred` and :meth:`raw` give the two
  forms the fit uses (about the mean, and about zero).
  """

  h: np.ndarray  # (P, P)
  c: np.ndarray  # (P, Cout)
  yy: np.ndarray  # (Cout,)
  sx: np.ndarray  # (P,)
  sy: np.ndarray  # (Cout,)
  n: int  # rows
  yyt: Optional[np.ndarray] = None  # (Cout, Cout)
  rx: Optional[np.ndarray] = None  # (P,), None: 0
  ry: Optional[np.ndarray] = None  # (Cout,), None: 0

  def _refs(self):
    rx = np.zeros_like(self.sx) if self.rx is None else self.rx
    ry = np.zeros_like(self.sy) if self.ry is None else self.ry
    return rx, ry

  @property
  def mean_x(self) -> np.ndarray:
    return self._refs()[0] + self.sx / self.n

  @property
  def mean_y(self) -> np.ndarray:
    return self._refs()[1] + self.sy / self.n

  def centred(self) -> "Stats":
    """The sums about the means (no cancellation: the reference is close)."""
    mx, my = self.sx / self.n, self.sy / self.n
    yyt = None if self.yyt is None else self.yyt - self.n * np.outer(my, my)
    return Stats(
      self.h - self.n * np.outer(mx, mx),
      self.c - self.n * np.outer(mx, my),
      self.yy - self.n * my**2,
      np.zeros_like(self.sx),
      np.zeros_like(self.sy),
      self.n,
      yyt,
      self.mean_x,
      self.mean_y,
    )

  def raw(self) -> "Stats":
    """The sums about zero (``X^T X``, ``X^T Y``...), for a fit without a shift."""
    if self.rx is None and self.ry is None:
      return self
    rx, ry = self._refs()
    n, sx, sy = self.n, self.sx, self.sy
    yyt = None
    if self.yyt is not None:
      yyt = self.yyt + np.outer(ry, sy) + np.outer(sy, ry) + n * np.outer(ry, ry)
    return Stats(
      self.h + np.outer(rx, sx) + np.outer(sx, rx) + n * np.outer(rx, rx),
      self.c + np.outer(rx, sy) + np.outer(sx, ry) + n * np.outer(rx, ry),
      self.yy + 2 * ry * sy + n * ry**2,
      sx + n * rx,
      sy + n * ry,
      n,
      yyt,
    )

  def permuted(self, perm: np.ndarray) -> "Stats":
    """The statistics with the target's channels in the order ``perm``."""
    yyt = None if self.yyt is None else self.yyt[np.ix_(perm, perm)]
    ry = None if self.ry is None else self.ry[perm]
    return Stats(
      self.h,
      self.c[:, perm],
      self.yy[perm],
      self.sx,
      self.sy[perm],
      self.n,
      yyt,
      self.rx,
      ry,
    )

  def residual(self, k: np.ndarray) -> np.ndarray:
    """``|X k - Y|^2`` per output channel for a flat kernel ``k`` (P, Cout).

    ``X`` and ``Y`` about this object's reference points: use it on
    :meth:`centred` (residual after the best shift) or :meth:`raw`.
    """
    hk = self.h @ k
    return np.einsum("pc,pc->c", k, hk) - 2 * np.einsum("pc,pc->c", k, self.c) + self.yy


def accumulate(old, new, xs_batches, xt_batches, bias) -> Stats:
  """:class:`Stats` of ``new`` on inputs ``xs``, target ``old`` on ``xt``.

  Each batch's products are float32 matrix products of the shifted patches
  (shifted by the first batch's mean), summed in float64.
  """
  kernel = tf.reshape(tf.cast(old.kernel, tf.float32), [-1, old.kernel.shape[-1]])
  cout = kernel.shape[-1]
  p = int(np.prod(new.kernel.shape[:-1]))
  h = np.zeros((p, p))
  c = np.zeros((p, cout))
  yyt = np.zeros((cout, cout))
  sx = np.zeros(p)
  sy = np.zeros(cout)
  n = 0
  rx = ry = None
  for xs, xt in zip(xs_batches, xt_batches, strict=True):
    ps = layer_patches(new, xs)
    y = tf.matmul(layer_patches(old, xt), kernel)
    if bias is not None:
      y = y + bias
    if rx is None:
      rx = tf.reduce_mean(ps, 0)
      ry = tf.reduce_mean(y, 0)
    ps = ps - rx
    y = y - ry
    h += tf.matmul(ps, ps, transpose_a=True).numpy()
    c += tf.matmul(ps, y, transpose_a=True).numpy()
    yyt += tf.matmul(y, y, transpose_a=True).numpy()
    sx += tf.reduce_sum(tf.cast(ps, tf.float64), 0).numpy()
    sy += tf.reduce_sum(tf.cast(y, tf.float64), 0).numpy()
    n += int(ps.shape[0])
  rx = np.asarray(rx, np.float64)
  ry = np.asarray(ry, np.float64)
  return Stats(h, c, np.diag(yyt).copy(), sx, sy, n, yyt, rx, ry)


def group_channels(yyt, sy, n, g: sampling.EpitomeGeometry) -> np.ndarray:
  """Orders output channels so that epitome-sharing channels are correlated.

  With integer offsets, output channels ``b * Cout_E + w`` of all chunks ``b``
  are copies of one epitome filter (up to the BatchNorm after them, which
  rescales each channel). Grouping the original layer's most correlated
  output channels (absolute correlation on the calibration data) into those
  positions makes the copies cost least. Greedy: the strongest remaining
  channel seeds a group, its most correlated remaining channels join it.

  Returns:
    ``perm``: student channel ``j`` reproduces original channel ``perm[j]``.
  """
  mean = sy / n
  cov = yyt / n - np.outer(mean, mean)
  std = np.sqrt(np.maximum(np.diag(cov), 1e-30))
  corr = np.abs(cov / np.outer(std, std))
  free = np.ones(g.cout, bool)
  perm = np.empty(g.cout, np.int64)
  for w in range(g.cout_e):
    slots = [
      b * g.cout_e + w for b in range(g.num_out_chunks) if b * g.cout_e + w < g.cout
    ]
    seed = int(np.argmax(np.where(free, std, -1.0)))
    free[seed] = False
    members = [seed]
    for _ in slots[1:]:
      score = np.where(free, corr[seed], -1.0)
      pick = int(np.argmax(score))
      free[pick] = False
      members.append(pick)
    for slot, member in zip(slots, members, strict=True):
      perm[slot] = member
  return perm


def fit_layer(
  old,
  new,
  xs,
  xt,
  record,
  refit_batchnorm,
  batch_size,
  fit_kwargs,
  in_perm=None,
  permute=False,
):
  """Output-space least squares of one layer (epitome or stock), in place.

  ``in_perm``: the student's input channel ``i`` carries the original input
  channel ``in_perm[i]``. With ``permute``, the output channels are reordered
  too (:func:`group_channels`). Returns the output order (or None).

  Raises:
    numpy.linalg.LinAlgError: naming the layer, when a solve fails.
  """
  try:
    return _fit_layer(
      old,
      new,
      xs,
      xt,
      record,
      refit_batchnorm,
      batch_size,
      fit_kwargs,
      in_perm,
      permute,
    )
  except np.linalg.LinAlgError as e:
    raise np.linalg.LinAlgError(
      f"calibrate: the least squares of layer '{new.name}' failed ({e}); its "
      "inputs on the calibration data may be (nearly) constant or collinear: "
      "try a larger CalibrationConfig.ridge or other calibration data"
    ) from e


def _fit_layer(
  old, new, xs, xt, record, refit_batchnorm, batch_size, fit_kwargs, in_perm, permute
):
  bias = old.bias.numpy() if getattr(old, "bias", None) is not None else None
  stats = accumulate(
    old, new, data.in_batches(xs, batch_size), data.in_batches(xt, batch_size), bias
  )
  kernel = old.kernel.numpy().astype(np.float64)
  if in_perm is not None:
    kernel = kernel[..., in_perm, :]
  out_perm = None
  if permute and isinstance(new, epitome_layers.EPITOME_LAYERS):
    g = new.epitome_geometry
    # Grouping pays where output chunks are copies of the same filters
    # (channel_roll=0); with a roll each chunk reads other input channels.
    if g.num_out_chunks > 1 and not g.in_rolls.any():
      out_perm = group_channels(stats.yyt, stats.sy, stats.n, g)
      stats = stats.permuted(out_perm)
      kernel = kernel[..., out_perm]
      if bias is not None:
        bias = bias[out_perm]
      record.output_order = [int(i) for i in out_perm]
  shift = new.use_bias or (refit_batchnorm and graph.feeds_only_batchnorm(new))
  fit_stats = stats.centred() if shift else stats.raw()
  cout = kernel.shape[-1]
  if isinstance(new, epitome_layers.EPITOME_LAYERS):
    _fit_one(new, kernel, fit_stats, record=record, **fit_kwargs)
    k_new = new.kernel.numpy().astype(np.float64).reshape(-1, cout)
    k_ref = _weight_fit_kernel(kernel, new)
  else:
    p = fit_stats.h.shape[0]
    lam = fit_kwargs["ridge"] * max(np.trace(fit_stats.h) / p, 1e-12)
    k_ref = kernel.reshape(p, cout)
    k_new = np.linalg.solve(fit_stats.h + lam * np.eye(p), fit_stats.c + lam * k_ref)
    new.kernel.assign(k_new.reshape(new.kernel.shape).astype(np.float32))
  # Errors relative to the variation of the target; a shift the layer (or
  # the BatchNorm after it) fits is not counted against either fit.
  ref = max(float(stats.centred().yy.sum()), 1e-30)
  for attr, k in (("output_error", k_new), ("weight_fit_output_error", k_ref)):
    err = float(np.maximum(fit_stats.residual(k).sum(), 0.0) / ref)
    setattr(record, attr, math.sqrt(err))
  if new.use_bias:
    new.bias.assign((stats.mean_y - stats.mean_x @ k_new).astype(np.float32))
  return out_perm


def _weight_fit_kernel(kernel, new) -> np.ndarray:
  g = new.epitome_geometry
  routing = sampling.fixed_routing(g, new.spatial_stride)
  epitome = sampling.fit_epitome(kernel, routing, g)
  sampled = sampling.sample_kernel(
    epitome,
    routing.in_offsets,
    routing.out_offsets,
    routing.spatial_offsets if g.slack_axes else None,
    g,
  )
  return np.asarray(sampled, np.float64).reshape(-1, g.cout)


def _fit_one(new, kernel, stats, *, ridge, search, sweeps, max_candidates, record):
  g = new.epitome_geometry
  p = stats.h.shape[0]
  lam = ridge * max(np.trace(stats.h) / p, 1e-12)
  flat = kernel.reshape(p, g.cout)
  h = stats.h + lam * np.eye(p)
  c = stats.c + lam * flat
  current = new.routing_map
  routing = (
    np.round(current.in_offsets).astype(np.int64) % g.cin_e,
    np.round(current.out_offsets).astype(np.int64) % g.cout_e,
    np.round(np.asarray(current.spatial_offsets))
    .astype(np.int64)
    .reshape(g.num_out_chunks, g.rank),
  )
  e0 = sampling.fit_epitome(
    kernel,
    sampling.RoutingMap(*(np.asarray(r, np.float64) for r in routing)),
    g,
    fill=new.epitome.numpy(),
  )
  problem = Problem(g, h, c, e0, mu=1e-6 * max(lam, 1e-12))
  if search and new.sampler == "learned":
    routing = problem.search(routing, sweeps, max_candidates, kernel=flat)
    record.routing_searched = True
  _, epitome = problem.solve(routing)
  new.set_routing_map(
    sampling.RoutingMap(
      np.asarray(routing[0], np.float32),
      np.asarray(routing[1], np.float32),
      np.asarray(routing[2], np.float32).reshape(g.num_out_chunks, g.rank),
    )
  )
  new.epitome.assign(epitome.reshape(g.epitome_shape).astype(np.float32))
