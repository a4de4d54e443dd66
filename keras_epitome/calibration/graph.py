"""The model graph as calibration walks it: channel-wise layers, inputs, activations."""

from __future__ import annotations

import collections
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from keras_epitome.backend import keras


def feeds_only_batchnorm(layer) -> bool:
  nodes = getattr(layer, "_outbound_nodes", [])
  if not nodes:
    return False
  for node in nodes:
    consumer = node.outbound_layer
    if not isinstance(consumer, keras.layers.BatchNormalization):
      return False
    axis = consumer.axis
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    if list(axis) not in ([-1], [len(layer.output_shape) - 1]):
      return False
  return getattr(layer, "activation", None) is keras.activations.linear


def input_model(model, layers: Sequence):
  """A model from ``model``'s input to the inputs of ``layers`` (or None)."""
  try:
    return keras.Model(model.inputs, [la.input for la in layers])
  except (AttributeError, ValueError, TypeError):
    return None


_CHANNELWISE = (
  keras.layers.ReLU,
  keras.layers.LeakyReLU,
  keras.layers.ELU,
  keras.layers.Activation,
  keras.layers.MaxPooling1D,
  keras.layers.MaxPooling2D,
  keras.layers.AveragePooling1D,
  keras.layers.AveragePooling2D,
  keras.layers.GlobalAveragePooling1D,
  keras.layers.GlobalAveragePooling2D,
  keras.layers.GlobalMaxPooling1D,
  keras.layers.GlobalMaxPooling2D,
  keras.layers.Dropout,
)


def channelwise(layer) -> bool:
  """Whether the layer acts on each channel alone (commutes with permutations)."""
  if isinstance(layer, keras.layers.BatchNormalization):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return list(axis) in ([-1], [len(layer.input_shape) - 1])
  if isinstance(layer, keras.layers.Activation):
    return layer.activation is not keras.activations.softmax
  if isinstance(layer, _CHANNELWISE):
    return getattr(layer, "data_format", "channels_last") == "channels_last"
  return False


def single_inbound(layer):
  nodes = getattr(layer, "_inbound_nodes", [])
  if len(nodes) != 1:
    return None
  inbound = nodes[0].inbound_layers
  if isinstance(inbound, (list, tuple)):
    return inbound[0] if len(inbound) == 1 else None
  return inbound


def permutable(layer, refit_names) -> bool:
  """Whether ``layer``'s output channels may be reordered.

  True when every path from its output goes through channel-wise layers only
  into layers that are refitted to the data (which take their inputs in any
  order); not when the output is a model output or reaches anything else.
  """
  stack, seen = [layer], set()
  while stack:
    current = stack.pop()
    nodes = getattr(current, "_outbound_nodes", [])
    if not nodes:
      return False  # a model output: its channel order is fixed
    for node in nodes:
      consumer = node.outbound_layer
      if id(consumer) in seen:
        continue
      seen.add(id(consumer))
      if len(getattr(consumer, "_inbound_nodes", [])) != 1:
        return False
      if consumer.name in refit_names:
        continue
      if not channelwise(consumer):
        return False
      stack.append(consumer)
  return True


class Activations:
  """A functional model's activations on a data set, computed node by node.

  Each node runs once, in batches, on the stored values of its inputs, with
  its layer's weights at the time it runs, so a calibration that fits the
  layers in network order and asks for each layer's inputs when it comes to
  it runs the model once in all, not once per layer. A value is dropped once
  every node that reads it has run (the model's outputs are kept). Keras
  masks (``Embedding(mask_zero=True)``, ``Masking``) travel with the values.

  Args:
    model: a functional (or Sequential with an ``Input``) model with one input.
    x: the model's inputs.
    batch_size: batch size of the layer calls.
  """

  def __init__(self, model, x: np.ndarray, batch_size: int):
    self.batch_size = batch_size
    self._left = collections.Counter(model._tensor_usage_count)
    self._keep = {str(id(t)) for t in model.outputs}
    self._producer: Dict[str, object] = {}
    for depth in sorted(model._nodes_by_depth, reverse=True):
      for node in model._nodes_by_depth[depth]:
        if not node.is_input:
          for key in node.flat_output_ids:
            self._producer[key] = node
    (inp,) = model.inputs
    self._values: Dict[str, np.ndarray] = {str(id(inp)): x}
    self._masks: Dict[str, np.ndarray] = {}  # Keras masks, where a layer makes one

  @staticmethod
  def supports(model) -> bool:
    return (
      getattr(model, "_is_graph_network", False)
      and hasattr(model, "_nodes_by_depth")
      and hasattr(model, "_tensor_usage_count")
      and len(model.inputs or []) == 1
    )

  def value(self, tensor) -> np.ndarray:
    """The value of a symbolic tensor of the model on the data."""
    key = str(id(tensor))
    if key not in self._values:
      self._run(self._producer[key])
    return self._values[key]

  def _run(self, node) -> None:
    for key in node.flat_input_ids:
      if key not in self._values:
        self._run(self._producer[key])
    keys = node.flat_input_ids
    count = collections.Counter(keys)
    n = len(self._values[keys[0]]) if keys else 0
    expects_training = getattr(
      getattr(node.layer, "_call_spec", None), "expects_training_arg", False
    )
    outs, masks = [], []
    for start in range(0, n, self.batch_size):
      stop = start + self.batch_size
      batch = {}
      for k, c in count.items():
        value = tf.convert_to_tensor(self._values[k][start:stop])
        if k in self._masks:  # e.g. after Embedding(mask_zero=True)
          value._keras_mask = tf.convert_to_tensor(self._masks[k][start:stop])
        batch[k] = [value] * c
      args, kwargs = node.map_arguments(batch)
      if expects_training and "training" not in kwargs:
        kwargs["training"] = False
      flat = tf.nest.flatten(node.layer(*args, **kwargs))
      outs.append([np.asarray(o) for o in flat])
      masks.append([getattr(o, "_keras_mask", None) for o in flat])
    for j, key in enumerate(node.flat_output_ids):
      self._values[key] = np.concatenate([o[j] for o in outs])
      if masks[0][j] is not None:
        self._masks[key] = np.concatenate([np.asarray(m[j]) for m in masks])
    for key in keys:
      self._left[key] -= 1
      if self._left[key] <= 0 and key not in self._keep:
        self._values.pop(key, None)
        self._masks.pop(key, None)
