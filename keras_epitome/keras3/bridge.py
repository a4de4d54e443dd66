"""A Keras 3 model as a Keras 2 (``tf_keras``) model, and the weights back.

The data-aware conversion (:mod:`keras_epitome.calibration`) and
:func:`keras_epitome.allocate` work on Keras 2 models. For a Keras 3 model on
the TensorFlow backend, :func:`keras_epitome.keras3.epitomize` goes through
Keras 2 and back:

* :func:`to_keras2` builds a Keras 2 functional model computing the same
  function as a Keras 3 Sequential or functional model (nested ones are
  flattened into it), with the same layer names and weights: each Keras 3
  layer becomes the ``tf_keras`` layer of the same class name, built from its
  config (Keras-3-only keys removed, Keras 3 serialization dicts turned into
  what ``tf_keras`` takes), and the Keras 3 epitome layers become the Keras 2
  epitome layers holding the same epitome and routing map;
* :func:`from_keras2_weights` copies a Keras 2 model's weights into the Keras 3
  layers of the same names.

Only layers both Keras versions share are supported (the stock Keras layers
whose ``tf_keras`` twin takes the same config and stores the same weights in
the same order, and the epitome layers); anything else (a custom layer or
activation, a raw ``keras.ops`` call in a functional model) raises a
``ValueError`` naming it.

This module needs TensorFlow and ``tf_keras`` when its functions run; it
imports them inside the functions, so that :mod:`keras_epitome.keras3` imports
on a machine without TensorFlow.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import keras
import numpy as np

from keras_epitome.keras3 import layers as k3_layers

SUPPORT = (
  "the data-aware conversion of Keras 3 models supports the layers both Keras "
  "versions share (stock keras.layers such as Conv1D/Conv2D, DepthwiseConv2D, "
  "SeparableConv2D, Dense, BatchNormalization, LayerNormalization, activations, "
  "pooling, Add/Multiply/Concatenate, Flatten/Reshape, Dropout, ZeroPadding, "
  "Rescaling, Embedding, and the epitome layers) with built-in activations"
)

# Keras-3-only config keys (or settings the bridge does not carry), dropped
# when they hold the value under which the Keras 2 layer computes the same
# (``None``: any value); any other value is refused.
_NEUTRAL = {
  "lora_rank": (None,),
  "lora_alpha": (None,),
  "quantization_config": (None,),
  "rms_scaling": (False,),
  "renorm": (False,),
  "renorm_clipping": (None,),
  "renorm_momentum": None,  # unused without renorm
}
# Config keys spelled otherwise in tf_keras, per class name.
_RENAMED_KEYS = {"LeakyReLU": {"negative_slope": "alpha"}}
_SERIALIZED_SUFFIXES = ("_regularizer", "_constraint")


def _unsupported(layer, why: str) -> ValueError:
  return ValueError(
    f"to_keras2: layer '{layer.name}' ({type(layer).__name__}) {why}; {SUPPORT}"
  )


def _dtype(value):
  """A Keras 3 dtype policy (dict or object) as the name ``tf_keras`` takes."""
  if isinstance(value, dict):
    config = value.get("config") or {}
    return config.get("name", "float32")
  name = getattr(value, "name", None)
  return name if isinstance(name, str) else value


def _serialized(value, module):
  """A Keras 3 serialized initializer/regularizer/constraint for ``tf_keras``.

  Returns ``(ok, value)``: ``ok`` is False when ``tf_keras`` has no such
  object (the caller drops an initializer and refuses anything else).
  """
  if value is None or isinstance(value, str):
    try:
      module.get(value)
      return True, value
    except (ValueError, TypeError):
      return False, None
  if not isinstance(value, dict) or "class_name" not in value:
    return False, None
  config = dict(value.get("config") or {})
  config.pop("input_axes", None)  # Keras 3 initializers' fan axes
  config.pop("output_axes", None)
  spec = {"class_name": value["class_name"], "config": config}
  try:
    module.get(spec)
    return True, spec
  except (ValueError, TypeError):
    return False, None


def _activation_ok(name, k2) -> bool:
  """Whether the activation ``name`` exists in both Kerases and agrees."""
  try:
    k3_fn = keras.activations.get(name)
    k2_fn = k2.activations.get(name)
  except (ValueError, TypeError):
    return False
  x = np.linspace(-6.0, 6.0, 97, dtype=np.float32).reshape(1, -1)
  try:
    a = np.asarray(keras.ops.convert_to_numpy(k3_fn(keras.ops.convert_to_tensor(x))))
    import tensorflow as tf

    b = np.asarray(k2_fn(tf.constant(x)))
  except Exception:  # noqa: BLE001 (any failure means "not the same")
    return False
  return a.shape == b.shape and bool(np.allclose(a, b, atol=1e-5))


def _keras2_config(layer, k2) -> Dict[str, Any]:
  """The layer's Keras 3 config in the form its ``tf_keras`` twin takes."""
  config = dict(layer.get_config())
  for key, neutral in _NEUTRAL.items():
    if key not in config:
      continue
    value = config.pop(key)
    if neutral is not None and value not in neutral:
      raise _unsupported(
        layer, f"has {key}={value!r}, which the bridge to Keras 2 does not carry"
      )
  if "dtype" in config:
    config["dtype"] = _dtype(config["dtype"])
  for key in list(config):
    value = config[key]
    if key == "activation" or (key.endswith("_activation") and value is not None):
      if not isinstance(value, str) or not _activation_ok(value, k2):
        fn = getattr(layer, key, None)
        shown = value if isinstance(value, str) else getattr(fn, "__name__", fn)
        raise _unsupported(
          layer,
          f"has the activation {shown!r} ({key}), which tf_keras lacks or "
          "computes differently",
        )
    elif key.endswith("_initializer"):
      ok, spec = _serialized(value, k2.initializers)
      if ok:
        config[key] = spec
      else:
        config.pop(key)  # weights are copied afterwards
    elif key.endswith(_SERIALIZED_SUFFIXES):
      module = k2.regularizers if key.endswith("_regularizer") else k2.constraints
      ok, spec = _serialized(value, module)
      if not ok:
        raise _unsupported(layer, f"has the {key} {value!r}, which tf_keras lacks")
      config[key] = spec
  return config


def _keras2_class(layer, k2):
  """The ``tf_keras`` class (or Keras 2 epitome class) twin of a Keras 3 layer."""
  name = type(layer).__name__
  if k3_layers.is_epitome_layer(layer):
    import keras_epitome as ke2

    return getattr(ke2, name)
  module = type(layer).__module__ or ""
  if not module.startswith("keras."):
    raise _unsupported(layer, "is not a stock Keras layer")
  cls = getattr(k2.layers, name, None)
  if cls is None or isinstance(layer, keras.Model):
    raise _unsupported(layer, "has no Keras 2 (tf_keras) twin")
  return cls


def keras2_layer(layer, k2=None):
  """An unbuilt ``tf_keras`` layer with the Keras 3 ``layer``'s class name and config.

  Raises:
    ValueError: for a layer or activation ``tf_keras`` does not have, or a
      Keras-3-only setting (``rms_scaling=True``, LoRA...).
  """
  if k2 is None:
    import tf_keras as k2
  cls = _keras2_class(layer, k2)
  config = _keras2_config(layer, k2)
  for old, new in _RENAMED_KEYS.get(type(layer).__name__, {}).items():
    if old in config:
      config[new] = config.pop(old)
  try:
    return cls.from_config(config)
  except (TypeError, ValueError) as e:
    raise _unsupported(layer, f"cannot be rebuilt in tf_keras ({e})") from None


def _graph_of(model):
  """The Keras 3 ``Function`` that holds ``model``'s graph."""
  from keras.src.models.functional import Functional

  if isinstance(model, keras.Sequential):
    graph = getattr(model, "_functional", None)
    if graph is None:
      raise ValueError(
        f"to_keras2: Sequential model '{model.name}' has no input; give it a "
        "keras.Input (or build it) first"
      )
    return graph
  if isinstance(model, Functional):
    return model
  raise ValueError(
    f"to_keras2: model '{model.name}' is a subclassed model "
    f"({type(model).__name__}); only Sequential and functional models (nested "
    "ones included) can go to Keras 2"
  )


_NODE_KWARGS = ("training", "mask")


def to_keras2(model, name: Optional[str] = None):
  """A Keras 2 (``tf_keras``) functional model computing what ``model`` computes.

  Each layer of the Keras 3 Sequential or functional ``model`` (nested models
  flattened into the one graph, shared layers kept shared) becomes the
  ``tf_keras`` layer of the same class and name built from its config, called
  in the Keras 3 graph's order, and gets the Keras 3 layer's weights. The
  Keras 3 epitome layers become the Keras 2 epitome layers with the same
  epitome, routing map and bias. Outputs agree to float rounding.

  Args:
    model: a built Keras 3 Sequential or functional model, on the TensorFlow
      backend.
    name: the Keras 2 model's name (default: ``model.name``).

  Returns:
    A built ``tf_keras.Model``.

  Raises:
    ValueError: for a subclassed model, a layer or activation ``tf_keras``
      lacks (a custom one), or a ``keras.ops`` call that is not a layer,
      each named; or when the Keras backend is not TensorFlow.
  """
  if keras.backend.backend() != "tensorflow":
    raise ValueError(
      f"to_keras2 needs the TensorFlow backend (this is {keras.backend.backend()!r})"
    )
  import tf_keras as k2

  graph = _graph_of(model)
  twins: Dict[int, Any] = {}  # id(Keras 3 layer) -> Keras 2 layer
  copies = []  # (Keras 3 layer, Keras 2 layer)

  def twin(layer):
    if id(layer) not in twins:
      new = keras2_layer(layer, k2)
      twins[id(layer)] = new
      copies.append((layer, new))
    return twins[id(layer)]

  def call_fn(op, *args, **kwargs):
    if isinstance(op, keras.Model):
      inner = _graph_of(op)
      inputs = args[0] if len(args) == 1 else list(args)
      return run(inner, inputs)
    if not isinstance(op, keras.layers.Layer):
      raise ValueError(
        f"to_keras2: model '{model.name}' calls the operation '{op.name}' "
        f"({type(op).__name__}), which is not a layer (a keras.ops call in a "
        "functional model); the data-aware conversion of Keras 3 models supports "
        "the layers both Keras versions share: use the layer equivalent "
        "(keras.layers.Add, Multiply, Concatenate, Activation...; Lambda layers "
        "are not supported either)"
      )
    kwargs = {k: v for k, v in kwargs.items() if k not in _NODE_KWARGS}
    return twin(op)(*args, **kwargs)

  def run(g, inputs):
    return g._run_through_graph(inputs, call_fn=call_fn)

  inputs = []
  for x in graph.inputs:
    history = getattr(x, "_keras_history", None)
    input_name = history.operation.name if history is not None else None
    inputs.append(k2.Input(batch_shape=tuple(x.shape), dtype=x.dtype, name=input_name))
  outputs = run(graph, inputs if len(inputs) > 1 else inputs[0])
  try:
    new = k2.Model(inputs, outputs, name=name or model.name)
  except ValueError as e:
    raise ValueError(
      f"to_keras2: the flattened Keras 2 model of '{model.name}' is invalid "
      f"({e}); nested models' layers must have names unique in the whole model"
    ) from None
  for old, layer in copies:
    copy_weights(old, layer)
  return new


def _weight_key(weight, layer_name: str, attr: str) -> str:
  """A weight's name below its layer (``epitome``, ``offset_learner/norm/beta``)."""
  path = getattr(weight, attr).split(":")[0]
  parts = path.split("/")
  if layer_name in parts:
    parts = parts[parts.index(layer_name) + 1 :]
  return "/".join(parts)


def copy_weights(src, dst) -> None:
  """Copies one layer's weights from ``src`` to ``dst`` (Keras 3 and Keras 2, either way).

  Epitome layers go by weight name (the two Kerases order the offset
  learner's weights differently); stock layers by ``get_weights`` order,
  which the supported layers share, with the shapes checked.

  Raises:
    ValueError: when the two layers' weights do not correspond.
  """
  src_w, dst_w = list(src.weights), list(dst.weights)
  if len(src_w) != len(dst_w):
    raise ValueError(
      f"layer '{src.name}': {len(src_w)} weight(s) in the source "
      f"({type(src).__name__}) but {len(dst_w)} in the target "
      f"({type(dst).__name__})"
    )
  if not src_w:
    return

  def key(w, layer):
    # Keras 3 variables: path "model/layer/epitome"; Keras 2: name "layer/epitome:0".
    attr = "path" if isinstance(getattr(w, "path", None), str) else "name"
    return _weight_key(w, layer.name, attr)

  if k3_layers.is_epitome_layer(src) or k3_layers.is_epitome_layer(dst):
    by_key = {key(w, src): w for w in src_w}
    values = []
    for w in dst_w:
      k = key(w, dst)
      if k not in by_key:
        raise ValueError(
          f"epitome layer '{dst.name}': no weight '{k}' in the source layer "
          f"(it has {sorted(by_key)})"
        )
      values.append(_to_numpy(by_key[k]))
  else:
    values = [_to_numpy(w) for w in src_w]
  for w, v in zip(dst_w, values, strict=True):
    if tuple(w.shape) != tuple(v.shape):
      raise ValueError(
        f"layer '{dst.name}': weight '{key(w, dst)}' has shape "
        f"{tuple(w.shape)}, the source's has {tuple(v.shape)}"
      )
  dst.set_weights(values)


def _to_numpy(w) -> np.ndarray:
  if hasattr(w, "numpy"):
    try:
      return np.asarray(w.numpy())
    except Exception:  # noqa: BLE001 (a Keras 3 variable: convert below)
      pass
  return np.asarray(keras.ops.convert_to_numpy(w))


def _leaf_layers(model):
  """The model's layers, nested models looked through (not layers' sublayers)."""
  seen = set()
  stack = [model]
  while stack:
    for layer in stack.pop().layers:
      if id(layer) in seen:
        continue
      seen.add(id(layer))
      if isinstance(layer, keras.Model):
        stack.append(layer)
      else:
        yield layer


def from_keras2_weights(k3_model, k2_model) -> list:
  """Copies the Keras 2 model's weights into the Keras 3 layers of the same names.

  Every Keras 3 layer with weights (nested models looked through) takes the
  weights of the Keras 2 layer of its name in ``k2_model`` (searched through
  nested models too).

  Args:
    k3_model: a built Keras 3 model (epitome layers included).
    k2_model: a built Keras 2 model with layers of the same names and kinds,
      e.g. the Keras 2 conversion of :func:`to_keras2` of the model
      ``k3_model`` was converted from.

  Returns:
    The names of the layers whose weights were copied.

  Raises:
    ValueError: when a Keras 3 layer with weights has no Keras 2 layer of its
      name, or their weights do not correspond.
  """
  import tf_keras as k2

  k2_by_name = {}
  stack = [k2_model]
  while stack:
    m = stack.pop()
    for layer in m.layers:
      if isinstance(layer, k2.Model):
        stack.append(layer)
      else:
        k2_by_name.setdefault(layer.name, layer)
  copied = []
  for layer in _leaf_layers(k3_model):
    if not layer.weights:
      continue
    other = k2_by_name.get(layer.name)
    if other is None:
      raise ValueError(
        f"from_keras2_weights: Keras 3 layer '{layer.name}' "
        f"({type(layer).__name__}) has no Keras 2 layer of that name in "
        f"'{k2_model.name}'"
      )
    copy_weights(other, layer)
    copied.append(layer.name)
  return copied
