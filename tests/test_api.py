"""The public surface: the user's nouns at the top, internals in their modules."""

import doctest
import importlib
import pkgutil

import numpy as np
import tensorflow as tf

import keras_epitome as ke


def _package_modules():
  names = ["keras_epitome"]
  for info in pkgutil.walk_packages(ke.__path__, prefix="keras_epitome."):
    names.append(info.name)
  return sorted(names)


class PublicApiTest(tf.test.TestCase):
  def test_every_public_name_exists(self):
    for name in ke.__all__:
      self.assertTrue(hasattr(ke, name), name)

  def test_internals_are_not_public(self):
    for name in (
      "EpitomeMixin",
      "FeatureOffsetLearner",
      "sample_kernel",
      "fit_epitome",
    ):
      self.assertNotIn(name, ke.__all__)

  def test_compression_api_reachable_from_the_package(self):
    self.assertTrue(
      issubclass(ke.compression.EpitomeCompressor, ke.compression.WeightCompressor)
    )
    self.assertTrue(
      issubclass(ke.compression.SVDCompressor, ke.compression.WeightCompressor)
    )

  def test_custom_objects_lists_every_registered_class(self):
    objects = ke.custom_objects()
    for cls in (
      ke.EpitomeConv1D,
      ke.EpitomeConv2D,
      ke.EpitomeDense,
      ke.FactoredConv2D,
      ke.EpitomeQuantizeConfig,
      ke.compression.CompressionTrainingWrapper,
      ke.compression.CompressionInferenceWrapper,
      ke.compression.EpitomeCompressor,
    ):
      self.assertIs(objects[cls.__name__], cls)
      self.assertIs(objects["keras_epitome>" + cls.__name__], cls)


class DocstringExamplesTest(tf.test.TestCase):
  """Every docstring example in the package runs and prints what it says."""

  def test_docstring_examples(self):
    failures = []
    attempted = 0
    for name in _package_modules():
      module = importlib.import_module(name)
      globs = {"ke": ke, "keras": ke.keras, "tf": tf, "np": np}
      if name.startswith("keras_epitome.keras3"):
        import keras as keras3

        import keras_epitome.keras3 as ke3

        globs = {"ke": ke3, "keras": keras3, "np": np}
      result = doctest.testmod(
        module,
        extraglobs=globs,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=False,
        verbose=False,
      )
      attempted += result.attempted
      if result.failed:
        failures.append(f"{name}: {result.failed} of {result.attempted}")
    self.assertGreater(attempted, 50)
    self.assertEqual(failures, [], "run: python -m doctest -v on these modules")


if __name__ == "__main__":
  tf.test.main()
