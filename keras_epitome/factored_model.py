"""The model walk of the factored form: BatchNorm folding, nested models, fallback.

:func:`factorize_layers` clones a model with every epitome layer replaced by
what a callback returns for it (:func:`keras_epitome.factorize` passes the
form choice of :mod:`keras_epitome.form_choice`), folding each foldable
following ``BatchNormalization`` into it. The layers themselves are in
:mod:`keras_epitome.factored`.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

from keras_epitome import transform, walk
from keras_epitome.backend import check_keras2, keras
from keras_epitome.factored import _batchnorm_affine, _check_factorizable
from keras_epitome.layers import EpitomeMixin

_log = logging.getLogger(__name__)


def _materialize_layer(layer):
  """A stock layer holding ``layer``'s sampled kernel (the materialized form)."""
  _check_training_state(layer)
  return transform.materialize_layer(layer)


def _check_training_state(layer):
  desc = f"{type(layer).__name__} '{layer.name}'"
  if isinstance(layer, keras.layers.Wrapper):
    inner = getattr(layer, "layer", None)
    raise ValueError(
      f"{desc} wraps {type(inner).__name__} '{getattr(inner, 'name', '?')}' "
      "for training (pruning or quantization-aware training); strip it first "
      "(tfmot.sparsity.keras.strip_pruning) or convert the QAT model with the "
      "TFLite converter directly"
    )
  if isinstance(layer, EpitomeMixin) and (layer.epitome is None or not layer.built):
    raise ValueError(f"{desc} is not built; call the model on an input first")


def _consumers(model) -> Dict[int, int]:
  """How many layer calls consume each layer's output, by ``id(layer)``."""
  counts: Dict[int, int] = {}
  for layer in model.layers:
    for node in layer._inbound_nodes:
      for inbound in (
        node.inbound_layers
        if isinstance(node.inbound_layers, list)
        else [node.inbound_layers]
      ):
        counts[id(inbound)] = counts.get(id(inbound), 0) + 1
  for out in model.outputs:
    hist = getattr(out, "_keras_history", None)
    if hist is not None:
      counts[id(hist.layer)] = counts.get(id(hist.layer), 0) + 1
  return counts


def _foldable_pairs(model) -> Dict[int, object]:
  """``{id(epitome layer): batchnorm}`` for BatchNorms that can be folded."""
  pairs = {}
  layers = model.layers
  is_seq = isinstance(model, keras.Sequential)
  consumers = _consumers(model) if not is_seq else {}
  for i, bn in enumerate(layers):
    if not isinstance(bn, keras.layers.BatchNormalization):
      continue
    if is_seq:
      prev = layers[i - 1] if i else None
    else:
      if len(bn._inbound_nodes) != 1:
        continue
      inbound = bn._inbound_nodes[0].inbound_layers
      prev = inbound if not isinstance(inbound, list) else None
      if prev is None or consumers.get(id(prev)) != 1 or len(prev._inbound_nodes) != 1:
        continue
    if (
      isinstance(prev, EpitomeMixin)
      and prev.activation is keras.activations.linear
      and getattr(prev, "groups", 1) == 1
    ):
      try:
        _batchnorm_affine(bn, prev, prev.filters if prev._kernel_rank() else prev.units)
      except ValueError:
        continue
      pairs[id(prev)] = bn
  return pairs


def _transform(model, epitome_fn, fold_batchnorm: bool, report: Optional[list]):
  """Clones ``model`` with ``epitome_fn(layer, bn)`` for every epitome layer."""
  pairs = _foldable_pairs(model) if fold_batchnorm else {}
  folded = {id(bn) for bn in pairs.values()}
  copies = []

  def clone(layer):
    if isinstance(layer, keras.Model):
      return _transform(layer, epitome_fn, fold_batchnorm, report)
    if isinstance(layer, keras.layers.Wrapper) and isinstance(
      getattr(layer, "layer", None), EpitomeMixin
    ):
      _check_training_state(layer)
    if isinstance(layer, EpitomeMixin):
      new = epitome_fn(layer, pairs.get(id(layer)))
      if report is not None:
        report.append((layer.name, type(new).__name__))
      return new
    if id(layer) in folded:
      return keras.layers.Identity(name=layer.name)
    new = layer.__class__.from_config(layer.get_config())
    copies.append((layer, new))
    return new

  if isinstance(model, keras.Sequential):
    new_layers = [clone(layer) for layer in model.layers]
    new_layers = [
      new
      for old, new in zip(model.layers, new_layers, strict=True)
      if id(old) not in folded
    ]
    new_model = keras.Sequential(
      [keras.Input(batch_shape=model.input_shape)] + new_layers, name=model.name
    )
  else:
    new_model = keras.models.clone_model(model, clone_function=clone)
  for old, new in copies:
    new.set_weights(old.get_weights())
  return new_model


def factorize_layers(
  model,
  choose_layer: Callable,
  *,
  fold_batchnorm: bool = True,
  fallback: str = "materialize",
  report: Optional[list] = None,
):
  """Replaces every epitome layer of ``model`` by ``choose_layer(layer, batchnorm)``.

  The model walk of :func:`keras_epitome.factorize`: BatchNorm folding,
  nested models, the ``groups > 1`` fallback and the checks. What each layer
  becomes (a remix, or the stock layer) is ``choose_layer``'s decision.

  Args:
    model: a built Keras model containing epitome layers.
    choose_layer: ``(epitome layer, following BatchNorm or None) -> layer``.
    fold_batchnorm: whether to fold following BatchNorms.
    fallback: ``"materialize"`` or ``"error"`` for a layer without factored
      form (``groups > 1``).
    report: optional list; ``(layer name, new class name)`` per replaced layer.

  Returns:
    A new ``keras.Model`` computing the same inference function.
  """
  check_keras2(model, "factorize")
  walk.check_no_training_wrappers(
    model,
    "factorize",
    ("qat", "pruning"),
    lambda layer: isinstance(layer, EpitomeMixin),
  )
  if fallback not in ("materialize", "error"):
    raise ValueError(f"fallback must be 'materialize' or 'error', got {fallback!r}")

  def replace(layer, bn):
    _check_training_state(layer)
    if getattr(layer, "groups", 1) != 1:
      if fallback == "error":
        _check_factorizable(layer)
      _log.warning(
        "%s '%s': groups=%d has no factored form; using the materialized form",
        type(layer).__name__,
        layer.name,
        layer.groups,
      )
      return _materialize_layer(layer)
    return choose_layer(layer, bn)

  return _transform(model, replace, fold_batchnorm, report)
