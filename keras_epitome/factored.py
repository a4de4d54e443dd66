"""Factored inference form: ``R_out(conv(R_in(x), E))`` (docs/design.md section 4.2).

With its routing map frozen, an epitome layer's convolution factors into

* ``R_in``: each input chunk rolled along channels by its offset, the two
  neighbouring rolls blended by the fractional part, the chunks summed:
  ``Cin -> Cin_E`` channels;
* one convolution with the epitome itself as a constant ``Cin_E x Cout_E``
  kernel (with spatial slack: the distinct epitome windows concatenated on
  the output channels, still one convolution);
* ``R_out``: each output chunk read back from the ``Cout_E`` channels, rolled
  and blended the same way, then a per-channel scale (a folded
  ``BatchNormalization``), a bias and the activation.

The rolls are static slices and a concat, the blends elementwise multiplies
and adds: LiteRT's XNNPACK delegate runs all of them (it does not run
``GATHER``), the file stores the epitome, not the full kernel, and the
multiply-adds drop from ``prod(S) * Cin * Cout`` to
``prod(S) * Cin_E * Cout_E`` per output position plus ``O(Cin + Cout)``.
The index math (which slices, which weights) comes from
:func:`keras_epitome.sampling.factored_plan`.

:func:`factorize` swaps every epitome layer of a model for its factored layer.

``remix="matmul"`` runs ``R_in`` and ``R_out`` as two 1x1 convolutions
holding the same linear maps instead: 3 ops per layer instead of up to ~30
(fractional offsets, 2x2 chunks), with the BatchNorm scale, bias and activation
fused into the second, at the cost of storing ``Cin * Cin_E + Cout_E * Cout``
more weights. The slices form gives the smallest file and is fast on wide
layers, while each of its elementwise ops is a full pass over the
activations, which can cost more than the convolution saves on narrow layers
and in int8, where the matmul form is faster (measurements:
``docs/results.md``).

With a channel roll (the layers' default) each output chunk reads the
epitome's input channels rolled by its own amount, so the slices form runs
one epitome convolution per distinct roll on rolled activations (still
storing the epitome once). ``remix="fold_slices"`` / ``"fold_matmul"`` fold
``R_out`` (rolls, spatial windows, blends and the BatchNorm scale) into one
``(*S, Cin_E, Cout)`` kernel instead: the input remix (slices or a 1x1
convolution) and one convolution, ``1/A`` of the stock multiply-adds, storing
``Cin_E * Cout`` per tap. :data:`FORMS` lists all four.

Example:
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((32, 32, 64)),
  ...     ke.EpitomeConv2D(64, 3, padding="same", use_bias=False, compression=4),
  ...     keras.layers.BatchNormalization(),
  ...     keras.layers.ReLU(),
  ... ])
  >>> fast = ke.factorize(model, remix="slices")  # the BatchNorm is folded into R_out
  >>> [type(l).__name__ for l in fast.layers]
  ['FactoredConv2D', 'ReLU']
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from keras_epitome import sampling
from keras_epitome.backend import keras
from keras_epitome.layers import EpitomeMixin

REMIXES = ("slices", "matmul")
# Forms of :meth:`FactoredMixin.from_epitome_layer`: the remixes, and the same
# with ``R_out`` folded into the kernel (``"fold_slices"``, ``"fold_matmul"``).
FORMS = REMIXES + ("fold_slices", "fold_matmul")


def _merge_ranges(ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
  out: List[Tuple[int, int]] = []
  for start, stop in ranges:
    if out and out[-1][1] == start:
      out[-1] = (out[-1][0], stop)
    else:
      out.append((start, stop))
  return out


def _take(x, ranges: Sequence[Tuple[int, int]], width: int):
  """``x``'s channels at ``ranges`` (static slices, one concat)."""
  ranges = _merge_ranges(ranges)
  if ranges == [(0, width)]:
    return x
  parts = [x if (a, b) == (0, width) else x[..., a:b] for a, b in ranges]
  return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What a factored layer computes, besides its weights and activation.

  Built from a frozen routing map by :meth:`FactoredMixin.from_epitome_layer`
  (the index math: :func:`keras_epitome.sampling.factored_plan`); the
  layers' ``get_config`` stores its fields flat, as before it existed.

  Attributes:
    filters: output channels ``Cout`` (``units`` of :class:`FactoredDense`).
    input_channels: ``Cin``.
    epitome_shape: ``(*S, Cin_E, Cout_E)``: the kernel window and the
      epitome's channels.
    num_windows: distinct spatial windows ``W`` (the kernel holds ``W``
      windows concatenated on its output channels).
    window_of_chunk: ``(B,)`` window each output chunk reads.
    in_shift, in_frac: ``(A,)`` roll and blend weight of each input chunk.
    out_shift, out_frac: ``(B,)`` roll and blend weight of each output chunk.
    use_scale: whether a per-output-channel scale (a folded BatchNorm) is
      applied after ``R_out``.
    use_bias: whether a bias is added after ``R_out``.
    window_rolls: ``None``, or ``(W,)`` input-channel rolls: the windows are
      one stored epitome read with the input channels rolled (the layer's
      ``channel_roll``), so the kernel holds the epitome once and window
      ``w`` convolves the activations rolled by ``-window_rolls[w]``.
  """

  filters: int
  input_channels: int
  epitome_shape: Tuple[int, ...]
  num_windows: int
  window_of_chunk: Tuple[int, ...]
  in_shift: Tuple[int, ...]
  in_frac: Tuple[float, ...]
  out_shift: Tuple[int, ...]
  out_frac: Tuple[float, ...]
  use_scale: bool = False
  use_bias: bool = True
  window_rolls: Optional[Tuple[int, ...]] = None

  def __post_init__(self):
    ints = ("window_of_chunk", "in_shift", "out_shift")
    for name in ("filters", "input_channels", "num_windows"):
      object.__setattr__(self, name, int(getattr(self, name)))
    object.__setattr__(self, "epitome_shape", tuple(int(d) for d in self.epitome_shape))
    for name in ints:
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    for name in ("in_frac", "out_frac"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    object.__setattr__(self, "use_scale", bool(self.use_scale))
    object.__setattr__(self, "use_bias", bool(self.use_bias))
    if self.window_rolls is not None:
      object.__setattr__(self, "window_rolls", tuple(int(r) for r in self.window_rolls))

  def config(self, filters_key: str = "filters") -> dict:
    """The fields as the layers' ``get_config`` stores them (lists, flat)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[filters_key if f.name == "filters" else f.name] = (
        list(value) if isinstance(value, tuple) else value
      )
    return out

  @classmethod
  def pop_config(cls, config: dict, filters_key: str = "filters") -> "LayerPlan":
    """The plan held flat in ``config`` (a layer config); its keys are removed."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name in names:
      key = filters_key if name == "filters" else name
      if key in config:
        values[name] = config.pop(key)
    missing = [n for n in names[:9] if n not in values]
    if missing:
      raise TypeError(f"factored layer: missing plan argument(s) {', '.join(missing)}")
    return cls(**values)


def _plan_argument(plan, kwargs, filters_key):
  """``plan`` (a :class:`LayerPlan`, or its config dict), else the flat keys in ``kwargs``."""
  if isinstance(plan, LayerPlan):
    return plan
  if isinstance(plan, dict):
    return LayerPlan.pop_config(dict(plan), filters_key)
  if plan is not None:  # the first positional argument of the flat form
    kwargs[filters_key] = plan
  return LayerPlan.pop_config(kwargs, filters_key)


class FactoredMixin:
  """Shared implementation of the factored layers (see module docstring).

  Args:
    plan: a :class:`LayerPlan` (what the layer computes). The layers also
      take its fields as keyword arguments (``filters``/``units``,
      ``input_channels``, ``epitome_shape``, ...), the form their
      ``get_config`` stores.
    activation: applied last.
    remix: ``"slices"`` or ``"matmul"`` (see :meth:`from_epitome_layer`).

  Weights: ``kernel`` ``(*S, Cin_E, W * Cout_E)``; ``out_weights``
  ``(k, Cout)`` with ``k = 2`` (blend weights of the two rolls, scale
  included) when an output offset is fractional, ``1`` (the scale) when only
  ``use_scale``, absent otherwise; ``bias`` ``(Cout,)``.

  Build one from a trained layer with :meth:`from_epitome_layer`.
  """

  _rank = 0
  _filters_key = "filters"

  def _init_factored(self, plan: LayerPlan, activation, remix="slices"):
    self.plan = plan
    for f in dataclasses.fields(plan):
      value = getattr(plan, f.name)
      # The per-chunk lists stay lists, as the layers had them before.
      if isinstance(value, tuple) and f.name != "epitome_shape":
        value = list(value)
      setattr(self, f.name, value)
    self.activation = keras.activations.get(activation)
    self.remix = str(remix)
    desc = f"{type(self).__name__} '{self.name}'"
    if self.remix not in REMIXES:
      raise ValueError(
        f"{desc}: remix must be one of {', '.join(REMIXES)}, got {remix!r}"
      )
    if len(self.epitome_shape) != self._rank + 2:
      raise ValueError(
        f"{desc}: epitome_shape {self.epitome_shape} must have {self._rank + 2} entries"
      )
    # The channel chunks, as the sampler cuts them.
    try:
      self._channels = sampling.EpitomeGeometry(
        (self.input_channels, self.filters), self.epitome_shape[-2:]
      )
    except ValueError as e:
      raise ValueError(f"{desc}: {e}") from None
    a, b = self._channels.num_in_chunks, self._channels.num_out_chunks
    for what, values, want in (
      ("in_shift", self.in_shift, a),
      ("in_frac", self.in_frac, a),
      ("out_shift", self.out_shift, b),
      ("out_frac", self.out_frac, b),
      ("window_of_chunk", self.window_of_chunk, b),
    ):
      if len(values) != want:
        raise ValueError(
          f"{desc}: {what} has {len(values)} entries, expected {want} (one per chunk)"
        )
    if self.window_rolls is not None and len(self.window_rolls) != self.num_windows:
      raise ValueError(
        f"{desc}: window_rolls {list(self.window_rolls)} must have num_windows="
        f"{self.num_windows} entries"
      )
    if any(not 0 <= w < self.num_windows for w in self.window_of_chunk):
      raise ValueError(
        f"{desc}: window_of_chunk {list(self.window_of_chunk)} must index "
        f"num_windows={self.num_windows}"
      )
    self._initial_values: Dict[str, np.ndarray] = {}

  # -- structure ---------------------------------------------------------------

  @property
  def _in_is_identity(self) -> bool:
    return (
      len(self.in_shift) == 1
      and self.in_shift[0] == 0
      and self.in_frac[0] == 0.0
      and self.input_channels == self.epitome_shape[-2]
    )

  @property
  def _out_is_identity(self) -> bool:
    """``R_out`` is the identity: one window of all ``Cout`` channels, unshifted."""
    return (
      self.num_windows == 1
      and self.window_rolls is None
      and self.epitome_shape[-1] == self.filters
      and not any(self.out_shift)
      and not any(self.out_frac)
      and not self.use_scale
    )

  @property
  def _num_out_taps(self) -> int:
    if self.remix == "matmul":
      return 0
    if any(f != 0.0 for f in self.out_frac):
      return 2
    return 1 if self.use_scale else 0

  def _out_ranges(self, extra: int) -> List[Tuple[int, int]]:
    """Channels of ``Y`` that make up ``y`` (each chunk rolled by shift + extra)."""
    coe = self.epitome_shape[-1]
    ranges = []
    for b, (w, m) in enumerate(zip(self.window_of_chunk, self.out_shift, strict=True)):
      length = min(coe, self.filters - b * coe)
      base = w * coe
      for start, stop in sampling.roll_slices(m + extra, coe, length):
        ranges.append((base + start, base + stop))
    return ranges

  def macs_per_position(self) -> int:
    """Multiply-adds per output position: the convolution and the blends."""
    s = int(np.prod(self.epitome_shape[:-2])) if self._rank else 1
    ce, coe = self.epitome_shape[-2:]
    macs = s * ce * coe * self.num_windows
    if self.remix == "matmul":
      if not self._in_is_identity:
        macs += self.input_channels * ce
      if self._out_is_identity:
        return macs
      return macs + self.num_windows * coe * self.filters
    macs += 2 * ce * sum(1 for f in self.in_frac if f != 0.0)
    if self._num_out_taps == 2:
      macs += 2 * self.filters
    elif self._num_out_taps == 1:
      macs += self.filters
    return macs

  # -- build / call ------------------------------------------------------------

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    cin = input_shape[-1]
    if cin is not None and int(cin) != self.input_channels:
      raise ValueError(
        f"{type(self).__name__} '{self.name}': input has {cin} channels, "
        f"expected {self.input_channels}"
      )
    windows = 1 if self.window_rolls is not None else self.num_windows
    shapes = {
      "kernel": self.epitome_shape[:-1] + (windows * self.epitome_shape[-1],),
    }
    if self._num_out_taps:
      shapes["out_weights"] = (self._num_out_taps, self.filters)
    if self.remix == "matmul":
      if not self._in_is_identity:
        shapes["in_matrix"] = (self.input_channels, self.epitome_shape[-2])
      if not self._out_is_identity:
        shapes["out_matrix"] = (self.num_windows * self.epitome_shape[-1], self.filters)
    if self.use_bias:
      shapes["bias"] = (self.filters,)
    for name, shape in shapes.items():
      value = self._initial_values.get(name)
      init = (
        keras.initializers.Constant(value)
        if value is not None
        else ("ones" if name == "out_weights" else "zeros")
      )
      setattr(
        self,
        name,
        self.add_weight(
          name, shape=shape, initializer=init, trainable=False, dtype=self.dtype
        ),
      )
    if not self._num_out_taps:
      self.out_weights = None
    if "in_matrix" not in shapes:
      self.in_matrix = None
    if "out_matrix" not in shapes:
      self.out_matrix = None
    if not self.use_bias:
      self.bias = None
    self._initial_values = {}
    self.built = True

  def _pointwise(self, x, matrix):
    """``x @ matrix`` over the channel axis (a 1x1 convolution for conv layers)."""
    if self._rank:
      kernel = tf.reshape(matrix, [1] * self._rank + list(matrix.shape))
      return tf.nn.convolution(x, kernel, padding="VALID")
    if x.shape.rank == 2:
      return tf.matmul(x, matrix)
    return tf.tensordot(x, matrix, [[x.shape.rank - 1], [0]])

  def _remix_in(self, x):
    if self._in_is_identity:
      return x
    if self.remix == "matmul":
      return self._pointwise(x, self.in_matrix)
    ce = self.epitome_shape[-2]
    a = self._channels.num_in_chunks
    pad = self._channels.in_pad
    if pad:
      x = tf.pad(x, [[0, 0]] * (x.shape.rank - 1) + [[0, pad]])
    total = None
    for i, (n, f) in enumerate(zip(self.in_shift, self.in_frac, strict=True)):
      base = i * ce

      # x'[e] = x_a[(e - n) mod Cin_E]: read chunk entries starting at -n.
      def roll(shift, base=base):
        ranges = [(base + s, base + t) for s, t in sampling.roll_slices(-shift, ce)]
        return _take(x, ranges, a * ce)

      term = roll(n)
      if f != 0.0:
        term = term * (1.0 - f) + roll(n + 1) * f
      total = term if total is None else total + term
    return total

  def _conv(self, x):
    raise NotImplementedError

  def _conv_windows(self, x):
    """``Y``: every window's convolution, concatenated on the channels."""
    if self.window_rolls is None:
      return self._conv(x)
    ce = self.epitome_shape[-2]
    # conv(x', roll(E, -r)) == conv(x' read from channel -r, E): roll the
    # activations, keep one stored epitome. Every roll is one slice of the
    # activations concatenated with themselves (one concat for the layer),
    # not two slices and a concat per window: fewer ops and tensors in the
    # exported file and fewer copies at run time.
    starts = [(-int(r)) % ce for r in self.window_rolls]
    doubled = tf.concat([x, x], axis=-1) if any(starts) else x
    parts = [x if s == 0 else doubled[..., s : s + ce] for s in starts]
    if len(parts) == 1:
      return self._conv(parts[0])
    # One convolution for all rolls, the rolled activations stacked on the
    # batch axis: the epitome is one constant read by one op. (Read by
    # several convolutions, the int8 converter keeps a float32 copy of it
    # and leaves one of them in float.)
    y = self._conv(tf.concat(parts, axis=0))
    return tf.concat(tf.split(y, len(parts), axis=0), axis=-1)

  def _remix_out(self, y):
    if self.remix == "matmul":
      if self.out_matrix is not None:
        y = self._pointwise(y, self.out_matrix)
      return y + self.bias if self.use_bias else y
    width = self.num_windows * self.epitome_shape[-1]
    y0 = _take(y, self._out_ranges(0), width)
    taps = self._num_out_taps
    if taps == 2:
      y1 = _take(y, self._out_ranges(1), width)
      y = y0 * self.out_weights[0] + y1 * self.out_weights[1]
    elif taps == 1:
      y = y0 * self.out_weights[0]
    else:
      y = y0
    if self.use_bias:
      y = y + self.bias
    return y

  # Static Python over the frozen plan; nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def call(self, inputs, training=None, mask=None):
    del training, mask  # inference only
    x = self._remix_in(tf.convert_to_tensor(inputs, self.dtype))
    y = self._remix_out(self._conv_windows(x))
    return self.activation(y)

  def compute_output_shape(self, input_shape):
    raise NotImplementedError

  def get_config(self):
    config = super().get_config()
    config.update(self.plan.config(self._filters_key))
    config.update(
      activation=keras.activations.serialize(self.activation), remix=self.remix
    )
    return config

  # -- from a trained layer ----------------------------------------------------

  @classmethod
  def from_epitome_layer(
    cls, layer, batchnorm=None, name: Optional[str] = None, remix: str = "slices"
  ):
    """The factored layer computing what ``layer`` (then ``batchnorm``) computes.

    Args:
      layer: a built epitome layer of the matching type. Its inference routing
        map (:attr:`EpitomeMixin.routing_map`: the moving map of the
        ``feature`` learner) is frozen into static slices and weights.
      batchnorm: optional ``BatchNormalization`` applied to ``layer``'s output
        (channels last); folded into the scale and bias. ``layer`` must then
        have a linear activation.
      name: the new layer's name (default: ``layer``'s).
      remix: how ``R_in``/``R_out`` run: ``"slices"`` (static slices, concats
        and elementwise blends: the smallest file and fewest multiply-adds) or
        ``"matmul"`` (two 1x1 convolutions holding the same linear maps as
        ``Cin x Cin_E`` and ``W*Cout_E x Cout`` matrices: a few ops instead of
        tens, faster on narrow layers, at the cost of storing the matrices).
        ``"fold_slices"`` / ``"fold_matmul"``: ``R_out`` (with the channel
        roll, the spatial windows and a folded BatchNorm scale) folded into
        one ``(*S, Cin_E, Cout)`` kernel, ``R_in`` as slices or a 1x1
        convolution: two ops per layer and ``1/A`` of the stock
        multiply-adds, storing ``Cin_E * Cout`` per tap (the rolled layers'
        fastest form; see :data:`FORMS`).

    Returns:
      An unbuilt factored layer; its weights are set when it is first built.

    Raises:
      ValueError: if the layer is not built, has ``groups > 1``, a non-finite
        epitome or routing map, or the BatchNorm cannot be folded.

    Example:
      >>> layer = ke.EpitomeDense(64, compression=4)
      >>> _ = layer(tf.zeros([1, 32]))
      >>> fast = ke.FactoredDense.from_epitome_layer(layer)
    """
    desc = f"{type(layer).__name__} '{getattr(layer, 'name', layer)}'"
    if not isinstance(layer, EpitomeMixin) or layer._kernel_rank() != cls._rank:
      raise ValueError(
        f"{cls.__name__}.from_epitome_layer: {desc} is not an epitome layer "
        f"of rank {cls._rank}"
      )
    _check_factorizable(layer)
    if remix not in FORMS:
      raise ValueError(
        f"{desc}: remix must be one of {', '.join(FORMS)}, got {remix!r}"
      )
    g = layer.epitome_geometry
    epitome = layer.epitome.numpy().astype(np.float64)
    routing = layer.routing_map
    plan = sampling.factored_plan(epitome, routing, g)
    if remix.startswith("fold_"):
      return cls._folded(layer, batchnorm, name, remix[len("fold_") :], plan, epitome)
    windows = np.moveaxis(plan.windows, 0, -2)  # (*S, Cin_E, W, Cout_E)
    kernel = windows.reshape(g.spatial + (g.cin_e, -1))
    window_rolls = None
    if remix == "slices" and not g.slack_axes and plan.windows.shape[0] > 1:
      # The windows differ only by the channel roll: store the epitome once
      # and roll the activations (slices). The matmul remix keeps one
      # convolution over the stored windows (no slices, more weights).
      rolls = np.unique(g.in_rolls)
      base = np.roll(plan.windows[0], int(rolls[0]), axis=-2)
      if len(rolls) == plan.windows.shape[0] and all(
        np.array_equal(np.roll(base, -int(r), axis=-2), w)
        for r, w in zip(rolls, plan.windows, strict=True)
      ):
        window_rolls = [int(r) for r in rolls]
        kernel = base
    scale, bias = _folded_affine(layer, batchnorm, g.cout)
    out_frac = plan.out_frac
    identity_out = (
      not np.any(out_frac)
      and plan.windows.shape[0] == 1
      and g.num_out_chunks == 1
      and g.cout == g.cout_e
      and plan.out_shift[0] == 0
    )
    if identity_out and scale is not None:
      kernel = kernel * scale  # R_out is the identity: fold the scale into E.
      scale = None
    values = {"kernel": kernel}
    if np.any(out_frac):
      h = out_frac[g.out_chunk_of_channel]
      s = np.ones(g.cout) if scale is None else scale
      values["out_weights"] = np.stack([(1.0 - h) * s, h * s])
    elif scale is not None:
      values["out_weights"] = scale[np.newaxis]
    if bias is not None:
      values["bias"] = bias
    layer_plan = LayerPlan(
      filters=g.cout,
      input_channels=g.cin,
      epitome_shape=g.spatial + (g.cin_e, g.cout_e),
      num_windows=plan.windows.shape[0],
      window_of_chunk=plan.window_of_chunk,
      in_shift=plan.in_shift,
      in_frac=plan.in_frac,
      out_shift=plan.out_shift,
      out_frac=out_frac,
      use_scale=scale is not None,
      use_bias=bias is not None,
      window_rolls=window_rolls,
    )
    return cls._new(layer_plan, layer, name, remix, values)

  @classmethod
  def _new(cls, plan: LayerPlan, layer, name, remix, values):
    """The layer of ``plan`` in ``remix`` with ``values`` (the slices form's weights)."""
    stock = cls._stock_kwargs(layer)
    if remix == "matmul":
      values = _matmul_values(cls, plan, stock, values)
    new = cls(
      plan,
      activation=layer.activation,
      remix=remix,
      name=name or layer.name,
      dtype=layer.dtype,
      **stock,
    )
    dtype = np.dtype(layer.dtype)
    new._initial_values = {k: np.asarray(v, dtype) for k, v in values.items()}
    return new

  @classmethod
  def _folded(cls, layer, batchnorm, name, remix, plan, epitome):
    """``R_in`` (slices or matmul), then one conv with ``R_out`` folded in."""
    g = layer.epitome_geometry
    routing = layer.routing_map
    # The kernel with zero input offsets: every output chunk's window, roll,
    # channel offset and blend sampled in, (*S, Cin_E, Cout).
    mid = sampling.EpitomeGeometry(
      g.spatial + (g.cin_e, g.cout), g.epitome_shape, channel_roll=g.channel_roll
    )
    spatial = routing.spatial_offsets if g.slack_axes else None
    kernel = sampling.sample_kernel(
      tf.constant(epitome), np.zeros([1]), routing.out_offsets, spatial, mid
    ).numpy()
    # The plan's input shifts are relative to its most common shift.
    kernel = np.roll(kernel, -plan.in_base, axis=-2)
    scale, bias = _folded_affine(layer, batchnorm, g.cout)
    if scale is not None:
      kernel = kernel * scale
    values = {"kernel": kernel}
    if bias is not None:
      values["bias"] = bias
    layer_plan = LayerPlan(
      filters=g.cout,
      input_channels=g.cin,
      epitome_shape=g.spatial + (g.cin_e, g.cout),
      num_windows=1,
      window_of_chunk=[0],
      in_shift=plan.in_shift,
      in_frac=plan.in_frac,
      out_shift=[0],
      out_frac=[0.0],
      use_scale=False,
      use_bias=bias is not None,
    )
    return cls._new(layer_plan, layer, name, remix, values)


def _matmul_values(cls, plan: LayerPlan, stock_kwargs, values):
  """Weights of the ``"matmul"`` remix: the slices form applied to identities.

  Runs the slices form's ``R_in`` and ``R_out`` (in float64) on identity
  matrices, so the matrices hold exactly the same linear maps, with the scale
  folded into ``R_out``; no second copy of the index math.
  """
  slices = cls(plan, dtype="float64", name="tmp", **stock_kwargs)
  slices._initial_values = values
  rank = cls._rank
  slices.build(tf.TensorShape([None] * (rank + 1) + [plan.input_channels]))
  out = {"kernel": values["kernel"]}
  if not slices._in_is_identity:
    out["in_matrix"] = slices._remix_in(tf.eye(slices.input_channels, dtype="float64"))
  if not slices._out_is_identity:
    width = slices.num_windows * slices.epitome_shape[-1]
    eye = tf.eye(width, dtype="float64")
    out["out_matrix"] = slices._remix_out(eye) - slices._remix_out(tf.zeros_like(eye))
  if "bias" in values:
    out["bias"] = values["bias"]
  return {k: np.asarray(v) for k, v in out.items()}


def _check_factorizable(layer):
  desc = f"{type(layer).__name__} '{layer.name}'"
  if layer.epitome is None or not layer.built:
    raise ValueError(f"{desc} is not built; call the model on an input first")
  if getattr(layer, "groups", 1) != 1:
    raise ValueError(
      f"{desc}: groups={layer.groups} has no factored form (only groups=1); "
      "use the materialized form for it"
    )
  if not np.all(np.isfinite(layer.epitome.numpy())):
    raise ValueError(f"{desc}: the epitome has non-finite values")
  for name, arr in zip(sampling.RoutingMap._fields, layer.routing_map, strict=True):
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"{desc}: the inference routing map's {name} is not finite")


def _folded_affine(layer, batchnorm, channels):
  """``(scale, bias)`` after ``layer``'s bias and a folded ``batchnorm``.

  ``scale`` is ``None`` without a BatchNorm, ``bias`` ``None`` when neither
  adds one.

  Raises:
    ValueError: if the BatchNorm cannot be folded (its axis, or ``layer``'s
      non-linear activation before it).
  """
  bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else None
  if batchnorm is None:
    return None, bias
  scale, shift = _batchnorm_affine(batchnorm, layer, channels)
  if layer.activation is not keras.activations.linear:
    raise ValueError(
      f"{type(layer).__name__} '{layer.name}': cannot fold {batchnorm.name!r} "
      f"after a non-linear activation "
      f"({keras.activations.serialize(layer.activation)})"
    )
  return scale, shift if bias is None else scale * bias + shift


def _batchnorm_affine(bn, layer, channels):
  """``(scale, shift)`` such that ``bn(z) == scale * z + shift`` at inference."""
  axis = list(bn.axis) if isinstance(bn.axis, (list, tuple)) else [bn.axis]
  ndim = getattr(getattr(bn, "input_spec", None), "ndim", None)
  last = len(axis) == 1 and (
    axis[0] == -1 or (ndim is not None and axis[0] == ndim - 1)
  )
  if not last or tuple(bn.moving_mean.shape) != (channels,):
    raise ValueError(
      f"BatchNormalization '{bn.name}' normalizes axis {bn.axis}; only the "
      f"channel axis (last, {channels} channels) can be folded into "
      f"'{layer.name}'"
    )
  mean = bn.moving_mean.numpy().astype(np.float64)
  var = bn.moving_variance.numpy().astype(np.float64)
  gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else np.ones(channels)
  beta = bn.beta.numpy().astype(np.float64) if bn.center else np.zeros(channels)
  scale = gamma / np.sqrt(var + bn.epsilon)
  return scale, beta - scale * mean


class _FactoredConv(FactoredMixin, keras.layers.Layer):
  def __init__(
    self,
    plan=None,
    strides=1,
    padding="valid",
    dilation_rate=1,
    activation=None,
    remix="slices",
    **kwargs,
  ):
    plan = _plan_argument(plan, kwargs, "filters")
    super().__init__(**kwargs)
    self._init_factored(plan, activation, remix)
    r = self._rank
    self.strides = _tuple(strides, r)
    self.dilation_rate = _tuple(dilation_rate, r)
    self.padding = str(padding).lower()
    valid = ("valid", "same", "causal") if r == 1 else ("valid", "same")
    if self.padding not in valid:
      raise ValueError(
        f"{type(self).__name__} '{self.name}': padding {padding!r} is not "
        f"supported; valid: {', '.join(valid)}"
      )

  @classmethod
  def _stock_kwargs(cls, layer):
    return dict(
      strides=layer.strides,
      padding=layer.padding,
      dilation_rate=layer.dilation_rate,
    )

  def _conv(self, x):
    padding = self.padding
    if padding == "causal":
      left = self.dilation_rate[0] * (self.epitome_shape[0] - 1)
      x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
      padding = "valid"
    return tf.nn.convolution(
      x,
      self.kernel,
      strides=list(self.strides),
      padding=padding.upper(),
      dilations=list(self.dilation_rate),
    )

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape).as_list()
    out = [input_shape[0]]
    for i, size in enumerate(input_shape[1:-1]):
      if size is None:
        out.append(None)
        continue
      k = self.dilation_rate[i] * (self.epitome_shape[i] - 1) + 1
      if self.padding in ("same", "causal"):
        out.append(-(-size // self.strides[i]))
      else:
        out.append(-(-(size - k + 1) // self.strides[i]))
    return tf.TensorShape(out + [self.filters])

  def get_config(self):
    config = super().get_config()
    config.update(
      strides=list(self.strides),
      padding=self.padding,
      dilation_rate=list(self.dilation_rate),
    )
    return config


def _tuple(value, rank):
  if isinstance(value, (int, np.integer)):
    return (int(value),) * rank
  value = tuple(int(v) for v in value)
  return value * rank if len(value) == 1 else value


@keras.saving.register_keras_serializable(package="keras_epitome")
class FactoredConv1D(_FactoredConv):
  """Factored inference form of :class:`~keras_epitome.EpitomeConv1D`.

  See :class:`FactoredMixin` for the arguments; also ``strides``,
  ``padding`` (``valid``, ``same``, ``causal``) and ``dilation_rate`` as in
  ``Conv1D``. Build one with :meth:`FactoredMixin.from_epitome_layer` or
  :func:`factorize`.

  Example:
    >>> layer = ke.EpitomeConv1D(32, 9, padding="causal", compression=4)
    >>> _ = layer(tf.zeros([1, 100, 32]))
    >>> fast = ke.FactoredConv1D.from_epitome_layer(layer)
    >>> fast(tf.zeros([1, 100, 32])).shape
    TensorShape([1, 100, 32])
  """

  _rank = 1


@keras.saving.register_keras_serializable(package="keras_epitome")
class FactoredConv2D(_FactoredConv):
  """Factored inference form of :class:`~keras_epitome.EpitomeConv2D`.

  See :class:`FactoredMixin` for the arguments; also ``strides``,
  ``padding`` and ``dilation_rate`` as in ``Conv2D``.

  Example:
    >>> layer = ke.EpitomeConv2D(64, 3, padding="same", compression=4)
    >>> _ = layer(tf.zeros([1, 8, 8, 64]))
    >>> fast = ke.FactoredConv2D.from_epitome_layer(layer)
    >>> fast(tf.zeros([1, 8, 8, 64])).shape
    TensorShape([1, 8, 8, 64])
  """

  _rank = 2


@keras.saving.register_keras_serializable(package="keras_epitome")
class FactoredDense(FactoredMixin, keras.layers.Layer):
  """Factored inference form of :class:`~keras_epitome.EpitomeDense`.

  Args:
    units: output size ``Cout``; the other arguments as in
      :class:`FactoredMixin`.

  Example:
    >>> layer = ke.EpitomeDense(256, compression=4)
    >>> _ = layer(tf.zeros([1, 128]))
    >>> ke.FactoredDense.from_epitome_layer(layer)(tf.zeros([1, 128])).shape
    TensorShape([1, 256])
  """

  _rank = 0
  _filters_key = "units"

  def __init__(self, plan=None, activation=None, remix="slices", **kwargs):
    plan = _plan_argument(plan, kwargs, "units")
    super().__init__(**kwargs)
    self._init_factored(plan, activation, remix)

  @property
  def units(self) -> int:
    return self.filters

  @classmethod
  def _stock_kwargs(cls, layer):
    del layer
    return {}

  def _conv(self, x):
    if x.shape.rank == 2:
      return tf.matmul(x, self.kernel)
    return tf.tensordot(x, self.kernel, [[x.shape.rank - 1], [0]])

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(input_shape)[:-1].concatenate([self.filters])


FACTORED_LAYERS = (FactoredConv1D, FactoredConv2D, FactoredDense)


def _factored_class(layer):
  return {0: FactoredDense, 1: FactoredConv1D, 2: FactoredConv2D}[layer._kernel_rank()]


def __getattr__(name):
  # The model walk moved to keras_epitome.factored_model (which builds on this
  # module); its old names still resolve here, at run time.
  if name in _MOVED:
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module("keras_epitome.factored_model"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = (
  "factorize_layers",
  "_foldable_pairs",
  "_check_training_state",
  "_materialize_layer",
  "_transform",
  "_consumers",
)
