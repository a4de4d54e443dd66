"""Inference benchmark: stock vs materialized vs factored epitome models on LiteRT.

For a conv-heavy image model (a small ResNet at 32x32) and a 1D audio CNN
(M5-style, 1 s of 8 kHz audio), at each compression ratio, exports three
``.tflite`` files per precision (float32 and full int8):

* ``stock``: the same architecture with stock layers;
* ``materialized``: the epitome model with sampled full-size kernels;
* ``factored/<remix>``: the epitome model in the factored form (DESIGN.md
  4.2) with each remix: ``auto`` (the default of ``export_tflite``: per layer
  the fastest of slices, matmul and the materialized stock layer by the
  calibrated LiteRT cost model; the forms it picked are printed), ``slices``
  and ``matmul``.

and reports file size, analytic multiply-adds (from the converted graph's
shapes: convolution and fully connected MACs plus the blends' multiplies) and
LiteRT latency at 1 and 2 threads. Latency is measured interleaved (one
invoke of each file in turn, the order rotating every round) so that a busy
machine slows every variant alike, and the median is reported. Ratios are
against the stock model measured in the same run.

Epitome layers get random fractional routing maps (the general case a trained
NES model ends in: every chunk needs both rolls and blends); pass
``--offsets=integer`` for WSNet-style integer maps. MobileNetV2 is a
conversion (``ke.epitomize`` of the stock model) and keeps the routing maps
``epitomize`` fitted.

The stock model is exported and timed in the same run, interleaved with the
epitome files. ``--remix=auto,auto:size`` gives both ends of the default
export: speed first (``remix="auto"``, ``objective="latency"``, the default)
and size first (``objective="size"``); ``--summary`` closes with a table of
file-size and latency ratios against stock.

Usage:
  python -m benchmarks.inference --iterations=200
  python -m benchmarks.inference --models=resnet,audio,mobilenetv2 --widths=32,64 \
      --compressions=4 --threads=1 --remix=auto,auto:size --materialized=false \
      --summary --json_out=benchmarks/results/inference.jsonl
  python -m benchmarks.inference --models=resnet --compressions=4
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import numpy as np
from absl import app, flags

import keras_epitome as ke
from benchmarks import harness as C  # noqa: E402
from keras_epitome import cost_model, export, sampling

keras = ke.keras

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "models",
  ["resnet", "audio"],
  "Models: resnet (at each --widths), audio, mobilenetv2 (alpha 0.35, at each "
  "--mobilenet_sizes; the epitome model is ke.epitomize of it).",
)
flags.DEFINE_list("widths", None, "ResNet base widths (default: --width).")
flags.DEFINE_list("mobilenet_sizes", ["32", "96"], "MobileNetV2 input sizes.")
flags.DEFINE_bool("materialized", True, "Also time the materialized form.")
flags.DEFINE_string("commit", None, "Commit recorded in the rows (default: git HEAD).")
flags.DEFINE_bool(
  "summary", False, "Print a closing table: file-size and latency ratio vs stock."
)
flags.DEFINE_list("compressions", ["2", "4", "8"], "Compression ratios.")
flags.DEFINE_list("precisions", ["float", "int8"], "float and/or int8.")
flags.DEFINE_list("threads", ["1", "2"], "LiteRT thread counts.")
flags.DEFINE_integer("iterations", 200, "Timed invokes per file and thread count.")
flags.DEFINE_integer("warmup", 10, "Untimed invokes per file first.")
flags.DEFINE_enum("offsets", "fractional", ["fractional", "integer"], "Routing maps.")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON lines.")
flags.DEFINE_integer("seed", 0, "Seed for weights, routing maps and inputs.")
flags.DEFINE_list(
  "remix",
  ["auto", "slices", "matmul", "fold_slices", "fold_matmul"],
  "Factored remix variants (auto:size: remix=auto, objective=size).",
)
flags.DEFINE_enum(
  "choose", "cost", ["cost", "measure"], "How remix=auto chooses (export_tflite)."
)
flags.DEFINE_integer("width", 32, "ResNet base width (stages w, 2w, 4w).")
flags.DEFINE_integer(
  "channel_roll", 1, "Epitome layers' channel_roll (1: the default; 0: separable map)."
)
flags.DEFINE_bool(
  "profile",
  False,
  "Instead of the table: one 3x3 conv layer (+BN+ReLU) at --profile_widths and "
  "32x32, timed as stock, the epitome convolution alone (Cin_E -> Cout_E per "
  "distinct channel roll), factored (integer and fractional offsets), each "
  "other remix and auto, with the op list of each.",
)
flags.DEFINE_list("profile_widths", ["32", "64", "128"], "Channel counts to profile.")
flags.DEFINE_enum(
  "statistic",
  "median",
  ["median", "min"],
  "Latency statistic over the interleaved invokes. On a loaded machine the "
  "scheduler preempts long invokes more often than short ones, which inflates "
  "the median of the slower files; the minimum is the least disturbed.",
)


def resnet(conv, width=32):
  """ResNet-style net at 32x32: stem + 3 stages of 2 basic blocks (w, 2w, 4w)."""
  inputs = keras.Input((32, 32, 3))
  x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  channels = width
  for stage, filters in enumerate((width, 2 * width, 4 * width)):
    for block in range(2):
      stride = 2 if stage and not block else 1
      h = conv(filters, 3, strides=stride, padding="same", use_bias=False)(x)
      h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
      h = conv(filters, 3, padding="same", use_bias=False)(h)
      h = keras.layers.BatchNormalization()(h)
      if stride != 1 or channels != filters:
        x = conv(filters, 1, strides=stride, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
      x = keras.layers.ReLU()(keras.layers.Add()([h, x]))
      channels = filters
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(10)(x), name="resnet")


def audio_cnn(conv, width=64):
  """M5-style 1D CNN on 8000 samples: a stock stem, then epitome convs."""
  inputs = keras.Input((8000, 1))
  x = keras.layers.Conv1D(width, 80, strides=4, padding="same", use_bias=False)(inputs)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.MaxPooling1D(4)(x)
  for filters in (width, 2 * width, 2 * width, 4 * width):
    x = conv(filters, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    if filters != 4 * width:
      x = keras.layers.MaxPooling1D(2)(x)
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(inputs, keras.layers.Dense(10)(x), name="audio")


def mobilenetv2(size):
  """MobileNetV2 (alpha 0.35, 10 classes, random weights) at ``size`` x ``size``."""
  return keras.applications.MobileNetV2(
    input_shape=(size, size, 3), alpha=0.35, weights=None, classes=10
  )


MODELS = {
  "resnet": (resnet, keras.layers.Conv2D, ke.EpitomeConv2D, (32, 32, 3)),
  "audio": (audio_cnn, keras.layers.Conv1D, ke.EpitomeConv1D, (8000, 1)),
}


def _randomize(model, rng, fractional):
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, gamma.shape),
          rng.normal(0, 0.1, beta.shape),
          rng.normal(0, 0.1, mean.shape),
          rng.uniform(0.5, 1.5, var.shape),
        ]
      )
  for layer in export.epitome_layers(model):
    g = layer.epitome_geometry
    routing = sampling.RoutingMap(
      rng.uniform(0, g.cin_e, g.num_in_chunks),
      rng.uniform(0, g.cout_e, g.num_out_chunks),
      rng.uniform(0, 1, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
    )
    if not fractional:
      routing = sampling.RoutingMap(*(np.floor(r) for r in routing))
    layer.set_routing_map(routing)


def _macs(tflite):
  report = export.tflite_tensor_report(tflite)
  return report["conv_macs"] + report["elementwise_muls"]


def _profile_layer(width, compression, rng, iterations, threads):
  """Latency of one conv layer in each form, and the ops each runs."""
  shape = (32, 32, width)

  def export_one(make, routing=None, remix="slices"):
    inputs = keras.Input(shape)
    layer = make()
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(layer(inputs)))
    model = keras.Model(inputs, h)
    _randomize(model, rng, True)
    if routing == "integer":
      r = layer.routing_map
      layer.set_routing_map(sampling.RoutingMap(*(np.floor(a) for a in r)))
    return export.export_tflite(model, remix=remix)

  def epi():
    return ke.EpitomeConv2D(
      width,
      3,
      padding="same",
      use_bias=False,
      compression=compression,
      channel_roll=FLAGS.channel_roll,
    )

  g = sampling.layer_geometry(
    (3, 3, width, width), compression, channel_roll=FLAGS.channel_roll
  )
  cin_e = g.cin_e
  # The convolution the factored form cannot avoid: Cin_E -> Cout_E per
  # distinct channel roll (all output chunks' rolled epitomes in one conv).
  cout_alone = min(g.cout, len(set(g.in_rolls.tolist())) * g.cout_e)
  files = {
    "stock": export_one(
      lambda: keras.layers.Conv2D(width, 3, padding="same", use_bias=False)
    ),
    "epitome conv alone": _export_conv_alone(cin_e, cout_alone),
    "factored, integer offsets": export_one(epi, "integer"),
    "factored, fractional": export_one(epi),
    "factored/matmul, fractional": export_one(epi, remix="matmul"),
    "factored/fold_slices, fractional": export_one(epi, remix="fold_slices"),
    "factored/fold_matmul, fractional": export_one(epi, remix="fold_matmul"),
    "factored/auto, fractional": export_one(epi, remix="auto"),
  }
  x = rng.uniform(-1, 1, (1,) + shape).astype(np.float32)
  xs = {name: x for name in files}
  xs["epitome conv alone"] = x[..., :cin_e]
  lat = C.litert_latencies(files, threads, iterations, FLAGS.warmup, xs)
  for name, tflite in files.items():
    ops = [op["name"] for op in export.tflite_tensor_report(tflite)["ops"]]
    counts = {o: ops.count(o) for o in sorted(set(ops))}
    print(
      f"| {width} | {name} | {lat[name] * 1e3:7.1f} us ({lat[name] / lat['stock']:.2f}) "
      f"| {len(ops)} | {counts} |",
      flush=True,
    )


def _export_conv_alone(cin_e, cout_e):
  inputs = keras.Input((32, 32, cin_e))
  out = keras.layers.Conv2D(cout_e, 3, padding="same", use_bias=False)(inputs)
  return export.export_tflite(keras.Model(inputs, out))


def main(argv):
  del argv
  if FLAGS.profile:
    rng = np.random.default_rng(FLAGS.seed)
    for t in (int(t) for t in FLAGS.threads):
      print(
        f"# profile, {t} thread(s), compression 4, 32x32, median of {FLAGS.iterations}"
      )
      print("| width | form | latency (vs stock) | ops | op counts |")
      print("|---|---|---|---|---|")
      for width in (int(w) for w in FLAGS.profile_widths):
        _profile_layer(width, 4.0, rng, FLAGS.iterations, t)
    return
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  threads = [int(t) for t in FLAGS.threads]
  cpu = cost_model.host_key()["cpu"]
  when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  commit = _commit()
  print(
    f"# {when}, {cpu} ({platform.machine()}), commit {commit}, "
    f"offsets={FLAGS.offsets}, iterations={FLAGS.iterations}, "
    f"latency statistic={FLAGS.statistic}, cost model: {cost_model.default()}"
  )
  for model_name, variant_name, build_stock, build_epitome, shape in _model_list():
    data = rng.uniform(-1, 1, (16,) + shape).astype(np.float32)
    stock = build_stock()
    _randomize(stock, rng, True)
    stock_files = {}
    for precision in FLAGS.precisions:
      quantize = None if precision == "float" else "int8"
      stock_files[precision] = export.export_tflite(
        stock, quantize=quantize, representative_data=data
      )
    for c in (float(c) for c in FLAGS.compressions):
      model = build_epitome(stock, c)
      if model_name != "mobilenetv2":
        # (MobileNetV2 is a conversion: it keeps the routing maps and the
        # BatchNorms epitomize gave it from the stock model.)
        _randomize(model, rng, FLAGS.offsets == "fractional")
      summary = ke.summarize(model, print_fn=None)
      for precision in FLAGS.precisions:
        quantize = None if precision == "float" else "int8"
        files = {"stock": stock_files[precision]}
        if FLAGS.materialized:
          files["materialized"] = export.export_tflite(
            model, form="materialized", quantize=quantize, representative_data=data
          )
        forms_of = {}
        for variant in FLAGS.remix:
          # "auto:size": remix="auto" with objective="size".
          remix, _, objective = variant.partition(":")
          report = []
          files[f"factored/{variant}"] = export.export_tflite(
            model,
            quantize=quantize,
            representative_data=data,
            remix=remix,
            choose=FLAGS.choose,
            form_report=report,
            objective=objective or "latency",
          )
          if report:
            forms = [r.form for r in report]
            forms_of[f"factored/{variant}"] = {f: forms.count(f) for f in set(forms)}
            print(
              f"# {variant_name} {c:g}x {precision} remix={variant}: "
              + ", ".join(f"{f} x{forms.count(f)}" for f in sorted(set(forms)))
              + " ("
              + " ".join(f"{r.layer}={r.form}" for r in report)
              + ")",
              flush=True,
            )
        # Parity of the first factored file against the Keras model.
        y = model(data[:2], training=False).numpy()
        first = f"factored/{FLAGS.remix[0]}"
        err = np.abs(export.run_tflite(files[first], data[:2]) - y).max()
        err /= np.abs(y).max()
        stat = np.median if FLAGS.statistic == "median" else np.min
        lat = {
          t: C.litert_latencies(
            files, t, FLAGS.iterations, FLAGS.warmup, data[:1], stat
          )
          for t in threads
        }
        for form, tflite in files.items():
          row = dict(
            model=variant_name,
            compression=c,
            params_ratio=summary.compression_ratio,
            precision=precision,
            form=form,
            bytes=len(tflite),
            macs=_macs(tflite),
            factored_rel_err=float(err),
            forms=forms_of.get(form),
            cpu=cpu,
            commit=commit,
            date=when,
            iterations=FLAGS.iterations,
            statistic=FLAGS.statistic,
          )
          for t in threads:
            row[f"ms_{t}t"] = lat[t][form]
          rows.append(row)
          stock_row = next(
            r
            for r in rows
            if r["model"] == variant_name
            and r["compression"] == c
            and r["precision"] == precision
            and r["form"] == "stock"
          )
          row["bytes_ratio"] = row["bytes"] / stock_row["bytes"]
          for t in threads:
            row[f"latency_ratio_{t}t"] = row[f"ms_{t}t"] / stock_row[f"ms_{t}t"]
          ratios = [
            f"{row['bytes'] / 1024:8.1f} KB ({row['bytes_ratio']:.3f})",
            f"{row['macs'] / 1e6:8.2f} M ({row['macs'] / stock_row['macs']:.3f})",
          ] + [
            f"{row[f'ms_{t}t']:7.3f} ms ({row[f'latency_ratio_{t}t']:.2f})"
            for t in threads
          ]
          print(
            f"| {variant_name} | {c:g} | {precision} | {form} | "
            + " | ".join(ratios)
            + " |",
            flush=True,
          )
        if FLAGS.json_out:
          _append_rows(rows[-len(files) :])
  if FLAGS.summary:
    _print_summary(rows, threads[0])


def _model_list():
  """``(name, label, build stock, build epitome from (stock, c), input shape)``."""
  out = []
  for name in FLAGS.models:
    if name == "resnet":
      for w in [int(w) for w in (FLAGS.widths or [FLAGS.width])]:
        out.append(
          _layer_model(name, f"resnet_w{w}", functools.partial(resnet, width=w))
        )
    elif name == "audio":
      out.append(_layer_model(name, "audio", audio_cnn))
    elif name == "mobilenetv2":
      for size in [int(v) for v in FLAGS.mobilenet_sizes]:

        def epitomize(stock, c):
          return ke.epitomize(stock, compression=c, verbose=False)

        out.append(
          (
            name,
            f"mobilenetv2_a0.35_{size}",
            functools.partial(mobilenetv2, size),
            epitomize,
            (size, size, 3),
          )
        )
    else:
      raise ValueError(f"unknown model {name!r}")
  return out


def _layer_model(name, label, build):
  _, stock_cls, epitome_cls, shape = MODELS[name]

  def build_epitome(stock, c):
    del stock

    def conv(*args, **kwargs):
      return epitome_cls(
        *args, compression=c, channel_roll=FLAGS.channel_roll, **kwargs
      )

    return build(conv)

  return (name, label, lambda: build(stock_cls), build_epitome, shape)


def _commit():
  if FLAGS.commit:
    return FLAGS.commit
  return C.git_commit()


def _append_rows(rows):
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
  with open(FLAGS.json_out, "a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _print_summary(rows, t):
  """File-size and latency ratios vs stock: size first and speed first."""
  names = {
    "factored/auto": "speed-first (default)",
    "factored/auto:size": "size-first (objective='size')",
  }
  print(f"\n# ratios vs stock in the same run, LiteRT {t} thread(s)")
  print("| model | x | precision | export | forms | file | latency |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if r["form"] == "stock":
      continue
    forms = ", ".join(f"{f} {n}" for f, n in sorted((r["forms"] or {}).items()))
    print(
      f"| {r['model']} | {r['compression']:g} | {r['precision']} | "
      f"{names.get(r['form'], r['form'])} | {forms} | {r['bytes_ratio']:.3f}x | "
      f"{r[f'latency_ratio_{t}t']:.2f}x |"
    )


if __name__ == "__main__":
  app.run(main)
