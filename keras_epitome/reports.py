"""The records of a conversion and of a summary, and the rules behind them.

What :func:`keras_epitome.epitomize` and :func:`keras_epitome.summarize`
return (and their Keras 3 twins in :mod:`keras_epitome.keras3`), the policy
rule that picks each layer's epitome arguments, the config of the epitome
layer that replaces a stock one, and the printed summary table. One
statement for both Keras versions: this module imports neither TensorFlow nor
Keras (it reads layers through ``name``, ``built``, ``kernel``,
``get_config`` and the epitome layers' attributes).

Example:
  >>> report = EpitomeReport(
  ...     [ConvertedLayer("conv", (3, 3, 64, 64), (3, 3, 32, 32), 3.99, "fit", 0.25)],
  ...     [KeptLayer("stem", "Conv2D", "kernel has 288 entries < min_params=1024")])
  >>> print(report)
  epitomize: 1 layer(s) converted
    conv: (3, 3, 64, 64) -> (3, 3, 32, 32) (3.99x, init=fit, fit error 0.250)
  epitomize: 1 kernel layer(s) kept stock
    stem (Conv2D): kernel has 288 entries < min_params=1024
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_epitome import spec

# Arguments a policy entry may set for one layer.
POLICY_KEYS = spec.EPITOME_ARGS
# How ``epitomize`` starts an epitome (``init=``).
INITS = ("auto", "fit", "random")
DEFAULT_MIN_PARAMS = 1024
# Layers that hold a kernel-like weight but have no epitome twin yet; they are
# reported when left alone (layers without such a weight are not listed).
KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")

PolicyValue = Union[None, float, int, Mapping[str, Any]]
Policy = Union[None, Mapping[str, PolicyValue], Callable[[Any], PolicyValue]]


# ----------------------------------------------------------------------------
# The conversion report.


@dataclasses.dataclass
class ConvertedLayer:
  """A layer ``epitomize`` replaced (Keras 2 or Keras 3).

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
  """A kernel layer ``epitomize`` left as it was, and why."""

  name: str
  class_name: str
  reason: str


@dataclasses.dataclass
class EpitomeReport:
  """What ``epitomize`` did; available as ``model.epitome_report``.

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
# The conversion rules.


def kernel_shape(layer) -> Optional[Tuple[int, ...]]:
  """The shape of a built layer's ``kernel``; ``None`` if unbuilt or kernel-less."""
  if not layer.built:
    return None
  kernel = getattr(layer, "kernel", None)
  if kernel is None:
    return None
  return tuple(int(d) for d in kernel.shape)


def resolve_policy(layer, policy: Policy, defaults: Mapping[str, Any], min_params: int):
  """The epitome arguments ``epitomize`` gives a supported layer.

  Args:
    layer: a stock ``Conv1D``, ``Conv2D`` or ``Dense`` (either Keras).
    policy: ``epitomize``'s ``policy``: ``None``, a mapping from layer names,
      or a callable taking the layer; an entry is a compression ratio, a dict
      of epitome arguments (:data:`POLICY_KEYS`) or ``None`` (keep the layer).
    defaults: the arguments of every layer the policy does not name.
    min_params: a layer the policy does not name stays stock when its kernel
      has fewer entries.

  Returns:
    ``(kwargs or None, reason, explicit)``: the layer's arguments (``None``
    to keep it stock, then ``reason`` says why) and whether the policy named
    the layer.

  Raises:
    ValueError: for a policy entry of the wrong type or with unknown keys.

  Example:
    >>> import types
    >>> layer = types.SimpleNamespace(name="d", built=True,
    ...                               kernel=np.zeros((16, 16)))
    >>> resolve_policy(layer, None, {"compression": 4.0}, 1024)
    (None, 'kernel has 256 entries < min_params=1024', False)
    >>> resolve_policy(layer, {"d": 2}, {"compression": 4.0}, 1024)
    ({'compression': 2.0}, '', True)
  """
  entry, explicit = None, False
  if callable(policy) and not isinstance(policy, Mapping):
    entry, explicit = policy(layer), True
  elif policy is not None and layer.name in policy:
    entry, explicit = policy[layer.name], True
  if explicit and entry is None:
    return None, "policy returned None", explicit
  kwargs = dict(defaults)
  if explicit:
    if isinstance(entry, bool) or not isinstance(
      entry, (int, float, np.integer, np.floating, Mapping)
    ):
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
      if entry.get("epitome_shape") is not None:
        kwargs.pop("compression", None)
      kwargs.update(entry)
    else:
      kwargs["compression"] = float(entry)
  shape = kernel_shape(layer)
  if not explicit and shape is not None and math.prod(shape) < min_params:
    return (
      None,
      f"kernel has {math.prod(shape)} entries < min_params={min_params}",
      explicit,
    )
  return kwargs, "", explicit


def epitome_config(
  layer, kwargs: Mapping[str, Any], dropped: Sequence[str] = ()
) -> Dict[str, Any]:
  """The config of the epitome layer that replaces the stock ``layer``.

  The stock config without epitome arguments (and without ``dropped`` keys,
  such as Keras 3's ``lora_rank``), plus every argument of ``kwargs`` that is
  not ``None``; an ``epitome_shape`` drops ``compression``.

  Example:
    >>> import types
    >>> layer = types.SimpleNamespace(get_config=lambda: {"units": 8, "lora_rank": None})
    >>> epitome_config(layer, {"compression": 4.0, "epitome_shape": None},
    ...                dropped=("lora_rank",))
    {'units': 8, 'compression': 4.0}
  """
  config = layer.get_config()
  for key in tuple(POLICY_KEYS) + tuple(dropped):
    config.pop(key, None)
  for key, value in kwargs.items():
    if value is not None:
      config[key] = value
  if config.get("epitome_shape") is not None:
    config.pop("compression", None)
  return config


def check_init(init, model) -> None:
  """``epitomize``'s ``init``: one of :data:`INITS`; ``"fit"`` needs a built model."""
  if init not in INITS:
    raise ValueError(f"epitomize: unknown init {init!r}; valid: {', '.join(INITS)}")
  if init == "fit" and not model.built:
    raise ValueError(
      f"epitomize: init='fit' needs a built model with trained weights; "
      f"model '{model.name}' is not built (call it on data or give it an "
      "Input), or use init='random'"
    )


def check_min_params(value) -> int:
  """``epitomize``'s ``min_params``: an int >= 0 (NumPy integers too, not bools)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"epitomize: min_params must be an int >= 0, got {value!r}")
  return int(value)


def check_defaults(**epitome_args) -> Dict[str, Any]:
  """``epitomize``'s global epitome arguments, checked; returns them as a dict.

  They must be valid for every layer: only a per-layer misfit (a ratio too
  large for one kernel) may leave a layer stock.
  """
  spec.check_epitome_args("epitomize", require_one=False, **epitome_args)
  return dict(epitome_args)


def check_layer_names(model, names, skip, policy) -> set:
  """Checks that ``skip`` and a policy mapping name layers of ``model``.

  Args:
    model: the model converted (for its ``name``).
    names: the names of its layers.
    skip: layer names to keep stock (one name as a string too).
    policy: ``epitomize``'s policy: ``None``, a mapping or a callable.

  Returns:
    ``skip`` as a set.

  Raises:
    ValueError: for a name that matches no layer, or a policy that is neither
      a mapping nor a callable.
  """
  if isinstance(skip, str):
    skip = (skip,)
  missing = sorted(set(skip) - set(names))
  if isinstance(policy, Mapping):
    missing += sorted(set(policy) - set(names))
  elif policy is not None and not callable(policy):
    raise ValueError(
      "epitomize: policy must be a dict {layer name: ratio, dict or None} or "
      f"a callable layer -> value; got {type(policy).__name__}"
    )
  if missing:
    raise ValueError(
      f"epitomize: policy/skip name(s) {missing} match no layer of model "
      f"'{model.name}'; its layers are {sorted(names)}"
    )
  return set(skip)


def stock_config(layer) -> Dict[str, Any]:
  """The config of the stock layer that materializes a built epitome ``layer``.

  Raises:
    ValueError: if the layer is not built.
  """
  if not layer.built or layer.epitome is None:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}' is not built yet; call it on an "
      "input before materializing it"
    )
  config = layer.get_config()
  for key in POLICY_KEYS:
    config.pop(key, None)
  return config


# ----------------------------------------------------------------------------
# The summary.


@dataclasses.dataclass
class LayerSummary:
  """One kernel layer in ``summarize`` (Keras 2 or Keras 3).

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
  """What ``summarize`` returns: per-layer records and the model's totals.

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


def epitome_layer_summary(layer, positions: int) -> LayerSummary:
  """The :class:`LayerSummary` of a built epitome layer with ``positions`` outputs."""
  g = layer.epitome_geometry
  sampler = layer.sampler
  if sampler == "learned":
    sampler += "/" + layer.learner
  macs = g.macs_per_position()
  return LayerSummary(
    layer.name,
    type(layer).__name__,
    g.kernel_shape,
    g.epitome_shape,
    sampler,
    g.compression_ratio,
    g.kernel_size,
    g.stored_size,
    positions,
    macs["stock"] * positions,
    macs["factored"] * positions,
  )


def stock_layer_summary(layer, shape: Tuple[int, ...], positions: int) -> LayerSummary:
  """The :class:`LayerSummary` of a stock layer with kernel ``shape``."""
  size = int(np.prod(shape))
  return LayerSummary(
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


def stock_params_change(layer) -> int:
  """How many more parameters the epitome ``layer`` would hold with a stock kernel.

  Its kernel's size less everything it stores but the bias (epitome, routing
  map, offset learner).
  """
  stored = sum(int(np.prod(w.shape)) for w in layer.weights)
  if layer.use_bias:
    stored -= int(np.prod(layer.bias.shape))
  return layer.epitome_geometry.kernel_size - stored


def model_summary(
  records: List[LayerSummary], total_params: int, stock_params: int
) -> ModelSummary:
  """The :class:`ModelSummary` of ``records`` (MACs summed over them)."""
  return ModelSummary(
    records,
    total_params,
    stock_params,
    stock_params / max(total_params, 1),
    sum(r.macs_materialized for r in records),
    sum(r.macs_factored for r in records),
  )


def fmt_shape(shape) -> str:
  return "-" if shape is None else "x".join(str(d) for d in shape)


def print_summary(model, summary: ModelSummary, print_fn):
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
      fmt_shape(r.kernel_shape),
      fmt_shape(r.epitome_shape),
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
