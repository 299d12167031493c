"""Reporting of ``benchmarks/quality.py``: its result as a Markdown table, JSON and a plot.

``write_outputs(result, out)`` writes ``<out>.json`` (the result as it is),
``<out>.md`` (the table, the product's targets checked against it, what was not
run and why, notes) and ``<out>.png`` (perplexity against bits per weight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict) -> str:
    rows = result["rows"]
    fp = next(r for r in rows if r["setting"] == "fp")
    lines = [
        "# Quality benchmark",
        "",
        f"Model: {result['model']} ({result['parameters'] / 1e6:.2f}M parameters, {result['model_type']}). "
        f"Machine: {result['machine']}.",
        f"Command: `{result['command'] or 'benchmarks/quality.py'}`; total {result['total_seconds'] / 60:.1f} min"
        + ("." if result.get("complete", True) else " so far (**partial**: the rows measured before the run stopped)."),
        "",
        f"Off-domain: {result['data']['tokens_ood']} tokens of {result['data']['out_of_domain']}; each kind "
        f"weighs the same (mean KL; perplexity from the mean loss). In-domain: {result['data']['tokens_eval']} "
        f"tokens of {result['data']['train']} (test split).",
        f"Every training method: {result['budget']['steps']} steps x {result['budget']['batch_size']} windows x "
        f"{result['seq_len']} tokens, the same windows and the same teacher logits.",
        "",
        "| setting | method | off-domain KL | off-domain ppl | off-domain gap rec. | in-domain KL | in-domain ppl | "
        "in-domain gap rec. | top-1 | bpw | MB on disk | vs bf16 | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = lambda x: abs(x) if r["setting"] == "fp" else x  # noqa: E731  (fp: 0, not -0)
        lines.append(
            f"| {r['setting_label']} | {r['method']} | {kl(r['ood_kl']):.5f} | {r['ood_ppl']:.3f} | "
            f"{_pct(r.get('ood_gap_recovered'))} | {kl(r['kl']):.5f} | {r['ppl']:.3f} | {_pct(r.get('gap_recovered'))} | "
            f"{100 * r['top1']:.2f}% | {r['bpw']:.3f} | {r['bytes'] / 1e6:.2f} | {r['ratio_bf16']:.3f} | {r['wall_s']:.1f} |"
        )
    lines += ["", f"Full-precision perplexity: off-domain {fp['ood_ppl']:.3f}, in-domain {fp['ppl']:.3f}."]
    kinds = result["data"].get("held_out_kinds") or []
    if kinds:
        lines += ["", "KL to full precision by kind of off-domain text:", "",
                  "| setting | method | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for r in rows:
            if r["setting"] != "fp" and r.get("held_out"):
                lines.append(f"| {r['setting_label']} | {r['method']} | "
                             + " | ".join(f"{r['held_out'][k]['kl']:.5f}" for k in kinds) + " |")
    lc = result.get("llamacpp")
    if lc:
        lines += ["", f"In llama.cpp itself, on the same held-out windows ({lc['tokens']} tokens; {lc['how']}):", "",
                  "| GGUF file | llama.cpp ppl | top-1 = full precision | MB |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['ppl']:.3f} | {100 * v['top1_vs_fp']:.2f}% | {v['mb']:.1f} |" for k, v in lc["rows"].items()]
    targets = target_summary(rows)
    if targets:
        lines += ["", "Targets:", ""] + [f"- {t}" for t in targets]
    if result["not_applicable"]:
        lines += ["", "Not run:", ""]
        lines += [f"- {s['method']} at {s['setting']}: {s['why']}" for s in result["not_applicable"]]
    if result["mixed"]:
        lines += ["", "Mixed precision:", ""]
        for name, rep in result["mixed"].items():
            lines.append(
                f"- `{name}`: {rep['recipe']['description']}. Sensitivity pass (per-layer KL) "
                f"{rep['sensitivity_seconds']:.0f} s; rank correlation of the one-pass output-error proxy "
                f"with the measured KL: {rep['proxy_rank_correlation']:.2f}."
            )
    lines += [
        "",
        "Notes:",
        "",
        "- On a CPU every quantized model runs through the same product, `mlxqat.kernels.use_dequantized_matmul` "
        "(dequantize + BLAS: the numbers of `mx.quantized_matmul`, whose CPU kernel is naive at these shapes), "
        "so the table compares quality, not kernels.",
        "- Floating parameters (scales and biases included) are rounded to the model's storage dtype before measuring: "
        "the numbers are those of the saved model. Bits per weight and bytes: `mlxqat.footprint.memory_report`.",
        f"- The teacher's logits are computed once ({result['teacher_logits_seconds']:.0f} s, not in any row's wall time; "
        "`mlxqat.training.teacher.CachedTeacher`) and shared by DWQ, QAT and the evaluation.",
        f"- DWQ: `mlx_lm.quant.dwq.dwq_quantize` (Adam, constant learning rate {result['dwq_lr']} by bit width, "
        f"temperature 2, its defaults otherwise). GPTQ: the first {_calibration(result, 'gptq_windows')} training windows; "
        f"AWQ: the first {_calibration(result, 'awq_windows')}, {result['budget'].get('awq_grid', 20)} grid points per search "
        "(fewer tokens than mlx-lm's defaults, for CPU time). GPTQ packs "
        "with mlxqat's packer (same format) so that 3-bit works; the embedding (tied head) is round-to-nearest at the "
        "same bits in every method.",
        "- QAT picks its best step by KL on separate validation windows (checked every "
        f"{result['budget']['select_every']} steps, step 0 included).",
    ]
    trials = result["budget"].get("lr_trials") or [1.0]
    if len(trials) > 1:
        lines.append(
            f"- Equal tuning: every training method (DWQ and QAT alike) trains once per learning rate x "
            f"{', x'.join(f'{t:g}' for t in trials)} of its own default, from scratch; the trial with the lowest KL "
            "on the validation (selection) windows is the row, never chosen on the test windows. Chosen: "
            + "; ".join(f"{r['method']} {r['setting']} x{r['info']['lr_scale']:g}" for r in rows
                        if isinstance(r.get("info"), dict) and "lr_scale" in r["info"]) + ".")
    return "\n".join(lines) + "\n"


def _calibration(result: dict, field: str) -> int:
    """Windows a calibration method got: its budget, or all the training windows where there are fewer."""
    train = result.get("data", {}).get("windows", {}).get("train")
    return min(result["budget"][field], train) if train else result["budget"][field]


def target_summary(rows: List[dict]) -> List[str]:
    """The product's quality targets, each checked against this run's rows."""

    def row(setting, method):
        return next((r for r in rows if r["setting"] == setting and r["method"] == method), None)

    def gap(r):
        return r.get("ood_gap_recovered") if r else None

    out = []
    for setting, goal in (("int4", 0.90), ("int3", 0.80), ("int2", 0.85)):
        q = row(setting, "QAT")
        if gap(q) is not None:
            verdict = "met" if gap(q) >= goal else "missed"
            out.append(f"{q['setting_label']}: QAT recovers {_pct(gap(q))} of the RTN perplexity gap off-domain "
                       f"(in-domain {_pct(q.get('gap_recovered'))}; target >= {goal:.0%} off-domain: {verdict}).")
    for setting in dict.fromkeys(r["setting"] for r in rows if r["method"] == "QAT"):  # in run order
        q = row(setting, "QAT")
        others = [r for r in rows if r["setting"] == setting and r["method"] in ("RTN", "GPTQ", "AWQ", "DWQ")]
        if q and others:
            best = min(others, key=lambda r: r["ood_kl"])
            verdict = "at least as good as" if q["ood_kl"] <= best["ood_kl"] and q["ood_ppl"] <= best["ood_ppl"] else "behind"
            out.append(f"{q['setting_label']}: off-domain, QAT is {verdict} the best other method, {best['method']} "
                       f"(KL {q['ood_kl']:.5f} vs {best['ood_kl']:.5f}, ppl {q['ood_ppl']:.3f} vs {best['ood_ppl']:.3f}).")
    fp = row("fp", "full precision")
    m = row("mobile", "QAT")
    if m and fp:
        ok = m["bpw"] <= 2.6 + 1e-9 and m["ppl"] / fp["ppl"] <= 1.04
        out.append(f"mobile: QAT at {m['bpw']:.3f} bits per weight has {m['ppl'] / fp['ppl']:.3f}x the "
                   f"full-precision perplexity (target <= 2.6 bpw and <= 1.04x: {'met' if ok else 'missed'}).")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["setting"] != "fp"]
    fp = next(r for r in result["rows"] if r["setting"] == "fp")
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["bpw"], r["ood_ppl"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=method)
    ax.axhline(fp["ood_ppl"], color="k", linestyle="--", linewidth=1, label="full precision")
    ax.set_xlabel("bits per weight (scales and biases included)")
    ax.set_ylabel("perplexity (off-domain held-out text)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model_type']} {result['parameters'] / 1e6:.1f}M: perplexity vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(str(out) + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, Path(str(out) + ".png"))
