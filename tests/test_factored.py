"""Tests for the factored inference form (keras_epitome/factored.py).

Every check compares the factored form (``R_out(conv(R_in(x), E))``) with the
training-time layer's inference output, ``model(x, training=False)``, at
float32 tolerance (1e-5 relative to the output's scale).
"""

import dataclasses
import os
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from absl.testing import parameterized

import keras_epitome as ke

# The form choice of these tests need not learn this CPU: without a cached
# calibration, the bundled constants (tests/test_export_cost_model.py checks
# the calibration).
os.environ.setdefault("KERAS_EPITOME_CALIBRATE", "0")
from keras_epitome import factored, sampling

keras = ke.keras

LAYERS = {
  "conv1d": ke.EpitomeConv1D,
  "conv2d": ke.EpitomeConv2D,
  "dense": ke.EpitomeDense,
}

# (name, layer, kwargs, input shape)
CASES = [
  # Integer offsets, chunks that divide the channels.
  (
    "conv2d_int",
    "conv2d",
    dict(filters=16, kernel_size=3, padding="same", epitome_shape=(3, 3, 4, 8)),
    (2, 7, 7, 8),
  ),
  # Partial chunks on both sides, fractional offsets, stride 2, valid.
  (
    "conv2d_partial_strided",
    "conv2d",
    dict(filters=20, kernel_size=3, strides=2, epitome_shape=(3, 3, 6, 8)),
    (2, 9, 9, 14),
  ),
  # Spatial slack on both axes (several windows), dilation, relu, no bias.
  (
    "conv2d_slack_dilated",
    "conv2d",
    dict(
      filters=20,
      kernel_size=3,
      dilation_rate=2,
      epitome_shape=(5, 4, 6, 8),
      activation="relu",
      use_bias=False,
    ),
    (2, 11, 11, 14),
  ),
  # Rectangular kernel, slack on one axis, same padding with stride.
  (
    "conv2d_rect",
    "conv2d",
    dict(
      filters=12,
      kernel_size=(1, 3),
      strides=(2, 1),
      padding="same",
      epitome_shape=(1, 6, 5, 5),
    ),
    (2, 7, 8, 10),
  ),
  (
    "conv1d_causal",
    "conv1d",
    dict(
      filters=20,
      kernel_size=5,
      padding="causal",
      dilation_rate=2,
      epitome_shape=(9, 7, 6),
      activation="tanh",
    ),
    (2, 30, 13),
  ),
  (
    "conv1d_same_strided",
    "conv1d",
    dict(filters=16, kernel_size=4, strides=3, padding="same", epitome_shape=(4, 8, 4)),
    (2, 31, 16),
  ),
  # WSNet's layout: Cout_E = 1, filters strided along a long epitome.
  (
    "conv1d_wsnet",
    "conv1d",
    dict(filters=6, kernel_size=3, epitome_shape=(8, 4, 1), sampler="fixed"),
    (2, 20, 4),
  ),
  ("dense", "dense", dict(units=20, epitome_shape=(7, 6)), (3, 13)),
  (
    "dense_3d",
    "dense",
    dict(units=10, epitome_shape=(4, 4), activation="relu"),
    (2, 5, 9),
  ),
  ("dense_ratio", "dense", dict(units=32, compression=4), (3, 32)),
]


def _rand_routing(layer, rng, integer=False):
  g = layer.epitome_geometry
  routing = sampling.RoutingMap(
    rng.uniform(0, g.cin_e, g.num_in_chunks),
    rng.uniform(0, g.cout_e, g.num_out_chunks),
    rng.uniform(0, 1, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
  )
  if integer:
    routing = sampling.RoutingMap(*(np.floor(r) for r in routing))
  layer.set_routing_map(routing)


def _model(kind, kwargs, input_shape, batchnorm=False, seed=0):
  rng = np.random.default_rng(seed)
  inputs = keras.Input(input_shape[1:])
  layer = LAYERS[kind](**kwargs)
  y = layer(inputs)
  if batchnorm:
    bn = keras.layers.BatchNormalization()
    y = bn(y)
    values = bn.get_weights()
    bn.set_weights(
      [
        rng.uniform(0.5, 2.0, v.shape) if i in (0, 3) else rng.standard_normal(v.shape)
        for i, v in enumerate(values)
      ]
    )
  model = keras.Model(inputs, y)
  if layer.use_bias:
    layer.bias.assign(rng.standard_normal(layer.bias.shape))
  return model, layer


class FactoredLayerTest(tf.test.TestCase, parameterized.TestCase):
  def _assert_same(self, a, b):
    a, b = np.asarray(a), np.asarray(b)
    self.assertEqual(a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()))
    self.assertLess(float(np.abs(a - b).max()), 1e-5 * scale)

  @parameterized.named_parameters(
    [
      (f"{name}_{mode}_{remix}", kind, kwargs, shape, mode, remix)
      for name, kind, kwargs, shape in CASES
      for mode in ("integer", "fractional")
      for remix in factored.FORMS
    ]
  )
  def test_factored_equals_layer(self, kind, kwargs, shape, mode, remix):
    """Factored form == layer inference output, and == the materialized form."""
    model, layer = _model(kind, kwargs, shape)
    rng = np.random.default_rng(1)
    if layer.sampler == "learned":
      _rand_routing(layer, rng, integer=(mode == "integer"))
    elif mode == "fractional":
      self.skipTest("the fixed sampler has integer offsets")
    x = rng.standard_normal(shape).astype(np.float32)
    fast = ke.factorize(model, remix=remix)
    self.assertIsInstance(fast.layers[-1], factored.FACTORED_LAYERS)
    self.assertEqual(fast.layers[-1].remix, remix.replace("fold_", ""))
    y = model(x, training=False)
    self._assert_same(fast(x), y)
    # The materialized form (stock layer holding the sampled kernel) agrees too.
    stock = factored._materialize_layer(layer)
    self._assert_same(stock(x), y)

  @parameterized.named_parameters(
    (
      "conv2d",
      "conv2d",
      dict(
        filters=20,
        kernel_size=3,
        padding="same",
        epitome_shape=(4, 3, 6, 8),
        use_bias=False,
      ),
      (2, 8, 8, 14),
    ),
    (
      "conv1d",
      "conv1d",
      dict(filters=20, kernel_size=5, padding="causal", epitome_shape=(5, 7, 6)),
      (2, 30, 13),
    ),
    ("dense", "dense", dict(units=20, epitome_shape=(7, 6)), (3, 13)),
    ("dense_square", "dense", dict(units=16, epitome_shape=(16, 16)), (3, 16)),
  )
  def test_batchnorm_folded(self, kind, kwargs, shape):
    """A following BatchNorm is folded: fewer layers, same output."""
    model, layer = _model(kind, kwargs, shape, batchnorm=True)
    _rand_routing(layer, np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    report = []
    fast = ke.factorize(model, report=report, remix="slices")
    names = [type(lay).__name__ for lay in fast.layers]
    self.assertNotIn("BatchNormalization", names)
    self.assertEqual(report, [(layer.name, f"Factored{type(layer).__name__[7:]}")])
    self._assert_same(fast(x), model(x, training=False))
    unfolded = ke.factorize(model, fold_batchnorm=False, remix="slices")
    self.assertIn("BatchNormalization", [type(lay).__name__ for lay in unfolded.layers])
    self._assert_same(unfolded(x), model(x, training=False))

  def test_sequential_resnet_block_and_nested(self):
    """Sequential (BN dropped), functional with a skip (BN shared output), nesting."""
    rng = np.random.default_rng(4)
    inner = keras.Sequential(
      [
        keras.Input((8, 8, 16)),
        ke.EpitomeConv2D(16, 3, padding="same", use_bias=False, compression=4),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
      ]
    )
    inputs = keras.Input((8, 8, 16))
    h = inner(inputs)
    conv = ke.EpitomeConv2D(16, 3, padding="same", compression=2)
    c = conv(h)
    bn = keras.layers.BatchNormalization()
    b = bn(c)
    out = keras.layers.Add()([b, c])  # conv output has two consumers: no fold
    model = keras.Model(inputs, out)
    for lay in (inner.layers[0], conv):
      _rand_routing(lay, rng)
    for norm in (inner.layers[1], bn):
      norm.set_weights([rng.uniform(0.5, 2, w.shape) for w in norm.get_weights()])
    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    fast = ke.factorize(model, remix="slices")
    self._assert_same(fast(x), model(x, training=False))
    fast_inner = fast.layers[1]
    self.assertEqual(
      [type(lay).__name__ for lay in fast_inner.layers], ["FactoredConv2D", "ReLU"]
    )
    self.assertIn("BatchNormalization", [type(lay).__name__ for lay in fast.layers])

  def test_feature_learner_uses_moving_routing_map(self):
    """The inference form reads the moving routing map, not a training batch's."""
    rng = np.random.default_rng(5)
    inputs = keras.Input((8, 8, 8))
    layer = ke.EpitomeConv2D(16, 3, padding="same", compression=4, learner="feature")
    model = keras.Model(inputs, layer(inputs))
    x = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    moving = layer.moving_offsets.numpy()
    layer.moving_offsets.assign(moving + rng.uniform(0.1, 0.9, moving.shape))
    fast = ke.factorize(model, remix="slices")
    self._assert_same(fast(x), model(x, training=False))
    self.assertNotIn("offset_learner", [w.name for w in fast.weights])

  @parameterized.named_parameters(("one_window", 0, 0.4), ("rolled", 1, 0.6))
  def test_macs_match_geometry(self, channel_roll, bound):
    """With fractional offsets, MACs are the geometry's count.

    ``channel_roll=0`` runs one window (``Cin_E x Cout_E`` convolution); the
    default roll runs one per distinct roll (here ``B = 2``).
    """
    inputs = keras.Input((8, 8, 32))
    layer = ke.EpitomeConv2D(
      32, 3, padding="same", compression=4, channel_roll=channel_roll
    )
    model = keras.Model(inputs, layer(inputs))
    g = layer.epitome_geometry
    layer.set_routing_map(
      sampling.RoutingMap(
        np.full(g.num_in_chunks, 0.5), np.full(g.num_out_chunks, 1.25), None
      )
    )
    fast = ke.factorize(model, remix="slices").layers[-1]
    self.assertEqual(fast.macs_per_position(), g.macs_per_position()["factored"])
    self.assertLess(fast.macs_per_position(), bound * g.macs_per_position()["stock"])

  def test_config_and_saving_round_trip(self):
    model, layer = _model("conv2d", CASES[1][2], CASES[1][3], batchnorm=False)
    _rand_routing(layer, np.random.default_rng(6))
    fast = ke.factorize(model, remix="slices")
    x = np.random.default_rng(7).standard_normal(CASES[1][3]).astype(np.float32)
    y = fast(x).numpy()
    flayer = fast.layers[-1]
    clone = type(flayer).from_config(flayer.get_config())
    clone(x)
    clone.set_weights(flayer.get_weights())
    self.assertAllClose(clone(x), y, atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
      for name in ("m.keras", "m.h5"):
        path = os.path.join(tmp, name)
        fast.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.layers[-1], ke.FactoredConv2D)
        self.assertAllClose(loaded(x), y, atol=1e-6)

  def test_groups_fall_back_to_materialized(self):
    model, layer = _model(
      "conv2d", dict(filters=8, kernel_size=3, groups=2, compression=2), (2, 6, 6, 8)
    )
    x = np.random.default_rng(8).standard_normal((2, 6, 6, 8)).astype(np.float32)
    fast = ke.factorize(model, remix="slices")
    self.assertIs(type(fast.layers[-1]), keras.layers.Conv2D)
    self._assert_same(fast(x), model(x, training=False))
    with self.assertRaisesRegex(ValueError, "groups=2 has no factored form"):
      ke.factorize(model, fallback="error")

  def test_bad_input(self):
    unbuilt = ke.EpitomeDense(8, compression=2)
    with self.assertRaisesRegex(ValueError, "not built"):
      ke.FactoredDense.from_epitome_layer(unbuilt)
    model, layer = _model("dense", dict(units=8, compression=2), (2, 8))
    with self.assertRaisesRegex(ValueError, "not an epitome layer of rank 2"):
      ke.FactoredConv2D.from_epitome_layer(layer)
    layer.epitome.assign(np.full(layer.epitome.shape, np.nan, np.float32))
    with self.assertRaisesRegex(ValueError, "non-finite"):
      ke.factorize(model)
    with self.assertRaisesRegex(ValueError, "fallback must be"):
      ke.factorize(model, fallback="ignore")
    # A pruning wrapper is training-only state: strip it first.
    inputs = keras.Input((8,))
    pruned = tfmot.sparsity.keras.prune_low_magnitude(ke.EpitomeDense(8, compression=2))
    wrapped = keras.Model(inputs, pruned(inputs))
    with self.assertRaisesRegex(ValueError, "strip_pruning"):
      ke.factorize(wrapped)
    with self.assertRaisesRegex(ValueError, "input has 5 channels, expected 8"):
      fast = ke.FactoredDense.from_epitome_layer(
        _model("dense", dict(units=8, compression=2), (2, 8))[1]
      )
      fast(np.zeros((1, 5), np.float32))

  def test_previous_release_configs_load(self):
    # get_config of the previous release (13 flat arguments, before
    # LayerPlan), for the model below: the same config today, and it loads.
    model = _old_config_model()
    fast = ke.factorize(model, remix="slices")
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 10)).astype(np.float32)
    for name, old in OLD_CONFIGS.items():
      layer = fast.get_layer(old["name"])
      self.assertEqual(type(layer).__name__, name)
      config = layer.get_config()
      config.pop("dtype")
      self.assertEqual(config, old)
      clone = type(layer).from_config(dict(old))
      self.assertEqual(clone.plan, layer.plan)
      self.assertIsInstance(clone.plan, factored.LayerPlan)
    # A saved model in the old config form loads and computes the same.
    y = fast(x).numpy()
    loaded = keras.models.model_from_json(fast.to_json())
    loaded.set_weights(fast.get_weights())
    self.assertAllClose(loaded(x), y, atol=1e-6)

  def test_layers_take_one_plan(self):
    model = _old_config_model()
    fast = ke.factorize(model, remix="slices")
    layer = fast.get_layer("c")
    plan = layer.plan
    direct = ke.FactoredConv2D(plan, padding="same", name="direct")
    self.assertEqual(direct.get_config()["in_shift"], list(plan.in_shift))
    self.assertEqual(factored.LayerPlan.pop_config(plan.config("units"), "units"), plan)
    with self.assertRaisesRegex(TypeError, "missing plan argument"):
      ke.FactoredDense(units=4, input_channels=4)
    with self.assertRaisesRegex(ValueError, "in_shift has 1 entries, expected 3"):
      ke.FactoredConv2D(dataclasses.replace(plan, in_shift=(0,)))

  def test_roll_slices_and_plan(self):
    for size in (1, 4, 7):
      for shift in range(-size, 2 * size):
        for length in range(1, size + 1):
          idx = np.concatenate(
            [np.arange(a, b) for a, b in sampling.roll_slices(shift, size, length)]
          )
          np.testing.assert_array_equal(idx, (np.arange(length) + shift) % size)
    # The plan's pre-roll leaves the most common shift at zero.
    g = sampling.EpitomeGeometry((3, 12, 12), (3, 4, 4))
    r = sampling.RoutingMap(
      np.array([2.0, 2.0, 1.5]), np.array([3.0, 1.0, 3.0]), np.zeros((3, 1))
    )
    plan = sampling.factored_plan(np.zeros((3, 4, 4)), r, g)
    self.assertEqual(plan.in_shift.tolist(), [0, 0, 3])
    self.assertEqual(plan.out_shift.tolist(), [0, 2, 0])


OLD_CONFIGS = {
  "FactoredConv2D": {
    "name": "c",
    "trainable": True,
    "input_channels": 10,
    "epitome_shape": [3, 3, 4, 8],
    "num_windows": 2,
    "window_of_chunk": [0, 1],
    "in_shift": [2, 1, 0],
    "in_frac": [0.547846794128418, 0.0791468620300293, 0.16389410197734833],
    "out_shift": [0, 6],
    "out_frac": [0.13222108781337738, 0.5061616897583008],
    "use_scale": False,
    "use_bias": True,
    "activation": "linear",
    "remix": "slices",
    "window_rolls": [0, 1],
    "filters": 12,
    "strides": [1, 1],
    "padding": "same",
    "dilation_rate": [1, 1],
  },  # noqa: E501
  "FactoredDense": {
    "name": "d",
    "trainable": True,
    "input_channels": 12,
    "epitome_shape": [4, 4],
    "num_windows": 2,
    "window_of_chunk": [0, 1],
    "in_shift": [0, 0, 1],
    "in_frac": [0.7402896881103516, 0.2634141445159912, 0.010954000987112522],
    "out_shift": [3, 0],
    "out_frac": [0.42961716651916504, 0.13434229791164398],
    "use_scale": False,
    "use_bias": True,
    "activation": "linear",
    "remix": "slices",
    "window_rolls": [0, 1],
    "units": 6,
  },  # noqa: E501
}


def _old_config_model():
  """The model whose factored configs are :data:`OLD_CONFIGS`."""
  rng = np.random.default_rng(0)
  inputs = keras.Input((6, 6, 10))
  conv = ke.EpitomeConv2D(12, 3, padding="same", epitome_shape=(3, 3, 4, 8), name="c")
  dense = ke.EpitomeDense(6, epitome_shape=(4, 4), name="d")
  h = conv(inputs)
  out = dense(keras.layers.GlobalAveragePooling2D()(h))
  model = keras.Model(inputs, out)
  for layer in (conv, dense):
    g = layer.epitome_geometry
    layer.set_routing_map(
      sampling.RoutingMap(
        rng.uniform(0, g.cin_e, g.num_in_chunks),
        rng.uniform(0, g.cout_e, g.num_out_chunks),
        rng.uniform(0, 1, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
      )
    )
  return model


if __name__ == "__main__":
  tf.test.main()
