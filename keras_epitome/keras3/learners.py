"""The NES transformation learner for Keras 3 (any backend).

The Keras 3 counterpart of :class:`keras_epitome.learners.FeatureOffsetLearner`:
a small network on the layer's own input (strided convolution, BatchNorm,
ReLU6, 1x1 convolution, average over positions and batch) predicts a
correction to the layer's base offsets. Under a ``tf.distribute`` strategy the
vector is averaged over the replicas, so every replica samples the same
kernel; under ``keras.distribution.DataParallel`` (JAX) the batch mean is
already a mean over the global batch.
"""

from __future__ import annotations

import types

import keras
from keras import ops

from keras_epitome import learner_common

# What to do instead of Keras 3's ``quantize`` on an epitome layer.
QUANTIZE_ADVICE = (
  "For an int8 file, export with keras_epitome.keras3.export_tflite(model, path, "
  "quantize='int8', representative_data=...); to quantize in Keras, first turn "
  "the epitome layers into stock layers with keras_epitome.keras3.strip_epitome(model)"
)


class _LearnerSublayer:
  """The learner's ``Dense``/``Conv`` layers refuse Keras 3's ``quantize``.

  ``model.quantize`` quantizes every layer without sublayers, so it would walk
  into an epitome layer's learner, quantize the learner's layers and leave
  the epitome layer itself (which has sublayers) untouched, without a word.
  ``owner`` names the epitome layer (:meth:`FeatureOffsetLearner.adopt`).
  """

  owner = "an epitome layer"

  def quantize(self, mode=None, type_check=True, config=None):
    raise ValueError(
      f"{self.owner}: Keras 3's quantize({mode!r}) reached layer {self.name!r} of "
      "its feature offset learner; an epitome layer stores an epitome, not a "
      f"kernel, and is not quantized by Keras 3. {QUANTIZE_ADVICE}"
    )


def _sublayer(cls):
  return type(cls.__name__, (_LearnerSublayer, cls), {"__module__": __name__})


_LAYERS = types.SimpleNamespace(
  Dense=_sublayer(keras.layers.Dense),
  Conv1D=_sublayer(keras.layers.Conv1D),
  Conv2D=_sublayer(keras.layers.Conv2D),
  BatchNormalization=keras.layers.BatchNormalization,
)


@keras.saving.register_keras_serializable(package="keras_epitome")
class FeatureOffsetLearner(learner_common.FeatureLearnerBase, keras.layers.Layer):
  """Predicts offset corrections from a layer's input (NES transformation learner).

  The network and its arguments (``num_offsets``, ``rank``, ``hidden``,
  ``stride``) are those of :mod:`keras_epitome.learner_common`; its last
  layer starts at zero, so the layer starts from its base offsets.
  """

  _keras_layers = _LAYERS

  def adopt(self, owner: str) -> None:
    """Names the epitome layer ``owner`` in the sublayers' errors."""
    for layer in (self.features, self.predict_offsets):
      layer.owner = owner

  def _synchronized(self) -> bool:
    # Synchronized statistics exist on the TensorFlow backend only.
    return keras.backend.backend() == "tensorflow"

  def build(self, input_shape):
    self.features.build(input_shape)
    hidden_shape = self.features.compute_output_shape(input_shape)
    self.norm.build(hidden_shape)
    self.predict_offsets.build(hidden_shape)

  def call(self, inputs, training=None):
    x = self.features(inputs)
    x = self.norm(x, training=training)
    x = ops.relu6(x)
    x = self.predict_offsets(x)
    x = ops.mean(ops.reshape(x, (-1, self.num_offsets)), axis=0)
    if keras.backend.backend() == "tensorflow":
      import tensorflow as tf

      ctx = tf.distribute.get_replica_context()
      if ctx is not None and ctx.num_replicas_in_sync > 1:
        x = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)
    return x

  def compute_output_shape(self, input_shape):
    return (self.num_offsets,)
