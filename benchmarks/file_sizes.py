r"""Stored size in real files: the epitome model's ``.tflite`` against pruning's.

``pretrained.py`` compares the converted epitome model with TF-MOT pruning
"to the same stored size", counted in numbers (``--pruning_positions``:
non-zeros only, or with a bitmask or 16-bit indices for their positions).
This script checks those counts against the files a user ships, for the
cached Fashion-MNIST conversions of ``recovery_recipes.py`` (same flags):

* the epitome model exported with ``ke.export_tflite`` in three ways:
  ``remix="auto"`` (the default, speed first: each layer's fastest form,
  which may be its full kernel), ``objective="size"`` (each layer's form
  with the fewest estimated file bytes, whatever its latency) and
  ``remix="slices"`` (the slices form everywhere);
* the trained model magnitude-pruned to the same per-layer budget
  (``common.prune_spec``, non-zeros only and with a bitmask), as a dense
  ``.tflite`` (how TF-MOT's pruning guide ships it: the zipped size is what
  shrinks) and in TFLite's sparse tensor format
  (``Optimize.EXPERIMENTAL_SPARSITY``).

Each file's raw and zipped (deflate, as ``common.zipped_size``) bytes, the
bytes of its constant buffers (the weights and the ops' small constant
arguments) and of the rest (the graph: tensor and operator tables, tensor
names, signatures), and the agreement of its top class with the Keras model's on 1,000 test images
(a check that the file computes the model).

Usage:
  python benchmarks/file_sizes.py --allocate --ratios=2,4,8
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

import keras_epitome as ke
from benchmarks import recovery_recipes as R  # also defines the shared flags

C = R.C
FLAGS = flags.FLAGS
flags.DEFINE_list("ratios", ["2", "4", "8"], "Compression ratios (sets --ratio).")

EPITOME_EXPORTS = {
  "auto": {},
  "size": {"objective": "size"},
  "slices": {"remix": "slices"},
}


def _buffer_bytes(data) -> int:
  """Bytes of a ``.tflite`` file's constant buffers (weights and op arguments)."""
  from tensorflow.lite.tools import flatbuffer_utils

  model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
  return sum(0 if b.data is None else len(b.data) for b in model.buffers)


def file_row(name, data, model, x):
  """One table row: the file's bytes and its top-class agreement with ``model``."""
  agree = np.mean(
    np.argmax(C.run_tflite(data, x), -1) == np.argmax(model.predict(x, verbose=0), -1)
  )
  return {
    "file": name,
    "bytes": len(data),
    "zipped": C.zipped_size(data),
    "buffers": _buffer_bytes(data),
    "agree": agree,
  }


def _pruned_files(stock, spec, x, tag):
  pruned = C.magnitude_prune(stock, spec)
  dense, _ = C.tflite_bytes(pruned)
  sparse, _ = C.tflite_bytes(pruned, sparse=True)
  return [
    file_row(f"pruning ({tag}), dense", dense, pruned, x),
    file_row(f"pruning ({tag}), sparse format", sparse, pruned, x),
  ]


def main(argv):
  del argv
  rows = []
  for ratio in FLAGS.ratios:
    FLAGS.ratio = float(ratio)
    stock, model, _, (xt, _) = R.converted_model()
    x = xt[:1000]
    stored = C.stored_params(model)
    files = [
      file_row(
        f"epitome, {name}", ke.export_tflite(model, form="factored", **kw), model, x
      )
      for name, kw in EPITOME_EXPORTS.items()
    ]
    for positions in ("none", "bitmask"):
      files += _pruned_files(stock, C.prune_spec(model, positions), x, positions)
    stock_file, _ = C.tflite_bytes(stock)
    files.append(file_row("stock", stock_file, stock, x))
    for f in files:
      row = {"ratio": FLAGS.ratio, "stored_params": stored, **f}
      rows.append(row)
      if FLAGS.out:
        with open(FLAGS.out, "a") as out:
          out.write(json.dumps(row) + "\n")
  table = [
    {
      "ratio": f"{r['ratio']:g}x",
      "file": r["file"],
      "bytes": f"{r['bytes']:,}",
      "zipped": f"{r['zipped']:,}",
      "buffers": f"{r['buffers']:,}",
      "graph": f"{r['bytes'] - r['buffers']:,}",
      "top-1 agreement": f"{100 * r['agree']:.1f}",
    }
    for r in rows
  ]
  print(C.format_table(table, list(table[0])))


if __name__ == "__main__":
  app.run(main)
