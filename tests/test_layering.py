"""The package's layers: every import of grain_jax/**.py goes down the table below, no import
cycle, nothing in the library imports the command line, imports inside functions only defer
a heavy optional dependency, and `python -m grain_jax SUB` is the one module entry point.

Read from the source with `ast` (nothing is imported). `python tests/test_layering.py` prints
the import floor of each folder and of each module (1: imports nothing of grain_jax; a room
stands one floor above the highest it imports).
"""
import ast
import collections
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "grain_jax")

# The layers, bottom first: a module imports only from its own layer and those before it.
# (docs/internals.md describes each.)
LAYERS = (
    ("util", ("grain_jax.util",)),
    ("nets", ("grain_jax.nets",)),
    ("formats", ("grain_jax.formats",)),
    ("data", ("grain_jax.data",)),
    ("inference", ("grain_jax.inference", "grain_jax.rescale")),
    ("eval", ("grain_jax.eval",)),
    ("train", ("grain_jax.train",)),
    ("configs", ("grain_jax.configs",)),
    ("cli", ("grain_jax.cli",)),
    ("entry", ("grain_jax.__main__",)),
    ("api", ("grain_jax",)),  # the package's face: `import grain_jax` (load, read_image, align)
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# Imports that may stay inside a function: heavy optional dependencies, imported only when
# used. Each such line says why with a `# deferred:` comment.
DEFERRED = {"torch": "the [torch] extra, for reading .pt files only",
            "dlib": "the [align] extra, for face alignment only",
            "tensorboardX": "imports torch when installed (about a second)"}


def modules() -> dict:
  """{module name: path} of every .py file of the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        path = os.path.join(root, n)
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
  return out


MODULES = modules()


def layer(module: str) -> str:
  """The layer a module belongs to (the longest matching prefix in LAYERS)."""
  best = max((p for _, prefixes in LAYERS for p in prefixes
              if module == p or module.startswith(p + ".")), key=len)
  return next(name for name, prefixes in LAYERS if best in prefixes)


def _targets(node) -> list:
  """The grain_jax modules an import statement loads."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "grain_jax"]
  if node.level or not node.module or node.module.split(".")[0] != "grain_jax":
    return []
  return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
          for a in node.names]


def _read(path: str) -> tuple[list, ast.Module]:
  with open(path) as f:
    source = f.read()
  return source.splitlines(), ast.parse(source)


SOURCES = {m: _read(path) for m, path in MODULES.items()}  # {module: (lines, tree)}


def statements(tree: ast.Module) -> list:
  """[(import statement, whether it is inside a function)] of a module."""
  in_function = {id(n) for fn in ast.walk(tree)
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
  return [(n, id(n) in in_function) for n in ast.walk(tree)
          if isinstance(n, (ast.Import, ast.ImportFrom))]


STATEMENTS = {m: statements(tree) for m, (_, tree) in SOURCES.items()}
# {module: [(imported grain_jax module, line)]}
IMPORTS = {m: [(t, node.lineno) for node, _ in found for t in _targets(node)]
           for m, found in STATEMENTS.items()}


def test_every_module_is_in_a_layer_and_every_import_goes_down():
  wrong = []
  for module, found in IMPORTS.items():
    for target, line in found:
      assert target in MODULES, f"{module}:{line} imports {target}, which is not a module"
      if RANK[layer(target)] > RANK[layer(module)]:
        wrong.append(f"{MODULES[module]}:{line}: {layer(module)} imports {layer(target)} "
                     f"({target})")
  assert not wrong, "imports that go up:\n" + "\n".join(wrong)


def test_no_import_cycle():
  graph = {m: sorted({t for t, _ in found}) for m, found in IMPORTS.items()}
  state, path = {}, []

  def visit(m):
    state[m] = "open"
    path.append(m)
    for t in graph[m]:
      if state.get(t) == "open":
        raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
      if t not in state:
        visit(t)
    path.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_only_the_module_entry_point_imports_the_command_line():
  users = {m for m, found in IMPORTS.items() if layer(m) != "cli"
           for t, _ in found if layer(t) == "cli"}
  assert users == {"grain_jax.__main__"}


def test_imports_inside_functions_only_defer_a_heavy_optional_dependency():
  found = []
  for module, statements_ in STATEMENTS.items():
    lines = SOURCES[module][0]
    for node, in_function in statements_:
      name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
      line = lines[node.lineno - 1]
      if in_function and (name.split(".")[0] not in DEFERRED or "# deferred:" not in line):
        found.append(f"{MODULES[module]}:{node.lineno}: {line.strip()}")
  assert not found, ("imports inside functions that defer no heavy optional dependency (or "
                     "say not why):\n" + "\n".join(found))


def test_python_dash_m_grain_jax_is_the_one_module_entry_point():
  mains = []
  for module, (_, tree) in SOURCES.items():
    mains += [module for node in tree.body if isinstance(node, ast.If)
              and "__name__" in ast.unparse(node.test)]
  assert mains == ["grain_jax.__main__"]


def floors(room=lambda m: m) -> dict:
  """{room: import floor}, a room being a module or, with `room`, what it maps modules to
  (1: imports nothing of grain_jax; a room stands one floor above the highest it imports).
  Rooms that import each other fail the assertion that names them."""
  graph = collections.defaultdict(set)
  for m, found in IMPORTS.items():
    graph[room(m)] |= {room(t) for t, _ in found if room(t) != room(m)}
  floor, open_ = {}, set()

  def of(r):
    assert r not in open_, f"rooms that import each other: {sorted(open_)}"
    if r not in floor:
      open_.add(r)
      floor[r] = 1 + max((of(t) for t in graph[r]), default=0)
      open_.discard(r)
    return floor[r]

  return {r: of(r) for r in list(graph)}


def folder(module: str) -> str:
  """The room of a module seen folder by folder: its layer's folder, or the module itself
  for those at the package's top (inference.py, rescale.py, __main__.py, the face)."""
  parts = module.split(".")
  return module if len(parts) == 1 or MODULES[module].endswith(parts[1] + ".py") else (
      "grain_jax." + parts[1])


def test_the_library_stands_on_at_most_six_floors_of_folders():
  """Seen folder by folder (a layer's folder one room, the package's top-level modules rooms
  of their own), the library stands on at most 6 floors, the command line included; the
  entry points (`python -m grain_jax`, the clone's train.py) make the 7th."""
  f = floors(folder)
  assert max(v for r, v in f.items() if r not in ("grain_jax.__main__", "grain_jax")) <= 6, f


if __name__ == "__main__":
  for name, f in (("folders", floors(folder)), ("modules", floors())):
    print(f"{name}: {max(f.values())} floors")
    for r in sorted(f, key=lambda r: (-f[r], r)):
      print(f"  {f[r]:3d}  {r}")
