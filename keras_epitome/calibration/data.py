"""Calibration data intake: validation, batching, batched predictions."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from keras_epitome.calibration.config import DEFAULT_MAX_SAMPLES


def calibration_array(
  data, model, max_samples: int = DEFAULT_MAX_SAMPLES, log=None
) -> np.ndarray:
  """Validates calibration data and returns it as one float32 array.

  Args:
    data: a NumPy array (or anything ``np.asarray`` takes) of inputs, a tuple
      ``(x, y)`` or ``(x, y, sample_weight)`` whose first entry is that, or a
      ``tf.data.Dataset`` of ``x`` or ``(x, y[, w])``, batched or not.
    model: the (single-input) model the data is for.
    max_samples: at most this many samples are kept (the first ones); when
      there are more, ``log`` (default ``absl.logging.warning``) says how
      many were dropped, so that a larger set is never cut short unseen.
    log: the logging function for that message (``ke.allocate``, which
      subsamples by design, logs at info level).

  Returns:
    ``x`` as a float32 array of shape ``(n, *input_shape[1:])``.

  Raises:
    ValueError: for a multi-input model, empty data, samples of the wrong
      shape, a non-numeric dtype or non-finite values (NaN, inf).
  """
  name = getattr(model, "name", "?")
  if len(model.inputs or []) != 1:
    raise ValueError(
      f"calibration_data: model '{name}' has {len(model.inputs or [])} inputs; "
      "data-aware conversion supports models with exactly one input"
    )
  want = tuple(model.inputs[0].shape)[1:]
  more = False  # a dataset with samples beyond those read
  if isinstance(data, tf.data.Dataset):
    parts, count = [], 0
    for element in data:
      if count >= max_samples:  # one more element: the dataset is longer
        more = True
        break
      x = element[0] if isinstance(element, (tuple, list)) else element
      if isinstance(x, dict):
        raise ValueError(
          f"calibration_data: dataset elements for model '{name}' must be x "
          "or (x, y) tensors, not dicts"
        )
      x = np.asarray(x)
      if x.ndim == len(want):  # unbatched dataset
        x = x[np.newaxis]
      parts.append(x)
      count += len(x)
    if not parts:
      raise ValueError(
        f"calibration_data for model '{name}' is an empty dataset; give a few "
        f"hundred samples of shape {want}"
      )
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
      raise ValueError(
        f"calibration_data for model '{name}' has elements of different "
        f"shapes {sorted(shapes)}; expected {want}"
      )
    x = np.concatenate(parts, 0)
  else:
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
      first = np.asarray(data[0]) if not np.isscalar(data[0]) else None
      if first is not None and first.ndim == len(want) + 1:
        data = data[0]
    try:
      x = np.asarray(data)
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"calibration_data for model '{name}' is not an array of inputs: {e}"
      ) from None
  if x.dtype.kind not in "fiub":
    raise ValueError(
      f"calibration_data for model '{name}' has dtype {x.dtype}; expected "
      "numbers (float inputs of shape "
      f"{want})"
    )
  if x.ndim == 0 or len(x) == 0:
    raise ValueError(
      f"calibration_data for model '{name}' is empty (shape {x.shape}); give "
      f"a few hundred samples of shape {want}"
    )
  if x.ndim != len(want) + 1 or any(
    w is not None and int(w) != int(d) for w, d in zip(want, x.shape[1:], strict=True)
  ):
    raise ValueError(
      f"calibration_data for model '{name}' has samples of shape "
      f"{tuple(x.shape[1:])} (array shape {tuple(x.shape)}); the model takes "
      f"inputs of shape {want} (None: any size)"
    )
  if more or len(x) > max_samples:
    (log or logging.warning)(
      "calibration_data for model '%s': using the first %d of %s samples "
      "(max_samples=%d); pass a larger max_samples to use more",
      name,
      max_samples,
      "more than %d" % len(x) if more else len(x),
      max_samples,
    )
  x = x[:max_samples].astype(np.float32)
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ValueError(
      f"calibration_data for model '{name}' holds {bad} non-finite value(s) "
      "(NaN or inf); calibration needs finite inputs"
    )
  return x


def in_batches(x, batch_size):
  """``x`` cut into consecutive batches of ``batch_size`` (the last may be short)."""
  return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def predict(model, x, batch_size):
  """``model(x)`` in inference mode, in batches, as NumPy (a list for several outputs)."""
  out = [model(b, training=False) for b in in_batches(x, batch_size)]
  if isinstance(out[0], (list, tuple)):
    return [np.concatenate([o[i] for o in out]) for i in range(len(out[0]))]
  return np.concatenate([np.asarray(o) for o in out])
