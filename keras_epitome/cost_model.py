"""The LiteRT latency model behind the export form choice, and where its constants come from.

:mod:`keras_epitome.form_choice` estimates each candidate form's latency as
``mac * multiply-adds + elem * elements written by the other ops + op * ops``
(:func:`graph_features`), with constants per precision. The constants depend
on the CPU that runs the file (an int8 convolution is several times cheaper
relative to a slice on a CPU with VNNI or AMX than on one without), so a
:class:`CostModel` carries them together with where they come from:

* ``"host"``: fitted on this machine by :func:`calibrate` (a few one-layer
  models, converted and timed with LiteRT: seconds, not minutes) and cached per CPU
  (the CPU model name and flags, the LiteRT version and the thread count) as
  JSON under ``$KERAS_EPITOME_CACHE`` or ``~/.cache/keras_epitome``;
  :func:`default` uses it, and runs it the first time an export needs it;
* ``"bundled"``: :data:`BUNDLED_COST_US`, fitted once on the CPU named in
  :data:`BUNDLED_CPU`, with a safety margin (:data:`BUNDLED_MARGIN`: a
  factored form replaces the stock layer only when estimated faster by that
  fraction); used with ``$KERAS_EPITOME_CALIBRATE=0`` or if calibrating
  fails. On a CPU with fast int8 convolutions (VNNI, AMX) the margin is not
  enough in int8: there it can pick factored forms slower than stock;
* ``"user"``: a table measured on the target (a phone), given as a dict or a
  JSON file (:func:`from_table`): either the constants themselves, or the
  latencies of the probe models that :func:`write_probes` writes (time them
  with LiteRT's ``benchmark_model --num_threads=1`` on the device), which
  are fitted as on the host.

The cost model that made a choice is named in every
:class:`keras_epitome.form_choice.FormChoice` and in the export's log line.

Example:
  >>> table = {"name": "pixel", "float": {"mac": 1e-5, "elem": 1e-4, "op": 0.5},
  ...          "int8": {"mac": 3e-6, "elem": 1e-4, "op": 0.5}}
  >>> model = from_table(table)
  >>> str(model)
  "user table 'pixel'"
  >>> round(model.estimate_us({"macs": 10**6, "elements": 0, "ops": 1}, "float"), 2)
  10.5
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import time
from typing import Dict, List, Optional, Union

import numpy as np
import tensorflow as tf

_log = logging.getLogger(__name__)

PRECISIONS = ("float", "int8")
TERMS = ("mac", "elem", "op")

# Microseconds per unit on LiteRT with XNNPACK, 1 thread, batch 1, fitted by
# ``benchmarks/calibrate_export.py`` on BUNDLED_CPU (2 shared vCPUs, under
# load; only the ratios matter for the choice): per convolution/fully
# connected multiply-add, per element written by any other op over an
# activation (slices, concats, elementwise multiplies and adds, pads), and
# per such op.
BUNDLED_COST_US = {
  "float": {"mac": 1.97e-5, "elem": 1.51e-4, "op": 0.0},
  "int8": {"mac": 4.84e-6, "elem": 1.93e-4, "op": 0.0},
}
BUNDLED_CPU = "AMD EPYC (AVX-512, no VNNI/AMX)"
# A factored form replaces the stock layer under the bundled constants only
# when estimated at least this fraction faster: on another CPU the constants
# are off, and a wrong factored pick costs more than a missed one.
BUNDLED_MARGIN = 0.10

# The file-size model of objective="size": bytes per stored weight, and per
# op over the activations (its tensor, its quantization parameters, the
# constant begin/end/strides of a slice, the operator table: about 250-300
# bytes in float and in int8 alike, from one-layer files of each form). In
# int8 a 1x1 layer of a few thousand weights is smaller stock than in the
# slices form.
BYTES_PER_WEIGHT = {"float": 4, "int8": 1}
BYTES_PER_OP = 260
# Per output channel of a convolution or fully connected op: its bias (float
# or int32) and, in int8, its per-channel scale and zero point.
BYTES_PER_CHANNEL = {"float": 4, "int8": 28}

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


def graph_features(layer, input_shape) -> Dict[str, int]:
  """Multiply-adds, elements written and ops of ``layer``'s graph on one input.

  Traces ``layer`` (built) on ``input_shape`` and counts the ops that depend
  on the input (weight-only ops are constant-folded by the TFLite converter):
  convolutions and matmuls by their multiply-adds (and output channels,
  which the file size depends on), every other op (except reshapes and the
  bias/ReLU that TFLite fuses) by the elements it writes.

  Args:
    layer: a Keras layer.
    input_shape: a static input shape, batch included.

  Returns:
    ``{"macs": ..., "elements": ..., "ops": ..., "channels": ...}``.
  """
  fn = tf.function(lambda x: layer(x, training=False))
  graph = fn.get_concrete_function(tf.TensorSpec(input_shape, tf.float32)).graph
  # dynamic[op name]: the type of the last op that did work on the way to it.
  dynamic = {}
  macs = elements = ops = channels = 0
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
      channels += int(out.as_list()[-1]) if out.is_fully_defined() else 0
    else:
      elements += size
    ops += 1
  return {
    "macs": int(macs),
    "elements": int(elements),
    "ops": int(ops),
    "channels": int(channels),
  }


def estimate_bytes(weights: int, features: Dict[str, int], precision: str) -> int:
  """Estimated ``.tflite`` bytes of a candidate: its weights, ops and conv channels."""
  return int(
    BYTES_PER_WEIGHT[precision] * weights
    + BYTES_PER_OP * features["ops"]
    + BYTES_PER_CHANNEL[precision] * features.get("channels", 0)
  )


@dataclasses.dataclass(frozen=True)
class CostModel:
  """LiteRT latency constants and where they come from.

  Attributes:
    constants: ``{precision: {"mac": us, "elem": us, "op": us}}`` for
      ``"float"`` and ``"int8"``.
    source: ``"host"``, ``"bundled"`` or ``"user"``.
    description: what made them, e.g. ``"host calibration on <cpu>,
      2026-01-01"``, ``"bundled constants fitted on <cpu>"``, ``"user table
      'pixel8'"``: named in the form report and the export's log line.
    margin: a factored form replaces the stock layer only when estimated
      faster by this fraction (``0.1``: 10% faster).
    info: extra record (the cache key, the fit's agreement on the probes).
  """

  constants: Dict[str, Dict[str, float]]
  source: str
  description: str
  margin: float = 0.0
  info: Dict = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    for p in PRECISIONS:
      if p not in self.constants:
        raise ValueError(f"cost model: no constants for precision {p!r}")
      for term in TERMS:
        value = self.constants[p].get(term, 0.0)
        if not np.isfinite(value) or value < 0:
          raise ValueError(
            f"cost model: {p} {term} must be a finite number >= 0, got {value!r}"
          )
    if not 0.0 <= self.margin < 1.0:
      raise ValueError(f"cost model: margin must be in [0, 1), got {self.margin!r}")

  def estimate_us(self, features: Dict[str, int], precision: str = "float") -> float:
    """The estimated LiteRT latency (microseconds) of a graph's features."""
    c = self.constants[precision]
    return (
      c.get("mac", 0.0) * features["macs"]
      + c.get("elem", 0.0) * features["elements"]
      + c.get("op", 0.0) * features["ops"]
    )

  def with_margin(self, margin: float) -> "CostModel":
    """The same constants with another margin."""
    return dataclasses.replace(self, margin=float(margin))

  def __str__(self):
    return self.description

  def to_json(self) -> dict:
    return dict(
      constants=self.constants,
      source=self.source,
      description=self.description,
      margin=self.margin,
      info=self.info,
    )

  @classmethod
  def from_json(cls, data: dict) -> "CostModel":
    return cls(
      {p: dict(v) for p, v in data["constants"].items()},
      data["source"],
      data["description"],
      float(data.get("margin", 0.0)),
      dict(data.get("info", {})),
    )


def bundled(margin: float = BUNDLED_MARGIN) -> CostModel:
  """The constants shipped with the package, with a safety margin."""
  return CostModel(
    {p: dict(v) for p, v in BUNDLED_COST_US.items()},
    "bundled",
    f"bundled constants fitted on {BUNDLED_CPU} (margin {margin:.0%})",
    margin,
  )


# ----------------------------------------------------------------------------
# The host and its cache.


def _cpuinfo() -> Dict[str, str]:
  """This CPU's model name and flags (``/proc/cpuinfo``; ``platform`` elsewhere)."""
  name, flags = "", ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not name:
          name = value.strip()
        elif key in ("flags", "features") and not flags:
          flags = " ".join(sorted(value.split()))
        if name and flags:
          break
  except OSError:
    pass
  return {
    "cpu": name or platform.processor() or platform.machine() or "unknown CPU",
    "flags": flags,
    "machine": platform.machine(),
  }


def _litert_version() -> str:
  try:
    from importlib import metadata  # noqa: PLC0415

    return metadata.version("ai-edge-litert")
  except Exception:  # noqa: BLE001 (any failure: not installed as a distribution)
    return "unknown"


def host_key(num_threads: int = 1) -> Dict[str, str]:
  """What a host calibration is valid for: CPU name and flags, LiteRT, threads."""
  info = _cpuinfo()
  return {
    "cpu": info["cpu"],
    "machine": info["machine"],
    "flags_sha1": hashlib.sha1(info["flags"].encode()).hexdigest()[:12],
    "litert": _litert_version(),
    "threads": str(int(num_threads)),
  }


def cache_dir() -> str:
  """``$KERAS_EPITOME_CACHE``, else ``~/.cache/keras_epitome``."""
  root = os.environ.get("KERAS_EPITOME_CACHE")
  if not root:
    root = os.path.join(os.path.expanduser("~"), ".cache", "keras_epitome")
  return root


def cache_path(num_threads: int = 1) -> str:
  """The JSON file of this host's calibration (it may not exist)."""
  key = json.dumps(host_key(num_threads), sort_keys=True)
  digest = hashlib.sha1(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"litert_cost_{digest}.json")


def load_host(num_threads: int = 1) -> Optional[CostModel]:
  """This host's cached calibration, or ``None`` (none, or unreadable)."""
  path = cache_path(num_threads)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    model = CostModel.from_json(data)
  except (OSError, ValueError, KeyError, TypeError) as e:
    _log.warning("cost model: ignoring unreadable host calibration %s: %s", path, e)
    return None
  if model.info.get("key") != host_key(num_threads):
    return None
  return model


# Calibrations this process made but could not cache (a read-only home).
_UNSAVED: Dict[str, CostModel] = {}


def auto_calibrate_enabled() -> bool:
  """Whether :func:`default` may calibrate (``$KERAS_EPITOME_CALIBRATE`` != 0)."""
  return os.environ.get("KERAS_EPITOME_CALIBRATE", "1").lower() not in (
    "0",
    "false",
    "no",
    "off",
  )


def default(num_threads: int = 1) -> CostModel:
  """The cost model an export uses when none is given.

  This host's cached calibration; where there is none, a calibration now
  (:func:`calibrate`, once per CPU, LiteRT version and thread count: it is
  cached); with ``$KERAS_EPITOME_CALIBRATE=0``, or if calibrating fails, the
  bundled constants with their safety margin (fitted on another CPU: on a
  CPU with fast int8 convolutions, VNNI or AMX, they can rank a factored
  form faster than a stock layer that is faster).
  """
  host = load_host(num_threads) or _UNSAVED.get(cache_path(num_threads))
  if host is not None:
    return host
  if not auto_calibrate_enabled():
    return bundled()
  _log.warning(
    "cost model: no LiteRT calibration for this CPU (%s); calibrating once "
    "(seconds; cached in %s; KERAS_EPITOME_CALIBRATE=0 uses the bundled "
    "constants instead)",
    host_key(num_threads)["cpu"],
    cache_dir(),
  )
  try:
    return calibrate(num_threads)
  except OSError as e:  # the cache could not be written
    _log.warning("cost model: could not cache the calibration: %s", e)
    model = calibrate(num_threads, save=False)
    _UNSAVED[cache_path(num_threads)] = model
    return model
  except Exception as e:  # noqa: BLE001 (any failure: fall back, never fail the export)
    _log.warning("cost model: calibration failed (%s); using the bundled constants", e)
    return bundled()


# ----------------------------------------------------------------------------
# Probes: small one-layer models whose timings fit the constants.

# (name, input shape without batch, filters, kernel, compression, forms).
PROBES = (
  ("conv3x3_w32_16x16", (16, 16, 32), 32, 3, 4.0, ("slices", "fold_matmul", "stock")),
  ("conv3x3_w64_16x16", (16, 16, 64), 64, 3, 4.0, ("matmul", "fold_matmul", "stock")),
  ("conv1x1_w64_16x16", (16, 16, 64), 128, 1, 4.0, ("slices", "fold_slices", "stock")),
)


def _probe_layers(seed: int = 0, probes=PROBES):
  """``(probe name, form, built candidate layer, input shape)`` of every probe."""
  import importlib  # noqa: PLC0415

  from keras_epitome import sampling  # noqa: PLC0415
  from keras_epitome.layers import EpitomeConv2D  # noqa: PLC0415

  # The probes build their layers as the form choice does (a run-time edge:
  # form_choice builds on this module's estimates, not the reverse).
  form_choice = importlib.import_module("keras_epitome.form_choice")

  rng = np.random.default_rng(seed)
  for name, shape, filters, k, c, forms in probes:
    layer = EpitomeConv2D(filters, k, padding="same", use_bias=False, compression=c)
    input_shape = [1, *shape]
    layer(tf.zeros(input_shape))
    g = layer.epitome_geometry
    layer.set_routing_map(
      sampling.RoutingMap(
        rng.uniform(0, g.cin_e, g.num_in_chunks),
        rng.uniform(0, g.cout_e, g.num_out_chunks),
        rng.uniform(0, 1, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
      )
    )
    for form in forms:
      cand = form_choice.build_candidate(
        layer, None, "materialized" if form == "stock" else form
      )
      cand(tf.zeros(input_shape))
      yield f"{name}/{form}", cand, input_shape


def _probe_models(precisions=PRECISIONS, seed: int = 0, probes=PROBES):
  """``{precision: {probe: (tflite bytes, features)}}``."""
  from keras_epitome import litert  # noqa: PLC0415
  from keras_epitome.backend import keras  # noqa: PLC0415

  out = {p: {} for p in precisions}
  rng = np.random.default_rng(seed + 1)
  for name, cand, input_shape in _probe_layers(seed, probes):
    inputs = keras.Input(batch_shape=input_shape)
    model = keras.Model(inputs, cand(inputs))
    feats = graph_features(cand, input_shape)
    data = rng.uniform(-1, 1, [4] + input_shape[1:]).astype(np.float32)
    for p in precisions:
      tflite = litert.convert(model, None if p == "float" else "int8", data, 1)
      out[p][name] = (tflite, feats)
  return out


def write_probes(directory: str, precisions=PRECISIONS, probes=PROBES) -> List[str]:
  """Writes the probe models for timing on a target device.

  Writes ``<precision>__<probe>.tflite`` per probe and precision, and
  ``probes.json`` (each probe's features). Time each file on the device
  (``benchmark_model --graph=FILE --num_threads=1``, the average in
  microseconds) and pass ``{"name": ..., "timings_us": {file stem: us}}`` to
  :func:`from_table`.

  Returns:
    The paths of the ``.tflite`` files.
  """
  os.makedirs(directory, exist_ok=True)
  paths, features = [], {}
  for p, models in _probe_models(precisions, probes=probes).items():
    for name, (tflite, feats) in models.items():
      stem = f"{p}__{name.replace('/', '__')}"
      path = os.path.join(directory, stem + ".tflite")
      with open(path, "wb") as f:
        f.write(tflite)
      paths.append(path)
      features[stem] = dict(feats, precision=p, probe=name)
  with open(os.path.join(directory, "probes.json"), "w") as f:
    json.dump(features, f, indent=1)
  return paths


def probe_features(precisions=PRECISIONS, probes=PROBES) -> Dict[str, dict]:
  """``{file stem: features + precision}`` of the probes (no conversion)."""
  out = {}
  for name, cand, input_shape in _probe_layers(probes=probes):
    feats = graph_features(cand, input_shape)
    for p in precisions:
      out[f"{p}__{name.replace('/', '__')}"] = dict(feats, precision=p, probe=name)
  return out


def time_interleaved(runners: Dict[str, object], iterations: int, warmup: int = 5):
  """Median latency (us) of each runner, invoked interleaved (rotating order)."""
  names = list(runners)
  for name in names:
    for _ in range(warmup):
      runners[name].invoke()
  times = {name: [] for name in names}
  for i in range(iterations):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      start = time.perf_counter()
      runners[name].invoke()
      times[name].append(time.perf_counter() - start)
  return {name: 1e6 * float(np.median(t)) for name, t in times.items()}


def fit(rows: List[dict]) -> Dict[str, Dict[str, float]]:
  """Least-squares constants from timings of the probe layers' forms.

  ``rows``: ``{precision, probe ("<layer>/<form>"), macs, elements, ops, us}``.
  Per precision, ``us = mac * macs + elem * elements + op * ops +
  intercept[layer]``: one intercept per probe layer absorbs what all its
  forms share (the invoke, the input and output copies), so the constants
  fit what the choice compares, the differences between one layer's forms.
  Relative errors, non-negative constants.

  Raises:
    ValueError: if a precision has fewer than 2 rows.
  """
  from scipy.optimize import nnls  # noqa: PLC0415

  out = {}
  for p in sorted({r["precision"] for r in rows}):
    sub = [r for r in rows if r["precision"] == p]
    if len(sub) < 2:
      raise ValueError(f"cost model fit: {p} has {len(sub)} timings; need >= 2")
    groups = sorted({r["probe"].split("/")[0] for r in sub})
    a = np.array(
      [
        [r["macs"], r["elements"], r["ops"]]
        + [float(r["probe"].split("/")[0] == g) for g in groups]
        for r in sub
      ],
      float,
    )
    t = np.array([r["us"] for r in sub], float)
    w = 1.0 / np.maximum(t, 1.0)
    scale = np.maximum(a.max(axis=0), 1.0)  # conditioning
    coef, _ = nnls((a / scale) * w[:, None], t * w)
    coef = coef / scale
    out[p] = {"mac": float(coef[0]), "elem": float(coef[1]), "op": float(coef[2])}
  return out


def _agreement(rows: List[dict], constants) -> str:
  """How often the fitted constants rank each probe layer's forms as measured."""
  right = total = 0
  for p in constants:
    layers = sorted({r["probe"].split("/")[0] for r in rows if r["precision"] == p})
    for layer in layers:
      sub = [
        r for r in rows if r["precision"] == p and r["probe"].split("/")[0] == layer
      ]
      c = constants[p]
      est = {
        r["probe"]: c["mac"] * r["macs"]
        + c["elem"] * r["elements"]
        + c["op"] * r["ops"]
        for r in sub
      }
      meas = {r["probe"]: r["us"] for r in sub}
      right += min(est, key=est.get) == min(meas, key=meas.get)
      total += 1
  return f"{right}/{total}"


def calibrate(
  num_threads: int = 1,
  *,
  save: bool = True,
  iterations: int = 100,
  margin: float = 0.0,
  probes=PROBES,
) -> CostModel:
  """Fits the cost model on this host and caches it (seconds, not minutes).

  Converts the probe layers (:data:`PROBES`: 3x3 and 1x1 epitome layers in
  factored and stock forms) to float and int8 one-layer models, times them
  with LiteRT (``num_threads``, interleaved, median of ``iterations``) and
  fits the constants (:func:`fit`). With ``save``, the result is written to
  :func:`cache_path`, where :func:`default` (and so every export) finds it.

  Args:
    num_threads: LiteRT threads (the cache is per thread count).
    save: write the cache.
    iterations: timed invokes per probe.
    margin: the margin of the result (see :class:`CostModel`).
    probes: the probe layers (a subset of :data:`PROBES`).

  Returns:
    The host :class:`CostModel`.
  """
  from keras_epitome import litert  # noqa: PLC0415

  start = time.time()
  models = _probe_models(probes=probes)
  rows = []
  for p, probes in models.items():
    runners = {}
    for name, (tflite, _) in probes.items():
      runner = litert.LiteRTRunner(tflite, num_threads)
      runner.set_inputs(np.zeros(runner.inputs[0]["shape"], np.float32))
      runners[name] = runner
    us = time_interleaved(runners, iterations)
    for name, (_, feats) in probes.items():
      rows.append(dict(feats, precision=p, probe=name, us=us[name]))
  constants = fit(rows)
  key = host_key(num_threads)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  model = CostModel(
    constants,
    "host",
    f"host calibration on {key['cpu']}, {key['threads']} thread(s), "
    f"LiteRT {key['litert']}, {when}",
    margin,
    {
      "key": key,
      "calibrated": when,
      "seconds": round(time.time() - start, 1),
      "agreement": _agreement(rows, constants),
      "rows": rows,
    },
  )
  _log.info(
    "cost model: %s (%.0f s; ranks the probes' forms as measured for %s)",
    model,
    model.info["seconds"],
    model.info["agreement"],
  )
  if save:
    save_host(model, num_threads)
  return model


def save_host(model: CostModel, num_threads: int = 1) -> str:
  """Caches ``model`` as this host's calibration; returns the file's path.

  The model's ``info["key"]`` is set to this host's :func:`host_key`.
  """
  path = cache_path(num_threads)
  data = model.to_json()
  data["info"] = dict(data["info"], key=host_key(num_threads))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------
# User tables.


def from_table(table: Union[dict, str], name: Optional[str] = None) -> CostModel:
  """A cost model from a table measured on the target device.

  Args:
    table: a dict, or the path of a JSON file holding one, in either form:

      * constants: ``{"float": {"mac": us, "elem": us, "op": us}, "int8":
        {...}}`` (a missing term is 0; a missing precision takes the other's
        constants);
      * probe timings: ``{"timings_us": {file stem: us}}`` with the stems of
        the files :func:`write_probes` wrote (``"float__conv3x3_w32_16x16__slices"``),
        each the average latency on the device; fitted as :func:`calibrate`
        does.

      Optional keys: ``"name"`` (named in the report), ``"margin"`` (default
      0).
    name: overrides the table's name.

  Returns:
    A :class:`CostModel` with source ``"user"``.

  Raises:
    ValueError: for a table of neither form, unknown probe names or negative
      constants.
  """
  origin = None
  if isinstance(table, (str, os.PathLike)):
    origin = os.fspath(table)
    with open(origin) as f:
      table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f"cost table must be a dict or a JSON file, got {type(table)}")
  name = name or table.get("name") or (os.path.basename(origin) if origin else "table")
  margin = float(table.get("margin", 0.0))
  info = {"table": origin or "dict"}
  if "timings_us" in table:
    feats = probe_features()
    unknown = sorted(set(table["timings_us"]) - set(feats))
    if unknown:
      raise ValueError(
        f"cost table {name!r}: unknown probe(s) {unknown}; expected stems of "
        f"write_probes: {sorted(feats)}"
      )
    rows = [dict(feats[stem], us=float(us)) for stem, us in table["timings_us"].items()]
    constants = fit(rows)
    info["agreement"] = _agreement(rows, constants)
  else:
    given = {p: table[p] for p in PRECISIONS if p in table}
    if not given:
      raise ValueError(
        f"cost table {name!r}: needs 'float'/'int8' constants "
        f"({{'mac', 'elem', 'op'}}) or 'timings_us' of the probe models; "
        f"got keys {sorted(table)}"
      )
    for p, c in given.items():
      if not isinstance(c, dict) or not set(c) <= set(TERMS):
        raise ValueError(
          f"cost table {name!r}: {p} must be a dict of {TERMS}, got {c!r}"
        )
    constants = {}
    for p in PRECISIONS:
      c = given.get(p) or next(iter(given.values()))
      constants[p] = {t: float(c.get(t, 0.0)) for t in TERMS}
  for p in PRECISIONS:
    constants.setdefault(p, dict(next(iter(constants.values()))))
  return CostModel(constants, "user", f"user table '{name}'", margin, info)


def resolve(cost_model=None, num_threads: int = 1) -> CostModel:
  """The :class:`CostModel` an export uses.

  Args:
    cost_model: ``None`` (default: :func:`default`: this host's cached
      calibration, calibrating once if there is none, or the bundled
      constants with a margin under ``$KERAS_EPITOME_CALIBRATE=0``), ``"host"``
      (the cached calibration, calibrating now if there is none),
      ``"bundled"``, a :class:`CostModel`, or a user table (a dict or a JSON
      path, :func:`from_table`).
    num_threads: LiteRT threads the calibration is for.

  Raises:
    ValueError: for anything else.
  """
  if cost_model is None:
    return default(num_threads)
  if isinstance(cost_model, CostModel):
    return cost_model
  if cost_model == "bundled":
    return bundled()
  if cost_model == "host":
    return load_host(num_threads) or calibrate(num_threads)
  if isinstance(cost_model, dict) or (
    isinstance(cost_model, (str, os.PathLike)) and os.path.exists(cost_model)
  ):
    return from_table(cost_model)
  raise ValueError(
    "cost_model must be None, 'host', 'bundled', a CostModel, a dict or the "
    f"path of a JSON cost table, got {cost_model!r}"
  )
