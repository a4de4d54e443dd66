"""Data-aware conversion: fit epitomes to a trained layer's outputs, not its weights.

:func:`keras_epitome.epitomize` with ``calibration_data`` (or
:func:`calibrate` on an already converted model) fits every epitome layer so
that, on a few hundred calibration samples, it reproduces what the ORIGINAL
layer computed, and picks its routing map with the same data.

The layers are fitted one at a time in network order. Layer ``l`` of the
converted model sees the converted model's own activations ``X_s`` (so the
errors of the layers before it are corrected, not compounded) and its target
is the original layer's pre-activation output ``Y = X_t K + b`` on the
original model's activations ``X_t``. With ``X`` the layer's im2col patches
(Dense: its inputs), the problem

  ``min_E || X_s K(E) - Y ||^2 + lambda || K(E) - K_orig ||^2``

is linear least squares in the epitome: with integer offsets every kernel
entry reads exactly one epitome entry, ``K[:, co] = R_b e_w`` with ``R_b`` a
0/1 matrix (input-channel roll and spatial window of output chunk ``b``) and
``e_w`` the epitome slice of output channel ``co``. The problem then splits
into one small system per epitome output channel ``w``:

  ``(sum_{co -> w} R_b^T (H + lambda I) R_b) e_w =
  sum_{co -> w} R_b^T (X_s^T Y + lambda K_orig)[:, co]``

with ``H = X_s^T X_s`` the input covariance. Only ``H`` (``P x P``, ``P =
prod(S) * Cin``) and ``X_s^T Y`` (``P x Cout``) are accumulated over the data;
the solves are in the epitome's size. The ridge term pulls the solution
towards the weight-space fit where the data do not determine it (as
``lambda`` grows, the fit becomes the weight fit of DESIGN.md section 5).
Where the layer has a bias, or feeds only a BatchNormalization whose moving
mean is re-estimated, the statistics are centred and the shift is fitted in
closed form.

With integer offsets and ``channel_roll=0``, the output channels
``b * Cout_E + w`` of all output chunks ``b`` are copies of one epitome filter
``w`` (up to the BatchNorm after them). For such layers, by default
(``permute_channels``), the original layer's output channels
are reordered so that each such group holds the most correlated channels on
the calibration data; the BatchNorm after the layer and the inputs of the
layers it feeds follow the new order, so the model computes the same kind of
function with a different internal channel order (done only where every
consumer is refitted; the order is reported as ``output_order``).

With ``search=True`` the routing map (learned sampler) is also chosen by
coordinate descent over the integer offsets, started from offsets that pair
each chunk's channels with the most similar weights of the first chunk, each
candidate scored by the exact least-squares objective: input-chunk offsets
change ``R`` (one ``Q x Q`` eigendecomposition each, ``Q = prod(S_E) *
Cin_E``), output-chunk channel and spatial offsets only regroup the
right-hand sides. The first chunk's channel offsets stay 0: shifting all
chunks together only relabels the epitome's channels.

After each layer, the moving statistics of the BatchNormalization layers that
follow it are re-estimated on the converted model's activations (exactly,
over all calibration samples, not with a momentum) and their scale and offset
refitted per channel to the original BatchNorm's outputs, before the next
layer is fitted. Stock ``Conv``/``Dense`` layers after the first epitome
layer (e.g. the classifier) are refitted by the same least squares without
the epitome constraint.

The least squares fits each layer's pre-activation output linearly. Two
optional gradient passes follow it (in the spirit of block reconstruction
for post-training quantization, AdaRound/BRECQ): with ``reconstruct_steps``,
each epitome layer's block (the layer and the BatchNorm and activation layers
right after it) is fitted by Adam to the original block's post-activation
output, on the converted model's own inputs to the block, right after the
layer's least squares and BatchNorm refit and before the next layer is
fitted; with ``output_steps``, all fitted layers are then fitted together to
the original model's output on the calibration data (mean squared error of
the outputs, e.g. logits; no labels). Each pass trains the epitomes, biases
and BatchNorm scales and offsets (and the kernels of refitted stock layers),
keeps the routing map and the moving statistics, and is undone when it does
not lower its error on the calibration data. On the Fashion-MNIST CNN of
``benchmarks/pretrained.py`` the output pass is what raises accuracy after
conversion most (see ``benchmarks/RESULTS.md``).

A gradient pass runs the BatchNorms in inference mode, so afterwards their
moving statistics no longer describe the activations they normalize, and
training (which normalizes with batch statistics) would start from another
function: on that CNN at 4x, 90.1% in inference mode but 83.9% with batch
statistics. So when a pass was kept, every BatchNorm after the first epitome
layer gets the mean and variance of its input on the calibration data, with
its scale and offset changed so that its inference-mode output stays the
same (the model's predictions do not change).

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

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from keras_epitome import layers as epitome_layers
from keras_epitome import sampling, spec
from keras_epitome.backend import keras

DEFAULT_MAX_SAMPLES = 2048


@dataclasses.dataclass
class LayerCalibration:
  """What :func:`calibrate` did to one epitome layer.

  Attributes:
    name: the layer's name.
    output_error: relative output error on the calibration data after the
      data-aware fit: ``|X_s K + b - Y| / |Y - mean(Y)|`` (pre-activation).
    weight_fit_output_error: the same error for the weight-space fit
      (``init="fit"``) with the same inputs, for comparison.
    routing_searched: whether the routing map was chosen with the data
      (``False`` for the fixed sampler, or with ``search=False``).
    output_order: with ``permute_channels``, the layer's output channel
      ``j`` reproduces the original layer's channel ``output_order[j]``
      (``None``: same order).
    reconstructed_to: with ``reconstruct_steps``, the last layer of the
      block whose output the reconstruction matched (e.g. the ReLU after the
      layer's BatchNorm).
    block_error_before: relative error of that block's output (post-
      activation) on the calibration data after the least-squares fit,
      ``|B_s - B_t| / |B_t - mean(B_t)|``.
    block_error: the same error after the reconstruction (never above
      ``block_error_before``: a reconstruction that does not lower it is
      undone).
    note: why the layer kept its weight fit, if it did.
  """

  name: str
  output_error: Optional[float] = None
  weight_fit_output_error: Optional[float] = None
  routing_searched: bool = False
  output_order: Optional[List[int]] = None
  reconstructed_to: Optional[str] = None
  block_error_before: Optional[float] = None
  block_error: Optional[float] = None
  note: str = ""


# ----------------------------------------------------------------------------
# Calibration data.


def calibration_array(
  data, model, max_samples: int = DEFAULT_MAX_SAMPLES, log=None
) -> np.ndarray:
  """Validates calibration data and returns it as one float32 array.

  Args:
    data: a NumPy array (or anything ``np.asarray`` takes) of inputs, a tuple
      ``(x, y)`` or ``(x, y, sample_weight)`` whose first entry is that, or a
      ``tf.data.Dataset`` of ``x`` or ``(x, y[, w])``, batched or not.
    model: the (single-input) model the data is for.
    max_samples: at most this many samples are kept (the first ones); when
      there are more, ``log`` (default ``absl.logging.warning``) says how
      many were dropped, so that a larger set is never cut short unseen.
    log: the logging function for that message (``ke.allocate``, which
      subsamples by design, logs at info level).

  Returns:
    ``x`` as a float32 array of shape ``(n, *input_shape[1:])``.

  Raises:
    ValueError: for a multi-input model, empty data, samples of the wrong
      shape, a non-numeric dtype or non-finite values (NaN, inf).
  """
  name = getattr(model, "name", "?")
  if len(model.inputs or []) != 1:
    raise ValueError(
      f"calibration_data: model '{name}' has {len(model.inputs or [])} inputs; "
      "data-aware conversion supports models with exactly one input"
    )
  want = tuple(model.inputs[0].shape)[1:]
  more = False  # a dataset with samples beyond those read
  if isinstance(data, tf.data.Dataset):
    parts, count = [], 0
    for element in data:
      if count >= max_samples:  # one more element: the dataset is longer
        more = True
        break
      x = element[0] if isinstance(element, (tuple, list)) else element
      if isinstance(x, dict):
        raise ValueError(
          f"calibration_data: dataset elements for model '{name}' must be x "
          "or (x, y) tensors, not dicts"
        )
      x = np.asarray(x)
      if x.ndim == len(want):  # unbatched dataset
        x = x[np.newaxis]
      parts.append(x)
      count += len(x)
    if not parts:
      raise ValueError(
        f"calibration_data for model '{name}' is an empty dataset; give a few "
        f"hundred samples of shape {want}"
      )
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
      raise ValueError(
        f"calibration_data for model '{name}' has elements of different "
        f"shapes {sorted(shapes)}; expected {want}"
      )
    x = np.concatenate(parts, 0)
  else:
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
      first = np.asarray(data[0]) if not np.isscalar(data[0]) else None
      if first is not None and first.ndim == len(want) + 1:
        data = data[0]
    try:
      x = np.asarray(data)
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"calibration_data for model '{name}' is not an array of inputs: {e}"
      ) from None
  if x.dtype.kind not in "fiub":
    raise ValueError(
      f"calibration_data for model '{name}' has dtype {x.dtype}; expected "
      "numbers (float inputs of shape "
      f"{want})"
    )
  if x.ndim == 0 or len(x) == 0:
    raise ValueError(
      f"calibration_data for model '{name}' is empty (shape {x.shape}); give "
      f"a few hundred samples of shape {want}"
    )
  if x.ndim != len(want) + 1 or any(
    w is not None and int(w) != int(d) for w, d in zip(want, x.shape[1:], strict=True)
  ):
    raise ValueError(
      f"calibration_data for model '{name}' has samples of shape "
      f"{tuple(x.shape[1:])} (array shape {tuple(x.shape)}); the model takes "
      f"inputs of shape {want} (None: any size)"
    )
  if more or len(x) > max_samples:
    (log or logging.warning)(
      "calibration_data for model '%s': using the first %d of %s samples "
      "(max_samples=%d); pass a larger max_samples to use more",
      name,
      max_samples,
      "more than %d" % len(x) if more else len(x),
      max_samples,
    )
  x = x[:max_samples].astype(np.float32)
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ValueError(
      f"calibration_data for model '{name}' holds {bad} non-finite value(s) "
      "(NaN or inf); calibration needs finite inputs"
    )
  return x


# ----------------------------------------------------------------------------
# Patches: the rows X of the linear map y = X @ K.reshape(P, Cout).


def _supported(layer) -> str:
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
  patches = tf.image.extract_patches(
    x,
    sizes=[1, *kernel_size, 1],
    strides=[1, *strides, 1],
    rates=[1, *dilation, 1],
    padding=padding.upper(),
  )
  return tf.reshape(patches, [-1, patches.shape[-1]])


# ----------------------------------------------------------------------------
# The least-squares problem of one layer.


@dataclasses.dataclass
class _Stats:
  """Sufficient statistics of one layer's output-space least squares."""

  h: np.ndarray  # X_s^T X_s, (P, P)
  c: np.ndarray  # X_s^T Y, (P, Cout)
  yy: np.ndarray  # sum Y^2 per output channel, (Cout,)
  sx: np.ndarray  # sum of X_s rows, (P,)
  sy: np.ndarray  # sum of Y rows, (Cout,)
  n: int  # rows
  yyt: Optional[np.ndarray] = None  # Y^T Y, (Cout, Cout)

  def centred(self) -> "_Stats":
    mx, my = self.sx / self.n, self.sy / self.n
    return _Stats(
      self.h - self.n * np.outer(mx, mx),
      self.c - self.n * np.outer(mx, my),
      self.yy - self.n * my**2,
      np.zeros_like(self.sx),
      np.zeros_like(self.sy),
      self.n,
    )

  def permuted(self, perm: np.ndarray) -> "_Stats":
    """The statistics with the target's channels in the order ``perm``."""
    yyt = None if self.yyt is None else self.yyt[np.ix_(perm, perm)]
    return _Stats(
      self.h, self.c[:, perm], self.yy[perm], self.sx, self.sy[perm], self.n, yyt
    )

  def residual(self, k: np.ndarray) -> np.ndarray:
    """``|X_s k - Y|^2`` per output channel for a flat kernel ``k`` (P, Cout)."""
    hk = self.h @ k
    return np.einsum("pc,pc->c", k, hk) - 2 * np.einsum("pc,pc->c", k, self.c) + self.yy


def _accumulate(old, new, xs_batches, xt_batches, bias) -> _Stats:
  kernel = tf.reshape(tf.cast(old.kernel, tf.float32), [-1, old.kernel.shape[-1]])
  cout = kernel.shape[-1]
  p = int(np.prod(new.kernel.shape[:-1]))
  h = np.zeros((p, p))
  c = np.zeros((p, cout))
  yyt = np.zeros((cout, cout))
  yy = np.zeros(cout)
  sx = np.zeros(p)
  sy = np.zeros(cout)
  n = 0
  for xs, xt in zip(xs_batches, xt_batches, strict=True):
    ps = layer_patches(new, xs)
    y = tf.matmul(layer_patches(old, xt), kernel)
    if bias is not None:
      y = y + bias
    h += tf.matmul(ps, ps, transpose_a=True).numpy()
    c += tf.matmul(ps, y, transpose_a=True).numpy()
    yy += tf.reduce_sum(tf.square(y), 0).numpy()
    yyt += tf.matmul(y, y, transpose_a=True).numpy()
    sx += tf.reduce_sum(ps, 0).numpy()
    sy += tf.reduce_sum(y, 0).numpy()
    n += int(ps.shape[0])
  return _Stats(h, c, yy, sx, sy, n, yyt)


def _group_channels(yyt, sy, n, g: sampling.EpitomeGeometry) -> np.ndarray:
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


def _sum_rows(m: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
  """``out[q] = sum of m[p] over p with idx[p] == q`` (``R^T m`` for one-hot R)."""
  order = np.argsort(idx, kind="stable")
  sorted_idx = idx[order]
  starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
  out = np.zeros((size,) + m.shape[1:])
  out[sorted_idx[starts]] = np.add.reduceat(m[order], starts, axis=0)
  return out


class _Problem:
  """Scores integer routing maps of one layer and solves for the epitome.

  Args:
    g: the layer's geometry.
    h: ``(P, P)`` input covariance with the ridge added.
    c: ``(P, Cout)`` right-hand side with the ridge term added.
    e0: the weight-fit epitome; entries no kernel entry reads stay at it.
    mu: weight of the tiny pull towards ``e0``.
  """

  def __init__(self, g: sampling.EpitomeGeometry, h, c, e0, mu):
    self.g = g
    self.h = h
    self.c = c
    self.e0 = np.asarray(e0, np.float64).reshape(-1, g.cout_e)
    self.mu = mu
    self.q = int(np.prod(g.spatial_e)) * g.cin_e if g.rank else g.cin_e
    self._cache: Dict[Tuple, Any] = {}

  def _index(self, in_off: Tuple[int, ...], key: Tuple) -> np.ndarray:
    """Epitome-slice index (over ``(*S_E, Cin_E)``) read by each kernel row.

    ``key`` is ``(sigma, roll)``: an output chunk's spatial window and the
    static roll of the input channels it reads (``EpitomeGeometry.in_rolls``).
    Read off the sampler (:func:`keras_epitome.sampling.epitome_reads`) for an
    output chunk with that roll, placed at that window.
    """
    g = self.g
    sigma, roll = key
    b = int(np.flatnonzero(g.in_rolls == roll)[0])
    spatial = np.zeros((g.num_out_chunks, g.rank))
    spatial[b] = sigma
    routing = sampling.RoutingMap(
      np.asarray(in_off, np.float64), np.zeros(g.num_out_chunks), spatial
    )
    reads = sampling.epitome_reads(routing, g, "calibration").reshape(-1, g.cout)
    return reads[:, b * g.cout_e] // g.cout_e

  def _block(self, in_off, sigma):
    key = (in_off, sigma)
    if key not in self._cache:
      if len(self._cache) > 256:
        self._cache.clear()
      idx = self._index(in_off, sigma)
      hr = _sum_rows(_sum_rows(self.h, idx, self.q).T, idx, self.q)
      tr = _sum_rows(self.c, idx, self.q)
      self._cache[key] = (hr, tr, None)
    return self._cache[key]

  def _eig(self, in_off, sigma):
    hr, tr, eig = self._block(in_off, sigma)
    if eig is None:
      d, v = np.linalg.eigh(hr)
      eig = (np.maximum(d, 0.0), v)
      self._cache[(in_off, sigma)] = (hr, tr, eig)
    return eig

  def solve(self, routing) -> Tuple[float, np.ndarray]:
    """``(objective, epitome)`` for an integer routing map ``(in, out, spatial)``.

    The objective is ``sum_co k^T H k - 2 k^T c`` at the optimum, i.e. the
    residual minus a constant; lower is better.
    """
    g = self.g
    in_off, out_off, sp = routing
    in_off = tuple(int(v) for v in in_off)
    sigmas = [
      tuple(int(v) for v in row) for row in np.asarray(sp).reshape(len(out_off), -1)
    ]
    if not g.slack_axes:
      sigmas = [tuple([0] * g.rank)] * len(out_off)
    # What an output chunk reads: its window and its input-channel roll.
    sigmas = [(s, int(r)) for s, r in zip(sigmas, g.in_rolls, strict=True)]
    co = np.arange(g.cout)
    b, v = np.divmod(co, g.cout_e)
    w = (v + np.asarray(out_off, np.int64)[b]) % g.cout_e
    keys = sorted(set(sigmas))
    epitome = np.empty((self.q, g.cout_e))
    total = 0.0
    if len(keys) == 1:
      d, vec = self._eig(in_off, keys[0])
      tr = self._block(in_off, keys[0])[1]
      counts = np.bincount(w, minlength=g.cout_e).astype(np.float64)
      rhs = np.zeros((self.q, g.cout_e))
      np.add.at(rhs.T, w, tr.T)
      rhs += self.mu * self.e0
      proj = vec.T @ rhs  # (Q, Cout_E)
      denom = counts[None, :] * d[:, None] + self.mu
      epitome = vec @ (proj / denom)
      total = -float(np.sum(proj * proj / denom))
      return total, epitome
    sigma_of = np.asarray([keys.index(s) for s in sigmas])[b]
    for wi in range(g.cout_e):
      sel = np.flatnonzero(w == wi)
      hw = self.mu * np.eye(self.q)
      rhs = self.mu * self.e0[:, wi].copy()
      for k in np.unique(sigma_of[sel]):
        hr, tr, _ = self._block(in_off, keys[k])
        cols = sel[sigma_of[sel] == k]
        hw += len(cols) * hr
        rhs += tr[:, cols].sum(1)
      chol = np.linalg.cholesky(hw)
      ew = np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))
      epitome[:, wi] = ew
      total -= float(rhs @ ew)
    return total, epitome

  def match_offsets(self, kernel, axis: str) -> list:
    """Channel offsets pairing each chunk's channels with similar ones of chunk 0.

    Channel ``u`` of input (or output) chunk ``a`` shares its weights with
    channel ``(u + p_a) mod size`` of chunk 0; ``p_a`` maximizes the summed
    cosine similarity of the paired channels' weights in the original
    kernel. A starting point for the coordinate descent, which alone gets
    stuck when several chunks are wrong at once.
    """
    g = self.g
    k = np.asarray(kernel, np.float64).reshape(-1, g.cin, g.cout)
    if axis == "in":
      size, chunks = g.cin_e, g.num_in_chunks
      rows = np.moveaxis(k, 1, 0).reshape(g.cin, -1)
    else:
      size, chunks = g.cout_e, g.num_out_chunks
      rows = np.moveaxis(k, 2, 0).reshape(g.cout, -1)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    first = rows[:size]
    offsets = [0]
    for a in range(1, chunks):
      chunk = rows[a * size : (a + 1) * size]
      u = np.arange(len(chunk))
      sim = chunk @ first.T  # (len, size)
      scores = [sim[u, (u + p) % size].sum() for p in range(size)]
      offsets.append(int(np.argmax(scores)))
    return offsets

  def search(self, routing, sweeps: int, max_candidates: int, kernel=None):
    """Coordinate descent over the integer offsets; returns the best routing map."""
    g = self.g
    in_off = [int(v) for v in routing[0]]
    out_off = [int(v) for v in routing[1]]
    if kernel is not None:
      sp0 = np.asarray(routing[2], np.int64).reshape(g.num_out_chunks, g.rank)
      start = (self.match_offsets(kernel, "in"), self.match_offsets(kernel, "out"))
      if self.solve((*start, sp0))[0] < self.solve((in_off, out_off, sp0))[0]:
        in_off, out_off = start
    sp = np.asarray(routing[2], np.int64).reshape(g.num_out_chunks, g.rank).copy()
    best = self.solve((in_off, out_off, sp))[0]

    def candidates(size):
      if size <= max_candidates:
        return range(size)
      return np.unique(np.linspace(0, size - 1, max_candidates).round().astype(int))

    for _ in range(sweeps):
      improved = False
      for a in range(1, g.num_in_chunks):
        for cand in candidates(g.cin_e):
          trial = list(in_off)
          trial[a] = int(cand)
          score = self.solve((trial, out_off, sp))[0]
          if score < best - 1e-9 * abs(best):
            best, in_off, improved = score, trial, True
      for b in range(g.num_out_chunks):
        if b > 0:
          for cand in candidates(g.cout_e):
            trial = list(out_off)
            trial[b] = int(cand)
            score = self.solve((in_off, trial, sp))[0]
            if score < best - 1e-9 * abs(best):
              best, out_off, improved = score, trial, True
        for d in g.slack_axes:
          for cand in candidates(g.slack[d] + 1):
            trial = sp.copy()
            trial[b, d] = int(cand)
            score = self.solve((in_off, out_off, trial))[0]
            if score < best - 1e-9 * abs(best):
              best, sp, improved = score, trial, True
      if not improved:
        break
    return in_off, out_off, sp


# ----------------------------------------------------------------------------
# The model-level pass.


def _feeds_only_batchnorm(layer) -> bool:
  nodes = getattr(layer, "_outbound_nodes", [])
  if not nodes:
    return False
  for node in nodes:
    consumer = node.outbound_layer
    if not isinstance(consumer, keras.layers.BatchNormalization):
      return False
    axis = consumer.axis
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    if list(axis) not in ([-1], [len(layer.output_shape) - 1]):
      return False
  return layer.activation is keras.activations.linear


def _in_batches(x, batch_size):
  return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def _predict(model, x, batch_size):
  out = [model(b, training=False) for b in _in_batches(x, batch_size)]
  if isinstance(out[0], (list, tuple)):
    return [np.concatenate([o[i] for o in out]) for i in range(len(out[0]))]
  return np.concatenate([np.asarray(o) for o in out])


def _input_model(model, layers: Sequence):
  """A model from ``model``'s input to the inputs of ``layers`` (or None)."""
  try:
    return keras.Model(model.inputs, [la.input for la in layers])
  except (AttributeError, ValueError, TypeError):
    return None


def _refit_batchnorm(bn, x: np.ndarray, target: Optional[np.ndarray]):
  """Moving statistics from ``x``; with ``target``, scale and offset too.

  The scale and offset are the per-channel least-squares fit of ``target``
  (the original BatchNorm's output) from the normalized ``x``.
  """
  axes = tuple(range(x.ndim - 1))
  x = x.astype(np.float64)
  mean, var = x.mean(axes), x.var(axes)
  bn.moving_mean.assign(mean.astype(np.float32))
  bn.moving_variance.assign(var.astype(np.float32))
  if target is None or bn.gamma is None or bn.beta is None:
    return
  z = (x - mean) / np.sqrt(var + bn.epsilon)
  t = target.astype(np.float64)
  t_mean = t.mean(axes)
  gamma = (z * (t - t_mean)).mean(axes) / np.maximum((z * z).mean(axes), 1e-12)
  bn.gamma.assign(gamma.astype(np.float32))
  bn.beta.assign(t_mean.astype(np.float32))


def _input_moments(model, layers: Sequence, x, batch_size) -> list:
  """Per layer, the mean and variance over ``x`` of each channel of its input.

  One forward pass in inference mode, in batches; float64 sums. The channels
  are the input's last axis.
  """
  probe = keras.Model(model.inputs, [la.input for la in layers])
  count = [0] * len(layers)
  s1 = [0.0] * len(layers)
  s2 = [0.0] * len(layers)
  for xb in _in_batches(x, batch_size):
    outs = probe(xb, training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for i, out in enumerate(outs):
      a = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
      count[i] += len(a)
      s1[i] = s1[i] + a.sum(0)
      s2[i] = s2[i] + np.square(a).sum(0)
  moments = []
  for n, total, squares in zip(count, s1, s2, strict=True):
    mean = total / n
    moments.append((mean, np.maximum(squares / n - np.square(mean), 0.0)))
  return moments


def _restandardize_batchnorms(model, bns: Sequence, x, batch_size) -> float:
  """Moving statistics of ``bns`` from the data, the inference function kept.

  ``bns``: BatchNormalization layers of ``model`` over the last axis.

  A gradient pass that runs a BatchNormalization in inference mode changes
  the layers before it, not the BatchNorm's moving statistics, so those no
  longer describe the layer's input: once training runs the layer on batch
  statistics (``fit``, :func:`keras_epitome.distill`), it computes another
  function. Each BatchNorm gets the mean and variance of its input on ``x``
  and the scale and offset that make ``gamma' (z - mean') / sqrt(var' + eps)
  + beta'`` equal to its old output for every ``z``. A BatchNorm without a
  scale keeps its variance (and one without an offset its mean): those
  cannot be moved without changing the function.

  Returns:
    The largest change of a moving mean, in units of the old moving standard
    deviation (0.0 for no BatchNorms).
  """
  if not bns:
    return 0.0
  worst = 0.0
  for bn, (mean, var) in zip(
    bns, _input_moments(model, bns, x, batch_size), strict=True
  ):
    old_mean = bn.moving_mean.numpy().astype(np.float64)
    old_var = bn.moving_variance.numpy().astype(np.float64)
    old_std = np.sqrt(old_var + bn.epsilon)
    if bn.beta is None:
      mean = old_mean
    if bn.gamma is None:
      var = old_var
    new_std = np.sqrt(var + bn.epsilon)
    gamma = (
      np.ones_like(old_std) if bn.gamma is None else bn.gamma.numpy().astype(np.float64)
    )
    if bn.beta is not None:
      bn.beta.assign(
        (bn.beta.numpy() + gamma * (mean - old_mean) / old_std).astype(np.float32)
      )
    if bn.gamma is not None:
      bn.gamma.assign((gamma * new_std / old_std).astype(np.float32))
    bn.moving_mean.assign(mean.astype(np.float32))
    bn.moving_variance.assign(var.astype(np.float32))
    worst = max(worst, float(np.max(np.abs(mean - old_mean) / old_std)))
  return worst


def calibrate(
  student,
  teacher,
  calibration_data,
  *,
  pairs: Optional[Sequence[Tuple[Any, Any]]] = None,
  ridge: float = 1e-3,
  search: bool = False,
  permute_channels: bool = True,
  search_sweeps: int = 2,
  max_candidates: int = 64,
  refit_batchnorm: bool = True,
  batchnorm_affine: bool = True,
  refit_stock_layers: bool = True,
  batch_size: int = 64,
  max_samples: int = DEFAULT_MAX_SAMPLES,
  reconstruct_steps: int = 0,
  reconstruct_lr: float = 1e-3,
  output_steps: int = 0,
  seed: int = 0,
) -> List[LayerCalibration]:
  """Fits ``student``'s epitome layers to reproduce ``teacher``'s layer outputs.

  See the module docstring for the method. ``student`` is changed in place:
  epitomes, routing maps (learned sampler, integer offsets), biases and the
  moving statistics of BatchNormalization layers after the first epitome
  layer.

  Args:
    student: the converted model (e.g. from :func:`keras_epitome.epitomize`),
      functional or Sequential with one input.
    teacher: the original model, with the same layer names.
    calibration_data: inputs (see :func:`calibration_array`); a few hundred
      samples usually suffice.
    pairs: ``(teacher_layer, student_layer)`` to fit; default: every top-level
      epitome layer of ``student`` and the teacher layer of the same name.
    ridge: ``lambda`` relative to the mean input variance
      (``trace(H) / P``); pulls the kernel towards the original one where the
      calibration data leave it free.
    search: choose the learned sampler's routing map with the data
      (coordinate descent over integer offsets, scored by the layer's output
      error). Off by default: on a digits CNN it lowered each layer's error
      but not the network's accuracy, at several times the cost. The channel
      grouping below is the default way the data arrange the sharing (on the
      Fashion-MNIST CNN it raised accuracy after conversion from 83.1/74.6/
      67.6% to 85.0/78.3/72.8% at 2x/4x/8x, first 5,000 test images).
    permute_channels: reorder each epitome layer's output channels (and the
      BatchNorm after it, and the inputs of the layers it feeds) so that the
      channels that share an epitome filter are the most correlated ones.
      The model computes the same function in a different internal channel
      order; only done where every consumer of the output is refitted.
    search_sweeps: coordinate-descent sweeps of the search.
    max_candidates: offsets tried per coordinate (evenly spaced if fewer than
      the range).
    refit_batchnorm: re-estimate BatchNormalization moving statistics after
      the first epitome layer on the student's activations.
    batchnorm_affine: with ``refit_batchnorm``, also refit each such
      BatchNorm's scale and offset (per-channel least squares) to reproduce
      the original BatchNorm's outputs.
    refit_stock_layers: also refit the stock ``Conv1D``/``Conv2D``/``Dense``
      layers after the first epitome layer (e.g. the classifier) to the
      original layers' outputs, with the converted model's activations as
      inputs (full kernels, no size change).
    batch_size: batch size of the forward passes (and of the gradient
      steps below).
    max_samples: calibration samples used at most.
    reconstruct_steps: after each epitome layer's least-squares fit (and the
      BatchNorm refit after it), this many Adam steps on the calibration data
      that fit the layer's block -- the layer and the BatchNorm/activation
      layers right after it -- to the ORIGINAL block's output (post-
      activation), with the converted model's own activations as inputs.
      Trained: the epitome, the layer's bias and the scale and offset of the
      BatchNorms in the block; the routing map and the moving statistics stay
      fixed. A reconstruction that does not lower the block's error on the
      calibration data is undone. 0: least squares only.
    reconstruct_lr: Adam's peak learning rate of those steps (cosine decay to
      0), and of ``output_steps``.
    output_steps: after all layers are fitted, this many Adam steps that fit
      the converted model's output to the original model's output on the
      calibration data (mean squared error; no labels), training the same
      variables of every fitted layer together (and the kernels and biases of
      refitted stock layers). Undone if it does not lower the output error.
      After a kept pass (either one), with ``refit_batchnorm``, the moving
      statistics of the BatchNorms after the first epitome layer are
      re-estimated on the calibration data and their scale and offset
      adjusted so that the model computes the same function (see the
      module docstring).
    seed: seed of the mini-batch order of those steps.

  Both gradient passes are off by default: they cost minutes where the least
  squares takes seconds. Measured on the Fashion-MNIST CNN of
  ``benchmarks/pretrained.py`` (``benchmarks/RESULTS.md``), accuracy right
  after conversion at 2x/4x: least squares 87.6/78.8%, with
  ``reconstruct_steps=300`` 87.9/80.7%, with ``output_steps=4000`` (2,048
  images) 90.2/86.4% (trained model 92.1%); ``reconstruct_steps`` added
  nothing measurable on top of the long output pass.

  Returns:
    One :class:`LayerCalibration` per fitted layer; after kept gradient
    passes, also ``"<model> (output)"`` (with ``output_steps``) and
    ``"<model> (batchnorm)"`` (the statistics re-estimated, in its note).

  Raises:
    ValueError: for bad calibration data (see :func:`calibration_array`),
      a ``ridge`` below 0, ``reconstruct_steps``/``output_steps`` that are
      not ints >= 0, a ``reconstruct_lr`` that is not a finite number > 0, or
      teacher/student pairs that do not match.

  Example:
    >>> import numpy as np
    >>> teacher = keras.Sequential([keras.Input((16,)),
    ...                             keras.layers.Dense(64, name="d")])
    >>> student = ke.epitomize(teacher, 4, verbose=False)
    >>> x = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
    >>> [r.name for r in calibrate(student, teacher, x)]
    ['d']
  """
  if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
    raise ValueError(f"calibrate: ridge must be a finite number >= 0, got {ridge!r}")
  for arg, value in (
    ("reconstruct_steps", reconstruct_steps),
    ("output_steps", output_steps),
    ("batch_size", batch_size),
  ):
    low = 1 if arg == "batch_size" else 0
    if (
      not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low
    ):
      raise ValueError(f"calibrate: {arg} must be an int >= {low}, got {value!r}")
  reconstruct_lr = spec.check_positive(reconstruct_lr, "reconstruct_lr", "calibrate")
  x = calibration_array(calibration_data, teacher, max_samples)
  if pairs is None:
    by_name = {la.name: la for la in teacher.layers}
    pairs = [
      (by_name[la.name], la)
      for la in student.layers
      if isinstance(la, epitome_layers.EPITOME_LAYERS) and la.name in by_name
    ]
  records: List[LayerCalibration] = []
  order = {id(la): i for i, la in enumerate(student.layers)}
  work = []
  for old, new in pairs:
    if not isinstance(new, epitome_layers.EPITOME_LAYERS):
      raise ValueError(
        f"calibrate: student layer '{new.name}' is a {type(new).__name__}, "
        "not an epitome layer"
      )
    if tuple(old.kernel.shape) != new.epitome_geometry.kernel_shape:
      raise ValueError(
        f"calibrate: teacher layer '{old.name}' has kernel shape "
        f"{tuple(old.kernel.shape)}, student layer '{new.name}' samples "
        f"{new.epitome_geometry.kernel_shape}"
      )
    record = LayerCalibration(new.name)
    records.append(record)
    reason = _supported(new)
    if id(new) not in order:
      reason = "the layer is inside a nested model"
    elif len(getattr(new, "_inbound_nodes", [])) != 1:
      reason = "the layer is called more than once"
    if reason:
      record.note = reason + "; kept the weight fit"
      continue
    work.append((order[id(new)], old, new, record))
  work.sort(key=lambda t: t[0])
  if not work:
    return records
  fit_kwargs = dict(
    ridge=ridge, search=search, sweeps=search_sweeps, max_candidates=max_candidates
  )
  teacher_inputs = _input_model(teacher, [old for _, old, _, _ in work])
  student_probe = _input_model(student, [new for _, _, new, _ in work])
  if teacher_inputs is None or student_probe is None:
    for _, _, _, record in work:
      record.note = "no functional path from the model input; kept the weight fit"
    return records
  xt_all = _predict(teacher_inputs, x, batch_size)
  if not isinstance(xt_all, list):
    xt_all = [xt_all]

  teacher_by_name = {la.name: la for la in teacher.layers}
  first = work[0][0]
  fit_at = {
    position: (k, old, new, record)
    for k, (position, old, new, record) in enumerate(work)
  }
  refit_names = {new.name for _, _, new, _ in work}
  if refit_stock_layers:
    refit_names |= {
      la.name
      for i, la in enumerate(student.layers)
      if i > first
      and type(la) in epitome_layers.STOCK_TO_EPITOME
      and not _supported(la)
      and type(teacher_by_name.get(la.name)) is type(la)
      and len(getattr(la, "_inbound_nodes", [])) == 1
    }
  perm_of: Dict[str, Optional[np.ndarray]] = {}  # output channel order per layer

  def input_perm(layer):
    inbound = _single_inbound(layer)
    return None if inbound is None else perm_of.get(inbound.name)

  pending = []  # blocks to reconstruct once all their layers are refitted

  def flush(before_position):
    while pending and order.get(id(pending[0][1]), -1) < before_position:
      new, end, record = pending.pop(0)
      target = _predict(
        keras.Model(teacher.inputs, teacher_by_name[end.name].output), x, batch_size
      )
      perm = perm_of.get(end.name)
      if perm is not None:
        target = target[..., perm]
      _reconstruct_block(
        student,
        new,
        end,
        x,
        target,
        record,
        batch_size,
        reconstruct_steps,
        reconstruct_lr,
        seed,
      )

  for position, layer in enumerate(student.layers):
    flush(position)
    if position in fit_at:
      k, old, new, record = fit_at[position]
      xs = _predict(_input_model(student, [new]), x, batch_size)
      may_permute = permute_channels and _permutable(new, refit_names)
      perm_of[new.name] = _fit_layer(
        old,
        new,
        xs,
        xt_all[k],
        record,
        refit_batchnorm,
        batch_size,
        fit_kwargs,
        input_perm(new),
        may_permute,
      )
      if reconstruct_steps:
        pending.append((new, _block_end(new, refit_names, teacher_by_name), record))
      continue
    if position < first:
      continue
    perm = input_perm(layer)
    if _channelwise(layer):
      perm_of[layer.name] = perm
    old = teacher_by_name.get(layer.name)
    if old is None or type(old) is not type(layer):
      continue
    if len(getattr(layer, "_inbound_nodes", [])) != 1:
      continue
    if isinstance(layer, keras.layers.BatchNormalization):
      if perm is not None:
        layer.set_weights([w[perm] for w in old.get_weights()])
      if not refit_batchnorm or not _channelwise(layer):
        continue
      xs = _predict(_input_model(student, [layer]), x, batch_size)
      target = None
      if batchnorm_affine:
        target = _predict(keras.Model(teacher.inputs, old.output), x, batch_size)
        if perm is not None:
          target = target[..., perm]
      _refit_batchnorm(layer, xs, target)
    elif layer.name in refit_names:
      xs = _predict(_input_model(student, [layer]), x, batch_size)
      xt = _predict(_input_model(teacher, [old]), x, batch_size)
      record = LayerCalibration(layer.name, note="refitted to the data")
      _fit_layer(
        old, layer, xs, xt, record, refit_batchnorm, batch_size, fit_kwargs, perm, False
      )
      records.append(record)
  flush(len(student.layers))
  if output_steps:
    matched = _match_outputs(
      student,
      teacher,
      x,
      refit_names,
      first,
      batch_size,
      output_steps,
      reconstruct_lr,
      seed,
    )
    if matched is not None:
      records.append(
        LayerCalibration(
          f"{student.name} (output)",
          reconstructed_to=student.layers[-1].name,
          block_error_before=matched[0],
          block_error=matched[1],
          note="output matching over all fitted layers",
        )
      )
  moved = any(
    r.block_error is not None and r.block_error < r.block_error_before for r in records
  )
  if refit_batchnorm and moved:
    bns = [
      la
      for i, la in enumerate(student.layers)
      if i > first
      and isinstance(la, keras.layers.BatchNormalization)
      and _channelwise(la)
      and not getattr(la, "renorm", False)
      and len(getattr(la, "_inbound_nodes", [])) == 1
    ]
    if bns:
      shift = _restandardize_batchnorms(student, bns, x, batch_size)
      records.append(
        LayerCalibration(
          f"{student.name} (batchnorm)",
          note=(
            f"moving statistics of {len(bns)} BatchNormalization layer(s) "
            "re-estimated after the gradient passes, scale and offset "
            f"adjusted to keep the function (largest mean shift {shift:.3g} "
            "moving std)"
          ),
        )
      )
  return records


_BLOCK_TAIL = (
  keras.layers.BatchNormalization,
  keras.layers.ReLU,
  keras.layers.LeakyReLU,
  keras.layers.ELU,
  keras.layers.Activation,
  keras.layers.Dropout,
)


def _block_end(layer, refit_names, teacher_by_name):
  """The last layer of ``layer``'s block: it and the BatchNorm/activations after it.

  The chain stops before anything that is not a channel-wise normalization or
  activation (pooling, another fitted layer, a branch, a model output's
  consumer) and before layers the teacher does not have under the same name.
  """
  end = layer
  while True:
    nodes = getattr(end, "_outbound_nodes", [])
    if len(nodes) != 1:
      return end
    consumer = nodes[0].outbound_layer
    if (
      len(getattr(consumer, "_inbound_nodes", [])) != 1
      or consumer.name in refit_names
      or not isinstance(consumer, _BLOCK_TAIL)
      or not _channelwise(consumer)
      or type(teacher_by_name.get(consumer.name)) is not type(consumer)
    ):
      return end
    end = consumer


def _block_layers(layer, end):
  out = [layer]
  while out[-1] is not end:
    out.append(out[-1]._outbound_nodes[0].outbound_layer)
  return out


def _fit_variables(layers) -> list:
  """Variables a reconstruction trains: epitome/kernel, bias, BN scale/offset."""
  out = []
  for la in layers:
    if isinstance(la, epitome_layers.EPITOME_LAYERS):
      names = ("epitome", "bias")
    elif isinstance(la, keras.layers.BatchNormalization):
      names = ("gamma", "beta")
    elif type(la) in epitome_layers.STOCK_TO_EPITOME:
      names = ("kernel", "bias")
    else:
      names = ()
    for name in names:
      v = getattr(la, name, None)
      if v is not None and v.trainable:
        out.append(v)
  return out


def _relative_error(model, inputs, target, batch_size) -> float:
  out = _predict(model, inputs, batch_size).astype(np.float64)
  t = target.astype(np.float64)
  axes = tuple(range(t.ndim - 1))
  ref = float(np.square(t - t.mean(axes)).sum())
  return math.sqrt(float(np.square(out - t).sum()) / max(ref, 1e-30))


def _adam_match(model, inputs, target, variables, steps, lr, batch_size, seed):
  """Adam steps fitting ``model(inputs)`` to ``target`` (MSE); undone if worse.

  Returns the relative error before and after (after = before if undone).
  """
  before = _relative_error(model, inputs, target, batch_size)
  saved = [v.numpy() for v in variables]
  t = target.astype(np.float32)
  scale = float(np.mean(np.var(t.reshape(-1, t.shape[-1]), 0))) or 1.0
  xs = tf.constant(inputs)
  ts = tf.constant(t)
  n = len(inputs)
  optimizer = keras.optimizers.Adam(
    keras.optimizers.schedules.CosineDecay(float(lr), int(steps))
  )

  @tf.function
  def step(idx):
    xb, tb = tf.gather(xs, idx), tf.gather(ts, idx)
    with tf.GradientTape() as tape:
      out = model(xb, training=False)
      loss = tf.reduce_mean(tf.square(tf.cast(out, tf.float32) - tb)) / scale
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return loss

  rng = np.random.default_rng(seed)
  size = min(batch_size, n)
  order = rng.permutation(n)
  at = 0
  for _ in range(int(steps)):
    if at + size > n:
      order, at = rng.permutation(n), 0
    step(tf.constant(order[at : at + size]))
    at += size
  after = _relative_error(model, inputs, target, batch_size)
  if not after < before:
    for v, w in zip(variables, saved, strict=True):
      v.assign(w)
    after = before
  return before, after


def _reconstruct_block(
  student, layer, end, x, target, record, batch_size, steps, lr, seed
):
  """Fits ``layer``'s block to the original block's output (see ``calibrate``)."""
  try:
    block = keras.Model(layer.input, end.output)
    inputs = _predict(_input_model(student, [layer]), x, batch_size)
  except (AttributeError, ValueError, TypeError):
    block = keras.Model(student.inputs, end.output)
    inputs = x
  variables = _fit_variables(_block_layers(layer, end))
  before, after = _adam_match(
    block, inputs, target, variables, steps, lr, batch_size, seed
  )
  record.reconstructed_to = end.name
  record.block_error_before = before
  record.block_error = after


def _match_outputs(
  student, teacher, x, refit_names, first, batch_size, steps, lr, seed
):
  """Fits the converted model's output to the original's (see ``calibrate``)."""
  if len(student.outputs) != 1 or len(teacher.outputs) != 1:
    return None
  layers = [
    la
    for i, la in enumerate(student.layers)
    if i >= first
    and (la.name in refit_names or isinstance(la, keras.layers.BatchNormalization))
  ]
  target = _predict(teacher, x, batch_size)
  return _adam_match(
    student, x, target, _fit_variables(layers), steps, lr, batch_size, seed
  )


_CHANNELWISE = (
  keras.layers.ReLU,
  keras.layers.LeakyReLU,
  keras.layers.ELU,
  keras.layers.Activation,
  keras.layers.MaxPooling1D,
  keras.layers.MaxPooling2D,
  keras.layers.AveragePooling1D,
  keras.layers.AveragePooling2D,
  keras.layers.GlobalAveragePooling1D,
  keras.layers.GlobalAveragePooling2D,
  keras.layers.GlobalMaxPooling1D,
  keras.layers.GlobalMaxPooling2D,
  keras.layers.Dropout,
)


def _channelwise(layer) -> bool:
  """Whether the layer acts on each channel alone (commutes with permutations)."""
  if isinstance(layer, keras.layers.BatchNormalization):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return list(axis) in ([-1], [len(layer.input_shape) - 1])
  if isinstance(layer, keras.layers.Activation):
    return layer.activation is not keras.activations.softmax
  if isinstance(layer, _CHANNELWISE):
    return getattr(layer, "data_format", "channels_last") == "channels_last"
  return False


def _single_inbound(layer):
  nodes = getattr(layer, "_inbound_nodes", [])
  if len(nodes) != 1:
    return None
  inbound = nodes[0].inbound_layers
  if isinstance(inbound, (list, tuple)):
    return inbound[0] if len(inbound) == 1 else None
  return inbound


def _permutable(layer, refit_names) -> bool:
  """Whether ``layer``'s output channels may be reordered.

  True when every path from its output goes through channel-wise layers only
  into layers that are refitted to the data (which take their inputs in any
  order); not when the output is a model output or reaches anything else.
  """
  stack, seen = [layer], set()
  while stack:
    current = stack.pop()
    nodes = getattr(current, "_outbound_nodes", [])
    if not nodes:
      return False  # a model output: its channel order is fixed
    for node in nodes:
      consumer = node.outbound_layer
      if id(consumer) in seen:
        continue
      seen.add(id(consumer))
      if len(getattr(consumer, "_inbound_nodes", [])) != 1:
        return False
      if consumer.name in refit_names:
        continue
      if not _channelwise(consumer):
        return False
      stack.append(consumer)
  return True


def _fit_layer(
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
  too (:func:`_group_channels`). Returns the output order (or None).
  """
  bias = old.bias.numpy() if getattr(old, "bias", None) is not None else None
  stats = _accumulate(
    old, new, _in_batches(xs, batch_size), _in_batches(xt, batch_size), bias
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
      out_perm = _group_channels(stats.yyt, stats.sy, stats.n, g)
      stats = stats.permuted(out_perm)
      kernel = kernel[..., out_perm]
      if bias is not None:
        bias = bias[out_perm]
      record.output_order = [int(i) for i in out_perm]
  shift = new.use_bias or (refit_batchnorm and _feeds_only_batchnorm(new))
  fit_stats = stats.centred() if shift else stats
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
    mx, my = stats.sx / stats.n, stats.sy / stats.n
    new.bias.assign((my - mx @ k_new).astype(np.float32))
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
  problem = _Problem(g, h, c, e0, mu=1e-6 * max(lam, 1e-12))
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
