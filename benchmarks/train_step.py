r"""Train-step time of each epitome layer against the same-shape stock layer.

One forward+backward+SGD step of a single layer, compiled with ``tf.function``
(with and without XLA). Stock and epitome steps alternate within one run
(``--reps`` rounds of ``--iters`` steps each, after a warm-up), and the table
reports the median time per step of each, so that load from other processes
hits both sides alike.

Epitome rows: ``kernel`` (``train_form="kernel"``: the full kernel sampled
every step, then the stock op) and ``auto`` (the default ``train_form="auto"``:
the plan of :mod:`keras_epitome.factored_training` with the lowest estimated
cost, printed in the last column; ``fold/fold`` is the kernel path).
"its convolution alone" times a stock layer with the channels of the ``auto``
plan's convolution (e.g. ``Cin_E -> Cout`` with a channel roll), without
remixes or sampling: the limit the factored path can reach on this machine.
``--plans`` adds one column per candidate plan (how the cost model's
constants were checked).

Usage:
  python -m benchmarks.train_step
  python -m benchmarks.train_step --shapes=conv3x3 --reps=5 \
      --learners=param --xla=false
  python -m benchmarks.train_step --learners=param --plans
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import keras_epitome as ke  # noqa: I001  (selects Keras 2 before TF is used)
from keras_epitome import factored_training as ft

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
flags.DEFINE_bool("plans", False, "Also time every candidate factored plan.")
flags.DEFINE_bool(
  "input_grad",
  False,
  "Also compute the gradient for the layer's input, as every layer but a "
  "network's first does (without it, a stock step skips its input-gradient "
  "convolution, which the factored plans' input remix still needs).",
)
flags.DEFINE_integer(
  "channel_roll", 1, "Epitome layers' channel_roll (1: the default; 0: separable map)."
)


def make_step(layer, x, jit_compile, plan=None):
  """A compiled SGD step on ``mean(layer(x)^2)`` (``plan``: force a factored plan)."""
  optimizer = keras.optimizers.SGD(1e-3)
  layer(x)  # build
  if plan is not None:
    layer.train_plan = lambda shape: plan
  optimizer.build(layer.trainable_variables)

  input_grad = FLAGS.input_grad

  @tf.function(jit_compile=jit_compile)
  def step():
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_mean(tf.square(y))
    variables = layer.trainable_variables
    if input_grad:  # as for every layer but a network's first
      dx, *grads = tape.gradient(loss, [x] + variables)
      loss = loss + 0.0 * tf.reduce_sum(dx)
    else:
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


def _plan_name(plan):
  return f"{plan.in_mode}/{plan.out_mode}"


def bench(shape_name, learner, xla):
  """Median ms per step of each variant, and the plan ``auto`` runs."""
  _, input_shape, (cls_name, kwargs) = SHAPES[shape_name]
  x = tf.constant(np.random.default_rng(0).standard_normal(input_shape), tf.float32)
  stock = getattr(keras.layers, cls_name)(**kwargs)
  epitome_cls = ke.layers.STOCK_TO_EPITOME[type(stock)]

  def epitome(form="auto"):
    return epitome_cls(
      **kwargs,
      compression=FLAGS.compression,
      learner=learner,
      train_form=form,
      channel_roll=FLAGS.channel_roll,
    )

  auto = epitome()
  steps = {
    "stock": make_step(stock, x, xla),
    "kernel": make_step(epitome("kernel"), x, xla),
    "auto": make_step(auto, x, xla),
  }
  plan = auto.train_plan(x.shape)
  # The measured limit of ``auto``'s plan: a stock layer with the plan's
  # convolution alone (its input and output channels), no remix, no sampling.
  cin_mid, cout_mid = ft.mid_channels(plan, auto.epitome_geometry)
  alone = dict(kwargs)
  alone["units" if cls_name == "Dense" else "filters"] = cout_mid
  steps["conv alone"] = make_step(
    getattr(keras.layers, cls_name)(**alone), x[..., :cin_mid], xla
  )
  if FLAGS.plans:
    for p in ft.candidate_plans(auto.epitome_geometry):
      if not p.is_kernel:
        steps[_plan_name(p)] = make_step(epitome(), x, xla, plan=p)
  for step in steps.values():
    for _ in range(FLAGS.warmup):
      step()
  times = {name: [] for name in steps}
  names = list(steps)
  for rep in range(FLAGS.reps):
    order = names[rep % len(names) :] + names[: rep % len(names)]
    for name in order:
      times[name].append(time_steps(steps[name], FLAGS.iters))
  ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  return ms, _plan_name(plan), auto.compression_ratio


def main(argv):
  del argv
  if FLAGS.threads:
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
  for name in FLAGS.shapes:
    if name not in SHAPES:
      raise app.UsageError(f"unknown shape {name!r}; valid: {list(SHAPES)}")
  header = (
    "| shape | learner | xla | stock ms | kernel ms (x stock) | auto ms (x stock) "
    "| auto plan | its convolution alone (x stock) |"
  )
  print(header)
  print("|---|---|---|---:|---:|---:|---|---:|")
  for name in FLAGS.shapes:
    for learner in FLAGS.learners:
      for xla in FLAGS.xla:
        jit = xla.lower() in ("1", "true", "yes")
        ms, plan, _ = bench(name, learner, jit)
        st = ms["stock"]
        row = (
          f"| {SHAPES[name][0]} | {learner} | {'yes' if jit else 'no'} | "
          f"{st:.2f} | {ms['kernel']:.2f} ({ms['kernel'] / st:.3f}) | "
          f"{ms['auto']:.2f} ({ms['auto'] / st:.3f}) | {plan} | "
          f"{ms['conv alone']:.2f} ({ms['conv alone'] / st:.3f}) |"
        )
        extra = [k for k in ms if k not in ("stock", "kernel", "auto", "conv alone")]
        if extra:
          row += " " + ", ".join(f"{k} {ms[k] / st:.2f}" for k in extra)
        print(row, flush=True)
  print(
    f"\ncompression={FLAGS.compression:g}, reps={FLAGS.reps}, "
    f"iters={FLAGS.iters}, warmup={FLAGS.warmup}; ratios = ms / stock ms "
    "(medians, measured interleaved in one process)"
  )


if __name__ == "__main__":
  app.run(main)
