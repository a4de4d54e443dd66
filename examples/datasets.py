"""Small real data sets for the examples and benchmarks, loaded offline where possible.

Example code, not part of the ``keras_epitome`` package: the examples and
benchmarks import it from this folder (``import datasets``).

* :func:`load_fashion_mnist`: Fashion-MNIST (28x28 grey images, 10 classes)
  from a local copy of the IDX files (an explicit folder, Debian's
  ``dataset-fashion-mnist`` package, the Keras cache) or a Keras download.
* :func:`select_image_data`: the examples' choice: Fashion-MNIST when it can
  be found or downloaded, else scikit-learn's digits, which the install
  brings (the ``examples`` extra installs scikit-learn), with a note saying
  which was used and how to get the other.
* :func:`load_digits`: scikit-learn's 8x8 handwritten digits (ships with
  scikit-learn, needs nothing), split with a fixed seed.
* :func:`load_fsdd`: the Free Spoken Digit Dataset, raw 8 kHz waveforms read
  from a folder of WAV files, with the customary split (recordings 0-4 of
  every speaker and digit are the test set).

Every loader returns ``(x_train, y_train), (x_test, y_test)`` as NumPy arrays:
``float32`` inputs scaled to about ``[0, 1]`` (images) or ``[-1, 1]`` (audio),
with a trailing channel axis, and ``int64`` labels.

Example:
  >>> import datasets  # with examples/ on sys.path
  >>> (x_train, y_train), (x_test, y_test) = datasets.load_digits()
  >>> x_train.shape[1:], int(y_train.max())
  ((8, 8, 1), 9)
"""

from __future__ import annotations

import gzip
import os
import re
import wave
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

Split = Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
KERAS_CACHE_FASHION_MNIST = os.path.join("~", ".keras", "datasets", "fashion-mnist")
# Overrides the local folders searched for Fashion-MNIST (os.pathsep-separated;
# empty: none), e.g. to try the examples as on a machine without the data.
SEARCH_ENV = "EPITOME_FASHION_MNIST_DIRS"
FASHION_MNIST_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are
# used by (Fashion-)MNIST, the others are accepted for completeness.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzipped), the format of (Fashion-)MNIST.

  Args:
    path: file name; ``.gz`` files are decompressed.

  Returns:
    The array, with the file's shape and dtype.

  Raises:
    ValueError: if the file is not a well-formed IDX file.

  Example:
    >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    >>> labels.shape
    (10000,)
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an IDX file (bad magic number)")
  code, ndim = data[2], data[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = _IDX_DTYPES[code]
  want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != want:
    raise ValueError(
      f"{path}: IDX header says shape {shape} ({want} bytes of data) but the "
      f"file holds {len(data) - header}"
    )
  return (
    np.frombuffer(data, dtype, offset=header)
    .reshape(shape)
    .astype(dtype.newbyteorder("="))
  )


def _find_idx(folder: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
    candidate = os.path.join(folder, name)
    if os.path.isfile(candidate):
      return candidate
  return None


def _load_idx_folder(folder: str) -> Optional[Split]:
  paths = {k: _find_idx(folder, stem) for k, stem in FASHION_MNIST_FILES.items()}
  if any(p is None for p in paths.values()):
    return None
  arrays = {k: read_idx(p) for k, p in paths.items()}
  return _finish_images(
    arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
  )


def _finish_images(x_train, y_train, x_test, y_test) -> Split:
  def images(x):
    return (np.asarray(x, np.float32) / 255.0)[..., np.newaxis]

  return (images(x_train), np.asarray(y_train, np.int64)), (
    images(x_test),
    np.asarray(y_test, np.int64),
  )


def _search_dirs() -> Tuple[str, ...]:
  if SEARCH_ENV in os.environ:
    return tuple(d for d in os.environ[SEARCH_ENV].split(os.pathsep) if d)
  return (DEBIAN_FASHION_MNIST, os.path.expanduser(KERAS_CACHE_FASHION_MNIST))


def _keras_download():
  from keras_epitome.backend import keras  # noqa: PLC0415  (only if needed)

  return keras.datasets.fashion_mnist.load_data()


HOW_TO_GET_FASHION_MNIST = (
  "Get it one of two ways: (1) on Debian/Ubuntu, `sudo apt install "
  f"dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}); (2) on a machine "
  'with internet access, `python -c "import tf_keras; '
  'tf_keras.datasets.fashion_mnist.load_data()"` (files in '
  f"{KERAS_CACHE_FASHION_MNIST}), or download the four *-ubyte.gz files from "
  "https://github.com/zalandoresearch/fashion-mnist into a folder and pass it "
  "as --data_dir."
)


def find_fashion_mnist(
  path: Optional[str] = None,
  download: bool = True,
  search_dirs: Optional[Sequence[str]] = None,
  downloader: Optional[Callable] = None,
) -> Tuple[Split, str]:
  """:func:`load_fashion_mnist`, also saying where the data came from.

  Args:
    path: see :func:`load_fashion_mnist`.
    download: see :func:`load_fashion_mnist`.
    search_dirs: local folders to try (default: Debian's folder and the Keras
      cache, or the folders in the ``EPITOME_FASHION_MNIST_DIRS`` variable).
    downloader: the download (default ``keras.datasets.fashion_mnist.load_data``).

  Returns:
    ``(split, source)``: the data and a description of where it was found.

  Raises:
    FileNotFoundError: as :func:`load_fashion_mnist`.
  """
  if path is not None:
    found = _load_idx_folder(os.path.expanduser(path))
    if found is None:
      raise FileNotFoundError(
        f"Fashion-MNIST: folder {path!r} does not hold the four IDX files "
        f"{', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}"
      )
    return found, path
  for folder in _search_dirs() if search_dirs is None else search_dirs:
    if os.path.isdir(folder):
      found = _load_idx_folder(folder)
      if found is not None:
        return found, folder
  error = "download disabled"
  if download:
    try:
      (x, y), (xt, yt) = (downloader or _keras_download)()
      return _finish_images(x, y, xt, yt), "keras.datasets download"
    except Exception as e:  # noqa: BLE001  (any network or file error)
      error = f"{type(e).__name__}: {e}"
  raise FileNotFoundError(
    f"Fashion-MNIST not found locally and the Keras download failed ({error}). "
    + HOW_TO_GET_FASHION_MNIST
  )


def load_fashion_mnist(path: Optional[str] = None, download: bool = True) -> Split:
  """Loads Fashion-MNIST, trying local copies before a download.

  Looks, in order, in ``path`` (if given), in Debian's
  ``/usr/share/datasets/fashion-mnist`` (``apt install dataset-fashion-mnist``),
  in the Keras cache ``~/.keras/datasets/fashion-mnist``, and finally calls
  ``keras.datasets.fashion_mnist.load_data()`` (a download) unless
  ``download=False``. A folder must hold the four IDX files
  (``train-images-idx3-ubyte.gz`` etc., gzipped or not). The environment
  variable ``EPITOME_FASHION_MNIST_DIRS`` replaces the two local folders.

  Args:
    path: a folder holding the four IDX files; if given and incomplete, this
      is an error (no fallback), so a typo does not go unnoticed.
    download: whether the last resort, a Keras download, is allowed.

  Returns:
    ``(x_train, y_train), (x_test, y_test)``: images ``(N, 28, 28, 1)``
    ``float32`` in ``[0, 1]``, labels ``int64`` in ``[0, 10)``.

  Raises:
    FileNotFoundError: if ``path`` lacks the files, or no copy is found and the
      download fails or is disabled; the message names the ways to get it.

  Example:
    >>> (x, y), (xt, yt) = load_fashion_mnist()
    >>> x.shape, xt.shape
    ((60000, 28, 28, 1), (10000, 28, 28, 1))
  """
  return find_fashion_mnist(path, download)[0]


def select_image_data(
  dataset: str = "auto",
  data_dir: Optional[str] = None,
  download: bool = True,
  search_dirs: Optional[Sequence[str]] = None,
  downloader: Optional[Callable] = None,
) -> Tuple[Split, str, str]:
  """The examples' data: Fashion-MNIST if available, else scikit-learn's digits.

  Args:
    dataset: ``"auto"`` (Fashion-MNIST when found or downloaded, otherwise
      digits), ``"fashion_mnist"`` (an error if not available) or
      ``"digits"``.
    data_dir: a folder with the Fashion-MNIST IDX files (then an incomplete
      folder is an error, not a fallback).
    download: allow the Keras download of Fashion-MNIST.
    search_dirs: local folders to try (see :func:`find_fashion_mnist`).
    downloader: the download function (see :func:`find_fashion_mnist`).

  Returns:
    ``(split, name, note)``: the data, ``"fashion_mnist"`` or ``"digits"``,
    and a line for the user saying which data is used and how to get the
    other.

  Raises:
    ValueError: for an unknown ``dataset``.
    FileNotFoundError: for ``dataset="fashion_mnist"`` or a ``data_dir``
      when Fashion-MNIST is not there.

  Example:
    >>> data, name, note = select_image_data("digits")
    >>> name
    'digits'
  """
  if dataset not in ("auto", "fashion_mnist", "digits"):
    raise ValueError(
      f"dataset must be 'auto', 'fashion_mnist' or 'digits', got {dataset!r}"
    )
  digits_note = "scikit-learn's digits (1,797 8x8 images, installed with scikit-learn)"
  if dataset == "digits":
    return (
      load_digits(),
      "digits",
      f"Data: {digits_note}, as asked. Fashion-MNIST (70,000 28x28 images) is "
      "the default when it is available.",
    )
  try:
    data, source = find_fashion_mnist(data_dir, download, search_dirs, downloader)
  except FileNotFoundError as e:
    if dataset == "fashion_mnist" or data_dir is not None:
      raise
    return (
      load_digits(),
      "digits",
      f"Data: {digits_note}, because Fashion-MNIST is not available here: "
      f"{e} Then run again for the Fashion-MNIST job.",
    )
  return (
    data,
    "fashion_mnist",
    f"Data: Fashion-MNIST, from {source}. --dataset=digits uses {digits_note} instead.",
  )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
  """Loads scikit-learn's 8x8 digits (1797 images), split with a fixed seed.

  The split is stratified by class, so every digit appears in both halves in
  the same proportion.

  Args:
    test_fraction: share of the images held out for testing, in ``(0, 1)``.
    seed: seed of the split (the default gives the same split everywhere).

  Returns:
    ``(x_train, y_train), (x_test, y_test)``: images ``(N, 8, 8, 1)``
    ``float32`` in ``[0, 1]``, labels ``int64`` in ``[0, 10)``.

  Raises:
    ValueError: if ``test_fraction`` is not in ``(0, 1)``.

  Example:
    >>> (x, y), (xt, yt) = load_digits()
    >>> len(x) + len(xt)
    1797
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(
      f"load_digits: test_fraction must be in (0, 1), got {test_fraction!r}"
    )
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
  y = digits.target.astype(np.int64)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return (x_train, y_train), (x_test, y_test)


_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


def read_wav(path: str) -> Tuple[np.ndarray, int]:
  """Reads a mono PCM WAV file with the standard library.

  Args:
    path: the file.

  Returns:
    ``(samples, rate)``: ``float32`` samples in ``[-1, 1]`` (the first channel
    of a multi-channel file) and the sampling rate in Hz.

  Raises:
    ValueError: if the file is not 8-, 16- or 32-bit integer PCM.

  Example:
    >>> samples, rate = read_wav("recordings/0_george_0.wav")
  """
  with wave.open(path, "rb") as w:
    channels, width, rate, frames = (
      w.getnchannels(),
      w.getsampwidth(),
      w.getframerate(),
      w.getnframes(),
    )
    raw = w.readframes(frames)
  if width == 1:  # 8-bit WAV is unsigned
    samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
  elif width == 2:
    samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
  elif width == 4:
    samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
  else:
    raise ValueError(f"{path}: {8 * width}-bit samples are not supported (8, 16, 32)")
  return samples.reshape(-1, channels)[:, 0], rate


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
  """Centre-crops or zero-pads (at the end) to ``length`` samples."""
  if len(samples) >= length:
    start = (len(samples) - length) // 2
    return samples[start : start + length]
  return np.pad(samples, (0, length - len(samples)))


def load_fsdd(
  recordings_dir: str,
  length: int = 8000,
  test_indices: Tuple[int, ...] = (0, 1, 2, 3, 4),
  rate: int = 8000,
) -> Split:
  """Loads the Free Spoken Digit Dataset from a folder of WAV files.

  Files are named ``{digit}_{speaker}_{index}.wav`` (the layout of
  https://github.com/Jakobovski/free-spoken-digit-dataset, folder
  ``recordings``). Each recording is centre-cropped or zero-padded to
  ``length`` samples and peak-normalized. The customary split puts
  recordings with index 0-4 (of every speaker and digit) in the test set.

  Args:
    recordings_dir: the folder of WAV files.
    length: samples per example (8000 = one second at 8 kHz).
    test_indices: recording indices that go to the test set.
    rate: expected sampling rate; files at another rate are an error.

  Returns:
    ``(x_train, y_train), (x_test, y_test)``: waveforms ``(N, length, 1)``
    ``float32`` in ``[-1, 1]``, labels ``int64`` in ``[0, 10)``.

  Raises:
    FileNotFoundError: if the folder does not exist or holds no FSDD files.
    ValueError: if ``length`` is not positive or a file has another rate.

  Example:
    >>> (x, y), (xt, yt) = load_fsdd("free-spoken-digit-dataset/recordings")
    >>> x.shape, xt.shape
    ((2700, 8000, 1), (300, 8000, 1))
  """
  if int(length) <= 0:
    raise ValueError(
      f"load_fsdd: length must be a positive number of samples, got {length!r}"
    )
  if not os.path.isdir(recordings_dir):
    raise FileNotFoundError(
      f"FSDD: recordings folder {recordings_dir!r} does not exist; clone "
      "https://github.com/Jakobovski/free-spoken-digit-dataset and pass its "
      "'recordings' folder"
    )
  names = sorted(n for n in os.listdir(recordings_dir) if _FSDD_NAME.match(n))
  if not names:
    raise FileNotFoundError(
      f"FSDD: no files named like '0_george_0.wav' in {recordings_dir!r}"
    )
  test = set(int(i) for i in test_indices)
  splits = {True: ([], []), False: ([], [])}
  for name in names:
    digit, _, index = _FSDD_NAME.match(name).groups()
    samples, file_rate = read_wav(os.path.join(recordings_dir, name))
    if file_rate != rate:
      raise ValueError(f"FSDD: {name} is sampled at {file_rate} Hz, expected {rate}")
    samples = _fit_length(samples, int(length))
    peak = float(np.max(np.abs(samples)))
    if peak > 0:
      samples = samples / peak
    xs, ys = splits[int(index) in test]
    xs.append(samples)
    ys.append(int(digit))

  def stack(xs, ys):
    x = (
      np.stack(xs).astype(np.float32)[..., np.newaxis]
      if xs
      else np.zeros((0, int(length), 1), np.float32)
    )
    return x, np.asarray(ys, np.int64)

  return stack(*splits[False]), stack(*splits[True])
