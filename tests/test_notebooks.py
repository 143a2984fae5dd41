"""The notebooks in ``notebooks/`` run top to bottom, as a reader would run them, and keep working.

Each notebook starts and stops its own Ray instance, so it runs in a fresh kernel process (nbclient, the
engine of ``jupyter execute``), never in this one, and never next to the session's shared Ray. The kernel
is the Python running these tests (a kernelspec written to a temporary folder), so it sees the same
installed rayms, behind a fence (``tests/notebooks/fenced_kernel.py``) that lets it import only what
``pip install 'rayms[notebooks]'`` installs. A notebook run fails on the first cell that raises or runs past
``CELL_TIMEOUT_S``, with that cell's error in the message. Notebooks are stored without outputs;
``tests/notebooks/strip_outputs.py`` strips them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from packaging.utils import canonicalize_name

from tests.dependencies import declared, imported_modules, undeclared

pytestmark = pytest.mark.e2e  # starts Ray in processes of its own

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
BROKEN = REPO / "tests" / "notebooks" / "broken.ipynb"
FENCED_KERNEL = REPO / "tests" / "notebooks" / "fenced_kernel.py"
EXTRA = "notebooks"
CELL_TIMEOUT_S = 600
NOTEBOOK_TIMEOUT_S = 1800  # two busy cores shared with other test runs: generous, but finite
KERNEL = "python3"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A ``python3`` kernelspec that runs this interpreter (the venv's), whatever ``python`` is on PATH, behind
    the fence that keeps it to rayms's and the notebooks extra's modules."""
    folder = tmp_path_factory.mktemp("kernels") / KERNEL
    folder.mkdir()
    spec = {"argv": [sys.executable, str(FENCED_KERNEL), "-f", "{connection_file}"],
            "display_name": "Python 3 (rayms tests)", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder.parent)])


def run_notebook(path: Path, *, kernel_specs: KernelSpecManager, output_dir: Path,
                 cell_timeout_s: float = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Execute ``path`` in a new kernel; return the executed notebook or fail naming the cell and its error."""
    notebook = nbformat.read(path, as_version=4)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # start a new Ray, always
    env["RAYMS_NOTEBOOK_OUTPUT_DIR"] = str(output_dir)
    client = NotebookClient(
        notebook, timeout=cell_timeout_s, kernel_name=KERNEL,
        km=AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs),
        resources={"metadata": {"path": str(REPO)}},
    )
    try:
        # The kernel manager is ours, so ask nbclient explicitly to shut the kernel down afterwards.
        client.execute(cleanup_kc=True, env=env)
    except CellTimeoutError as exc:
        raise AssertionError(f"{path.name}: a cell ran longer than {cell_timeout_s}s: {exc}") from None
    except CellExecutionError as exc:
        index = next((i for i, cell in enumerate(notebook.cells) if _errors(cell)), "?")
        raise AssertionError(f"{path.name}: cell {index} failed:\n{ANSI.sub('', str(exc))}") from None
    return notebook


def _errors(cell: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [out for out in cell.get("outputs", []) if out.get("output_type") == "error"]


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook-output")


@pytest.fixture(scope="module")
def executed(kernel_specs, output_dir) -> Iterator[Callable[[Path], nbformat.NotebookNode]]:
    """Run each notebook once per module, however many tests look at it; a failure is re-raised."""
    runs: dict[Path, nbformat.NotebookNode | AssertionError] = {}

    def run(path: Path) -> nbformat.NotebookNode:
        if path not in runs:
            try:
                runs[path] = run_notebook(path, kernel_specs=kernel_specs, output_dir=output_dir)
            except AssertionError as exc:
                runs[path] = exc
        if isinstance(runs[path], AssertionError):
            raise runs[path]
        return runs[path]

    yield run


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(executed, path):
    notebook = executed(path)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.execution_count is not None for cell in code_cells)
    assert not [cell for cell in code_cells if _errors(cell)]
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and "minute" in first.source, "first cell: what it shows, how long"


def test_both_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "many_models"}


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
def test_many_models_figure_shows_warm_and_cold_latency(executed, output_dir):
    executed(REPO / "notebooks" / "many_models.ipynb")
    figure = output_dir / "many_models.png"
    assert figure.stat().st_size > 30_000, f"{figure} is only {figure.stat().st_size} bytes"

    import matplotlib.image

    pixels = matplotlib.image.imread(figure)[..., :3]
    height, width, _ = pixels.shape
    assert width > 1000 and height > 300
    assert (pixels < 0.95).any(axis=-1).mean() > 0.05, "the figure is (nearly) blank"
    # The left panel holds the two histograms: bars of each colour (alpha 0.75 over white) must cover it.
    histogram_panel = pixels[:, : width // 3]
    for name, colour in (("warm", "#1f77b4"), ("cold", "#d62728")):
        rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        blended = 0.75 * rgb + 0.25
        covered = (np.abs(histogram_panel - blended).max(axis=-1) < 0.04).sum()
        assert covered > 1000, f"{name} latency histogram not visible ({covered} pixels of its colour)"

    summary = json.loads((output_dir / "many_models.json").read_text())
    assert summary["models"] == 300
    assert summary["requests"]["warm"] >= 20 and summary["requests"]["cold"] >= 20, summary
    assert summary["median_ms"]["cold"] > summary["median_ms"]["warm"], summary
    assert all(0 < n <= 50 for n in summary["max_resident"].values()), summary
    assert sum(summary["evictions"].values()) > 0, summary


@pytest.mark.timeout(300)
def test_a_failing_cell_fails_the_run_and_stops_it(kernel_specs, tmp_path):
    with pytest.raises(AssertionError) as failure:
        run_notebook(BROKEN, kernel_specs=kernel_specs, output_dir=tmp_path, cell_timeout_s=120)
    message = str(failure.value)
    assert "broken.ipynb: cell 2 failed" in message
    assert "ZeroDivisionError" in message and "300 / 0" in message
    assert not (tmp_path / "ran-past-the-failure").exists(), "a cell after the failing one ran"


@pytest.mark.timeout(300)
def test_a_cell_over_the_timeout_fails_the_run(kernel_specs, tmp_path):
    stuck = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("started = True"),
        nbformat.v4.new_code_cell("import threading\nthreading.Event().wait()  # never set"),
    ], metadata={"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "stuck.ipynb"
    nbformat.write(stuck, path)
    with pytest.raises(AssertionError, match=r"stuck.ipynb: a cell ran longer than 5s"):
        run_notebook(path, kernel_specs=kernel_specs, output_dir=tmp_path, cell_timeout_s=5)


def code_cells(path: Path) -> list[str]:
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_every_module_the_notebooks_import_comes_with_the_notebooks_extra():
    imported = {module for path in NOTEBOOKS for source in code_cells(path) for module in imported_modules(source)}
    assert {"pandas", "matplotlib", "sklearn", "rayms"} <= imported
    assert undeclared(imported, [EXTRA]) == set(), f"declare them in the {EXTRA!r} extra of pyproject.toml"
    # what the extra adds is what the notebooks would miss after a plain install of rayms
    assert undeclared(imported, []) == {"pandas", "matplotlib"}
    assert undeclared({"moto", "tritonclient"}, [EXTRA]) == {"moto", "tritonclient"}  # test-only packages


def test_the_fence_refuses_what_the_extra_does_not_install(kernel_specs, tmp_path):
    probe = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import pandas, matplotlib, sklearn, rayms  # all installed by rayms[notebooks]"),
        nbformat.v4.new_code_cell("import moto  # installed here, for the tests only"),
    ], metadata={"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "fence.ipynb"
    nbformat.write(probe, path)
    with pytest.raises(AssertionError, match=r"cell 1 failed(.|\n)*No module named 'moto'(.|\n)*rayms\[notebooks\]"):
        run_notebook(path, kernel_specs=kernel_specs, output_dir=tmp_path, cell_timeout_s=120)


def test_readme_gives_the_command_that_runs_the_notebooks():
    readme = (REPO / "README.md").read_text()
    assert f"pip install 'rayms[{EXTRA}]'" in readme
    [command] = [line.split() for line in readme.splitlines() if line.startswith("jupyter execute ")]
    assert sorted(command[2:]) == sorted(f"notebooks/{path.name}" for path in NOTEBOOKS)
    [script] = importlib.metadata.entry_points(group="console_scripts", name="jupyter-execute")
    assert canonicalize_name(script.dist.name) in declared([EXTRA])


def test_stored_notebooks_have_no_outputs():
    stored = [*NOTEBOOKS, *sorted(BROKEN.parent.glob("*.ipynb"))]
    assert BROKEN in stored
    dirty = [
        f"{path.relative_to(REPO)} cell {index}"
        for path in stored
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"strip outputs (python tests/notebooks/strip_outputs.py): {', '.join(dirty)}"
