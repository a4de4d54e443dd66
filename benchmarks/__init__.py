"""The benchmarks behind the published tables (see benchmarks/README.md).

Run them from the repository root as modules, e.g.
``python -m benchmarks.pretrained --help``. Importing this package imports
``keras_epitome`` first, so every script gets Keras 2 (``tf_keras``) whatever
it imports next (TF-MOT included).
"""

import keras_epitome  # noqa: F401
