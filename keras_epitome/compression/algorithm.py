"""The TF-MOT weight-compression contract: what an algorithm implements.

TF-MOT develops a per-weight compression API in its repository (under
``tensorflow_model_optimization/python/core/common/keras/compression/``) but
does not ship it in its wheels. This module is the package's own statement of
that contract; :mod:`keras_epitome.compression.wrappers` drives it and
:mod:`keras_epitome.compression.algorithms` holds implementations. Nothing here
imports either of them.

An algorithm describes one compressible weight at a time, as pure functions:

* :meth:`WeightCompressor.init_training_weights` turns the pretrained weight
  into *training weights* (declared with :meth:`~WeightCompressor.add_training_weight`);
* :meth:`~WeightCompressor.project_training_weights` computes the weight from
  them in the training graph (gradients flow through it);
* :meth:`~WeightCompressor.compress_training_weights` turns the trained
  training weights into the *compressed weights* stored for inference;
* :meth:`~WeightCompressor.decompress_weights` rebuilds the weight from them in
  the inference graph.

One addition to TF-MOT's contract: *static* weights
(:meth:`WeightCompressor.add_static_weight` and :class:`StaticWeight`) are
small arrays fixed when the graph is built (a kernel shape, a frozen routing
map). They live in the wrapper's config instead of in variables and reach the
algorithm as ``tf.constant`` tensors, whose values ``tf.get_static_value``
returns even inside ``tf.function``; an algorithm can therefore build a graph
whose structure depends on them (static slices instead of an index tensor).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from keras_epitome.backend import keras

# Names of the kernel-like weight attribute, in the order they are looked for.
KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel")


class StaticWeight:
  """A compressed or training weight that is a graph constant, not a variable.

  Return one from :meth:`WeightCompressor.compress_training_weights` for small
  data that should shape the inference graph (a frozen routing map, a kernel
  shape). The wrapper stores the value in its config (JSON: keep it small) and
  passes it to the algorithm as a ``tf.constant``.

  Args:
    value: array-like of numbers.
    dtype: NumPy dtype to store it as (default: that of ``value``).

  Example:
    >>> StaticWeight([3, 3, 16, 32], dtype="int32").value.tolist()
    [3, 3, 16, 32]
  """

  def __init__(self, value, dtype=None):
    self.value = np.asarray(value, dtype=dtype)
    if self.value.dtype.kind not in "biuf":
      raise ValueError(
        f"StaticWeight needs numbers, got an array of dtype {self.value.dtype}"
      )

  def __repr__(self):
    return f"StaticWeight({self.value.tolist()!r}, dtype={self.value.dtype.name!r})"


@dataclasses.dataclass
class WeightRepr:
  """One training weight declared by ``init_training_weights``.

  Either ``add_weight`` arguments (``args``/``kwargs``) for a variable, or a
  ``static`` value for a :class:`StaticWeight`.
  """

  args: Tuple[Any, ...] = ()
  kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  static: Optional[StaticWeight] = None
  name: str = ""


class WeightCompressor(metaclass=abc.ABCMeta):
  """A weight-compression algorithm, applied one weight at a time.

  The methods are pure functions of tensors: the wrappers hold the variables,
  call the algorithm inside the layer's forward pass, and keep an algorithm
  instance free of per-layer state, so one instance can drive every layer of
  a model. Subclasses that take constructor arguments should return them from
  :meth:`get_config` and be registered with
  ``keras.saving.register_keras_serializable`` so wrapped models can be saved
  and loaded.

  Example:
    >>> class Halve(WeightCompressor):  # toy: stores the weight / 2
    ...   def get_compressible_weights(self, layer):
    ...     return [w for w in [kernel_weight(layer)] if w is not None]
    ...   def init_training_weights(self, pretrained_weight):
    ...     self.add_training_weight(
    ...         name="half", shape=pretrained_weight.shape,
    ...         initializer=keras.initializers.Constant(pretrained_weight / 2))
    ...   def project_training_weights(self, half):
    ...     return 2 * half
    ...   def decompress_weights(self, half):
    ...     return 2 * half
  """

  # --------------------------------------------------------------------------
  # Declaring weights (called by the algorithm, collected by the wrappers).

  def get_compressible_weights(
    self, original_layer: keras.layers.Layer
  ) -> List[tf.Variable]:
    """The weights of ``original_layer`` this algorithm compresses.

    Args:
      original_layer: a built layer of the model being compressed.

    Returns:
      A list of the layer's variables (e.g. ``[layer.kernel]``); empty if the
      layer is left alone. The default compresses nothing.
    """
    del original_layer
    return []

  @abc.abstractmethod
  def init_training_weights(self, pretrained_weight: tf.Tensor) -> None:
    """Declares the training weights of one compressible weight.

    Calls :meth:`add_training_weight` (and :meth:`add_static_weight`) once per
    training weight; their order is the order of the arguments of
    :meth:`project_training_weights` and :meth:`compress_training_weights`.

    ``pretrained_weight`` holds the trained values when a layer is wrapped by
    :func:`create_layer_for_training`, and zeros (only its shape and dtype
    matter) when a wrapper is rebuilt from its config before its weights are
    loaded.

    Args:
      pretrained_weight: the original weight, a tensor.
    """

  def add_training_weight(self, *args, **kwargs) -> None:
    """Declares a training weight; arguments go to ``Layer.add_weight``.

    Pass ``name=`` (required), ``shape=``, ``dtype=``, ``initializer=``
    (e.g. ``keras.initializers.Constant(value)`` to start from a value computed
    from the pretrained weight) and ``trainable=``.
    """
    name = kwargs.get("name", args[0] if args else None)
    if not isinstance(name, str) or not name:
      raise ValueError(
        f"{type(self).__name__}.add_training_weight needs a name= (a "
        f"non-empty string), got {name!r}"
      )
    self._reprs().append(WeightRepr(args=args, kwargs=dict(kwargs), name=name))

  def add_static_weight(self, name: str, value, dtype=None) -> None:
    """Declares a training weight that is a graph constant (see :class:`StaticWeight`).

    Args:
      name: its name (unique among this weight's training weights).
      value: array-like of numbers, fixed for the life of the layer.
      dtype: optional NumPy dtype.
    """
    self._reprs().append(
      WeightRepr(static=StaticWeight(value, dtype=dtype), name=str(name))
    )

  def _reprs(self) -> List[WeightRepr]:
    if getattr(self, "_weight_reprs", None) is None:
      self._weight_reprs = []
    return self._weight_reprs

  def _collect_training_weights(self, pretrained_weight) -> List[WeightRepr]:
    """Runs :meth:`init_training_weights` and returns what it declared."""
    self._weight_reprs = []
    try:
      self.init_training_weights(pretrained_weight)
      return list(self._weight_reprs)
    finally:
      self._weight_reprs = None

  # --------------------------------------------------------------------------
  # The forward passes.

  @abc.abstractmethod
  def project_training_weights(self, *training_weights: tf.Tensor) -> tf.Tensor:
    """The weight, computed from its training weights in the training graph.

    Args:
      *training_weights: tensors, in the order they were declared.

    Returns:
      A tensor of the original weight's shape.
    """

  def update_training_weight(self, training_weight: tf.Tensor, value) -> None:
    """Assigns ``value`` to a training weight outside the optimizer.

    Call it from :meth:`project_training_weights` with one of the tensors it
    received. The wrapper assigns the value after the forward pass, in
    training only (``training=True``), like BatchNorm's moving statistics.

    Args:
      training_weight: the tensor received by ``project_training_weights``.
      value: the new value.

    Raises:
      ValueError: if ``training_weight`` is not one of the tensors received
        (or is a static weight).
    """
    for tensor, variable in getattr(self, "_update_targets", None) or ():
      if tensor is training_weight:
        self._pending_updates.append((variable, value))
        return
    raise ValueError(
      f"{type(self).__name__}.update_training_weight: the tensor is not a "
      "variable training weight passed to project_training_weights in this "
      "call; pass one of the tensors project_training_weights received"
    )

  def compress_training_weights(self, *training_weights: tf.Tensor) -> List[Any]:
    """The compressed form of one weight, from its trained training weights.

    The default stores the training weights as they are.

    Args:
      *training_weights: tensors, in the order they were declared (static
        weights as constants).

    Returns:
      A list of tensors (stored as variables) and :class:`StaticWeight`
      entries (stored in the config); their order is the order of the
      arguments of :meth:`decompress_weights`.
    """
    return list(training_weights)

  @abc.abstractmethod
  def decompress_weights(self, *compressed_weights: tf.Tensor) -> tf.Tensor:
    """Rebuilds the weight from its compressed form in the inference graph.

    Args:
      *compressed_weights: tensors, in the order
        :meth:`compress_training_weights` returned them.

    Returns:
      A tensor of the original weight's shape.
    """

  # --------------------------------------------------------------------------
  # Serialization.

  def get_config(self) -> dict:
    """Constructor arguments (override when ``__init__`` takes any)."""
    return {}

  @classmethod
  def from_config(cls, config: dict) -> "WeightCompressor":
    return cls(**config)


# ----------------------------------------------------------------------------
# Helpers shared by the algorithms and the wrappers.


def kernel_weight(layer: keras.layers.Layer) -> Optional[tf.Variable]:
  """The kernel-like variable of a layer, or ``None``.

  Looks for the attributes ``kernel`` and ``depthwise_kernel`` holding a
  variable (an epitome layer's ``kernel`` is a computed tensor and is not
  returned).

  Example:
    >>> layer = keras.layers.DepthwiseConv2D(3)
    >>> layer.build((None, 8, 8, 4))
    >>> kernel_weight(layer).shape
    TensorShape([3, 3, 4, 1])
  """
  for attr in KERNEL_ATTRIBUTES:
    value = getattr(layer, attr, None)
    if isinstance(value, tf.Variable):
      return value
  return None
