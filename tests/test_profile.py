"""``python -m mlxqat.profile``: the grid, medians, memory, notes, JSON + PNG, bad input."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlxqat
import tiny
from mlxqat import profile as prof

ROOT = Path(__file__).resolve().parent.parent
GRID = dict(prompt_lengths=(8, 24), gen_lengths=(3, 6), repeats=3, progress=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("profile")
    model, config = tiny.make_model("llama")
    config = dict(config, vocab_size=tiny.VOCAB, max_position_embeddings=25)  # prompts of 24 fit
    fp = tiny.save_fp_model(model, config, tokenizer, root / "fp")
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, root / "q4", config=config)
    model, _ = tiny.make_model("llama")
    mlxqat.prepare(model, "int8")
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, root / "q8", config=config)
    return {"fp": fp, "q4": root / "q4", "q8": root / "q8"}


@pytest.fixture(scope="module")
def fp_result(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile-out")
    return prof.profile_model(str(dirs["fp"]), out=str(out), **GRID), out


def test_full_precision_model_gives_three_variants_over_the_grid(fp_result):
    result, _ = fp_result
    names = ["fp16 (as float32)", "int4 (mlx kernel)", "int4 (mlxqat kernel)"]
    cells = [(p, g) for p in GRID["prompt_lengths"] for g in GRID["gen_lengths"]]
    assert [(r["variant"], r["prompt_len"], r["gen_len"]) for r in result["results"]] == [
        (v, p, g) for p, g in cells for v in names
    ]
    assert any("measured in float32 on the CPU" in n for n in result["notes"])
    assert result["meta"]["quantization"] == "round-to-nearest int4"
    for r in result["results"]:
        assert len(r["runs"]) == GRID["repeats"]
        for key in ("prefill_tps", "decode_tps", "ttft_ms", "peak_memory_bytes"):
            assert r[key] == statistics.median(run[key] for run in r["runs"])
        for run in r["runs"]:  # each run's figures are one timing seen three ways
            assert run["prefill_tps"] == pytest.approx(r["prompt_len"] / run["prefill_s"])
            assert run["decode_tps"] == pytest.approx((r["gen_len"] - 1) / run["decode_s"])
            assert run["ms_per_token"] == pytest.approx(1e3 * run["decode_s"] / (r["gen_len"] - 1))
            assert run["peak_memory_bytes"] > 0
        assert r["beyond_context"] == (r["prompt_len"] + r["gen_len"] > 25)
    assert any("past the model's context of 25" in n for n in result["notes"])


def test_memory_of_each_variant(fp_result):
    mem = fp_result[0]["memory"]
    assert mem["fp16 (as float32)"]["bits_per_weight"] == 32.0  # measured as it ran: float32
    assert mem["fp16 (as float32)"]["ratio_to_bf16"] == pytest.approx(2.0)
    q = mem["int4 (mlx kernel)"]
    assert q == mem["int4 (mlxqat kernel)"]  # same weights, other kernel
    assert 4.4 < q["bits_per_weight"] < 5.0 and q["ratio_to_bf16"] < 0.35


def test_json_png_and_tables(fp_result):
    result, out = fp_result
    saved = json.loads((out / "profile.json").read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = prof.format_table(result)
    assert table.count("\n") == 1 + len(result["results"])
    assert "| fp16 (as float32) | 8 | 3 |" in table and "| int4 (mlx kernel) | 24* | 3 |" in table
    assert "1.00x" in table
    mt = prof.memory_table(result)
    assert "| int4 (mlxqat kernel) |" in mt and "2.000x" in mt


def test_quantized_model_needs_its_baseline_for_fp_rows(dirs):
    small = dict(GRID, prompt_lengths=(8,), gen_lengths=(3,), repeats=1)
    r = prof.profile_model(str(dirs["q4"]), **small)
    assert [x["variant"] for x in r["results"]] == ["int4 (mlx kernel)", "int4 (mlxqat kernel)"]
    assert any("--baseline-model" in n for n in r["notes"])
    r = prof.profile_model(str(dirs["q4"]), baseline="fp32", baseline_model=str(dirs["fp"]), **small)
    assert [x["variant"] for x in r["results"]] == ["fp32", "int4 (mlx kernel)", "int4 (mlxqat kernel)"]
    r = prof.profile_model(str(dirs["q8"]), **small)  # 8-bit: our int4 kernel does not apply
    assert [x["variant"] for x in r["results"]] == ["int8 (mlx kernel)"]
    assert any("no 'mlxqat kernel' rows" in n for n in r["notes"])


def test_time_generation_counts_tokens(dirs):
    model, _ = mlxqat.load(dirs["fp"])
    t = prof.time_generation(model, mx.array([1, 2, 3, 4]), 5)
    assert t["prefill_tps"] == pytest.approx(4 / t["prefill_s"])
    assert t["decode_tps"] == pytest.approx(4 / t["decode_s"])


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--prompt-lengths", "a,b"], "give comma-separated integers"),
    (["--gen-lengths", "1"], "at least 2"),
    (["--repeats", "0"], "--repeats 0"),
    (["--kernels", "cuda"], "choose from mlx, mlxqat"),
])
def test_bad_input_exits_2(dirs, args, message, tmp_path):
    if "--model" not in args:
        args = ["--model", str(dirs["fp"])] + args
    r = subprocess.run([sys.executable, "-m", "mlxqat.profile", *args, "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_writes_json_and_png(dirs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlxqat.profile", "--model", str(dirs["fp"]), "--prompt-lengths", "8",
                        "--gen-lengths", "3", "--repeats", "1", "--out", str(tmp_path), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| int4 (mlxqat kernel) | 8 | 3 |" in r.stdout and "bits per weight" in r.stdout
    assert len(json.loads((tmp_path / "profile.json").read_text())["results"]) == 3
    assert (tmp_path / "profile.png").stat().st_size > 10_000


def test_out_that_is_a_file_or_a_users_folder_is_refused_before_profiling(tmp_path, capsys):
    main = prof.main
    (tmp_path / "results.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("mine too")
    for out, what in [(tmp_path / "results.txt", "a file mlxqat did not write"),
                      (tmp_path / "folder", "folder holding files mlxqat did not write (notes.md)")]:
        assert main(["--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and what in err, err
    assert (tmp_path / "results.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["notes.md"]
