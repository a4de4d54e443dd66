"""Keras 2 set-up: the one place that imports Keras 2 (``tf_keras``) and TF-MOT.

TF-MOT 0.8.1 works only with Keras 2, and so does the package's Keras 2 API:
every Keras 2 module imports ``tf_keras`` (as this module's ``keras``), never
``tf.keras``. The Keras 3 API lives in :mod:`keras_epitome.keras3` and never
imports this module.

Importing the package does not decide what ``tf.keras`` means: that stays the
user's choice (TensorFlow's default, Keras 3, unless ``TF_USE_LEGACY_KERAS``
says otherwise). TF-MOT resolves ``tf.keras`` when it is imported and sets
``TF_USE_LEGACY_KERAS=1`` for itself, so ``tf.keras`` is resolved here first,
under the user's environment, then TF-MOT is imported, and the variable is
restored afterwards, so child processes inherit the user's environment too.
A Keras 3 model handed to a Keras-2-only function is refused with a message
naming the Keras 2 path (:func:`check_keras2`).
"""

import functools
import importlib
import os
import sys

_ENV = "TF_USE_LEGACY_KERAS"


def _import_with_legacy_keras():
  import tensorflow as tf

  # Resolve TensorFlow's lazy ``tf.keras`` under the user's environment (a
  # no-op if it was resolved before), so that TF-MOT's import below, which
  # sets the variable, cannot change it.
  getattr(tf.keras, "__version__", None)
  previous = os.environ.get(_ENV)
  os.environ[_ENV] = "1"
  try:
    import tensorflow_model_optimization  # noqa: F401  (reads the variable)
    import tf_keras
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
      f"Keras 3), and {what} works with Keras 2 models only. Build the model "
      "with Keras 2: "
      "`import keras_epitome as ke; keras = ke.keras` (tf_keras); a Keras 3 "
      "model's weights move with model.get_weights()/set_weights() into the "
      "same architecture built with ke.keras. The Keras 3 API is "
      "keras_epitome.keras3 (docs/keras3.md lists what it covers)."
    )


def keras3_dispatch(name: str):
  """Decorator: a Keras 3 model given to a Keras 2 transform goes to ``keras_epitome.keras3``.

  ``ke.epitomize(keras3_model, ...)`` then returns what
  ``keras_epitome.keras3.epitomize(keras3_model, ...)`` returns, with the same
  arguments, so code written against the Keras 2 API accepts the models of
  users who write ``import keras``.

  Args:
    name: the function of :mod:`keras_epitome.keras3` to call.
  """

  def decorate(fn):
    @functools.wraps(fn)
    def dispatch(model, *args, **kwargs):
      if is_keras3_object(model):
        # A run-time edge only (the Keras 3 API builds on this package's
        # Keras 2 modules for its conversion and export, not the reverse).
        keras3 = importlib.import_module("keras_epitome.keras3")
        return getattr(keras3, name)(model, *args, **kwargs)
      return fn(model, *args, **kwargs)

    return dispatch

  return decorate


__all__ = [
  "PACKAGE",
  "check_keras2",
  "custom_objects",
  "is_keras3_object",
  "keras3_dispatch",
  "keras",
  "setup_keras",
]
