"""Imports point one way: the import-linter contracts of pyproject.toml hold (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept() -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (
        "an import breaks the layers of pyproject.toml [tool.importlinter] (see docs/architecture.md): move what "
        "both sides need to the lower layer, or place a new module in a layer\n" + result.stdout + result.stderr
    )
