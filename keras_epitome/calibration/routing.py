"""Integer routing maps of one layer: scoring, solving, coordinate-descent search.

With integer offsets every kernel entry reads exactly one epitome entry,
``K[:, co] = R_b e_w`` with ``R_b`` a 0/1 matrix (input-channel roll and
spatial window of output chunk ``b``) and ``e_w`` the epitome slice of output
channel ``co``. The output-space least squares then splits into one small
system per epitome output channel ``w``:

  ``(sum_{co -> w} R_b^T (H + lambda I) R_b) e_w =
  sum_{co -> w} R_b^T (X_s^T Y + lambda K_orig)[:, co]``

(``docs/design.md``, data-aware conversion). :class:`Problem` solves it for a
given routing map and searches integer maps by coordinate descent
(``ExperimentalCalibration.search``).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from keras_epitome import sampling


def sum_rows(m: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
  """``out[q] = sum of m[p] over p with idx[p] == q`` (``R^T m`` for one-hot R)."""
  order = np.argsort(idx, kind="stable")
  sorted_idx = idx[order]
  starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
  out = np.zeros((size,) + m.shape[1:])
  out[sorted_idx[starts]] = np.add.reduceat(m[order], starts, axis=0)
  return out


class Problem:
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
      hr = sum_rows(sum_rows(self.h, idx, self.q).T, idx, self.q)
      tr = sum_rows(self.c, idx, self.q)
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
    # Right-hand sides of all epitome channels at once; the channels whose
    # output channels read the same mix of windows share one matrix, so one
    # factorization serves each group (with the roll, usually all of them).
    rhs = self.mu * self.e0.copy()
    mix = np.zeros((g.cout_e, len(keys)), np.int64)
    for k, key in enumerate(keys):
      cols = np.flatnonzero(sigma_of == k)
      if len(cols):
        tr = self._block(in_off, key)[1]
        np.add.at(rhs.T, w[cols], tr[:, cols].T)
        np.add.at(mix, (w[cols], k), 1)
    groups: Dict[Tuple[int, ...], list] = {}
    for wi in range(g.cout_e):
      groups.setdefault(tuple(mix[wi]), []).append(wi)
    for counts, members in groups.items():
      hw = self.mu * np.eye(self.q)
      for k, count in enumerate(counts):
        if count:
          hw += count * self._block(in_off, keys[k])[0]
      np.linalg.cholesky(hw)  # raises LinAlgError where hw is not definite
      ew = np.linalg.solve(hw, rhs[:, members])
      epitome[:, members] = ew
      total -= float(np.sum(rhs[:, members] * ew))
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
