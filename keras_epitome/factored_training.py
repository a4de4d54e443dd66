"""Training in the factored form: ``R_out(conv(R_in(x), E))`` with live offsets.

The training-time layer samples the full kernel from the epitome every step
(:func:`keras_epitome.sampling.sample_kernel`) and runs the stock
convolution with it: the convolution costs what the stock layer's does, and
the sampling adds ``O(kernel size)`` work. Within one step the routing map is
fixed (both learners know their offsets before the convolution runs), so the
same function factors as at inference (docs/design.md, the factored form)::

  conv(x, K) = R_out(conv(R_in(x), E))

with ``R_in`` and ``R_out`` linear channel remixes whose coefficients are the
interpolation weights. Each side runs in one of three ways (a
:class:`TrainPlan`):

* ``"matrix"``: the remix as a dense ``Cin x Cin_E`` (``Cout_E x Cout``)
  matrix, a 1x1 convolution. The matrix is the sampled kernel of an identity
  epitome (:func:`keras_epitome.sampling.remix_matrices`), so its values and
  the gradients reaching the offsets come from the sampler itself.
* ``"lerp"``: the remix applied to the activations directly, each chunk
  rolled (a contiguous read) and blended with its neighbouring roll
  (:func:`keras_epitome.sampling.remix_in`/``remix_out``): ``O(Cin)`` per
  position instead of ``O(Cin * Cin_E)``; wins where activations are small
  (Dense at moderate batch).
* ``"fold"``: the remix folded into the convolution's kernel, which is then
  sampled with that side's offsets (``(*S, Cin_E, Cout)`` or
  ``(*S, Cin, Cout_E)``). Spatial offsets (``S_E > S``) always fold the
  output side: each output chunk reads its own window.

With a channel roll, output chunk ``b`` reads the epitome's input channels
rolled by ``r_b``, so the chunks do not share one ``Cout_E``-channel
convolution. An unfolded output side then runs one convolution with the
*stacked rolled epitome* ``(*S, Cin_mid, B * Cout_E)`` (chunk ``b``'s block is
the epitome rolled by ``r_b``: static rolls, no interpolation) and remixes
each chunk's own ``Cout_E`` outputs (``"lerp"``: a per-chunk window;
``"matrix"``: a per-chunk ``Cout_E x Cout_E`` matrix). Its multiply-adds are
``1/A`` of the stock layer's (the input side still folds ``A``-fold), and the
kernel-sized sampling of the folded output side is gone.

Folding both sides is the sampled-kernel path. :func:`plan_for` picks the
plan with the smallest estimated cost of one forward and backward pass: the
multiply-adds of the convolution and matrix remixes, the elementwise passes of
the lerp remixes and of the sampler, with constants measured on this
machine's CPU (``benchmarks/train_step.py --plans``). The factored path
computes the same function as the sampled-kernel path, and its gradients for
the epitome and the offsets (through the interpolation weights) are equal to
float rounding (``tests/test_factored_training.py``).

Example:
  >>> import keras_epitome as ke
  >>> layer = ke.EpitomeDense(1024, compression=4, train_form="auto")
  >>> y = layer(tf.zeros([64, 1024]), training=True)
  >>> layer.train_plan(tf.TensorShape([64, 1024]))
  TrainPlan(in_mode='lerp', out_mode='lerp')
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from keras_epitome import sampling, spec

TRAIN_FORMS = spec.TRAIN_FORMS
_MODES = ("matrix", "lerp", "fold")

# Cost constants, nanoseconds on this machine's CPU (2 shared vCPUs, oneDNN,
# float32), for one forward and backward pass: per multiply-add of a
# convolution or matmul (times 3: forward, input and weight gradients), per
# activation element remixed by a lerp (forward and backward: pad, reads,
# blend, reduce), per kernel element sampled (about ten passes), per kernel
# element of a stacked rolled epitome (static rolls, forward and backward),
# and per
# TensorFlow op (graph-executor dispatch). Fitted to per-plan step times of
# the ``benchmarks/train_step.py`` shapes (``--plans`` prints them).
COST_NS = {
  "mac": 3 * 0.006,
  "lerp": 4.0,
  "sample": 4.5,
  "stack": 1.0,
  "op": 5000.0,
}
# Batch assumed when the batch dimension is not known at trace time
# (``model.fit`` traces with ``None``).
DEFAULT_BATCH = 32


class TrainPlan(NamedTuple):
  """How each channel remix runs: ``"matrix"``, ``"lerp"`` or ``"fold"``.

  ``TrainPlan("fold", "fold")`` is the sampled-kernel path.
  """

  in_mode: str
  out_mode: str

  @property
  def is_kernel(self) -> bool:
    return self.in_mode == "fold" and self.out_mode == "fold"


KERNEL_PLAN = TrainPlan("fold", "fold")


def _positions(shape, rank: int, batch: Optional[int]):
  """Batch times positions of an activation shape (unknowns: batch default, 1)."""
  shape = tf.TensorShape(shape).as_list()
  n = shape[0] if shape and shape[0] is not None else (batch or DEFAULT_BATCH)
  p = 1
  for d in shape[1:-1]:
    p *= d if d is not None else 1
  return int(n) * int(p)


def plan_cost(
  plan: TrainPlan,
  geometry: sampling.EpitomeGeometry,
  in_positions: int,
  out_positions: int,
  cost: Optional[dict] = None,
) -> float:
  """Estimated nanoseconds of one forward+backward pass of the layer under ``plan``.

  Args:
    plan: the :class:`TrainPlan`.
    geometry: the layer's geometry.
    in_positions: batch times input positions (where ``R_in`` runs).
    out_positions: batch times output positions.
    cost: constants as :data:`COST_NS` (default).

  Returns:
    The estimate, in nanoseconds.
  """
  c = COST_NS if cost is None else cost
  g = geometry
  s = int(np.prod(g.spatial)) if g.rank else 1
  cin_mid, cout_mid = mid_channels(plan, g)
  total = c["mac"] * out_positions * s * cin_mid * cout_mid + 6 * c["op"]
  if plan.in_mode == "fold" or plan.out_mode == "fold":
    # the convolution's kernel is sampled
    total += c["sample"] * s * cin_mid * cout_mid + 60 * c["op"]
  elif _stacks_rolls(plan, g):  # the rolled epitomes, stacked by static rolls
    total += c["stack"] * s * cin_mid * cout_mid + 10 * g.num_out_chunks * c["op"]
  if plan.in_mode == "matrix":
    total += c["mac"] * in_positions * g.cin * g.cin_e
    total += c["sample"] * g.cin * g.cin_e + 60 * c["op"]
  elif plan.in_mode == "lerp":
    total += c["lerp"] * in_positions * g.num_in_chunks * g.cin_e + 40 * c["op"]
  if plan.out_mode == "matrix":
    total += c["mac"] * out_positions * g.cout_e * g.cout
    total += c["sample"] * g.cout_e * g.cout + 60 * c["op"]
  elif plan.out_mode == "lerp":
    total += c["lerp"] * out_positions * g.num_out_chunks * g.cout_e + 40 * c["op"]
  return float(total)


def _stacks_rolls(plan: TrainPlan, geometry: sampling.EpitomeGeometry) -> bool:
  """Whether ``plan`` convolves with the stacked rolled epitome (see module doc)."""
  return plan.out_mode != "fold" and bool(geometry.in_rolls.any())


def mid_channels(plan: TrainPlan, geometry: sampling.EpitomeGeometry):
  """``(Cin_mid, Cout_mid)``: the channels of ``plan``'s convolution.

  A folded side keeps the layer's channels; an unfolded one the epitome's,
  ``B * Cout_E`` on the output side when the rolled epitomes are stacked.

  Example:
    >>> g = sampling.EpitomeGeometry((3, 3, 64, 64), (3, 3, 32, 32), channel_roll=1)
    >>> mid_channels(TrainPlan("matrix", "lerp"), g)
    (32, 64)
  """
  g = geometry
  cin_mid = g.cin if plan.in_mode == "fold" else g.cin_e
  if plan.out_mode == "fold":
    return cin_mid, g.cout
  stacked = _stacks_rolls(plan, g)
  return cin_mid, g.num_out_chunks * g.cout_e if stacked else g.cout_e


def candidate_plans(geometry: sampling.EpitomeGeometry):
  """The plans that apply to ``geometry``.

  Spatial slack folds the output side: each output chunk reads its own
  epitome window, so each needs its own convolution kernel. A channel roll
  does not: the chunks' rolled epitomes are stacked into one kernel.
  """
  outs = ("fold",) if geometry.slack_axes else _MODES
  return [TrainPlan(i, o) for i in _MODES for o in outs]


def plan_for(
  geometry: sampling.EpitomeGeometry,
  input_shape,
  output_shape,
  train_form: str = "auto",
  cost: Optional[dict] = None,
) -> TrainPlan:
  """The cheapest plan for one call (see :func:`plan_cost`).

  Args:
    geometry: the layer's geometry.
    input_shape, output_shape: static activation shapes (``None`` entries:
      batch :data:`DEFAULT_BATCH`, other axes 1).
    train_form: ``"kernel"`` (always the sampled kernel), ``"factored"`` (the
      cheapest plan other than the sampled kernel) or ``"auto"`` (the cheapest
      of all).
    cost: cost constants (default :data:`COST_NS`).

  Returns:
    A :class:`TrainPlan`.

  Raises:
    ValueError: for an unknown ``train_form``.

  Example:
    >>> g = sampling.EpitomeGeometry((3, 3, 64, 64), (3, 3, 32, 32))
    >>> plan_for(g, (32, 32, 32, 64), (32, 32, 32, 64))
    TrainPlan(in_mode='matrix', out_mode='matrix')
  """
  spec.check_train_form(train_form, "plan_for")
  if train_form == "kernel":
    return KERNEL_PLAN
  n_in = _positions(input_shape, geometry.rank, None)
  n_out = _positions(output_shape, geometry.rank, None)
  plans = candidate_plans(geometry)
  if train_form == "factored":
    plans = [p for p in plans if not p.is_kernel]
  return min(plans, key=lambda p: plan_cost(p, geometry, n_in, n_out, cost))


def _pointwise(x, matrix):
  """``x @ matrix`` over the last axis."""
  if x.shape.rank == 2:
    return tf.matmul(x, matrix)
  return tf.tensordot(x, matrix, [[x.shape.rank - 1], [0]])


def factored_apply(
  x,
  epitome,
  in_offsets,
  out_offsets,
  spatial_offsets,
  geometry: sampling.EpitomeGeometry,
  conv_fn,
  plan: TrainPlan,
):
  """``conv(x, K)`` computed as ``R_out(conv(R_in(x), K_mid))`` under ``plan``.

  Args:
    x: the layer's input (channels last), before any causal padding.
    epitome: the epitome tensor.
    in_offsets, out_offsets: ``(A,)`` and ``(B,)`` channel offsets.
    spatial_offsets: ``(B, rank)`` spatial offsets (used where there is slack).
    geometry: the layer's geometry.
    conv_fn: ``conv_fn(x, kernel)``: the layer's own convolution (padding,
      strides, dilation) or matmul, for any channel counts.
    plan: a :class:`TrainPlan` (``KERNEL_PLAN`` samples the full kernel).

  Returns:
    The convolution's output, ``Cout`` channels, without bias or activation,
    in ``x``'s dtype.

  Under a mixed-precision policy (``x`` in float16 or bfloat16, the epitome
  and the offsets in float32) everything computed from the variables (the
  convolution's kernel, the remix matrices, the interpolation weights) is
  computed in the variables' dtype, as on the sampled-kernel path, and only
  what meets the activations is cast to ``x``'s dtype; the lerp remixes run
  on the activations cast to the variables' dtype (the offsets' fractions
  would lose most of their bits in float16).
  """
  g = geometry
  dtype = epitome.dtype
  compute = x.dtype
  mixed = compute != dtype
  in_offsets = tf.cast(in_offsets, dtype)
  out_offsets = tf.cast(out_offsets, dtype)
  spatial = tf.cast(spatial_offsets, dtype) if g.slack_axes else None
  if plan not in candidate_plans(g):
    raise ValueError(
      f"train plan {plan} cannot compute this layer (epitome {g.epitome_shape}, "
      f"kernel {g.kernel_shape}): spatial slack needs out_mode='fold'; valid: "
      + ", ".join(map(str, candidate_plans(g)))
    )
  in_fold = plan.in_mode == "fold"
  out_fold = plan.out_mode == "fold"
  stacked = _stacks_rolls(plan, g)
  # The convolution's kernel: the epitome with the folded sides sampled in
  # (and, with a roll and an unfolded output side, one rolled copy per chunk).
  if stacked and not in_fold:
    kernel = sampling.stack_rolls(epitome, g)
  elif in_fold or out_fold:
    mid_g = sampling.EpitomeGeometry(
      g.spatial + mid_channels(plan, g),
      g.epitome_shape,
      channel_roll=g.channel_roll if (out_fold or stacked) else 0,
    )
    zero_in = tf.zeros([mid_g.num_in_chunks], dtype)
    zero_out = tf.zeros([mid_g.num_out_chunks], dtype)
    kernel = sampling.sample_kernel(
      epitome,
      in_offsets if in_fold else zero_in,
      out_offsets if out_fold else zero_out,
      spatial,
      mid_g,
    )
  else:
    kernel = epitome
  if plan.in_mode == "matrix":
    x = _pointwise(x, _to(sampling.remix_matrix_in(in_offsets, g, dtype), compute))
  elif plan.in_mode == "lerp":
    x = _to(sampling.remix_in(_to(x, dtype), in_offsets, g), compute)
  y = conv_fn(x, _to(kernel, compute))
  if stacked:
    if mixed:  # the per-chunk remix (lerp or matrix) at the variables' precision
      y = sampling.remix_out_chunks(_to(y, dtype), out_offsets, g, plan.out_mode)
      return _to(y, compute)
    return sampling.remix_out_chunks(y, out_offsets, g, plan.out_mode)
  if plan.out_mode == "matrix":
    y = _pointwise(y, _to(sampling.remix_matrix_out(out_offsets, g, dtype), compute))
  elif plan.out_mode == "lerp":
    y = _to(sampling.remix_out(_to(y, dtype), out_offsets, g), compute)
  return y


def _to(t, dtype):
  """``t`` cast to ``dtype`` (no op when it has it already)."""
  return t if t.dtype == dtype else tf.cast(t, dtype)
