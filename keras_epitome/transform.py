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

import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging

from keras_epitome import allocation, sampling, spec, walk
from keras_epitome import calibration as calibration_lib
from keras_epitome import layers as epitome_layers
from keras_epitome.backend import check_keras2, keras3_dispatch

# Arguments a policy entry may set for one layer.
POLICY_KEYS = epitome_layers.EPITOME_ARGS
INITS = ("auto", "fit", "random")
DEFAULT_MIN_PARAMS = 1024

# Layers that hold a kernel-like weight but have no epitome twin yet; they are
# reported when left alone (layers without such a weight are not listed).
_KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")

PolicyValue = Union[None, float, int, Mapping[str, Any]]
Policy = Union[None, Mapping[str, PolicyValue], Callable[[Any], PolicyValue]]


@dataclasses.dataclass
class ConvertedLayer:
  """A layer :func:`epitomize` replaced.

  Attributes:
    name: the layer's name (unchanged by the transform).
    kernel_shape: shape of the stock kernel.
    epitome_shape: shape of the epitome (``None`` if the model was not built).
    compression_ratio: achieved ratio, kernel over epitome plus routing map.
    init: ``"fit"``, ``"random"`` or ``"data"`` (fitted to the layer's
      outputs on calibration data, see :mod:`keras_epitome.calibration`).
    fit_error: relative reconstruction error ``|K - K_fit| / |K|`` of the
      trained kernel by the fitted epitome (``init="fit"`` only).
    output_error: relative output error on the calibration data after the
      data-aware fit (``init="data"`` only).
    weight_fit_output_error: the same error of the weight fit, for comparison
      (``init="data"`` only).
  """

  name: str
  kernel_shape: Optional[Tuple[int, ...]]
  epitome_shape: Optional[Tuple[int, ...]]
  compression_ratio: Optional[float]
  init: str
  fit_error: Optional[float] = None
  output_error: Optional[float] = None
  weight_fit_output_error: Optional[float] = None


@dataclasses.dataclass
class KeptLayer:
  """A kernel layer :func:`epitomize` left as it was, and why."""

  name: str
  class_name: str
  reason: str


@dataclasses.dataclass
class EpitomeReport:
  """What :func:`epitomize` did; available as ``model.epitome_report``.

  Attributes:
    converted: the layers turned into epitome layers.
    kept: layers with a kernel that stayed stock (skipped, too small, refused
      by the policy or of an unsupported type such as ``DepthwiseConv2D``).
    calibration: with ``calibration_data``, one
      :class:`keras_epitome.calibration.LayerCalibration` per layer the
      data-aware pass fitted (epitome layers, then refitted stock layers),
      then, after gradient passes, one for the model's output matching
      (``"<model> (output)"``) and one for the BatchNorm statistics
      (``"<model> (batchnorm)"``), and last the check of the converted
      model's output against the original's (``"<model> (check)"``).
    allocation: with ``allocate=True``, the
      :class:`keras_epitome.allocation.Allocation` that chose the ratios.
  """

  converted: List[ConvertedLayer] = dataclasses.field(default_factory=list)
  kept: List[KeptLayer] = dataclasses.field(default_factory=list)
  calibration: List[Any] = dataclasses.field(default_factory=list)
  allocation: Optional[Any] = None

  def __str__(self) -> str:
    lines = [f"epitomize: {len(self.converted)} layer(s) converted"]
    for c in self.converted:
      ratio = f"{c.compression_ratio:.2f}x" if c.compression_ratio else "?"
      err = f", fit error {c.fit_error:.3f}" if c.fit_error is not None else ""
      if c.output_error is not None:
        err += (
          f", output error {c.output_error:.3f} (weight fit "
          f"{c.weight_fit_output_error:.3f})"
        )
      lines.append(
        f"  {c.name}: {c.kernel_shape} -> {c.epitome_shape} ({ratio}, "
        f"init={c.init}{err})"
      )
    lines.append(f"epitomize: {len(self.kept)} kernel layer(s) kept stock")
    for k in self.kept:
      lines.append(f"  {k.name} ({k.class_name}): {k.reason}")
    for c in self.calibration:
      if c.note and c.output_error is not None:  # a refitted stock layer
        lines.append(
          f"  {c.name}: {c.note}, output error {c.output_error:.3f} "
          f"(before {c.weight_fit_output_error:.3f})"
        )
      elif c.note and c.block_error is None:  # e.g. BatchNorm statistics
        lines.append(f"  {c.name}: {c.note}")
      if c.block_error is not None and c.block_error_before is None:  # check
        lines.append(f"  {c.name}: {c.note} ({c.block_error:.3f})")
      elif c.block_error is not None:  # gradient reconstruction
        lines.append(
          f"  {c.name}: reconstructed to {c.reconstructed_to}'s output, error "
          f"{c.block_error_before:.3f} -> {c.block_error:.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Helpers shared by the transforms.


def _kernel_shape(layer) -> Optional[Tuple[int, ...]]:
  kernel = getattr(layer, "kernel", None)
  if kernel is None:
    return None
  return tuple(int(d) for d in kernel.shape)


def _resolve_policy(layer, policy, defaults, min_params):
  """Returns ``(kwargs or None, reason, explicit)`` for a supported layer."""
  entry, explicit = dataclasses.MISSING, False
  if callable(policy) and not isinstance(policy, Mapping):
    entry, explicit = policy(layer), True
  elif policy is not None and layer.name in policy:
    entry, explicit = policy[layer.name], True
  if explicit and entry is None:
    return None, "policy returned None", explicit
  kwargs = dict(defaults)
  if explicit:
    if isinstance(entry, bool) or not isinstance(entry, (int, float, Mapping)):
      raise ValueError(
        f"epitomize: policy for layer '{layer.name}' must be a compression "
        f"ratio, a dict of epitome arguments or None; got {entry!r}"
      )
    if isinstance(entry, Mapping):
      unknown = sorted(set(entry) - set(POLICY_KEYS))
      if unknown:
        raise ValueError(
          f"epitomize: policy for layer '{layer.name}' has unknown "
          f"argument(s) {unknown}; valid: {', '.join(POLICY_KEYS)}"
        )
      if "epitome_shape" in entry and entry["epitome_shape"] is not None:
        kwargs.pop("compression", None)
      kwargs.update(entry)
    else:
      kwargs["compression"] = float(entry)
  shape = _kernel_shape(layer) if layer.built else None
  if not explicit and shape is not None and math.prod(shape) < min_params:
    return (
      None,
      f"kernel has {math.prod(shape)} entries < min_params={min_params}",
      explicit,
    )
  return kwargs, "", explicit


def _epitome_config(layer, kwargs) -> Dict[str, Any]:
  config = layer.get_config()
  for key in POLICY_KEYS:
    config.pop(key, None)
  for key, value in kwargs.items():
    if value is not None:
      config[key] = value
  if config.get("epitome_shape") is not None:
    config.pop("compression", None)
  return config


def _check_geometry(kernel_shape, kwargs):
  """Raises the ValueError the epitome layer's build would raise, if any."""
  sampling.layer_geometry(
    kernel_shape, kwargs.get("compression"), kwargs.get("epitome_shape")
  )


def _fit_layer(old, new) -> float:
  """Sets ``new``'s epitome to the least-squares fit of ``old``'s kernel."""
  kernel = old.kernel.numpy()
  geometry = new.epitome_geometry
  routing = new.routing_map
  rounded = sampling.RoutingMap(*(np.round(np.asarray(r)) for r in routing))
  epitome = sampling.fit_epitome(kernel, rounded, geometry, fill=new.epitome.numpy())
  new.epitome.assign(epitome.astype(new.epitome.dtype.as_numpy_dtype))
  fitted = new.kernel.numpy()
  norm = float(np.linalg.norm(kernel))
  return float(np.linalg.norm(fitted - kernel) / max(norm, 1e-12))


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
  if init not in INITS:
    raise ValueError(f"epitomize: unknown init {init!r}; valid: {', '.join(INITS)}")
  if init == "fit" and not model.built:
    raise ValueError(
      f"epitomize: init='fit' needs a built model with trained weights; "
      f"model '{model.name}' is not built (call it on data or give it an "
      "Input), or use init='random'"
    )
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
  # The global settings must be valid: only a per-layer misfit (a ratio too
  # large for one kernel) may leave a layer stock.
  spec.check_epitome_args(
    "epitomize",
    compression=compression,
    sampler=sampler,
    learner=learner,
    spatial_stride=spatial_stride,
    offset_scale=offset_scale,
    require_one=False,
  )
  names = {layer.name for layer in walk.iter_layers(model)}
  missing = sorted(set(skip) - names)
  if isinstance(policy, Mapping):
    missing += sorted(set(policy) - names)
  if missing:
    raise ValueError(
      f"epitomize: policy/skip name(s) {missing} match no layer of model "
      f"'{model.name}'; its layers are {sorted(names)}"
    )
  defaults = dict(
    compression=compression,
    sampler=sampler,
    learner=learner,
    spatial_stride=spatial_stride,
    offset_scale=offset_scale,
  )
  skip = set(skip)
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
  if not layer.built or layer.epitome is None:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}' is not built yet; call it on an "
      "input before materializing it"
    )
  config = layer.get_config()
  for key in POLICY_KEYS:
    config.pop(key, None)
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


@dataclasses.dataclass
class LayerSummary:
  """One kernel layer in :func:`summarize`.

  Attributes:
    name: layer name.
    class_name: layer class.
    kernel_shape: shape of the (sampled or stock) kernel.
    epitome_shape: the epitome's shape (``None`` for a stock layer).
    sampler: ``"learned/param"``, ``"learned/feature"``, ``"fixed"`` or
      ``"stock"``.
    compression_ratio: kernel size over stored size (1 for a stock layer).
    kernel_params: entries of the full kernel.
    stored_params: entries stored for the kernel (epitome plus routing map;
      the kernel for a stock layer). Biases are not included.
    output_positions: output positions per example, summed over call sites.
    macs_materialized: multiply-adds per example of the stock/materialized
      form.
    macs_factored: multiply-adds per example of the factored form (equal to
      ``macs_materialized`` for a stock layer).
  """

  name: str
  class_name: str
  kernel_shape: Tuple[int, ...]
  epitome_shape: Optional[Tuple[int, ...]]
  sampler: str
  compression_ratio: float
  kernel_params: int
  stored_params: int
  output_positions: int
  macs_materialized: int
  macs_factored: int


@dataclasses.dataclass
class ModelSummary:
  """What :func:`summarize` returns: per-layer records and the model's totals.

  Attributes:
    layers: one :class:`LayerSummary` per Conv/Dense or epitome layer.
    total_params: ``model.count_params()`` (everything stored, offsets and
      learners included).
    stock_params: what the model would hold with stock kernels.
    compression_ratio: ``stock_params / total_params``.
    macs_materialized: summed over the layers listed, per example.
    macs_factored: summed over the layers listed, per example.
  """

  layers: List[LayerSummary]
  total_params: int
  stock_params: int
  compression_ratio: float
  macs_materialized: int
  macs_factored: int


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
      g = layer.epitome_geometry
      sampler = layer.sampler
      if sampler == "learned":
        sampler += "/" + layer.learner
      macs = g.macs_per_position()
      positions = _output_positions(outer, owner)
      stored = g.stored_size
      record = LayerSummary(
        layer.name,
        type(layer).__name__,
        g.kernel_shape,
        g.epitome_shape,
        sampler,
        g.compression_ratio,
        g.kernel_size,
        stored,
        positions,
        macs["stock"] * positions,
        macs["factored"] * positions,
      )
      extra = sum(int(np.prod(w.shape)) for w in layer.weights) - int(
        np.prod(layer.bias.shape) if layer.use_bias else 0
      )
      stock_params += g.kernel_size - extra
    elif type(layer) in epitome_layers.STOCK_TO_EPITOME and layer.built:
      shape = _kernel_shape(layer)
      size = int(np.prod(shape))
      positions = _output_positions(outer, owner)
      record = LayerSummary(
        layer.name,
        type(layer).__name__,
        shape,
        None,
        "stock",
        1.0,
        size,
        size,
        positions,
        size * positions,
        size * positions,
      )
    else:
      continue
    records.append(record)
  summary = ModelSummary(
    records,
    total,
    stock_params,
    stock_params / max(total, 1),
    sum(r.macs_materialized for r in records),
    sum(r.macs_factored for r in records),
  )
  if print_fn is not None:
    _print_summary(model, summary, print_fn)
  return summary


def _fmt_shape(shape) -> str:
  return "-" if shape is None else "x".join(str(d) for d in shape)


def _print_summary(model, summary: ModelSummary, print_fn):
  header = (
    "Layer (type)",
    "Kernel",
    "Epitome",
    "Sampler",
    "Ratio",
    "Stored",
    "MACs mat.",
    "MACs fact.",
  )
  rows = [
    (
      f"{r.name} ({r.class_name})",
      _fmt_shape(r.kernel_shape),
      _fmt_shape(r.epitome_shape),
      r.sampler,
      f"{r.compression_ratio:.2f}",
      f"{r.stored_params:,}",
      f"{r.macs_materialized:,}",
      f"{r.macs_factored:,}",
    )
    for r in summary.layers
  ]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
  line_len = sum(widths) + 2 * (len(widths) - 1)

  def fmt(cols):
    left = [str(c).ljust(w) for c, w in zip(cols[:4], widths[:4], strict=True)]
    right = [str(c).rjust(w) for c, w in zip(cols[4:], widths[4:], strict=True)]
    return "  ".join(left + right)

  print_fn(f'Epitome summary: "{model.name}"')
  print_fn("_" * line_len)
  print_fn(fmt(header))
  print_fn("=" * line_len)
  for row in rows:
    print_fn(fmt(row))
  print_fn("=" * line_len)
  print_fn(
    f"Total params: {summary.total_params:,} (stock kernels: "
    f"{summary.stock_params:,}, {summary.compression_ratio:.2f}x smaller)"
  )
  mac_ratio = summary.macs_materialized / max(summary.macs_factored, 1)
  print_fn(
    f"MACs per example: materialized {summary.macs_materialized:,}, "
    f"factored {summary.macs_factored:,} ({mac_ratio:.2f}x fewer)"
  )
  print_fn("_" * line_len)


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
