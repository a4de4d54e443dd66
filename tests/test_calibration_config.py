"""Tests for keras_epitome.calibration.CalibrationConfig and its plumbing.

The config's checks (each error names the field, the value and what is
valid), the deprecated ``calibration_options`` dict of ``epitomize`` (a
``DeprecationWarning`` that spells the equivalent config; unknown keys
raise), and that a dict and the config it maps to give the same model.
"""

import dataclasses
import warnings

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome.calibration import (
  CalibrationConfig,
  ExperimentalCalibration,
  config_from_options,
)

keras = ke.keras


def _model():
  keras.utils.set_random_seed(0)
  return keras.Sequential(
    [
      keras.Input((6, 6, 4)),
      keras.layers.Conv2D(16, 3, name="c1"),
      keras.layers.ReLU(),
      keras.layers.Conv2D(16, 3, name="c2"),
    ]
  )


def _data(n=32):
  return np.random.default_rng(0).normal(size=(n, 6, 6, 4)).astype("float32")


class ConfigTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    (
      "negative_steps",
      dict(output_steps=-3),
      r"output_steps: -3 must be an integer >= 0",
    ),
    ("float_steps", dict(output_steps=1.5), r"output_steps: 1.5 must be an integer"),
    ("bool_steps", dict(output_steps=True), r"output_steps: True must be an integer"),
    (
      "zero_lr",
      dict(learning_rate=0.0),
      r"learning_rate: 0.0 must be a finite number > 0",
    ),
    ("nan_lr", dict(learning_rate=float("nan")), r"learning_rate: nan must be"),
    ("bool_lr", dict(learning_rate=True), r"learning_rate: True must be a finite"),
    ("string_lr", dict(learning_rate="1e-3"), r"learning_rate: '1e-3' must be"),
    ("negative_ridge", dict(ridge=-1.0), r"ridge: -1.0 must be a finite number >= 0"),
    ("zero_batch", dict(batch_size=0), r"batch_size: 0 must be an integer >= 1"),
    ("zero_samples", dict(max_samples=0), r"max_samples: 0 must be an integer >= 1"),
    (
      "string_flag",
      dict(refit_batchnorm="yes"),
      r"refit_batchnorm: 'yes' must be True",
    ),
    ("check", dict(output_check="loud"), r"output_check: 'loud' must be one of"),
    ("experimental", dict(experimental=dict(search=True)), r"experimental: .* must be"),
  )
  def test_bad_values_name_the_field(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, "^CalibrationConfig." + message):
      CalibrationConfig(**kwargs)

  def test_bad_experimental_values_name_the_field(self):
    with self.assertRaisesRegex(
      ValueError, r"^ExperimentalCalibration.reconstruct_steps: -1 must be an integer"
    ):
      ExperimentalCalibration(reconstruct_steps=-1)
    with self.assertRaisesRegex(
      ValueError, r"search_sweeps: 0 must be an integer >= 1"
    ):
      ExperimentalCalibration(search_sweeps=0)

  def test_numbers_are_normalized_and_frozen(self):
    config = CalibrationConfig(learning_rate=np.float32(0.5), output_steps=np.int64(3))
    self.assertIs(type(config.learning_rate), float)
    self.assertIs(type(config.output_steps), int)
    with self.assertRaises(dataclasses.FrozenInstanceError):
      config.output_steps = 4

  def test_options_dict_maps_to_the_config(self):
    config = config_from_options(
      dict(reconstruct_lr=3e-3, search=True, reconstruct_steps=5, output_steps=7),
      "here",
    )
    self.assertEqual(
      config,
      CalibrationConfig(
        learning_rate=3e-3,
        output_steps=7,
        experimental=ExperimentalCalibration(search=True, reconstruct_steps=5),
      ),
    )

  def test_unknown_option_names_the_key_and_the_valid_ones(self):
    with self.assertRaisesRegex(
      ValueError, r"unknown key\(s\) \['ridgee'\]; valid keys: .*output_steps.*ridge"
    ):
      config_from_options(dict(ridgee=1.0), "epitomize")
    with self.assertRaisesRegex(ValueError, r"epitomize: .*unknown key.*'bogus'"):
      ke.epitomize(
        _model(), 4, calibration_data=_data(), calibration_options=dict(bogus=1)
      )


class EpitomizeConfigTest(tf.test.TestCase):
  def test_deprecated_dict_warns_with_the_equivalent_config(self):
    model, x = _model(), _data()
    with self.assertWarnsRegex(
      DeprecationWarning,
      r"calibration_options is deprecated; pass calibration=keras_epitome\."
      r"calibration\.CalibrationConfig\(max_samples=16, "
      r"experimental=ExperimentalCalibration\(search=True\)\)",
    ):
      old = ke.epitomize(
        model,
        4,
        calibration_data=x,
        calibration_options=dict(max_samples=16, search=True),
        verbose=False,
      )
    config = CalibrationConfig(
      max_samples=16, experimental=ExperimentalCalibration(search=True)
    )
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      new = ke.epitomize(
        model, 4, calibration_data=x, calibration=config, verbose=False
      )
    for a, b in zip(old.get_weights(), new.get_weights(), strict=True):
      self.assertAllEqual(a, b)
    self.assertTrue(old.epitome_report.calibration[0].routing_searched)

  def test_config_and_dict_together_are_refused(self):
    with self.assertRaisesRegex(ValueError, "not both"):
      ke.epitomize(
        _model(),
        4,
        calibration_data=_data(),
        calibration=CalibrationConfig(),
        calibration_options={},
      )

  def test_calibration_must_be_a_config(self):
    with self.assertRaisesRegex(ValueError, "calibration must be .*CalibrationConfig"):
      ke.epitomize(_model(), 4, calibration_data=_data(), calibration=dict(ridge=1.0))

  def test_config_reaches_calibrate(self):
    # max_samples cuts the data; ridge reaches the least squares (a huge
    # ridge keeps the weight fit).
    model, x = _model(), _data(48)
    stiff = ke.epitomize(
      model,
      4,
      calibration_data=x,
      calibration=CalibrationConfig(ridge=1e9, max_samples=40),
      verbose=False,
    )
    record = stiff.epitome_report.converted[-1]
    self.assertAllClose(record.output_error, record.weight_fit_output_error, rtol=1e-3)
    check = stiff.epitome_report.calibration[-1]
    self.assertIn("on 40 samples", check.note)


if __name__ == "__main__":
  tf.test.main()
