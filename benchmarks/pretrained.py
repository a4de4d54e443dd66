r"""From a trained model: conversion and short recovery, epitomes vs pruning.

A stock CNN is trained to convergence once (and cached). Then, at each
compression ratio, from that same trained model:

* ``weight_fit``: ``ke.epitomize(model, r, init="fit")`` (closed-form fit of
  the trained kernels), recovered by fine-tuning on the labels;
* ``data``: ``ke.epitomize(model, r, calibration_data=x_cal)`` (data-aware
  fit, :mod:`keras_epitome.calibration`), recovered by fine-tuning on labels;
* ``data_distill``: the same conversion, recovered by ``ke.distill`` with the
  trained model as teacher (no labels used);
* ``pruning``: TF-MOT ``prune_low_magnitude`` of the same layers to the same
  stored size (per-layer sparsity = 1 - (epitome + routing map) / kernel,
  ``ConstantSparsity`` from the first step: magnitude pruning at once, see
  ``--pruning_mask``), recovered by fine-tuning on labels; its accuracy
  "after conversion" is the trained model with those weights zeroed (what
  the first pruning step does);
* ``pruning_distill``: the same pruning, recovered by ``ke.distill``.
* ``compose_distill``: epitome and pruning together: the data-aware
  conversion at ``--compose_base`` times the ratio, its epitomes (and any
  layer it keeps stock that the ratio's conversion does not) pruned with
  ``ke.prune_epitomes`` to the same per-layer stored size as the pruning
  rows (``ke.sparsity_for_size``, positions charged by
  ``--pruning_positions``), recovered by ``ke.distill``; its accuracy "after
  conversion" is the base conversion with those weights zeroed.

Each row gives the accuracy right after conversion and after each number of
recovery epochs in ``--recovery_epochs`` (a separate run from the converted
model for each, Adam at ``--recovery_lr`` with cosine decay to 0, after
``--recovery_warmup``; repeat those flags, or give several ``--recovery_seed``,
for a row per recipe from one conversion). Every
recovery uses the same images, batch size and schedule. One JSON line per
row goes to ``--out``.

The data-aware conversion's gradient steps (``calibrate``'s
``reconstruct_steps`` and ``output_steps``) are set with the flags of the same
names. With ``--allocate`` the data-aware conversion chooses each layer's
ratio from the calibration data (``epitomize(allocate=True)``, the same total
stored size as the uniform conversion), and pruning follows the allocated
model's per-layer storage (a layer kept stock is not pruned). By default a
pruned kernel's stored size counts its non-zeros only;
``--pruning_positions=bitmask`` or ``index16`` also charges it for where they
are (1 bit per kernel entry, or 16 bits per non-zero), so that pruning and
epitome store the same number of bytes.

Usage:
  python -m benchmarks.pretrained                       # Fashion-MNIST
  python -m benchmarks.pretrained --ratios=4 --methods=data,pruning
  python -m benchmarks.pretrained --output_steps=4000 --calibration_size=2048
  python -m benchmarks.pretrained --output_steps=4000 --calibration_size=2048 --allocate
  python -m benchmarks.pretrained --output_steps=4000 --calibration_size=2048 --allocate \
      --methods=pruning_distill --pruning_positions=bitmask
  python -m benchmarks.pretrained --dataset=fsdd --batch_size=32 \
      --pretrain_epochs=20 --data_dir=/path/to/free-spoken-digit-dataset/recordings
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import platform
import time

import numpy as np  # noqa: E402
from absl import app, flags

import keras_epitome as ke  # noqa: E402
from benchmarks import harness as C  # noqa: E402
from examples import datasets  # noqa: E402

keras = ke.keras
METHODS = (
  "weight_fit",
  "data",
  "data_distill",
  "pruning",
  "pruning_distill",
  "compose_distill",
)

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "dataset", "fashion_mnist", ["fashion_mnist", "digits", "fsdd"], "Data."
)
flags.DEFINE_string(
  "data_dir",
  os.path.join(C.REPO_ROOT, "..", "shared", "data", "fsdd", "recordings"),
  "FSDD recordings folder.",
)
flags.DEFINE_list("ratios", ["2", "4", "8"], "Compression ratios.")
flags.DEFINE_list("methods", list(METHODS), f"Subset of {', '.join(METHODS)}.")
flags.DEFINE_integer("train_size", 0, "Training images (0: all).")
flags.DEFINE_integer("pretrain_epochs", 12, "Epochs of the stock model.")
flags.DEFINE_float("pretrain_lr", 3e-3, "Adam peak learning rate, cosine decay.")
flags.DEFINE_integer("batch_size", 128, "Batch size of every training run.")
flags.DEFINE_integer("calibration_size", 1024, "Calibration images (training set).")
flags.DEFINE_integer(
  "reconstruct_steps", 0, "calibrate(reconstruct_steps=): Adam steps per block."
)
flags.DEFINE_integer(
  "output_steps", 0, "calibrate(output_steps=): Adam steps on the model output."
)
flags.DEFINE_float("reconstruct_lr", 1e-3, "calibrate(reconstruct_lr=).")
flags.DEFINE_list("recovery_epochs", ["1", "3"], "Recovery run lengths.")
flags.DEFINE_bool(
  "harden",
  False,
  "ke.harden_routing the data-aware conversions (data, data_distill, "
  "compose_distill) before the recovery: the routing maps stay at their "
  "integer offsets.",
)
flags.DEFINE_integer(
  "recovery_size", 0, "Images per recovery epoch (0: the whole training set)."
)
flags.DEFINE_multi_float(
  "recovery_lr",
  [3e-3],
  "Adam peak learning rate of recovery; repeat the flag for several (one "
  "conversion, a row per rate). 0: ke.distill's default for the run's length "
  "(label fine-tuning: 3e-3).",
)
flags.DEFINE_float(
  "epitome_lr",
  None,
  "ke.distill(epitome_learning_rate=): peak rate of the epitome tensors "
  "(unset: ke.distill's default).",
)
flags.DEFINE_multi_float(
  "recovery_warmup",
  [0.0],
  "ke.distill(warmup=): fraction of the recovery's steps of linear warmup "
  "(distillation recoveries only); repeat the flag for several.",
)
flags.DEFINE_float("temperature", 1.0, "Distillation temperature.")
flags.DEFINE_float(
  "compose_base",
  0.5,
  "compose_distill: the conversion's ratio as a fraction of --ratios' "
  "(0.5: epitome at half the ratio, pruned to the rest).",
)
flags.DEFINE_bool(
  "allocate", False, "epitomize(allocate=True): per-layer ratios chosen from the data."
)
flags.DEFINE_enum(
  "pruning_positions",
  "none",
  list(C.POSITION_BITS),
  "What a pruned kernel pays for its non-zeros' positions out of the epitome "
  "layer's stored size: none (non-zeros only, the rule of every earlier row), "
  "bitmask (1 bit per kernel entry) or index16 (16 bits per non-zero).",
)
# ConstantSparsity(begin_step, end_step, frequency) per --pruning_mask. TF-MOT
# updates the mask when the step is a multiple of the frequency and, as
# measured with tensorflow-model-optimization 0.8.1, not at the first step:
# with frequency 50 the first 49 steps train the unpruned model.
PRUNING_MASKS = {"fixed": (0, 1, 1), "every_step": (0, -1, 1), "every_50": (0, -1, 50)}
flags.DEFINE_enum(
  "pruning_mask",
  "fixed",
  list(PRUNING_MASKS),
  "When the pruning mask is chosen: fixed (at the first step, then kept), "
  "every_step (re-chosen by magnitude every step), every_50 (every 50 steps, "
  "the first time at step 50: the rule of every row before the seventh landing).",
)
flags.DEFINE_string("cache", "/tmp/ke_pretrained", "Folder of the trained model.")
flags.DEFINE_integer(
  "trace_every",
  0,
  "Record the accuracy on the first 2,000 test samples every this many "
  "recovery steps (row key 'trace_<epochs>'; 0: off).",
)
flags.DEFINE_string(
  "out", "benchmarks/results/results_pretrained.jsonl", "JSON lines, one per row."
)
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_list(
  "recovery_seed",
  None,
  "Seed(s) of the recovery runs only (their shuffles); unset: --seed. The "
  "trained model, calibration images and conversion stay those of --seed; "
  "several seeds (e.g. 0,1,2) reuse one conversion and give one row each.",
)


def load_data():
  if FLAGS.dataset == "fashion_mnist":
    (x, y), (xt, yt) = datasets.load_fashion_mnist(download=False)
    build = C.fashion_cnn
  elif FLAGS.dataset == "fsdd":
    (x, y), (xt, yt) = datasets.load_fsdd(FLAGS.data_dir)
    length = x.shape[1]
    # The stock audio CNN (its 80-tap stem is a stock layer, converted or not
    # by epitomize's own rules like every other layer).
    build = lambda: C.audio_cnn(length=length)  # noqa: E731
  else:
    (x, y), (xt, yt) = datasets.load_digits()
    build = lambda: C.fashion_cnn(input_shape=(8, 8, 1))  # noqa: E731
  rng = np.random.default_rng(FLAGS.seed)
  if FLAGS.train_size:
    keep = rng.permutation(len(x))[: FLAGS.train_size]
    x, y = x[keep], y[keep]
  return (x, y), (xt, yt), build


def calibration_options():
  return dict(
    reconstruct_steps=FLAGS.reconstruct_steps,
    output_steps=FLAGS.output_steps,
    reconstruct_lr=FLAGS.reconstruct_lr,
    batch_size=64,
    max_samples=FLAGS.calibration_size,
  )


def trained_model(build, data):
  """The stock model trained to convergence, from the cache if there."""
  os.makedirs(FLAGS.cache, exist_ok=True)
  tag = f"{FLAGS.dataset}_n{len(data[0][0])}_e{FLAGS.pretrain_epochs}_s{FLAGS.seed}"
  path = os.path.join(FLAGS.cache, tag + ".weights.h5")
  model = build()
  if os.path.exists(path):
    model.load_weights(path)
    print(f"loaded the trained model from {path}")
    return model, 0.0
  keras.utils.set_random_seed(FLAGS.seed)
  with C.Timer() as t:
    C.train(
      model,
      data,
      epochs=FLAGS.pretrain_epochs,
      batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.pretrain_lr,
      verbose=2,
    )
  model.save_weights(path)
  return model, t.seconds


def copy_model(model):
  """A copy with the same weights (epitome layers included)."""
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  return clone


def kernel_counts(model, names) -> list:
  """``(entries, non-zeros)`` of each named layer's pruned weight (epitome or kernel)."""
  kernels = [C.pruned_weight(model.get_layer(name)).numpy() for name in names]
  return [(k.size, int(np.count_nonzero(k))) for k in kernels]


def position_words(model, names) -> int:
  """32-bit words a pruned model's kernels spend on their non-zeros' positions."""
  per_entry, per_nonzero = C.POSITION_BITS[FLAGS.pruning_positions]
  bits = sum(
    per_entry * n + per_nonzero * nnz for n, nnz in kernel_counts(model, names)
  )
  return -(-bits // 32)


def pruned_stored(model, names) -> int:
  """Stored numbers of a pruned model: its kernels' zeros are not stored."""
  zeros = sum(n - nnz for n, nnz in kernel_counts(model, names))
  return C.stored_params(model) - zeros


def pruning_recovery(
  stock, sparsity, recovery, epochs, distill, recipe, make_trace=None
):
  """TF-MOT pruning + recovery; ``(stripped model, trace or None)``."""
  import tensorflow_model_optimization as tfmot

  sp = tfmot.sparsity.keras

  def clone(layer):
    if layer.name in sparsity:
      begin, end, frequency = PRUNING_MASKS[FLAGS.pruning_mask]
      schedule = sp.ConstantSparsity(
        sparsity[layer.name], begin_step=begin, end_step=end, frequency=frequency
      )
      return sp.prune_low_magnitude(layer, pruning_schedule=schedule)
    return layer

  base = copy_model(stock)
  pruned = keras.models.clone_model(base, clone_function=clone)
  # clone_model rebuilds the wrapped layers: copy the trained kernels in.
  for layer in pruned.layers:
    inner = getattr(layer, "layer", layer)
    src = base.get_layer(inner.name)
    for w_new, w_old in zip(inner.weights, src.weights, strict=True):
      w_new.assign(w_old)
  trace = make_trace(pruned) if make_trace else None
  callbacks = [sp.UpdatePruningStep()] + ([] if trace is None else [trace])
  recover(pruned, stock, recovery, epochs, distill, recipe, callbacks)
  return sp.strip_pruning(pruned), trace


def recover(model, teacher, recovery, epochs, distill, recipe, callbacks=None):
  """``epochs`` of recovery: ``ke.distill`` from ``teacher``, or label fine-tuning.

  ``recipe``: ``{"lr": peak rate, "warmup": fraction}``.
  """
  if distill:
    ke.distill(
      model,
      teacher,
      recovery[0],
      epochs=epochs,
      temperature=FLAGS.temperature,
      learning_rate=recipe["lr"] or None,  # 0: distill's default
      epitome_learning_rate=FLAGS.epitome_lr,
      warmup=recipe["warmup"],
      batch_size=FLAGS.batch_size,
      callbacks=callbacks,
      verbose=2,
    )
  else:
    fine_tune(model, recovery, epochs, recipe["lr"] or 3e-3, callbacks)


def fine_tune(model, recovery, epochs, lr, callbacks=None):
  """Label fine-tuning: Adam, cosine decay to 0 (as ``common.train``)."""
  x, y = recovery
  steps = epochs * -(-len(x) // FLAGS.batch_size)
  model.compile(
    optimizer=keras.optimizers.Adam(ke.distillation.cosine_schedule(lr, steps)),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.fit(
    x,
    y,
    batch_size=FLAGS.batch_size,
    epochs=epochs,
    shuffle=True,
    verbose=2,
    callbacks=callbacks or [],
  )


def main(argv):
  del argv
  ratios = [float(r) for r in FLAGS.ratios]
  epochs_list = [int(e) for e in FLAGS.recovery_epochs]
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  data = load_data()
  (x, y), (xt, yt), build = data
  stock, pretrain_s = trained_model(build, ((x, y), (xt, yt)))
  stock_acc = C.evaluate(stock, (xt, yt))
  rng = np.random.default_rng(FLAGS.seed + 1)
  x_cal = x[rng.permutation(len(x))[: FLAGS.calibration_size]]
  rec = rng.permutation(len(x))
  if FLAGS.recovery_size:
    rec = rec[: FLAGS.recovery_size]
  recovery = (x[rec], y[rec])
  meta = dict(
    dataset=FLAGS.dataset,
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    load=os.getloadavg()[0],
    train_size=len(x),
    pretrain_epochs=FLAGS.pretrain_epochs,
    recovery_size=len(rec),
    epitome_lr=FLAGS.epitome_lr,
    temperature=FLAGS.temperature,
    allocate=FLAGS.allocate,
    harden=FLAGS.harden,
    calibration_size=len(x_cal),
    calibration_options=calibration_options(),
    pruning_positions=FLAGS.pruning_positions,
    pruning_mask=FLAGS.pruning_mask,
    stock_acc=stock_acc,
    stock_params=C.stored_params(stock),
  )
  print(f"stock: {stock_acc:.4f} ({pretrain_s:.0f} s of training)")
  rows = []

  def emit(row):
    row = {**meta, **row}
    rows.append(row)
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row))

  recovery_seeds = [int(v) for v in FLAGS.recovery_seed or [FLAGS.seed]]
  make_trace = None
  if FLAGS.trace_every:
    make_trace = functools.partial(
      C.AccuracyTrace, test=(xt[:2000], yt[:2000]), every=FLAGS.trace_every
    )

  def recovery_row(row, method, model, sparsity):
    """``row`` plus the accuracy after each recovery length, from ``model``."""
    recipe = {"lr": row["recovery_lr"], "warmup": row["recovery_warmup"]}
    for epochs in epochs_list:
      keras.utils.set_random_seed(row["recovery_seed"])
      t0 = time.time()
      if method.startswith("pruning"):
        rec_model, trace = pruning_recovery(
          stock,
          sparsity,
          recovery,
          epochs,
          method == "pruning_distill",
          recipe,
          make_trace,
        )
        row[f"stored_params_{epochs}"] = pruned_stored(rec_model, sparsity)
      elif method == "compose_distill":
        import tensorflow_model_optimization as tfmot  # noqa: PLC0415

        # `model` has the base's smallest weights zeroed already: TF-MOT's
        # first mask picks the same ones.
        rec_model = ke.prune_epitomes(model, sparsity)
        trace = make_trace(rec_model) if make_trace else None
        recover(rec_model, stock, recovery, epochs, True, recipe, trace and [trace])
        rec_model = tfmot.sparsity.keras.strip_pruning(rec_model)
        row[f"stored_params_{epochs}"] = pruned_stored(rec_model, sparsity)
      else:
        rec_model = copy_model(model)
        trace = make_trace(rec_model) if make_trace else None
        callbacks = [] if trace is None else [trace]
        recover(
          rec_model,
          stock,
          recovery,
          epochs,
          method == "data_distill",
          recipe,
          callbacks,
        )
      if trace is not None:
        row[f"trace_{epochs}"] = trace.trace
      row[f"acc_{epochs}"] = C.evaluate(rec_model, (xt, yt))
      row[f"recovery_{epochs}_s"] = round(time.time() - t0, 1)
    return row

  for ratio in ratios:
    converted = {}
    for method in FLAGS.methods:
      keras.utils.set_random_seed(FLAGS.seed)
      t0 = time.time()
      sparsity = None
      if method == "weight_fit":
        model = ke.epitomize(stock, ratio, init="fit", verbose=False)
      elif method == "compose_distill":
        # The per-layer budget of the ratio's conversion (as the pruning
        # rows), filled by a conversion at a lower ratio, pruned.
        reference = converted.get("data") or ke.epitomize(
          stock,
          ratio,
          calibration_data=x_cal,
          allocate=FLAGS.allocate,
          verbose=False,
        )
        base_ratio = max(1.0, ratio * FLAGS.compose_base)
        base = ke.epitomize(
          stock,
          base_ratio,
          calibration_data=x_cal,
          calibration_options=calibration_options(),
          allocate=FLAGS.allocate,
          verbose=True,
        )
        if FLAGS.harden:
          base = ke.harden_routing(base)
        sparsity = ke.sparsity_for_size(
          base, C.epitome_words(reference), positions=FLAGS.pruning_positions
        )
        model = C.magnitude_prune(base, sparsity)
      elif method in ("data", "data_distill"):
        if "data" not in converted:
          converted["data"] = ke.epitomize(
            stock,
            ratio,
            calibration_data=x_cal,
            calibration_options=calibration_options(),
            allocate=FLAGS.allocate,
            verbose=True,
          )
          converted["report"] = converted["data"].epitome_report
          if FLAGS.harden:  # (the hardened copy has no epitome_report)
            converted["data"] = ke.harden_routing(converted["data"])
        model = converted["data"]
      else:
        # Per layer, as many non-zeros as the epitome model stores there
        # (with --allocate: the allocated model, a layer it keeps stock is
        # not pruned).
        if FLAGS.allocate:
          reference = converted.get("data") or ke.epitomize(
            stock,
            ratio,
            calibration_data=x_cal,
            allocate=True,
            verbose=False,
          )
        else:
          reference = ke.epitomize(stock, ratio, init="fit", verbose=False)
        sparsity = C.prune_spec(reference, FLAGS.pruning_positions)
        model = C.magnitude_prune(stock, sparsity)
      convert_s = time.time() - t0
      # Methods whose kernels (or epitomes) are pruned: stored non-zeros.
      sparse = method.startswith("pruning") or method == "compose_distill"
      if sparse:
        stored = pruned_stored(model, sparsity)
        positions = position_words(model, sparsity)
      else:
        stored = C.stored_params(model)
      row = dict(
        method=method,
        ratio=ratio,
        stored_params=stored,
        convert_s=round(convert_s, 1),
        acc_0=C.evaluate(model, (xt, yt)),
      )
      if sparse and positions:
        row["stored_with_positions"] = stored + positions
      if method == "compose_distill":
        row["compose_base"] = base_ratio
        row["sparsity"] = sparsity
      if method in ("data", "data_distill"):
        # Per fitted layer: least-squares output error, then the block (or
        # model output) error before and after the gradient steps.
        row["calibration"] = [
          [c.name, c.output_error, c.block_error_before, c.block_error]
          for c in converted["report"].calibration
        ]
      for lr, warmup, seed in itertools.product(
        FLAGS.recovery_lr, FLAGS.recovery_warmup, recovery_seeds
      ):
        recipe = dict(recovery_lr=lr, recovery_warmup=warmup, recovery_seed=seed)
        emit(recovery_row(dict(row, **recipe), method, model, sparsity))

  columns = ["method", "ratio", "stored_params", "acc_0"] + [
    f"acc_{e}" for e in epochs_list
  ]
  table = [
    {
      k: (
        f"{100 * v:.2f}"
        if k.startswith("acc")
        else f"{v:,}"
        if k == "stored_params"
        else v
      )
      for k, v in r.items()
      if k in columns
    }
    for r in rows
  ]
  print(f"\nstock: {100 * stock_acc:.2f}%, {meta['stock_params']:,} stored params")
  if table:
    print(C.format_table(table, columns))


if __name__ == "__main__":
  app.run(main)
