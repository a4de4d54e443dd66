r"""Training step time of the same epitome layer on Keras 2, Keras 3 (TensorFlow) and Keras 3 (JAX).

Question: does moving to Keras 3 cost training speed? Target (issue 25): a
train step on Keras 3, TensorFlow or JAX backend, costs no more than 1.1x the
Keras 2 step of the same layer.

Each case is a one-layer model (the epitome layer and a mean-squared loss), at
4x, trained with SGD by ``model.fit`` on batches already in memory; the time
per step is the median over ``--repeats`` timed epochs of ``--steps`` steps
each, after one untimed epoch (tracing, compilation). Keras 2 and Keras 3 on
TensorFlow run in this process, interleaved repeat by repeat; Keras 3 on JAX
runs in a child process (the Keras backend is fixed per process) between two
Keras 2 brackets, and its ratio is taken against the mean of the brackets.

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
  """Times ``--steps`` fit steps of one model (one untimed epoch first)."""

  def __init__(self, keras, ke, case, batch, steps):
    self.model, x, y = _model(keras, ke, case, batch)
    self.x = np.concatenate([x] * steps)
    self.y = np.concatenate([y] * steps)
    self.batch, self.steps = batch, steps
    self.epoch()

  def epoch(self) -> float:
    start = time.perf_counter()
    self.model.fit(
      self.x, self.y, batch_size=self.batch, epochs=1, shuffle=False, verbose=0
    )
    return (time.perf_counter() - start) / self.steps


def child(args) -> None:
  """The JAX side: prints one JSON line of per-repeat step times."""
  import keras

  import keras_epitome.keras3 as ke3

  timer = Timer(keras, ke3, args["case"], args["batch"], args["steps"])
  times = [timer.epoch() for _ in range(args["repeats"])]
  print(json.dumps({"backend": keras.backend.backend(), "times": times}))


def main() -> None:
  from absl import flags

  flags.DEFINE_list("cases", list(CASES), "Cases to run.")
  flags.DEFINE_integer("batch", 32, "Batch size.")
  flags.DEFINE_integer("steps", 20, "Steps per timed epoch.")
  flags.DEFINE_integer("repeats", 7, "Timed epochs per model.")
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
  rows = []
  for case in FLAGS.cases:
    k2 = Timer(ke2.keras, ke2, case, FLAGS.batch, FLAGS.steps)
    k3 = Timer(keras, ke3, case, FLAGS.batch, FLAGS.steps)
    t2, t3 = [], []
    for _ in range(FLAGS.repeats):  # interleaved
      t2.append(k2.epoch())
      t3.append(k3.epoch())
    args = dict(case=case, batch=FLAGS.batch, steps=FLAGS.steps, repeats=FLAGS.repeats)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    done = subprocess.run(
      [
        sys.executable,
        "-m",
        "benchmarks.keras3_train_step",
        "--child",
        json.dumps(args),
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
    )
    if done.returncode:
      raise RuntimeError(done.stderr[-3000:])
    tj = json.loads(done.stdout.strip().splitlines()[-1])["times"]
    t2_after = [k2.epoch() for _ in range(FLAGS.repeats)]  # the second bracket
    k2_ms = 1e3 * float(np.median(t2))
    k2_bracket_ms = 1e3 * float(np.median(t2 + t2_after))
    row = dict(
      case=case,
      batch=FLAGS.batch,
      keras2_ms=round(k2_ms, 3),
      keras3_tf_ms=round(1e3 * float(np.median(t3)), 3),
      keras3_jax_ms=round(1e3 * float(np.median(tj)), 3),
      keras2_bracket_ms=round(k2_bracket_ms, 3),
      commit=commit,
      machine=platform.processor() or platform.machine(),
      cores=os.cpu_count(),
    )
    row["tf_ratio"] = round(row["keras3_tf_ms"] / k2_ms, 3)
    row["jax_ratio"] = round(row["keras3_jax_ms"] / k2_bracket_ms, 3)
    rows.append(row)
    harness.emit_row(row, FLAGS.out)
  print()
  print(
    "| case | Keras 2 ms/step | Keras 3 TF ms/step (ratio) | Keras 3 JAX ms/step (ratio) |"
  )
  print("|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['case']} | {r['keras2_ms']:.2f} | {r['keras3_tf_ms']:.2f} ({r['tf_ratio']:.2f}x) "
      f"| {r['keras3_jax_ms']:.2f} ({r['jax_ratio']:.2f}x) |"
    )


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    child(json.loads(sys.argv[2]))
  else:
    main()
