"""Data-aware allocation: where to spend a model's epitome budget.

``ke.epitomize(model, 4)`` gives every converted layer the same ratio. Layers
are not equally sensitive: a small early convolution may change the model's
output as much as a large late one while saving a fraction of its stored
numbers (examples in ``docs/results.md``).
:func:`allocate` measures this on calibration data and chooses one ratio per
layer (or keeps a layer stock) so that the converted layers together store no
more than the uniform conversion would, with the smallest total output error.

How (a sensitivity analysis with a knapsack, as per-layer pruning rates or
ranks are often chosen):

1. For every layer ``epitomize`` would convert and every candidate ratio, the
   model with only that layer converted is fitted to the calibration data
   (:func:`keras_epitome.calibration.calibrate`'s least squares, the
   BatchNorms and stock layers after it refitted as calibrate refits them;
   no gradient steps) and its output error is measured:
   ``|f_l,r(x) - f(x)|^2 / |f(x) - mean f(x)|^2`` over the calibration
   samples, with the stored size of that layer (epitome plus routing map;
   the kernel for "stock").
2. The errors are taken as additive. The choice of one candidate per layer
   that minimizes their sum, with the stored sizes summing to at most the
   uniform conversion's, is found exactly (multiple-choice knapsack over the
   Pareto front of size and error).

:func:`keras_epitome.allocate` (in :mod:`keras_epitome.transform`, next to
``epitomize``) returns an :class:`Allocation`; its ``policy`` is an
``epitomize`` policy;
``epitomize(model, compression, calibration_data=x, allocate=True)`` runs the
whole thing. The cost is one least-squares calibration per layer and
candidate: the measurements are printed with the chosen ratios.

Example:
  >>> import numpy as np
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([keras.Input((32,)),
  ...     keras.layers.Dense(64, activation="relu", name="a"),
  ...     keras.layers.Dense(64, activation="relu", name="b"),
  ...     keras.layers.Dense(4, name="out")])
  >>> x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
  >>> chosen = ke.allocate(model, 4, x, candidates=(2, 4, 8), verbose=False)
  >>> sorted(chosen.policy) == ["a", "b"] and chosen.stored <= chosen.budget
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from keras_epitome import calibration, sampling, spec

# Candidate ratios tried per layer (those above 4x the target are dropped).
DEFAULT_CANDIDATES = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_MAX_SAMPLES = 512


@dataclasses.dataclass
class Candidate:
  """One way to store one layer: a ratio (``None``: stock) and what it costs."""

  ratio: Optional[float]
  stored: int
  output_error: float


@dataclasses.dataclass
class Allocation:
  """What :func:`allocate` measured and chose.

  Attributes:
    compression: the target ratio the budget comes from.
    budget: stored numbers the uniform conversion at ``compression`` gives
      the allocated layers (epitomes plus routing maps; kernels of layers it
      could not convert).
    stored: what the chosen ratios store in those layers (``<= budget``).
    policy: ``{layer name: ratio or None (stock)}``, an ``epitomize`` policy.
    candidates: per layer, every measured :class:`Candidate`.
    uniform_error: sum of the output errors of the uniform conversion.
    error: the same sum for the chosen ratios (``<= uniform_error``).
  """

  compression: float
  budget: int
  stored: int
  policy: Dict[str, Optional[float]]
  candidates: Dict[str, List[Candidate]]
  uniform_error: float
  error: float

  def __str__(self) -> str:
    lines = [
      f"allocate: {len(self.policy)} layer(s), {self.stored:,} stored numbers "
      f"(uniform {self.compression:g}x: {self.budget:,}); summed output error "
      f"{self.error:.4f} (uniform {self.uniform_error:.4f})"
    ]
    for name, ratio in self.policy.items():
      row = ", ".join(
        f"{'stock' if c.ratio is None else f'{c.ratio:g}x'} "
        f"{c.stored:,}/{c.output_error:.4f}"
        for c in self.candidates[name]
      )
      chosen = "stock" if ratio is None else f"{ratio:g}x"
      lines.append(f"  {name}: {chosen}   [{row}]")
    return "\n".join(lines)


def _relative_error(out, ref) -> float:
  out = np.concatenate([np.reshape(o, (len(o), -1)) for o in out], axis=1)
  ref = np.concatenate([np.reshape(r, (len(r), -1)) for r in ref], axis=1)
  spread = float(np.sum((ref - ref.mean(0)) ** 2))
  return float(np.sum((out - ref) ** 2)) / max(spread, 1e-30)


def choose(
  candidates: Dict[str, Sequence[Candidate]], budget: float
) -> Tuple[Dict[str, Candidate], float]:
  """The one-candidate-per-layer choice of least summed error within ``budget``.

  Exact: a dynamic programme over the Pareto front (stored size, error) of the
  layers seen so far.

  Returns:
    ``({layer: candidate}, summed error)``.

  Raises:
    ValueError: if no choice fits the budget.
  """
  front: List[Tuple[int, float, Tuple[Candidate, ...]]] = [(0, 0.0, ())]
  for name in candidates:
    merged = sorted(
      (
        (size + c.stored, err + c.output_error, picks + (c,))
        for size, err, picks in front
        for c in candidates[name]
        if size + c.stored <= budget
      ),
      key=lambda s: (s[0], s[1]),
    )
    front = []
    for state in merged:  # keep the states no smaller state beats
      if not front or state[1] < front[-1][1]:
        front.append(state)
    if not front:
      raise ValueError(
        f"allocate: no choice of ratios fits {budget:,.0f} stored numbers"
      )
  _, err, picks = min(front, key=lambda s: (s[1], s[0]))
  return dict(zip(candidates, picks, strict=True)), err


def plan(
  model,
  compression: float,
  calibration_data,
  *,
  convert: Callable,
  candidates: Optional[Sequence[float]] = None,
  skip: Sequence[str] = (),
  min_params: int,
  max_samples: int = DEFAULT_MAX_SAMPLES,
  verbose: bool = True,
  **epitome_args,
) -> Allocation:
  """What :func:`keras_epitome.allocate` does, with ``convert`` its ``epitomize``.

  ``convert`` is :func:`keras_epitome.transform.epitomize` (passed in: the
  transform module calls this one for ``epitomize(allocate=True)``). The
  other arguments are :func:`keras_epitome.allocate`'s.
  """
  compression = spec.check_compression(compression)
  if candidates is None:
    candidates = [c for c in DEFAULT_CANDIDATES if c <= 4 * compression]
  ratios = []
  for c in candidates:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1:
      raise ValueError(
        f"allocate: candidate ratios must be numbers > 1, got {c!r} in "
        f"{list(candidates)!r}"
      )
    ratios.append(float(c))
  ratios = sorted(set(ratios) | {compression})
  x = calibration.calibration_array(
    calibration_data, model, max_samples, log=logging.info
  )
  kwargs = dict(min_params=min_params, verbose=False, **epitome_args)
  # Only which layers convert and their geometry are read: no kernel fit.
  uniform = convert(model, compression, skip=skip, init="random", **kwargs)
  # Layers inside nested models keep ``compression`` (calibration fits the
  # top-level layers only) and are not part of the budget.
  top = {la.name for la in model.layers}
  names = [c.name for c in uniform.epitome_report.converted if c.name in top]
  ref = model.predict(x, verbose=0)
  ref = ref if isinstance(ref, list) else [ref]
  verbosity = logging.get_verbosity()
  table: Dict[str, List[Candidate]] = {}
  budget = 0
  for name in names:
    kernel_shape = tuple(int(d) for d in model.get_layer(name).kernel.shape)
    size = math.prod(kernel_shape)
    rows = [Candidate(None, size, 0.0)]
    others = [n for n in names if n != name] + list(skip)
    for ratio in ratios:
      try:
        sampling.layer_geometry(kernel_shape, compression=ratio)
      except ValueError:  # the ratio is too large for this kernel
        continue
      logging.set_verbosity(logging.WARNING)  # one report per trial is noise
      try:
        trial = convert(
          model,
          ratio,
          skip=others,
          calibration_data=x,
          calibration=calibration.CalibrationConfig(
            max_samples=max_samples, output_check="off"
          ),
          **kwargs,
        )
      finally:
        logging.set_verbosity(verbosity)
      g = trial.get_layer(name).epitome_geometry
      out = trial.predict(x, verbose=0)
      out = out if isinstance(out, list) else [out]
      rows.append(Candidate(ratio, g.stored_size, _relative_error(out, ref)))
    table[name] = rows
    budget += uniform.get_layer(name).epitome_geometry.stored_size
  picks, error = choose(table, budget)
  uniform_error = sum(
    next(c.output_error for c in table[n] if c.ratio == compression) for n in names
  )
  result = Allocation(
    compression=compression,
    budget=budget,
    stored=sum(c.stored for c in picks.values()),
    policy={n: picks[n].ratio for n in names},
    candidates=table,
    uniform_error=uniform_error,
    error=error,
  )
  if verbose:
    print(result)
  else:
    logging.info("%s", result)
  return result
