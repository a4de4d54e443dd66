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


@keras.saving.register_keras_serializable(package="keras_epitome")
class FeatureOffsetLearner(keras.layers.Layer):
  """Predicts offset corrections from a layer's input (NES transformation learner).

  The last layer starts at zero, so at initialization the learner predicts no
  correction and the layer starts from its base offsets.

  Args:
    num_offsets: length of the predicted vector.
    rank: spatial rank of the input (0 for Dense inputs).
    hidden: channels of the hidden layer.
    stride: stride of the first (strided) convolution.
  """

  def __init__(self, num_offsets, rank, hidden=16, stride=2, **kwargs):
    super().__init__(**kwargs)
    self.num_offsets = int(num_offsets)
    self.rank = int(rank)
    self.hidden = int(hidden)
    self.stride = int(stride)
    if self.rank == 0:
      self.features = keras.layers.Dense(self.hidden, name="features")
      self.predict_offsets = keras.layers.Dense(
        self.num_offsets, kernel_initializer="zeros", name="offsets"
      )
    else:
      conv = keras.layers.Conv1D if self.rank == 1 else keras.layers.Conv2D
      self.features = conv(
        self.hidden, 3, strides=self.stride, padding="same", name="features"
      )
      self.predict_offsets = conv(
        self.num_offsets, 1, kernel_initializer="zeros", name="offsets"
      )
    # Synchronized statistics exist on the TensorFlow backend only.
    self.norm = keras.layers.BatchNormalization(
      synchronized=keras.backend.backend() == "tensorflow", name="norm"
    )

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

  def get_config(self):
    config = super().get_config()
    config.update(
      num_offsets=self.num_offsets,
      rank=self.rank,
      hidden=self.hidden,
      stride=self.stride,
    )
    return config
