"""The Colab notebooks run top to bottom in smoke size (GPTJAX_NOTEBOOK_SMOKE=1) and compute
what they claim; they are stored without outputs."""

import json
from pathlib import Path

import nbclient
import nbformat

import gptjax

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _run(path: Path, cwd: Path, monkeypatch) -> dict:
    """Executes the notebook in ``cwd``; returns the JSON its last cell prints."""
    monkeypatch.setenv("GPTJAX_NOTEBOOK_SMOKE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # a cell error raises CellExecutionError with the cell and traceback
    last = notebook.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    return json.loads(text.strip().splitlines()[-1])


def test_there_are_three_notebooks_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_finetune_pretrained.ipynb",
        "03_mesh_and_scale.ipynb",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown" and "Runtime" in notebook.cells[0].source
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
                assert "!gptjax" not in cell.source  # the Python API, not the shell


def test_quickstart_notebook(tmp_path, monkeypatch):
    results = _run(NOTEBOOKS[0], tmp_path, monkeypatch)
    assert results["smoke"]
    assert results["last_train_loss"] < results["first_train_loss"] - 0.5, results
    assert results["chat_val_loss_after"] < results["chat_val_loss_before"], results
    assert results["turns"] >= 2
    runs = tmp_path / "runs" / "nb_quickstart"
    assert (runs / "pretrain" / "curves.png").is_file() and (runs / "chat" / "curves.png").is_file()
    assert gptjax.read_curves(runs / "chat")["val_loss"][0][0] == 0  # before fine-tuning


def test_finetune_pretrained_notebook(tmp_path, monkeypatch):
    """A tiny random LLaMA with a ChatML template stands in for SmolLM2 (no download)."""
    results = _run(NOTEBOOKS[1], tmp_path, monkeypatch)
    assert results["smoke"]
    assert results["val_loss_after"] < results["val_loss_before"] - 0.2, results
    assert results["export_max_abs_diff"] <= 1e-4 * max(1.0, results["logit_scale"]), results
    assert (tmp_path / "runs" / "nb_finetune" / "hf" / "model.safetensors").is_file()


def test_mesh_and_scale_notebook(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebook asks for its 8 CPU devices
    results = _run(NOTEBOOKS[2], tmp_path, monkeypatch)
    assert results["smoke"] and results["devices"] == 8
    assert results["max_loss_diff"] <= 1e-4, results
    assert results["loss_fell"]
    assert results["resumed_at"] == 10
    # fsdp=8: each device holds an eighth of GPT-2's 124M float32 parameters
    assert abs(results["gpt2_param_mib_per_device"] - 124.4e6 * 4 / 8 / 2**20) < 1.0, results
