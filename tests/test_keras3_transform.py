"""Tests for the Keras 3 transforms (keras_epitome.keras3): epitomize and back.

Runs on the Keras 3 TensorFlow backend (the default); JAX and PyTorch run in
a child process with TensorFlow unimportable
(``tests/keras3_transform_backend_check.py``), which also loads a ``.keras``
file saved here.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import keras_epitome
import keras_epitome.keras3 as ke
from keras_epitome.keras3 import harden

# The directory holding the package (the checkout, or a snapshot of it).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_epitome.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _sequential():
  return keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
      keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c2"),
      keras.layers.BatchNormalization(name="bn"),
      keras.layers.DepthwiseConv2D(3, name="dw"),
      keras.layers.Flatten(name="flat"),
      keras.layers.Dense(64, activation="relu", name="d1"),
      keras.layers.Dense(10, name="d2"),
    ],
    name="seq",
  )


def _residual():
  """A functional model holding a nested functional ResNet block (Add)."""
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
  y = keras.layers.Conv2D(16, 1, name="proj")(x)
  x = keras.layers.Add(name="add")([x, y])
  x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
  out = keras.layers.Dense(10, name="fc")(x)
  return keras.Model(inp, out, name="resnet")


def _x(n=16, shape=(8, 8, 3), seed=0):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype("float32")


def _out(model, x):
  return np.asarray(model(x, training=False))


def _names(model):
  return sorted(layer.name for layer in ke.epitome_layers(model))


def _randomize_bn(model):
  for layer in model._flatten_layers(include_self=False):
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.set_weights(
        [np.random.default_rng(1).uniform(0.5, 1.5, w.shape) for w in layer.weights]
      )


def test_sequential_policy_skip_min_params():
  model = _sequential()
  _randomize_bn(model)
  small = ke.epitomize(
    model, 4, policy={"d2": {"compression": 2.0, "learner": "feature"}}, verbose=False
  )
  # c1 (216 entries) and d2 (640) are below min_params=1024; the policy names d2.
  assert _names(small) == ["c2", "d1", "d2"]
  assert type(small.get_layer("c1")) is keras.layers.Conv2D
  assert small.get_layer("d2").learner == "feature"
  report = small.epitome_report
  kept = {k.name: k.reason for k in report.kept}
  assert kept["c1"] == "kernel has 216 entries < min_params=1024"
  assert "no epitome layer for this type" in kept["dw"]
  assert {c.name: c.init for c in report.converted} == dict.fromkeys(
    ["c2", "d1", "d2"], "fit"
  )
  # Non-kernel weights are copied; the input model is unchanged.
  np.testing.assert_array_equal(
    small.get_layer("bn").get_weights()[0], model.get_layer("bn").get_weights()[0]
  )
  np.testing.assert_array_equal(
    small.get_layer("c2").bias.numpy(), model.get_layer("c2").bias.numpy()
  )
  assert not ke.epitome_layers(model)

  small = ke.epitomize(
    model,
    4,
    skip=("d1",),
    policy=lambda layer: 8.0 if layer.name == "c2" else None,
    verbose=0,
  )
  assert _names(small) == ["c2"]
  assert small.epitome_report.converted[0].compression_ratio > 7
  assert {k.name: k.reason for k in small.epitome_report.kept}["d1"] == "in skip"
  assert _names(ke.epitomize(model, 4, min_params=0, verbose=False)) == [
    "c1",
    "c2",
    "d1",
    "d2",
  ]


def test_residual_nested_fit_strip_save():
  model = _residual()
  small = ke.epitomize(model, 4, min_params=0, skip=("proj",), verbose=False)
  assert _names(small) == ["b_c1", "b_c2", "fc", "stem"]
  block = small.get_layer("block")
  assert isinstance(block, keras.Model) and block is not model.get_layer("block")
  assert type(block.get_layer("b_c2")) is ke.EpitomeConv2D
  assert type(small.get_layer("proj")) is keras.layers.Conv2D
  np.testing.assert_array_equal(
    small.get_layer("proj").kernel.numpy(), model.get_layer("proj").kernel.numpy()
  )

  x, y = _x(32), np.arange(32) % 10
  small.compile(
    keras.optimizers.Adam(1e-2),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  layer = block.get_layer("b_c2")
  offsets0 = layer.in_offsets.numpy().copy()
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  losses = [float(loss_fn(y, _out(small, x)))]
  for _ in range(3):
    small.train_on_batch(x, y)
    losses.append(float(loss_fn(y, _out(small, x))))
  assert losses[-1] < losses[0], losses
  assert np.abs(layer.in_offsets.numpy() - offsets0).max() > 0

  y_e = _out(small, x)
  stock = ke.strip_epitome(small)
  assert not ke.epitome_layers(stock)
  assert type(stock.get_layer("block").get_layer("b_c2")) is keras.layers.Conv2D
  np.testing.assert_allclose(_out(stock, x), y_e, atol=1e-5)

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
  np.testing.assert_array_equal(_out(loaded, x), y_e)
  assert _names(loaded) == _names(small)


def test_shared_layer_stays_shared():
  inp1, inp2 = keras.Input((16,)), keras.Input((16,))
  shared = keras.layers.Dense(64, name="shared")
  out = keras.layers.Add()([shared(inp1), shared(inp2)])
  model = keras.Model([inp1, inp2], out)
  small = ke.epitomize(model, 4, min_params=0, verbose=False)
  assert len(ke.epitome_layers(small)) == 1
  a, b = _x(4, (16,), 1), _x(4, (16,), 2)
  stock = ke.strip_epitome(small)
  np.testing.assert_allclose(stock([a, b]), small([a, b]), atol=1e-5)


def test_fit_init_closer_than_random():
  model = _sequential()
  fit = ke.epitomize(model, 4, init="fit", verbose=False)
  rnd = ke.epitomize(model, 4, init="random", verbose=False)
  for name in ("c2", "d1"):
    k = model.get_layer(name).kernel.numpy()

    def err(m, k=k, name=name):
      return np.linalg.norm(m.get_layer(name).kernel.numpy() - k) / np.linalg.norm(k)

    assert err(fit) < err(rnd), name
    record = {c.name: c for c in fit.epitome_report.converted}[name]
    assert record.fit_error == pytest.approx(err(fit), rel=1e-4)
  assert {c.init for c in rnd.epitome_report.converted} == {"random"}


def test_summarize_totals():
  model = _sequential()
  small = ke.epitomize(model, 4, verbose=False)
  lines = []
  summary = ke.summarize(small, print_fn=lines.append)
  assert summary.total_params == small.count_params()
  assert summary.stock_params == model.count_params()
  assert summary.compression_ratio == pytest.approx(
    model.count_params() / small.count_params()
  )
  by_name = {r.name: r for r in summary.layers}
  assert by_name["c1"].sampler == "stock"
  c2 = by_name["c2"]
  assert c2.epitome_shape == small.get_layer("c2").epitome_geometry.epitome_shape
  assert c2.output_positions == 64
  assert c2.macs_materialized == 3 * 3 * 8 * 32 * 64
  assert any("Total params" in line for line in lines)
  assert any("c2 (EpitomeConv2D)" in line for line in lines)


def test_harden_routing():
  model = ke.epitomize(_residual(), 4, min_params=0, verbose=False)
  for layer in ke.epitome_layers(model):  # fractional offsets, as after training
    r = layer.routing_map
    layer.set_routing_map(
      ke.RoutingMap(r.in_offsets + 0.3, r.out_offsets + 0.6, r.spatial_offsets)
    )
  changes = {}
  hard = ke.harden_routing(model, report=changes)
  assert _names(hard) == _names(model)
  assert set(changes) == set(_names(model))
  for layer in ke.epitome_layers(hard):
    assert layer.sampler == "fixed"
    for arr in layer.routing_map:
      np.testing.assert_array_equal(arr, np.round(arr))
  x = _x(8)
  assert np.all(np.isfinite(_out(hard, x)))
  # In place, keeping the sampler.
  layer = ke.epitome_layers(model)[0]
  change = ke.harden_layer(layer)
  assert 0 <= change < 1.5 and layer.sampler == "learned"
  with pytest.raises(ValueError, match="no Keras 3 epitome layers.*epitomize"):
    ke.harden_routing(_sequential())
  with pytest.raises(ValueError, match="not a Keras 3 epitome layer"):
    harden.hardened_values(keras.layers.Dense(3))


def test_distill_lowers_gap():
  keras.utils.set_random_seed(0)
  teacher = keras.Sequential(
    [
      keras.Input((16,)),
      keras.layers.Dense(64, activation="relu"),
      keras.layers.Dense(10),
    ]
  )
  student = ke.epitomize(teacher, 8, min_params=0, verbose=False)
  x = _x(256, (16,))
  teacher_weights = [w.copy() for w in teacher.get_weights()]

  def gap():
    return float(np.mean((_out(student, x) - _out(teacher, x)) ** 2))

  before = gap()
  history = ke.distill(student, teacher, x, epochs=3, learning_rate=1e-2, verbose=0)
  assert sorted(history.history) == ["agreement", "loss"]
  assert gap() < before
  for a, b in zip(teacher_weights, teacher.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)
  y = np.arange(256) % 10
  history = ke.distill(student, teacher, (x, y), alpha=0.5, verbose=0)
  assert "accuracy" in history.history
  with pytest.raises(ValueError, match="alpha must be in"):
    ke.distill(student, teacher, x, alpha=2)
  with pytest.raises(ValueError, match="outputs shape"):
    ke.distill(
      student, keras.Sequential([keras.Input((16,)), keras.layers.Dense(3)]), x
    )


def test_errors():
  model = _sequential()
  with pytest.raises(ValueError, match=r"\['nope'\] match no layer of model 'seq'"):
    ke.epitomize(model, policy={"nope": 2})
  with pytest.raises(ValueError, match="policy for layer 'd1' must be a compression"):
    ke.epitomize(model, policy={"d1": "big"})
  with pytest.raises(ValueError, match=r"policy for layer 'd1' has unknown.*'ratio'"):
    ke.epitomize(model, policy={"d1": {"ratio": 2}})
  with pytest.raises(ValueError, match="epitomize: layer 'd2': .*too large"):
    ke.epitomize(model, policy={"d2": 1e6}, verbose=False)
  with pytest.raises(
    ValueError, match="compression must be a finite number >= 1, got 0"
  ):
    ke.epitomize(model, 0)
  with pytest.raises(ValueError, match="unknown init 'zeros'"):
    ke.epitomize(model, init="zeros")
  with pytest.raises(ValueError, match="unknown sampler"):
    ke.epitomize(model, sampler="magic")
  with pytest.raises(ValueError, match="min_params must be an int"):
    ke.epitomize(model, min_params=-1)
  with pytest.raises(
    ValueError, match="layer 'd1': EpitomeDense 'd1': unknown sampler 'magic'; valid"
  ):
    ke.epitomize(model, policy={"d1": {"sampler": "magic"}}, verbose=False)
  channels_first = keras.Sequential(
    [keras.Input((8, 10, 10)), keras.layers.Conv2D(16, 3, data_format="channels_first")]
  )
  kept = ke.epitomize(
    channels_first, 2, min_params=0, verbose=False
  ).epitome_report.kept
  assert "channels_first" in kept[0].reason
  # A ratio too large for one kernel leaves it stock when nobody asked for it.
  small = ke.epitomize(model, 1000, min_params=0, verbose=False)
  assert "too large" in {k.name: k.reason for k in small.epitome_report.kept}["d2"]

  class Sub(keras.Model):
    def call(self, x):
      return x

  for fn in (ke.epitomize, ke.strip_epitome, ke.summarize, ke.harden_routing):
    with pytest.raises(ValueError, match="subclassed"):
      fn(Sub())
  with pytest.raises(ValueError, match="materialize_layer takes a Keras 3 epitome"):
    ke.materialize_layer(keras.layers.Dense(3))
  with pytest.raises(ValueError, match="not built"):
    ke.materialize_layer(ke.EpitomeDense(3, compression=2))


def test_keras2_model_refused():
  k2 = pytest.importorskip("tf_keras")
  model = k2.Sequential([k2.Input((4,)), k2.layers.Dense(3)])
  for fn, name in (
    (ke.epitomize, "epitomize"),
    (ke.strip_epitome, "strip_epitome"),
    (ke.summarize, "summarize"),
    (ke.harden_routing, "harden_routing"),
  ):
    with pytest.raises(ValueError, match=rf"Keras 2.*keras_epitome\.{name}\b"):
      fn(model)
  with pytest.raises(ValueError, match=r"Keras 2.*keras_epitome\.distill"):
    ke.distill(model, model, _x(4, (4,)))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backend_and_fresh_process_load(backend):
  """On JAX or PyTorch without TensorFlow: epitomize, fit, strip, save, harden,
  distill; and a .keras file saved here loads in that fresh process within 1e-5."""
  pytest.importorskip(backend)
  small = ke.epitomize(_residual(), 4, min_params=0, verbose=False)
  x = _x(8)
  with tempfile.TemporaryDirectory() as tmp:
    small.save(os.path.join(tmp, "model.keras"))
    np.save(os.path.join(tmp, "x.npy"), x)
    np.save(os.path.join(tmp, "y.npy"), _out(small, x))
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=PACKAGE_ROOT)
    out = subprocess.run(
      [sys.executable, os.path.join(TESTS, "keras3_transform_backend_check.py"), tmp],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
    )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["backend"] == backend
  assert result["tf_file_load_diff"] < 1e-5
  assert result["strip_diff"] < 1e-5
  assert result["losses"][-1] < result["losses"][0]


def test_unbuilt_built_by_call_and_mixed_precision():
  x = _x(4, (16,))
  unbuilt = keras.Sequential([keras.layers.Dense(64), keras.layers.Dense(32)])
  small = ke.epitomize(unbuilt, 4, min_params=0, verbose=False)
  assert [c.init for c in small.epitome_report.converted] == ["random", "random"]
  assert tuple(small(x).shape) == (4, 32)
  with pytest.raises(ValueError, match="init='fit' needs a built model"):
    ke.epitomize(unbuilt, 4, init="fit")
  by_call = keras.Sequential([keras.layers.Dense(64), keras.layers.Dense(32)])
  by_call(x)
  small = ke.epitomize(by_call, 4, min_params=0, verbose=False)
  assert [c.init for c in small.epitome_report.converted] == ["fit", "fit"]
  np.testing.assert_allclose(
    _out(ke.strip_epitome(small), x), _out(small, x), atol=1e-5
  )

  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    mixed = keras.Sequential(
      [keras.Input((16,)), keras.layers.Dense(64), keras.layers.Dense(32)]
    )
  finally:
    keras.mixed_precision.set_global_policy("float32")
  small = ke.epitomize(mixed, 4, min_params=0, verbose=False)
  layer = small.layers[0]
  assert layer.dtype_policy.name == "mixed_float16" and layer.epitome.dtype == "float32"
  stock = ke.strip_epitome(small)
  assert stock.layers[0].dtype_policy.name == "mixed_float16"
  np.testing.assert_allclose(_out(stock, x), _out(small, x), atol=1e-2)


def test_wrapped_layers_reported_and_copied():
  model = keras.Sequential(
    [
      keras.Input((5, 16)),
      keras.layers.TimeDistributed(keras.layers.Dense(64), name="td"),
      keras.layers.Dense(64, name="d"),
    ]
  )
  small = ke.epitomize(model, 4, min_params=0, verbose=False)
  assert _names(small) == ["d"]
  assert "layers inside wrappers stay stock" in small.epitome_report.kept[0].reason
  x = _x(2, (5, 16))
  np.testing.assert_array_equal(_out(small.layers[0], x), _out(model.layers[0], x))
