"""The epitome arguments and their validation: one place for every check.

Layers (:class:`~keras_epitome.layers.EpitomeMixin`), the model transform
(:func:`~keras_epitome.transform.epitomize`), the ratio rule
(:func:`~keras_epitome.sampling.epitome_shape_for_ratio`) and the TF-MOT
compressor (:class:`~keras_epitome.compression_algorithms.EpitomeCompressor`)
all take the same arguments; they validate them here, so a value is accepted
or refused the same way, with the same message, wherever it is given.

Every function takes ``desc``, the name of what is being configured (a layer
``"EpitomeConv2D 'conv3'"``, ``"epitomize"``...), and raises ``ValueError``
naming it, the value and what is valid.

Example:
  >>> check_compression(4, "epitomize")
  4.0
  >>> check_compression(0, "epitomize")
  Traceback (most recent call last):
  ...
  ValueError: epitomize: compression must be a finite number >= 1, got 0
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

SAMPLERS = ("learned", "fixed")
LEARNERS = ("param", "feature")
# How a layer computes its training step (keras_epitome.factored_training).
TRAIN_FORMS = ("auto", "kernel", "factored")
# The keyword arguments an epitome layer adds to its stock layer (what the
# transform's policies may set, and what a stock config lacks).
EPITOME_ARGS = (
  "compression",
  "epitome_shape",
  "sampler",
  "learner",
  "spatial_stride",
  "offset_scale",
  "routing_momentum",
  "channel_roll",
  "train_form",
)


# Each epitome argument's default and annotation: the keyword-only arguments
# both layer families add to their stock layer (spec.merged_signature).
EPITOME_DEFAULTS = {
  "compression": None,
  "epitome_shape": None,
  "sampler": "learned",
  "learner": "param",
  "spatial_stride": None,
  "offset_scale": 1.0,
  "routing_momentum": 0.99,
  "channel_roll": 1,
  "train_form": "auto",
}
_EPITOME_ANNOTATIONS = {
  "compression": "Optional[float]",
  "epitome_shape": "Optional[Sequence[int]]",
  "sampler": "str",
  "learner": "str",
  "spatial_stride": "Union[None, int, Sequence[int]]",
  "offset_scale": "float",
  "routing_momentum": "float",
  "channel_roll": "int",
  "train_form": "str",
}
# The variables and sublayers an epitome layer creates in build (None before).
LAYER_STATE = (
  "epitome",
  "in_offsets",
  "out_offsets",
  "spatial_offsets",
  "moving_offsets",
  "offset_learner",
  "_geometry",
)


def is_real(value) -> bool:
  """A real number (NumPy scalars too), not a bool."""
  return not isinstance(value, (bool, np.bool_)) and isinstance(
    value, (int, float, np.integer, np.floating)
  )


def _prefix(desc: str) -> str:
  return f"{desc}: " if desc else ""


def check_compression(value, desc: str = "") -> float:
  """A compression ratio: a finite real number ``>= 1`` (NumPy scalars too).

  Returns:
    The ratio as a Python float.
  """
  if not is_real(value) or not math.isfinite(float(value)) or float(value) < 1:
    raise ValueError(
      f"{_prefix(desc)}compression must be a finite number >= 1, got {value!r}"
    )
  return float(value)


def check_positive(value, name: str, desc: str = "") -> float:
  """Argument ``name``: a finite real number ``> 0`` (NumPy scalars too).

  Returns:
    The value as a Python float.
  """
  if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
    raise ValueError(
      f"{_prefix(desc)}{name} must be a finite number > 0, got {value!r}"
    )
  return float(value)


def check_offset_scale(value, desc: str = "") -> float:
  """``offset_scale``: a finite real number ``> 0`` (NumPy scalars too)."""
  return check_positive(value, "offset_scale", desc)


def check_fraction(value, name: str, desc: str = "") -> float:
  """Argument ``name``: a real number in ``[0, 1)`` (NumPy scalars too).

  Returns:
    The value as a Python float.
  """
  if not is_real(value) or not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{_prefix(desc)}{name} must be a number in [0, 1), got {value!r}")
  return float(value)


def check_routing_momentum(value, desc: str = "") -> float:
  """``routing_momentum``: a real number in ``[0, 1)``."""
  return check_fraction(value, "routing_momentum", desc)


def check_channel_roll(value, desc: str = "") -> int:
  """``channel_roll``: an int ``>= 0`` (NumPy integers too, not bools)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{_prefix(desc)}channel_roll must be an int >= 0, got {value!r}")
  return int(value)


def check_train_form(value, desc: str = "") -> str:
  """``train_form``: one of :data:`TRAIN_FORMS`."""
  if value not in TRAIN_FORMS:
    raise ValueError(
      f"{_prefix(desc)}unknown train_form {value!r}; valid: {', '.join(TRAIN_FORMS)}"
    )
  return value


def check_sampler(sampler, learner, desc: str = "") -> Tuple[str, str]:
  """``sampler`` and ``learner``: known names, and a learner only when learned."""
  if sampler not in SAMPLERS:
    raise ValueError(
      f"{_prefix(desc)}unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}"
    )
  if learner not in LEARNERS:
    raise ValueError(
      f"{_prefix(desc)}unknown learner {learner!r}; valid: {', '.join(LEARNERS)}"
    )
  if sampler == "fixed" and learner != "param":
    raise ValueError(
      f"{_prefix(desc)}learner={learner!r} needs sampler='learned'; the fixed "
      "sampler has no learner (leave learner='param')"
    )
  return sampler, learner


def as_int(value) -> Optional[int]:
  """``value`` as an int if it is an integer value, else ``None``.

  Ints and NumPy integers, and floats with an integral value (``3.0``, as
  JSON or NumPy arithmetic may give them); not bools, strings, ``3.7``, NaN.
  """
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return int(value)
  return None


def int_tuple(value, what: str, desc: str = "") -> Tuple[int, ...]:
  """An int or a sequence of integer values, as a tuple of ints.

  Non-integer entries (``3.7``, ``"3"``, ``True``, ``None``) are refused
  naming the entry, never truncated or parsed.
  """
  single = as_int(value)
  if single is not None:
    return (single,)
  try:
    if isinstance(value, (str, bytes, dict)):
      raise TypeError
    entries = list(value)
  except TypeError:
    raise ValueError(
      f"{_prefix(desc)}{what} must be an int or a tuple of ints, got {value!r}"
    ) from None
  out = []
  for i, v in enumerate(entries):
    entry = as_int(v)
    if entry is None:
      raise ValueError(
        f"{_prefix(desc)}{what} entry {i} is {v!r}; entries must be integers "
        f"(got {what}={value!r})"
      )
    out.append(entry)
  return tuple(out)


def check_channels(kernel_shape: Sequence[int], desc: str = "") -> Tuple[int, ...]:
  """A kernel shape ``(*S, Cin, Cout)`` an epitome can be cut from.

  Every entry a positive integer: at least one input channel (the layer's
  input has channels) and one output channel (``units``/``filters >= 1``).

  Returns:
    The shape as a tuple of ints.
  """
  shape = int_tuple(kernel_shape, "kernel shape", desc)
  if len(shape) < 2:
    raise ValueError(
      f"{_prefix(desc)}kernel shape {shape} must have at least 2 axes (Cin, Cout)"
    )
  for size, what in (
    (shape[-2], "input channels (the input's last axis)"),
    (shape[-1], "output channels (units or filters)"),
  ):
    if size < 1:
      raise ValueError(
        f"{_prefix(desc)}kernel shape {shape} has {size} {what}; an epitome "
        "layer needs at least 1 input and 1 output channel"
      )
  if any(d < 1 for d in shape[:-2]):
    raise ValueError(
      f"{_prefix(desc)}kernel shape {shape} must have a spatial window of "
      "positive sizes"
    )
  return shape


def check_units(value, name: str, desc: str = "") -> int:
  """``units``/``filters`` of an epitome layer: an integer ``>= 1``."""
  units = as_int(value)
  if units is None or units < 1:
    raise ValueError(
      f"{_prefix(desc)}{name} must be an integer >= 1 (an epitome needs at "
      f"least one output channel), got {value!r}"
    )
  return units


def check_epitome_shape(value, kernel_rank: Optional[int], desc: str = ""):
  """An explicit ``(*S_E, Cin_E, Cout_E)``: positive ints, ``kernel_rank + 2`` of them."""
  shape = int_tuple(value, "epitome_shape", desc)
  if kernel_rank is not None and len(shape) != kernel_rank + 2:
    expected = kernel_rank + 2
    raise ValueError(
      f"{_prefix(desc)}epitome_shape {shape} must have {expected} entries "
      f"({'S_E..., ' if expected > 2 else ''}Cin_E, Cout_E)"
    )
  if any(d <= 0 for d in shape):
    raise ValueError(f"{_prefix(desc)}epitome_shape {shape} must have positive sizes")
  return shape


def check_spatial_stride(value, kernel_rank: Optional[int], desc: str = ""):
  """``spatial_stride``: ``None``, or ints ``>= 0``, one per spatial axis."""
  if value is None:
    return None
  stride = int_tuple(value, "spatial_stride", desc)
  if kernel_rank is not None:
    if len(stride) == 1:
      stride = stride * max(kernel_rank, 1)
    if len(stride) != kernel_rank:
      raise ValueError(
        f"{_prefix(desc)}spatial_stride {stride} must have one entry per "
        f"spatial axis ({kernel_rank})"
      )
  if any(s < 0 for s in stride):
    raise ValueError(f"{_prefix(desc)}spatial_stride {stride} must be >= 0")
  return stride


def check_epitome_args(
  desc: str,
  kernel_rank: Optional[int] = None,
  *,
  compression=None,
  epitome_shape=None,
  sampler: str = "learned",
  learner: str = "param",
  spatial_stride=None,
  offset_scale=1.0,
  routing_momentum=0.99,
  channel_roll=1,
  train_form="auto",
  require_one: bool = True,
) -> Dict[str, Any]:
  """Validates the epitome arguments together and returns them normalized.

  Args:
    desc: what is configured (prefix of every message).
    kernel_rank: spatial axes of the kernel (0 Dense, 1 Conv1D, 2 Conv2D), or
      ``None`` when not known yet (the rank-dependent checks are skipped).
    compression, epitome_shape, sampler, learner, spatial_stride,
      offset_scale, routing_momentum, channel_roll, train_form: see
      :class:`~keras_epitome.layers.EpitomeMixin`.
    require_one: exactly one of ``compression``/``epitome_shape`` must be
      given (a layer); ``False`` allows both (defaults a policy may override).

  Returns:
    A dict with the :data:`EPITOME_ARGS` keys: ``compression`` and the
    scales as floats, shapes and strides as tuples of ints.

  Raises:
    ValueError: naming ``desc``, the value and what is valid.
  """
  if require_one and compression is None and epitome_shape is None:
    raise ValueError(
      f"{_prefix(desc)}give compression= (a ratio >= 1) or epitome_shape= "
      "(*S_E, Cin_E, Cout_E)"
    )
  if require_one and compression is not None and epitome_shape is not None:
    raise ValueError(
      f"{_prefix(desc)}give compression= or epitome_shape=, not both (got "
      f"compression={compression!r}, epitome_shape={epitome_shape!r})"
    )
  check_sampler(sampler, learner, desc)
  return dict(
    compression=None if compression is None else check_compression(compression, desc),
    epitome_shape=None
    if epitome_shape is None
    else check_epitome_shape(epitome_shape, kernel_rank, desc),
    sampler=sampler,
    learner=learner,
    spatial_stride=check_spatial_stride(spatial_stride, kernel_rank, desc),
    offset_scale=check_offset_scale(offset_scale, desc),
    routing_momentum=check_routing_momentum(routing_momentum, desc),
    channel_roll=check_channel_roll(channel_roll, desc),
    train_form=check_train_form(train_form, desc),
  )


def check_stored_size(geometry, desc: str = "") -> None:
  """Refuses an epitome whose stored size (routing map included) exceeds the kernel.

  An epitome as large as the kernel (``compression=1``) is allowed: only its
  routing map makes it larger, and it reproduces the kernel exactly.

  Args:
    geometry: an :class:`~keras_epitome.sampling.EpitomeGeometry`.
    desc: what is configured.
  """
  if geometry.compression_ratio < 1 and geometry.epitome_shape != geometry.kernel_shape:
    raise ValueError(
      f"{_prefix(desc)}epitome shape {geometry.epitome_shape} plus its routing "
      f"map ({geometry.routing_size} offsets) is larger than the kernel "
      f"{geometry.kernel_shape} (ratio {geometry.compression_ratio:.3f} < 1)"
    )


def check_finite_offsets(arrays: Sequence, desc: str = "") -> None:
  """Refuses a routing map holding NaN or infinite offsets (a diverged model)."""
  names = ("in_offsets", "out_offsets", "spatial_offsets")
  for name, arr in zip(names, arrays, strict=False):
    if arr is None:
      continue
    arr = np.asarray(arr, np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
      raise ValueError(
        f"{_prefix(desc)}routing map {name} holds non-finite offsets "
        f"{arr[~np.isfinite(arr)][:4].tolist()}; offsets must be finite (a "
        "NaN offset usually means training diverged)"
      )


def epitome_config(layer) -> Dict[str, Any]:
  """The epitome arguments of a layer, as its ``get_config`` stores them.

  Sequences (``epitome_shape``, ``spatial_stride``) become lists; unset ones
  ``None``. Both the Keras 2 and the Keras 3 layers add this to the stock
  layer's config.

  Example:
    >>> import types
    >>> layer = types.SimpleNamespace(compression=4.0, epitome_shape=None,
    ...   sampler="learned", learner="param", spatial_stride=(1, 1),
    ...   offset_scale=1.0, routing_momentum=0.99, channel_roll=1,
    ...   train_form="auto")
    >>> epitome_config(layer)["spatial_stride"]
    [1, 1]
  """
  config = {key: getattr(layer, key) for key in EPITOME_ARGS}
  for key in ("epitome_shape", "spatial_stride"):
    config[key] = list(config[key]) if config[key] else None
  return config


def pop_epitome_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
  """Removes the epitome arguments from a layer's ``kwargs``; returns them.

  Arguments not given get their default (:data:`EPITOME_DEFAULTS`); what
  stays in ``kwargs`` is for the stock layer.

  Example:
    >>> kwargs = {"units": 8, "compression": 4}
    >>> pop_epitome_args(kwargs)["compression"], kwargs
    (4, {'units': 8})
  """
  return {key: kwargs.pop(key, default) for key, default in EPITOME_DEFAULTS.items()}


def init_epitome_layer(layer, kernel_rank: int, epitome_kwargs, desc: str) -> None:
  """The epitome part of a layer's ``__init__``, after the stock layer's.

  Checks the epitome arguments (:func:`check_epitome_args`) and the layer's
  ``data_format``, sets each argument as an attribute and the variables
  built later (:data:`LAYER_STATE`) to ``None``.

  Raises:
    ValueError: naming ``desc``, for a bad argument or a ``channels_first``
      layer.
  """
  epitome_args = check_epitome_args(desc, kernel_rank, **epitome_kwargs)
  data_format = getattr(layer, "data_format", "channels_last")
  if data_format != "channels_last":
    raise ValueError(
      f"{desc}: data_format={data_format!r} is not supported; "
      "epitome layers take channels_last inputs"
    )
  for name, value in epitome_args.items():
    setattr(layer, name, value)
  for name in LAYER_STATE:
    setattr(layer, name, None)


def merged_signature(stock_init) -> inspect.Signature:
  """A stock layer's signature plus the epitome keyword arguments.

  An epitome layer's ``__init__`` forwards ``*args, **kwargs`` to the stock
  layer, less the epitome arguments (:func:`pop_epitome_args`), so the layer
  accepts exactly this; publishing it lets ``inspect.signature`` (IDEs, the
  argument-parity test) see every stock argument and every epitome argument
  with its default.

  Args:
    stock_init: the stock layer's ``__init__``.
  """
  stock = inspect.signature(stock_init)
  var_kw = inspect.Parameter.VAR_KEYWORD
  params = [
    p for p in stock.parameters.values() if p.name != "self" and p.kind != var_kw
  ]
  params += [
    inspect.Parameter(
      name,
      inspect.Parameter.KEYWORD_ONLY,
      default=default,
      annotation=_EPITOME_ANNOTATIONS[name],
    )
    for name, default in EPITOME_DEFAULTS.items()
  ]
  params += [p for p in stock.parameters.values() if p.kind == var_kw]
  return stock.replace(parameters=params)


# What ``export_tflite`` may quantize to (both Keras versions).
QUANTIZATIONS = (None, "dynamic", "int8")


def check_batch_size(batch_size, caller: str = "export_tflite") -> None:
  """Raises unless ``batch_size`` is ``None`` (dynamic) or an int >= 1 (not a bool).

  A file with batch 0 converts but LiteRT cannot run it.
  """
  if batch_size is None:
    return
  if (
    isinstance(batch_size, bool)
    or not isinstance(batch_size, (int, np.integer))
    or batch_size < 1
  ):
    raise ValueError(
      f"{caller}: batch_size must be None (dynamic) or an integer >= 1, got "
      f"{batch_size!r}"
    )


def check_export_args(
  quantize, representative_data, batch_size, caller: str = "export_tflite"
) -> Optional[int]:
  """``export_tflite``'s ``quantize``, ``representative_data`` and ``batch_size``.

  Returns:
    ``batch_size`` as a Python int, or ``None`` (a dynamic batch).

  Example:
    >>> check_export_args("int8", None, 1)
    Traceback (most recent call last):
    ...
    ValueError: quantize='int8' needs representative_data (sample inputs to calibrate the activation ranges)
  """
  if quantize not in QUANTIZATIONS:
    raise ValueError(
      f"quantize must be one of None, 'dynamic', 'int8', got {quantize!r}"
    )
  if quantize == "int8" and representative_data is None:
    raise ValueError(
      "quantize='int8' needs representative_data (sample inputs to calibrate "
      "the activation ranges)"
    )
  check_batch_size(batch_size, caller)
  return None if batch_size is None else int(batch_size)
