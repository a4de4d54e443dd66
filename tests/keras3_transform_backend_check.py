"""The Keras 3 transforms on another backend, with TensorFlow and Keras 2 unimportable.

Run by ``tests/test_keras3_transform.py`` in a subprocess (the Keras backend
is fixed per process); by hand:

  KERAS_BACKEND=jax python tests/keras3_transform_backend_check.py [DIR]
  KERAS_BACKEND=torch python tests/keras3_transform_backend_check.py [DIR]

With ``DIR``, it first loads ``DIR/model.keras`` (saved on the TensorFlow
backend by the test) in this fresh process and checks its predictions on
``DIR/x.npy`` against ``DIR/y.npy`` (within 1e-5).
TensorFlow, ``tf_keras`` and TF-MOT are made unimportable first (as on a
machine with JAX or PyTorch alone), so an import of either from :mod:`keras_epitome.keras3`
fails the check. Prints one JSON line of measurements; exits non-zero on a
failed check.
"""

import json
import os
import sys
import tempfile

for _name in ("tensorflow", "tf_keras", "tensorflow_model_optimization"):
  sys.modules[_name] = None  # `import` raises ImportError, find_spec gives None
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_epitome.keras3 as ke  # noqa: E402


def residual_model():
  inner_in = keras.Input((8, 8, 16))
  h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="b_c1")(
    inner_in
  )
  h = keras.layers.Conv2D(16, 3, padding="same", name="b_c2")(h)
  h = keras.layers.Add(name="b_add")([inner_in, h])
  block = keras.Model(inner_in, h, name="block")
  inp = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inp)
  x = block(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(10, name="fc")(x)
  return keras.Model(inp, out, name="resnet")


def _out(model, x):
  return keras.ops.convert_to_numpy(model(x, training=False))


def check_load(directory):
  model = keras.models.load_model(os.path.join(directory, "model.keras"))
  x = np.load(os.path.join(directory, "x.npy"))
  y = np.load(os.path.join(directory, "y.npy"))
  diff = float(np.abs(_out(model, x) - y).max())
  assert diff < 1e-5, diff
  assert ke.epitome_layers(model), "no epitome layers after loading"
  return diff


def main():
  assert keras.backend.backend() != "tensorflow", keras.backend.backend()
  assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
  loaded_diff = check_load(sys.argv[1]) if len(sys.argv) > 1 else None
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
  y = rng.integers(0, 10, size=64)
  teacher = residual_model()
  model = ke.epitomize(
    teacher, 4, min_params=0, policy={"fc": None}, skip=("stem",), verbose=False
  )
  names = sorted(layer.name for layer in ke.epitome_layers(model))
  assert names == ["b_c1", "b_c2"], names
  fit_errors = [c.fit_error for c in model.epitome_report.converted]
  layer = model.get_layer("block").get_layer("b_c2")
  offsets0 = np.asarray(layer.in_offsets.numpy()).copy()
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  model.compile(keras.optimizers.Adam(1e-2), loss_fn)
  losses = [float(loss_fn(y, _out(model, x)))]
  for _ in range(3):
    model.train_on_batch(x, y)
    losses.append(float(loss_fn(y, _out(model, x))))
  moved = float(np.abs(np.asarray(layer.in_offsets.numpy()) - offsets0).max())
  assert losses[-1] < losses[0], losses
  assert moved > 0, moved
  stock = ke.strip_epitome(model)
  assert not ke.epitome_layers(stock)
  y_e = _out(model, x)
  strip_diff = float(np.abs(_out(stock, x) - y_e).max())
  assert strip_diff < 1e-5, strip_diff
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
  load_diff = float(np.abs(_out(loaded, x) - y_e).max())
  assert load_diff == 0.0, load_diff
  hard = ke.harden_routing(model)
  for h in ke.epitome_layers(hard):
    for arr in h.routing_map:
      assert np.array_equal(arr, np.round(arr)), arr
  summary = ke.summarize(model, print_fn=None)
  student = ke.epitomize(teacher, 8, min_params=0, init="fit", verbose=False)

  def gap():
    return float(np.mean((_out(student, x) - _out(teacher, x)) ** 2))

  gap0 = gap()
  history = ke.distill(
    student, teacher, x, epochs=3, batch_size=16, learning_rate=1e-2, verbose=0
  )
  assert sorted(history.history) == ["agreement", "loss"], history.history
  gap1 = gap()
  assert gap1 < gap0, (gap0, gap1)
  print(
    json.dumps(
      dict(
        backend=keras.backend.backend(),
        tf_file_load_diff=loaded_diff,
        converted=names,
        fit_errors=fit_errors,
        losses=losses,
        offsets_moved=moved,
        strip_diff=strip_diff,
        load_diff=load_diff,
        summary_ratio=summary.compression_ratio,
        distill_gap=[gap0, gap1],
        distill_history=history.history,
      )
    )
  )


if __name__ == "__main__":
  main()
