"""keras_epitome: Neural Epitome Search (NES) layers for Keras 3 and Keras 2 (TF-MOT)."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

# Versions that work together (checked: TF-MOT 0.8.1 needs Keras 2 = tf-keras,
# and tf-keras depends on the package named "tensorflow").
INSTALL_REQUIRES = [
  "tensorflow==2.21.*",
  "keras>=3.10,<4",  # Keras 3: keras_epitome.keras3 (TF, JAX or PyTorch backend)
  "tf-keras==2.21.*",
  "tensorflow-model-optimization==0.8.1",
  "numpy>=1.26,<3",
  "absl-py~=1.2",
  "ai-edge-litert>=2.0",
]

EXTRAS = {
  # jax: the Keras 3 tests on the JAX backend (CPU).
  "test": [
    "pytest>=8",
    "hypothesis>=6",
    "scikit-learn>=1.3",
    "ruff>=0.6",
    "jax[cpu]>=0.4.30",
    "pytest-xdist>=3",  # pytest.ini runs the suite on two workers
  ],
  "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
}

setup(
  name="keras-epitome",
  version="0.1.0",
  description=(
    "Neural Epitome Search (NES) for Keras 3 and Keras 2: compress Conv1D, "
    "Conv2D and Dense layers with learned weight sampling; TF-MOT and TFLite ready."
  ),
  long_description=(HERE / "README.md").read_text(encoding="utf-8"),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  packages=find_packages(include=["keras_epitome", "keras_epitome.*"]),
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
  classifiers=[
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
