"""Tests for the form choice's cost model (keras_epitome/cost_model.py).

The host calibration's cache, the cost model named in the form report, a
user table measured on a target device, the safety margin of the bundled
constants, and the size objective. Every test runs with an empty
``$KERAS_EPITOME_CACHE`` so that a calibration on the machine running the
tests does not change what they see.
"""

import json
import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

import keras_epitome as ke
from keras_epitome import cost_model, form_choice, sampling

keras = ke.keras


def _model(width=64, epitome_shape=(3, 3, 32, 32), size=16, seed=0):
  rng = np.random.default_rng(seed)
  inputs = keras.Input((size, size, width))
  conv = ke.EpitomeConv2D(
    width, 3, padding="same", use_bias=False, epitome_shape=epitome_shape, name="conv"
  )
  out = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(conv(inputs)))
  model = keras.Model(inputs, out)
  g = conv.epitome_geometry
  conv.set_routing_map(
    sampling.RoutingMap(
      rng.uniform(0, g.cin_e, g.num_in_chunks),
      rng.uniform(0, g.cout_e, g.num_out_chunks),
      np.zeros((g.num_out_chunks, 2)),
    )
  )
  return model


# A small probe layer in two forms: 4 conversions to calibrate.
TINY_PROBE = (("tiny", (8, 8, 16), 16, 3, 4.0, ("fold_matmul", "stock")),)


def _table(name, mac, elem, op=0.0, **extra):
  c = {"mac": mac, "elem": elem, "op": op}
  return dict(name=name, float=c, int8=c, **extra)


class _EmptyCache(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    self.cache = self.enter_context(tempfile.TemporaryDirectory())
    self.enter_context(
      mock.patch.dict(
        os.environ, {"KERAS_EPITOME_CACHE": self.cache, "KERAS_EPITOME_CALIBRATE": "0"}
      )
    )


class CacheTest(_EmptyCache):
  def test_round_trip_and_default(self):
    self.assertIsNone(cost_model.load_host())
    self.assertEqual(cost_model.default().source, "bundled")
    host = cost_model.CostModel(
      {
        "float": {"mac": 1e-5, "elem": 2e-4, "op": 0.5},
        "int8": {"mac": 0, "elem": 1e-4},
      },
      "host",
      "host calibration on Test CPU, 2026-01-01",
    )
    path = cost_model.save_host(host)
    self.assertTrue(path.startswith(self.cache), path)
    loaded = cost_model.load_host()
    self.assertEqual(loaded, host)
    self.assertEqual(loaded.info["key"], cost_model.host_key())
    self.assertEqual(cost_model.default(), host)
    self.assertEqual(cost_model.resolve(None), host)
    self.assertEqual(cost_model.resolve("host"), host)  # cached: no calibration
    # Another thread count, another CPU, or a broken file: no calibration.
    self.assertIsNone(cost_model.load_host(num_threads=2))
    with mock.patch.object(
      cost_model, "_cpuinfo", lambda: {"cpu": "Other", "flags": "", "machine": "x"}
    ):
      self.assertIsNone(cost_model.load_host())
      self.assertEqual(cost_model.default().source, "bundled")
    with open(path, "w") as f:
      f.write("{not json")
    with self.assertLogs("keras_epitome.cost_model", "WARNING"):
      self.assertIsNone(cost_model.load_host())

  def test_default_calibrates_once_when_there_is_none(self):
    fake = cost_model.CostModel(
      {"float": {"mac": 1e-5}, "int8": {"mac": 1e-6}}, "host", "host calibration on X"
    )
    calls = []

    def calibrate(num_threads=1, save=True):
      calls.append(num_threads)
      if save:
        cost_model.save_host(fake, num_threads)
      return fake

    with mock.patch.object(cost_model, "calibrate", calibrate):
      with mock.patch.dict(os.environ, {"KERAS_EPITOME_CALIBRATE": "1"}):
        with self.assertLogs("keras_epitome.cost_model", "WARNING") as logs:
          self.assertEqual(cost_model.default(), fake)
        self.assertIn("calibrating once", "\n".join(logs.output))
        self.assertEqual(cost_model.default(), fake)  # cached: no second run
      self.assertEqual(calls, [1])
      self.assertEqual(cost_model.default().source, "host")
    # Opted out and nothing cached: the bundled constants.
    os.remove(cost_model.cache_path())
    self.assertEqual(cost_model.default().source, "bundled")

  def test_key_names_cpu_litert_and_threads(self):
    key = cost_model.host_key(3)
    self.assertEqual(key["threads"], "3")
    self.assertTrue(key["cpu"])
    self.assertTrue(key["litert"])
    self.assertNotEqual(cost_model.cache_path(1), cost_model.cache_path(3))

  def test_calibrate_one_probe_writes_the_cache(self):
    probes = TINY_PROBE
    host = cost_model.calibrate(iterations=5, probes=probes)
    self.assertEqual(host.source, "host")
    self.assertIn("host calibration on", str(host))
    self.assertEqual(host.info["key"]["cpu"], cost_model.host_key()["cpu"])
    self.assertLen(host.info["rows"], 2 * len(probes[0][-1]))
    self.assertEqual(cost_model.load_host().constants, host.constants)
    report = []
    ke.export_tflite(_model(), form_report=report)
    self.assertEqual(report[0].cost_model, str(host))


class ReportTest(_EmptyCache):
  def test_report_and_log_name_the_cost_model(self):
    model = _model()
    report = []
    with self.assertLogs("keras_epitome.export", "INFO") as logs:
      ke.export_tflite(model, form_report=report)
    self.assertStartsWith(report[0].cost_model, "bundled constants fitted on")
    self.assertIn(cost_model.BUNDLED_CPU, str(report[0]))
    self.assertIn(cost_model.BUNDLED_CPU, "\n".join(logs.output))
    report = []
    with self.assertLogs("keras_epitome.export", "INFO") as logs:
      ke.export_tflite(model, form_report=report, cost_model=_table("pixel8", 1, 1))
    self.assertEqual(report[0].cost_model, "user table 'pixel8'")
    self.assertIn("user table 'pixel8'", str(report[0]))
    self.assertIn("user table 'pixel8'", "\n".join(logs.output))


class UserTableTest(_EmptyCache):
  def test_a_table_changes_the_choice(self):
    model = _model()
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    # Elementwise ops free, multiply-adds dear: the fewest multiply-adds win
    # (a factored form); elementwise ops dear: the stock layer (none) wins.
    _, cheap_elem = form_choice.choose_layer_form(
      conv, bn, cost_model=_table("macs dear", 1.0, 0.0)
    )
    macs = {f: v["macs"] for f, v in cheap_elem.features.items()}
    self.assertEqual(cheap_elem.form, min(macs, key=macs.get))
    self.assertNotEqual(cheap_elem.form, "materialized")
    _, dear_elem = form_choice.choose_layer_form(
      conv, bn, cost_model=_table("elem dear", 1e-9, 1.0, op=1.0)
    )
    self.assertEqual(dear_elem.form, "materialized")
    # The same table from a JSON file.
    path = os.path.join(self.cache, "phone.json")
    with open(path, "w") as f:
      json.dump(_table("phone", 1e-9, 1.0, op=1.0), f)
    report = []
    ke.export_tflite(model, cost_model=path, form_report=report)
    self.assertEqual(report[0].form, "materialized")
    self.assertEqual(report[0].cost_model, "user table 'phone'")

  def test_probe_timings_are_fitted(self):
    # Timings made from known constants (and a per-layer fixed cost) give
    # those constants back.
    truth = {"float": (2e-5, 3e-4, 0.7), "int8": (4e-6, 2e-4, 1.5)}
    feats = cost_model.probe_features()
    timings = {}
    for stem, f in feats.items():
      mac, elem, op = truth[f["precision"]]
      fixed = 10.0 + 5 * len(f["probe"].split("/")[0])
      timings[stem] = mac * f["macs"] + elem * f["elements"] + op * f["ops"] + fixed
    model = cost_model.from_table({"name": "fitted", "timings_us": timings})
    self.assertEqual(model.source, "user")
    for p, (mac, elem, op) in truth.items():
      c = model.constants[p]
      self.assertAllClose([c["mac"], c["elem"], c["op"]], [mac, elem, op], rtol=1e-3)
    with self.assertRaisesRegex(ValueError, "unknown probe"):
      cost_model.from_table({"timings_us": {"float__nope": 1.0}})

  def test_bad_tables(self):
    with self.assertRaisesRegex(ValueError, "needs 'float'/'int8'"):
      cost_model.from_table({"name": "x"})
    with self.assertRaisesRegex(ValueError, "finite number >= 0"):
      cost_model.from_table(_table("neg", -1.0, 0.0))
    with self.assertRaisesRegex(ValueError, "cost_model must be"):
      ke.export_tflite(_model(), cost_model="no/such/file.json")

  def test_write_probes(self):
    out = os.path.join(self.cache, "probes")
    paths = cost_model.write_probes(out, precisions=("float",), probes=TINY_PROBE)
    with open(os.path.join(out, "probes.json")) as f:
      feats = json.load(f)
    stems = {os.path.basename(p)[: -len(".tflite")] for p in paths}
    self.assertEqual(stems, set(feats))
    self.assertEqual(set(cost_model.probe_features(("float",), TINY_PROBE)), stems)


class MarginTest(_EmptyCache):
  def test_factored_only_when_faster_by_the_margin(self):
    model = _model()
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    table = cost_model.from_table(_table("t", 2e-5, 1.5e-4))
    _, free = form_choice.choose_layer_form(conv, bn, cost_model=table)
    est = free.estimates_us
    self.assertNotEqual(free.form, "materialized")
    gain = 1 - est[free.form] / est["materialized"]
    self.assertGreater(gain, 0.02)
    _, above = form_choice.choose_layer_form(
      conv, bn, cost_model=table.with_margin(gain + 0.01)
    )
    self.assertEqual(above.form, "materialized", str(above))
    self.assertAlmostEqual(above.margin, gain + 0.01)
    _, below = form_choice.choose_layer_form(
      conv, bn, cost_model=table.with_margin(max(gain - 0.01, 0.0))
    )
    self.assertEqual(below.form, free.form)
    # The bundled fallback has the safety margin.
    self.assertEqual(cost_model.bundled().margin, cost_model.BUNDLED_MARGIN)
    self.assertGreaterEqual(cost_model.BUNDLED_MARGIN, 0.05)
    self.assertIn("margin", str(cost_model.bundled()))


class SizeObjectiveTest(_EmptyCache):
  def test_size_counts_the_ops_in_int8(self):
    # A small 1x1 layer: in int8 the slices form's ops cost more bytes than
    # its weights save, and the stock layer is the smallest file.
    inputs = keras.Input((12, 12, 96))
    conv = ke.EpitomeConv2D(16, 1, use_bias=False, compression=4, name="conv")
    model = keras.Model(inputs, conv(inputs))
    x = np.random.default_rng(0).uniform(-1, 1, (4, 12, 12, 96)).astype(np.float32)
    files, reports = {}, {}
    for q in (None, "int8"):
      reports[q] = []
      files[q] = ke.export_tflite(
        model,
        quantize=q,
        representative_data=x,
        objective="size",
        form_report=reports[q],
      )
    self.assertNotEqual(reports[None][0].form, "materialized")
    self.assertEqual(reports["int8"][0].form, "materialized", str(reports["int8"][0]))
    slices = ke.export_tflite(
      model, quantize="int8", representative_data=x, remix="slices"
    )
    self.assertLess(len(files["int8"]), len(slices))

  def test_size_takes_the_smallest_form_even_if_slower(self):
    model = _model(32, (3, 3, 16, 16))
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    table = _table("stock fastest", 1e-9, 1.0, op=1.0)
    _, fast = form_choice.choose_layer_form(conv, bn, cost_model=table)
    self.assertEqual(fast.form, "materialized")
    self.assertTrue(fast.size_traded)
    self.assertIn("size traded for speed", str(fast))
    _, small = form_choice.choose_layer_form(
      conv, bn, objective="size", cost_model=table
    )
    self.assertEqual(small.form, min(small.bytes, key=small.bytes.get))
    self.assertLess(small.bytes[small.form], small.bytes["materialized"])
    for f, b in small.bytes.items():
      self.assertEqual(
        b, cost_model.estimate_bytes(small.weights[f], small.features[f], "float")
      )
    self.assertFalse(small.size_traded)

  def test_speed_first_warns_and_size_gives_the_small_file(self):
    model = _model(32, (3, 3, 16, 16))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 32)).astype(np.float32)
    table = _table("stock fastest", 1e-9, 1.0, op=1.0)
    with self.assertLogs("keras_epitome.form_choice", "WARNING") as logs:
      fast = ke.export_tflite(model, cost_model=table)
    self.assertIn("objective='size'", "\n".join(logs.output))
    small = ke.export_tflite(model, cost_model=table, objective="size")
    self.assertLess(len(small), 0.6 * len(fast))
    y = model(x, training=False).numpy()
    for tflite in (fast, small):
      self.assertAllClose(ke.run_tflite(tflite, x), y, atol=1e-5 * np.abs(y).max())

  def test_one_remix_default_everywhere(self):
    import inspect

    from keras_epitome import export

    for fn in (ke.export_tflite, export.inference_model, ke.factorize):
      params = inspect.signature(fn).parameters
      self.assertEqual(params["remix"].default, "auto", fn.__name__)
      self.assertEqual(params["objective"].default, "latency", fn.__name__)

  def test_dynamic_spatial_input_is_estimated_at_a_nominal_size(self):
    inputs = keras.Input((None, None, 32))
    conv = ke.EpitomeConv2D(32, 3, padding="same", compression=4, name="conv")
    model = keras.Model(inputs, conv(inputs))
    report = []
    fast = ke.factorize(model, form_report=report)
    self.assertLen(report, 1)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 10, 12, 32)).astype(np.float32)
    self.assertAllClose(fast(x), model(x, training=False), atol=1e-4)


if __name__ == "__main__":
  tf.test.main()
