r"""Training step time of the same epitome layer on Keras 2 and on Keras 3 (TensorFlow, JAX, PyTorch).

Question: does moving to Keras 3 cost training speed? Target (issue 25): a
train step on Keras 3, TensorFlow or JAX backend, costs no more than 1.1x the
Keras 2 step of the same layer (PyTorch is measured too, without a target).

Each case is a one-layer model (the epitome layer and a mean-squared loss), at
4x, trained with SGD by ``model.fit`` on batches already in memory; a step's
time is a timed epoch of ``--steps`` steps over ``--steps``, after one
untimed epoch (tracing, compilation). An epoch ends synchronized (JAX
dispatches asynchronously), and it includes fit's per-epoch setup, which on
TensorFlow varies by a few hundred milliseconds from epoch to epoch: the
default of 100 steps makes that a few percent. The Keras backend is fixed per
process, so Keras 2 and Keras 3 on TensorFlow run in this process and Keras 3
on JAX (and on PyTorch, where torch is installed) in child processes that
wait for an "epoch" line and answer with its time. Every repeat times one
epoch of each back to back (after a short pause, so that no idle thread pool
still spins), and a backend's ratio is the median over repeats of its epoch
time over the Keras 2 epoch of the same repeat: pairs seconds apart, so the
machine's slow drifts cancel.

Usage (from the repository root):
  python -m benchmarks.keras3_train_step
  python -m benchmarks.keras3_train_step --cases=conv2d --repeats=5

Prints a table and appends its rows to
``benchmarks/results/keras3_train_step.jsonl``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

CASES = {
  # name: (layer, stock args, input shape without the batch)
  "conv2d": (
    "EpitomeConv2D",
    dict(filters=64, kernel_size=3, padding="same"),
    (16, 16, 64),
  ),
  "conv1d": (
    "EpitomeConv1D",
    dict(filters=64, kernel_size=9, padding="same"),
    (256, 64),
  ),
  "dense": ("EpitomeDense", dict(units=1024), (1024,)),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(keras, ke, case, batch):
  cls, args, shape = CASES[case]
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [keras.Input(shape), getattr(ke, cls)(**args, compression=4.0)]
  )
  model.compile(keras.optimizers.SGD(0.01), "mse")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch,) + shape).astype("float32")
  y = np.asarray(model.predict(x[:1], verbose=0))
  y = rng.standard_normal((batch,) + y.shape[1:]).astype("float32")
  return model, x, y


class Timer:
  """Times ``steps`` fit steps of one model (one untimed epoch first)."""

  def __init__(self, keras, ke, case, batch, steps):
    self.model, x, y = _model(keras, ke, case, batch)
    self.x = np.concatenate([x] * steps)
    self.y = np.concatenate([y] * steps)
    self.batch, self.steps = batch, steps
    self.epoch()

  def epoch(self) -> float:
    """One epoch's time per step."""
    start = time.perf_counter()
    self.model.fit(
      self.x, self.y, batch_size=self.batch, epochs=1, shuffle=False, verbose=0
    )
    return (time.perf_counter() - start) / self.steps


def serve(args) -> None:
  """A child process on this process's Keras 3 backend: one epoch per "epoch" line read."""
  import keras

  import keras_epitome.keras3 as ke3

  timer = Timer(keras, ke3, args["case"], args["batch"], args["steps"])
  print(json.dumps({"ready": keras.backend.backend()}), flush=True)
  for line in sys.stdin:
    if line.strip() != "epoch":
      break
    print(json.dumps({"time": timer.epoch()}), flush=True)


class Child:
  """A :func:`serve` process on ``backend``, timing one epoch per :meth:`epoch` call."""

  def __init__(self, backend: str, args: dict):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    self.backend = backend
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.keras3_train_step", "--serve", json.dumps(args)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
      cwd=ROOT,
    )
    ready = self._read()
    if ready.get("ready") != backend:
      raise RuntimeError(f"the {backend} child started on {ready}")

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"the {self.backend} child exited ({self.proc.wait()})")
      if line.startswith("{"):
        return json.loads(line)

  def epoch(self) -> float:
    self.proc.stdin.write("epoch\n")
    self.proc.stdin.flush()
    return self._read()["time"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def _has(module: str) -> bool:
  import importlib.util

  return importlib.util.find_spec(module) is not None


def main() -> None:
  from absl import flags

  flags.DEFINE_list("cases", list(CASES), "Cases to run.")
  flags.DEFINE_integer("batch", 32, "Batch size.")
  flags.DEFINE_integer("steps", 100, "Steps per timed epoch.")
  flags.DEFINE_integer("repeats", 11, "Timed epochs per model.")
  flags.DEFINE_list(
    "backends", ["jax", "torch"], "Keras 3 backends besides TensorFlow (where installed)."
  )
  flags.DEFINE_float("pause", 0.5, "Seconds of idle before each timed epoch.")
  flags.DEFINE_string(
    "out",
    os.path.join(ROOT, "benchmarks", "results", "keras3_train_step.jsonl"),
    "Rows.",
  )
  FLAGS = flags.FLAGS
  FLAGS(sys.argv)

  import keras

  import keras_epitome as ke2
  import keras_epitome.keras3 as ke3
  from benchmarks import harness

  commit = harness.git_commit()
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  backends = [b for b in ("jax", "torch") if b in FLAGS.backends and _has(b)]
  rows = []
  for case in FLAGS.cases:
    args = dict(case=case, batch=FLAGS.batch, steps=FLAGS.steps)
    timers = {
      "keras2": Timer(ke2.keras, ke2, case, FLAGS.batch, FLAGS.steps),
      "tensorflow": Timer(keras, ke3, case, FLAGS.batch, FLAGS.steps),
    }
    children = [Child(b, args) for b in backends]
    timers.update({c.backend: c for c in children})
    times = {name: [] for name in timers}
    for _ in range(FLAGS.repeats):  # one epoch of each, back to back
      for name, timer in timers.items():
        # Idle thread pools spin for a while after work (TensorFlow's, XLA's,
        # PyTorch's OpenMP); a pause keeps one backend's spinning out of the
        # next one's epoch.
        time.sleep(FLAGS.pause)
        times[name].append(timer.epoch())
    for c in children:
      c.close()
    k2 = 1e3 * np.asarray(times["keras2"])
    row = dict(
      case=case,
      batch=FLAGS.batch,
      steps=FLAGS.steps,
      repeats=FLAGS.repeats,
      keras2_ms=round(float(np.median(k2)), 3),
      commit=commit,
      machine=platform.processor() or platform.machine(),
      cores=os.cpu_count(),
    )
    for name in timers:
      if name == "keras2":
        continue
      t = 1e3 * np.asarray(times[name])
      row[f"keras3_{name}_ms"] = round(float(np.median(t)), 3)
      row[f"{name}_ratio"] = round(float(np.median(t / k2)), 3)
    row["step_ms"] = {
      name: [round(1e3 * v, 2) for v in values] for name, values in times.items()
    }
    rows.append(row)
    harness.emit_row(row, FLAGS.out)
  names = ["tensorflow"] + backends
  table = [
    {
      "case": r["case"],
      "Keras 2 ms/step": f"{r['keras2_ms']:.2f}",
      **{
        f"Keras 3 {n} ms/step (ratio)": f"{r[f'keras3_{n}_ms']:.2f} ({r[f'{n}_ratio']:.2f}x)"
        for n in names
      },
    }
    for r in rows
  ]
  print()
  print(harness.format_table(table, list(table[0])))


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
  else:
    main()
