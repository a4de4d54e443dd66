"""Pruning the epitomes: an epitome model made smaller still by sparsity.

An epitome layer's stored weight is its epitome
(``get_prunable_weights``), so TF-MOT's ``prune_low_magnitude`` sparsifies
the epitome and the sampled kernel inherits its zeros. The two compressions
compose: epitomize at part of the target ratio, then prune the epitomes to
the rest of the stored size (docs/pruning.md has the recipe and
docs/results.md the comparison with TF-MOT pruning alone at the same stored
words). Harden the conversion's routing first
(:func:`keras_epitome.harden_routing`: exact, its offsets are integers) so
the recovery keeps them integer and the exported file has no blend ops.

Two helpers:

* :func:`sparsity_for_size`: the per-layer sparsity that brings each layer's
  stored numbers (non-zeros, the positions of the non-zeros, the routing
  map) down to a budget in 32-bit words.
* :func:`prune_epitomes`: wraps the layers in TF-MOT pruning with a mask
  chosen by magnitude at the first training step and kept (TF-MOT's
  ``ConstantSparsity(begin_step=0)`` alone first masks at step
  ``frequency``: with its default of 100 the first 99 steps would train the
  unpruned model).

Example:
  >>> import numpy as np
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 8)),
  ...     ke.EpitomeConv2D(16, 3, padding="same", compression=2, name="conv"),
  ... ])
  >>> ke.pruning.sparsity_for_size(model, 4, positions="none")
  {'conv': 0.5...}
  >>> pruned = ke.prune_epitomes(model, 0.5)
  >>> _ = ke.distill(pruned, model, np.ones((4, 8, 8, 8), "float32"), verbose=0)
  >>> import tensorflow_model_optimization as tfmot
  >>> small = tfmot.sparsity.keras.strip_pruning(pruned)
  >>> float(np.mean(small.get_layer("conv").epitome.numpy() == 0))
  0.5
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Union

import numpy as np

from keras_epitome import spec, walk
from keras_epitome.backend import check_keras2, keras
from keras_epitome.layers import EPITOME_LAYERS

# Bits a sparse kernel pays for where its non-zeros are: per kernel entry
# and per non-zero. "bitmask": one bit per entry; "index16": a 16-bit index
# per non-zero; "none": positions not counted.
POSITION_BITS = {"none": (0, 0), "bitmask": (1, 0), "index16": (0, 16)}
# Stock layers TF-MOT prunes by their kernel (named in a per-layer dict).
STOCK_PRUNABLE = (
  keras.layers.Conv1D,
  keras.layers.Conv2D,
  keras.layers.Dense,
)


def _target_layers(model, names, what):
  """``{name: layer}`` for ``names`` (``None``: every epitome layer)."""
  # Top-level layers: clone_model's clone_function sees those.
  layers = {layer.name: layer for layer in model.layers}
  if names is None:
    found = {n: x for n, x in layers.items() if isinstance(x, EPITOME_LAYERS)}
    if not found:
      raise ValueError(
        f"{what}: model {model.name!r} has no epitome layer; "
        "convert it first with ke.epitomize, or name the layers in a dict"
      )
    return found
  missing = sorted(set(names) - set(layers))
  if missing:
    raise ValueError(
      f"{what}: no layer named {missing} in model {model.name!r}; "
      f"valid: {sorted(layers)}"
    )
  for name in names:
    if not isinstance(layers[name], EPITOME_LAYERS + STOCK_PRUNABLE):
      raise ValueError(
        f"{what}: layer {name!r} is a {type(layers[name]).__name__}; valid: "
        "epitome layers and stock Conv1D, Conv2D or Dense layers"
      )
  return {name: layers[name] for name in names}


def _stored_weight(layer):
  """``(entries of the prunable weight, other numbers the layer stores)``."""
  if isinstance(layer, EPITOME_LAYERS):
    g = layer.epitome_geometry
    return g.epitome_size, g.routing_size
  return int(np.prod(layer.kernel.shape)), 0


def sparsity_for_size(
  model,
  size: Union[float, Mapping[str, float]],
  *,
  positions: str = "bitmask",
) -> Dict[str, float]:
  """Per-layer sparsity that fits each layer into a stored-size budget.

  A pruned layer stores its non-zeros (32 bits each), their positions
  (``positions``: ``"bitmask"``, 1 bit per entry of the pruned weight;
  ``"index16"``, 16 bits per non-zero; ``"none"``, not counted) and, for an
  epitome layer, its routing map. The returned sparsity is the smallest that
  keeps all of it within the budget (0 where the layer already fits). A
  bitmask is the least a mask of random positions costs; TFLite's sparse
  tensor format (``export_tflite(sparse=True)``) spends more per non-zero
  (docs/results.md, file size).

  Args:
    model: a built Keras model.
    size: a compression ratio (number ``>= 1``): every epitome layer gets
      ``kernel entries / size`` words, so an epitome of compression ``c``
      pruned to ``size`` is ``size / c`` times smaller again; or a dict
      ``{layer name: words}`` (epitome layers or stock ``Conv1D`` /
      ``Conv2D`` / ``Dense`` layers).
    positions: how the non-zeros' positions are charged (above).

  Returns:
    ``{layer name: sparsity in [0, 1)}``, ready for :func:`prune_epitomes`.

  Raises:
    ValueError: for an unknown ``positions``, a bad ``size``, a layer name
      the model does not have or that cannot be pruned, or a budget too
      small for the layer's positions and routing map.
  """
  what = "sparsity_for_size"
  if positions not in POSITION_BITS:
    raise ValueError(
      f"{what}: positions={positions!r}; valid: {', '.join(POSITION_BITS)}"
    )
  per_entry, per_nonzero = POSITION_BITS[positions]
  if isinstance(size, Mapping):
    layers = _target_layers(model, list(size), what)
    budgets = dict(size)
  else:
    if not spec.is_real(size) or not math.isfinite(float(size)) or float(size) < 1:
      raise ValueError(
        f"{what}: size must be a compression ratio (a finite number >= 1) or a "
        f"dict {{layer name: words}}, got {size!r}"
      )
    layers = _target_layers(model, None, what)
    budgets = {
      name: layer.epitome_geometry.kernel_size / float(size)
      for name, layer in layers.items()
    }
  out = {}
  for name, layer in layers.items():
    words = budgets[name]
    if not spec.is_real(words) or not math.isfinite(float(words)):
      raise ValueError(
        f"{what}: layer {name!r}: the budget must be a finite number of 32-bit "
        f"words, got {words!r}"
      )
    entries, fixed = _stored_weight(layer)
    bits = 32 * (float(words) - fixed) - per_entry * entries
    if not math.isfinite(bits) or bits <= 0:
      raise ValueError(
        f"{what}: layer {name!r}: a budget of {words!r} words leaves no room "
        f"for non-zeros after its positions ({positions}) and routing map "
        f"({fixed} numbers); {entries} prunable entries"
      )
    nonzeros = min(entries, math.floor(bits / (32 + per_nonzero)))
    out[name] = float(1.0 - nonzeros / entries)
  return out


def prune_epitomes(model, sparsity: Union[float, Mapping[str, float]]) -> keras.Model:
  """TF-MOT magnitude pruning of the epitomes, mask fixed from the first step.

  Each targeted layer is wrapped in ``prune_low_magnitude`` with a
  ``ConstantSparsity`` schedule that chooses the mask by magnitude at the
  first training step and keeps it: the pruned weights get no gradient, so
  re-choosing it later would not change it. Train the result with
  :func:`distill` (which adds TF-MOT's ``UpdatePruningStep`` callback
  itself) or with ``fit`` and that callback, then
  ``tfmot.sparsity.keras.strip_pruning`` before export.

  Args:
    model: a Keras model, e.g. from :func:`keras_epitome.epitomize`. Not
      changed: the result is a clone with the same weights.
    sparsity: one fraction in ``[0, 1)`` for every epitome layer, or a dict
      ``{layer name: fraction}`` (epitome layers or stock ``Conv1D`` /
      ``Conv2D`` / ``Dense`` layers), e.g. from :func:`sparsity_for_size`.

  Returns:
    The clone, its targeted layers wrapped for pruning.

  Raises:
    ValueError: for a sparsity outside ``[0, 1)``, a layer name the model
      does not have or that cannot be pruned, a model without epitome layers
      (with one fraction), or a model already wrapped for pruning or
      quantization-aware training.
  """
  import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top

  what = "prune_epitomes"
  check_keras2(model, what)  # TF-MOT pruning exists for Keras 2 only
  walk.check_no_training_wrappers(model, what, ("qat", "pruning"))
  if isinstance(sparsity, Mapping):
    layers = _target_layers(model, list(sparsity), what)
    fractions = dict(sparsity)
  else:
    layers = _target_layers(model, None, what)
    fractions = {name: sparsity for name in layers}
  fractions = {
    name: spec.check_fraction(value, "sparsity", f"{what}: layer {name!r}")
    for name, value in fractions.items()
  }
  sp = tfmot.sparsity.keras
  wrapped = {}

  def clone(layer):
    if layer.name not in fractions:
      return None  # a copy with its weights (walk.clone_model)
    # end_step=1, frequency=1: the mask is computed at step 0 (TF-MOT masks
    # on multiples of `frequency` after `begin_step`) and then kept.
    schedule = sp.ConstantSparsity(
      fractions[layer.name], begin_step=0, end_step=1, frequency=1
    )
    copy = layer.__class__.from_config(layer.get_config())
    wrapped[layer.name] = copy
    return sp.prune_low_magnitude(copy, pruning_schedule=schedule)

  pruned = walk.clone_model(model, clone, what)
  # The wrapped copies are built with the new model: copy their weights in
  # (the wrappers' mask, threshold and step variables are theirs).
  for name, copy in wrapped.items():
    copy.set_weights(model.get_layer(name).get_weights())
  return pruned
