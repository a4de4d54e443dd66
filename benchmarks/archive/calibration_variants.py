r"""Variants of the data-aware conversion, measured right after conversion.

Converts the trained Fashion-MNIST CNN of ``benchmarks/pretrained.py`` (from
its cache; train it first with that script) with
``ke.epitomize(model, r, calibration_data=x_cal, calibration_options=...)``
and prints, per ratio, the test accuracy on the first 5,000 test images (the
half used to choose between variants), on the other 5,000 (not used to
choose) and on all 10,000, with the conversion's seconds and each fitted
layer's errors (least squares; block or output error before and after the
gradient steps). The calibration images are the ones ``pretrained.py`` draws
(the first ``--calibration_size`` of a seeded permutation of the training
set). One JSON line per ratio, also appended to ``--out`` if given.

Usage:
  python -m benchmarks.archive.calibration_variants                       # least squares
  python -m benchmarks.archive.calibration_variants \
      --options='{"reconstruct_steps": 300, "output_steps": 500}'
  python -m benchmarks.archive.calibration_variants --calibration_size=2048 \
      --options='{"output_steps": 4000}' --ratios=2,4
"""

from __future__ import annotations

import datetime
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
flags.DEFINE_list("ratios", ["2", "4", "8"], "Compression ratios.")
flags.DEFINE_string("options", "{}", "calibration_options, as JSON.")
flags.DEFINE_integer("calibration_size", 1024, "Calibration images (training set).")
flags.DEFINE_string(
  "weights",
  "/tmp/ke_pretrained/fashion_mnist_n60000_e12_s0.weights.h5",
  "The trained model's weights (benchmarks/pretrained.py's cache).",
)
flags.DEFINE_integer("seed", 0, "The seed of pretrained.py (calibration draw).")
flags.DEFINE_string("out", "", "JSON lines file to append to (optional).")


def main(argv):
  del argv
  options = json.loads(FLAGS.options)
  (x, _), (xt, yt) = datasets.load_fashion_mnist(download=False)
  stock = C.fashion_cnn()
  stock.load_weights(FLAGS.weights)
  rng = np.random.default_rng(FLAGS.seed + 1)  # as pretrained.py
  x_cal = x[rng.permutation(len(x))[: FLAGS.calibration_size]]
  halves = {
    "acc_choose": (xt[:5000], yt[:5000]),
    "acc_held": (xt[5000:], yt[5000:]),
    "acc_test": (xt, yt),
  }
  print("stock", {k: round(C.evaluate(stock, v), 4) for k, v in halves.items()})
  for ratio in (float(r) for r in FLAGS.ratios):
    keras.utils.set_random_seed(FLAGS.seed)
    t0 = time.time()
    model = ke.epitomize(
      stock,
      ratio,
      calibration_data=x_cal,
      calibration_options=options,
      verbose=False,
    )
    row = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      options=options,
      calibration_size=len(x_cal),
      ratio=ratio,
      convert_s=round(time.time() - t0, 1),
      load=os.getloadavg()[0],
    )
    row.update({k: round(C.evaluate(model, v), 4) for k, v in halves.items()})
    row["calibration"] = [
      [c.name, c.output_error, c.block_error_before, c.block_error]
      for c in model.epitome_report.calibration
    ]
    line = json.dumps(row)
    print(line, flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
