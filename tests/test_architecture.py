"""The package's imports point one way, along the data flow, read from the source.

    base (sharding, tokenizer, checkpoint, …) → model → sampling → reward → config → data
    → rollout → {synth, train} → evaluation → pipeline → plan → the public API
    (opera_jax/__init__) → command line

A module may import modules of its own part or of the parts before it, never after; inside a
part the imports form no cycle; and no module imports a project module inside a function (a
cycle in disguise). Entry points (`__main__` modules and the `python -m` modules) are the
command-line part: nothing imports them.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "opera_jax")
PARTS = ("base", "model", "sampling", "reward", "config", "data", "rollout", "synth", "train",
         "evaluation", "pipeline", "plan", "api", "cli")
BASE = {"buckets", "checkpoint", "distributed", "enums", "locks", "outputs", "sharding",
        "tokenizer"}
CLI = {"opera_jax.cli", "opera_jax.eval", "opera_jax.export", "opera_jax.train.__main__",
       "opera_jax.plan.__main__"}


def modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def part(module: str) -> str:
    if module in CLI:
        return "cli"
    pieces = module.split(".")
    if len(pieces) == 1:  # the package's public API: nothing in the package imports it
        return "api"
    if pieces[1] in BASE:
        return "base"
    return pieces[1].removesuffix(".py")


def project_imports(tree: ast.AST, known: set[str]):
    """(imported project module, line, inside a function?) for every import in `tree`."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("opera_jax"):
                        yield alias.name, child.lineno, inner
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith(
                    "opera_jax"):
                for alias in child.names:
                    name = f"{child.module}.{alias.name}"
                    yield (name if name in known else child.module), child.lineno, inner
            yield from walk(child, inner)
    yield from walk(tree, False)


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    edges = {}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges[mod] = list(project_imports(tree, set(mods)))
    return mods, edges


def test_every_module_is_in_a_known_part(graph):
    mods, _ = graph
    assert {part(m) for m in mods} <= set(PARTS), {m: part(m) for m in mods
                                                    if part(m) not in PARTS}


def test_no_project_import_inside_a_function(graph):
    _, edges = graph
    inside = [f"{mod}:{line} imports {target}" for mod, found in edges.items()
              for target, line, in_function in found if in_function]
    assert not inside, "\n".join(inside)


def test_imports_point_along_the_data_flow(graph):
    _, edges = graph
    backwards = [f"{mod} ({part(mod)}) imports {target} ({part(target)})"
                 for mod, found in edges.items() for target, _, _ in found
                 if PARTS.index(part(target)) > PARTS.index(part(mod))]
    assert not backwards, "\n".join(backwards)
    assert not any(part(t) == "cli" for found in edges.values() for t, _, _ in found
                   if t != "opera_jax.cli"), "an entry point is imported"


def test_no_cycle_inside_a_part(graph):
    mods, edges = graph
    adjacency = {m: {t for t, _, _ in edges[m] if t in mods and part(t) == part(m) and t != m
                     and not (m.startswith(t + ".") or t == m.rsplit(".", 1)[0])}
                 for m in mods}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in adjacency[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [])
