"""Quantization-aware training (TF-MOT) for epitome layers.

TF-MOT's default 8-bit registry knows the stock layers only; this module adds
what its extension points need for epitome layers:

* :class:`EpitomeQuantizeConfig`: the ``QuantizeConfig`` of every epitome
  layer. The weight that is quantized is the **epitome**, the one weight the
  layer stores: ``get_weights_and_quantizers`` returns it with an 8-bit
  symmetric per-tensor quantizer and ``set_quantize_weights`` hands the
  fake-quantized epitome to the layer, whose kernel (in ``call`` and in
  ``layer.kernel``) is then sampled from it. Gradients reach the epitome
  (straight-through) and the offsets (through the sampler). The activation is
  quantized as TF-MOT's default config does for ``Conv2D``/``Dense``.
* :class:`EpitomeQuantizeRegistry` / :class:`EpitomeQuantizeScheme`: TF-MOT's
  default 8-bit scheme plus the epitome layers, for
  ``tfmot.quantization.keras.quantize_apply(..., scheme=...)``.
* :func:`quantize_model`: ``tfmot.quantization.keras.quantize_model`` for
  models with epitome layers (TF-MOT's own ``quantize_model`` takes no scheme,
  so it cannot know them; it raises ``RuntimeError: Layer ... is not
  supported``).
* :func:`quantize_scope`: TF-MOT's ``quantize_scope`` plus this package's
  classes, for loading saved QAT models.
* :class:`EpitomeQuantizeLayoutTransform`: TF-MOT's default layout
  transforms plus the same ``BatchNormalization`` patterns for epitome layers
  that TF-MOT applies to ``Conv2D``/``Dense``: an epitome layer (linear
  activation) followed by ``BatchNormalization`` (and optionally ``ReLU`` or
  ``Activation("relu")``) gets no fake quant between the layer and BN (its
  activation becomes TF-MOT's ``NoOpActivation``); BN quantizes its output, or
  nothing when the ReLU follows (the ReLU does). BN is not folded into the
  epitome (neither does TF-MOT's default scheme fold it into ``Conv2D``); the
  TFLite converter folds it. As in TF-MOT, the pattern applies to the
  ``EpitomeConv1D`` too, which TF-MOT's registry does not quantize at all.

What the TFLite converter makes of it depends on whether it constant-folds
the sampler. With the slice-based sampler it does: the converted model holds
the materialized kernel in int8 and runs an int8 convolution, with
per-channel scales the converter derives from the folded kernel (so outputs
differ from the Keras QAT model by about one 8-bit step on average); for a
small file export the factored form instead. With the earlier gather-based
sampler the converter kept the int8 epitome and sampled the kernel at run
time. Per-tensor quantization of the epitome converts in both cases; a
per-channel epitome quantizer did not convert with the gather-based sampler
("tfl.transpose op has mismatched quantized axes").

Saving: a QAT model saves and loads as ``.h5`` and as a SavedModel (load both
under :func:`quantize_scope`). The ``.keras`` format fails to load QAT models in
TF-MOT 0.8.1 (the ``QuantizeLayer`` variable count does not match), with or
without epitome layers.

Example:
  >>> import keras_epitome as ke
  >>> keras = ke.keras
  >>> model = keras.Sequential([
  ...     keras.Input((8, 8, 1)),
  ...     keras.layers.Conv2D(8, 3, activation="relu"),
  ...     ke.EpitomeConv2D(16, 3, activation="relu", compression=4),
  ...     keras.layers.Flatten(),
  ...     keras.layers.Dense(10),
  ... ])
  >>> qat = ke.quantize_model(model)
  >>> type(qat.layers[2].layer).__name__
  'EpitomeConv2D'
"""

from __future__ import annotations

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
  default_8bit_quantize_layout_transform as _layout,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
  default_8bit_transforms as _transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (  # noqa: E501
  model_transformer as _model_transformer,
)

from keras_epitome import backend
from keras_epitome import layers as epitome_layers
from keras_epitome.backend import keras

_tfq = tfmot.quantization.keras


@keras.saving.register_keras_serializable(package="keras_epitome")
class EpitomeQuantizeConfig(_tfq.QuantizeConfig):
  """``QuantizeConfig`` of an epitome layer: quantize the epitome and the activation.

  Args:
    num_bits: bits of the weight (epitome) and activation quantizers.

  Example:
    >>> import tensorflow_model_optimization as tfmot
    >>> layer = ke.EpitomeDense(16, compression=2)
    >>> annotated = tfmot.quantization.keras.quantize_annotate_layer(
    ...     layer, EpitomeQuantizeConfig())
  """

  def __init__(self, num_bits: int = 8):
    self.num_bits = int(num_bits)

  def _check(self, layer):
    if not isinstance(layer, epitome_layers.EPITOME_LAYERS):
      raise ValueError(
        f"EpitomeQuantizeConfig is for epitome layers; got "
        f"{type(layer).__name__} '{layer.name}'"
      )

  def get_weights_and_quantizers(self, layer):
    self._check(layer)
    quantizer = _tfq.quantizers.LastValueQuantizer(
      num_bits=self.num_bits, per_axis=False, symmetric=True, narrow_range=True
    )
    return [(layer.epitome, quantizer)]

  def get_activations_and_quantizers(self, layer):
    self._check(layer)
    quantizer = _tfq.quantizers.MovingAverageQuantizer(
      num_bits=self.num_bits, per_axis=False, symmetric=False, narrow_range=False
    )
    return [(layer.activation, quantizer)]

  def set_quantize_weights(self, layer, quantize_weights):
    if len(quantize_weights) != 1:
      raise ValueError(
        f"EpitomeQuantizeConfig: layer '{layer.name}' takes one quantized "
        f"weight (the epitome), got {len(quantize_weights)}"
      )
    (epitome,) = quantize_weights
    if tuple(epitome.shape) != tuple(layer.epitome.shape):
      raise ValueError(
        f"EpitomeQuantizeConfig: layer '{layer.name}': quantized epitome "
        f"shape {tuple(epitome.shape)} does not match the epitome's "
        f"{tuple(layer.epitome.shape)}"
      )
    # The layer samples its kernel from `self.epitome`, so this is where the
    # quantized weight takes effect (like TF-MOT's `layer.kernel = ...`).
    layer.epitome = epitome

  def set_quantize_activations(self, layer, quantize_activations):
    if len(quantize_activations) != 1:
      raise ValueError(
        f"EpitomeQuantizeConfig: layer '{layer.name}' takes one quantized "
        f"activation, got {len(quantize_activations)}"
      )
    layer.activation = quantize_activations[0]

  def get_output_quantizers(self, layer):
    return []

  def get_config(self):
    return {"num_bits": self.num_bits}

  def __eq__(self, other):
    return isinstance(other, EpitomeQuantizeConfig) and (
      other.num_bits == self.num_bits
    )

  def __ne__(self, other):
    return not self.__eq__(other)


class EpitomeQuantizeRegistry(_tfq.default_8bit.Default8BitQuantizeRegistry):
  """TF-MOT's default 8-bit registry, plus :class:`EpitomeQuantizeConfig` for epitome layers."""

  def supports(self, layer):
    if isinstance(layer, epitome_layers.EPITOME_LAYERS):
      return True
    return super().supports(layer)

  def get_quantize_config(self, layer):
    if isinstance(layer, epitome_layers.EPITOME_LAYERS):
      return EpitomeQuantizeConfig()
    return super().get_quantize_config(layer)


# Layer class names as they appear in a model's config (the registered name
# "keras_epitome>EpitomeConv2D" too); TF-MOT matches '^' + pattern + '$'.
_EPITOME_PATTERN = "(?:keras_epitome>)?(?:EpitomeConv1D|EpitomeConv2D|EpitomeDense)"
_BN_PATTERN = "(?:BatchNormalization|SyncBatchNormalization)"
_LayerPattern = _transforms.LayerPattern


def _epitome_bn_pattern():
  return _LayerPattern(
    _BN_PATTERN,
    inputs=[_LayerPattern(_EPITOME_PATTERN, config={"activation": "linear"})],
  )


class _EpitomeBatchNormQuantize(_transforms.Conv2DBatchNormQuantize):
  """Epitome layer + BN: TF-MOT's ``Conv2DBatchNormQuantize`` for epitome layers."""

  def pattern(self):
    return _epitome_bn_pattern()


class _EpitomeBatchNormReLUQuantize(_transforms.Conv2DBatchNormReLUQuantize):
  """Epitome layer + BN + ReLU: TF-MOT's ``Conv2DBatchNormReLUQuantize``."""

  def pattern(self):
    return _LayerPattern("ReLU", inputs=[_epitome_bn_pattern()])


class _EpitomeBatchNormActivationQuantize(_EpitomeBatchNormReLUQuantize):
  """Epitome layer + BN + ``Activation("relu")``."""

  def pattern(self):
    return _LayerPattern(
      "Activation", config={"activation": "relu"}, inputs=[_epitome_bn_pattern()]
    )


class EpitomeQuantizeLayoutTransform(_layout.Default8BitQuantizeLayoutTransform):
  """TF-MOT's default 8-bit layout transforms, plus epitome layer + BatchNormalization.

  An epitome layer with a linear activation followed by
  ``BatchNormalization`` (+ ``ReLU`` or ``Activation("relu")``) is treated as
  TF-MOT treats ``Conv2D`` + BN: the layer's activation becomes
  ``NoOpActivation`` (no fake quant before BN) and BN gets TF-MOT's
  ``Default8BitOutputQuantizeConfig`` (or ``NoOpQuantizeConfig`` when the
  ReLU follows). Layers annotated with their own ``QuantizeConfig`` are left
  as annotated. The epitome patterns run first, then TF-MOT's.
  """

  def apply(self, model, layer_quantize_map):
    transforms = [
      _EpitomeBatchNormReLUQuantize(),
      _EpitomeBatchNormActivationQuantize(),
      _EpitomeBatchNormQuantize(),
    ]
    model, layer_quantize_map = _model_transformer.ModelTransformer(
      model, transforms, set(layer_quantize_map.keys()), layer_quantize_map
    ).transform()
    return super().apply(model, layer_quantize_map)


class EpitomeQuantizeScheme(_tfq.default_8bit.Default8BitQuantizeScheme):
  """TF-MOT's default 8-bit scheme with the epitome registry and layout transform.

  :class:`EpitomeQuantizeRegistry` and :class:`EpitomeQuantizeLayoutTransform`.

  Example:
    >>> import tensorflow_model_optimization as tfmot
    >>> q = tfmot.quantization.keras
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           ke.EpitomeDense(8, compression=2)])
    >>> with quantize_scope():
    ...   qat = q.quantize_apply(q.quantize_annotate_model(model),
    ...                          scheme=EpitomeQuantizeScheme())
  """

  def get_layout_transformer(self):
    return EpitomeQuantizeLayoutTransform()

  def get_quantize_registry(self):
    return EpitomeQuantizeRegistry(disable_per_axis=self._disable_per_axis)


def quantize_scope(*args):
  """TF-MOT's ``quantize_scope`` with the epitome classes added.

  Use it around ``keras.models.load_model`` of a QAT model (``.h5`` or
  SavedModel) and around ``quantize_apply`` of models annotated by hand.

  Args:
    *args: more ``{name: class}`` dicts, as for TF-MOT's ``quantize_scope``.

  Returns:
    A custom-object scope (a context manager).

  Example:
    >>> with quantize_scope():  # doctest: +SKIP
    ...   qat = keras.models.load_model("qat.h5")
  """
  return _tfq.quantize_scope(backend.custom_objects(), *args)


def quantize_model(model, quantized_layer_name_prefix: str = "quant_"):
  """``tfmot.quantization.keras.quantize_model`` that knows epitome layers.

  Annotates every layer (``quantize_annotate_model``) and applies
  quantization with :class:`EpitomeQuantizeScheme`: stock layers get TF-MOT's
  default 8-bit configs, epitome layers :class:`EpitomeQuantizeConfig`. For
  finer control annotate layers yourself
  (``quantize_annotate_layer(layer, EpitomeQuantizeConfig())``) and call
  ``quantize_apply`` under :func:`quantize_scope`.

  Args:
    model: a built Sequential or functional model (no nested models: TF-MOT
      does not quantize a model inside a model).
    quantized_layer_name_prefix: prefix of the wrappers' names.

  Returns:
    The quantization-aware model, ready to ``compile`` and ``fit``.

  Example:
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           ke.EpitomeDense(8, compression=2, name="fc")])
    >>> qat = quantize_model(model)
    >>> qat.layers[-1].name
    'quant_fc'
  """
  backend.check_keras2(model, "quantize_model")  # TF-MOT QAT exists for Keras 2 only
  with quantize_scope():
    annotated = _tfq.quantize_annotate_model(model)
    return _tfq.quantize_apply(
      annotated,
      scheme=EpitomeQuantizeScheme(),
      quantized_layer_name_prefix=quantized_layer_name_prefix,
    )
