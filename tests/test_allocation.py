"""Tests for keras_epitome.allocation (per-layer ratios chosen from data).

Data: scikit-learn's digits (a trained CNN; errors compared on the held-out
split) and random tables for the exact knapsack.
"""

import itertools
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from test_calibration import _digits, _Trained

import keras_epitome as ke
from keras_epitome import allocation

keras = ke.keras

CANDIDATES = (2, 4, 8)


def _output_error(model, reference, x):
  ref = reference.predict(x, verbose=0)
  out = model.predict(x, verbose=0)
  return float(np.sum((out - ref) ** 2) / np.sum((ref - ref.mean(0)) ** 2))


def _allocated_stored(model, names):
  total = 0
  for name in names:
    layer = model.get_layer(name)
    if isinstance(layer, ke.EPITOME_LAYERS):
      g = layer.epitome_geometry
      total += g.epitome_size + g.routing_size
    else:
      total += int(np.prod(layer.kernel.shape))
  return total


class _Converted:
  """The digits CNN converted once with allocate=True, once uniformly."""

  pair = None

  @classmethod
  def get(cls):
    if cls.pair is None:
      teacher = _Trained.get()
      (x, _), _ = _digits()
      opts = dict(calibration_data=x[:256], min_params=0, verbose=False)
      uniform = ke.epitomize(teacher, 4, **opts)
      plan = ke.allocate(
        teacher, 4, x[:256], candidates=CANDIDATES, min_params=0, verbose=False
      )
      allocated = ke.epitomize(teacher, 4, policy=plan.policy, **opts)
      cls.pair = (plan, allocated, uniform)
    return cls.pair


class ChooseTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(0, 1, 2, 3)
  def test_choice_is_the_brute_force_optimum(self, seed):
    rng = np.random.default_rng(seed)
    table = {
      f"l{i}": [
        allocation.Candidate(r, int(rng.integers(10, 500)), float(rng.random()))
        for r in (None, 2.0, 4.0, 8.0)[: int(rng.integers(2, 5))]
      ]
      for i in range(4)
    }
    budget = float(rng.integers(400, 1200))
    best = None
    for combo in itertools.product(*table.values()):
      size = sum(c.stored for c in combo)
      err = sum(c.output_error for c in combo)
      if size <= budget and (best is None or err < best):
        best = err
    if best is None:
      with self.assertRaisesRegex(ValueError, "no choice of ratios fits"):
        allocation.choose(table, budget)
      return
    picks, err = allocation.choose(table, budget)
    self.assertAllClose(err, best)
    self.assertLessEqual(sum(c.stored for c in picks.values()), budget)
    self.assertEqual(sorted(picks), sorted(table))
    for name, c in picks.items():
      self.assertIn(c, table[name])

  def test_nothing_fits(self):
    table = {"a": [allocation.Candidate(2.0, 50, 0.1)]}
    with self.assertRaisesRegex(ValueError, "no choice of ratios fits 40"):
      allocation.choose(table, 40)


class AllocateTest(tf.test.TestCase, parameterized.TestCase):
  def test_stays_in_the_uniform_budget(self):
    plan, allocated, uniform = _Converted.get()
    names = sorted(plan.policy)
    self.assertEqual(names, sorted(c.name for c in uniform.epitome_report.converted))
    self.assertEqual(plan.budget, _allocated_stored(uniform, names))
    self.assertEqual(plan.stored, _allocated_stored(allocated, names))
    self.assertLessEqual(plan.stored, plan.budget)
    self.assertLessEqual(plan.error, plan.uniform_error)
    # Every chosen ratio is what the layer was built with.
    for name, ratio in plan.policy.items():
      layer = allocated.get_layer(name)
      if ratio is None:
        self.assertNotIsInstance(layer, ke.EPITOME_LAYERS)
      else:
        self.assertEqual(layer.compression, ratio)

  def test_lower_output_error_on_held_out_digits(self):
    # Measured: about 0.04 against 0.18 for the uniform 4x conversion.
    teacher = _Trained.get()
    _, (x_test, _) = _digits()
    plan, allocated, uniform = _Converted.get()
    self.assertLess(plan.error, 0.8 * plan.uniform_error)
    self.assertLess(
      _output_error(allocated, teacher, x_test),
      0.75 * _output_error(uniform, teacher, x_test),
    )

  def test_epitomize_allocate_applies_the_plan(self):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    plan, allocated, _ = _Converted.get()
    model = ke.epitomize(
      teacher, 4, calibration_data=x[:256], allocate=True, min_params=0, verbose=False
    )
    report = model.epitome_report
    self.assertIsInstance(report.allocation, ke.Allocation)
    self.assertLessEqual(report.allocation.stored, report.allocation.budget)
    for name, ratio in report.allocation.policy.items():
      if ratio is None:
        kept = {k.name: k.reason for k in report.kept}
        self.assertIn("allocate kept it stock", kept[name])
      else:
        self.assertEqual(model.get_layer(name).compression, ratio)
    self.assertIn("allocate:", str(report.allocation))

  def test_saved_and_loaded_model_is_identical(self):
    _, allocated, _ = _Converted.get()
    _, (x_test, _) = _digits()
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "m.keras")
      allocated.save(path)
      loaded = keras.models.load_model(path)
    self.assertAllEqual(
      allocated.predict(x_test, verbose=0), loaded.predict(x_test, verbose=0)
    )

  @parameterized.named_parameters(
    ("no_data", dict(calibration_data=None), "needs calibration_data and no policy"),
    ("with_policy", dict(policy={"c2": 2.0}), "needs calibration_data and no policy"),
  )
  def test_epitomize_refuses(self, overrides, message):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    kwargs = dict(calibration_data=x[:64], allocate=True, verbose=False)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message):
      ke.epitomize(teacher, 4, **kwargs)

  @parameterized.parameters(0.5, 1, True, "2")
  def test_bad_candidates(self, bad):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    with self.assertRaisesRegex(ValueError, "candidate ratios must be numbers > 1"):
      ke.allocate(teacher, 4, x[:64], candidates=(2, bad), verbose=False)

  def test_bad_compression_and_data(self):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    with self.assertRaisesRegex(ValueError, "compression"):
      ke.allocate(teacher, 0.5, x[:64], verbose=False)
    with self.assertRaisesRegex(ValueError, "non-finite"):
      bad = x[:64].copy()
      bad[0, 0, 0, 0] = np.nan
      ke.allocate(teacher, 4, bad, verbose=False)

  def test_its_subsample_is_logged_at_info_not_warned(self):
    # The allocation uses max_samples of the data by design: said, not warned.
    teacher = _Trained.get()
    (x, _), _ = _digits()
    with self.assertLogs("absl", "INFO") as logs:
      ke.allocate(teacher, 4, x[:96], candidates=(2,), max_samples=64, verbose=False)
    self.assertRegex("\n".join(logs.output), "INFO.*first 64 of 96 samples")
    self.assertEqual([r.levelname for r in logs.records if r.levelno > 20], [])


if __name__ == "__main__":
  tf.test.main()
