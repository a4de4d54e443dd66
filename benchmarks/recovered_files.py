r"""Files and LiteRT speed of recovered models, against stock and pruning.

``file_sizes.py`` exports the *converted* Fashion-MNIST models. This script
exports models as a user ships them after the recovery: the ``.keras``
files that ``epitome_pruning.py --save_dir`` writes (an epitome model alone,
or pruned epitomes, stripped of the pruning wrappers), in the smallest form
(``remix="slices"``, ``sparse=True`` when the model has zeros) and in the
default form (``remix="auto"``: per layer the fastest on LiteRT). Against,
in the same run: the trained model, and the trained model magnitude-pruned
to the ``--ratio`` conversion's per-layer budget (non-zeros only, and with a
bitmask: ``common.prune_spec``) in TFLite's sparse format. Each file's raw
and zipped bytes, multiply-adds, top-1 agreement with its Keras model on
1,000 test images, and LiteRT latency (batch 1, XNNPACK, the files invoked
in turn, median over ``--iterations``). A pruned file carries a
``DENSIFY`` op that expands its weights when LiteRT prepares the model: it
runs at the stock model's speed.

Usage:
  python -m benchmarks.recovered_files --allocate --calibration_size=16384 \
      --output_steps=16000 --ratio=8 --models=/tmp/models/r8_b8_bitmask_hard_s0.keras
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

import keras_epitome as ke
from benchmarks import file_sizes  # its file_row (and its --ratios flag, unused here)
from benchmarks import recovery_recipes as R  # also defines the shared flags

C = R.C
FLAGS = flags.FLAGS
flags.DEFINE_list("models", [], "Saved recovered models (.keras).")
flags.DEFINE_integer("iterations", 2000, "Timed invokes of each file.")
flags.DEFINE_integer("warmup", 200, "Untimed invokes of each file first.")
flags.DEFINE_integer("threads", 1, "LiteRT threads.")


def main(argv):
  del argv
  stock, converted, _, (xt, _) = R.converted_model()
  x = xt[:1000]
  files = {"stock": (C.tflite_bytes(stock)[0], stock)}
  for positions in ("none", "bitmask"):
    pruned = C.magnitude_prune(stock, C.prune_spec(converted, positions))
    files[f"pruning ({positions}), sparse format"] = (
      C.tflite_bytes(pruned, sparse=True)[0],
      pruned,
    )
  for path in FLAGS.models:
    model = ke.keras.models.load_model(path)
    name = os.path.basename(path)
    zeros = any(
      np.mean(C.pruned_weight(layer).numpy() == 0) > 0.1
      for layer in model.layers
      if hasattr(layer, "epitome") or hasattr(layer, "kernel")
    )
    files[f"{name}, slices"] = (
      ke.export_tflite(model, remix="slices", sparse=zeros),
      model,
    )
    files[f"{name}, auto"] = (ke.export_tflite(model), model)
  ms = C.litert_latencies(
    {k: data for k, (data, _) in files.items()},
    FLAGS.threads,
    FLAGS.iterations,
    FLAGS.warmup,
    x[:1],
  )
  rows = []
  for name, (data, model) in files.items():
    report = ke.tflite_tensor_report(data)
    row = dict(
      ratio=FLAGS.ratio,
      **file_sizes.file_row(name, data, model, x),
      macs=report["conv_macs"] + report["elementwise_muls"],
      ms=ms[name],
      threads=FLAGS.threads,
    )
    rows.append(row)
    C.emit_row(row, FLAGS.out)
  stock_ms = rows[0]["ms"]
  table = [
    {
      "file": r["file"],
      "bytes": f"{r['bytes']:,}",
      "zipped": f"{r['zipped']:,}",
      "MACs": f"{r['macs']:,}",
      "ms": f"{r['ms']:.3f}",
      "vs stock": f"{r['ms'] / stock_ms:.2f}",
      "top-1 agreement": f"{100 * r['agree']:.1f}",
    }
    for r in rows
  ]
  print(C.format_table(table, list(table[0])))


if __name__ == "__main__":
  app.run(main)
