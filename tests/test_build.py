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
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "keras_epitome").rglob("*.py")}
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

  def _library_of_source(self):
    return {
      src: name
      for name, (rule, srcs, _) in self.targets.items()
      if rule == "py_library"
      for src in srcs
      if src.startswith("keras_epitome/")
    }

  def test_local_deps_are_the_imports(self):
    """Each library depends on exactly the package modules its sources import."""
    by_source = self._library_of_source()
    for src, name in sorted(by_source.items()):
      imported = {by_source[m] for m in _imported_sources(src)} - {name}
      declared = {d[1:] for d in self.targets[name][2] if d.startswith(":")}
      self.assertEqual(
        sorted(declared), sorted(imported), f"BUILD deps of :{name} ({src})"
      )

  def test_library_graph_is_acyclic(self):
    graph = {
      name: [d[1:] for d in deps if d.startswith(":")]
      for name, (rule, _, deps) in self.targets.items()
      if rule == "py_library"
    }
    state = {}

    def visit(node, path):
      if state.get(node) == "done":
        return
      self.assertNotEqual(
        state.get(node), "open", "BUILD cycle: " + " -> ".join(path + [node])
      )
      state[node] = "open"
      for dep in graph.get(node, []):
        visit(dep, path + [node])
      state[node] = "done"

    for node in graph:
      visit(node, [])


def _module_source(module: str):
  """``keras_epitome.a.b`` -> its source path relative to ROOT, or None."""
  base = ROOT.joinpath(*module.split("."))
  for path in (base.with_suffix(".py"), base / "__init__.py"):
    if path.is_file():
      return str(path.relative_to(ROOT))
  return None


def _imported_sources(src: str):
  """Package sources that ``src`` imports by name (lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse((ROOT / src).read_text())):
    if isinstance(node, ast.Import):
      modules = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # "from pkg import mod" names a module; "from mod import name" the module.
      modules = [f"{node.module}.{a.name}" for a in node.names]
      modules = [m if _module_source(m) else node.module for m in modules]
    else:
      continue
    for module in modules:
      if module.split(".")[0] == "keras_epitome":
        source = _module_source(module)
        if source:
          found.add(source)
  return found


if __name__ == "__main__":
  absltest.main()
