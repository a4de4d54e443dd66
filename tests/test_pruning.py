"""TF-MOT pruning of epitome models: the epitome is the weight that gets sparse.

Forms checked: the training-time layer (pruned model) and the materialized
form (``strip_pruning`` then :func:`keras_epitome.strip_epitome`).
"""

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from absl.testing import parameterized

import keras_epitome as ke

keras = ke.keras
sparsity = tfmot.sparsity.keras


def _model():
  return keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
      keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(64, activation="relu"),
      keras.layers.Dense(10),
    ]
  )


class PruningTest(tf.test.TestCase, parameterized.TestCase):
  def test_prunable_weight_is_the_epitome(self):
    layer = ke.EpitomeConv2D(8, 3, compression=2)
    layer(tf.zeros([1, 5, 5, 8]))
    self.assertIsInstance(layer, sparsity.PrunableLayer)
    self.assertEqual(layer.get_prunable_weights(), [layer.epitome])

  @parameterized.parameters("param", "feature")
  def test_prune_finetune_strip(self, learner):
    keras.utils.set_random_seed(0)
    small = ke.epitomize(_model(), 4.0, min_params=500, learner=learner, verbose=False)
    epitome_names = [
      layer.name for layer in small.layers if isinstance(layer, ke.EPITOME_LAYERS)
    ]
    self.assertEqual(epitome_names, ["conv2d_1", "dense", "dense_1"])
    schedule = sparsity.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = sparsity.prune_low_magnitude(small, pruning_schedule=schedule)
    pruned.compile(
      keras.optimizers.Adam(1e-3),
      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.RandomState(0)
    x = rng.rand(32, 8, 8, 3).astype("float32")
    y = rng.randint(0, 10, 32)
    pruned.fit(
      x, y, epochs=1, batch_size=8, verbose=0, callbacks=[sparsity.UpdatePruningStep()]
    )
    out_pruned = pruned.predict(x, verbose=0)
    stripped = sparsity.strip_pruning(pruned)
    for name in epitome_names:
      layer = stripped.get_layer(name)
      self.assertIsInstance(layer, ke.EPITOME_LAYERS)
      epitome = layer.epitome.numpy()
      self.assertAllClose((epitome == 0).mean(), 0.5, atol=0.02)
    # The offsets (integer at the start) kept training under the wrapper.
    offsets = stripped.get_layer("conv2d_1").routing_map.out_offsets
    self.assertGreater(np.abs(offsets - np.round(offsets)).max(), 1e-6)
    stock = ke.strip_epitome(stripped)
    self.assertFalse(
      any(isinstance(layer, ke.EPITOME_LAYERS) for layer in stock.layers)
    )
    self.assertAllClose(stock.predict(x, verbose=0), out_pruned, atol=1e-4)

  def test_materialized_kernel_inherits_sparsity_with_integer_offsets(self):
    layer = ke.EpitomeDense(32, epitome_shape=(16, 32), sampler="fixed")
    layer(tf.zeros([1, 64]))
    mask = np.random.RandomState(0).rand(*layer.epitome.shape) < 0.5
    layer.epitome.assign(np.where(mask, 0.0, layer.epitome.numpy()))
    stock = ke.materialize_layer(layer)
    self.assertAllClose((stock.kernel.numpy() == 0).mean(), mask.mean(), atol=1e-6)


class PruneEpitomesTest(tf.test.TestCase, parameterized.TestCase):
  """``ke.sparsity_for_size`` and ``ke.prune_epitomes`` (epitome x pruning)."""

  def _small(self):
    keras.utils.set_random_seed(0)
    return ke.epitomize(_model(), 2.0, min_params=500, verbose=False)

  def test_sparsity_for_size_fits_the_budget(self):
    small = self._small()
    layer = small.get_layer("conv2d_1")
    g = layer.epitome_geometry
    for positions, (per_entry, per_nonzero) in ke.pruning.POSITION_BITS.items():
      spec = ke.sparsity_for_size(small, 4, positions=positions)
      self.assertEqual(sorted(spec), ["conv2d_1", "dense", "dense_1"])
      nonzeros = round((1 - spec["conv2d_1"]) * g.epitome_size)
      bits = nonzeros * (32 + per_nonzero) + per_entry * g.epitome_size
      budget = 32 * (g.kernel_size / 4 - g.routing_size)
      # Within the budget, and one more non-zero would not be.
      self.assertLessEqual(bits, budget)
      self.assertGreater(bits + 32 + per_nonzero, budget)
    # A stock layer by name, with words as the budget: bitmask of 4,608 bits.
    spec = ke.sparsity_for_size(small, {"conv2d": 200}, positions="bitmask")
    entries = 3 * 3 * 3 * 16
    self.assertEqual(spec, {"conv2d": 1 - ((200 * 32 - entries) // 32) / entries})
    # A layer that already fits is not pruned.
    self.assertEqual(ke.sparsity_for_size(small, {"dense_1": 10_000}), {"dense_1": 0.0})

  def test_sparsity_for_size_bad_input(self):
    small = self._small()
    cases = [
      (dict(size=4, positions="mask"), r"positions='mask'; valid: none, bitmask"),
      (dict(size=0.5), r"size must be a compression ratio .* got 0.5"),
      (dict(size="4"), r"size must be a compression ratio .* got '4'"),
      (dict(size={"nope": 10}), r"no layer named \['nope'\] .* valid: \["),
      (
        dict(size={"global_average_pooling2d": 10}),
        r"layer 'global_average_pooling2d' is a GlobalAveragePooling2D; valid",
      ),
      (dict(size={"conv2d_1": 5}), r"layer 'conv2d_1': a budget of 5 words leaves"),
      (
        dict(size={"conv2d_1": "900"}),
        r"layer 'conv2d_1': the budget must be a finite number of 32-bit words, "
        r"got '900'",
      ),
      (dict(size={"dense": float("nan")}), r"layer 'dense': the budget must be .* nan"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(ValueError, "sparsity_for_size: " + message):
        ke.sparsity_for_size(small, **kwargs)
    with self.assertRaisesRegex(ValueError, "has no epitome layer"):
      ke.sparsity_for_size(_model(), 4)

  def test_mask_is_chosen_at_the_first_step_and_kept(self):
    small = self._small()
    before = [w.numpy() for w in small.weights]
    spec = ke.sparsity_for_size(small, 4, positions="bitmask")
    spec["conv2d"] = 0.25  # a stock layer too
    pruned = ke.prune_epitomes(small, spec)
    rng = np.random.RandomState(0)
    x = rng.rand(64, 8, 8, 3).astype("float32")
    # No UpdatePruningStep given: distill adds it (TF-MOT refuses to train
    # without it).
    ke.distill(pruned, small, x, batch_size=16, epochs=2, learning_rate=1e-2, verbose=0)
    out = sparsity.strip_pruning(pruned)
    for name, fraction in spec.items():
      original = small.get_layer(name)
      layer = out.get_layer(name)
      self.assertIs(type(layer), type(original))
      w0 = (original.epitome if name != "conv2d" else original.kernel).numpy()
      w1 = (layer.epitome if name != "conv2d" else layer.kernel).numpy()
      zeros = w1 == 0
      self.assertEqual(int(zeros.sum()), round(fraction * w0.size), name)
      # The zeros are the smallest weights *before* training: the mask came
      # at the first step and stayed while the rest trained.
      self.assertLessEqual(np.abs(w0[zeros]).max(), np.abs(w0[~zeros]).min(), name)
      self.assertGreater(np.abs(w1[~zeros] - w0[~zeros]).max(), 1e-4, name)
    # The input model is not changed.
    for w, b in zip(small.weights, before, strict=True):
      self.assertAllEqual(w.numpy(), b)

  def test_a_pruned_and_stripped_model_saves_and_loads_exactly(self):
    small = self._small()
    pruned = ke.prune_epitomes(small, 0.5)
    x = np.random.RandomState(1).rand(16, 8, 8, 3).astype("float32")
    ke.distill(pruned, small, x, batch_size=8, verbose=0)
    out = sparsity.strip_pruning(pruned)
    path = self.get_temp_dir() + "/pruned_epitome.h5"
    out.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllEqual(loaded.predict(x, verbose=0), out.predict(x, verbose=0))
    for a, b in zip(loaded.weights, out.weights, strict=True):
      self.assertAllEqual(a.numpy(), b.numpy())

  def test_sparse_export_stores_the_pruned_epitomes_sparse(self):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
      [
        keras.Input((12, 12, 32)),
        keras.layers.Conv2D(64, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(64, 3, padding="same"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
      ]
    )
    small = ke.epitomize(model, 2, verbose=False)
    x = np.random.RandomState(2).rand(16, 12, 12, 32).astype("float32")
    pruned = ke.prune_epitomes(small, 0.75)
    ke.distill(pruned, small, x, batch_size=8, verbose=0)
    out = sparsity.strip_pruning(pruned)
    expected = out.predict(x[:4], verbose=0)
    dense = ke.export_tflite(out, remix="slices")
    sparse = ke.export_tflite(out, remix="slices", sparse=True)
    # 3 of 4 epitome numbers are zeros: the sparse file keeps the rest and
    # their positions (measured 127 KB -> 54 KB on this model).
    self.assertLess(len(sparse), 0.6 * len(dense))
    for tflite in (dense, sparse):
      self.assertAllClose(ke.run_tflite(tflite, x[:4]), expected, atol=1e-5)
    # Weights without zeros are left as they are (the files differ by at most
    # a small constant of the graph that is mostly zeros, stored sparse).
    unpruned_sparse = len(ke.export_tflite(small, remix="slices", sparse=True))
    unpruned = len(ke.export_tflite(small, remix="slices"))
    self.assertAlmostEqual(unpruned_sparse / unpruned, 1.0, delta=0.01)

  def test_prune_epitomes_bad_input(self):
    small = self._small()
    cases = [
      (1.0, r"layer 'conv2d_1': sparsity must be a number in \[0, 1\), got 1.0"),
      (-0.1, r"layer 'conv2d_1': sparsity must be a number in \[0, 1\), got -0.1"),
      ({"dense": "0.5"}, r"layer 'dense': sparsity must be .* got '0.5'"),
      ({"nope": 0.5}, r"no layer named \['nope'\]"),
    ]
    for value, message in cases:
      with self.assertRaisesRegex(ValueError, "prune_epitomes: " + message):
        ke.prune_epitomes(small, value)
    with self.assertRaisesRegex(ValueError, "prune_epitomes: model .* has no epitome"):
      ke.prune_epitomes(_model(), 0.5)
    with self.assertRaisesRegex(ValueError, "inside a pruning wrapper"):
      ke.prune_epitomes(ke.prune_epitomes(small, 0.5), 0.5)


if __name__ == "__main__":
  tf.test.main()
