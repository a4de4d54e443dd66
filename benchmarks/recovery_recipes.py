r"""Recovery recipes from one data-aware conversion of a trained model.

``benchmarks/pretrained.py`` converts the trained model once per ratio and
recovers it with one recipe. This script converts once (and caches the
converted weights), then runs every recipe in ``--recipes`` from that same
converted model, one epoch over all training images unless a recipe says
otherwise, and prints the test accuracy of each: to choose ``ke.distill``'s
temperature and learning rate without paying for the conversion each time.
Same trained model, calibration images and recovery order as
``pretrained.py`` (Fashion-MNIST).

A recipe is a JSON object: ``mode`` (``"distill"``, default, or ``"labels"``
for a label fine-tune), ``epochs`` (default 1), ``labels`` (distill with the
labels mixed in by ``alpha``) and any ``ke.distill`` keyword
(``learning_rate``, ``temperature``, ``alpha``); ``seed`` reseeds the
recovery's shuffle only (default ``--seed``).

Usage:
  python -m benchmarks.recovery_recipes --ratio=4 \
      --recipes='{"learning_rate":1e-3,"temperature":4}' \
      --recipes='{"learning_rate":3e-3,"temperature":1}'
  python -m benchmarks.recovery_recipes --ratio=4 --allocate --recipes='{}'
  python -m benchmarks.recovery_recipes --ratio=4 \
      --policy='{"conv2": 2, "conv3": 3, "conv4": {"epitome_shape": [3, 3, 64, 10]}}'
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np  # noqa: E402
from absl import app, flags

import keras_epitome as ke  # noqa: E402
from benchmarks import harness as C  # noqa: E402
from examples import datasets  # noqa: E402

keras = ke.keras

FLAGS = flags.FLAGS
flags.DEFINE_float("ratio", 4.0, "Compression ratio.")
flags.DEFINE_bool("allocate", False, "epitomize(allocate=True).")
flags.DEFINE_string(
  "policy",
  "",
  'JSON epitomize policy, e.g. \'{"conv4": {"epitome_shape": [3,3,64,10]}}\'.',
)
flags.DEFINE_multi_string("recipes", ["{}"], "JSON recipe; repeat the flag.")
flags.DEFINE_integer("pretrain_epochs", 12, "Epochs of the cached stock model.")
flags.DEFINE_integer("calibration_size", 2048, "Calibration images.")
flags.DEFINE_integer("output_steps", 4000, "calibrate(output_steps=).")
flags.DEFINE_integer("batch_size", 128, "Batch size of recovery.")
flags.DEFINE_string("cache", "/tmp/ke_pretrained", "Folder of the trained model.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", "", "Optional JSON-lines file, one row per recipe.")
flags.DEFINE_integer(
  "trace_every",
  0,
  "Record the accuracy on the first 2,000 test images every this many "
  "recovery steps (row key 'trace'; 0: off).",
)


def converted_model():
  """The trained model, its data-aware conversion (cached) and the data.

  Returns:
    ``(stock, model, (xr, yr), (xt, yt))``: recovery images and labels in
    ``pretrained.py``'s order, and the test set.
  """
  (x, y), (xt, yt) = datasets.load_fashion_mnist(download=False)
  tag = f"fashion_mnist_n{len(x)}_e{FLAGS.pretrain_epochs}_s{FLAGS.seed}"
  path = os.path.join(FLAGS.cache, tag + ".weights.h5")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: train the stock model first with "
      f"benchmarks/pretrained.py --ratios= --pretrain_epochs={FLAGS.pretrain_epochs}"
    )
  stock = C.fashion_cnn()
  stock.load_weights(path)
  rng = np.random.default_rng(FLAGS.seed + 1)  # pretrained.py's draws
  x_cal = x[rng.permutation(len(x))[: FLAGS.calibration_size]]
  order = rng.permutation(len(x))
  xr, yr = x[order], y[order]
  policy = json.loads(FLAGS.policy) if FLAGS.policy else None
  policy_tag = ""
  if policy:
    policy_tag = "_p" + hashlib.sha1(FLAGS.policy.encode()).hexdigest()[:8]
  converted_path = os.path.join(
    FLAGS.cache,
    f"{tag}_r{FLAGS.ratio:g}_c{FLAGS.calibration_size}_o{FLAGS.output_steps}"
    f"{'_alloc' if FLAGS.allocate else ''}{policy_tag}.converted.weights.h5",
  )
  keras.utils.set_random_seed(FLAGS.seed)
  keep_all = dict(max_samples=len(x_cal))  # calibrate's default keeps 2,048
  cal_options = dict(output_steps=FLAGS.output_steps, batch_size=64, **keep_all)
  if os.path.exists(converted_path):
    # The architecture again (cheap: least squares only), then the weights.
    model = ke.epitomize(
      stock,
      FLAGS.ratio,
      policy=policy,
      calibration_data=x_cal,
      calibration_options=keep_all,
      allocate=FLAGS.allocate,
      verbose=False,
    )
    model.load_weights(converted_path)
  else:
    model = ke.epitomize(
      stock,
      FLAGS.ratio,
      calibration_data=x_cal,
      calibration_options=cal_options,
      policy=policy,
      allocate=FLAGS.allocate,
      verbose=True,
    )
    model.save_weights(converted_path)
  return stock, model, (xr, yr), (xt, yt)


def report(model, student, test, acc_0, t0, **row):
  """Prints (and appends to ``--out``) one JSON row: the student's test accuracy."""
  row = dict(
    ratio=FLAGS.ratio,
    allocate=FLAGS.allocate,
    calibration_size=FLAGS.calibration_size,
    output_steps=FLAGS.output_steps,
    stored_params=C.stored_params(model),
    **row,
    acc_0=acc_0,
    acc=C.evaluate(student, test),
    seconds=round(time.time() - t0, 1),
  )
  C.emit_row(row, FLAGS.out)


def main(argv):
  del argv
  stock, model, (xr, yr), (xt, yt) = converted_model()
  acc_0 = C.evaluate(model, (xt, yt))
  print(f"stock {C.evaluate(stock, (xt, yt)):.4f}; converted {acc_0:.4f}", flush=True)
  for text in FLAGS.recipes:
    recipe = json.loads(text)
    epochs = recipe.pop("epochs", 1)
    mode = recipe.pop("mode", "distill")
    keras.utils.set_random_seed(recipe.pop("seed", FLAGS.seed))
    student = keras.models.clone_model(model)
    student.set_weights(model.get_weights())
    t0 = time.time()
    callbacks, extra = [], {}
    if FLAGS.trace_every:
      trace = C.AccuracyTrace(student, (xt[:2000], yt[:2000]), FLAGS.trace_every)
      callbacks, extra = [trace], dict(trace=trace.trace)
    if mode == "distill":
      data = (xr, yr) if recipe.pop("labels", False) else xr
      ke.distill(
        student,
        stock,
        data,
        epochs=epochs,
        batch_size=FLAGS.batch_size,
        verbose=0,
        callbacks=callbacks,
        **recipe,
      )
    elif mode == "labels":
      lr = recipe.pop("learning_rate", 3e-3)
      steps = epochs * -(-len(xr) // FLAGS.batch_size)
      student.compile(
        optimizer=keras.optimizers.Adam(
          keras.optimizers.schedules.CosineDecay(lr, steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      )
      student.fit(
        xr,
        yr,
        batch_size=FLAGS.batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=callbacks,
      )
    else:
      raise ValueError(f"recipe {text}: mode must be 'distill' or 'labels'")
    report(
      model, student, (xt, yt), acc_0, t0, policy=FLAGS.policy, recipe=text, **extra
    )


if __name__ == "__main__":
  app.run(main)
