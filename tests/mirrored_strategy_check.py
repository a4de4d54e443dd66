"""Trains a small model on one device and under MirroredStrategy; prints a JSON report.

Run as a script in a fresh process (``test_layers.py`` does): logical CPU
devices must be configured before TensorFlow initializes its devices, which a
test process that already ran TensorFlow cannot do.

Usage:
  python tests/mirrored_strategy_check.py epitome:param:0 epitome:feature:0 \
      epitome:param:1 stock:param:1
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tensorflow as tf

import keras_epitome as ke  # noqa: I001  (selects Keras 2 first)

keras = ke.keras

STEPS = 3
GLOBAL_BATCH = 8


def configure_devices():
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
    cpu,
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
  )
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def build_model(layers: str, learner: str):
  if layers == "stock":
    conv = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")
    dense = keras.layers.Dense(4, name="dense")
  else:
    # "factored": the factored training path (R_out(conv(R_in(x), E))).
    form = "factored" if layers == "factored" else "auto"
    conv = ke.EpitomeConv2D(
      8,
      3,
      padding="same",
      activation="relu",
      compression=2,
      learner=learner,
      name="conv",
      train_form=form,
    )
    dense = ke.EpitomeDense(
      4, compression=2, learner=learner, name="dense", train_form=form
    )
  return keras.Sequential(
    [
      keras.Input((6, 6, 4)),
      conv,
      keras.layers.GlobalAveragePooling2D(),
      dense,
    ]
  )


def train(strategy, layers, learner, jit, init_weights, x, y):
  with strategy.scope():
    model = build_model(layers, learner)
    model.set_weights(init_weights)
    model.compile(
      optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=bool(jit)
    )
  model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
  return model.get_weights(), [w.name for w in model.weights]


def run_case(devices, layers, learner, jit, x, y, rng):
  report = {"layers": layers, "learner": learner, "jit": jit}
  keras.utils.set_random_seed(0)
  init = build_model(layers, learner)
  if layers != "stock":
    for layer in init.layers:
      if isinstance(layer, ke.EPITOME_LAYERS):  # fractional offsets
        g = layer.epitome_geometry
        layer.set_routing_map(
          ke.RoutingMap(
            rng.uniform(0, g.cin_e, g.num_in_chunks),
            rng.uniform(0, g.cout_e, g.num_out_chunks),
            np.zeros((g.num_out_chunks, g.rank)),
          )
        )
  init_weights = init.get_weights()
  kwargs = dict(layers=layers, learner=learner, jit=jit, x=x, y=y)
  try:
    one, names = train(
      tf.distribute.OneDeviceStrategy(devices[0]),
      init_weights=init_weights,
      **kwargs,
    )
    mirrored = tf.distribute.MirroredStrategy(devices)
    report["replicas"] = mirrored.num_replicas_in_sync
    two, _ = train(mirrored, init_weights=init_weights, **kwargs)
  except Exception as e:  # reported, judged by the test
    report["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    return report
  report["max_diff"] = {
    n: float(np.max(np.abs(a - b))) if a.size else 0.0
    for n, a, b in zip(names, one, two, strict=True)
  }
  report["moved"] = {
    n: float(np.max(np.abs(a - b))) if a.size else 0.0
    for n, a, b in zip(names, init_weights, one, strict=True)
  }
  return report


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
    "cases",
    nargs="+",
    help="layers:learner:jit, e.g. epitome:param:0 stock:param:1",
  )
  args = parser.parse_args()
  devices = configure_devices()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((STEPS * GLOBAL_BATCH, 6, 6, 4)).astype(np.float32)
  y = rng.standard_normal((STEPS * GLOBAL_BATCH, 4)).astype(np.float32)
  reports = []
  for case in args.cases:
    layers, learner, jit = case.split(":")
    reports.append(run_case(devices, layers, learner, int(jit), x, y, rng))
  print(json.dumps({"devices": devices, "cases": reports}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
