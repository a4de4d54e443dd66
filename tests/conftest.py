"""Test-session settings.

The export's form choice calibrates a LiteRT cost model on the first export of
a machine (``keras_epitome.cost_model``; tens of seconds, cached under the
user's cache folder). The tests use the bundled constants instead, so they
neither spend that time nor depend on what a previous run cached; the tests of
the calibration itself (``tests/test_export_cost_model.py``) set up their own.
"""

import os

os.environ.setdefault("KERAS_EPITOME_CALIBRATE", "0")
