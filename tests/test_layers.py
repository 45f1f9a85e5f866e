"""The layering contract of pyproject.toml ([tool.importlinter]) holds, and it can fail: an import
planted upward or across a layer, transformers in a kernels package, or a top-level module with no
layer breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``root`` with the contracts of ``root/pyproject.toml``."""
    environment = os.environ | {"PYTHONPATH": str(root)}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=root, env=environment,
                          capture_output=True, text=True, timeout=300, check=False)


def test_every_import_points_down_the_layers() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "sft", tmp_path / "sft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("sft/errors.py", "import sft.recipes.sft", "sft.errors is not allowed to import sft.recipes"),
    ("sft/data/formats.py", "from sft.training import stages", "sft.data is not allowed to import sft.training"),
    ("sft/rewards/verify.py", "import sft.export.gguf", "sft.rewards is not allowed to import sft.export"),
    ("sft/modeling/kernels/__init__.py", "import sft.modeling.models",
     "sft.modeling.kernels is not allowed to import transformers"),
    ("sft/rundirs.py", "import sft.files", "not listed as layers: - sft.rundirs"),
])
def test_a_planted_import_breaks_the_contract(package_copy: Path, module: str, line: str, broken: str) -> None:
    path = package_copy / module
    path.parent.mkdir(exist_ok=True)
    path.write_text((path.read_text(encoding="utf-8") if path.exists() else "") + f"\n{line}\n", encoding="utf-8")
    result = lint_imports(package_copy)
    assert result.returncode == 1 and "1 kept, 1 broken" in result.stdout
    assert broken in " ".join(result.stdout.split()), result.stdout
