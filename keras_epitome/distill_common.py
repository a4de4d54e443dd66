"""``distill``'s rules, shared by the Keras 2 and the Keras 3 API.

The default learning rate by the length of the run, the warmup-then-cosine
schedule and the argument checks of :func:`keras_epitome.distill` and
:func:`keras_epitome.keras3.distill`: one statement for both, importing
neither TensorFlow nor Keras (each API hands in its own ``CosineDecay``).

Example:
  >>> default_learning_rate(85), default_learning_rate(469)
  (0.001, 0.003)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from keras_epitome import spec

# ``distill``'s default peak learning rate, by the length of the run: a run
# of fewer than SHORT_RUN_STEPS steps gets the lower rate (docs/results.md:
# from a close data-aware conversion, the higher rate moves the model and a
# short run has no steps left to settle).
LEARNING_RATE = 3e-3
SHORT_RUN_LEARNING_RATE = 1e-3
SHORT_RUN_STEPS = 300


def default_learning_rate(steps: Optional[int]) -> float:
  """``distill``'s peak learning rate for a run of ``steps`` optimizer steps.

  ``SHORT_RUN_LEARNING_RATE`` (1e-3) below ``SHORT_RUN_STEPS`` (300) steps and
  for a run of unknown length (its rate stays constant, never decaying),
  ``LEARNING_RATE`` (3e-3) otherwise.

  >>> default_learning_rate(None), default_learning_rate(300)
  (0.001, 0.003)
  """
  if steps is None or steps < SHORT_RUN_STEPS:
    return SHORT_RUN_LEARNING_RATE
  return LEARNING_RATE


def cosine_schedule(cosine_decay, peak: float, steps: int, warmup_steps: int = 0):
  """Linear from 0 to ``peak`` over ``warmup_steps``, then cosine to 0.

  ``steps`` counts the whole run, warmup included (``distill``'s schedule).

  Args:
    cosine_decay: the Keras version's
      ``keras.optimizers.schedules.CosineDecay`` class.
    peak: the peak learning rate.
    steps: optimizer steps of the run.
    warmup_steps: steps of the linear warmup (``0``: none).

  Example:
    >>> cosine_schedule(lambda *a, **k: (a, k), 0.1, 100, 10)
    ((0.0, 90), {'warmup_target': 0.1, 'warmup_steps': 10})
  """
  if not warmup_steps:
    return cosine_decay(peak, steps)
  return cosine_decay(
    0.0, steps - warmup_steps, warmup_target=peak, warmup_steps=warmup_steps
  )


def warmup_steps(warmup: float, steps: int) -> int:
  """The warmup's whole steps: ``warmup`` (a fraction) of a run of ``steps``."""
  return int(round(warmup * steps))


def check_distill_args(
  epochs, temperature, alpha, learning_rate, warmup, optimizer, batch_size
) -> Dict[str, Any]:
  """Checks ``distill``'s arguments (as ``distill`` names them); returns them normalized.

  Returns:
    ``dict(epochs=int, temperature=float, alpha=float, learning_rate=float or
    None, warmup=float, batch_size=int)``.

  Raises:
    ValueError: naming ``distill``, the argument and what is valid:
      ``epochs`` and ``batch_size`` ints >= 1, ``temperature`` and
      ``learning_rate`` finite and > 0, ``alpha`` in ``[0, 1]``, ``warmup``
      in ``[0, 1)`` and only with the default optimizer.

  Example:
    >>> check_distill_args(2, 2, 0, None, 0.1, None, 32)["temperature"]
    2.0
    >>> check_distill_args(1, 1, 0, None, 1.5, None, 32)
    Traceback (most recent call last):
    ...
    ValueError: distill: warmup must be a fraction of the run in [0, 1), got 1.5
  """
  if isinstance(epochs, bool) or not (
    isinstance(epochs, (int, np.integer)) and epochs >= 1
  ):
    raise ValueError(f"distill: epochs must be an int >= 1, got {epochs!r}")
  temperature = spec.check_positive(temperature, "temperature", "distill")
  if not (spec.is_real(alpha) and 0.0 <= float(alpha) <= 1.0):
    raise ValueError(f"distill: alpha must be in [0, 1], got {alpha!r}")
  if learning_rate is not None:
    learning_rate = spec.check_positive(learning_rate, "learning_rate", "distill")
  if not (spec.is_real(warmup) and 0.0 <= float(warmup) < 1.0):
    raise ValueError(
      f"distill: warmup must be a fraction of the run in [0, 1), got {warmup!r}"
    )
  if isinstance(batch_size, bool) or not (
    isinstance(batch_size, (int, np.integer)) and batch_size >= 1
  ):
    raise ValueError(f"distill: batch_size must be an int >= 1, got {batch_size!r}")
  if optimizer is not None and warmup:
    raise ValueError(
      "distill: warmup applies to the default Adam optimizer; with optimizer= "
      "given, schedule its learning rate instead"
    )
  return dict(
    epochs=int(epochs),
    temperature=float(temperature),
    alpha=float(alpha),
    learning_rate=learning_rate,
    warmup=float(warmup),
    batch_size=int(batch_size),
  )


def check_epitome_learning_rate(value, optimizer) -> Optional[float]:
  """The Keras 2 ``distill``'s ``epitome_learning_rate``: ``None`` or > 0.

  Only with the default optimizer (it is the rate of the epitomes' own Adam).
  """
  if value is None:
    return None
  value = spec.check_positive(value, "epitome_learning_rate", "distill")
  if optimizer is not None:
    raise ValueError(
      "distill: epitome_learning_rate applies to the default Adam optimizer; "
      "with optimizer= given, leave it None"
    )
  return value


def check_output_shapes(student, teacher, student_shape, teacher_shape) -> None:
  """Refuses a student and teacher whose outputs differ in shape.

  Args:
    student: the student model (for its ``name``).
    teacher: the teacher model (for its ``name``).
    student_shape: the student's output shape without the batch axis;
      ``None`` when unknown (nothing to check).
    teacher_shape: the same for the teacher.
  """
  if student_shape is None or teacher_shape is None:
    return
  if tuple(student_shape) != tuple(teacher_shape):
    raise ValueError(
      f"distill: student '{student.name}' outputs shape {tuple(student_shape)} "
      f"but teacher '{teacher.name}' outputs {tuple(teacher_shape)}; they must "
      "match"
    )


def split_xy(data) -> Tuple[Any, Any]:
  """Array data ``x`` or ``(x, y)`` (a tuple or list) -> ``(x, y or None)``.

  Example:
    >>> split_xy(([1, 2], [0, 1])), split_xy([[1, 2]]), split_xy("x")
    (([1, 2], [0, 1]), ([1, 2], None), ('x', None))
  """
  if isinstance(data, (tuple, list)):
    return data[0], data[1] if len(data) > 1 else None
  return data, None
