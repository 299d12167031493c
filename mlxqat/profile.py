"""``python -m mlxqat.profile``: speed, latency and memory of full precision vs int4 with each kernel.

    python -m mlxqat.profile                                  # embedded model: fp vs RTN int4
    python -m mlxqat.profile --model qat-int4/ --baseline-model base/ --out profile-out/
    python -m mlxqat.profile --quick                          # smaller grid, 2 repeats

For every prompt length and generation length it runs three variants of
the model, interleaved so that load from other processes spreads evenly:

* ``fp16`` (``--baseline``): the full-precision model. On the CPU it runs in
  float32, because MLX's CPU backend is much slower in float16; the output
  says so (``meta.baseline_note``).
* ``int4 (mlx kernel)``: 4-bit layers on MLX's ``quantized_matmul``.
* ``int4 (mlxqat kernel)``: the same weights on this package's int4 kernel.

Each run is one greedy generation from a prompt of seeded random token ids
(speed does not depend on which tokens, so no chat template is involved),
timed as ``mlx_lm`` times it: prefill = prompt processing up to the first
generated token, decode = the rest. The figures are medians over ``--repeats`` runs after one warm-up run
per variant. The model memory of each variant (bytes, bits per weight, size
relative to bf16) comes from :func:`mlxqat.footprint.memory_report`.

Every prompt length must be one ``generate`` would take
(:func:`mlxqat.generate.check_prompt_length`: room for one token in the model's
context, and ``--max-prompt-tokens`` where the config names no context); a
given one that is not is refused before any timing, a default one is left out
with a note. Generation may run past the context: that timing is valid (the
text would not be), and the cell is marked.

A full-precision ``--model`` is quantized with round-to-nearest (``--recipe``)
for the int4 rows. A quantized ``--model`` needs its full-precision original
for the fp rows (``--baseline-model``); without it they are skipped, with a note.

Writes ``profile.json`` and ``profile.png`` (prefill and decode tokens/s by
prompt length, and model memory) into ``--out``.

This module is about 650 lines, past the project's 600: the measurement, the tables and the plot
of one profile are one feature that notebooks import as one module (``mlxqat.profile``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ._cli import ArgumentParser, UsageError, command, non_negative_int, positive_int
from .convert import layer_specs, quantize_rtn, use_kernel
from .data import model_context
from .footprint import memory_report
from .generate import apply_dtype, check_prompt_length, model_label
from .kernels import KernelQuantizedLinear
from .storage.destinations import atomic_dir, check_destination, write_manifest
from .storage.load import load

__all__ = [
    "profile_model", "time_generation", "format_table", "memory_table", "summary_table", "plot", "write_results", "main",
]

BASELINES = ("fp16", "bf16", "fp32", "none")
_BASELINE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DEFAULT_PROMPT_LENGTHS = (32, 128, 512)
DEFAULT_GEN_LENGTHS = (32, 128)
DEFAULT_REPEATS = 3
QUICK = dict(prompt_lengths=(32, 128), gen_lengths=(16,), repeats=2)
MIN_LENGTH = {"prompt-lengths": 1, "gen-lengths": 2}  # decode speed needs 2 generated tokens


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def time_generation(model: nn.Module, prompt: mx.array, gen_len: int) -> Dict[str, float]:
    """Time one greedy generation of ``gen_len`` tokens after ``prompt`` (1-D token ids).

    Uses ``mlx_lm``'s ``generate_step`` (KV cache, the same prefill and
    pipelining as ``mlx_lm.generate``) without stopping at end-of-sequence.

    Returns:
        ``prefill_s`` (until the first token), ``decode_s`` (the other
        ``gen_len - 1`` tokens), ``prefill_tps``, ``decode_tps``,
        ``ttft_ms``, ``ms_per_token`` and ``peak_memory_bytes``.
    """
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.generate import (
        generate_step,
        generation_stream,
    )

    if gen_len < 2:
        raise UsageError(f"generation length {gen_len}: decode speed needs at least 2 generated tokens")
    mx.synchronize(generation_stream)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first = end = None
    n = 0
    for n, _ in enumerate(generate_step(prompt, model, max_tokens=gen_len, sampler=_greedy), 1):
        end = time.perf_counter()  # the token is an int here: its computation is done
        if n == 1:
            first = end
    mx.synchronize(generation_stream)  # the step generate_step dispatched ahead is not timed
    if n != gen_len:
        raise RuntimeError(f"generate_step gave {n} tokens, expected {gen_len}")
    prefill_s, decode_s = first - tic, end - first
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tps": prompt.size / prefill_s,
        "decode_tps": (gen_len - 1) / decode_s,
        "ttft_ms": 1e3 * prefill_s,
        "ms_per_token": 1e3 * decode_s / (gen_len - 1),
        "peak_memory_bytes": int(mx.get_peak_memory()),
    }


def _device_name() -> str:
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "gpu (metal)" if mx.metal.is_available() else "gpu (cuda)"


def _median_row(runs: List[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    model: nn.Module
    kernel: Optional[str]  # "mlx" / "mlxqat" for quantized variants
    dtype: str


def _memory(model: nn.Module) -> dict:

    return memory_report(model).to_dict()


def _baseline_dtype(baseline: str) -> tuple:
    """(dtype name used, note) for the full-precision rows on this device."""
    wanted = _BASELINE_DTYPES[baseline]
    if mx.default_device() == mx.cpu and wanted != "float32":
        return "float32", (
            f"--baseline {baseline}: measured in float32 on the CPU (MLX's CPU backend is much slower "
            f"in {wanted}); on an Apple GPU it runs in {wanted}"
        )
    return wanted, None


def build_variants(
    model: Optional[str],
    baseline: str,
    baseline_model: Optional[str],
    recipe: str,
    kernels: Sequence[str],
    loaded: Optional[nn.Module] = None,
) -> tuple:
    """``(variants, notes, meta)``: the models to time, and why any row is missing.

    ``loaded``: ``model`` as :func:`mlxqat.load` opened it already (``None``: open it here).
    """

    notes: List[str] = []
    meta: dict = {}
    m = loaded if loaded is not None else load(model)[0]
    source = meta["model"] = model_label(model)
    quantized_given = bool(layer_specs(m))
    variants: List[Variant] = []

    fp = None
    if baseline != "none":
        if quantized_given:
            if baseline_model is None:
                notes.append(
                    f"no full-precision rows: {source} is quantized; pass --baseline-model DIR (its "
                    "full-precision original) to measure them"
                )
            else:
                fp, _ = load(baseline_model, full_precision=True)
                meta["baseline_model"] = model_label(baseline_model)
        else:
            fp, _ = load(model)
    if fp is not None:
        dtype, note = _baseline_dtype(baseline)
        fp.set_dtype(getattr(mx, dtype))
        mx.eval(fp.parameters())
        if note:
            notes.append(note)
        meta["baseline_note"] = note
        variants.append(Variant(baseline if dtype == _BASELINE_DTYPES[baseline] else f"{baseline} (as float32)", fp, None, dtype))

    if quantized_given:
        q = m
        meta["quantization"] = "as given"
    else:
        q = quantize_rtn(m, recipe)
        meta["quantization"] = f"round-to-nearest {recipe}"
    cast = apply_dtype(q, "auto")
    q_dtype = str(cast).replace("mlx.core.", "") if cast is not None else "as loaded"
    mx.eval(q.parameters())
    label = recipe if not quantized_given else _bits_label(q)
    for kernel in kernels:
        use_kernel(q, kernel)
        n_ours = sum(isinstance(x, KernelQuantizedLinear) for _, x in q.named_modules())
        if kernel == "mlxqat" and n_ours == 0:
            notes.append("no 'mlxqat kernel' rows: the model has no 4-bit affine layer (group 32/64/128) the kernel runs")
            continue
        # One model for both kernels: use_kernel switches its layers (sharing the weights) before each run.
        variants.append(Variant(f"{label} ({kernel} kernel)", q, kernel, q_dtype))
    meta["vocab_size"] = int(q.args.vocab_size) if hasattr(q, "args") else None
    meta["context"] = model_context(q)
    return variants, notes, meta


def _bits_label(model: nn.Module) -> str:
    """``int4`` / ``int8`` / ``mixed 2-8 bit``: the bits of a quantized model's linear layers."""
    bits = sorted({m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)})
    if not bits:
        return "quantized"
    return f"int{bits[0]}" if len(bits) == 1 else f"mixed {bits[0]}-{bits[-1]} bit"


def _ready(v: Variant) -> nn.Module:
    """The variant's model with its kernel switched in."""
    if v.kernel is not None:
        use_kernel(v.model, v.kernel)
    return v.model


# ---------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------


def _lengths(values, what: str) -> List[int]:
    """``--prompt-lengths`` / ``--gen-lengths`` (``what``): a comma-separated string or a list of ints,
    each at least :data:`MIN_LENGTH` ``[what]``."""
    minimum = MIN_LENGTH[what]
    text = values if isinstance(values, str) else ",".join(map(str, values))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"--{what} {text!r}: give comma-separated integers, e.g. 32,128")
    if min(values) < minimum:
        raise UsageError(f"--{what} {text}: each length must be at least {minimum}, e.g. 32,128")
    return values


class _LengthsAction(argparse.Action):
    """Parse ``--prompt-lengths`` / ``--gen-lengths`` with :func:`_lengths` when the flag is read, so a bad
    length is a usage error at parse time (``--quick`` never replaces it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, _lengths(values, self.dest.replace("_", "-")))
        except UsageError as e:
            raise argparse.ArgumentError(None, str(e)) from None


def _fitting_prompt_lengths(lengths: List[int], given: bool, context: Optional[int],
                            max_prompt_tokens: Optional[int], notes: List[str]) -> List[int]:
    """The prompt lengths ``generate`` would take (:func:`~mlxqat.generate.check_prompt_length`): a given
    one that it would not is refused; a default one is left out, with a note."""
    fix = "give --prompt-lengths of at most {limit} tokens"
    kept = []
    for p in lengths:
        try:
            check_prompt_length(p, context, max_prompt_tokens, fix=fix)
            kept.append(p)
        except UsageError as e:
            if given:
                raise UsageError(f"--prompt-lengths {p}: {e}") from None
            notes.append(f"prompt length {p} left out of the default grid: {e}")
    if not kept:
        raise UsageError("nothing to profile: " + "; ".join(notes))
    return kept


def _kernels(kernels) -> List[str]:
    """``--kernels``: a list, or a comma-separated string, of ``mlx`` / ``mlxqat``."""
    if isinstance(kernels, str):
        kernels = [k.strip() for k in kernels.split(",") if k.strip()]
    bad = [k for k in kernels if k not in ("mlx", "mlxqat")]
    if bad or not kernels:
        raise UsageError(f"--kernels {','.join(kernels)}: choose from mlx, mlxqat (comma-separated)")
    return list(kernels)


def _time_cells(variants, prompts, cells, repeats: int, progress: bool) -> Dict[tuple, List[dict]]:
    """``{(variant, prompt_len, gen_len): [timing, ...]}``: a warm-up per variant, then ``repeats``
    rounds of every cell, the variants interleaved so background load hits each alike."""

    first_prompt, first_gen = cells[0]
    bar = tqdm(total=len(variants) * (1 + repeats * len(cells)), desc="profile", disable=not progress,
               dynamic_ncols=True)
    runs: Dict[tuple, List[dict]] = {}
    try:
        for v in variants:  # warm-up: first-call allocations and kernel builds
            time_generation(_ready(v), prompts[first_prompt], first_gen)
            bar.update(1)
        for p, g in cells:
            for _ in range(repeats):
                for v in variants:
                    runs.setdefault((v.name, p, g), []).append(time_generation(_ready(v), prompts[p], g))
                    bar.update(1)
    finally:
        bar.close()
    return runs


def profile_model(
    model: Optional[str] = None,
    baseline: str = "fp16",
    baseline_model: Optional[str] = None,
    recipe: str = "int4",
    prompt_lengths: Optional[Sequence[int]] = None,
    gen_lengths: Optional[Sequence[int]] = None,
    repeats: Optional[int] = None,
    kernels: Sequence[str] = ("mlx", "mlxqat"),
    seed: int = 0,
    out: Optional[str] = None,
    progress: bool = True,
    quick: bool = False,
    max_prompt_tokens: Optional[int] = None,
) -> dict:
    """Measure prefill/decode speed, latency and memory of fp vs int4 (MLX kernel) vs int4 (ours).

    Args:
        model: model directory or Hugging Face id (default: the embedded stdlib model);
            full precision (then quantized on the fly with ``recipe``) or quantized.
        baseline: ``fp16``, ``bf16``, ``fp32`` (the full-precision rows' dtype; float32 on
            the CPU) or ``none`` (no full-precision rows).
        baseline_model: the full-precision original of a quantized ``model``.
        recipe: recipe for quantizing a full-precision ``model``.
        prompt_lengths, gen_lengths: the grid (lists of ints, or comma-separated strings); ``None``:
            :data:`DEFAULT_PROMPT_LENGTHS` / :data:`DEFAULT_GEN_LENGTHS` (``quick``: :data:`QUICK`'s).
            A prompt length ``generate`` would refuse (:func:`mlxqat.generate.check_prompt_length`)
            is refused when given and left out, with a note, from the default.
        repeats: timed runs per cell; the figures are medians (``None``: 3, ``quick``: 2).
        kernels: quantized kernels to compare, from ``mlx`` and ``mlxqat``.
        seed: seed of the random prompt tokens.
        out: directory for ``profile.json`` and ``profile.png`` (``None``: write nothing).
        progress: show a progress bar.
        quick: the smaller grid of :data:`QUICK` for what is not given.
        max_prompt_tokens: the longest prompt, as ``generate --max-prompt-tokens`` (``None``: what fits
            the model's context, or :data:`mlxqat.generate.UNKNOWN_CONTEXT_LIMIT` where its config names none).

    Returns:
        ``{"meta", "notes", "memory": {variant: report}, "results": [row, ...]}``; a row has
        ``variant``, ``prompt_len``, ``gen_len``, the medians of :func:`time_generation`,
        ``beyond_context`` and the raw ``runs``.
    """

    if baseline not in BASELINES:
        raise UsageError(f"--baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    if out is not None:
        check_destination(out, sources=[p for p in (model, baseline_model) if p])  # before minutes of timing
    kernels = _kernels(kernels)
    grid = QUICK if quick else dict(prompt_lengths=DEFAULT_PROMPT_LENGTHS, gen_lengths=DEFAULT_GEN_LENGTHS,
                                    repeats=DEFAULT_REPEATS)
    given_prompts = prompt_lengths is not None
    prompt_lengths = _lengths(prompt_lengths if given_prompts else grid["prompt_lengths"], "prompt-lengths")
    gen_lengths = _lengths(gen_lengths if gen_lengths is not None else grid["gen_lengths"], "gen-lengths")
    repeats = repeats if repeats is not None else grid["repeats"]
    if repeats < 1:
        raise UsageError(f"--repeats {repeats}: use at least 1")

    loaded, _ = load(model)
    length_notes: List[str] = []  # before loading the rest and quantizing: the prompts must fit
    prompt_lengths = _fitting_prompt_lengths(prompt_lengths, given_prompts, model_context(loaded), max_prompt_tokens,
                                             length_notes)
    variants, notes, meta = build_variants(model, baseline, baseline_model, recipe, kernels, loaded=loaded)
    notes += length_notes
    if not variants:
        raise UsageError("nothing to profile: " + "; ".join(notes))
    vocab = meta["vocab_size"]
    context = meta["context"]
    rng = np.random.default_rng(seed)
    prompts = {p: mx.array(rng.integers(0, vocab, p), dtype=mx.int32) for p in prompt_lengths}
    beyond = [(p, g) for p in prompt_lengths for g in gen_lengths if context and p + g > context]
    if beyond:
        notes.append(
            f"{len(beyond)} cell(s) run past the model's context of {context} tokens (e.g. prompt {beyond[0][0]} + "
            f"{beyond[0][1]} generated): the timing is valid, the text would not be"
        )

    memory = {v.name: _memory(_ready(v)) for v in variants}
    cells = [(p, g) for p in prompt_lengths for g in gen_lengths]
    t0 = time.perf_counter()
    runs = _time_cells(variants, prompts, cells, repeats, progress)
    results = []
    for p, g in cells:
        for v in variants:
            r = runs[(v.name, p, g)]
            row = {"variant": v.name, "kernel": v.kernel, "dtype": v.dtype, "prompt_len": p, "gen_len": g}
            row.update(_median_row(r))
            row["beyond_context"] = bool(context and p + g > context)
            row["runs"] = r
            results.append(row)

    meta.update(
        {
            "device": _device_name(),
            "mlx": mx.__version__,
            "platform": f"{platform.system()} {platform.machine()}",
            "processor": platform.processor() or platform.machine(),
            "chip": chip_name(),
            "baseline": baseline,
            "recipe": recipe,
            "repeats": repeats,
            "prompt_lengths": prompt_lengths,
            "gen_lengths": gen_lengths,
            "seed": seed,
            "wall_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    result = {"meta": meta, "notes": notes, "memory": memory, "results": results}
    if out is not None:
        write_results(result, out)
    return result


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """Markdown table of the timing medians, one row per variant and cell."""
    fp = {(r["prompt_len"], r["gen_len"]): r for r in result["results"] if r["kernel"] is None}
    lines = [
        "| variant | prompt | gen | prefill tok/s | time to first token ms | decode tok/s | ms/token | decode vs fp | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        base = fp.get((r["prompt_len"], r["gen_len"]))
        rel = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base is not None else ""
        mark = "*" if r.get("beyond_context") else ""
        lines.append(
            f"| {r['variant']} | {r['prompt_len']}{mark} | {r['gen_len']} | {r['prefill_tps']:.0f} | "
            f"{r['ttft_ms']:.1f} | {r['decode_tps']:.1f} | {r['ms_per_token']:.2f} | {rel} | "
            f"{r['peak_memory_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    """Markdown table of each variant's model memory."""
    lines = ["| variant | weights MB | bits per weight | size vs bf16 |", "|---|---|---|---|"]
    for name, m in result["memory"].items():
        lines.append(f"| {name} | {m['weight_bytes'] / 1e6:.2f} | {m['bits_per_weight']:.2f} | {m['ratio_to_bf16']:.3f}x |")
    return "\n".join(lines)


def summary_table(result: dict, prompt_len: Optional[int] = None) -> str:
    """One markdown row per variant for this machine: the figures to compare across machines.

    Args:
        prompt_len: the prompt length to report (default: the one closest to 128).
    """
    rows = result["results"]
    lengths = sorted({r["prompt_len"] for r in rows})
    p = prompt_len if prompt_len is not None else min(lengths, key=lambda x: abs(x - 128))
    g = max(r["gen_len"] for r in rows)
    meta = result["meta"]
    where = f"{meta.get('chip') or meta.get('processor')} ({meta.get('device')})"
    lines = [
        f"| machine | variant | prefill tok/s (prompt {p}) | decode tok/s ({g} generated) | ms/token | weights MB | bits per weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["prompt_len"] == p and r["gen_len"] == g:
            m = result["memory"][r["variant"]]
            lines.append(
                f"| {where} | {r['variant']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
                f"{r['ms_per_token']:.2f} | {m['weight_bytes'] / 1e6:.2f} | {m['bits_per_weight']:.2f} |"
            )
    return "\n".join(lines)


def chip_name() -> str:
    """The processor's marketing name where the system tells it (e.g. "Apple M2 Pro" on macOS)."""

    try:
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or platform.machine()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def plot(result: dict, path: Optional[str] = None):
    """A figure with prefill and decode tokens/s by prompt length, and model memory.

    Decode speed is drawn for the longest generation length. Returns the
    matplotlib ``Figure``; with ``path`` it is also saved as a PNG.
    """
    # lazy: matplotlib costs 0.5 s at import; only plots need it
    import matplotlib.pyplot as plt

    rows = result["results"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    prompts = sorted({r["prompt_len"] for r in rows})
    g_max = max(r["gen_len"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(prompts))
    for i, v in enumerate(variants):
        pre = [np.median([r["prefill_tps"] for r in rows if r["variant"] == v and r["prompt_len"] == p]) for p in prompts]
        dec = [next(r["decode_tps"] for r in rows if r["variant"] == v and r["prompt_len"] == p and r["gen_len"] == g_max)
               for p in prompts]
        axes[0].bar(x + i * width, pre, width, label=v)
        axes[1].bar(x + i * width, dec, width, label=v)
    for ax, title in ((axes[0], "prefill (prompt tokens/s)"), (axes[1], f"decode (tokens/s, {g_max} generated)")):
        ax.set_xticks(x + width * (len(variants) - 1) / 2)
        ax.set_xticklabels([str(p) for p in prompts])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    mem = result["memory"]
    names = list(mem)
    axes[2].bar(range(len(names)), [mem[n]["weight_bytes"] / 1e6 for n in names],
                color=[f"C{variants.index(n)}" if n in variants else "gray" for n in names])
    for i, n in enumerate(names):
        axes[2].text(i, mem[n]["weight_bytes"] / 1e6, f"{mem[n]['bits_per_weight']:.2f} b/w", ha="center", va="bottom",
                     fontsize=8)
    axes[2].set_xticks(range(len(names)))
    axes[2].set_xticklabels(names, rotation=15, fontsize=8)
    axes[2].set_title("model weights (MB)")
    meta = result["meta"]
    fig.suptitle(f"{Path(str(meta.get('model', 'model'))).name} on {meta.get('device')} ({meta.get('platform')}), "
                 f"median of {meta.get('repeats')}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def write_results(result: dict, out: str) -> Dict[str, str]:
    """Write ``profile.json`` and ``profile.png`` as the directory ``out``; return their paths.

    ``out`` follows mlxqat's destination rule: new, empty, or an earlier output
    (replaced atomically, with a manifest like every mlxqat output).
    """
    # lazy: matplotlib costs 0.5 s at import; only plots need it
    import matplotlib.pyplot as plt


    out_dir = Path(out)
    fig = plot(result)
    try:
        with atomic_dir(out_dir) as tmp:
            with open(tmp / "profile.json", "w") as f:
                json.dump(result, f, indent=1)
            fig.savefig(tmp / "profile.png", format="png", dpi=110)
            write_manifest(tmp, {}, kind="profile")
            umask = os.umask(0)
            os.umask(umask)
            for path in tmp.iterdir():  # temporary files are created private; results are not
                os.chmod(path, 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
    finally:
        plt.close(fig)
    return {"json": str(out_dir / "profile.json"), "png": str(out_dir / "profile.png")}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mlxqat.profile`` (lengths and kernels are checked by :func:`profile_model`)."""
    p = ArgumentParser(
        prog="python -m mlxqat.profile",
        description="Prefill/decode tokens/s, latency and memory: full precision vs int4 on MLX's kernel and ours.",
    )
    p.add_argument("--model", default=None, help="Model directory or Hugging Face id (default: the embedded stdlib model).")
    p.add_argument("--baseline", choices=BASELINES, default="fp16",
                   help="Full-precision rows' dtype (float32 on CPU), or none (default: fp16).")
    p.add_argument("--baseline-model", default=None, help="Full-precision original of a quantized --model.")
    p.add_argument("--recipe", default="int4", help="Recipe to quantize a full-precision --model with (default: int4).")
    p.add_argument("--prompt-lengths", action=_LengthsAction, default=None,
                   help="Comma-separated prompt lengths in tokens, each one generate would take (default: "
                        "32,128,512 without those beyond the model's context).")
    p.add_argument("--gen-lengths", action=_LengthsAction, default=None,
                   help="Comma-separated generation lengths, each at least 2 (default: 32,128).")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help=f"Timed runs per cell; medians are reported (default: {DEFAULT_REPEATS}).")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="The longest prompt, as generate's --max-prompt-tokens (default: what fits the model's "
                        "context).")
    p.add_argument("--kernels", default="mlx,mlxqat", help="Quantized kernels to compare (default: mlx,mlxqat).")
    p.add_argument("--seed", type=non_negative_int, default=0, help="Seed of the random prompt tokens.")
    p.add_argument("--out", default="profile-out", help="Directory for profile.json and profile.png.")
    p.add_argument("--quick", action="store_true",
                   help="For what is not given: prompt lengths 32,128, 16 generated tokens, 2 repeats.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    return p


@command(interrupted="[interrupted: nothing written]")
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m mlxqat.profile``; returns the exit status (2: bad input, 130: Ctrl-C)."""
    # lazy: matplotlib costs 0.5 s at import; only plots need it
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    args = build_parser().parse_args(argv)
    result = profile_model(**vars(args))
    print(format_table(result))
    print()
    print(memory_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {Path(args.out) / 'profile.json'} and {Path(args.out) / 'profile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
