"""Tests for keras_epitome.layers: the epitome layers as Keras layers.

The shared :func:`layer_test_util.run_layer_test` checks build, call (against
the stock op with the sampled kernel: the *training-time* form), config,
save/load and gradients; the tables below run it over layer types, samplers,
learners and stock arguments.
"""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import oracle
import tensorflow as tf
from absl.testing import parameterized
from layer_test_util import randomize_routing, run_layer_test

import keras_epitome as ke

keras = ke.keras

PAIRS = (
  (ke.EpitomeConv1D, keras.layers.Conv1D),
  (ke.EpitomeConv2D, keras.layers.Conv2D),
  (ke.EpitomeDense, keras.layers.Dense),
)
EPITOME_KWARGS = {
  "compression": None,
  "epitome_shape": None,
  "sampler": "learned",
  "learner": "param",
  "spatial_stride": None,
  "offset_scale": 1.0,
  "routing_momentum": 0.99,
}

# (layer class, constructor kwargs, input shape) for the basic layer of each type.
BASIC = {
  "conv1d": (ke.EpitomeConv1D, dict(filters=6, kernel_size=3), (2, 9, 4)),
  "conv2d": (ke.EpitomeConv2D, dict(filters=6, kernel_size=3), (2, 7, 7, 4)),
  "dense": (ke.EpitomeDense, dict(units=6), (3, 8)),
}


def _x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class SignatureTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(*PAIRS)
  def test_every_stock_parameter_with_its_default(self, epitome_cls, stock_cls):
    ours = inspect.signature(epitome_cls).parameters
    stock = inspect.signature(stock_cls.__init__).parameters
    for name, param in stock.items():
      if name == "self":
        continue
      self.assertIn(name, ours, f"{epitome_cls.__name__} lacks stock arg {name}")
      self.assertEqual(ours[name].default, param.default, name)
      self.assertEqual(ours[name].kind, param.kind, name)
    for name, default in EPITOME_KWARGS.items():
      self.assertEqual(ours[name].default, default, name)
      self.assertEqual(ours[name].kind, inspect.Parameter.KEYWORD_ONLY, name)

  @parameterized.parameters(*PAIRS)
  def test_stock_config_and_defaults_carry_over(self, epitome_cls, stock_cls):
    # Positional args as for the stock layer, defaults as the stock layer's.
    args = (4,) if stock_cls is keras.layers.Dense else (4, 3)
    ours = epitome_cls(*args, compression=2, name="x").get_config()
    stock = stock_cls(*args, name="x").get_config()
    for key, value in stock.items():
      self.assertEqual(ours[key], value, key)

  def test_registry(self):
    for epitome_cls, stock_cls in PAIRS:
      self.assertIs(ke.layers.STOCK_TO_EPITOME[stock_cls], epitome_cls)
      self.assertIsInstance(
        epitome_cls(2, 1, compression=1)
        if epitome_cls is not ke.EpitomeDense
        else epitome_cls(2, compression=1),
        stock_cls,
      )
      name = f"keras_epitome>{epitome_cls.__name__}"
      self.assertIs(keras.saving.get_registered_object(name), epitome_cls)
    self.assertEqual(set(ke.EPITOME_LAYERS), {p[0] for p in PAIRS})


class LayerTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    (f"{name}_{learner}", name, learner)
    for name in BASIC
    for learner in ("param", "feature")
  )
  def test_layer_contract_with_saving(self, name, learner):
    cls, kwargs, shape = BASIC[name]
    run_layer_test(
      self,
      cls,
      dict(kwargs, compression=2, learner=learner),
      shape,
      tmp_dir=self.get_temp_dir(),
    )

  @parameterized.named_parameters(
    ("conv1d_strides_same", ke.EpitomeConv1D, dict(strides=2, padding="same")),
    ("conv1d_causal", ke.EpitomeConv1D, dict(padding="causal", dilation_rate=2)),
    ("conv1d_groups", ke.EpitomeConv1D, dict(groups=2)),
    (
      "conv2d_strides",
      ke.EpitomeConv2D,
      dict(strides=(2, 1), padding="same", activation="relu"),
    ),
    ("conv2d_dilation", ke.EpitomeConv2D, dict(dilation_rate=2, use_bias=False)),
    ("conv2d_groups", ke.EpitomeConv2D, dict(groups=2, padding="same")),
    ("dense_activation", ke.EpitomeDense, dict(activation="tanh", use_bias=False)),
  )
  def test_stock_arguments(self, cls, extra):
    name = {
      ke.EpitomeConv1D: "conv1d",
      ke.EpitomeConv2D: "conv2d",
      ke.EpitomeDense: "dense",
    }[cls]
    _, kwargs, shape = BASIC[name]
    layer = run_layer_test(
      self, cls, dict(kwargs, **extra, compression=2), shape, saving=False
    )
    for key, value in extra.items():
      got = getattr(layer, key)
      if key == "activation":
        got = got.__name__
      elif isinstance(got, tuple) and not isinstance(value, tuple):
        got = got[0]
      self.assertEqual(got, value, key)

  @parameterized.named_parameters(
    ("conv1d_slack", ke.EpitomeConv1D, dict(epitome_shape=(5, 2, 3)), (2, 9, 4)),
    (
      "conv2d_slack",
      ke.EpitomeConv2D,
      dict(epitome_shape=(4, 5, 3, 2), kernel_size=3),
      (2, 7, 7, 4),
    ),
    ("dense_explicit", ke.EpitomeDense, dict(epitome_shape=(3, 4)), (3, 8)),
    (
      "conv1d_offset_scale",
      ke.EpitomeConv1D,
      dict(compression=2, offset_scale=10.0),
      (2, 9, 4),
    ),
  )
  def test_explicit_epitome_shapes(self, cls, extra, shape):
    name = {ke.EpitomeConv1D: "conv1d", ke.EpitomeConv2D: "conv2d"}.get(cls, "dense")
    _, kwargs, _ = BASIC[name]
    layer = run_layer_test(self, cls, dict(kwargs, **extra), shape, saving=False)
    if "epitome_shape" in extra:
      self.assertEqual(tuple(layer.epitome.shape), extra["epitome_shape"])

  def test_initializers_regularizers_constraints_apply_to_epitome(self):
    layer = ke.EpitomeConv2D(
      8,
      3,
      compression=2,
      kernel_initializer=keras.initializers.Constant(0.5),
      bias_initializer="ones",
      kernel_regularizer=keras.regularizers.L2(0.1),
      bias_regularizer=keras.regularizers.L1(0.01),
      activity_regularizer=keras.regularizers.L2(0.001),
      kernel_constraint=keras.constraints.NonNeg(),
      bias_constraint=keras.constraints.MaxNorm(0.5, axis=0),
    )
    x = _x((2, 6, 6, 4))
    layer(x)
    self.assertAllClose(layer.epitome, np.full(layer.epitome.shape, 0.5))
    self.assertAllClose(layer.bias, np.ones(8))
    # The weight regularizer sees the stored epitome, not the sampled kernel.
    self.assertLen(layer.losses, 3)
    epitome_l2 = 0.1 * float(tf.reduce_sum(tf.square(layer.epitome)))
    kernel_l2 = 0.1 * float(tf.reduce_sum(tf.square(layer.kernel)))
    self.assertNotAlmostEqual(epitome_l2, kernel_l2, places=2)
    self.assertTrue(
      any(abs(float(loss) - epitome_l2) < 1e-4 for loss in layer.losses),
      [float(v) for v in layer.losses],
    )
    self.assertTrue(any(abs(float(loss) - 0.08) < 1e-6 for loss in layer.losses))
    # Constraints act on the epitome (and bias) after an optimizer step.
    optimizer = keras.optimizers.SGD(10.0)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x))
    grads = tape.gradient(loss, layer.trainable_weights)
    optimizer.apply_gradients(zip(grads, layer.trainable_weights, strict=True))
    self.assertAllGreaterEqual(layer.epitome, 0.0)
    self.assertAllLessEqual(tf.abs(layer.bias), 0.5 + 1e-6)

  def test_initializer_variance_is_the_kernels(self):
    # The epitome is drawn with the kernel's fan-in/fan-out, so the sampled
    # kernel has the variance the initializer intends for the full kernel.
    layer = ke.EpitomeConv2D(128, 3, compression=4, kernel_initializer="he_normal")
    layer(_x((1, 5, 5, 128)))
    fan_in = 3 * 3 * 128
    self.assertAllClose(np.std(layer.kernel.numpy()), np.sqrt(2 / fan_in), rtol=0.1)

  def test_kernel_property_routing_map_and_ratio(self):
    layer = ke.EpitomeConv2D(10, 3, epitome_shape=(4, 3, 3, 4))
    layer(_x((1, 6, 6, 7)))
    g = layer.epitome_geometry
    self.assertEqual((g.cin, g.cout, g.num_in_chunks, g.num_out_chunks), (7, 10, 3, 3))
    routing = randomize_routing(layer, seed=3)
    # Offsets outside the range come back wrapped (channels) / clipped (space).
    layer.set_routing_map(
      routing._replace(in_offsets=routing.in_offsets + 3 * np.array([1, -2, 4]))
    )
    got = layer.routing_map
    self.assertAllClose(got.in_offsets, routing.in_offsets, atol=1e-5)
    self.assertAllClose(got.out_offsets, routing.out_offsets, atol=1e-5)
    self.assertAllClose(got.spatial_offsets, routing.spatial_offsets, atol=1e-6)
    self.assertEqual(got.spatial_offsets.shape, (3, 2))
    for arr in got:
      self.assertIsInstance(arr, np.ndarray)
    expected = oracle.sample_kernel(layer.epitome.numpy(), got, g)
    self.assertAllClose(layer.kernel, expected, atol=1e-5)
    # Stored parameters: epitome + routing map, as the ratio says.
    stored = 4 * 3 * 3 * 4 + 3 + 3 * (1 + 1)  # slack only along the first axis
    self.assertEqual(g.routing_size, 3 + 3 * 2)
    self.assertAlmostEqual(layer.compression_ratio, 3 * 3 * 7 * 10 / stored)
    # The layer stores exactly that (spatial offsets only along axes with
    # slack), plus the bias.
    self.assertEqual(layer.spatial_offsets.shape, (3, 1))
    self.assertEqual(layer.count_params(), stored + 10)
    self.assertEqual(layer.get_prunable_weights(), [layer.epitome])
    with self.assertRaises(AttributeError):  # the kernel is derived, read-only
      layer.kernel = tf.zeros(layer.kernel.shape)
    with self.assertRaisesRegex(ValueError, "in_offsets has shape"):
      layer.set_routing_map(routing._replace(in_offsets=np.zeros(5)))

  def test_compression_gives_the_ratio(self):
    layer = ke.EpitomeConv2D(64, 3, compression=4)
    layer(_x((1, 5, 5, 64)))
    self.assertEqual(tuple(layer.epitome.shape), (3, 3, 32, 32))
    self.assertAlmostEqual(
      layer.compression_ratio, 3 * 3 * 64 * 64 / (3 * 3 * 32 * 32 + 2 + 2)
    )
    self.assertBetween(layer.compression_ratio, 3.9, 4.0)

  def test_unbuilt_layer_explains(self):
    layer = ke.EpitomeDense(4, compression=2, name="fresh")
    self.assertIsNone(layer.kernel)
    with self.assertRaisesRegex(ValueError, "EpitomeDense 'fresh' is not built"):
      layer.routing_map  # noqa: B018


class SamplerTest(tf.test.TestCase):
  def test_fixed_wsnet_1d(self):
    # One condensed filter (Cout_E = 1) of length S + (Cout - 1) * stride;
    # output filter b is the window starting at b * stride.
    k, cout, stride, cin = 5, 6, 2, 3
    layer = ke.EpitomeConv1D(
      cout,
      k,
      epitome_shape=(k + (cout - 1) * stride, cin, 1),
      sampler="fixed",
      spatial_stride=stride,
    )
    x = _x((2, 12, cin))
    layer(x)
    e = layer.epitome.numpy()
    kernel = layer.kernel.numpy()
    for b in range(cout):
      # Output filter b also reads the input channels rolled by b (channel_roll).
      window = e[b * stride : b * stride + k, :, 0]
      self.assertAllClose(kernel[:, :, b], np.roll(window, -(b % cin), axis=1))
    self.assertEqual(
      {v.name.split("/")[-1] for v in layer.trainable_weights},
      {"epitome:0", "bias:0"},
    )
    # Training leaves the routing map alone.
    before = layer.routing_map
    model = keras.Sequential([keras.Input((12, cin)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, np.ones((2, 8, cout)), epochs=2, verbose=0)
    after = layer.routing_map
    for a, b in zip(before, after, strict=True):
      self.assertAllEqual(a, b)
    run_layer_test(
      self,
      ke.EpitomeConv1D,
      dict(
        filters=cout,
        kernel_size=k,
        epitome_shape=(k + (cout - 1) * stride, cin, 1),
        sampler="fixed",
        spatial_stride=stride,
      ),
      (2, 12, cin),
      formats=("keras",),
      tmp_dir=self.get_temp_dir(),
    )

  def test_fixed_channel_tiling(self):
    # channel_roll=0: WSNet's plain tiling, every output chunk a copy.
    layer = ke.EpitomeDense(6, epitome_shape=(2, 3), sampler="fixed", channel_roll=0)
    layer(_x((1, 4)))
    e = layer.epitome.numpy()
    self.assertAllClose(layer.kernel, np.tile(e, (2, 2)))
    # The default roll: output chunk 1 reads the input channels rolled by one.
    layer = ke.EpitomeDense(6, epitome_shape=(2, 3), sampler="fixed")
    layer(_x((1, 4)))
    e = layer.epitome.numpy()
    rolled = np.concatenate([e, np.roll(e, -1, axis=0)], axis=1)
    self.assertAllClose(layer.kernel, np.tile(rolled, (2, 1)))

  def test_param_learner_offsets_train(self):
    layer = ke.EpitomeConv2D(6, 3, epitome_shape=(4, 4, 2, 3), offset_scale=5.0)
    x = _x((4, 6, 6, 4))
    model = keras.Sequential([keras.Input((6, 6, 4)), layer])
    randomize_routing(layer)
    before = layer.routing_map
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, _x((4, 4, 4, 6), 1), epochs=3, verbose=0)
    after = layer.routing_map
    for name, a, b in zip(before._fields, before, after, strict=True):
      self.assertGreater(np.max(np.abs(a - b)), 1e-3, name)

  def test_feature_learner_moving_routing_map(self):
    layer = ke.EpitomeConv2D(6, 3, compression=2, learner="feature")
    x = _x((4, 6, 6, 4))
    layer(x)
    self.assertIsNotNone(layer.offset_learner)
    self.assertFalse(layer.moving_offsets.trainable)
    # Give the learner a non-zero output so that offsets depend on the input.
    last = layer.offset_learner.predict_offsets
    last.kernel.assign(_x(last.kernel.shape, 2) * 0.5)
    moving_before = layer.moving_offsets.numpy().copy()
    y_inf = layer(x, training=False).numpy()
    self.assertAllEqual(layer.moving_offsets.numpy(), moving_before)  # no update
    layer(x, training=True)
    moving_after = layer.moving_offsets.numpy()
    self.assertGreater(np.max(np.abs(moving_after - moving_before)), 1e-5)
    # The update is an exponential moving average with the layer's momentum.
    base = np.concatenate(
      [layer.in_offsets.numpy(), layer.out_offsets.numpy(), np.zeros(0)]
    )
    delta = layer.offset_learner(x, training=True).numpy()
    expected = 0.99 * moving_before + 0.01 * (
      np.concatenate([base, np.zeros(len(delta) - len(base))]) + delta
    )
    self.assertAllClose(moving_after, expected, atol=1e-5)
    # Inference uses the moving map: equal to the stock op with layer.kernel.
    y_inf2 = layer(x, training=False).numpy()
    self.assertNotAllClose(y_inf, y_inf2)
    stock = keras.layers.Conv2D(6, 3)
    stock(x)
    stock.set_weights([layer.kernel.numpy(), layer.bias.numpy()])
    self.assertAllClose(stock(x), y_inf2, atol=1e-5)
    routing = layer.routing_map
    g = layer.epitome_geometry
    self.assertAllClose(
      routing.in_offsets, np.mod(moving_after[: g.num_in_chunks], g.cin_e), atol=1e-5
    )

  def test_feature_learner_under_fit_and_symbolic_training_flag(self):
    inputs = keras.Input((8,))
    layer = ke.EpitomeDense(6, compression=2, learner="feature")
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = layer.moving_offsets.numpy().copy()
    x = _x((16, 8))
    model.fit(x, _x((16, 6), 1), epochs=2, batch_size=8, verbose=0)
    self.assertGreater(np.max(np.abs(layer.moving_offsets.numpy() - before)), 1e-6)
    moving = layer.moving_offsets.numpy().copy()
    model.predict(x, verbose=0)
    self.assertAllEqual(layer.moving_offsets.numpy(), moving)


class ModelTest(tf.test.TestCase, parameterized.TestCase):
  def _layers(self, learner):
    return [
      ke.EpitomeConv2D(8, 3, padding="same", compression=2, learner=learner),
      keras.layers.ReLU(),
      ke.EpitomeConv2D(8, 3, compression=4, learner=learner),
      keras.layers.GlobalAveragePooling2D(),
      ke.EpitomeDense(3, compression=2, learner=learner),
    ]

  def _sequential(self, learner):
    return keras.Sequential([keras.Input((6, 6, 4))] + self._layers(learner))

  def _functional(self, learner):
    inputs = keras.Input((6, 6, 4))
    x = inputs
    for layer in self._layers(learner):
      x = layer(x)
    return keras.Model(inputs, x)

  def _nested(self, learner):
    inner = self._sequential(learner)
    inputs = keras.Input((6, 6, 4))
    outputs = keras.layers.Dense(2)(inner(inputs))
    return keras.Model(inputs, outputs)

  @parameterized.named_parameters(
    (f"{kind}_{learner}", kind, learner)
    for kind in ("sequential", "functional", "nested")
    for learner in ("param", "feature")
  )
  def test_models_train_and_save(self, kind, learner):
    model = getattr(self, f"_{kind}")(learner)
    x = _x((8, 6, 6, 4))
    y = _x((8,) + tuple(model.output_shape[1:]), 1)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    self.assertTrue(np.all(np.isfinite(history.history["loss"])))
    path = os.path.join(self.get_temp_dir(), f"{kind}_{learner}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(
      loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )

  @parameterized.parameters(False, True)
  def test_tf_function_and_xla(self, jit_compile):
    for learner in ("param", "feature"):
      model = self._functional(learner)
      for layer in model.layers:
        if isinstance(layer, ke.EPITOME_LAYERS):
          randomize_routing(layer)
      x = tf.constant(_x((4, 6, 6, 4)))
      eager = model(x, training=False)
      compiled = tf.function(
        lambda t, m=model: m(t, training=False), jit_compile=jit_compile
      )
      self.assertAllClose(compiled(x), eager, atol=1e-5)
      optimizer = keras.optimizers.SGD(0.01)

      def train_step(m=model, opt=optimizer, x=x):
        with tf.GradientTape() as tape:
          loss = tf.reduce_mean(tf.square(m(x, training=True)))
        grads = tape.gradient(loss, m.trainable_variables)
        opt.apply_gradients(zip(grads, m.trainable_variables, strict=True))
        return loss

      step = tf.function(train_step, jit_compile=jit_compile)
      losses = [float(step()) for _ in range(3)]
      self.assertTrue(np.all(np.isfinite(losses)), (learner, losses))
      self.assertLess(losses[-1], losses[0], (learner, losses))


class MirroredStrategyTest(tf.test.TestCase):
  def test_two_logical_cpus_match_one_device(self):
    # Logical devices must be set before TF initializes, so the check runs in
    # a fresh process. MirroredStrategy + jit_compile fails for stock Conv2D too
    # on logical CPU devices ("Trying to access resource ... located in
    # device CPU:1 from device CPU:0", an XLA limitation): the jit cases check
    # only that the epitome layers fail exactly when the stock layers do.
    script = os.path.join(os.path.dirname(__file__), "mirrored_strategy_check.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
      os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    # Two strategies' collectives in one process can collide (instance keys),
    # so the feature learner (synchronized BatchNorm) gets its own process.
    groups = [
      ["epitome:feature:0"],
      ["epitome:param:0", "epitome:param:1", "stock:param:1", "factored:param:0"],
    ]
    procs = [
      subprocess.Popen(
        [sys.executable, script] + cases,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
      )
      for cases in groups
    ]
    report = {"cases": []}
    for proc in procs:
      out, err = proc.communicate(timeout=600)
      self.assertEqual(proc.returncode, 0, err[-3000:])
      part = json.loads(out.strip().splitlines()[-1])
      report["devices"] = part["devices"]
      report["cases"] += part["cases"]
    self.assertLen(report["devices"], 2)
    by_case = {(c["layers"], c["learner"], c["jit"]): c for c in report["cases"]}
    for kind, learner in (
      ("epitome", "param"),
      ("epitome", "feature"),
      ("factored", "param"),
    ):
      case = by_case[(kind, learner, 0)]
      self.assertNotIn("error", case)
      self.assertEqual(case["replicas"], 2)
      for name, diff in case["max_diff"].items():
        self.assertLess(diff, 1e-5, f"{learner}: {name} differs by {diff}")
      # The comparison means something: training moved the weights.
      self.assertGreater(case["moved"]["conv/epitome:0"], 1e-4)
      self.assertGreater(case["moved"]["conv/in_offsets:0"], 1e-5)
    epitome_jit = by_case[("epitome", "param", 1)]
    stock_jit = by_case[("stock", "param", 1)]
    self.assertEqual("error" in epitome_jit, "error" in stock_jit, report)
    if "error" in stock_jit:
      self.assertIn("located in device", stock_jit["error"])
    else:
      for name, diff in epitome_jit["max_diff"].items():
        self.assertLess(diff, 1e-5, name)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
  def _build(self, cls, kwargs, shape):
    layer = cls(**kwargs)
    layer(tf.zeros(shape))
    return layer

  @parameterized.named_parameters(
    (
      "ratio_below_one",
      dict(compression=0.5),
      r"compression must be a finite number >= 1, got 0\.5",
    ),
    (
      "ratio_nan",
      dict(compression=float("nan")),
      r"compression must be a finite number >= 1, got nan",
    ),
    (
      "ratio_string",
      dict(compression="4"),
      r"compression must be a finite number >= 1, got '4'",
    ),
    (
      "both_ratio_and_shape",
      dict(compression=2, epitome_shape=(3, 3, 2, 2)),
      "not both",
    ),
    ("neither", dict(), r"give compression= \(a ratio >= 1\)"),
    ("zero_size", dict(epitome_shape=(3, 3, 0, 2)), r"\(3, 3, 0, 2\).*positive"),
    ("negative_size", dict(epitome_shape=(3, 3, 2, -1)), r"\(3, 3, 2, -1\).*positive"),
    ("wrong_rank", dict(epitome_shape=(3, 2, 2)), r"\(3, 2, 2\) must have 4 entries"),
    (
      "unknown_sampler",
      dict(compression=2, sampler="random"),
      r"'random'; valid: learned, fixed",
    ),
    (
      "unknown_learner",
      dict(compression=2, learner="mlp"),
      r"'mlp'; valid: param, feature",
    ),
    (
      "fixed_with_feature",
      dict(compression=2, sampler="fixed", learner="feature"),
      r"learner='feature' needs sampler='learned'",
    ),
    (
      "channels_first",
      dict(compression=2, data_format="channels_first"),
      r"data_format='channels_first' is not supported.*channels_last",
    ),
    (
      "bad_momentum",
      dict(compression=2, routing_momentum=1.0),
      r"routing_momentum.*\[0, 1\).*1\.0",
    ),
    (
      "bad_offset_scale",
      dict(compression=2, offset_scale=0),
      r"offset_scale must be a finite number > 0, got 0",
    ),
  )
  def test_constructor_errors(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, r"EpitomeConv2D 'bad'.*" + message):
      ke.EpitomeConv2D(4, 3, name="bad", **kwargs)

  @parameterized.named_parameters(
    (
      "ratio_too_large",
      ke.EpitomeConv2D,
      dict(filters=4, kernel_size=3, compression=1000),
      (1, 5, 5, 2),
      r"compression 1000 is too large.*at most 8",
    ),
    (
      "ratio_too_large_dense",
      ke.EpitomeDense,
      dict(units=4, compression=17),
      (1, 4),
      r"compression 17 is too large.*at most 16",
    ),
    (
      "cin_larger_than_kernel",
      ke.EpitomeConv2D,
      dict(filters=4, kernel_size=3, epitome_shape=(3, 3, 5, 2)),
      (1, 5, 5, 2),
      r"epitome input channels \(5\) must not exceed the kernel's \(2\)",
    ),
    (
      "cout_larger_than_kernel",
      ke.EpitomeDense,
      dict(units=4, epitome_shape=(2, 9)),
      (1, 4),
      r"epitome output channels \(9\) must not exceed the kernel's \(4\)",
    ),
    (
      "spatial_smaller_than_kernel",
      ke.EpitomeConv1D,
      dict(filters=4, kernel_size=5, epitome_shape=(3, 2, 2)),
      (1, 9, 2),
      r"epitome spatial size 3 on axis 0 must be at least the kernel's 5",
    ),
    (
      "epitome_plus_routing_larger_than_kernel",
      ke.EpitomeDense,
      dict(units=2, epitome_shape=(2, 1)),
      (1, 2),
      r"larger than the kernel .*ratio 0\.\d+ < 1",
    ),
    (
      "fixed_stride_does_not_fit",
      ke.EpitomeConv1D,
      dict(
        filters=8,
        kernel_size=3,
        epitome_shape=(17, 4, 1),
        sampler="fixed",
        spatial_stride=3,
      ),
      (1, 9, 4),
      r"stride 3 on axis 0 does not fit.*use a stride <= 2",
    ),
  )
  def test_build_errors(self, cls, kwargs, shape, message):
    with self.assertRaisesRegex(ValueError, rf"{cls.__name__} 'bad': .*{message}"):
      self._build(cls, dict(kwargs, name="bad"), shape)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):
  """Under a mixed policy only the sampled kernel is cast to the compute dtype."""

  def tearDown(self):
    keras.mixed_precision.set_global_policy("float32")
    super().tearDown()

  @parameterized.parameters("mixed_bfloat16", "mixed_float16")
  def test_routing_map_is_not_rounded(self, policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = ke.EpitomeConv2D(128, 1, epitome_shape=(1, 1, 128, 64))
    x = tf.random.stateless_normal([2, 4, 4, 128], seed=[1, 2])
    layer(x)
    layer.out_offsets.assign([50.3, 40.3])
    for weight in (layer.epitome, layer.in_offsets, layer.out_offsets):
      self.assertEqual(weight.dtype, tf.float32)
      self.assertEqual(tf.convert_to_tensor(weight).dtype, tf.float32)
    kernel = layer.kernel  # sampled in float32 from the float32 routing map
    self.assertEqual(kernel.dtype, tf.float32)
    keras.mixed_precision.set_global_policy("float32")
    reference = ke.EpitomeConv2D(128, 1, epitome_shape=(1, 1, 128, 64))
    reference(x)
    reference.set_weights(layer.get_weights())
    self.assertAllClose(kernel, reference.kernel, atol=1e-6)
    # The layer's output is the float32 kernel cast once, convolved in the
    # compute dtype (a rounded routing map gave an 8% kernel error in bf16).
    dtype = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    y = layer(x)
    self.assertEqual(y.dtype, dtype)
    want = tf.nn.conv2d(
      tf.cast(x, dtype), tf.cast(reference.kernel, dtype), 1, "VALID"
    ) + tf.cast(reference.bias, dtype)
    self.assertAllClose(tf.cast(y, tf.float32), tf.cast(want, tf.float32), atol=1e-6)

  def test_feature_learner_trains_under_mixed_policy(self):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras.Sequential(
      [
        keras.Input((6, 6, 8)),
        ke.EpitomeConv2D(16, 3, compression=4, learner="feature"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, dtype="float32"),
      ]
    )
    model.compile("adam", "mse")
    x = np.random.default_rng(0).random((8, 6, 6, 8)).astype(np.float32)
    model.fit(x, np.zeros((8, 3)), epochs=1, batch_size=4, verbose=0)
    self.assertEqual(model.layers[0].moving_offsets.dtype, tf.float32)
    self.assertTrue(np.all(np.isfinite(model.layers[0].moving_offsets.numpy())))


class NonFiniteOffsetsTest(tf.test.TestCase):
  def test_nan_spatial_offset_gives_nan_output(self):
    layer = ke.EpitomeConv2D(4, 3, epitome_shape=(5, 5, 2, 2), padding="same")
    model = keras.Sequential([keras.Input((5, 5, 4)), layer])
    layer.spatial_offsets.assign(tf.fill(layer.spatial_offsets.shape, np.nan))
    y = model(tf.ones([1, 5, 5, 4]))  # no index error
    self.assertTrue(np.all(np.isnan(y.numpy())))
    y = model.predict(np.ones((2, 5, 5, 4), np.float32), verbose=0)
    self.assertTrue(np.all(np.isnan(y)))

  def test_set_routing_map_refuses_nan(self):
    layer = ke.EpitomeDense(8, compression=2, name="d")
    layer(tf.zeros([1, 8]))
    routing = layer.routing_map
    bad = routing._replace(out_offsets=np.array([0.0, np.nan]))
    with self.assertRaisesRegex(
      ValueError, r"EpitomeDense 'd': routing map out_offsets holds non-finite"
    ):
      layer.set_routing_map(bad)
    self.assertAllEqual(layer.out_offsets.numpy(), routing.out_offsets)


if __name__ == "__main__":
  tf.test.main()
