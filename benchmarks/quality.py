"""Quality benchmark: mlxqat QAT against what a user has today, side by side in one run.

    tools/with-blas python benchmarks/quality.py            # the embedded reference model, full table
    tools/with-blas python benchmarks/quality.py --model PATH_OR_HF_ID --data corpus/ --quick

For every setting (int4 g64, q4_0, int3 g64, int2 g64, a sensitivity-allocated ``mixed`` recipe
and the ``mobile`` schema) every applicable method quantizes the same full-precision model with
the same calibration data and the same number of optimizer steps: round-to-nearest
(``mlxqat.convert.quantize_rtn``), mlx-lm's GPTQ, AWQ and DWQ (``mlx_lm.quant`` as libraries),
and mlxqat QAT in its three modes (``mlxqat.training.qat.quantize_qat``, what ``python -m mlxqat.train``
runs, with the recipe's defaults): all weights, scales only, and QA-LoRA.

Each result is measured on held-out text (perplexity, KL to the full-precision model, top-1
agreement), on out-of-domain text (``pydoc_data``'s documentation prose) and by its storage (bits
per weight, bytes). ``gap recovered`` is ``(ppl_RTN - ppl_method) / (ppl_RTN - ppl_full)`` at the
same setting. On a CPU every quantized model computes through the same product
(``mlxqat.kernels.use_dequantized_matmul``). Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``
(default ``benchmarks/results/quality``; ``quality_report.py`` writes them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent.parent

import mlxqat  # noqa: E402
from mlxqat import mixed, quant, recipes  # noqa: E402
from mlxqat.convert import block_count, head_path, quantize_rtn  # noqa: E402
from mlxqat.data import build_dataset, model_context, split_selection, spread, stdlib_windows  # noqa: E402
from mlxqat.evaluate import evaluate, gap_recovered  # noqa: E402
from mlxqat.footprint import memory_report  # noqa: E402
from mlxqat.heldout import heldout_windows  # noqa: E402
from mlxqat.kernels import use_dequantized_matmul  # noqa: E402
from mlxqat.profile import chip_name  # noqa: E402
from mlxqat.training.qat import EVAL_WINDOWS, RECIPE_DEFAULTED, SELECT_WINDOWS, qat_args, quantize_qat, shared_student  # noqa: E402
from mlxqat.training.args import TrainingArgs  # noqa: E402
from mlxqat.recipes import QAT_DEFAULTS, LayerSpec, Recipe  # noqa: E402
from mlxqat.training.teacher import CachedTeacher  # noqa: E402
from mlxqat.storage.load import load  # noqa: E402
from quality_llamacpp import llamacpp_rows  # noqa: E402  (beside this file)
from quality_report import write_outputs  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"

# ---------------------------------------------------------------------------
# Settings, methods and budgets
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    label: str  # what the table shows
    bits: Optional[int] = None  # uniform affine settings: what GPTQ / AWQ / DWQ take
    group_size: Optional[int] = None
    recipe: Optional[str] = None  # a built-in recipe (non-uniform-affine formats)
    budget_bpw: Optional[float] = None  # mixed / mobile: allocated from measured sensitivity


SETTINGS = {
    "int4": Setting("int4", "int4 g64", 4, 64, recipe="int4"),
    "q4_0": Setting("q4_0", "q4_0 (g32 symmetric)", recipe="q4_0"),
    "int3": Setting("int3", "int3 g64", 3, 64, recipe="int3"),
    "int2": Setting("int2", "int2 g64", 2, 64, recipe="int2"),
    "mixed": Setting("mixed", "mixed (sensitivity, 3.0 bpw budget)", budget_bpw=3.0),
    "mobile": Setting("mobile", "mobile (channel-wise, int8 act, 2.6 bpw budget)", budget_bpw=2.6),
}

METHODS = ("RTN", "GPTQ", "AWQ", "DWQ", "QAT", "QAT scales", "QAT LoRA")
NOT_APPLICABLE = {
    # (method, setting): why it is not run
    ("GPTQ", "q4_0"): "mlx-lm GPTQ makes affine scales only (no symmetric Q4_0)",
    ("AWQ", "q4_0"): "mlx-lm AWQ makes affine scales only (no symmetric Q4_0)",
    ("DWQ", "q4_0"): "DWQ trains scales and biases independently, which leaves Q4_0's symmetric format",
    ("QAT scales", "q4_0"): "learned biases leave Q4_0's symmetric format (QAT trains the weights instead)",
    ("QAT LoRA", "q4_0"): "QA-LoRA merges into the biases, which leaves Q4_0's symmetric format",
    ("GPTQ", "mixed"): "mlx-lm GPTQ takes one bit width for all layers",
    ("AWQ", "mixed"): "mlx-lm AWQ takes one bit width for all layers",
    ("GPTQ", "mobile"): "mlx-lm GPTQ has no channel-wise or activation quantization",
    ("AWQ", "mobile"): "mlx-lm AWQ has no channel-wise or activation quantization",
    ("DWQ", "mobile"): "mlx-lm DWQ has no activation quantization and would break channel-wise scales",
    ("QAT scales", "mobile"): "per-group learned scales would break channel-wise quantization",
    ("QAT LoRA", "mobile"): "QA-LoRA's per-group bias deltas would break channel-wise quantization",
}

# The QAT modes (TrainingArgs fields; steps/batch/seq come from the budget, learning rates,
# warmup and learned scales from the recipe: mlxqat.recipes.QAT_DEFAULTS via mlxqat.training.qat.qat_args).
QAT_ARGS = {"QAT": dict(trainable="all"), "QAT scales": dict(trainable="scales"), "QAT LoRA": dict(trainable="lora")}
# mlx-lm DWQ's learning rate per bit width (constant, Adam, as mlx_lm.quant.dwq's main): the best
# of 1e-6 / 1e-5 / 1e-4 measured on the reference model, so the baseline is DWQ at its best.
DWQ_LR = {4: 1e-5, 3: 1e-5, 2: 1e-4}
# Bit widths the mixed/mobile allocations choose from (wider ones are never picked at 2.6-3 bpw).
SENSITIVITY_BITS = (2, 3, 4)
# Windows that set static activation scales (mlxqat.calibrate) where a recipe asks.
CALIBRATION_WINDOWS = 16
# Kinds of held-out text (mlxqat.heldout) every row is measured on besides its training text's test split;
# none is trained or selected on. "chat" needs a chat template (left out where the model has none).
HELD_OUT_KINDS = ("prose", "code", "docs", "chat")


@dataclass
class Budget:
    steps: int  # optimizer steps of every training method (DWQ and QAT)
    batch_size: int  # windows per step
    seq_len: int  # tokens per window
    eval_windows: int  # held-out windows (in-domain)
    ood_windows: int  # held-out windows of each other kind of text (mlxqat.heldout)
    select_windows: int  # validation windows QAT picks its best step on
    select_every: int  # steps between those checks
    sensitivity_windows: int  # windows of the sensitivity pass
    awq_windows: int  # AWQ calibration windows (the first of the training windows)
    gptq_windows: int  # GPTQ calibration windows (the first of the training windows)
    awq_grid: int = 20  # AWQ's search points per scale and clip search (mlx-lm's n_grid, default 20)
    settings: Tuple[str, ...] = tuple(SETTINGS)
    methods: Tuple[str, ...] = METHODS
    # (method, setting) pairs left out for time (asking for the method with --methods runs it everywhere)
    leave_out: Tuple[Tuple[str, str], ...] = ()
    # Learning-rate trials of every training method (DWQ and each QAT mode alike): multiples of the
    # method's own rate; each trial trains from scratch and the lowest KL on the selection windows is kept.
    lr_trials: Tuple[float, ...] = (1.0,)


FULL = Budget(steps=100, batch_size=8, seq_len=256, eval_windows=64, ood_windows=32,  # the job's training defaults,
              select_windows=SELECT_WINDOWS, select_every=TrainingArgs().log_every,  # and its best-step selection
              sensitivity_windows=4, awq_windows=32, gptq_windows=128,
              leave_out=(("QAT scales", "int3"), ("QAT LoRA", "int3"), ("QAT scales", "mixed"), ("QAT LoRA", "mixed")))
QUICK = Budget(steps=12, batch_size=4, seq_len=128, eval_windows=12, ood_windows=8, select_windows=4,
               select_every=6, sensitivity_windows=4, awq_windows=8, gptq_windows=16, settings=("int4", "int2", "mixed", "mobile"))


def load_data(tokenizer, data: Optional[str], budget: Budget, seq_len: int, max_context, teacher=None) -> dict:
    """Training, selection and held-out windows, each (n, seq_len + 1); ``held``: ``{kind: windows}`` of
    :mod:`mlxqat.heldout` text (``chat``: conversations with ``teacher``'s own replies, where it has a template)."""
    n_train = budget.steps * budget.batch_size
    if data is None:  # the windows python -m mlxqat.train trains on (mlxqat.data.stdlib_windows)
        train_w = stdlib_windows(tokenizer, "train", seq_len, n_train, oversample=4)
        # the windows the job picks its best step on: set aside from its table's validation windows
        select_w = split_selection(stdlib_windows(tokenizer, "validation", seq_len, EVAL_WINDOWS + budget.select_windows),
                                   budget.select_windows)[1]
        eval_w = stdlib_windows(tokenizer, "test", seq_len, budget.eval_windows)
        source = "CPython standard library source (mlxqat.stdlib_data splits: train / validation / test)"
    else:
        ds = build_dataset(data, tokenizer, seq_len, max_context=max_context)
        if len(ds.train) < n_train + budget.select_windows:
            raise ValueError(
                f"{data} gives {len(ds.train)} training windows of {seq_len} tokens; the budget needs "
                f"{n_train + budget.select_windows} (steps x batch + selection): add data or use --quick"
            )
        order = np.random.default_rng(0).permutation(len(ds.train))
        train_w = ds.train[np.sort(order[:n_train])]
        select_w = ds.train[np.sort(order[n_train : n_train + budget.select_windows])]
        eval_w = spread(ds.val, budget.eval_windows)
        source = f"{data} (hash split: 95% train / 5% held out)"
    held = heldout_windows(tokenizer, seq_len, budget.ood_windows, kinds=HELD_OUT_KINDS, model=teacher)
    return dict(train=train_w, select=select_w, eval=eval_w, held=held, source=source,
                ood_source="held-out text of other kinds (mlxqat.heldout: " + ", ".join(held) + "), none of it trained on")


def stored(model: nn.Module, dtype) -> dict:
    """Round the floating parameters to the dtype the model is saved in (so we measure what ships);
    its bits per weight and bytes (:func:`mlxqat.footprint.memory_report`). The model keeps computing in float32."""
    model.set_dtype(dtype)
    report = memory_report(model)
    model.set_dtype(mx.float32)
    return {"bpw": report.bits_per_weight, "bytes": report.weight_bytes}


# ---------------------------------------------------------------------------
# Methods: each quantizes a fresh float32 model in place; (model, info for the JSON)
# ---------------------------------------------------------------------------


@dataclass
class Job:
    """What every method gets: the setting, its recipe, the data, the shared teacher and the budget."""
    setting: Setting
    recipe: Recipe
    data: dict
    teacher: CachedTeacher
    budget: Budget
    seq_len: int
    model_type: str
    progress: bool
    scale_dtype: str  # what scales and biases are stored in (the model's float dtype), as the job stores them
    lr_scale: float = 1.0  # this trial's multiple of the method's learning rate (Budget.lr_trials)


def run_rtn(m, job: Job):
    calib = job.data["train"][:CALIBRATION_WINDOWS] if any(s.act_bits for s in job.recipe.specs()) else None
    return quantize_rtn(m, job.recipe, calib), None


def _mlx_lm_gptq():
    """mlx-lm's ``gptq_quantize`` packing with ``mlxqat.quant`` (the same affine format).

    mlx-lm's own packer asserts bits in {2, 4, 8}; this copy of the function
    reads ``quantize`` from its own globals, so 3 bits work and nothing in
    ``mlx_lm`` is changed.
    """
    from mlx_lm.quant import gptq

    def pack(w, bits, scales, biases):
        return quant.quantize_learned(w, scales, biases, bits, w.shape[-1] // scales.shape[-1])

    f = gptq.gptq_quantize
    return types.FunctionType(f.__code__, dict(f.__globals__, quantize=pack), f.__name__, f.__defaults__, f.__closure__)


def run_gptq(m, job: Job):
    s, b = job.setting, job.budget
    _mlx_lm_gptq()(m, mx.array(job.data["train"][: b.gptq_windows, :-1]), s.bits, s.group_size,
                   fallback_bits=s.bits, fallback_group_size=s.group_size, batch_size=b.batch_size)
    return m, None


def run_awq(m, job: Job):
    from mlx_lm.quant import awq

    s = job.setting
    awq.awq_quantize(m, mx.array(job.data["train"][: job.budget.awq_windows, :-1]), awq.AWQ_MODEL_CONFIGS[job.model_type],
                     group_size=s.group_size, bits=s.bits, embed_group_size=s.group_size, embed_bits=s.bits,
                     n_grid=job.budget.awq_grid)
    return m, None


def run_dwq(m, job: Job):
    from mlx_lm.quant.dwq import dwq_quantize

    head, n_layers = head_path(m), block_count(m)

    def spec(path, module):  # nn.quantize gives each layer the recipe's bits and group size
        s = job.recipe.spec_for(path, path == head, n_layers)
        return hasattr(module, "to_quantized") and s is not None and {"group_size": s.group_size, "bits": s.bits}

    nn.quantize(m, class_predicate=spec)
    if mx.default_device() == mx.cpu:
        use_dequantized_matmul(m)  # DWQ trains through the quantized layers: BLAS, not the naive CPU kernel
    # As in mlx_lm.quant.dwq's main: the norms stay trainable, dwq_quantize unfreezes scales/biases.
    b, data = job.budget, job.data
    as_items = lambda w: [(row, 0) for row in w]  # noqa: E731  (tokens, prompt offset), mlx-lm's format
    valid = data["select"][: max(b.batch_size, len(data["select"]) // b.batch_size * b.batch_size)]
    bits = min(s.bits for s in job.recipe.specs())
    opt = optim.Adam(learning_rate=DWQ_LR.get(bits, 1e-5) * job.lr_scale, bias_correction=True)
    dwq_quantize(m, lambda batch, idx, split: job.teacher(batch), opt, as_items(data["train"]), as_items(valid),
                 batch_size=b.batch_size, max_seq_length=job.seq_len + 1, seed=0, dtype=mx.float32)
    m.eval()
    return m, {"learning_rate": DWQ_LR.get(bits, 1e-5) * job.lr_scale}


def run_qat(mode: str):
    def run(m, job: Job):
        b, kw = job.budget, dict(QAT_ARGS[mode])
        if job.lr_scale != 1.0:  # this trial's multiple of every rate the recipe's defaults give the mode
            args = qat_args(job.recipe, **kw)
            kw.update(learning_rate=args.learning_rate * job.lr_scale, scale_learning_rate=args.scale_lr * job.lr_scale,
                      lora_learning_rate=args.lora_learning_rate * job.lr_scale)
        summary = quantize_qat(m, job.teacher, job.data["train"][: b.steps * b.batch_size], job.recipe,
                               select_windows=job.data["select"], scale_dtype=job.scale_dtype,
                               steps=b.steps, batch_size=b.batch_size,
                               seq_len=job.seq_len, log_every=min(b.select_every, b.steps), progress=job.progress, **kw)
        kept = tuple(kw) + RECIPE_DEFAULTED + ("steps", "batch_size", "seq_len", "scale_learning_rate")
        info = {"args": {k: v for k, v in summary["args"].items() if k in kept}, "best_step": summary["best_step"],
                "selection_kl_by_step": summary["selection_kl"], "final_loss": summary["final_loss"]}
        return mlxqat.convert(m), info

    return run


TRAINED = ("DWQ", *QAT_ARGS)  # the methods Budget.lr_trials tunes
RUN = {"RTN": run_rtn, "GPTQ": run_gptq, "AWQ": run_awq, "DWQ": run_dwq, **{k: run_qat(k) for k in QAT_ARGS}}


def build_recipe(setting: Setting, fp_model, data, budget, progress, report) -> Recipe:
    """The setting's recipe; for mixed / mobile allocated from measured sensitivity (and reported),
    or the allocation an earlier run of the same budget reported (``--resume``)."""
    if setting.recipe:
        return recipes.get(setting.recipe)
    if setting.name in report:
        return Recipe.from_dict(report[setting.name]["recipe"])
    calib = data["train"][: budget.sensitivity_windows]
    options = tuple(LayerSpec(b, -1 if setting.name == "mobile" else 64) for b in SENSITIVITY_BITS)
    t0 = time.perf_counter()
    sens = mixed.layer_sensitivity(fp_model, calib, options, progress=progress)
    seconds = time.perf_counter() - t0
    allocate = mixed.mobile_recipe if setting.name == "mobile" else mixed.mixed_recipe
    recipe = allocate(fp_model, calib, setting.budget_bpw, options=options, sensitivity=sens)
    report[setting.name] = {
        "options": [o.to_dict() for o in options], "sensitivity_kl": sens, "sensitivity_seconds": seconds,
        "proxy_rank_correlation": mixed.rank_correlation(sens, mixed.proxy_sensitivity(fp_model, calib, options)),
        "recipe": recipe.to_dict(),
    }
    return recipe


def make_budget(quick: bool, steps=None, settings=None, methods=None, overrides=None, budget=None,
                lr_trials=None) -> Budget:
    """The run's budget: FULL or QUICK with ``--steps`` / ``--settings`` / ``--methods`` / ``--budget`` applied."""
    budget = copy.deepcopy(budget or (QUICK if quick else FULL))
    fields = {f.name: f.type for f in dataclasses.fields(Budget) if f.type == "int"}
    for item in overrides or ():
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--budget {item!r}: use FIELD=N with N >= 1 and FIELD one of {sorted(fields)}")
        setattr(budget, name, int(value))
    if steps:
        budget.steps = steps
    if lr_trials:
        if any(not (x > 0 and math.isfinite(x)) for x in lr_trials):
            raise ValueError(f"--lr-trials {' '.join(map(str, lr_trials))}: use positive multiples, e.g. --lr-trials 1 2 4")
        budget.lr_trials = tuple(lr_trials)
    for given, known, attr in ((settings, SETTINGS, "settings"), (methods, METHODS, "methods")):
        if given:
            unknown = set(given) - set(known)
            if unknown:
                raise ValueError(f"unknown {attr} {sorted(unknown)}; choose from {list(known)}")
            setattr(budget, attr, tuple(given))
    if methods:
        budget.leave_out = ()
    return budget


def run(model: Optional[str] = None, data: Optional[str] = None, quick: bool = False, out: str = str(DEFAULT_OUT),
        settings: Optional[List[str]] = None, methods: Optional[List[str]] = None, steps: Optional[int] = None,
        budget_overrides: Optional[List[str]] = None, progress: bool = True, budget: Optional[Budget] = None,
        lr_trials: Optional[List[float]] = None, llamacpp: bool = False, resume: bool = False) -> dict:
    """Run the benchmark; write ``<out>.md``, ``<out>.json`` and ``<out>.png``; return the JSON dict.

    ``resume``: keep the rows of an interrupted run written to ``<out>.json`` with the same model and
    budget and measure only the missing ones (a mixed setting reuses its reported allocation)."""
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS

    t_start = time.perf_counter()
    budget = make_budget(quick, steps, settings, methods, budget_overrides, budget, lr_trials)
    earlier = _earlier_run(Path(out), model, budget) if resume else None
    if llamacpp and not ("q4_0" in budget.settings and "QAT" in budget.methods):
        raise ValueError("--llamacpp scores the q4_0 QAT model in llama.cpp: add --settings q4_0 ... and --methods QAT ...")

    teacher_model, tokenizer, config = load(model, return_config=True, full_precision=True)

    def fresh() -> nn.Module:
        """The full-precision model again, without reading the file again: a model of the teacher's
        architecture on copies of its float32 arrays. Copies, not the arrays themselves: mlx-lm's GPTQ
        assigns into slices of ``weight.astype(float32)``, which for a float32 weight is the very array,
        and MLX's slice assignment changes it wherever it is shared."""
        m = shared_student(teacher_model, config)
        m.update(tree_map(lambda a: a * 1, m.parameters()))  # exact (-0.0 and NaN included), new arrays
        mx.eval(m.parameters())
        return m

    floats = {v.dtype for _, v in tree_flatten(teacher_model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    storage = mx.bfloat16 if floats == {mx.bfloat16} else mx.float16  # what the model is saved in
    teacher_model.set_dtype(mx.float32)
    teacher_model.freeze()
    ctx = model_context(teacher_model)
    seq_len = min(budget.seq_len, ctx) if ctx else budget.seq_len
    data_sets = load_data(tokenizer, data, budget, seq_len, ctx, teacher_model)
    model_type = config.get("model_type", "")
    n_params = sum(v.size for _, v in tree_flatten(teacher_model.parameters()))
    bf16_bytes = 2 * n_params
    on_cpu = mx.default_device() == mx.cpu

    teacher = CachedTeacher(teacher_model)  # every method and the evaluation read the same logits
    for name in ("train", "select", "eval"):
        teacher.prefill(data_sets[name], budget.batch_size)
    for windows in data_sets["held"].values():
        teacher.prefill(windows, budget.batch_size)

    rows: List[dict] = list(earlier["rows"]) if earlier else []
    skipped: List[dict] = []  # rebuilt by the loop below
    sensitivity_report: Dict[str, dict] = dict(earlier["mixed"]) if earlier else {}
    seconds_before = earlier["total_seconds"] if earlier else 0.0
    done = {(r["setting"], r["method"]): r for r in rows}

    def measure(name: str, setting: Optional[Setting], m: nn.Module, wall: float, extra=None) -> dict:
        st = stored(m, storage)
        if on_cpu:
            use_dequantized_matmul(m)
        m.eval()
        ev = evaluate(m, data_sets["eval"], teacher)
        held = {k: evaluate(m, w, teacher) for k, w in data_sets["held"].items()}
        off = off_domain(held)
        row = {"setting": setting.name if setting else "fp", "setting_label": setting.label if setting else "full precision",
               "method": name, "ppl": ev["ppl"], "kl": ev["kl"], "top1": ev["top1"], "ood_ppl": off["ppl"],
               "ood_kl": off["kl"], "ood_top1": off["top1"], "held_out": held, "bpw": st["bpw"], "bytes": st["bytes"],
               "wall_s": wall, "ratio_bf16": st["bytes"] / bf16_bytes}
        if extra:
            row["info"] = extra
        rows.append(row)
        print(f"  {row['setting']:>6} {name:<11} ppl {row['ppl']:.4f}  kl {row['kl']:.5f}  top1 {100 * row['top1']:.2f}%  "
              f"off-domain ppl {row['ood_ppl']:.3f} kl {row['ood_kl']:.5f}  bpw {row['bpw']:.3f}  {wall:.1f} s", flush=True)
        return row

    def tune(method: str, job_for) -> Tuple[nn.Module, Optional[dict]]:
        """Run ``method``; a training method once per learning-rate trial, keeping the one with the lowest
        KL on the selection windows (as stored, as measured), never looking at the test windows."""
        trials = budget.lr_trials if method in TRAINED and len(budget.lr_trials) > 1 else (1.0,)
        best, tried = None, []
        for lr_scale in trials:
            m, extra = RUN[method](fresh(), job_for(lr_scale))
            if len(trials) == 1:
                return m, extra
            stored(m, storage)
            if on_cpu:
                use_dequantized_matmul(m)
            m.eval()
            kl = evaluate(m, data_sets["select"], teacher)["kl"]
            tried.append({"lr_scale": lr_scale, **(extra or {}), "selection_kl": kl})
            print(f"    {method} learning rate x{lr_scale:g}: selection KL {kl:.5f}", flush=True)
            if best is None or kl < best[0]:
                best = (kl, m, lr_scale)
            del m
        return best[1], {"lr_scale": best[2], "trials": tried}

    def write(complete: bool) -> dict:
        """The table so far (after every row, so an interrupted run keeps what it measured), or the final one."""
        order = ["fp", *SETTINGS], ["full precision", *METHODS]
        rows.sort(key=lambda r: (order[0].index(r["setting"]), order[1].index(r["method"])))
        for r in rows:
            rtn = next((x for x in rows if x["setting"] == r["setting"] and x["method"] == "RTN"), None)
            fp = r["setting"] == "fp" or rtn is None
            r["gap_recovered"] = None if fp else _finite(gap_recovered(rtn["ppl"], r["ppl"], fp_row["ppl"]))
            r["ood_gap_recovered"] = None if fp else _finite(gap_recovered(rtn["ood_ppl"], r["ood_ppl"], fp_row["ood_ppl"]))

        result = {
            "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("quality.py") else None,
            "model": model or "embedded:stdlib-llama (mlxqat/assets/stdlib-llama)",
            "model_type": model_type,
            "parameters": n_params,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({chip_name()}), "
                       f"mlx {mx.__version__} on {mx.default_device()}",
            "budget": dataclasses.asdict(budget),
            "seq_len": seq_len,
            "data": {"train": data_sets["source"], "out_of_domain": data_sets["ood_source"],
                     "windows": {**{k: int(len(data_sets[k])) for k in ("train", "select", "eval")},
                                 **{f"held-out {k}": int(len(w)) for k, w in data_sets["held"].items()}},
                     "held_out_kinds": list(data_sets["held"]),
                     "tokens_eval": int(len(data_sets["eval"]) * seq_len),
                     "tokens_ood": int(sum(len(w) for w in data_sets["held"].values()) * seq_len)},
            "teacher_logits_seconds": teacher.seconds,
            "qat_args": QAT_ARGS,
            "qat_defaults": {str(k): dataclasses.asdict(v) for k, v in QAT_DEFAULTS.items()},
            "qat_scales_lr": {str(k): v.scales_only_learning_rate for k, v in QAT_DEFAULTS.items()},
            "dwq_lr": {str(k): v for k, v in DWQ_LR.items()},
            "fast_cpu_matmul": on_cpu,
            "mixed": sensitivity_report,
            "rows": rows,
            "llamacpp": llamacpp_result,
            "not_applicable": skipped,
            "total_seconds": seconds_before + time.perf_counter() - t_start,
            "resumed": bool(earlier),
            "complete": complete,
        }
        write_outputs(result, Path(out))
        return result

    kept_for_llamacpp = llamacpp_result = None
    print(f"full precision ({n_params / 1e6:.2f}M parameters)", flush=True)
    fp_row = done.get(("fp", "full precision"))
    if fp_row is None:  # measured as stored (rounded to its file's float type); the teacher keeps its arrays
        kept = teacher_model.parameters()
        fp_row = measure("full precision", None, teacher_model, 0.0)
        teacher_model.update(kept)
    for sname in budget.settings:
        setting = SETTINGS[sname]
        print(f"\n== {setting.label} ==", flush=True)
        t0 = time.perf_counter()
        reused = sname in sensitivity_report
        recipe = build_recipe(setting, teacher_model, data_sets, budget, progress, sensitivity_report)
        recipe_seconds = time.perf_counter() - t0  # the sensitivity pass is part of every method of the setting
        if reused:
            recipe_seconds = sensitivity_report[sname]["sensitivity_seconds"]  # as measured by the earlier run
        for method in budget.methods:
            why = NOT_APPLICABLE.get((method, sname))
            if why is None and (method, sname) in budget.leave_out:
                why = f"left out of the default run for time (`--methods \"{method}\"` runs it)"
            if method == "AWQ" and why is None and model_type not in AWQ_MODEL_CONFIGS:
                why = f"mlx-lm AWQ has no configuration for model_type={model_type!r}"
            if why:
                skipped.append({"setting": sname, "method": method, "why": why})
                continue
            def job_for(lr_scale):
                return Job(setting, recipe, data_sets, teacher, budget, seq_len, model_type, progress,
                           str(storage).rpartition(".")[2], lr_scale)

            t0 = time.perf_counter()
            if (sname, method) in done:
                if not (llamacpp and (sname, method) == ("q4_0", "QAT")):
                    continue
                # the row is kept; the model is trained again at its chosen rate for the llama.cpp files
                kept = done[(sname, method)]
                m = RUN[method](fresh(), job_for(kept["info"]["lr_scale"] if kept.get("info") else 1.0))[0]
                kept_for_llamacpp = m
                print(f"  {sname} {method}: retrained at the chosen learning rate for llama.cpp "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                continue
            m, extra = tune(method, job_for)
            measure(method, setting, m, time.perf_counter() - t0 + recipe_seconds, extra)
            if llamacpp and (sname, method) == ("q4_0", "QAT"):
                kept_for_llamacpp = m
            del m
            write(False)

    if llamacpp:
        print("\n== llama.cpp: GGUF files on the held-out windows ==", flush=True)
        llamacpp_result = llamacpp_rows(teacher_model, kept_for_llamacpp, tokenizer, config, data_sets["eval"])

    result = write(True)
    print(f"\nwrote {out}.md / .json / .png in {result['total_seconds']:.0f} s", flush=True)
    return result


def _earlier_run(out: Path, model: Optional[str], budget: Budget) -> Optional[dict]:
    """The results ``<out>.json`` holds, when they were measured on ``model`` with this budget
    (settings and methods may differ); None when there is no file; ValueError when it does not match."""
    path = Path(str(out) + ".json")
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    mine = dataclasses.asdict(budget)
    theirs = dict(earlier.get("budget") or {})
    differ = sorted(k for k in mine if k not in ("settings", "methods", "leave_out")
                    and json.loads(json.dumps(mine[k])) != theirs.get(k))
    wanted = model or "embedded:stdlib-llama (mlxqat/assets/stdlib-llama)"
    if earlier.get("model") != wanted or differ:
        raise ValueError(f"--resume: {path} was measured with model {earlier.get('model')!r} and a different budget "
                         f"({', '.join(differ) or 'same budget'}); use the same --model/--budget, or another --out")
    return earlier


def off_domain(held: Dict[str, dict]) -> dict:
    """The figures over every kind of held-out text, each kind weighing the same: mean KL and top-1,
    perplexity from the mean per-token loss."""
    nll = float(np.mean([h["nll"] for h in held.values()]))
    return {"kl": float(np.mean([h["kl"] for h in held.values()])), "top1": float(np.mean([h["top1"] for h in held.values()])),
            "nll": nll, "ppl": math.exp(nll)}


def _finite(x: float) -> Optional[float]:
    return x if x == x and math.isfinite(x) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model directory or Hugging Face id (default: the embedded stdlib model).")
    p.add_argument("--data", default=None, help="Calibration/training text (file, folder or JSONL; default: the stdlib source).")
    p.add_argument("--quick", action="store_true", help="A reduced run (fewer settings, steps and windows): a few minutes.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Output path prefix for .md, .json and .png.")
    p.add_argument("--settings", nargs="+", default=None, help=f"Subset of {list(SETTINGS)}.")
    p.add_argument("--methods", nargs="+", default=None, help=f"Subset of {list(METHODS)}.")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps of every training method.")
    p.add_argument("--budget", dest="budget_overrides", nargs="+", default=None, metavar="FIELD=N",
                   help="Change budget fields, e.g. --budget seq_len=64 eval_windows=8 (see Budget).")
    p.add_argument("--lr-trials", type=float, nargs="+", default=None, metavar="X",
                   help="Learning-rate trials of every training method, as multiples of its own rate (e.g. 1 2 4); "
                        "the trial with the lowest KL on the selection windows is kept (default: 1).")
    p.add_argument("--llamacpp", action="store_true",
                   help="Also score the q4_0 QAT model and round-to-nearest Q4_0 as GGUF files in llama.cpp (xllamacpp).")
    p.add_argument("--resume", action="store_true",
                   help="Keep the rows an interrupted run with the same model and budget wrote to <out>.json; run the rest.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bars.")
    args = p.parse_args(argv)
    try:
        run(**vars(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
