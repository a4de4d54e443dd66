"""``SVDCompressor``: a low-rank algorithm for the weight-compression contract.

A second, unrelated algorithm beside the epitome one; it keeps the contract
and the wrappers honest (nothing in them may assume epitomes).
"""

from __future__ import annotations

from typing import List

import tensorflow as tf

from keras_epitome.backend import keras
from keras_epitome.compression.algorithm import WeightCompressor, kernel_weight

_PACKAGE = "keras_epitome"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SVDCompressor(WeightCompressor):
  """Toy low-rank algorithm: ``K[s] = U[s] @ SV[s]`` per spatial tap.

  The kernel's last two axes are factored by a truncated SVD, separately for
  each spatial tap (as in TF-MOT's SVD example), for any kernel rank. Training
  and inference use the same two factors.

  Args:
    rank: the number of singular values kept (kernels whose channel sides are
      not both larger are left alone).

  Example:
    >>> dense = keras.layers.Dense(8)
    >>> dense.build((None, 16))
    >>> algorithm = SVDCompressor(rank=2)
    >>> [w.shape for w in algorithm.get_compressible_weights(dense)]
    [TensorShape([16, 8])]
  """

  def __init__(self, rank: int = 8):
    if int(rank) < 1:
      raise ValueError(f"SVDCompressor: rank must be >= 1, got {rank!r}")
    self.rank = int(rank)

  def get_compressible_weights(self, original_layer) -> List[tf.Variable]:
    kernel = kernel_weight(original_layer)
    if kernel is None or min(kernel.shape[-2:]) <= self.rank:
      return []
    return [kernel]

  def init_training_weights(self, pretrained_weight):
    s, u, v = tf.linalg.svd(tf.convert_to_tensor(pretrained_weight))
    r = self.rank
    u = u[..., :r]
    sv = s[..., :r, tf.newaxis] * tf.linalg.matrix_transpose(v[..., :r])
    for name, value in (("u", u), ("sv", sv)):
      self.add_training_weight(
        name=name,
        shape=value.shape,
        dtype=value.dtype,
        initializer=keras.initializers.Constant(value.numpy()),
      )

  def project_training_weights(self, u, sv):
    return tf.matmul(u, sv)

  def decompress_weights(self, u, sv):
    return tf.matmul(u, sv)

  def get_config(self) -> dict:
    return {"rank": self.rank}
