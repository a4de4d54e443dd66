"""LiteRT (TFLite): the converter call, and running and inspecting ``.tflite`` files.

The low level under :mod:`keras_epitome.export` (which decides *what* model
to convert) and :mod:`keras_epitome.form_choice` (which times candidate
layers): neither imports the other for this.

Example:
  >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
  >>> x = np.ones((2, 8), np.float32)
  >>> bool(np.allclose(run_tflite(convert(model), x), model(x), atol=1e-5))
  True
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from keras_epitome.spec import check_batch_size  # noqa: F401  (re-exported)


def _calibration_inputs(item, num_inputs: int) -> list:
  """The model inputs of one element of a calibration ``tf.data.Dataset``.

  Elements may be inputs alone or Keras ``fit``-style ``(x, y)`` /
  ``(x, y, sample_weight)`` tuples, whose ``x`` is taken.
  """
  if not isinstance(item, (tuple, list)):
    return [item]
  first = item[0]
  if isinstance(first, (tuple, list)):
    return list(first)
  if num_inputs == 1:
    return [first]
  return list(item[:num_inputs])


def _representative(data, batch_size: Optional[int], input_shapes) -> Callable:
  """A converter ``representative_dataset`` that uses every sample.

  Arrays and datasets are cut into batches of the exported batch size (the
  last batch is filled up with samples from the start, so no sample is
  dropped and every batch has the model's static shape).

  Raises:
    ValueError: if there is no sample, or a sample's shape does not match the
      model's input.
  """
  if callable(data) and not isinstance(data, tf.data.Dataset):
    return data
  if isinstance(data, tf.data.Dataset):
    per_input = [[] for _ in input_shapes]
    for item in data:
      for i, x in enumerate(_calibration_inputs(item, len(input_shapes))):
        x = np.asarray(x, np.float32)
        if x.ndim == len(input_shapes[i]) - 1:  # an unbatched dataset
          x = x[np.newaxis]
        per_input[i].append(x)
    arrays = [
      np.concatenate(xs) if xs else np.zeros((0,) + tuple(shape[1:]), np.float32)
      for xs, shape in zip(per_input, input_shapes, strict=True)
    ]
  else:
    arrays = data if isinstance(data, (list, tuple)) else [data]
    arrays = [np.asarray(a, np.float32) for a in arrays]
  if len(arrays) != len(input_shapes):
    raise ValueError(
      f"export_tflite: representative_data has {len(arrays)} input(s), the "
      f"model {len(input_shapes)}"
    )
  for i, (a, shape) in enumerate(zip(arrays, input_shapes, strict=True)):
    want = tuple(shape[1:])
    if a.ndim != len(shape) or any(
      w is not None and d != w for d, w in zip(a.shape[1:], want, strict=True)
    ):
      raise ValueError(
        f"export_tflite: representative_data input {i} has shape {a.shape}; "
        f"the model expects (N, {', '.join(str(d) for d in want)})"
      )
  n = len(arrays[0])
  if n == 0:
    raise ValueError(
      "export_tflite: representative_data holds no sample; quantize='int8' "
      "needs at least one to calibrate the activation ranges"
    )
  step = batch_size or 1

  def gen():
    for i in range(0, n, step):
      index = np.arange(i, i + step) % n
      yield [a[index] for a in arrays]

  return gen


def convert(
  model, quantize=None, representative_data=None, batch_size=None, sparse=False
) -> bytes:
  """Converts a float32 Keras model to TFLite bytes (the converter call of the exporters).

  Args:
    model: a built Keras model with known inputs.
    quantize: ``None``, ``"dynamic"`` or ``"int8"``.
    representative_data: for ``"int8"``: sample inputs (arrays or a
      ``tf.data.Dataset``, ``(x, y)`` pairs take ``x``); every sample is used.
    batch_size: the batch dimension of the file's inputs (``None``: dynamic).
    sparse: store sparse weights in TFLite's sparse tensor format
      (``Optimize.EXPERIMENTAL_SPARSITY``).

  Returns:
    The ``.tflite`` bytes.

  Raises:
    ValueError: if ``batch_size`` is not ``None`` or an int >= 1, or
      ``"int8"`` calibration produced no batch.
  """
  check_batch_size(batch_size, "convert")
  batch_size = None if batch_size is None else int(batch_size)
  specs = [
    tf.TensorSpec([batch_size] + list(t.shape[1:]), tf.float32, name=f"input_{i}")
    for i, t in enumerate(model.inputs)
  ]

  @tf.function(input_signature=specs)
  def serve(*args):
    return model(list(args) if len(args) > 1 else args[0], training=False)

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
    [serve.get_concrete_function()], model
  )
  optimizations = []
  if quantize is not None:
    optimizations.append(tf.lite.Optimize.DEFAULT)
  if sparse:
    optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
  if optimizations:
    converter.optimizations = optimizations
  batches = [0]
  if quantize == "int8":
    source = _representative(
      representative_data, batch_size, [list(t.shape) for t in model.inputs]
    )

    def counted():
      for batch in source():
        batches[0] += 1
        yield batch

    converter.representative_dataset = counted
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  tflite = converter.convert()
  if quantize == "int8" and not batches[0]:
    raise ValueError(
      "export_tflite: representative_data produced no calibration batch, so "
      "the converter could not quantize to int8; give it at least one sample"
    )
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
    >>> model = keras.Sequential([keras.Input((8,)), ke.EpitomeDense(16, compression=2)])
    >>> runner = LiteRTRunner(ke.export_tflite(model), num_threads=2)
    >>> runner(np.ones((1, 8), np.float32)).shape
    (1, 16)
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

  Raises:
    ValueError: if the number of arrays or a shape (batch aside) does not
      match the model's inputs, or the batch is not a multiple of a static
      batch size.

  Example:
    >>> model = keras.Sequential([keras.Input((8,)), ke.EpitomeDense(16, compression=2)])
    >>> x = np.random.rand(3, 8).astype("float32")
    >>> y = ke.run_tflite(ke.export_tflite(model), x)
    >>> np.allclose(y, model(x), atol=1e-5)
    True
  """
  xs = [np.asarray(a, np.float32) for a in (x if isinstance(x, (list, tuple)) else [x])]
  runner = LiteRTRunner(tflite, num_threads)
  if len(xs) != len(runner.inputs):
    raise ValueError(
      f"run_tflite: got {len(xs)} input array(s); the model has "
      f"{len(runner.inputs)} input(s)"
    )
  for i, (a, detail) in enumerate(zip(xs, runner.inputs, strict=True)):
    want = [int(d) for d in detail["shape_signature"]]
    if a.ndim != len(want) or any(
      w >= 0 and d != w for d, w in zip(a.shape[1:], want[1:], strict=True)
    ):
      shown = ", ".join("?" if w < 0 else str(w) for w in want[1:])
      raise ValueError(
        f"run_tflite: input {i} has shape {a.shape}; the model expects (batch, {shown})"
      )
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
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 16)), ke.EpitomeConv2D(16, 3, compression=4)])
    >>> report = ke.tflite_tensor_report(ke.export_tflite(model))
    >>> "CONV_2D" in [op["name"] for op in report["ops"]]
    True
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
