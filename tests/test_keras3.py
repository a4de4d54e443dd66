"""Tests for the Keras 3 layers (keras_epitome.keras3) on the TensorFlow backend.

The Keras 2 layers are the reference: a Keras 3 layer given the same weights
must compute the same outputs and gradients, over a seeded random set of
configurations (the seed is in every failure message). The JAX and PyTorch
backends run in a child process each (the Keras backend is fixed per process):
``tests/keras3_backend_check.py``.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
import keras_epitome.keras3 as ke3
from keras_epitome import sampling
from keras_epitome.keras3 import ops_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("KERAS_EPITOME_TEST_SEED", "20261206"))
NUM_CASES = 24


def random_case(rng):
  """A random layer configuration: (kind, stock kwargs, epitome kwargs, input shape)."""
  kind = ("dense", "conv1d", "conv2d")[int(rng.integers(3))]
  rank = {"dense": 0, "conv1d": 1, "conv2d": 2}[kind]
  groups = int(rng.choice([1, 1, 2])) if rank else 1
  cin = int(rng.integers(1, 5)) * groups * 2
  cout = int(rng.integers(1, 5)) * groups * 2
  stock = {"use_bias": bool(rng.integers(2))}
  epi = {
    "sampler": str(rng.choice(["learned", "learned", "fixed"])),
    "channel_roll": int(rng.integers(3)),
  }
  if epi["sampler"] == "learned":
    epi["learner"] = str(rng.choice(["param", "param", "feature"]))
    epi["offset_scale"] = float(rng.choice([1.0, 10.0]))
  if rank:
    k = int(rng.integers(1, 4))
    stock["kernel_size"] = k
    stock["groups"] = groups
    paddings = ["valid", "same"] + (["causal"] if rank == 1 else [])
    stock["padding"] = str(rng.choice(paddings))
    if rng.integers(2):
      stock["strides"] = int(rng.integers(1, 3))
    elif k > 1 and rng.integers(2):
      stock["dilation_rate"] = 2
    kin = cin // groups
    slack = int(rng.integers(0, 3))
    cie = int(rng.integers(1, kin + 1))
    coe = int(rng.integers(1, cout + 1))
    if rng.integers(2) or (kin * cout <= 2):
      epi["epitome_shape"] = (k + slack,) * rank + (cie, coe)
    else:
      epi["compression"] = float(rng.choice([1.5, 2.0]))
    spatial = (int(rng.integers(6, 10)),) * rank
    input_shape = (3,) + spatial + (cin,)
  else:
    epi["compression"] = float(rng.choice([1.5, 2.0, 3.0]))
    input_shape = (3, cin)
  stock["filters" if rank else "units"] = cout
  if "compression" in epi and epi["compression"] * 2 > cin * cout:
    epi["compression"] = 1.0
  return kind, stock, epi, input_shape


CLASSES = {
  "dense": (ke.EpitomeDense, ke3.EpitomeDense),
  "conv1d": (ke.EpitomeConv1D, ke3.EpitomeConv1D),
  "conv2d": (ke.EpitomeConv2D, ke3.EpitomeConv2D),
}


def twin_layers(case, rng):
  """A Keras 2 and a Keras 3 layer of one configuration, with the same weights."""
  kind, stock, epi, input_shape = case
  k2_cls, k3_cls = CLASSES[kind]
  k2 = k2_cls(**stock, **epi, activation="relu")
  k3 = k3_cls(**stock, **epi, activation="relu")
  k2.build(input_shape)
  k3.build(input_shape)
  g = k2.epitome_geometry
  k2.epitome.assign(rng.normal(size=g.epitome_shape).astype("float32"))
  routing = ke.RoutingMap(
    rng.uniform(-3, 3 * g.cin_e, g.num_in_chunks),
    rng.uniform(-3, 3 * g.cout_e, g.num_out_chunks),
    rng.uniform(-0.3, max(g.slack + (0,)) + 0.3, (g.num_out_chunks, g.rank)),
  )
  if epi["sampler"] == "learned":
    k2.set_routing_map(routing)
  if k2.use_bias:
    k2.bias.assign(rng.normal(size=k2.bias.shape).astype("float32"))
  by_name = {
    w.name.split("/")[-1].split(":")[0]: w
    for w in k2.weights
    if "offset_learner" not in w.name
  }
  for w in k3.weights:
    name = w.path.split("/")[-1]
    if "offset_learner" in w.path:
      continue  # the learner does not act at inference; it starts at zero
    w.assign(by_name[name].numpy())
  return k2, k3, input_shape


class Keras3LayerTest(tf.test.TestCase, parameterized.TestCase):
  def test_same_function_as_keras2(self):
    rng = np.random.default_rng(SEED)
    for i in range(NUM_CASES):
      case = random_case(rng)
      msg = f"seed {SEED}, case {i}: {case}"
      try:
        k2, k3, input_shape = twin_layers(case, rng)
      except ValueError as e:  # a configuration both refuse
        self.assertIn("'", str(e), msg)
        continue
      x = rng.normal(size=input_shape).astype("float32")
      r = None
      y2 = k2(x, training=False)
      y3 = k3(x, training=False)
      self.assertAllClose(y2, np.asarray(y3), atol=1e-6, rtol=1e-6, msg=msg)
      np.testing.assert_allclose(
        k2.routing_map.in_offsets, k3.routing_map.in_offsets, atol=1e-6, err_msg=msg
      )
      if case[2]["sampler"] != "learned" or case[2].get("learner") == "feature":
        continue
      r = rng.normal(size=y2.shape).astype("float32")
      grads = []
      for layer in (k2, k3):
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(tf.convert_to_tensor(layer(x, training=True)) * r)
        variables = [layer.epitome, layer.in_offsets, layer.out_offsets]
        grads.append(tape.gradient(loss, variables))
      for g2, g3 in zip(*grads, strict=True):
        g2, g3 = np.asarray(g2), np.asarray(g3)
        scale = max(np.abs(g2).max(), 1e-3)
        np.testing.assert_allclose(g3 / scale, g2 / scale, atol=1e-5, err_msg=msg)

  def test_ops_sampler_equals_tf_sampler(self):
    rng = np.random.default_rng(SEED + 1)
    for i in range(20):
      rank = int(rng.integers(3))
      spatial = tuple(int(s) for s in rng.integers(1, 4, rank))
      cin, cout = int(rng.integers(1, 10)), int(rng.integers(1, 10))
      g = ke.keras3.layers.geo.EpitomeGeometry(
        spatial + (cin, cout),
        tuple(s + int(rng.integers(3)) for s in spatial)
        + (int(rng.integers(1, cin + 1)), int(rng.integers(1, cout + 1))),
        channel_roll=int(rng.integers(3)),
      )
      e = tf.constant(rng.normal(size=g.epitome_shape), tf.float32)
      i_o = tf.constant(rng.normal(size=g.num_in_chunks) * 4, tf.float32)
      o_o = tf.constant(rng.normal(size=g.num_out_chunks) * 4, tf.float32)
      s_o = tf.constant(rng.uniform(-1, 4, (g.num_out_chunks, rank)), tf.float32)
      s_arg = s_o if g.slack_axes else None
      k_tf = sampling.sample_kernel(e, i_o, o_o, s_arg, g)
      k_ops = ops_sampling.sample_kernel(e, i_o, o_o, s_arg, g)
      self.assertAllClose(k_tf, k_ops, atol=1e-6, msg=f"seed {SEED + 1}, case {i}: {g}")

  @parameterized.parameters("param", "feature")
  def test_fit_save_load(self, learner):
    model = keras.Sequential(
      [
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(16, 3, padding="same"),
        ke3.EpitomeConv2D(
          32, 3, padding="same", compression=4, activation="relu", learner=learner
        ),
        keras.layers.GlobalAveragePooling2D(),
        ke3.EpitomeDense(10, compression=2),
      ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 10, 64)
    layer = model.layers[1]
    before = layer.routing_map
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])
    self.assertGreater(
      np.abs(layer.routing_map.in_offsets - before.in_offsets).max(), 0
    )
    path = os.path.join(self.get_temp_dir(), "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllEqual(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    stored = {
      w.path.split("/")[-1]
      for w in loaded.layers[1].weights
      if "offset_learner" not in w.path  # the learner's own Conv has a kernel
    }
    self.assertIn("epitome", stored)
    self.assertNotIn("kernel", stored)  # the file stores the epitome, not the kernel

  def test_fit_with_jit_compile(self):
    model = keras.Sequential(
      [
        keras.Input((8, 8, 4)),
        ke3.EpitomeConv2D(8, 3, padding="same", compression=2),
        keras.layers.GlobalAveragePooling2D(),
        ke3.EpitomeDense(3, compression=2),
      ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    rng = np.random.default_rng(2)
    x = rng.random((16, 8, 8, 4)).astype("float32")
    y = rng.random((16, 3)).astype("float32")
    before = model.layers[0].routing_map.out_offsets
    losses = model.fit(x, y, epochs=3, batch_size=8, verbose=0).history["loss"]
    self.assertLess(losses[-1], losses[0])
    self.assertFalse(np.allclose(model.layers[0].routing_map.out_offsets, before))

  def test_load_in_fresh_process(self):
    model = keras.Sequential(
      [keras.Input((16, 4)), ke3.EpitomeConv1D(8, 3, padding="causal", compression=2)]
    )
    x = np.random.default_rng(1).random((2, 16, 4)).astype("float32")
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "m.keras")
    model.save(path)
    np.save(os.path.join(tmp, "x.npy"), x)
    np.save(os.path.join(tmp, "y.npy"), model.predict(x, verbose=0))
    code = (
      "import numpy as np, keras, keras_epitome.keras3\n"
      f"m = keras.models.load_model({path!r})\n"
      f"x = np.load({os.path.join(tmp, 'x.npy')!r})\n"
      f"y = np.load({os.path.join(tmp, 'y.npy')!r})\n"
      "assert np.array_equal(m.predict(x, verbose=0), y)\n"
      "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])

  def test_keras3_features_on_stock_kernels_refused(self):
    model = keras.Sequential([keras.Input((8,)), ke3.EpitomeDense(4, compression=2)])
    with self.assertRaisesRegex(
      ValueError, "EpitomeDense '.*'.*stored kernel.*strip_epitome"
    ):
      model.quantize("int8")
    with self.assertRaisesRegex(ValueError, "enable_lora.*strip_epitome"):
      model.layers[0].enable_lora(2)
    with self.assertRaisesRegex(ValueError, "lora_rank=2 is not supported"):
      ke3.EpitomeDense(4, compression=2, lora_rank=2)

  def test_quantize_refused_with_the_feature_learner(self):
    """model.quantize must not quantize the learner inside an epitome layer."""
    model = keras.Sequential(
      [
        keras.Input((6, 6, 4)),
        ke3.EpitomeConv2D(8, 3, compression=2, learner="feature", name="c"),
      ]
    )
    learner_layers = model.layers[0].offset_learner._flatten_layers(include_self=False)
    with self.assertRaisesRegex(
      ValueError, "EpitomeConv2D 'c'.*offset learner.*strip_epitome"
    ):
      model.quantize("int8")
    self.assertFalse([layer.name for layer in learner_layers if layer.quantization_mode])

  def test_bad_arguments_name_the_layer(self):
    with self.assertRaisesRegex(ValueError, "EpitomeConv2D 'c'.*compression"):
      ke3.EpitomeConv2D(8, 3, name="c")
    with self.assertRaisesRegex(ValueError, "EpitomeConv2D 'c'.*channels_last"):
      ke3.EpitomeConv2D(8, 3, compression=2, data_format="channels_first", name="c")
    layer = ke3.EpitomeDense(4, compression=100, name="d")
    with self.assertRaisesRegex(ValueError, "EpitomeDense 'd'"):
      layer.build((2, 3))

  def test_signature_has_stock_and_epitome_arguments(self):
    import inspect

    for cls, stock in ke3.layers.STOCK_OF.items():
      params = inspect.signature(cls).parameters
      for name in inspect.signature(stock.__init__).parameters:
        if name not in ("self", "kwargs"):
          self.assertIn(name, params, cls.__name__)
      for name in ke3.layers.EPITOME_ARGS:
        self.assertIn(name, params, cls.__name__)

  def test_mixed_precision_keeps_variables_float32(self):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
      layer = ke3.EpitomeConv2D(8, 3, compression=2)
      y = layer(np.ones((1, 6, 6, 4), "float32"))
    finally:
      keras.mixed_precision.set_global_policy("float32")
    self.assertEqual(y.dtype, "float16")
    self.assertEqual(layer.epitome.dtype, "float32")
    self.assertEqual(layer.in_offsets.dtype, "float32")


class Keras3OtherBackendsTest(tf.test.TestCase):
  """The layers on JAX and PyTorch (each where installed), in a child process."""

  def _check(self, backend):
    if importlib.util.find_spec(backend) is None:
      self.skipTest(f"{backend} is not installed")
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "keras3_backend_check.py"), tmp],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
    )
    self.assertEqual(out.returncode, 0, out.stdout[-2000:] + out.stderr[-3000:])
    self.assertIn(f"{backend} fit", out.stdout)
    self.assertIn("ok", out.stdout)
    model = keras.models.load_model(os.path.join(tmp, "model.keras"))
    x = np.load(os.path.join(tmp, "x.npy"))
    y_other = np.load(os.path.join(tmp, "y.npy"))
    self.assertAllClose(model.predict(x, verbose=0), y_other, atol=1e-5, rtol=1e-5)

  def test_jax_backend(self):
    """On JAX the sampler equals the oracle; a JAX-trained .keras loads here within 1e-5."""
    self._check("jax")

  def test_torch_backend(self):
    """On PyTorch the sampler equals the oracle; a torch-trained .keras loads here within 1e-5."""
    self._check("torch")


if __name__ == "__main__":
  tf.test.main()
