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


class ZeroChannelsTest(tf.test.TestCase, parameterized.TestCase):
  """Issue 27 F4: zero channels raised a bare ZeroDivisionError (ratio rule)."""

  @parameterized.named_parameters(
    ("dense_zero_units", ke.EpitomeDense, dict(units=0), (2, 4), r"units must be"),
    (
      "conv2d_zero_filters",
      ke.EpitomeConv2D,
      dict(filters=0, kernel_size=3),
      (1, 5, 5, 3),
      r"Invalid value for argument `filters`",
    ),
    (
      "dense_zero_input",
      ke.EpitomeDense,
      dict(units=4),
      (2, 0),
      r"kernel shape \(0, 4\) has 0 input channels",
    ),
    (
      "conv2d_zero_input",
      ke.EpitomeConv2D,
      dict(filters=4, kernel_size=3),
      (1, 5, 5, 0),
      r"kernel shape \(3, 3, 0, 4\) has 0 input channels",
    ),
    (
      "conv1d_zero_input_explicit_shape",
      ke.EpitomeConv1D,
      dict(filters=4, kernel_size=3, epitome_shape=(3, 1, 1), compression=None),
      (1, 5, 0),
      r"kernel shape \(3, 0, 4\) has 0 input channels",
    ),
  )
  def test_layer_refuses_with_its_name(self, cls, kwargs, shape, message):
    kwargs = {"compression": 4, **kwargs}
    if kwargs["compression"] is None:
      del kwargs["compression"]
    with self.assertRaisesRegex(ValueError, f"{cls.__name__} 'z': " + message):
      layer = cls(**kwargs, name="z")
      layer(tf.zeros(shape))

  def test_ratio_rule_and_geometry(self):
    for shape in ((0, 4), (4, 0), (3, 3, 0, 8)):
      with self.assertRaisesRegex(ValueError, r"at least 1 input and 1 output channel"):
        sampling.epitome_shape_for_ratio(shape, 4)
      with self.assertRaisesRegex(ValueError, r"at least 1 input and 1 output channel"):
        sampling.layer_geometry(shape, compression=4)
    with self.assertRaisesRegex(ValueError, "spatial window of positive sizes"):
      sampling.epitome_shape_for_ratio((0, 4, 4), 2)


class IntegerShapeTest(tf.test.TestCase, parameterized.TestCase):
  """Issue 27 F5: shapes were truncated (3.7 -> 3) and strings parsed as ints."""

  @parameterized.named_parameters(
    ("fractions", (3.7, 3, 4.9, 4), r"epitome_shape entry 0 is 3\.7"),
    ("string_entry", (3, 3, "4", 4), r"epitome_shape entry 2 is '4'"),
    ("bool_entry", (3, 3, True, 4), r"epitome_shape entry 2 is True"),
    ("none_entry", (3, 3, None, 4), r"epitome_shape entry 2 is None"),
    ("nan_entry", (3, 3, float("nan"), 4), r"epitome_shape entry 2 is nan"),
    ("string", "3344", r"epitome_shape must be an int or a tuple of ints"),
  )
  def test_epitome_shape_refused(self, value, message):
    with self.assertRaisesRegex(ValueError, "EpitomeConv2D 'c': " + message):
      ke.EpitomeConv2D(8, 3, epitome_shape=value, name="c")
    model = keras.Sequential(
      [keras.Input((8, 8, 8)), keras.layers.Conv2D(8, 3, name="c")]
    )
    with self.assertRaisesRegex(ValueError, message):
      ke.epitomize(model, policy={"c": dict(epitome_shape=value)}, verbose=False)
    with self.assertRaisesRegex(ValueError, message.replace("epitome_shape", ".*")):
      sampling.layer_geometry((3, 3, 8, 8), epitome_shape=value)

  def test_integral_values_accepted(self):
    layer = ke.EpitomeConv2D(8, 3, epitome_shape=(3.0, np.int64(3), 4, 4))
    self.assertEqual(layer.epitome_shape, (3, 3, 4, 4))
    layer(tf.zeros([1, 5, 5, 8]))
    self.assertEqual(layer.epitome.shape, (3, 3, 4, 4))

  def test_spatial_stride_and_geometry_refuse_fractions(self):
    with self.assertRaisesRegex(
      ValueError, r"EpitomeConv1D 'c': spatial_stride entry 0 is 1\.5"
    ):
      ke.EpitomeConv1D(8, 3, epitome_shape=(5, 4, 4), spatial_stride=[1.5], name="c")
    with self.assertRaisesRegex(ValueError, r"epitome shape entry 0 is 2\.5"):
      sampling.EpitomeGeometry((2, 4), (2.5, 4))


class RatioShortfallTest(tf.test.TestCase):
  """Issue 27 F5: a ratio far above what a small kernel reaches was silent."""

  def test_warns_naming_the_layer_and_why(self):
    layer = ke.EpitomeDense(13, compression=27.6, name="fc")
    with self.assertWarnsRegex(
      UserWarning,
      r"EpitomeDense 'fc': compression=27\.6 requested, 2\.29x achieved "
      r"\(kernel \(3, 13\), epitome \(1, 1\), routing map 16 offsets\): the "
      r"routing map's 16 offsets",
    ):
      layer(tf.zeros([1, 3]))
    self.assertAlmostEqual(layer.compression_ratio, 39 / 17)

  def test_one_channel_floor_named(self):
    g = sampling.layer_geometry((1, 3, 4, 4), compression=16)
    self.assertEqual(g.epitome_shape, (1, 3, 1, 1))
    why = ke.geometry.ratio_shortfall(g, 16)
    self.assertIn("4.36x achieved", why)
    self.assertIn("floor of one input and one output channel", why)

  def test_silent_when_reached_or_not_a_layer(self):
    import warnings

    with warnings.catch_warnings():
      warnings.simplefilter("error")
      ke.EpitomeConv2D(64, 3, compression=4)(tf.zeros([1, 5, 5, 64]))
      ke.EpitomeDense(13, epitome_shape=(1, 1))(tf.zeros([1, 3]))  # no ratio asked
      sampling.layer_geometry((3, 13), compression=27.6)  # a trial geometry
    self.assertIsNone(
      ke.geometry.ratio_shortfall(sampling.layer_geometry((64, 64), 4), 4)
    )


if __name__ == "__main__":
  tf.test.main()
