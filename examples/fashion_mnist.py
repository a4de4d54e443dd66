r"""Fashion-MNIST: a small CNN trained stock and with epitome layers, then exported.

Builds the same four-convolution CNN (3x3 convolutions, BatchNorm, ReLU) twice:
once with stock ``Conv2D`` layers and once with ``ke.EpitomeConv2D`` layers
(``compression=--compression``, NES learned sampling by default), trains both
with the same schedule, and prints test accuracy, stored parameters,
multiply-adds and the size of each ``.tflite`` file (the epitome model in its
factored form, whose convolutions run on the epitome itself). The ``.tflite``
files are written to ``--out``.

Keras 3 (``import keras`` with :mod:`keras_epitome.keras3`) by default;
``--keras=2`` runs the same job on Keras 2 (``tf_keras``).

Usage (about two minutes on two CPU cores):
  python examples/fashion_mnist.py
  python examples/fashion_mnist.py --keras=2
  python examples/fashion_mnist.py --train_size=0 --epochs=10 --compression=8
  python examples/fashion_mnist.py --dataset=digits   # needs no download
  python examples/fashion_mnist.py --sampler=fixed    # WSNet sampling

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), the Keras cache, or downloaded by
Keras. Where none of these works (a fresh machine without network), the job
runs on scikit-learn's digits, which the install brings, and says so, with
the ways to get Fashion-MNIST (``--dataset=auto``, the default; see
:func:`datasets.select_image_data`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import models as M  # noqa: E402
import numpy as np  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "dataset",
  "auto",
  ["auto", "fashion_mnist", "digits"],
  "Data set: auto = Fashion-MNIST if found or downloadable, else digits.",
)
flags.DEFINE_string("data_dir", None, "Folder with the Fashion-MNIST IDX files.")
flags.DEFINE_integer("train_size", 20000, "Training images used (0 = all 60,000).")
flags.DEFINE_integer("epochs", 3, "Training epochs (each model).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam peak learning rate, cosine decay to 0.")
flags.DEFINE_float("compression", 4.0, "Compression ratio of the epitome layers.")
flags.DEFINE_enum(
  "sampler", "learned", ["learned", "fixed"], "NES (learned) or WSNet (fixed)."
)
flags.DEFINE_enum(
  "learner", "param", ["param", "feature"], "Offset learner (learned only)."
)
flags.DEFINE_bool(
  "spread_init", False, "Start from spread channel offsets (see models.py)."
)
flags.DEFINE_integer("tflite_eval", 1000, "Test images run through each .tflite file.")
flags.DEFINE_string("out", "example_output", "Folder for the .tflite files.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum(
  "keras",
  "3",
  ["3", "2"],
  "Keras 3 (import keras; keras_epitome.keras3) or Keras 2 (tf_keras).",
)


def main(argv):
  del argv
  M.use_keras(int(FLAGS.keras))
  data, dataset, note = datasets.select_image_data(FLAGS.dataset, FLAGS.data_dir)
  print(note)
  if dataset == "digits":
    epochs = max(FLAGS.epochs, 30)  # 1,347 images: more, shorter epochs
  else:
    (x, y), test = data
    if FLAGS.train_size:
      order = np.random.default_rng(0).permutation(len(x))[: FLAGS.train_size]
      x, y = x[order], y[order]
    data = (x, y), test
    epochs = FLAGS.epochs
  shape = data[0][0].shape[1:]
  print(
    f"{dataset}: {len(data[0][0])} training, {len(data[1][0])} test images; "
    f"Keras {M.keras.__version__} ({'keras_epitome.keras3' if FLAGS.keras == '3' else 'tf_keras'})"
  )

  method = "wsnet" if FLAGS.sampler == "fixed" else f"nes_{FLAGS.learner}"
  label = f"epitome x{FLAGS.compression:g} ({method})"
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for name, make in (
    ("stock", M.conv_factory("stock", 1)),
    (label, M.conv_factory(method, FLAGS.compression)),
  ):
    M.keras.utils.set_random_seed(FLAGS.seed)
    model = M.fashion_cnn(input_shape=shape, make=make)
    if name != "stock" and FLAGS.spread_init:
      M.spread_routing(model)
    print(f"\n== {name}: training {epochs} epochs")
    acc = M.train(
      model,
      data,
      epochs=epochs,
      batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate,
    )
    path = os.path.join(
      FLAGS.out, f"{dataset}_{'stock' if name == 'stock' else method}.tflite"
    )
    n = min(FLAGS.tflite_eval, len(data[1][0]))
    rows.append(
      M.export_and_report(model, name, path, acc, data[1][0][:n], data[1][1][:n])
    )
  print()
  print(M.format_table(rows, list(rows[0].keys())))
  print()
  print(note)


if __name__ == "__main__":
  app.run(main)
