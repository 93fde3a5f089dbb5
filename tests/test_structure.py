"""The code's shape, checked from the syntax tree of every module under src/raytorch (found by rglob,
so a module added or moved is checked without editing this file):

- the layers (issue 28): a module imports only its own layer, the layers LAYERS lists for it, and
  raytorch.errors; imports inside functions count, `if TYPE_CHECKING:` imports do not;
- no import cycle between raytorch's modules, in the syntax tree and at import time (each module
  imported first into an interpreter that holds none of raytorch yet, as Ray's
  python/ray/tests/test_circular_imports.py does);
- only the replica group calls Ray for replicas: ray is imported only where RAY_ALLOWED says why,
  the driver and the pure layers never touch it, and Ray's private APIs are used only in compat/;
- no module over 400 lines, no class over 200 (documented field declarations aside), no function over 60;
- the loop's objects declare their state in __init__: no attribute first set in another method;
- every package folder's __init__.py says in its docstring what the layer is.
"""

import ast
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "raytorch"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py")) if "__pycache__" not in p.parts}

# -- the layers -------------------------------------------------------------------------------

FOLDERS = {"config", "core", "compat", "data", "persist", "wire", "tasks", "output", "replica", "group", "driver"}
LOWEST = {"config", "core", "compat"}  # what data/, persist/, wire/ and tasks/ stand on
# Each layer, low to high: the layers it may import besides itself and errors (which all may import).
# data, persist and wire are peers: none imports another.
LAYERS = {
    "errors": set(),
    "config": set(),
    "core": {"config"},
    "compat": set(),  # Ray's private APIs behind one door: nothing else of raytorch's (compat/__init__.py)
    "data": LOWEST,
    "persist": LOWEST,
    "wire": LOWEST,  # a wire knows buffers and peers, not the replica's learner
    "tasks": LOWEST | {"data"},
    "output": LOWEST,
    "replica": LOWEST | {"data", "wire", "output"},
    "group": LOWEST | {"data", "wire", "replica"},  # never the driver (nor the output: it reports, the driver tells)
    "driver": LOWEST | {"data", "persist", "output", "replica", "group"},
    # The entry points and integrations: every folder, and the public face; only cli imports the others.
    "tune": FOLDERS | {"raytorch"},
    "trackers": FOLDERS | {"raytorch"},
    "submit": FOLDERS | {"raytorch"},
    "cli": FOLDERS | {"raytorch", "tune", "trackers", "submit"},
    "raytorch": FOLDERS | {"errors", "tune", "trackers", "submit", "cli"},  # raytorch/__init__.py, the public face
}


def layer_of(module: str) -> str:
    """raytorch.group.health -> group; raytorch.cli -> cli; raytorch -> raytorch (the public face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def where(module: str) -> str:
    return MODULES[module].relative_to(SRC).as_posix() if module in MODULES else module


@functools.cache
def tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def walk(node: ast.AST, type_checking: bool = False) -> Iterator[ast.AST]:
    """Every node under `node`, function bodies included; the bodies of `if TYPE_CHECKING:` only
    where type_checking (their else branches always: they run)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not type_checking and isinstance(child, ast.If) and is_type_checking(child.test):
            for branch in child.orelse:
                yield from walk(branch, type_checking)
        else:
            yield from walk(child, type_checking)


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a from-import names, `..x` resolved against `module`'s package."""
    if not node.level:
        return node.module
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    return ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))


@functools.cache
def imports(module: str, type_checking: bool = False) -> tuple[tuple[int, str], ...]:
    """(line, module imported) for every import in `module`, lazy ones inside functions too. For
    raytorch, `from raytorch.x import y` imports raytorch.x.y where that is a module, else
    raytorch.x (its __init__.py); for others, `from a import b` reads as a.b."""
    found = []
    for node in walk(tree(module), type_checking):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            for alias in node.names:
                named = f"{base}.{alias.name}"
                ours = base.split(".")[0] == "raytorch"
                found.append((node.lineno, base if ours and named not in MODULES else named))
    return tuple(dict.fromkeys(found))  # once each: `from .x import a, b` is one import of x


def test_every_module_belongs_to_a_layer():
    strays = [where(m) for m in MODULES if layer_of(m) not in LAYERS]
    assert not strays, f"modules outside the layers (add them to a folder, or the layer to LAYERS): {strays}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    layer = layer_of(module)
    allowed = LAYERS.get(layer, set()) | {layer, "errors"}
    forbidden = [f"{where(module)}:{line} -> {target}" for line, target in imports(module)
                 if target.split(".")[0] == "raytorch" and layer_of(target) not in allowed]
    assert not forbidden, f"{layer} may import only {sorted(allowed)}; it imports: {forbidden}"


# -- no import cycle --------------------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    """Each raytorch module -> the raytorch modules it imports (TYPE_CHECKING imports aside)."""
    return {m: {target for _, target in imports(m) if target in MODULES and target != m} for m in MODULES}


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] where it has none (a depth-first search)."""
    done, path = set(), []

    def visit(node: str) -> list[str]:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return []


def test_a_cycle_is_found_and_printed_as_a_chain():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    cycle = a_cycle(import_graph())
    assert not cycle, "an import cycle: " + " -> ".join(where(m) for m in cycle)


FIRST_IMPORTS = """
import importlib, json, sys, traceback, types
source, bare, failed = sys.argv[1], set(sys.argv[2].split(",")), {}
for name in sys.argv[3:]:
    for loaded in [m for m in sys.modules if m == "raytorch" or m.startswith("raytorch.")]:
        del sys.modules[loaded]
    if name in bare:  # raytorch as a bare package: its __init__.py, the public face, does not run first
        sys.modules["raytorch"] = types.ModuleType("raytorch")
        sys.modules["raytorch"].__path__ = [source]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc()
print(json.dumps(failed))
"""


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        if (node := todo.pop()) == goal:
            return True
        seen.add(node)
        todo += graph[node] - seen
    return False


@pytest.fixture(scope="module")
def first_imports() -> dict[str, str]:
    """Each module imported first, one after another in one fresh interpreter, raytorch's modules
    dropped from sys.modules before each (torch and Ray stay loaded: seconds, not minutes); a module
    that needs nothing of the public face is imported under a bare `raytorch` package, so its own
    import order is the one tried, not the face's. Returns module -> traceback, for those that failed."""
    graph = import_graph()
    bare = [m for m in MODULES if m != "raytorch" and not reaches(graph, m, "raytorch")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, str(SRC), ",".join(bare), *sorted(MODULES)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_first(first_imports, module):
    assert module not in first_imports, first_imports.get(module)


# -- Ray only where it belongs ----------------------------------------------------------------

RAY_ALLOWED = {  # a folder or a module under src/raytorch: why it imports ray
    "group": "the replica group: the only caller of Ray for replicas (actors, placement, the cluster)",
    "compat": "Ray's private APIs and the texts of its messages, in one place",
    "replica/actor.py": "defines the Ray actor a replica is",
    "replica/metrics.py": "the replica's Ray metrics (ray.util.metrics)",
    "replica/process.py": "the replica's own process: the GPUs Ray assigned it (its runtime context)",
    "replica/wiring.py": "the replica's node address, where a collective group meets (ray.util.get_node_ip_address)",
    "output/metrics.py": "the driver's Ray metrics (ray.util.metrics)",
    "data/raydata.py": "reads a ray.data.Dataset's blocks",
    "tune.py": "Ray Tune: the trainable, the trial's placement group",
    "submit.py": "Ray Jobs: the run submitted and followed as a job",
}
NO_RAY = {"driver", "core", "config", "persist"}  # never a reference to Ray, not even for type checking


def is_ray(target: str) -> bool:
    return target == "ray" or target.startswith("ray.")


def ray_allowed(module: str) -> bool:
    path = where(module)
    return path in RAY_ALLOWED or path.split("/")[0] in RAY_ALLOWED


def imports_ray(module: str) -> bool:
    return any(is_ray(target) for _, target in imports(module, type_checking=True))


def test_the_ray_allow_list_is_current():
    covered = {entry: [m for m in MODULES if entry in (where(m), where(m).split("/")[0])] for entry in RAY_ALLOWED}
    stale = [entry for entry, modules in covered.items() if not modules]
    unused = [entry for entry, modules in covered.items() if modules and not any(map(imports_ray, modules))]
    assert not stale and not unused, f"entries naming no module: {stale}; entries whose modules import no Ray: {unused}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not ray_allowed(m)))
def test_only_the_allowed_modules_import_ray(module):
    found = [f"{where(module)}:{line} -> {target}" for line, target in imports(module) if is_ray(target)]
    assert not found, f"{where(module)} imports Ray (RAY_ALLOWED lists the modules that may, and why): {found}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) in NO_RAY))
def test_the_driver_and_the_pure_layers_never_touch_ray(module):
    found = [f"{where(module)}:{line} imports {target}" for line, target in imports(module, type_checking=True)
             if is_ray(target)]
    for node in walk(tree(module), type_checking=True):
        remote = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "remote"
        if remote or isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray":
            found.append(f"{where(module)}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def ray_names(module: str) -> set[str]:
    """The names `module` binds to Ray's modules and objects (import ray; from ray.x import y as z)."""
    names = set()
    for node in walk(tree(module), type_checking=True):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if is_ray(a.name)}
        elif isinstance(node, ast.ImportFrom) and not node.level and is_ray(node.module):
            names |= {a.asname or a.name for a in node.names}
    return names


def private_ray_uses(module: str) -> Iterator[str]:
    bound = ray_names(module)
    for line, target in imports(module, type_checking=True):
        if is_ray(target) and any(private(part) for part in target.split(".")):
            yield f"{where(module)}:{line} imports {target}"
    for node in walk(tree(module), type_checking=True):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr == "_actor_id" or node.attr.startswith("_ray_") or (
                    isinstance(root, ast.Name) and root.id in bound):
                yield f"{where(module)}:{node.lineno} {ast.unparse(node)}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(
                r"\bray\._(private|raylet)\b", node.value):
            yield f"{where(module)}:{node.lineno} names {node.value!r}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) != "compat"))
def test_rays_private_apis_only_in_compat(module):
    found = sorted(set(private_ray_uses(module)))
    assert not found, f"Ray's private APIs outside compat/ (move them into compat/rayprivate.py): {found}"


# -- sizes ------------------------------------------------------------------------------------


def declared_fields(cls: ast.ClassDef) -> int:
    """Lines of a class's field declarations (annotated names, each with the docstring under it
    and the blank line after): settings documented one by one, not behaviour."""
    lines = 0
    for node, after in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            lines += (after.end_lineno if documented else node.end_lineno) - node.lineno + 2
    return lines


def sizes():
    for module in MODULES:
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.ClassDef):
                yield where(module), node, node.end_lineno - node.lineno + 1 - declared_fields(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield where(module), node, node.end_lineno - node.lineno + 1


def test_no_module_over_400_lines():
    too_long = [f"{where(m)} ({lines} lines)" for m in MODULES
                if (lines := len(MODULES[m].read_text().splitlines())) > 400]
    assert not too_long, too_long


def test_no_class_over_200_lines_no_function_over_60():
    too_long = [f"{path}:{node.lineno} {node.name} ({lines} lines)" for path, node, lines in sizes()
                if lines > (200 if isinstance(node, ast.ClassDef) else 60)]
    assert not too_long, too_long


# -- state declared in __init__ ---------------------------------------------------------------

STATEFUL = ["EpochLoop", "StepPipeline", "Recovery", "RunOutput", "RunCheckpoints", "ReplicaGroup"]


@functools.cache
def classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Each class name defined at the top of a module in the tree -> [(module, its definition)]."""
    found = {}
    for module in MODULES:
        for node in tree(module).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append((module, node))
    return found


def definition(name: str, module: str) -> Optional[tuple[str, ast.ClassDef]]:
    """Class `name` as `module` sees it: defined there, else the one class of that name in the tree."""
    found = classes().get(name, [])
    return next((d for d in found if d[0] == module), found[0] if len(found) == 1 else None)


def inits(module: str, cls: ast.ClassDef) -> list[ast.FunctionDef]:
    """The __init__ of `cls` and those of its bases defined in the tree, theirs too."""
    own = [m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"]
    names = [b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, (ast.Name, ast.Attribute))]
    bases = [found for name in names if (found := definition(name, module))]
    return own + [init for base_module, base in bases for init in inits(base_module, base)]


def assigned_attributes(function: ast.FunctionDef) -> set[str]:
    """Names of self.<name> assigned (or augmented) in `function`."""
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for element in ast.walk(target):
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == "self":
                    names.add(element.attr)
    return names


@pytest.mark.parametrize("cls", STATEFUL)
def test_state_is_declared_in_init(cls):
    found = classes().get(cls, [])
    assert len(found) == 1, f"{cls} is defined {len(found)} times under src/raytorch: {[where(m) for m, _ in found]}"
    module, node = found[0]
    declared = set().union(*(assigned_attributes(m) for m in inits(module, node)))
    methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "__init__"]
    late = {f"{m.name} sets self.{a}" for m in methods for a in assigned_attributes(m) - declared}
    assert not late, f"{where(module)}: {sorted(late)}"


# -- each package says what its layer is ------------------------------------------------------

PACKAGES = sorted(d for d in [SRC, *SRC.rglob("*")] if d.is_dir() and d.name != "__pycache__")


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip())[0]


def test_a_sentence_is_told_from_a_label():
    assert first_sentence("config.") == "config."
    assert first_sentence("Driver: the run itself. Never imports Ray.") == "Driver: the run itself."


@pytest.mark.parametrize("package", PACKAGES, ids=lambda d: d.relative_to(SRC.parent).as_posix())
def test_every_package_says_what_its_layer_is(package):
    init = package / "__init__.py"
    assert init.exists(), f"{init} is missing"
    sentence = first_sentence(ast.get_docstring(ast.parse(init.read_text())) or "")
    assert len(sentence.split()) >= 3 and sentence[-1:] in ".!?", \
        f"{init.relative_to(SRC.parent)}'s docstring is not the layer's paragraph: {sentence!r}"
