"""TFLite export of Keras 3 models: the same files as the Keras 2 exporter.

:func:`export_tflite` gives a Keras 3 model everything
:func:`keras_epitome.export_tflite` gives a Keras 2 one (the factored or
materialized form, the per-layer form choice and its report, ``objective``,
``remix``, int8 and dynamic-range quantization, the sparse format) by
reusing the Keras 2 exporter per epitome layer: each Keras 3 epitome layer
(with the BatchNormalization right after it, when it can be folded) is
rebuilt as a one-layer Keras 2 twin holding the same epitome and routing map,
the twin goes through the Keras 2 inference forms
(:func:`keras_epitome.export.inference_model`), and the Keras 3 model is
traced with each epitome layer's call replaced by its twin's. Every other
layer runs as Keras 3 itself traces it. The file is converted from that
trace with the variables held by a ``tf.Module`` (the converter drops the
weights of a Keras 3 model handed to it as the trackable object).

The export needs TensorFlow. On the JAX or PyTorch backend,
:func:`export_tflite` saves the model to a temporary ``.keras`` file and
exports it in a child process on the TensorFlow backend; that is the same as
loading the ``.keras`` file with ``KERAS_BACKEND=tensorflow`` and exporting it
there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import keras
import numpy as np

from keras_epitome import spec
from keras_epitome.keras3 import bridge
from keras_epitome.keras3.layers import EpitomeDense, epitome_layers

QUANTIZATIONS = spec.QUANTIZATIONS


def _input_shape(layer):
  """The input shape the layer was built for (calls of a Sequential add nodes)."""
  shapes = list(getattr(layer, "_build_shapes_dict", None) or {})
  if len(shapes) != 1:
    raise ValueError(
      f"export_tflite: cannot tell the input shape of layer '{layer.name}' "
      "(build it by calling the model on an input first)"
    )
  return tuple(layer._build_shapes_dict[shapes[0]])


def _foldable_batchnorm(layer):
  """The BatchNormalization that is the layer's only consumer, if it can be folded."""
  if layer.activation is not None and layer.activation is not keras.activations.linear:
    return None
  consumers = {
    id(n.operation): n.operation for n in getattr(layer, "_outbound_nodes", [])
  }
  if len(consumers) != 1:
    return None
  (bn,) = consumers.values()
  if not isinstance(bn, keras.layers.BatchNormalization):
    return None
  if len(getattr(bn, "_inbound_nodes", [])) != 1 or bn.axis not in (
    -1,
    len(bn.input.shape) - 1,
  ):
    return None
  return bn


def _keras2_twin(layer, bn):
  """A one-layer (plus BatchNorm) Keras 2 model computing what ``layer`` (and ``bn``) compute.

  The twin has no activation: the Keras 3 layer's own activation is applied to
  the twin's output (any activation, custom ones included).
  """
  import keras_epitome as ke2  # the Keras 2 API (imports TensorFlow)

  k2 = ke2.keras
  cls = {
    "EpitomeConv1D": ke2.EpitomeConv1D,
    "EpitomeConv2D": ke2.EpitomeConv2D,
    "EpitomeDense": ke2.EpitomeDense,
  }[type(layer).__name__]
  config = layer.get_config()
  args = dict(
    use_bias=config["use_bias"],
    compression=config["compression"],
    epitome_shape=config["epitome_shape"],
    sampler=config["sampler"],
    learner=config["learner"],
    spatial_stride=config["spatial_stride"],
    offset_scale=config["offset_scale"],
    routing_momentum=config["routing_momentum"],
    channel_roll=config["channel_roll"],
    name=layer.name,
  )
  if isinstance(layer, EpitomeDense):
    args["units"] = config["units"]
  else:
    for key in (
      "filters",
      "kernel_size",
      "strides",
      "padding",
      "dilation_rate",
      "groups",
    ):
      args[key] = config[key]
  twin = cls(**args)
  shape = _input_shape(layer)[1:]
  stack = [k2.Input(shape), twin]
  if bn is not None:
    stack.append(
      k2.layers.BatchNormalization(
        epsilon=bn.epsilon, center=bn.center, scale=bn.scale, name=bn.name
      )
    )
  model = k2.Sequential(stack, name="twin")  # a short name scope: fewer bytes of names
  bridge.copy_weights(layer, twin)
  if bn is not None:
    bridge.copy_weights(bn, model.layers[-1])
  return model


def _check(model, quantize, representative_data, batch_size) -> Optional[int]:
  """Checks the arguments; returns ``batch_size`` as an int (or ``None``)."""
  batch_size = spec.check_export_args(quantize, representative_data, batch_size)
  if (
    not isinstance(model, keras.Model)
    or not model.built
    or not getattr(model, "inputs", None)
  ):
    raise ValueError(
      f"export_tflite: model '{getattr(model, 'name', model)}' must be a built Keras 3 "
      "functional or Sequential model with an Input"
    )
  for layer in model._flatten_layers(include_self=False):
    if getattr(layer, "compute_dtype", "float32") != "float32":
      raise ValueError(
        f"export_tflite: layer '{layer.name}' computes in {layer.compute_dtype}; "
        "export a float32 model: save it (model.save), set "
        "keras.mixed_precision.set_global_policy('float32'), load it and export"
      )
  return batch_size


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
  """Exports a Keras 3 model with epitome layers to TFLite.

  The arguments mean what they mean for :func:`keras_epitome.export_tflite`
  (docs/export.md): ``form`` (``"factored"`` or ``"materialized"``),
  ``quantize`` (``None``, ``"dynamic"``, ``"int8"`` with
  ``representative_data``), ``batch_size`` of the file's inputs,
  ``fold_batchnorm``, ``remix``, ``choose``, ``objective``, ``cost_model``,
  ``sparse``, and ``form_report`` (a list that receives one record per
  epitome layer).

  Args:
    model: a built Keras 3 functional or Sequential model (nested models
      included) on any backend.
    path: where to write the file (optional).

  Returns:
    The ``.tflite`` bytes.

  Raises:
    ValueError: for bad arguments, an unbuilt model, an epitome layer called
      more than once, a mixed-precision model, or (on a backend other than
      TensorFlow) a ``cost_model`` object or ``form_report`` (the child
      process cannot hand them back).

  Example:
    >>> model = keras.Sequential([keras.Input((8,)), EpitomeDense(16, compression=2)])
    >>> isinstance(export_tflite(model), bytes)
    True
  """
  batch_size = _check(model, quantize, representative_data, batch_size)
  if keras.backend.backend() != "tensorflow":
    return _export_in_tensorflow_process(
      model,
      path,
      dict(
        form=form,
        quantize=quantize,
        batch_size=batch_size,
        fold_batchnorm=fold_batchnorm,
        remix=remix,
        choose=choose,
        objective=objective,
        cost_model=cost_model,
        sparse=sparse,
      ),
      representative_data,
      form_report,
    )
  import tensorflow as tf

  from keras_epitome import export as keras2_export
  from keras_epitome import litert

  twins, folded = {}, set()
  for layer in epitome_layers(model):
    bn = _foldable_batchnorm(layer) if (fold_batchnorm and form == "factored") else None
    twin = _keras2_twin(layer, bn)
    records = []
    inference = keras2_export.inference_model(
      twin,
      form,
      fold_batchnorm=fold_batchnorm,
      remix=remix,
      precision="int8" if quantize == "int8" else "float",
      choose=choose,
      form_report=records,
      objective=objective,
      cost_model=cost_model,
    )
    if form_report is not None:
      form_report.extend(records)
    twins[id(layer)] = (layer, inference)
    if bn is not None:
      folded.add(id(bn))
  bns = [b for b in model._flatten_layers(include_self=False) if id(b) in folded]

  class Bridge(tf.Module):
    """The Keras 3 model with its epitome layers running their Keras 2 twins."""

    def __init__(self):
      super().__init__(name="keras3_bridge")
      self.keras3_variables = [v.value for v in model.variables]
      self.twins = [inference for _, inference in twins.values()]
      self.inputs = model.inputs

    def __call__(self, x, training=False):
      saved = {}
      try:
        for layer, inference in twins.values():
          saved[id(layer)] = layer.__dict__.get("call")

          def call(inputs, *args, _layer=layer, _inf=inference, **kwargs):
            y = _inf(inputs, training=False)
            act = _layer.activation
            return act(y) if act is not None else y

          layer.call = call
        for bn in bns:
          saved[id(bn)] = bn.__dict__.get("call")
          bn.call = lambda inputs, *args, **kwargs: inputs
        return model(x, training=False)
      finally:
        for layer in [t for t, _ in twins.values()] + bns:
          if saved.get(id(layer)) is None:
            layer.__dict__.pop("call", None)
          else:
            layer.call = saved[id(layer)]

  return _write(
    litert.convert(Bridge(), quantize, representative_data, batch_size, sparse), path
  )


def _write(tflite: bytes, path: Optional[str]) -> bytes:
  if path is not None:
    with open(path, "wb") as f:
      f.write(tflite)
  return tflite


_CHILD = """
import json, sys
import numpy as np
import keras
import keras_epitome.keras3 as ke
args = json.loads(sys.argv[1])
model = keras.models.load_model(args.pop("model"))
data = args.pop("data")
data = None if data is None else np.load(data)
out = args.pop("out")
ke.export_tflite(model, out, representative_data=data, **args)
"""


def _export_in_tensorflow_process(model, path, args, representative_data, form_report):
  if form_report is not None or not (
    args["cost_model"] is None or isinstance(args["cost_model"], str)
  ):
    raise ValueError(
      f"export_tflite: on the {keras.backend.backend()!r} backend the export runs in a "
      "TensorFlow child process, which cannot fill form_report or take a cost_model "
      "object (a JSON path works); export on the TensorFlow backend for those: "
      "model.save('m.keras'), then KERAS_BACKEND=tensorflow, keras.models.load_model, "
      "keras_epitome.keras3.export_tflite"
    )
  with tempfile.TemporaryDirectory() as tmp:
    saved = os.path.join(tmp, "model.keras")
    model.save(saved)
    data = None
    if representative_data is not None:
      data = os.path.join(tmp, "data.npy")
      np.save(data, np.asarray(representative_data, np.float32))
    out = os.path.join(tmp, "model.tflite")
    child_args = dict(args, model=saved, data=data, out=out)
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    done = subprocess.run(
      [sys.executable, "-c", _CHILD, json.dumps(child_args)],
      capture_output=True,
      text=True,
      env=env,
    )
    if done.returncode != 0:
      raise RuntimeError(
        "export_tflite: the export on the TensorFlow backend (a child process) "
        "failed; is TensorFlow installed? Its error:\n" + done.stderr[-3000:]
      )
    with open(out, "rb") as f:
      tflite = f.read()
  return _write(tflite, path)
