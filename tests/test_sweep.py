"""A bounded random sweep of epitome layer configurations (issue 27).

Runs a few dozen cases of ``benchmarks/sweep.py`` (without the TFLite export;
``python -m benchmarks.sweep`` runs the full sweep with it). Every case either
passes every check (forward equal to a stock layer holding the sampled kernel,
gradients to the epitome and the learned offsets, config round trip, ``.keras``
save/load, ``strip_epitome``) or is refused with a ``ValueError`` naming the
layer; every deliberately invalid case is refused that way.

The cases are drawn from a seed (``EPITOME_SWEEP_SEED``, default 0) and each is
reproducible on its own: ``python -m benchmarks.sweep --seed=S --case=I
--export=false`` prints case ``I`` of seed ``S`` and its result.
"""

import importlib.util
import os

import tensorflow as tf

import keras_epitome as ke  # noqa: F401  (Keras 2 before the sweep imports TF)


def _load_sweep():
  # benchmarks/ is run as a package from the repository root; load the file
  # by its path so that the test runs from any working directory.
  path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "sweep.py")
  spec = importlib.util.spec_from_file_location("_epitome_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()

SEED = int(os.environ.get("EPITOME_SWEEP_SEED", "0"))
CASES = int(os.environ.get("EPITOME_SWEEP_CASES", "36"))


class SweepTest(tf.test.TestCase):
  def test_random_layers_work_or_are_refused_clearly(self):
    results = [sweep.run_case(sweep.random_case(SEED, i)) for i in range(CASES)]
    reproduce = f"(seed {SEED}; rerun a case: python -m benchmarks.sweep --seed={SEED} --case=INDEX --export=false)"
    failures = [
      f"case {r['case']['index']}: {r['status']}: {r['message']}\n  {r['case']}"
      for r in results
      if r["status"] not in ("passed", "refused")
    ]
    self.assertEmpty(failures, f"{reproduce}\n" + "\n".join(failures))
    for r in results:
      if r["case"]["bad"] is not None:
        self.assertEqual(r["status"], "refused", f"{reproduce}: {r}")
    passed = [r for r in results if r["status"] == "passed"]
    self.assertGreaterEqual(len(passed), CASES // 2, reproduce)
    for r in passed:
      for key, value in r["errors"].items():
        limit = sweep.FORWARD_TOL if key in ("forward", "strip") else 0.0
        self.assertLessEqual(
          value, limit, f"{reproduce}: case {r['case']['index']} {key}"
        )
    if SEED == 0 and CASES >= 36:
      # What the default draw covers (another seed may cover less).
      kw = [r["case"]["kwargs"] for r in passed]
      covered = {
        "dense": any("units" in k for k in kw),
        "conv1d": any(r["case"]["kind"] == "conv1d" for r in passed),
        "conv2d": any(r["case"]["kind"] == "conv2d" for r in passed),
        "strides": any(max(k.get("strides", [1])) > 1 for k in kw),
        "dilation": any(max(k.get("dilation_rate", [1])) > 1 for k in kw),
        "groups": any(k.get("groups", 1) > 1 for k in kw),
        "causal": any(k.get("padding") == "causal" for k in kw),
        "same": any(k.get("padding") == "same" for k in kw),
        "fixed": any(k["sampler"] == "fixed" for k in kw),
        "feature": any(k.get("learner") == "feature" for k in kw),
        "roll0": any(k["channel_roll"] == 0 for k in kw),
        "roll1": any(k["channel_roll"] == 1 for k in kw),
        "roll2": any(k["channel_roll"] == 2 for k in kw),
        "slack": any(
          "epitome_shape" in k
          and "kernel_size" in k
          and k["epitome_shape"][0] > k["kernel_size"][0]
          for k in kw
        ),
        "factored": any(k["train_form"] == "factored" for k in kw),
        "bad": any(r["case"]["bad"] for r in results),
      }
      missing = sorted(name for name, hit in covered.items() if not hit)
      self.assertEmpty(missing, f"{reproduce}: the draw covers no {missing}")


if __name__ == "__main__":
  tf.test.main()
