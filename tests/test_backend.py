"""Tests for keras_epitome.backend: Keras 2 (tf_keras) for the Keras 2 API, tf.keras untouched.

The import-order cases run in fresh interpreters: which Keras ``tf.keras``
resolves to is decided once per process.
"""

import importlib.util
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
    self.assertTrue(ke.keras.__version__.startswith("2."), ke.keras.__version__)
    # Importing the package leaves tf.keras as the environment makes it (the
    # suite runs without TF_USE_LEGACY_KERAS: Keras 3).
    if os.environ.get("TF_USE_LEGACY_KERAS") in (None, "", "0"):
      self.assertTrue(tf.keras.__version__.startswith("3."), tf.keras.__version__)
    self.assertIs(backend.setup_keras(), tf_keras)  # idempotent
    layer = ke.EpitomeDense(4, compression=2)
    self.assertIsInstance(layer, tf_keras.layers.Layer)
    self.assertFalse(backend.is_keras3_object(layer))

  def test_import_order(self):
    saved = os.path.join(self.get_temp_dir(), "dense.keras")
    model = ke.keras.Sequential(
      [ke.keras.Input((4,)), ke.EpitomeDense(8, compression=2)]
    )
    model.save(saved)
    cases = {
      # TF imported first, tf.keras untouched: importing the package does not
      # switch tf.keras to Keras 2 (TF-MOT's import would), and
      # TF_USE_LEGACY_KERAS does not leak into this process's environment
      # (so not into child processes either). A .keras file loads once the
      # package is imported.
      "tf_first": (
        "import os, subprocess, sys\n"
        "import tensorflow as tf\n"
        "import keras_epitome as ke\n"
        "assert ke.keras.__version__.startswith('2.')\n"
        "assert tf.keras.__version__.startswith('3.'), tf.keras.__version__\n"
        "assert 'TF_USE_LEGACY_KERAS' not in os.environ, os.environ['TF_USE_LEGACY_KERAS']\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; "
        'print(os.environ.get("TF_USE_LEGACY_KERAS"))\'], capture_output=True,'
        " text=True, check=True).stdout.strip()\n"
        "assert child == 'None', child\n"
        f"m = ke.keras.models.load_model({saved!r})\n"
        "assert type(m.layers[0]).__name__ == 'EpitomeDense'\n"
        "print('ok')",
        None,
      ),
      # The package first: tf.keras is still the user's (Keras 3 by default).
      "package_first": (
        "import keras_epitome as ke\n"
        "import tensorflow as tf\n"
        "assert tf.keras.__version__.startswith('3.'), tf.keras.__version__\n"
        "assert ke.keras.__version__.startswith('2.')\n"
        "print('ok')",
        None,
      ),
      # The user already chose Keras 2 and touched tf.keras: fine, and the
      # variable stays as the user set it.
      "legacy_set": (
        "import os\n"
        "import tensorflow as tf\n"
        "tf.keras.layers.Dense(1)\n"
        "import keras_epitome as ke\n"
        "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'\n"
        "print('ok')",
        "1",
      ),
      # tf.keras already resolved to Keras 3 (setting the variable afterwards
      # changes nothing): the package still works with its own Keras 2; its
      # transforms hand a Keras 3 model to keras_epitome.keras3, and the
      # Keras-2-only functions refuse one with a message naming the Keras 2 path.
      "keras3_active": (
        "import os\n"
        "import numpy as np\n"
        "import tensorflow as tf\n"
        "v = tf.keras.__version__\n"
        "assert v.startswith('3'), v\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "import keras_epitome as ke\n"
        "keras = ke.keras\n"
        "m = keras.Sequential([keras.Input((8,)), ke.EpitomeDense(8, compression=2)])\n"
        "assert m(np.ones((1, 8), 'float32')).shape == (1, 8)\n"
        "k3 = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(64)])\n"
        "small = ke.epitomize(k3, 2, min_params=0, verbose=False)\n"
        "assert isinstance(small, tf.keras.Model), type(small)\n"
        "assert type(small.layers[0]).__module__ == 'keras_epitome.keras3.layers'\n"
        "assert isinstance(ke.export_tflite(small), bytes)\n"
        "assert ke.strip_epitome(small).layers[0].__class__ is tf.keras.layers.Dense\n"
        "ke.summarize(small, print_fn=None)\n"
        "calls = (lambda: ke.prune_epitomes(small, 0.5), lambda: ke.quantize_model(small),"
        " lambda: ke.factorize(small))\n"
        "for call in calls:\n"
        "  try:\n"
        "    call()\n"
        "  except ValueError as e:\n"
        "    print('ValueError:', e)\n"
        "print('ok')",
        None,
      ),
    }
    if importlib.util.find_spec("jax") is not None:
      # Keras 3 on JAX: `import keras_epitome.keras3` does not import
      # TensorFlow; the Keras 2 API loads on first use.
      cases["jax_backend"] = (
        "import os, sys\n"
        "os.environ['KERAS_BACKEND'] = 'jax'\n"
        "import numpy as np\n"
        "import keras_epitome.keras3 as ke3\n"
        "ke3.EpitomeDense(4, compression=2)(np.zeros((1, 8), 'float32'))\n"
        "import keras_epitome as ke\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'\n"
        "assert ke.keras.__version__.startswith('2.')\n"
        "from keras_epitome import EpitomeDense, compression\n"
        "assert EpitomeDense.__module__ == 'keras_epitome.layers'\n"
        f"m = ke.keras.models.load_model({saved!r})\n"
        "assert type(m.layers[0]) is EpitomeDense\n"
        "print('ok')",
        None,
      )
    procs = {name: _python(code, legacy) for name, (code, legacy) in cases.items()}
    results = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name in cases:
      out, err = results[name]
      self.assertEqual(procs[name].returncode, 0, name + ": " + err[-2000:])
      self.assertEqual(out.strip().splitlines()[-1], "ok", name)
    out, _ = results["keras3_active"]
    messages = [line for line in out.splitlines() if line.startswith("ValueError")]
    self.assertLen(messages, 3, out)
    for message in messages:
      self.assertIn("is a Keras 3 Sequential", message)
      self.assertIn("keras = ke.keras", message)
      self.assertIn("keras_epitome.keras3", message)


if __name__ == "__main__":
  tf.test.main()
