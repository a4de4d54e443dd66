r"""How far a converted model's BatchNorm statistics are from its activations.

Loads the conversion that ``recovery_recipes.py`` cached (same flags: ratio,
allocation, calibration budget, ``--cache``) and prints, for the trained
model and the converted one:

* test accuracy in inference mode (BatchNorm with its moving statistics);
* test accuracy with batch statistics (BatchNorm as in training: each batch
  of ``--batch_size`` test images normalized by its own mean and variance,
  on a copy, so nothing is updated), which is the function ``fit`` and
  ``ke.distill`` start from;
* per BatchNorm: the mean over channels of ``|mean(x) - moving_mean| /
  sqrt(moving_var + eps)`` and the median, smallest and largest
  ``var(x) / moving_var`` on ``--samples`` training images.

Usage:
  python -m benchmarks.archive.batchnorm_drift --ratio=4 --allocate \
      --calibration_size=16384 --output_steps=16000
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

import keras_epitome as ke
from benchmarks import recovery_recipes as R  # also defines the shared flags
from keras_epitome import calibration

keras = ke.keras
C = R.C
FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 4096, "Training images for the statistics.")


def batch_statistics_accuracy(model, test, batch_size):
  """Test accuracy with every BatchNorm on its batch's statistics (a copy)."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  x, y = test
  out = [
    copy(x[i : i + batch_size], training=True) for i in range(0, len(x), batch_size)
  ]
  return float(np.mean(np.argmax(np.concatenate(out), axis=-1) == y))


def drift(model, x):
  """Per BatchNorm: mean shift (in moving std) and variance ratios on ``x``.

  The statistics are estimated as ``calibrate`` estimates them.
  """
  bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
  rows = []
  for bn, (mean, var) in zip(
    bns, calibration._input_moments(model, bns, x, 256), strict=True
  ):
    moving_var = bn.moving_variance.numpy().astype(np.float64)
    shift = np.abs(mean - bn.moving_mean.numpy()) / np.sqrt(moving_var + bn.epsilon)
    ratio = var / moving_var
    rows.append(
      dict(
        layer=bn.name,
        mean_shift=round(float(shift.mean()), 4),
        var_ratio_median=round(float(np.median(ratio)), 3),
        var_ratio_min=round(float(ratio.min()), 3),
        var_ratio_max=round(float(ratio.max()), 3),
      )
    )
  return rows


def main(argv):
  del argv
  stock, model, (xr, _), test = R.converted_model()
  for name, m in (("trained", stock), ("converted", model)):
    row = dict(
      model=name,
      ratio=FLAGS.ratio,
      allocate=FLAGS.allocate,
      calibration_size=FLAGS.calibration_size,
      output_steps=FLAGS.output_steps,
      cache=FLAGS.cache,
      acc_inference=C.evaluate(m, test),
      acc_batch_statistics=batch_statistics_accuracy(m, test, FLAGS.batch_size),
      batchnorms=drift(m, xr[: FLAGS.samples]),
    )
    C.emit_row(row, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
