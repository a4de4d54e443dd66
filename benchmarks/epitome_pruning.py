r"""Epitome and pruning together, against each alone, at the same stored size.

From the trained Fashion-MNIST CNN of ``pretrained.py``: the data-aware
conversion at ``--base_ratio`` (cached, as ``recovery_recipes.py`` caches
it), its epitomes pruned with ``ke.prune_epitomes`` (mask by magnitude at
the first step, then kept) so that every layer stores no more 32-bit words
(non-zeros, their positions by ``--positions``, routing map) than the
data-aware conversion at ``--ratio`` stores in that layer
(``ke.sparsity_for_size`` with those per-layer words: the budget of the
pruning rows of ``pretrained.py --allocate``), then ``--epochs`` of
``ke.distill`` from the trained model. A layer the base conversion keeps
stock and the ``--ratio`` conversion does not is pruned as a stock kernel.
One row per recovery seed. With ``--base_ratio`` equal to ``--ratio`` the
conversion is recovered unpruned (the epitome model alone). With
``--harden`` the conversion's routing maps are fixed first
(``ke.harden_routing``): the data-aware conversion's offsets are integers,
so this changes nothing at the start, but the recovery then cannot move
them off the integers, and the exported file has no blend ops.

Usage:
  python -m benchmarks.epitome_pruning --ratio=4 --base_ratio=2 --allocate \
      --calibration_size=16384 --output_steps=16000 --seeds=0,1,2
  python -m benchmarks.epitome_pruning --ratio=8 --base_ratio=4 --allocate \
      --calibration_size=16384 --output_steps=16000 --tflite
  python -m benchmarks.epitome_pruning --ratio=8 --base_ratio=8 --allocate \
      --calibration_size=16384 --output_steps=16000 --harden --tflite
"""

from __future__ import annotations

import os
import time

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from absl import app, flags

import keras_epitome as ke  # noqa: E402
from benchmarks import harness as C  # noqa: E402
from benchmarks import recovery_recipes as R  # noqa: E402  (its flags: ratio, allocate, cache...)
from keras_epitome import walk  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_float("base_ratio", 2.0, "Compression of the conversion that is pruned.")
flags.DEFINE_enum(
  "positions",
  "bitmask",
  list(ke.pruning.POSITION_BITS),
  "How the non-zeros' positions are charged (ke.sparsity_for_size).",
)
flags.DEFINE_list("seeds", ["0"], "Recovery shuffles, one row each.")
flags.DEFINE_integer("epochs", 1, "Epochs of ke.distill.")
flags.DEFINE_float("recovery_lr", 0.0, "ke.distill's learning_rate (0: its default).")
flags.DEFINE_bool(
  "tflite",
  False,
  "Also export each recovered model (ke.export_tflite(remix='slices', "
  "sparse=True when pruned)) and record its bytes, zipped bytes and top-1 agreement "
  "with the Keras model on 1,000 test images; and the same export without "
  "sparse=True (bytes, zipped).",
)
flags.DEFINE_string(
  "save_dir", "", "Optional folder: each recovered model saved as a .keras file."
)
flags.DEFINE_bool(
  "harden",
  False,
  "ke.harden_routing the conversion before pruning and recovery (integer, "
  "fixed routing maps).",
)


def main(argv):
  del argv
  ratio = FLAGS.ratio
  stock, target, (xr, _), test = R.converted_model()
  FLAGS.ratio = FLAGS.base_ratio
  _, base, _, _ = R.converted_model()
  FLAGS.ratio = ratio
  words = C.epitome_words(target)
  prune = FLAGS.base_ratio != ratio
  spec = ke.sparsity_for_size(base, words, positions=FLAGS.positions) if prune else {}
  if FLAGS.harden:
    change = {}
    base = ke.harden_routing(base, report=change)
    print(f"hardened: relative kernel change {change}", flush=True)
  acc_base, acc_target = C.evaluate(base, test), C.evaluate(target, test)
  print(
    f"stock {C.evaluate(stock, test):.4f}; converted at {FLAGS.base_ratio:g}x "
    f"{acc_base:.4f}, at {ratio:g}x {acc_target:.4f}; words {words}; "
    f"sparsity {spec}",
    flush=True,
  )
  for seed in FLAGS.seeds:
    ke.keras.utils.set_random_seed(int(seed))
    if prune:
      pruned = ke.prune_epitomes(base, spec)
    else:  # a fresh copy of the conversion for each shuffle
      pruned = walk.clone_model(base, lambda layer: None, "epitome_pruning")
    t0 = time.time()
    ke.distill(
      pruned,
      stock,
      xr,
      epochs=FLAGS.epochs,
      learning_rate=FLAGS.recovery_lr or None,
      batch_size=FLAGS.batch_size,
      verbose=0,
    )
    model = tfmot.sparsity.keras.strip_pruning(pruned)
    stored = {}
    for name, budget in words.items():
      weight = C.pruned_weight(model.get_layer(name))
      stored[name] = dict(
        budget=budget,
        nonzeros=int(np.count_nonzero(weight.numpy())),
        entries=int(np.prod(weight.shape)),
      )
    files = {}
    if FLAGS.tflite:
      x = test[0][:1000]
      data = ke.export_tflite(model, remix="slices", sparse=prune)
      agree = np.mean(
        np.argmax(C.run_tflite(data, x), -1)
        == np.argmax(model.predict(x, verbose=0), -1)
      )
      dense = ke.export_tflite(model, remix="slices")
      files = dict(
        tflite_bytes=len(data),
        tflite_zipped=C.zipped_size(data),
        tflite_agree=agree,
        tflite_dense_bytes=len(dense),
        tflite_dense_zipped=C.zipped_size(dense),
      )
    if FLAGS.save_dir:
      os.makedirs(FLAGS.save_dir, exist_ok=True)
      model.save(
        os.path.join(
          FLAGS.save_dir,
          f"r{ratio:g}_b{FLAGS.base_ratio:g}_{FLAGS.positions}"
          f"{'_hard' if FLAGS.harden else ''}_s{seed}.keras",
        )
      )
    row = dict(
      ratio=ratio,
      base_ratio=FLAGS.base_ratio,
      allocate=FLAGS.allocate,
      calibration_size=FLAGS.calibration_size,
      output_steps=FLAGS.output_steps,
      positions=FLAGS.positions,
      harden=FLAGS.harden,
      epochs=FLAGS.epochs,
      recovery_lr=FLAGS.recovery_lr,
      seed=int(seed),
      stored=stored,
      acc_base=acc_base,
      acc_target=acc_target,
      acc=C.evaluate(model, test),
      seconds=round(time.time() - t0, 1),
      **files,
    )
    C.emit_row(row, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
