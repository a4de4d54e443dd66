r"""Accuracy at equal stored parameters: NES vs WSNet vs thinner vs pruning.

For each compression ratio the benchmark trains, with the same epochs, batch
size and learning-rate schedule:

* ``stock``: the full model (ratio 1, once);
* ``nes_param``, ``nes_feature``: NES learned sampling (param / feature learner);
* ``wsnet``: WSNet fixed sampling, same epitome shapes as NES;
* ``thinner``: the stock model with a width multiplier giving the same stored
  parameter count as the epitome models;
* ``pruning``: TF-MOT magnitude pruning of the same layers to the same number
  of non-zero weights (``PolynomialDecay`` over the first 2/3 of training).

Wide mode (``--width=2``, the papers' protocol): the epitome models are built
2x wider and compressed by ``--ratios`` (4 brings a 2x-wide layer back to the
stock layer's size) and compared with the stock model of width 1;
``thinner`` and ``pruning`` are skipped.

Every run appends one JSON line to ``--out`` (so a long run can be resumed
with ``--resume``), and the script prints a Markdown table of mean ± std over
seeds. Counting rules are in ``examples/models.py``.

Usage:
  python -m benchmarks.accuracy --dataset=fashion_mnist --train_size=20000 \
      --epochs=4 --ratios=2,4,8,16 --seeds=0,1,2
  python -m benchmarks.accuracy --dataset=fsdd --epochs=12 --ratios=2,4,8
  python -m benchmarks.accuracy --dataset=digits --epochs=10   # needs no data
  python -m benchmarks.accuracy --dataset=fsdd --epochs=30 --shift=800 \
      --batch_size=32 --ratios=4,8,16 --methods=stock,nes_param,wsnet,thinner
  python -m benchmarks.accuracy --dataset=fashion_mnist --width=2 --ratios=4 \
      --methods=stock,nes_param,wsnet      # wide mode
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform

import numpy as np  # noqa: E402
from absl import app, flags

from benchmarks import harness as C  # noqa: E402
from examples import datasets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "dataset", "fashion_mnist", ["fashion_mnist", "fsdd", "digits"], "Data."
)
flags.DEFINE_list("ratios", ["2", "4", "8", "16"], "Compression ratios.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (one training run per seed).")
flags.DEFINE_list("methods", list(C.METHODS), f"Subset of {', '.join(C.METHODS)}.")
flags.DEFINE_integer("epochs", 4, "Epochs, the same for every method.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float(
  "learning_rate", 3e-3, "Adam peak learning rate (cosine decay to 0)."
)
flags.DEFINE_float("offset_scale", 1.0, "offset_scale of the NES layers.")
flags.DEFINE_bool(
  "spread_init",
  False,
  "Start NES and WSNet from spread channel offsets (examples/models.py).",
)
flags.DEFINE_integer(
  "train_size", 20000, "Fashion-MNIST training subset (0 = all 60k)."
)
flags.DEFINE_string("fashion_dir", None, "Folder with the Fashion-MNIST IDX files.")
flags.DEFINE_string(
  "data_dir",
  os.path.join(C.REPO_ROOT, "..", "shared", "data", "fsdd", "recordings"),
  "FSDD recordings folder.",
)
flags.DEFINE_integer("audio_length", 8000, "FSDD samples per example.")
flags.DEFINE_enum(
  "audio_first_layer",
  "stock",
  ["wsnet", "channels", "stock"],
  "FSDD first layer (one input channel): WSNet's condensed filter, the "
  "channel rule, or stock (not compressed; the default since issue 9).",
)
flags.DEFINE_integer(
  "shift", 0, "FSDD: random time shift of up to this many samples (augmentation)."
)
flags.DEFINE_float(
  "width",
  1.0,
  "Width of the epitome models (wide mode: 2); stock stays at width 1.",
)
flags.DEFINE_string(
  "out", None, "JSON-lines file (default benchmarks/results/results_DATASET.jsonl)."
)
flags.DEFINE_bool("resume", False, "Skip runs already in --out.")
flags.DEFINE_bool(
  "tflite", True, "Measure .tflite bytes (factored form for epitome models)."
)
flags.DEFINE_integer("verbose", 0, "Keras fit verbosity.")
flags.DEFINE_bool(
  "report_only", False, "Print the tables of the runs in --out; train nothing."
)


def load_data():
  if FLAGS.dataset == "fashion_mnist":
    (x, y), test = datasets.load_fashion_mnist(FLAGS.fashion_dir)
    if FLAGS.train_size:
      order = np.random.default_rng(0).permutation(len(x))[: FLAGS.train_size]
      x, y = x[order], y[order]
    return (x, y), test
  if FLAGS.dataset == "digits":
    return datasets.load_digits()
  return datasets.load_fsdd(FLAGS.data_dir, length=FLAGS.audio_length)


def builder(data, method="stock", ratio=1.0):
  """``build(width=1.0)`` for the dataset's model with the method's layers."""
  make = C.conv_factory(method, ratio, offset_scale=FLAGS.offset_scale)
  if FLAGS.dataset == "fsdd":
    length = data[0][0].shape[1]

    def build(width=1.0):
      return C.audio_cnn(
        length=length,
        width=width,
        make=make,
        ratio=ratio,
        first_epitome=FLAGS.audio_first_layer,
      )

  else:
    shape = data[0][0].shape[1:]

    def build(width=1.0):
      return C.fashion_cnn(input_shape=shape, width=width, make=make)

  return build


def measure(model, record):
  record["stored_params"] = C.stored_params(model)
  record["macs"] = C.macs(model)
  if FLAGS.tflite:
    try:
      data, form = C.tflite_bytes(model)
      record.update(
        tflite_bytes=len(data), tflite_zipped=C.zipped_size(data), tflite_form=form
      )
    except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
      record["tflite_error"] = f"{type(e).__name__}: {e}"[:300]


def run_one(data, method, ratio, seed):
  C.keras.utils.set_random_seed(seed)
  record = dict(dataset=FLAGS.dataset, method=method, ratio=ratio, seed=seed)
  record.update(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, shift=FLAGS.shift)
  if method in C.EPITOME_METHODS:
    record.update(offset_scale=FLAGS.offset_scale, spread_init=FLAGS.spread_init)
  if FLAGS.dataset == "fsdd":
    record.update(audio_first_layer=FLAGS.audio_first_layer)
  kw = dict(
    epochs=FLAGS.epochs,
    batch_size=FLAGS.batch_size,
    learning_rate=FLAGS.learning_rate,
    verbose=FLAGS.verbose,
    shift=FLAGS.shift,
  )
  if FLAGS.width != 1 and method in ("thinner", "pruning"):
    raise ValueError(f"{method} has no wide mode (--width={FLAGS.width:g})")
  with C.Timer() as t:
    if method == "stock":
      model = builder(data)()
      record["accuracy"] = C.train(model, data, **kw)
      measure(model, record)
    elif method in C.EPITOME_METHODS:
      model = builder(data, method, ratio)(width=FLAGS.width)
      record["width"] = FLAGS.width
      if FLAGS.spread_init:
        C.spread_routing(model)
      before = C.routing_snapshot(model)
      record["accuracy"] = C.train(model, data, **kw)
      moves = C.offset_moves(before, C.routing_snapshot(model), model)
      record.update(offset_move_channel=moves["channel"])
      record.update(offset_move_spatial=moves["spatial"])
      record["layer_ratios"] = C.epitome_ratios(model)
      measure(model, record)
    elif method == "thinner":
      target = C.stored_params(builder(data, "wsnet", ratio)())
      width = C.thinner_width(builder(data), target)
      record["width"] = width
      C.keras.utils.set_random_seed(seed)
      model = builder(data)(width=width)
      record["accuracy"] = C.train(model, data, **kw)
      measure(model, record)
    elif method == "pruning":
      sparsity = C.prune_spec(builder(data, "wsnet", ratio)())
      record["sparsity"] = sparsity
      C.keras.utils.set_random_seed(seed)
      acc, pruned = C.prune_and_train(builder(data)(), sparsity, data, **kw)
      record["accuracy"] = acc
      record["stored_params"] = C.stored_params(pruned)
      stripped = C.strip_pruning(pruned)
      record["macs"] = C.macs(stripped)
      if FLAGS.tflite:
        tfl, _ = C.tflite_bytes(stripped)
        record.update(
          tflite_bytes=len(tfl), tflite_zipped=C.zipped_size(tfl), tflite_form="stock"
        )
    else:
      raise ValueError(f"unknown method {method!r}; valid: {', '.join(C.METHODS)}")
  record["train_seconds"] = round(t.seconds, 1)
  return record


def summarize(records):
  """Rows of mean ± std over seeds, one per (ratio, method)."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["ratio"], _label(r))].append(r)
  order = {m: i for i, m in enumerate(C.METHODS)}
  order.update({f"{m} (wide)": i + 0.5 for m, i in order.items()})
  rows = []
  for (ratio, method), rs in sorted(
    groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])
  ):
    acc = np.array([r["accuracy"] for r in rs]) * 100
    row = {
      "ratio": f"{ratio:g}",
      "method": method,
      "seeds": len(rs),
      "accuracy %": f"{acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f}",
      "stored params": f"{int(np.mean([r['stored_params'] for r in rs])):,}",
      "MACs": f"{int(np.mean([r['macs'] for r in rs])):,}",
    }
    if "offset_move_channel" in rs[0] and method.startswith("nes"):
      row["mean |Δoffset|"] = (
        f"{np.mean([r['offset_move_channel'] for r in rs]):.3f} ch, "
        f"{np.mean([r['offset_move_spatial'] for r in rs]):.2f} taps"
      )
    if "tflite_bytes" in rs[0]:
      row["tflite B"] = f"{int(np.mean([r['tflite_bytes'] for r in rs])):,}"
      row["zipped B"] = f"{int(np.mean([r['tflite_zipped'] for r in rs])):,}"
    rows.append(row)
  return rows


def _label(r):
  wide = r["method"] in C.EPITOME_METHODS and r.get("width", 1) != 1
  return f"{r['method']} (wide)" if wide else r["method"]


def margins(records):
  """Rows of accuracy differences (points) between methods and baselines, per ratio.

  ``±`` is the standard error of the difference of the two means.
  """
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["ratio"], _label(r))].append(100 * r["accuracy"])
  stock = groups.get((1.0, "stock"))
  rows = []
  for ratio in sorted({r for r, _ in groups}):
    if ratio == 1:
      continue
    row = {"ratio": f"{ratio:g}"}
    pairs = [
      (nes, base)
      for nes in ("nes_param", "nes_feature")
      for base in ("wsnet", "thinner", "pruning")
    ]
    pairs += [("wsnet", "thinner")]
    pairs += [(f"{m} (wide)", "stock") for m in ("nes_param", "nes_feature", "wsnet")]
    for nes, base in pairs:
      a = groups.get((ratio, nes))
      b = stock if base == "stock" else groups.get((ratio, base))
      if not a or not b:
        continue
      se = np.sqrt(
        (np.var(a, ddof=1) / len(a) if len(a) > 1 else 0)
        + (np.var(b, ddof=1) / len(b) if len(b) > 1 else 0)
      )
      row[f"{nes} - {base}"] = f"{np.mean(a) - np.mean(b):+.2f} ± {se:.2f}"
    rows.append(row)
  return rows


def print_tables(records):
  rows = summarize(records)
  print()
  print(C.format_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
  rows = margins(records)
  if rows:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("\nAccuracy margins (points; ± = standard error of the difference):")
    print(C.format_table(rows, columns))


def main(argv):
  del argv
  out = FLAGS.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"results_{FLAGS.dataset}.jsonl",
  )
  done = set()
  records = []
  if FLAGS.report_only:
    with open(out) as f:
      print_tables([json.loads(line) for line in f])
    return
  if FLAGS.resume and os.path.exists(out):
    with open(out) as f:
      for line in f:
        r = json.loads(line)
        records.append(r)
        done.add((r["method"], r["ratio"], r["seed"]))
  elif os.path.exists(out):
    os.remove(out)
  data = load_data()
  print(
    f"{FLAGS.dataset}: train {data[0][0].shape}, test {data[1][0].shape}; "
    f"{platform.node()} {os.cpu_count()} CPUs; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC"
  )
  plan = []
  for seed in (int(s) for s in FLAGS.seeds):
    if "stock" in FLAGS.methods:
      plan.append(("stock", 1.0, seed))
    for ratio in (float(r) for r in FLAGS.ratios):
      plan += [(m, ratio, seed) for m in FLAGS.methods if m != "stock"]
  for method, ratio, seed in plan:
    if (method, ratio, seed) in done:
      continue
    try:
      record = run_one(data, method, ratio, seed)
    except ValueError as e:  # e.g. a ratio too large for a layer
      print(f"skip {method} x{ratio:g} seed {seed}: {e}")
      continue
    records.append(record)
    with open(out, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(
      f"{method:12s} x{ratio:<4g} seed {seed}: acc {record['accuracy']:.4f} "
      f"params {record['stored_params']:,} MACs {record['macs']:,} "
      f"tflite {record.get('tflite_bytes', '-')} ({record['train_seconds']} s)",
      flush=True,
    )
  print_tables(records)


if __name__ == "__main__":
  app.run(main)
