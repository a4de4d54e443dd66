"""The examples' models, counting rules, training loop and export report.

Models are built directly from the epitome layers (``ke.EpitomeConv2D(...,
compression=r, sampler=..., learner=...)``), so every method trains the same
architecture with the same schedule and only the way each kernel is stored
changes:

* ``stock``: plain Keras layers (ratio 1);
* ``nes_param`` / ``nes_feature``: NES, learned routing map (``param`` or the
  ``feature`` transformation learner);
* ``wsnet``: WSNet's fixed sampling (same epitome shapes as NES, constant
  offsets: channels tiled, 1D filters strided over a long condensed filter);
* ``thinner``: a stock model with fewer channels and the same stored
  parameter count (width multiplier; built by ``benchmarks/harness.py``);
* ``pruning``: TF-MOT magnitude pruning of the same layers to the same number
  of non-zero weights (``benchmarks/harness.py``).

Counting rules (the same for every method): *stored parameters* are what
inference needs: epitome + routing map + bias for an epitome layer (not the
feature learner's network, which only trains the offsets), every weight of
other layers, the non-zeros of pruned kernels. *MACs* are multiply-adds per
example: stock layers count their kernel, epitome layers their factored form
(:meth:`EpitomeGeometry.macs_per_position`), pruned layers their dense
kernel (TFLite runs them dense).

The benchmarks reuse these through ``benchmarks/harness.py``, which adds the
measurement-only pieces (pruning baselines, latency loops, row output).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the results;
# keep warnings and errors. Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_epitome as ke  # noqa: E402

keras = ke.keras
import tensorflow as tf  # noqa: E402

KERAS_VERSION = 2  # which Keras the functions below build with (use_keras)


def use_keras(version: int) -> None:
  """Builds, trains and exports with Keras 3 (``keras``) or Keras 2 (``tf_keras``).

  Keras 3 uses :mod:`keras_epitome.keras3`; Keras 2 the package's Keras 2 API
  (``ke.keras``), as the benchmarks do.
  """
  global keras, ke, KERAS_VERSION
  if version == 3:
    import keras as keras3  # noqa: PLC0415

    import keras_epitome.keras3 as ke3  # noqa: PLC0415

    keras, ke = keras3, ke3
  elif version == 2:
    import keras_epitome as ke2  # noqa: PLC0415

    keras, ke = ke2.keras, ke2
  else:
    raise ValueError(f"Keras version must be 2 or 3, got {version!r}")
  KERAS_VERSION = version


METHODS = ("stock", "nes_param", "nes_feature", "wsnet", "thinner", "pruning")
EPITOME_METHODS = {
  "nes_param": dict(sampler="learned", learner="param"),
  "nes_feature": dict(sampler="learned", learner="feature"),
  "wsnet": dict(sampler="fixed"),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_factory(method: str, ratio: float, offset_scale: float = 1.0) -> Callable:
  """Returns ``make(cls, filters, kernel_size, *, epitome_shape=None, **kw)``.

  ``cls`` is the stock class (``Conv1D``/``Conv2D``); for epitome methods the
  matching epitome layer is built with ``compression=ratio`` or, where the
  architecture gives one (WSNet's long 1D filters), an explicit epitome shape.
  """
  epitome_kw = EPITOME_METHODS.get(method)

  def make(cls, filters, kernel_size, *, epitome_shape=None, **kw):
    if epitome_kw is None or ratio <= 1:
      return cls(filters, kernel_size, **kw)
    extra = dict(epitome_kw)
    if extra.get("sampler") == "learned":
      extra["offset_scale"] = offset_scale
    if epitome_shape is not None:
      extra["epitome_shape"] = epitome_shape
    else:
      extra["compression"] = ratio
    return ke.layers.STOCK_TO_EPITOME[cls](filters, kernel_size, **extra, **kw)

  return make


def _width(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


def fashion_cnn(
  input_shape=(28, 28, 1),
  num_classes: int = 10,
  width: float = 1.0,
  make: Optional[Callable] = None,
  channels=(16, 32, 64, 64),
) -> keras.Model:
  """A small CNN: four 3x3 convolutions with BatchNorm, two poolings, GAP.

  The first convolution (one input channel, a few hundred weights) and the
  classifier stay stock; the other three go through ``make``.
  """
  make = make or conv_factory("stock", 1)
  c = [_width(ch, width) for ch in channels]
  conv = keras.layers.Conv2D
  x = inputs = keras.Input(input_shape)
  x = conv(c[0], 3, padding="same", use_bias=False, name="conv1")(x)
  pools_after = {0, 2} if input_shape[0] >= 16 else {2}
  for i in range(len(c)):
    if i > 0:
      x = make(conv, c[i], 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
    x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    if i in pools_after:
      x = keras.layers.MaxPool2D(name=f"pool{i + 1}")(x)
  x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="fashion_cnn")


def wsnet_first_filter_shape(kernel: int, filters: int, ratio: float):
  """WSNet's 1D scheme for a one-channel first layer: one condensed filter.

  ``Cout_E = 1`` and ``S_E = S + (Cout - 1) * stride``, with the largest
  integer stride that keeps epitome plus routing map within ``1/ratio`` of the
  kernel (at least stride 1).
  """
  routing = 1 + 2 * filters  # A=1 input offset, B offsets + B spatial offsets
  budget = kernel * filters / ratio - routing
  stride = max(1, int((budget - kernel) // (filters - 1)))
  return (kernel + (filters - 1) * stride, 1, 1)


def audio_cnn(
  length: int = 8000,
  num_classes: int = 10,
  width: float = 1.0,
  make: Optional[Callable] = None,
  ratio: float = 1.0,
  channels=(32, 32, 64, 64),
  first_kernel: int = 80,
  first_stride: int = 4,
  first_epitome: str = "wsnet",
) -> keras.Model:
  """A WSNet-style 1D CNN on raw audio (after Dai et al.'s M5).

  A long strided first filter bank, three 3-tap convolutions, max pooling by
  4 after each, BatchNorm, global average pooling. The 3-tap convolutions go
  through ``make``; the first one uses WSNet's condensed-filter epitome
  (:func:`wsnet_first_filter_shape`) when ``first_epitome="wsnet"``, the
  default channel rule like the others when ``first_epitome="channels"``, and
  stays a stock layer with ``first_epitome="stock"`` (its input has one
  channel, so the channel rule keeps ``32 / ratio`` distinct filters and the
  condensed filter at 16x is one filter shifted by one sample).
  """
  if first_epitome not in ("wsnet", "channels", "stock"):
    raise ValueError(
      "audio_cnn: first_epitome must be 'wsnet', 'channels' or 'stock', got "
      f"{first_epitome!r}"
    )
  make = make or conv_factory("stock", 1)
  c = [_width(ch, width) for ch in channels]
  conv = keras.layers.Conv1D
  x = inputs = keras.Input((length, 1))
  for i, ch in enumerate(c):
    if i == 0:
      shape = None
      if ratio > 1 and first_epitome == "wsnet":
        shape = wsnet_first_filter_shape(first_kernel, ch, ratio)
      x = (conv_factory("stock", 1) if first_epitome == "stock" else make)(
        conv,
        ch,
        first_kernel,
        strides=first_stride,
        padding="same",
        use_bias=False,
        epitome_shape=shape,
        name="conv1",
      )(x)
    else:
      x = make(conv, ch, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
    x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    x = keras.layers.MaxPool1D(4, name=f"pool{i + 1}")(x)
  x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="audio_cnn")


def _layers(model):
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from _layers(layer)
    else:
      yield layer


def _unwrap(layer):
  return getattr(layer, "layer", layer)  # TF-MOT PruneLowMagnitude wrapper


def stored_params(model: keras.Model) -> int:
  """Numbers inference needs (see the module docstring for the rules)."""
  total = 0
  for layer in _layers(model):
    inner = _unwrap(layer)
    if isinstance(inner, ke.EPITOME_LAYERS):
      g = inner.epitome_geometry
      total += g.stored_size
      if inner.use_bias:
        total += int(np.prod(inner.bias.shape))
      continue
    for w in inner.weights:
      name = w.name.split("/")[-1]
      if name.startswith(("mask", "threshold", "pruning_step")):
        continue
      if name.startswith("kernel") and layer is not inner:
        total += int(np.count_nonzero(np.asarray(w)))
      else:
        total += int(np.prod(w.shape))
  return total


def macs(model: keras.Model) -> int:
  """Multiply-adds per example (factored form for epitome layers)."""
  total = 0
  for layer in _layers(model):
    inner = _unwrap(layer)
    if not isinstance(
      inner, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)
    ):
      continue
    out_shape = tuple(inner.output.shape)
    positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
    if isinstance(inner, ke.EPITOME_LAYERS):
      per = inner.epitome_geometry.macs_per_position()["factored"]
    else:
      k = inner.kernel.shape
      per = int(np.prod(k))
    total += positions * per
  return total


def train(
  model: keras.Model,
  data,
  *,
  epochs: int,
  batch_size: int,
  learning_rate: float = 3e-3,
  verbose: int = 1,
  callbacks=None,
  shift: int = 0,
) -> float:
  """Adam with a cosine learning-rate decay to zero; returns test accuracy.

  ``shift > 0`` augments 1D inputs ``(N, T, C)`` with a random time shift of
  up to ``shift`` samples either way (zeros fill), a new draw every epoch.
  """
  (x, y), (xt, yt) = data
  steps = epochs * math.ceil(len(x) / batch_size)
  schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
  model.compile(
    optimizer=keras.optimizers.Adam(schedule),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  if shift:
    if x.ndim != 3:
      raise ValueError(f"train: shift needs 1D inputs (N, T, C), got {x.shape}")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x))
    ds = ds.map(lambda w, label: (time_shift(w, shift), label))
    ds = ds.batch(batch_size).prefetch(2)
    model.fit(ds, epochs=epochs, verbose=verbose, callbacks=callbacks or [])
  else:
    model.fit(
      x,
      y,
      batch_size=batch_size,
      epochs=epochs,
      verbose=verbose,
      shuffle=True,
      callbacks=callbacks or [],
    )
  return evaluate(model, (xt, yt), batch_size)


def time_shift(wave, shift: int):
  """``wave`` ``(T, C)`` moved by a random ``n`` in ``[-shift, shift]`` samples."""
  n = tf.random.uniform([], -shift, shift + 1, tf.int32)
  padded = tf.pad(wave, [[shift, shift], [0, 0]])
  return padded[shift - n : shift - n + tf.shape(wave)[0]]


def evaluate(model, test, batch_size=256) -> float:
  xt, yt = test
  logits = model.predict(xt, batch_size=batch_size, verbose=0)
  return float(np.mean(np.argmax(logits, axis=-1) == yt))


def tflite_bytes(
  model: keras.Model, form: str = "factored", sparse: bool = False
) -> tuple:
  """``(bytes, how)``: the model as a TFLite flatbuffer.

  Epitome models go through :func:`keras_epitome.export_tflite` in ``form``;
  stock models through the plain converter. ``sparse``: mostly-zero weights
  in TFLite's sparse tensor format (``Optimize.EXPERIMENTAL_SPARSITY``).
  """
  if KERAS_VERSION == 3 or any(
    isinstance(la, ke.EPITOME_LAYERS) for la in _layers(model)
  ):
    how = (
      form
      if any(isinstance(la, ke.EPITOME_LAYERS) for la in _layers(model))
      else "stock"
    )
    return ke.export_tflite(model, form=form, sparse=sparse), how
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  if sparse:
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
  return converter.convert(), "stock"


def export_and_report(model, name: str, path: str, accuracy: float, x, y) -> dict:
  """Writes ``model``'s ``.tflite`` to ``path``, checks it on ``(x, y)``; one table row.

  Returns:
    The row the examples print: Keras and LiteRT accuracy, stored parameters,
    MACs and the file's size and form.
  """
  tflite, form = tflite_bytes(model)
  with open(path, "wb") as f:
    f.write(tflite)
  tflite_acc = np.mean(np.argmax(run_tflite(tflite, x), -1) == y)
  return {
    "model": name,
    "test acc %": f"{100 * accuracy:.2f}",
    f"tflite acc % ({len(x)})": f"{100 * tflite_acc:.2f}",
    "stored params": f"{stored_params(model):,}",
    "MACs": f"{macs(model):,}",
    ".tflite bytes": f"{len(tflite):,} ({form})",
    "file": path,
  }


def run_tflite(data: bytes, x: np.ndarray) -> np.ndarray:
  """Runs a TFLite model on a batch with LiteRT (:func:`keras_epitome.run_tflite`)."""
  from keras_epitome.litert import run_tflite as litert_run  # noqa: PLC0415

  return np.asarray(litert_run(data, x))


def format_table(rows: List[Dict], columns: List[str]) -> str:
  """A Markdown table of ``rows`` (dicts) with the given columns."""
  cells = [[str(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = (
    "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
  )
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  body = [
    "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
    for row in cells
  ]
  return "\n".join([line, sep, *body])


def spread_routing(model: keras.Model) -> None:
  """Starts every epitome layer from spread channel offsets instead of zeros.

  Input chunk ``a`` reads from offset ``a * Cin_E / A`` and output chunk ``b``
  from ``b * Cout_E / B`` (fractional: neighbouring channels blended), so
  chunks differ from the start instead of being exact copies (WSNet's tiling
  with all offsets 0 repeats the same ``Cout_E`` filters in every output
  chunk). Spatial offsets keep their pattern.
  """
  for layer in _layers(model):
    if isinstance(layer, ke.EPITOME_LAYERS):
      g = layer.epitome_geometry
      r = layer.routing_map
      layer.set_routing_map(
        ke.RoutingMap(
          np.arange(g.num_in_chunks) * g.cin_e / g.num_in_chunks,
          np.arange(g.num_out_chunks) * g.cout_e / g.num_out_chunks,
          r.spatial_offsets,
        )
      )
