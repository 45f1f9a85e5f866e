"""sft.modeling's modules import each other without a cycle (imports inside functions included:
a cycle hidden in a function still ties the modules together), and the kernels import neither
PEFT nor transformers nor the wiring above them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import sft.modeling

PACKAGE = Path(sft.modeling.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code: ``from a import b`` counts as
    importing a and a.b (import_graph keeps the names that are modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import (sft imports absolutely)"
            base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """sft.modeling's modules, each with the sft.modeling modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path): path for path in paths}
    return {name: {m for m in _imported(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path that closes it (a, b, a), or None."""
    state: dict[str, str] = {}  # "open" while on the path being explored, then "done"

    def visit(path: list[str]) -> list[str] | None:
        state[path[-1]] = "open"
        for successor in sorted(graph.get(path[-1], ())):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(path + [successor])):
                return cycle
        state[path[-1]] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit([start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_import_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "sft.modeling.lora" in graph["sft.modeling.fusion"]
    assert "sft.modeling.kernels.lora_linear" in graph["sft.modeling.kernels.swiglu"]
    # fuse_rms_norms imports LlamaRMSNorm when it runs
    assert "transformers.models.llama.modeling_llama.LlamaRMSNorm" in _imported(PACKAGE / "fusion.py")


def test_sft_modeling_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_kernels_import_only_torch_and_each_other() -> None:
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        outside = {name for name in _imported(path) if name.split(".")[0] not in (*sys.stdlib_module_names, "torch")
                   and not name.startswith("sft.modeling.kernels")}
        assert not outside, f"sft/modeling/kernels/{path.name} imports {sorted(outside)}"
