"""Epitome layers: stock Keras layers whose kernel is sampled from an epitome.

``EpitomeConv1D``, ``EpitomeConv2D`` and ``EpitomeDense`` subclass the stock
``Conv1D``, ``Conv2D`` and ``Dense``: every stock argument keeps its meaning
(strides, padding including ``causal``, dilation, groups, activation, bias,
initializers, regularizers, constraints). The only change is where the kernel
comes from: instead of a ``kernel`` variable the layer stores

* ``epitome``: a ``(*S_E, Cin_E, Cout_E)`` variable, the only large weight;
* a routing map: ``in_offsets`` ``(A,)``, ``out_offsets`` ``(B,)`` and, where
  the epitome is longer than the kernel in space, ``spatial_offsets``
  ``(B, rank)``;

and ``layer.kernel`` is a property that samples the full kernel from them
(:func:`keras_epitome.sampling.sample_kernel`). ``kernel_initializer`` draws the
epitome with the statistics it would give the full kernel (fan-in and fan-out
of the kernel's shape), so the sampled kernel has the intended variance.
``kernel_regularizer`` and ``kernel_constraint`` apply to the epitome, the
weight that is actually stored.

Example:
  >>> import keras_epitome as ke
  >>> layer = ke.EpitomeConv2D(64, 3, padding="same", compression=4)
  >>> y = layer(tf.zeros([1, 8, 8, 64]))
  >>> layer.epitome.shape, layer.kernel.shape
  (TensorShape([3, 3, 32, 32]), TensorShape([3, 3, 64, 64]))
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from keras_epitome import factored_training, layer_common, sampling, spec, walk
from keras_epitome import geometry as geometry_lib
from keras_epitome.backend import keras
from keras_epitome.learners import FeatureOffsetLearner

SAMPLERS = spec.SAMPLERS
# The keyword arguments an epitome layer adds to its stock layer.
EPITOME_ARGS = spec.EPITOME_ARGS


def _clip_to(limit):
  """A constraint clipping each column of a variable to ``[0, limit]``."""

  def clip(v):
    return tf.clip_by_value(v, 0.0, tf.constant(limit, v.dtype))

  return clip


class EpitomeMixin(layer_common.EpitomeLayerBase, tfmot.sparsity.keras.PrunableLayer):
  """Turns a stock kernel layer into an epitome layer (see module docstring).

  Args (keyword-only, in addition to the stock layer's):
    compression: ratio ``>= 1`` of kernel size to epitome size; turned into an
      epitome shape by :func:`keras_epitome.sampling.epitome_shape_for_ratio`
      (keep the spatial window, shrink the larger channel count first).
    epitome_shape: explicit ``(*S_E, Cin_E, Cout_E)``; exclusive with
      ``compression``. ``S_E`` may exceed the kernel's window, which adds
      spatial offsets (one per output chunk and axis).
    sampler: ``"learned"`` (NES: offsets are trained) or ``"fixed"`` (WSNet:
      constant offsets, channels tiled, output chunks strided in space).
    learner: for ``sampler="learned"``: ``"param"`` (one variable per offset)
      or ``"feature"`` (offsets predicted from the input, NES's transformation
      learner, with a moving-average routing map for inference).
    spatial_stride: stride between the spatial offsets of consecutive output
      chunks: the fixed sampler's pattern, and the learned sampler's starting
      point. An int or one per spatial axis; ``None`` spreads the chunks evenly
      over the slack ``S_E - S``.
    offset_scale: the routing map is stored divided by this number, so an
      optimizer step moves offsets ``offset_scale`` times further (adaptive
      optimizers see the same gradients, scaled). Offsets live in units of
      channels and taps, much larger than typical weight steps.
    routing_momentum: momentum of the moving-average routing map of the
      ``feature`` learner.
    channel_roll: output chunk ``b`` reads the epitome's input channels
      rolled by ``b * channel_roll`` (mod ``Cin_E``), a static pattern that
      costs no storage (:class:`~keras_epitome.sampling.EpitomeGeometry`).
      The default ``1`` makes every output chunk a distinct set of filters;
      ``0`` is the separable map, where all output chunks repeat the same
      ``Cout_E`` filters (the kernel's rank is at most ``Cout_E``, a thin
      layer in disguise: docs/results.md has what it costs).
      Configs saved without this key load with ``0``, as they were trained.
    train_form: how ``call`` computes the layer: ``"kernel"`` samples the full
      kernel and runs the stock op; ``"factored"`` runs
      ``R_out(conv(R_in(x), E))`` with the step's offsets (fewer multiply-adds,
      same values and gradients); ``"auto"`` (default) picks the cheaper by a
      cost estimate from the static shapes
      (:func:`keras_epitome.factored_training.plan_for`). ``groups > 1`` always
      uses the kernel. The estimate does not know about XLA, whose CPU
      convolutions are slow on odd channel counts: for such epitomes under
      ``jit_compile`` prefer ``"kernel"`` (docs/results.md, training cost).
  """

  _stock_class = None  # set by each concrete layer

  def __init__(self, *args, **kwargs):
    # The epitome keyword arguments (spec.EPITOME_DEFAULTS; the class's
    # published signature lists them), then the stock layer's.
    epitome_kwargs = spec.pop_epitome_args(kwargs)
    try:
      super().__init__(*args, **kwargs)
    except ValueError as e:  # the stock layer's checks (filters=0, ...)
      name = kwargs.get("name")
      desc = type(self).__name__ + (f" '{name}'" if name else "")
      raise ValueError(f"{desc}: {e}") from None
    desc = self._desc()
    spec.init_epitome_layer(self, self._kernel_rank(), epitome_kwargs, desc)
    if isinstance(self, keras.layers.Dense):  # the stock Dense accepts units=0
      spec.check_units(self.units, "units", desc)
    self._kernel_override = None

  # -- helpers ---------------------------------------------------------------

  def _kernel_rank(self) -> int:
    return getattr(self, "rank", 0) if not isinstance(self, keras.layers.Dense) else 0

  # -- build -------------------------------------------------------------------

  def add_weight(self, name=None, shape=None, *args, **kwargs):
    # The stock build asks for "kernel"; build the epitome and routing map
    # instead, with the shape the stock layer computed (groups included).
    if name == "kernel" and self.epitome is None:
      self._build_epitome(tuple(int(d) for d in shape), kwargs)
      return None
    return super().add_weight(name, shape, *args, **kwargs)

  def _build_epitome(self, kernel_shape, kernel_kwargs):
    geometry, routing = self._start_geometry(kernel_shape)
    dtype = kernel_kwargs.get("dtype", self.dtype)
    base_initializer = keras.initializers.get(self.kernel_initializer)

    def epitome_initializer(shape, dtype=None, **unused):
      # Draw with the kernel's shape (its fan-in/fan-out), keep |E| entries.
      full = base_initializer(kernel_shape, dtype=dtype)
      flat = tf.reshape(full, [-1])[: geometry.epitome_size]
      return tf.reshape(flat, shape)

    # Under a mixed-precision policy the epitome and the routing map are not
    # autocast: the kernel is sampled in the variables' dtype (offsets and
    # interpolation weights at full precision) and only the sampled kernel is
    # cast to the compute dtype, in call().
    self.epitome = super().add_weight(
      "epitome",
      shape=geometry.epitome_shape,
      initializer=epitome_initializer,
      regularizer=self.kernel_regularizer,
      constraint=self.kernel_constraint,
      trainable=True,
      dtype=dtype,
      experimental_autocast=False,
    )
    trainable = self.sampler == "learned"
    for stored in geometry_lib.stored_offsets(geometry, routing, self.offset_scale):
      variable = super().add_weight(
        stored.name,
        shape=stored.shape,
        initializer=keras.initializers.Constant(stored.initial),
        constraint=None if stored.limit is None else _clip_to(stored.limit),
        trainable=trainable,
        dtype=dtype,
        experimental_autocast=False,
      )
      setattr(self, stored.name, variable)
    if self.sampler == "learned" and self.learner == "feature":
      n = geometry.routing_size
      self.offset_learner = FeatureOffsetLearner(
        n, geometry.rank, name="offset_learner"
      )
      self.moving_offsets = super().add_weight(
        "moving_offsets",
        shape=(n,),
        initializer=lambda shape, dtype=None: tf.cast(
          geometry_lib.pack_routing(*routing, geometry), dtype
        ),
        trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.MEAN,
        dtype=dtype,
        experimental_autocast=False,
      )

  def build(self, input_shape):
    super().build(input_shape)
    if self.offset_learner is not None and not self.offset_learner.built:
      with tf.name_scope(self.offset_learner.name):
        self.offset_learner.build(input_shape)

  # -- routing map -------------------------------------------------------------

  def _base_offsets(self):
    """The variables' offsets, in channels and taps (scale applied)."""
    g = self.epitome_geometry
    s = self.offset_scale
    in_o = self.in_offsets * s
    out_o = self.out_offsets * s
    if self.spatial_offsets is not None:
      sp_o = g.full_spatial(self.spatial_offsets * s)
    else:
      sp_o = tf.zeros([g.num_out_chunks, g.rank], self.epitome.dtype)
    return in_o, out_o, sp_o

  def _inference_offsets(self):
    if self.moving_offsets is not None:
      return self.epitome_geometry.unpack_offsets(self.moving_offsets)
    return self._base_offsets()

  def _sample(self, in_o, out_o, sp_o):
    g = self.epitome_geometry
    return sampling.sample_kernel(
      self.epitome, in_o, out_o, sp_o if g.slack_axes else None, g
    )

  @property
  def routing_map(self) -> sampling.RoutingMap:
    """The routing map used for inference, as NumPy arrays (offsets wrapped/clipped).

    For the ``feature`` learner this is the moving average.
    """
    offsets = (np.asarray(t, np.float64) for t in self._inference_offsets())
    return sampling.RoutingMap(*offsets).normalized(self.epitome_geometry)

  # -- the kernel --------------------------------------------------------------

  @property
  def kernel(self):
    """The full kernel sampled from the epitome with the inference routing map."""
    if self._kernel_override is not None:
      return self._kernel_override
    if self.epitome is None:
      return None
    return self._sample(*self._inference_offsets())

  @kernel.setter
  def kernel(self, value):
    # The stock build assigns the result of add_weight("kernel") (None here).
    if value is not None:
      raise AttributeError(
        f"{self._desc()}: the kernel is sampled from the epitome and cannot be "
        "assigned; assign layer.epitome and the routing map instead"
      )

  def _training_offsets(self, inputs, training):
    base = self._base_offsets()
    # Under a mixed policy the learner computes in the compute dtype; its
    # correction joins the full-precision offsets.
    delta = tf.cast(self.offset_learner(inputs, training=True), base[0].dtype)
    g = self._geometry
    in_d, out_d, sp_d = g.unpack_offsets(delta)
    offsets = (base[0] + in_d, base[1] + out_d, base[2] + sp_d)
    packed = g.pack_offsets(*offsets)
    m = self.routing_momentum
    new_moving = m * tf.convert_to_tensor(self.moving_offsets) + (
      1.0 - m
    ) * tf.stop_gradient(packed)
    self.moving_offsets.assign(new_moving)
    return offsets

  def call(self, inputs, training=None):
    plan = self.train_plan(inputs.shape)
    if not plan.is_kernel:
      return self._call_factored(inputs, training, plan)
    if self.offset_learner is not None:
      if training is None:
        training = keras.backend.learning_phase()
      if isinstance(training, (bool, int)) or training is None:
        if training:
          offsets = self._training_offsets(inputs, training)
        else:
          offsets = self._inference_offsets()
        kernel = self._sample(*offsets)
      else:
        kernel = tf.cond(
          tf.cast(training, tf.bool),
          lambda: self._sample(*self._training_offsets(inputs, True)),
          lambda: self._sample(*self._inference_offsets()),
        )
    else:
      kernel = self._sample(*self._base_offsets())
    self._kernel_override = tf.cast(kernel, self.compute_dtype)
    try:
      return super().call(inputs)
    finally:
      self._kernel_override = None

  # -- factored form in training (keras_epitome.factored_training) -------------

  def train_plan(self, input_shape) -> factored_training.TrainPlan:
    """How ``call`` computes the layer for inputs of ``input_shape``.

    Returns:
      A :class:`~keras_epitome.factored_training.TrainPlan`; its ``is_kernel``
      is true when the full kernel is sampled.
    """
    if getattr(self, "groups", 1) != 1 or self._geometry is None:
      return factored_training.KERNEL_PLAN
    input_shape = tf.TensorShape(input_shape)
    if input_shape.rank is None:
      return factored_training.KERNEL_PLAN
    output_shape = self.compute_output_shape(input_shape)
    return factored_training.plan_for(
      self._geometry, input_shape, output_shape, self.train_form
    )

  def _step_offsets(self, inputs, training):
    """The offsets of this call (``in, out, spatial``), as ``call`` uses them."""
    if self.offset_learner is None:
      return self._base_offsets()
    if training is None:
      training = keras.backend.learning_phase()
    if isinstance(training, (bool, int)) or training is None:
      if training:
        return self._training_offsets(inputs, training)
      return self._inference_offsets()
    return tf.cond(
      tf.cast(training, tf.bool),
      lambda: self._training_offsets(inputs, True),
      self._inference_offsets,
    )

  def _call_factored(self, inputs, training, plan):
    """``call`` in the factored form (same function, fewer multiply-adds)."""
    in_o, out_o, sp_o = self._step_offsets(inputs, training)
    rank = self._kernel_rank()
    x = inputs
    if rank:
      causal = getattr(self, "_is_causal", False)

      def conv_fn(t, kernel):
        if causal:
          t = tf.pad(t, self._compute_causal_padding(t))
        return self.convolution_op(t, kernel)

    else:

      def conv_fn(t, kernel):
        return factored_training._pointwise(t, kernel)  # noqa: SLF001

    y = factored_training.factored_apply(
      x, self.epitome, in_o, out_o, sp_o, self._geometry, conv_fn, plan
    )
    if self.use_bias:
      y = tf.nn.bias_add(y, self.bias)
    if not tf.executing_eagerly() and inputs.shape.rank:
      y.set_shape(self.compute_output_shape(inputs.shape))
    return self.activation(y) if self.activation is not None else y

  # -- TF-MOT pruning ----------------------------------------------------------

  def get_prunable_weights(self):
    """The epitome is the stored kernel weight, so it is what pruning sparsifies."""
    return [self.epitome]

  # -- config ------------------------------------------------------------------

  def get_config(self):
    config = super().get_config()
    config.update(spec.epitome_config(self))
    return config

  @classmethod
  def from_config(cls, config):
    # Layers saved before channel_roll existed were separable (roll 0).
    config = dict(config)
    config.setdefault("channel_roll", 0)
    return super().from_config(config)


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeConv1D(EpitomeMixin, keras.layers.Conv1D):
  """``Conv1D`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeConv1D(32, 64, strides=4, padding="causal", compression=4)
    >>> layer(tf.zeros([2, 8000, 16])).shape
    TensorShape([2, 2000, 32])
  """

  _stock_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeConv2D(EpitomeMixin, keras.layers.Conv2D):
  """``Conv2D`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeConv2D(64, 3, padding="same", compression=4)
    >>> layer(tf.zeros([1, 32, 32, 64])).shape
    TensorShape([1, 32, 32, 64])
  """

  _stock_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeDense(EpitomeMixin, keras.layers.Dense):
  """``Dense`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeDense(1024, compression=4)
    >>> layer(tf.zeros([8, 1024])).shape
    TensorShape([8, 1024])
  """

  _stock_class = keras.layers.Dense


EPITOME_LAYERS = (EpitomeConv1D, EpitomeConv2D, EpitomeDense)


for _cls in EPITOME_LAYERS:
  # The stock signature plus the epitome keyword arguments (see spec).
  _cls.__signature__ = spec.merged_signature(_cls._stock_class.__init__)
del _cls
STOCK_TO_EPITOME = {
  keras.layers.Conv1D: EpitomeConv1D,
  keras.layers.Conv2D: EpitomeConv2D,
  keras.layers.Dense: EpitomeDense,
}


def epitome_layers(model) -> list:
  """All epitome layers of ``model``, nested models and wrappers included."""
  return [layer for layer in walk.iter_layers(model) if isinstance(layer, EpitomeMixin)]
