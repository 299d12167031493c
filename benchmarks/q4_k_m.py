"""Q4_K_M, the GGUF mix Ollama and LM Studio pull by default: round-to-nearest against QAT, scored by llama.cpp.

Both files hold the same tensor types (llama.cpp's Q4_K_M rule, :func:`mlxqat.gguf.writer.mix_type`):

* RTN: ``python -m mlxqat export FP --format gguf --type q4_k_m``: llama.cpp's reference quantizers
  (no importance matrix) on the full-precision weights, tensor by tensor;
* RTN + importance matrix: ``python -m mlxqat imatrix --model FP`` on the text QAT trains on (the standard
  library's training split, ``--imatrix-windows`` x 512 tokens), then the same export with ``--imatrix``:
  llama.cpp's importance-weighted quantizers, what ``llama-imatrix`` + ``llama-quantize --imatrix`` make;
* QAT: ``python -m mlxqat train --model FP --recipe q4_k_m`` at the product's defaults, then
  ``python -m mlxqat export QAT --format gguf --exact``: the trained blocks repacked bit for bit.

Each file (and the full-precision F32 file) is scored by llama.cpp (:class:`mlxqat.gguf.llamacpp.LlamaCpp`) on
held-out windows of kinds of text the training never saw (:func:`mlxqat.heldout.heldout_windows`): perplexity,
and how often its top-1 token is the F32 file's. MLX's mean KL to the full-precision model on the same windows
comes from :func:`mlxqat.evaluate.evaluate` on the files read back. Every stage is skipped when its output is
already in ``--work`` (a stopped run resumes).

    tools/with-blas .venv/bin/python benchmarks/q4_k_m.py --model .models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --work runs/q4_k_m-smollm2 --out benchmarks/results/q4_k_m-smollm2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


KINDS = ("prose", "code", "docs")
RTN = "RTN Q4_K_M (llama.cpp's reference quantizers)"
RTN_IMATRIX = "RTN Q4_K_M + importance matrix (llama.cpp's weighted quantizers)"
QAT = "QAT Q4_K_M (mlxqat, exact export)"


def _run(args, log: Path) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(args), flush=True)
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-m", "mlxqat", *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def build(model: str, work: Path, steps: int, batch_size: int, seq_len: int, imatrix_windows: int = 64) -> dict:
    """The F32, RTN and QAT files in ``work`` (each made only when absent); the seconds each stage took."""
    work.mkdir(parents=True, exist_ok=True)
    log, seconds = work / "log.txt", {}
    fp = work / "fp"
    stages = [
        (fp, ["export", model, "--format", "fp16", "--dtype", "float32", "--out", str(fp)]),
        (work / "f32.gguf", ["export", str(fp), "--format", "gguf", "--type", "f32", "--out", str(work / "f32.gguf"),
                             "--no-modelfile"]),
        (work / "rtn-q4_k_m.gguf", ["export", str(fp), "--format", "gguf", "--type", "q4_k_m", "--out",
                                    str(work / "rtn-q4_k_m.gguf"), "--no-modelfile"]),
        (work / "imatrix.gguf", ["imatrix", "--model", str(fp), "--out", str(work / "imatrix.gguf"), "--windows",
                                 str(imatrix_windows), "--seq-len", "512", "--no-progress"]),
        (work / "rtn-imatrix-q4_k_m.gguf", ["export", str(fp), "--format", "gguf", "--type", "q4_k_m", "--imatrix",
                                            str(work / "imatrix.gguf"), "--out", str(work / "rtn-imatrix-q4_k_m.gguf"),
                                            "--no-modelfile"]),
        (work / "qat", ["train", "--model", str(fp), "--recipe", "q4_k_m", "--steps", str(steps), "--batch-size",
                        str(batch_size), "--seq-len", str(seq_len), "--out", str(work / "qat"), "--no-save-master",
                        "--no-progress"]),
        (work / "qat-q4_k_m.gguf", ["export", str(work / "qat"), "--format", "gguf", "--exact", "--out",
                                    str(work / "qat-q4_k_m.gguf"), "--no-modelfile"]),
    ]
    for out, args in stages:
        if not out.exists():
            seconds[out.name] = _run(args, log)
    return seconds


def score(work: Path, windows_per_kind: int, seq_len: int) -> dict:
    import mlxqat
    from mlxqat.evaluate import evaluate
    from mlxqat.gguf.llamacpp import LlamaCpp
    from mlxqat.gguf.reader import load_gguf
    from mlxqat.heldout import heldout_windows

    teacher, tok = mlxqat.load(str(work / "fp"))
    windows = heldout_windows(tok, seq_len, windows_per_kind, kinds=KINDS)
    files = {"full precision (F32)": work / "f32.gguf",
             RTN: work / "rtn-q4_k_m.gguf",
             RTN_IMATRIX: work / "rtn-imatrix-q4_k_m.gguf",
             QAT: work / "qat-q4_k_m.gguf"}
    rows, fp_top1 = {}, {}
    for label, path in files.items():
        row = {"mb": path.stat().st_size / 1e6}
        server = LlamaCpp(path, n_ctx=seq_len + 16)
        for kind, w in windows.items():
            got = server.score(w)
            ok = got["scored"]  # llama.cpp withholds tokens that end inside a UTF-8 character: the same in every file
            fp_top1.setdefault(kind, got["top1"])
            row[f"{kind}_ppl"] = math.exp(-float(got["logprobs"][ok].mean()))
            row[f"{kind}_top1"] = float((got["top1"] == fp_top1[kind])[ok].mean())
            row[f"{kind}_tokens"] = int(ok.sum())
        del server
        if "F32" not in label:
            model, _, _ = load_gguf(path)
            for kind, w in windows.items():
                row[f"{kind}_kl"] = float(evaluate(model, w, teacher)["kl"])
            del model
        rows[label] = row
        print(label, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return {"rows": rows, "windows": {k: list(v.shape) for k, v in windows.items()}}


def table(result: dict) -> str:
    lines = ["| file | MB | " + " | ".join(f"{k} ppl (llama.cpp) | {k} top-1 = F32 | {k} KL (MLX)" for k in KINDS) + " |",
             "|---|---|" + "---|---|---|" * len(KINDS)]
    for label, r in result["rows"].items():
        cells = []
        for k in KINDS:
            kl = r.get(f"{k}_kl")
            cells += [f"{r[f'{k}_ppl']:.3f}", f"{100 * r[f'{k}_top1']:.1f}%", "" if kl is None else f"{kl:.4f}"]
        lines.append(f"| {label} | {r['mb']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a GGUF file or model directory (read as full precision)")
    p.add_argument("--work", required=True, help="folder for the files (resumes from what is there)")
    p.add_argument("--out", required=True, help="results stem: OUT.json and OUT.md")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=8, help="held-out windows of each kind")
    p.add_argument("--imatrix-windows", type=int, default=64, help="windows of 512 tokens for the importance matrix")
    a = p.parse_args(argv)
    work = Path(a.work)
    t0 = time.perf_counter()
    seconds = build(a.model, work, a.steps, a.batch_size, a.seq_len, a.imatrix_windows)
    result = score(work, a.windows, a.seq_len)
    result.update(model=a.model, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, stage_seconds=seconds,
                  seconds=time.perf_counter() - t0, command=" ".join(["benchmarks/q4_k_m.py", *(argv or sys.argv[1:])]))
    rows = result["rows"]
    result["kl_removed"] = {k: 1 - rows[QAT][f"{k}_kl"] / rows[RTN][f"{k}_kl"] for k in KINDS}
    result["kl_removed_vs_imatrix"] = {k: 1 - rows[QAT][f"{k}_kl"] / rows[RTN_IMATRIX][f"{k}_kl"] for k in KINDS}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# Q4_K_M: round-to-nearest against QAT ({a.model}, {a.steps} steps x {a.batch_size} x {a.seq_len} "
          f"tokens)\n\n{table(result)}\n\nKL removed by QAT: against RTN "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["kl_removed"].items()) + "; against RTN with the "
          "importance matrix " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["kl_removed_vs_imatrix"].items())
          + f"\n\n`{result['command']}`\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
