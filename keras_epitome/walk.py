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

from typing import Iterator, NamedTuple

from keras_epitome.backend import keras

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


def _tfmot_kind(layer) -> str:
  module = type(layer).__module__
  if module.startswith(_QAT_MODULE):
    return "qat"
  if module.startswith(_PRUNING_MODULE):
    return "pruning"
  return ""


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
