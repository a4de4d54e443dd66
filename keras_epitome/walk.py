"""The model walk: every layer of a model, inside nested models and wrappers.

Keras' ``model.layers`` lists a model's direct children only: a nested
``Sequential`` or functional model is one entry, and so is a wrapper such as
TF-MOT's pruning wrapper (``PruneLowMagnitude``) or quantization wrapper
(``QuantizeWrapperV2``), whose layer sits in ``wrapper.layer``. The transforms,
exporters and :func:`~keras_epitome.transform.summarize` all need the layers
themselves; :func:`walk` is the one place that finds them.

Example:
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d1")])
  >>> model = keras.Sequential([inner, keras.layers.Dense(2, name="d2")])
  >>> [layer.name for layer in iter_layers(model)]
  ['d1', 'd2']
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

from keras_epitome.backend import check_keras2, keras

_QAT_MODULE = "tensorflow_model_optimization.python.core.quantization"
_PRUNING_MODULE = "tensorflow_model_optimization.python.core.sparsity"


class LayerRef(NamedTuple):
  """One leaf layer found by :func:`walk`.

  Attributes:
    layer: the layer itself (unwrapped).
    owner: the model whose ``layers`` list holds ``outer``.
    outer: ``layer`` as ``owner`` holds it: the outermost wrapper around it,
      or ``layer`` itself. Its call sites (inbound nodes) are ``outer``'s.
  """

  layer: keras.layers.Layer
  owner: keras.Model
  outer: keras.layers.Layer


def walk(model) -> Iterator[LayerRef]:
  """Yields every leaf layer of ``model`` once, in ``model.layers`` order.

  Nested models are expanded, and ``keras.layers.Wrapper`` instances
  (pruning, quantization, ``TimeDistributed``...) are looked through: the
  wrapped layer is yielded (a wrapped model is expanded in turn).

  Args:
    model: a Keras model.

  Yields:
    :class:`LayerRef` per leaf layer.
  """
  seen = set()

  def visit(m):
    for outer in m.layers:
      if id(outer) in seen:
        continue
      seen.add(id(outer))
      layer = outer
      while isinstance(layer, keras.layers.Wrapper) and getattr(layer, "layer", None):
        layer = layer.layer
      if isinstance(layer, keras.Model):
        yield from visit(layer)
      else:
        yield LayerRef(layer, m, outer)

  yield from visit(model)


def iter_layers(model) -> Iterator[keras.layers.Layer]:
  """Yields every leaf layer of ``model`` (see :func:`walk`), wrappers looked through."""
  for ref in walk(model):
    yield ref.layer


def check_transformable(model, what: str) -> None:
  """Refuses what ``clone_model`` cannot transform, with a message that says why.

  Args:
    model: what the user passed.
    what: the caller's name, for the message.

  Raises:
    ValueError: for a Keras 3 model, a non-model, or a subclassed model.
  """
  check_keras2(model, what)
  if not isinstance(model, keras.Model):
    raise ValueError(
      f"{what} takes a keras Model (Sequential or functional); got "
      f"{type(model).__name__}"
    )
  if not isinstance(model, keras.Sequential) and not getattr(
    model, "_is_graph_network", False
  ):
    raise ValueError(
      f"{what}: model '{model.name}' is a subclassed model "
      f"({type(model).__name__}); only Sequential and functional models can "
      "be transformed (their layer graph is known). Build it with the "
      "functional API, or use epitome layers directly in your subclass."
    )


def clone_model(
  model,
  clone_layer: Callable[[keras.layers.Layer], Optional[keras.layers.Layer]],
  what: str,
) -> keras.Model:
  """``keras.models.clone_model`` with one clone function, nested models included.

  The transforms of the package (``epitomize``, ``strip_epitome``, the
  exporters, the compression API) are all this call with a different
  ``clone_layer``: nested Sequential/functional models are cloned through the
  same function, and a layer for which ``clone_layer`` returns ``None`` is
  kept: a fresh copy from its config, with its weights copied once the new
  model is built.

  Args:
    model: a Sequential or functional model.
    clone_layer: ``layer -> new layer``, or ``None`` to keep a copy.
    what: the caller's name, for error messages.

  Returns:
    The new model.

  Raises:
    ValueError: if ``model`` (or a nested model) cannot be transformed.

  Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> copy = clone_model(model, lambda layer: None, "copy")
    >>> bool(np.allclose(copy.layers[0].kernel, model.layers[0].kernel))
    True
  """
  check_transformable(model, what)
  copies = []

  def clone_function(layer):
    if isinstance(layer, keras.Model):
      check_transformable(layer, what)
      return keras.models.clone_model(layer, clone_function=clone_function)
    new = clone_layer(layer)
    if new is None:
      new = layer.__class__.from_config(layer.get_config())
      copies.append((layer, new))
    return new

  new_model = keras.models.clone_model(model, clone_function=clone_function)
  for old, new in copies:
    if old.built and new.built and old.weights:
      new.set_weights(old.get_weights())
  return new_model


def _tfmot_kind(layer) -> str:
  module = type(layer).__module__
  if module.startswith(_QAT_MODULE):
    return "qat"
  if module.startswith(_PRUNING_MODULE):
    return "pruning"
  return ""


def has_training_wrappers(model, kind: str) -> bool:
  """Whether ``model`` holds a TF-MOT ``kind`` (``"qat"``/``"pruning"``) layer."""
  return any(_tfmot_kind(ref.outer) == kind for ref in walk(model))


def check_no_training_wrappers(model, what: str, kinds=(), is_target=None) -> None:
  """Refuses a model that still holds TF-MOT training wrappers.

  A quantization-aware (QAT) model cannot be cloned outside TF-MOT's
  ``quantize_scope``, and an inference transform would otherwise return the
  training wrappers unchanged around layers it should have replaced.

  Args:
    model: a Keras model.
    what: the caller's name, for the message.
    kinds: ``"qat"`` refuses any TF-MOT quantization layer or wrapper;
      ``"pruning"`` refuses pruning wrappers around a layer for which
      ``is_target(layer)`` is true.
    is_target: see ``kinds``; default every layer.

  Raises:
    ValueError: naming the layer and what to strip first.
  """
  for ref in walk(model):
    kind = _tfmot_kind(ref.outer)
    if kind == "qat" and "qat" in kinds:
      raise ValueError(
        f"{what}: model '{model.name}' is a quantization-aware training model "
        f"(layer '{ref.outer.name}' is a {type(ref.outer).__name__}). Export "
        "it with the TFLite converter directly (under ke.quantize_scope(): "
        "tf.lite.TFLiteConverter.from_keras_model(qat_model) with "
        "optimizations=[tf.lite.Optimize.DEFAULT]), or call "
        f"{what} on the model before ke.quantize_model"
      )
    if (
      kind == "pruning"
      and "pruning" in kinds
      and ref.outer is not ref.layer
      and (is_target is None or is_target(ref.layer))
    ):
      raise ValueError(
        f"{what}: layer '{ref.layer.name}' ({type(ref.layer).__name__}) is "
        f"inside a pruning wrapper ({type(ref.outer).__name__}); strip it first: "
        "model = tfmot.sparsity.keras.strip_pruning(model)"
      )
