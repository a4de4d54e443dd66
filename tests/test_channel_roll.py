"""Regression tests for the 1D accuracy gap of issue 9: repeated output chunks.

With the separable routing map of DESIGN.md section 1 alone, output chunk
``b`` reads ``E[.., (u + p_a) mod Cin_E, (v + q_b) mod Cout_E]``: the same
``Cout_E`` filters in every chunk, only permuted, for any integer routing map.
The kernel has rank at most ``Cout_E`` and the layer is a thin layer whose
outputs are copied, which cost 8-10 points on FSDD at 16x. The layers now roll
the epitome's input channels by ``b * channel_roll`` per output chunk
(default 1), a static pattern that costs no storage. These tests check that
the output chunks are distinct, the sampled values against a loop written
from the formula, the gradients, and every form that reads the geometry.
"""

import os

import numpy as np
import oracle
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import factored, sampling

keras = ke.keras


def _oracle(e, routing, g):
  """``K[s, a*Ci+u, b*Co+v] = E~[s + sig_b, (u + p_a + r_b) % Ci, (v + q_b) % Co]``.

  Written from the formula (independent of the package's NumPy loop).
  """
  e = np.asarray(e, np.float64)
  k = np.zeros(g.kernel_shape)

  def taps(o, pos, size):
    n = int(np.floor(o))
    f = o - n
    return [((pos + n) % size, 1 - f), ((pos + n + 1) % size, f)]

  def sp_taps(o, s, slack):
    if slack == 0:
      return [(s, 1.0)]
    o = min(max(o, 0.0), slack)
    n = min(int(np.floor(o)), slack - 1)
    return [(s + n, 1 - (o - n)), (s + n + 1, o - n)]

  for idx in np.ndindex(*g.kernel_shape):
    *s, ci, co = idx
    a, u = divmod(ci, g.cin_e)
    b, v = divmod(co, g.cout_e)
    r = (b * g.channel_roll) % g.cin_e
    total = 0.0
    spatial = [
      sp_taps(float(routing.spatial_offsets[b][d]), s[d], g.slack[d])
      for d in range(g.rank)
    ]
    for combo in np.ndindex(*[len(t) for t in spatial]) if g.rank else [()]:
      w_s = np.prod([spatial[d][c][1] for d, c in enumerate(combo)]) if g.rank else 1
      pos = tuple(spatial[d][c][0] for d, c in enumerate(combo))
      for ii, wi in taps(float(routing.in_offsets[a]), u + r, g.cin_e):
        for oo, wo in taps(float(routing.out_offsets[b]), v, g.cout_e):
          total += w_s * wi * wo * e[pos + (ii, oo)]
    k[idx] = total
  return k


CASES = (
  ("conv1d_16x_partial", (3, 32, 64), (3, 11, 11), 1),
  ("conv1d_slack_stride2", (3, 4, 9), (5, 3, 2), 2),
  ("conv2d_partial", (3, 3, 10, 7), (4, 3, 4, 3), 1),
  ("dense_more_chunks_than_rolls", (5, 7), (2, 3), 1),
)


def _routing(g, rng, integer=False):
  r = sampling.RoutingMap(
    rng.uniform(-3, 2 * g.cin_e, g.num_in_chunks),
    rng.uniform(-3, 2 * g.cout_e, g.num_out_chunks),
    rng.uniform(-0.5, 1.5, (g.num_out_chunks, g.rank)) * np.asarray(g.slack, float),
  )
  return sampling.RoutingMap(*(np.floor(x) for x in r)) if integer else r


class ChannelRollSamplingTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(*CASES)
  def test_every_sampler_matches_the_formula(self, kernel_shape, epitome_shape, roll):
    g = sampling.EpitomeGeometry(kernel_shape, epitome_shape, channel_roll=roll)
    rng = np.random.default_rng(0)
    e = rng.standard_normal(epitome_shape)
    routing = _routing(g, rng)
    want = _oracle(e, routing, g)
    got = sampling.sample_kernel(
      tf.constant(e),
      tf.constant(routing.in_offsets),
      tf.constant(routing.out_offsets),
      tf.constant(routing.spatial_offsets) if g.slack_axes else None,
      g,
    )
    self.assertAllClose(got, want, atol=1e-12)
    self.assertAllClose(oracle.sample_kernel(e, routing, g), want, atol=1e-12)
    frozen = sampling.sample_kernel_frozen(tf.constant(e), routing, g)
    self.assertAllClose(frozen, want, atol=1e-12)

  @parameterized.named_parameters(*CASES)
  def test_gradients_match_finite_differences(self, kernel_shape, epitome_shape, roll):
    g = sampling.EpitomeGeometry(kernel_shape, epitome_shape, channel_roll=roll)
    rng = np.random.default_rng(1)
    e = rng.standard_normal(epitome_shape)
    in_o = rng.integers(-3, 3, g.num_in_chunks) + rng.uniform(0.2, 0.8, g.num_in_chunks)
    out_o = rng.integers(-3, 3, g.num_out_chunks) + rng.uniform(
      0.2, 0.8, g.num_out_chunks
    )
    dk = tf.constant(rng.standard_normal(kernel_shape))
    sp = tf.constant(np.full((g.num_out_chunks, g.rank), 0.4))

    def fn(e, i, o):
      k = sampling.sample_kernel(e, i, o, sp if g.slack_axes else None, g)
      return tf.reduce_sum(k * dk)

    theoretical, numerical = tf.test.compute_gradient(
      fn, [tf.constant(x) for x in (e, in_o, out_o)], delta=1e-4
    )
    for t, n in zip(theoretical, numerical, strict=True):
      self.assertAllClose(t, n, atol=1e-6, rtol=1e-6)

  def test_fit_epitome_inverts_the_rolled_sampler(self):
    g = sampling.EpitomeGeometry((3, 12, 16), (3, 4, 4), channel_roll=1)
    rng = np.random.default_rng(2)
    e = rng.standard_normal(g.epitome_shape)
    routing = _routing(g, rng, integer=True)
    kernel = oracle.sample_kernel(e, routing, g)
    self.assertAllClose(sampling.fit_epitome(kernel, routing, g), e, atol=1e-12)

  def test_windows_and_macs_count_the_rolls(self):
    g = sampling.EpitomeGeometry((3, 32, 64), (3, 8, 16), channel_roll=1)
    routing = sampling.fixed_routing(g)
    windows, of_chunk = sampling.epitome_windows(np.ones(g.epitome_shape), routing, g)
    self.assertEqual(windows.shape[0], 4)  # B = 4 rolls 0..3
    self.assertEqual(list(of_chunk), [0, 1, 2, 3])
    macs = g.macs_per_position()
    self.assertEqual(macs["factored"], 3 * 8 * 16 * 4 + 2 * 4 * 8 + 2 * 64)
    g0 = sampling.EpitomeGeometry((3, 32, 64), (3, 8, 16))
    self.assertEqual(g0.macs_per_position()["factored"], 3 * 8 * 16 + 2 * 4 * 8 + 128)

  def test_bad_roll(self):
    for bad in (-1, 1.5, True):
      with self.assertRaisesRegex(ValueError, "channel_roll"):
        sampling.EpitomeGeometry((3, 4, 4), (3, 2, 2), channel_roll=bad)
    with self.assertRaisesRegex(ValueError, "EpitomeConv1D 'c'.*channel_roll.*-2"):
      ke.EpitomeConv1D(4, 3, compression=2, channel_roll=-2, name="c")


def _distinct_columns(kernel):
  cols = np.asarray(kernel).reshape(-1, kernel.shape[-1]).T
  return len({c.tobytes() for c in np.round(cols, 6)})


class OutputChunksTest(tf.test.TestCase, parameterized.TestCase):
  """The regression test that would have caught the FSDD gap."""

  @parameterized.named_parameters(
    ("conv1d", ke.EpitomeConv1D, (64, 3), (2, 40, 32)),
    ("conv2d", ke.EpitomeConv2D, (64, 3), (2, 6, 6, 32)),
    ("dense", ke.EpitomeDense, (64,), (2, 32)),
  )
  def test_default_layer_samples_distinct_filters(self, cls, args, shape):
    for sampler in ("fixed", "learned"):
      layer = cls(*args, compression=16, sampler=sampler)
      layer(tf.zeros(shape))
      g = layer.epitome_geometry
      kernel = layer.kernel.numpy()
      # Every one of the Cout filters differs from the others and, for a
      # convolution, the kernel has more than Cout_E independent filters (a
      # Dense kernel's rank stays <= Cin_E: input chunks share their rows).
      self.assertEqual(_distinct_columns(kernel), g.cout, msg=sampler)
      if g.rank:
        rank = np.linalg.matrix_rank(kernel.reshape(-1, g.cout))
        self.assertGreater(rank, g.cout_e, msg=sampler)

  def test_separable_map_repeats_filters(self):
    # The old behaviour, still available with channel_roll=0: only Cout_E
    # distinct filters, whatever the (integer) routing map.
    layer = ke.EpitomeConv1D(64, 3, compression=16, channel_roll=0)
    layer(tf.zeros((2, 40, 32)))
    g = layer.epitome_geometry
    kernel = layer.kernel.numpy()
    self.assertEqual(_distinct_columns(kernel), g.cout_e)
    self.assertLessEqual(np.linalg.matrix_rank(kernel.reshape(-1, g.cout)), g.cout_e)

  def test_config_round_trip_and_old_configs(self):
    layer = ke.EpitomeConv1D(16, 3, compression=4, channel_roll=3)
    layer(tf.zeros((1, 8, 16)))
    config = layer.get_config()
    self.assertEqual(config["channel_roll"], 3)
    self.assertEqual(ke.EpitomeConv1D.from_config(config).channel_roll, 3)
    del config["channel_roll"]  # saved before the option existed: separable
    self.assertEqual(ke.EpitomeConv1D.from_config(config).channel_roll, 0)
    self.assertEqual(ke.EpitomeConv1D(16, 3, compression=4).channel_roll, 1)

  def test_saved_model_keeps_the_kernel(self):
    inputs = keras.Input((12, 8))
    layer = ke.EpitomeConv1D(12, 3, compression=4, name="epi")
    model = keras.Model(inputs, layer(inputs))
    path = os.path.join(self.get_temp_dir(), "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(loaded.get_layer("epi").kernel, layer.kernel)


class FactoredRollTest(tf.test.TestCase):
  def test_factored_form_stores_the_epitome_once(self):
    inputs = keras.Input((6, 6, 32))
    layer = ke.EpitomeConv2D(64, 3, padding="same", compression=16, name="epi")
    model = keras.Model(inputs, layer(inputs))
    g = layer.epitome_geometry
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 32)).astype(np.float32)
    for remix in factored.FORMS:
      fast = ke.factorize(model, remix=remix)
      f = fast.get_layer("epi")
      windows = len(set(g.in_rolls.tolist()))
      if remix == "slices":  # one stored epitome, rolled activations
        self.assertEqual(f.window_rolls, sorted(set(g.in_rolls.tolist())))
        self.assertEqual(tuple(f.kernel.shape), g.epitome_shape)
      elif remix == "matmul":  # one convolution over the stored rolled windows
        self.assertIsNone(f.window_rolls)
        self.assertEqual(f.kernel.shape[-1], windows * g.cout_e)
      else:  # R_out folded: one (*S, Cin_E, Cout) kernel, no output remix
        self.assertIsNone(f.window_rolls)
        self.assertEqual(tuple(f.kernel.shape), g.spatial + (g.cin_e, g.cout))
        self.assertIsNone(getattr(f, "out_matrix", None))
        self.assertIsNone(f.out_weights)
      # every output chunk's own epitome convolution (the last one partial)
      chunk_channels = g.cout if remix.startswith("fold_") else windows * g.cout_e
      self.assertGreaterEqual(f.macs_per_position(), 9 * g.cin_e * chunk_channels)
      y = model(x, training=False).numpy()
      self.assertAllClose(fast(x), y, atol=1e-5 * np.abs(y).max())
      again = type(f).from_config(f.get_config())
      again.build(x.shape)
      again.set_weights(f.get_weights())
      self.assertAllClose(again(x), fast(x), atol=1e-6)

  def test_exported_rolls_take_one_slice_each(self):
    # The rolled windows read one copy of the activations concatenated with
    # themselves: one STRIDED_SLICE per non-zero roll (before: two slices and
    # a concat per roll); the rolls are stacked on the batch axis and run as
    # one convolution, whose output is split back per roll.
    inputs = keras.Input((6, 6, 32))
    layer = ke.EpitomeConv2D(64, 3, padding="same", compression=16, name="epi")
    model = keras.Model(inputs, layer(inputs))
    f = ke.factorize(model, remix="slices").get_layer("epi")
    rolled = sum(1 for r in f.window_rolls if r % layer.epitome_geometry.cin_e)
    self.assertGreater(rolled, 1)
    report = ke.tflite_tensor_report(ke.export_tflite(model, remix="slices"))
    ops = [op["name"] for op in report["ops"]]
    self.assertEqual(ops.count("CONV_2D"), 1)
    self.assertEqual(ops.count("SPLIT"), 1)
    # R_in: one slice per input chunk (summed); R_out: the windows' outputs
    # cut to the layer's 64 channels.
    in_chunks = f._channels.num_in_chunks  # noqa: SLF001
    out_cut = int(len(f.window_rolls) * f.epitome_shape[-1] > 64)
    self.assertEqual(ops.count("STRIDED_SLICE"), in_chunks + rolled + out_cut)
    # The activations with themselves, the stacked rolls, the windows' outputs.
    self.assertEqual(ops.count("CONCATENATION"), 3)
