"""The package's floors (README, "How the code is laid out"): every import, module-level or inside a function,
goes down or stays on its floor; stages import no other stage; the import graph has no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "icnn_compress"

# Floors, lowest first. A module belongs to the floor of its first name under icnn_compress.
FLOORS = {
    "runtime": 0, "errors": 0,
    "method": 1,
    "config": 2, "data": 2,
    "models": 3, "zoo": 3,
    "runs": 4,
    "train": 5, "evaluate": 5, "analyze": 5, "report": 5, "prune": 5, "export": 5, "compare": 5,
    "pipeline": 6, "cli": 6, "__init__": 6,
}
STAGE_FLOOR = 5
# The only imports from one stage into another: recovery after pruning is fine-tuning.
STAGE_TO_STAGE = {("prune", "train")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The icnn_compress modules that ``name`` imports anywhere in its file (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "icnn_compress"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "icnn_compress":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out |= subs or {target}
    return {m for m in out if m != name}


def _floor_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in FLOORS, f"{module} is on no floor: add {top!r} to FLOORS (and to the README's picture)"
    return FLOORS[top], top


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {m for m in _imports(name, path, known) if m in known or m.rsplit(".", 1)[0] in known}
            for name, path in modules.items()}


def test_every_import_goes_down_or_stays_on_its_floor():
    wrong = []
    for name, targets in _graph().items():
        floor, top = _floor_of(name)
        for target in sorted(targets):
            to_floor, to_top = _floor_of(target)
            if to_floor > floor:
                wrong.append(f"{name} (floor {floor}) imports {target} (floor {to_floor})")
            elif floor == to_floor == STAGE_FLOOR and top != to_top and (top, to_top) not in STAGE_TO_STAGE:
                wrong.append(f"stage {name} imports stage {target}")
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_floor_test_sees_upward_and_stage_imports(tmp_path):
    """The walker itself: a relative import resolves, a lazy import counts, a submodule import is named."""
    known = {"icnn_compress.method.mask", "icnn_compress.train", "icnn_compress.evaluate", "icnn_compress.method"}
    src = tmp_path / "mask.py"
    src.write_text("def f():\n    from ..train import finetune\n    from icnn_compress import evaluate\n"
                   "from icnn_compress.method import mask\n")
    assert _imports("icnn_compress.method.mask", src, known) == {"icnn_compress.train", "icnn_compress.evaluate"}


def test_importing_the_package_imports_no_heavy_stage_dependency():
    code = ("import sys, icnn_compress; heavy = [m for m in ('captum', 'torch_pruning', 'onnx', 'onnxruntime') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == ""
    import icnn_compress

    assert callable(icnn_compress.prune_run) and callable(icnn_compress.finetune)
