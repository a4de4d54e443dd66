r"""Calibrates the LiteRT cost model of the export form choice (form_choice.py).

Every epitome layer of the benchmark models (``benchmarks/inference.py``:
ResNet at widths 32 and 64, the audio CNN; random fractional routing maps) is
built in each candidate form (slices, matmul, materialized, BatchNorm folded),
converted as a one-layer model and timed with LiteRT (1 thread, interleaved,
median), in float and int8. The script then fits, per precision,
``latency = mac * MACs + elem * elements + op * ops + intercept`` by least
squares (one intercept per layer absorbs the model's fixed invoke and I/O
cost, equal for all candidates of a layer; ``keras_epitome.cost_model.fit``),
prints the constants for ``cost_model.BUNDLED_COST_US`` and how often the
fitted model picks the measured-fastest candidate (and what a wrong pick
costs). ``keras_epitome.cost_model.calibrate`` is the short version of this
that runs on the user's machine (a few probe layers) and caches its result.

Usage:
  python -m benchmarks.calibrate_export --compressions=4 \
      --json_out=/tmp/calib.jsonl
  python -m benchmarks.calibrate_export --from_json=/tmp/calib.jsonl
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from benchmarks import (
  inference as bench,  # benchmarks/inference.py (selects Keras 2 first)
)
from keras_epitome import cost_model, export, factored_model, form_choice

# --precisions, --compressions, --json_out and --seed are inference.py's flags.
FLAGS = flags.FLAGS
flags.DEFINE_string("from_json", None, "Fit from earlier measurements instead.")

MODELS = [("resnet", 32), ("resnet", 64), ("audio", 64)]


def _layers(c, rng):
  for name, width in MODELS:
    build, _, epitome_cls, _ = bench.MODELS[name]

    def conv(*args, cls=epitome_cls, **kwargs):
      return cls(*args, compression=c, **kwargs)

    model = build(conv, width=width)
    # bench._randomize reads FLAGS of inference.py only through its arguments.
    bench._randomize(model, rng, True)  # noqa: SLF001
    pairs = factored_model._foldable_pairs(model)  # noqa: SLF001
    for layer in export.epitome_layers(model):
      yield f"{name}{width}/{layer.name}", layer, pairs.get(id(layer))


def measure():
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  for c in (float(c) for c in FLAGS.compressions):
    for tag, layer, bn in _layers(c, rng):
      for precision in FLAGS.precisions:
        _, record = form_choice.choose_layer_form(
          layer, bn, precision=precision, choose="measure"
        )
        for form, feats in record.features.items():
          row = dict(
            layer=tag,
            compression=c,
            precision=precision,
            form=form,
            us=record.measured_us[form],
            **feats,
          )
          rows.append(row)
        print(tag, precision, record, flush=True)
  return rows


def fit(rows):
  """Fits the constants as :func:`keras_epitome.cost_model.fit` (one intercept per layer)."""
  rows = [dict(r, probe=f"{r['layer']}/{r['form']}") for r in rows]
  constants = cost_model.fit(rows)
  for precision, c in constants.items():
    print(
      f"{precision}: mac={c['mac']:.3g} us, elem={c['elem']:.3g} us, op={c['op']:.3g} us"
    )
    sub = [r for r in rows if r["precision"] == precision]
    # How often the fitted model picks the measured-fastest candidate.
    layers = sorted({r["layer"] for r in sub})
    right, loss, best_us, picked_us = 0, [], 0.0, 0.0
    for name in layers:
      cand = [r for r in sub if r["layer"] == name]
      est = {
        r["form"]: c["mac"] * r["macs"] + c["elem"] * r["elements"] + c["op"] * r["ops"]
        for r in cand
      }
      meas = {r["form"]: r["us"] for r in cand}
      pick = min(est, key=est.get)
      best = min(meas, key=meas.get)
      right += pick == best
      loss.append(meas[pick] / meas[best])
      best_us += meas[best]
      picked_us += meas[pick]
    print(
      f"  picks the measured-fastest form for {right}/{len(layers)} layers; "
      f"a wrong pick costs at most {max(loss):.2f}x the fastest; sum over "
      f"layers: {picked_us:.0f} us picked vs {best_us:.0f} us best"
    )


def main(argv):
  del argv
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      rows = [json.loads(line) for line in f]
  else:
    rows = measure()
    if FLAGS.json_out:
      with open(FLAGS.json_out, "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
  fit(rows)


if __name__ == "__main__":
  app.run(main)
