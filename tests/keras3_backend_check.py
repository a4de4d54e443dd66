"""The Keras 3 layers on the JAX or PyTorch backend (run by tests/test_keras3.py in a child process).

Needs no TensorFlow, so it also runs on a machine with JAX or PyTorch alone
(a GPU host): ``KERAS_BACKEND=jax python tests/keras3_backend_check.py
OUT_DIR`` (or ``KERAS_BACKEND=torch``). It checks the ``keras.ops`` sampler
against the NumPy oracle (values) and against finite differences (gradients,
by the backend's own autodiff), trains a small model whose loss falls and
offsets move, and saves the model, its inputs and outputs to ``OUT_DIR`` for
the TensorFlow side to load.
"""

import os
import sys

import keras
import numpy as np
from keras import ops

import keras_epitome.keras3 as ke
from keras_epitome.geometry import EpitomeGeometry, RoutingMap
from keras_epitome.keras3 import ops_sampling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402  (the tests' NumPy oracle, beside this file)

BACKEND = keras.backend.backend()
assert BACKEND in ("jax", "torch"), BACKEND


def gradients(loss, args):
  """The gradient of the scalar ``loss(*args)`` for each of ``args``, by the backend."""
  if BACKEND == "jax":
    import jax

    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)
  import torch

  tensors = [torch.tensor(a, requires_grad=True) for a in args]
  loss(*tensors).backward()
  return [t.grad.numpy() for t in tensors]


def check_sampler(rng, cases=20):
  worst_value, worst_grad = 0.0, 0.0
  for _ in range(cases):
    rank = int(rng.integers(3))
    spatial = tuple(int(s) for s in rng.integers(1, 4, rank))
    cin, cout = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    g = EpitomeGeometry(
      spatial + (cin, cout),
      tuple(s + int(rng.integers(3)) for s in spatial)
      + (int(rng.integers(1, cin + 1)), int(rng.integers(1, cout + 1))),
      channel_roll=int(rng.integers(3)),
    )
    e = rng.normal(size=g.epitome_shape).astype(np.float32)
    # Fractions away from the kinks, so finite differences are smooth.
    i_o = rng.integers(-4, 9, g.num_in_chunks) + rng.uniform(0.2, 0.8, g.num_in_chunks)
    o_o = rng.integers(-4, 9, g.num_out_chunks) + rng.uniform(
      0.2, 0.8, g.num_out_chunks
    )
    s_o = np.zeros((g.num_out_chunks, rank))
    for d in g.slack_axes:
      s_o[:, d] = rng.integers(0, g.slack[d], g.num_out_chunks) + rng.uniform(
        0.2, 0.8, g.num_out_chunks
      )
    i_o, o_o, s_o = (a.astype(np.float32) for a in (i_o, o_o, s_o))
    ref = oracle.sample_kernel(e, RoutingMap(i_o, o_o, s_o), g)
    s_arg = s_o if g.slack_axes else None
    k = ops.convert_to_numpy(ops_sampling.sample_kernel(e, i_o, o_o, s_arg, g))
    worst_value = max(worst_value, float(np.abs(k - ref).max()))
    r = rng.normal(size=g.kernel_shape).astype(np.float32)

    def loss(i_o, o_o, e, s_arg=s_arg, g=g, r=r):
      return ops.sum(ops.multiply(ops_sampling.sample_kernel(e, i_o, o_o, s_arg, g), r))

    if BACKEND == "jax":  # one compilation instead of op-by-op dispatch
      import jax

      loss = jax.jit(loss)
    gi, go, ge = gradients(loss, (i_o, o_o, e))
    # The loss is linear in each offset between integers: a central difference
    # of step 0.1 is exact up to float rounding.
    for arr, grad, idx in ((i_o, gi, 0), (o_o, go, 1)):
      for j in range(arr.size):
        up, dn = arr.copy(), arr.copy()
        up[j] += 0.05
        dn[j] -= 0.05
        args_up = [i_o, o_o, e]
        args_dn = [i_o, o_o, e]
        args_up[idx], args_dn[idx] = up, dn
        fd = (float(loss(*args_up)) - float(loss(*args_dn))) / 0.1
        scale = max(abs(fd), 1.0)
        worst_grad = max(worst_grad, abs(float(grad[j]) - fd) / scale)
    assert np.asarray(ge).shape == g.epitome_shape
  assert worst_value < 1e-5, worst_value
  assert worst_grad < 1e-2, worst_grad  # float32 finite differences
  print(
    f"sampler vs oracle: max |dK| {worst_value:.2e}, offsets' gradient vs FD {worst_grad:.2e}"
  )


def train_and_save(out_dir, rng):
  model = keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(16, 3, padding="same"),
      ke.EpitomeConv2D(32, 3, padding="same", compression=4, activation="relu"),
      ke.EpitomeConv2D(32, 3, padding="same", compression=4, learner="feature"),
      keras.layers.GlobalAveragePooling2D(),
      ke.EpitomeDense(10, compression=2),
    ]
  )
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x = rng.random((64, 8, 8, 3)).astype("float32")
  y = rng.integers(0, 10, 64)
  before = model.layers[1].routing_map
  history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
  losses = history.history["loss"]
  assert losses[-1] < losses[0], losses
  moved = np.abs(model.layers[1].routing_map.in_offsets - before.in_offsets).max()
  assert moved > 0, moved
  model.save(os.path.join(out_dir, "model.keras"))
  np.save(os.path.join(out_dir, "x.npy"), x)
  np.save(os.path.join(out_dir, "y.npy"), np.asarray(model.predict(x, verbose=0)))
  loaded = keras.models.load_model(os.path.join(out_dir, "model.keras"))
  assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
  print(f"{BACKEND} fit: loss {losses[0]:.4f} -> {losses[-1]:.4f}, offsets moved {moved:.2e}")


def check_mixed_precision():
  """Under mixed_float16 the layers compute in float16 and keep float32 variables."""
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    conv = ke.EpitomeConv2D(8, 3, padding="same", compression=4)
    dense = ke.EpitomeDense(6, compression=2)
    y = dense(ops.mean(conv(np.ones((2, 6, 6, 4), "float32")), axis=(1, 2)))
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert str(y.dtype).endswith("float16"), y.dtype
  for layer in (conv, dense):
    assert layer.epitome.dtype == "float32", layer.epitome.dtype
    assert layer.in_offsets.dtype == "float32", layer.in_offsets.dtype
  print("mixed precision: float16 compute, float32 epitome and offsets")


def check_torch_compile(rng):
  """``jit_compile=True`` on PyTorch (torch.compile): trains, and predicts as uncompiled."""

  def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
      [
        keras.Input((8, 8, 3)),
        ke.EpitomeConv2D(8, 3, padding="same", compression=2),  # channel roll on
        keras.layers.GlobalAveragePooling2D(),
        ke.EpitomeDense(4, compression=2),
      ]
    )

  compiled, plain = model(), model()
  compiled.compile("adam", "mse", jit_compile=True)
  x = rng.random((16, 8, 8, 3)).astype("float32")
  y = rng.random((16, 4)).astype("float32")
  losses = compiled.fit(x, y, epochs=2, batch_size=16, verbose=0).history["loss"]
  assert losses[-1] < losses[0], losses
  plain.set_weights(compiled.get_weights())
  diff = np.abs(compiled.predict(x, verbose=0) - plain.predict(x, verbose=0)).max()
  assert diff < 1e-5, diff
  print(f"torch.compile fit: loss {losses[0]:.4f} -> {losses[-1]:.4f}, vs eager {diff:.1e}")


if __name__ == "__main__":
  out = sys.argv[1] if len(sys.argv) > 1 else "."
  rng = np.random.default_rng(0)
  check_sampler(rng)
  check_mixed_precision()
  if BACKEND == "torch":
    check_torch_compile(rng)
  train_and_save(out, rng)
  print("ok")
