"""BatchNormalization refits after a layer's fit, and restandardization.

After each fitted layer, the moving statistics of the BatchNormalization
layers that follow it are re-estimated on the converted model's activations
(exactly, over all calibration samples, not with a momentum) and their scale
and offset refitted per channel to the original BatchNorm's outputs
(:func:`refit_batchnorm`). After a kept gradient pass, every BatchNorm after
the first epitome layer gets the mean and variance of its input with its
scale and offset changed so that its inference-mode output stays the same
(:func:`restandardize_batchnorms`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from keras_epitome.backend import keras
from keras_epitome.calibration import data


def refit_batchnorm(bn, x: np.ndarray, target: Optional[np.ndarray]):
  """Moving statistics from ``x``; with ``target``, scale and offset too.

  The scale and offset are the per-channel least-squares fit of ``target``
  (the original BatchNorm's output) from the normalized ``x``.
  """
  axes = tuple(range(x.ndim - 1))
  x = x.astype(np.float64)
  mean, var = x.mean(axes), x.var(axes)
  bn.moving_mean.assign(mean.astype(np.float32))
  bn.moving_variance.assign(var.astype(np.float32))
  if target is None or bn.gamma is None or bn.beta is None:
    return
  z = (x - mean) / np.sqrt(var + bn.epsilon)
  t = target.astype(np.float64)
  t_mean = t.mean(axes)
  gamma = (z * (t - t_mean)).mean(axes) / np.maximum((z * z).mean(axes), 1e-12)
  bn.gamma.assign(gamma.astype(np.float32))
  bn.beta.assign(t_mean.astype(np.float32))


def input_moments(model, layers: Sequence, x, batch_size) -> list:
  """Per layer, the mean and variance over ``x`` of each channel of its input.

  One forward pass in inference mode, in batches; float64 sums. The channels
  are the input's last axis.
  """
  probe = keras.Model(model.inputs, [la.input for la in layers])
  count = [0] * len(layers)
  s1 = [0.0] * len(layers)
  s2 = [0.0] * len(layers)
  for xb in data.in_batches(x, batch_size):
    outs = probe(xb, training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for i, out in enumerate(outs):
      a = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
      count[i] += len(a)
      s1[i] = s1[i] + a.sum(0)
      s2[i] = s2[i] + np.square(a).sum(0)
  moments = []
  for n, total, squares in zip(count, s1, s2, strict=True):
    mean = total / n
    moments.append((mean, np.maximum(squares / n - np.square(mean), 0.0)))
  return moments


def restandardize_batchnorms(model, bns: Sequence, x, batch_size) -> float:
  """Moving statistics of ``bns`` from the data, the inference function kept.

  ``bns``: BatchNormalization layers of ``model`` over the last axis.

  A gradient pass that runs a BatchNormalization in inference mode changes
  the layers before it, not the BatchNorm's moving statistics, so those no
  longer describe the layer's input: once training runs the layer on batch
  statistics (``fit``, :func:`keras_epitome.distill`), it computes another
  function. Each BatchNorm gets the mean and variance of its input on ``x``
  and the scale and offset that make ``gamma' (z - mean') / sqrt(var' + eps)
  + beta'`` equal to its old output for every ``z``. A BatchNorm without a
  scale keeps its variance (and one without an offset its mean): those
  cannot be moved without changing the function.

  Returns:
    The largest change of a moving mean, in units of the old moving standard
    deviation (0.0 for no BatchNorms).
  """
  if not bns:
    return 0.0
  worst = 0.0
  for bn, (mean, var) in zip(
    bns, input_moments(model, bns, x, batch_size), strict=True
  ):
    old_mean = bn.moving_mean.numpy().astype(np.float64)
    old_var = bn.moving_variance.numpy().astype(np.float64)
    old_std = np.sqrt(old_var + bn.epsilon)
    if bn.beta is None:
      mean = old_mean
    if bn.gamma is None:
      var = old_var
    new_std = np.sqrt(var + bn.epsilon)
    gamma = (
      np.ones_like(old_std) if bn.gamma is None else bn.gamma.numpy().astype(np.float64)
    )
    if bn.beta is not None:
      bn.beta.assign(
        (bn.beta.numpy() + gamma * (mean - old_mean) / old_std).astype(np.float32)
      )
    if bn.gamma is not None:
      bn.gamma.assign((gamma * new_std / old_std).astype(np.float32))
    bn.moving_mean.assign(mean.astype(np.float32))
    bn.moving_variance.assign(var.astype(np.float32))
    worst = max(worst, float(np.max(np.abs(mean - old_mean) / old_std)))
  return worst
