"""One worker of a two-process MultiWorkerMirroredStrategy run; used by test_distribute.py.

Run as a script in its own process with ``TF_CONFIG`` describing the cluster
(two workers on 127.0.0.1): trains the same small epitome model as
:func:`train_single` for a few steps on the same global batches, sharded
across the workers, and writes the trained weights to ``--out`` (``.npz``).

Usage:
  TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:p0", "127.0.0.1:p1"]},
              "task": {"type": "worker", "index": 0}}' \
    python tests/multi_worker_check.py --out /tmp/w0.npz
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf

import keras_epitome as ke  # noqa: I001  (selects Keras 2 first)

keras = ke.keras

STEPS = 3
GLOBAL_BATCH = 8
LEARNERS = ("param", "feature")


def data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((STEPS * GLOBAL_BATCH, 6, 6, 4)).astype(np.float32)
  y = rng.standard_normal((STEPS * GLOBAL_BATCH, 4)).astype(np.float32)
  return x, y


def build_model(learner: str):
  """The model, with fixed initial weights (fractional offsets included)."""
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((6, 6, 4)),
      ke.EpitomeConv2D(
        8, 3, padding="same", activation="relu", compression=2, learner=learner
      ),
      keras.layers.GlobalAveragePooling2D(),
      ke.EpitomeDense(4, compression=2, learner=learner),
    ]
  )
  rng = np.random.default_rng(1)
  for layer in model.layers:
    if not isinstance(layer, ke.EPITOME_LAYERS):
      continue
    routing = layer.routing_map
    layer.set_routing_map(
      routing._replace(
        in_offsets=routing.in_offsets + rng.uniform(0.1, 0.9, routing.in_offsets.shape),
        out_offsets=routing.out_offsets
        + rng.uniform(0.1, 0.9, routing.out_offsets.shape),
      )
    )
  return model


def train(model):
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  x, y = data()
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
    tf.data.experimental.AutoShardPolicy.DATA
  )
  model.fit(ds.with_options(options), epochs=1, verbose=0)
  return {f"{i}": w for i, w in enumerate(model.get_weights())}


def train_single(learner: str):
  """The reference: one process, one replica, the same global batches."""
  return train(build_model(learner))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  arrays = {}
  for learner in LEARNERS:
    with strategy.scope():
      model = build_model(learner)
    for key, value in train(model).items():
      arrays[f"{learner}/{key}"] = value
  arrays["num_replicas"] = np.asarray(strategy.num_replicas_in_sync)
  np.savez(args.out, **arrays)


if __name__ == "__main__":
  main()
