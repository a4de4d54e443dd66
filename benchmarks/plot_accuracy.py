r"""Plots accuracy against stored parameters from ``benchmarks/accuracy.py`` results.

One column per data set, one line per method (mean ± std over seeds as error
bars), the stock model as a star. Top row: against stored parameters (pruning
counts its non-zeros); bottom row: against the zipped ``.tflite`` file (the
epitome models in their factored form), which charges pruning for its sparse
indices the way TF-MOT's guide compares sizes. Needs matplotlib (the ``plot``
extra).

Usage:
  python -m benchmarks.plot_accuracy \
      --results=benchmarks/results/results_fashion_issue9.jsonl,benchmarks/results/results_fsdd_issue9.jsonl \
      --out=benchmarks/results/accuracy.png
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from absl import app, flags

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FLAGS = flags.FLAGS
flags.DEFINE_list(
  "results",
  [
    os.path.join(HERE, "results_fashion_issue9.jsonl"),
    os.path.join(HERE, "results_fsdd_issue9.jsonl"),
  ],
  "JSON-lines files written by accuracy.py.",
)
flags.DEFINE_string("out", os.path.join(HERE, "accuracy.png"), "Output image.")

TITLES = {
  "fashion_mnist": "Fashion-MNIST (small CNN)",
  "fsdd": "FSDD raw audio (1D CNN)",
  "digits": "sklearn digits",
}
STYLE = {
  "nes_param": ("NES (param learner)", "tab:red", "o"),
  "nes_feature": ("NES (feature learner)", "tab:orange", "s"),
  "wsnet": ("WSNet (fixed sampling)", "tab:blue", "^"),
  "thinner": ("thinner stock (width mult.)", "tab:green", "v"),
  "pruning": ("TF-MOT magnitude pruning", "tab:purple", "D"),
}


def load(paths):
  by_dataset = collections.defaultdict(list)
  for path in paths:
    if not os.path.exists(path):
      print(f"skip missing {path}")
      continue
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        by_dataset[r["dataset"]].append(r)
  return by_dataset


def aggregate(records, size_key):
  """{method: [(ratio, mean size, mean acc, std acc, seeds)]} sorted by size."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["method"], r["ratio"])].append(r)
  lines = collections.defaultdict(list)
  for (method, ratio), rs in groups.items():
    acc = np.array([r["accuracy"] for r in rs]) * 100
    params = np.mean([r.get(size_key, np.nan) for r in rs])
    std = acc.std(ddof=1) if len(acc) > 1 else 0.0
    lines[method].append((ratio, params, acc.mean(), std, len(rs)))
  for m in lines:
    lines[m].sort(key=lambda t: t[1])
  return lines


def main(argv):
  del argv
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  data = load(FLAGS.results)
  if not data:
    raise SystemExit("no results to plot")
  rows = (("stored_params", "stored parameters (inference)"),)
  if all("tflite_zipped" in r for recs in data.values() for r in recs):
    rows += (("tflite_zipped", "zipped .tflite bytes (factored form)"),)
  fig, axes = plt.subplots(
    len(rows), len(data), figsize=(6.2 * len(data), 4.4 * len(rows)), squeeze=False
  )
  for col, (dataset, records) in enumerate(sorted(data.items())):
    for row, (size_key, xlabel) in enumerate(rows):
      ax = axes[row][col]
      lines = aggregate(records, size_key)
      for method, (label, color, marker) in STYLE.items():
        if method not in lines:
          continue
        pts = lines[method]
        ax.errorbar(
          [p[1] for p in pts],
          [p[2] for p in pts],
          yerr=[p[3] for p in pts],
          label=label,
          color=color,
          marker=marker,
          capsize=3,
          linewidth=1.5,
        )
      if "stock" in lines:
        _, size, acc, std, _ = lines["stock"][0]
        ax.errorbar(
          [size],
          [acc],
          yerr=[std],
          color="black",
          marker="*",
          markersize=12,
          label="stock",
        )
      seeds = max(p[4] for pts in lines.values() for p in pts)
      ax.set_xscale("log")
      ax.set_xlabel(xlabel)
      ax.set_ylabel("test accuracy (%)")
      ax.set_title(f"{TITLES.get(dataset, dataset)}, mean ± std of {seeds} seeds")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=110)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
