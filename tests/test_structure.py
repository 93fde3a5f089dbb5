"""The code's shape, checked from its syntax tree: the limits the driver's design keeps.

- no class over 200 lines (documented field declarations aside), no function over 60 (STYLE.md:
  small modules, one concept each);
- only the replica group calls Ray for replicas: no `.remote(`, `ray.get`, `ray.wait`, `ray.kill`
  (nor an import of ray) in the driver's modules;
- the loop's objects declare their state in __init__: no attribute first set in another method.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "raytorch"
DRIVER_SIDE = ["driver.py", "loop.py", "pipeline.py", "recovery.py", "checkpoint.py", "position.py", "runplan.py",
               "output.py", "snapshot.py"]
STATEFUL = {"loop.py": ["EpochLoop"], "pipeline.py": ["StepPipeline"], "recovery.py": ["Recovery"],
            "output.py": ["RunOutput"], "checkpoint.py": ["RunCheckpoints"], "group.py": ["ReplicaGroup"]}


def parsed(name: str) -> ast.Module:
    return ast.parse((SRC / name).read_text(), filename=name)


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
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                yield path.name, node, node.end_lineno - node.lineno + 1 - declared_fields(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node, node.end_lineno - node.lineno + 1


def test_no_class_over_200_lines_no_function_over_60():
    too_long = [f"{name}:{node.lineno} {node.name} ({lines} lines)" for name, node, lines in sizes()
                if lines > (200 if isinstance(node, ast.ClassDef) else 60)]
    assert not too_long, too_long


@pytest.mark.parametrize("name", DRIVER_SIDE)
def test_the_driver_side_never_calls_ray(name):
    calls = []
    for node in ast.walk(parsed(name)):
        if isinstance(node, ast.Attribute) and (node.attr == "remote" or (
                isinstance(node.value, ast.Name) and node.value.id == "ray")):
            calls.append(f"{name}:{node.lineno} {ast.unparse(node)}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            calls += [f"{name}:{node.lineno} imports {m}" for m in modules if m == "ray" or m.startswith("ray.")]
    assert not calls, calls


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


@pytest.mark.parametrize("name, cls", [(n, c) for n, classes in STATEFUL.items() for c in classes])
def test_state_is_declared_in_init(name, cls):
    classes = {n.name: n for n in parsed(name).body if isinstance(n, ast.ClassDef)}
    node = classes[cls]
    methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
    # its own __init__ and those of its bases defined beside it (ReplicaGroup's ReplicaCalls)
    inits = [m for c in [node] + [classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
             for m in c.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"]
    declared = set().union(*(assigned_attributes(m) for m in inits))
    late = {f"{m.name} sets self.{a}" for m in methods if m.name != "__init__"
            for a in assigned_attributes(m) - declared}
    assert not late, sorted(late)
