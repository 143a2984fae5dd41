"""The import rules of pyproject.toml's [tool.importlinter] hold, and importing rayms stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-m", "importlinter.cli", "--config", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0 and "No module named importlinter.cli" in result.stderr:
        result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT,
                                capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_importing_rayms_pulls_in_no_ml_library_or_ray():
    code = ("import sys, rayms, rayms.config, rayms.errors; "
            "print(sorted(m for m in ('ray','sklearn','xgboost','lightgbm','onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
