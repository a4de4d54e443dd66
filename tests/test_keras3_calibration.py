"""The data-aware conversion and allocate for Keras 3 models (TensorFlow backend).

``keras_epitome.keras3.epitomize(..., calibration_data=...)`` goes through
Keras 2 and back (:mod:`keras_epitome.keras3.bridge`): these tests check the
bridge (same function, same names, the errors for what it cannot carry), that
the Keras 3 conversion equals the Keras 2 conversion of the same model, and
that on the JAX backend it refuses with the way forward (a child process with
TensorFlow unimportable).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_epitome
import keras_epitome as ke2
import keras_epitome.keras3 as ke
from keras_epitome.calibration import CalibrationConfig
from keras_epitome.keras3 import bridge
from keras_epitome.keras3 import transform as t3

L = keras.layers
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_epitome.__file__)))

pytestmark = pytest.mark.skipif(
  keras.backend.backend() != "tensorflow", reason="Keras 3 TensorFlow backend"
)

# Few samples and gradient steps: the tests check the plumbing, not the fit.
CONFIG = CalibrationConfig(output_steps=5, batch_size=64)


def _x(n, shape, seed=0):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype("float32")


def _randomize_batchnorms(model, seed=1):
  """Non-trivial BatchNorm statistics, so that inference mode is tested."""
  rng = np.random.default_rng(seed)
  for layer in model._flatten_layers(include_self=False):
    if isinstance(layer, L.BatchNormalization):
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, w.shape).astype("float32")
          if i in (0, 3)
          else rng.normal(0, 0.3, w.shape).astype("float32")
          for i, w in enumerate(layer.get_weights())
        ]
      )


def _max_diff(k3_model, k2_model, x):
  a = np.asarray(k3_model(x, training=False))
  b = np.asarray(k2_model(x, training=False))
  return float(np.abs(a - b).max())


def _leaf_names(model):
  """Layer names, nested models (Keras 3 or 2) looked through, inputs left out."""
  names = []
  for layer in model.layers:
    if hasattr(layer, "layers"):
      names += _leaf_names(layer)
    elif type(layer).__name__ != "InputLayer":
      names.append(layer.name)
  return sorted(set(names))


# ----------------------------------------------------------------------------
# The bridge.


def test_to_keras2_sequential_cnn_with_batchnorm():
  model = keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      L.Conv2D(8, 3, padding="same", use_bias=False, name="c1"),
      L.BatchNormalization(name="bn1"),
      L.ReLU(name="r1"),
      L.DepthwiseConv2D(3, padding="same", name="dw"),
      L.SeparableConv2D(12, 3, activation="relu6", name="sep"),
      L.AveragePooling2D(2, name="ap"),
      L.Dropout(0.3, name="drop"),
      L.Flatten(name="flat"),
      L.Dense(16, activation="gelu", kernel_regularizer="l2", name="d1"),
      L.LayerNormalization(name="ln"),
      L.Dense(5, activation="softmax", name="out"),
    ],
    name="seq",
  )
  _randomize_batchnorms(model)
  k2 = bridge.to_keras2(model)
  assert isinstance(k2, ke2.keras.Model)
  assert k2.name == "seq"
  assert _leaf_names(k2) == _leaf_names(model)
  assert type(k2.get_layer("bn1")).__name__ == "BatchNormalization"
  assert len(k2.losses) == 1  # the L2 regularizer came along
  assert _max_diff(model, k2, _x(4, (8, 8, 3))) < 1e-5


def _resnet_block():
  """A functional model: residual Add, a nested functional block used twice
  (shared), a nested Sequential, Concatenate, Multiply, an epitome layer."""
  inner_in = keras.Input((8, 8, 8))
  h = L.Conv2D(8, 3, padding="same", name="b_c1")(inner_in)
  h = L.BatchNormalization(name="b_bn")(h)
  h = L.Activation("relu", name="b_relu")(h)
  h = L.Conv2D(8, 3, padding="same", name="b_c2")(h)
  h = L.Add(name="b_add")([inner_in, h])
  block = keras.Model(inner_in, h, name="block")
  head = keras.Sequential(
    [
      keras.Input((8, 8, 16)),
      L.ZeroPadding2D(1, name="h_pad"),
      L.MaxPooling2D(name="h_pool"),
      L.Rescaling(0.5, offset=0.1, name="h_scale"),
      ke.EpitomeConv2D(16, 3, compression=4, learner="feature", name="h_epi"),
      L.GlobalAveragePooling2D(name="h_gap"),
    ],
    name="head",
  )
  inp = keras.Input((8, 8, 3), name="image")
  x = L.Conv2D(8, 1, name="stem")(inp)
  y = block(x)
  z = block(y)  # the block shared between two call sites
  gate = L.Conv2D(8, 1, activation="sigmoid", name="gate")(x)
  z = L.Multiply(name="mul")([z, gate])
  x = L.Concatenate(name="cat")([y, z])
  x = head(x)
  x = L.Reshape((4, 4), name="reshape")(x)
  x = L.Flatten(name="flat")(x)
  out = L.Dense(10, name="out")(x)
  model = keras.Model(inp, out, name="resnet")
  _randomize_batchnorms(model)
  return model


def test_to_keras2_functional_residual_nested_shared():
  model = _resnet_block()
  x = _x(4, (8, 8, 3))
  model(x, training=True)  # the feature learner's layers see data
  k2 = bridge.to_keras2(model)
  assert _leaf_names(k2) == _leaf_names(model)
  # The shared block's layers are shared in the Keras 2 model too.
  assert len(k2.get_layer("b_c1")._inbound_nodes) == 2
  assert isinstance(k2.get_layer("h_epi"), ke2.EpitomeConv2D)
  assert _max_diff(model, k2, x) < 1e-5


def test_to_keras2_embedding_conv1d():
  model = keras.Sequential(
    [
      keras.Input((12,), dtype="int32"),
      L.Embedding(50, 8, name="emb"),
      L.Conv1D(16, 3, activation="tanh", name="c1"),
      L.GlobalAveragePooling1D(name="gap"),
      L.Dense(3, name="out"),
    ]
  )
  x = np.random.default_rng(0).integers(0, 50, (4, 12)).astype("int32")
  assert _max_diff(model, bridge.to_keras2(model), x) < 1e-5


def test_from_keras2_weights_copies_by_name():
  model = _resnet_block()
  k2 = bridge.to_keras2(model)
  rng = np.random.default_rng(3)
  for layer in k2.layers:
    if layer.name in ("stem", "b_c1", "h_epi", "b_bn"):
      layer.set_weights(
        [w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in layer.get_weights()]
      )
  copied = bridge.from_keras2_weights(model, k2)
  assert {"stem", "b_c1", "h_epi", "b_bn", "out"} <= set(copied)
  assert _max_diff(model, k2, _x(4, (8, 8, 3))) < 1e-5


class Doubling(L.Layer):
  def call(self, x):
    return 2.0 * x


def _swish_ish(x):
  return x * keras.ops.sigmoid(x)


def test_unsupported_layers_and_ops_are_named():
  custom = keras.Sequential([keras.Input((6,)), L.Dense(4), Doubling(name="twice")])
  with pytest.raises(ValueError, match=r"'twice' \(Doubling\).*both Keras versions"):
    bridge.to_keras2(custom)
  act = keras.Sequential(
    [keras.Input((6,)), L.Dense(4, activation=_swish_ish, name="d")]
  )
  with pytest.raises(ValueError, match=r"'d' \(Dense\).*activation '_swish_ish'"):
    bridge.to_keras2(act)
  # Same name, other function: Keras 3's hard_sigmoid is not Keras 2's.
  hard = keras.Sequential(
    [keras.Input((6,)), L.Dense(4, activation="hard_sigmoid", name="h")]
  )
  with pytest.raises(ValueError, match="'hard_sigmoid'.*computes differently"):
    bridge.to_keras2(hard)
  inp = keras.Input((6,))
  h = L.Dense(4, name="d")(inp)
  ops_model = keras.Model(inp, keras.ops.add(h, h))
  with pytest.raises(ValueError, match=r"operation 'add(_\d+)?' \(Add\).*not a layer"):
    bridge.to_keras2(ops_model)
  # epitomize(calibration_data=...) says the same, before converting anything.
  with pytest.raises(ValueError, match="'twice' \\(Doubling\\)"):
    ke.epitomize(custom, calibration_data=_x(8, (6,)), verbose=False)
  rms = keras.Sequential([keras.Input((6,)), L.LayerNormalization(rms_scaling=True)])
  with pytest.raises(ValueError, match="rms_scaling=True"):
    bridge.to_keras2(rms)


# ----------------------------------------------------------------------------
# The data-aware conversion.


@pytest.fixture(scope="module")
def trained():
  """A small CNN trained briefly on sklearn's 8x8 digits, and its data."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype("float32")[..., None]
  y = digits.target
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((8, 8, 1)),
      L.Conv2D(16, 3, padding="same", name="c1"),
      L.BatchNormalization(name="bn1"),
      L.ReLU(name="r1"),
      L.Conv2D(32, 3, padding="same", activation="relu", name="c2"),
      L.MaxPooling2D(name="pool"),
      L.Flatten(name="flat"),
      L.Dense(64, activation="relu", name="d1"),
      L.Dense(10, name="out"),
    ],
    name="cnn",
  )
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x[:1200], y[:1200], epochs=2, batch_size=64, verbose=0)
  return model, x[:256], x[1500:1628]


def _relative(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_data_aware_conversion_equals_keras2(trained):
  model, x_cal, x_test = trained
  small = ke.epitomize(
    model, 4, calibration_data=x_cal, calibration=CONFIG, verbose=False
  )
  assert isinstance(small, keras.Sequential)
  assert [type(layer).__name__ for layer in small.layers] == [
    "Conv2D",
    "BatchNormalization",
    "ReLU",
    "EpitomeConv2D",
    "MaxPooling2D",
    "Flatten",
    "EpitomeDense",
    "Dense",
  ]
  report = small.epitome_report
  assert {c.name for c in report.converted} == {"c2", "d1"}
  assert all(c.init == "data" for c in report.converted)
  assert report.calibration  # the Keras 2 conversion's records
  # The same conversion on Keras 2 gives the same model.
  keras2 = ke2.epitomize(
    bridge.to_keras2(model),
    4,
    calibration_data=x_cal,
    calibration=CONFIG,
    verbose=False,
  )
  assert _max_diff(small, keras2, x_test) < 1e-4
  # Much closer to the trained model than the weight fit without data.
  original = np.asarray(model(x_test, training=False))
  data_error = _relative(np.asarray(small(x_test, training=False)), original)
  fit = ke.epitomize(model, 4, init="fit", verbose=False)
  fit_error = _relative(np.asarray(fit(x_test, training=False)), original)
  assert data_error < 0.6 * fit_error, (data_error, fit_error)
  # The result is a plain Keras 3 model: it strips and trains as one.
  stock = ke.strip_epitome(small)
  assert _max_diff(stock, small, x_test) < 1e-4


def test_data_aware_conversion_of_nested_shared_model():
  # Nested models (one shared) and an epitome layer the model already has.
  model = _resnet_block()
  x = _x(32, (8, 8, 3))
  config = CalibrationConfig(output_steps=0, batch_size=32)
  small = ke.epitomize(
    model, 4, calibration_data=x, calibration=config, min_params=0, verbose=False
  )
  assert isinstance(small.get_layer("block").get_layer("b_c1"), ke.EpitomeConv2D)
  assert isinstance(small.get_layer("head").get_layer("h_epi"), ke.EpitomeConv2D)
  assert isinstance(small.get_layer("gate"), ke.EpitomeConv2D)
  keras2 = ke2.epitomize(
    bridge.to_keras2(model),
    4,
    calibration_data=x,
    calibration=config,
    min_params=0,
    verbose=False,
  )
  assert _max_diff(small, keras2, x) < 1e-4


def test_allocate(trained):
  model, x_cal, x_test = trained
  # Ratios up to 4 * compression are tried on every layer: one layer and a
  # small compression keep it short.
  small = ke.epitomize(
    model,
    1.2,
    calibration_data=x_cal[:64],
    calibration=CONFIG,
    allocate=True,
    skip=("c2",),
    verbose=False,
  )
  assert set(small.epitome_report.allocation.policy) == {"d1"}
  allocation = small.epitome_report.allocation
  assert allocation is not None and allocation.stored <= allocation.budget
  chosen = {name for name, ratio in allocation.policy.items() if ratio is not None}
  assert {c.name for c in small.epitome_report.converted} == chosen
  assert np.isfinite(np.asarray(small(x_test, training=False))).all()
  plan = t3.allocate(
    model, 4, x_cal, candidates=(8.0,), skip=("c2",), verbose=False, max_samples=64
  )
  assert set(plan.policy) == {"d1"}
  # The plan is a Keras 3 epitomize policy (here without data).
  ke.epitomize(model, 4, policy=plan.policy, verbose=False)


def test_calibration_arguments_checked(trained):
  model, x_cal, _ = trained
  with pytest.raises(ValueError, match="calibration must be a"):
    ke.epitomize(model, calibration_data=x_cal, calibration={"ridge": 1.0})
  with pytest.raises(ValueError, match="allocate=True needs calibration_data"):
    ke.epitomize(model, allocate=True)
  with pytest.raises(ValueError, match="channel_roll"):
    ke.epitomize(model, calibration_data=x_cal, channel_roll=2)


_JAX_CHILD = """
import sys
for name in ("tensorflow", "tf_keras", "tensorflow_model_optimization"):
  sys.modules[name] = None  # a JAX-only machine
import keras, numpy as np
import keras_epitome.keras3 as ke
from keras_epitome.keras3 import transform
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(64, name="d")])
x = np.zeros((4, 6), "float32")
for call in (lambda: ke.epitomize(model, 4, calibration_data=x),
             lambda: ke.epitomize(model, 4, calibration_data=x, allocate=True),
             lambda: transform.allocate(model, 4, x)):
  try:
    call()
  except ValueError as e:
    print("ValueError:", e)
  else:
    print("no error")
"""


def test_jax_backend_says_to_convert_on_tensorflow():
  pytest.importorskip("jax")
  env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=PACKAGE_ROOT)
  out = subprocess.run(
    [sys.executable, "-c", _JAX_CHILD],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line]
  assert len(lines) == 3, out.stdout
  for line in lines:
    assert line.startswith("ValueError:"), line
    assert "needs the TensorFlow backend" in line
    assert "KERAS_BACKEND=tensorflow" in line and "'jax'" in line
