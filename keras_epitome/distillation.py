"""Short recovery after conversion: output distillation from the original model.

After :func:`keras_epitome.epitomize` (or pruning, or quantization) the usual
next step is a short fine-tune. :func:`distill` does it in one call with the
original model as teacher: the student is trained to match the teacher's
softened output distribution (Hinton et al., 2015), optionally mixed with the
ordinary label loss. The teacher is only run in inference mode and is not
changed.

Example:
  >>> import numpy as np
  >>> import keras_epitome as ke
  >>> keras = ke.keras
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

import tensorflow as tf
from absl import logging

from keras_epitome import distill_common, walk
from keras_epitome.backend import keras, keras3_dispatch
from keras_epitome.layers import epitome_layers


def _log_probs(outputs, temperature, from_logits):
  if from_logits:
    return tf.nn.log_softmax(outputs / temperature, axis=-1)
  logp = tf.math.log(tf.clip_by_value(outputs, 1e-12, 1.0))
  return tf.nn.log_softmax(logp / temperature, axis=-1)


class Distiller(keras.Model):
  """Trains ``student`` towards ``teacher``'s outputs; used by :func:`distill`.

  The loss is ``alpha * CE(y, student) + (1 - alpha) * T^2 *
  KL(softmax(teacher / T) || softmax(student / T))`` (only the distillation
  term when the data has no labels), plus the student's own regularization
  losses. Metrics: ``loss`` and ``agreement`` (fraction of samples where the
  student's top class is the teacher's); with labels also ``accuracy``.

  Args:
    student: the model to train (updated in place).
    teacher: the reference model (run with ``training=False``).
    temperature: softmax temperature ``T``.
    alpha: weight of the label loss, in ``[0, 1]``.
    from_logits: whether the models output logits (else probabilities).
  """

  def __init__(
    self,
    student,
    teacher,
    temperature,
    alpha,
    from_logits,
    epitome_optimizer=None,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.student = student
    # Epitome tensors get their own optimizer (its own learning rate) when
    # one is given; everything else uses the compiled optimizer.
    self.epitome_optimizer = epitome_optimizer
    self._epitome_refs = (
      set()
      if epitome_optimizer is None
      else {v.ref() for v in epitome_variables(student)}
    )
    self.teacher = teacher
    self.temperature = float(temperature)
    self.alpha = float(alpha)
    self.from_logits = bool(from_logits)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.agreement = keras.metrics.Mean(name="agreement")
    self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self._has_labels = None

  @property
  def metrics(self):
    out = [self.loss_tracker, self.agreement]
    if self._has_labels:
      out.append(self.accuracy)
    return out

  def call(self, inputs, training=None):
    return self.student(inputs, training=training)

  def _loss(self, x, y, training):
    t = self.temperature
    target = self.teacher(x, training=False)
    out = self.student(x, training=training)
    teacher_logp = _log_probs(target, t, self.from_logits)
    student_logp = _log_probs(out, t, self.from_logits)
    kl = tf.reduce_sum(tf.exp(teacher_logp) * (teacher_logp - student_logp), -1)
    loss = (1.0 - self.alpha if y is not None else 1.0) * t * t * tf.reduce_mean(kl)
    if y is not None and self.alpha > 0:
      ce = -tf.reduce_mean(
        tf.gather(
          _log_probs(out, 1.0, self.from_logits),
          tf.cast(tf.reshape(y, [-1]), tf.int32),
          batch_dims=1,
        )
      )
      loss += self.alpha * ce
    if self.student.losses:
      loss += tf.add_n(self.student.losses)
    return loss, out, target

  def _update(self, loss, out, target, y):
    self.loss_tracker.update_state(loss)
    same = tf.equal(tf.argmax(out, -1), tf.argmax(target, -1))
    self.agreement.update_state(tf.cast(same, tf.float32))
    if y is not None:
      self.accuracy.update_state(y, out)
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      loss, out, target = self._loss(x, y, True)
    variables = self.student.trainable_variables
    grads = tape.gradient(loss, variables)
    pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    if self.epitome_optimizer is None:
      self.optimizer.apply_gradients(pairs)
    else:
      epitomes = [(g, v) for g, v in pairs if v.ref() in self._epitome_refs]
      others = [(g, v) for g, v in pairs if v.ref() not in self._epitome_refs]
      if others:
        self.optimizer.apply_gradients(others)
      if epitomes:
        self.epitome_optimizer.apply_gradients(epitomes)
    return self._update(loss, out, target, y)

  def test_step(self, data):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    loss, out, target = self._loss(x, y, False)
    return self._update(loss, out, target, y)


def epitome_variables(model) -> list:
  """The trainable epitome tensors of every epitome layer in ``model`` (nested too)."""
  return [
    layer.epitome
    for layer in epitome_layers(model)
    if layer.epitome is not None and layer.epitome.trainable
  ]


def cosine_schedule(peak: float, steps: int, warmup_steps: int = 0):
  """Linear from 0 to ``peak`` over ``warmup_steps``, then cosine to 0.

  ``steps`` counts the whole run, warmup included (``distill``'s schedule;
  :func:`keras_epitome.distill_common.cosine_schedule`).
  """
  return distill_common.cosine_schedule(
    keras.optimizers.schedules.CosineDecay, peak, steps, warmup_steps
  )


# ``distill``'s default peak learning rate, by the length of the run
# (keras_epitome.distill_common states the rule for both Keras versions).
LEARNING_RATE = distill_common.LEARNING_RATE
SHORT_RUN_LEARNING_RATE = distill_common.SHORT_RUN_LEARNING_RATE
SHORT_RUN_STEPS = distill_common.SHORT_RUN_STEPS
default_learning_rate = distill_common.default_learning_rate


def _steps_per_epoch(data, batch_size) -> Optional[int]:
  """Optimizer steps per pass over ``data``; None for a dataset of unknown length."""
  if isinstance(data, tf.data.Dataset):
    n = int(data.cardinality())
    return n if n >= 0 else None
  x = data[0] if isinstance(data, (tuple, list)) else data
  return math.ceil(len(x) / batch_size)


def _with_pruning_step(student, callbacks):
  """``callbacks`` plus TF-MOT's ``UpdatePruningStep`` if the student needs it.

  TF-MOT's pruning wrappers refuse to train without that callback; a
  student wrapped for pruning gets it unless ``callbacks`` has it already.
  """
  callbacks = list(callbacks or [])
  if not walk.has_training_wrappers(student, "pruning"):
    return callbacks
  import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top

  step = tfmot.sparsity.keras.UpdatePruningStep
  if not any(isinstance(c, step) for c in callbacks):
    callbacks.append(step())
  return callbacks


@keras3_dispatch("distill")
def distill(
  student,
  teacher,
  data,
  *,
  epochs: int = 1,
  temperature: float = 1.0,
  alpha: float = 0.0,
  learning_rate: Optional[float] = None,
  epitome_learning_rate: Optional[float] = None,
  warmup: float = 0.0,
  optimizer=None,
  batch_size: int = 128,
  from_logits: bool = True,
  validation_data=None,
  callbacks=None,
  verbose: int = 1,
):
  """Fine-tunes ``student`` to reproduce ``teacher``'s outputs (distillation).

  One call for the recovery step after a conversion: Adam with a cosine
  decay of ``learning_rate`` to 0 over the run, after an optional linear
  ``warmup`` (unless ``optimizer`` is given; for a ``tf.data.Dataset`` of
  unknown length the rate stays constant), loss as in :class:`Distiller`.
  Labels are optional: unlabeled inputs are enough, and with labels
  ``alpha`` mixes in the label loss. The student's weights (epitomes,
  offsets, BatchNorm statistics...) are updated in place; the teacher is not
  changed. TF-MOT callbacks such as ``UpdatePruningStep`` work (the student
  is part of the trained model); a student with TF-MOT pruning wrappers
  (:func:`keras_epitome.prune_epitomes`) gets ``UpdatePruningStep`` added
  when ``callbacks`` lack it.

  The default peak learning rate depends on the length of the run:
  ``3e-3`` from 300 optimizer steps on (``epochs`` times the batches per
  epoch), ``1e-3`` below that and for a dataset of unknown length (whose rate
  stays constant); the choice is logged (absl, info). Both are the best
  measured for their case after a data-aware conversion (``docs/results.md``):
  on long runs the higher rate recovers more; on short runs it moves a close
  conversion away with no steps left to settle (a ``warmup`` did not prevent
  that drop).

  A model far from its teacher (e.g. freshly magnitude-pruned) may want the
  higher rate on short runs too (``docs/results.md``).

  Args:
    student: a Keras model (e.g. from :func:`keras_epitome.epitomize`).
    teacher: the original model; same input and output shapes.
    data: NumPy inputs ``x``, a tuple ``(x, y)``, or a ``tf.data.Dataset``
      of batches of ``x`` or ``(x, y)``.
    epochs: passes over ``data``.
    temperature: softmax temperature (the KL term is scaled by its square).
    alpha: weight of the label cross-entropy when labels are given, in
      ``[0, 1]``.
    learning_rate: peak Adam learning rate; default by the run's length
      (above). Ignored with ``optimizer``.
    epitome_learning_rate: peak Adam learning rate of the epitome tensors
      (found in every epitome layer of ``student``, nested ones too), on an
      optimizer of their own with the same schedule; default
      ``learning_rate``. Only with the default optimizer. A higher rate for
      the epitomes measured no clear gain (``docs/results.md``).
    warmup: fraction of the run's steps, in ``[0, 1)``, over which the
      learning rates rise linearly from 0 to their peak before the cosine
      decay; only with the default optimizer, and a ``tf.data.Dataset``
      must then have a known length (``cardinality``).
    optimizer: a Keras optimizer to use instead of the default.
    batch_size: for array data.
    from_logits: whether the models output logits (``True``) or
      probabilities.
    validation_data: like ``data``; reports ``val_agreement`` (and
      ``val_accuracy`` with labels).
    callbacks: Keras callbacks.
    verbose: Keras ``fit`` verbosity.

  Returns:
    The Keras ``History`` (``loss``, ``agreement``, with labels
    ``accuracy``; ``val_*`` with validation data).

  Raises:
    ValueError: for a bad ``epochs``, ``temperature``, ``alpha``,
      ``learning_rate``, ``epitome_learning_rate`` or ``warmup`` (also when
      the latter two are given with ``optimizer``), a warmup over a dataset
      of unknown length, or teacher and student outputs of different shapes.

  Example:
    >>> import numpy as np
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> h = distill(student, teacher, x, epochs=1, verbose=0)
    >>> len(h.history["loss"])
    1
  """
  args = distill_common.check_distill_args(
    epochs, temperature, alpha, learning_rate, warmup, optimizer, batch_size
  )
  learning_rate = args["learning_rate"]
  epitome_learning_rate = distill_common.check_epitome_learning_rate(
    epitome_learning_rate, optimizer
  )
  distill_common.check_output_shapes(
    student,
    teacher,
    tuple(student.output_shape)[1:],
    tuple(teacher.output_shape)[1:],
  )
  epitome_optimizer = None
  if optimizer is None:
    per_epoch = _steps_per_epoch(data, batch_size)
    if per_epoch is None and warmup:
      raise ValueError(
        "distill: warmup needs the number of steps, but the dataset's length "
        "is unknown; give its cardinality (e.g. dataset.apply("
        "tf.data.experimental.assert_cardinality(n))) or use warmup=0"
      )

    # None for a dataset of unknown length: no schedule.
    steps = None if per_epoch is None else max(1, epochs * per_epoch)

    def adam(peak):
      if steps is None:
        return keras.optimizers.Adam(peak)
      return keras.optimizers.Adam(
        cosine_schedule(peak, steps, distill_common.warmup_steps(warmup, steps))
      )

    if learning_rate is None:
      learning_rate = default_learning_rate(steps)
      logging.info(
        "distill: %s steps, peak learning rate %g (%g below %d steps or for a "
        "dataset of unknown length, %g from there on); pass learning_rate= to "
        "choose",
        "unknown" if steps is None else steps,
        learning_rate,
        SHORT_RUN_LEARNING_RATE,
        SHORT_RUN_STEPS,
        LEARNING_RATE,
      )
    optimizer = adam(learning_rate)
    if (
      epitome_learning_rate is not None
      and epitome_learning_rate != learning_rate
      and epitome_variables(student)
    ):
      epitome_optimizer = adam(epitome_learning_rate)
  distiller = Distiller(
    student,
    teacher,
    temperature,
    alpha,
    from_logits,
    epitome_optimizer=epitome_optimizer,
  )
  has_labels = isinstance(data, (tuple, list)) and len(data) >= 2
  if isinstance(data, tf.data.Dataset):
    has_labels = isinstance(data.element_spec, tuple) and len(data.element_spec) >= 2
  distiller._has_labels = has_labels  # pylint: disable=protected-access
  distiller.compile(optimizer=optimizer)
  kwargs = dict(
    epochs=epochs,
    verbose=verbose,
    callbacks=_with_pruning_step(student, callbacks),
    validation_data=validation_data,
  )
  if isinstance(data, tf.data.Dataset):
    return distiller.fit(data, **kwargs)
  x, y = distill_common.split_xy(data)
  return distiller.fit(x, y, batch_size=batch_size, shuffle=True, **kwargs)
