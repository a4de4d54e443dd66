"""The wrappers that drive the weight-compression contract, and the model API.

TF-MOT develops a per-weight compression API (``WeightCompressor`` and
``create_layer_for_training`` / ``create_layer_for_inference``) in its
repository, under ``tensorflow_model_optimization/python/core/common/keras/
compression/``, but does not ship it in its wheels, and its wrapper handles only
``Conv2D`` and ``Dense``. This module implements the same contract (its own
code) for any layer whose kernel is a weight attribute: ``Conv1D``, ``Conv2D``,
``Conv3D``, ``DepthwiseConv2D`` (``depthwise_kernel``), ``Dense`` and custom
layers that follow the ``self.<name> = self.add_weight(name="<name>")``
convention.

The contract itself (what an algorithm implements) is
:mod:`keras_epitome.compression.algorithm`.

The wrappers swap the weight for these computations: the wrapped layer never
creates the original variable, so neither the training nor the inference model
stores it. The inference wrapper reads the compressed variables behind a
data-dependent ``tf.cond`` so that the TFLite converter cannot constant-fold the
decompression back into a full-size weight (TF-MOT's own workaround).

Example:
  >>> import keras_epitome as ke
  >>> from keras_epitome import compression
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 1)),
  ...     keras.layers.Conv2D(16, 3, activation="relu"),
  ...     keras.layers.Flatten(),
  ...     keras.layers.Dense(10),
  ... ])
  >>> algorithm = compression.SVDCompressor(rank=2)
  >>> training_model = compression.compress_model_for_training(model, algorithm)
  >>> # ... training_model.compile(...); training_model.fit(...)
  >>> inference_model = compression.compress_model_for_inference(training_model)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_epitome import walk
from keras_epitome.backend import keras
from keras_epitome.compression.algorithm import (
  StaticWeight,
  WeightCompressor,
)

_PACKAGE = "keras_epitome"


def _short_name(variable_name: str) -> str:
  """``"model/conv1/kernel:0"`` -> ``"kernel"``."""
  return variable_name.split(":")[0].split("/")[-1]


@contextlib.contextmanager
def _deferred_weights(layer, names: Sequence[str], dtypes: Optional[dict] = None):
  """While building ``layer``, ``add_weight`` for ``names`` returns zeros.

  Yields a dict that receives ``name -> placeholder tensor``; the layer's
  own ``add_weight`` is restored afterwards.
  """
  names = set(names)
  placeholders: Dict[str, tf.Tensor] = {}
  original = layer.add_weight

  def add_weight(*args, **kwargs):
    name = kwargs.get("name", args[0] if args else None)
    if name not in names:
      return original(*args, **kwargs)
    shape = kwargs.get("shape", args[1] if len(args) > 1 else None)
    dtype = kwargs.get("dtype") or (dtypes or {}).get(name) or layer.dtype
    with tf.init_scope():
      placeholders[name] = tf.zeros(shape, dtype=dtype)
    return placeholders[name]

  layer.add_weight = add_weight
  try:
    yield placeholders
  finally:
    del layer.add_weight  # the instance attribute; the method shows again


def _build_shape(layer):
  shape = getattr(layer, "_build_input_shape", None)
  if shape is None:
    try:
      shape = layer.input_shape
    except AttributeError:
      shape = None
  if shape is None:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}' must be built (called on an "
      "input or built with an input shape) before it is wrapped"
    )
  return shape


def _serialize_layer(layer) -> dict:
  config = keras.layers.serialize(layer)
  # The wrapper builds the layer itself (without the compressed variables);
  # a build config would make Keras build it first, with them.
  config.pop("build_config", None)
  return config


def _call_accepts(fn, arg: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return arg in params or any(
    p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()
  )


def _static_to_config(static: StaticWeight) -> dict:
  return {"value": static.value.tolist(), "dtype": static.value.dtype.name}


def _static_from_config(config: dict) -> StaticWeight:
  return StaticWeight(config["value"], dtype=config["dtype"])


def _untracked(obj, name: str, value):
  """Sets plain bookkeeping (dicts of names, specs) without Keras tracking.

  Keras wraps dict and list attributes for checkpointing and refuses to save
  a SavedModel when they change after assignment; these hold no variables of
  their own (the variables are tracked through ``add_weight``).
  """
  object.__setattr__(obj, name, value)


def _serialize_algorithm(algorithm: WeightCompressor) -> dict:
  # Our own small format: the same in the .keras and the legacy (.h5,
  # SavedModel) paths, which serialize nested objects differently.
  return {
    "registered_name": keras.saving.get_registered_name(type(algorithm)),
    "config": algorithm.get_config(),
  }


def _deserialize_algorithm(config: dict, custom_objects=None) -> WeightCompressor:
  name = config["registered_name"]
  cls = (custom_objects or {}).get(name) or keras.saving.get_registered_object(
    name, custom_objects
  )
  if cls is None:
    raise ValueError(
      f"unknown weight-compression algorithm '{name}': register its class "
      "with @keras.saving.register_keras_serializable(package=...) or pass "
      "it in custom_objects"
    )
  return cls.from_config(config["config"])


class _CompressionWrapper(keras.layers.Wrapper):
  """What the training and inference wrappers share."""

  def __init__(self, layer, algorithm: WeightCompressor, **kwargs):
    if not isinstance(algorithm, WeightCompressor):
      raise ValueError(
        f"{type(self).__name__}: algorithm must be a WeightCompressor "
        f"instance, got {algorithm!r}"
      )
    kwargs.setdefault("name", layer.name)
    super().__init__(layer, **kwargs)
    self.algorithm = algorithm
    _untracked(self, "_placeholders", {})
    _untracked(self, "_attributes", {})

  def _build_inner(self, input_shape, names):
    with _deferred_weights(self.layer, names) as placeholders:
      self.layer.build(input_shape)
    self.layer.built = True
    missing = [n for n in names if n not in placeholders]
    if missing:
      raise ValueError(
        f"{type(self.layer).__name__} '{self.layer.name}': build() created "
        f"no weight named {missing}; weights it creates: "
        f"{[_short_name(w.name) for w in self.layer.weights]}"
      )
    _untracked(self, "_placeholders", placeholders)
    _untracked(self, "_attributes", {})
    for name, tensor in placeholders.items():
      attrs = [a for a, v in vars(self.layer).items() if v is tensor]
      if not attrs:
        raise ValueError(
          f"{type(self.layer).__name__} '{self.layer.name}': weight '{name}' "
          "is not held by an attribute of the layer"
        )
      self._attributes[name] = name if name in attrs else attrs[0]

  def _call_inner(self, inputs, weights: Dict[str, tf.Tensor], training, kwargs):
    for name, tensor in weights.items():
      object.__setattr__(self.layer, self._attributes[name], tensor)
    try:
      if training is not None and _call_accepts(self.layer.call, "training"):
        kwargs = dict(kwargs, training=training)
      return self.layer.call(inputs, **kwargs)
    finally:
      # Do not leave graph tensors on the layer after the call.
      for name in weights:
        object.__setattr__(self.layer, self._attributes[name], self._placeholders[name])

  def compute_output_shape(self, input_shape):
    return self.layer.compute_output_shape(input_shape)

  def get_config(self):
    config = super().get_config()
    config["layer"] = _serialize_layer(self.layer)
    config["algorithm"] = _serialize_algorithm(self.algorithm)
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = copy.deepcopy(config)
    layer_config = config.pop("layer")
    layer = keras.layers.deserialize(
      layer_config,
      custom_objects=custom_objects,
      use_legacy_format="module" not in layer_config,
    )
    algorithm = _deserialize_algorithm(config.pop("algorithm"), custom_objects)
    return cls(layer, algorithm, **config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CompressionTrainingWrapper(_CompressionWrapper):
  """A layer whose compressible weights are replaced by training weights.

  Build it with :func:`create_layer_for_training`. ``training`` is passed to
  the wrapped layer's ``call`` when it takes one.

  Args:
    layer: the layer to wrap (not built; the wrapper builds it).
    algorithm: a :class:`WeightCompressor`.
    weight_names: names of the layer's weights to compress (``"kernel"``).
    static_weights: static training weight values by weight and name (filled
      in at build; part of the config).
    **kwargs: base layer arguments (``name`` defaults to the layer's).
  """

  def __init__(
    self,
    layer,
    algorithm: WeightCompressor,
    weight_names: Sequence[str],
    static_weights: Optional[dict] = None,
    **kwargs,
  ):
    super().__init__(layer, algorithm, **kwargs)
    _untracked(self, "weight_names", list(weight_names))
    _untracked(self, "static_weights", copy.deepcopy(static_weights or {}))
    _untracked(self, "_pretrained", {})
    _untracked(self, "training_weights", {})

  def build(self, input_shape):
    self._build_inner(input_shape, self.weight_names)
    _untracked(self, "training_weights", {})
    for name in self.weight_names:
      placeholder = self._placeholders[name]
      pretrained = self._pretrained.get(name)
      value = (
        placeholder
        if pretrained is None
        else tf.constant(pretrained, dtype=placeholder.dtype)
      )
      reprs = self.algorithm._collect_training_weights(value)
      stored = self.static_weights.setdefault(name, {})
      entries = []
      for rep in reprs:
        if rep.static is not None:
          if rep.name not in stored:
            stored[rep.name] = _static_to_config(rep.static)
          entries.append(_static_from_config(stored[rep.name]))
        else:
          kwargs = dict(rep.kwargs)
          args = rep.args[1:] if rep.args else ()
          kwargs["name"] = f"{name}_{rep.name}"
          kwargs.setdefault("dtype", placeholder.dtype)
          entries.append(self.add_weight(*args, **kwargs))
      self.training_weights[name] = entries
    _untracked(self, "_pretrained", {})
    super(_CompressionWrapper, self).build(input_shape)

  def training_tensors(self, name: str) -> List[tf.Tensor]:
    """Current values of one weight's training weights (static ones as constants)."""
    return [
      tf.constant(e.value) if isinstance(e, StaticWeight) else tf.identity(e)
      for e in self.training_weights[name]
    ]

  def call(self, inputs, training=None, **kwargs):
    weights = {}
    updates = []
    for name in self.weight_names:
      tensors, targets = [], []
      for entry in self.training_weights[name]:
        if isinstance(entry, StaticWeight):
          tensors.append(tf.constant(entry.value))
        else:
          tensor = tf.identity(entry)
          tensors.append(tensor)
          targets.append((tensor, entry))
      algorithm = self.algorithm
      algorithm._update_targets, algorithm._pending_updates = targets, []
      try:
        weights[name] = algorithm.project_training_weights(*tensors)
        updates.extend(algorithm._pending_updates)
      finally:
        algorithm._update_targets = algorithm._pending_updates = None
    if updates:
      self._apply_updates(updates, training)
    return self._call_inner(inputs, weights, training, kwargs)

  def _apply_updates(self, updates, training):
    def assign():
      for variable, value in updates:
        variable.assign(tf.cast(value, variable.dtype))
      return tf.constant(True)

    if training is None or isinstance(training, bool):
      if training:
        assign()
    else:
      tf.cond(tf.cast(training, tf.bool), assign, lambda: tf.constant(False))

  def get_config(self):
    config = super().get_config()
    config["weight_names"] = list(self.weight_names)
    config["static_weights"] = copy.deepcopy(self.static_weights)
    return config


def _guard(tensors: List[tf.Tensor], inputs) -> List[tf.Tensor]:
  """Returns ``tensors`` through a ``tf.cond`` on the data.

  Both branches return the same values, so this is the identity; but the
  predicate depends on the input, which stops the TFLite converter from
  constant-folding whatever is computed from the variables (it would store the
  decompressed, full-size weight). One ``IF`` per layer, whatever the number of
  compressed weights.
  """
  if not tensors:
    return []
  probe = tf.nest.flatten(inputs)[0]
  pred = tf.reduce_sum(tf.cast(probe, tf.float32)) > 0.0
  tensors = [tf.identity(t) for t in tensors]
  out = tf.cond(pred, lambda: list(tensors), lambda: list(tensors))
  return list(out) if isinstance(out, (list, tuple)) else [out]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CompressionInferenceWrapper(_CompressionWrapper):
  """A layer whose compressible weights are decompressed in its forward pass.

  Build it with :func:`create_layer_for_inference`.

  Args:
    layer: the layer to wrap (not built).
    algorithm: a :class:`WeightCompressor`.
    compressed_specs: per weight name, one dict per compressed weight: either
      ``{"name", "shape", "dtype"}`` (a variable) or ``{"name", "static"}``
      (a :class:`StaticWeight` config).
    **kwargs: base layer arguments.
  """

  def __init__(
    self, layer, algorithm: WeightCompressor, compressed_specs: dict, **kwargs
  ):
    super().__init__(layer, algorithm, **kwargs)
    _untracked(self, "compressed_specs", copy.deepcopy(compressed_specs))
    _untracked(self, "compressed_weights", {})

  def build(self, input_shape):
    self._build_inner(input_shape, list(self.compressed_specs))
    _untracked(self, "compressed_weights", {})
    for name, specs in self.compressed_specs.items():
      entries = []
      for spec in specs:
        if "static" in spec:
          entries.append(_static_from_config(spec["static"]))
          continue
        dtype = tf.as_dtype(spec["dtype"])
        entries.append(
          self.add_weight(
            name=f"{name}_{spec['name']}",
            shape=tuple(spec["shape"]),
            dtype=dtype,
            initializer="zeros",
            trainable=dtype.is_floating,
          )
        )
      self.compressed_weights[name] = entries
    super(_CompressionWrapper, self).build(input_shape)

  def call(self, inputs, training=None, **kwargs):
    variables = [
      e
      for name in self.compressed_specs
      for e in self.compressed_weights[name]
      if not isinstance(e, StaticWeight)
    ]
    guarded = iter(_guard([v.read_value() for v in variables], inputs))
    weights = {}
    for name in self.compressed_specs:
      tensors = [
        tf.constant(e.value) if isinstance(e, StaticWeight) else next(guarded)
        for e in self.compressed_weights[name]
      ]
      weights[name] = self.algorithm.decompress_weights(*tensors)
    return self._call_inner(inputs, weights, training, kwargs)

  def get_config(self):
    config = super().get_config()
    config["compressed_specs"] = copy.deepcopy(self.compressed_specs)
    return config


# ----------------------------------------------------------------------------
# Layer-level API.


def _weights_without(layer, names: Sequence[str]) -> List[tf.Variable]:
  return [w for w in layer.weights if _short_name(w.name) not in set(names)]


def _copy_other_weights(source_layer, target_layer, names, context: str):
  """Copies the weights that are not compressed, in creation order."""
  src = _weights_without(source_layer, names)
  dst = target_layer.weights
  if len(src) != len(dst):
    raise ValueError(
      f"{context}: '{source_layer.name}' has {len(src)} uncompressed "
      f"weights but the wrapped copy has {len(dst)}"
    )
  for s, d in zip(src, dst, strict=True):
    if tuple(s.shape) != tuple(d.shape):
      raise ValueError(
        f"{context}: '{source_layer.name}' weight '{s.name}' has shape "
        f"{tuple(s.shape)}, its copy '{d.name}' {tuple(d.shape)}"
      )
    d.assign(s)


def create_layer_for_training(
  layer: keras.layers.Layer, algorithm: WeightCompressor
) -> keras.layers.Layer:
  """Wraps a built layer so that ``algorithm`` compresses its weights in training.

  The layer is copied (through its config); the copy never creates the
  compressible weights, whose training weights are initialized from the
  layer's trained values by ``algorithm.init_training_weights``. The other
  weights (bias, ...) are copied. A layer with nothing to compress is returned
  as a plain copy.

  Args:
    layer: a built layer (e.g. ``Conv2D``, ``DepthwiseConv2D``, ``Dense``).
    algorithm: a :class:`WeightCompressor` instance.

  Returns:
    A built :class:`CompressionTrainingWrapper` with the layer's name.

  Raises:
    ValueError: if ``algorithm`` is not an instance or the layer is not built.

  Example:
    >>> from keras_epitome.compression import SVDCompressor
    >>> dense = keras.layers.Dense(8)
    >>> dense.build((None, 16))
    >>> wrapped = create_layer_for_training(dense, SVDCompressor(rank=2))
    >>> sorted(w.name.split("/")[-1] for w in wrapped.weights)
    ['bias:0', 'kernel_sv:0', 'kernel_u:0']
  """
  if not isinstance(algorithm, WeightCompressor):
    raise ValueError(
      "create_layer_for_training: algorithm must be a WeightCompressor "
      f"instance (not the class), got {algorithm!r}"
    )
  if not layer.built:
    raise ValueError(
      f"create_layer_for_training: {type(layer).__name__} '{layer.name}' "
      "must be built so that its trained weights can initialize the "
      "training weights"
    )
  compressible = algorithm.get_compressible_weights(layer)
  clone = layer.__class__.from_config(layer.get_config())
  input_shape = _build_shape(layer)
  if not compressible:
    clone.build(input_shape)
    clone.set_weights(layer.get_weights())
    return clone
  # The wrapper matches a weight by the name its layer gives ``add_weight``
  # and finds the attribute holding it after build.
  weight_names = [_short_name(w.name) for w in compressible]
  wrapper = CompressionTrainingWrapper(clone, algorithm, weight_names)
  _untracked(
    wrapper,
    "_pretrained",
    {n: w.numpy() for n, w in zip(weight_names, compressible, strict=True)},
  )
  wrapper.build(input_shape)
  _copy_other_weights(layer, wrapper.layer, weight_names, "create_layer_for_training")
  return wrapper


def create_layer_for_inference(
  training_layer: keras.layers.Layer,
  algorithm: Optional[WeightCompressor] = None,
) -> keras.layers.Layer:
  """Turns a trained training wrapper into its compressed inference form.

  Calls ``algorithm.compress_training_weights`` on the trained training
  weights; the results become the wrapper's variables (tensors) or config
  (:class:`StaticWeight`), and ``decompress_weights`` rebuilds the weight in
  the forward pass. A layer that is not a training wrapper is returned as a
  plain copy.

  Args:
    training_layer: a :class:`CompressionTrainingWrapper` (built).
    algorithm: the algorithm; default the one the wrapper was built with.

  Returns:
    A built :class:`CompressionInferenceWrapper`.

  Raises:
    ValueError: if the layer is not built or a compressed weight is neither a
      tensor nor a :class:`StaticWeight`.

  Example:
    >>> from keras_epitome.compression import SVDCompressor
    >>> dense = keras.layers.Dense(8)
    >>> dense.build((None, 16))
    >>> training = create_layer_for_training(dense, SVDCompressor(rank=2))
    >>> inference = create_layer_for_inference(training)
    >>> inference(tf.ones((1, 16))).shape
    TensorShape([1, 8])
  """
  if not training_layer.built:
    raise ValueError(
      f"create_layer_for_inference: {type(training_layer).__name__} "
      f"'{training_layer.name}' must be built"
    )
  if not isinstance(training_layer, CompressionTrainingWrapper):
    clone = training_layer.__class__.from_config(training_layer.get_config())
    clone.build(_build_shape(training_layer))
    clone.set_weights(training_layer.get_weights())
    return clone
  algorithm = algorithm or training_layer.algorithm
  if not isinstance(algorithm, WeightCompressor):
    raise ValueError(
      "create_layer_for_inference: algorithm must be a WeightCompressor "
      f"instance, got {algorithm!r}"
    )
  specs, values = {}, {}
  for name in training_layer.weight_names:
    compressed = algorithm.compress_training_weights(
      *training_layer.training_tensors(name)
    )
    specs[name], values[name] = [], []
    for i, c in enumerate(compressed):
      if isinstance(c, StaticWeight):
        specs[name].append({"name": str(i), "static": _static_to_config(c)})
        continue
      if not isinstance(c, (tf.Tensor, tf.Variable, np.ndarray)):
        raise ValueError(
          f"{type(algorithm).__name__}.compress_training_weights returned "
          f"{type(c).__name__} for '{training_layer.name}/{name}' (item {i}); "
          "expected tensors or StaticWeight"
        )
      c = tf.convert_to_tensor(c)
      specs[name].append(
        {"name": str(i), "shape": list(c.shape), "dtype": c.dtype.name}
      )
      values[name].append(c)
  inner = training_layer.layer
  clone = inner.__class__.from_config(inner.get_config())
  wrapper = CompressionInferenceWrapper(
    clone, algorithm, specs, name=training_layer.name
  )
  wrapper.build(_build_shape(training_layer))
  for name in training_layer.weight_names:
    variables = [
      e for e in wrapper.compressed_weights[name] if not isinstance(e, StaticWeight)
    ]
    for variable, value in zip(variables, values[name], strict=True):
      variable.assign(value)
  src, dst = inner.weights, wrapper.layer.weights
  if len(src) != len(dst):
    raise ValueError(
      f"create_layer_for_inference: '{training_layer.name}' has {len(src)} "
      f"uncompressed weights, its inference copy {len(dst)}"
    )
  for s, d in zip(src, dst, strict=True):
    d.assign(s)
  return wrapper


# ----------------------------------------------------------------------------
# Model-level API.


def _clone_model(model, transform, what: str):
  walk.check_transformable(model, what)
  if not model.built:
    raise ValueError(
      f"{what}: model '{model.name}' must be built (give it an Input) so its "
      "trained weights can be read"
    )
  return walk.clone_model(model, transform, what)


def compress_model_for_training(
  model: keras.Model, algorithm: WeightCompressor
) -> keras.Model:
  """Wraps every layer the algorithm compresses (``clone_model``).

  Like TF-MOT's ``prune_low_magnitude``: the result is a new model (nested
  Sequential/functional models are transformed too) whose compressible layers
  are :class:`CompressionTrainingWrapper`; other layers are copies with the
  same weights. Compile and fit it as usual.

  Args:
    model: a built Sequential or functional model (e.g. trained).
    algorithm: a :class:`WeightCompressor` instance.

  Returns:
    The training model.

  Raises:
    ValueError: for a subclassed or unbuilt model.

  Example:
    >>> from keras_epitome.compression import SVDCompressor
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    >>> training = compress_model_for_training(model, SVDCompressor(rank=2))
    >>> type(training.layers[0]).__name__
    'CompressionTrainingWrapper'
  """
  return _clone_model(
    model,
    lambda layer: create_layer_for_training(layer, algorithm),
    "compress_model_for_training",
  )


def compress_model_for_inference(
  training_model: keras.Model, algorithm: Optional[WeightCompressor] = None
) -> keras.Model:
  """Turns every training wrapper of a model into its inference form.

  Args:
    training_model: a model from :func:`compress_model_for_training`
      (trained, or loaded from a file).
    algorithm: optional; default each wrapper's own algorithm.

  Returns:
    The inference model: the compressed weights are its variables, and
    ``tf.lite.TFLiteConverter.from_keras_model`` keeps them compressed.

  Example:
    >>> from keras_epitome.compression import SVDCompressor
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    >>> training = compress_model_for_training(model, SVDCompressor(rank=2))
    >>> inference = compress_model_for_inference(training)
    >>> inference(tf.ones((1, 16))).shape
    TensorShape([1, 8])
  """
  return _clone_model(
    training_model,
    lambda layer: create_layer_for_inference(layer, algorithm),
    "compress_model_for_inference",
  )
