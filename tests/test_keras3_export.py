"""Tests for keras_epitome.keras3.export: Keras 3 models to TFLite, as Keras 2 models export."""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

import keras_epitome as ke2
import keras_epitome.keras3 as ke3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resnet(k, width=16, input_shape=(16, 16, 3)):
  """A functional ResNet stem and block (residual Add), written for either Keras."""
  layers = k.layers
  inp = k.Input(input_shape)
  x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inp)
  x = layers.BatchNormalization(name="stem_bn")(x)
  x = layers.ReLU(name="stem_relu")(x)
  y = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv1")(x)
  y = layers.BatchNormalization(name="bn1")(y)
  y = layers.ReLU(name="relu1")(y)
  y = layers.Conv2D(width, 3, padding="same", name="conv2")(y)
  x = layers.Add(name="add")([x, y])
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  out = layers.Dense(10, name="logits")(x)
  return k.Model(inp, out)


def randomize_batchnorms(model, rng):
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(size=n).astype("float32") * 0.1)
      layer.moving_variance.assign(1.0 + rng.random(n).astype("float32"))


class Keras3ExportTest(tf.test.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.k3 = ke3.epitomize(resnet(keras, width=32), 4, verbose=False)
    randomize_batchnorms(cls.k3, rng)
    cls.x = rng.random((4, 16, 16, 3)).astype("float32")
    # The same model in Keras 2, with the Keras 3 model's weights.
    cls.k2 = ke2.epitomize(resnet(ke2.keras, width=32), 4, verbose=False)
    for l2, l3 in zip(cls.k2.layers, cls.k3.layers, strict=True):
      assert type(l2).__name__ == type(l3).__name__, (l2, l3)
      l2.set_weights([np.asarray(w) for w in l3.get_weights()])

  def test_same_model_as_keras2(self):
    self.assertAllClose(
      self.k2.predict(self.x, verbose=0), self.k3.predict(self.x, verbose=0), atol=1e-5
    )

  def test_factored_export_matches_keras_and_keras2_file(self):
    report3, report2 = [], []
    tfl3 = ke3.export_tflite(
      self.k3, batch_size=4, form_report=report3, cost_model="bundled"
    )
    tfl2 = ke2.export_tflite(
      self.k2, batch_size=4, form_report=report2, cost_model="bundled"
    )
    y = self.k3.predict(self.x, verbose=0)
    self.assertAllClose(ke2.run_tflite(tfl3, self.x), y, atol=1e-5)
    self.assertEqual([r.form for r in report3], [r.form for r in report2])
    self.assertLen(report3, len(ke3.epitome_layers(self.k3)))
    self.assertGreaterEqual(len(report3), 2)
    # Within 3% of the Keras 2 file (the graphs differ only in names).
    self.assertLess(
      abs(len(tfl3) - len(tfl2)) / len(tfl2), 0.03, (len(tfl3), len(tfl2))
    )

  def test_materialized_and_int8(self):
    y = self.k3.predict(self.x, verbose=0)
    tfl = ke3.export_tflite(self.k3, form="materialized", batch_size=4)
    self.assertAllClose(ke2.run_tflite(tfl, self.x), y, atol=1e-5)
    tfl8 = ke3.export_tflite(
      self.k3, quantize="int8", representative_data=self.x, batch_size=4
    )
    y8 = ke2.run_tflite(tfl8, self.x)
    self.assertLess(np.abs(y8 - y).max(), 0.05 * np.abs(y).max() + 1e-3)
    self.assertLess(len(tfl8), len(tfl))

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "batch_size must be None .* got 0"):
      ke3.export_tflite(self.k3, batch_size=0)
    with self.assertRaisesRegex(ValueError, "needs representative_data"):
      ke3.export_tflite(self.k3, quantize="int8")
    with self.assertRaisesRegex(ValueError, "quantize must be one of"):
      ke3.export_tflite(self.k3, quantize="int4")

  def test_jax_trained_model_exports(self):
    """On JAX, export_tflite exports through a TensorFlow child process."""
    self._check_other_backend_exports("jax")

  def test_torch_trained_model_exports(self):
    """On PyTorch, export_tflite exports through a TensorFlow child process."""
    self._check_other_backend_exports("torch")

  def _check_other_backend_exports(self, backend):
    if importlib.util.find_spec(backend) is None:
      self.skipTest(f"{backend} is not installed")
    tmp = tempfile.mkdtemp()
    code = (
      "import numpy as np, keras, keras_epitome.keras3 as ke\n"
      "m = keras.Sequential([keras.Input((8, 8, 3)),"
      " ke.EpitomeConv2D(8, 3, compression=2, activation='relu'),"
      " keras.layers.GlobalAveragePooling2D(), ke.EpitomeDense(4, compression=2)])\n"
      "x = np.random.default_rng(0).random((2, 8, 8, 3)).astype('float32')\n"
      "m.compile('adam', 'mse'); m.fit(x, np.ones((2, 4)), epochs=2, verbose=0)\n"
      f"ke.export_tflite(m, {os.path.join(tmp, 'm.tflite')!r}, batch_size=2)\n"
      f"np.save({os.path.join(tmp, 'x.npy')!r}, x)\n"
      f"np.save({os.path.join(tmp, 'y.npy')!r}, np.asarray(m.predict(x, verbose=0)))\n"
      f"assert keras.backend.backend() == {backend!r}\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    done = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    with open(os.path.join(tmp, "m.tflite"), "rb") as f:
      tflite = f.read()
    x, y = np.load(os.path.join(tmp, "x.npy")), np.load(os.path.join(tmp, "y.npy"))
    self.assertAllClose(ke2.run_tflite(tflite, x), y, atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
