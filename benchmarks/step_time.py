"""Benchmark: what a QAT step costs against a plain fine-tuning step, and evaluating a fake-quant model.

One process, one model, the same batch shape and loss, side by side:

* plain (loop): the product's own loop (:func:`mlxqat.train`) on the student with fake quantization
  off (the steps before ``quant_delay``): the same distillation loss (live teacher), optimizer
  (:class:`~mlxqat.training.optim.QATOptimizer`), trainable set and data path as a QAT step.
* plain (raw): the float model trained by ``nn.value_and_grad`` + ``optim.AdamW`` (float32 moments,
  gradient clipping as the loop's) on the same distillation loss over the whole logits.
* QAT: the same loop with fake quantization on: ``int4`` (g64 affine) in the product's QAT form
  (:func:`mlxqat.training.qat.prepare_qat`: learned scales from a clip search).
* evaluation: :func:`mlxqat.evaluate.evaluate` of the fake-quant student over N windows, perplexity
  only, with each weight re-quantized for every batch (``quantize_once=False``) and quantized once
  per call (:func:`mlxqat.layers.quantized_once`, the default).

Each round is one :func:`mlxqat.train` run of ``2 x (warmup + repeats)`` steps (plain, then QAT, timed
by its per-step log callback), then ``warmup + repeats`` raw steps, then the evaluations alternating;
medians over every round's timed steps. Token windows are random ids (a step's time does not depend
on them). On a shared machine the numbers move with the load: it is recorded before and after.

    tools/with-blas .venv/bin/python benchmarks/step_time.py                       # the embedded model
    tools/with-blas .venv/bin/python benchmarks/step_time.py --model smollm2 --batch-size 4 --seq-len 128

Prints a markdown table; writes ``benchmarks/results/step_time.md`` and ``.json`` (``step_time-<model>``
for another model; ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlxqat.evaluate import evaluate
from mlxqat.storage.load import load
from mlxqat.training.losses import distillation_loss
from mlxqat.training.loop import train
from mlxqat.training.qat import prepare_qat, shared_student

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"embedded": None, "smollm2": ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"}
RESULTS = ROOT / "benchmarks" / "results"


def _median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _medians(pairs: list) -> Dict[str, float]:
    """Medians of ``[(wall, CPU), ...]`` seconds."""
    return {"wall": _median([w for w, _ in pairs]), "cpu": _median([c for _, c in pairs])}


def _clock():
    """(wall, this process's CPU) seconds."""
    return time.perf_counter(), time.process_time()


def loop_steps(student, teacher, windows: np.ndarray, args, warmup: int, repeats: int) -> Dict[str, list]:
    """``(wall, CPU)`` seconds of each timed step of one :func:`train` run: ``warmup + repeats`` plain steps (fake
    quantization off: ``quant_delay``), then as many QAT steps; the first ``warmup`` of each phase are not timed."""
    n = warmup + repeats
    run = dataclasses.replace(args, steps=2 * n, quant_delay=n, log_every=1, checkpoint_every=0)
    stamps = [_clock()]
    train(student, teacher, windows, None, run, progress=False, callback=lambda rec: stamps.append(_clock()))
    seconds = np.diff(np.array(stamps), axis=0).tolist()  # seconds[k]: step k
    return {"plain": seconds[warmup:n], "qat": seconds[n + warmup:]}


def raw_steps(model, teacher, windows: np.ndarray, args, warmup: int, repeats: int) -> List[float]:
    """Seconds of ``repeats`` steps of ``nn.value_and_grad`` + ``optim.AdamW`` on ``model`` (float), after ``warmup``."""
    model.train()
    opt = optim.AdamW(learning_rate=args.learning_rate, weight_decay=args.weight_decay)

    def loss(m, x, y, t):
        return distillation_loss(m(x), t, y, args)

    value_and_grad = nn.value_and_grad(model, loss)
    out = []
    for k in range(warmup + repeats):
        batch = mx.array(windows[(k * args.batch_size) % len(windows):][: args.batch_size])
        x, y = batch[:, :-1], batch[:, 1:]
        t0 = _clock()
        t_logits = mx.stop_gradient(teacher(x))
        value, grads = value_and_grad(model, x, y, t_logits)
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        opt.update(model, grads)
        mx.eval(value, model.parameters(), opt.state)
        if k >= warmup:
            out.append(_since(t0))
    return out


def _since(t0) -> list:
    return [b - a for a, b in zip(t0, _clock())]


def eval_times(student, windows: np.ndarray, repeats: int) -> Dict[str, list]:
    """Seconds of :func:`evaluate` (perplexity) of the fake-quant ``student``, quantizing per batch and once,
    alternating; after one warm-up of each. Checks that both give the same numbers."""
    out = {"per_batch": [], "once": []}
    results = {}
    for k in range(repeats + 1):
        for name, once in (("per_batch", False), ("once", True)):
            t0 = _clock()
            results[name] = evaluate(student, windows, None, quantize_once=once)  # evaluate's own batches
            if k:
                out[name].append(_since(t0))
    if results["per_batch"] != results["once"]:
        raise AssertionError(f"quantized_once changed the evaluation: {results}")
    return out


def run(model: str = "embedded", batch_size: int = 8, seq_len: int = 256, warmup: int = 1, repeats: int = 4,
        rounds: int = 2, eval_windows: int = 16, eval_repeats: int = 3, out=None) -> dict:
    """Run the benchmark; write ``<out>.md`` and ``<out>.json``; return the JSON dict."""
    path = MODELS.get(model, model)
    name = model if model in MODELS else Path(model).stem
    out = Path(out) if out else RESULTS / ("step_time" if name == "embedded" else f"step_time-{name}")
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    teacher, _, config = load(path, return_config=True, full_precision=True)
    teacher.set_dtype(mx.float32)
    teacher.freeze()
    vocab = config["vocab_size"]
    n_windows = max(2 * (warmup + repeats) * batch_size, 4 * batch_size)
    windows = np.random.default_rng(0).integers(0, vocab, (n_windows, seq_len + 1)).astype(np.int32)
    eval_w = np.random.default_rng(1).integers(0, vocab, (eval_windows, seq_len + 1)).astype(np.int32)

    student = shared_student(teacher, config)
    recipe, args = prepare_qat(student, windows, "int4", steps=2, batch_size=batch_size, seq_len=seq_len)
    mx.eval(student.parameters())
    plain_model = shared_student(teacher, config)  # the float model of the raw step

    times: Dict[str, list] = {"plain_loop": [], "qat": [], "plain_raw": [], "eval_per_batch": [], "eval_once": []}
    for r in range(rounds):
        steps = loop_steps(student, teacher, windows, args, warmup, repeats)
        times["plain_loop"] += steps["plain"]
        times["qat"] += steps["qat"]
        times["plain_raw"] += raw_steps(plain_model, teacher, windows, args, warmup, repeats)
        student.eval()
        ev = eval_times(student, eval_w, eval_repeats)
        times["eval_per_batch"] += ev["per_batch"]
        times["eval_once"] += ev["once"]
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {_medians(v)['wall']:.3f} s" for k, v in times.items()),
              flush=True)

    meds = {k: _medians(v) for k, v in times.items()}
    med = {k: v["wall"] for k, v in meds.items()}
    cpu = {k: v["cpu"] for k, v in meds.items()}
    result = {
        "model": name, "recipe": recipe.name, "qat_form": recipe.to_dict(), "batch_size": batch_size,
        "seq_len": seq_len, "tokens_per_step": batch_size * seq_len, "warmup": warmup, "repeats": repeats,
        "rounds": rounds, "eval_windows": eval_windows, "optimizer_state_dtype": args.optimizer_state_dtype,
        "loss_chunk": args.loss_chunk, "grad_checkpoint": args.grad_checkpoint,
        "seconds_wall_cpu": times, "median_s": med, "median_cpu_s": cpu,
        "ratio_qat_to_plain_loop": med["qat"] / med["plain_loop"],
        "ratio_qat_to_plain_raw": med["qat"] / med["plain_raw"],
        "eval_speedup_once": med["eval_per_batch"] / med["eval_once"],
        "cpu_ratio_qat_to_plain_loop": cpu["qat"] / cpu["plain_loop"],
        "cpu_ratio_qat_to_plain_raw": cpu["qat"] / cpu["plain_raw"],
        "cpu_eval_speedup_once": cpu["eval_per_batch"] / cpu["eval_once"],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device()),
        "blas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
        "wall_s": time.perf_counter() - t_start,
    }
    table = format_table(result)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return result


def format_table(r: dict) -> str:
    med, cpu, s = r["median_s"], r["median_cpu_s"], r["seconds_wall_cpu"]
    load_ = ", ".join(f"{x:.1f}" for x in r["load_average_before"])
    lines = [
        f"# Step time: {r['model']}, {r['recipe']} QAT, batch {r['batch_size']} x {r['seq_len']} tokens",
        "",
        f"Medians of {r['rounds']} rounds x {r['repeats']} timed steps (after {r['warmup']} warm-up step per "
        f"phase); evaluation over {r['eval_windows']} windows. {r['cpu_count']} CPU cores, MLX {r['mlx']} "
        f"({r['device']}), OpenBLAS preloaded: {r['blas_preloaded']}; load average before: {load_} "
        "(a shared machine: compare rows of one run only).",
        "",
        "| measurement | median s | vs plain (loop) | median CPU s | CPU vs plain (loop) | each (wall s) |",
        "|---|---|---|---|---|---|",
    ]

    def row(label, key, ref="plain_loop"):
        each = ", ".join(f"{w:.2f}" for w, _ in s[key])
        ratio = f"{med[key] / med[ref]:.2f}x" if ref else ""
        cpu_ratio = f"{cpu[key] / cpu[ref]:.2f}x" if ref else ""
        lines.append(f"| {label} | {med[key]:.3f} | {ratio} | {cpu[key]:.3f} | {cpu_ratio} | {each} |")

    row("plain fine-tuning step, the product's loop (fake quantization off)", "plain_loop")
    row("plain fine-tuning step, nn.value_and_grad + AdamW (float32)", "plain_raw")
    row("QAT step (int4 g64, learned scales), the product's loop", "qat")
    row("evaluation, weights quantized every batch", "eval_per_batch", None)
    row("evaluation, weights quantized once (quantized_once)", "eval_once", None)
    lines += ["", f"QAT / plain (loop): **{r['ratio_qat_to_plain_loop']:.2f}x** wall, "
                  f"{r['cpu_ratio_qat_to_plain_loop']:.2f}x CPU; QAT / plain (raw): **{r['ratio_qat_to_plain_raw']:.2f}x** "
                  f"wall, {r['cpu_ratio_qat_to_plain_raw']:.2f}x CPU (goal: at most 1.3x). Evaluation with the weights "
                  f"quantized once: **{r['eval_speedup_once']:.2f}x** the speed wall, {r['cpu_eval_speedup_once']:.2f}x CPU, "
                  "the same numbers bit for bit (checked)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded",
                   help="embedded (the shipped stdlib Llama), smollm2 (.models/SmolLM2-135M-Instruct.Q4_1.gguf), "
                        "or a GGUF file / mlx-lm directory.")
    p.add_argument("--batch-size", type=int, default=8, help="Windows per step (default: the job's 8).")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per window (default: the job's 256).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps at the start of each phase.")
    p.add_argument("--repeats", type=int, default=4, help="Timed steps per phase and round.")
    p.add_argument("--rounds", type=int, default=2, help="Rounds of plain, QAT, raw steps and evaluations.")
    p.add_argument("--eval-windows", type=int, default=16, help="Windows of each evaluation (as step selection's).")
    p.add_argument("--eval-repeats", type=int, default=3, help="Timed evaluations of each kind per round.")
    p.add_argument("--out", default=None, help="Output path without suffix (default: benchmarks/results/step_time...).")
    a = p.parse_args(argv)
    run(**vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
