"""Tests for keras_epitome.walk: layers inside nested models and TF-MOT wrappers.

Also the functions built on the walk: :func:`ke.summarize` must count the
epitome layers of a pruned or quantization-aware (QAT) model, and the
inference transforms must refuse those training models with a message that
says what to do, instead of failing inside ``clone_model`` or returning the
training wrappers.
"""

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import keras_epitome as ke
from keras_epitome import walk

keras = ke.keras
sparsity = tfmot.sparsity.keras


def _model():
  x = keras.Input((8, 8, 4))
  h = keras.layers.Conv2D(8, 3, activation="relu", name="stock")(x)
  h = ke.EpitomeConv2D(16, 3, activation="relu", compression=4, name="econv")(h)
  h = keras.layers.Flatten()(h)
  y = ke.EpitomeDense(10, compression=4, name="edense")(h)
  return keras.Model(x, y)


def _pruned():
  schedule = sparsity.ConstantSparsity(0.5, begin_step=0, frequency=1)
  return sparsity.prune_low_magnitude(_model(), pruning_schedule=schedule)


class WalkTest(tf.test.TestCase):
  def test_nested_models_and_wrappers(self):
    inner = keras.Sequential(
      [keras.Input((6,)), keras.layers.Dense(6, name="d1")], name="inner"
    )
    x = keras.Input((6,))
    h = inner(x)
    h = keras.layers.Dense(4, name="d2")(h)
    h = keras.layers.Reshape((2, 2))(h)
    y = keras.layers.TimeDistributed(keras.layers.Dense(3, name="d3"), name="td")(h)
    model = keras.Model(x, y)
    refs = [
      r for r in walk.walk(model) if not isinstance(r.layer, keras.layers.InputLayer)
    ]
    self.assertEqual([r.layer.name for r in refs], ["d1", "d2", "reshape", "d3"])
    self.assertEqual([layer.name for layer in walk.iter_layers(inner)], ["d1"])
    d1 = next(r for r in refs if r.layer.name == "d1")
    self.assertIs(d1.owner, inner)
    d3 = next(r for r in refs if r.layer.name == "d3")
    self.assertEqual(d3.outer.name, "td")
    self.assertIs(d3.owner, model)


class SummarizeWrappersTest(tf.test.TestCase):
  def test_pruned_and_qat_models_are_summarized(self):
    model = _model()
    want = ke.summarize(model, print_fn=None)
    self.assertEqual([r.name for r in want.layers], ["stock", "econv", "edense"])
    for training_model in (_pruned(), ke.quantize_model(model)):
      got = ke.summarize(training_model, print_fn=None)
      self.assertEqual([r.name for r in got.layers], ["stock", "econv", "edense"])
      self.assertEqual(got.macs_factored, want.macs_factored)
      self.assertEqual(got.macs_materialized, want.macs_materialized)
      self.assertGreater(got.macs_materialized, got.macs_factored)
      self.assertEqual(
        [r.stored_params for r in got.layers], [r.stored_params for r in want.layers]
      )


# Transforms that refuse a model still inside a training wrapper.
_REFUSING_TRANSFORMS = (
  ("strip_epitome", ke.strip_epitome),
  ("export_tflite", ke.export_tflite),
  ("factorize", ke.factorize),
)


class TrainingWrappersRefusedTest(tf.test.TestCase):
  def test_qat_model(self):
    qat = ke.quantize_model(_model())
    for name, fn in _REFUSING_TRANSFORMS:
      with self.assertRaisesRegex(
        ValueError,
        name + r": model '.*' is a quantization-aware training model .*"
        r"TFLiteConverter.from_keras_model",
      ):
        fn(qat)

  def test_pruned_model(self):
    pruned = _pruned()
    for name, fn in _REFUSING_TRANSFORMS:
      with self.assertRaisesRegex(
        ValueError,
        name + r": layer 'econv' \(EpitomeConv2D\) is inside a pruning wrapper "
        r"\(PruneLowMagnitude\); strip it first: .*strip_pruning",
      ):
        fn(pruned)
    # After strip_pruning, the same calls work.
    stripped = sparsity.strip_pruning(pruned)
    x = np.random.default_rng(0).random((2, 8, 8, 4)).astype(np.float32)
    stock = ke.strip_epitome(stripped)
    self.assertAllClose(stock(x), stripped(x), atol=1e-5)

  def test_pruned_stock_layers_are_left_alone(self):
    # Pruning wrappers around stock layers are no obstacle to strip_epitome.
    model = keras.Sequential(
      [keras.Input((4,)), ke.EpitomeDense(8, compression=2, name="e")]
    )
    outer = keras.Sequential(
      [
        model,
        sparsity.prune_low_magnitude(keras.layers.Dense(3, name="p")),
      ]
    )
    stock = ke.strip_epitome(outer)
    self.assertNotIn(
      "EpitomeDense", [type(layer).__name__ for layer in walk.iter_layers(stock)]
    )


if __name__ == "__main__":
  tf.test.main()
