"""Benchmark: peak memory of full QAT steps, before and after each memory saving.

Loads the model (float32), makes the student as ``python -m mlxqat.train`` does
(:func:`mlxqat.training.qat.shared_student`: the teacher's very arrays, no copy; the first
rows load it a second time, as the job did before), prepares it as
:func:`mlxqat.training.qat.quantize_qat` does (:func:`mlxqat.training.qat.prepare_qat`, int4 by
default), resets MLX's peak-memory counter and runs a few training steps
(:func:`mlxqat.training.loop.train`) at ``batch_size x seq_len`` tokens. Each
configuration runs in its own process, so one's allocations never count in
another's peak. Default model: SmolLM2-135M (``tools/fetch-models`` puts it in ``.models/``).

    nice -n 19 tools/with-blas python benchmarks/memory_step.py
    python benchmarks/memory_step.py --model .models/gemma-3-270m-q4_k_m.gguf --batch-size 2 --configs plain chunked

Prints a markdown table (peak GB, bytes per parameter of the model, seconds per
step) and writes JSON to ``benchmarks/results/memory_step.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Each configuration adds one saving to the one before it (TrainingArgs fields, and "shared": the student
# holds the teacher's arrays); "default" is what python -m mlxqat.train runs: TrainingArgs() and a shared student.
CONFIGS = {
    "default": dict(shared=True),
    "plain": dict(loss_chunk=0, optimizer_state_dtype="float32", grad_checkpoint=False),
    "chunked": dict(loss_chunk=None, optimizer_state_dtype="float32", grad_checkpoint=False),
    "bf16-moments": dict(loss_chunk=None, optimizer_state_dtype="bfloat16", grad_checkpoint=False),
    "checkpointing": dict(loss_chunk=None, optimizer_state_dtype="bfloat16", grad_checkpoint=True),
    "shared-weights": dict(loss_chunk=None, optimizer_state_dtype="bfloat16", grad_checkpoint=True, shared=True),
    "teacher-released": dict(loss_chunk=None, optimizer_state_dtype="bfloat16", grad_checkpoint=True, shared=True,
                             teacher_top_k=64),
}


def measure(model: str, recipe: str, batch_size: int, seq_len: int, steps: int, config: dict) -> dict:
    """Peak memory of ``steps`` training steps under ``config`` (in this process)."""
    import tempfile

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxqat.data import stdlib_windows
    from mlxqat.storage.load import load
    from mlxqat.training.qat import prepare_qat, release_teacher, shared_student
    from mlxqat.training.loop import train

    config = dict(config)
    shared = config.pop("shared", False)
    teacher, tokenizer, model_config = load(model, full_precision=True, return_config=True)
    teacher.set_dtype(mx.float32)
    if shared:
        student = shared_student(teacher, model_config)
    else:
        student, _ = load(model, full_precision=True)
        student.set_dtype(mx.float32)
    n_params = sum(v.size for _, v in tree_flatten(student.parameters()))
    windows = stdlib_windows(tokenizer, "train", seq_len, steps * batch_size, oversample=4)
    _, args = prepare_qat(student, windows, recipe, steps=steps, batch_size=batch_size, seq_len=seq_len,
                          warmup_steps=0, log_every=steps, **config)
    mx.eval(student.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run" if args.teacher_top_k else None
        if work is not None:  # the teacher's top-k cached first; the teacher's body is freed here
            teacher = release_teacher(teacher, windows, None, args, work, progress=False)
        mx.clear_cache()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        summary = train(student, teacher, windows, args=args, progress=False, out_dir=work)
        seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    return {"params": n_params, "resident_gb": resident / 1e9, "peak_gb": peak / 1e9,
            "bytes_per_param": peak / n_params, "s_per_step": seconds / steps, "final_loss": summary["final_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF file or mlx-lm directory.")
    p.add_argument("--recipe", default="int4")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_step.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one configuration, print JSON
    a = p.parse_args(argv)
    shape = dict(model=a.model, recipe=a.recipe, batch_size=a.batch_size, seq_len=a.seq_len, steps=a.steps)
    if a.one:
        print("RESULT " + json.dumps(measure(**shape, config=CONFIGS[a.one])), flush=True)
        return 0
    rows = {}
    for name in a.configs:
        cmd = [sys.executable, __file__, "--one", name] + [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            raise SystemExit(f"configuration {name!r} failed (exit status {proc.returncode})")
        rows[name] = json.loads(line[len("RESULT "):])
        rows[name]["settings"] = CONFIGS[name]
        print(f"{name}: {rows[name]['peak_gb']:.2f} GB", flush=True)
    print(f"\n{Path(a.model).name}, {a.recipe}, batch {a.batch_size} x {a.seq_len} tokens, {a.steps} steps\n")
    print("| configuration | peak GB | bytes/param | resident before GB | s/step | final loss |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_gb']:.2f} | {r['bytes_per_param']:.1f} | {r['resident_gb']:.2f} | "
              f"{r['s_per_step']:.1f} | {r['final_loss']:.5f} |")
    Path(a.out).write_text(json.dumps({**shape, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
