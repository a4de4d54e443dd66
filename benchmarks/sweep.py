r"""Random sweep of epitome layer configurations: every one works or is refused clearly.

Each case is one epitome layer (``EpitomeDense``/``EpitomeConv1D``/
``EpitomeConv2D``) with random stock arguments (channels, kernel size,
strides, dilation, groups, padding including ``causal``, bias, activation)
and random epitome arguments (``compression`` or an explicit
``epitome_shape`` with spatial slack, sampler ``fixed``/``learned``, learner
``param``/``feature``, ``channel_roll`` 0/1/2, ``train_form``,
``offset_scale``), on a random input. About one case in five is made invalid
on purpose (a bad ratio, a fractional or oversized epitome shape, zero
channels, an unknown sampler...). A case is:

* ``passed``: the layer builds; in inference mode it equals a stock layer
  holding its sampled kernel (fractional routing map, 1e-5 of the output's
  scale); gradients reach the epitome and every learned offset (finite,
  non-zero where the offset moves the kernel: ``Cin_E > 1``, ``Cout_E > 1``,
  spatial slack); its config round-trips; a ``.keras`` save/load and
  :func:`keras_epitome.strip_epitome` give the same outputs; with
  ``--export``, the factored and materialized TFLite files
  (:func:`keras_epitome.export_tflite`, :func:`keras_epitome.run_tflite`)
  match it (1e-4 of the output's scale);
* ``refused``: a ``ValueError`` naming the layer (``EpitomeConv2D 'c7': ...``),
  at construction or build; required of every invalid case;
* ``unclear``: a ``ValueError`` that does not name the layer;
* ``crashed``: any other exception;
* ``mismatch``: a check above failed (the message says which);
* ``accepted_bad``: an invalid case was accepted.

Every case is reproducible on its own: case ``i`` of seed ``s`` draws from
``numpy.random.default_rng([s, i])`` and seeds Keras with ``s * 100003 + i``.

Usage (from the repository root):
  python -m benchmarks.sweep --cases=600 --seed=0
  python -m benchmarks.sweep --seed=0 --case=17 --verbose   # one case
  python -m benchmarks.sweep --cases=200 --export=false     # layers only
  python -m benchmarks.sweep --minutes=10 --out=benchmarks/results/sweep.json

``tests/test_sweep.py`` runs a few dozen cases of this sweep (without the
TFLite export) in the test suite.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
import warnings
from typing import Any, Dict

import numpy as np
import tensorflow as tf

import keras_epitome as ke  # noqa: I001  (selects Keras 2 before TF is used)

keras = ke.keras

CLASSES = {
  "dense": ke.EpitomeDense,
  "conv1d": ke.EpitomeConv1D,
  "conv2d": ke.EpitomeConv2D,
}
STATUSES = ("passed", "refused", "unclear", "crashed", "mismatch", "accepted_bad")
# What a case must reach: forward and round trips, and the TFLite files.
FORWARD_TOL = 1e-5
EXPORT_TOL = 1e-4
# The mutations that make a case invalid: (name, what the layer must refuse).
BAD_KINDS = (
  "compression_zero",
  "compression_nan",
  "compression_string",
  "compression_below_one",
  "shape_fraction",
  "shape_string_entry",
  "shape_wrong_rank",
  "shape_channels_too_large",
  "shape_window_too_small",
  "shape_zero",
  "zero_units",
  "zero_input_channels",
  "unknown_sampler",
  "fixed_feature",
  "offset_scale_zero",
  "routing_momentum_one",
  "channel_roll_negative",
  "train_form_unknown",
  "spatial_stride_too_large",
  "channels_first",
)


# ----------------------------------------------------------------------------
# Cases.


def _pick(rng, values):
  return values[int(rng.integers(len(values)))]


def random_case(seed: int, index: int) -> Dict[str, Any]:
  """Case ``index`` of ``seed``: a JSON-able dict (layer kwargs, input shape, intent).

  Keys: ``kind``, ``kwargs`` (the layer's arguments, name included),
  ``input_shape`` (batch included), ``bad`` (the mutation's name, or
  ``None`` for a case meant to be valid), ``seed``, ``index``.
  """
  rng = np.random.default_rng([seed, index])
  kind = _pick(rng, ("dense", "conv1d", "conv2d"))
  rank = {"dense": 0, "conv1d": 1, "conv2d": 2}[kind]
  cin = int(rng.integers(1, 25))
  cout = int(rng.integers(1, 25))
  batch = int(rng.integers(1, 4))
  kwargs: Dict[str, Any] = {"name": f"c{index}"}
  if rank:
    kernel = [int(rng.integers(1, 5)) for _ in range(rank)]
    strides = [int(_pick(rng, (1, 1, 2))) for _ in range(rank)]
    dilation = [1] * rank
    if max(strides) == 1 and rng.random() < 0.3:
      dilation = [int(_pick(rng, (1, 2))) for _ in range(rank)]
    pads = ("valid", "same", "causal") if rank == 1 else ("valid", "same")
    padding = _pick(rng, pads)
    groups = 1
    if rng.random() < 0.2:  # grouped: channels rounded to multiples of groups
      groups = int(_pick(rng, (2, 3)))
      cin = groups * max(1, cin // groups)
      cout = groups * max(1, cout // groups)
    kwargs.update(
      filters=cout,
      kernel_size=kernel,
      strides=strides,
      dilation_rate=dilation,
      padding=padding,
      groups=groups,
    )
    spatial = [
      (k - 1) * d + 1 + int(rng.integers(0, 6))
      for k, d in zip(kernel, dilation, strict=True)
    ]
    input_shape = [batch] + spatial + [cin]
    kernel_shape = kernel + [cin // groups, cout]
  else:
    kwargs["units"] = cout
    input_shape = [batch, cin] if rng.random() < 0.8 else [batch, 3, cin]
    kernel_shape = [cin, cout]
  kwargs["use_bias"] = bool(rng.random() < 0.6)
  kwargs["activation"] = _pick(rng, (None, None, "relu", "tanh"))
  # The epitome.
  if rng.random() < 0.55:
    kwargs["compression"] = float(
      np.round(
        rng.uniform(1.0, 12.0) if rng.random() < 0.85 else rng.uniform(12, 40), 2
      )
    )
  else:
    slack = [int(_pick(rng, (0, 0, 1, 2, 3))) for _ in range(rank)]
    s_e = [k + s for k, s in zip(kernel_shape[:rank], slack, strict=True)]
    cin_e = int(rng.integers(1, kernel_shape[-2] + 1))
    cout_e = int(rng.integers(1, cout + 1))
    kwargs["epitome_shape"] = s_e + [cin_e, cout_e]
  kwargs["sampler"] = "fixed" if rng.random() < 0.25 else "learned"
  if kwargs["sampler"] == "learned" and rng.random() < 0.3:
    kwargs["learner"] = "feature"
  kwargs["channel_roll"] = int(_pick(rng, (0, 1, 2)))
  kwargs["train_form"] = _pick(rng, ("auto", "auto", "kernel", "factored"))
  kwargs["offset_scale"] = float(_pick(rng, (1.0, 1.0, 10.0)))
  bad = None
  if rng.random() < 0.2:
    bad = _pick(rng, BAD_KINDS)
    _make_bad(bad, kwargs, input_shape, kernel_shape, rank, rng)
  return dict(
    seed=seed,
    index=index,
    kind=kind,
    kwargs=kwargs,
    input_shape=input_shape,
    bad=bad,
  )


def _make_bad(bad, kwargs, input_shape, kernel_shape, rank, rng):
  """Mutates a case into an invalid one (in place)."""
  shape = list(kernel_shape)

  def set_shape(value):
    kwargs.pop("compression", None)
    kwargs["epitome_shape"] = value

  if bad.startswith("compression_"):
    kwargs.pop("epitome_shape", None)
    kwargs["compression"] = {
      "compression_zero": 0,
      "compression_nan": "nan",  # JSON-able; turned into float("nan")
      "compression_string": "4",
      "compression_below_one": 0.5,
    }[bad]
  elif bad == "shape_fraction":
    set_shape(shape[:-1] + [shape[-1] - 0.5 if shape[-1] > 1 else 1.5])
  elif bad == "shape_string_entry":
    set_shape(shape[:-1] + [str(shape[-1])])
  elif bad == "shape_wrong_rank":
    set_shape(shape + [1])
  elif bad == "shape_channels_too_large":
    set_shape(shape[:-2] + [shape[-2] + int(rng.integers(1, 4)), shape[-1]])
  elif bad == "shape_window_too_small":
    if rank and max(shape[:rank]) > 1:
      axis = int(np.argmax(shape[:rank]))
      shape[axis] -= 1
      set_shape(shape[:-2] + [1, 1])
    else:
      set_shape(shape[:-2] + [1, 0])  # no window to shrink: a zero size
  elif bad == "shape_zero":
    set_shape(shape[:-1] + [0])
  elif bad == "zero_units":
    kwargs["units" if "units" in kwargs else "filters"] = 0
  elif bad == "zero_input_channels":
    input_shape[-1] = 0
  elif bad == "unknown_sampler":
    kwargs["sampler"] = "bogus"
  elif bad == "fixed_feature":
    kwargs.update(sampler="fixed", learner="feature")
  elif bad == "offset_scale_zero":
    kwargs["offset_scale"] = 0.0
  elif bad == "routing_momentum_one":
    kwargs["routing_momentum"] = 1.0
  elif bad == "channel_roll_negative":
    kwargs["channel_roll"] = -1
  elif bad == "train_form_unknown":
    kwargs["train_form"] = "fast"
  elif bad == "spatial_stride_too_large":
    # Output chunks strided past the epitome's spatial slack.
    s_e = [k + 1 for k in shape[:rank]]
    cout_e = max(1, shape[-1] // 2) if shape[-1] > 1 else 1
    set_shape(s_e + [shape[-2], cout_e])
    if not rank or shape[-1] < 2:  # nothing to stride: use a negative stride
      kwargs["spatial_stride"] = -1
    else:
      kwargs["spatial_stride"] = 2
  elif bad == "channels_first":
    if rank:
      kwargs["data_format"] = "channels_first"
    else:
      kwargs["sampler"] = "bogus"


def _decode(kwargs):
  """The kwargs a layer gets (the JSON stand-in for NaN decoded)."""
  kwargs = dict(kwargs)
  if kwargs.get("compression") == "nan":
    kwargs["compression"] = float("nan")
  return kwargs


# ----------------------------------------------------------------------------
# Checks.


class Mismatch(AssertionError):
  """A check of a built case failed."""


def _stock_with_kernel(layer, input_shape):
  """The stock layer of ``layer``'s config holding its sampled kernel."""
  config = layer.get_config()
  for key in ke.layers.EPITOME_ARGS:
    config.pop(key, None)
  config["name"] = layer.name + "_stock"
  stock = layer._stock_class.from_config(config)  # noqa: SLF001
  stock.build(input_shape)
  stock.kernel.assign(layer.kernel)
  if layer.use_bias:
    stock.bias.assign(layer.bias)
  return stock


def _randomize_routing(layer, rng):
  """Fractional offsets inside their ranges (away from the clipping bounds)."""
  g = layer.epitome_geometry
  routing = ke.RoutingMap(
    rng.uniform(0, g.cin_e, g.num_in_chunks),
    rng.uniform(0, g.cout_e, g.num_out_chunks),
    rng.uniform(0.1, 0.9, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
  )
  layer.set_routing_map(routing)


def _err(a, b, scale):
  return (
    float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) / scale
  )


def _check_built(case, model, layer, x, rng, export: bool) -> Dict[str, float]:
  """The checks of a built case; raises :class:`Mismatch`. Returns the errors."""
  errors: Dict[str, float] = {}
  _randomize_routing(layer, rng)
  y = model(x, training=False).numpy()
  if not np.all(np.isfinite(y)):
    raise Mismatch("non-finite output")
  scale = max(1.0, float(np.abs(y).max()))
  # Forward: a stock layer with the sampled kernel.
  stock = _stock_with_kernel(layer, x.shape)
  errors["forward"] = _err(stock(x), y, scale)
  if errors["forward"] > FORWARD_TOL:
    raise Mismatch(f"forward differs from the stock layer by {errors['forward']:.3g}")
  # Config round trip.
  config = layer.get_config()
  clone = type(layer).from_config(config)
  clone(x)
  clone.set_weights(layer.get_weights())
  errors["config"] = _err(clone(x, training=False), y, scale)
  if clone.get_config() != config or errors["config"] > 0:
    raise Mismatch(f"config round trip differs ({errors['config']:.3g})")
  # .keras save and load.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
  errors["keras_file"] = _err(loaded(x, training=False), y, scale)
  if errors["keras_file"] > 0:
    raise Mismatch(f".keras save/load differs by {errors['keras_file']:.3g}")
  # strip_epitome.
  stripped = ke.strip_epitome(model)
  errors["strip"] = _err(stripped(x, training=False), y, scale)
  if errors["strip"] > FORWARD_TOL:
    raise Mismatch(f"strip_epitome differs by {errors['strip']:.3g}")
  if export:
    for form in ("factored", "materialized"):
      flatbuffer = ke.export_tflite(model, form=form)
      got = ke.run_tflite(flatbuffer, x)
      errors[f"tflite_{form}"] = _err(got, y, scale)
      if errors[f"tflite_{form}"] > EXPORT_TOL:
        raise Mismatch(f"TFLite {form} differs by {errors[f'tflite_{form}']:.3g}")
  # Gradients to the epitome and the learned offsets (last: a training call
  # moves the feature learner's moving routing map).
  with tf.GradientTape() as tape:
    out = model(x, training=True)
    loss = tf.reduce_sum(out * tf.sin(out + 0.3))
  variables = layer.trainable_variables
  grads = tape.gradient(loss, variables)
  g = layer.epitome_geometry
  moving = {"epitome": True, "in_offsets": g.cin_e > 1, "out_offsets": g.cout_e > 1}
  moving["spatial_offsets"] = bool(g.slack_axes)
  for var, grad in zip(variables, grads, strict=True):
    short = var.name.split("/")[-1].split(":")[0]
    if short not in moving:
      continue
    if grad is None:
      raise Mismatch(f"no gradient for {short}")
    grad = tf.convert_to_tensor(grad).numpy()
    if not np.all(np.isfinite(grad)):
      raise Mismatch(f"non-finite gradient for {short}")
    if moving[short] and not np.abs(grad).max() > 0 and np.abs(y).max() > 0:
      raise Mismatch(f"zero gradient for {short}")
  names = {v.name.split("/")[-1].split(":")[0] for v in variables}
  if case["kwargs"].get("sampler") == "learned" and not {"in_offsets"} <= names:
    raise Mismatch(f"learned offsets are not trainable: {sorted(names)}")
  return errors


def run_case(case: Dict[str, Any], export: bool = False) -> Dict[str, Any]:
  """Builds and checks one case (see the module docstring); never raises.

  Returns:
    ``{"status", "message", "errors", "warnings", "seconds", "case"}``;
    ``warnings`` holds the layer's own ``UserWarning``s (a ratio it falls
    short of).
  """
  start = time.perf_counter()
  keras.backend.clear_session()
  keras.utils.set_random_seed(case["seed"] * 100003 + case["index"])
  rng = np.random.default_rng([case["seed"], case["index"], 1])
  cls = CLASSES[case["kind"]]
  kwargs = _decode(case["kwargs"])
  desc = f"{cls.__name__} '{kwargs['name']}'"
  x = rng.standard_normal(case["input_shape"]).astype("float32")
  result: Dict[str, Any] = {"case": case, "errors": {}, "message": ""}
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter("always", UserWarning)
    try:
      layer = cls(**kwargs)
      inputs = keras.Input(case["input_shape"][1:])
      model = keras.Model(inputs, layer(inputs))
    except ValueError as e:
      named = desc in str(e)
      result.update(status="refused" if named else "unclear", message=str(e)[:500])
    except Exception as e:  # noqa: BLE001  (what the sweep is looking for)
      result.update(status="crashed", message=_crash(e))
    else:
      if case["bad"] is not None:
        result.update(status="accepted_bad", message=f"accepted {case['bad']}")
      else:
        try:
          result["errors"] = _check_built(case, model, layer, x, rng, export)
          result["status"] = "passed"
        except Mismatch as e:
          result.update(status="mismatch", message=str(e))
        except Exception as e:  # noqa: BLE001
          result.update(status="crashed", message=_crash(e))
  result["warnings"] = [
    str(w.message)[:300] for w in warned if str(w.message).startswith(desc)
  ]
  result["seconds"] = time.perf_counter() - start
  return result


def _crash(e: BaseException) -> str:
  tb = traceback.extract_tb(e.__traceback__)
  where = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
  return f"{type(e).__name__}{where}: {str(e)[:400]}"


def summarize(results, seed: int, seconds: float, export: bool) -> Dict[str, Any]:
  """Counts per status, the largest errors and the failing cases."""
  counts = {s: 0 for s in STATUSES}
  for r in results:
    counts[r["status"]] += 1
  max_errors: Dict[str, float] = {}
  for r in results:
    for key, value in r["errors"].items():
      max_errors[key] = max(max_errors.get(key, 0.0), value)
  bad = [r for r in results if r["status"] not in ("passed", "refused")]
  refused_reasons: Dict[str, int] = {}
  for r in results:
    if r["status"] == "refused":
      key = r["case"]["bad"] or "valid-looking: " + _reason(r["message"])
      refused_reasons[key] = refused_reasons.get(key, 0) + 1
  import platform

  return dict(
    environment={"python": platform.python_version(), "tensorflow": tf.__version__},
    command=f"python -m benchmarks.sweep --cases={len(results)} --seed={seed}"
    + ("" if export else " --export=false"),
    seed=seed,
    cases=len(results),
    export=export,
    seconds=round(seconds, 1),
    counts=counts,
    invalid_cases=sum(r["case"]["bad"] is not None for r in results),
    warned_ratio_shortfall=sum(
      any("achieved" in w for w in r.get("warnings", [])) for r in results
    ),
    max_errors=max_errors,
    refused=dict(sorted(refused_reasons.items())),
    failures=[
      dict(
        index=r["case"]["index"],
        status=r["status"],
        message=r["message"],
        case=r["case"],
      )
      for r in bad
    ],
  )


def _reason(message: str) -> str:
  """A short key for a refusal of a valid-looking case."""
  text = message.split(": ", 1)[-1]
  for key in (
    "too large for kernel",
    "plus its routing map",
    "does not fit",
    "spatial size",
    "must not exceed",
  ):
    if key in text:
      return key
  return text[:60]


# ----------------------------------------------------------------------------
# Command line.


def main(argv):
  del argv
  from absl import flags, logging

  f = flags.FLAGS
  export = f.export
  logging.set_verbosity(logging.WARNING)  # the converter's INFO lines
  tf.get_logger().setLevel("ERROR")  # retracing warnings: many small models
  if f.case is not None:
    result = run_case(random_case(f.seed, f.case), export=export)
    print(json.dumps(result, indent=1, default=str))
    return
  deadline = time.time() + 60 * f.minutes if f.minutes else math.inf
  results = []
  start = time.perf_counter()
  for index in range(f.cases):
    if time.time() > deadline:
      break
    r = run_case(random_case(f.seed, index), export=export)
    results.append(r)
    if f.verbose or r["status"] not in ("passed", "refused"):
      print(f"case {index}: {r['status']} {r['message'][:200]}", flush=True)
  summary = summarize(results, f.seed, time.perf_counter() - start, export)
  text = json.dumps(summary, indent=1, default=str)
  print(
    json.dumps(
      {k: summary[k] for k in ("command", "cases", "seconds", "counts", "max_errors")},
      indent=1,
    )
  )
  if summary["failures"]:
    print(
      f"{len(summary['failures'])} failing cases (reproduce one with "
      f"--seed={f.seed} --case=INDEX --verbose)"
    )
  if f.out:
    os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
    with open(f.out, "w") as fh:
      fh.write(text + "\n")


def _define_flags():
  from absl import flags

  flags.DEFINE_integer("cases", 600, "Number of cases.")
  flags.DEFINE_integer("seed", 0, "Sweep seed.")
  flags.DEFINE_integer("case", None, "Run only this case index, print it in full.")
  flags.DEFINE_bool("export", True, "Also export and run both TFLite forms per case.")
  flags.DEFINE_float("minutes", 0.0, "Stop after this many minutes (0: no limit).")
  flags.DEFINE_string("out", None, "Write the JSON summary here.")
  flags.DEFINE_bool("verbose", False, "Print every case.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
