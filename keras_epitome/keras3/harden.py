"""Hardening a learned routing map to integers, for Keras 3 models on any backend.

The Keras 3 counterpart of :mod:`keras_epitome.harden`: every offset is
rounded to the nearest integer (channel offsets wrapped, spatial offsets
clipped) and, by default, the epitome is refit by least squares to the kernel
the layer had (:func:`keras_epitome.geometry.fit_epitome`), so the function
changes as little as possible. A short fine-tune afterwards (e.g.
:func:`keras_epitome.keras3.distill`) recovers what rounding cost.

* :func:`harden_layer` hardens one layer in place (it keeps its sampler);
* :func:`harden_routing` returns a copy of a model whose epitome layers use
  the ``fixed`` sampler at the hardened map: the offsets are constants, so a
  fine-tune trains the epitomes and leaves the routing map integer.

Example:
  >>> import keras
  >>> import keras_epitome.keras3 as ke
  >>> model = keras.Sequential([keras.Input((8, 16)),
  ...                           ke.EpitomeConv1D(16, 3, compression=4)])
  >>> hard = ke.harden_routing(model)
  >>> hard.layers[0].sampler
  'fixed'
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from keras_epitome import geometry as geo
from keras_epitome import hardening
from keras_epitome.keras3 import layers as k3_layers
from keras_epitome.keras3 import transform


def hardened_values(layer, refit: bool = True) -> Tuple[np.ndarray, geo.RoutingMap]:
  """:func:`keras_epitome.hardening.harden` of a built Keras 3 epitome layer.

  The layer is not changed. ``refit=True`` refits the epitome to the layer's
  current kernel; returns ``(epitome, routing)`` as NumPy arrays, the
  epitome in the layer's dtype.

  Raises:
    ValueError: if ``layer`` is not a built Keras 3 epitome layer.
  """
  if not k3_layers.is_epitome_layer(layer):
    raise ValueError(
      f"harden: layer '{getattr(layer, 'name', layer)}' is a "
      f"{type(layer).__name__}, not a Keras 3 epitome layer"
      + (
        " (a Keras 2 layer: use keras_epitome.harden_layer)"
        if transform.is_keras2_object(layer)
        else ""
      )
    )
  if not layer.built or layer.epitome is None:
    raise ValueError(
      f"harden: {type(layer).__name__} '{layer.name}' is not built yet; call "
      "it on an input first"
    )
  epitome, hard = hardening.harden(
    layer.routing_map,
    layer.epitome_geometry,
    transform._numpy(layer.epitome),
    transform._numpy(layer.kernel) if refit else None,
  )
  return epitome.astype(layer.epitome.dtype), hard


def harden_layer(layer, refit: bool = True) -> float:
  """Rounds a Keras 3 layer's routing map to integers in place.

  As :func:`keras_epitome.harden.harden_layer` (any sampler and learner; the
  ``feature`` learner's moving map is hardened); returns the relative change
  of the sampled kernel.
  """
  epitome, hard = hardened_values(layer, refit)
  before = transform._numpy(layer.kernel)
  layer.set_routing_map(hard)
  layer.epitome.assign(epitome)
  return hardening.relative_change(transform._numpy(layer.kernel), before)


def harden_routing(
  model, refit: bool = True, report: Optional[Dict[str, float]] = None
):
  """A copy of a Keras 3 ``model`` with every epitome layer at an integer, fixed map.

  Each epitome layer becomes the same layer with ``sampler="fixed"`` (and
  ``learner="param"``), its routing map the rounded inference map and its
  epitome refit (``refit=True``) to the kernel it had. Every other layer is
  cloned with its weights; nested models are hardened recursively. Fine-tune
  the result briefly: only the epitomes (and the other layers' weights)
  train.

  Args:
    model: a Keras 3 Sequential or functional model with built epitome layers.
    refit: least-squares refit of each epitome (else the epitome is kept).
    report: optional dict; receives ``{layer name: relative kernel change}``.

  Returns:
    The hardened model (without an ``epitome_report``).

  Raises:
    ValueError: for a Keras 2 model (use :func:`keras_epitome.harden_routing`),
      a subclassed model, a model without epitome layers, or an unbuilt
      epitome layer.
  """
  transform.check_keras3_model(model, "harden_routing")
  found = k3_layers.epitome_layers(model)
  if not found:
    raise ValueError(
      f"harden_routing: model '{model.name}' has no Keras 3 epitome layers to "
      "harden; convert it first with keras_epitome.keras3.epitomize(model, ...)"
    )
  for layer in found:
    if not layer.built or layer.epitome is None:
      raise ValueError(
        f"harden_routing: {type(layer).__name__} '{layer.name}' is not built "
        "yet; call the model on an input first"
      )
  hardened = []

  def clone_layer(layer):
    if not k3_layers.is_epitome_layer(layer):
      return None
    new = transform.from_config(type(layer), hardening.fixed_config(layer.get_config()))
    hardened.append((layer, new))
    return new

  new_model = transform.clone_model(model, clone_layer, "harden_routing")
  for old, new in hardened:
    bias = transform._numpy(old.bias) if old.use_bias else None
    hardening.assign_hardened(new, *hardened_values(old, refit), bias)
    if report is not None:
      report[old.name] = hardening.relative_change(
        transform._numpy(new.kernel), transform._numpy(old.kernel)
      )
  return new_model
