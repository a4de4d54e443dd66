"""Keras 3 epitome layers: one device against two, on the TF or JAX backend (a child process).

Two devices on one CPU must be configured before the backend initializes, so
``tests/test_keras3_distribute.py`` runs this script in a fresh process:

* ``KERAS_BACKEND=tensorflow python tests/keras3_distribute_check.py``: trains
  under ``tf.distribute.MirroredStrategy`` over two logical CPU devices;
* ``KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2
  python tests/keras3_distribute_check.py``: trains under
  ``keras.distribution.DataParallel`` over two host CPU devices.

Each run also trains the same model, from the same weights and on the same
batches, on one device, and prints a JSON line with the largest differences
of the weights and the losses.
"""

import json
import os

import keras
import numpy as np

import keras_epitome.keras3 as ke

STEPS = 3
GLOBAL_BATCH = 8


def build(learner):
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
  # SGD: identical updates on one device and on two (Adam's epsilon would
  # amplify all-reduce rounding in the first step).
  model.compile(keras.optimizers.SGD(0.1), "mse")
  return model


def train(model, x, y):
  history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
  return history.history["loss"], [np.asarray(w) for w in model.get_weights()]


def main():
  backend = keras.backend.backend()
  rng = np.random.default_rng(0)
  x = rng.random((GLOBAL_BATCH * STEPS, 6, 6, 4)).astype("float32")
  y = rng.random((GLOBAL_BATCH * STEPS, 4)).astype("float32")
  if backend == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
      cpu,
      [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
  report = {"backend": backend}
  strategy = None
  if backend == "tensorflow":
    import tensorflow as tf

    # One strategy per process: a second one reuses collective instance keys.
    strategy = tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")]
    )
  for learner in os.environ.get("LEARNERS", "param,feature").split(","):
    single = build(learner)
    weights = single.get_weights()
    loss1, w1 = train(single, x, y)
    if strategy is not None:
      with strategy.scope():
        multi = build(learner)
      devices = strategy.num_replicas_in_sync
    else:
      import jax

      devices = len(jax.devices())
      keras.distribution.set_distribution(keras.distribution.DataParallel())
      multi = build(learner)
    multi.set_weights(weights)
    loss2, w2 = train(multi, x, y)
    if backend != "tensorflow":
      keras.distribution.set_distribution(None)
    report[learner] = {
      "devices": devices,
      "max_weight_diff": max(
        float(np.abs(a - b).max()) for a, b in zip(w1, w2, strict=True)
      ),
      "max_weight_change": max(
        float(np.abs(a - b).max()) for a, b in zip(weights, w1, strict=True)
      ),
      "loss_diff": max(abs(a - b) for a, b in zip(loss1, loss2, strict=True)),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
