"""The quality benchmark end to end on a tiny model: every setting and method, table + JSON + PNG."""

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402

TINY = quality.Budget(steps=3, batch_size=2, seq_len=32, eval_windows=4, ood_windows=2, select_windows=2,
                      select_every=2, sensitivity_windows=2, awq_windows=2, gptq_windows=4)


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
    return quality.run(model=str(model_dir), data=str(data), out=str(root / "out" / "quality"), progress=False,
                       budget=TINY), root / "out" / "quality"


def test_outputs_written(result):
    res, out = result
    for suffix in (".md", ".json", ".png"):
        assert Path(str(out) + suffix).stat().st_size > 0
    assert json.loads(Path(str(out) + ".json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = Path(str(out) + ".md").read_text()
    assert "| setting | method | ppl |" in md
    assert md.count("\n| ") == len(res["rows"]) + 1  # header + one line per row


def test_rows_cover_every_applicable_method(result):
    res, _ = result
    got = {(r["setting"], r["method"]) for r in res["rows"]}
    skipped = {(s["setting"], s["method"]) for s in res["not_applicable"]}
    assert ("fp", "full precision") in got
    for s in quality.SETTINGS:
        for m in quality.METHODS:
            assert ((s, m) in got) != ((s, m) in skipped), (s, m)
    assert ("int4", "DWQ") in got and ("int3", "GPTQ") in got and ("int2", "AWQ") in got
    assert ("mixed", "QAT LoRA") in got and ("mobile", "QAT") in got


def test_values_finite_and_consistent(result):
    res, _ = result
    cols = ("ppl", "kl", "top1", "ood_ppl", "ood_kl", "bpw", "bytes", "ratio_bf16", "wall_s")
    fp = next(r for r in res["rows"] if r["setting"] == "fp")
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1"] == 1.0 and fp["ratio_bf16"] == pytest.approx(1, abs=0.01)
    for r in res["rows"]:
        for c in cols:
            assert math.isfinite(r[c]), (r["setting"], r["method"], c)
        assert 0 <= r["top1"] <= 1 and r["kl"] >= -1e-6
        if r["setting"] != "fp":
            assert r["ratio_bf16"] < 0.7  # quantized models are smaller than bf16
    expected_bpw = {"int4": 4.5, "int3": 3.5, "int2": 2.5, "q4_0": 5.0}
    for r in res["rows"]:
        if r["setting"] in expected_bpw:
            assert r["bpw"] == pytest.approx(expected_bpw[r["setting"]])
    assert all(r["bpw"] <= 3.0 + 1e-6 for r in res["rows"] if r["setting"] == "mixed")
    assert all(r["bpw"] <= 2.6 + 1e-6 for r in res["rows"] if r["setting"] == "mobile")


def test_gap_formula(result):
    res, _ = result
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
    res, _ = result
    for name in ("mixed", "mobile"):
        rep = res["mixed"][name]
        assert -1 <= rep["proxy_rank_correlation"] <= 1
        assert all(len(v) == len(rep["options"]) for v in rep["sensitivity_kl"].values())


def test_fast_cpu_matmul_matches_quantized_matmul():
    layer = nn.Linear(128, 96)
    for bits in (2, 3, 4, 8):
        q = layer.to_quantized(group_size=64, bits=bits)
        x = mx.random.normal((5, 7, 128))
        ref = q(x)
        with quality.fast_cpu_matmul():
            got = q(x)
        assert mx.allclose(got, ref, atol=1e-4, rtol=1e-4).item(), bits


def test_fast_cpu_matmul_gradients_reach_scales_and_biases():
    q = nn.Linear(64, 32).to_quantized(group_size=32, bits=4)
    x = mx.random.normal((3, 64))

    def loss(params):
        q.update(params)
        return mx.sum(q(x) ** 2)

    params = {"scales": q.scales, "biases": q.biases}
    with quality.fast_cpu_matmul():
        g = mx.grad(loss)(params)
        eps = 1e-3
        bumped = dict(params, biases=params["biases"] + eps * (mx.arange(params["biases"].size).reshape(params["biases"].shape) == 0))
        fd = (loss(bumped) - loss(params)) / eps
    assert abs(g["biases"][0, 0].item() - fd.item()) < 1e-2 * max(1.0, abs(fd.item()))
