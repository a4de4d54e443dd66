"""Hardening a learned routing map to integers.

A learned (NES) routing map ends with fractional offsets: every chunk then
blends two neighbouring reads, which doubles the remix work of the factored
form and the ops of an exported file. Hardening rounds every offset to the
nearest integer (channel offsets wrapped, spatial offsets clipped) and, by
default, refits the epitome by least squares to the kernel the layer had
(:func:`keras_epitome.sampling.fit_epitome`), so the function changes as
little as possible. A short fine-tune afterwards recovers what rounding cost.

* :func:`harden_layer` hardens one layer in place (it keeps its sampler, so
  a learned layer can go on learning);
* :func:`harden_routing` returns a copy of a model whose epitome layers use
  the ``fixed`` sampler at the hardened map: the offsets are constants, so a
  fine-tune (``compile``/``fit``) trains the epitomes and leaves the routing
  map integer.

After a data-aware conversion (``ke.epitomize(..., calibration_data=...)``)
the routing maps are already integers: hardening then changes nothing, and
doing it *before* :func:`keras_epitome.distill` keeps them integer through
the recovery, and the exported file has no blend ops (docs/results.md has
the accuracy and file sizes against learned routing).

Example:
  >>> model = keras.Sequential([keras.Input((8, 16)),
  ...                           ke.EpitomeConv1D(16, 3, compression=4)])
  >>> hard = ke.harden_routing(model)
  >>> hard.layers[0].sampler
  'fixed'
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from keras_epitome import hardening, sampling, walk
from keras_epitome import layers as epitome_layers
from keras_epitome.backend import keras3_dispatch


def hardened_values(
  layer, refit: bool = True
) -> Tuple[np.ndarray, sampling.RoutingMap]:
  """The hardened epitome and routing map of a built epitome layer (no change to it).

  Args:
    layer: a built epitome layer.
    refit: refit the epitome by least squares to the layer's current kernel
      under the rounded map; ``False`` keeps the epitome as it is.

  Returns:
    ``(epitome, routing)`` as NumPy arrays; the routing map is integer-valued
    (channel offsets in ``[0, C_E)``, spatial offsets in ``[0, S_E - S]``).

  Raises:
    ValueError: if ``layer`` is not a built epitome layer.
  """
  if not isinstance(layer, epitome_layers.EPITOME_LAYERS):
    raise ValueError(
      f"harden: layer '{getattr(layer, 'name', layer)}' is a "
      f"{type(layer).__name__}, not an epitome layer"
    )
  epitome, hard = hardening.harden(
    layer.routing_map,
    layer.epitome_geometry,
    layer.epitome.numpy(),
    layer.kernel.numpy() if refit else None,
  )
  return epitome.astype(layer.epitome.dtype.as_numpy_dtype), hard


def harden_layer(layer, refit: bool = True) -> float:
  """Rounds a layer's routing map to integers in place (see the module docstring).

  Args:
    layer: a built epitome layer (any sampler and learner; for the
      ``feature`` learner the moving routing map is hardened).
    refit: refit the epitome to the kernel the layer had.

  Returns:
    The relative change of the sampled kernel, ``|K_new - K_old| / |K_old|``.
  """
  before = layer.kernel.numpy()
  epitome, hard = hardened_values(layer, refit)
  layer.set_routing_map(hard)
  layer.epitome.assign(epitome)
  return hardening.relative_change(layer.kernel.numpy(), before)


@keras3_dispatch("harden_routing")
def harden_routing(model, refit: bool = True, report: Dict[str, float] = None):
  """A copy of ``model`` with every epitome layer at an integer, fixed routing map.

  Each epitome layer becomes the same layer with ``sampler="fixed"`` (and
  ``learner="param"``), its routing map the rounded inference map and its
  epitome refit (``refit=True``) to the kernel it had. Every other layer is
  cloned with its weights; nested models are hardened recursively. Fine-tune
  the result briefly (``compile``/``fit``): only the epitomes (and the other
  layers' weights) train.

  Args:
    model: a Sequential or functional model with built epitome layers.
    refit: least-squares refit of each epitome (else the epitome is kept).
    report: optional dict; receives ``{layer name: relative kernel change}``.

  Returns:
    The hardened model. It has no ``epitome_report``: read what
    :func:`keras_epitome.epitomize` did from the model it returned.

  Raises:
    ValueError: for a subclassed model, or a model without epitome layers
      (nothing to harden: convert it first with ``ke.epitomize``).
  """
  walk.check_transformable(model, "harden_routing")
  if not epitome_layers.epitome_layers(model):
    raise ValueError(
      f"harden_routing: model {getattr(model, 'name', model)!r} has no epitome "
      "layer, so there is no routing map to harden; convert it first with "
      "ke.epitomize"
    )
  hardened = []

  def clone_layer(layer):
    if not isinstance(layer, epitome_layers.EPITOME_LAYERS):
      return None
    new = layer.__class__.from_config(hardening.fixed_config(layer.get_config()))
    hardened.append((layer, new))
    return new

  new_model = walk.clone_model(model, clone_layer, "harden_routing")
  for old, new in hardened:
    bias = old.bias if old.use_bias else None
    hardening.assign_hardened(new, *hardened_values(old, refit), bias)
    if report is not None:
      report[old.name] = hardening.relative_change(
        new.kernel.numpy(), old.kernel.numpy()
      )
  return new_model
