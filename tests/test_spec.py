"""Tests for keras_epitome.spec: the epitome arguments are checked once, alike everywhere.

Each bad value is given to every entry point that takes it (the layers, the
transform, the ratio rule, the TF-MOT compressor), which must all refuse it
with the same message.
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import sampling, spec
from keras_epitome.compression import EpitomeCompressor

keras = ke.keras


def _model():
  return keras.Sequential(
    [
      keras.Input((8, 8, 16)),
      keras.layers.Conv2D(32, 3, padding="same"),
      keras.layers.Flatten(),
      keras.layers.Dense(64),
    ]
  )


class CompressionTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("zero", 0),
    ("below_one", 0.5),
    ("nan", float("nan")),
    ("inf", float("inf")),
    ("negative", -4),
    ("bool", True),
    ("string", "4"),
  )
  def test_refused_everywhere(self, value):
    message = r"compression must be a finite number >= 1, got"
    with self.assertRaisesRegex(ValueError, "EpitomeConv2D 'c': " + message):
      ke.EpitomeConv2D(8, 3, compression=value, name="c")
    with self.assertRaisesRegex(ValueError, "epitomize: " + message):
      ke.epitomize(_model(), compression=value, verbose=False)
    with self.assertRaisesRegex(ValueError, "EpitomeCompressor: " + message):
      EpitomeCompressor(compression=value)
    with self.assertRaisesRegex(ValueError, message):
      sampling.epitome_shape_for_ratio((3, 3, 16, 16), value)

  @parameterized.named_parameters(
    ("int", 4), ("numpy_float", np.float32(4)), ("numpy_int", np.int64(4))
  )
  def test_accepted_everywhere(self, value):
    self.assertEqual(ke.EpitomeConv2D(8, 3, compression=value).compression, 4.0)
    self.assertEqual(EpitomeCompressor(compression=value).compression, 4.0)
    small = ke.epitomize(_model(), compression=value, verbose=False)
    self.assertLen(small.epitome_report.converted, 2)


class EpitomizeArgumentsTest(tf.test.TestCase, parameterized.TestCase):
  """A bad global setting raises; it must not return a model with nothing converted."""

  @parameterized.named_parameters(
    ("sampler", dict(sampler="bogus"), r"epitomize: unknown sampler 'bogus'"),
    ("learner", dict(learner="feture"), r"epitomize: unknown learner 'feture'"),
    (
      "fixed_feature",
      dict(sampler="fixed", learner="feature"),
      r"epitomize: learner='feature' needs sampler='learned'",
    ),
    ("offset_scale", dict(offset_scale=0.0), r"epitomize: offset_scale must be"),
    ("spatial_stride", dict(spatial_stride=-1), r"epitomize: spatial_stride"),
  )
  def test_bad_global_argument_raises(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      ke.epitomize(_model(), verbose=False, **kwargs)

  def test_per_layer_misfit_still_keeps_the_layer(self):
    # 600x is valid but too large for the conv's 4,608 kernel entries: that
    # layer alone stays stock, with the reason.
    small = ke.epitomize(_model(), compression=600, verbose=False)
    self.assertEqual([c.name for c in small.epitome_report.converted], ["dense"])
    self.assertIn("too large", small.epitome_report.kept[0].reason)


class OffsetScaleTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("inf", float("inf")), ("nan", float("nan")), ("zero", 0), ("negative", -1.0)
  )
  def test_refused(self, value):
    with self.assertRaisesRegex(
      ValueError, r"EpitomeDense 'd': offset_scale must be a finite number > 0"
    ):
      ke.EpitomeDense(8, compression=2, offset_scale=value, name="d")

  @parameterized.named_parameters(
    ("np_float32", np.float32(10)), ("np_int", np.int32(10))
  )
  def test_numpy_scalars_accepted(self, value):
    layer = ke.EpitomeDense(8, compression=2, offset_scale=value)
    self.assertEqual(layer.offset_scale, 10.0)
    y = layer(tf.ones([2, 16]))
    self.assertTrue(np.all(np.isfinite(y.numpy())))
    self.assertEqual(layer.get_config()["offset_scale"], 10.0)


class StoredSizeTest(tf.test.TestCase):
  def test_same_message_from_layer_and_transform(self):
    # A (2, 65) kernel: a (2, 64) epitome plus 3 offsets stores 131 > 130.
    message = r"epitome shape \(2, 64\) plus its routing map \(3 offsets\)"
    layer = ke.EpitomeDense(65, epitome_shape=(2, 64), name="d")
    with self.assertRaisesRegex(ValueError, "EpitomeDense 'd': " + message):
      layer(tf.zeros([1, 2]))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(65, name="d")])
    with self.assertRaisesRegex(ValueError, "epitomize: layer 'd': " + message):
      ke.epitomize(model, policy={"d": dict(epitome_shape=(2, 64))}, verbose=False)
    # The full kernel itself is allowed (compression=1 reproduces it).
    spec.check_stored_size(sampling.EpitomeGeometry((2, 65), (2, 65)))


if __name__ == "__main__":
  tf.test.main()
