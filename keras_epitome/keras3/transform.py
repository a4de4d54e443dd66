"""Model transforms for Keras 3: swap a model's layers for epitome layers, and back.

The Keras 3 counterparts of :mod:`keras_epitome.transform`, on any backend
(TensorFlow, JAX, PyTorch), for Keras 3 ``Sequential`` and functional models,
nested ones included:

* :func:`epitomize`: one ``keras.models.clone_model(model, clone_function=...,
  recursive=True)`` call that replaces every ``Conv1D``, ``Conv2D`` and
  ``Dense`` (exact stock types) by its Keras 3 epitome twin under a per-layer
  policy, copies every other weight and, from a trained model, starts each
  epitome as the closed-form least-squares fit of the trained kernel
  (:func:`keras_epitome.geometry.fit_epitome`);
* :func:`strip_epitome` / :func:`materialize_layer`: the inverse, stock layers
  holding the sampled kernels (equal outputs in inference mode);
* :func:`summarize`: what the epitome layers store and cost.

The data-aware conversion (``calibration_data=``) and :func:`allocate` run on
the TensorFlow backend through Keras 2 (:mod:`keras_epitome.keras3.bridge`
and :func:`keras_epitome.epitomize`, and back).

This module imports neither TensorFlow nor Keras 2 (the data-aware branch
imports them when it runs).

Example:
  >>> import keras
  >>> import keras_epitome.keras3 as ke
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 1)),
  ...     keras.layers.Conv2D(32, 3, activation="relu"),
  ...     keras.layers.Conv2D(64, 3, activation="relu"),
  ...     keras.layers.Flatten(),
  ...     keras.layers.Dense(10),
  ... ])
  >>> small = ke.epitomize(model, compression=4, verbose=False)
  >>> [type(l).__name__ for l in small.layers]
  ['Conv2D', 'EpitomeConv2D', 'Flatten', 'EpitomeDense']
  >>> stock = ke.strip_epitome(small)
  >>> [type(l).__name__ for l in stock.layers]
  ['Conv2D', 'Conv2D', 'Flatten', 'Dense']
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
from absl import logging
from keras import ops

from keras_epitome import geometry as geo
from keras_epitome import hardening, reports
from keras_epitome.keras3 import layers as k3_layers

# The records and rules both Keras versions share live in
# keras_epitome.reports (TF-free); this module re-exports them under the names
# it has always had (keras_epitome.keras3.transform.EpitomeReport, ...).
from keras_epitome.reports import (  # noqa: F401  (re-exported)
  DEFAULT_MIN_PARAMS,
  INITS,
  POLICY_KEYS,
  ConvertedLayer,
  EpitomeReport,
  KeptLayer,
  LayerSummary,
  ModelSummary,
  Policy,
  PolicyValue,
)

# Stock config keys an epitome layer cannot take (Keras 3 LoRA).
_DROPPED_KEYS = ("lora_rank", "lora_alpha")


# ----------------------------------------------------------------------------
# Model checks and the clone.


def is_keras2_object(obj) -> bool:
  """Whether ``obj`` is a Keras 2 (``tf_keras``) object; never imports Keras 2."""
  for cls in type(obj).__mro__:
    module = cls.__module__ or ""
    if module.split(".")[0] == "tf_keras" or module.startswith(
      "tensorflow.python.keras"
    ):
      return True
  return False


def check_keras3_model(model, what: str) -> None:
  """Refuses what a Keras 3 transform cannot handle, saying what to do instead.

  Args:
    model: what the user passed.
    what: the function's name (``"epitomize"``...), for the message; the
      Keras 2 function of the same name is ``keras_epitome.<what>``.

  Raises:
    ValueError: for a Keras 2 (``tf_keras``) model, a non-model, or a
      subclassed model (nested ones included).
  """
  if is_keras2_object(model):
    raise ValueError(
      f"{what}: '{getattr(model, 'name', model)}' is a Keras 2 (tf_keras) "
      f"{type(model).__name__}; keras_epitome.keras3.{what} takes Keras 3 "
      f"models. Use the Keras 2 API for it: keras_epitome.{what} (`import "
      f"keras_epitome as ke; ke.{what}(model, ...)`)"
    )
  if not isinstance(model, keras.Model):
    raise ValueError(
      f"{what} takes a Keras 3 keras.Model (Sequential or functional); got "
      f"{type(model).__name__}"
    )
  _check_clonable(model, what)


def _is_graph_model(model) -> bool:
  from keras.src.models.functional import Functional  # not in the public API

  return isinstance(model, (keras.Sequential, Functional))


def _check_clonable(model, what: str) -> None:
  if not _is_graph_model(model):
    raise ValueError(
      f"{what}: model '{model.name}' is a subclassed model "
      f"({type(model).__name__}); only Sequential and functional models can "
      "be transformed (their layer graph is known). Build it with the "
      "functional API, or use epitome layers directly in your subclass."
    )
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      _check_clonable(layer, what)


def _walk(model, owner=None):
  """Yields ``(layer, owner)`` for every leaf layer, nested models looked through."""
  seen = set()

  def visit(m):
    for layer in m.layers:
      if id(layer) in seen:
        continue
      seen.add(id(layer))
      if isinstance(layer, keras.Model) and _is_graph_model(layer):
        yield from visit(layer)
      else:
        yield layer, m

  yield from visit(model)


def _layer_names(model) -> set:
  return {
    layer.name
    for layer in model._flatten_layers(include_self=False)
    if not isinstance(layer, keras.layers.InputLayer)
  }


def clone_model(model, clone_layer: Callable, what: str):
  """``keras.models.clone_model(recursive=True)`` with one clone function.

  ``clone_layer(layer)`` returns the new layer, or ``None`` to keep a copy of
  ``layer`` (from its config; its weights are copied once the new model is
  built). Nested Sequential/functional models are cloned through the same
  function, and a layer shared between call sites stays shared.
  """
  check_keras3_model(model, what)
  copies = []

  def clone_function(layer):
    new = clone_layer(layer)
    if new is None:
      new = layer.__class__.from_config(layer.get_config())
      copies.append((layer, new))
    return new

  new_model = keras.models.clone_model(
    model, clone_function=clone_function, recursive=True
  )
  for old, new in copies:
    if old.weights and old.built and new.built:
      new.set_weights(old.get_weights())
  return new_model


def from_config(cls, config):
  """``cls.from_config(config)``, with the layer's own ``ValueError`` as it was raised.

  Keras 3's ``from_config`` turns any error of the constructor into a
  ``TypeError``; the epitome layers' argument errors are ``ValueError`` s that
  name the layer, the value and what is valid.
  """
  try:
    return cls.from_config(config)
  except TypeError as e:
    if isinstance(e.__context__, ValueError):
      raise e.__context__ from None
    raise


def _numpy(x) -> np.ndarray:
  return np.asarray(ops.convert_to_numpy(x))


# ----------------------------------------------------------------------------
# epitomize


def _check_geometry(layer, new) -> None:
  """Raises the ValueError the epitome layer's build would raise, if any."""
  shape = reports.kernel_shape(layer)
  if shape is None:
    return
  g = geo.layer_geometry(shape, new.compression, new.epitome_shape, new.channel_roll)
  geo.fixed_routing(g, new.spatial_stride)


def _fit_layer(old, new) -> float:
  """Sets ``new``'s epitome to the least-squares fit of ``old``'s kernel."""
  kernel = _numpy(old.kernel)
  epitome = hardening.fit_rounded(
    kernel, new.routing_map, new.epitome_geometry, fill=_numpy(new.epitome)
  )
  new.epitome.assign(epitome.astype(new.epitome.dtype))
  return hardening.relative_change(_numpy(new.kernel), kernel)


def _unsupported_reason(layer) -> Optional[str]:
  """Why a stock Conv/Dense cannot become an epitome layer, or ``None``."""
  mode = getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
  if mode:
    return (
      f"quantized ({mode}): its kernel is not a float tensor; convert the "
      "float model, then quantize"
    )
  return None


def epitomize(
  model,
  compression: float = 4.0,
  *,
  policy: Policy = None,
  min_params: int = DEFAULT_MIN_PARAMS,
  skip: Sequence[str] = (),
  sampler: str = "learned",
  learner: str = "param",
  init: str = "auto",
  spatial_stride=None,
  offset_scale: float = 1.0,
  channel_roll: int = 1,
  calibration_data=None,
  calibration=None,
  allocate: bool = False,
  verbose: bool = True,
):
  """Returns a copy of a Keras 3 ``model`` whose Conv/Dense layers are epitome layers.

  The Keras 3 version of :func:`keras_epitome.epitomize`, on any backend.
  Built on ``keras.models.clone_model(model, clone_function=...,
  recursive=True)``. Each layer whose exact type is ``keras.layers.Conv1D``,
  ``Conv2D`` or ``Dense`` (not a subclass) becomes its
  :mod:`keras_epitome.keras3` epitome twin with the same config (name,
  activation, bias, strides, padding, regularizers, dtype policy...) plus the
  epitome arguments; every other layer is cloned from its config with its
  weights. Biases are copied, layers shared between call sites stay shared,
  and nested Sequential/functional models are transformed recursively. The
  input model is not modified.

  Which layers are converted, with which arguments:

  1. names in ``skip`` stay stock;
  2. ``policy`` decides per layer when it has a say: a dict
     ``{layer_name: value}`` or a callable ``layer -> value``, where value is
     a compression ratio, a dict of epitome arguments (any of
     :data:`POLICY_KEYS`; missing ones take this function's arguments), or
     ``None`` to keep the layer stock;
  3. otherwise layers whose kernel has fewer than ``min_params`` entries stay
     stock (a policy entry overrides this), the others get ``compression``;
  4. a layer the settings cannot serve (``data_format="channels_first"``, a
     ratio too large for its kernel, a quantized layer) stays stock with the
     reason, or raises a ``ValueError`` naming it when the policy asked for it
     explicitly.

  Args:
    model: a Keras 3 Sequential or functional model, trained or not.
    compression: default ratio of kernel size to epitome size.
    policy: per-layer overrides (see above).
    min_params: kernels with fewer entries stay stock unless the policy names
      them.
    skip: names of layers to leave stock.
    sampler: ``"learned"`` (NES) or ``"fixed"`` (WSNet).
    learner: ``"param"`` or ``"feature"``.
    init: ``"fit"``: each epitome is the closed-form least-squares fit of the
      trained kernel for the layer's initial (integer) routing map (needs a
      built model); ``"random"``: the layers' own initializers; ``"auto"``:
      ``"fit"`` for a built model, ``"random"`` otherwise.
    spatial_stride: the epitome layers' ``spatial_stride``.
    offset_scale: the epitome layers' ``offset_scale``.
    channel_roll: the epitome layers' ``channel_roll`` (default 1, as the
      layers').
    calibration_data: optional inputs of the model (a NumPy array, ``(x, y)``
      or a ``tf.data.Dataset``; a few hundred samples) for the data-aware
      conversion of :func:`keras_epitome.epitomize` (every epitome and
      routing map fitted to reproduce the original layer's outputs,
      BatchNorms re-estimated, stock layers refitted, gradient passes), on
      the TensorFlow backend only: the model goes to Keras 2
      (:func:`keras_epitome.keras3.bridge.to_keras2`, layers both Keras
      versions share), is converted there, and the result comes back as
      Keras 3 epitome layers holding the Keras 2 conversion's weights. The
      returned model's ``epitome_report`` is then the Keras 2 conversion's
      :class:`keras_epitome.transform.EpitomeReport` (with ``calibration``
      and ``allocation``), and ``channel_roll`` must be 1 (give other
      rolls per layer in ``policy`` dicts). A callable ``policy`` is called
      with the Keras 2 twins of the layers.
    calibration: the options of the data-aware fit, a
      :class:`keras_epitome.calibration.CalibrationConfig`.
    allocate: with ``calibration_data``, choose each layer's ratio from the
      data (as :func:`keras_epitome.epitomize`; TensorFlow backend).
    verbose: print the report; otherwise it is logged at INFO level.

  Returns:
    A new Keras 3 model of the same kind with an ``epitome_report`` attribute
    (an :class:`EpitomeReport`).

  Raises:
    ValueError: for a Keras 2 model (use :func:`keras_epitome.epitomize`), a
      subclassed model, an invalid ``compression``, ``sampler``, ``learner``,
      ``spatial_stride``, ``offset_scale``, ``channel_roll`` or
      ``min_params``, an unknown ``init``, a policy or skip entry naming no
      layer of the model, a malformed policy value, epitome arguments that do
      not fit a layer the policy names, ``init="fit"`` on a model that is not
      built; with ``calibration_data``/``allocate``: a backend other than
      TensorFlow, a layer the Keras 2 bridge does not support (named), or
      what :func:`keras_epitome.epitomize` refuses.
    RuntimeError: if the Keras 2 round trip does not reproduce the model
      (a bridge bug; the message gives the difference).

  Example:
    >>> import keras
    >>> model = keras.Sequential([
    ...     keras.Input((16,)),
    ...     keras.layers.Dense(64, activation="relu", name="hidden"),
    ...     keras.layers.Dense(64, name="out")])
    >>> small = epitomize(model, policy={"out": 8.0}, min_params=0,
    ...                   verbose=False)
    >>> [(c.name, round(c.compression_ratio, 1))
    ...  for c in small.epitome_report.converted]
    [('hidden', 3.9), ('out', 8.0)]
  """
  check_keras3_model(model, "epitomize")
  if calibration_data is not None or allocate or calibration is not None:
    return _epitomize_through_keras2(
      model,
      compression,
      policy=policy,
      min_params=min_params,
      skip=skip,
      sampler=sampler,
      learner=learner,
      init=init,
      spatial_stride=spatial_stride,
      offset_scale=offset_scale,
      channel_roll=channel_roll,
      calibration_data=calibration_data,
      calibration=calibration,
      allocate=allocate,
      verbose=verbose,
    )
  reports.check_init(init, model)
  if init == "auto":
    init = "fit" if model.built else "random"
  min_params = reports.check_min_params(min_params)
  # The global settings must be valid: only a per-layer misfit (a ratio too
  # large for one kernel) may leave a layer stock.
  defaults = reports.check_defaults(
    compression=compression,
    sampler=sampler,
    learner=learner,
    spatial_stride=spatial_stride,
    offset_scale=offset_scale,
    channel_roll=channel_roll,
  )
  skip = reports.check_layer_names(model, _layer_names(model), skip, policy)
  report = EpitomeReport()
  converted = []  # (old, new)

  def clone_layer(layer):
    if isinstance(layer, keras.Model):  # recursive=True clones graph models
      raise ValueError(
        f"epitomize: nested model '{layer.name}' ({type(layer).__name__}) is "
        "subclassed; only Sequential and functional models can be transformed"
      )
    epitome_cls = k3_layers.STOCK_TO_EPITOME.get(type(layer))
    name, cls_name = layer.name, type(layer).__name__
    if epitome_cls is None:
      inner = getattr(layer, "layer", None)  # keras.layers.Wrapper
      if isinstance(layer, keras.layers.Wrapper) and type(inner) in (
        k3_layers.STOCK_TO_EPITOME
      ):
        report.kept.append(
          KeptLayer(
            name,
            cls_name,
            f"wraps {type(inner).__name__} '{inner.name}'; layers inside "
            "wrappers stay stock",
          )
        )
      elif not k3_layers.is_epitome_layer(layer) and any(
        getattr(layer, a, None) is not None for a in reports.KERNEL_ATTRS
      ):
        report.kept.append(
          KeptLayer(
            name,
            cls_name,
            "no epitome layer for this type (supported: "
            + ", ".join(c.__name__ for c in k3_layers.STOCK_TO_EPITOME)
            + ")",
          )
        )
      return None
    if name in skip:
      report.kept.append(KeptLayer(name, cls_name, "in skip"))
      return None
    kwargs, reason, explicit = reports.resolve_policy(
      layer, policy, defaults, min_params
    )
    if kwargs is None:
      report.kept.append(KeptLayer(name, cls_name, reason))
      return None
    try:
      reason = _unsupported_reason(layer)
      if reason is not None:
        raise ValueError(reason)
      config = reports.epitome_config(layer, kwargs, dropped=_DROPPED_KEYS)
      new = from_config(epitome_cls, config)
      # Build errors (a ratio too large for the kernel...) surface here,
      # not deep inside clone_model.
      _check_geometry(layer, new)
    except ValueError as e:
      if explicit:
        raise ValueError(f"epitomize: layer '{name}': {e}") from None
      # The global settings do not fit this layer: keep it, say why.
      report.kept.append(KeptLayer(name, cls_name, str(e)))
      return None
    converted.append((layer, new))
    return new

  new_model = clone_model(model, clone_layer, "epitomize")
  for old, new in converted:
    record = ConvertedLayer(new.name, reports.kernel_shape(old), None, None, init)
    if new.built:
      record.epitome_shape = new.epitome_geometry.epitome_shape
      record.compression_ratio = new.epitome_geometry.compression_ratio
      if getattr(old, "bias", None) is not None and new.bias is not None:
        new.bias.assign(_numpy(old.bias))
      if init == "fit" and old.built:
        record.fit_error = _fit_layer(old, new)
      elif init == "fit":
        record.init = "random"
    elif init == "fit":
      record.init = "random"
    report.converted.append(record)
  new_model.epitome_report = report
  if verbose:
    print(report)
  else:
    logging.info("%s", report)
  return new_model


# ----------------------------------------------------------------------------
# The data-aware conversion and allocate: through Keras 2 and back.


def _check_tensorflow_backend(what: str) -> None:
  backend = keras.backend.backend()
  if backend != "tensorflow":
    raise ValueError(
      f"{what} (the data-aware conversion) needs the TensorFlow backend: it "
      "runs the Keras 2 calibration (keras_epitome.calibration) on a Keras 2 "
      f"twin of the model; this Keras runs on {backend!r}. Convert on "
      "TensorFlow, train anywhere: save the trained model "
      "(model.save('trained.keras')), then with KERAS_BACKEND=tensorflow: "
      "model = keras.models.load_model('trained.keras'); small = "
      "keras_epitome.keras3.epitomize(model, 4, calibration_data=x[:2048]); "
      f"small.save('small.keras'); then on {backend!r}: "
      "keras.models.load_model('small.keras') and fine-tune it"
    )


def _outputs_numpy(model, x) -> List[np.ndarray]:
  y = model(x, training=False)
  return [_numpy(t) for t in keras.tree.flatten(y)]


def _max_difference(a_model, b_model, x) -> Tuple[float, float]:
  """``(max |a - b|, max |a|)`` over the two models' outputs on ``x``."""
  a, b = _outputs_numpy(a_model, x), _outputs_numpy(b_model, x)
  diff = max(float(np.abs(u - v).max()) for u, v in zip(a, b, strict=True))
  scale = max(float(np.abs(u).max()) for u in a)
  return diff, scale


def _check_same(a_model, b_model, x, what: str) -> float:
  """Raises if the two models' outputs on ``x`` differ beyond float rounding."""
  diff, scale = _max_difference(a_model, b_model, x)
  float32 = all(
    getattr(layer, "compute_dtype", "float32") == "float32"
    for layer, _ in _walk(a_model)
  )
  tolerance = 1e-4 if float32 else 2e-2  # mixed precision rounds more
  if not diff <= tolerance * max(1.0, scale):
    raise RuntimeError(
      f"epitomize: {what}: outputs differ by {diff:.3g} (outputs up to "
      f"{scale:.3g}) on the calibration data; a bug of the Keras 2 bridge "
      "(keras_epitome.keras3.bridge): please report it with the model"
    )
  return diff


def _keras2_policy(k2_converted) -> Dict[str, Dict[str, Any]]:
  """Per converted layer, the epitome arguments the Keras 2 conversion chose."""
  import keras_epitome as ke2
  from keras_epitome import walk as walk2

  entries = {}
  for layer in walk2.iter_layers(k2_converted):
    if not isinstance(layer, ke2.EPITOME_LAYERS):
      continue
    config = layer.get_config()
    entry = {k: config[k] for k in POLICY_KEYS if k in config}
    entry["compression"] = None
    entry["epitome_shape"] = tuple(int(d) for d in layer.epitome_geometry.epitome_shape)
    entries[layer.name] = entry
  return entries


def _epitomize_through_keras2(
  model,
  compression,
  *,
  policy,
  min_params,
  skip,
  sampler,
  learner,
  init,
  spatial_stride,
  offset_scale,
  channel_roll,
  calibration_data,
  calibration,
  allocate,
  verbose,
):
  """:func:`epitomize` with ``calibration_data``/``allocate``: see its docstring."""
  what = "allocate=True" if allocate else "calibration_data"
  _check_tensorflow_backend(f"epitomize: {what}")
  if calibration_data is None:
    raise ValueError(
      f"epitomize: {'allocate=True' if allocate else 'calibration'} needs "
      "calibration_data (inputs of the model, a few hundred samples)"
    )
  if channel_roll != 1:
    raise ValueError(
      f"epitomize: channel_roll={channel_roll!r} with calibration_data: the "
      "data-aware conversion (Keras 2) takes channel_roll per layer; give it in "
      "policy dicts, e.g. policy={'conv': {'compression': 4, 'channel_roll': 2}}"
    )
  import keras_epitome as ke2
  from keras_epitome import calibration as calibration2
  from keras_epitome.keras3 import bridge

  config = calibration if calibration is not None else calibration2.CalibrationConfig()
  if not isinstance(config, calibration2.CalibrationConfig):
    raise ValueError(
      "epitomize: calibration must be a keras_epitome.calibration."
      f"CalibrationConfig, got {type(config).__name__}"
    )
  if not model.built:
    raise ValueError(
      f"epitomize: calibration_data fits the epitomes to a trained model's "
      f"layer outputs; model '{model.name}' is not built"
    )
  k2 = bridge.to_keras2(model)
  x = calibration2.calibration_array(calibration_data, k2, config.max_samples)
  probe = x[: min(len(x), 64)]
  _check_same(model, k2, probe, "the model and its Keras 2 twin (to_keras2)")
  if isinstance(skip, str):
    skip = (skip,)
  k2_converted = ke2.epitomize(
    k2,
    compression,
    policy=policy,
    min_params=min_params,
    skip=skip,
    sampler=sampler,
    learner=learner,
    init=init,
    spatial_stride=spatial_stride,
    offset_scale=offset_scale,
    calibration_data=x,
    calibration=config,
    allocate=allocate,
    verbose=verbose,
  )
  converted = {r.name for r in k2_converted.epitome_report.converted}
  entries = {
    name: entry
    for name, entry in _keras2_policy(k2_converted).items()
    if name in converted  # not the model's own epitome layers
  }
  new_model = epitomize(
    model,
    compression,
    policy=lambda layer: entries.get(layer.name),
    min_params=0,
    init="random",
    verbose=False,
  )
  made = {r.name for r in new_model.epitome_report.converted}
  if made != set(entries):
    raise RuntimeError(
      f"epitomize: the Keras 3 model has epitome layers {sorted(made)} but the "
      f"Keras 2 conversion made {sorted(entries)}; a bug of the Keras 2 bridge"
    )
  bridge.from_keras2_weights(new_model, k2_converted)
  _check_same(
    new_model, k2_converted, probe, "the Keras 2 conversion and its Keras 3 copy"
  )
  new_model.epitome_report = k2_converted.epitome_report
  return new_model


def allocate(
  model,
  compression: float,
  calibration_data,
  *,
  candidates: Optional[Sequence[float]] = None,
  skip: Sequence[str] = (),
  min_params: int = DEFAULT_MIN_PARAMS,
  max_samples: Optional[int] = None,
  verbose: bool = True,
  **epitome_args,
):
  """Chooses a compression ratio per layer of a Keras 3 model from calibration data.

  :func:`keras_epitome.allocate` on the model's Keras 2 twin
  (:func:`keras_epitome.keras3.bridge.to_keras2`; TensorFlow backend, the
  layers both Keras versions share). Layer names are the Keras 3 model's,
  nested models' layers included (the twin is flat, so they are allocated
  too).

  Args:
    model: a trained, built Keras 3 model (one input).
    compression: the target ratio (the budget is the uniform conversion's).
    calibration_data: inputs, as for :func:`epitomize`.
    candidates, skip, min_params, max_samples, verbose, **epitome_args: as for
      :func:`keras_epitome.allocate` (``max_samples=None``: its default).

  Returns:
    A :class:`keras_epitome.allocation.Allocation`; its ``policy`` goes to
    :func:`epitomize` ``(policy=...)``.

  Raises:
    ValueError: on a backend other than TensorFlow, for a layer the bridge
      does not support, or what :func:`keras_epitome.allocate` refuses.
  """
  check_keras3_model(model, "allocate")
  _check_tensorflow_backend("allocate")
  import keras_epitome as ke2
  from keras_epitome.keras3 import bridge

  k2 = bridge.to_keras2(model)
  if max_samples is not None:
    epitome_args["max_samples"] = max_samples
  return ke2.allocate(
    k2,
    compression,
    calibration_data,
    candidates=candidates,
    skip=skip,
    min_params=min_params,
    verbose=verbose,
    **epitome_args,
  )


# ----------------------------------------------------------------------------
# strip_epitome


def _build_shape(layer):
  shapes = getattr(layer, "_build_shapes_dict", None) or {}
  shape = shapes.get("input_shape")
  if shape is None:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}' has no recorded input shape; "
      "call it on an input before materializing it"
    )
  return tuple(shape)


def materialize_layer(layer):
  """Returns the stock Keras 3 layer equal to an epitome layer in inference mode.

  The stock layer (``Conv1D``/``Conv2D``/``Dense``) has the epitome layer's
  config without the epitome arguments, is built for the same input shape,
  and holds the kernel sampled with the inference routing map
  (``layer.kernel``: the moving average for the ``feature`` learner) and the
  same bias.

  Args:
    layer: a built Keras 3 epitome layer.

  Returns:
    A built stock layer with the same name.

  Raises:
    ValueError: if ``layer`` is not a Keras 3 epitome layer or is not built.

  Example:
    >>> import numpy as np
    >>> import keras_epitome.keras3 as ke
    >>> layer = ke.EpitomeDense(32, compression=4)
    >>> x = np.random.default_rng(0).normal(size=(2, 64)).astype("float32")
    >>> y = layer(x)
    >>> stock = materialize_layer(layer)
    >>> bool(np.abs(np.asarray(stock(x)) - np.asarray(y)).max() < 1e-5)
    True
  """
  if not k3_layers.is_epitome_layer(layer):
    valid = ", ".join(c.__name__ for c in k3_layers.EPITOME_LAYERS)
    hint = " (a Keras 2 layer: use keras_epitome.materialize_layer)"
    raise ValueError(
      f"materialize_layer takes a Keras 3 epitome layer ({valid}); got "
      f"{type(layer).__name__} '{getattr(layer, 'name', '?')}'"
      + (hint if is_keras2_object(layer) else "")
    )
  config = reports.stock_config(layer)
  stock_cls = k3_layers.STOCK_OF[type(layer)]
  stock = from_config(stock_cls, config)
  stock.build(_build_shape(layer))
  stock.kernel.assign(_numpy(layer.kernel).astype(stock.kernel.dtype))
  if layer.use_bias:
    stock.bias.assign(_numpy(layer.bias))
  return stock


def strip_epitome(model):
  """Returns a copy of a Keras 3 ``model`` with every epitome layer made stock.

  The inverse of :func:`epitomize`: each epitome layer becomes
  :func:`materialize_layer` of it, every other layer is cloned with its
  weights, nested models are stripped recursively and shared layers stay
  shared. Outputs equal the epitome model's in inference mode.

  Args:
    model: a Keras 3 Sequential or functional model.

  Returns:
    A new model of stock layers.

  Raises:
    ValueError: for a Keras 2 model (use :func:`keras_epitome.strip_epitome`),
      a subclassed model, or an unbuilt epitome layer.
  """

  def clone_layer(layer):
    if k3_layers.is_epitome_layer(layer):
      return materialize_layer(layer)
    return None

  return clone_model(model, clone_layer, "strip_epitome")


# ----------------------------------------------------------------------------
# summarize


def _output_positions(layer) -> int:
  """Output positions per example, summed over the layer's call sites."""
  total = 0
  for node in getattr(layer, "_inbound_nodes", []):
    outputs = node.outputs
    shape = tuple(outputs[0].shape)
    dims = shape[1:-1]
    if any(d is None for d in dims):
      raise ValueError(
        f"summarize: layer '{layer.name}' has an output of unknown size "
        f"{shape}; give the model a fixed input shape to count MACs"
      )
    total += int(np.prod(dims)) if dims else 1
  return max(total, 1)


def summarize(model, print_fn: Optional[Callable[[str], Any]] = print) -> ModelSummary:
  """Per-layer table of kernels, epitomes, stored sizes and multiply-adds (Keras 3).

  Lists every Keras 3 epitome layer and every stock layer that could be one
  (``Conv1D``, ``Conv2D``, ``Dense``), inside nested models too. MACs are
  per example: :meth:`EpitomeGeometry.macs_per_position` times the layer's
  output positions (summed over its call sites). The materialized form costs
  what the stock layer costs; the factored form runs the convolution on the
  epitome's channels plus two channel remixes.

  Args:
    model: a built Keras 3 model.
    print_fn: called with each line of the table, like ``model.summary``;
      ``None`` prints nothing.

  Returns:
    A :class:`ModelSummary`.

  Raises:
    ValueError: for a Keras 2 model (use :func:`keras_epitome.summarize`), a
      model that is not built, or a layer whose output size is unknown.
  """
  check_keras3_model(model, "summarize")
  if not model.built:
    raise ValueError(
      f"summarize: model '{model.name}' is not built; call it on data or "
      "give it an Input first"
    )
  records = []
  total = int(model.count_params())
  stock_params = total
  for layer, _ in _walk(model):
    if k3_layers.is_epitome_layer(layer) and layer.built:
      positions = _output_positions(layer)
      records.append(reports.epitome_layer_summary(layer, positions))
      stock_params += reports.stock_params_change(layer)
    elif type(layer) in k3_layers.STOCK_TO_EPITOME and layer.built:
      positions = _output_positions(layer)
      records.append(
        reports.stock_layer_summary(layer, reports.kernel_shape(layer), positions)
      )
  summary = reports.model_summary(records, total, stock_params)
  if print_fn is not None:
    reports.print_summary(model, summary, print_fn)
  return summary
