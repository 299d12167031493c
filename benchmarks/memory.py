"""Benchmark: the memory model (:mod:`mlxqat.training.memory`) against measured peaks, and the largest model each method trains.

Three parts, each its own flag:

* ``--fit``: measures the peak of QAT steps (``mx.get_peak_memory()``, each run in a
  fresh process) on a grid of small random llamas (hidden 256-1024, 2-8 blocks,
  vocabulary 8k-49k, batches, sequence lengths, checkpointing, moments, loss chunks,
  top-k teacher, trainable all / scales / lora), fits the per-step factors of
  :data:`mlxqat.training.memory.FACTORS` (non-negative least squares on relative error; the
  resident parts are exact and not fitted) and prints them.
* ``--validate``: estimate against measured peak on the embedded model, SmolLM2-135M
  (``tools/fetch-models``) and a randomly initialized llama of about 0.5B parameters, at the
  job's defaults and with a top-k teacher cache.
* ``--table``: from the estimate, the largest of a ladder of real model shapes (their
  ``config.json`` sizes) that each method trains within 8 to 192 GB, at batch 4 x 256 tokens.

    tools/with-blas python benchmarks/memory.py --fit --validate --table

Writes ``benchmarks/results/memory.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2 = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8192, tie_word_embeddings=False)
# (model changes, run settings) of the fitting grid
GRID = [({}, {}), (dict(num_hidden_layers=8), {}), (dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=4), {}), (dict(vocab_size=32768), {}), ({}, dict(batch_size=4)), ({}, dict(seq_len=256)),
        (dict(intermediate_size=2048), {}), (dict(tie_word_embeddings=True), {}), ({}, dict(grad_checkpoint=True)),
        (dict(num_hidden_layers=8), dict(grad_checkpoint=True)), ({}, dict(grad_checkpoint=True, batch_size=8)),
        ({}, dict(optimizer_state_dtype="float32")), ({}, dict(loss_chunk=0)), (dict(vocab_size=32768), dict(loss_chunk=0)),
        ({}, dict(teacher_top_k=64)), ({}, dict(recipe="q4_0")), (dict(vocab_size=32768), dict(batch_size=8)),
        (dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
              num_hidden_layers=2), {}),
        (dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_hidden_layers=6, vocab_size=16384,
              tie_word_embeddings=True), dict(batch_size=4, seq_len=256)),
        (dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=6, vocab_size=49152,
              tie_word_embeddings=True), dict(batch_size=4, seq_len=256)),
        (dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=6, vocab_size=49152,
              tie_word_embeddings=True), dict(batch_size=4, seq_len=256, grad_checkpoint=True)),
        (dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4),
         dict(batch_size=8, seq_len=256, grad_checkpoint=True))]
GRID += [(dict(hidden_size=320, num_hidden_layers=3, intermediate_size=768, num_attention_heads=5, num_key_value_heads=5,
              vocab_size=6000, tie_word_embeddings=True), dict(batch_size=8, seq_len=256)),
         ({}, dict(batch_size=4, seq_len=256)), (dict(vocab_size=2048), dict(batch_size=8, seq_len=256)),
         (dict(num_hidden_layers=2, vocab_size=16384), dict(batch_size=16, seq_len=128)),
         (dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=3),
          dict(batch_size=2, seq_len=512))]
for _mode in ("scales", "lora"):
    GRID += [({}, dict(trainable=_mode)), (dict(vocab_size=32768), dict(trainable=_mode, batch_size=4)),
             (dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=6),
              dict(trainable=_mode, batch_size=4, seq_len=256)),
             (dict(num_hidden_layers=8, tie_word_embeddings=True), dict(trainable=_mode, seq_len=256)),
             (dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, vocab_size=16384),
              dict(trainable=_mode, batch_size=8, grad_checkpoint=True)),
             ({}, dict(trainable=_mode, teacher_top_k=64, batch_size=4))]
for _mode in ("scales", "lora"):
    GRID += [(dict(num_hidden_layers=2, vocab_size=16384), dict(trainable=_mode, batch_size=16)),
             (dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                   num_hidden_layers=2), dict(trainable=_mode)),
             (dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=6,
                   vocab_size=49152, tie_word_embeddings=True), dict(trainable=_mode, batch_size=4, seq_len=256)),
             (dict(intermediate_size=2048), dict(trainable=_mode, batch_size=4, seq_len=256)),
             (dict(vocab_size=32768), dict(trainable=_mode, loss_chunk=0)),
             ({}, dict(trainable=_mode, batch_size=2, seq_len=512)),
             (dict(num_key_value_heads=1, vocab_size=6000, num_hidden_layers=3), dict(trainable=_mode, batch_size=4)),
             (dict(hidden_size=384, intermediate_size=1024, num_attention_heads=3, num_key_value_heads=1,
                   vocab_size=12000), dict(trainable=_mode, batch_size=2, seq_len=256))]
# about 0.5B parameters, for memory only (random weights)
HALF_B = dict(hidden_size=1536, num_hidden_layers=16, intermediate_size=4096, num_attention_heads=12,
              num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)

# config.json sizes of models users quantize, for the largest-model table
LADDER = {
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Gemma 3 270M": dict(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True),
    "Qwen3-0.6B": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "Gemma 3 1B": dict(hidden_size=1152, num_hidden_layers=26, intermediate_size=6912, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True),
    "Llama 3.2 1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama 3.2 3B": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "Llama 3.1 8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Gemma 3 12B": dict(hidden_size=3840, num_hidden_layers=48, intermediate_size=15360, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, vocab_size=262208, tie_word_embeddings=True),
    "Qwen3-14B": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=17408, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "Gemma 3 27B": dict(hidden_size=5376, num_hidden_layers=62, intermediate_size=21504, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, vocab_size=262208, tie_word_embeddings=True),
    "Qwen3-32B": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=25600, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "Llama 3.1 70B": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
MACHINES_GB = (8, 16, 24, 32, 64, 128, 192)
# the methods of the largest-model table: (label, TrainingArgs changes, estimate's method)
METHODS = [("full QAT, defaults", {}, "qat"), ("full QAT, top-k teacher", dict(teacher_top_k=64), "qat"),
           ("scales only (as DWQ)", dict(trainable="scales", teacher_top_k=64), "qat"),
           ("block-wise", dict(teacher_top_k=64), "blockwise")]


def _random_llama(config: dict):
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(0)
    cfg = dict(model_type="llama", rms_norm_eps=1e-5, **config)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model, cfg


def measure(model_config: dict = None, model_path: str = None, recipe: str = "int4", steps: int = 2,
            **settings) -> dict:
    """:func:`mlxqat.training.memory.measure_training` of a random llama (``model_config``) or a model file."""
    import mlx.core as mx
    import numpy as np
    from mlxqat.storage.load import load
    from mlxqat.training.memory import measure_training

    if model_path is not None:
        config = load(model_path, full_precision=True, return_config=True, lazy=True)[2]

        def build():
            teacher, _, cfg = load(model_path, full_precision=True, return_config=True)
            teacher.set_dtype(mx.float32)
            return teacher, cfg
    else:
        config = _random_llama(model_config)[1]

        def build():
            return _random_llama(model_config)
    batch, seq_len = settings.pop("batch_size", 2), settings.pop("seq_len", 128)
    windows = np.random.default_rng(0).integers(0, config["vocab_size"], (batch * steps, seq_len + 1)).astype(np.int32)
    r = measure_training(build, windows, recipe, steps=steps, batch_size=batch, seq_len=seq_len, warmup_steps=0,
                         log_every=steps, **settings)
    keys = list(LADDER["SmolLM2-135M"]) + ["head_dim"]
    return {"config": {k: config[k] for k in keys if config.get(k) is not None},
            "settings": {"recipe": recipe, "batch_size": batch, "seq_len": seq_len, **settings},
            "checkpointed": r["checkpointed"], "peak": r["peak"], "params": r["params"],
            "s_per_step": r["s_per_step"], "final_loss": r["final_loss"]}


def _row_inputs(row: dict):
    from mlxqat.training import memory
    from mlxqat.recipes import get
    from mlxqat.training.args import TrainingArgs

    settings = dict(row["settings"])
    recipe = settings.pop("recipe")
    group = min(s.group_size for s in get(recipe).specs() if s.group_size > 0)
    return memory.ModelShape.from_config(row["config"]), TrainingArgs(steps=2, warmup_steps=0, **settings), group


def estimate_for(row: dict) -> float:
    """:func:`mlxqat.training.memory.training_estimate` for a measured row's model and settings."""
    from mlxqat.training import memory

    shape, args, group = _row_inputs(row)
    return memory.training_estimate(shape, args, group_size=group).total


def _run_one(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"measurement {spec} failed (exit status {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _features(row: dict) -> dict:
    """The per-step sizes :func:`mlxqat.training.memory._step_parts` multiplies by factors, and the exact rest."""
    from mlxqat.training import memory

    shape, args, group = _row_inputs(row)
    trained = memory.trainable_count(shape, args.trainable, group, args.lora_rank)
    unit = {k: 1.0 for k in memory.FACTORS["all"]}
    sizes = {}
    for k in unit:  # one factor at a time: the size it multiplies
        one = {j: float(j == k) for j in unit}
        parts = memory._step_parts(shape, args, one, row["checkpointed"], trained)
        sizes[k] = sum(parts.values())
    exact = memory.training_estimate(shape, args, group_size=group).total - sum(
        memory._step_parts(shape, args, memory.FACTORS[args.trainable], row["checkpointed"], trained).values())
    return {"sizes": sizes, "exact": exact, "mode": args.trainable}


# the sizes given a factor of their own (the rest are 0): fewer than the grid can tell apart overfit it
FITTED = ("inter", "scores", "inputs", "fake_quant", "logits", "teacher_logits", "batch_logits")


def _nnls(a, b):
    import numpy as np

    active = list(range(a.shape[1]))
    while True:
        c, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (c >= 0).all():
            out = np.zeros(a.shape[1])
            out[active] = c
            return out
        active.pop(int(np.argmin(c)))


def fit(rows: list) -> dict:
    """Per-mode factors minimising the relative error of the estimate over ``rows``."""
    import numpy as np

    factors = {}
    for mode in ("all", "scales", "lora"):
        sel = [(r, _features(r)) for r in rows if r["settings"].get("trainable", "all") == mode]
        names = [k for k in sel[0][1]["sizes"] if k in FITTED]
        a = np.array([[f["sizes"][k] / r["peak"] for k in names] for r, f in sel])
        b = np.array([(r["peak"] - f["exact"]) / r["peak"] for r, f in sel])
        w = np.ones(len(b))
        for _ in range(30):  # reweighted towards the largest relative errors (a minimax fit)
            c = _nnls(a * w[:, None], b * w)
            w = np.sqrt(w * (np.abs(a @ c - b) + 1e-3))
            w /= w.mean()
        factors[mode] = {k: round(float(dict(zip(names, c)).get(k, 0.0)), 2) for k in sel[0][1]["sizes"]}
    return factors


def largest_table() -> dict:
    from mlxqat.training import memory
    from mlxqat.training.args import TrainingArgs

    base = TrainingArgs(batch_size=4, seq_len=256)
    out = {}
    for label, change, method in METHODS:
        args = dataclasses.replace(base, **change)
        sizes = {name: memory.estimate(memory.ModelShape.from_config(dict(cfg, torch_dtype="bfloat16"), name), args,
                                       method=method,  # (their checkpoints are bfloat16)
                                       kept_windows=64).total / memory.GB for name, cfg in LADDER.items()}
        out[label] = {"gb": sizes, "largest": {str(m): max((n for n, g in sizes.items() if g <= m), default=None,
                                                           key=lambda n: sizes[n]) for m in MACHINES_GB}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit", action="store_true", help="Measure the grid and fit the factors.")
    p.add_argument("--fit-from", type=int, default=0, help=argparse.SUPPRESS)  # measure GRID[N:] only, keep the rest
    p.add_argument("--refit", action="store_true", help="Fit the factors again on the grid already measured.")
    p.add_argument("--validate", action="store_true", help="Estimate vs measured on the embedded model, SmolLM2, ~0.5B.")
    p.add_argument("--table", action="store_true", help="The largest model each method trains, by machine memory.")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(measure(**json.loads(a.one))), flush=True)
        return 0
    out = Path(a.out)
    result = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    md = []
    if a.fit:
        rows = result.get("grid", [])[:a.fit_from] + [_run_one({"model_config": {**BASE, **m}, **s})
                                                          for m, s in GRID[a.fit_from:]]
        result["grid"] = rows
        result["factors"] = fit(rows)
        print("fitted FACTORS:", json.dumps(result["factors"]), flush=True)
    if a.refit:
        result["factors"] = fit(result["grid"])
        print("fitted FACTORS:", json.dumps(result["factors"]), flush=True)
        for row in result.get("validation", {}).values():  # the estimate with the module's factors now
            row["estimate"] = estimate_for(row)
    if a.validate:
        specs = [("embedded model", {"model_path": str(ROOT / "mlxqat" / "assets" / "stdlib-llama"),
                                     "batch_size": 8, "seq_len": 256}),
                 ("embedded model, top-k teacher", {"model_path": str(ROOT / "mlxqat" / "assets" / "stdlib-llama"),
                                                    "batch_size": 8, "seq_len": 256, "teacher_top_k": 64}),
                 ("SmolLM2-135M", {"model_path": str(SMOLLM2), "batch_size": 4, "seq_len": 256}),
                 ("SmolLM2-135M, top-k teacher", {"model_path": str(SMOLLM2), "batch_size": 4, "seq_len": 256,
                                                  "teacher_top_k": 64}),
                 ("random llama 0.5B", {"model_config": HALF_B, "batch_size": 2, "seq_len": 256}),
                 ("random llama 0.5B, scales only", {"model_config": HALF_B, "batch_size": 2, "seq_len": 256,
                                                     "trainable": "scales"})]
        result["validation"] = {}
        for name, spec in specs:
            row = _run_one(spec)
            row["estimate"] = estimate_for(row)
            result["validation"][name] = row
            print(f"{name}: measured {row['peak'] / 1e9:.3f} GB, estimated {row['estimate'] / 1e9:.3f} GB "
                  f"({row['estimate'] / row['peak'] - 1:+.1%})", flush=True)
    if a.table:
        result["largest"] = largest_table()
    if "validation" in result:
        md += ["| model, settings | parameters | measured peak GB | estimate GB | error | s/step |", "|---|---|---|---|---|---|"]
        for name, r in result["validation"].items():
            params = r["params"] or 0
            md.append(f"| {name} ({r['settings']['batch_size']} x {r['settings']['seq_len']}) | {params / 1e6:.1f}M | "
                      f"{r['peak'] / 1e9:.3f} | {r['estimate'] / 1e9:.3f} | {r['estimate'] / r['peak'] - 1:+.1%} | "
                      f"{r['s_per_step']:.1f} |")
        md.append("")
    if "grid" in result:
        errors = [estimate_for(r) / r["peak"] - 1 for r in result["grid"]]
        md += [f"Fitting grid: {len(errors)} runs, estimate error from {min(errors):+.1%} to {max(errors):+.1%}.", ""]
    if "largest" in result:
        md += ["| method (batch 4 x 256) | " + " | ".join(f"{m} GB" for m in MACHINES_GB) + " |",
               "|---|" + "---|" * len(MACHINES_GB)]
        for label, t in result["largest"].items():
            md.append(f"| {label} | " + " | ".join(t["largest"][str(m)] or "-" for m in MACHINES_GB) + " |")
        md.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
