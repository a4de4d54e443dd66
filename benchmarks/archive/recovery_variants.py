r"""Recovery variants beyond ``ke.distill``'s recipe, from one cached conversion.

``recovery_recipes.py`` varies ``ke.distill``'s arguments. This script runs
other ideas for the one-epoch recovery after a data-aware conversion, all in
one training loop (Adam, cosine decay, KL to the trained model's outputs at
T = 1, batch 128, the same image order) so that they differ only in the idea:

* ``{}``: the loop alone (the control; ``ke.distill``'s default recipe).
* ``freeze_offsets``: the routing maps are not trained.
* ``ema``: evaluate an exponential moving average of the weights (decay).
* ``bn_frozen``: BatchNorm in inference mode (moving statistics kept).
* ``optimizer: "sgd"``: SGD with Nesterov momentum 0.9 instead of Adam.
* ``features`` + ``beta``: also match these layers' outputs to the trained
  model's (mean squared error over the trained model's mean square).
* ``fade``: gradual conversion. Each epitome layer's output gets
  ``lam * conv(x, K - K(E))``, the frozen difference between the trained
  kernel and the sampled one, and the other layers start from the trained
  model's weights, so training starts from the trained model; ``lam`` falls
  from 1 to 0 (cosine) over this fraction of the steps, then the epitome
  model trains alone.
* ``local`` + ``beta``: teacher-forced block losses. For each ``[first,
  last]`` pair of layer names, the student's layers from ``first`` to
  ``last`` read the *trained* model's input of ``first`` and their output is
  matched to the trained model's output of ``last`` (mean squared error over
  its mean square), so every block gets a signal that does not pass through
  the other converted layers (block reconstruction, over the whole epoch).
* ``warmup``: the learning rate rises linearly from 0 over this fraction of
  the steps before the cosine decay (the converted model is not kicked by
  full-size Adam steps while Adam's moment estimates are still empty).
* ``beta_2``: Adam's second-moment decay (default 0.999); lower adapts the
  step sizes faster after the fresh start.
* ``clipnorm``: the gradient's global norm is clipped to this before each
  Adam step (keeps the first steps from kicking the converted model).
* ``seed``: reseeds the recovery's shuffle (and mixup draws) only; default
  ``--seed``.
* ``loss``: ``"kl"`` (the default) or ``"mse"``: the mean squared
  difference of the two models' logits, each centred over the classes
  (softmax ignores a shift), instead of the KL divergence; ``"kl+mse"`` sums
  the two.
* ``chunk_scales``: each epitome layer's sampled kernel is multiplied by
  trained scales, one per (input channel, output chunk) and one per (input
  chunk, output channel), starting at 1 (a few hundred numbers per layer),
  so that weights tied by the epitome may differ by a factor.
* ``precise_bn``: after the loop, each BatchNorm's moving mean and variance
  are replaced by its input's statistics over this many recovery images
  (inference mode, one BatchNorm after the other in network order), instead
  of the moving averages collected while the weights changed.
* ``mixup``: distill on mixed images ``lam * x + (1 - lam) * x'`` (``lam``
  drawn from Beta(mixup, mixup) per image), a richer input distribution for
  the teacher to label.

Same trained model, calibration images, conversion cache and flags as
``recovery_recipes.py`` (``--ratio``, ``--allocate``, ...).

Usage:
  python -m benchmarks.archive.recovery_variants --ratio=4 --allocate \
      --variants='{}' --variants='{"fade": 0.5}'
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import keras_epitome as ke
from benchmarks import recovery_recipes as R  # also defines the shared flags
from keras_epitome import calibration

C = R.C
keras = ke.keras
FLAGS = flags.FLAGS
flags.DEFINE_multi_string("variants", ["{}"], "JSON variant; repeat the flag.")
flags.DEFINE_integer(
  "recovery_size", 0, "Recovery images (0: all; fewer for a smoke test)."
)


class _Faded(keras.layers.Layer):
  """``a + lam * b`` with ``lam`` a shared, non-trained variable."""

  def __init__(self, lam, **kwargs):
    super().__init__(**kwargs)
    self.lam = lam

  def call(self, a, b):
    return a + self.lam * b


def _faded_model(student, stock, lam):
  """``student`` (a chain) with fading residuals to ``stock``'s kernels.

  The student's other layers get ``stock``'s weights, in the student's
  channel order (``permute_channels`` reorders an epitome layer's outputs,
  the BatchNorm after it and the next layer's inputs).
  """
  order = {c.name: c.output_order for c in student.epitome_report.calibration}
  x = inputs = keras.Input(student.input_shape[1:])
  perm = None  # channel order of the tensor flowing in
  for layer in student.layers[1:]:
    trained = stock.get_layer(layer.name).get_weights()
    if isinstance(layer, ke.layers.EpitomeMixin):
      kernel = trained[0] if perm is None else trained[0][..., perm, :]
      perm = order.get(layer.name)
      if perm is not None:
        kernel = kernel[..., perm]
      sampled = layer._sample(*layer._base_offsets()).numpy()  # noqa: SLF001
      residual = keras.layers.Conv2D(
        kernel.shape[-1],
        kernel.shape[:2],
        padding=layer.padding,
        use_bias=False,
        trainable=False,
        name=layer.name + "_residual",
      )
      y = _Faded(lam, name=layer.name + "_fade")(layer(x), residual(x))
      residual.set_weights([kernel - sampled])
      x = y
      continue
    if trained:
      if isinstance(layer, keras.layers.BatchNormalization) and perm is not None:
        trained = [w[perm] for w in trained]
      elif perm is not None:  # a stock kernel layer reads the permuted channels
        trained[0] = trained[0][..., perm, :]
        perm = None
      layer.set_weights(trained)
    x = layer(x)
  return keras.Model(inputs, x)


def _add_chunk_scales(model):
  """Per-chunk kernel scales on every epitome layer (see ``chunk_scales``)."""
  scales = []
  for layer in ke.layers.epitome_layers(model):
    g = layer.epitome_geometry
    cin, cout = layer.kernel.shape[-2:]
    a = tf.Variable(tf.ones([cin, g.num_out_chunks]), name=layer.name + "/a")
    b = tf.Variable(tf.ones([g.num_in_chunks, cout]), name=layer.name + "/b")
    out_chunk = np.minimum(np.arange(cout) // g.cout_e, g.num_out_chunks - 1)
    in_chunk = np.minimum(np.arange(cin) // g.cin_e, g.num_in_chunks - 1)
    sample = layer._sample  # noqa: SLF001

    def scaled(*offsets, sample=sample, a=a, b=b, oc=out_chunk, ic=in_chunk):
      s = tf.gather(a, oc, axis=1) * tf.gather(b, ic, axis=0)
      return sample(*offsets) * s

    layer._sample = scaled  # noqa: SLF001
    layer.train_form = "kernel"
    scales += [a, b]
  return scales


def run(variant, stock, model, xr):
  seed = variant.get("seed", FLAGS.seed)  # reseeds the recovery only
  keras.utils.set_random_seed(seed)
  student = keras.models.clone_model(model)
  student.set_weights(model.get_weights())
  student.epitome_report = model.epitome_report
  lam = tf.Variable(0.0, trainable=False)
  extra = _add_chunk_scales(student) if variant.get("chunk_scales") else []
  net = student
  if "fade" in variant:
    lam.assign(1.0)
    net = _faded_model(student, stock, lam)
  bs = FLAGS.batch_size
  epochs = variant.get("epochs", 1)
  steps = epochs * -(-len(xr) // bs)
  lr = variant.get("lr", 3e-3)
  # Linear from 0 to lr over the warmup steps (if any), then the cosine.
  schedule = ke.distillation.cosine_schedule(
    lr, steps, int(variant.get("warmup", 0.0) * steps)
  )
  if variant.get("optimizer", "adam") == "sgd":
    opt = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
  else:
    opt = keras.optimizers.Adam(
      schedule,
      beta_2=variant.get("beta_2", 0.999),
      global_clipnorm=variant.get("clipnorm"),
    )
  variables = [
    v
    for v in net.trainable_variables
    if not (variant.get("freeze_offsets") and "offsets" in v.name)
  ] + extra
  names = variant.get("features", [])
  beta = variant.get("beta", 1.0)
  taps_s = keras.Model(
    net.inputs, [net.get_layer(n).output for n in names] + [net.output]
  )
  taps_t = keras.Model(
    stock.inputs, [stock.get_layer(n).output for n in names] + [stock.output]
  )
  training = not variant.get("bn_frozen", False)
  local = variant.get("local", [])
  if local and any(
    c.output_order is not None for c in model.epitome_report.calibration
  ):
    raise ValueError("local: the conversion permuted channels; not supported here")
  blocks = [
    keras.Model(net.get_layer(a).input, net.get_layer(b).output) for a, b in local
  ]
  local_t = (
    keras.Model(
      stock.inputs,
      [[stock.get_layer(a).input, stock.get_layer(b).output] for a, b in local],
    )
    if local
    else None
  )
  mixup = float(variant.get("mixup", 0.0))
  kind = variant.get("loss", "kl")
  if kind not in ("kl", "mse", "kl+mse"):
    raise ValueError(f"loss: {kind!r}; valid: 'kl', 'mse', 'kl+mse'")
  mix_rng = np.random.default_rng(seed + 100)

  def relative(a, b):
    return tf.reduce_mean(tf.square(a - b)) / (tf.reduce_mean(tf.square(b)) + 1e-6)

  @tf.function
  def step(xb):
    t = tf.nest.flatten(taps_t(xb, training=False))
    pairs = local_t(xb, training=False) if local else []
    with tf.GradientTape() as tape:
      s = tf.nest.flatten(taps_s(xb, training=training))
      tl, sl = tf.nn.log_softmax(t[-1]), tf.nn.log_softmax(s[-1])
      loss = 0.0
      if kind in ("kl", "kl+mse"):
        loss += tf.reduce_mean(tf.reduce_sum(tf.exp(tl) * (tl - sl), -1))
      if kind in ("mse", "kl+mse"):
        centred = [z - tf.reduce_mean(z, -1, keepdims=True) for z in (s[-1], t[-1])]
        loss += tf.reduce_mean(tf.square(centred[0] - centred[1]))
      for a, b in zip(s[:-1], t[:-1], strict=True):
        loss += beta / len(names) * relative(a, b)
      for block, (t_in, t_out) in zip(blocks, pairs, strict=True):
        loss += beta / len(blocks) * relative(block(t_in, training=training), t_out)
    grads = tape.gradient(loss, variables)
    opt.apply_gradients(
      [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    )

  decay = variant.get("ema", 0.0)
  shadow = [tf.Variable(w) for w in student.weights] if decay else []
  fade_steps = max(1, int(variant.get("fade", 0.0) * steps))
  k = 0
  for epoch in range(epochs):
    order = np.random.default_rng(seed + epoch).permutation(len(xr))
    for i in range(0, len(xr), bs):
      if "fade" in variant:
        lam.assign(0.5 * (1 + math.cos(math.pi * min(1.0, k / fade_steps))))
      xb = xr[order[i : i + bs]]
      if mixup:
        lam_b = mix_rng.beta(mixup, mixup, (len(xb),) + (1,) * (xb.ndim - 1))
        xb = (lam_b * xb + (1 - lam_b) * xb[mix_rng.permutation(len(xb))]).astype(
          xb.dtype
        )
      step(tf.constant(xb))
      if decay:
        for sw, w in zip(shadow, student.weights, strict=True):
          sw.assign(decay * sw + (1 - decay) * w)
      k += 1
  if decay:
    for sw, w in zip(shadow, student.weights, strict=True):
      w.assign(sw)
  if variant.get("precise_bn"):
    for bn in student.layers:
      if isinstance(bn, keras.layers.BatchNormalization):
        ((mean, var),) = calibration._input_moments(
          student, [bn], xr[: int(variant["precise_bn"])], 256
        )
        bn.moving_mean.assign(mean.astype("float32"))
        bn.moving_variance.assign(var.astype("float32"))
  return student


def main(argv):
  del argv
  stock, model, (xr, _), test = R.converted_model()
  if FLAGS.recovery_size:
    xr = xr[: FLAGS.recovery_size]
  acc_0 = C.evaluate(model, test)
  print(f"stock {C.evaluate(stock, test):.4f}; converted {acc_0:.4f}", flush=True)
  for text in FLAGS.variants:
    t0 = time.time()
    student = run(json.loads(text), stock, model, xr)
    R.report(model, student, test, acc_0, t0, variant=text)


if __name__ == "__main__":
  app.run(main)
