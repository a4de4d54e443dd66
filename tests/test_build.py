"""Checks that the Bazel BUILD file lists every module and test, and nothing else.

Bazel cannot fetch its rules on every machine, so this test keeps BUILD honest
without running Bazel: each package module must be in the library's srcs, each
test module must have a py_test, and every file BUILD names must exist.
"""

import pathlib
import re

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _strings(value: str):
  """Quoted strings of a BUILD list, with requirement("x") items as "pip:x"."""
  pips = ["pip:" + n for n in re.findall(r'requirement\("([^"]+)"\)', value)]
  value = re.sub(r'requirement\("[^"]+"\)', "", value)
  return re.findall(r'"([^"]*)"', value) + pips


def _parse_build():
  """Returns {target_name: (rule, srcs, deps)} from the BUILD file."""
  text = (ROOT / "BUILD").read_text()
  text = re.sub(r"#.*", "", text)
  targets = {}
  for m in re.finditer(r"\b(py_library|py_test|py_binary)\((.*?)\n\)", text, re.S):
    rule, body = m.group(1), m.group(2)
    name = re.search(r'\bname\s*=\s*"([^"]+)"', body).group(1)
    fields = {}
    for key in ("srcs", "deps", "data"):
      f = re.search(key + r"\s*=\s*\[(.*?)\]", body, re.S)
      fields[key] = _strings(f.group(1)) if f else []
    targets[name] = (rule, fields["srcs"] + fields["data"], fields["deps"])
  return targets


class BuildFileTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.targets = _parse_build()

  def test_every_package_module_is_in_a_library(self):
    listed = {
      s for rule, srcs, _ in self.targets.values() if rule == "py_library" for s in srcs
    }
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "keras_epitome").glob("*.py")}
    self.assertEmpty(
      sorted(on_disk - listed), "modules missing from BUILD py_library srcs"
    )

  def test_every_test_module_has_a_py_test(self):
    listed = {
      s for rule, srcs, _ in self.targets.values() if rule == "py_test" for s in srcs
    }
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
    self.assertEmpty(
      sorted(on_disk - listed), "test modules missing a py_test in BUILD"
    )

  def test_listed_files_exist(self):
    for name, (_, srcs, _) in self.targets.items():
      for src in srcs:
        self.assertTrue(
          (ROOT / src).is_file(), f"BUILD target {name} lists missing file {src}"
        )

  def test_local_deps_name_targets(self):
    for name, (_, _, deps) in self.targets.items():
      for dep in deps:
        if dep.startswith(":"):
          self.assertIn(
            dep[1:], self.targets, f"BUILD target {name} depends on unknown {dep}"
          )

  def test_pip_deps_are_declared_in_setup(self):
    setup = (ROOT / "setup.py").read_text()
    for name, (_, _, deps) in self.targets.items():
      for dep in deps:
        if dep.startswith("pip:"):
          self.assertIn(
            f'"{dep[4:]}', setup, f"BUILD target {name}: {dep[4:]} is not in setup.py"
          )


if __name__ == "__main__":
  absltest.main()
