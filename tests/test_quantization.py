"""Quantization-aware training (TF-MOT) of epitome models.

Forms checked: the Keras QAT model (training-time layers under
``QuantizeWrapperV2``) against its TFLite conversion run by the LiteRT
interpreter, and against itself after ``.h5``/SavedModel round trips.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import quantization

keras = ke.keras
tfq = tfmot.quantization.keras


def _model():
  x = keras.Input((8, 8, 1))
  h = keras.layers.Conv2D(8, 3, activation="relu")(x)
  h = ke.EpitomeConv2D(16, 3, activation="relu", compression=4, name="econv")(h)
  h = keras.layers.Flatten()(h)
  y = ke.EpitomeDense(10, compression=4, name="edense")(h)
  return keras.Model(x, y)


def _data(n=32):
  rng = np.random.RandomState(0)
  return rng.rand(n, 8, 8, 1).astype("float32"), rng.randint(0, 10, n)


def _compile(model):
  model.compile(
    keras.optimizers.Adam(1e-2),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  return model


class QuantizeTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    keras.utils.set_random_seed(0)

  def test_plain_tfmot_quantize_model_needs_the_scheme(self):
    # TF-MOT's own quantize_model has no `scheme` argument, so it cannot know
    # epitome layers; ke.quantize_model is the documented replacement.
    with self.assertRaisesRegex(RuntimeError, "not supported"):
      tfq.quantize_model(_model())

  def test_quantize_model_wraps_epitome_layers(self):
    model = _model()
    macs = ke.summarize(model, print_fn=None).macs_factored
    qat = ke.quantize_model(model)
    # TF-MOT calls the same layer objects in its own graphs; the summary of
    # the original model still counts only its own call sites.
    self.assertEqual(ke.summarize(model, print_fn=None).macs_factored, macs)
    wrappers = {
      layer.layer.name: layer
      for layer in qat.layers
      if isinstance(layer, tfq.QuantizeWrapperV2)
    }
    for name in ("econv", "edense"):
      self.assertIsInstance(wrappers[name].quantize_config, ke.EpitomeQuantizeConfig)
    self.assertNotIsInstance(
      wrappers["conv2d"].quantize_config, ke.EpitomeQuantizeConfig
    )

  def test_annotate_layer_and_apply_with_scheme(self):
    base = _model()

    def annotate(layer):
      if isinstance(layer, ke.EpitomeDense):
        return tfq.quantize_annotate_layer(layer)  # config from the scheme
      if isinstance(layer, ke.EpitomeConv2D):
        return tfq.quantize_annotate_layer(layer, ke.EpitomeQuantizeConfig())
      return layer

    annotated = keras.models.clone_model(base, clone_function=annotate)
    with ke.quantize_scope():
      qat = tfq.quantize_apply(annotated, scheme=ke.EpitomeQuantizeScheme())
    for name in ("quant_econv", "quant_edense"):
      self.assertIsInstance(
        qat.get_layer(name).quantize_config, ke.EpitomeQuantizeConfig
      )

  def test_fake_quantized_epitome_and_gradients(self):
    model = _model()
    before = model.get_layer("econv").in_offsets.numpy().copy()
    qat = _compile(ke.quantize_model(model))
    x, y = _data()
    qat.fit(x, y, epochs=1, batch_size=8, verbose=0)
    after = qat.get_layer("quant_econv").layer.in_offsets.numpy()
    self.assertGreater(np.abs(after - before).max(), 1e-4)
    # Gradients reach the epitome and every learned offset.
    with tf.GradientTape() as tape:
      loss = qat.compiled_loss(tf.constant(y), qat(x, training=True))
    names = [w.name for w in qat.trainable_weights]
    grads = dict(zip(names, tape.gradient(loss, qat.trainable_weights), strict=True))
    for layer in ("econv", "edense"):
      for weight in ("epitome", "in_offsets", "out_offsets"):
        (key,) = [n for n in names if n.startswith(f"{layer}/{weight}")]
        self.assertIsNotNone(grads[key], key)
        self.assertGreater(float(tf.reduce_max(tf.abs(grads[key]))), 0.0, key)
    # The wrapped layer samples from an 8-bit epitome: at most 255 levels.
    wrapper = qat.get_layer("quant_econv")
    wrapper(tf.zeros([1, 6, 6, 8]), training=False)  # eager call
    epitome = wrapper.layer.epitome
    self.assertNotIsInstance(epitome, tf.Variable)
    self.assertLessEqual(np.unique(epitome.numpy()).size, 255)
    self.assertGreater(np.unique(epitome.numpy()).size, 16)

  def test_tflite_conversion_matches(self):
    qat = _compile(ke.quantize_model(_model()))
    x, y = _data()
    qat.fit(x, y, epochs=2, batch_size=8, verbose=0)
    expected = qat.predict(x, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    flatbuffer = converter.convert()
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    got = []
    for i in range(len(x)):
      interpreter.set_tensor(inp["index"], x[i : i + 1])
      interpreter.invoke()
      got.append(interpreter.get_tensor(out["index"])[0])
    got = np.stack(got)
    # Within int8 tolerance, measured in steps of the output's 8-bit grid
    # (range / 255). Seeds 0-3 measured: mean 0.52-0.72 steps, argmax
    # agreement 0.97-1.0; single outputs can move by more (12-51 steps) when
    # a hidden activation lands in the neighbouring bin. Stock TF-MOT models of
    # the same shape: mean 0.0-0.06 steps, max 0-12 steps.
    step = (expected.max() - expected.min()) / 255.0
    self.assertLess(np.abs(got - expected).mean(), 2 * step)
    self.assertGreaterEqual((got.argmax(-1) == expected.argmax(-1)).mean(), 0.9)
    # The layer's weight is stored in int8: the materialized kernel when the
    # converter constant-folds the sampler (the slice-based sampler), or the
    # epitome with the kernel sampled at run time (seen with a gather-based
    # sampler).
    geometry = qat.get_layer("quant_econv").layer.epitome_geometry
    int8_sizes = {
      int(np.prod(d["shape"]))
      for d in interpreter.get_tensor_details()
      if d["dtype"] == np.int8
    }
    self.assertTrue({geometry.epitome_size, geometry.kernel_size} & int8_sizes)

  @parameterized.named_parameters(
    ("conv2d_bn_relu", "conv2d", "relu_layer"),
    ("conv2d_bn_activation_relu", "conv2d", "activation"),
    ("conv2d_bn", "conv2d", None),
    ("conv1d_bn_relu", "conv1d", "relu_layer"),
    ("dense_bn_relu", "dense", "relu_layer"),
    ("dense_bn", "dense", None),
  )
  def test_batch_norm_after_an_epitome_layer(self, kind, relu):
    # Issue 27 F2: BatchNormalization after an epitome layer was refused
    # ("Layer batch_normalization ... is not supported") while the stock
    # Conv2D + BN quantizes. Handled as TF-MOT handles Conv2D/Dense + BN: no
    # fake quant between the layer and BN (NoOpActivation), BN quantizes its
    # output, or nothing when a ReLU follows (the ReLU quantizes).
    rng = np.random.default_rng(0)
    shapes = {"conv2d": (8, 8, 3), "conv1d": (12, 3), "dense": (12,)}
    x_in = keras.Input(shapes[kind])
    if kind == "conv2d":
      layer = ke.EpitomeConv2D(8, 3, use_bias=False, compression=2, name="e")
    elif kind == "conv1d":
      layer = ke.EpitomeConv1D(8, 3, use_bias=False, compression=2, name="e")
    else:
      layer = ke.EpitomeDense(8, use_bias=False, compression=2, name="e")
    h = keras.layers.BatchNormalization(name="bn")(layer(x_in))
    if relu == "relu_layer":
      h = keras.layers.ReLU(name="relu")(h)
    elif relu == "activation":
      h = keras.layers.Activation("relu", name="relu")(h)
    if kind != "dense":
      h = keras.layers.Flatten()(h)
    model = keras.Model(x_in, keras.layers.Dense(4, name="head")(h))
    x = rng.uniform(0.0, 1.0, (16,) + shapes[kind]).astype("float32")
    y = rng.integers(0, 4, 16)
    # BN with statistics that are not the identity.
    bn = model.get_layer("bn")
    bn.set_weights(
      [
        rng.uniform(0.5, 1.5, 8).astype("float32"),
        rng.uniform(-0.2, 0.2, 8).astype("float32"),
        rng.uniform(-0.1, 0.1, 8).astype("float32"),
        rng.uniform(0.5, 1.5, 8).astype("float32"),
      ]
    )
    qat = ke.quantize_model(model)
    wrapper = qat.get_layer("quant_e")
    self.assertIsInstance(wrapper.quantize_config, ke.EpitomeQuantizeConfig)
    # No fake quant between the layer and BN.
    self.assertEqual(
      type(wrapper.layer.activation.activation).__name__, "NoOpActivation"
    )
    bn_config = qat.get_layer("quant_bn").quantize_config
    expected = "NoOpQuantizeConfig" if relu else "Default8BitOutputQuantizeConfig"
    self.assertEqual(type(bn_config).__name__, expected)
    # Before training the QAT model computes the float model within 8-bit
    # steps (in training mode: the quantizers' ranges come from the batch,
    # BN normalizes with the batch's statistics in both).
    want = model(x, training=True).numpy()
    got = qat(x, training=True).numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    self.assertLess(err, 0.05)
    # One training step moves the epitome and the routing map.
    _compile(qat)
    before = {w.name: w.numpy().copy() for w in qat.trainable_weights}
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    moved = {
      name.split("/")[-1].split(":")[0]
      for name, w in ((w.name, w.numpy()) for w in qat.trainable_weights)
      if name in before and np.abs(w - before[name]).max() > 0
    }
    for weight in ("epitome", "in_offsets", "out_offsets", "gamma", "beta"):
      self.assertIn(weight, moved)
    self.assertTrue(np.all(np.isfinite(qat.predict(x, verbose=0))))
    if kind == "conv2d" and relu == "relu_layer":
      # The converter folds BN into the int8 convolution.
      converter = tf.lite.TFLiteConverter.from_keras_model(qat)
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      flatbuffer = converter.convert()
      ops = {op["name"] for op in ke.tflite_tensor_report(flatbuffer)["ops"]}
      self.assertIn("CONV_2D", ops)
      self.assertFalse(ops & {"MUL", "ADD", "SUB", "BATCH_NORM"}, ops)
      expected = qat.predict(x, verbose=0)
      step = (expected.max() - expected.min()) / 255.0
      got = ke.run_tflite(flatbuffer, x)
      self.assertLess(np.abs(got - expected).mean(), 3 * step)

  @parameterized.parameters("h5", "savedmodel")
  def test_save_and_load(self, fmt):
    qat = _compile(ke.quantize_model(_model()))
    x, y = _data()
    qat.fit(x, y, epochs=1, batch_size=8, verbose=0)
    expected = qat.predict(x, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "qat.h5" if fmt == "h5" else "qat")
    qat.save(path)
    with ke.quantize_scope():
      loaded = keras.models.load_model(path)
    self.assertAllClose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    if fmt == "h5":
      loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)  # training continues

  def test_keras_format_fails_in_tfmot_0_8_1(self):
    # Documented limitation of TF-MOT 0.8.1 (not of the epitome layers): a QAT
    # model saved as .keras does not load. If this starts passing, update the
    # docs (quantization module docstring, docs/transform.md).
    qat = ke.quantize_model(_model())
    path = os.path.join(tempfile.mkdtemp(), "qat.keras")
    qat.save(path)
    with self.assertRaisesRegex(ValueError, "variables"):
      with ke.quantize_scope():
        keras.models.load_model(path)

  def test_config_round_trip_and_errors(self):
    config = ke.EpitomeQuantizeConfig(num_bits=4)
    self.assertEqual(ke.EpitomeQuantizeConfig.from_config(config.get_config()), config)
    with self.assertRaisesRegex(ValueError, "for epitome layers.*Dense 'plain'"):
      config.get_weights_and_quantizers(keras.layers.Dense(3, name="plain"))
    registry = quantization.EpitomeQuantizeRegistry()
    self.assertTrue(registry.supports(ke.EpitomeConv1D(4, 3, compression=2)))
    self.assertTrue(registry.supports(keras.layers.Dense(3)))


if __name__ == "__main__":
  tf.test.main()
