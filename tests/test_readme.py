"""The README's layer example runs, and the values its comments state are true.

The README is what users copy first; this keeps its code and the numbers in its
comments from drifting away from what the package does.
"""

import ast
import pathlib
import re

import numpy as np
from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, re.S)


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


class ReadmeTest(absltest.TestCase):
  def test_layer_example_runs_and_its_comments_hold(self):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    layer_block = next(b for b in blocks if "ke.EpitomeConv2D(" in b and "layer =" in b)
    namespace = {}
    exec(compile(layer_block, "README.md", "exec"), namespace)  # noqa: S102
    claims = _claims(layer_block)
    self.assertNotEmpty(claims, "the README example states no values to check")
    for expr, expected in claims:
      got = eval(expr, namespace)  # noqa: S307
      if isinstance(expected, tuple):
        self.assertEqual(tuple(got), expected, expr)
      else:
        self.assertAlmostEqual(float(got), expected, places=2, msg=expr)
    layer = namespace["layer"]
    self.assertEqual(tuple(layer.kernel.shape), (3, 3, 64, 128))
    self.assertTrue(np.isfinite(layer.kernel.numpy()).all())


if __name__ == "__main__":
  absltest.main()
