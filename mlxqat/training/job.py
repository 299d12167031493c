"""The whole QAT job, from a model directory to a quantized one: ``python -m mlxqat.train``.

    python -m mlxqat.train                      # embedded stdlib model, int4, built-in data
    python -m mlxqat.train --model DIR_OR_HF_ID --recipe int4 --data corpus/ --steps 1000 --out qat-int4/
    python -m mlxqat.train --method blockwise   # block by block, then scales end to end (less memory)

Loads the model twice (teacher and student), measures full precision and
round-to-nearest, fine-tunes the student through the quantizer, measures it
again, prints the before/after table, converts and saves an mlx-lm directory
with the table in ``mlxqat.json``. ``--method blockwise`` trains the student one
transformer block at a time first (:func:`mlxqat.training.blockwise.blockwise_qat`), then
only its scales and biases end to end. Training artifacts (checkpoints, log,
teacher cache) go to ``<out>.train/``; ``--resume`` continues from there. A run that fails before it
wrote any of them removes the ``<out>.train/`` it created (never one that was there before).

:func:`run` is the job as a function: its keyword arguments are the
command's flags (:func:`build_parser`), and :func:`main` parses them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import recipes as recipes_mod
from .._cli import ArgumentParser, command, non_negative_float, non_negative_int, positive_float, positive_int
from ..convert import convert, quantize_rtn
from ..data import (build_dataset, check_seq_len, generate_windows, model_context, split_selection, spread,
                    stdlib_windows)
from ..evaluate import evaluate, format_table, gap_recovered
from ..layers import weight_released
from ..stdlib_data import embedded_model_path
from ..storage.destinations import check_destination, check_work_dir, remove_output, work_dir
from ..storage.load import load
from ..storage.save import save
from . import blockwise, memory
from .args import TrainingArgs
from .checkpoints import LATEST, TEACHER_CACHE, latest_checkpoint, resume_point
from .options import METHODS, BlockOptions, JobOptions
from .qat import RECIPE_DEFAULTED, SELECT_WINDOWS, qat_args, quantize_qat, release_teacher, shared_student

__all__ = ["run", "main", "build_parser"]



def _master_weights(model: nn.Module) -> dict:
    """The trained full-precision weights under the original model's parameter names (none of the
    layers whose codes were frozen and weights released: their codes and scales are the model)."""

    released = {f"{name}.weight" for name, m in model.named_modules() if weight_released(m)}
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith((".scales", ".biases", ".act_scale", ".lora_a", ".lora_b", ".codes")) or k in released:
            continue
        out[k.replace(".base.", ".")] = v
    return out


def _dataset(data, tokenizer, teacher, seq_len, args, n_val, self_generate, seed):
    """``(train, validation)`` windows; ``n_val`` validation windows (evaluation and selection together)."""
    need = args.steps * args.batch_size
    ctx = model_context(teacher)
    check_seq_len(seq_len, ctx)
    if self_generate:
        print(f"sampling {self_generate} + {n_val} windows of {seq_len} tokens from the teacher ...", flush=True)
        gen = generate_windows(teacher, tokenizer, self_generate + n_val, seq_len, seed=seed)
        return gen[:self_generate], gen[self_generate:]
    if data is None:  # windows spread over the splits: many files, not the first few
        return (stdlib_windows(tokenizer, "train", seq_len, need, oversample=4),
                stdlib_windows(tokenizer, "validation", seq_len, n_val))
    ds = build_dataset(data, tokenizer, seq_len, max_context=ctx, max_val_windows=n_val)
    return ds.train, ds.val


def run(options: Optional[JobOptions] = None, **kwargs) -> dict:
    """Run QAT end to end (:func:`mlxqat.training.qat.quantize_qat`) and save the converted model to ``out``.

    Args:
        options: the job's settings (:class:`~mlxqat.training.options.JobOptions`); or give them as
            keywords, which build one (the flags of ``python -m mlxqat.train``):
        model: model directory or Hugging Face id (default: the embedded stdlib model).
        recipe: built-in recipe name.
        method: ``"qat"`` (every weight end to end) or ``"blockwise"``: each transformer block
            trained on its own to reproduce the full-precision block, then scales and biases
            end to end with frozen codes (:mod:`mlxqat.training.blockwise`; one block's training state at a time).
        data: text file, folder or JSONL (default: the Python standard library source).
        out: output mlx-lm directory; training artifacts go to ``<out>.train/``.
        resume: continue from the newest checkpoint in ``<out>.train/``.
        learn_scales: override the recipe's choice (learned scales where the format keeps them).
        scale_init: where learned scales start: ``"minmax"`` or ``"mse"`` (a per-group
            clip search; the default where scales are learned).
        scale_dtype: round scales/biases to this dtype's values so they are stored
            as float16 without loss (``None``: keep the compute dtype).
        ptq_start: start every linear layer from the best post-training quantization of it
            (:func:`mlxqat.ptq.ptq_start`: round-to-nearest, clip searches and GPTQ, whichever has the lowest
            output error on training windows); ``False``: the recipe's round-to-nearest start.
        self_generate: train on this many windows sampled from the teacher instead of data.
        eval_windows: validation windows for the before/after table.
        select_windows: further validation windows the best step is picked on (0: keep the last step).
        save_master: also save the trained full-precision weights (``master_weights.safetensors``).
        progress: show a progress bar.
        callback: called with every logged training record (e.g. to plot the loss live).
        steps_per_block, block_windows, block_batch_size, block_learning_rate,
        block_scale_learning_rate, block_target: the block phase of ``method="blockwise"``
            (:func:`mlxqat.training.blockwise.blockwise_qat`; ``block_windows`` calibration windows, spread
            over the training windows); ``None``: its defaults.
        memory_limit: refuse, before loading anything, a run whose estimated peak memory
            (:func:`mlxqat.training.memory.estimate`) exceeds this many GB, naming the settings that fit
            (``None``: the memory this machine has; ``0``: no check). The estimate is printed.
        training_kwargs: :class:`~mlxqat.training.args.TrainingArgs` fields; the learning rates and
            warmup default to the recipe's measured values (:func:`mlxqat.training.qat.qat_args`).

    Returns:
        ``{"table": {...}, "gap_recovered", "kl_reduction_vs_rtn", "training": {...}, "out": path}``;
        the gap and the KL reduction are measured from plain round-to-nearest.
    """
    t_start = time.perf_counter()
    o = options if options is not None else JobOptions.from_kwargs(**kwargs)
    base = recipes_mod.get(o.recipe, **({"scale_dtype": o.scale_dtype} if o.scale_dtype is not None else {}))
    args = qat_args(base, **o.training)
    trained = base.for_qat(args.trainable, o.learn_scales, o.scale_init)  # checks the combination now
    if o.block is not None and not any(s.learn_scales for s in trained.specs()):
        raise ValueError("--method blockwise trains learned scales end to end after the blocks; drop --no-learn-scales")
    if o.data is not None and o.self_generate:
        raise ValueError("give either --data or --self-generate, not both")
    # refuse a destination that is not ours now, not after an hour of training
    sources = [o.model if o.model is not None else embedded_model_path(), o.data]
    check_destination(o.out, sources=sources)
    work = check_work_dir(str(Path(o.out)) + ".train", sources=sources)
    resume_e2e = _resume_plan(work, o.block, o.resume)
    shape = memory.read_shape(o.model)
    check_seq_len(args.seq_len, shape.context)  # before the memory estimate, which grows with it
    check_memory(shape, args, o.method, o.block, trained, o.eval_windows + o.select_windows, o.memory_limit)
    with removed_on_failure(work):
        if resume_e2e:
            resume_point(work, args, trained.to_dict())  # a checkpoint that fits these settings, or refuse now

        teacher, tokenizer, config = load(o.model, return_config=True, full_precision=True)
        train_w, val_all = _dataset(o.data, tokenizer, teacher, args.seq_len, args, o.eval_windows + o.select_windows,
                                    o.self_generate, args.seed)
        val_w, select_w = split_selection(val_all, o.select_windows)
        print(f"data: {len(train_w)} training windows, {len(val_w)} validation windows"
              + (f" (+{len(select_w)} to pick the best step on)" if select_w is not None else "")
              + f" of {args.seq_len} tokens", flush=True)
        stored = dict(tree_flatten(teacher.parameters()))
        teacher.set_dtype(mx.float32)  # fp32 compute and master copies (fast BLAS path on CPU)
        if o.block is not None:  # blocks not trained yet stay in the checkpoint's bfloat16/float16 (same values)
            held = blockwise.hold_weights(teacher, stored)
            if held:
                print(f"block-wise: {held / 1e6:.1f}M block weights kept in the checkpoint's 16-bit type, each block "
                      "upcast to float32 when it trains", flush=True)
        del stored
        teacher.freeze()
        rows = _baselines(config, teacher, base, train_w, val_w, o.progress)
        student = shared_student(teacher, config)
        if args.teacher_top_k:
            teacher = release_teacher(teacher, train_w, val_all, args, work, progress=o.progress)

        block_summary = None
        if o.block is not None:
            block_summary = _block_phase(student, train_w, base, o, args.seed, work_dir(work) / "blockwise")
        summary = quantize_qat(student, teacher, train_w, base, select_windows=select_w, learn_scales=o.learn_scales,
                               scale_init=o.scale_init, out_dir=work, resume=resume_e2e, progress=o.progress,
                               callback=o.callback, scale_dtype=o.scale_dtype, ptq_start=o.ptq_start,
                               **dataclasses.asdict(args))
        if block_summary is not None:
            summary["block_phase"] = block_summary
        rows["QAT"] = _evaluate("QAT", student, val_w, teacher, o.progress)

        ppl_fp, ppl_rtn = rows["full precision"]["ppl"], rows["round-to-nearest"]["ppl"]
        print("\n" + format_table(rows, ppl_fp, ppl_rtn) + "\n", flush=True)
        gap = gap_recovered(ppl_rtn, rows["QAT"]["ppl"], ppl_fp)
        gap = None if gap != gap else gap  # NaN (no RTN gap to recover) is not JSON
        kl_reduction = 1 - rows["QAT"]["kl"] / rows["round-to-nearest"]["kl"] if rows["round-to-nearest"]["kl"] > 0 else None

        master = _master_weights(student) if o.save_master else None
        convert(student)
        info = {
            "training": {
                "method": o.method,
                "base_model": o.model or "embedded:stdlib-llama",
                "data": o.data or ("self-generated" if o.self_generate else "python-stdlib"),
                **{k: v for k, v in summary.items() if k not in ("losses", "val", "recipe")},
            },
            "metrics": {**rows, "gap_recovered": gap, "kl_reduction_vs_rtn": kl_reduction},
        }
        extra = {"train_log.jsonl": (work / "train_log.jsonl").read_text()} if (work / "train_log.jsonl").exists() else {}
        save(student, tokenizer, o.out, config=config, info=info, extra_files=extra, master_weights=master, sources=sources,
             title=f"QAT model ({trained.name})",
             notes="Quantization-aware training distilled from the full-precision model (`python -m mlxqat.train`).")
        print(f"saved {o.out} ({time.perf_counter() - t_start:.0f} s in all)", flush=True)
        return {"table": rows, "gap_recovered": gap, "kl_reduction_vs_rtn": kl_reduction, "training": summary, "out": str(o.out)}


@contextlib.contextmanager
def removed_on_failure(work: Path):
    """Remove the work directory ``work`` when the run fails (or is interrupted), if the run created it and
    nothing in it is worth keeping (:func:`_worth_keeping`); one that was there before is never removed."""
    existed = os.path.lexists(work)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(work) and not _worth_keeping(work):
            try:
                remove_output(work)
            except (OSError, ValueError):  # never hide the run's own error behind this one
                pass
        raise


def _worth_keeping(work: Path) -> bool:
    """Whether a work directory holds what a later run uses, or a record of training: a checkpoint of either
    phase (for ``--resume``), cached teacher targets (read again by the next run) or a log with records."""
    cache, log = work / TEACHER_CACHE, work / "train_log.jsonl"
    return ((work / "checkpoints" / LATEST).exists() or (work / "blockwise" / blockwise.STATE).exists()
            or (cache.is_dir() and any(cache.iterdir())) or (log.is_file() and log.stat().st_size > 0))


def check_memory(shape: memory.ModelShape, args, method: str, block: Optional[BlockOptions], recipe, kept_windows: int,
                 limit_gb: Optional[float]) -> memory.MemoryEstimate:
    """Print the estimated peak memory of a run on a model of ``shape`` (:func:`mlxqat.training.memory.read_shape`);
    refuse it when that exceeds ``limit_gb`` (see :func:`run`)."""
    groups = [s.group_size for s in recipe.specs() if s.group_size > 0]
    kw = dict(group_size=min(groups) if groups else 64, bits=max(s.bits for s in recipe.specs()),
              kept_windows=kept_windows if args.teacher_top_k else 0)
    if block is not None:
        kw.update(block_batch_size=block.block_batch_size, calibration_windows=block.block_windows)
    est = memory.estimate(shape, args, method=method, **kw)
    print(est.describe(), flush=True)
    limit = memory.machine_memory() / memory.GB if limit_gb is None else limit_gb
    if limit and est.total > limit * memory.GB:
        fits = memory.fitting_settings(shape, args, limit * memory.GB, **kw)
        hint = ("; settings that fit: " + "; ".join(f"{flags} ({e.total / memory.GB:.1f} GB)" for flags, e in fits)
                if fits else "; no setting fits: use a machine with more memory")
        raise memory.DoesNotFit(f"this run needs about {est.total / memory.GB:.1f} GB, more than the "
                          f"{limit:.1f} GB {'limit' if limit_gb else 'this machine has'} (--memory-limit){hint}")
    return est


def _resume_plan(work: Path, block: Optional[BlockOptions], resume: bool) -> bool:
    """Whether the end-to-end phase resumes from a trainer checkpoint; refuses ``resume`` with nothing to resume.

    A block-wise run resumes its block phase (which must have a checkpoint) and then the end-to-end
    phase only if it had written one. A fresh block-wise run drops the pointer to an earlier run's
    end-to-end checkpoints, so a later ``--resume`` cannot continue one of those.
    """
    if block is None:
        return resume
    latest = work / "checkpoints" / "latest.json"
    if not resume:
        if latest.is_file() and (work / "mlxqat.json").is_file():  # our work directory (check_work_dir)
            latest.unlink()
        return False
    blockwise.resume_state(work / "blockwise")
    return latest_checkpoint(work / "checkpoints") is not None


def _block_phase(student, train_w, recipe, o: JobOptions, seed: int, out_dir: Path) -> dict:
    """Run :func:`mlxqat.training.blockwise.blockwise_qat` on ``o.block.block_windows`` windows spread over
    ``train_w``; print each block's reconstruction error before and after."""
    windows = spread(train_w, o.block.block_windows)
    print(f"block-wise QAT: {len(student.model.layers)} blocks x {o.block.steps_per_block} steps on "
          f"{len(windows)} calibration windows", flush=True)
    summary = blockwise.blockwise_qat(student, windows, recipe, learn_scales=o.learn_scales, scale_init=o.scale_init,
                                      seed=seed, out_dir=out_dir, resume=o.resume, progress=o.progress,
                                      **o.block.blockwise_kwargs())
    for r in summary["blocks"]:
        print(f"  block {r['block']}: relative reconstruction error {r['before']['rel']:.4g} -> {r['after']['rel']:.4g}"
              f" (mse {r['before']['mse']:.4g} -> {r['after']['mse']:.4g})", flush=True)
    print(f"  block phase: {summary['wall_s']:.0f} s, peak memory {summary['peak_memory_gb']:.3f} GB "
          f"(the model: {summary['resident_memory_gb']:.3f} GB)", flush=True)
    return summary


def _evaluate(name: str, model, windows, teacher, progress: bool) -> dict:
    if progress:
        print(f"evaluating {name} on {len(windows)} windows ...", flush=True)
    return evaluate(model, windows, teacher, progress=progress and name)


def _baselines(config: dict, teacher, recipe, train_w, val_w, progress: bool) -> dict:
    """Full precision and plain round-to-nearest (:func:`mlxqat.convert.quantize_rtn`) of the same bits and
    groups, fake-quantized on the teacher's own weight arrays (no copy)."""
    rows = {"full precision": _evaluate("full precision", teacher, val_w, teacher, progress)}
    rtn = shared_student(teacher, config)
    quantize_rtn(rtn, recipe, train_w, scale_dtype=None, fake_quant=True)  # the recipe's scale dtype (--scale-dtype)
    rows["round-to-nearest"] = _evaluate("round-to-nearest", rtn, val_w, teacher, progress)
    return rows


def _by_bits(name: str) -> str:
    """``"by the recipe's bit width: 2 bits 0.0001, 3 bits 4e-05, 4 bits 2e-05, ..."``"""
    values = ", ".join(f"{bits} bits {getattr(d, name):g}" for bits, d in sorted(recipes_mod.QAT_DEFAULTS.items()))
    return f"by the recipe's narrowest bit width: {values}"


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mlxqat.train``: :func:`run`'s options plus every :class:`TrainingArgs` field."""
    p = ArgumentParser(
        prog="python -m mlxqat.train",
        description="Quantization-aware training of an mlx-lm model, distilled from its full-precision self.",
    )
    p.add_argument("--model", default=None, help="Model directory or Hugging Face id (default: the embedded stdlib model).")
    p.add_argument("--recipe", default="int4", help=f"Built-in recipe: {', '.join(recipes_mod.names())}.")
    p.add_argument("--method", default="qat", choices=METHODS,
                   help="qat: train every weight end to end; blockwise: train one transformer block at a time to "
                        "reproduce the full-precision block, then scales and biases end to end (less memory).")
    p.add_argument("--data", default=None, help="Text file, folder or JSONL (default: the Python standard library source).")
    p.add_argument("--out", default="qat-out", help="Output mlx-lm directory.")
    p.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint in <out>.train/.")
    p.add_argument("--learn-scales", dest="learn_scales", action=argparse.BooleanOptionalAction, default=None,
                   help="Train scales/biases too (overrides the recipe).")
    p.add_argument("--ptq-start", dest="ptq_start", action=argparse.BooleanOptionalAction, default=True,
                   help="Start every linear layer from its best post-training quantization (round-to-nearest, clip "
                        "searches, GPTQ: the lowest output error on training windows; default). --no-ptq-start: "
                        "round-to-nearest of the recipe's scales.")
    p.add_argument("--scale-init", default=None, choices=["minmax", "mse"],
                   help="Start learned scales from min/max or from a per-group clip search that minimises the "
                        "reconstruction error (mse; implies --learn-scales; helps most at 2-3 bits).")
    p.add_argument("--scale-dtype", default="float16", help="Round scales/biases to this dtype ('none' to keep float32).")
    p.add_argument("--self-generate", type=non_negative_int, default=0,
                   help="Train on N windows sampled from the teacher (no data needed).")
    p.add_argument("--eval-windows", type=positive_int, default=128, help="Validation windows for the before/after table.")
    p.add_argument("--select-windows", type=non_negative_int, default=SELECT_WINDOWS,
                   help=f"Further validation windows the best step is picked on, by KL to the teacher "
                        f"(0: keep the last step; default: {SELECT_WINDOWS}).")
    p.add_argument("--no-save-master", dest="save_master", action="store_false", help="Don't save the full-precision trained weights.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    p.add_argument("--memory-limit", type=non_negative_float, default=None, metavar="GB",
                   help="Refuse, before any work, a run whose estimated peak memory is over this many GB and name "
                        "the settings that fit (default: this machine's memory; 0: no check).")
    _block_flags(p)
    for f in dataclasses.fields(TrainingArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "trainable":  # its default depends on --method
            p.add_argument(flag, dest=f.name, choices=f.metadata["choices"], default=None,
                           help=f.metadata["help"] + " (default: all; scales with --method blockwise)")
            continue
        if f.name in RECIPE_DEFAULTED:  # the recipe's measured value for its bit width
            p.add_argument(flag, dest=f.name, type=f.metadata["check"], default=None,
                           help=f.metadata.get("help", "").split(" (default")[0] + f" (default: {_by_bits(f.name)})")
            continue
        help_ = f.metadata.get("help", "") + f" (default: {f.default})"
        if f.type in ("bool", bool, "Optional[bool]"):  # Optional: neither flag given = None (automatic)
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:  # the field's own check: one range, enforced here and in TrainingArgs.__post_init__
            typ = f.metadata.get("check") or {"int": int, "float": float, "Optional[float]": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, choices=f.metadata.get("choices"), default=f.default,
                           help=help_)
    return p


def _block_flags(p: argparse.ArgumentParser) -> None:
    """The ``--method blockwise`` flags (:class:`~mlxqat.training.options.BlockOptions`)."""
    # (on the parser itself: an argument group would bypass ArgumentParser's flag-naming number checks)
    p.add_argument("--steps-per-block", type=positive_int, default=None,
                   help=f"Optimizer steps per block (default: {blockwise.STEPS_PER_BLOCK}).")
    p.add_argument("--block-windows", type=positive_int, default=None,
                   help=f"Calibration windows the blocks train on (default: {blockwise.BLOCK_WINDOWS}).")
    p.add_argument("--block-batch-size", type=positive_int, default=None,
                   help=f"Windows per block step (default: {blockwise.BLOCK_BATCH_SIZE}).")
    p.add_argument("--block-learning-rate", type=positive_float, default=None,
                   help=f"Peak learning rate of a block's weights (default: {blockwise.BLOCK_LEARNING_RATE:g}).")
    p.add_argument("--block-scale-learning-rate", type=positive_float, default=None,
                   help="Peak learning rate of a block's learned scales/biases (default: block learning rate / 10).")
    p.add_argument("--block-target", choices=blockwise.TARGETS, default=None,
                   help="fp: the full-precision model's hidden states; same: the full-precision block on the "
                        "quantized model's inputs (default: fp).")


@command(interrupted="interrupted; resume with --resume (from the checkpoints in <out>.train/, if any were written)")
def main(argv=None) -> int:
    """Entry point of ``python -m mlxqat.train``; returns the exit status (2: bad input, 130: Ctrl-C)."""
    args = build_parser().parse_args(argv)
    kwargs = vars(args)
    if isinstance(kwargs.get("scale_dtype"), str) and kwargs["scale_dtype"].lower() == "none":
        kwargs["scale_dtype"] = None
    run(**kwargs)
    return 0
