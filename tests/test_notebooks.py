"""The three notebooks run top to bottom in quick mode and produce their figures, tables and files."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# name -> (files it writes, least number of PNG figures, markdown tables it shows, text it prints)
EXPECTED = {
    "01_qat_training.ipynb": (
        ["qat_loss.png", "before_after.png", "qat-model/mlxqat.json", "qat-model/config.json"],
        2,
        ["| model | ppl |"],
        ["fake-quant and converted model write the same text: True", "share of the RTN perplexity gap"],
    ),
    "02_export.ipynb": (
        ["export-out/model-q4_0.gguf", "export-out/mlx-q4_0/mlxqat.json", "export-out/sizes.png"],
        1,
        ["| file | bytes | sha256 |", "| form | weights MB | vs float16 |"],
        ["exact=True", "IntegrityError: ", "mlxqat.load: max |logit difference| = 0.0",
         "mlx_lm.load: max |logit difference| = 0.0", "same text: True"],
    ),
    "03_latency_profiling.ipynb": (
        ["profile-out/profile.json", "profile-out/profile.png", "profile-out/latency.png"],
        2,
        ["| variant | prompt | gen | prefill tok/s |", "| variant | weights MB | bits per weight |",
         "| machine | variant |"],
        ["note: --baseline fp16: measured in float32 on the CPU"],
    ),
}


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stored_without_outputs_with_a_quick_parameter(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: strip outputs before committing"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[0] and "QUICK = True" in params[0].source
    assert "MLXQAT_QUICK" in code[1].source


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
    files, n_figures, tables, texts = EXPECTED[name]
    monkeypatch.setenv("MLXQAT_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = list(_outputs(nb))
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(pngs) >= n_figures, f"{name}: {len(pngs)} figure(s), expected at least {n_figures}"
    markdown = "\n".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    for header in tables:
        assert header in markdown, f"{name}: no table starting {header!r}"
    stream = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "QUICK = True" in stream
    for text in texts:
        assert text in stream, f"{name}: {text!r} not printed"
    for f in files:
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f"{name} did not write {f}"
    for f in files:
        if f.endswith(".png"):
            assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"

    if name.startswith("01"):
        rows = [line for line in markdown.splitlines() if line.startswith("| ") and "ppl" not in line]
        assert len(rows) == 3  # full precision, RTN, QAT (in that order)
        ppl = [float(line.split("|")[2]) for line in rows]
        assert all(1 < p < 1e4 for p in ppl)
        assert ppl[2] < ppl[1]  # QAT int2 beats round-to-nearest int2 (the point of the notebook)
    if name.startswith("03"):
        result = json.loads((tmp_path / "profile-out/profile.json").read_text())
        assert len(result["results"]) == 3 * 2  # 3 variants x prompt lengths (32, 128) x 1 generation length
        assert result["meta"]["repeats"] == 2
