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
  by the other ops + op * ops``, with constants per precision fitted to
  measurements of single layers on this machine
  (``benchmarks/calibrate_export.py``; :data:`LITERT_COST_US`); or
* ``choose="measure"``: converting each candidate as a one-layer model and
  timing it with LiteRT (interleaved, median), at the cost of a few seconds of
  export time per layer.

Each choice is recorded as a :class:`FormChoice` (the estimate or time of
every candidate), logged at INFO level, and returned through
``form_report=`` of :func:`keras_epitome.export_tflite` and
:func:`keras_epitome.factorize`.

Example:
  >>> model = keras.Sequential([
  ...     keras.Input((16, 16, 32)), ke.EpitomeConv2D(32, 3, compression=4)])
  >>> report = []
  >>> tflite = ke.export_tflite(model, form_report=report)
  >>> report[0].form in CANDIDATES, sorted(report[0].estimates_us)
  (True, ['fold_matmul', 'fold_slices', 'materialized', 'matmul', 'slices'])
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_epitome import factored, litert, transform
from keras_epitome.backend import keras

_log = logging.getLogger(__name__)

CANDIDATES = ("slices", "matmul", "fold_slices", "fold_matmul", "materialized")
CHOOSE = ("cost", "measure")
OBJECTIVES = ("latency", "size")
PRECISIONS = ("float", "int8")

# Microseconds per unit on LiteRT with XNNPACK, 1 thread, batch 1, on this
# project's machine (AMD EPYC, AVX-512; 2 shared vCPUs, fitted under load
# average ~10, so absolute values are ~2x an idle machine's; only their ratios
# matter for the choice): per convolution/fully-connected multiply-add, per
# element written by any other op over an activation (slices, concats,
# elementwise multiplies and adds, pads), and per such op (the fit gave 0:
# XNNPACK's per-op overhead is below the noise next to a pass over a
# 32x32xC activation). Fitted by ``benchmarks/calibrate_export.py`` (least
# squares, relative error, over the 32 epitome layers of the benchmark ResNets
# at widths 32 and 64 and the audio CNN at 4x, each in the three forms;
# measurements in ``benchmarks/calibration_litert.jsonl``). With these
# constants the model picks the measured-fastest form for 32/32 layers in
# both precisions.
LITERT_COST_US = {
  "float": {"mac": 1.97e-5, "elem": 1.51e-4, "op": 0.0},
  "int8": {"mac": 4.84e-6, "elem": 1.93e-4, "op": 0.0},
}

# Ops that TFLite fuses into their producer or that move no data.
_FREE_OPS = {
  "Identity",
  "Reshape",
  "ExpandDims",
  "Squeeze",
  "NoOp",
  "BiasAdd",
  "Relu",
  "Relu6",
  "Shape",
  "Const",
}
_CONV_OPS = {"Conv2D", "Conv3D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2"}


@dataclasses.dataclass
class FormChoice:
  """What one epitome layer became, and why.

  Attributes:
    layer: the epitome layer's name.
    form: the chosen candidate (``"slices"``, ``"matmul"`` or
      ``"materialized"``).
    estimates_us: the cost model's latency estimate of each candidate
      (microseconds, LiteRT 1 thread).
    measured_us: with ``choose="measure"``, the measured median latency of
      each candidate as a one-layer model; otherwise ``None``.
    features: per candidate: ``macs``, ``elements`` and ``ops`` of its graph.
    precision: ``"float"`` or ``"int8"``.
    weights: per candidate: the number of stored weights.
    objective: ``"latency"`` or ``"size"``.
  """

  layer: str
  form: str
  estimates_us: Dict[str, float]
  measured_us: Optional[Dict[str, float]]
  features: Dict[str, Dict[str, int]]
  precision: str
  weights: Optional[Dict[str, int]] = None
  objective: str = "latency"

  def __str__(self):
    basis = self.measured_us if self.measured_us is not None else self.estimates_us
    how = "measured" if self.measured_us is not None else "estimated"
    parts = ", ".join(f"{k} {v:.1f} us" for k, v in basis.items())
    return f"{self.layer}: {self.form} ({self.precision}, {how}: {parts})"


def graph_features(layer, input_shape) -> Dict[str, int]:
  """Multiply-adds, elements written and ops of ``layer``'s graph on one input.

  Traces ``layer`` (built) on ``input_shape`` and counts the ops that depend
  on the input (weight-only ops are constant-folded by the TFLite converter):
  convolutions and matmuls by their multiply-adds, every other op (except
  reshapes and the bias/ReLU that TFLite fuses) by the elements it writes.

  Args:
    layer: a Keras layer.
    input_shape: a static input shape, batch included.

  Returns:
    ``{"macs": ..., "elements": ..., "ops": ...}``.
  """
  fn = tf.function(lambda x: layer(x, training=False))
  graph = fn.get_concrete_function(tf.TensorSpec(input_shape, tf.float32)).graph
  # dynamic[op name]: the type of the last op that did work on the way to it.
  dynamic = {}
  macs = elements = ops = 0
  for op in graph.get_operations():
    if op.type == "Placeholder" and not op.inputs:
      if op.outputs[0].dtype == tf.float32 and list(op.outputs[0].shape) == list(
        input_shape
      ):
        dynamic[op.name] = "Placeholder"
      continue
    sources = [dynamic[t.op.name] for t in op.inputs if t.op.name in dynamic]
    if not sources:
      continue
    dynamic[op.name] = op.type
    if op.type in _FREE_OPS:
      dynamic[op.name] = sources[0]
      continue
    if op.type in ("AddV2", "Add") and len(sources) == 1 and sources[0] in _CONV_OPS:
      dynamic[op.name] = sources[0]  # a bias: fused into the convolution
      continue
    out = op.outputs[0].shape
    size = int(np.prod(out.as_list())) if out.is_fully_defined() else 0
    if op.type in _CONV_OPS:
      w = op.inputs[1].shape.as_list()
      inner = int(np.prod(w[:-1])) if op.type != "DepthwiseConv2dNative" else 1
      if op.type in ("MatMul", "BatchMatMulV2"):
        inner = int(op.inputs[0].shape.as_list()[-1])
      macs += size * inner
    else:
      elements += size
    ops += 1
  return {"macs": int(macs), "elements": int(elements), "ops": int(ops)}


def estimate_us(features: Dict[str, int], precision: str = "float") -> float:
  """The cost model's LiteRT latency (microseconds) of a graph's features."""
  c = LITERT_COST_US[precision]
  return (
    c["mac"] * features["macs"]
    + c["elem"] * features["elements"]
    + c["op"] * features["ops"]
  )


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
  if any(d is None for d in shape[1:]):
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}': form choice needs a static input "
      f"shape, got {shape}; use remix='slices' or 'matmul'"
    )
  return [1] + shape[1:]


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
    for _ in range(warmup):
      runner.invoke()
    runners[name] = runner
  times = {name: [] for name in runners}
  names = list(runners)
  for i in range(iterations):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      start = time.perf_counter()
      runners[name].invoke()
      times[name].append(time.perf_counter() - start)
  return {name: 1e6 * float(np.median(t)) for name, t in times.items()}


def choose_layer_form(
  layer,
  batchnorm=None,
  *,
  precision: str = "float",
  choose: str = "cost",
  candidates: Sequence[str] = CANDIDATES,
  objective: str = "latency",
):
  """Picks the fastest (or smallest) inference form of one epitome layer.

  Args:
    layer: a built epitome layer with a static input shape.
    batchnorm: a following BatchNorm to fold in (as
      :meth:`keras_epitome.factored.FactoredMixin.from_epitome_layer`).
    precision: ``"float"`` or ``"int8"``: which latency the choice minimizes.
    choose: ``"cost"`` (the calibrated model) or ``"measure"`` (LiteRT timing).
    candidates: the forms to choose among (a subset of :data:`CANDIDATES`).
    objective: ``"latency"`` (default: the fastest candidate) or ``"size"``
      (the candidate with the fewest stored weights among those not slower
      than the materialized stock layer: the smallest file that still never
      loses to stock).

  Returns:
    ``(new layer, FormChoice)``: a fresh, unbuilt-or-built layer in the chosen
    form, and the record of the choice.

  Raises:
    ValueError: for an unknown precision, choice or candidate, or a layer
      without a static input shape.

  Example:
    >>> model = keras.Sequential([
    ...     keras.Input((16, 16, 32)), ke.EpitomeConv2D(32, 3, compression=4)])
    >>> new, choice = choose_layer_form(model.layers[0], precision="int8")
    >>> choice.form == min(choice.estimates_us, key=choice.estimates_us.get)
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
    estimates[form] = estimate_us(features[form], precision)
  measured = None
  if choose == "measure" and len(candidates) > 1:
    measured = _measure(
      {f: build_candidate(layer, batchnorm, f) for f in candidates},
      input_shape,
      precision,
    )
  basis = measured if measured is not None else estimates
  form = min(basis, key=basis.get)
  if objective == "size":
    limit = basis.get("materialized", max(basis.values()))
    fit = [f for f in basis if basis[f] <= limit]
    form = min(fit, key=lambda f: (weights[f], basis[f]))
  record = FormChoice(
    layer.name,
    form,
    {k: round(v, 2) for k, v in estimates.items()},
    None if measured is None else {k: round(v, 2) for k, v in measured.items()},
    features,
    precision,
    weights,
    objective,
  )
  _log.info("form choice: %s", record)
  return build_candidate(layer, batchnorm, form), record


def factorize(
  model,
  *,
  fold_batchnorm: bool = True,
  fallback: str = "materialize",
  report: Optional[list] = None,
  remix: str = "slices",
  precision: str = "float",
  choose: str = "cost",
  form_report: Optional[list] = None,
  objective: str = "latency",
):
  """Replaces every epitome layer of ``model`` by its factored inference layer.

  A ``BatchNormalization`` that directly follows an epitome layer with a
  linear activation, normalizes the channel axis and is its only consumer
  (always so in a ``Sequential``) is folded into the factored layer's scale
  and bias: dropped from a ``Sequential``, replaced by an ``Identity`` layer
  in a functional model (the TFLite converter removes it). Nested models are
  transformed recursively; other layers are copied with their weights.

  Args:
    model: a built Keras model containing epitome layers.
    fold_batchnorm: whether to fold following BatchNorms.
    fallback: what to do with an epitome layer that has no factored form
      (``groups > 1``): ``"materialize"`` (a stock layer holding the sampled
      kernel, logged) or ``"error"``.
    report: optional list; ``(layer name, new class name)`` is appended for
      every epitome layer replaced.
    remix: ``"slices"`` (default: the smallest file) or ``"matmul"`` (the
      channel remixes as 1x1 convolutions: fewer ops, faster on narrow
      layers, larger file), ``"fold_slices"`` or ``"fold_matmul"`` (``R_out``
      folded into the kernel); see :meth:`FactoredMixin.from_epitome_layer`.
      ``"auto"``: per layer, the fastest of these forms and the
      materialized stock layer on LiteRT
      (:func:`keras_epitome.form_choice.choose_layer_form`).
    precision: for ``remix="auto"``: ``"float"`` or ``"int8"``, the
      precision whose latency the choice minimizes.
    choose: for ``remix="auto"``: ``"cost"`` (calibrated cost model) or
      ``"measure"`` (time each candidate with LiteRT).
    objective: for ``remix="auto"``: ``"latency"`` (the fastest form) or
      ``"size"`` (the smallest among those not slower than stock).
    form_report: optional list; for ``remix="auto"``, one
      :class:`keras_epitome.form_choice.FormChoice` is appended per epitome
      layer (what it became and the estimate or time of every candidate).

  Returns:
    A new ``keras.Model`` computing the same inference function.

  Raises:
    ValueError: for an unbuilt epitome layer, an epitome layer inside a
      training wrapper (pruning, QAT), non-finite weights, or (with
      ``fallback="error"``) a layer without factored form.

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

  def choose_layer(layer, bn):
    if remix != "auto":
      cls = factored._factored_class(layer)  # noqa: SLF001
      return cls.from_epitome_layer(layer, bn, remix=remix)
    new, record = choose_layer_form(
      layer, bn, precision=precision, choose=choose, objective=objective
    )
    if form_report is not None:
      form_report.append(record)
    return new

  return factored.factorize_layers(
    model, choose_layer, fold_batchnorm=fold_batchnorm, fallback=fallback, report=report
  )
