"""The notebooks: committed with the outputs of a full run on the real model, made by their committed code;
and run top to bottom in quick mode (the embedded model) producing their figures, tables and files."""

import copy
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_outputs", ROOT / "tools" / "notebook_outputs.py")
notebook_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook_outputs)
REAL_MODEL = "SmolLM2-135M-Instruct"  # the model the committed outputs are of
MAX_BYTES = 1_500_000  # a notebook with its outputs: small enough to read on GitHub

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
    "04_finetune_4bit.ipynb": (
        ["finetune_loss.png", "finetune-data/train.jsonl", "tuned-int4/mlxqat.json"],
        1,
        ["| | test completion loss |", "| reference | before | after (saved 4-bit file) |"],
        ["data: ", "saved tuned-int4"],
    ),
    "05_memory_planning.ipynb": (
        ["memory_plan.png"],
        1,
        ["| model | parameters |", "| model | 16 GB Mac |"],
        ["measured peak", "estimated peak memory"],
    ),
}
# the least number of PNG figures among the committed outputs of the full run
COMMITTED_FIGURES = {"01_qat_training.ipynb": 2, "02_export.ipynb": 1, "03_latency_profiling.ipynb": 2,
                     "04_finetune_4bit.ipynb": 1, "05_memory_planning.ipynb": 1}


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED) == sorted(COMMITTED_FIGURES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_outputs_are_the_real_models_and_come_from_the_committed_code(name):
    path = NOTEBOOKS / name
    assert notebook_outputs.stale(path) is None, notebook_outputs.stale(path)
    assert path.stat().st_size < MAX_BYTES, f"{name}: {path.stat().st_size:,} bytes with its outputs"
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata["mlxqat"]
    assert meta["command"] == "make notebooks-outputs" and meta["machine"] and meta["date"]
    assert "widgets" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[0] and "QUICK = False" in params[0].source
    assert REAL_MODEL in params[0].source and "MLXQAT_QUICK" in code[1].source
    # every cell ran, once, in order, without an error
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = list(_outputs(nb))
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if notebook_outputs.WIDGET in o.get("data", {})]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= COMMITTED_FIGURES[name], f"{name}: {len(pngs)} figure(s) stored"
    stream = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "QUICK = False" in stream and REAL_MODEL in stream  # the full run, on the real model
    assert "\r" not in stream  # progress bars stored at their last state (notebook_outputs.tidy)
    shows = [c for c in code if any(k in c.source for k in ("print(", "display(", "plt.subplots(", "profile.plot("))]
    assert len(shows) >= len(code) // 2 and all(c.outputs for c in shows), "a cell that shows something stored nothing"


def test_a_changed_code_cell_makes_the_stored_outputs_stale(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "01_qat_training.ipynb", as_version=4)
    nb.metadata["mlxqat"] = {"code_sha256": notebook_outputs.code_hash(nb)}
    fresh = tmp_path / "fresh.ipynb"
    nbformat.write(nb, str(fresh))
    assert notebook_outputs.stale(fresh) is None

    text = copy.deepcopy(nb)  # a markdown edit needs no new outputs
    next(c for c in text.cells if c.cell_type == "markdown").source += " More words."
    nbformat.write(text, str(tmp_path / "text.ipynb"))
    assert notebook_outputs.stale(tmp_path / "text.ipynb") is None

    changed = copy.deepcopy(nb)
    cell = [c for c in changed.cells if c.cell_type == "code"][3]
    cell.source = cell.source.replace("=", " = ", 1)
    nbformat.write(changed, str(tmp_path / "changed.ipynb"))
    why = notebook_outputs.stale(tmp_path / "changed.ipynb")
    assert why is not None and "make notebooks-outputs" in why

    del changed.metadata["mlxqat"]
    nbformat.write(changed, str(tmp_path / "none.ipynb"))
    assert "no stored outputs" in notebook_outputs.stale(tmp_path / "none.ipynb")


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
        first = next(o["data"]["text/markdown"] for o in outputs
                     if o.get("data", {}).get("text/markdown", "").startswith("| model | ppl |"))
        rows = [line for line in first.splitlines() if line.startswith("| ") and "ppl" not in line]
        assert len(rows) == 3  # full precision, RTN, QAT (in that order)
        ppl = [float(line.split("|")[2]) for line in rows]
        assert all(1 < p < 1e4 for p in ppl)
        assert ppl[2] < ppl[1]  # QAT int2 beats round-to-nearest int2 (the point of the notebook)
        off = next(o["data"]["text/markdown"] for o in outputs
                   if o.get("data", {}).get("text/markdown", "").startswith("| held-out text |"))
        kls = [(float(r.split("|")[2]), float(r.split("|")[3])) for r in off.splitlines()[2:]]
        assert len(kls) == 3 and all(qat < rtn for rtn, qat in kls)  # prose, code, docs: never trained on
    if name.startswith("04"):
        assert "gain kept after saving: **100.0%**" in markdown  # the saved 4-bit file is the trained model
    if name.startswith("03"):
        result = json.loads((tmp_path / "profile-out/profile.json").read_text())
        assert len(result["results"]) == 3 * 2  # 3 variants x prompt lengths (32, 128) x 1 generation length
        assert result["meta"]["repeats"] == 2
