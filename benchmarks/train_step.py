r"""Train-step time of each epitome layer against the same-shape stock layer.

One forward+backward+SGD step of a single layer, compiled with ``tf.function``
(with and without XLA). Stock and epitome steps alternate within one run
(``--reps`` rounds of ``--iters`` steps each, after a warm-up), and the table
reports the median time per step of each, so that load from other processes
hits both sides alike.

Usage:
  PYTHONPATH=. python benchmarks/train_step.py
  PYTHONPATH=. python benchmarks/train_step.py --shapes=conv3x3 --reps=5 \
      --learners=param --xla=false
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import keras_epitome as ke  # noqa: I001  (selects Keras 2 before TF is used)

keras = ke.keras

# name: (description, input shape incl. batch, stock layer factory kwargs)
SHAPES = {
  "conv3x3": (
    "Conv2D 3x3 64->64, 32x32, batch 32",
    (32, 32, 32, 64),
    ("Conv2D", dict(filters=64, kernel_size=3, padding="same")),
  ),
  "conv1x1": (
    "Conv2D 1x1 256->256, 16x16, batch 32",
    (32, 16, 16, 256),
    ("Conv2D", dict(filters=256, kernel_size=1)),
  ),
  "conv1d": (
    "Conv1D 64-tap 16->32 stride 4, 8000 samples, batch 8",
    (8, 8000, 16),
    ("Conv1D", dict(filters=32, kernel_size=64, strides=4, padding="same")),
  ),
  "dense": (
    "Dense 1024->1024, batch 64",
    (64, 1024),
    ("Dense", dict(units=1024)),
  ),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to run, from {list(SHAPES)}.")
flags.DEFINE_list("learners", ["param", "feature"], "Offset learners to run.")
flags.DEFINE_list("xla", ["false", "true"], "jit_compile settings to run.")
flags.DEFINE_float("compression", 4.0, "Compression ratio of the epitome layers.")
flags.DEFINE_integer("reps", 9, "Alternating rounds (the median is reported).")
flags.DEFINE_integer("iters", 3, "Train steps per round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.")
flags.DEFINE_integer("threads", 0, "intra-op threads (0: TensorFlow's default).")


def make_step(layer, x, jit_compile):
  """A compiled SGD step on ``mean(layer(x)^2)``."""
  optimizer = keras.optimizers.SGD(1e-3)
  layer(x)  # build
  optimizer.build(layer.trainable_variables)

  @tf.function(jit_compile=jit_compile)
  def step():
    with tf.GradientTape() as tape:
      y = layer(x, training=True)
      loss = tf.reduce_mean(tf.square(y))
    variables = layer.trainable_variables
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return loss

  return step


def time_steps(step, iters):
  start = time.perf_counter()
  for _ in range(iters):
    loss = step()
  loss.numpy()  # wait for the last step
  return (time.perf_counter() - start) / iters


def bench(shape_name, learner, xla):
  _, input_shape, (cls_name, kwargs) = SHAPES[shape_name]
  x = tf.constant(np.random.default_rng(0).standard_normal(input_shape), tf.float32)
  stock = getattr(keras.layers, cls_name)(**kwargs)
  epitome = ke.layers.STOCK_TO_EPITOME[type(stock)](
    **kwargs, compression=FLAGS.compression, learner=learner
  )
  steps = {
    "stock": make_step(stock, x, xla),
    "epitome": make_step(epitome, x, xla),
  }
  for step in steps.values():
    for _ in range(FLAGS.warmup):
      step()
  times = {"stock": [], "epitome": []}
  for rep in range(FLAGS.reps):
    order = ("stock", "epitome") if rep % 2 == 0 else ("epitome", "stock")
    for name in order:
      times[name].append(time_steps(steps[name], FLAGS.iters))
  stock_ms = 1e3 * statistics.median(times["stock"])
  epitome_ms = 1e3 * statistics.median(times["epitome"])
  return stock_ms, epitome_ms, epitome.compression_ratio


def main(argv):
  del argv
  if FLAGS.threads:
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
  for name in FLAGS.shapes:
    if name not in SHAPES:
      raise app.UsageError(f"unknown shape {name!r}; valid: {list(SHAPES)}")
  rows = []
  header = "| shape | learner | xla | stock ms | epitome ms | ratio |"
  print(header)
  print("|---|---|---|---:|---:|---:|")
  for name in FLAGS.shapes:
    for learner in FLAGS.learners:
      for xla in FLAGS.xla:
        jit = xla.lower() in ("1", "true", "yes")
        stock_ms, epitome_ms, compression = bench(name, learner, jit)
        row = (
          f"| {SHAPES[name][0]} | {learner} | {'yes' if jit else 'no'} | "
          f"{stock_ms:.2f} | {epitome_ms:.2f} | {epitome_ms / stock_ms:.3f} |"
        )
        rows.append(row)
        print(row, flush=True)
  print(
    f"\ncompression={FLAGS.compression:g}, reps={FLAGS.reps}, "
    f"iters={FLAGS.iters}, warmup={FLAGS.warmup}; "
    "ratio = epitome ms / stock ms (medians)"
  )


if __name__ == "__main__":
  app.run(main)
