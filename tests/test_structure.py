"""The house rules of the code base (issue [house]), checked on the source itself with ``ast``:

- every model `ctxagg models` lists is a plain ``def NAME(`` in ``src/`` (nothing generated into ``globals()``);
- no import cycle between ctxagg's modules, and no module imports a layer above its own
  (affinity/ → layers/ → blocks/ → models/ → train|bench|analysis|export → dense|ssl → cli);
- no function longer than 60 lines.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ctxagg"
MAX_FUNCTION_LINES = 60
# the layer of each top-level part of the package; a module may import its own layer and the ones below
LAYERS = {"errors": 0, "tracing": 0, "checks": 0, "runs": 0, "flags": 0, "affinity": 1, "layers": 2, "blocks": 3,
          "models": 4, "train": 5, "bench": 5, "analysis": 5, "export": 5, "dense": 6, "ssl": 6, "cli": 7, "__main__": 8}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The ctxagg modules ``name`` imports, anywhere in the file (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for cand in candidates:
            while cand and cand not in MODULES:  # `from .x import y`: y is a module or a name in x
                cand = cand.rpartition(".")[0]
            if cand.startswith("ctxagg") and cand != name:
                found.add(cand)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_part_of_the_package_has_a_layer():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, targets in GRAPH.items()
              for t in targets if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def _cycle() -> list[str]:
    """One import cycle between modules (a package's __init__ counts as a module), or []."""
    graph = {m: {t for t in ts if t in GRAPH} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_between_modules():
    cycle = _cycle()
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(monkeypatch):
    planted = dict(GRAPH)
    planted["ctxagg.affinity.base"] = GRAPH["ctxagg.affinity.base"] | {"ctxagg.models.container"}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    cycle = _cycle()
    assert cycle and cycle[0] == cycle[-1] and "ctxagg.affinity.base" in cycle


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_every_listed_model_is_a_plain_def_in_the_source():
    from ctxagg.models import model_names

    source = "\n".join(p.read_text() for p in MODULES.values())
    defined = set(re.findall(r"^def (\w+)\(", source, flags=re.M))
    names = model_names()
    assert len(names) > 40
    missing = sorted(set(names) - defined)
    assert not missing, f"registered but not found by `grep -rn 'def NAME('`: {missing}"
    assert "globals()" not in source


@pytest.mark.parametrize("old,new", [("mlp", "container_mlp"), ("dw3", "container_dw3"),
                                     ("hdeit_s", "container_hdeit_s")])
def test_old_container_names_still_build_with_a_deprecation_warning(old, new):
    import timm

    import ctxagg  # noqa: F401

    assert new in timm.list_models() and old not in timm.list_models()
    with pytest.warns(UserWarning, match=f"deprecated model name {old} to current {new}"):
        model = timm.create_model(old, pretrained=False, num_classes=2)
    assert model.pretrained_cfg["architecture"] == new
