"""Gradient passes after the least squares: block reconstruction, output matching.

In the spirit of block reconstruction for post-training quantization
(AdaRound/BRECQ): with ``ExperimentalCalibration.reconstruct_steps``, each
epitome layer's block (the layer and the BatchNorm and activation layers right
after it) is fitted by Adam to the original block's post-activation output,
on the converted model's own inputs to the block; with
``CalibrationConfig.output_steps``, all fitted layers are then fitted together
to the original model's output on the calibration data (mean squared error of
the outputs, e.g. logits; no labels). Each pass trains the epitomes, biases
and BatchNorm scales and offsets (and the kernels of refitted stock layers),
keeps the routing map and the moving statistics, and is undone when it does
not lower its error on the calibration data. What they gain is measured in
``docs/results.md``.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from keras_epitome import layers as epitome_layers
from keras_epitome.backend import keras
from keras_epitome.calibration import data, graph

_BLOCK_TAIL = (
  keras.layers.BatchNormalization,
  keras.layers.ReLU,
  keras.layers.LeakyReLU,
  keras.layers.ELU,
  keras.layers.Activation,
  keras.layers.Dropout,
)


def block_end(layer, refit_names, teacher_by_name):
  """The last layer of ``layer``'s block: it and the BatchNorm/activations after it.

  The chain stops before anything that is not a channel-wise normalization or
  activation (pooling, another fitted layer, a branch, a model output's
  consumer) and before layers the teacher does not have under the same name.
  """
  end = layer
  while True:
    nodes = getattr(end, "_outbound_nodes", [])
    if len(nodes) != 1:
      return end
    consumer = nodes[0].outbound_layer
    if (
      len(getattr(consumer, "_inbound_nodes", [])) != 1
      or consumer.name in refit_names
      or not isinstance(consumer, _BLOCK_TAIL)
      or not graph.channelwise(consumer)
      or type(teacher_by_name.get(consumer.name)) is not type(consumer)
    ):
      return end
    end = consumer


def block_layers(layer, end):
  out = [layer]
  while out[-1] is not end:
    out.append(out[-1]._outbound_nodes[0].outbound_layer)
  return out


def fit_variables(layers) -> list:
  """Variables a reconstruction trains: epitome/kernel, bias, BN scale/offset."""
  out = []
  for la in layers:
    if isinstance(la, epitome_layers.EPITOME_LAYERS):
      names = ("epitome", "bias")
    elif isinstance(la, keras.layers.BatchNormalization):
      names = ("gamma", "beta")
    elif type(la) in epitome_layers.STOCK_TO_EPITOME:
      names = ("kernel", "bias")
    else:
      names = ()
    for name in names:
      v = getattr(la, name, None)
      if v is not None and v.trainable:
        out.append(v)
  return out


def relative_error(model, inputs, target, batch_size) -> float:
  out = data.predict(model, inputs, batch_size).astype(np.float64)
  t = target.astype(np.float64)
  axes = tuple(range(t.ndim - 1))
  ref = float(np.square(t - t.mean(axes)).sum())
  return math.sqrt(float(np.square(out - t).sum()) / max(ref, 1e-30))


def adam_match(model, inputs, target, variables, steps, lr, batch_size, seed):
  """Adam steps fitting ``model(inputs)`` to ``target`` (MSE); undone if worse.

  Returns the relative error before and after (after = before if undone).
  """
  before = relative_error(model, inputs, target, batch_size)
  saved = [v.numpy() for v in variables]
  t = target.astype(np.float32)
  scale = float(np.mean(np.var(t.reshape(-1, t.shape[-1]), 0))) or 1.0
  xs = tf.constant(inputs)
  ts = tf.constant(t)
  n = len(inputs)
  optimizer = keras.optimizers.Adam(
    keras.optimizers.schedules.CosineDecay(float(lr), int(steps))
  )

  @tf.function
  def step(idx):
    xb, tb = tf.gather(xs, idx), tf.gather(ts, idx)
    with tf.GradientTape() as tape:
      out = model(xb, training=False)
      loss = tf.reduce_mean(tf.square(tf.cast(out, tf.float32) - tb)) / scale
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return loss

  rng = np.random.default_rng(seed)
  size = min(batch_size, n)
  order = rng.permutation(n)
  at = 0
  for _ in range(int(steps)):
    if at + size > n:
      order, at = rng.permutation(n), 0
    step(tf.constant(order[at : at + size]))
    at += size
  after = relative_error(model, inputs, target, batch_size)
  if not after < before:
    for v, w in zip(variables, saved, strict=True):
      v.assign(w)
    after = before
  return before, after


def reconstruct_block(
  student, layer, end, x, target, record, batch_size, steps, lr, seed
):
  """Fits ``layer``'s block to the original block's output (see ``calibrate``)."""
  try:
    block = keras.Model(layer.input, end.output)
    inputs = data.predict(graph.input_model(student, [layer]), x, batch_size)
  except (AttributeError, ValueError, TypeError):
    block = keras.Model(student.inputs, end.output)
    inputs = x
  variables = fit_variables(block_layers(layer, end))
  before, after = adam_match(
    block, inputs, target, variables, steps, lr, batch_size, seed
  )
  record.reconstructed_to = end.name
  record.block_error_before = before
  record.block_error = after


def match_outputs(student, teacher, x, refit_names, first, batch_size, steps, lr, seed):
  """Fits the converted model's output to the original's (see ``calibrate``)."""
  if len(student.outputs) != 1 or len(teacher.outputs) != 1:
    return None
  layers = [
    la
    for i, la in enumerate(student.layers)
    if i >= first
    and (la.name in refit_names or isinstance(la, keras.layers.BatchNormalization))
  ]
  target = data.predict(teacher, x, batch_size)
  return adam_match(
    student, x, target, fit_variables(layers), steps, lr, batch_size, seed
  )
