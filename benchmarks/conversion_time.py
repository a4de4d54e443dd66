"""Wall time of the data-aware conversion of stock Keras application models.

``ke.epitomize(model, 4, calibration_data=x)`` on untrained (``weights=None``)
MobileNetV2 (alpha 0.35), EfficientNetB0 and ResNet50V2 at 64x64 with 10
classes, on random images (the time does not depend on what the weights or
images are). Prints a table and appends one JSON row per model to
``--out``, with the commit, the machine's CPU count and load, and the
conversion's own check of its output (error and top-1 agreement against the
original model on the calibration images).

Usage (one core: ``taskset -c 1``)::

  PYTHONPATH=. python benchmarks/conversion_time.py --images=256
  PYTHONPATH=. python benchmarks/conversion_time.py --models=resnet50v2 --images=64 \\
      --profile=/tmp/resnet.prof     # then: python -m pstats /tmp/resnet.prof
"""

from __future__ import annotations

import cProfile
import json
import os
import time

import numpy as np
from absl import app, flags, logging

import keras_epitome as ke
from benchmarks import harness

keras = ke.keras

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "models", "mobilenetv2,efficientnetb0,resnet50v2", "Models to convert."
)
flags.DEFINE_integer("images", 256, "Calibration images.")
flags.DEFINE_integer("size", 64, "Image height and width.")
flags.DEFINE_float("ratio", 4.0, "Compression ratio.")
flags.DEFINE_string(
  "out", "benchmarks/results/conversion_time.jsonl", "JSONL file to append to."
)
flags.DEFINE_string("profile", "", "Write a cProfile of the conversions here.")
flags.DEFINE_bool("progress", True, "Log each layer's fit (absl INFO).")

APPLICATIONS = {
  # name: (constructor, keyword arguments, input range)
  "mobilenetv2": (keras.applications.MobileNetV2, dict(alpha=0.35), (-1.0, 1.0)),
  "efficientnetb0": (keras.applications.EfficientNetB0, {}, (0.0, 255.0)),
  "resnet50v2": (keras.applications.ResNet50V2, {}, (-1.0, 1.0)),
}


def convert(name: str) -> dict:
  build, kwargs, (low, high) = APPLICATIONS[name]
  keras.utils.set_random_seed(0)
  shape = (FLAGS.size, FLAGS.size, 3)
  model = build(weights=None, input_shape=shape, classes=10, **kwargs)
  x = np.random.default_rng(0).uniform(low, high, (FLAGS.images, *shape))
  x = x.astype("float32")
  start = time.perf_counter()
  small = ke.epitomize(model, FLAGS.ratio, calibration_data=x, verbose=False)
  seconds = time.perf_counter() - start
  report = small.epitome_report
  check = report.calibration[-1]
  fitted = [c for c in report.calibration if c.seconds is not None]
  slowest = max(fitted, key=lambda c: c.seconds)
  return dict(
    model=name,
    size=FLAGS.size,
    images=FLAGS.images,
    ratio=FLAGS.ratio,
    layers=len(model.layers),
    fitted_layers=len(fitted),
    converted_layers=len(report.converted),
    seconds=round(seconds, 1),
    fit_seconds=round(sum(c.seconds for c in fitted), 1),
    slowest_layer=f"{slowest.name} {slowest.seconds:.1f} s",
    output_error=check.block_error,
    check=check.note,
    commit=COMMIT,
    cpus=os.cpu_count(),
    affinity=len(os.sched_getaffinity(0)),
    load=os.getloadavg()[0],
  )


COMMIT = "?"


def main(argv):
  del argv
  global COMMIT
  COMMIT = harness.git_commit()  # the code that ran, not HEAD when a row is written
  if FLAGS.progress:
    logging.set_verbosity(logging.INFO)
  profile = cProfile.Profile() if FLAGS.profile else None
  rows = []
  for name in FLAGS.models:
    if profile:
      profile.enable()
    row = convert(name)
    if profile:
      profile.disable()
    rows.append(row)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(row) + "\n")
  if profile:
    profile.dump_stats(FLAGS.profile)
  print(
    f"\n{'model':16s} {'images':>6s} {'layers':>6s} {'fitted':>6s} {'seconds':>8s}  "
    "output error  slowest layer"
  )
  for r in rows:
    print(
      f"{r['model']:16s} {r['images']:6d} {r['layers']:6d} {r['fitted_layers']:6d} "
      f"{r['seconds']:8.1f}  {r['output_error']:12.3g}  {r['slowest_layer']}"
    )


if __name__ == "__main__":
  app.run(main)
