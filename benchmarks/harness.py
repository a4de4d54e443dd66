"""The benchmarks' shared measurement harness.

Run the benchmarks from the repository root as modules
(``python -m benchmarks.pretrained ...``); they import this file as
``from benchmarks import harness as C``.

The models, the counting rules (stored parameters, MACs), the training loop
and the TFLite export report are the examples' (``examples/models.py``) and
are re-exported here, so every benchmark and example counts the same way.
This module adds what only the measurements need: the thinner and pruning
baselines, per-layer budgets, accuracy traces, file and latency helpers, and
the JSON-lines row output.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import time
import zipfile
from typing import Callable, Dict

import numpy as np

from examples.models import (  # noqa: F401  (re-exported for the benchmarks)
  EPITOME_METHODS,
  METHODS,
  REPO_ROOT,
  _layers,
  audio_cnn,
  conv_factory,
  evaluate,
  export_and_report,
  fashion_cnn,
  format_table,
  ke,
  keras,
  macs,
  run_tflite,
  spread_routing,
  stored_params,
  tflite_bytes,
  time_shift,
  train,
  wsnet_first_filter_shape,
)


def epitome_ratios(model: keras.Model) -> Dict[str, float]:
  return {
    layer.name: layer.compression_ratio
    for layer in _layers(model)
    if isinstance(layer, ke.EPITOME_LAYERS)
  }


def routing_snapshot(model: keras.Model) -> Dict[str, tuple]:
  """Every epitome layer's inference routing map, as NumPy arrays."""
  return {
    layer.name: tuple(np.array(a, np.float64) for a in layer.routing_map)
    for layer in _layers(model)
    if isinstance(layer, ke.EPITOME_LAYERS)
  }


def offset_moves(before, after, model: keras.Model) -> Dict[str, float]:
  """Mean |final - initial| offset over all layers: channels (circular) and taps."""
  chan, spatial = [], []
  for layer in _layers(model):
    if layer.name not in before:
      continue
    g = layer.epitome_geometry
    (i0, o0, s0), (i1, o1, s1) = before[layer.name], after[layer.name]
    for a, b, size in ((i0, i1, g.cin_e), (o0, o1, g.cout_e)):
      d = np.mod(b - a, size)
      chan += list(np.minimum(d, size - d))
    for d in g.slack_axes:
      spatial += list(np.abs(s1[:, d] - s0[:, d]))
  return {
    "channel": float(np.mean(chan)) if chan else 0.0,
    "spatial": float(np.mean(spatial)) if spatial else 0.0,
  }


class AccuracyTrace(keras.callbacks.Callback):
  """Test accuracy (inference mode) every ``every`` training steps, and at the end.

  ``trace`` holds ``[step, accuracy, training loss]`` rows (the loss as
  Keras logs it: the mean over the epoch so far), step 0 being the model
  before its first update (under TF-MOT pruning: before the first mask is
  applied, i.e. the unpruned model); ``model`` is the one to evaluate
  (the student inside a distillation, whose callbacks see a wrapper).
  """

  def __init__(self, model, test, every: int):
    super().__init__()
    self.student, self.test, self.every = model, test, int(every)
    self.trace = [[0, self.accuracy(), None]]
    self.step = 0

  def accuracy(self) -> float:
    return evaluate(self.student, self.test)

  def on_train_batch_end(self, batch, logs=None):
    self.step += 1
    if self.step % self.every == 0:
      loss = (logs or {}).get("loss")
      loss = None if loss is None else round(float(loss), 4)
      self.trace.append([self.step, self.accuracy(), loss])


def thinner_width(build: Callable, target_params: int) -> float:
  """Width multiplier whose stock model has closest to ``target_params``.

  Parameters grow with width, so bisect on a 0.005 grid, then pick the closer
  of the two neighbours.
  """
  grid = np.round(np.arange(0.01, 1.0001, 0.005), 4)
  lo, hi = 0, len(grid) - 1  # invariant: params(grid[lo]) <= target (or lo == 0)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if stored_params(build(width=float(grid[mid]))) <= target_params:
      lo = mid
    else:
      hi = mid
  candidates = [float(grid[lo]), float(grid[hi])]
  return min(
    candidates, key=lambda w: abs(stored_params(build(width=w)) - target_params)
  )


# Bits a sparse kernel stores for its non-zeros' positions, ``(per kernel
# entry, per non-zero)``; the values are 32-bit floats, as an epitome's.
POSITION_BITS = {"none": (0, 0), "bitmask": (1, 0), "index16": (0, 16)}


def prune_spec(epitome_model: keras.Model, positions: str = "none") -> Dict[str, float]:
  """Per-layer target sparsity giving the epitome model's per-layer storage.

  With ``positions="none"`` a pruned kernel keeps as many non-zeros as the
  epitome layer stores numbers (epitome and routing map). With
  ``"bitmask"`` (1 bit per kernel entry) or ``"index16"`` (16 bits per
  non-zero) the non-zeros and their positions together take no more 32-bit
  words than the epitome layer: ``nnz * (32 + per_nonzero) + entries *
  per_entry <= 32 * stored``.
  """
  if positions not in POSITION_BITS:
    raise ValueError(f"positions={positions!r}; valid: {', '.join(POSITION_BITS)}")
  per_entry, per_nonzero = POSITION_BITS[positions]
  spec = {}
  for layer in _layers(epitome_model):
    if isinstance(layer, ke.EPITOME_LAYERS):
      g = layer.epitome_geometry
      nnz = (32 * g.stored_size - per_entry * g.kernel_size) / (32 + per_nonzero)
      spec[layer.name] = float(min(1.0, max(0.0, 1.0 - nnz / g.kernel_size)))
  return spec


def epitome_words(model: keras.Model) -> Dict[str, int]:
  """``{layer name: stored 32-bit words}`` of each epitome layer (epitome and routing map).

  The per-layer budget that pruning, alone or on epitomes, is held to.
  """
  return {
    layer.name: layer.epitome_geometry.stored_size
    for layer in model.layers
    if isinstance(layer, ke.EPITOME_LAYERS)
  }


def git_commit() -> str:
  """The repository's short HEAD commit (the code a benchmark ran), or ``"unknown"``."""
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def emit_row(row: Dict, path: str = "") -> None:
  """Prints one JSON row and, given a ``path``, appends it there (JSON lines)."""
  print(json.dumps(row), flush=True)
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


def pruned_weight(layer):
  """The weight pruning sparsifies: an epitome layer's epitome, else the kernel."""
  return layer.epitome if isinstance(layer, ke.EPITOME_LAYERS) else layer.kernel


def magnitude_prune(model: keras.Model, sparsity: Dict[str, float]) -> keras.Model:
  """A copy of ``model`` with each named layer's smallest weights zeroed.

  The kernel's, or an epitome layer's epitome's (what TF-MOT prunes there).
  """
  pruned = keras.models.clone_model(model)
  pruned.set_weights(model.get_weights())
  for layer in pruned.layers:
    if layer.name in sparsity:
      weight = pruned_weight(layer)
      k = weight.numpy()
      drop = int(round(sparsity[layer.name] * k.size))
      if drop:
        cut = np.sort(np.abs(k).reshape(-1))[drop - 1]
        k = np.where(np.abs(k) <= cut, 0.0, k)
      weight.assign(k)
  return pruned


def prune_and_train(
  stock_model: keras.Model,
  sparsity: Dict[str, float],
  data,
  *,
  epochs: int,
  batch_size: int,
  learning_rate: float = 3e-3,
  verbose: int = 1,
):
  """TF-MOT magnitude pruning of the named layers, same schedule as the rest.

  Sparsity ramps up polynomially from 0 over the first two thirds of training
  (TF-MOT's ``PolynomialDecay``) and is held for the last third.

  Returns:
    ``(accuracy, stripped_model)``.
  """
  import tensorflow_model_optimization as tfmot

  steps_per_epoch = math.ceil(len(data[0][0]) / batch_size)
  end_step = max(1, int(epochs * steps_per_epoch * 2 / 3))

  def clone(layer):
    if layer.name in sparsity:
      schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=sparsity[layer.name],
        begin_step=0,
        end_step=end_step,
        frequency=max(1, steps_per_epoch // 10),
      )
      return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
    return layer

  pruned = keras.models.clone_model(stock_model, clone_function=clone)
  acc = train(
    pruned,
    data,
    epochs=epochs,
    batch_size=batch_size,
    learning_rate=learning_rate,
    verbose=verbose,
    callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
  )
  return acc, pruned


def strip_pruning(model):
  import tensorflow_model_optimization as tfmot

  return tfmot.sparsity.keras.strip_pruning(model)


def zipped_size(data: bytes) -> int:
  """Bytes after zip (deflate), as TF-MOT's pruning guide compares models."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("model.tflite", data)
  return len(buf.getvalue())


def litert_latencies(files, threads, iterations, warmup, x, statistic=np.median):
  """ms per invoke of each file (``statistic`` over invokes), measured interleaved."""
  runners = {name: ke.export.LiteRTRunner(b, threads) for name, b in files.items()}
  for name, runner in runners.items():
    runner.set_inputs(x[name] if isinstance(x, dict) else x)
    for _ in range(warmup):
      runner.invoke()
  times = {name: [] for name in runners}
  names = list(runners)
  for i in range(iterations):
    order = names[i % len(names) :] + names[: i % len(names)]
    for name in order:
      start = time.perf_counter()
      runners[name].invoke()
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(statistic(t)) for name, t in times.items()}


class Timer:
  def __enter__(self):
    self.start = time.time()
    return self

  def __exit__(self, *exc):
    self.seconds = time.time() - self.start
