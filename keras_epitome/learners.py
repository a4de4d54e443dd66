"""Offset learners: how an epitome layer's routing map is trained.

* ``param``: one free variable per offset (kept on the layer itself).
* ``feature``: the NES transformation learner. A small network looks at the
  layer's own input (strided convolution, BatchNorm, ReLU6, 1x1 convolution,
  global average, mean over the batch) and predicts a correction to the
  layer's base offsets. Offsets therefore change from batch to batch during
  training; an exponential moving average of them is the routing map used for
  inference and export, like BatchNorm's moving statistics.
"""

from __future__ import annotations

import tensorflow as tf

from keras_epitome.backend import keras
from keras_epitome.spec import LEARNERS  # noqa: F401  (re-exported)


@keras.saving.register_keras_serializable(package="keras_epitome")
class FeatureOffsetLearner(keras.layers.Layer):
  """Predicts offset corrections from a layer's input (NES transformation learner).

  The output is one vector of ``num_offsets`` numbers per call: the network's
  output averaged over every spatial position and over the batch (and over
  replicas under a ``tf.distribute`` strategy, so that all replicas sample the
  same kernel). The last layer starts at zero, so at initialization the
  learner predicts no correction and the layer starts from its base offsets.

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
    self.norm = keras.layers.BatchNormalization(synchronized=True, name="norm")

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    # Explicit builds get no name scope of their own; give each one, so weight
    # names stay unique (HDF5 files need that).
    with tf.name_scope(self.features.name):
      self.features.build(input_shape)
    hidden_shape = self.features.compute_output_shape(input_shape)
    with tf.name_scope(self.norm.name):
      self.norm.build(hidden_shape)
    with tf.name_scope(self.predict_offsets.name):
      self.predict_offsets.build(hidden_shape)
    super().build(input_shape)

  def call(self, inputs, training=None):
    x = self.features(inputs)
    x = self.norm(x, training=training)
    x = tf.nn.relu6(x)
    x = self.predict_offsets(x)
    x = tf.reshape(x, [-1, self.num_offsets])
    x = tf.reduce_mean(x, axis=0)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      x = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(
      num_offsets=self.num_offsets,
      rank=self.rank,
      hidden=self.hidden,
      stride=self.stride,
    )
    return config
