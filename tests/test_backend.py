"""Tests for keras_epitome.backend: Keras 2 (tf_keras) is selected on import.

The import-order cases run in fresh interpreters: which Keras ``tf.keras``
resolves to is decided once per process.
"""

import os
import subprocess
import sys

import tensorflow as tf
import tf_keras

import keras_epitome as ke
from keras_epitome import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, legacy=None):
  env = dict(os.environ)
  env.pop("TF_USE_LEGACY_KERAS", None)
  if legacy is not None:
    env["TF_USE_LEGACY_KERAS"] = legacy
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen(
    [sys.executable, "-c", code],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )


class BackendTest(tf.test.TestCase):
  def test_one_keras_module(self):
    self.assertIs(ke.keras, tf_keras)
    self.assertIs(backend.keras, tf_keras)
    self.assertEqual(os.environ["TF_USE_LEGACY_KERAS"], "1")
    self.assertTrue(ke.keras.__version__.startswith("2."), ke.keras.__version__)
    # tf.keras resolves to the same Keras 2, so user code and ours agree.
    self.assertIs(tf.keras.layers.Dense, tf_keras.layers.Dense)
    self.assertIs(backend.setup_keras(), tf_keras)  # idempotent
    layer = ke.EpitomeDense(4, compression=2)
    self.assertIsInstance(layer, tf_keras.layers.Layer)

  def test_import_order(self):
    cases = {
      # TF imported first but tf.keras untouched: the package still wins.
      "tf_first": (
        "import tensorflow as tf\n"
        "import keras_epitome as ke\n"
        "assert ke.keras.__version__.startswith('2.')\n"
        "assert tf.keras.layers.Dense is ke.keras.layers.Dense\n"
        "print('ok')",
        None,
      ),
      # The user already chose Keras 2 and touched tf.keras: fine.
      "legacy_set": (
        "import tensorflow as tf\n"
        "tf.keras.layers.Dense(1)\n"
        "import keras_epitome as ke\n"
        "print('ok')",
        "1",
      ),
      # tf.keras already resolved to Keras 3: a clear error, not a mix.
      "keras3_active": (
        "import tensorflow as tf\n"
        "v = tf.keras.__version__\n"
        "assert v.startswith('3'), v\n"
        "try:\n"
        "  import keras_epitome\n"
        "except ImportError as e:\n"
        "  print('ImportError:', e)\n",
        None,
      ),
    }
    procs = {name: _python(code, legacy) for name, (code, legacy) in cases.items()}
    results = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name in ("tf_first", "legacy_set"):
      out, err = results[name]
      self.assertEqual(procs[name].returncode, 0, err[-2000:])
      self.assertEqual(out.strip().splitlines()[-1], "ok", name)
    out, err = results["keras3_active"]
    self.assertEqual(procs["keras3_active"].returncode, 0, err[-2000:])
    self.assertIn("ImportError: keras_epitome", out)
    self.assertIn("Keras 3", out)
    self.assertIn("TF_USE_LEGACY_KERAS=1", out)
    self.assertIn("import keras_epitome before tensorflow", out)


if __name__ == "__main__":
  tf.test.main()
