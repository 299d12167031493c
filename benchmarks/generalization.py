"""Does quantization hold on text the training never saw? QAT variants against RTN and DWQ, per kind of text.

    tools/with-blas python benchmarks/generalization.py --model .models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --setting int4 --steps 20 --batch-size 2 --seq-len 128 --windows 16 --out benchmarks/results/generalization-smollm2

Every method quantizes the same full-precision model at one setting with the same training windows of the
CPython standard library source (the default training text of ``python -m mlxqat.train``) and the same
number of steps; each result is measured on held-out windows of that text (``in-domain``) and on each kind
of :mod:`mlxqat.heldout` text (prose, C/C++ code, Python docs, chat turns in the model's template with its
own replies), none used for training or selection. The primary figure is the KL to the full-precision
model. Variants call the product (``mlxqat.training.qat.quantize_qat``) with different options:

``RTN``         round-to-nearest (``mlxqat.convert.quantize_rtn``)
``start``       QAT's starting point, no steps (the best post-training quantization per layer, mlxqat.ptq)
``start, clip search``  the recipe's QAT form without it (learned scales from a clip search, round-to-nearest)
``DWQ``         mlx-lm's DWQ (``benchmarks/quality.py``'s run, the same teacher logits)
``QAT``         the product's defaults
``QAT clip start``  the defaults, from the clip-search start instead of the PTQ start
``QAT scales``  scales and offsets only (codes frozen)
``QAT gen``     trained on the teacher's own samples (``--self-generate``) instead of the text
``QAT mix``     half text windows, half the teacher's own samples
``QAT fast scales``  all weights, the scales at the scales-only rate

Writes ``<out>.md`` and ``<out>.json``; ``--resume`` keeps the variants an earlier run wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlxqat  # noqa: E402
from mlxqat import recipes  # noqa: E402
from mlxqat.convert import quantize_rtn  # noqa: E402
from mlxqat.data import build_dataset, generate_windows, model_context, split_selection, spread, stdlib_windows  # noqa: E402
from mlxqat.evaluate import evaluate  # noqa: E402
from mlxqat.heldout import KINDS, heldout_windows  # noqa: E402
from mlxqat.kernels import use_dequantized_matmul  # noqa: E402
from mlxqat.storage.load import load  # noqa: E402
from mlxqat.training.qat import EVAL_WINDOWS, prepare_qat, quantize_qat, shared_student  # noqa: E402
from mlxqat.training.teacher import CachedTeacher  # noqa: E402
from quality import SETTINGS, Budget, Job, off_domain, run_dwq, stored  # noqa: E402

VARIANTS = ("RTN", "start", "start, clip search", "DWQ", "QAT", "QAT clip start", "QAT scales", "QAT gen", "QAT mix",
            "QAT fast scales")
# the QAT variants' options (quantize_qat keywords); "QAT fast scales": weights and scales together, the scales at
# the rate scales-only training uses (mlxqat.recipes.QATDefaults.scales_only_learning_rate at 4 bits)
QAT_OPTIONS = {"QAT": {}, "QAT clip start": {"ptq_start": False}, "QAT scales": {"trainable": "scales"}, "QAT gen": {},
               "QAT mix": {},
               "QAT fast scales": {"scale_learning_rate": 1e-5}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/generalization.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model path (default: the embedded stdlib model).")
    p.add_argument("--data", default=None, help="Training text (file, folder or JSONL; default: the stdlib source); "
                   "its held-out split is the in-domain text.")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="Kinds of held-out text (leave out the kind the --data is of).")
    p.add_argument("--setting", default="int4", choices=sorted(SETTINGS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=16, help="Held-out windows per kind of text.")
    p.add_argument("--select-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generalization"))
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    out = Path(a.out)
    earlier = json.loads(Path(f"{out}.json").read_text()) if a.resume and Path(f"{out}.json").exists() else None
    setting = SETTINGS[a.setting]
    if setting.recipe is None:
        raise SystemExit(f"--setting {a.setting}: choose a setting with a built-in recipe")
    recipe = recipes.get(setting.recipe)

    teacher_model, tokenizer, config = load(a.model, return_config=True, full_precision=True)
    floats = {v.dtype for _, v in tree_flatten(teacher_model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    storage = mx.bfloat16 if floats == {mx.bfloat16} else mx.float16
    teacher_model.set_dtype(mx.float32)
    teacher_model.freeze()
    ctx = model_context(teacher_model)
    seq_len = min(a.seq_len, ctx) if ctx else a.seq_len
    n_train = a.steps * a.batch_size

    print("data ...", flush=True)
    if a.data is None:
        data = {
            "train": stdlib_windows(tokenizer, "train", seq_len, n_train, oversample=4),
            "select": split_selection(stdlib_windows(tokenizer, "validation", seq_len, EVAL_WINDOWS + a.select_windows),
                                      a.select_windows)[1],
            "in-domain": stdlib_windows(tokenizer, "test", seq_len, a.windows),
        }
    else:  # as python -m mlxqat.train --data: a hash split by document; selection and test windows from its held-out part
        ds = build_dataset(a.data, tokenizer, seq_len, max_context=ctx)
        if len(ds.train) < n_train or len(ds.val) < a.select_windows + a.windows:
            raise SystemExit(f"{a.data}: {len(ds.train)} training / {len(ds.val)} held-out windows of {seq_len} tokens; "
                             f"need {n_train} / {a.select_windows + a.windows}")
        test, select = split_selection(ds.val, a.select_windows)
        data = {"train": spread(ds.train, n_train), "select": select, "in-domain": spread(test, a.windows)}
    gen_path = Path(f"{out}.generated.npy")
    if gen_path.exists() and np.load(gen_path).shape == (n_train, seq_len + 1):
        data["generated"] = np.load(gen_path)
    elif any(v in a.variants for v in ("QAT gen", "QAT mix")):
        t0 = time.perf_counter()
        data["generated"] = generate_windows(teacher_model, tokenizer, n_train, seq_len, seed=a.seed)
        np.save(gen_path, data["generated"])
        print(f"  sampled {n_train} windows from the teacher in {time.perf_counter() - t0:.0f} s", flush=True)
    held_path = Path(f"{out}.heldout.npz")  # kept, so that a resumed run measures on the very same windows
    if held_path.exists():
        held = {k: v for k, v in np.load(held_path).items() if k in a.kinds}
    else:
        held = heldout_windows(tokenizer, seq_len, a.windows, kinds=a.kinds, model=teacher_model)
        np.savez(held_path, **held)
    data.update(held)
    kinds = ["in-domain", *held]

    teacher = CachedTeacher(teacher_model)
    for name in ("train", "select", "generated", *kinds):
        if name in data:
            teacher.prefill(data[name], a.batch_size)

    def fresh():
        m = shared_student(teacher_model, config)
        m.update(tree_map(lambda x: x * 1, m.parameters()))
        mx.eval(m.parameters())
        return m

    def measure(m) -> dict:
        stored(m, storage)
        if mx.default_device() == mx.cpu:
            use_dequantized_matmul(m)
        m.eval()
        return {k: evaluate(m, data[k], teacher) for k in kinds}

    results = dict(earlier["results"]) if earlier else {}
    if "full precision" not in results:
        kept = teacher_model.parameters()
        results["full precision"] = {"by_kind": measure(teacher_model), "seconds": 0.0}
        teacher_model.update(kept)
    budget = Budget(steps=a.steps, batch_size=a.batch_size, seq_len=seq_len, eval_windows=a.windows, ood_windows=a.windows,
                    select_windows=a.select_windows, select_every=max(1, a.steps // 4), sensitivity_windows=1,
                    awq_windows=4, gptq_windows=16)

    def write():
        rows = [summary(name, r) for name, r in results.items()]
        rtn = next((row for row in rows if row["variant"] == "RTN"), None)
        for row in rows:
            if rtn and row["variant"] != "full precision":
                for k in ("in", "off"):
                    base = rtn[f"kl_{k}"]
                    row[f"kl_removed_{k}"] = 1 - row[f"kl_{k}"] / base if base > 0 else None
        result = {"command": "python benchmarks/generalization.py " + " ".join(argv or sys.argv[1:]),
                  "model": a.model or "embedded", "data": a.data or "standard-library source", "setting": a.setting, "steps": a.steps, "batch_size": a.batch_size,
                  "seq_len": seq_len, "windows_per_kind": {k: int(len(data[k])) for k in kinds},
                  "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}",
                  "total_seconds": (earlier or {}).get("total_seconds", 0.0) + time.perf_counter() - t_start,
                  "results": results, "rows": rows}
        tmp = Path(f"{out}.json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, f"{out}.json")
        Path(f"{out}.md").write_text(table(result, kinds))
        return result

    for name in a.variants:
        if name in results:
            continue
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        m, info = fresh(), {}
        if name == "RTN":
            quantize_rtn(m, recipe)
        elif name == "DWQ":
            run_dwq(m, Job(setting, recipe, data, teacher, budget, seq_len, config.get("model_type", ""), True,
                           str(storage).rpartition(".")[2]))
        else:
            train = data["train"]
            if name == "QAT gen":
                train = data["generated"]
            elif name == "QAT mix":
                train = np.stack([data["train"], data["generated"]], axis=1).reshape(-1, seq_len + 1)[:n_train]
            if name.startswith("start"):
                prepare_qat(m, train, recipe, scale_dtype=str(storage).rpartition(".")[2], seq_len=seq_len,
                            ptq_start=name == "start")
            else:
                s = quantize_qat(m, teacher, train, recipe, select_windows=data["select"],
                                 scale_dtype=str(storage).rpartition(".")[2], steps=a.steps, batch_size=a.batch_size,
                                 seq_len=seq_len, log_every=budget.select_every, seed=a.seed, **QAT_OPTIONS[name])
                info = {"best_step": s.get("best_step")}
            mlxqat.convert(m)
        results[name] = {"by_kind": measure(m), "seconds": time.perf_counter() - t0, **info}
        by = results[name]["by_kind"]
        print("  " + "  ".join(f"{k} kl {v['kl']:.4f}" for k, v in by.items()), flush=True)
        write()
    r = write()
    print(f"wrote {out}.md / .json in {r['total_seconds']:.0f} s")
    return 0


def summary(name: str, r: dict) -> dict:
    """One variant's row: KL and perplexity by kind, in-domain KL and the off-domain mean (quality.off_domain)."""
    by = r["by_kind"]
    off = off_domain({k: v for k, v in by.items() if k != "in-domain"})
    return {"variant": name, "seconds": r["seconds"], "best_step": r.get("best_step"),
            "kl_in": by["in-domain"]["kl"], "kl_off": off["kl"],
            **{f"kl_{k}": by[k]["kl"] for k in by}, **{f"ppl_{k}": by[k]["ppl"] for k in by}}


def table(result: dict, kinds) -> str:
    lines = [f"# Quality on text the training never saw: {result['model']}, {result['setting']}",
             "", f"{result['steps']} steps of {result['batch_size']} x {result['seq_len']} tokens of {result['data']}; held-out windows per kind: {result['windows_per_kind']}. Command: `{result['command']}`",
             f"({result['machine']}; {result['total_seconds'] / 60:.1f} min).", "",
             "KL to the full-precision model (nats/token; lower is better); `removed` is the share of "
             "round-to-nearest's KL a method removes. Off-domain = mean over the kinds other than in-domain.", "",
             "| method | " + " | ".join(f"KL {k}" for k in kinds) + " | KL off-domain | removed off | removed in | s |",
             "|---|" + "---|" * (len(kinds) + 4)]
    for r in result["rows"]:
        if r["variant"] == "full precision":
            continue
        cells = [f"{r.get(f'kl_{k}', 0):.4f}" for k in kinds]
        rem = [f"{100 * r[k]:.0f}%" if r.get(k) is not None else "" for k in ("kl_removed_off", "kl_removed_in")]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['kl_off']:.4f} | {rem[0]} | {rem[1]} | {r['seconds']:.0f} |")
    lines += ["", "Perplexity:", "", "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[f'ppl_{k}']:.3f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
