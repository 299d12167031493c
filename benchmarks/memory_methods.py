"""Benchmark: peak memory, speed and quality of each way to quantize, at an equal token budget.

Every method runs in its own process, as a user runs it, and the row's peak is that
whole process's (``mx.get_peak_memory()`` at its end: loading, baselines, training,
evaluation and saving):

* full QAT without the per-step savings (``--loss-chunk 0 --optimizer-state-dtype
  float32 --no-grad-checkpoint``; the student still shares the teacher's arrays);
* full QAT at the defaults, and with the top-k teacher cache (``--teacher-top-k 64``);
* block-wise QAT (``--method blockwise``): half the budget's tokens train every block,
  the other half the scales end to end;
* DWQ: mlx-lm's ``dwq_quantize`` (scales, biases and norms distilled from the live
  float32 teacher, its default learning rate by bit width), on the same training and
  validation windows as the job.

Budget: ``--steps`` x ``--batch-size`` x ``--seq-len`` training tokens for every method.
Perplexity and KL are the job's own (its validation windows; DWQ is evaluated on the same
windows with :func:`mlxqat.evaluate.evaluate`).

    tools/with-blas python benchmarks/memory_methods.py                        # SmolLM2-135M, int4
    tools/with-blas python benchmarks/memory_methods.py --recipe int2 --out benchmarks/results/memory_methods_int2
    tools/with-blas python benchmarks/memory_methods.py --random-llama 0.5 --steps 2 --eval-windows 2  # memory only

``--random-llama 0.5``: a randomly initialized llama of about 0.5B parameters saved as a
bfloat16 checkpoint (its quality means nothing; its memory does). Writes ``<out>.json``
and ``<out>.md`` (default ``benchmarks/results/memory_methods``).
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

SMOLLM2 = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = {
    "full QAT, no step savings": ["--loss-chunk", "0", "--optimizer-state-dtype", "float32", "--no-grad-checkpoint"],
    "full QAT": [],
    "full QAT, top-k teacher": ["--teacher-top-k", "64"],
    "block-wise": ["--method", "blockwise"],
    "DWQ (mlx-lm)": None,
}


def _job(argv: list) -> dict:
    """Run ``python -m mlxqat.train argv`` in this process; the figures of its saved model and the peak."""
    import mlx.core as mx

    from mlxqat.training import job
    from mlxqat.storage.manifest import read_manifest

    out = argv[argv.index("--out") + 1]
    t0 = time.perf_counter()
    if job.main(argv) != 0:
        raise SystemExit(f"python -m mlxqat.train {' '.join(argv)} failed")
    info = read_manifest(out)
    t, m = info["training"], info["metrics"]
    tokens = t["tokens"] + (t.get("block_phase") or {}).get("tokens", 0)
    train_s = t["wall_s"] + (t.get("block_phase") or {}).get("wall_s", 0.0)
    return {"peak_gb": mx.get_peak_memory() / 1e9, "wall_s": time.perf_counter() - t0, "train_s": train_s,
            "train_tokens": t["tokens"], "block_tokens": (t.get("block_phase") or {}).get("tokens", 0),
            "tokens_per_s": tokens / train_s, "ppl": m["QAT"]["ppl"], "kl": m["QAT"]["kl"],
            "ppl_fp": m["full precision"]["ppl"], "ppl_rtn": m["round-to-nearest"]["ppl"], "kl_rtn": m["round-to-nearest"]["kl"]}


def _dwq(model: str, recipe: str, steps: int, batch_size: int, seq_len: int, eval_windows: int,
         select_windows: int) -> dict:
    """mlx-lm DWQ on the job's own windows (``mlxqat.training.job._dataset``), evaluated as the job evaluates."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.quant.dwq import dwq_quantize

    from mlxqat.training import job
    from mlxqat import recipes
    from mlxqat.convert import block_count, head_path
    from mlxqat.data import split_selection
    from mlxqat.evaluate import evaluate
    from mlxqat.storage.load import load
    from mlxqat.kernels import use_dequantized_matmul
    from mlxqat.training.qat import qat_args
    from quality import DWQ_LR

    t0 = time.perf_counter()
    rec = recipes.get(recipe)
    teacher, tokenizer, config = load(model, return_config=True, full_precision=True)
    teacher.set_dtype(mx.float32)
    teacher.freeze()
    args = qat_args(rec, steps=steps, batch_size=batch_size, seq_len=seq_len)
    train_w, val_all = job._dataset(None, tokenizer, teacher, seq_len, args, eval_windows + select_windows, 0, 0)
    val_w, select_w = split_selection(val_all, select_windows)
    student = load(model, full_precision=True)[0]
    student.set_dtype(mx.float32)
    head, n_layers = head_path(student), block_count(student)

    def spec(path, module):
        s = rec.spec_for(path, path == head, n_layers)
        return hasattr(module, "to_quantized") and s is not None and {"group_size": s.group_size, "bits": s.bits}

    nn.quantize(student, class_predicate=spec)
    if mx.default_device() == mx.cpu:
        use_dequantized_matmul(student)
    bits = min(s.bits for s in rec.specs())
    lr = DWQ_LR.get(bits, 1e-5)
    items = lambda w: [(row, 0) for row in w]  # noqa: E731
    valid = select_w if select_w is not None and len(select_w) >= batch_size else val_all
    if len(valid) < batch_size:  # mlx-lm's validation needs a whole batch (memory-only runs have few windows)
        valid = np.resize(valid, (batch_size, valid.shape[1]))
    t1 = time.perf_counter()
    dwq_quantize(student, lambda batch, idx, split: teacher(batch), optim.Adam(learning_rate=lr, bias_correction=True),
                 items(train_w[: steps * batch_size]), items(valid[: max(batch_size, len(valid) // batch_size * batch_size)]),
                 batch_size=batch_size, max_seq_length=seq_len + 1, seed=0, dtype=mx.float32)
    train_s = time.perf_counter() - t1
    student.eval()
    fp, rtn_row = evaluate(teacher, val_w, teacher), None
    ev = evaluate(student, val_w, teacher)
    return {"peak_gb": mx.get_peak_memory() / 1e9, "wall_s": time.perf_counter() - t0, "train_s": train_s,
            "train_tokens": steps * batch_size * seq_len, "block_tokens": 0,
            "tokens_per_s": steps * batch_size * seq_len / train_s, "ppl": ev["ppl"], "kl": ev["kl"],
            "ppl_fp": fp["ppl"], "ppl_rtn": rtn_row, "kl_rtn": None, "learning_rate": lr}


def _random_llama(billions: float, directory: Path) -> Path:
    """A random llama of about ``billions`` x 1e9 parameters saved as a bfloat16 mlx-lm directory,
    with the embedded model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from memory import HALF_B  # benchmarks/memory.py
    from mlxqat.stdlib_data import embedded_model_path

    if billions != 0.5:
        raise SystemExit("--random-llama: only 0.5 (benchmarks/memory.py's HALF_B shape) is defined")
    tok = embedded_model_path()
    cfg = dict(HALF_B, model_type="llama", rms_norm_eps=1e-5, torch_dtype="bfloat16",
               vocab_size=json.loads((tok / "config.json").read_text())["vocab_size"], max_position_embeddings=4096)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(cfg))
    for f in tok.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


def run_method(label: str, model: str, recipe: str, steps: int, batch_size: int, seq_len: int, eval_windows: int,
               select_windows: int, work: Path) -> dict:
    """One method in this process (see the module notes)."""
    flags = METHODS[label]
    if flags is None:
        return _dwq(model, recipe, steps, batch_size, seq_len, eval_windows, select_windows)
    if "blockwise" in flags:  # half the tokens through every block, half end to end
        half = max(1, steps // 2)
        flags = flags + ["--steps-per-block", str(half), "--block-batch-size", str(batch_size),
                         "--block-windows", str(max(batch_size, half * batch_size))]
        steps = steps - half
    argv = ["--model", model, "--recipe", recipe, "--steps", str(steps), "--batch-size", str(batch_size),
            "--seq-len", str(seq_len), "--eval-windows", str(eval_windows), "--select-windows", str(select_windows),
            "--log-every", str(max(1, steps)), "--no-progress", "--memory-limit", "0", "--out", str(work / "out"), *flags]
    return _job(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--random-llama", type=float, default=None, metavar="B",
                   help="Use a random llama of about B billion parameters (bfloat16 checkpoint) instead: memory only.")
    p.add_argument("--recipe", default="int4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--select-windows", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_methods"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shape = dict(recipe=a.recipe, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                 eval_windows=a.eval_windows, select_windows=a.select_windows)
    if a.one:
        spec = json.loads(a.one)
        print("RESULT " + json.dumps(run_method(spec["label"], spec["model"], **shape, work=Path(spec["work"]))), flush=True)
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/memory_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **shape, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="mlxqat-memory-") as tmp:
        model = str(_random_llama(a.random_llama, Path(tmp) / "model")) if a.random_llama else a.model
        from mlxqat.training.memory import read_shape

        params = read_shape(model).params
        result.update(model=model if not a.random_llama else f"random llama ({a.random_llama}B, bfloat16)",
                      params=params)
        for label in a.methods:
            work = Path(tmp) / f"run{len(result['rows'])}"
            work.mkdir()
            cmd = [sys.executable, __file__, "--one", json.dumps({"label": label, "model": model, "work": str(work)})] + [
                f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{label} failed (exit status {proc.returncode})")
            row = json.loads(line[len("RESULT "):])
            row["bytes_per_param"] = row["peak_gb"] * 1e9 / params
            result["rows"][label] = row
            print(f"{label}: peak {row['peak_gb']:.2f} GB ({row['bytes_per_param']:.1f} B/param), "
                  f"{row['tokens_per_s']:.0f} tok/s, ppl {row['ppl']:.3f}, KL {row['kl']:.4f}", flush=True)
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    rows = r["rows"]
    any_row = next(iter(rows.values()), {})
    lines = [f"{r['model']} ({r['params'] / 1e6:.1f}M parameters), {r['recipe']}: {r['steps']} steps x {r['batch_size']} x "
             f"{r['seq_len']} tokens for every method (block-wise: half of them through every block, half end to end). "
             f"Full precision ppl {any_row.get('ppl_fp', float('nan')):.3f}"
             + (f", round-to-nearest {any_row['ppl_rtn']:.3f} (KL {any_row['kl_rtn']:.4f})" if any_row.get("ppl_rtn") else "")
             + f" on {r['eval_windows']} validation windows. Command: `{r['command']}`.", "",
             "| method | peak GB | bytes/param | train tokens/s | train s | ppl | KL to fp |", "|---|---|---|---|---|---|---|"]
    for label, x in rows.items():
        lines.append(f"| {label} | {x['peak_gb']:.2f} | {x['bytes_per_param']:.1f} | {x['tokens_per_s']:.0f} | "
                     f"{x['train_s']:.0f} | {x['ppl']:.3f} | {x['kl']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
