"""Strip outputs from notebooks before committing them: ``python tests/notebooks/strip_outputs.py [paths]``.

Notebooks are stored without outputs (``tests/test_notebooks.py`` checks it): outputs hold ports, temporary
paths, timings and images that change on every run and would make every diff noise. Without arguments it
strips every notebook under ``notebooks/`` and ``tests/notebooks/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIRS = (REPO / "notebooks", REPO / "tests" / "notebooks")
RUN_METADATA = ("execution", "collapsed", "scrolled")


def stored_notebooks() -> list[Path]:
    return sorted(path for folder in NOTEBOOK_DIRS for path in folder.glob("*.ipynb"))


def strip(notebook: nbformat.NotebookNode) -> bool:
    """Clear outputs, execution counts and per-run cell metadata in place; True when anything changed."""
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        for key in RUN_METADATA:
            if cell.metadata.pop(key, None) is not None:
                changed = True
    return changed


def main(argv: list[str]) -> int:
    for path in [Path(arg) for arg in argv] or stored_notebooks():
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if strip(notebook):
            nbformat.write(notebook, path)
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
