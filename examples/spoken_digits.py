r"""Spoken digits from raw 8 kHz audio: stock, WSNet fixed sampling and NES.

The Free Spoken Digit Dataset (3,000 recordings of the digits 0-9, six
speakers, 8 kHz WAV) is read from ``--data_dir`` (a clone of
https://github.com/Jakobovski/free-spoken-digit-dataset, folder
``recordings``) and split the customary way: recordings 0-4 of every speaker
and digit are the test set (300), the rest train (2,700).

The model is a WSNet-style 1D CNN on raw waveforms: a long strided first
filter bank (80 taps, stride 4), three 3-tap convolutions, BatchNorm, max
pooling and global average pooling. It is trained

* stock;
* with WSNet's fixed sampling (``sampler="fixed"``): the first layer's 32
  filters are windows of one condensed filter (``Cout_E = 1``,
  ``S_E = 80 + 31 * stride``), the other layers tile channels;
* with NES learned sampling (``sampler="learned"``), same epitome shapes,
  routing map trained (``--learners=param,feature`` for both learners);

all with the same schedule. A table of accuracy, stored parameters, MACs and
``.tflite`` sizes (factored form) follows; the files go to ``--out``.

Usage (three to five minutes on two CPU cores):
  python examples/spoken_digits.py
  python examples/spoken_digits.py --data_dir=free-spoken-digit-dataset/recordings
  python examples/spoken_digits.py --compression=8 --epochs=20 --learners=param,feature
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import models as M  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "data_dir",
  os.path.join(M.REPO_ROOT, "..", "shared", "data", "fsdd", "recordings"),
  "Folder of FSDD WAV files ({digit}_{speaker}_{index}.wav).",
)
flags.DEFINE_integer("length", 8000, "Samples per recording (crop/pad), 8000 = 1 s.")
flags.DEFINE_integer("epochs", 10, "Training epochs (each model).")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam peak learning rate, cosine decay to 0.")
flags.DEFINE_float("compression", 4.0, "Compression ratio of the epitome layers.")
flags.DEFINE_list("learners", ["param"], "NES learners to train: param, feature.")
flags.DEFINE_float("offset_scale", 1.0, "offset_scale of the NES layers.")
flags.DEFINE_string("out", "example_output", "Folder for the .tflite files.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
  del argv
  try:
    data = datasets.load_fsdd(FLAGS.data_dir, length=FLAGS.length)
  except FileNotFoundError as e:
    sys.exit(f"{e}\nPass the folder with --data_dir.")
  (x, _), (xt, yt) = data
  print(f"FSDD: {len(x)} training, {len(xt)} test recordings of {x.shape[1]} samples")
  for learner in FLAGS.learners:
    if learner not in ("param", "feature"):
      sys.exit(f"--learners: unknown learner {learner!r}; valid: param, feature")
  methods = ["stock", "wsnet"] + [f"nes_{lr}" for lr in FLAGS.learners]
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for method in methods:
    ratio = 1.0 if method == "stock" else FLAGS.compression
    M.keras.utils.set_random_seed(FLAGS.seed)
    model = M.audio_cnn(
      length=FLAGS.length,
      make=M.conv_factory(method, ratio, offset_scale=FLAGS.offset_scale),
      ratio=ratio,
    )
    print(f"\n== {method} (x{ratio:g}): training {FLAGS.epochs} epochs")
    if method != "stock":
      for layer in model.layers:
        if hasattr(layer, "epitome_geometry"):
          g = layer.epitome_geometry
          print(
            f"  {layer.name}: kernel {g.kernel_shape} from epitome "
            f"{g.epitome_shape}, ratio {g.compression_ratio:.2f}"
          )
    acc = M.train(
      model,
      data,
      epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate,
    )
    path = os.path.join(FLAGS.out, f"fsdd_{method}.tflite")
    rows.append(M.export_and_report(model, f"{method} x{ratio:g}", path, acc, xt, yt))
  print()
  print(M.format_table(rows, list(rows[0].keys())))


if __name__ == "__main__":
  app.run(main)
