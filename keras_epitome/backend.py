"""Keras 2 set-up: the one place that decides which Keras the package uses.

TF-MOT 0.8.1 works only with Keras 2 (``tf_keras``), and so does this
package: every module imports ``tf_keras`` (as this module's ``keras``), never
``tf.keras``. What ``tf.keras`` itself resolves to does not matter to the
package; what matters is that models handed to it are Keras 2 models.

* If ``tf.keras`` has not been resolved yet when the package is imported, it
  is resolved to Keras 2 (``TF_USE_LEGACY_KERAS=1`` while TensorFlow decides),
  so ``tf.keras`` and ``keras_epitome.keras`` are the same module and user code
  written with either works with ours.
* If ``tf.keras`` already is Keras 3, that is allowed: use
  ``keras_epitome.keras`` for models that hold epitome layers. A Keras 3 model
  handed to the package's functions is refused with a message that says so
  (:func:`check_keras2`).
* ``TF_USE_LEGACY_KERAS`` is restored to what it was afterwards (TF-MOT sets
  it when imported, too), so child processes inherit the user's environment,
  not the package's choice. ``tf.keras`` stays resolved in this process.
"""

import os
import sys

_ENV = "TF_USE_LEGACY_KERAS"


def _import_with_legacy_keras():
  previous = os.environ.get(_ENV)
  os.environ[_ENV] = "1"
  try:
    import tensorflow as tf
    import tensorflow_model_optimization  # noqa: F401  (reads the variable)
    import tf_keras

    # Resolve TensorFlow's lazy ``tf.keras`` now, while the variable is set
    # (a no-op if it was resolved before: then it may be Keras 3).
    getattr(tf.keras, "__version__", None)
  finally:
    if previous is None:
      os.environ.pop(_ENV, None)
    else:
      os.environ[_ENV] = previous
  return tf_keras


def setup_keras():
  """Imports Keras 2 (``tf_keras``) and TF-MOT, and returns ``tf_keras``.

  Idempotent. Leaves ``TF_USE_LEGACY_KERAS`` as it found it.

  Returns:
    The ``tf_keras`` module.

  Raises:
    ImportError: if ``tf_keras`` is not installed.
  """
  if "tf_keras" in sys.modules and "tensorflow_model_optimization" in sys.modules:
    import tensorflow as tf

    getattr(tf.keras, "__version__", None)
    return sys.modules["tf_keras"]
  try:
    return _import_with_legacy_keras()
  except ImportError as e:  # pragma: no cover - install problem
    raise ImportError(
      "keras_epitome needs Keras 2 from the 'tf-keras' package "
      "(pip install 'tf-keras==2.21.*'); it could not be imported: " + str(e)
    ) from e


keras = setup_keras()

PACKAGE = "keras_epitome"  # the package name every class registers under


def custom_objects() -> dict:
  """Every class the package has registered with Keras, for tools that want a dict.

  The classes register themselves when their module is imported (``import
  keras_epitome`` imports them all), so ``keras.models.load_model`` needs no
  ``custom_objects``; this is for APIs that take an explicit mapping, such as
  TF-MOT's ``quantize_scope``. Each class appears under its plain name and its
  registered name (``"keras_epitome>EpitomeConv2D"``).

  Returns:
    A dict from name to class.

  Example:
    >>> import keras_epitome as ke
    >>> ke.custom_objects()["EpitomeConv2D"] is ke.EpitomeConv2D
    True
  """
  objects = {}
  for key, obj in keras.saving.get_custom_objects().items():
    package, _, name = key.partition(">")
    if package == PACKAGE and name:
      objects[key] = obj
      objects[name] = obj
  return objects


def is_keras3_object(obj) -> bool:
  """Whether ``obj`` is a Keras 3 layer or model (from the ``keras`` package)."""
  module = type(obj).__module__ or ""
  return not isinstance(obj, keras.layers.Layer) and (
    module == "keras" or module.startswith("keras.")
  )


def check_keras2(obj, what: str) -> None:
  """Refuses a Keras 3 layer or model with a message that says what to do.

  Args:
    obj: what the user passed.
    what: the function it was passed to.

  Raises:
    ValueError: if ``obj`` is a Keras 3 object.
  """
  if is_keras3_object(obj):
    raise ValueError(
      f"{what}: '{getattr(obj, 'name', obj)}' is a Keras 3 "
      f"{type(obj).__name__} (from the 'keras' package, or tf.keras under "
      "Keras 3). keras_epitome, like TF-MOT, works with Keras 2 (tf_keras). "
      "Build the model with keras_epitome's Keras: `import keras_epitome as "
      "ke; keras = ke.keras` (or `import tf_keras as keras`), or set "
      "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported so that tf.keras "
      "is Keras 2. A Keras 3 model's weights can be moved with "
      "model.get_weights()/set_weights() into the same architecture built "
      "with ke.keras."
    )


__all__ = [
  "PACKAGE",
  "check_keras2",
  "custom_objects",
  "is_keras3_object",
  "keras",
  "setup_keras",
]
