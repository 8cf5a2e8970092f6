"""Every tutorial notebook runs top to bottom without a cell error (their cells assert on real numbers).

Notebooks are stored without outputs; here they are executed in memory, with ``tutorials/`` as the
working directory, and never written back. The kernel is this interpreter's own: an ipykernel spec
with ``argv[0] = sys.executable`` is installed into a temporary directory put first on
``JUPYTER_PATH``, so a ``python3`` spec elsewhere on the machine (another Python, another
environment) cannot be picked up by mistake, and a first cell checks it.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "vit-lens-tests"
CELL_TIMEOUT_S = 300

# Run first in the kernel: a wrong interpreter fails loudly instead of testing another install.
INTERPRETER_CHECK = (
    f"import sys\nassert sys.prefix == {sys.prefix!r}, f'the kernel runs {{sys.executable}}, not the test interpreter'"
)


@pytest.fixture(scope="session")
def jupyter_data_dir(tmp_path_factory) -> Path:
    """A Jupyter data directory holding one kernel spec that starts this interpreter."""
    prefix = tmp_path_factory.mktemp("jupyter")
    install_kernelspec(kernel_name=KERNEL_NAME, display_name="vit_lens tests", prefix=str(prefix))
    return prefix / "share" / "jupyter"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_tutorial_runs_without_errors(notebook: Path, jupyter_data_dir: Path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_data_dir))
    nb = nbformat.read(notebook, as_version=4)
    stored_outputs = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.get("outputs")]
    assert not stored_outputs, f"{notebook.name} is stored with outputs (cells {stored_outputs}); clear them"
    nb.cells.insert(0, nbformat.v4.new_code_cell(INTERPRETER_CHECK))
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError, naming the failing cell with its traceback
