"""Epitome layers for Keras 3: ``Conv1D``, ``Conv2D`` and ``Dense`` with a sampled kernel.

The Keras 3 counterparts of :mod:`keras_epitome.layers`: the same arguments,
the same geometry and routing maps (:mod:`keras_epitome.geometry`), the same
stored variables (``epitome``, ``in_offsets``, ``out_offsets``, and
``spatial_offsets`` where the epitome has spatial slack; ``moving_offsets``
and an ``offset_learner`` for the ``feature`` learner). Each layer is the
stock Keras 3 layer with its kernel replaced by the epitome: ``kernel`` is a
property that samples it, and a ``.keras`` file stores the epitome and the
routing map, never the kernel.

On the TensorFlow backend the kernel is sampled by the package's TensorFlow
sampler (:func:`keras_epitome.sampling.sample_kernel`, custom gradients
without scatters) and ``train_form`` may run the factored form in training as
the Keras 2 layers do; on JAX and PyTorch the ``keras.ops`` sampler
(:mod:`keras_epitome.keras3.ops_sampling`), which computes the same numbers,
samples the kernel.

Keras 3's own ``model.quantize`` and ``enable_lora`` work on a stock kernel
variable, which these layers do not have: both raise an error that says what
to do (strip the epitome layers first, or export with
``keras_epitome.keras3.export_tflite(..., quantize="int8")``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_epitome import geometry as geo
from keras_epitome import layer_common, spec
from keras_epitome.keras3 import learners, ops_sampling

EPITOME_ARGS = spec.EPITOME_ARGS


def _tensorflow_backend() -> bool:
  return keras.backend.backend() == "tensorflow"


def _clip_to(limit):
  """A constraint clipping each column of a variable to ``[0, limit]``."""
  return lambda v: ops.clip(v, 0.0, ops.cast(limit, v.dtype))


class EpitomeMixin(layer_common.EpitomeLayerBase):
  """Turns a stock Keras 3 kernel layer into an epitome layer.

  Args (keyword-only, in addition to the stock layer's): ``compression``,
  ``epitome_shape``, ``sampler``, ``learner``, ``spatial_stride``,
  ``offset_scale``, ``routing_momentum``, ``channel_roll``, ``train_form``, as
  for the Keras 2 layers (:class:`keras_epitome.layers.EpitomeMixin` documents
  each; docs/layers.md has the table). ``train_form="factored"`` needs the
  TensorFlow backend; ``"auto"`` samples the kernel on other backends.
  """

  def __init__(self, *args, **kwargs):
    # The epitome keyword arguments (spec.EPITOME_DEFAULTS; the class's
    # published signature lists them), then the stock layer's.
    epitome_kwargs = spec.pop_epitome_args(kwargs)
    super().__init__(*args, **kwargs)
    desc = self._desc()
    spec.init_epitome_layer(self, self._kernel_rank(), epitome_kwargs, desc)
    if self.train_form == "factored" and not _tensorflow_backend():
      raise ValueError(
        f"{desc}: train_form='factored' needs the TensorFlow backend (this is "
        f"{keras.backend.backend()!r}); use 'auto' or 'kernel', which sample "
        "the kernel and compute the same function"
      )
    if getattr(self, "lora_rank", None):
      raise ValueError(
        f"{desc}: lora_rank={self.lora_rank} is not supported: LoRA adds to a "
        "stored kernel, and an epitome layer stores an epitome instead"
      )
    self.bias = None

  # -- helpers ---------------------------------------------------------------

  def _kernel_rank(self) -> int:
    return 0 if isinstance(self, keras.layers.Dense) else int(self.rank)

  # -- build -------------------------------------------------------------------

  def _kernel_shape(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(
        f"{self._desc()}: the input's last axis (channels) must be known, got "
        f"input shape {tuple(input_shape)}"
      )
    if isinstance(self, keras.layers.Dense):
      return (int(channels), int(self.units))
    if channels % self.groups:
      raise ValueError(
        f"{self._desc()}: the input's {channels} channels must be divisible by "
        f"groups={self.groups}"
      )
    return tuple(self.kernel_size) + (int(channels) // self.groups, int(self.filters))

  def build(self, input_shape):
    input_shape = tuple(input_shape)
    kernel_shape = self._kernel_shape(input_shape)
    if isinstance(self, keras.layers.Dense):
      self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_shape[-1]})
    else:
      self.input_spec = keras.layers.InputSpec(
        min_ndim=self.rank + 2, axes={-1: input_shape[-1]}
      )
      self.compute_output_shape(input_shape)  # the stock layer's shape checks
    self._build_epitome(kernel_shape)
    units = kernel_shape[-1]
    if self.use_bias:
      self.bias = self.add_weight(
        name="bias",
        shape=(units,),
        initializer=self.bias_initializer,
        regularizer=self.bias_regularizer,
        constraint=self.bias_constraint,
      )
    if self.offset_learner is not None:
      self.offset_learner.build(input_shape)

  def _build_epitome(self, kernel_shape):
    geometry, routing = self._start_geometry(kernel_shape)
    base_initializer = keras.initializers.get(self.kernel_initializer)

    def epitome_initializer(shape, dtype=None):
      # Draw with the kernel's shape (its fan-in/fan-out), keep |E| entries.
      full = base_initializer(kernel_shape, dtype=dtype)
      return ops.reshape(ops.reshape(full, (-1,))[: geometry.epitome_size], shape)

    # The epitome and the routing map are not autocast under a mixed policy:
    # the kernel is sampled in the variables' dtype and then cast.
    self.epitome = self.add_weight(
      name="epitome",
      shape=geometry.epitome_shape,
      initializer=epitome_initializer,
      regularizer=self.kernel_regularizer,
      constraint=self.kernel_constraint,
      trainable=True,
      autocast=False,
    )
    trainable = self.sampler == "learned"
    for stored in geo.stored_offsets(geometry, routing, self.offset_scale):
      variable = self.add_weight(
        name=stored.name,
        shape=stored.shape,
        initializer=keras.initializers.Constant(stored.initial),
        constraint=None if stored.limit is None else _clip_to(stored.limit),
        trainable=trainable,
        autocast=False,
      )
      setattr(self, stored.name, variable)
    if self.sampler == "learned" and self.learner == "feature":
      n = geometry.routing_size
      self.offset_learner = learners.FeatureOffsetLearner(
        n, geometry.rank, name="offset_learner"
      )
      self.offset_learner.adopt(self._desc())
      packed = geo.pack_routing(*routing, geometry).astype(np.float32)
      self.moving_offsets = self.add_weight(
        name="moving_offsets",
        shape=(n,),
        initializer=keras.initializers.Constant(packed),
        trainable=False,
        aggregation="mean",
        autocast=False,
      )

  # -- routing map -------------------------------------------------------------

  def _base_offsets(self):
    """The variables' offsets, in channels and taps (scale applied)."""
    g = self.epitome_geometry
    s = self.offset_scale
    in_o = ops.convert_to_tensor(self.in_offsets) * s
    out_o = ops.convert_to_tensor(self.out_offsets) * s
    if self.spatial_offsets is not None:
      sp_o = ops_sampling.full_spatial(
        ops.convert_to_tensor(self.spatial_offsets) * s, g
      )
    else:
      sp_o = ops.zeros((g.num_out_chunks, g.rank), in_o.dtype)
    return in_o, out_o, sp_o

  def _inference_offsets(self):
    if self.moving_offsets is not None:
      return ops_sampling.unpack_offsets(
        ops.convert_to_tensor(self.moving_offsets), self.epitome_geometry
      )
    return self._base_offsets()

  def _training_offsets(self, inputs):
    base = self._base_offsets()
    # Under a mixed policy the learner computes in the compute dtype; its
    # correction joins the full-precision offsets.
    delta = ops.cast(self.offset_learner(inputs, training=True), base[0].dtype)
    g = self._geometry
    in_d, out_d, sp_d = ops_sampling.unpack_offsets(delta, g)
    offsets = (base[0] + in_d, base[1] + out_d, base[2] + sp_d)
    packed = ops_sampling.pack_offsets(*offsets, g)
    m = self.routing_momentum
    moving = ops.convert_to_tensor(self.moving_offsets)
    self.moving_offsets.assign(m * moving + (1.0 - m) * ops.stop_gradient(packed))
    return offsets

  def _step_offsets(self, inputs, training):
    if self.offset_learner is not None and training:
      return self._training_offsets(inputs)
    if self.offset_learner is not None:
      return self._inference_offsets()
    return self._base_offsets()

  def _sample(self, in_o, out_o, sp_o):
    g = self.epitome_geometry
    epitome = ops.convert_to_tensor(self.epitome)
    sp_o = sp_o if g.slack_axes else None
    if _tensorflow_backend():
      from keras_epitome import sampling  # the TensorFlow sampler

      return sampling.sample_kernel(epitome, in_o, out_o, sp_o, g)
    return ops_sampling.sample_kernel(epitome, in_o, out_o, sp_o, g)

  @property
  def routing_map(self) -> geo.RoutingMap:
    """The routing map used for inference, as NumPy arrays (offsets wrapped/clipped).

    For the ``feature`` learner this is the moving average.
    """
    offsets = (
      np.asarray(ops.convert_to_numpy(t), np.float64) for t in self._inference_offsets()
    )
    return geo.RoutingMap(*offsets).normalized(self.epitome_geometry)

  # -- the kernel and the call ---------------------------------------------------

  @property
  def kernel(self):
    """The full kernel sampled from the epitome with the inference routing map."""
    if self.epitome is None:
      raise AttributeError(
        f"{self._desc()} is not built yet; call it on an input first"
      )
    return self._sample(*self._inference_offsets())

  def _train_plan(self, input_shape):
    """The Keras 2 layers' factored-training plan, on the TensorFlow backend only."""
    if (
      not _tensorflow_backend()
      or self.train_form == "kernel"
      or getattr(self, "groups", 1) != 1
      or any(d is None for d in tuple(input_shape)[1:])
    ):
      return None
    from keras_epitome import factored_training

    output_shape = self.compute_output_shape(tuple(input_shape))
    plan = factored_training.plan_for(
      self._geometry, tuple(input_shape), tuple(output_shape), self.train_form
    )
    return None if plan.is_kernel else plan

  def _linear(self, inputs, kernel):
    """The stock layer's convolution or matmul with ``kernel`` (no bias)."""
    if isinstance(self, keras.layers.Dense):
      return ops.matmul(inputs, kernel)
    padding = self.padding
    if padding == "causal":
      inputs = ops.pad(inputs, self._compute_causal_padding())
      padding = "valid"
    return ops.conv(
      inputs,
      kernel,
      strides=list(self.strides),
      padding=padding,
      dilation_rate=self.dilation_rate,
      data_format=self.data_format,
    )

  def call(self, inputs, training=None):
    offsets = self._step_offsets(inputs, training)
    plan = self._train_plan(inputs.shape)
    if plan is not None:
      from keras_epitome import factored_training

      y = factored_training.factored_apply(
        inputs,
        ops.convert_to_tensor(self.epitome),
        *offsets,
        self._geometry,
        self._linear,
        plan,
      )
    else:
      kernel = ops.cast(self._sample(*offsets), self.compute_dtype)
      y = self._linear(inputs, kernel)
    if self.use_bias:
      y = ops.add(y, ops.cast(self.bias, y.dtype))
    return self.activation(y) if self.activation is not None else y

  # -- saving: the stored variables, not the kernel ------------------------------

  def save_own_variables(self, store):
    # The stock Conv/Dense save ``self.kernel`` (here: sampled); save what the
    # layer stores instead, as Layer does.
    keras.layers.Layer.save_own_variables(self, store)

  def load_own_variables(self, store):
    keras.layers.Layer.load_own_variables(self, store)

  # -- what Keras 3 offers for stock kernels ---------------------------------------

  def quantize(self, mode=None, type_check=True, config=None):
    raise ValueError(
      f"{self._desc()}: Keras 3's quantize({mode!r}) needs a stored kernel; an "
      f"epitome layer stores an epitome. {learners.QUANTIZE_ADVICE}"
    )

  def enable_lora(self, rank, *args, **kwargs):
    raise ValueError(
      f"{self._desc()}: enable_lora({rank}) needs a stored kernel; an epitome "
      "layer stores an epitome (train the epitome directly, or strip the "
      "epitome layers with keras_epitome.keras3.strip_epitome first)"
    )

  # -- config --------------------------------------------------------------------

  def get_config(self):
    config = super().get_config()
    config.update(spec.epitome_config(self))
    return config


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeConv1D(EpitomeMixin, keras.layers.Conv1D):
  """Keras 3 ``Conv1D`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeConv1D(32, 64, strides=4, padding="causal", compression=4)
    >>> tuple(layer(np.zeros((2, 8000, 16), "float32")).shape)
    (2, 2000, 32)
  """


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeConv2D(EpitomeMixin, keras.layers.Conv2D):
  """Keras 3 ``Conv2D`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeConv2D(64, 3, padding="same", compression=4)
    >>> tuple(layer(np.zeros((2, 8, 8, 32), "float32")).shape)
    (2, 8, 8, 64)
  """


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeDense(EpitomeMixin, keras.layers.Dense):
  """Keras 3 ``Dense`` whose kernel is sampled from an epitome (see :class:`EpitomeMixin`).

  Example:
    >>> layer = EpitomeDense(10, compression=4)
    >>> tuple(layer(np.zeros((2, 64), "float32")).shape)
    (2, 10)
  """


EPITOME_LAYERS = (EpitomeConv1D, EpitomeConv2D, EpitomeDense)
STOCK_OF = {
  EpitomeConv1D: keras.layers.Conv1D,
  EpitomeConv2D: keras.layers.Conv2D,
  EpitomeDense: keras.layers.Dense,
}


for _cls in EPITOME_LAYERS:
  # The stock signature plus the epitome keyword arguments (see spec).
  _cls.__signature__ = spec.merged_signature(STOCK_OF[_cls].__init__)
del _cls
STOCK_TO_EPITOME = {stock: epi for epi, stock in STOCK_OF.items()}


def epitome_layers(model) -> list:
  """All Keras 3 epitome layers of ``model``, nested models included."""
  return [
    layer
    for layer in model._flatten_layers(include_self=False)
    if is_epitome_layer(layer)
  ]


def is_epitome_layer(layer) -> bool:
  """Whether ``layer`` is a Keras 3 epitome layer."""
  return isinstance(layer, EpitomeMixin)
