"""Checks that the Bazel BUILD file lists every module and test, and nothing else.

Bazel cannot fetch its rules on every machine, so this test keeps BUILD honest
without running Bazel: each package module must be in the library's srcs, each
test module must have a py_test, and every file BUILD names must exist.
"""

import ast
import pathlib
import re

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parse_build():
  """Returns {target_name: (rule, srcs, deps)} from the BUILD file."""
  text = (ROOT / "BUILD").read_text()
  text = re.sub(r"#.*", "", text)
  targets = {}
  for m in re.finditer(r"\b(py_library|py_test|py_binary)\s*\((.*?)\n\)", text, re.S):
    rule, body = m.group(1), m.group(2)
    fields = {}
    for f in re.finditer(r"(\w+)\s*=\s*(\[.*?\]|\"[^\"]*\"|\w+)", body, re.S):
      key, value = f.group(1), f.group(2)
      try:
        fields[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        fields[key] = value
    targets[fields["name"]] = (rule, list(fields.get("srcs", [])), list(fields.get("deps", [])))
  return targets


class BuildFileTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.targets = _parse_build()

  def test_every_package_module_is_in_a_library(self):
    listed = {s for rule, srcs, _ in self.targets.values() if rule == "py_library" for s in srcs}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "keras_epitome").glob("*.py")}
    self.assertEmpty(sorted(on_disk - listed), "modules missing from BUILD py_library srcs")

  def test_every_test_module_has_a_py_test(self):
    listed = {s for rule, srcs, _ in self.targets.values() if rule == "py_test" for s in srcs}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
    self.assertEmpty(sorted(on_disk - listed), "test modules missing a py_test in BUILD")

  def test_listed_files_exist(self):
    for name, (_, srcs, _) in self.targets.items():
      for src in srcs:
        self.assertTrue((ROOT / src).is_file(), f"BUILD target {name} lists missing file {src}")

  def test_local_deps_name_targets(self):
    for name, (_, _, deps) in self.targets.items():
      for dep in deps:
        if dep.startswith(":"):
          self.assertIn(dep[1:], self.targets, f"BUILD target {name} depends on unknown {dep}")


if __name__ == "__main__":
  absltest.main()
