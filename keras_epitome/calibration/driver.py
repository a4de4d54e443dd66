"""The model-level pass: :func:`calibrate` fits a converted model to the data.

The layers are fitted one at a time in network order
(:mod:`keras_epitome.calibration.least_squares`), each on the converted
model's own activations, with the BatchNorm refits
(:mod:`keras_epitome.calibration.batchnorm`) after each one and the optional
gradient passes (:mod:`keras_epitome.calibration.gradient`) at the end. Both
models are run once over the data, node by node
(:class:`keras_epitome.calibration.graph.Activations`), so the cost grows
with the depth of the network, not with its square. After the fit the
converted model's output is checked against the original's
(``CalibrationConfig.output_check``).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from keras_epitome import layers as epitome_layers
from keras_epitome.backend import keras
from keras_epitome.calibration import batchnorm, data, gradient, graph, least_squares
from keras_epitome.calibration.config import CalibrationConfig
from keras_epitome.calibration.report import LayerCalibration

# The output check. A least-squares fit never does worse than a constant
# output at the mean (relative error 1), so a converted model whose output
# error is above that (and, for class scores, whose top-1 choices agree with
# the original's on fewer than _CHECK_AGREEMENT of the samples) is flagged.
_CHECK_FLOOR = 1.0
_CHECK_AGREEMENT = 0.9
# The per-layer trace compares the layers' outputs on this many samples.
_TRACE_SAMPLES = 64
# In the per-layer trace, the first layer whose error is above the floor and
# this many times the largest error before it is named as the culprit.
_CHECK_FACTOR = 2.0


def _relative(s: np.ndarray, t: np.ndarray) -> float:
  """``|s - t| / |t - mean(t)|`` (means per last-axis channel), in float64."""
  t = np.asarray(t)
  axes = tuple(range(t.ndim - 1)) if t.ndim > 1 else None
  centred = (t - t.mean(axes, dtype=np.float64)).ravel()
  diff = (np.asarray(s, np.float64) - t).ravel()
  ref = float(np.dot(centred, centred))
  err = float(np.dot(diff, diff))
  if not math.isfinite(err):
    return math.inf
  return math.sqrt(err / max(ref, 1e-30))


def calibrate(
  student,
  teacher,
  calibration_data,
  config: Optional[CalibrationConfig] = None,
  *,
  pairs: Optional[Sequence[Tuple[Any, Any]]] = None,
) -> List[LayerCalibration]:
  """Fits ``student``'s epitome layers to reproduce ``teacher``'s layer outputs.

  See :mod:`keras_epitome.calibration` for the method. ``student`` is changed
  in place: epitomes, routing maps (learned sampler, integer offsets),
  biases, the moving statistics (and, by default, scale and offset) of
  BatchNormalization layers after the first epitome layer, and the stock
  Conv/Dense layers after it (``CalibrationConfig.refit_stock_layers``).
  Progress is logged per layer (absl, INFO).

  Args:
    student: the converted model (e.g. from :func:`keras_epitome.epitomize`),
      functional or Sequential with one input.
    teacher: the original model, with the same layer names.
    calibration_data: inputs (see :func:`calibration_array`); a few hundred
      samples usually suffice.
    config: the options (:class:`CalibrationConfig`; default: its defaults).
    pairs: ``(teacher_layer, student_layer)`` to fit; default: every top-level
      epitome layer of ``student`` and the teacher layer of the same name.

  Returns:
    One :class:`LayerCalibration` per fitted layer; then, after kept gradient
    passes, ``"<model> (output)"`` (with ``output_steps``) and ``"<model>
    (batchnorm)"`` (the statistics re-estimated, in its note); and
    ``"<model> (check)"``, the converted model's output error against the
    original's on the calibration data (``block_error``).

  Raises:
    ValueError: for bad calibration data (see :func:`calibration_array`), a
      ``config`` that is not a :class:`CalibrationConfig`, or teacher/student
      pairs that do not match.
    numpy.linalg.LinAlgError: naming the layer whose least squares failed.
    RuntimeError: with ``output_check="raise"``, for a converted model whose
      output is far from the original's (naming the first layer whose error
      jumped).

  Example:
    >>> import numpy as np
    >>> import keras_epitome as ke
    >>> keras = ke.keras
    >>> teacher = keras.Sequential([keras.Input((16,)),
    ...                             keras.layers.Dense(64, name="d")], name="tiny")
    >>> student = ke.epitomize(teacher, 4, init="random", verbose=False)
    >>> x = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
    >>> [r.name for r in calibrate(student, teacher, x)]
    ['d', 'tiny (check)']
  """
  if config is None:
    config = CalibrationConfig()
  if not isinstance(config, CalibrationConfig):
    raise ValueError(
      f"calibrate: config must be a CalibrationConfig, got {type(config).__name__}"
    )
  exp = config.experimental
  x = data.calibration_array(calibration_data, teacher, config.max_samples)
  if pairs is None:
    by_name = {la.name: la for la in teacher.layers}
    pairs = [
      (by_name[la.name], la)
      for la in student.layers
      if isinstance(la, epitome_layers.EPITOME_LAYERS) and la.name in by_name
    ]
  records: List[LayerCalibration] = []
  order = {id(la): i for i, la in enumerate(student.layers)}
  work = []
  for old, new in pairs:
    if not isinstance(new, epitome_layers.EPITOME_LAYERS):
      raise ValueError(
        f"calibrate: student layer '{new.name}' is a {type(new).__name__}, "
        "not an epitome layer"
      )
    if tuple(old.kernel.shape) != new.epitome_geometry.kernel_shape:
      raise ValueError(
        f"calibrate: teacher layer '{old.name}' has kernel shape "
        f"{tuple(old.kernel.shape)}, student layer '{new.name}' samples "
        f"{new.epitome_geometry.kernel_shape}"
      )
    record = LayerCalibration(new.name)
    records.append(record)
    reason = least_squares.supported(new)
    if id(new) not in order:
      reason = "the layer is inside a nested model"
    elif len(getattr(new, "_inbound_nodes", [])) != 1:
      reason = "the layer is called more than once"
    if reason:
      record.note = reason + "; kept the weight fit"
      continue
    work.append((order[id(new)], old, new, record))
  work.sort(key=lambda t: t[0])
  if not work:
    return records
  fit_kwargs = dict(
    ridge=config.ridge,
    search=exp.search,
    sweeps=exp.search_sweeps,
    max_candidates=exp.max_candidates,
  )
  if not (graph.Activations.supports(student) and graph.Activations.supports(teacher)):
    for _, _, _, record in work:
      record.note = "no functional path from the model input; kept the weight fit"
    return records
  batch_size = config.batch_size
  s_act = graph.Activations(student, x, batch_size)
  t_act = graph.Activations(teacher, x, batch_size)

  teacher_by_name = {la.name: la for la in teacher.layers}
  first = work[0][0]
  fit_at = {position: (old, new, record) for position, old, new, record in work}
  refit_names = {new.name for _, _, new, _ in work}
  if config.refit_stock_layers:
    refit_names |= {
      la.name
      for i, la in enumerate(student.layers)
      if i > first
      and type(la) in epitome_layers.STOCK_TO_EPITOME
      and not least_squares.supported(la)
      and type(teacher_by_name.get(la.name)) is type(la)
      and len(getattr(la, "_inbound_nodes", [])) == 1
    }
  perm_of: Dict[str, Optional[np.ndarray]] = {}  # output channel order per layer
  trace: List[Tuple[str, float]] = []  # (layer, error of its output), in order

  def input_perm(layer):
    inbound = graph.single_inbound(layer)
    return None if inbound is None else perm_of.get(inbound.name)

  def check_output(layer):
    """The error of ``layer``'s output against the teacher's, for the trace."""
    old = teacher_by_name.get(layer.name)
    if (
      config.output_check == "off"
      or old is None
      or len(getattr(layer, "_inbound_nodes", [])) != 1
      or len(getattr(old, "_inbound_nodes", [])) != 1
      or isinstance(layer.output, (list, tuple))
    ):
      return
    s = s_act.value(layer.output)[:_TRACE_SAMPLES]
    t = t_act.value(old.output)[:_TRACE_SAMPLES]
    perm = perm_of.get(layer.name)
    if perm is not None:
      t = t[..., perm]
    if s.shape != t.shape:
      return
    if config.refit_batchnorm and graph.feeds_only_batchnorm(layer):
      # Fitted up to a per-channel shift, which the BatchNorm after it takes.
      axes = tuple(range(s.ndim - 1))
      s, t = s - s.mean(axes), t - t.mean(axes)
    trace.append((layer.name, _relative(s, t)))

  pending = []  # blocks to reconstruct once all their layers are refitted

  def flush(before_position):
    nonlocal s_act
    while pending and order.get(id(pending[0][1]), -1) < before_position:
      new, end, record = pending.pop(0)
      target = data.predict(
        keras.Model(teacher.inputs, teacher_by_name[end.name].output), x, batch_size
      )
      perm = perm_of.get(end.name)
      if perm is not None:
        target = target[..., perm]
      gradient.reconstruct_block(
        student,
        new,
        end,
        x,
        target,
        record,
        batch_size,
        exp.reconstruct_steps,
        config.learning_rate,
        config.seed,
      )
      # The block's weights changed: its stored activations are stale.
      s_act = graph.Activations(student, x, batch_size)

  total = len(work)
  done = 0
  for position, layer in enumerate(student.layers):
    flush(position)
    if position in fit_at:
      old, new, record = fit_at[position]
      done += 1
      start = time.perf_counter()
      xs = s_act.value(new.input)
      xt = t_act.value(old.input)
      may_permute = config.permute_channels and graph.permutable(new, refit_names)
      perm_of[new.name] = least_squares.fit_layer(
        old,
        new,
        xs,
        xt,
        record,
        config.refit_batchnorm,
        batch_size,
        fit_kwargs,
        input_perm(new),
        may_permute,
      )
      del xs, xt
      if exp.reconstruct_steps:
        pending.append(
          (new, gradient.block_end(new, refit_names, teacher_by_name), record)
        )
      else:
        check_output(new)
      record.seconds = time.perf_counter() - start
      logging.info(
        "calibrating layer %d/%d '%s': output error %.3g, %.1f s",
        done,
        total,
        new.name,
        record.output_error,
        record.seconds,
      )
      continue
    if position < first:
      continue
    perm = input_perm(layer)
    if graph.channelwise(layer):
      perm_of[layer.name] = perm
    old = teacher_by_name.get(layer.name)
    if old is None or type(old) is not type(layer):
      continue
    if len(getattr(layer, "_inbound_nodes", [])) != 1:
      continue
    if isinstance(layer, keras.layers.BatchNormalization):
      if perm is not None:
        layer.set_weights([w[perm] for w in old.get_weights()])
      if config.refit_batchnorm and graph.channelwise(layer):
        target = None
        if config.batchnorm_affine:
          target = t_act.value(old.output)
          if perm is not None:
            target = target[..., perm]
        batchnorm.refit_batchnorm(layer, s_act.value(layer.input), target)
    elif layer.name in refit_names:
      start = time.perf_counter()
      record = LayerCalibration(layer.name, note="refitted to the data")
      least_squares.fit_layer(
        old,
        layer,
        s_act.value(layer.input),
        t_act.value(old.input),
        record,
        config.refit_batchnorm,
        batch_size,
        fit_kwargs,
        perm,
        False,
      )
      record.seconds = time.perf_counter() - start
      logging.info(
        "calibrating stock layer '%s': output error %.3g, %.1f s",
        layer.name,
        record.output_error,
        record.seconds,
      )
      records.append(record)
    if not pending:
      check_output(layer)
  flush(len(student.layers))
  if config.output_steps:
    matched = gradient.match_outputs(
      student,
      teacher,
      x,
      refit_names,
      first,
      batch_size,
      config.output_steps,
      config.learning_rate,
      config.seed,
    )
    if matched is not None:
      records.append(
        LayerCalibration(
          f"{student.name} (output)",
          reconstructed_to=student.layers[-1].name,
          block_error_before=matched[0],
          block_error=matched[1],
          note="output matching over all fitted layers",
        )
      )
  moved = any(
    r.block_error is not None and r.block_error < r.block_error_before for r in records
  )
  if config.refit_batchnorm and moved:
    bns = [
      la
      for i, la in enumerate(student.layers)
      if i > first
      and isinstance(la, keras.layers.BatchNormalization)
      and graph.channelwise(la)
      and not getattr(la, "renorm", False)
      and len(getattr(la, "_inbound_nodes", [])) == 1
    ]
    if bns:
      shift = batchnorm.restandardize_batchnorms(student, bns, x, batch_size)
      records.append(
        LayerCalibration(
          f"{student.name} (batchnorm)",
          note=(
            f"moving statistics of {len(bns)} BatchNormalization layer(s) "
            "re-estimated after the gradient passes, scale and offset "
            f"adjusted to keep the function (largest mean shift {shift:.3g} "
            "moving std)"
          ),
        )
      )
  if config.output_check != "off" and len(student.outputs) == 1:
    if moved:  # the gradient passes changed the weights after the walk
      s_act = graph.Activations(student, x, batch_size)
    records.append(
      _check_output(
        student,
        s_act.value(student.outputs[0]),
        t_act.value(teacher.outputs[0]),
        trace,
        config.output_check,
      )
    )
  return records


def _check_output(student, out, target, trace, mode) -> LayerCalibration:
  """The ``"<model> (check)"`` record; warns or raises for a broken conversion."""
  error = _relative(out, target)
  note = f"output error against the original model on {len(target)} samples"
  if target.ndim == 2 and target.shape[-1] > 1 and np.isfinite(out).all():
    agree = float(np.mean(np.argmax(out, -1) == np.argmax(target, -1)))
    note += f", top-1 agreement {agree:.1%}"
    # Class scores: a model that still picks the same classes is not broken.
    agrees = agree >= _CHECK_AGREEMENT
  else:
    agrees = False
  broken = not math.isfinite(error) or (error > _CHECK_FLOOR and not agrees)
  record = LayerCalibration(
    f"{student.name} (check)",
    reconstructed_to=student.layers[-1].name,
    block_error=error,
    note=note,
    layer_errors=dict(trace),
  )
  if broken:
    culprit = _first_jump(trace)
    message = (
      f"calibrate: the converted model '{student.name}' is far from the "
      f"original on the calibration data: output error {error:.3g} (relative "
      "to the output's spread: above 1 is worse than a constant output)"
      + (
        f"; the error first jumps at layer '{culprit[0]}' ({culprit[1]:.3g})"
        if culprit
        else ""
      )
    )
    record.note += "; " + message
    if mode == "raise":
      raise RuntimeError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
  return record


def _first_jump(trace: Sequence[Tuple[str, float]]) -> Optional[Tuple[str, float]]:
  """The first layer whose output error is non-finite or far above those before."""
  worst = 0.0
  for name, err in trace:
    if not math.isfinite(err) or (err > _CHECK_FLOOR and err > _CHECK_FACTOR * worst):
      return name, err
    worst = max(worst, err)
  return max(trace, key=lambda t: t[1]) if trace else None
