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

from keras_epitome import learner_common
from keras_epitome.backend import keras
from keras_epitome.spec import LEARNERS  # noqa: F401  (re-exported)


@keras.saving.register_keras_serializable(package="keras_epitome")
class FeatureOffsetLearner(learner_common.FeatureLearnerBase, keras.layers.Layer):
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

  _keras_layers = keras.layers

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
