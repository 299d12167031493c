"""A GGUF user's fine-tuning path, measured by MLX and by llama.cpp itself.

    python tools/build_docstring_task.py --out runs/finetune/data
    tools/with-blas python benchmarks/finetune_gguf.py --model .models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data runs/finetune/data --methods lora scales --steps 20

For each method, ``mlxqat.finetune`` takes the GGUF file as it is (its Q4_0 / Q4_1 / Q8_0 blocks kept) and
writes a GGUF of the same types; then llama.cpp (xllamacpp) scores the completion tokens of the test split
on the input file and on each output file (:meth:`mlxqat.gguf.llamacpp.LlamaCpp.completion_loss`), beside
the figures MLX measured during the run. Also compared: which bytes of the blocks changed. Writes
``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/finetune-gguf``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import mlxqat  # noqa: E402
from mlxqat.finetune_data import load_finetune_data  # noqa: E402
from mlxqat.gguf.llamacpp import LlamaCpp  # noqa: E402
from mlxqat.gguf.reader import load_gguf, read_gguf_tensors  # noqa: E402
from mlxqat.profile import chip_name  # noqa: E402
from mlxqat.training.finetune import LEARNING_RATES  # noqa: E402

BLOCK_FIELDS = {"Q4_1": (20, {"scales": (0, 2), "offsets": (2, 4), "integers": (4, 20)}),
                "Q4_0": (18, {"scales": (0, 2), "integers": (2, 18)}),
                "Q8_0": (34, {"scales": (0, 2), "integers": (2, 34)})}


def changed_fields(a_path, b_path) -> dict:
    """``{type: {field: tensors whose field changed}}`` between two GGUF files of the same tensors and types."""
    a, b = read_gguf_tensors(a_path), read_gguf_tensors(b_path)
    out = {}
    for name, (t, data, _) in a.items():
        if b[name][0] != t:
            raise ValueError(f"{name}: {t.name} became {b[name][0].name}")
        if t.name not in BLOCK_FIELDS:
            continue
        size, fields = BLOCK_FIELDS[t.name]
        x, y = data.reshape(-1, size), b[name][1].reshape(-1, size)
        counts = out.setdefault(t.name, {"tensors": 0, **{f: 0 for f in fields}})
        counts["tensors"] += 1
        for f, (lo, hi) in fields.items():
            counts[f] += int(not np.array_equal(x[:, lo:hi], y[:, lo:hi]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="A GGUF file of Q4_0 / Q4_1 / Q8_0 tensors.")
    p.add_argument("--data", required=True, help="mlx-lm data directory with train, valid and test.jsonl.")
    p.add_argument("--methods", nargs="+", default=["lora", "scales"])
    p.add_argument("--learning-rates", nargs="+", type=float, default=None, help="One per method (default: the methods' own).")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs" / "finetune-gguf"), help="Where the tuned files go.")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune-gguf"))
    p.add_argument("--keep-rows", action="store_true",
                   help="Keep the rows of <out>.json whose method is not run again (same model, data and steps).")
    a = p.parse_args(argv)
    lrs = a.learning_rates or [LEARNING_RATES[m] for m in a.methods]
    if len(lrs) != len(a.methods):
        p.error("give one --learning-rates value per method")
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    _, tokenizer, config = load_gguf(a.model)
    test = load_finetune_data(a.data, tokenizer, 2048).test
    n_ctx = int(test.shape[-1]) + 8

    def llamacpp_loss(path):
        return LlamaCpp(path, n_ctx=n_ctx).completion_loss(test)["loss"]

    base = llamacpp_loss(a.model)
    rows = []
    for method, lr in zip(a.methods, lrs):
        out = work / f"{Path(a.model).stem}-{method}.gguf"
        t = time.time()
        r = mlxqat.finetune(a.model, a.data, str(out), method=method, learning_rate=lr, steps=a.steps,
                            batch_size=a.batch_size, log_every=max(1, a.steps // 4), val_batches=a.val_batches,
                            progress=False)
        seconds = time.time() - t
        tuned = llamacpp_loss(out)
        rows.append({"method": method, "learning_rate": lr, "mlx_before": r["before"]["test"],
                     "mlx_after": r["after"]["test"], "mlx_saved": r["saved"]["test"], "gain_kept": r["gain_kept"],
                     "llamacpp_before": base, "llamacpp_after": tuned,
                     "llamacpp_gain_vs_mlx": (base - tuned) / (r["before"]["test"] - r["saved"]["test"]),
                     "changed": changed_fields(a.model, out), "seconds": seconds, "file": str(out)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    if a.keep_rows and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if (old["model"], old["data"], old["steps"], old["batch_size"]) != (a.model, a.data, a.steps, a.batch_size):
            p.error(f"{out.with_suffix('.json')} holds another model, data or budget: --keep-rows keeps rows of the same")
        kept = [dict(r, command=r.get("command", old["command"])) for r in old["rows"] if r["method"] not in a.methods]
        rows = kept + rows
    result = {"model": a.model, "data": a.data, "steps": a.steps, "batch_size": a.batch_size,
              "test_examples": int(len(test)), "test_tokens": int(test[:, 1].sum()),
              "machine": f"{platform.system()} {platform.machine()}, {chip_name()}",
              "command": "python benchmarks/finetune_gguf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "minutes": (time.time() - t0) / 60, "rows": rows}
    for r in rows:
        r.setdefault("command", result["command"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = [
        "# Fine-tuning a GGUF file in its own blocks",
        "",
        f"Model: `{result['model']}`; data: `{result['data']}` ({result['test_examples']} test examples, "
        f"{result['test_tokens']} completion tokens scored). Each method: {result['steps']} steps of "
        f"{result['batch_size']} examples. Machine: {result['machine']}. Command: `{result['command']}`; "
        f"{result['minutes']:.1f} min in all."
        + "".join(f" The {r['method']} row is from an earlier run: `{r['command']}`." for r in result["rows"]
                  if r["command"] != result["command"]),
        "",
        "Test completion loss (nats per completion token), by MLX during the run and by llama.cpp from the files:",
        "",
        "| method | lr | MLX before | MLX after | MLX saved file | gain kept | llama.cpp input file | llama.cpp output file "
        "| llama.cpp gain / MLX gain | blocks changed | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        changed = "; ".join(f"{t}: " + ", ".join(f"{f} {n}/{c['tensors']}" for f, n in c.items() if f != "tensors")
                            for t, c in r["changed"].items())
        kept = f"{100 * r['gain_kept']:.2f}%" if r["gain_kept"] is not None else "no gain"
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['mlx_before']:.4f} | {r['mlx_after']:.4f} | "
                     f"{r['mlx_saved']:.4f} | {kept} | {r['llamacpp_before']:.4f} | "
                     f"{r['llamacpp_after']:.4f} | {r['llamacpp_gain_vs_mlx']:.3f} | {changed} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
