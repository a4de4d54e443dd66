"""Tests for keras_epitome.harden: integer routing maps from learned ones."""

import os

import numpy as np
import oracle
import tensorflow as tf
from layer_test_util import randomize_routing

import keras_epitome as ke

keras = ke.keras


def _is_integer(routing):
  return all(np.allclose(np.asarray(a), np.round(np.asarray(a))) for a in routing)


def _model(learner="param"):
  inputs = keras.Input((16, 8))
  x = ke.EpitomeConv1D(
    12, 3, padding="same", epitome_shape=(5, 4, 6), learner=learner, name="c1"
  )(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.GlobalAveragePooling1D()(x)
  out = ke.EpitomeDense(5, compression=2, name="d")(x)
  return keras.Model(inputs, out)


class HardenTest(tf.test.TestCase):
  def test_layer_in_place_rounds_and_refits(self):
    rng = np.random.default_rng(0)
    layer = ke.EpitomeConv2D(8, 3, epitome_shape=(4, 3, 3, 4))
    layer(tf.zeros((1, 6, 6, 6)))
    randomize_routing(layer, rng=rng)
    before = layer.kernel.numpy()
    g = layer.epitome_geometry
    # Rounding alone, for comparison: the refit can only be closer.
    epitome, hard = ke.harden.hardened_values(layer, refit=False)
    plain = oracle.sample_kernel(epitome, hard, g)
    err = ke.harden_layer(layer)
    self.assertTrue(_is_integer(layer.routing_map))
    self.assertAllClose(layer.routing_map.in_offsets, hard.in_offsets)
    after = layer.kernel.numpy()
    self.assertAllClose(err, np.linalg.norm(after - before) / np.linalg.norm(before))
    self.assertLessEqual(
      np.linalg.norm(after - before), np.linalg.norm(plain - before) + 1e-6
    )
    # Hardening an integer map changes nothing.
    self.assertLess(ke.harden_layer(layer), 1e-6)

  def test_model_is_fixed_integer_and_fine_tunes(self):
    rng = np.random.default_rng(1)
    model = _model()
    for name in ("c1", "d"):
      randomize_routing(model.get_layer(name), rng=rng)
    model.get_layer("bn").set_weights(
      [rng.uniform(0.5, 2, w.shape) for w in model.get_layer("bn").get_weights()]
    )
    report = {}
    hard = ke.harden_routing(model, report=report)
    self.assertEqual(sorted(report), ["c1", "d"])
    for name in ("c1", "d"):
      old, new = model.get_layer(name), hard.get_layer(name)
      self.assertEqual(new.sampler, "fixed")
      self.assertTrue(_is_integer(new.routing_map))
      offsets = [v for v in new.trainable_weights if "offsets" in v.name]
      self.assertEmpty(offsets)
      want, routing = ke.harden.hardened_values(old)
      self.assertAllClose(new.epitome, want)
      self.assertAllClose(new.routing_map.out_offsets, routing.out_offsets)
      # The original model is untouched (still fractional).
      self.assertFalse(_is_integer(old.routing_map))
    self.assertAllClose(
      hard.get_layer("bn").get_weights(), model.get_layer("bn").get_weights()
    )
    # Fine-tuning trains the epitomes and keeps the map integer.
    x = rng.standard_normal((32, 16, 8)).astype(np.float32)
    y = rng.integers(0, 5, 32)
    hard.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    routing = hard.get_layer("c1").routing_map
    epitome = hard.get_layer("c1").epitome.numpy()
    hard.fit(x, y, epochs=1, batch_size=8, verbose=0)
    self.assertAllClose(hard.get_layer("c1").routing_map.in_offsets, routing.in_offsets)
    self.assertNotAllClose(hard.get_layer("c1").epitome, epitome)
    # Saved and loaded with its integer map.
    path = os.path.join(self.get_temp_dir(), "hard.keras")
    hard.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(loaded(x), hard(x), atol=1e-5)

  def test_feature_learner_uses_moving_map(self):
    model = _model(learner="feature")
    layer = model.get_layer("c1")
    g = layer.epitome_geometry
    moving = np.concatenate(
      [np.full(g.num_in_chunks, 1.4), np.full(g.num_out_chunks, 2.6), np.full(2, 0.7)]
    )
    layer.moving_offsets.assign(moving)
    hard = ke.harden_routing(model)
    r = hard.get_layer("c1").routing_map
    self.assertAllClose(r.in_offsets, [1.0, 1.0])
    self.assertAllClose(r.out_offsets, [3.0, 3.0])
    self.assertAllClose(r.spatial_offsets, [[1.0], [1.0]])
    self.assertIsNone(hard.get_layer("c1").offset_learner)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "harden: layer 'x' is a Dense"):
      ke.harden.hardened_values(keras.layers.Dense(2, name="x"))
    with self.assertRaisesRegex(ValueError, "harden_routing.*subclassed"):

      class Sub(keras.Model):
        def call(self, x):
          return x

      ke.harden_routing(Sub())

  def test_model_without_epitome_layers_is_refused(self):
    # Issue 27 F5: it returned a plain copy silently.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="plain")
    with self.assertRaisesRegex(
      ValueError, "harden_routing: model 'plain' has no epitome layer.*ke.epitomize"
    ):
      ke.harden_routing(model)
