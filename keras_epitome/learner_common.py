"""The NES feature learner's shape, shared by the Keras 2 and Keras 3 learners.

:class:`keras_epitome.learners.FeatureOffsetLearner` (tf_keras) and
:class:`keras_epitome.keras3.learners.FeatureOffsetLearner` (Keras 3) are the
same network: a strided convolution (a ``Dense`` for ``Dense`` inputs) to
``hidden`` channels, BatchNorm, ReLU6, and a zero-initialized 1x1
convolution to ``num_offsets`` channels. Its defaults, its sublayers and its
config keys are stated here once; each learner hands in its Keras's
``layers`` module. This module imports neither TensorFlow nor Keras.

Example:
  >>> import types
  >>> learner = types.SimpleNamespace(num_offsets=6, rank=1, hidden=16, stride=2)
  >>> learner_config(learner)
  {'num_offsets': 6, 'rank': 1, 'hidden': 16, 'stride': 2}
"""

from __future__ import annotations

from typing import Any, Dict

# Channels of the hidden layer and stride of the first convolution.
HIDDEN = 16
STRIDE = 2
# What ``get_config`` stores besides the stock Layer's keys.
CONFIG_KEYS = ("num_offsets", "rank", "hidden", "stride")


def init_learner(layer, layers, num_offsets, rank, hidden, stride) -> None:
  """Sets a learner's arguments (as ints) and its two sublayers.

  ``layer.features`` is a strided convolution to ``hidden`` channels (a
  ``Dense`` for ``Dense`` inputs) and ``layer.predict_offsets`` a
  zero-initialized 1x1 convolution (a ``Dense``) to ``num_offsets`` channels.

  Args:
    layer: the learner being constructed (after the Keras ``Layer``'s
      ``__init__``).
    layers: the Keras version's ``keras.layers`` module.
    num_offsets: length of the predicted vector.
    rank: spatial rank of the input (0 for Dense inputs).
    hidden: channels of the hidden layer.
    stride: stride of the first (strided) convolution.
  """
  layer.num_offsets = num_offsets = int(num_offsets)
  layer.rank = rank = int(rank)
  layer.hidden = hidden = int(hidden)
  layer.stride = stride = int(stride)
  if rank == 0:
    layer.features = layers.Dense(hidden, name="features")
    layer.predict_offsets = layers.Dense(
      num_offsets, kernel_initializer="zeros", name="offsets"
    )
    return
  conv = layers.Conv1D if rank == 1 else layers.Conv2D
  layer.features = conv(hidden, 3, strides=stride, padding="same", name="features")
  layer.predict_offsets = conv(
    num_offsets, 1, kernel_initializer="zeros", name="offsets"
  )


def learner_config(learner) -> Dict[str, Any]:
  """The learner's own config entries (:data:`CONFIG_KEYS`)."""
  return {key: getattr(learner, key) for key in CONFIG_KEYS}


class FeatureLearnerBase:
  """``__init__`` and ``get_config`` of both Keras versions' feature learners.

  A learner subclasses this and its Keras's ``Layer`` (in that order) and
  sets ``_keras_layers`` to its Keras's ``keras.layers`` module; the sublayers
  are ``features`` and ``predict_offsets`` (:func:`init_learner`) and
  ``norm``, a BatchNormalization with statistics synchronized over replicas
  where :meth:`_synchronized` says so.

  Args:
    num_offsets: length of the predicted vector.
    rank: spatial rank of the input (0 for Dense inputs).
    hidden: channels of the hidden layer.
    stride: stride of the first (strided) convolution.
  """

  _keras_layers = None  # the Keras version's keras.layers module

  def __init__(self, num_offsets, rank, hidden=HIDDEN, stride=STRIDE, **kwargs):
    super().__init__(**kwargs)
    init_learner(self, self._keras_layers, num_offsets, rank, hidden, stride)
    self.norm = self._keras_layers.BatchNormalization(
      synchronized=self._synchronized(), name="norm"
    )

  def _synchronized(self) -> bool:
    return True

  def get_config(self):
    config = super().get_config()
    config.update(learner_config(self))
    return config
