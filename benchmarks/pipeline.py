"""Benchmark: the whole pipeline on real models, as a user runs it.

For each model and recipe: ``python -m mlxqat.train --model X.gguf --recipe R ...`` (the
GGUF read directly), then ``python -m mlxqat.export OUT --format gguf``, then llama.cpp
(``mlxqat.gguf.llamacpp``, the xllamacpp server) on the exported file: does it tokenize as the
model's tokenizer does, does it decode the same greedy tokens as MLX, and how fast does it
generate. Each command runs in its own process, timed; the training figures (tokens/s,
peak memory, perplexity and KL before and after) are the ones the job saved in the model's
``mlxqat.json``.

    tools/with-blas python benchmarks/pipeline.py            # SmolLM2 int4, q4_0, q4_k_m; Gemma 3 270M q4_0, q4_k_m

Writes ``benchmarks/results/pipeline.json`` and ``.md`` (``--out``). The models come from
``tools/fetch-models``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"SmolLM2-135M": ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
          "Gemma 3 270M": ROOT / ".models" / "gemma-3-270m-q4_k_m.gguf"}
# (model, recipe, export format, training flags): budgets this 2-core CPU finishes in minutes. int4 g64
# (MLX's format) has no exact GGUF type: it goes to an mlx-lm directory; q4_0 and q4_k_m go to GGUF and llama.cpp.
RUNS = [("SmolLM2-135M", "int4", "mlx", ["--steps", "8", "--batch-size", "4", "--seq-len", "256"]),
        ("SmolLM2-135M", "q4_0", "gguf", ["--steps", "8", "--batch-size", "4", "--seq-len", "256"]),
        ("Gemma 3 270M", "q4_0", "gguf", ["--steps", "8", "--batch-size", "1", "--seq-len", "128", "--log-every", "2"]),
        ("SmolLM2-135M", "q4_k_m", "gguf", ["--steps", "8", "--batch-size", "4", "--seq-len", "256"]),
        ("Gemma 3 270M", "q4_k_m", "gguf", ["--steps", "8", "--batch-size", "1", "--seq-len", "128", "--log-every", "2"])]
COMMON = ["--eval-windows", "8", "--select-windows", "4", "--log-every", "4", "--no-progress"]
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Water boils at", "import os\n", "class Point:",
           "Once upon a time")


def _timed(cmd: list) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit status {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(proc.stdout[-1500:], flush=True)
    return time.perf_counter() - t0


def check_llamacpp(model_dir: Path, gguf_path: Path, n_texts: int = 100) -> dict:
    """llama.cpp on ``gguf_path`` against the MLX model in ``model_dir``: tokenization of the
    test documents, greedy tokens from a few prompts, and generation speed."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    import mlxqat
    from mlxqat.gguf.llamacpp import PROBE_TEXTS as TEXTS, probe_documents as documents
    from mlxqat.kernels import use_dequantized_matmul
    from mlxqat.gguf.llamacpp import LlamaCpp

    model, tok = mlxqat.load(model_dir)
    use_dequantized_matmul(model)
    cpp = LlamaCpp(gguf_path, n_ctx=512)
    texts = (list(TEXTS) + documents(n_texts, seed=7))[:n_texts]
    same_tokens = sum(cpp.tokenize(t) == tok.encode(t) for t in texts)
    equal, total, divergences = 0, 0, []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = cpp.complete(prompt, n=16, n_probs=2)
        for cid in out["ids"]:
            lp = np.array(nn.log_softmax(model(mx.array([ids]))[0, -1].astype(mx.float32)))
            total += 1
            if int(lp.argmax()) != cid:
                divergences.append(round(float(lp.max() - lp[cid]), 4))  # MLX's margin of its own choice
                break
            equal += 1
            ids.append(cid)
    t0 = time.perf_counter()
    n = len(cpp.complete(PROMPTS[0], n=64, n_probs=1)["ids"])
    return {"texts": len(texts), "same_tokenization": same_tokens, "greedy_equal": equal, "greedy_total": total,
            "divergence_margins": divergences, "llamacpp_tokens_per_s": n / (time.perf_counter() - t0)}


def run_one(name: str, recipe: str, fmt: str, flags: list, work: Path) -> dict:
    from mlxqat.storage.manifest import read_manifest

    out = work / f"{name.split()[0]}-{recipe}"
    exported = work / (f"{out.name}.gguf" if fmt == "gguf" else f"{out.name}-export")
    train_cmd = [sys.executable, "-m", "mlxqat.train", "--model", str(MODELS[name]), "--recipe", recipe,
                 "--out", str(out)] + COMMON + flags
    train_s = _timed(train_cmd)
    export_cmd = [sys.executable, "-m", "mlxqat.export", str(out), "--format", fmt, "--out", str(exported)]
    export_s = _timed(export_cmd)
    info = read_manifest(out)  # the job's entries: "training", "metrics"
    t, m = info["training"], info["metrics"]
    row = {"model": name, "recipe": recipe, "flags": flags + COMMON,
           "train_command": "python -m mlxqat.train " + " ".join(train_cmd[3:]).replace(str(ROOT) + "/", ""),
           "export": fmt, "train_minutes": train_s / 60, "export_s": export_s,
           "export_mb": sum(f.stat().st_size for f in ([exported] if exported.is_file() else exported.iterdir())) / 1e6,
           "steps": t["steps"], "tokens": t["tokens"], "qat_tokens_per_s": t["tokens"] / t["wall_s"],
           "qat_wall_s": t["wall_s"], "peak_memory_gb": t["peak_memory_gb"],
           "ppl": {k: v["ppl"] for k, v in m.items() if isinstance(v, dict)},
           "kl": {k: v.get("kl") for k, v in m.items() if isinstance(v, dict)},
           "gap_recovered": m.get("gap_recovered"), "kl_reduction_vs_rtn": m.get("kl_reduction_vs_rtn"),
           "selection_kl": t.get("selection_kl"), "best_step": t.get("best_step")}
    if fmt == "gguf":
        row.update(check_llamacpp(out, exported))
    return row


def markdown(rows: list) -> str:
    lines = ["| model | recipe | QAT budget | QAT tokens/s | peak GB | train min | ppl fp / RTN / QAT | KL RTN -> QAT | "
             "export (MB, s) | llama.cpp: same tokens | same greedy | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, k = r["ppl"], r["kl"]
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['steps']} steps, {r['tokens']:,} tokens | {r['qat_tokens_per_s']:.0f} | "
            f"{r['peak_memory_gb']:.2f} | {r['train_minutes']:.1f} | {p['full precision']:.2f} / "
            f"{p['round-to-nearest']:.2f} / {p['QAT']:.2f} | {k['round-to-nearest']:.3f} -> {k['QAT']:.3f} | "
            f"{r['export']}: {r['export_mb']:.0f}, {r['export_s']:.0f} | " + (
                f"{r['same_tokenization']}/{r['texts']} | {r['greedy_equal']}/{r['greedy_total']} | "
                f"{r['llamacpp_tokens_per_s']:.0f} |" if "texts" in r else "- | - | - |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=int, default=None, help="Indices into the run list (default: all).")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline"))
    a = p.parse_args(argv)
    for name in {RUNS[i][0] for i in (a.runs or range(len(RUNS)))}:
        if not MODELS[name].exists():
            raise SystemExit(f"{MODELS[name]} is missing: run `bash tools/fetch-models` first")
    out = Path(a.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if a.runs and out.with_suffix(".json").exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for i in a.runs or range(len(RUNS)):
            rows.append(run_one(*RUNS[i], Path(tmp)))
            out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(rows))
            print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
