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


if __name__ == "__main__":
  tf.test.main()
