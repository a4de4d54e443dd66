"""The rules both Keras APIs share (issue 26), tested without either framework.

geometry (routing-map checks and packing), hardening, distill_common,
learner_common, reports and the spec checks of export_tflite: plain NumPy and
Python, so these tests import neither TensorFlow nor Keras.
"""

import inspect
import types

import numpy as np
import pytest

from keras_epitome import distill_common, hardening, learner_common, reports, spec
from keras_epitome import geometry as geo

# -- geometry: a routing map as the layers store it ------------------------------


def test_routing_arrays_checks_shapes_and_fills_spatial():
  g = geo.EpitomeGeometry((3, 8, 8), (4, 4, 4))  # slack 1 on the one axis
  in_o, out_o, sp_o = geo.routing_arrays(([1, 2], [0, 3], [0.5, 1.0]), g, "L")
  assert in_o.dtype == np.float32 and sp_o.shape == (2, 1)
  with pytest.raises(ValueError, match="L: routing map out_offsets has shape"):
    geo.routing_arrays(([1, 2], [0], [0.5, 1.0]), g, "L")
  with pytest.raises(ValueError, match="non-finite"):
    geo.routing_arrays(([np.nan, 2], [0, 3], [0.5, 1.0]), g, "L")
  dense = geo.EpitomeGeometry((8, 8), (4, 4))  # no spatial axis: ignored, zeros
  _, _, sp_o = geo.routing_arrays(([0, 1], [0, 1], np.ones((7,))), dense)
  assert sp_o.shape == (2, 0)


def test_pack_routing_keeps_only_slack_columns():
  g = geo.EpitomeGeometry((3, 3, 8, 8), (5, 3, 4, 4))  # slack on axis 0 only
  sp = np.array([[1.0, 0.0], [2.0, 0.0]])
  assert geo.spatial_columns(sp, g).tolist() == [[1.0], [2.0]]
  packed = geo.pack_routing([0.0, 1.0], [2.0, 3.0], sp, g)
  assert packed.tolist() == [0.0, 1.0, 2.0, 3.0, 1.0, 2.0]
  assert packed.shape == (g.routing_size,)


def test_stored_offsets_are_the_layer_variables_scaled():
  g = geo.EpitomeGeometry((3, 3, 8, 8), (5, 3, 4, 4))  # slack 2 on axis 0 only
  routing = geo.RoutingMap(np.array([0.0, 2.0]), np.array([1.0, 3.0]), [[0, 0], [2, 0]])
  stored = geo.stored_offsets(g, routing, scale=2.0)
  assert [v.name for v in stored] == ["in_offsets", "out_offsets", "spatial_offsets"]
  assert stored[0].initial.tolist() == [0.0, 1.0] and stored[0].limit is None
  assert stored[2].shape == (2, 1) and stored[2].initial.tolist() == [[0.0], [1.0]]
  assert stored[2].limit.tolist() == [1.0]
  dense = geo.EpitomeGeometry((8, 8), (4, 4))
  assert len(geo.stored_offsets(dense, geo.fixed_routing(dense))) == 2


# -- hardening -------------------------------------------------------------------


def test_harden_rounds_wraps_clips_and_refits():
  g = geo.EpitomeGeometry((3, 8, 8), (4, 4, 4))
  routing = geo.RoutingMap([4.6, 1.2], [0.4, 2.5], [[0.7], [5.0]])
  epitome = np.zeros(g.epitome_shape)
  kept, hard = hardening.harden(routing, g, epitome)
  assert kept is epitome
  assert [o.tolist() for o in hard] == [[1.0, 1.0], [0.0, 2.0], [[1.0], [1.0]]]
  kernel = np.random.default_rng(0).normal(size=g.kernel_shape)
  fitted, _ = hardening.harden(routing, g, epitome, kernel)
  assert fitted.shape == g.epitome_shape and np.abs(fitted).sum() > 0


def test_fit_rounded_reproduces_a_kernel_sampled_at_integer_offsets():
  g = geo.EpitomeGeometry((8, 8), (4, 4))
  epitome = np.arange(16.0).reshape(4, 4)
  kernel = np.tile(epitome, (2, 2))  # offsets 0 everywhere
  fitted = hardening.fit_rounded(kernel, ([0.2, -0.3], [0.1, 0.0], np.zeros((2, 0))), g)
  np.testing.assert_allclose(fitted, epitome)


def test_relative_change():
  assert hardening.relative_change([1.0, 1.0], [1.0, 1.0]) == 0.0
  assert hardening.relative_change([3.0, 4.0], [0.0, 0.0]) == pytest.approx(5e12)


# -- distill_common --------------------------------------------------------------


def test_default_learning_rate_by_run_length():
  assert distill_common.default_learning_rate(None) == 1e-3
  assert distill_common.default_learning_rate(299) == 1e-3
  assert distill_common.default_learning_rate(300) == 3e-3


def test_cosine_schedule_hands_the_warmup_to_cosine_decay():
  calls = []

  def decay(*args, **kwargs):
    calls.append((args, kwargs))

  distill_common.cosine_schedule(decay, 0.1, 100)
  distill_common.cosine_schedule(
    decay, 0.1, 100, distill_common.warmup_steps(0.25, 100)
  )
  assert calls == [
    ((0.1, 100), {}),
    ((0.0, 75), {"warmup_target": 0.1, "warmup_steps": 25}),
  ]


@pytest.mark.parametrize(
  "args, match",
  [
    ((0, 1, 0, None, 0, None, 8), "epochs must be an int >= 1"),
    ((True, 1, 0, None, 0, None, 8), "epochs must be an int >= 1"),
    ((1, 0, 0, None, 0, None, 8), "temperature must be"),
    ((1, 1, 1.5, None, 0, None, 8), "alpha must be in"),
    ((1, 1, 0, -1.0, 0, None, 8), "learning_rate must be"),
    ((1, 1, 0, None, 1.0, None, 8), "warmup must be a fraction"),
    ((1, 1, 0, None, 0, None, 0), "batch_size must be an int >= 1"),
    ((1, 1, 0, None, 0.1, object(), 8), "warmup applies to the default"),
  ],
)
def test_check_distill_args_refuses(args, match):
  with pytest.raises(ValueError, match=match):
    distill_common.check_distill_args(*args)


def test_check_distill_args_normalizes():
  args = distill_common.check_distill_args(
    np.int64(2), 2, np.float32(0.5), 1e-3, 0, None, np.int64(16)
  )
  assert args == dict(
    epochs=2,
    temperature=2.0,
    alpha=0.5,
    learning_rate=1e-3,
    warmup=0.0,
    batch_size=16,
  )


def test_check_epitome_learning_rate():
  assert distill_common.check_epitome_learning_rate(None, object()) is None
  assert distill_common.check_epitome_learning_rate(np.float32(0.5), None) == 0.5
  with pytest.raises(ValueError, match="epitome_learning_rate must be"):
    distill_common.check_epitome_learning_rate(0.0, None)
  with pytest.raises(ValueError, match="epitome_learning_rate applies"):
    distill_common.check_epitome_learning_rate(1e-3, object())


def test_check_output_shapes_and_split_xy():
  s, t = types.SimpleNamespace(name="s"), types.SimpleNamespace(name="t")
  distill_common.check_output_shapes(s, t, (10,), None)  # unknown: no check
  with pytest.raises(ValueError, match="student 's' outputs shape"):
    distill_common.check_output_shapes(s, t, (10,), (5,))
  assert distill_common.split_xy((1, 2)) == (1, 2)
  assert distill_common.split_xy([1]) == (1, None)


# -- spec: layer arguments and export checks --------------------------------------


def test_pop_epitome_args_and_init_epitome_layer():
  kwargs = {"units": 4, "compression": 2, "sampler": "fixed"}
  epitome_kwargs = spec.pop_epitome_args(kwargs)
  assert kwargs == {"units": 4}
  assert set(epitome_kwargs) == set(spec.EPITOME_ARGS)
  layer = types.SimpleNamespace(data_format="channels_last")
  spec.init_epitome_layer(layer, 0, epitome_kwargs, "D")
  assert layer.compression == 2.0 and layer.sampler == "fixed"
  assert layer.epitome is None and layer._geometry is None
  conv = types.SimpleNamespace(data_format="channels_first")
  with pytest.raises(ValueError, match="D: data_format='channels_first'"):
    spec.init_epitome_layer(conv, 2, spec.pop_epitome_args({"compression": 2}), "D")
  cfg = spec.epitome_config(layer)
  assert list(cfg) == list(spec.EPITOME_ARGS) and cfg["compression"] == 2.0


def test_merged_signature_adds_the_epitome_arguments():
  def stock_init(self, units, activation=None, **kwargs):
    del self, units, activation, kwargs

  params = list(spec.merged_signature(stock_init).parameters.values())
  names = [p.name for p in params]
  assert names == ["units", "activation", *spec.EPITOME_ARGS, "kwargs"]
  by_name = {p.name: p for p in params}
  assert by_name["channel_roll"].default == 1
  assert by_name["train_form"].kind == inspect.Parameter.KEYWORD_ONLY


def test_check_export_args():
  assert spec.check_export_args(None, None, np.int64(2)) == 2
  assert spec.check_export_args("dynamic", None, None) is None
  with pytest.raises(ValueError, match="quantize must be one of"):
    spec.check_export_args("int4", None, 1)
  with pytest.raises(ValueError, match="needs representative_data"):
    spec.check_export_args("int8", None, 1)
  with pytest.raises(ValueError, match="export_tflite: batch_size must be None"):
    spec.check_export_args(None, None, True)


# -- learner_common --------------------------------------------------------------


def test_init_learner_builds_the_sublayers():
  made = []

  def layer_cls(kind):
    def make(*args, **kwargs):
      made.append((kind, args, kwargs))
      return kind

    return make

  layers = types.SimpleNamespace(
    Dense=layer_cls("Dense"), Conv1D=layer_cls("Conv1D"), Conv2D=layer_cls("Conv2D")
  )
  learner = types.SimpleNamespace()
  learner_common.init_learner(learner, layers, 6.0, 2, 8, 2)
  assert (learner.features, learner.predict_offsets) == ("Conv2D", "Conv2D")
  assert made[0] == ("Conv2D", (8, 3), dict(strides=2, padding="same", name="features"))
  assert learner_common.learner_config(learner) == dict(
    num_offsets=6, rank=2, hidden=8, stride=2
  )


# -- reports ---------------------------------------------------------------------


def _layer(name="d", shape=(16, 16), built=True, **config):
  return types.SimpleNamespace(
    name=name,
    built=built,
    kernel=np.zeros(shape),
    get_config=lambda: dict(config, name=name),
  )


def test_resolve_policy():
  layer = _layer()
  defaults = {"compression": 4.0}
  assert reports.resolve_policy(layer, None, defaults, 16) == (defaults, "", False)
  assert reports.resolve_policy(layer, None, defaults, 1024)[0] is None
  assert (
    reports.resolve_policy(_layer(built=False), None, defaults, 1024)[0] == defaults
  )
  assert reports.resolve_policy(layer, {"d": np.float32(2)}, defaults, 1024) == (
    {"compression": 2.0},
    "",
    True,
  )
  kwargs, _, _ = reports.resolve_policy(
    layer, lambda _: {"epitome_shape": (8, 8)}, defaults, 0
  )
  assert kwargs == {"epitome_shape": (8, 8)}
  assert reports.resolve_policy(layer, {"d": None}, defaults, 0)[:2] == (
    None,
    "policy returned None",
  )
  with pytest.raises(ValueError, match="unknown argument"):
    reports.resolve_policy(layer, {"d": {"ratio": 2}}, defaults, 0)
  with pytest.raises(ValueError, match="must be a compression ratio"):
    reports.resolve_policy(layer, {"d": True}, defaults, 0)


def test_epitome_config_replaces_the_epitome_arguments():
  layer = _layer(units=4, compression=9.0, lora_rank=None)
  config = reports.epitome_config(
    layer, {"epitome_shape": [4, 4], "compression": 2.0}, dropped=("lora_rank",)
  )
  assert config == {"units": 4, "name": "d", "epitome_shape": [4, 4]}


def test_summary_records_and_table():
  g = geo.EpitomeGeometry((3, 3, 8, 8), (3, 3, 4, 4))
  bias = types.SimpleNamespace(shape=(8,))
  epitome_layer = types.SimpleNamespace(
    name="e",
    epitome_geometry=g,
    sampler="learned",
    learner="param",
    use_bias=True,
    bias=bias,
    weights=[types.SimpleNamespace(shape=(3, 3, 4, 4)), bias],
  )
  record = reports.epitome_layer_summary(epitome_layer, 4)
  assert record.sampler == "learned/param" and record.output_positions == 4
  assert reports.stock_params_change(epitome_layer) == g.kernel_size - g.epitome_size
  stock = reports.stock_layer_summary(_layer("s"), (16, 16), 1)
  assert stock.macs_factored == 256 and stock.epitome_shape is None
  summary = reports.model_summary([record, stock], 1000, 2000)
  assert summary.compression_ratio == 2.0
  assert summary.macs_factored == record.macs_factored + 256
  lines = []
  reports.print_summary(types.SimpleNamespace(name="m"), summary, lines.append)
  assert lines[0] == 'Epitome summary: "m"'
  assert any(line.startswith("e (SimpleNamespace)  3x3x8x8") for line in lines)
  assert reports.fmt_shape(None) == "-"


def test_epitomize_argument_checks():
  model = types.SimpleNamespace(name="m", built=False)
  reports.check_init("random", model)
  with pytest.raises(ValueError, match="unknown init 'best'"):
    reports.check_init("best", model)
  with pytest.raises(ValueError, match="init='fit' needs a built model"):
    reports.check_init("fit", model)
  assert reports.check_min_params(np.int64(3)) == 3
  with pytest.raises(ValueError, match="min_params must be an int >= 0"):
    reports.check_min_params(-1)
  assert reports.check_defaults(compression=4, sampler="fixed") == dict(
    compression=4, sampler="fixed"
  )
  with pytest.raises(ValueError, match="epitomize: compression must be"):
    reports.check_defaults(compression=0.5)
  names = {"a", "b"}
  assert reports.check_layer_names(model, names, "a", None) == {"a"}
  assert reports.check_layer_names(model, names, (), lambda layer: None) == set()
  with pytest.raises(ValueError, match=r"name\(s\) \['c'\] match no layer"):
    reports.check_layer_names(model, names, (), {"c": 2})
  with pytest.raises(ValueError, match="policy must be a dict"):
    reports.check_layer_names(model, names, (), [("a", 2)])


def test_stock_config_drops_the_epitome_arguments():
  layer = _layer(units=4, compression=2.0, sampler="fixed")
  layer.epitome = np.zeros(2)
  assert reports.stock_config(layer) == {"units": 4, "name": "d"}
  layer.built = False
  with pytest.raises(ValueError, match="is not built yet"):
    reports.stock_config(layer)
