r"""Small, fast FSDD diagnostic for the 1D accuracy gap (issue 9).

One model (the issue's "simple model"): a stock strided stem Conv1D(32, 80,
stride 4), then three Conv1D(k=3) with 32-64-64 channels, BN, ReLU, max-pool 4
after each, GAP, Dense 10. Only the k=3 convolutions change between variants:

* ``stock``: plain Conv1D;
* ``thinner``: plain Conv1D, width multiplier matched to the ``fixed`` model's
  stored parameters;
* ``fixed`` / ``learned``: ``EpitomeConv1D(compression=r, sampler=...)``;
* ``ref_fixed``: an independent, plain-autodiff epitome layer (``tf.gather``
  of a static index table built by the NumPy oracle) with the same epitome
  shape, initializer and zero offsets: a check of the package's layer;
* ``fixed_in`` / ``fixed_out``: share input channels only (``Cout_E = Cout``)
  or output channels only (``Cin_E = Cin``);
* ``fixed_spread``: ``fixed`` started from spread channel offsets.

Each run appends a JSON line to ``--out``.

Usage:
  python -m benchmarks.archive.diag_1d --variants=thinner,fixed,ref_fixed \
      --ratio=16 --seeds=0,1 --epochs=10
"""

from __future__ import annotations

import json
import math
import time

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags

import keras_epitome as ke  # noqa: E402
from benchmarks import harness as C  # noqa: E402
from examples import datasets  # noqa: E402
from keras_epitome import sampling  # noqa: E402
from tests import oracle  # noqa: E402

keras = ke.keras
FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["thinner", "fixed", "learned"], "Variants.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
flags.DEFINE_float("ratio", 16.0, "Compression ratio.")
flags.DEFINE_integer("epochs", 10, "Epochs.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam peak LR, cosine to 0.")
flags.DEFINE_integer("shift", 0, "Random time shift (samples, +-) for augmentation.")
flags.DEFINE_string("kw", "{}", "JSON dict of extra EpitomeConv1D kwargs.")
flags.DEFINE_string("tag", "", "Free-form tag stored with each record.")
flags.DEFINE_integer(
  "harden_epochs",
  0,
  "After training an epitome model: ke.harden_routing, then fine-tune this "
  "many epochs (LR 10x lower, cosine); records accuracy at each stage.",
)
flags.DEFINE_string("out", "/tmp/diag_1d.jsonl", "JSON-lines output.")
flags.DEFINE_string(
  "data_dir",
  "/work/shared/data/fsdd/recordings",
  "FSDD recordings.",
)


class RefEpitomeConv1D(keras.layers.Layer):
  """Independent check: kernel = gather(flat epitome, static table), autodiff."""

  def __init__(self, filters, kernel_size, epitome_shape, roll=False, **kw):
    super().__init__(**kw)
    self.filters, self.k, self.es = filters, kernel_size, tuple(epitome_shape)
    self.roll = roll

  def build(self, input_shape):
    ks = (self.k, int(input_shape[-1]), self.filters)
    g = sampling.EpitomeGeometry(ks, self.es)  # channel_roll=0: the separable map
    routing = sampling.fixed_routing(g)
    ids = np.arange(g.epitome_size, dtype=np.float64).reshape(self.es)
    table = oracle.sample_kernel(ids, routing, g)
    if self.roll:  # output chunk b reads input channels rolled by b (wrapping)
      table = np.zeros(ks)
      for s, ci, co in np.ndindex(*ks):
        (_, u), (b, v) = divmod(ci, g.cin_e), divmod(co, g.cout_e)
        table[s, ci, co] = ids[s, (u + b) % g.cin_e, v]
    self.table = tf.constant(np.rint(table).astype(np.int32))
    base = keras.initializers.GlorotUniform()

    def init(shape, dtype=None):
      return tf.reshape(
        tf.reshape(base(ks, dtype=dtype), [-1])[: g.epitome_size], shape
      )

    self.epitome = self.add_weight("epitome", shape=self.es, initializer=init)

  def call(self, x):
    kernel = tf.gather(tf.reshape(self.epitome, [-1]), self.table)
    return tf.nn.conv1d(x, kernel, 1, "SAME")


def make_model(variant, ratio, length, width=1.0, extra=None, stock_stem=False):
  extra = dict(extra or {})
  c = [max(1, int(round(ch * width))) for ch in (32, 32, 64, 64)]
  if stock_stem or variant == "thinner_body":
    c[0] = 32
  x = inputs = keras.Input((length, 1))
  x = keras.layers.Conv1D(c[0], 80, strides=4, padding="same", use_bias=False)(x)
  cin = c[0]
  for i, ch in enumerate(c):
    if i > 0:
      ks = (3, cin, ch)
      es = sampling.epitome_shape_for_ratio(ks, ratio)
      if variant in ("stock", "thinner", "thinner_body"):
        conv = keras.layers.Conv1D(ch, 3, padding="same", use_bias=False)
      elif variant in ("fixed", "learned", "fixed_spread"):
        kw = dict(sampler="fixed" if variant != "learned" else "learned")
        kw.update(extra)
        conv = ke.EpitomeConv1D(
          ch, 3, padding="same", use_bias=False, compression=ratio, **kw
        )
      elif variant in ("ref_fixed", "ref_roll"):
        conv = RefEpitomeConv1D(ch, 3, es, roll=variant == "ref_roll")
      elif variant in ("fixed_in", "fixed_out"):
        n = 3 * cin * ch / ratio / 3
        es = (
          (3, max(1, math.floor(n / ch)), ch)
          if variant == "fixed_in"
          else (3, cin, max(1, math.floor(n / cin)))
        )
        conv = ke.EpitomeConv1D(
          ch, 3, padding="same", use_bias=False, epitome_shape=es, sampler="fixed"
        )
      else:
        raise ValueError(f"unknown variant {variant!r}")
      x = conv(x)
      cin = ch
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPool1D(4)(x)
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(inputs, keras.layers.Dense(10)(x))


def offsets_of(model):
  out = {}
  for layer in model.layers:
    if isinstance(layer, ke.EPITOME_LAYERS):
      r = layer.routing_map
      out[layer.name] = (np.asarray(r.in_offsets), np.asarray(r.out_offsets))
  return out


def circ(a, b, size):
  d = np.mod(a - b, size)
  return np.minimum(d, size - d)


def mean_offset_move(before, after, model):
  moves = []
  for layer in model.layers:
    if layer.name in before:
      g = layer.epitome_geometry
      moves += list(circ(after[layer.name][0], before[layer.name][0], g.cin_e))
      moves += list(circ(after[layer.name][1], before[layer.name][1], g.cout_e))
  return float(np.mean(moves)) if moves else 0.0


def test_accuracy(model, data):
  (_, _), (xt, yt) = data
  pred = model.predict(xt, batch_size=256, verbose=0)
  return float(np.mean(np.argmax(pred, -1) == yt))


def train(model, data, seed, epochs=None, learning_rate=None):
  (x, y), (xt, yt) = data
  epochs = epochs or FLAGS.epochs
  steps = epochs * math.ceil(len(x) / FLAGS.batch_size)
  sched = keras.optimizers.schedules.CosineDecay(
    learning_rate or FLAGS.learning_rate, steps
  )
  model.compile(
    optimizer=keras.optimizers.Adam(sched),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
  if FLAGS.shift:
    s = FLAGS.shift

    def shift(w, label):
      n = tf.random.uniform([], -s, s + 1, tf.int32)
      padded = tf.pad(w, [[s, s], [0, 0]])
      return padded[s - n : s - n + tf.shape(w)[0]], label

    ds = ds.map(shift)
  ds = ds.batch(FLAGS.batch_size).prefetch(2)
  model.fit(ds, epochs=epochs, verbose=0)
  return test_accuracy(model, data)


def main(argv):
  del argv
  data = datasets.load_fsdd(FLAGS.data_dir)
  length = data[0][0].shape[1]
  extra = json.loads(FLAGS.kw)
  for seed in (int(s) for s in FLAGS.seeds):
    for variant in FLAGS.variants:
      keras.utils.set_random_seed(seed)
      width = 1.0
      if variant in ("thinner", "thinner_body"):
        target = C.stored_params(make_model("fixed", FLAGS.ratio, length))
        body = variant == "thinner_body"

        def build(width=1.0, body=body):
          return make_model("stock", 1, length, width, stock_stem=body)

        width = C.thinner_width(build, target)
        keras.utils.set_random_seed(seed)
      model = make_model(variant, FLAGS.ratio, length, width, extra)
      if variant == "fixed_spread":
        C.spread_routing(model)
      before = offsets_of(model)
      t = time.time()
      acc = train(model, data, seed)
      rec = dict(
        variant=variant,
        ratio=FLAGS.ratio,
        seed=seed,
        epochs=FLAGS.epochs,
        shift=FLAGS.shift,
        kw=extra,
        tag=FLAGS.tag,
        width=width,
        accuracy=acc,
        params=C.stored_params(model),
        offset_move=mean_offset_move(before, offsets_of(model), model),
        seconds=round(time.time() - t, 1),
      )
      if FLAGS.harden_epochs and any(
        isinstance(la, ke.EPITOME_LAYERS) for la in model.layers
      ):
        hard = ke.harden_routing(model)
        rec["hardened_accuracy"] = test_accuracy(hard, data)
        rec["finetuned_accuracy"] = train(
          hard, data, seed, FLAGS.harden_epochs, FLAGS.learning_rate / 10
        )
      print(json.dumps(rec), flush=True)
      with open(FLAGS.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  app.run(main)
