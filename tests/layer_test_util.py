"""A shared check of what every epitome layer must do, like Keras' ``run_layer_test``.

:func:`run_layer_test` builds a layer, calls it, round-trips its config, saves
and loads it in the ``.keras``, ``.h5`` and SavedModel formats (identical
outputs, training continues after loading) and checks that the epitome and the
learned offsets receive non-zero gradients.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

import keras_epitome as ke
from keras_epitome import layers as epitome_layers

keras = ke.keras

EPITOME_ARGS = epitome_layers.EPITOME_ARGS


def stock_kwargs(kwargs: dict) -> dict:
  """The kwargs a stock layer understands (epitome arguments removed)."""
  return {k: v for k, v in kwargs.items() if k not in EPITOME_ARGS}


def randomize_routing(layer, seed: int = 0, rng=None):
  """Gives a built layer fractional offsets, so every gradient path is exercised.

  ``rng`` (a NumPy generator) continues a stream shared across layers; else a
  generator seeded with ``seed`` is used.
  """
  g = layer.epitome_geometry
  rng = np.random.default_rng(seed) if rng is None else rng
  routing = ke.RoutingMap(
    rng.uniform(0, g.cin_e, g.num_in_chunks),
    rng.uniform(0, g.cout_e, g.num_out_chunks),
    rng.uniform(0, 1, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
  )
  layer.set_routing_map(routing)
  return routing


def _offset_variables(layer):
  return [
    v
    for v in (layer.in_offsets, layer.out_offsets, layer.spatial_offsets)
    if v is not None
  ]


def _single_layer_model(layer_cls, kwargs, input_shape):
  inputs = keras.Input(input_shape[1:], batch_size=None)
  layer = layer_cls(**kwargs)
  outputs = layer(inputs)
  return keras.Model(inputs, outputs), layer


def _check_training_continues(test, model, x, y):
  model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
  before = [w.copy() for w in model.get_weights()]
  model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
  after = model.get_weights()
  changed = any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
  test.assertTrue(changed, "a training step after loading changed no weight")


def run_layer_test(
  test: tf.test.TestCase,
  layer_cls,
  kwargs: dict,
  input_shape: Sequence[int],
  *,
  saving: bool = True,
  formats: Sequence[str] = ("keras", "h5", "savedmodel"),
  atol: float = 1e-6,
  seed: int = 0,
  tmp_dir: Optional[str] = None,
):
  """Checks build, call, config, save/load and gradients of one epitome layer.

  Args:
    test: the running ``tf.test.TestCase`` (its assertions are used).
    layer_cls: an epitome layer class.
    kwargs: constructor arguments (stock and epitome ones).
    input_shape: full input shape including the batch size.
    saving: whether to run the save/load round trips.
    formats: which of ``"keras"``, ``"h5"``, ``"savedmodel"`` to check.
    atol: tolerance for outputs that must be equal.
    seed: seed for inputs and routing maps.
    tmp_dir: where to save; a fresh temporary folder by default.

  Returns:
    The built layer (inside a functional model).
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(input_shape).astype(np.float32)

  # Build and call; shapes match the stock layer's.
  model, layer = _single_layer_model(layer_cls, kwargs, input_shape)
  test.assertTrue(layer.built)
  stock = layer_cls._stock_class(**stock_kwargs(kwargs))
  y_stock = stock(x)
  test.assertEqual(tuple(layer.kernel.shape), tuple(stock.kernel.shape))
  if layer.sampler == "learned":
    randomize_routing(layer, seed)
  y = model(x, training=False).numpy()
  test.assertEqual(y.shape, tuple(y_stock.shape))
  test.assertTrue(np.all(np.isfinite(y)))
  test.assertEqual(
    tuple(layer.compute_output_shape(tf.TensorShape(input_shape))), y.shape
  )

  # The layer's output is the stock op with the sampled kernel.
  stock.kernel.assign(layer.kernel)
  if layer.use_bias:
    stock.bias.assign(layer.bias)
  test.assertAllClose(stock(x).numpy(), y, atol=1e-5, rtol=1e-5)

  # Config round trip.
  config = layer.get_config()
  for name in EPITOME_ARGS:
    test.assertIn(name, config)
  clone = layer_cls.from_config(config)
  test.assertEqual(clone.get_config(), config)
  clone(x)
  clone.set_weights(layer.get_weights())
  test.assertAllClose(clone(x, training=False), y, atol=atol)

  # Gradients reach the epitome and every learned offset.
  with tf.GradientTape() as tape:
    out = layer(x, training=True)
    loss = tf.reduce_sum(out * tf.constant(rng.standard_normal(out.shape), out.dtype))
  watched = [layer.epitome] + _offset_variables(layer)
  grads = tape.gradient(loss, watched)
  test.assertIsNotNone(grads[0])
  test.assertGreater(float(tf.reduce_max(tf.abs(grads[0]))), 0.0)
  if layer.sampler == "learned":
    for var, grad in zip(watched[1:], grads[1:], strict=True):
      test.assertIsNotNone(grad, f"no gradient for {var.name}")
      test.assertGreater(
        float(tf.reduce_max(tf.abs(grad))), 0.0, f"zero gradient for {var.name}"
      )
  else:
    for var in watched[1:]:
      test.assertFalse(var.trainable, f"{var.name} of a fixed sampler is trainable")

  if not saving:
    return layer

  y_target = rng.standard_normal(y.shape).astype(np.float32)
  tmp_dir = tmp_dir or tempfile.mkdtemp()
  for fmt in formats:
    path = os.path.join(tmp_dir, {"keras": "m.keras", "h5": "m.h5"}.get(fmt, "sm"))
    if fmt == "savedmodel":
      model.save(path, save_format="tf")
    else:
      model.save(path)
    loaded = keras.models.load_model(path)
    test.assertAllClose(
      loaded(x, training=False).numpy(), y, atol=atol, msg=f"format {fmt}"
    )
    loaded_layer = loaded.layers[-1]
    test.assertIsInstance(loaded_layer, layer_cls)
    test.assertEqual(loaded_layer.get_config(), config)
    _check_training_continues(test, loaded, x, y_target)
  return layer
