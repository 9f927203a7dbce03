"""experiments/quickstart.ipynb executes top to bottom in a fresh kernel (nbclient).

The notebook's ``parameters`` cell is replaced so everything it writes lands in a temporary
folder. Its tiny real run starts a local Ray cluster inside the kernel process, never in this
pytest process, so it does not meet the session fixture ``ray_cluster``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is part of the dev extra")
nbclient = pytest.importorskip("nbclient", reason="nbclient is part of the dev extra")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments/quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    parameters[0].source = f'OUTPUT_DIR = "{out}"\nTINY_TOKEN_BUDGET = 6_000'
    client = nbclient.NotebookClient(
        notebook,
        timeout=480,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    return notebook, out


def test_notebook_runs_without_errors_and_shows_figures(executed):
    notebook, _ = executed
    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 4  # simulated timeline + emissions, real timeline + loss


def test_notebook_wrote_simulated_and_real_run_directories(executed):
    _, out = executed
    simulated = json.loads((out / "simulated/paper/threshold/summary.json").read_text())
    assert simulated["executor"] == "simulator" and simulated["emissions_kg"] > 0
    real = json.loads((out / "real/quickstart/curtailment-aware/summary.json").read_text())
    assert real["executor"] == "ray" and real["tokens"] >= 6_000 and real["completed"]
    assert (out / "real/quickstart/curtailment-aware/model/config.json").is_file()
    assert sorted(p.name for p in (out / "real-report").glob("*.png"))


def test_notebook_is_stored_without_outputs():
    """Outputs are produced by running it, not committed (they would go stale)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
