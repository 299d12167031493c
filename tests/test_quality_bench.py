"""benchmarks/quality.py run as a user runs it (a subprocess) on a tiny model: every setting and method,
table + JSON + PNG. The package pieces it calls are tested on their own (test_teacher.py,
test_evaluate.py, test_dequantized_matmul.py, test_qat.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
SETTINGS = ("int4", "q4_0", "int3", "int2", "mixed", "mobile")
METHODS = ("RTN", "GPTQ", "AWQ", "DWQ", "QAT", "QAT scales", "QAT LoRA")
TINY = ("steps=3", "batch_size=2", "seq_len=32", "eval_windows=4", "ood_windows=2", "select_windows=2",
        "select_every=2", "sensitivity_windows=2", "awq_windows=2", "gptq_windows=4")


def bench(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=1500)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bench")
    model, config = tiny.train_briefly("llama", tokenizer, steps=60)
    model_dir = tiny.save_fp_model(model, config, tokenizer, root / "model")
    rng = np.random.default_rng(0)
    lines = tiny.CORPUS.splitlines()
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": "\n".join(rng.choice(lines, 6))}) + "\n")
    return model_dir, root / "corpus.jsonl", root


@pytest.fixture(scope="module")
def result(model_and_data):
    model_dir, data, root = model_and_data
    out = root / "out" / "quality"
    p = bench("--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
              "--methods", *METHODS, "--budget", *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(str(out) + ".json").read_text()), out, p.stdout


def test_outputs_written(result):
    res, out, stdout = result
    for suffix in (".md", ".json", ".png"):
        assert Path(str(out) + suffix).stat().st_size > 0
    md = Path(str(out) + ".md").read_text()
    assert "| setting | method | off-domain KL | off-domain ppl | off-domain gap rec. | in-domain KL |" in md
    kinds = res["data"]["held_out_kinds"]
    assert kinds == ["prose", "code", "docs"]  # the tiny tokenizer has no chat template: no chat kind
    quantized = sum(r["setting"] != "fp" for r in res["rows"])
    assert md.count("\n| ") == len(res["rows"]) + 1 + quantized + 1  # the main table, then KL by kind
    assert "wrote " in stdout and res["budget"]["steps"] == 3 and res["seq_len"] == 32
    assert res["fast_cpu_matmul"] is True  # CPU: every quantized model ran dequantize + matmul
    assert res["complete"] is True and "partial" not in md  # written after every row, complete at the end


def test_rows_cover_every_applicable_method(result):
    res, _, _ = result
    got = {(r["setting"], r["method"]) for r in res["rows"]}
    skipped = {(s["setting"], s["method"]) for s in res["not_applicable"]}
    assert ("fp", "full precision") in got
    for s in SETTINGS:
        for m in METHODS:
            assert ((s, m) in got) != ((s, m) in skipped), (s, m)
    assert ("int4", "DWQ") in got and ("int3", "GPTQ") in got and ("int2", "AWQ") in got
    assert ("mixed", "QAT LoRA") in got and ("mobile", "QAT") in got and ("mobile", "RTN") in got


def test_values_finite_and_consistent(result):
    res, _, _ = result
    cols = ("ppl", "kl", "top1", "ood_ppl", "ood_kl", "bpw", "bytes", "ratio_bf16", "wall_s")
    fp = next(r for r in res["rows"] if r["setting"] == "fp")
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1"] == 1.0 and fp["ratio_bf16"] == pytest.approx(1, abs=0.01)
    for r in res["rows"]:
        for c in cols:
            assert math.isfinite(r[c]), (r["setting"], r["method"], c)
        assert 0 <= r["top1"] <= 1 and r["kl"] >= -1e-6
        held = r["held_out"]  # off-domain: each kind weighs the same
        assert r["ood_kl"] == pytest.approx(np.mean([held[k]["kl"] for k in held]), rel=1e-12)
        assert r["ood_ppl"] == pytest.approx(math.exp(np.mean([held[k]["nll"] for k in held])), rel=1e-12)
        assert all(held[k]["tokens"] == 2 * 32 for k in held)
        if r["setting"] != "fp":
            assert r["ratio_bf16"] < 0.7  # quantized models are smaller than bf16
    expected_bpw = {"int4": 4.5, "int3": 3.5, "int2": 2.5}
    # q4_0: 5 bits per weight (4 + a float16 scale and bias per 32), its output head 9 (8-bit)
    assert all(5.0 < r["bpw"] < 9.0 for r in res["rows"] if r["setting"] == "q4_0")
    for r in res["rows"]:
        if r["setting"] in expected_bpw:
            assert r["bpw"] == pytest.approx(expected_bpw[r["setting"]])
    assert all(r["bpw"] <= 3.0 + 1e-6 for r in res["rows"] if r["setting"] == "mixed")
    assert all(r["bpw"] <= 2.6 + 1e-6 for r in res["rows"] if r["setting"] == "mobile")


def test_qat_rows_use_the_recipe_defaults(result):
    """The QAT rows train with mlxqat.recipes.QAT_DEFAULTS, as python -m mlxqat.train does."""
    from mlxqat.recipes import QAT_DEFAULTS

    res, _, _ = result
    for r in res["rows"]:
        if r["method"] in ("QAT", "QAT scales") and r["setting"] in ("int4", "int3", "int2"):
            d = QAT_DEFAULTS[int(r["setting"][3])]
            args = r["info"]["args"]
            assert args["learning_rate"] == d.learning_rate and args["warmup_steps"] == d.warmup_steps
            want = d.scale_learning_rate if r["method"] == "QAT" else d.scales_only_learning_rate
            assert args["scale_learning_rate"] == want, (r["setting"], r["method"])


def test_gap_formula(result):
    res, _, _ = result
    fp = next(r for r in res["rows"] if r["setting"] == "fp")
    for r in res["rows"]:
        if r["setting"] == "fp":
            continue
        rtn = next(x for x in res["rows"] if x["setting"] == r["setting"] and x["method"] == "RTN")
        if rtn["ppl"] > fp["ppl"]:
            assert r["gap_recovered"] == pytest.approx((rtn["ppl"] - r["ppl"]) / (rtn["ppl"] - fp["ppl"]))
        if r["method"] == "RTN" and r["gap_recovered"] is not None:
            assert r["gap_recovered"] == 0


def test_mixed_report(result):
    res, _, _ = result
    for name in ("mixed", "mobile"):
        rep = res["mixed"][name]
        assert -1 <= rep["proxy_rank_correlation"] <= 1
        assert all(len(v) == len(rep["options"]) for v in rep["sensitivity_kl"].values())


@pytest.fixture(scope="module")
def tuned(model_and_data):
    """Learning-rate trials for every training method, and the llama.cpp row."""
    pytest.importorskip("xllamacpp")
    model_dir, data, root = model_and_data
    out = root / "out" / "tuned"
    p = bench("--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress", "--settings", "int4",
              "q4_0", "--methods", "RTN", "DWQ", "QAT", "--lr-trials", "1", "3", "--llamacpp", "--budget", *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(str(out) + ".json").read_text()), Path(str(out) + ".md").read_text()


def test_every_training_method_gets_the_same_learning_rate_trials_chosen_on_validation(tuned):
    res, md = tuned
    assert res["budget"]["lr_trials"] == [1.0, 3.0]
    trained = [r for r in res["rows"] if r["method"] in ("DWQ", "QAT")]
    assert {(r["setting"], r["method"]) for r in trained} == {("int4", "DWQ"), ("int4", "QAT"), ("q4_0", "QAT")}
    for r in trained:
        trials = r["info"]["trials"]
        assert [t["lr_scale"] for t in trials] == [1.0, 3.0]
        best = min(trials, key=lambda t: t["selection_kl"])
        assert r["info"]["lr_scale"] == best["lr_scale"]
        rates = [t["learning_rate"] if r["method"] == "DWQ" else t["args"]["learning_rate"] for t in trials]
        assert rates[1] == pytest.approx(3 * rates[0])
    assert "Equal tuning" in md


def test_llamacpp_row_scores_rtn_and_qat_q4_0_files(tuned):
    res, md = tuned
    lc = res["llamacpp"]
    fp, rtn, qat = (lc["rows"][k] for k in lc["rows"])
    assert fp["top1_vs_fp"] == 1.0 and lc["tokens"] == 4 * 32
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in (fp, rtn, qat))
    assert rtn["mb"] < fp["mb"] / 3 and qat["mb"] == pytest.approx(rtn["mb"], rel=0.02)  # same layout
    # llama.cpp's perplexity of the QAT file is the MLX row's (same weights; int8 activations aside)
    q4 = next(r for r in res["rows"] if (r["setting"], r["method"]) == ("q4_0", "QAT"))
    assert qat["ppl"] == pytest.approx(q4["ppl"], rel=0.05)
    assert "| GGUF file | llama.cpp ppl |" in md


def test_an_interrupted_run_resumes_with_the_rows_it_has(result, model_and_data, tmp_path):
    res, out, _ = result
    model_dir, data, _ = model_and_data
    cut = dict(res, rows=[r for r in res["rows"] if (r["setting"], r["method"]) not in {("int2", "QAT"), ("mixed", "DWQ")}],
               complete=False)
    again = tmp_path / "quality"
    Path(str(again) + ".json").write_text(json.dumps(cut))
    p = bench("--model", str(model_dir), "--data", str(data), "--out", str(again), "--no-progress",
              "--methods", *METHODS, "--budget", *TINY, "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resumed = json.loads(Path(str(again) + ".json").read_text())
    key = lambda r: (r["setting"], r["method"])  # noqa: E731
    assert resumed["complete"] and resumed["resumed"] and [key(r) for r in resumed["rows"]] == [key(r) for r in res["rows"]]
    before = {key(r): r for r in res["rows"]}
    for r in resumed["rows"]:  # kept rows as they were; the two measured again as the first run measured them
        assert r["ppl"] == pytest.approx(before[key(r)]["ppl"], rel=1e-4), key(r)
    assert resumed["mixed"]["mixed"]["recipe"] == res["mixed"]["mixed"]["recipe"]  # the allocation reused
    assert "int2 QAT" in " ".join(p.stdout.split()) and " int4 QAT " not in p.stdout
    p = bench("--model", str(model_dir), "--data", str(data), "--out", str(again), "--no-progress",
              "--methods", *METHODS, "--budget", *TINY, "steps=4", "--resume")
    assert p.returncode == 2 and "different budget (steps)" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (("--settings", "int5"), "unknown settings ['int5']"),
    (("--methods", "HQQ"), "unknown methods ['HQQ']"),
    (("--budget", "steps=0"), "--budget 'steps=0': use FIELD=N"),
    (("--budget", "windows=3"), "--budget 'windows=3': use FIELD=N"),
    (("--lr-trials", "1", "0"), "--lr-trials 1.0 0.0: use positive multiples"),
    (("--llamacpp", "--settings", "int4"), "--llamacpp scores the q4_0 QAT model"),
])
def test_bad_arguments_are_one_clear_line(args, message, tmp_path):
    p = bench(*args, "--out", str(tmp_path / "q"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("recipe, bits", [("int4", 4), ("int3", 3), ("int2", 2), ("mixed", 3)])
def test_scales_only_rate_is_the_recipes(recipe, bits):
    """The benchmark's "QAT scales" rows and `python -m mlxqat.train --trainable scales` share one rate."""
    from mlxqat.training.qat import qat_args
    from mlxqat.recipes import QAT_DEFAULTS

    d = QAT_DEFAULTS[bits]
    assert qat_args(recipe, trainable="scales").scale_lr == d.scales_only_learning_rate != d.scale_learning_rate
    assert qat_args(recipe, trainable="all").scale_lr == d.scale_learning_rate
    assert qat_args(recipe, trainable="scales", scale_learning_rate=3e-6).scale_lr == 3e-6  # a given rate wins
