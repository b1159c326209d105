"""The shape of the code: imports point down (resnet_flax <- convert <- train <- benchmarks) and every file has
one job (none over 400 lines without the reason stated at its top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["resnet_flax", "convert", "train", "benchmarks"]  # each may import only those before it
MAX_LINES = 400
LONG_FILE_MARK = "Length:"  # a long file's docstring says why it stays one file, after this word


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_imports_point_down(package):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    up = [f"{f.relative_to(REPO)}:{line} imports {mod}" for f in sorted((REPO / package).rglob("*.py"))
          for line, mod in imported_modules(f) if mod.split(".")[0] in above]
    assert up == []


def test_resnet_flax_imports_without_convert_train_or_torch():
    """Importing the model library (and loading a checkpoint's code path) pulls in nothing from above it."""
    import subprocess
    import sys

    code = ("import sys, resnet_flax, resnet_flax.loading, resnet_flax.hub; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'convert', 'train', 'benchmarks', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_no_file_over_400_lines_without_a_reason():
    long = []
    for package in LAYERS:
        for f in sorted((REPO / package).rglob("*.py")):
            lines = f.read_text().count("\n")
            docstring = ast.get_docstring(ast.parse(f.read_text())) or ""
            if lines > MAX_LINES and LONG_FILE_MARK not in docstring:
                long.append(f"{f.relative_to(REPO)} ({lines} lines)")
    assert long == []
