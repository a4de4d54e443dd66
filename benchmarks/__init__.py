"""The benchmarks behind the published tables (see benchmarks/README.md).

Run them from the repository root as modules, e.g.
``python -m benchmarks.pretrained --help``. The package imports
``keras_epitome`` first, so its Keras 2 and TF-MOT set-up runs before a script
imports anything else.
"""

import keras_epitome  # noqa: F401
