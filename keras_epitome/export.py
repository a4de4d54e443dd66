"""TFLite export of epitome models, and LiteRT helpers to run and inspect them.

Two inference forms (DESIGN.md section 4):

* ``"factored"`` (default): every epitome layer becomes its factored layer
  (:func:`keras_epitome.factored.factorize`): the file stores the epitome, not
  the full kernel, and the convolutions have ``Cin_E x Cout_E`` channels.
  Following BatchNorms are folded in. A layer without a factored form
  (``groups > 1``) falls back to the materialized form (logged).
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
  >>> data = np.random.rand(64, 32, 32, 3).astype("float32")
  >>> tflite = ke.export_tflite(model, "model.tflite")              # float
  >>> tflite8 = ke.export_tflite(model, quantize="int8", representative_data=data)
  >>> y = ke.run_tflite(tflite8, data[:4])
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import numpy as np
import tensorflow as tf

from keras_epitome import factored, transform
from keras_epitome.backend import keras
from keras_epitome.layers import EpitomeMixin

_log = logging.getLogger(__name__)

FORMS = ("factored", "materialized")
QUANTIZATIONS = (None, "dynamic", "int8")


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
    >>> plain = ke.export.materialize(model)
  """
  _check_layers(model)
  return transform.strip_epitome(model)


def _check_layers(model):
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      _check_layers(layer)
    elif isinstance(layer, EpitomeMixin) or (
      isinstance(layer, keras.layers.Wrapper)
      and isinstance(getattr(layer, "layer", None), EpitomeMixin)
    ):
      factored._check_training_state(layer)  # noqa: SLF001


def inference_model(
  model,
  form: str = "factored",
  *,
  fold_batchnorm: bool = True,
  remix: str = "slices",
  precision: str = "float",
  choose: str = "cost",
  form_report: Optional[list] = None,
  objective: str = "latency",
):
  """The Keras model that :func:`export_tflite` converts, in the given form.

  Args:
    model: a built Keras model (epitome layers anywhere, nested models too).
    form: ``"factored"`` or ``"materialized"``.
    fold_batchnorm: for ``"factored"``, fold following BatchNorms.
    remix: for ``"factored"``: ``"slices"``, ``"matmul"`` or ``"auto"`` (see
      :func:`keras_epitome.factored.factorize`).
    precision, choose, form_report, objective: for ``remix="auto"``, as in
      :func:`keras_epitome.factored.factorize`.

  Returns:
    A new Keras model.

  Raises:
    ValueError: for an unknown form, or what :func:`factorize` raises.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
  if form == "factored":
    return factored.factorize(
      model,
      fold_batchnorm=fold_batchnorm,
      remix=remix,
      precision=precision,
      choose=choose,
      form_report=form_report,
      objective=objective,
    )
  return materialize(model)


def _representative(data, batch_size: int) -> Callable[[], Iterable]:
  if callable(data):
    return data
  if isinstance(data, tf.data.Dataset):

    def gen_ds():
      for item in data:
        items = item if isinstance(item, (tuple, list)) else (item,)
        yield [tf.cast(t, tf.float32) for t in items]

    return gen_ds
  arrays = data if isinstance(data, (list, tuple)) else [data]
  arrays = [np.asarray(a, np.float32) for a in arrays]
  n = len(arrays[0])
  step = batch_size or 1

  def gen():
    for i in range(0, n - step + 1, step):
      yield [a[i : i + step] for a in arrays]

  return gen


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
      model input) of sample inputs, a ``tf.data.Dataset`` of inputs, or a
      generator function as the TFLite converter takes it.
    batch_size: static batch size of the exported model (``None``: dynamic;
      static shapes run faster on LiteRT).
    fold_batchnorm: fold BatchNorms into factored layers.
    remix: for ``"factored"``: ``"auto"`` (default: per layer, the fastest
      on LiteRT of the two remixes and the materialized stock layer, for the
      precision being exported, so the model is never slower than stock),
      ``"slices"`` (the smallest file) or ``"matmul"`` (channel remixes as
      1x1 convolutions: fewer ops, faster on narrow layers, a larger file).
    choose: for ``remix="auto"``: ``"cost"`` (default: a cost model
      calibrated on LiteRT) or ``"measure"`` (each candidate layer converted
      and timed with LiteRT, 1 thread; slower export).
    form_report: optional list; for ``remix="auto"`` one
      :class:`keras_epitome.form_choice.FormChoice` per epitome layer is
      appended (the chosen form and every candidate's estimate or time; also
      logged at INFO level).
    objective: for ``remix="auto"``: ``"latency"`` (default: the fastest form
      per layer) or ``"size"`` (per layer the form with the fewest stored
      weights among those estimated not slower than the stock layer: a
      smaller file, still never slower than stock).

  Returns:
    The ``.tflite`` bytes.

  Raises:
    ValueError: for an unknown form or quantization, ``"int8"`` without data,
      an unbuilt epitome layer, or an epitome layer inside a training wrapper
      (pruning, QAT).

  Example:
    >>> tflite = ke.export_tflite(model, "/tmp/m.tflite", quantize="dynamic")
  """
  if quantize not in QUANTIZATIONS:
    raise ValueError(
      f"quantize must be one of None, 'dynamic', 'int8', got {quantize!r}"
    )
  if quantize == "int8" and representative_data is None:
    raise ValueError(
      "quantize='int8' needs representative_data (sample inputs to calibrate "
      "the activation ranges)"
    )
  if not model.built or not model.inputs:
    raise ValueError(
      f"model '{model.name}' must be built with known inputs (a functional or "
      "Sequential model with an Input) to be exported"
    )
  inf = inference_model(
    model,
    form,
    fold_batchnorm=fold_batchnorm,
    remix=remix,
    precision="int8" if quantize == "int8" else "float",
    choose=choose,
    form_report=form_report,
    objective=objective,
  )
  specs = [
    tf.TensorSpec([batch_size] + list(t.shape[1:]), tf.float32, name=f"input_{i}")
    for i, t in enumerate(inf.inputs)
  ]

  @tf.function(input_signature=specs)
  def serve(*args):
    return inf(list(args) if len(args) > 1 else args[0], training=False)

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
    [serve.get_concrete_function()], inf
  )
  if quantize is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "int8":
    converter.representative_dataset = _representative(representative_data, batch_size)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  tflite = converter.convert()
  if path is not None:
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(tflite)
  return tflite


# ----------------------------------------------------------------------------
# LiteRT helpers.


def _interpreter(tflite: bytes, num_threads: int = 1, delegates: bool = True):
  from ai_edge_litert import interpreter as litert  # noqa: PLC0415

  kwargs = {}
  if not delegates:
    kwargs["experimental_op_resolver_type"] = (
      litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
  return litert.Interpreter(model_content=tflite, num_threads=num_threads, **kwargs)


def _quantize_input(x, detail):
  if detail["dtype"] in (np.int8, np.uint8, np.int16):
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    q = np.round(x / scale + zero)
    return np.clip(q, info.min, info.max).astype(detail["dtype"])
  return np.asarray(x, detail["dtype"])


def _dequantize_output(y, detail):
  if detail["dtype"] in (np.int8, np.uint8, np.int16):
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale
  return y


class LiteRTRunner:
  """A LiteRT interpreter for repeated calls (benchmarks, evaluation).

  Args:
    tflite: the model bytes.
    num_threads: CPU threads.

  Example:
    >>> runner = LiteRTRunner(tflite, num_threads=2)
    >>> y = runner(x[:1])
  """

  def __init__(self, tflite: bytes, num_threads: int = 1):
    self.interpreter = _interpreter(tflite, num_threads)
    self.interpreter.allocate_tensors()
    self.inputs = self.interpreter.get_input_details()
    self.outputs = self.interpreter.get_output_details()

  def invoke(self):
    self.interpreter.invoke()

  def set_inputs(self, *xs):
    for x, detail in zip(xs, self.inputs, strict=True):
      x = np.asarray(x)
      if tuple(x.shape) != tuple(detail["shape"]):
        self.interpreter.resize_tensor_input(detail["index"], x.shape)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        detail = next(d for d in self.inputs if d["index"] == detail["index"])
      self.interpreter.set_tensor(detail["index"], _quantize_input(x, detail))

  def __call__(self, *xs):
    """Runs the model on one batch of the model's batch size; returns the outputs."""
    self.set_inputs(*xs)
    self.interpreter.invoke()
    outs = [
      _dequantize_output(self.interpreter.get_tensor(d["index"]), d)
      for d in self.outputs
    ]
    return outs[0] if len(outs) == 1 else outs


def run_tflite(tflite: bytes, x, num_threads: int = 1):
  """Runs a ``.tflite`` model on ``x`` with the LiteRT interpreter.

  Quantized inputs and outputs are (de)quantized with the model's own
  parameters. If the model has a static batch size smaller than ``x``'s, the
  batch is run in pieces of the model's batch size.

  Args:
    tflite: the model bytes.
    x: an array, or a list of arrays for a model with several inputs.
    num_threads: CPU threads for the interpreter.

  Returns:
    The output as a float32 NumPy array (a list for several outputs).

  Example:
    >>> y = ke.run_tflite(ke.export_tflite(model), x)
  """
  xs = [np.asarray(a, np.float32) for a in (x if isinstance(x, (list, tuple)) else [x])]
  runner = LiteRTRunner(tflite, num_threads)
  model_batch = int(runner.inputs[0]["shape_signature"][0])
  n = len(xs[0])
  if model_batch <= 0 or model_batch == n:
    return runner(*xs)
  if n % model_batch:
    raise ValueError(
      f"the model has a static batch size {model_batch}; the input's {n} is not "
      "a multiple of it"
    )
  pieces = [
    runner(*[a[i : i + model_batch] for a in xs]) for i in range(0, n, model_batch)
  ]
  if isinstance(pieces[0], list):
    return [np.concatenate(p) for p in zip(*pieces, strict=True)]
  return np.concatenate(pieces)


def tflite_tensor_report(tflite: bytes) -> dict:
  """Lists a ``.tflite`` model's ops and tensors, and counts its multiply-adds.

  Returns:
    A dict with

    * ``"ops"``: one dict per op (``name``, ``inputs``/``outputs``: shapes);
    * ``"tensors"``: one dict per tensor (``name``, ``shape``, ``dtype``,
      ``constant``: whether no op produces it and it is not an input);
    * ``"constant_elements"``: total elements of constant tensors;
    * ``"largest_constant"``: shape of the largest constant tensor;
    * ``"conv_macs"``: multiply-adds of ``CONV_2D``, ``DEPTHWISE_CONV_2D`` and
      ``FULLY_CONNECTED`` (and batch matmuls) per inference;
    * ``"elementwise_muls"``: elements written by ``MUL`` ops (the blends).

  Example:
    >>> report = ke.tflite_tensor_report(tflite)
    >>> [op["name"] for op in report["ops"]][:3]
    ['CONV_2D', 'STRIDED_SLICE', 'CONCATENATION']
  """
  interp = _interpreter(tflite, delegates=False)
  tensors = {t["index"]: t for t in interp.get_tensor_details()}
  ops = interp._get_ops_details()  # noqa: SLF001
  produced = {i for op in ops for i in op["outputs"]}
  graph_inputs = {d["index"] for d in interp.get_input_details()}

  def shape(i):
    return tuple(int(d) for d in tensors[i]["shape"]) if i in tensors else ()

  op_list, conv_macs, muls = [], 0, 0
  for op in ops:
    ins = [shape(i) for i in op["inputs"] if i >= 0]
    outs = [shape(i) for i in op["outputs"]]
    name = op["op_name"]
    op_list.append({"name": name, "inputs": ins, "outputs": outs})
    out_elems = int(np.prod(outs[0])) if outs else 0
    if name == "CONV_2D":
      conv_macs += out_elems * int(np.prod(ins[1][1:]))  # OHWI: kh*kw*Cin
    elif name == "DEPTHWISE_CONV_2D":
      conv_macs += out_elems * int(np.prod(ins[1][1:3]))
    elif name == "FULLY_CONNECTED":
      conv_macs += out_elems * int(ins[1][-1])
    elif name == "BATCH_MATMUL":
      conv_macs += out_elems * int(ins[0][-1])
    elif name == "MUL":
      muls += out_elems
  tensor_list = []
  for i, t in sorted(tensors.items()):
    constant = i not in produced and i not in graph_inputs
    tensor_list.append(
      {
        "name": t["name"],
        "shape": tuple(int(d) for d in t["shape"]),
        "dtype": np.dtype(t["dtype"]).name,
        "constant": constant,
      }
    )
  constants = [t for t in tensor_list if t["constant"]]
  largest = max(constants, key=lambda t: int(np.prod(t["shape"])), default=None)
  return {
    "ops": op_list,
    "tensors": tensor_list,
    "constant_elements": int(sum(int(np.prod(t["shape"])) for t in constants)),
    "largest_constant": largest["shape"] if largest else None,
    "conv_macs": int(conv_macs),
    "elementwise_muls": int(muls),
  }


def epitome_layers(model) -> list:
  """All epitome layers of ``model``, nested models included."""
  out = []
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      out.extend(epitome_layers(layer))
    elif isinstance(layer, EpitomeMixin):
      out.append(layer)
  return out
