"""The package's import graph, read from the source: one direction through the layers, no cycles, no module
importing a command module, and imports at the top of each module (cli.py's docstring gives the exceptions)."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "loraforge"
# Lowest first; a module may import from its own layer or a lower one. data.formats (the format registry) sits
# under config because the config offers exactly the registry's format names.
LAYERS = [
    ("loraforge", "loraforge.errors"),
    ("loraforge.data.formats",),
    ("loraforge.config",),
    ("loraforge.data", "loraforge.model"),
    ("loraforge.rundir", "loraforge.ledger", "loraforge.trained"),
    ("loraforge.eval",),
    ("loraforge.training",),
    ("loraforge.export",),
    ("loraforge.serve",),
    ("loraforge.chat", "loraforge.predict", "loraforge.preview", "loraforge.api"),
    ("loraforge.cli", "loraforge.__main__"),
]
COMMANDS = {"loraforge.chat", "loraforge.predict", "loraforge.preview", "loraforge.api", "loraforge.cli"}
HEAVY = {"torch", "transformers", "peft", "trl", "datasets", "pyarrow", "bitsandbytes", "accelerate", "matplotlib",
         "gguf", "rouge_score", "tensorboard", "fastapi", "starlette", "uvicorn",
         "wandb", "mlflow", "huggingface_hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    best = max((prefix for group in LAYERS for prefix in group if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported loraforge module, line, inside a function) for every import of the package in a module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in in_function) for name in names]
    return found


# `import loraforge` gives the Python API (loraforge/api.py, and load_config straight from loraforge.config) through
# a lazy module __getattr__: the package root is the public entry to the upper layers, not something the layers
# below depend on.
LAZY_API = {("loraforge", "loraforge.api"), ("loraforge", "loraforge.config")}


def internal_edges() -> dict[str, set[str]]:
    return {m: {name for name, _, late in imports(m) if name in MODULES and name != m and not (late and (m, name) in LAZY_API)}
            for m in MODULES}


def test_the_graph_is_read():
    edges = internal_edges()
    assert "loraforge.training.run" in edges and "loraforge.training.prepare" in edges["loraforge.training.run"]


def test_imports_go_down_the_layers():
    wrong = [f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
             for m, targets in internal_edges().items() for n in targets if layer(n) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = internal_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_a_command_module():
    wrong = [f"{m} imports {n}" for m, targets in internal_edges().items() for n in targets
             if n in COMMANDS and m not in ("loraforge.cli", "loraforge.__main__")]
    assert not wrong, "\n".join(wrong)


def late_imports(module: str) -> list[tuple[str, str]]:
    """(imported name, where) of every import inside a function of the module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return [(node.module if isinstance(node, ast.ImportFrom) else node.names[0].name,
             f"{MODULES[module].name}:{node.lineno} in {function.name}")
            for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))]


# loraforge modules whose import pulls in TRL, deferred like TRL itself so that SFT runs never import it.
DEFERRED = {"loraforge.training.preference_trainer", "loraforge.internals.preference"}


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"loraforge.cli"}))
def test_imports_sit_at_the_top(module):
    late = [f"{where} imports {name}" for name, where in late_imports(module)
            if name.split(".")[0] not in HEAVY and name not in DEFERRED
            and not (module == "loraforge" and name in ("loraforge", "loraforge.config"))]
    assert not late, "\n".join(late)


def test_cli_defers_only_what_pulls_in_the_heavy_stack():
    late = {name for name, _ in late_imports("loraforge.cli")}
    assert late and all(name.split(".")[0] in HEAVY or name in MODULES for name in late), late
    assert not {name for name in late if name in MODULES and layer(name) < layer("loraforge.rundir")}, (
        "config and errors are light: cli imports them at the top")

