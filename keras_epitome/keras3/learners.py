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

import keras
from keras import ops

from keras_epitome import learner_common


@keras.saving.register_keras_serializable(package="keras_epitome")
class FeatureOffsetLearner(learner_common.FeatureLearnerBase, keras.layers.Layer):
  """Predicts offset corrections from a layer's input (NES transformation learner).

  The network and its arguments (``num_offsets``, ``rank``, ``hidden``,
  ``stride``) are those of :mod:`keras_epitome.learner_common`; its last
  layer starts at zero, so the layer starts from its base offsets.
  """

  _keras_layers = keras.layers

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
