"""Tests of the TF-MOT weight-compression contract (keras_epitome.compression).

Modelled on TF-MOT's algorithm tests (``common/keras/compression/algorithms/
*_test.py``): train through the wrappers on real data (scikit-learn's digits),
convert the inference model to TFLite, and compare its size and accuracy with
the stock model's. Every wrapper test runs over both algorithms (the epitome
and a toy SVD) and over Conv1D, Conv2D, DepthwiseConv2D, Dense and Conv3D, so the
wrappers are shown to be generic.

Forms checked: *training* (``project_training_weights``, the differentiable
sampler) and *compact decompress* (``decompress_weights``, DESIGN.md 4.3).
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import oracle
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import compression, sampling
from keras_epitome.compression import EpitomeCompressor, SVDCompressor

keras = ke.keras

ALGORITHMS = {
  "epitome": lambda: EpitomeCompressor(compression=2),
  "svd": lambda: SVDCompressor(rank=2),
}

# (layer factory, input shape without batch)
LAYERS = {
  "conv1d": (lambda: keras.layers.Conv1D(12, 3, name="conv1d"), (10, 8)),
  "conv2d": (
    lambda: keras.layers.Conv2D(12, 3, padding="same", name="conv2d"),
    (6, 6, 8),
  ),
  "depthwise": (
    lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=4, name="dw"),
    (6, 6, 8),
  ),
  "dense": (lambda: keras.layers.Dense(12, name="dense"), (8,)),
  "conv3d": (lambda: keras.layers.Conv3D(12, 3, name="conv3d"), (4, 4, 4, 6)),
}

CASES = [
  dict(testcase_name=f"{a}_{layer}", algorithm=a, layer=layer)
  for a in ALGORITHMS
  for layer in LAYERS
]


@keras.saving.register_keras_serializable(package="keras_epitome_tests")
class _FlagDense(keras.layers.Dense):
  """A Dense whose output shows the ``training`` flag it was called with."""

  def call(self, inputs, training=None):
    flag = 1.0 if training else 0.0
    return super().call(inputs) + flag


class _CountingCompressor(compression.WeightCompressor):
  """Stores the kernel as is and counts training calls with update_training_weight."""

  def get_compressible_weights(self, original_layer):
    return [compression.kernel_weight(original_layer)]

  def init_training_weights(self, pretrained_weight):
    self.add_training_weight(
      name="w",
      shape=pretrained_weight.shape,
      dtype=pretrained_weight.dtype,
      initializer=keras.initializers.Constant(np.asarray(pretrained_weight)),
    )
    self.add_training_weight(
      name="steps",
      shape=(),
      dtype=tf.int32,
      initializer="zeros",
      trainable=False,
    )

  def project_training_weights(self, w, steps):
    self.update_training_weight(steps, steps + 1)
    return w

  def compress_training_weights(self, w, steps):
    del steps
    return [w]

  def decompress_weights(self, w):
    return w


def _random_input(shape, batch=3, seed=0):
  return (
    np.random.default_rng(seed).standard_normal((batch,) + shape).astype(np.float32)
  )


def _built_layer(name, seed=0):
  factory, shape = LAYERS[name]
  layer = factory()
  layer.build((None,) + shape)
  rng = np.random.default_rng(seed)
  layer.set_weights(
    [rng.standard_normal(w.shape).astype(np.float32) for w in layer.weights]
  )
  return layer, shape


def _stock_with_kernel(layer, kernel):
  """A copy of ``layer`` whose kernel is ``kernel`` (the reference output)."""
  ref = layer.__class__.from_config(layer.get_config())
  ref.build(layer._build_input_shape)
  ref.set_weights(layer.get_weights())
  compression.kernel_weight(ref).assign(kernel)
  return ref


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class SampleKernelFrozenTest(tf.test.TestCase, parameterized.TestCase):
  """The compact-decompress kernel against the training sampler and the loop."""

  @parameterized.parameters(
    ((4, 6), (2, 3)),
    ((3, 3, 10, 7), (5, 5, 4, 3)),
    ((5, 9, 6), (8, 4, 4)),
    ((3, 3, 5, 1), (3, 3, 2, 1)),
    ((3, 16, 16), (3, 16, 16)),
  )
  def test_equals_sample_kernel(self, kernel_shape, epitome_shape):
    g = sampling.EpitomeGeometry(kernel_shape, epitome_shape)
    rng = np.random.default_rng(1)
    routing = sampling.RoutingMap(
      rng.uniform(-3, 10, g.num_in_chunks),
      rng.uniform(-2, 9, g.num_out_chunks),
      rng.uniform(-0.5, 1.2, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
    )
    e = rng.standard_normal(epitome_shape)
    frozen = sampling.sample_kernel_frozen(tf.constant(e), routing, g)
    spatial = routing.spatial_offsets if g.slack_axes else None
    sampled = sampling.sample_kernel(
      tf.constant(e), routing.in_offsets, routing.out_offsets, spatial, g
    )
    self.assertAllClose(frozen, sampled, atol=1e-12)
    self.assertAllClose(frozen, oracle.sample_kernel(e, routing, g), atol=1e-12)

  def test_graph_has_no_gather_or_index_tensor(self):
    g = sampling.EpitomeGeometry((3, 3, 32, 64), (3, 3, 16, 16))
    routing = sampling.RoutingMap(
      np.array([0.5, 3.0]), np.array([1.0, 2.25, 0.0, 7.5]), np.zeros((4, 2))
    )
    fn = tf.function(lambda e: sampling.sample_kernel_frozen(e, routing, g))
    graph = fn.get_concrete_function(tf.TensorSpec(g.epitome_shape)).graph
    op_types = {op.type for op in graph.get_operations()}
    self.assertNotIn("GatherV2", op_types)
    self.assertNotIn("GatherNd", op_types)
    big_consts = [
      op.name
      for op in graph.get_operations()
      if op.type == "Const" and op.outputs[0].shape.num_elements() > 64
    ]
    self.assertEqual(big_consts, [])

  def test_wrong_routing_size_raises(self):
    g = sampling.EpitomeGeometry((4, 6), (2, 3))
    bad = sampling.RoutingMap(np.zeros(3), np.zeros(2), np.zeros((2, 0)))
    with self.assertRaisesRegex(ValueError, "3 input and 2 output offsets"):
      sampling.sample_kernel_frozen(tf.zeros((2, 3)), bad, g)


class WrapperTest(tf.test.TestCase, parameterized.TestCase):
  """What every algorithm and layer must do through the wrappers."""

  @parameterized.named_parameters(*CASES)
  def test_training_wrapper(self, algorithm, layer):
    alg = ALGORITHMS[algorithm]()
    original, shape = _built_layer(layer)
    (kernel,) = alg.get_compressible_weights(original)
    wrapped = compression.create_layer_for_training(original, alg)
    self.assertIsInstance(wrapped, compression.CompressionTrainingWrapper)
    self.assertEqual(wrapped.name, original.name)
    # The full kernel is not a variable of the wrapper.
    stored = sum(int(np.prod(w.shape)) for w in wrapped.weights)
    self.assertLess(stored, sum(int(np.prod(w.shape)) for w in original.weights))
    self.assertNotIn(kernel.shape, [w.shape for w in wrapped.weights])
    # Forward pass = the stock layer with the projected kernel.
    name = wrapped.weight_names[0]
    projected = alg.project_training_weights(*wrapped.training_tensors(name))
    x = _random_input(shape)
    ref = _stock_with_kernel(original, projected)
    self.assertLess(_max_diff(wrapped(x), ref(x)), 1e-5)
    # The bias is copied.
    self.assertAllClose(wrapped.layer.bias, original.bias)
    # Trainable training weights receive gradients.
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(wrapped(x, training=True)))
    grads = tape.gradient(loss, wrapped.trainable_weights)
    self.assertTrue(all(g is not None for g in grads))
    self.assertGreater(sum(float(tf.reduce_sum(tf.abs(g))) for g in grads), 0.0)

  @parameterized.named_parameters(*CASES)
  def test_inference_wrapper_matches_training(self, algorithm, layer):
    alg = ALGORITHMS[algorithm]()
    original, shape = _built_layer(layer)
    training = compression.create_layer_for_training(original, alg)
    if algorithm == "epitome":
      # Fractional offsets, so decompress has to blend.
      rng = np.random.default_rng(2)
      for w in training.weights:
        if "offsets" in w.name:
          w.assign(rng.uniform(0, 3, w.shape))
    inference = compression.create_layer_for_inference(training)
    self.assertIsInstance(inference, compression.CompressionInferenceWrapper)
    x = _random_input(shape)
    self.assertLess(_max_diff(inference(x), training(x)), 1e-5)
    name = training.weight_names[0]
    projected = alg.project_training_weights(*training.training_tensors(name))
    compressed = alg.compress_training_weights(*training.training_tensors(name))
    decompressed = alg.decompress_weights(
      *[
        tf.constant(c.value) if isinstance(c, compression.StaticWeight) else c
        for c in compressed
      ]
    )
    self.assertLess(_max_diff(decompressed, projected), 1e-5)
    # Same result inside tf.function (static weights stay static in a graph).
    self.assertLess(_max_diff(tf.function(inference)(x), training(x)), 1e-5)

  @parameterized.named_parameters(*CASES)
  def test_config_round_trip(self, algorithm, layer):
    alg = ALGORITHMS[algorithm]()
    original, shape = _built_layer(layer)
    training = compression.create_layer_for_training(original, alg)
    inference = compression.create_layer_for_inference(training)
    x = _random_input(shape)
    for wrapper in (training, inference):
      config = wrapper.get_config()
      self.assertEqual(config["algorithm"]["config"], alg.get_config())
      restored = keras.layers.deserialize(keras.layers.serialize(wrapper))
      self.assertIsInstance(restored, type(wrapper))
      restored(x)  # builds from the config alone
      self.assertEqual(
        [w.shape for w in restored.weights], [w.shape for w in wrapper.weights]
      )
      restored.set_weights(wrapper.get_weights())
      self.assertLess(_max_diff(restored(x), wrapper(x)), 1e-6)

  @parameterized.parameters("training", "inference")
  def test_training_flag_is_passed_through(self, which):
    layer = _FlagDense(4)
    layer.build((None, 8))
    wrapper = compression.create_layer_for_training(layer, SVDCompressor(rank=2))
    if which == "inference":
      wrapper = compression.create_layer_for_inference(wrapper)
    x = _random_input((8,))
    diff = wrapper(x, training=True) - wrapper(x, training=False)
    self.assertAllClose(diff, np.ones_like(diff))
    model = keras.Sequential([keras.Input((8,)), wrapper])
    self.assertAllClose(model(x, training=True) - model(x), np.ones_like(diff))

  def test_update_training_weight_runs_in_training_only(self):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    model = compression.compress_model_for_training(
      keras.Sequential([keras.Input((4,)), layer]), _CountingCompressor()
    )
    wrapper = model.layers[0]
    steps = wrapper.training_weights["kernel"][1]
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 4)), np.ones((8, 3)), batch_size=4, epochs=2, verbose=0)
    self.assertEqual(int(steps.numpy()), 4)
    model.predict(np.ones((8, 4)), verbose=0)
    model(np.ones((2, 4)))
    self.assertEqual(int(steps.numpy()), 4)

  def test_update_of_unknown_tensor_raises(self):
    alg = _CountingCompressor()
    with self.assertRaisesRegex(ValueError, "not a variable training weight"):
      alg.update_training_weight(tf.zeros(()), 1)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "must be built"):
      compression.create_layer_for_training(keras.layers.Dense(3), SVDCompressor())
    layer, _ = _built_layer("dense")
    with self.assertRaisesRegex(ValueError, "instance"):
      compression.create_layer_for_training(layer, SVDCompressor)
    with self.assertRaisesRegex(ValueError, "compression must be"):
      EpitomeCompressor(compression=0.5)

    class Sub(keras.Model):
      def call(self, x):
        return x

    with self.assertRaisesRegex(
      ValueError, "subclassed model.*Sequential and functional"
    ):
      compression.compress_model_for_training(Sub(), SVDCompressor())
    alg = EpitomeCompressor(2)
    with self.assertRaisesRegex(ValueError, "static weight"):
      tf.function(
        lambda offsets: alg.decompress_weights(
          tf.constant([4, 6]), tf.zeros((2, 3)), offsets, tf.zeros(2)
        )
      )(tf.zeros(2))

  def test_channel_roll(self):
    """The default compressor rolls like the layers; old configs load unrolled."""
    with self.assertRaisesRegex(
      ValueError, "EpitomeCompressor: channel_roll must be an int >= 0, got -1"
    ):
      EpitomeCompressor(4, channel_roll=-1)
    layer = keras.layers.Dense(16)
    layer.build((None, 16))
    distinct = {}
    for roll in (0, 1):
      alg = EpitomeCompressor(4, channel_roll=roll)
      self.assertEqual(alg.geometry_for((16, 16)).channel_roll, roll)
      wrapper = compression.create_layer_for_training(layer, alg)
      kernel = wrapper(tf.eye(16)).numpy()  # the bias is zero
      distinct[roll] = len({tuple(np.round(c, 6)) for c in kernel.T})
    # 16 output columns from an 8x8 epitome: the separable map repeats its 8
    # filters, the roll makes every filter distinct.
    self.assertEqual(distinct, {0: 8, 1: 16})
    self.assertEqual(EpitomeCompressor(4).channel_roll, 1)
    old = {"compression": 4.0, "learn_offsets": True, "min_kernel_size": 0}
    self.assertEqual(EpitomeCompressor.from_config(old).channel_roll, 0)
    again = EpitomeCompressor.from_config(EpitomeCompressor(4).get_config())
    self.assertEqual(again.channel_roll, 1)

  def test_layers_left_alone(self):
    alg = EpitomeCompressor(compression=4, min_kernel_size=100)
    small = keras.layers.Dense(4)
    small.build((None, 4))
    self.assertEqual(alg.get_compressible_weights(small), [])
    self.assertEqual(alg.get_compressible_weights(keras.layers.Flatten()), [])
    copy = compression.create_layer_for_training(small, alg)
    self.assertIsInstance(copy, keras.layers.Dense)
    self.assertAllClose(copy.kernel, small.kernel)


# ----------------------------------------------------------------------------
# Models, real data, TFLite.


@functools.lru_cache(maxsize=None)
def _digits():
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., np.newaxis]
  y = d.target.astype(np.int64)
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def _compile(model, lr=3e-3):
  model.compile(
    keras.optimizers.Adam(lr),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )


@functools.lru_cache(maxsize=None)
def _trained_cnn():
  """A stock CNN trained on digits: Conv2D, Conv2D, Dense, Dense."""
  keras.utils.set_random_seed(0)
  (x, y), _ = _digits()
  model = keras.Sequential(
    [
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
      keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
      keras.layers.Flatten(),
      keras.layers.Dense(128, activation="relu", name="fc1"),
      keras.layers.Dense(10, name="fc2"),
    ]
  )
  _compile(model)
  model.fit(x, y, epochs=6, batch_size=64, verbose=0)
  return model


def _to_tflite(model) -> bytes:
  return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _run_tflite(content: bytes, x: np.ndarray) -> np.ndarray:
  from ai_edge_litert.interpreter import Interpreter

  interpreter = Interpreter(model_content=content)
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]
  interpreter.resize_tensor_input(inp["index"], x.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(inp["index"], x)
  interpreter.invoke()
  return interpreter.get_tensor(out["index"])


def _num_weights(model) -> int:
  return sum(int(np.prod(w.shape)) for w in model.weights)


class DigitsTest(tf.test.TestCase, parameterized.TestCase):
  """Train through the wrappers, export the inference model to TFLite."""

  @parameterized.named_parameters(
    dict(testcase_name="epitome", algorithm=EpitomeCompressor(compression=4)),
    dict(testcase_name="svd", algorithm=SVDCompressor(rank=8)),
  )
  def test_train_compress_and_export(self, algorithm):
    stock = _trained_cnn()
    (x, y), (x_test, y_test) = _digits()
    stock_accuracy = stock.evaluate(x_test, y_test, verbose=0)[1]
    self.assertGreater(stock_accuracy, 0.85)

    training_model = compression.compress_model_for_training(stock, algorithm)
    wrapped = [
      layer.name
      for layer in training_model.layers
      if isinstance(layer, compression.CompressionTrainingWrapper)
    ]
    expected = [
      layer.name for layer in stock.layers if algorithm.get_compressible_weights(layer)
    ]
    self.assertEqual(wrapped, expected)
    self.assertContainsSubset(["conv2", "fc1"], wrapped)
    _compile(training_model)
    keras.utils.set_random_seed(1)
    training_model.fit(x, y, epochs=6, batch_size=64, verbose=0)

    inference_model = compression.compress_model_for_inference(training_model)
    _compile(inference_model)
    keras_logits = inference_model.predict(x_test, verbose=0)
    self.assertLess(
      _max_diff(keras_logits, training_model.predict(x_test, verbose=0)), 1e-4
    )
    keras_accuracy = float(np.mean(keras_logits.argmax(-1) == y_test))
    self.assertGreater(keras_accuracy, 0.8)

    stock_tflite = _to_tflite(stock)
    tflite = _to_tflite(inference_model)
    tflite_logits = _run_tflite(tflite, x_test)
    self.assertLess(_max_diff(tflite_logits, keras_logits), 1e-4)
    tflite_accuracy = float(np.mean(tflite_logits.argmax(-1) == y_test))
    self.assertAlmostEqual(tflite_accuracy, keras_accuracy, delta=1 / len(y_test))

    # The file shrinks by close to the weight ratio: the decompression was
    # not folded back into full-size constants. The graph's extra ops cost a
    # few hundred bytes per layer on top of the weights.
    weight_ratio = _num_weights(stock) / _num_weights(inference_model)
    file_ratio = len(stock_tflite) / len(tflite)
    self.assertGreater(weight_ratio, 3.5)
    self.assertGreater(file_ratio, 0.8 * weight_ratio)

  def test_conv1d_and_depthwise_export(self):
    (x, _), (x_test, _) = _digits()
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=8, name="dw")(h)
    h = keras.layers.Reshape((36, 128))(h)
    h = keras.layers.Conv1D(64, 3, name="conv1d")(h)
    outputs = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, outputs)
    training_model = compression.compress_model_for_training(
      model, EpitomeCompressor(compression=4)
    )
    wrapped = {
      layer.name
      for layer in training_model.layers
      if isinstance(layer, compression.CompressionTrainingWrapper)
    }
    self.assertEqual(wrapped, {"conv", "dw", "conv1d"})
    rng = np.random.default_rng(3)
    for w in training_model.weights:
      if "offsets" in w.name:
        w.assign(rng.uniform(0, 4, w.shape))
    inference_model = compression.compress_model_for_inference(training_model)
    keras_out = inference_model.predict(x_test[:64], verbose=0)
    self.assertLess(
      _max_diff(keras_out, training_model.predict(x_test[:64], verbose=0)), 1e-4
    )
    tflite = _to_tflite(inference_model)
    self.assertLess(_max_diff(_run_tflite(tflite, x_test[:64]), keras_out), 1e-4)
    stock_tflite = _to_tflite(model)
    self.assertLess(len(tflite), 0.5 * len(stock_tflite))


class ModelTest(tf.test.TestCase, parameterized.TestCase):
  """Model-level helpers and saving."""

  def _model(self):
    keras.utils.set_random_seed(4)
    inner = keras.Sequential(
      [keras.Input((16,)), keras.layers.Dense(16, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, name="fc")(h)
    outputs = inner(h)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-1, 1, 8))
    return model

  def test_other_layers_copied_and_nested_models_transformed(self):
    model = self._model()
    training_model = compression.compress_model_for_training(
      model, SVDCompressor(rank=2)
    )
    self.assertAllClose(
      training_model.get_layer("bn").moving_mean, model.get_layer("bn").moving_mean
    )
    self.assertIsNot(training_model.get_layer("bn"), model.get_layer("bn"))
    inner = training_model.get_layer("inner")
    self.assertIsInstance(inner.layers[0], compression.CompressionTrainingWrapper)
    x = _random_input((8, 8, 1))
    inference_model = compression.compress_model_for_inference(training_model)
    self.assertIsInstance(
      inference_model.get_layer("inner").layers[0],
      compression.CompressionInferenceWrapper,
    )
    self.assertLess(_max_diff(inference_model(x), training_model(x)), 1e-5)

  @parameterized.parameters(".keras", ".h5", "_savedmodel")
  def test_save_and_load(self, extension):
    model = self._model()
    # The toy algorithm's wrappers round-trip their configs in WrapperTest.
    training_model = compression.compress_model_for_training(
      model, EpitomeCompressor(compression=2)
    )
    rng = np.random.default_rng(5)
    for w in training_model.weights:
      if "offsets" in w.name:  # fractional: the frozen map must survive saving
        w.assign(rng.uniform(0, 3, w.shape))
    inference_model = compression.compress_model_for_inference(training_model)
    x = _random_input((8, 8, 1))
    for m in (training_model, inference_model):
      path = os.path.join(tempfile.mkdtemp(), "model" + extension)
      m.save(path, save_format="tf" if extension == "_savedmodel" else None)
      loaded = keras.models.load_model(path)
      self.assertLess(_max_diff(loaded(x), m(x)), 1e-6)
      # Training continues after loading.
      loaded.compile("adam", "mse")
      loaded.fit(x, np.zeros((3, 16)), verbose=0)


class NonFiniteOffsetsTest(tf.test.TestCase):
  def test_compress_model_for_inference_refuses_nan_offsets(self):
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, name="fc")])
    training = compression.compress_model_for_training(
      model, EpitomeCompressor(compression=4)
    )
    wrapper = training.get_layer("fc")
    offsets = wrapper.training_weights["kernel"][3]  # out_offsets
    self.assertIn("out_offsets", offsets.name)
    offsets.assign(tf.fill(offsets.shape, np.nan))
    with self.assertRaisesRegex(
      ValueError,
      r"EpitomeCompressor.compress_training_weights: routing map out_offsets "
      r"holds non-finite offsets",
    ):
      compression.compress_model_for_inference(training)


if __name__ == "__main__":
  tf.test.main()
