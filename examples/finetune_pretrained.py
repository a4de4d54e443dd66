r"""From a trained CNN to a compact epitome model and back to stock layers.

The workflow of :func:`keras_epitome.epitomize` on scikit-learn's 8x8 digits
(ships with scikit-learn, needs no download), with the best path measured in
``benchmarks/pretrained.py``:

1. train a small stock CNN;
2. ``ke.epitomize(model, compression, calibration_data=x[:512],
   allocate=True, calibration_options=dict(output_steps=1000))``: the
   stored-size budget of a uniform ``compression`` is spread over the layers
   where the model's output is least sensitive (:mod:`keras_epitome.allocation`;
   a layer may stay stock), every converted ``Conv2D``/``Dense`` becomes an
   epitome layer fitted to reproduce the trained layer's outputs on 512
   training images (data-aware conversion, :mod:`keras_epitome.calibration`),
   then all fitted layers take 1,000 Adam steps towards the trained model's
   logits on the same images (no labels);
3. ``ke.summarize``: kernels, epitomes, stored parameters, multiply-adds;
4. ``ke.harden_routing(small)`` (``--harden``, the default): the routing
   maps stay at the conversion's integer offsets, so the exported file
   needs no blend ops; then ``ke.distill(small, model, x)``: a short
   recovery with the trained model as teacher (no labels needed);
5. ``ke.strip_epitome``: back to stock layers with the materialized kernels
   (same outputs), ready for any tool that expects stock layers.

For comparison (``--compare_weight_fit``) the older path: the closed-form
fit of the trained kernels (``init="fit"``) and a label fine-tune of the same
length. Optionally TF-MOT pruning of the epitomes (``--prune_sparsity=0.5``)
and quantization-aware fine-tuning (``--qat``). Prints one table at the end.

Usage (about a minute on two CPU cores):
  python examples/finetune_pretrained.py
  python examples/finetune_pretrained.py --compression=8 --finetune_epochs=10
  python examples/finetune_pretrained.py --prune_sparsity=0.5 --qat
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import numpy as np  # noqa: E402

import keras_epitome as ke  # noqa: E402

keras = ke.keras

FLAGS = flags.FLAGS
flags.DEFINE_float("compression", 4.0, "Compression ratio of each converted layer.")
flags.DEFINE_integer("min_params", 1024, "Kernels smaller than this stay stock.")
flags.DEFINE_enum("sampler", "learned", ["learned", "fixed"], "Epitome sampler.")
flags.DEFINE_enum("learner", "param", ["param", "feature"], "Offset learner.")
flags.DEFINE_integer("pretrain_epochs", 15, "Epochs of the stock model.")
flags.DEFINE_integer("calibration_size", 512, "Images for the data-aware fit.")
flags.DEFINE_integer(
  "output_steps",
  1000,
  "Adam steps of the conversion towards the trained model's outputs (0: none).",
)
flags.DEFINE_bool(
  "allocate", True, "Choose each layer's ratio from the data (same total size)."
)
flags.DEFINE_bool(
  "harden",
  True,
  "ke.harden_routing after the conversion: the routing maps stay at the "
  "conversion's integer offsets through the recovery (no blend ops in an "
  "exported file).",
)
flags.DEFINE_integer("finetune_epochs", 3, "Epochs of each recovery.")
flags.DEFINE_float(
  "finetune_lr",
  0.0,
  "Peak Adam learning rate of the distillation (cosine decay); 0: ke.distill's "
  "default for the run's length (1e-3 under 300 steps, as here).",
)
flags.DEFINE_float("weight_fit_lr", 2e-3, "Adam learning rate of the label fine-tune.")
flags.DEFINE_bool(
  "compare_weight_fit", True, "Also run init='fit' + a label fine-tune."
)
flags.DEFINE_float("prune_sparsity", 0.0, "If > 0: prune the epitomes (TF-MOT).")
flags.DEFINE_bool("qat", False, "Also run quantization-aware fine-tuning.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def build_cnn():
  return keras.Sequential(
    [
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
      keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
      keras.layers.Flatten(),
      keras.layers.Dense(64, activation="relu"),
      keras.layers.Dense(10),
    ],
    name="digits_cnn",
  )


def compile_model(model, lr):
  model.compile(
    keras.optimizers.Adam(lr),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  return model


def accuracy(model, x, y):
  compile_model(model, 1e-3)
  return float(model.evaluate(x, y, verbose=0)[1])


def main(argv):
  del argv
  keras.utils.set_random_seed(FLAGS.seed)
  (x_tr, y_tr), (x_te, y_te) = datasets.load_digits()
  rows = []

  def add_row(name, model, acc):
    s = ke.summarize(model, print_fn=None)
    # Stored numbers: a pruned epitome's zeros are not stored.
    zeros = sum(
      int(np.sum(layer.epitome.numpy() == 0))
      for layer in model.layers
      if isinstance(layer, ke.EPITOME_LAYERS)
    )
    rows.append(
      (name, s.total_params - zeros, s.macs_materialized, s.macs_factored, acc)
    )

  # 1. A trained stock model.
  stock = compile_model(build_cnn(), 3e-3)
  stock.fit(x_tr, y_tr, epochs=FLAGS.pretrain_epochs, batch_size=64, verbose=0)
  add_row("stock (trained)", stock, accuracy(stock, x_te, y_te))

  # 2-3. Data-aware conversion, and a look at the result.
  kwargs = dict(
    min_params=FLAGS.min_params, sampler=FLAGS.sampler, learner=FLAGS.learner
  )
  small = ke.epitomize(
    stock,
    FLAGS.compression,
    calibration_data=x_tr[: FLAGS.calibration_size],
    calibration_options=dict(output_steps=FLAGS.output_steps),
    allocate=FLAGS.allocate,
    **kwargs,
  )
  ke.summarize(small)
  add_row("epitome, data-aware fit", small, accuracy(small, x_te, y_te))
  if FLAGS.harden:
    small = ke.harden_routing(small)  # the same function: the offsets are integers

  # 4. Short recovery: distillation from the trained model.
  ke.distill(
    small,
    stock,
    x_tr,
    epochs=FLAGS.finetune_epochs,
    learning_rate=FLAGS.finetune_lr or None,
    batch_size=64,
    verbose=0,
  )
  add_row("epitome, data-aware fit + distill", small, accuracy(small, x_te, y_te))

  # 5. Back to stock layers.
  stripped = ke.strip_epitome(small)
  add_row("  strip_epitome of it", stripped, accuracy(stripped, x_te, y_te))

  if FLAGS.compare_weight_fit:
    fit = ke.epitomize(stock, FLAGS.compression, init="fit", verbose=False, **kwargs)
    add_row("epitome, weight fit (init='fit')", fit, accuracy(fit, x_te, y_te))
    compile_model(fit, FLAGS.weight_fit_lr)
    fit.fit(x_tr, y_tr, epochs=FLAGS.finetune_epochs, batch_size=64, verbose=0)
    add_row("epitome, weight fit + fine-tune", fit, accuracy(fit, x_te, y_te))

  if FLAGS.prune_sparsity > 0:
    import tensorflow_model_optimization as tfmot

    # Epitome and pruning together: the epitomes' smallest numbers zeroed
    # (mask chosen at the first step and kept), recovered by distillation.
    pruned = ke.prune_epitomes(small, FLAGS.prune_sparsity)
    ke.distill(
      pruned,
      stock,
      x_tr,
      epochs=FLAGS.finetune_epochs,
      learning_rate=FLAGS.finetune_lr or None,
      batch_size=64,
      verbose=0,
    )
    pruned = tfmot.sparsity.keras.strip_pruning(pruned)
    add_row(
      f"  + epitomes pruned {FLAGS.prune_sparsity:.0%}, distilled",
      pruned,
      accuracy(pruned, x_te, y_te),
    )

  if FLAGS.qat:
    qat = compile_model(ke.quantize_model(small), (FLAGS.finetune_lr or 5e-4) / 2)
    qat.fit(
      x_tr, y_tr, epochs=max(1, FLAGS.finetune_epochs // 2), batch_size=64, verbose=0
    )
    acc = float(qat.evaluate(x_te, y_te, verbose=0)[1])
    # Parameters and MACs of the float epitome model it was made from.
    s = ke.summarize(small, print_fn=None)
    rows.append(
      (
        "  + QAT fine-tune (int8)",
        s.total_params,
        s.macs_materialized,
        s.macs_factored,
        acc,
      )
    )

  header = ("model", "params", "MACs stock", "MACs factored", "test acc")
  widths = [max(len(str(r[0])) for r in rows + [header])] + [13] * 4
  print()
  print(
    "  ".join(
      h.ljust(w) if i == 0 else h.rjust(w)
      for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
  )
  for name, params, macs_m, macs_f, acc in rows:
    print(
      f"{name:<{widths[0]}}  {params:>13,}  {macs_m:>13,}  {macs_f:>13,}  {acc:>13.4f}"
    )


if __name__ == "__main__":
  app.run(main)
