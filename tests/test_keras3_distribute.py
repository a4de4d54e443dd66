"""Keras 3 epitome layers train under data parallelism as on one device (TF and JAX)."""

import json
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "keras3_distribute_check.py")


def run(backend):
  env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
  if backend == "jax":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  done = subprocess.run(
    [sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=600
  )
  if done.returncode:
    raise AssertionError(done.stdout[-2000:] + done.stderr[-3000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


class Keras3DistributeTest(unittest.TestCase):
  def check(self, report):
    for learner in ("param", "feature"):
      r = report[learner]
      tolerance = 1e-5
      self.assertEqual(r["devices"], 2, report)
      self.assertGreater(r["max_weight_change"], 1e-4, report)  # it trained
      self.assertLess(r["max_weight_diff"], tolerance, report)  # as on one device
      self.assertLess(r["loss_diff"], tolerance, report)

  def test_mirrored_strategy_tensorflow(self):
    self.check(run("tensorflow"))

  def test_data_parallel_jax(self):
    try:
      import jax  # noqa: F401
    except ImportError:
      self.skipTest("jax is not installed")
    self.check(run("jax"))


if __name__ == "__main__":
  unittest.main()
