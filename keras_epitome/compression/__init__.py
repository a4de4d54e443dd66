"""TF-MOT's weight-compression API, implemented by the package.

Three parts, with dependencies pointing one way only:

* :mod:`~keras_epitome.compression.algorithm`: the contract
  (:class:`WeightCompressor`, :class:`StaticWeight`);
* :mod:`~keras_epitome.compression.wrappers`: the training and inference
  wrappers that drive any algorithm, and the model-level API;
* :mod:`~keras_epitome.compression.algorithms`: implementations
  (:class:`EpitomeCompressor`, :class:`SVDCompressor`).

Example:
  >>> from keras_epitome import compression
  >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32)])
  >>> algorithm = compression.EpitomeCompressor(compression=4)
  >>> training = compression.compress_model_for_training(model, algorithm)
  >>> inference = compression.compress_model_for_inference(training)
  >>> inference(tf.ones((2, 16))).shape
  TensorShape([2, 32])
"""

from keras_epitome.compression.algorithm import (
  StaticWeight,
  WeightCompressor,
  kernel_weight,
)
from keras_epitome.compression.algorithms import EpitomeCompressor, SVDCompressor
from keras_epitome.compression.wrappers import (
  CompressionInferenceWrapper,
  CompressionTrainingWrapper,
  compress_model_for_inference,
  compress_model_for_training,
  create_layer_for_inference,
  create_layer_for_training,
)

__all__ = [
  "CompressionInferenceWrapper",
  "CompressionTrainingWrapper",
  "EpitomeCompressor",
  "SVDCompressor",
  "StaticWeight",
  "WeightCompressor",
  "compress_model_for_inference",
  "compress_model_for_training",
  "create_layer_for_inference",
  "create_layer_for_training",
  "kernel_weight",
]
