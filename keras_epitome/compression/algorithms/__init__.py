"""Implementations of the weight-compression contract."""

from keras_epitome.compression.algorithms.epitome import EpitomeCompressor
from keras_epitome.compression.algorithms.svd import SVDCompressor

__all__ = ["EpitomeCompressor", "SVDCompressor"]
