"""Keras 2 set-up: the one place that decides which Keras the package uses.

TF-MOT 0.8.1 works only with Keras 2 (``tf_keras``). TensorFlow reads
``TF_USE_LEGACY_KERAS`` the first time ``tf.keras`` is touched, so the variable
must be set before that happens. Importing :mod:`keras_epitome` does it; use
``keras_epitome.keras`` (this module's ``keras``) wherever you would write
``tf.keras`` so that your layers and ours come from the same Keras.
"""

import os
import sys

_LEGACY_VALUES = ("1", "true", "True", "TRUE", "yes")


def _keras_version_of_tf_keras(tf) -> str:
  try:
    return str(tf.keras.__version__)
  except Exception:  # pragma: no cover - very old/odd TF builds
    return "unknown"


def setup_keras():
  """Selects Keras 2 (``tf_keras``) for TensorFlow and returns that module.

  Returns:
    The ``tf_keras`` module.

  Raises:
    ImportError: if TensorFlow was already imported and ``tf.keras`` already
      resolved to Keras 3, or if ``tf_keras`` is not installed.
  """
  tf_already_imported = "tensorflow" in sys.modules
  was_set = os.environ.get("TF_USE_LEGACY_KERAS") in _LEGACY_VALUES
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  try:
    import tf_keras
  except ImportError as e:  # pragma: no cover - install problem
    raise ImportError(
      "keras_epitome needs Keras 2 from the 'tf-keras' package "
      "(pip install 'tf-keras==2.21.*'); it could not be imported: " + str(e)
    ) from e
  if tf_already_imported and not was_set:
    import tensorflow as tf

    version = _keras_version_of_tf_keras(tf)
    if version.startswith("3"):
      raise ImportError(
        "keras_epitome: TensorFlow was imported with Keras 3 active "
        f"(tf.keras is Keras {version}), but keras_epitome and TF-MOT "
        "need Keras 2. Set TF_USE_LEGACY_KERAS=1 in the environment, or "
        "import keras_epitome before tensorflow."
      )
  return tf_keras


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


__all__ = ["PACKAGE", "custom_objects", "keras", "setup_keras"]
