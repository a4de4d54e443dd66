"""Tests for training in the factored form (keras_epitome/factored_training.py).

Every plan (``R_in``/``R_out`` as matrices, activation lerps or folded into the
sampled kernel) is compared with the sampled-kernel path of the same layer:
outputs, and gradients for the epitome, the bias and every offset (through the
interpolation weights), to 1e-5 relative to their scale.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from layer_test_util import randomize_routing

import keras_epitome as ke
from keras_epitome import factored_training as ft
from keras_epitome import sampling

keras = ke.keras

# (name, layer class, kwargs, input shape)
CASES = [
  # Partial chunks on both sides, stride 2, valid padding.
  (
    "conv2d_partial_strided",
    ke.EpitomeConv2D,
    dict(filters=20, kernel_size=3, strides=2, epitome_shape=(3, 3, 6, 8)),
    (2, 9, 9, 14),
  ),
  # Spatial slack (a window per output chunk), dilation, relu.
  (
    "conv2d_slack",
    ke.EpitomeConv2D,
    dict(
      filters=20,
      kernel_size=3,
      dilation_rate=2,
      epitome_shape=(5, 4, 6, 8),
      activation="relu",
    ),
    (2, 11, 11, 14),
  ),
  # Causal padding, partial chunks.
  (
    "conv1d_causal",
    ke.EpitomeConv1D,
    dict(filters=20, kernel_size=3, padding="causal", epitome_shape=(3, 6, 8)),
    (2, 11, 14),
  ),
  # Conv1D with slack and stride.
  (
    "conv1d_slack",
    ke.EpitomeConv1D,
    dict(filters=12, kernel_size=4, strides=2, epitome_shape=(7, 5, 4)),
    (2, 15, 9),
  ),
  ("dense_partial", ke.EpitomeDense, dict(units=20, epitome_shape=(6, 8)), (5, 14)),
  # A roll of 2 (rolls 0, 2, 4), partial output chunk.
  (
    "dense_roll2",
    ke.EpitomeDense,
    dict(units=20, epitome_shape=(6, 7), channel_roll=2),
    (5, 14),
  ),
  # The separable map (no roll): the chunks share one epitome convolution.
  (
    "conv2d_no_roll",
    ke.EpitomeConv2D,
    dict(filters=20, kernel_size=3, epitome_shape=(3, 3, 6, 8), channel_roll=0),
    (2, 7, 7, 14),
  ),
  # Dense on a rank-3 input.
  ("dense_rank3", ke.EpitomeDense, dict(units=9, epitome_shape=(4, 4)), (2, 3, 10)),
]


def _forced(layer, plan):
  """``layer`` with its plan fixed (train_plan is looked up per call)."""
  layer.train_plan = lambda shape: plan
  return layer


class FactoredTrainingTest(tf.test.TestCase, parameterized.TestCase):
  def _values_and_grads(self, layer, x, plan, jit=False):
    _forced(layer, plan)

    @tf.function(jit_compile=jit)
    def run():
      with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(y))
      return y, tape.gradient(loss, layer.trainable_variables)

    try:
      y, grads = run()
    finally:
      del layer.train_plan
    return y.numpy(), [g.numpy() for g in grads]

  @parameterized.named_parameters(*[(c[0], *c[1:]) for c in CASES])
  def test_every_plan_matches_the_sampled_kernel(self, cls, kwargs, shape):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape), tf.float32)
    layer = cls(**kwargs, bias_initializer="random_normal")
    layer(x)
    randomize_routing(layer, rng=rng)
    names = [v.name for v in layer.trainable_variables]
    self.assertTrue(any("offsets" in n for n in names), names)
    y0, g0 = self._values_and_grads(layer, x, ft.KERNEL_PLAN)
    plans = [p for p in ft.candidate_plans(layer.epitome_geometry) if not p.is_kernel]
    self.assertNotEmpty(plans)
    for plan in plans:
      y1, g1 = self._values_and_grads(layer, x, plan)
      scale = np.abs(y0).max()
      self.assertLess(np.abs(y1 - y0).max() / scale, 1e-5, plan)
      for name, a, b in zip(names, g0, g1, strict=True):
        self.assertGreater(np.abs(a).max(), 0.0, name)  # a gradient to compare
        err = np.abs(a - b).max() / max(1.0, np.abs(a).max())
        self.assertLess(err, 1e-5, f"{plan} {name}")

  def test_xla_and_feature_learner(self):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((4, 8, 8, 12)), tf.float32)
    # With the channel roll the unfolded output side remixes per-chunk outputs.
    for learner, roll, plan in (
      ("param", 0, ft.TrainPlan("matrix", "lerp")),
      ("feature", 0, ft.TrainPlan("matrix", "lerp")),
      ("param", 1, ft.TrainPlan("matrix", "lerp")),
      ("feature", 1, ft.TrainPlan("lerp", "matrix")),
    ):
      layer = ke.EpitomeConv2D(
        16,
        3,
        padding="same",
        epitome_shape=(3, 3, 5, 6),
        learner=learner,
        channel_roll=roll,
      )
      layer(x)
      randomize_routing(layer, rng=rng)
      start = [v.numpy() for v in layer.non_trainable_variables]
      y0, g0 = self._values_and_grads(layer, x, ft.KERNEL_PLAN, jit=True)
      for v, s in zip(layer.non_trainable_variables, start, strict=True):
        v.assign(s)  # the same moving routing map for both paths
      y1, g1 = self._values_and_grads(layer, x, plan, jit=True)
      self.assertAllClose(y0, y1, atol=1e-5 * np.abs(y0).max())
      for a, b in zip(g0, g1, strict=True):
        self.assertAllClose(a, b, atol=1e-5 * max(1.0, np.abs(a).max()))

  def test_mixed_float16_every_plan(self):
    # Issue 27 F1: under mixed_float16 the matrix remixes were built in
    # float32 and met float16 activations (TypeError in MatMul at build).
    # The remixes are computed in the variables' dtype and only what meets
    # the activations is cast, as on the kernel path.
    keras.mixed_precision.set_global_policy("mixed_float16")
    self.addCleanup(keras.mixed_precision.set_global_policy, "float32")
    model = keras.Sequential(
      [keras.Input((8, 8, 16)), ke.EpitomeConv2D(16, 3, compression=4, channel_roll=0)]
    )
    self.assertEqual(model.output.dtype, tf.float16)
    for name, cls, kwargs, shape in CASES:
      with self.subTest(name):
        rng = np.random.default_rng(3)
        x = tf.constant(rng.standard_normal(shape), tf.float32)
        layer = cls(**kwargs, bias_initializer="random_normal")
        layer(x)
        self.assertEqual(layer.epitome.dtype, tf.float32)
        randomize_routing(layer, rng=rng)
        names = [v.name for v in layer.trainable_variables]
        y0, g0 = self._values_and_grads(layer, x, ft.KERNEL_PLAN)
        plans = ft.candidate_plans(layer.epitome_geometry)
        for plan in [p for p in plans if not p.is_kernel]:
          y1, g1 = self._values_and_grads(layer, x, plan)
          self.assertEqual(y1.dtype, np.float16, plan)
          scale = float(np.abs(y0).max())
          err = float(np.abs(y1.astype(np.float32) - y0).max()) / scale
          self.assertLess(err, 1e-2, f"{name} {plan}")
          for var, a, b in zip(names, g0, g1, strict=True):
            self.assertTrue(np.all(np.isfinite(b)), f"{name} {plan} {var}")
            self.assertGreater(np.abs(b).max(), 0.0, f"{name} {plan} {var}")
            err = np.abs(a - b).max() / max(1.0, np.abs(a).max())
            self.assertLess(err, 5e-2, f"{name} {plan} {var}")
        # train_form="factored" builds and trains in a model.
        model = keras.Sequential(
          [keras.Input(shape[1:]), cls(**kwargs, train_form="factored")]
        )
        model.compile("sgd", "mse")
        model.fit(x, tf.zeros_like(model(x)), epochs=1, verbose=0)

  def test_a_plan_that_cannot_express_spatial_slack_is_refused(self):
    layer = ke.EpitomeConv2D(16, 3, padding="same", epitome_shape=(5, 3, 5, 6))
    x = tf.zeros([2, 8, 8, 12])
    layer(x)
    with self.assertRaisesRegex(ValueError, "slack needs out_mode='fold'"):
      self._values_and_grads(layer, x, ft.TrainPlan("matrix", "lerp"), jit=False)

  def test_auto_picks_by_cost(self):
    # A 3x3 conv at 32x32: the epitome convolution and two 1x1 remixes cost a
    # third of the stock convolution.
    # (channel_roll=0: one epitome convolution serves every output chunk. With
    # the default roll each chunk has its own, and the folded output side is
    # the same convolution, 32 -> 64 channels, without an output remix.)
    conv = ke.EpitomeConv2D(64, 3, padding="same", compression=4, channel_roll=0)
    conv(tf.zeros([1, 32, 32, 64]))
    plan = conv.train_plan(tf.TensorShape([32, 32, 32, 64]))
    self.assertEqual(plan, ft.TrainPlan("matrix", "matrix"))
    rolled = ke.EpitomeConv2D(64, 3, padding="same", compression=4)
    rolled(tf.zeros([1, 32, 32, 64]))
    plan = rolled.train_plan(tf.TensorShape([32, 32, 32, 64]))
    self.assertEqual(plan, ft.TrainPlan("matrix", "fold"))
    # Dense at batch 64: remixing the activations is cheap, matrices and
    # sampling a 512 x 1024 folded kernel are not; with the roll the chunks'
    # rolled epitomes are stacked (static slices).
    for roll in (0, 1):
      dense = ke.EpitomeDense(1024, compression=4, channel_roll=roll)
      dense(tf.zeros([1, 1024]))
      self.assertEqual(dense.train_plan((64, 1024)), ft.TrainPlan("lerp", "lerp"), roll)
    # compression close to 1: the factored form has as many multiply-adds as
    # the kernel's, plus the remixes, so the kernel path wins.
    near = ke.EpitomeConv2D(64, 3, padding="same", epitome_shape=(3, 3, 64, 60))
    near(tf.zeros([1, 16, 16, 64]))
    self.assertTrue(near.train_plan((32, 16, 16, 64)).is_kernel)
    # The layer runs what train_plan says.
    forced = ke.EpitomeConv2D(64, 3, padding="same", compression=4, train_form="kernel")
    forced(tf.zeros([1, 8, 8, 64]))
    self.assertTrue(forced.train_plan((32, 32, 32, 64)).is_kernel)
    factored = ke.EpitomeConv2D(
      64, 3, padding="same", epitome_shape=(3, 3, 64, 60), train_form="factored"
    )
    factored(tf.zeros([1, 8, 8, 64]))
    self.assertFalse(factored.train_plan((32, 16, 16, 64)).is_kernel)
    # groups > 1 has no factored form.
    grouped = ke.EpitomeConv2D(8, 3, groups=2, compression=2, train_form="factored")
    grouped(tf.zeros([1, 8, 8, 8]))
    self.assertTrue(grouped.train_plan((1, 8, 8, 8)).is_kernel)

  def test_plan_cost_orders_by_macs(self):
    g = sampling.EpitomeGeometry((3, 3, 64, 64), (3, 3, 32, 32))
    n = 32 * 32 * 32
    costs = {p: ft.plan_cost(p, g, n, n) for p in ft.candidate_plans(g)}
    self.assertLess(costs[ft.TrainPlan("matrix", "matrix")], costs[ft.KERNEL_PLAN])
    slack = sampling.EpitomeGeometry((3, 3, 64, 64), (5, 3, 32, 32))
    self.assertTrue(all(p.out_mode == "fold" for p in ft.candidate_plans(slack)))

  def test_train_form_validated_and_in_config(self):
    with self.assertRaisesRegex(
      ValueError, "EpitomeDense 'd'.*train_form 'fast'.*auto"
    ):
      ke.EpitomeDense(4, compression=2, train_form="fast", name="d")
    layer = ke.EpitomeDense(4, compression=2, train_form="kernel")
    clone = ke.EpitomeDense.from_config(layer.get_config())
    self.assertEqual(clone.train_form, "kernel")
    with self.assertRaisesRegex(ValueError, "plan_for: unknown train_form 'x'; valid"):
      ft.plan_for(sampling.EpitomeGeometry((4, 4), (2, 2)), (1, 4), (1, 4), "x")

  def test_fit_with_unknown_batch(self):
    rng = np.random.default_rng(2)
    model = keras.Sequential(
      [
        keras.Input((6, 6, 8)),
        ke.EpitomeConv2D(8, 3, padding="same", compression=2, train_form="factored"),
        keras.layers.Flatten(),
        ke.EpitomeDense(3, compression=2, train_form="factored"),
      ]
    )
    model.compile("sgd", "mse")
    x = rng.standard_normal((16, 6, 6, 8)).astype("float32")
    y = rng.standard_normal((16, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    moved = [
      np.abs(a - b).max() for a, b in zip(before, model.get_weights(), strict=True)
    ]
    self.assertGreater(max(moved), 0.0)
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    for layer in ref.layers:
      if isinstance(layer, ke.EPITOME_LAYERS):
        layer.train_form = "kernel"
    self.assertAllClose(model(x, training=False), ref(x, training=False), atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
