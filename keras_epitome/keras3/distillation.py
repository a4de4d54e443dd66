"""Short recovery after conversion, for Keras 3 on any backend: output distillation.

The Keras 3 counterpart of :mod:`keras_epitome.distillation`: after
:func:`keras_epitome.keras3.epitomize`, :func:`distill` fine-tunes the
student to match the original model's softened output distribution (Hinton
et al., 2015), optionally mixed with the label loss. The teacher only runs in
inference mode and is not changed. :class:`Distiller` is a ``keras.Model``
that overrides ``compute_loss`` and ``compute_metrics``, so Keras 3's own
``fit`` runs it on the TensorFlow, JAX and PyTorch backends.

Example:
  >>> import numpy as np
  >>> import keras
  >>> import keras_epitome.keras3 as ke
  >>> teacher = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64),
  ...                             keras.layers.Dense(10)])
  >>> student = ke.epitomize(teacher, 4, min_params=0, verbose=False)
  >>> x = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
  >>> history = ke.distill(student, teacher, x, epochs=2, verbose=0)
  >>> sorted(history.history)
  ['agreement', 'loss']
"""

from __future__ import annotations

import math
from typing import Optional

import keras
from absl import logging
from keras import ops

from keras_epitome import distill_common
from keras_epitome.keras3 import layers as k3_layers
from keras_epitome.keras3 import transform


class _Frozen:
  """Holds the teacher out of Keras' tracking: its variables are not trained."""

  def __init__(self, model):
    self.model = model


def _log_probs(outputs, temperature, from_logits):
  if from_logits:
    return ops.log_softmax(outputs / temperature, axis=-1)
  logp = ops.log(ops.clip(outputs, 1e-12, 1.0))
  return ops.log_softmax(logp / temperature, axis=-1)


class Distiller(keras.Model):
  """Trains ``student`` towards ``teacher``'s outputs; used by :func:`distill`.

  Loss and metrics are those of the Keras 2
  :class:`keras_epitome.distillation.Distiller` (the softened KL term, mixed
  with the label loss by ``alpha``; ``agreement``, and ``accuracy`` with
  ``labels=True``), computed with ``keras.ops``. The teacher is held outside
  Keras' variable tracking, so only the student's variables train (on every
  backend).

  Args:
    student: the Keras 3 model to train (updated in place).
    teacher: the reference Keras 3 model (run with ``training=False``).
    temperature: softmax temperature ``T``.
    alpha: weight of the label loss, in ``[0, 1]``.
    from_logits: whether the models output logits (else probabilities).
    labels: whether the data has labels (adds the ``accuracy`` metric).
  """

  def __init__(
    self,
    student,
    teacher,
    temperature=1.0,
    alpha=0.0,
    from_logits=True,
    labels=False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.student = student
    self._teacher = _Frozen(teacher)
    self.temperature = float(temperature)
    self.alpha = float(alpha)
    self.from_logits = bool(from_logits)
    self.agreement = keras.metrics.Mean(name="agreement")
    self.accuracy = (
      keras.metrics.SparseCategoricalAccuracy(name="accuracy") if labels else None
    )

  @property
  def teacher(self):
    return self._teacher.model

  def call(self, inputs, training=None):
    return self.student(inputs, training=training)

  def _teacher_outputs(self, x):
    return ops.stop_gradient(self.teacher(x, training=False))

  def compute_loss(
    self, x=None, y=None, y_pred=None, sample_weight=None, training=True
  ):
    del sample_weight, training
    t = self.temperature
    target = self._teacher_outputs(x)
    y_pred = ops.cast(y_pred, "float32")
    teacher_logp = _log_probs(ops.cast(target, "float32"), t, self.from_logits)
    student_logp = _log_probs(y_pred, t, self.from_logits)
    kl = ops.sum(ops.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
    weight = 1.0 - self.alpha if y is not None else 1.0
    loss = weight * t * t * ops.mean(kl)
    if y is not None and self.alpha > 0:
      logp = _log_probs(y_pred, 1.0, self.from_logits)
      labels = ops.cast(ops.reshape(y, (-1, 1)), "int32")
      loss = loss - self.alpha * ops.mean(ops.take_along_axis(logp, labels, axis=-1))
    for extra in self.losses:
      loss = loss + ops.cast(ops.sum(extra), "float32")
    return loss

  def compute_metrics(self, x, y, y_pred, sample_weight=None):
    del sample_weight
    target = self._teacher_outputs(x)
    same = ops.equal(ops.argmax(y_pred, axis=-1), ops.argmax(target, axis=-1))
    self.agreement.update_state(ops.cast(same, "float32"))
    if self.accuracy is not None and y is not None:
      self.accuracy.update_state(y, y_pred)
    return self.get_metrics_result()


# ``distill``'s default peak learning rate, by the length of the run: the
# Keras 2 rule, stated once in keras_epitome.distill_common.
LEARNING_RATE = distill_common.LEARNING_RATE
SHORT_RUN_LEARNING_RATE = distill_common.SHORT_RUN_LEARNING_RATE
SHORT_RUN_STEPS = distill_common.SHORT_RUN_STEPS
default_learning_rate = distill_common.default_learning_rate


def cosine_schedule(peak: float, steps: int, warmup_steps: int = 0):
  """Linear from 0 to ``peak`` over ``warmup_steps``, then cosine to 0."""
  return distill_common.cosine_schedule(
    keras.optimizers.schedules.CosineDecay, peak, steps, warmup_steps
  )


def _is_array_data(data) -> bool:
  return isinstance(data, (tuple, list)) or hasattr(data, "shape")


def _steps_per_epoch(data, batch_size) -> Optional[int]:
  """Optimizer steps per pass over ``data``; None when its length is unknown."""
  if _is_array_data(data):
    x = data[0] if isinstance(data, (tuple, list)) else data
    return math.ceil(len(x) / batch_size)
  cardinality = getattr(data, "cardinality", None)  # a tf.data.Dataset
  if cardinality is not None:
    n = int(cardinality())
    return n if n >= 0 else None
  try:
    return len(data)  # a keras.utils.PyDataset
  except TypeError:
    return None


def _has_labels(data) -> bool:
  if isinstance(data, (tuple, list)):
    return len(data) >= 2 and data[1] is not None
  spec_ = getattr(data, "element_spec", None)  # a tf.data.Dataset
  if spec_ is not None:
    return isinstance(spec_, tuple) and len(spec_) >= 2
  return False


def _output_shape(model):
  outputs = getattr(model, "outputs", None)
  if outputs:
    return tuple(outputs[0].shape)[1:]
  return None


def distill(
  student,
  teacher,
  data,
  *,
  epochs: int = 1,
  temperature: float = 1.0,
  alpha: float = 0.0,
  learning_rate: Optional[float] = None,
  warmup: float = 0.0,
  optimizer=None,
  batch_size: int = 128,
  from_logits: bool = True,
  validation_data=None,
  callbacks=None,
  verbose="auto",
):
  """Fine-tunes a Keras 3 ``student`` to reproduce ``teacher``'s outputs.

  The Keras 3 version of :func:`keras_epitome.distill`, on any backend: Adam
  with a cosine decay of ``learning_rate`` to 0 over the run, after an
  optional linear ``warmup`` (unless ``optimizer`` is given; for data of
  unknown length the rate stays constant), loss as in :class:`Distiller`.
  Labels are optional: unlabeled inputs are enough, and with labels
  ``alpha`` mixes in the label loss. The student's weights are updated in
  place; the teacher is not changed. The default peak learning rate is the
  Keras 2 one: ``3e-3`` from 300 optimizer steps on, ``1e-3`` below that.

  Args:
    student: a Keras 3 model (e.g. from :func:`keras_epitome.keras3.epitomize`).
    teacher: the original Keras 3 model; same output shape.
    data: NumPy inputs ``x``, a tuple ``(x, y)``, or a dataset Keras 3's
      ``fit`` takes (a ``tf.data.Dataset``, a ``keras.utils.PyDataset``...)
      of batches of ``x`` or ``(x, y)``.
    epochs: passes over ``data``.
    temperature: softmax temperature (the KL term is scaled by its square).
    alpha: weight of the label cross-entropy when labels are given, in
      ``[0, 1]``.
    learning_rate: peak Adam learning rate; default by the run's length.
      Ignored with ``optimizer``.
    warmup: fraction of the run's steps, in ``[0, 1)``, of linear warmup;
      only with the default optimizer and data of known length.
    optimizer: a Keras 3 optimizer to use instead of the default.
    batch_size: for array data.
    from_logits: whether the models output logits (``True``) or
      probabilities.
    validation_data: like ``data``; reports ``val_agreement``.
    callbacks: Keras 3 callbacks.
    verbose: Keras ``fit`` verbosity.

  Returns:
    The Keras ``History`` (``loss``, ``agreement``, with labels
    ``accuracy``; ``val_*`` with validation data), as the Keras 2
    :func:`keras_epitome.distill`; the student is trained in place.

  Raises:
    ValueError: for a Keras 2 student or teacher (use
      :func:`keras_epitome.distill`), a bad ``epochs``, ``temperature``,
      ``alpha``, ``learning_rate`` or ``warmup`` (also with ``optimizer``),
      a warmup over data of unknown length, or teacher and student outputs of
      different shapes.
  """
  for role, model in (("student", student), ("teacher", teacher)):
    if transform.is_keras2_object(model):
      raise ValueError(
        f"distill: the {role} '{getattr(model, 'name', model)}' is a Keras 2 "
        "(tf_keras) model; keras_epitome.keras3.distill takes Keras 3 models. "
        "Use the Keras 2 API for it: keras_epitome.distill"
      )
    if not isinstance(model, keras.Model):
      raise ValueError(
        f"distill: the {role} must be a Keras 3 keras.Model; got {type(model).__name__}"
      )
  args = distill_common.check_distill_args(
    epochs, temperature, alpha, learning_rate, warmup, optimizer, batch_size
  )
  temperature, warmup = args["temperature"], args["warmup"]
  learning_rate = args["learning_rate"]
  distill_common.check_output_shapes(
    student, teacher, _output_shape(student), _output_shape(teacher)
  )
  if optimizer is None:
    per_epoch = _steps_per_epoch(data, batch_size)
    if per_epoch is None and warmup:
      raise ValueError(
        "distill: warmup needs the number of steps, but the data's length is "
        "unknown; give a dataset of known length or use warmup=0"
      )
    steps = None if per_epoch is None else max(1, epochs * per_epoch)
    if learning_rate is None:
      learning_rate = default_learning_rate(steps)
      logging.info(
        "distill: %s steps, peak learning rate %g; pass learning_rate= to choose",
        "unknown" if steps is None else steps,
        learning_rate,
      )
    if steps is None:
      optimizer = keras.optimizers.Adam(learning_rate)
    else:
      optimizer = keras.optimizers.Adam(
        cosine_schedule(
          learning_rate, steps, distill_common.warmup_steps(warmup, steps)
        )
      )
  labels = _has_labels(data)
  distiller = Distiller(
    student,
    teacher,
    temperature,
    alpha,
    from_logits,
    labels=labels,
    name=f"distill_{student.name}",
  )
  distiller.compile(optimizer=optimizer)
  kwargs = dict(
    epochs=epochs,
    verbose=verbose,
    callbacks=callbacks,
    validation_data=validation_data,
  )
  if not _is_array_data(data):
    return distiller.fit(data, **kwargs)
  x, y = distill_common.split_xy(data)
  return distiller.fit(x, y, batch_size=batch_size, shuffle=True, **kwargs)


def epitome_variables(model) -> list:
  """The trainable epitome tensors of every Keras 3 epitome layer in ``model``."""
  return [
    layer.epitome
    for layer in k3_layers.epitome_layers(model)
    if layer.epitome is not None and layer.epitome.trainable
  ]
