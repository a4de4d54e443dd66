r"""The same epitome ResNet exported from Keras 3 and from Keras 2: file bytes and LiteRT latency.

Question: does a Keras 3 model export to the same file as Keras 2? Target
(issue 25): bytes and LiteRT latency within 3% of the Keras 2 export of the
same model. Builds a functional ResNet (stem, ``--blocks`` residual blocks of
two 3x3 convolutions with BatchNorm, global pooling, classifier) at width
``--width`` in both Keras versions, converts both with ``epitomize`` at
``--compression`` (Keras 3's weights copied into the Keras 2 model), exports
both (``export_tflite``, default form, the bundled cost model so both make the
same choices; float and int8) and times them with LiteRT, interleaved, one
thread, batch 1.

Usage (from the repository root):
  python -m benchmarks.keras3_export
  python -m benchmarks.keras3_export --width=64 --iterations=2000

Prints a table and appends rows to ``benchmarks/results/keras3_export.jsonl``.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_integer("width", 64, "Channels of the ResNet.")
flags.DEFINE_integer("blocks", 2, "Residual blocks.")
flags.DEFINE_integer("size", 32, "Input height and width.")
flags.DEFINE_float("compression", 4.0, "Compression of the epitome layers.")
flags.DEFINE_integer("iterations", 1000, "Timed invokes per file.")
flags.DEFINE_string(
  "out",
  os.path.join(ROOT, "benchmarks", "results", "keras3_export.jsonl"),
  "Rows file.",
)


def resnet(k, width, blocks, size):
  layers = k.layers
  inp = k.Input((size, size, 3))
  x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inp)
  x = layers.BatchNormalization(name="stem_bn")(x)
  x = layers.ReLU(name="stem_relu")(x)
  for b in range(blocks):
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"b{b}_conv1")(x)
    y = layers.BatchNormalization(name=f"b{b}_bn1")(y)
    y = layers.ReLU(name=f"b{b}_relu1")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"b{b}_conv2")(y)
    y = layers.BatchNormalization(name=f"b{b}_bn2")(y)
    x = layers.ReLU(name=f"b{b}_relu2")(layers.Add(name=f"b{b}_add")([x, y]))
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  return k.Model(inp, layers.Dense(10, name="logits")(x))


def main(argv):
  del argv
  import keras

  import keras_epitome as ke2
  import keras_epitome.keras3 as ke3
  from benchmarks import harness

  rng = np.random.default_rng(0)
  k3 = ke3.epitomize(
    resnet(keras, FLAGS.width, FLAGS.blocks, FLAGS.size),
    FLAGS.compression,
    verbose=False,
  )
  for layer in k3.layers:  # BatchNorm statistics that are not the identity
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(size=n).astype("float32") * 0.1)
      layer.moving_variance.assign(1.0 + rng.random(n).astype("float32"))
  k2 = ke2.epitomize(
    resnet(ke2.keras, FLAGS.width, FLAGS.blocks, FLAGS.size),
    FLAGS.compression,
    init="random",
    verbose=False,
  )
  for l2, l3 in zip(k2.layers, k3.layers, strict=True):
    l2.set_weights([np.asarray(w) for w in l3.get_weights()])
  x = rng.random((1, FLAGS.size, FLAGS.size, 3)).astype("float32")
  data = rng.random((32, FLAGS.size, FLAGS.size, 3)).astype("float32")
  commit = harness.git_commit()
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  rows = []
  for quantize in (None, "int8"):
    kw = dict(batch_size=1, cost_model="bundled", quantize=quantize)
    if quantize:
      kw["representative_data"] = data
    files = {
      "keras2": ke2.export_tflite(k2, **kw),
      "keras3": ke3.export_tflite(k3, **kw),
    }
    ms = harness.litert_latencies(files, 1, FLAGS.iterations, 50, x)
    y = {name: ke2.run_tflite(f, x) for name, f in files.items()}
    row = dict(
      width=FLAGS.width,
      blocks=FLAGS.blocks,
      size=FLAGS.size,
      compression=FLAGS.compression,
      precision=quantize or "float",
      keras2_bytes=len(files["keras2"]),
      keras3_bytes=len(files["keras3"]),
      bytes_ratio=round(len(files["keras3"]) / len(files["keras2"]), 4),
      keras2_ms=round(ms["keras2"], 4),
      keras3_ms=round(ms["keras3"], 4),
      latency_ratio=round(ms["keras3"] / ms["keras2"], 4),
      max_output_diff=float(np.abs(y["keras3"] - y["keras2"]).max()),
      commit=commit,
      machine=platform.processor() or platform.machine(),
    )
    rows.append(row)
    harness.emit_row(row, FLAGS.out)
  print()
  print(
    "| precision | Keras 2 bytes | Keras 3 bytes (ratio) | Keras 2 ms | Keras 3 ms (ratio) |"
  )
  print("|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['precision']} | {r['keras2_bytes']:,} | {r['keras3_bytes']:,} "
      f"({r['bytes_ratio']:.3f}x) | {r['keras2_ms']:.3f} | {r['keras3_ms']:.3f} "
      f"({r['latency_ratio']:.3f}x) |"
    )


if __name__ == "__main__":
  sys.exit(app.run(main))
