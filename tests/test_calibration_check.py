"""Tests for the numerics and the output check of the data-aware conversion.

F3: inputs with a small spread relative to their mean (``10 + 1e-3 *
noise``) once broke the positive definiteness of the centred statistics
(float32 sums centred afterwards) and crashed with a ``LinAlgError`` naming
no layer. F3b: the same cancellation silently ruined squeeze-excite layers
(pooled inputs, large mean, small spread) and returned a broken model; the
converted model's output is now checked against the original's, each
layer's error recorded, and a broken conversion warned about (or raised),
naming the first layer whose error jumped.
"""

from unittest import mock

import numpy as np
import tensorflow as tf

import keras_epitome as ke
from keras_epitome.calibration import CalibrationConfig, graph, least_squares

keras = ke.keras


def _pointwise():
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((8, 8, 144)), keras.layers.Conv2D(144, 1)])


def _squeeze_excite():
  """A conv and a squeeze-excite block, as in EfficientNet."""
  keras.utils.set_random_seed(0)
  x = inputs = keras.Input((8, 8, 8))
  x = keras.layers.Conv2D(64, 1, name="expand")(x)
  x = keras.layers.Activation("swish", name="expand_act")(x)
  s = keras.layers.GlobalAveragePooling2D(name="squeeze")(x)
  s = keras.layers.Reshape((1, 1, 64), name="reshape")(s)
  s = keras.layers.Conv2D(16, 1, activation="swish", name="se_reduce")(s)
  s = keras.layers.Conv2D(64, 1, activation="sigmoid", name="se_expand")(s)
  x = keras.layers.Multiply(name="excite")([x, s])
  x = keras.layers.Conv2D(32, 1, name="project")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(10, name="logits")(x)
  return keras.Model(inputs, outputs, name="se")


def _relative(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b - b.mean(0))


class NumericsTest(tf.test.TestCase):
  def test_small_spread_inputs_convert(self):
    # F3: crashed with "Matrix is not positive definite".
    model = _pointwise()
    x = 10 + 1e-3 * np.random.default_rng(0).normal(size=(64, 8, 8, 144))
    x = x.astype("float32")
    small = ke.epitomize(model, 4, calibration_data=x, verbose=False)
    record = small.epitome_report.converted[0]
    self.assertEqual(record.init, "data")
    self.assertLessEqual(record.output_error, record.weight_fit_output_error + 1e-6)
    t = model.predict(x, verbose=0)
    self.assertLess(_relative(small.predict(x, verbose=0), t), 1.0)

  def test_squeeze_excite_is_not_silently_broken(self):
    # F3b's cause: the gate layers' statistics cancelled; every layer's
    # recorded error came out between 0 and 7.5e6 and the logits' error at
    # 3.0 (worse than a constant), with no warning.
    model = _squeeze_excite()
    x = (3 + 0.01 * np.random.default_rng(0).normal(size=(128, 8, 8, 8))).astype(
      "float32"
    )
    small = ke.epitomize(model, 4, calibration_data=x, min_params=0, verbose=False)
    fitted = {c.name: c.output_error for c in small.epitome_report.calibration}
    for name in ("expand", "se_reduce", "se_expand", "project", "logits"):
      self.assertGreater(fitted[name], 0.0, name)
      self.assertLess(fitted[name], 1.0, name)
    t = model.predict(x, verbose=0)
    self.assertLess(_relative(small.predict(x, verbose=0), t), 0.6)

  def test_a_failed_solve_names_the_layer(self):
    model = _pointwise()
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 144)).astype("float32")
    with mock.patch.object(
      least_squares,
      "accumulate",
      side_effect=np.linalg.LinAlgError("Matrix is not positive definite"),
    ):
      with self.assertRaisesRegex(
        np.linalg.LinAlgError, r"layer 'conv2d.*'.*not positive definite.*ridge"
      ):
        ke.epitomize(model, 4, calibration_data=x, verbose=False)


def _corrupting(name, factor):
  """``least_squares.fit_layer`` that ruins layer ``name``'s fit."""
  fit = least_squares.fit_layer

  def fit_layer(old, new, *args, **kwargs):
    out = fit(old, new, *args, **kwargs)
    if new.name == name:
      new.epitome.assign(new.epitome * factor)
    return out

  return fit_layer


class OutputCheckTest(tf.test.TestCase):
  def _data(self):
    return np.random.default_rng(1).normal(size=(96, 8, 8, 8)).astype("float32")

  def test_healthy_conversion_records_every_layer_and_passes(self):
    model = _squeeze_excite()
    small = ke.epitomize(
      model, 4, calibration_data=self._data(), min_params=0, verbose=False
    )
    check = small.epitome_report.calibration[-1]
    self.assertEqual(check.name, "se (check)")
    self.assertIn("top-1 agreement", check.note)
    self.assertNotIn("far from", check.note)
    self.assertLess(check.block_error, 1.0)
    # Every layer from the first converted one on, in network order.
    self.assertEqual(list(check.layer_errors)[:3], ["expand", "expand_act", "squeeze"])
    self.assertIn("excite", check.layer_errors)
    self.assertTrue(np.isfinite(list(check.layer_errors.values())).all())
    for name in ("expand", "se_reduce", "se_expand", "excite", "project", "logits"):
      self.assertLess(check.layer_errors[name], 1.0, name)
    self.assertIn("se (check): output error", str(small.epitome_report))

  def test_broken_conversion_warns_naming_the_layer(self):
    model = _squeeze_excite()
    with mock.patch.object(least_squares, "fit_layer", _corrupting("project", 1e3)):
      with self.assertWarnsRegex(
        RuntimeWarning, r"'se' is far from the original.*first jumps at layer 'project'"
      ):
        small = ke.epitomize(
          model, 4, calibration_data=self._data(), min_params=0, verbose=False
        )
    self.assertIn("far from", small.epitome_report.calibration[-1].note)

  def test_non_finite_output_raises_when_asked(self):
    model = _squeeze_excite()
    with mock.patch.object(
      least_squares, "fit_layer", _corrupting("logits", float("nan"))
    ):
      with self.assertRaisesRegex(
        RuntimeError, r"output error (nan|inf).*first jumps at layer 'logits'"
      ):
        ke.epitomize(
          model,
          4,
          calibration_data=self._data(),
          min_params=0,
          calibration=CalibrationConfig(output_check="raise"),
          verbose=False,
        )

  def test_check_off(self):
    model = _squeeze_excite()
    with mock.patch.object(least_squares, "fit_layer", _corrupting("project", 1e3)):
      small = ke.epitomize(
        model,
        4,
        calibration_data=self._data(),
        min_params=0,
        calibration=CalibrationConfig(output_check="off"),
        verbose=False,
      )
    self.assertNotIn("(check)", small.epitome_report.calibration[-1].name)


if __name__ == "__main__":
  tf.test.main()


class CostTest(tf.test.TestCase):
  def test_each_layer_runs_once_per_batch(self):
    # The walk stores activations node by node: the stock layer in front
    # runs once per batch, not once for every layer fitted after it (the
    # cost of a prefix model per layer grows with the square of the depth).
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
      [keras.Input((6, 6, 8), name="x")]
      + [
        keras.layers.Conv2D(16, 3, padding="same", name=f"c{i}", activation="relu")
        for i in range(6)
      ]
    )
    student = ke.epitomize(teacher, 4, skip=["c0"], min_params=0, verbose=False)
    x = np.random.default_rng(0).normal(size=(48, 6, 6, 8)).astype("float32")
    calls = []
    for model in (student, teacher):
      layer = model.get_layer("c0")
      layer.call = mock.Mock(wraps=layer.call)
      calls.append(layer.call)
    records = ke.calibrate(student, teacher, x, CalibrationConfig(batch_size=16))
    self.assertEqual([r.name for r in records][:5], ["c1", "c2", "c3", "c4", "c5"])
    self.assertEqual([c.call_count for c in calls], [3, 3])  # 48 / 16 batches


class ActivationsTest(tf.test.TestCase):
  def test_node_by_node_values_are_the_models(self):
    # Branches, a layer used twice in one node, dropout and BatchNorm in
    # inference mode, and a Keras mask (mask_zero) that a pooling reads.
    keras.utils.set_random_seed(0)
    tokens = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    a = keras.layers.Dense(8, activation="relu")(x)
    b = keras.layers.Dropout(0.5)(keras.layers.BatchNormalization()(x))
    x = keras.layers.Add()([a, b, a])
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(3)(x))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, (10, 7))
    ids[:, 4:] = 0  # padding the pooling must skip
    got = graph.Activations(model, ids, 4).value(model.outputs[0])
    self.assertAllClose(got, model(ids, training=False), atol=1e-6)
