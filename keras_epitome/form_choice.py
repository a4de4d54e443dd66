"""Which inference form each epitome layer exports as: factored remixes or stock.

The factored form (:mod:`keras_epitome.factored`) saves multiply-adds, but its
channel remixes cost ops of their own, and on LiteRT an op over an activation
costs about as much as thousands of multiply-adds (more in int8, where each
elementwise op requantizes). So per layer the fastest form depends on the
width, the spatial size, the chunks and offsets, and the precision. For every
epitome layer, :func:`choose_layer_form` builds the candidates

* ``"slices"``: factored, remixes as static slices and blends (smallest file);
* ``"matmul"``: factored, remixes as two 1x1 convolutions;
* ``"fold_slices"`` / ``"fold_matmul"``: factored with ``R_out`` folded into
  one ``(*S, Cin_E, Cout)`` kernel (``R_in`` as slices / a 1x1 convolution):
  with a channel roll or spatial windows each output chunk needs its own
  epitome convolution, and these run them all as one;
* ``"materialized"``: the stock layer holding the sampled kernel (a following
  BatchNorm folded into its kernel and bias);

and picks one, by

* ``choose="cost"`` (default): a latency model of LiteRT (XNNPACK, 1 thread)
  over the candidate's graph: ``mac * multiply-adds + elem * elements written
  by the other ops + op * ops``, with constants per precision from a
  :class:`keras_epitome.cost_model.CostModel`: by default this host's
  calibration (:func:`keras_epitome.cost_model.calibrate`, run once and
  cached), or a table measured on the target device (``cost_model=``), or
  the bundled constants with a safety margin (a factored form replaces the
  stock layer only when estimated faster by that margin); or
* ``choose="measure"``: converting each candidate as a one-layer model and
  timing it with LiteRT (interleaved, median), at the cost of a few seconds of
  export time per layer.

With ``objective="latency"`` (default) each layer takes its fastest form, so
a layer whose factored forms are not faster than its stock layer is stored
full size: when that makes the file notably larger than the smallest form
would, :func:`factorize` logs a warning saying so and how to get the small
file (``objective="size"``: per layer the form with the fewest estimated
file bytes, its weights and its ops, whatever its latency).

Each choice is recorded as a :class:`FormChoice` (the estimate or time of
every candidate, and the cost model that made it), logged at INFO level, and
returned through ``form_report=`` of :func:`keras_epitome.export_tflite` and
:func:`keras_epitome.factorize`.

Example:
  >>> model = keras.Sequential([
  ...     keras.Input((16, 16, 32)), ke.EpitomeConv2D(32, 3, compression=4)])
  >>> report = []
  >>> tflite = ke.export_tflite(model, form_report=report, cost_model="bundled")
  >>> report[0].form in CANDIDATES, sorted(report[0].estimates_us)
  (True, ['fold_matmul', 'fold_slices', 'materialized', 'matmul', 'slices'])
  >>> report[0].cost_model.startswith("bundled constants fitted on")
  True
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_epitome import cost_model as cost_model_lib
from keras_epitome import factored, factored_model, litert, transform
from keras_epitome.backend import keras

_log = logging.getLogger(__name__)

CANDIDATES = ("slices", "matmul", "fold_slices", "fold_matmul", "materialized")
CHOOSE = ("cost", "measure")
OBJECTIVES = ("latency", "size")
PRECISIONS = ("float", "int8")

# The bundled constants (kept here under their old name).
LITERT_COST_US = cost_model_lib.BUNDLED_COST_US
graph_features = cost_model_lib.graph_features
# Unknown spatial sizes (a model with dynamic inputs) are estimated at this.
NOMINAL_SPATIAL = 16
# objective="latency" warns when the chosen forms store this much more than
# the smallest forms would.
SIZE_WARNING_RATIO = 1.10


@dataclasses.dataclass
class FormChoice:
  """What one epitome layer became, and why.

  Attributes:
    layer: the epitome layer's name.
    form: the chosen candidate (one of :data:`CANDIDATES`).
    estimates_us: the cost model's latency estimate of each candidate
      (microseconds, LiteRT 1 thread).
    measured_us: with ``choose="measure"``, the measured median latency of
      each candidate as a one-layer model; otherwise ``None``.
    features: per candidate: ``macs``, ``elements`` and ``ops`` of its graph.
    precision: ``"float"`` or ``"int8"``.
    weights: per candidate: the number of stored weights.
    objective: ``"latency"`` or ``"size"``.
    bytes: per candidate: its estimated bytes in the file
      (:func:`keras_epitome.cost_model.estimate_bytes`: its weights at the
      precision's width and its ops).
    cost_model: which cost model made the estimates (e.g. ``"host
      calibration on <cpu>, <date>"``, ``"bundled constants fitted on
      <cpu>"``, ``"user table '<name>'"``).
    margin: how much faster (a fraction) a factored form had to be estimated
      than the stock layer to replace it.
  """

  layer: str
  form: str
  estimates_us: Dict[str, float]
  measured_us: Optional[Dict[str, float]]
  features: Dict[str, Dict[str, int]]
  precision: str
  weights: Optional[Dict[str, int]] = None
  objective: str = "latency"
  cost_model: str = ""
  margin: float = 0.0
  bytes: Optional[Dict[str, int]] = None

  @property
  def smallest(self) -> Optional[str]:
    """The candidate with the smallest estimated file bytes."""
    if not self.bytes:
      return None
    return min(self.bytes, key=lambda f: (self.bytes[f], f != self.form))

  @property
  def size_traded(self) -> bool:
    """Whether the chosen form is estimated larger than the smallest one."""
    small = self.smallest
    return small is not None and self.bytes[self.form] > self.bytes[small]

  def __str__(self):
    basis = self.measured_us if self.measured_us is not None else self.estimates_us
    how = "measured" if self.measured_us is not None else "estimated"
    parts = ", ".join(f"{k} {v:.1f} us" for k, v in basis.items())
    text = f"{self.layer}: {self.form} ({self.precision}, {how}: {parts}"
    if self.measured_us is None and self.cost_model:
      text += f"; by {self.cost_model}"
    text += ")"
    if self.size_traded:
      small = self.smallest
      text += (
        f" [size traded for speed: ~{self.bytes[self.form]} bytes, "
        f"{small} ~{self.bytes[small]}]"
      )
    return text


def summarize_choices(records: Sequence[FormChoice]) -> str:
  """One line: the forms chosen, by which cost model, and their estimated bytes."""
  if not records:
    return "no epitome layer chosen"
  forms = [r.form for r in records]
  counts = ", ".join(f"{f} x{forms.count(f)}" for f in sorted(set(forms)))
  models = sorted({r.cost_model for r in records if r.measured_us is None})
  how = "LiteRT timing" if not models else "; ".join(models)
  stored = sum(r.bytes[r.form] for r in records if r.bytes)
  smallest = sum(r.bytes[r.smallest] for r in records if r.bytes)
  return (
    f"{counts} (objective={records[0].objective}, {records[0].precision}, by "
    f"{how}); epitome layers ~{stored} bytes, ~{smallest} in their smallest "
    "forms"
  )


def _warn_if_size_traded(records: Sequence[FormChoice]):
  """Warns when the speed-first choice stores notably more than the smallest forms."""
  traded = [r for r in records if r.bytes and r.size_traded]
  if not traded:
    return
  stored = sum(r.bytes[r.form] for r in records if r.bytes)
  smallest = sum(r.bytes[r.smallest] for r in records if r.bytes)
  if stored <= SIZE_WARNING_RATIO * smallest:
    return
  full = sum(1 for r in traded if r.form == "materialized")
  _log.warning(
    "factorize/export_tflite: size traded for speed: %d of %d epitome layers "
    "take a larger form than their smallest (%d as full-size stock layers) "
    "because it is estimated faster (%s); the epitome layers take ~%d bytes "
    "instead of ~%d (%.2fx). Pass objective='size' for the small file "
    "(per layer the smallest form, possibly slower than stock).",
    len(traded),
    len(records),
    full,
    "; ".join(sorted({r.cost_model or "LiteRT timing" for r in traded})),
    stored,
    smallest,
    stored / max(smallest, 1),
  )


def estimate_us(
  features: Dict[str, int], precision: str = "float", cost_model=None
) -> float:
  """The cost model's LiteRT latency (microseconds) of a graph's features.

  ``cost_model``: as :func:`keras_epitome.cost_model.resolve` takes it
  (``None``: :func:`keras_epitome.cost_model.default`).
  """
  return cost_model_lib.resolve(cost_model).estimate_us(features, precision)


def materialized_candidate(layer, batchnorm=None):
  """The stock layer holding ``layer``'s sampled kernel, ``batchnorm`` folded in."""
  stock = transform.materialize_layer(layer)
  if batchnorm is None:
    return stock
  channels = stock.kernel.shape[-1]
  scale, shift = factored._batchnorm_affine(batchnorm, layer, channels)  # noqa: SLF001
  kernel = stock.kernel.numpy().astype(np.float64) * scale
  bias = shift + (scale * stock.bias.numpy() if stock.use_bias else 0.0)
  config = dict(stock.get_config(), use_bias=True)
  folded = type(stock).from_config(config)
  folded.build(getattr(layer, "_build_input_shape", None) or layer.input_shape)
  folded.kernel.assign(kernel.astype(folded.kernel.dtype.as_numpy_dtype))
  folded.bias.assign(bias.astype(folded.bias.dtype.as_numpy_dtype))
  return folded


def build_candidate(layer, batchnorm, form: str):
  """The layer computing ``layer`` (then ``batchnorm``) in ``form``."""
  if form == "materialized":
    return materialized_candidate(layer, batchnorm)
  cls = factored._factored_class(layer)  # noqa: SLF001
  return cls.from_epitome_layer(layer, batchnorm, remix=form)


def _layer_input_shape(layer):
  shape = getattr(layer, "_build_input_shape", None)
  if shape is None:
    shape = layer.input_shape
  shape = tf.TensorShape(shape).as_list()
  if shape[-1] is None:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}': form choice needs the input "
      f"channels, got shape {shape}"
    )
  if any(d is None for d in shape[1:-1]):
    _log.info(
      "form choice: %s '%s' has input shape %s; estimating at %d per unknown size",
      type(layer).__name__,
      layer.name,
      shape,
      NOMINAL_SPATIAL,
    )
  return [1] + [NOMINAL_SPATIAL if d is None else d for d in shape[1:]]


def _measure(candidates, input_shape, precision, iterations=60, warmup=5):
  """Median LiteRT latency (us, 1 thread) of each candidate as a one-layer model."""
  rng = np.random.default_rng(0)
  data = rng.uniform(-1, 1, [8] + input_shape[1:]).astype(np.float32)
  runners = {}
  for name, cand in candidates.items():
    inputs = keras.Input(batch_shape=input_shape)
    model = keras.Model(inputs, cand(inputs))
    tflite = litert.convert(model, None if precision == "float" else "int8", data)
    runner = litert.LiteRTRunner(tflite, 1)
    runner.set_inputs(data[:1])
    runners[name] = runner
  return cost_model_lib.time_interleaved(runners, iterations, warmup)


def _pick(basis, sizes, objective, margin):
  """The chosen candidate of ``basis`` (latency per form) under ``objective``."""
  if objective == "size":
    return min(basis, key=lambda f: (sizes[f], basis[f]))
  form = min(basis, key=basis.get)
  stock = basis.get("materialized")
  if (
    form != "materialized" and stock is not None and basis[form] > (1 - margin) * stock
  ):
    return "materialized"  # not faster by the margin
  return form


def choose_layer_form(
  layer,
  batchnorm=None,
  *,
  precision: str = "float",
  choose: str = "cost",
  candidates: Sequence[str] = CANDIDATES,
  objective: str = "latency",
  cost_model=None,
):
  """Picks the fastest (or smallest) inference form of one epitome layer.

  Args:
    layer: a built epitome layer (unknown spatial input sizes are estimated
      at :data:`NOMINAL_SPATIAL`).
    batchnorm: a following BatchNorm to fold in (as
      :meth:`keras_epitome.factored.FactoredMixin.from_epitome_layer`).
    precision: ``"float"`` or ``"int8"``: which latency the choice minimizes.
    choose: ``"cost"`` (the cost model) or ``"measure"`` (LiteRT timing).
    candidates: the forms to choose among (a subset of :data:`CANDIDATES`).
    objective: ``"latency"`` (default: the fastest candidate; a factored form
      replaces the stock layer only when faster by the cost model's margin)
      or ``"size"`` (the candidate with the fewest estimated file bytes,
      :func:`keras_epitome.cost_model.estimate_bytes`, whatever its latency:
      the smallest file).
    cost_model: the latency model, as
      :func:`keras_epitome.cost_model.resolve` takes it (``None``: this
      host's calibration, run once and cached when there is none; a
      :class:`~keras_epitome.cost_model.CostModel`; a user table as a dict or
      JSON path; ``"host"``; ``"bundled"``).

  Returns:
    ``(new layer, FormChoice)``: a fresh layer in the chosen form, and the
    record of the choice.

  Raises:
    ValueError: for an unknown precision, choice, objective or candidate, or
      a layer without known input channels.

  Example:
    >>> model = keras.Sequential([
    ...     keras.Input((16, 16, 32)), ke.EpitomeConv2D(32, 3, compression=4)])
    >>> new, choice = choose_layer_form(model.layers[0], precision="int8")
    >>> choice.form in choice.estimates_us
    True
  """
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if choose not in CHOOSE:
    raise ValueError(f"choose must be one of {CHOOSE}, got {choose!r}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  unknown = [c for c in candidates if c not in CANDIDATES]
  if unknown or not candidates:
    raise ValueError(
      f"candidates must be a non-empty subset of {CANDIDATES}, got {list(candidates)}"
    )
  costs = cost_model_lib.resolve(cost_model)
  input_shape = _layer_input_shape(layer)
  if getattr(layer, "groups", 1) != 1:
    candidates = ["materialized"]
  built = {}
  features = {}
  estimates = {}
  weights = {}
  for form in candidates:
    cand = build_candidate(layer, batchnorm, form)
    cand(tf.zeros(input_shape, layer.dtype))  # builds it (sets its weights)
    built[form] = cand
    features[form] = graph_features(cand, input_shape)
    weights[form] = int(sum(int(np.prod(w.shape)) for w in cand.weights))
    estimates[form] = costs.estimate_us(features[form], precision)
  measured = None
  if choose == "measure" and len(candidates) > 1:
    measured = _measure(
      {f: build_candidate(layer, batchnorm, f) for f in candidates},
      input_shape,
      precision,
    )
  margin = 0.0 if measured is not None else costs.margin
  sizes = {
    f: cost_model_lib.estimate_bytes(weights[f], features[f], precision)
    for f in weights
  }
  form = _pick(measured or estimates, sizes, objective, margin)
  record = FormChoice(
    layer.name,
    form,
    {k: round(v, 2) for k, v in estimates.items()},
    None if measured is None else {k: round(v, 2) for k, v in measured.items()},
    features,
    precision,
    weights,
    objective,
    str(costs),
    margin,
    sizes,
  )
  _log.info("form choice: %s", record)
  return build_candidate(layer, batchnorm, form), record


def factorize(
  model,
  *,
  fold_batchnorm: bool = True,
  fallback: str = "materialize",
  report: Optional[list] = None,
  remix: str = "auto",
  precision: str = "float",
  choose: str = "cost",
  form_report: Optional[list] = None,
  objective: str = "latency",
  cost_model=None,
):
  """Replaces every epitome layer of ``model`` by its factored inference layer.

  A ``BatchNormalization`` that directly follows an epitome layer with a
  linear activation, normalizes the channel axis and is its only consumer
  (always so in a ``Sequential``) is folded into the factored layer's scale
  and bias: dropped from a ``Sequential``, replaced by an ``Identity`` layer
  in a functional model (the TFLite converter removes it). Nested models are
  transformed recursively; other layers are copied with their weights.

  The default is speed first: ``remix="auto"`` with ``objective="latency"``
  gives each layer its fastest form on LiteRT, which is its full-size stock
  layer where no factored form is estimated faster (by the cost model's
  margin). When that makes the epitome layers store notably more than their
  smallest forms, a warning says so; ``objective="size"`` gives the small
  file (each layer's form with the fewest estimated bytes, whatever its
  latency), ``remix="slices"`` forces the slices form everywhere.

  Args:
    model: a built Keras model containing epitome layers.
    fold_batchnorm: whether to fold following BatchNorms.
    fallback: what to do with an epitome layer that has no factored form
      (``groups > 1``): ``"materialize"`` (a stock layer holding the sampled
      kernel, logged) or ``"error"``.
    report: optional list; ``(layer name, new class name)`` is appended for
      every epitome layer replaced.
    remix: ``"auto"`` (default: per layer the form ``objective`` asks for,
      among the factored forms and the materialized stock layer,
      :func:`choose_layer_form`), or one form for every layer:
      ``"slices"`` (the smallest file), ``"matmul"`` (the channel remixes as
      1x1 convolutions: fewer ops, faster on narrow layers, larger file),
      ``"fold_slices"`` or ``"fold_matmul"`` (``R_out`` folded into the
      kernel); see :meth:`FactoredMixin.from_epitome_layer`.
    precision: for ``remix="auto"``: ``"float"`` or ``"int8"``, the
      precision whose latency the choice minimizes.
    choose: for ``remix="auto"``: ``"cost"`` (the cost model) or
      ``"measure"`` (time each candidate with LiteRT).
    objective: for ``remix="auto"``: ``"latency"`` (default: the fastest
      form) or ``"size"`` (the fewest estimated file bytes).
    form_report: optional list; for ``remix="auto"``, one
      :class:`keras_epitome.form_choice.FormChoice` is appended per epitome
      layer (what it became, the estimate or time of every candidate, and the
      cost model that made the choice).
    cost_model: for ``choose="cost"``: the latency model
      (:func:`keras_epitome.cost_model.resolve`: ``None`` for this host's
      calibration, run once and cached when there is none; ``"bundled"``
      for the bundled constants with a safety margin; a user table measured
      on the target device, as a dict or a JSON path).

  Returns:
    A new ``keras.Model`` computing the same inference function.

  Raises:
    ValueError: for an unbuilt epitome layer, an epitome layer inside a
      training wrapper (pruning, QAT), non-finite weights, an unknown remix,
      objective or cost model, or (with ``fallback="error"``) a layer without
      factored form.

  Example:
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 16)), ke.EpitomeConv2D(32, 3, compression=4)])
    >>> x = np.random.rand(2, 8, 8, 16).astype("float32")
    >>> fast = ke.factorize(model)
    >>> np.allclose(fast(x), model(x, training=False), atol=1e-5)
    True
  """

  if remix not in factored.FORMS + ("auto",):
    raise ValueError(
      f"remix must be one of {', '.join(factored.FORMS + ('auto',))}, got {remix!r}"
    )
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  costs = cost_model_lib.resolve(cost_model) if remix == "auto" else None
  records: List[FormChoice] = []

  def choose_layer(layer, bn):
    if remix != "auto":
      cls = factored._factored_class(layer)  # noqa: SLF001
      return cls.from_epitome_layer(layer, bn, remix=remix)
    new, record = choose_layer_form(
      layer,
      bn,
      precision=precision,
      choose=choose,
      objective=objective,
      cost_model=costs,
    )
    records.append(record)
    return new

  out = factored_model.factorize_layers(
    model, choose_layer, fold_batchnorm=fold_batchnorm, fallback=fallback, report=report
  )
  if records:
    _log.info("factorize '%s': %s", model.name, summarize_choices(records))
    if objective == "latency":
      _warn_if_size_traded(records)
  if form_report is not None:
    form_report.extend(records)
  return out
