"""Tests for keras_epitome.sampling: the index math, its gradients and helpers.

Every check compares the training-time sampler (``sample_kernel``, gathers
under a custom gradient) with an independent reference: the NumPy loop
the NumPy oracle (tests/oracle.py) for values, and a dense pure-TF formula (interpolation
matrices and an einsum, differentiated by autodiff) for gradients.
"""

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import oracle
import tensorflow as tf
from absl.testing import parameterized

import keras_epitome as ke
from keras_epitome import sampling

_SETTINGS = dict(deadline=None, derandomize=True, print_blob=True)


# ---------------------------------------------------------------------------
# Random geometries and routing maps.


@st.composite
def geometries(draw, max_channels=7):
  rank = draw(st.integers(0, 2))
  spatial = [draw(st.integers(1, 3)) for _ in range(rank)]
  slack = [draw(st.integers(0, 2)) for _ in range(rank)]
  cin = draw(st.integers(1, max_channels))
  cout = draw(st.integers(1, max_channels))
  cin_e = draw(st.integers(1, cin))
  cout_e = draw(st.integers(1, cout))
  kernel_shape = tuple(spatial) + (cin, cout)
  epitome_shape = tuple(s + d for s, d in zip(spatial, slack, strict=True)) + (
    cin_e,
    cout_e,
  )
  return sampling.EpitomeGeometry(kernel_shape, epitome_shape)


def _channel_offset(size):
  """Integer, fractional, negative, wrap-boundary and far-out channel offsets."""
  eps = 1e-3
  return st.one_of(
    st.integers(-2 * size, 2 * size).map(float),
    st.floats(-2.0 * size, 2.0 * size, allow_nan=False, width=32),
    st.sampled_from([size - eps, float(size), -eps, size + 0.5, -0.5]),
  )


def _spatial_offset(slack):
  """Offsets inside, at the limits of, and beyond the spatial range (clipped)."""
  return st.one_of(
    st.integers(0, slack).map(float),
    st.floats(0.0, float(slack), allow_nan=False, width=32),
    st.sampled_from([0.0, float(slack), slack - 1e-3, -1.0, slack + 1.5]),
  )


@st.composite
def routings(draw, g):
  in_o = [draw(_channel_offset(g.cin_e)) for _ in range(g.num_in_chunks)]
  out_o = [draw(_channel_offset(g.cout_e)) for _ in range(g.num_out_chunks)]
  sp = [
    [draw(_spatial_offset(g.slack[d])) for d in range(g.rank)]
    for _ in range(g.num_out_chunks)
  ]
  return sampling.RoutingMap(
    np.asarray(in_o, np.float64),
    np.asarray(out_o, np.float64),
    np.asarray(sp, np.float64).reshape(g.num_out_chunks, g.rank),
  )


@st.composite
def cases(draw, max_channels=7):
  g = draw(geometries(max_channels))
  r = draw(routings(g))
  seed = draw(st.integers(0, 2**16))
  return g, r, seed


def _sample(epitome, routing, g):
  return sampling.sample_kernel(
    tf.constant(epitome),
    tf.constant(routing.in_offsets, tf.float64),
    tf.constant(routing.out_offsets, tf.float64),
    tf.constant(routing.spatial_offsets, tf.float64) if g.slack_axes else None,
    g,
  )


# ---------------------------------------------------------------------------
# Pure-TF reference: the DESIGN.md formula as dense interpolation matrices.


def _channel_matrix(offsets, size, chunk):
  """``M[c, e]``: weight of epitome channel ``e`` in kernel channel ``c``."""
  chunk_of = np.arange(size) // chunk
  pos = np.arange(size) % chunk
  o = tf.gather(offsets, chunk_of)
  n = tf.floor(o)
  f = o - n
  lo = tf.math.floormod(tf.cast(n, tf.int32) + pos, chunk)
  hi = tf.math.floormod(lo + 1, chunk)
  dtype = offsets.dtype
  return (1 - f)[:, None] * tf.one_hot(lo, chunk, dtype=dtype) + f[
    :, None
  ] * tf.one_hot(hi, chunk, dtype=dtype)


def _spatial_matrices(offsets, size, slack, dtype):
  """``M[b, s, t]``: weight of epitome tap ``t`` in kernel tap ``s`` of chunk ``b``."""
  if slack == 0:
    eye = tf.eye(size, dtype=dtype)
    return tf.broadcast_to(eye, [tf.shape(offsets)[0], size, size])
  o = tf.clip_by_value(offsets, 0.0, float(slack))
  n = tf.minimum(tf.floor(o), float(slack - 1))
  f = o - n
  lo = tf.cast(n, tf.int32)[:, None] + np.arange(size)[None]
  return (1 - f)[:, None, None] * tf.one_hot(lo, size + slack, dtype=dtype) + f[
    :, None, None
  ] * tf.one_hot(lo + 1, size + slack, dtype=dtype)


def reference_kernel_tf(epitome, in_o, out_o, sp_o, g):
  """Differentiable by autodiff; no gathers of the epitome, no custom gradient."""
  dtype = epitome.dtype
  m_in = _channel_matrix(in_o, g.cin, g.cin_e)  # (Cin, Cin_E)
  m_out = _channel_matrix(out_o, g.cout, g.cout_e)  # (Cout, Cout_E)
  chunk_of = np.arange(g.cout) // g.cout_e
  if g.rank == 0:
    return tf.einsum("ce,ow,ew->co", m_in, m_out, epitome)
  mats = []
  for d in range(g.rank):
    offs = sp_o[:, d] if sp_o is not None else tf.zeros([g.num_out_chunks], dtype)
    m = _spatial_matrices(offs, g.spatial[d], g.slack[d], dtype)
    mats.append(tf.gather(m, chunk_of))  # (Cout, S_d, S_E_d)
  if g.rank == 1:
    return tf.einsum("ce,ow,oxp,pew->xco", m_in, m_out, mats[0], epitome)
  return tf.einsum("ce,ow,oxp,oyq,pqew->xyco", m_in, m_out, mats[0], mats[1], epitome)


# ---------------------------------------------------------------------------


class SampleKernelTest(tf.test.TestCase, parameterized.TestCase):
  @hypothesis.settings(max_examples=80, **_SETTINGS)
  @hypothesis.given(cases())
  def test_matches_numpy_reference(self, case):
    g, routing, seed = case
    e = np.random.default_rng(seed).standard_normal(g.epitome_shape)
    expected = oracle.sample_kernel(e, routing, g)
    got = _sample(e, routing, g).numpy()
    self.assertEqual(got.shape, g.kernel_shape)
    self.assertAllClose(got, expected, atol=1e-12, rtol=1e-12)

  @hypothesis.settings(max_examples=30, **_SETTINGS)
  @hypothesis.given(cases())
  def test_tf_reference_matches_numpy_reference(self, case):
    # The gradient tests below rely on reference_kernel_tf; check it first.
    g, routing, seed = case
    e = np.random.default_rng(seed).standard_normal(g.epitome_shape)
    got = reference_kernel_tf(
      tf.constant(e),
      tf.constant(routing.in_offsets),
      tf.constant(routing.out_offsets),
      tf.constant(routing.spatial_offsets),
      g,
    )
    self.assertAllClose(got, oracle.sample_kernel(e, routing, g), atol=1e-12)

  @hypothesis.settings(max_examples=40, **_SETTINGS)
  @hypothesis.given(cases())
  def test_gradients_match_autodiff_of_reference(self, case):
    g, routing, seed = case
    rng = np.random.default_rng(seed)
    e = tf.constant(rng.standard_normal(g.epitome_shape))
    dk = tf.constant(rng.standard_normal(g.kernel_shape))
    args = [tf.constant(a) for a in routing]

    def grads(fn):
      with tf.GradientTape() as tape:
        tape.watch([e] + args)
        k = fn(e, *args)
        loss = tf.reduce_sum(k * dk)
      grads = tape.gradient(loss, [e] + args, unconnected_gradients="zero")
      return [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices -> dense

    got = grads(
      lambda e, i, o, s: sampling.sample_kernel(e, i, o, s if g.slack_axes else None, g)
    )
    want = grads(lambda e, i, o, s: reference_kernel_tf(e, i, o, s, g))
    for name, a, b in zip(("epitome",) + routing._fields, got, want, strict=True):
      if name == "spatial_offsets":
        # Axes without slack have no offset; the reference ignores them too.
        axes = np.asarray(g.slack_axes, np.int32)
        a = tf.gather(a, axes, axis=1)
        b = tf.gather(b, axes, axis=1)
      self.assertAllClose(a, b, atol=1e-10, rtol=1e-10, msg=name)

  @parameterized.named_parameters(
    ("dense_partial", (5, 7), (2, 3)),
    ("conv1d_slack", (3, 4, 5), (5, 3, 2)),
    ("conv2d_slack_both", (2, 3, 3, 4), (4, 4, 2, 3)),
    ("conv2d_slack_one_axis", (3, 2, 4, 3), (3, 4, 3, 2)),
  )
  def test_gradients_match_finite_differences(self, kernel_shape, epitome_shape):
    g = sampling.EpitomeGeometry(kernel_shape, epitome_shape)
    rng = np.random.default_rng(1)
    # Offsets away from integers and spatial limits: the sampler is piecewise
    # linear in the offsets, with kinks at integers.
    e = rng.standard_normal(g.epitome_shape)
    in_o = rng.integers(-3, 3, g.num_in_chunks) + rng.uniform(0.2, 0.8, g.num_in_chunks)
    out_o = rng.integers(-3, 3, g.num_out_chunks) + rng.uniform(
      0.2, 0.8, g.num_out_chunks
    )
    sp_o = rng.uniform(0.2, 0.8, (g.num_out_chunks, g.rank)) * np.maximum(
      np.asarray(g.slack, float), 1
    )
    sp_o = np.minimum(sp_o, np.maximum(np.asarray(g.slack, float) - 0.2, 0.1))
    dk = tf.constant(rng.standard_normal(g.kernel_shape))

    def fn(e, i, o, s):
      k = sampling.sample_kernel(e, i, o, s, g)
      return tf.reduce_sum(k * dk)

    theoretical, numerical = tf.test.compute_gradient(
      fn, [tf.constant(x) for x in (e, in_o, out_o, sp_o)], delta=1e-4
    )
    for t, n in zip(theoretical, numerical, strict=True):
      self.assertAllClose(t, n, atol=1e-6, rtol=1e-6)

  def test_partial_chunks_sample_the_epitome_prefix(self):
    # Cin = 5 = 2 + 2 + 1 and Cout = 7 = 3 + 3 + 1: the last chunks are partial
    # and read the first channels of the (shifted) epitome.
    g = sampling.EpitomeGeometry((5, 7), (2, 3))
    self.assertEqual((g.num_in_chunks, g.num_out_chunks), (3, 3))
    e = np.arange(6, dtype=np.float64).reshape(2, 3)
    routing = sampling.RoutingMap(
      np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, 2.0]), np.zeros((3, 0))
    )
    k = _sample(e, routing, g).numpy()
    self.assertAllEqual(k[:2, :3], e)
    self.assertAllEqual(k[2:4, 3:6], e)
    self.assertEqual(k[4, 6], e[1, 2])  # in offset 1, out offset 2

  def test_wrap_boundary_is_continuous(self):
    # Offset Cin_E - eps blends the last channel into channel 0: as eps -> 0
    # the kernel approaches the one at offset 0 (= Cin_E), with no jump.
    g = sampling.EpitomeGeometry((4, 2), (4, 2))
    e = np.random.default_rng(0).standard_normal((4, 2))
    at = lambda o: _sample(  # noqa: E731
      e, sampling.RoutingMap(np.array([o]), np.zeros(1), np.zeros((1, 0))), g
    ).numpy()
    self.assertAllClose(at(4.0 - 1e-9), at(0.0), atol=1e-8)
    self.assertAllClose(at(4.0), at(0.0), atol=0)
    self.assertAllClose(at(-1.0), at(3.0), atol=0)

  def test_spatial_limit_reads_last_window(self):
    g = sampling.EpitomeGeometry((3, 1, 1), (7, 1, 1))
    e = np.arange(7, dtype=np.float64).reshape(7, 1, 1)
    for offset, start in ((4.0, 4), (9.0, 4), (-2.0, 0), (0.0, 0)):
      routing = sampling.RoutingMap(np.zeros(1), np.zeros(1), np.array([[offset]]))
      k = _sample(e, routing, g).numpy().reshape(-1)
      self.assertAllEqual(k, np.arange(start, start + 3), msg=str(offset))
    routing = sampling.RoutingMap(np.zeros(1), np.zeros(1), np.array([[3.25]]))
    k = _sample(e, routing, g).numpy().reshape(-1)
    self.assertAllClose(k, np.arange(3, 6) + 0.25)

  @parameterized.parameters(False, True)
  def test_under_tf_function(self, jit_compile):
    g = sampling.EpitomeGeometry((3, 3, 8, 6), (4, 3, 3, 4))
    rng = np.random.default_rng(2)
    e = tf.Variable(rng.standard_normal(g.epitome_shape).astype(np.float32))
    in_o = tf.Variable(rng.uniform(0, 3, g.num_in_chunks).astype(np.float32))
    out_o = tf.Variable(rng.uniform(0, 4, g.num_out_chunks).astype(np.float32))
    sp_o = tf.Variable(rng.uniform(0, 1, (g.num_out_chunks, 2)).astype(np.float32))
    variables = [e, in_o, out_o, sp_o]

    def step():
      with tf.GradientTape() as tape:
        k = sampling.sample_kernel(e, in_o, out_o, sp_o, g)
        loss = tf.reduce_sum(tf.square(k))
      grads = tape.gradient(loss, variables)
      return k, [tf.convert_to_tensor(g) for g in grads]

    k_eager, g_eager = step()
    k_fn, g_fn = tf.function(step, jit_compile=jit_compile)()
    self.assertAllClose(k_fn, k_eager, atol=1e-5)
    for a, b in zip(g_fn, g_eager, strict=True):
      self.assertAllClose(a, b, atol=1e-4)


class GeometryTest(tf.test.TestCase, parameterized.TestCase):
  def test_derived_sizes(self):
    g = sampling.EpitomeGeometry((3, 5, 10, 7), (3, 8, 4, 3))
    self.assertEqual(g.rank, 2)
    self.assertEqual((g.cin, g.cout, g.cin_e, g.cout_e), (10, 7, 4, 3))
    self.assertEqual((g.num_in_chunks, g.num_out_chunks), (3, 3))
    self.assertEqual(g.slack, (0, 3))
    self.assertEqual(g.slack_axes, (1,))
    self.assertEqual(g.routing_size, 3 + 3 * 2)
    self.assertEqual(g.kernel_size, 3 * 5 * 10 * 7)
    self.assertEqual(g.epitome_size, 3 * 8 * 4 * 3)
    self.assertAlmostEqual(g.compression_ratio, 1050 / (288 + 9))

  @parameterized.named_parameters(
    ("rank_mismatch", (3, 4, 4), (4, 4), "rank"),
    ("zero_kernel", (0, 4, 4), (1, 4, 4), "positive"),
    ("negative_epitome", (3, 4, 4), (3, -1, 4), "positive"),
    ("spatial_too_small", (3, 4, 4), (2, 4, 4), "at least the kernel's 3"),
    ("cin_too_large", (3, 4, 4), (3, 5, 4), "input channels (5)"),
    ("cout_too_large", (3, 4, 4), (3, 4, 9), "output channels (9)"),
  )
  def test_bad_shapes(self, kernel_shape, epitome_shape, message):
    with self.assertRaisesRegex(
      ValueError, message.replace("(", r"\(").replace(")", r"\)")
    ):
      sampling.EpitomeGeometry(kernel_shape, epitome_shape)


class RatioRuleTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(
    ((3, 3, 64, 64), 4, (3, 3, 32, 32)),
    ((3, 3, 64, 64), 1, (3, 3, 64, 64)),
    ((3, 3, 16, 64), 4, (3, 3, 16, 16)),  # larger side shrinks first
    ((3, 3, 64, 16), 4, (3, 3, 16, 16)),
    ((3, 3, 16, 64), 2, (3, 3, 16, 32)),
    ((64, 16, 32), 4, (64, 11, 11)),  # both shrink, as square as possible
    ((1024, 1024), 4, (512, 512)),
    ((1024, 1024), 16, (256, 256)),
    ((10, 10), 100, (1, 1)),
  )
  def test_documented_examples(self, kernel_shape, ratio, expected):
    self.assertEqual(sampling.epitome_shape_for_ratio(kernel_shape, ratio), expected)

  @hypothesis.settings(max_examples=200, **_SETTINGS)
  @hypothesis.given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.floats(1.0, 64.0),
    st.integers(0, 2),
  )
  def test_rule(self, cin, cout, ratio, rank):
    hypothesis.assume(ratio <= cin * cout)
    kernel_shape = (3,) * rank + (cin, cout)
    shape = sampling.epitome_shape_for_ratio(kernel_shape, ratio)
    *spatial_e, cin_e, cout_e = shape
    self.assertEqual(tuple(spatial_e), kernel_shape[:-2])  # S_E = S
    self.assertBetween(cin_e, 1, cin)
    self.assertBetween(cout_e, 1, cout)
    # The epitome holds at most 1/ratio of the kernel...
    self.assertLessEqual(cin_e * cout_e, cin * cout / ratio * (1 + 1e-9))
    # ... and the larger side is never shrunk below the smaller side's share.
    small, large = sorted((cin, cout))
    small_e, large_e = (cin_e, cout_e) if cin <= cout else (cout_e, cin_e)
    if large / ratio >= small:
      self.assertEqual(small_e, small)
      self.assertEqual(large_e, math.floor(large / ratio + 1e-9))

  @parameterized.parameters(0.5, 0.0, -2.0, float("nan"), float("inf"))
  def test_bad_ratio(self, ratio):
    with self.assertRaisesRegex(ValueError, "compression"):
      sampling.epitome_shape_for_ratio((3, 3, 8, 8), ratio)

  def test_ratio_too_large(self):
    with self.assertRaisesRegex(ValueError, r"too large.*at most 64"):
      sampling.epitome_shape_for_ratio((3, 3, 8, 8), 65)


class FixedRoutingTest(tf.test.TestCase):
  def test_wsnet_1d_filters_are_shifted_windows(self):
    # WSNet: Cout_E = 1 condensed filter of length S + (Cout - 1) * stride;
    # output filter b is the window starting at b * stride.
    k, cin, cout, stride = 5, 3, 6, 2
    g = sampling.EpitomeGeometry((k, cin, cout), (k + (cout - 1) * stride, cin, 1))
    routing = sampling.fixed_routing(g, [stride])
    self.assertAllEqual(routing.spatial_offsets[:, 0], np.arange(cout) * stride)
    e = np.random.default_rng(0).standard_normal(g.epitome_shape)
    kernel = _sample(e, routing, g).numpy()
    for b in range(cout):
      # Close, not equal: the last window is read as lo + 1.0 * (hi - lo).
      self.assertAllClose(
        kernel[:, :, b], e[b * stride : b * stride + k, :, 0], atol=1e-12
      )

  def test_default_stride_spreads_evenly(self):
    g = sampling.EpitomeGeometry((3, 2, 4), (9, 2, 1))
    routing = sampling.fixed_routing(g)
    self.assertAllEqual(routing.spatial_offsets[:, 0], [0, 2, 4, 6])
    self.assertAllEqual(routing.in_offsets, [0])
    self.assertAllEqual(routing.out_offsets, [0, 0, 0, 0])

  def test_stride_does_not_fit(self):
    g = sampling.EpitomeGeometry((3, 2, 4), (9, 2, 1))
    with self.assertRaisesRegex(ValueError, r"stride 3 .*6 <= S_E - S = 6|stride 3"):
      sampling.fixed_routing(g, [3])  # 3 * 3 = 9 > 6
    with self.assertRaisesRegex(ValueError, r"use a stride <= 2"):
      sampling.fixed_routing(g, [3])
    with self.assertRaisesRegex(ValueError, ">= 0"):
      sampling.fixed_routing(g, [-1])


class FitEpitomeTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("dense", (6, 9), (4, 3), None),
    ("conv1d_strided", (3, 4, 5), (7, 2, 1), [1]),
    ("conv2d", (3, 3, 6, 4), (3, 3, 4, 4), None),
  )
  def test_recovers_epitome_from_its_kernel(self, kernel_shape, epitome_shape, stride):
    g = sampling.EpitomeGeometry(kernel_shape, epitome_shape)
    rng = np.random.default_rng(0)
    routing = sampling.fixed_routing(g, stride)
    routing = routing._replace(
      in_offsets=rng.integers(0, g.cin_e, g.num_in_chunks).astype(float),
      out_offsets=rng.integers(0, g.cout_e, g.num_out_chunks).astype(float),
    )
    e = rng.standard_normal(g.epitome_shape)
    kernel = oracle.sample_kernel(e, routing, g)
    fitted = sampling.fit_epitome(kernel, routing, g)
    self.assertAllClose(oracle.sample_kernel(fitted, routing, g), kernel)

  def test_is_least_squares(self):
    # For an arbitrary kernel, the fitted epitome zeroes the gradient of
    # ||sample(E) - K||^2 (it is the minimizer: the objective is convex in E).
    g = sampling.EpitomeGeometry((3, 5, 7), (4, 2, 3))
    rng = np.random.default_rng(3)
    routing = sampling.RoutingMap(
      np.array([0.0, 1.0, 1.0]),
      np.array([2.0, 0.0, 1.0]),
      np.array([[0.0], [1.0], [1.0]]),
    )
    kernel = rng.standard_normal(g.kernel_shape)
    fitted = tf.Variable(sampling.fit_epitome(kernel, routing, g))
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(_sample_var(fitted, routing, g) - kernel))
    self.assertAllClose(
      tape.gradient(loss, fitted), np.zeros(g.epitome_shape), atol=1e-10
    )
    # Perturbing any entry makes it worse.
    base = float(loss)
    for idx in [(0, 0, 0), (2, 1, 2), (3, 0, 1)]:
      e2 = fitted.numpy().copy()
      e2[idx] += 0.1
      worse = np.sum((oracle.sample_kernel(e2, routing, g) - kernel) ** 2)
      self.assertGreaterEqual(worse, base - 1e-12)

  def test_unread_entries_keep_fill(self):
    g = sampling.EpitomeGeometry((2, 2, 1), (5, 2, 1))
    routing = sampling.RoutingMap(np.zeros(1), np.zeros(1), np.zeros((1, 1)))
    fill = np.full(g.epitome_shape, 7.0)
    fitted = sampling.fit_epitome(np.ones(g.kernel_shape), routing, g, fill=fill)
    self.assertAllEqual(fitted[:2], np.ones((2, 2, 1)))
    self.assertAllEqual(fitted[2:], np.full((3, 2, 1), 7.0))

  def test_works_while_a_graph_is_built(self):
    # Keras builds layers (e.g. when loading a model from its config) inside
    # tf.init_scope, where gradient tapes are paused; fit_epitome must not
    # rely on one, and must give the same epitome there as eagerly.
    g = sampling.EpitomeGeometry((3, 3, 6, 4), (3, 3, 4, 2))
    routing = sampling.RoutingMap(
      np.array([1.0, 3.0]), np.array([0.0, 1.0]), np.zeros((2, 2))
    )
    kernel = np.random.default_rng(5).standard_normal(g.kernel_shape)
    eager = sampling.fit_epitome(kernel, routing, g)
    seen = []

    @tf.function
    def build_like_keras():
      with tf.init_scope():
        seen.append(sampling.fit_epitome(kernel, routing, g))
      return tf.constant(0.0)

    build_like_keras()
    self.assertAllClose(seen[0], eager, atol=0)

  def test_bad_input(self):
    g = sampling.EpitomeGeometry((4, 4), (2, 2))
    routing = sampling.RoutingMap(np.array([0.5, 0.0]), np.zeros(2), np.zeros((2, 0)))
    with self.assertRaisesRegex(ValueError, "integer offsets"):
      sampling.fit_epitome(np.ones((4, 4)), routing, g)
    with self.assertRaisesRegex(ValueError, r"kernel shape \(3, 4\)"):
      sampling.fit_epitome(np.ones((3, 4)), routing._replace(in_offsets=np.zeros(2)), g)


def _sample_var(e, routing, g):
  return sampling.sample_kernel(
    e,
    tf.constant(routing.in_offsets, e.dtype),
    tf.constant(routing.out_offsets, e.dtype),
    tf.constant(routing.spatial_offsets, e.dtype) if g.slack_axes else None,
    g,
  )


class InferenceHelpersTest(tf.test.TestCase):
  def test_taps_and_windows_agree_with_sampler(self):
    # Rebuild the kernel from channel_taps / epitome_windows (the factored
    # form's ingredients) and compare with the reference loop.
    g = sampling.EpitomeGeometry((3, 5, 4), (5, 2, 3))
    rng = np.random.default_rng(4)
    routing = sampling.RoutingMap(
      rng.uniform(-2, 4, g.num_in_chunks),
      rng.uniform(-2, 4, g.num_out_chunks),
      rng.uniform(0, 2, (g.num_out_chunks, 1)),
    )
    e = rng.standard_normal(g.epitome_shape)
    windows, window_of = sampling.epitome_windows(e, routing, g)
    tin = sampling.channel_taps(routing.in_offsets, g.cin_e)
    tout = sampling.channel_taps(routing.out_offsets, g.cout_e)
    kernel = np.zeros(g.kernel_shape)
    for ci in range(g.cin):
      a, u = divmod(ci, g.cin_e)
      for co in range(g.cout):
        b, v = divmod(co, g.cout_e)
        w = windows[window_of[b]]
        for ii, iw in (
          ((u + tin.shift[a]) % g.cin_e, 1 - tin.frac[a]),
          (
            (u + tin.shift[a] + 1) % g.cin_e,
            tin.frac[a],
          ),
        ):
          for oo, ow in (
            ((v + tout.shift[b]) % g.cout_e, 1 - tout.frac[b]),
            (
              (v + tout.shift[b] + 1) % g.cout_e,
              tout.frac[b],
            ),
          ):
            kernel[:, ci, co] += iw * ow * w[:, ii, oo]
    self.assertAllClose(kernel, oracle.sample_kernel(e, routing, g), atol=1e-12)
    start, frac = sampling.spatial_taps(np.array([0.0, 1.5, 2.0, 3.0]), 2)
    self.assertAllEqual(start, [0, 1, 1, 1])
    self.assertAllClose(frac, [0.0, 0.5, 1.0, 1.0])


class LargeAndNonFiniteOffsetTest(tf.test.TestCase, parameterized.TestCase):
  """Offsets far outside the epitome, and diverged (NaN/inf) offsets."""

  def test_channel_offsets_beyond_int32_wrap_like_numpy(self):
    g = sampling.EpitomeGeometry((6, 9), (3, 3))
    e = np.random.default_rng(0).standard_normal(g.epitome_shape).astype(np.float32)
    # float32 values (exactly representable) far beyond 2**31, both signs.
    in_o = np.array([2.0**31 + 256, -(2.0**33) - 1024], np.float32)
    out_o = np.array([3 * 2.0**32 + 512, 2.0**40, -(2.0**31) - 128], np.float32)
    routing = sampling.RoutingMap(in_o, out_o, np.zeros((3, 0)))
    want = oracle.sample_kernel(e, routing, g)
    got = sampling.sample_kernel(e, in_o, out_o, None, g)
    self.assertAllClose(got, want, atol=1e-6)
    frozen = sampling.sample_kernel_frozen(e, routing, g)
    self.assertAllClose(frozen, want, atol=1e-6)

  def test_layer_and_exports_agree_for_huge_channel_offsets(self):
    layer = ke.EpitomeDense(9, epitome_shape=(3, 3))
    model = ke.keras.Sequential([ke.keras.Input((6,)), layer])
    layer.in_offsets.assign([2.0**31 + 256, 2.0**35 + 2048])
    layer.out_offsets.assign([2.0**31 + 128, 7.0 * 2.0**31, 2.0**32 + 256])
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    y = model(x).numpy()
    self.assertAllClose(ke.factorize(model)(x), y, atol=1e-5)
    self.assertAllClose(ke.strip_epitome(model)(x), y, atol=1e-5)

  @parameterized.named_parameters(
    ("spatial_nan", "spatial", np.nan),
    ("spatial_inf", "spatial", np.inf),
    ("channel_nan", "channel", np.nan),
    ("channel_inf", "channel", -np.inf),
  )
  def test_non_finite_offset_gives_nan_not_an_index_error(self, which, value):
    g = sampling.EpitomeGeometry((3, 4, 4), (5, 2, 2))
    e = tf.constant(np.ones(g.epitome_shape, np.float32))
    in_o = np.zeros(2, np.float32)
    out_o = np.zeros(2, np.float32)
    sp = np.array([[0.0], [1.0]], np.float32)
    if which == "spatial":
      sp[1, 0] = value
    else:
      out_o[1] = value
    with tf.GradientTape() as tape:
      tape.watch(e)
      k = sampling.sample_kernel(e, in_o, out_o, sp, g)
      loss = tf.reduce_sum(k)
    k = k.numpy()
    # Output chunk 1 (columns 2, 3) is NaN, chunk 0 is intact.
    self.assertTrue(np.all(np.isnan(k[..., 2:])), k)
    self.assertAllClose(k[..., :2], np.ones_like(k[..., :2]))
    self.assertTrue(np.any(np.isnan(tape.gradient(loss, e).numpy())))
    compiled = tf.function(
      lambda e: sampling.sample_kernel(e, in_o, out_o, sp, g), jit_compile=True
    )
    self.assertTrue(np.all(np.isnan(compiled(e).numpy()[..., 2:])))

  def test_frozen_paths_refuse_non_finite_offsets(self):
    g = sampling.EpitomeGeometry((4, 4), (2, 2))
    bad = sampling.RoutingMap(np.array([0.0, np.nan]), np.zeros(2), np.zeros((2, 0)))
    e = np.ones(g.epitome_shape, np.float32)
    for fn in (sampling.sample_kernel_frozen, sampling.factored_plan):
      with self.assertRaisesRegex(ValueError, r"in_offsets holds non-finite offsets"):
        fn(e, bad, g)
    with self.assertRaisesRegex(ValueError, r"fit_epitome: routing map in_offsets"):
      sampling.fit_epitome(np.ones(g.kernel_shape), bad, g)


if __name__ == "__main__":
  tf.test.main()
