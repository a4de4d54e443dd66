"""Tests for keras_epitome.calibration (data-aware epitomize) and distillation.

Forms checked: the training-time layer (``model(x)`` in inference mode), and
the stock layers' outputs they are fitted to. Data: scikit-learn's digits
(real images, held-out split for every error that is compared) and small
synthetic arrays.
"""

import os
import sys
import tempfile
from unittest import mock

import numpy as np
import oracle
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import calibration, distillation, sampling
from keras_epitome.calibration import CalibrationConfig, ExperimentalCalibration

keras = ke.keras


def _digits():
  # The examples' loader (a stratified, seeded split of scikit-learn's digits).
  examples = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
  )
  if examples not in sys.path:
    sys.path.insert(0, examples)
  import datasets

  return datasets.load_digits()


def _digits_cnn():
  x = inputs = keras.Input((8, 8, 1))
  x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="c2")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="c3")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(10, name="logits")(x)
  return keras.Model(inputs, outputs, name="digits_cnn")


class _Trained:
  """One digits CNN trained once for the whole module (a few seconds)."""

  model = None

  @classmethod
  def get(cls):
    if cls.model is None:
      keras.utils.set_random_seed(0)
      (x, y), _ = _digits()
      model = _digits_cnn()
      model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      )
      model.fit(x, y, epochs=8, batch_size=64, verbose=0)
      cls.model = model
    return cls.model


def _bn_output(model, name, x):
  probe = keras.Model(model.inputs, model.get_layer(name).output)
  return probe.predict(x, verbose=0)


class DataAwareFitTest(tf.test.TestCase, parameterized.TestCase):
  def test_output_error_below_weight_fit_on_held_out_digits(self):
    teacher = _Trained.get()
    (x, _), (x_test, _) = _digits()
    weight = ke.epitomize(teacher, 4, init="fit", verbose=False)
    data = ke.epitomize(teacher, 4, calibration_data=x[:300], verbose=False)
    names = [c.name for c in data.epitome_report.converted]
    self.assertEqual(names, ["c2", "c3"])
    for c in data.epitome_report.converted:
      self.assertEqual(c.init, "data")
      self.assertLess(c.output_error, c.weight_fit_output_error)
    # Measured independently, on images the fit did not see: the output of
    # the BatchNorm after c2 (what the next layers see; c2's inputs are the
    # same in all three models, c1 is not converted), the data-aware model's
    # channels taken in the order it reports.
    ref = _bn_output(teacher, "bn2", x_test)
    err_weight = np.linalg.norm(_bn_output(weight, "bn2", x_test) - ref)
    # With the default channel roll the output chunks are distinct filters
    # and the channels keep their order (grouping is for channel_roll=0).
    order = data.epitome_report.calibration[0].output_order or list(range(32))
    self.assertEqual(sorted(order), list(range(32)))
    err_data = np.linalg.norm(_bn_output(data, "bn2", x_test) - ref[..., order])
    self.assertLess(err_data, 0.9 * err_weight)
    # And the whole network: closer to the teacher's logits than the weight fit.
    t = teacher.predict(x_test, verbose=0)
    d_weight = np.abs(weight.predict(x_test, verbose=0) - t).mean()
    d_data = np.abs(data.predict(x_test, verbose=0) - t).mean()
    self.assertLess(d_data, d_weight)

  def test_finds_the_routing_map_of_an_exact_epitome(self):
    # The teacher's kernel is itself sampled from an epitome with a shuffled
    # integer routing map: the data-aware fit must reproduce it (up to the
    # epitome's channel relabelling), the weight fit from the default map not.
    rng = np.random.default_rng(0)
    # channel_roll=0: output chunks share filters, so channel matching finds
    # the shuffled map; with a roll, chunks are distinct filters.
    g = sampling.EpitomeGeometry((3, 32, 24), (3, 8, 6), channel_roll=0)
    routing = sampling.RoutingMap(
      np.array([0, 3, 5, 6], np.float32),
      np.array([0, 2, 5, 1], np.float32),
      np.zeros((4, 1), np.float32),
    )
    epitome = rng.normal(size=g.epitome_shape).astype("float32")
    kernel = oracle.sample_kernel(epitome, routing, g).astype("float32")
    teacher = keras.Sequential(
      [keras.Input((10, 32)), keras.layers.Conv1D(24, 3, padding="causal", name="c")]
    )
    teacher.get_layer("c").kernel.assign(kernel)
    x = rng.normal(size=(64, 10, 32)).astype("float32")
    small = ke.epitomize(
      teacher,
      policy={"c": {"epitome_shape": (3, 8, 6), "channel_roll": 0}},
      calibration_data=x,
      calibration=CalibrationConfig(
        ridge=1e-6, experimental=ExperimentalCalibration(search=True)
      ),
      verbose=False,
    )
    record = small.epitome_report.converted[0]
    self.assertLess(record.output_error, 1e-3)
    self.assertGreater(record.weight_fit_output_error, 0.3)
    self.assertAllClose(small(x), teacher(x), atol=1e-3)

  def test_fixed_sampler_keeps_its_routing_map(self):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    data = ke.epitomize(
      teacher, 4, sampler="fixed", calibration_data=x[:128], verbose=False
    )
    layer = data.get_layer("c3")
    fixed = sampling.fixed_routing(layer.epitome_geometry)
    self.assertAllEqual(layer.routing_map.in_offsets, fixed.in_offsets)
    self.assertAllEqual(layer.routing_map.out_offsets, fixed.out_offsets)
    for c in data.epitome_report.calibration:
      if c.name in ("c2", "c3"):
        self.assertFalse(c.routing_searched)  # fixed sampler: never searched

  def test_dataset_and_arrays_give_the_same_model(self):
    teacher = _Trained.get()
    (x, y), _ = _digits()
    a = ke.epitomize(teacher, 4, calibration_data=x[:96], verbose=False)
    ds = tf.data.Dataset.from_tensor_slices((x[:96], y[:96])).batch(40)
    b = ke.epitomize(teacher, 4, calibration_data=ds, verbose=False)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
      self.assertAllClose(wa, wb, atol=1e-5)

  def test_samples_beyond_max_samples_are_reported_not_silently_dropped(self):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    options = CalibrationConfig(max_samples=64)
    with self.assertNoLogs("absl", "WARNING"):
      first = ke.epitomize(
        teacher, 4, calibration_data=x[:64], calibration=options, verbose=False
      )
    with self.assertLogs("absl", "WARNING") as logs:
      cut = ke.epitomize(
        teacher, 4, calibration_data=x[:96], calibration=options, verbose=False
      )
    self.assertRegex(
      "\n".join(logs.output), "digits_cnn.*first 64 of 96 samples.*max_samples=64"
    )
    for wa, wb in zip(first.get_weights(), cut.get_weights(), strict=True):
      self.assertAllClose(wa, wb, atol=1e-5)  # what is kept is the first 64
    for batch, total in ((48, "96"), (40, "more than 80"), (32, "more than 64")):
      ds = tf.data.Dataset.from_tensor_slices(x[:96]).batch(batch)
      with self.assertLogs("absl", "WARNING") as logs:
        ke.epitomize(
          teacher, 4, calibration_data=ds, calibration=options, verbose=False
        )
      self.assertRegex(
        "\n".join(logs.output), f"digits_cnn.*first 64 of {total} samples"
      )
    exact = tf.data.Dataset.from_tensor_slices(x[:64]).batch(32)
    with self.assertNoLogs("absl", "WARNING"):
      ke.epitomize(
        teacher, 4, calibration_data=exact, calibration=options, verbose=False
      )

  @parameterized.parameters("keras", "h5")
  def test_saved_and_loaded_model_is_identical(self, fmt):
    teacher = _Trained.get()
    (x, _), (x_test, _) = _digits()
    data = ke.epitomize(teacher, 4, calibration_data=x[:128], verbose=False)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, f"m.{fmt}")
      data.save(path)
      loaded = keras.models.load_model(path)
    self.assertEqual(
      [type(la).__name__ for la in loaded.layers],
      [type(la).__name__ for la in data.layers],
    )
    for wa, wb in zip(data.get_weights(), loaded.get_weights(), strict=True):
      self.assertAllEqual(wa, wb)
    self.assertAllEqual(
      data.predict(x_test, verbose=0), loaded.predict(x_test, verbose=0)
    )

  @parameterized.named_parameters(
    ("wrong_shape", np.zeros((8, 8, 9, 1), "float32"), "shape \\(8, 9, 1\\)"),
    ("wrong_rank", np.zeros((8, 64), "float32"), "inputs of shape"),
    ("empty", np.zeros((0, 8, 8, 1), "float32"), "is empty"),
    ("nan", np.full((4, 8, 8, 1), np.nan, "float32"), "non-finite"),
    ("strings", np.array([["a"]]), "dtype"),
  )
  def test_bad_calibration_data(self, data, message):
    teacher = _Trained.get()
    with self.assertRaisesRegex(ValueError, f"digits_cnn.*{message}"):
      ke.epitomize(teacher, 4, calibration_data=data, verbose=False)

  def test_bad_calibration_dataset(self):
    teacher = _Trained.get()
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 8, 8, 1), "float32"))
    with self.assertRaisesRegex(ValueError, "digits_cnn.*empty dataset"):
      ke.epitomize(teacher, 4, calibration_data=empty, verbose=False)
    nan = tf.data.Dataset.from_tensor_slices(np.full((4, 8, 8, 1), np.inf, "float32"))
    with self.assertRaisesRegex(ValueError, "non-finite"):
      ke.epitomize(teacher, 4, calibration_data=nan.batch(2), verbose=False)

  def test_calibration_needs_a_built_model_and_fit_init(self):
    teacher = _Trained.get()
    x = np.zeros((4, 8, 8, 1), "float32")
    with self.assertRaisesRegex(ValueError, "init='random'"):
      ke.epitomize(teacher, 4, init="random", calibration_data=x, verbose=False)
    with self.assertRaisesRegex(ValueError, "config must be a CalibrationConfig"):
      ke.calibrate(ke.epitomize(teacher, 4, verbose=False), teacher, x, dict(ridge=1))


def _bn_input(model, name, x):
  return keras.Model(model.inputs, model.get_layer(name).input).predict(x, verbose=0)


def _layer_output(model, name, x):
  return keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0)


def _least_squares_and(options):
  """The 4x data-aware conversion on 256 digits: least squares only, and with ``options``.

  ``options``: a :class:`CalibrationConfig`.
  """
  teacher = _Trained.get()
  (x, _), _ = _digits()
  return [
    ke.epitomize(teacher, 4, calibration_data=x[:256], calibration=o, verbose=False)
    for o in (None, options)
  ]


class RestandardizeTest(tf.test.TestCase):
  """Moving statistics re-estimated from data, the inference function kept."""

  def _model(self):
    x = inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(5, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(name="full")(x)
    x = keras.layers.BatchNormalization(scale=False, name="no_scale")(x)
    x = keras.layers.BatchNormalization(center=False, name="no_center")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    for bn in model.layers[2:]:
      bn.set_weights(
        [rng.uniform(0.5, 2.0, w.shape).astype("float32") for w in bn.get_weights()]
      )
    return model

  def test_statistics_follow_the_data_and_the_function_stays(self):
    model = self._model()
    x = np.random.default_rng(1).normal(3.0, 2.0, (40, 6, 6, 3)).astype("float32")
    before = model(x, training=False).numpy()
    old = {bn.name: [w.copy() for w in bn.get_weights()] for bn in model.layers[2:]}
    shift = calibration.restandardize_batchnorms(model, model.layers[2:], x, 16)
    self.assertAllClose(model(x, training=False).numpy(), before, rtol=1e-4, atol=1e-4)
    self.assertGreater(shift, 0.1)
    for bn in model.layers[2:]:
      a = _bn_input(model, bn.name, x).reshape(-1, 5).astype(np.float64)
      mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
      # A BatchNorm without an offset cannot move its mean, one without a
      # scale its variance, without changing the function.
      if bn.center:
        self.assertAllClose(mean, a.mean(0), rtol=1e-4, atol=1e-4)
      else:
        self.assertAllEqual(mean, old[bn.name][-2])
      if bn.scale:
        self.assertAllClose(var, a.var(0), rtol=1e-4, atol=1e-4)
      else:
        self.assertAllEqual(var, old[bn.name][-1])

  def test_no_batchnorms_is_a_no_op(self):
    model = self._model()
    self.assertEqual(calibration.restandardize_batchnorms(model, [], None, 16), 0.0)


class ReconstructionTest(tf.test.TestCase, parameterized.TestCase):
  """``reconstruct_steps`` / ``output_steps``: gradient steps after the fit."""

  def test_block_reconstruction_lowers_held_out_block_error(self):
    teacher = _Trained.get()
    _, (x_test, _) = _digits()
    ls, rec = _least_squares_and(
      CalibrationConfig(
        learning_rate=3e-3,
        experimental=ExperimentalCalibration(reconstruct_steps=150),
      )
    )
    records = {c.name: c for c in rec.epitome_report.calibration}
    # c2's block is c2 -> bn2 -> ReLU (it stops before the pooling); c3
    # carries its own ReLU and feeds the pooling: its block is c3 alone.
    relu = teacher.get_layer("bn2")._outbound_nodes[0].outbound_layer.name
    self.assertEqual(records["c2"].reconstructed_to, relu)
    self.assertEqual(records["c3"].reconstructed_to, "c3")
    for name in ("c2", "c3"):
      r = records[name]
      self.assertLess(r.block_error, r.block_error_before)
    # c2's least-squares fit (its inputs come from the stock c1) is the same
    # with or without the option; c3's inputs are the reconstructed block's.
    self.assertAllClose(
      records["c2"].output_error, ls.epitome_report.calibration[0].output_error
    )
    # Measured independently, on images the fit did not see: the block
    # outputs (post-activation) are closer to the teacher's.
    for name in (relu, "c3"):
      ref = _layer_output(teacher, name, x_test)
      err_ls = np.linalg.norm(_layer_output(ls, name, x_test) - ref)
      err_rec = np.linalg.norm(_layer_output(rec, name, x_test) - ref)
      self.assertLess(err_rec, 0.97 * err_ls, name)

  def test_output_matching_lowers_held_out_logit_error(self):
    teacher = _Trained.get()
    _, (x_test, _) = _digits()
    ls, rec = _least_squares_and(CalibrationConfig(output_steps=150))
    last = rec.epitome_report.calibration[-3]  # then "(batchnorm)", "(check)"
    self.assertEqual(last.name, "digits_cnn (output)")
    self.assertLess(last.block_error, last.block_error_before)
    t = teacher.predict(x_test, verbose=0)
    d_ls = np.abs(ls.predict(x_test, verbose=0) - t).mean()
    d_rec = np.abs(rec.predict(x_test, verbose=0) - t).mean()
    self.assertLess(d_rec, 0.98 * d_ls)

  def test_a_reconstruction_that_does_not_help_is_undone(self):
    # A learning rate far too large makes every step worse: the least-squares
    # weights must come back unchanged.
    teacher = _Trained.get()
    (x, _), _ = _digits()
    ls = ke.epitomize(teacher, 4, calibration_data=x[:128], verbose=False)
    bad = ke.epitomize(
      teacher,
      4,
      calibration_data=x[:128],
      calibration=CalibrationConfig(
        output_steps=5,
        learning_rate=1e4,
        experimental=ExperimentalCalibration(reconstruct_steps=5),
      ),
      verbose=False,
    )
    for r in bad.epitome_report.calibration:
      if r.block_error_before is not None:
        self.assertEqual(r.block_error, r.block_error_before, r.name)
    for wa, wb in zip(ls.get_weights(), bad.get_weights(), strict=True):
      self.assertAllClose(wa, wb, atol=1e-6)

  def test_batchnorm_statistics_describe_the_matched_model(self):
    # The output matching runs BatchNorm in inference mode and changes the
    # layers before it; training (fit, distill) then normalizes with batch
    # statistics. The moving statistics must be those of the matched model's
    # activations, and the function must not change when they are used.
    teacher = _Trained.get()
    (x, _), (x_test, _) = _digits()
    cal = x[:256]
    model = ke.epitomize(
      teacher,
      4,
      calibration_data=cal,
      calibration=CalibrationConfig(output_steps=150),
      verbose=False,
    )
    last = model.epitome_report.calibration[-2]
    self.assertEqual(last.name, "digits_cnn (batchnorm)")
    self.assertIn("1 BatchNormalization layer(s)", last.note)
    self.assertIn(
      "digits_cnn (batchnorm): moving statistics", str(model.epitome_report)
    )
    bn = model.get_layer("bn2")  # the one BatchNorm after the first epitome layer (c2)
    a = _bn_input(model, "bn2", cal).reshape(-1, 32).astype(np.float64)
    self.assertAllClose(bn.moving_mean.numpy(), a.mean(0), rtol=1e-4, atol=1e-5)
    self.assertAllClose(bn.moving_variance.numpy(), a.var(0), rtol=1e-4, atol=1e-5)
    # Batch statistics of the whole calibration set = the moving ones: the
    # same outputs in training mode as in inference mode (on a copy: a
    # training-mode call moves the statistics; bn1, the trained model's,
    # frozen: a frozen BatchNorm runs in inference mode).
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.get_layer("bn1").trainable = False
    self.assertAllClose(
      copy(cal, training=True).numpy(), model(cal, training=False).numpy(), atol=1e-3
    )
    # bn1 is before the first epitome layer: the trained model's, untouched.
    bn1 = model.get_layer("bn1").get_weights()
    for w, t in zip(bn1, teacher.get_layer("bn1").get_weights(), strict=True):
      self.assertAllEqual(w, t)
    # Re-estimating the statistics kept the function the matching reached.
    record = model.epitome_report.calibration[-3]
    self.assertEqual(record.name, "digits_cnn (output)")
    self.assertLess(record.block_error, record.block_error_before)
    self.assertAllClose(
      calibration.relative_error(model, cal, teacher.predict(cal, verbose=0), 64),
      record.block_error,
      rtol=1e-4,
    )

  @parameterized.parameters("keras", "h5")
  def test_reconstructed_model_saves_and_loads(self, fmt):
    teacher = _Trained.get()
    (x, _), (x_test, _) = _digits()
    data = ke.epitomize(
      teacher,
      4,
      calibration_data=x[:128],
      calibration=CalibrationConfig(
        output_steps=20, experimental=ExperimentalCalibration(reconstruct_steps=20)
      ),
      verbose=False,
    )
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, f"m.{fmt}")
      data.save(path)
      loaded = keras.models.load_model(path)
    self.assertAllEqual(
      data.predict(x_test, verbose=0), loaded.predict(x_test, verbose=0)
    )

  def test_numpy_learning_rate_is_taken_like_a_float(self):
    teacher = _Trained.get()
    (x, _), _ = _digits()
    a, b = (
      ke.epitomize(
        teacher,
        4,
        calibration_data=x[:64],
        calibration=CalibrationConfig(output_steps=3, learning_rate=lr),
        verbose=False,
      )
      for lr in (np.float32(2e-3), 2e-3)
    )
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
      self.assertAllClose(wa, wb, atol=1e-6)


class PatchesTest(tf.test.TestCase, parameterized.TestCase):
  """``layer_patches(x) @ kernel`` is the layer's linear map."""

  @parameterized.named_parameters(
    (
      "conv2d_same_strided",
      keras.layers.Conv2D(5, 3, strides=2, padding="same"),
      (2, 9, 7, 3),
    ),
    ("conv2d_valid_dilated", keras.layers.Conv2D(5, 3, dilation_rate=2), (2, 9, 9, 3)),
    (
      "conv1d_causal_dilated",
      keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2),
      (2, 11, 3),
    ),
    (
      "conv1d_same_strided",
      keras.layers.Conv1D(4, 5, strides=2, padding="same"),
      (2, 12, 3),
    ),
    ("dense_3d", keras.layers.Dense(6), (2, 5, 7)),
  )
  def test_matches_the_layer(self, layer, shape):
    x = tf.random.stateless_normal(shape, seed=[1, 2])
    y = layer(x) - layer.bias
    k = tf.reshape(layer.kernel, [-1, layer.kernel.shape[-1]])
    got = tf.matmul(calibration.layer_patches(layer, x), k)
    self.assertAllClose(got, tf.reshape(y, [-1, y.shape[-1]]), atol=1e-5)


class DistillTest(tf.test.TestCase):
  def test_improves_agreement_with_the_teacher(self):
    teacher = _Trained.get()
    (x, y), (x_test, _) = _digits()
    keras.utils.set_random_seed(1)
    student = ke.epitomize(teacher, 4, init="fit", verbose=False)
    t = np.argmax(teacher.predict(x_test, verbose=0), -1)

    def agreement():
      return np.mean(np.argmax(student.predict(x_test, verbose=0), -1) == t)

    before = agreement()
    history = ke.distill(
      student, teacher, x, epochs=3, learning_rate=3e-3, batch_size=64, verbose=0
    )
    after = agreement()
    self.assertEqual(len(history.history["loss"]), 3)
    self.assertLess(history.history["loss"][-1], history.history["loss"][0])
    self.assertGreater(after, before + 0.2)
    self.assertGreater(after, 0.8)

  def test_labels_and_datasets(self):
    teacher = _Trained.get()
    (x, y), _ = _digits()
    student = ke.epitomize(teacher, 2, calibration_data=x[:128], verbose=False)
    ds = tf.data.Dataset.from_tensor_slices((x[:256], y[:256])).batch(64)
    h = ke.distill(student, teacher, ds, alpha=0.5, verbose=0)
    self.assertEqual(sorted(h.history), ["accuracy", "agreement", "loss"])
    h = ke.distill(
      student,
      teacher,
      (x[:256], y[:256]),
      validation_data=(x[256:320], y[256:320]),
      verbose=0,
    )
    self.assertIn("val_agreement", h.history)

  def test_epitome_learning_rate_drives_only_the_epitomes(self):
    teacher = keras.Sequential(
      [
        keras.Input((16,)),
        keras.layers.Dense(32, name="d1"),
        keras.layers.Dense(4, name="d2"),
      ]
    )
    student = ke.epitomize(teacher, 4, min_params=0, verbose=False)
    epitomes = distillation.epitome_variables(student)
    self.assertEqual(sorted(v.name for v in epitomes), ["d1/epitome:0", "d2/epitome:0"])
    others = [v for v in student.trainable_variables if "epitome" not in v.name]
    self.assertNotEmpty(others)
    x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")

    def moved(**kwargs):
      before = [v.numpy().copy() for v in epitomes + others]
      ke.distill(student, teacher, x, batch_size=32, verbose=0, **kwargs)
      after = [v.numpy() for v in epitomes + others]
      steps = [np.max(np.abs(a - b)) for a, b in zip(after, before, strict=True)]
      return max(steps[: len(epitomes)]), max(steps[len(epitomes) :])

    # One Adam step moves each variable by about its learning rate.
    e, o = moved(learning_rate=1e-7, epitome_learning_rate=1e-2)
    self.assertGreater(e, 1e-3)
    self.assertLess(o, 1e-5)
    e, o = moved(learning_rate=1e-2, epitome_learning_rate=1e-7)
    self.assertLess(e, 1e-5)
    self.assertGreater(o, 1e-3)
    # Nested: the inner model's epitomes are found too.
    outer = keras.Sequential([keras.Input((16,)), student])
    self.assertLen(distillation.epitome_variables(outer), 2)

  def _learning_rates(self, data, **kwargs):
    """The Adam learning rate at each step of a ``distill`` run."""
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    rates = []

    class Record(keras.callbacks.Callback):
      def on_train_batch_end(self, batch, logs=None):
        # The rate of the step just taken.
        rates.append(float(self.model.optimizer.learning_rate))

    ke.distill(student, teacher, data, callbacks=[Record()], verbose=0, **kwargs)
    return np.array(rates)

  def test_warmup_then_cosine_decay(self):
    x = np.random.default_rng(0).normal(size=(80, 8)).astype("float32")
    # 80 samples, batch 8, 2 epochs: 20 steps; 5 of linear warmup.
    lr = self._learning_rates(
      x, epochs=2, batch_size=8, learning_rate=1e-2, warmup=0.25
    )
    self.assertLen(lr, 20)
    self.assertAllClose(lr[:6], [0.0, 2e-3, 4e-3, 6e-3, 8e-3, 1e-2], atol=1e-7)
    self.assertTrue(np.all(np.diff(lr[5:]) < 0))
    self.assertLess(lr[-1], 1e-3)
    # No warmup: the cosine starts at the peak.
    lr = self._learning_rates(x, epochs=2, batch_size=8, learning_rate=1e-2)
    self.assertAllClose(lr[0], 1e-2)
    self.assertTrue(np.all(np.diff(lr) < 0))

  def test_dataset_of_known_length_gets_the_schedule(self):
    x = np.random.default_rng(0).normal(size=(80, 8)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)  # 10 batches
    lr = self._learning_rates(ds, epochs=1, learning_rate=1e-2, warmup=0.2)
    self.assertAllClose(lr[:3], [0.0, 5e-3, 1e-2], atol=1e-7)
    self.assertLess(lr[-1], 1e-3)
    # Unknown length: constant rate, and a warmup is refused.
    unknown = ds.filter(lambda b: True)
    lr = self._learning_rates(unknown, epochs=1, learning_rate=1e-2)
    self.assertAllClose(lr, np.full(10, 1e-2))
    with self.assertRaisesRegex(ValueError, "warmup needs the number of steps"):
      self._learning_rates(unknown, warmup=0.1)

  def test_default_rate_follows_the_length_of_the_run(self):
    x = np.random.default_rng(0).normal(size=(80, 8)).astype("float32")
    # 80 samples, batch 8: 10 steps an epoch. Short runs start at 1e-3.
    # The choice is logged (absl info; patched: other tests set the verbosity).
    with mock.patch.object(distillation.logging, "info") as info:
      lr = self._learning_rates(x, epochs=2, batch_size=8)
    self.assertAllClose(lr[0], distillation.SHORT_RUN_LEARNING_RATE)
    message = info.call_args.args[0] % info.call_args.args[1:]
    self.assertIn("20 steps, peak learning rate 0.001", message)
    # 300 steps and more: the long-run rate, cosine-decayed over the run.
    lr = self._learning_rates(x, epochs=30, batch_size=8)
    self.assertLen(lr, 300)
    self.assertAllClose(lr[0], distillation.LEARNING_RATE)
    self.assertLess(lr[-1], 1e-5)
    lr = self._learning_rates(x, epochs=29, batch_size=8)  # 290 steps
    self.assertAllClose(lr[0], distillation.SHORT_RUN_LEARNING_RATE)
    # The same count for a dataset of known length; unknown: the low rate.
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    lr = self._learning_rates(ds, epochs=30)
    self.assertAllClose(lr[0], distillation.LEARNING_RATE)
    lr = self._learning_rates(ds.filter(lambda b: True), epochs=30)
    self.assertAllClose(lr, np.full(300, distillation.SHORT_RUN_LEARNING_RATE))
    # A rate given is the rate used, whatever the length.
    lr = self._learning_rates(x, epochs=2, batch_size=8, learning_rate=3e-3)
    self.assertAllClose(lr[0], 3e-3)

  def test_bad_arguments(self):
    teacher = _Trained.get()
    x = np.zeros((4, 8, 8, 1), "float32")
    with self.assertRaisesRegex(ValueError, "temperature"):
      ke.distill(teacher, teacher, x, temperature=0.0)
    with self.assertRaisesRegex(ValueError, "alpha"):
      ke.distill(teacher, teacher, x, alpha=2.0)
    for bad in (0.0, -1e-3, float("nan"), True, "1e-3"):
      with self.assertRaisesRegex(ValueError, "epitome_learning_rate must be"):
        ke.distill(teacher, teacher, x, epitome_learning_rate=bad)
    with self.assertRaisesRegex(ValueError, "learning_rate must be"):
      ke.distill(teacher, teacher, x, learning_rate=float("inf"))
    for bad in (-0.1, 1.0, float("nan"), True, "0.1"):
      with self.assertRaisesRegex(ValueError, "warmup must be a fraction"):
        ke.distill(teacher, teacher, x, warmup=bad)
    with self.assertRaisesRegex(ValueError, "schedule its learning rate"):
      ke.distill(teacher, teacher, x, warmup=0.1, optimizer=keras.optimizers.Adam())
    with self.assertRaisesRegex(ValueError, "leave it None"):
      ke.distill(
        teacher,
        teacher,
        x,
        epitome_learning_rate=1e-3,
        optimizer=keras.optimizers.Adam(),
      )
    other = keras.Sequential(
      [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with self.assertRaisesRegex(ValueError, "outputs shape"):
      ke.distill(other, teacher, x)


if __name__ == "__main__":
  tf.test.main()
