"""Tests for the per-layer export form choice (keras_epitome/form_choice.py).

The forms checked: ``export_tflite(form="factored")`` with the default
``remix="auto"``, whose layers are factored (slices or matmul remixes) or
materialized stock layers, each compared with ``model(x, training=False)``.
"""

import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import form_choice, sampling

keras = ke.keras


def _model(width, epitome_shape, size=16, rng=None, channel_roll=0):
  rng = rng or np.random.default_rng(0)
  inputs = keras.Input((size, size, width))
  conv = ke.EpitomeConv2D(
    width,
    3,
    padding="same",
    use_bias=False,
    epitome_shape=epitome_shape,
    channel_roll=channel_roll,  # 0: the MAC arithmetic below is the separable map's
    name="conv",
  )
  h = keras.layers.BatchNormalization(name="bn")(conv(inputs))
  out = keras.layers.ReLU()(h)
  model = keras.Model(inputs, out)
  g = conv.epitome_geometry
  conv.set_routing_map(
    sampling.RoutingMap(
      rng.uniform(0, g.cin_e, g.num_in_chunks),
      rng.uniform(0, g.cout_e, g.num_out_chunks),
      np.zeros((g.num_out_chunks, 2)),
    )
  )
  bn = model.get_layer("bn")
  bn.set_weights(
    [
      rng.uniform(0.5, 1.5, width),
      rng.normal(0, 0.1, width),
      rng.normal(0, 0.1, width),
      rng.uniform(0.5, 1.5, width),
    ]
  )
  return model


class FormChoiceTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    # No host calibration: the bundled constants (with their margin) choose.
    cache = self.enter_context(tempfile.TemporaryDirectory())
    self.enter_context(
      mock.patch.dict(
        os.environ, {"KERAS_EPITOME_CACHE": cache, "KERAS_EPITOME_CALIBRATE": "0"}
      )
    )

  @parameterized.named_parameters(("float", None), ("int8", "int8"))
  def test_near_full_epitome_is_materialized(self, quantize):
    # An epitome barely smaller than the kernel saves ~6% of the multiply-adds;
    # the remixes cost more than that, so the stock layer is the fastest.
    model = _model(32, (3, 3, 32, 30))
    x = np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 32)).astype("float32")
    report = []
    tflite = ke.export_tflite(
      model, quantize=quantize, representative_data=x, form_report=report
    )
    self.assertLen(report, 1)
    self.assertEqual(report[0].layer, "conv")
    self.assertEqual(report[0].form, "materialized", str(report[0]))
    ops = {op["name"] for op in ke.tflite_tensor_report(tflite)["ops"]}
    self.assertNotIn("STRIDED_SLICE", ops)
    y = model(x[:1], training=False).numpy()
    err = np.abs(ke.run_tflite(tflite, x[:1]) - y).max() / np.abs(y).max()
    self.assertLess(err, 1e-5 if quantize is None else 0.1)

  def test_wide_layer_is_factored_and_matches(self):
    model = _model(128, (3, 3, 64, 64))
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 128)).astype("float32")
    report = []
    tflite = ke.export_tflite(model, form_report=report)
    self.assertIn(report[0].form, ("slices", "matmul"), str(report[0]))
    est = report[0].estimates_us
    self.assertLess(est[report[0].form], est["materialized"])
    # The file holds the epitome, not the kernel.
    stock = ke.export_tflite(model, form="materialized")
    self.assertLess(len(tflite), 0.6 * len(stock))
    y = model(x, training=False).numpy()
    self.assertAllClose(ke.run_tflite(tflite, x), y, atol=1e-5 * np.abs(y).max())

  @parameterized.named_parameters(("float", None), ("int8", "int8"))
  def test_rolled_layer_takes_a_folded_form(self, quantize):
    # With the roll each output chunk needs its own epitome convolution: the
    # folded forms run them as one convolution after the input remix and
    # are estimated fastest; the export matches the Keras model.
    model = _model(64, (3, 3, 32, 32), channel_roll=1)
    x = np.random.default_rng(3).uniform(-1, 1, (4, 16, 16, 64)).astype("float32")
    report = []
    tflite = ke.export_tflite(
      model, quantize=quantize, representative_data=x, form_report=report
    )
    choice = report[0]
    self.assertEqual(choice.precision, "float" if quantize is None else "int8")
    self.assertEqual(set(choice.estimates_us), set(form_choice.CANDIDATES))
    fastest = min(choice.estimates_us, key=choice.estimates_us.get)
    self.assertEqual(choice.form, fastest)
    self.assertLess(
      choice.estimates_us[fastest],
      (1 - choice.margin) * choice.estimates_us["materialized"],
    )
    self.assertIn(choice.form, ("fold_slices", "fold_matmul"), str(choice))
    ops = [op["name"] for op in ke.tflite_tensor_report(tflite)["ops"]]
    self.assertEqual(ops.count("CONV_2D"), 1 if choice.form == "fold_slices" else 2)
    y = model(x, training=False).numpy()
    tol = 1e-5 if quantize is None else 6e-2
    err = np.abs(ke.run_tflite(tflite, x) - y).max() / np.abs(y).max()
    self.assertLess(err, tol)

  def test_size_objective(self):
    """objective='size': the fewest estimated bytes, whatever the latency."""
    model = _model(128, (3, 3, 64, 64))
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    _, small = form_choice.choose_layer_form(conv, bn, objective="size")
    w = small.weights
    self.assertLess(w["slices"], w["matmul"])
    self.assertLess(w["matmul"], w["materialized"])
    self.assertEqual(small.form, "slices")
    self.assertEqual(small.objective, "size")
    # A cost table on which the stock layer is the fastest: the size
    # objective still takes the smallest form (it used to keep the stock
    # layer, so objective='size' gave a stock-sized file).
    table = {
      "name": "stock fastest",
      "float": {"mac": 1e-9, "elem": 1.0, "op": 1.0},
    }
    narrow = _model(32, (3, 3, 16, 16))
    _, rec = form_choice.choose_layer_form(
      narrow.get_layer("conv"),
      narrow.get_layer("bn"),
      objective="size",
      cost_model=table,
    )
    self.assertEqual(rec.form, min(rec.bytes, key=rec.bytes.get), str(rec))
    self.assertNotEqual(rec.form, "materialized")
    self.assertGreater(rec.estimates_us[rec.form], rec.estimates_us["materialized"])
    with self.assertRaisesRegex(ValueError, "objective must be one of"):
      form_choice.choose_layer_form(conv, bn, objective="speed")

  def test_features_and_cost_model(self):
    model = _model(32, (3, 3, 16, 16))
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    shape = [1, 16, 16, 32]
    feats = {}
    for form in form_choice.CANDIDATES:
      cand = form_choice.build_candidate(conv, bn, form)
      cand(tf.zeros(shape))
      feats[form] = form_choice.graph_features(cand, shape)
    self.assertEqual(
      feats["materialized"],
      {"macs": 16 * 16 * 9 * 32 * 32, "elements": 0, "ops": 1, "channels": 32},
    )
    # matmul: the epitome conv plus two 1x1 convs, no elementwise ops.
    self.assertEqual(feats["matmul"]["macs"], 256 * (9 * 16 * 16 + 32 * 16 + 16 * 32))
    self.assertEqual(feats["matmul"]["ops"], 3)
    self.assertEqual(feats["matmul"]["channels"], 16 + 16 + 32)
    # slices: the epitome conv, and elementwise ops over the activations.
    self.assertEqual(feats["slices"]["macs"], 256 * 9 * 16 * 16)
    self.assertGreater(feats["slices"]["ops"], 5)
    self.assertGreater(feats["slices"]["elements"], 0)
    for p in form_choice.PRECISIONS:
      costs = {f: form_choice.estimate_us(v, p) for f, v in feats.items()}
      self.assertTrue(all(c > 0 for c in costs.values()), costs)

  def test_measure_mode_and_errors(self):
    model = _model(16, (3, 3, 8, 8), size=8)
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    new, record = form_choice.choose_layer_form(conv, bn, choose="measure")
    self.assertEqual(set(record.measured_us), set(form_choice.CANDIDATES))
    self.assertEqual(record.form, min(record.measured_us, key=record.measured_us.get))
    self.assertIn("measured", str(record))
    with self.assertRaisesRegex(ValueError, "precision must be one of"):
      form_choice.choose_layer_form(conv, bn, precision="int4")
    with self.assertRaisesRegex(ValueError, "candidates must be"):
      form_choice.choose_layer_form(conv, bn, candidates=["gather"])
    with self.assertRaisesRegex(ValueError, "remix must be one of"):
      ke.export_tflite(model, remix="fastest")
    # Forced remixes still work and are not reported.
    report = []
    ke.export_tflite(model, remix="slices", form_report=report)
    self.assertEmpty(report)


if __name__ == "__main__":
  tf.test.main()
