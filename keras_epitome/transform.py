"""Model transform: swap a model's layers for epitome layers, and back.

:func:`epitomize` is to epitome layers what
``tfmot.sparsity.keras.prune_low_magnitude`` is to pruning: one
``keras.models.clone_model(..., clone_function=...)`` call that replaces every
supported layer (``Conv1D``, ``Conv2D``, ``Dense``: the keys of
:data:`keras_epitome.layers.STOCK_TO_EPITOME`) by its epitome twin under a
per-layer policy, and copies every other weight. From a trained model the
epitomes start as the closed-form least-squares fit of the trained kernels
(docs/design.md, the weight fit), so fine-tuning starts close to the original function.
:func:`strip_epitome` is the inverse: stock layers with the materialized
kernels, equal outputs in inference mode. :func:`summarize` prints what the
epitome layers store and cost.

Example:
  >>> import keras_epitome as ke
  >>> keras = ke.keras
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
  >>> small.epitome_report.kept[0].reason  # the first conv is too small
  'kernel has 288 entries < min_params=1024'
  >>> stock = ke.strip_epitome(small)
  >>> [type(l).__name__ for l in stock.layers]
  ['Conv2D', 'Conv2D', 'Flatten', 'Dense']
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from keras_epitome import allocation, hardening, reports, sampling, walk
from keras_epitome import calibration as calibration_lib
from keras_epitome import layers as epitome_layers
from keras_epitome.backend import check_keras2, keras3_dispatch

# The records and rules both Keras versions share live in
# keras_epitome.reports; this module re-exports them under the names it has
# always had (keras_epitome.transform.EpitomeReport, ...).
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
from keras_epitome.reports import KERNEL_ATTRS as _KERNEL_ATTRS
from keras_epitome.reports import epitome_config as _epitome_config
from keras_epitome.reports import fmt_shape as _fmt_shape  # noqa: F401
from keras_epitome.reports import kernel_shape as _kernel_shape
from keras_epitome.reports import print_summary as _print_summary
from keras_epitome.reports import resolve_policy as _resolve_policy

# ----------------------------------------------------------------------------
# Helpers shared by the transforms.


def _check_geometry(kernel_shape, kwargs):
  """Raises the ValueError the epitome layer's build would raise, if any."""
  sampling.layer_geometry(
    kernel_shape, kwargs.get("compression"), kwargs.get("epitome_shape")
  )


def _fit_layer(old, new) -> float:
  """Sets ``new``'s epitome to the least-squares fit of ``old``'s kernel."""
  kernel = old.kernel.numpy()
  epitome = hardening.fit_rounded(
    kernel, new.routing_map, new.epitome_geometry, fill=new.epitome.numpy()
  )
  new.epitome.assign(epitome.astype(new.epitome.dtype.as_numpy_dtype))
  return hardening.relative_change(new.kernel.numpy(), kernel)


# ----------------------------------------------------------------------------
# epitomize


@keras3_dispatch("epitomize")
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
  calibration_data=None,
  calibration: Optional[calibration_lib.CalibrationConfig] = None,
  calibration_options: Optional[Mapping[str, Any]] = None,
  allocate: bool = False,
  verbose: bool = True,
):
  """Returns a copy of ``model`` whose Conv/Dense layers are epitome layers.

  Built on ``keras.models.clone_model(model, clone_function=...)``. Each layer
  whose exact type is a key of :data:`keras_epitome.layers.STOCK_TO_EPITOME`
  (``Conv1D``, ``Conv2D``, ``Dense``) is replaced by its epitome twin with the
  same config (name, activation, bias, strides, padding, regularizers...) plus
  the epitome arguments; every other layer is cloned from its config. All
  weights that are not kernels (biases, BatchNorm statistics, other layers) are
  copied, layers shared between call sites stay shared, and nested
  Sequential/functional models are transformed recursively. The input model is
  not modified.

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
     ratio too large for its kernel) stays stock with the reason, or raises a
     ``ValueError`` naming it when the policy asked for it explicitly.

  Layers with a kernel that are left alone (skipped, too small, unsupported
  types such as ``DepthwiseConv2D``) are printed (``verbose``) or logged
  (absl ``logging.info``) and
  listed in the returned model's ``epitome_report`` attribute (an
  :class:`EpitomeReport`), which also gives each converted layer's achieved
  ratio and, for ``init="fit"``, its relative reconstruction error.

  Args:
    model: a Sequential or functional Keras model, trained or not.
    compression: default ratio of kernel size to epitome size.
    policy: per-layer overrides (see above).
    min_params: kernels with fewer entries stay stock unless the policy names
      them.
    skip: names of layers to leave stock.
    sampler: ``"learned"`` (NES) or ``"fixed"`` (WSNet).
    learner: ``"param"`` or ``"feature"`` (see :class:`EpitomeMixin`).
    init: ``"fit"``: each epitome is the closed-form least-squares fit of the
      trained kernel for the layer's initial (integer) routing map (needs a
      built model); ``"random"``: the layers' own initializers; ``"auto"``:
      ``"fit"`` for a built model, ``"random"`` otherwise.
    spatial_stride: the epitome layers' ``spatial_stride``.
    offset_scale: the epitome layers' ``offset_scale``.
    calibration_data: optional inputs of the model (a NumPy array, ``(x, y)``
      or a ``tf.data.Dataset`` of ``x`` or ``(x, y)``; a few hundred samples):
      then every epitome and routing map is fitted to reproduce the original
      layer's outputs on these inputs, layer by layer with the converted
      layers' outputs as inputs, and BatchNorm statistics are re-estimated
      (:func:`keras_epitome.calibration.calibrate`; the layers' ``init``
      becomes ``"data"``). Much closer to the trained model than the weight
      fit before any fine-tuning.
    calibration: the options of the data-aware fit, a
      :class:`keras_epitome.calibration.CalibrationConfig` (``ridge``,
      ``refit_batchnorm``, ``batch_size``, ``max_samples``, the gradient
      steps after the least squares ``output_steps``...; default: its
      defaults). ``max_samples`` (default 2,048) caps the calibration samples
      used; a larger set is cut to its first ``max_samples``, with a logged
      warning.
    calibration_options: deprecated: the same options as a dict of
      :func:`keras_epitome.calibration.calibrate`'s former keyword arguments;
      a ``DeprecationWarning`` shows the equivalent ``CalibrationConfig``.
    allocate: with ``calibration_data``, choose the ratio of each layer
      from the data instead of giving all of them ``compression``
      (:func:`keras_epitome.allocation.allocate`): the converted layers
      together store no more than the uniform conversion, spent where the
      model's output is most sensitive (a layer may stay stock). Needs no
      ``policy``. The choice is in ``epitome_report.allocation``.
    verbose: print the report; otherwise it is logged at INFO level.

  Returns:
    A new Keras model of the same kind with an ``epitome_report`` attribute.

  Raises:
    ValueError: for a subclassed model, an invalid ``compression``,
      ``sampler``, ``learner``, ``spatial_stride`` or ``offset_scale``, an
      unknown ``init``, a policy or skip
      entry naming no layer of the model, a malformed policy value, epitome
      arguments that do not fit a layer the policy names, ``init="fit"``
      or ``calibration_data`` on a model that is not built, ``init="random"``
      with ``calibration_data``, or bad calibration data (empty, wrong
      shape, non-finite values), ``allocate`` without ``calibration_data``
      or with a ``policy``, a ``calibration`` that is not a
      ``CalibrationConfig``, ``calibration_options`` with an unknown key or
      together with ``calibration``.

  Warns:
    UserWarning: for a built model whose layers get the weight fit because
      no ``calibration_data`` was given (the fix is in the message).
    RuntimeWarning: for a data-aware conversion whose output is far from
      the original model's (``CalibrationConfig.output_check``).

  Example:
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
  walk.check_transformable(model, "epitomize")
  reports.check_init(init, model)
  min_params = reports.check_min_params(min_params)
  config = _calibration_config(calibration, calibration_options)
  if calibration_data is not None:
    if not model.built or init == "random":
      raise ValueError(
        f"epitomize: calibration_data fits the epitomes to a trained model's "
        f"layer outputs; it needs a built model and init='auto' or 'fit' "
        f"(model '{model.name}': built={model.built}, init={init!r})"
      )
    calibration_data = calibration_lib.calibration_array(
      calibration_data, model, config.max_samples
    )
  if init == "auto":
    init = "fit" if model.built else "random"
  defaults = reports.check_defaults(
    compression=compression,
    sampler=sampler,
    learner=learner,
    spatial_stride=spatial_stride,
    offset_scale=offset_scale,
  )
  names = {layer.name for layer in walk.iter_layers(model)}
  skip = reports.check_layer_names(model, names, skip, policy)
  report = EpitomeReport()
  if allocate:
    if calibration_data is None or policy is not None:
      raise ValueError(
        "epitomize: allocate=True chooses every layer's ratio from "
        "calibration_data; it needs calibration_data and no policy (got "
        f"calibration_data={'None' if calibration_data is None else 'given'}, "
        f"policy={'None' if policy is None else 'given'})"
      )
    report.allocation = allocation.plan(  # `allocate` is the flag here
      model,
      compression,
      calibration_data,
      convert=epitomize,
      skip=sorted(skip),
      min_params=min_params,
      verbose=verbose,
      sampler=sampler,
      learner=learner,
      spatial_stride=spatial_stride,
      offset_scale=offset_scale,
    )
    policy = report.allocation.policy
  converted = []  # (old, new)

  def clone_layer(layer):
    epitome_cls = epitome_layers.STOCK_TO_EPITOME.get(type(layer))
    if epitome_cls is None:
      if not isinstance(layer, epitome_layers.EPITOME_LAYERS) and any(
        getattr(layer, a, None) is not None for a in _KERNEL_ATTRS
      ):
        report.kept.append(
          KeptLayer(
            layer.name,
            type(layer).__name__,
            "no epitome layer for this type (supported: "
            + ", ".join(c.__name__ for c in epitome_layers.STOCK_TO_EPITOME)
            + ")",
          )
        )
      return None
    if layer.name in skip:
      report.kept.append(KeptLayer(layer.name, type(layer).__name__, "in skip"))
      return None
    kwargs, reason, explicit = _resolve_policy(layer, policy, defaults, min_params)
    if kwargs is None:
      report.kept.append(KeptLayer(layer.name, type(layer).__name__, reason))
      return None
    try:
      new = epitome_cls(**_epitome_config(layer, kwargs))
      if layer.built:
        # Build errors (a ratio too large for the kernel...) surface here,
        # not deep inside clone_model.
        _check_geometry(_kernel_shape(layer), kwargs)
    except ValueError as e:
      if explicit:
        raise ValueError(f"epitomize: layer '{layer.name}': {e}") from None
      # The global settings do not fit this layer: keep it, say why.
      report.kept.append(KeptLayer(layer.name, type(layer).__name__, str(e)))
      return None
    converted.append((layer, new))
    return new

  new_model = walk.clone_model(model, clone_layer, "epitomize")
  if report.allocation is not None:
    for kept in report.kept:
      if kept.name in report.allocation.policy:
        kept.reason = "allocate kept it stock (least output error in the budget)"
  for old, new in converted:
    record = ConvertedLayer(new.name, _kernel_shape(old), None, None, init)
    if new.built:
      record.epitome_shape = new.epitome_geometry.epitome_shape
      record.compression_ratio = new.epitome_geometry.compression_ratio
      for name in ("bias",):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if src is not None and dst is not None:
          dst.assign(src)
      if init == "fit" and old.built:
        record.fit_error = _fit_layer(old, new)
      elif init == "fit":
        record.init = "random"
    report.converted.append(record)
  if calibration_data is not None:
    fitted = calibration_lib.calibrate(
      new_model, model, calibration_data, config, pairs=converted
    )
    report.calibration = fitted
    by_name = {r.name: r for r in fitted}
    for record in report.converted:
      result = by_name.get(record.name)
      if result is not None and result.output_error is not None:
        record.init = "data"
        record.output_error = result.output_error
        record.weight_fit_output_error = result.weight_fit_output_error
  elif init == "fit" and any(old.built for old, _ in converted):
    warnings.warn(
      f"epitomize: model '{model.name}' has weights but no calibration_data "
      f"was given: its {len(converted)} converted layer(s) get the weight-space "
      "fit of the trained kernels, which usually leaves a trained model near "
      "chance accuracy until it is fine-tuned; pass "
      "calibration_data=x_train[:2048] for a data-aware conversion (or "
      "init='random' for a model to train from scratch)",
      UserWarning,
      stacklevel=2,
    )
  new_model.epitome_report = report
  if verbose:
    print(report)
  else:
    logging.info("%s", report)
  return new_model


def allocate(
  model,
  compression: float,
  calibration_data,
  *,
  candidates: Optional[Sequence[float]] = None,
  skip: Sequence[str] = (),
  min_params: int = DEFAULT_MIN_PARAMS,
  max_samples: int = allocation.DEFAULT_MAX_SAMPLES,
  verbose: bool = True,
  **epitome_args,
) -> allocation.Allocation:
  """Chooses a compression ratio per layer from calibration data.

  See :mod:`keras_epitome.allocation` for the method. The layers considered are those
  ``epitomize(model, compression, skip=skip, min_params=min_params)``
  converts at the top level of the model; each may end stock, at
  ``compression`` or at any candidate ratio its kernel allows (layers of
  nested models keep ``compression``).

  Args:
    model: a trained, built Keras model (one input).
    compression: the target ratio: the budget is what the uniform
      conversion at this ratio stores in those layers.
    calibration_data: inputs, as for ``epitomize``; at most ``max_samples``
      are used.
    candidates: ratios (``> 1``) tried per layer, besides stock and
      ``compression``; default :data:`DEFAULT_CANDIDATES` up to
      ``4 * compression``.
    skip: layers to leave stock (not allocated).
    min_params: as for ``epitomize``.
    max_samples: calibration samples used.
    verbose: print the measurements and the choice (else logged at INFO).
    **epitome_args: ``sampler``, ``learner``, ``spatial_stride``,
      ``offset_scale``, passed to ``epitomize``.

  Returns:
    An :class:`keras_epitome.allocation.Allocation`; its ``policy`` goes to
    ``epitomize(policy=...)``.

  Raises:
    ValueError: for an invalid ``compression``, candidate ratios that are not
      numbers above 1, bad calibration data, or a model ``epitomize``
      cannot calibrate.
  """
  return allocation.plan(
    model,
    compression,
    calibration_data,
    convert=epitomize,
    candidates=candidates,
    skip=skip,
    min_params=min_params,
    max_samples=max_samples,
    verbose=verbose,
    **epitome_args,
  )


# ----------------------------------------------------------------------------
# strip_epitome


def _is_epitome_layer(layer) -> bool:
  return isinstance(layer, epitome_layers.EPITOME_LAYERS)


def materialize_layer(layer):
  """Returns the stock layer equal to an epitome layer in inference mode.

  The stock layer (``Conv1D``/``Conv2D``/``Dense``) has the epitome layer's
  config without the epitome arguments, is built for the same input shape, and
  holds the kernel sampled with the inference routing map (``layer.kernel``:
  the moving average for the ``feature`` learner) and the same bias.

  Args:
    layer: a built epitome layer.

  Returns:
    A built stock layer with the same name.

  Raises:
    ValueError: if ``layer`` is not an epitome layer or is not built.

  Example:
    >>> import tensorflow as tf
    >>> layer = ke.EpitomeDense(32, compression=4)
    >>> x = tf.random.normal([2, 64])
    >>> y = layer(x)
    >>> stock = materialize_layer(layer)
    >>> bool(tf.reduce_max(tf.abs(stock(x) - y)) < 1e-5)
    True
  """
  if not isinstance(layer, epitome_layers.EPITOME_LAYERS):
    raise ValueError(
      f"materialize_layer takes an epitome layer ({', '.join(c.__name__ for c in epitome_layers.EPITOME_LAYERS)}); "
      f"got {type(layer).__name__} '{getattr(layer, 'name', '?')}'"
    )
  config = reports.stock_config(layer)
  stock = layer._stock_class.from_config(config)  # pylint: disable=protected-access
  input_shape = getattr(layer, "_build_input_shape", None)
  if input_shape is None:
    input_shape = layer.input_shape
  stock.build(input_shape)
  stock.kernel.assign(layer.kernel)
  if getattr(layer, "bias", None) is not None:
    stock.bias.assign(layer.bias)
  return stock


@keras3_dispatch("strip_epitome")
def strip_epitome(model):
  """Returns a copy of ``model`` with every epitome layer replaced by a stock one.

  The inverse of :func:`epitomize` (like ``tfmot.sparsity.keras.strip_pruning``):
  each epitome layer becomes :func:`materialize_layer` of it, every other
  layer is cloned with its weights, nested models are stripped recursively and
  shared layers stay shared. Outputs equal the epitome model's in inference
  mode. Strip pruning wrappers first (``strip_pruning``); a
  quantization-aware training model is refused (export it with the TFLite
  converter).

  Args:
    model: a Sequential or functional model.

  Returns:
    A new model of stock layers.

  Raises:
    ValueError: for a subclassed model, an unbuilt epitome layer, an epitome
      layer inside a pruning wrapper, or a quantization-aware training model.

  Example:
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           ke.EpitomeDense(8, compression=2)])
    >>> stock = strip_epitome(model)
    >>> x = np.ones((1, 4), "float32")
    >>> bool(np.allclose(stock(x), model(x), atol=1e-5))
    True
  """
  walk.check_transformable(model, "strip_epitome")
  walk.check_no_training_wrappers(
    model, "strip_epitome", ("qat", "pruning"), _is_epitome_layer
  )

  def clone_layer(layer):
    if isinstance(layer, epitome_layers.EPITOME_LAYERS):
      return materialize_layer(layer)
    return None

  return walk.clone_model(model, clone_layer, "strip_epitome")


# ----------------------------------------------------------------------------
# summarize


def _output_positions(layer, owner) -> int:
  """Output positions per example, summed over the layer's call sites in ``owner``.

  Nodes the layer has in other models (e.g. wrappers TF-MOT built around the
  same layer object) are not counted.
  """
  network_nodes = getattr(owner, "_network_nodes", None)
  total = 0
  for index, node in enumerate(getattr(layer, "_inbound_nodes", [])):
    if network_nodes is not None and (f"{layer.name}_ib-{index}" not in network_nodes):
      continue
    shapes = node.output_shapes
    if isinstance(shapes, list):
      shapes = shapes[0]
    dims = tuple(shapes)[1:-1]
    if any(d is None for d in dims):
      raise ValueError(
        f"summarize: layer '{layer.name}' has an output of unknown size "
        f"{tuple(shapes)}; give the model a fixed input shape to count MACs"
      )
    total += int(np.prod(dims)) if dims else 1
  return max(total, 1)


@keras3_dispatch("summarize")
def summarize(model, print_fn: Optional[Callable[[str], Any]] = print) -> ModelSummary:
  """Per-layer table of kernels, epitomes, stored sizes and multiply-adds.

  Lists every epitome layer and every stock layer that could be one
  (``Conv1D``, ``Conv2D``, ``Dense``), inside nested models and training
  wrappers (pruning, QAT) too (:func:`keras_epitome.walk.walk`). MACs are per
  example: :meth:`EpitomeGeometry.macs_per_position` times the layer's output
  positions (summed over the layer's call sites). The materialized form costs
  what the stock layer costs; the factored form (docs/design.md) runs
  the convolution on the epitome's channels plus two channel remixes.

  Args:
    model: a built Keras model.
    print_fn: called with each line of the table, like ``model.summary``;
      ``None`` prints nothing.

  Returns:
    A :class:`ModelSummary`.

  Raises:
    ValueError: if the model is not built, or a layer's output size is
      unknown.

  Example:
    >>> model = keras.Sequential([keras.Input((8, 8, 16)),
    ...                           ke.EpitomeConv2D(32, 3, compression=4)])
    >>> s = summarize(model, print_fn=None)
    >>> s.layers[0].epitome_shape, s.layers[0].output_positions
    ((3, 3, 11, 11), 36)
  """
  check_keras2(model, "summarize")
  if not model.built:
    raise ValueError(
      f"summarize: model '{model.name}' is not built; call it on data or "
      "give it an Input first"
    )
  records = []
  total = int(model.count_params())
  stock_params = total
  for layer, owner, outer in walk.walk(model):
    if isinstance(layer, epitome_layers.EPITOME_LAYERS):
      positions = _output_positions(outer, owner)
      records.append(reports.epitome_layer_summary(layer, positions))
      stock_params += reports.stock_params_change(layer)
    elif type(layer) in epitome_layers.STOCK_TO_EPITOME and layer.built:
      positions = _output_positions(outer, owner)
      records.append(
        reports.stock_layer_summary(layer, _kernel_shape(layer), positions)
      )
  summary = reports.model_summary(records, total, stock_params)
  if print_fn is not None:
    _print_summary(model, summary, print_fn)
  return summary


def _calibration_config(config, options) -> "calibration_lib.CalibrationConfig":
  """``epitomize``'s ``calibration`` (or deprecated ``calibration_options``)."""
  if options is not None:
    if config is not None:
      raise ValueError(
        "epitomize: pass calibration=CalibrationConfig(...) or the deprecated "
        "calibration_options, not both"
      )
    config = calibration_lib.config_from_options(options, "epitomize")
    warnings.warn(
      "epitomize: calibration_options is deprecated; pass "
      f"calibration=keras_epitome.calibration.{calibration_lib.spelled(config)}",
      DeprecationWarning,
      stacklevel=3,
    )
    return config
  if config is None:
    return calibration_lib.CalibrationConfig()
  if not isinstance(config, calibration_lib.CalibrationConfig):
    raise ValueError(
      "epitomize: calibration must be a keras_epitome.calibration."
      f"CalibrationConfig, got {type(config).__name__}"
    )
  return config
