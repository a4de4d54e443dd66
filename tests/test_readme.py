"""The README and the guide in docs/: their code runs and their links resolve.

The README and docs/*.md are what users copy first. This test

* runs every ```python block of README.md and docs/*.md, in order, one
  namespace per file, on small stand-in data (the names the blocks use:
  ``trained_model``, ``x_train``, ``y_train``, ``x_test``, ``y_test``), with
  the expensive settings cut down (``output_steps``, ``epochs``); a block
  preceded by ``<!-- skip-test: reason -->`` is skipped;
* checks the values the README's layer example states in its comments;
* checks that every relative link (and ``#anchor``) in the README, docs/ and
  the benchmarks' READMEs resolves;
* checks that every number in the prose and tables of the README and the
  guide pages is in docs/results.md, where each has its command, and that the
  README's set-up commands are the ones CI runs.
"""

import ast
import os
import pathlib
import re
import tempfile

import numpy as np
from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = RUN + [
  ROOT / "benchmarks" / "README.md",
  ROOT / "benchmarks" / "archive" / "README.md",
]
# Linked pages another change writes; a missing one is not an error yet.
PENDING = {"docs/keras3.md"}

SKIP = "<!-- skip-test:"
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
# Settings that make a recipe take minutes, and what the test runs instead (the
# keyword stays, so a renamed argument still fails; tests/test_allocation.py
# covers the allocation itself, over a minute here per conversion).
FAST = (
  (r"output_steps=\d+", "output_steps=2"),
  (r"\bepochs=\d+", "epochs=1"),
  (r"allocate=True", "allocate=False"),
)
SETUP_COMMANDS = (
  'pip install -e ".[examples]" && python examples/fashion_mnist.py',
  'pip install -e ".[test]" && python -m pytest -q',
)
VERSIONS = {"2.21", "3.10"}  # Python, TensorFlow and tf-keras versions in the prose


def _python_blocks(text):
  """``[(code, skip reason or None)]`` for each ```python block, in order."""
  blocks = []
  for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    before = text[: m.start()].rstrip().splitlines()
    last = before[-1].strip() if before else ""
    reason = last[len(SKIP) :].rstrip("->").strip() if last.startswith(SKIP) else None
    blocks.append((m.group(1), reason))
  return blocks


def _claims(block):
  """``(expression, literal)`` for lines ``expr  # LITERAL: ...`` or ``expr  # LITERAL``."""
  claims = []
  for line in block.splitlines():
    if "#" not in line or line.lstrip().startswith("#"):
      continue
    code, comment = line.split("#", 1)
    head = comment.strip().split(":", 1)[0].strip()
    try:
      value = ast.literal_eval(head)
    except (ValueError, SyntaxError):
      continue
    if isinstance(value, (tuple, int, float)) and code.strip():
      claims.append((code.strip(), value))
  return claims


def _prose(text):
  """The text without fenced code blocks."""
  return FENCE.sub("", text)


def _slug(heading):
  """GitHub's anchor for a heading."""
  s = heading.strip().lower()
  s = re.sub(r"[^\w\- ]", "", s)
  return s.replace(" ", "-")


def _anchors(path):
  return {
    _slug(m.group(1))
    for m in re.finditer(r"^#+\s+(.*)$", _prose(path.read_text()), re.M)
  }


def _stand_in_data(keras_version=2):
  """A small trained CNN and data of its input shape, for the recipes.

  The README's recipes are written for Keras 3 (``trained_model`` is a Keras 3
  model there); the guide pages for Keras 2.
  """
  if keras_version == 3:
    import keras
  else:
    import keras_epitome as ke

    keras = ke.keras
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.random((160, 10, 10, 1)).astype("float32")
  y = (x[:, :5].mean(axis=(1, 2, 3)) * 40).astype("int64") % 10
  inputs = keras.Input((10, 10, 1))
  h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
  for i, width in ((2, 32), (3, 32)):
    h = keras.layers.BatchNormalization(name=f"bn{i - 1}")(h)
    h = keras.layers.ReLU(name=f"relu{i - 1}")(h)
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(
      h
    )
  h = keras.layers.BatchNormalization(name="bn3")(h)
  h = keras.layers.ReLU(name="relu3")(h)
  h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
  outputs = keras.layers.Dense(10, name="logits")(h)
  model = keras.Model(inputs, outputs)
  model.compile(
    "adam",
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  model.fit(x[:128], y[:128], epochs=1, batch_size=32, verbose=0)
  return dict(
    trained_model=model,
    x_train=x[:128],
    y_train=y[:128],
    x_test=x[128:],
    y_test=y[128:],
  )


class DocsCodeTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = _stand_in_data()
    cls.data3 = _stand_in_data(keras_version=3)

  def _run(self, path):
    namespace = dict(self.data3 if path == README else self.data)
    ran = 0
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
      os.chdir(tmp)
      try:
        for i, (code, skip) in enumerate(_python_blocks(path.read_text())):
          if skip is not None:
            continue
          for pattern, fast in FAST:
            code = re.sub(pattern, fast, code)
          name = f"{path.relative_to(ROOT)} block {i + 1}"
          exec(compile(code, name, "exec"), namespace)  # noqa: S102
          ran += 1
      finally:
        os.chdir(cwd)
    return namespace, ran

  def test_readme_blocks_run_and_the_layer_example_comments_hold(self):
    namespace, ran = self._run(README)
    self.assertGreaterEqual(ran, 4, "README recipes: layers, convert, pruning, export")
    blocks = [b for b, _ in _python_blocks(README.read_text())]
    layer_block = next(b for b in blocks if "ke.EpitomeConv2D(" in b and "layer =" in b)
    claims = _claims(layer_block)
    self.assertNotEmpty(claims, "the README layer example states no values to check")
    layer_ns = {}
    exec(compile(layer_block, "README.md layer example", "exec"), layer_ns)  # noqa: S102
    for expr, expected in claims:
      got = eval(expr, layer_ns)  # noqa: S307
      if isinstance(expected, tuple):
        self.assertEqual(tuple(got), expected, expr)
      else:
        self.assertAlmostEqual(float(got), expected, places=2, msg=expr)
    self.assertTrue(np.isfinite(np.asarray(layer_ns["layer"].kernel)).all())
    self.assertIn("y", namespace)  # the export recipe ran the file with LiteRT

  def test_docs_blocks_run(self):
    for path in RUN[1:]:
      with self.subTest(page=path.name):
        self._run(path)


class DocsTextTest(absltest.TestCase):
  def test_relative_links_resolve(self):
    for page in LINKED:
      if not page.exists():
        continue
      for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text())):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
          continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        rel = os.path.relpath(resolved, ROOT)
        where = f"{page.relative_to(ROOT)} links to {target}"
        if rel in PENDING and not resolved.exists():
          continue
        self.assertTrue(resolved.exists(), where)
        if anchor and resolved.suffix == ".md":
          self.assertIn(anchor, _anchors(resolved), where)

  def test_numbers_are_in_results(self):
    """README and guide numbers (decimals, thousands) are measurements from results.md."""
    results = (ROOT / "docs" / "results.md").read_text()
    pages = [p for p in RUN if p.name not in ("results.md", "design.md")]
    for page in pages:
      prose = re.sub(r"`[^`]*`", "", _prose(page.read_text()))
      prose = re.sub(r"\b\d+\.\d+\.\d+\b", "", prose)
      numbers = set(re.findall(r"\d{1,3}(?:,\d{3})+|\d+\.\d+", prose)) - VERSIONS
      missing = sorted(n for n in numbers if n not in results)
      self.assertEmpty(missing, f"{page.name}: numbers not in docs/results.md")

  def test_readme_setup_commands_and_length(self):
    text = README.read_text()
    for command in SETUP_COMMANDS:
      self.assertIn(command, text)
    self.assertIn(SETUP_COMMANDS[1], (ROOT / ".ci" / "run").read_text())
    self.assertLessEqual(len(text.splitlines()), 220)


if __name__ == "__main__":
  absltest.main()
