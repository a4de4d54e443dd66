"""Tests of the examples' data loaders (examples/datasets.py) on tiny synthetic files.

No real data is needed, except scikit-learn's digits, which ships with
scikit-learn (the examples' fallback).
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import wave

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import datasets  # noqa: E402


def _write_idx(path, array, code=0x08, compress=True):
  array = np.asarray(array)
  header = bytes([0, 0, code, array.ndim]) + b"".join(
    struct.pack(">I", d) for d in array.shape
  )
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(payload)


def _write_wav(path, samples, rate=8000, width=2):
  with wave.open(path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(width)
    w.setframerate(rate)
    if width == 2:
      w.writeframes(np.asarray(samples, "<i2").tobytes())
    else:
      w.writeframes(np.asarray(samples, np.uint8).tobytes())


def _fake_fashion(folder, n_train=6, n_test=4, compress=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
    "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "y_train": rng.integers(0, 10, (n_train,), dtype=np.uint8),
    "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "y_test": rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  for key, stem in datasets.FASHION_MNIST_FILES.items():
    name = stem + (".gz" if compress else "")
    _write_idx(os.path.join(folder, name), arrays[key], compress=compress)
  return arrays


class IdxTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("uint8_gz", np.uint8, 0x08, True),
    ("uint8_raw", np.uint8, 0x08, False),
    ("int32_gz", np.int32, 0x0C, True),
    ("float32_raw", np.float32, 0x0D, False),
  )
  def test_round_trip(self, dtype, code, compress):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5)
    if dtype == np.uint8:
      array = np.abs(array)
    array = array.astype(dtype)
    path = os.path.join(self.get_temp_dir(), "a.idx" + (".gz" if compress else ""))
    _write_idx(path, array, code=code, compress=compress)
    got = datasets.read_idx(path)
    self.assertEqual(got.shape, array.shape)
    np.testing.assert_array_equal(got, array)

  def test_bad_magic(self):
    path = os.path.join(self.get_temp_dir(), "bad")
    with open(path, "wb") as f:
      f.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with self.assertRaisesRegex(ValueError, "magic"):
      datasets.read_idx(path)

  def test_truncated(self):
    path = os.path.join(self.get_temp_dir(), "short")
    with open(path, "wb") as f:
      f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with self.assertRaisesRegex(ValueError, "holds 3"):
      datasets.read_idx(path)


class FashionMnistTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(("gz", True), ("raw", False))
  def test_explicit_folder(self, compress):
    folder = self.get_temp_dir()
    arrays = _fake_fashion(folder, compress=compress)
    (x, y), (xt, yt) = datasets.load_fashion_mnist(folder, download=False)
    self.assertEqual(x.shape, (6, 28, 28, 1))
    self.assertEqual(xt.shape, (4, 28, 28, 1))
    self.assertEqual(x.dtype, np.float32)
    self.assertEqual(y.dtype, np.int64)
    np.testing.assert_allclose(x[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(yt, arrays["y_test"])

  def test_incomplete_folder_is_an_error(self):
    folder = self.get_temp_dir()
    _fake_fashion(folder)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with self.assertRaisesRegex(FileNotFoundError, "t10k-labels-idx1-ubyte"):
      datasets.load_fashion_mnist(folder, download=False)

  def test_keras_cache_is_used(self):
    home = self.get_temp_dir()
    cache = os.path.join(home, ".keras", "datasets", "fashion-mnist")
    os.makedirs(cache)
    _fake_fashion(cache, n_train=3, n_test=2)
    with _patched(datasets, "DEBIAN_FASHION_MNIST", os.path.join(home, "nothing")):
      with _env("HOME", home):
        (x, _), (xt, _) = datasets.load_fashion_mnist(download=False)
    self.assertEqual((len(x), len(xt)), (3, 2))

  def test_nothing_found_names_both_ways(self):
    home = self.get_temp_dir()
    with _patched(datasets, "DEBIAN_FASHION_MNIST", os.path.join(home, "nothing")):
      with _env("HOME", home):
        with self.assertRaisesRegex(
          FileNotFoundError, "(?s)apt install dataset-fashion-mnist.*load_data"
        ):
          datasets.load_fashion_mnist(download=False)


class DigitsTest(tf.test.TestCase):
  def test_split(self):
    (x, y), (xt, yt) = datasets.load_digits()
    self.assertEqual(len(x) + len(xt), 1797)
    self.assertEqual(x.shape[1:], (8, 8, 1))
    self.assertAllInRange(x, 0.0, 1.0)
    self.assertEqual(len(xt), int(np.ceil(0.25 * 1797)))
    # Stratified: every class in both halves.
    self.assertLen(np.unique(y), 10)
    self.assertLen(np.unique(yt), 10)

  def test_fixed_seed_is_reproducible(self):
    (_, y1), _ = datasets.load_digits(seed=3)
    (_, y2), _ = datasets.load_digits(seed=3)
    (_, y3), _ = datasets.load_digits(seed=4)
    np.testing.assert_array_equal(y1, y2)
    self.assertFalse(np.array_equal(y1, y3))

  def test_bad_fraction(self):
    with self.assertRaisesRegex(ValueError, "test_fraction"):
      datasets.load_digits(test_fraction=1.5)


class FsddTest(tf.test.TestCase, parameterized.TestCase):
  def _recordings(self, lengths=None):
    folder = os.path.join(self.get_temp_dir(), "recordings")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for digit in (0, 7):
      for speaker in ("ann", "bob"):
        for index in (0, 4, 5, 12):
          n = (lengths or {}).get((digit, index), 100 + 10 * index)
          samples = rng.integers(-1000, 1000, n)
          name = f"{digit}_{speaker}_{index}.wav"
          _write_wav(os.path.join(folder, name), samples)
          files[name] = samples
    with open(os.path.join(folder, "README.txt"), "w") as f:
      f.write("not a recording")
    return folder, files

  def test_split_and_labels(self):
    folder, _ = self._recordings()
    (x, y), (xt, yt) = datasets.load_fsdd(folder, length=64)
    # Indices 0 and 4 are test, 5 and 12 train: 2 digits x 2 speakers x 2.
    self.assertEqual(x.shape, (8, 64, 1))
    self.assertEqual(xt.shape, (8, 64, 1))
    self.assertEqual(sorted(set(y.tolist())), [0, 7])
    self.assertEqual(sorted(yt.tolist()), [0, 0, 0, 0, 7, 7, 7, 7])
    self.assertAllInRange(x, -1.0, 1.0)
    self.assertAllClose(np.max(np.abs(x), axis=(1, 2)), np.ones(8))

  def test_crop_and_pad(self):
    folder, files = self._recordings(lengths={(0, 5): 40, (0, 12): 300})
    (x, y), _ = datasets.load_fsdd(folder, length=100, test_indices=(0, 4))
    short = files["0_ann_5.wav"].astype(np.float32)
    long_ = files["0_ann_12.wav"].astype(np.float32)
    # Train order is sorted file names: 0_ann_12, 0_ann_5, ...
    np.testing.assert_allclose(
      x[0, :, 0], long_[100:200] / np.abs(long_[100:200]).max()
    )
    np.testing.assert_allclose(x[1, :40, 0], short / np.abs(short).max(), rtol=1e-6)
    np.testing.assert_array_equal(x[1, 40:, 0], np.zeros(60))
    self.assertEqual(y[0], 0)

  def test_8bit_wav(self):
    path = os.path.join(self.get_temp_dir(), "u8.wav")
    _write_wav(path, [0, 128, 255], width=1)
    samples, rate = datasets.read_wav(path)
    self.assertEqual(rate, 8000)
    np.testing.assert_allclose(samples, [-1.0, 0.0, 127 / 128])

  def test_missing_folder(self):
    with self.assertRaisesRegex(FileNotFoundError, "does not exist.*free-spoken"):
      datasets.load_fsdd(os.path.join(self.get_temp_dir(), "nope"))

  def test_empty_folder(self):
    with self.assertRaisesRegex(FileNotFoundError, "no files named"):
      datasets.load_fsdd(self.get_temp_dir())

  def test_wrong_rate(self):
    folder = os.path.join(self.get_temp_dir(), "r")
    os.makedirs(folder)
    _write_wav(os.path.join(folder, "3_x_0.wav"), [1, 2, 3], rate=16000)
    with self.assertRaisesRegex(ValueError, "16000 Hz"):
      datasets.load_fsdd(folder)

  @parameterized.parameters(0, -5)
  def test_bad_length(self, length):
    with self.assertRaisesRegex(ValueError, "length"):
      datasets.load_fsdd(self.get_temp_dir(), length=length)


def _no_download():
  raise OSError("no network (test)")


class SelectImageDataTest(tf.test.TestCase):
  """The examples' main job must run on a fresh machine without Fashion-MNIST."""

  def test_falls_back_to_digits(self):
    missing = os.path.join(self.get_temp_dir(), "no-fashion-mnist")
    data, name, note = datasets.select_image_data(
      "auto", search_dirs=[missing], downloader=_no_download
    )
    self.assertEqual(name, "digits")
    (x, y), (xt, yt) = data
    self.assertEqual((len(x) + len(xt), x.shape[1:]), (1797, (8, 8, 1)))
    self.assertEqual(sorted(set(y.tolist())), list(range(10)))
    self.assertIn("scikit-learn's digits", note)
    self.assertIn("OSError: no network (test)", note)
    self.assertIn("apt install dataset-fashion-mnist", note)
    self.assertIn("load_data", note)

  def test_fashion_mnist_when_present(self):
    folder = self.get_temp_dir()
    _fake_fashion(folder, n_train=5, n_test=3)
    data, name, note = datasets.select_image_data(
      "auto", search_dirs=["/nonexistent", folder], downloader=_no_download
    )
    self.assertEqual(name, "fashion_mnist")
    self.assertEqual((len(data[0][0]), len(data[1][0])), (5, 3))
    self.assertIn(f"Fashion-MNIST, from {folder}", note)
    self.assertIn("--dataset=digits", note)
    # The download is the last resort, and is reported as the source.
    rng = np.random.default_rng(0)
    downloaded = (
      (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.zeros(4, np.uint8)),
      (rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.zeros(2, np.uint8)),
    )
    data, name, note = datasets.select_image_data(
      "auto", search_dirs=[], downloader=lambda: downloaded
    )
    self.assertEqual((name, len(data[0][0])), ("fashion_mnist", 4))
    self.assertIn("keras.datasets download", note)

  def test_explicit_choices_do_not_fall_back(self):
    with self.assertRaisesRegex(FileNotFoundError, "apt install"):
      datasets.select_image_data(
        "fashion_mnist", search_dirs=[], downloader=_no_download
      )
    with self.assertRaisesRegex(FileNotFoundError, "does not hold the four IDX"):
      datasets.select_image_data("auto", data_dir=self.get_temp_dir())
    _, name, note = datasets.select_image_data("digits")
    self.assertEqual(name, "digits")
    self.assertIn("as asked", note)
    with self.assertRaisesRegex(ValueError, "dataset must be"):
      datasets.select_image_data("mnist")

  def test_environment_variable_replaces_the_local_folders(self):
    folder = self.get_temp_dir()
    _fake_fashion(folder, n_train=2, n_test=2)
    with _env(datasets.SEARCH_ENV, folder):
      _, name, note = datasets.select_image_data("auto", downloader=_no_download)
    self.assertEqual(name, "fashion_mnist")
    self.assertIn(folder, note)
    with _env(datasets.SEARCH_ENV, ""):
      _, name, _ = datasets.select_image_data("auto", downloader=_no_download)
    self.assertEqual(name, "digits")

  def test_not_in_the_library(self):
    import keras_epitome  # noqa: PLC0415

    self.assertFalse(
      os.path.exists(
        os.path.join(os.path.dirname(keras_epitome.__file__), "datasets.py")
      )
    )
    self.assertNotIn("datasets", keras_epitome.__all__)


class _patched:
  def __init__(self, obj, name, value):
    self.obj, self.name, self.value = obj, name, value

  def __enter__(self):
    self.old = getattr(self.obj, self.name)
    setattr(self.obj, self.name, self.value)

  def __exit__(self, *exc):
    setattr(self.obj, self.name, self.old)


class _env:
  def __init__(self, name, value):
    self.name, self.value = name, value

  def __enter__(self):
    self.old = os.environ.get(self.name)
    os.environ[self.name] = self.value

  def __exit__(self, *exc):
    if self.old is None:
      del os.environ[self.name]
    else:
      os.environ[self.name] = self.old


if __name__ == "__main__":
  tf.test.main()
