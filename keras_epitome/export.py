"""TFLite export of epitome models, and LiteRT helpers to run and inspect them.

Two inference forms (docs/design.md section 4):

* ``"factored"`` (default): every epitome layer becomes the inference form
  :func:`keras_epitome.factorize` picks for it: by default (``remix="auto"``,
  ``objective="latency"``) its fastest form on LiteRT, a factored layer (the
  file stores the epitome, not the full kernel, and the convolutions have
  ``Cin_E x Cout_E`` channels) or, where no factored form is estimated
  faster, its stock layer (a warning says when that costs file size;
  ``objective="size"`` gives the small file). Following BatchNorms are
  folded in. A layer without a factored form (``groups > 1``) falls back to
  the materialized form (logged). Measured sizes and latencies:
  ``docs/results.md``.
* ``"materialized"``: every epitome layer becomes the stock layer holding its
  sampled kernel; a plain model of the original size that any tool accepts.

Both use the layers' inference routing map (the moving map of the
``feature`` learner), so the result equals ``model(x, training=False)``.

Precision: ``quantize=None`` (float32), ``"dynamic"`` (dynamic-range: int8
weights, float activations) or ``"int8"`` (full integer with a
representative dataset; inputs and outputs stay float32, quantized inside
the graph).

Example:
  >>> import keras_epitome as ke
  >>> model = ke.keras.Sequential([
  ...     ke.keras.Input((16, 16, 3)),
  ...     ke.EpitomeConv2D(32, 3, padding="same", activation="relu", compression=4),
  ...     ke.keras.layers.GlobalAveragePooling2D(),
  ...     ke.EpitomeDense(10, compression=4),
  ... ])
  >>> data = np.random.rand(16, 16, 16, 3).astype("float32")
  >>> tflite = ke.export_tflite(model)              # float, factored: bytes
  >>> tflite8 = ke.export_tflite(model, quantize="int8", representative_data=data)
  >>> ke.run_tflite(tflite8, data[:4]).shape
  (4, 10)
"""

from __future__ import annotations

import logging
from typing import Optional

import tensorflow as tf

from keras_epitome import factored_model, form_choice, litert, spec, transform, walk
from keras_epitome.backend import check_keras2, keras3_dispatch
from keras_epitome.layers import EpitomeMixin, epitome_layers  # noqa: F401  (re-exported)
from keras_epitome.litert import (  # noqa: F401  (the exporters' runtime side, re-exported)
  LiteRTRunner,
  run_tflite,
  tflite_tensor_report,
)

_log = logging.getLogger(__name__)

FORMS = ("factored", "materialized")
QUANTIZATIONS = spec.QUANTIZATIONS


def materialize(model):
  """The materialized form: every epitome layer replaced by its stock layer.

  :func:`keras_epitome.transform.strip_epitome`, after checking that no
  epitome layer is unbuilt or inside a training wrapper.

  Args:
    model: a built Keras model.

  Returns:
    A new model of stock layers computing ``model(x, training=False)``.

  Raises:
    ValueError: for an unbuilt epitome layer or one inside a training wrapper.

  Example:
    >>> model = keras.Sequential([keras.Input((8,)), ke.EpitomeDense(16, compression=2)])
    >>> plain = materialize(model)
    >>> type(plain.layers[0]).__name__
    'Dense'
  """
  _check_layers(model)
  return transform.strip_epitome(model)


def _is_epitome_layer(layer) -> bool:
  return isinstance(layer, EpitomeMixin)


def _check_layers(model):
  for layer, _, outer in walk.walk(model):
    if isinstance(layer, EpitomeMixin):
      factored_model._check_training_state(outer)  # noqa: SLF001


def inference_model(
  model,
  form: str = "factored",
  *,
  fold_batchnorm: bool = True,
  remix: str = "auto",
  precision: str = "float",
  choose: str = "cost",
  form_report: Optional[list] = None,
  objective: str = "latency",
  cost_model=None,
):
  """The Keras model that :func:`export_tflite` converts, in the given form.

  Args:
    model: a built Keras model (epitome layers anywhere, nested models too).
    form: ``"factored"`` or ``"materialized"``.
    fold_batchnorm: for ``"factored"``, fold following BatchNorms.
    remix: for ``"factored"``: ``"auto"`` (default) or one of
      :data:`keras_epitome.factored.FORMS` (see :func:`keras_epitome.factorize`).
    precision, choose, form_report, objective, cost_model: for
      ``remix="auto"``, as in :func:`keras_epitome.factorize`.

  Returns:
    A new Keras model.

  Raises:
    ValueError: for an unknown form, or what :func:`factorize` raises.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
  if form == "factored":
    return form_choice.factorize(
      model,
      fold_batchnorm=fold_batchnorm,
      remix=remix,
      precision=precision,
      choose=choose,
      form_report=form_report,
      objective=objective,
      cost_model=cost_model,
    )
  return materialize(model)


def _is_float32(model) -> bool:
  return all(
    getattr(layer, "compute_dtype", "float32") == "float32"
    for layer in walk.iter_layers(model)
  )


def _float32_copy(model):
  """A copy of ``model`` computing in float32 (a mixed-precision model exported).

  Layers keep their weights (float32 variables under a mixed policy); only
  their compute dtype changes, so the converter sees a float32 graph.
  """

  def clone_layer(layer):
    config = layer.get_config()
    if "dtype" in config:
      config["dtype"] = "float32"
    return layer.__class__.from_config(config)

  copy = walk.clone_model(model, clone_layer, "export_tflite")
  copy.set_weights(model.get_weights())
  return copy


@keras3_dispatch("export_tflite")
def export_tflite(
  model,
  path: Optional[str] = None,
  *,
  form: str = "factored",
  quantize: Optional[str] = None,
  representative_data=None,
  batch_size: Optional[int] = 1,
  fold_batchnorm: bool = True,
  remix: str = "auto",
  choose: str = "cost",
  form_report: Optional[list] = None,
  objective: str = "latency",
  cost_model=None,
  sparse: bool = False,
) -> bytes:
  """Converts an epitome model to a TFLite flatbuffer.

  Args:
    model: a built Keras model.
    path: if given, the bytes are also written there.
    form: ``"factored"`` (small and fewer multiply-adds) or ``"materialized"``
      (stock layers, full-size kernels).
    quantize: ``None`` (float32), ``"dynamic"`` (int8 weights) or ``"int8"``
      (full integer; needs ``representative_data``).
    representative_data: for ``"int8"``: an array (or list of arrays, one per
      model input) of sample inputs, a ``tf.data.Dataset`` of inputs or of
      ``(x, y)`` pairs (``x`` is taken; batched or not), or a generator
      function as the TFLite converter takes it. Every sample is used: the
      last batch is filled up with samples from the start.
    batch_size: static batch size of the exported model, an integer >= 1
      (``None``: dynamic; static shapes run faster on LiteRT).
    fold_batchnorm: fold BatchNorms into factored layers.
    remix: for ``"factored"``: ``"auto"`` (default: per layer, the form
      ``objective`` asks for among the factored forms and the materialized
      stock layer, for the precision being exported), or one form for every
      layer: ``"slices"`` (the smallest file), ``"matmul"`` (channel remixes
      as 1x1 convolutions: fewer ops, faster on narrow layers, a larger
      file), ``"fold_slices"`` or ``"fold_matmul"`` (``R_out`` folded into
      one ``(*S, Cin_E, Cout)`` kernel: one convolution per layer however
      many channel rolls or spatial windows it has).
    choose: for ``remix="auto"``: ``"cost"`` (default: the LiteRT cost
      model, see ``cost_model``) or ``"measure"`` (each candidate layer
      converted and timed with LiteRT on this machine, 1 thread; slower
      export).
    form_report: optional list; for ``remix="auto"`` one
      :class:`keras_epitome.form_choice.FormChoice` per epitome layer is
      appended (the chosen form, every candidate's estimate or time and
      stored weights, and the cost model that chose; also logged at INFO
      level).
    objective: for ``remix="auto"``. The default, ``"latency"``, is speed
      first: per layer the fastest form, so a layer whose factored forms are
      not estimated faster than its stock layer (by the cost model's margin)
      is stored full size, and the file can be much larger than the epitome
      model's stored size; a WARNING is logged when the epitome layers are
      estimated over 10% larger than in their smallest forms, and
      ``form_report`` marks each such layer ("size traded for speed").
      ``"size"``: per layer the form with the fewest estimated file bytes
      (its weights at the precision's width and its ops), whatever its
      latency: the small file, possibly slower than stock.
    cost_model: for ``choose="cost"``, the latency model the choice uses
      (:func:`keras_epitome.cost_model.resolve`): ``None`` (default) this
      host's calibration (:func:`keras_epitome.cost_model.calibrate`, keyed
      by CPU, LiteRT version and threads), run once and cached the first time
      it is needed (``$KERAS_EPITOME_CALIBRATE=0``: the bundled constants,
      fitted on another CPU, with a 10% safety margin instead); ``"bundled"``;
      or a table measured on the device you ship to (a dict or a JSON path,
      :func:`keras_epitome.cost_model.from_table`): a file for a phone should
      be chosen by the phone's table, not this machine's.
    sparse: store weights that are mostly zeros (a model pruned with
      :func:`keras_epitome.prune_epitomes` or TF-MOT, then stripped) in
      TFLite's sparse tensor format (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``:
      the non-zeros and their positions), so the file shrinks with the
      sparsity; LiteRT densifies them when it loads the model. With
      ``remix="slices"`` the sparse weights are the epitomes themselves.

  Returns:
    The ``.tflite`` bytes.

  A model under a mixed-precision policy is exported in float32.

  Raises:
    ValueError: for an unknown form or quantization, a ``batch_size`` that is
      neither ``None`` nor an integer >= 1, ``"int8"`` without data
      or with data that yields no calibration batch, an unbuilt epitome
      layer, an epitome layer inside a pruning wrapper, a quantization-aware
      training model, or a Keras 3 model.

  Example:
    >>> model = keras.Sequential([keras.Input((8,)), ke.EpitomeDense(16, compression=2)])
    >>> tflite = ke.export_tflite(model, quantize="dynamic")  # a path= also writes it
    >>> isinstance(tflite, bytes)
    True
  """
  spec.check_export_args(quantize, representative_data, batch_size)
  check_keras2(model, "export_tflite")
  walk.check_no_training_wrappers(
    model, "export_tflite", ("qat", "pruning"), _is_epitome_layer
  )
  if not model.built or not model.inputs:
    raise ValueError(
      f"model '{model.name}' must be built with known inputs (a functional or "
      "Sequential model with an Input) to be exported"
    )
  records = []
  inf = inference_model(
    model,
    form,
    fold_batchnorm=fold_batchnorm,
    remix=remix,
    precision="int8" if quantize == "int8" else "float",
    choose=choose,
    form_report=records,
    objective=objective,
    cost_model=cost_model,
  )
  if records:
    _log.info(
      "export_tflite '%s': forms %s", model.name, form_choice.summarize_choices(records)
    )
  if form_report is not None:
    form_report.extend(records)
  if not _is_float32(inf):
    # A mixed-precision model: export the float32 function (the file is
    # float32 or int8 anyway; the converter refuses some bf16 graphs).
    inf = _float32_copy(inf)
  tflite = litert.convert(inf, quantize, representative_data, batch_size, sparse)
  if path is not None:
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(tflite)
  return tflite
