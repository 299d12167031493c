"""Fine-tune a quantized model on your own data and save it in its own format: ``python -m mlxqat.finetune``.

    python -m mlxqat.finetune --model int4-model/ --data data/ --out tuned/                  # QA-LoRA (default)
    python -m mlxqat.finetune --model int4-model/ --data data/ --out tuned/ --method scales   # scales and offsets
    python -m mlxqat.finetune --model int4-model/ --data data/ --out tuned/ --method full     # every weight
    python -m mlxqat.finetune --model fp-model/ --recipe int4 --data data/ --out tuned/      # quantize first (RTN)
    python -m mlxqat.finetune --model model.Q4_1.gguf --data data/ --out tuned.Q4_1.gguf    # GGUF blocks in and out

The model enters with its own codes, scales and biases (:func:`mlxqat.convert.prepare_quantized`:
nothing is re-quantized; a GGUF file's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks too, :func:`mlxqat.gguf.reader.load_gguf`),
trains on the completions of ``data`` (:mod:`mlxqat.finetune_data`, mlx-lm's layout) with
:func:`mlxqat.training.loop.train` and a masked cross-entropy, and is saved by :func:`mlxqat.save` with the input's bits, group sizes, mode and stored dtypes. The methods:

* ``lora``: group-pooled adapters (:mod:`mlxqat.lora`) that merge into the per-group offsets; the
  stored integers and scales stay byte-identical, the offsets change. Needs a free offset (affine).
* ``scales``: the scales and offsets train, the integers stay byte-identical.
* ``full``: every quantized weight trains through the quantizer (with its scales and offsets, where
  the format keeps them); the integers change, the format does not.

Trained scales and offsets compute, in every step, with the values their stored dtype holds, so what
is evaluated while training is what the saved file computes. The held-out completion loss is
measured before training, after it, and on the saved directory read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from .. import quant
from .. import recipes as recipes_mod
from .._cli import ArgumentParser, command
from ..convert import convert, layer_specs, prepare_quantized, quantize_rtn
from ..export import exact_types, export_gguf, type_from_name
from ..data import build_dataset, check_seq_len, config_context, spread
from ..evaluate import completion_loss, evaluate, masked_cross_entropy, trim_masked
from ..finetune_data import load_finetune_data
from ..gguf.blocks import EXACT_TYPES, exact_recipes
from ..gguf.format import is_gguf_file
from ..gguf.reader import load_gguf
from ..storage.destinations import check_destination, check_work_dir
from ..storage.load import load
from ..storage.save import save
from .args import TrainingArgs
from .job import removed_on_failure
from .loop import train

__all__ = ["finetune", "main", "build_parser", "METHODS"]

METHODS = ("lora", "scales", "full")
TRAINABLE = {"lora": "lora", "scales": "scales", "full": "quantized"}  # the trainer's mode of each method
# peak learning rate of what each method trains (--learning-rate); under scales it is relative: the fraction
# of each group's scale a step moves its scale and offset (TrainingArgs.scale_step), whatever the format
LEARNING_RATES = {"lora": 1e-3, "scales": 1e-4, "full": 1e-4}
DEFAULT_SEQ_LEN = 2048  # the longest example accepted, as mlx-lm's --max-seq-length (or the model's context)
VAL_BATCHES = 25
TEXT_WINDOW = 512  # tokens per window of plain-text data, unless --seq-len says otherwise
GENERAL = 2  # the mask value of a general-text token that --general-data distils from the starting model
DRIFT_WINDOWS = 16  # general-text validation windows the drift (KL to the starting model) is measured on
# TrainingArgs fields that are not flags here: the method chooses what trains and at which rate,
# and the distillation settings have no teacher to apply to
NOT_FLAGS = ("trainable", "lora_learning_rate", "temperature", "reverse_kl", "ce_weight", "teacher_top_k",
             "quant_delay", "loss_chunk")
DEFAULTS = {"steps": 100, "batch_size": 4, "warmup_steps": 5}  # TrainingArgs fields whose default differs here


def finetune_loss(model: nn.Module, inputs: mx.array, targets: mx.array, _teacher_out=None) -> mx.array:
    """Mean next-token cross-entropy over the counted (completion) tokens of a batch of masked windows."""
    inputs, next_tokens, mask = trim_masked(inputs, targets)
    total, count = masked_cross_entropy(model(inputs), next_tokens, mask)
    return total / mx.maximum(count, 1)


def keep_general_loss(start: nn.Module, weight: float) -> Callable:
    """The fine-tuning loss with general text distilled from the starting model: rows whose mask is
    :data:`GENERAL` (general-text windows mixed into the training rows) add ``weight`` x the mean KL from
    ``start`` (frozen) to the model over their tokens; task rows (mask 1) give the completion loss."""

    def loss(model: nn.Module, inputs: mx.array, targets: mx.array, _teacher_out=None) -> mx.array:
        inputs, next_tokens, mask = trim_masked(inputs, targets)
        logits = model(inputs)
        task = mask == 1
        total, count = masked_cross_entropy(logits, next_tokens, task)
        out = total / mx.maximum(count, 1)
        general = (mask == GENERAL).astype(mx.float32)
        if not bool(mx.any(general).item()):
            return out
        rows = mx.array(np.flatnonzero(np.array(mx.any(general, axis=-1))))  # only they need the start's logits
        ref = mx.stop_gradient(start(inputs[rows]).astype(mx.float32))
        lt = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
        ls = logits[rows].astype(mx.float32)
        ls = ls - mx.logsumexp(ls, axis=-1, keepdims=True)
        kl = mx.sum(mx.exp(lt) * (lt - ls), axis=-1)
        g = general[rows]
        return out + weight * mx.sum(kl * g) / mx.maximum(mx.sum(g), 1)

    return loss


def finetune_args(method: str, **training_kwargs) -> TrainingArgs:
    """The :class:`TrainingArgs` of ``method``: ``learning_rate`` is the peak rate of what it trains (default
    :data:`LEARNING_RATES`); under ``scales`` each step moves a scale and its offset by that fraction of the
    group's scale (``scale_step="relative"``, unless given); under ``full`` the scales and offsets take
    ``scale_learning_rate`` (default ``learning_rate / 10``)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    bad = sorted(set(training_kwargs) & set(NOT_FLAGS))
    if bad:
        raise ValueError(f"{bad} do not apply to fine-tuning: the method ({', '.join(METHODS)}) chooses what trains")
    kw = {**DEFAULTS, **{k: v for k, v in training_kwargs.items() if v is not None}}
    lr = kw.setdefault("learning_rate", LEARNING_RATES[method])
    if method == "lora":
        kw["lora_learning_rate"] = lr
    elif method == "scales":
        kw["scale_learning_rate"] = kw.get("scale_learning_rate") or lr
        kw.setdefault("scale_step", "relative")
    kw.setdefault("seq_len", DEFAULT_SEQ_LEN)
    return TrainingArgs(trainable=TRAINABLE[method], **kw)


def _tied_offset_linears(model: nn.Module) -> list:
    """``[(path, mode)]`` of the quantized linear layers without a free float offset per group (symmetric: the
    offset follows the scale; K-quant and zero-point: offsets on a grid); LoRA adapts linear layers only,
    embeddings stay as they are."""
    return [(p, m.spec.mode) for p, m in model.named_modules()
            if isinstance(m, nn.QuantizedLinear) and getattr(getattr(m, "spec", None), "mode", "affine")
            not in quant.FREE_OFFSET_MODES]


def load_quantized(path, recipe: Optional[str], method: str, gguf_out: bool = False):
    """``(model, tokenizer, config, stored)``: the quantized model at ``path`` (a full-precision one quantized by
    round-to-nearest with ``recipe`` first; a GGUF file's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K matrices with their own blocks) as
    fake-quant layers for ``method``, computing in float32; ``stored`` maps each parameter to the dtype the
    input stores it in. ``gguf_out``: refuse a model that no GGUF type holds exactly, layer by layer, before
    anything trains (the output will be written as GGUF blocks)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if is_gguf_file(path) and recipe is None:
        model, tokenizer, config = load_gguf(path, keep_quantized=True)
        floats = config.pop("gguf_float_layers")
        if floats:
            first = next(iter(floats))
            types = sorted(set(floats.values()))
            raise ValueError(
                f"{path}: {len(floats)} matrices are {', '.join(types)} (e.g. {first}: {floats[first]}), which "
                f"fine-tuning cannot keep in their own type (kept: {', '.join(t.name for t in EXACT_TYPES)}, Q6_K "
                f"only where 16-weight halves share a scale); pass --recipe {exact_recipes()} (or q4_k_m) to "
                "re-quantize the whole model by round-to-nearest from its dequantized weights (the output is then "
                "that type)")
    else:
        model, tokenizer, config = load(path, return_config=True)
    quantized = layer_specs(model)
    if quantized and recipe is not None:
        first = next(iter(quantized.values()))
        raise ValueError(f"{path} is already quantized ({first['bits']}-bit, group {first['group_size']}) and is "
                         f"fine-tuned in its own format; --recipe {recipe} applies to a full-precision model: drop it")
    if not quantized:
        if recipe is None:
            raise ValueError(f"{path} is not quantized; pass --recipe (e.g. int4) to quantize it by round-to-nearest "
                             "first, or pass a quantized model (mlx_lm.convert -q, or mlxqat's output)")
        quantize_rtn(model, recipes_mod.get(recipe))
    if gguf_out:
        misfits = [p for p, t in exact_types(model).items() if t is None]
        if misfits:
            first = dict(model.named_modules())[misfits[0]]
            raise ValueError(
                f"{len(misfits)} layer(s) have no exact GGUF form (e.g. {misfits[0]}: {first.bits}-bit, group "
                f"{first.group_size}; exact: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, 4-, 5- or 8-bit in groups of 32 with float16 scales), "
                "so a .gguf output would re-quantize what was trained; write an mlx-lm directory (an --out without "
                f".gguf) and export it, or start from a model quantized with recipe {exact_recipes()}")
    off_grid = [p for p, m in model.named_modules() if quant.is_quantized(m)
                and getattr(getattr(m, "spec", None), "mode", None) == "kquant"
                and not all(mx.array_equal(a, b) for a, b in zip(quant.kquant_grid(m.scales, m.biases, m.bits),
                                                                 (m.scales, m.biases)))]
    if off_grid:
        raise ValueError(f"{len(off_grid)} K-quant layers (e.g. {off_grid[0]}) have sub-block scales whose largest is "
                         "not 63 steps (Q6_K: -128) of their super-block scale (an importance-matrix quantization); "
                         "training on the K grid would change them before the first step. Fine-tune a file "
                         "quantized without an importance matrix, or pass --recipe q4_k (q5_k, q6_k, q4_k_m) to "
                         "re-quantize from its weights")
    tied = _tied_offset_linears(model)
    if tied and method == "lora":
        path, mode = tied[0]
        why = {"symmetric": "symmetric (Q4_0-style: each offset is -2^(bits-1) x its scale)",
               "kquant": "K-quants (Q4_K / Q5_K: each offset a 6-bit integer times a float16 per 256 weights; "
                         "Q6_K: no offset)",
               }.get(mode, f"in mode {mode!r} (each offset a whole number of steps)")
        raise ValueError(f"--method lora needs a free offset per group, and {len(tied)} layers (e.g. {path}) are "
                         f"{why}; use --method scales or --method full")
    stored = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    prepare_quantized(model, keep_codes=method != "full")
    model.set_dtype(mx.float32)  # float32 compute and master copies (fast on a CPU); exact for every stored value
    mx.eval(model.parameters())
    return model, tokenizer, config, stored


def restore_dtypes(model: nn.Module, stored: Dict[str, mx.Dtype]) -> None:
    """Give each parameter of a converted model back the dtype it was stored in (``stored``), in place.

    Raises:
        RuntimeError: a value the stored dtype cannot hold exactly (training keeps every value it changes
            on its stored dtype's grid, so this is a bug).
    """
    changed = []
    for k, v in tree_flatten(model.parameters()):
        dt = stored.get(k)
        if dt is None or dt == v.dtype:
            continue
        if mx.issubdtype(dt, mx.floating) and not quant.holds_exactly(dt, v):
            raise RuntimeError(f"{k}: its trained values are not {dt} values, so saving it as {dt} would change the "
                               "model; please report this bug")
        changed.append((k, v.astype(dt)))
    model.update(tree_unflatten(changed))


def read_back(directory) -> nn.Module:
    """The model saved in ``directory`` (or a GGUF file) as fine-tuning computes: its stored codes, scales and
    biases in fake-quant layers, in float32 (the numbers ``mlx_lm.load`` gives ``quantized_matmul``, or llama.cpp
    its blocks, which compute the same up to float rounding, far slower on a CPU)."""
    if is_gguf_file(directory):
        model, _, _ = load_gguf(directory, keep_quantized=True)
    else:
        model, _ = load(directory)
    prepare_quantized(model, keep_codes=True)
    model.set_dtype(mx.float32)
    return model


class ValidationLoss:
    """A training callback: the completion loss on validation windows at every log record, added to the record."""

    def __init__(self, model: nn.Module, windows: np.ndarray, batch_size: int, then: Optional[Callable] = None):
        self.model, self.windows, self.batch_size, self.then = model, windows, batch_size, then
        self.history = []

    def __call__(self, record: dict) -> None:
        self.model.eval()
        record["val_loss"] = completion_loss(self.model, self.windows, self.batch_size)["loss"]
        self.model.train()
        self.history.append((record["step"], record["val_loss"]))
        tqdm.write(f"step {record['step']}: train loss {record['loss']:.4f}, validation loss {record['val_loss']:.4f}")
        if self.then is not None:
            self.then(record)


def _losses(model, data, windows_valid, batch_size: int) -> dict:
    out = {"valid": completion_loss(model, windows_valid, batch_size)["loss"]}
    if data.test is not None:
        out["test"] = completion_loss(model, data.test, batch_size)["loss"]
    return out


def finetune(model, data, out, *, method: str = "lora", recipe: Optional[str] = None, mask_prompt: bool = True,
             val_batches: int = VAL_BATCHES, general_data=None, general_weight: float = 1.0,
             general_share: float = 0.25, resume: bool = False, progress: bool = True,
             callback: Optional[Callable[[dict], None]] = None, **training_kwargs) -> dict:
    """Fine-tune the quantized model ``model`` on ``data`` and save it to ``out`` in the same format.

    Args:
        model: a quantized mlx-lm directory (``mlx_lm.convert -q``, mlxqat's output; affine, 2-8 bits, any
            group size), a GGUF file of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K matrices (kept in their blocks), or a full-precision
            model (or any GGUF file) with ``recipe``.
        data: a directory with ``train.jsonl``, ``valid.jsonl`` and optionally ``test.jsonl``
            (:mod:`mlxqat.finetune_data`), or plain text (a file or folder: documents split by name, windows
            of ``seq_len`` tokens, default :data:`TEXT_WINDOW`, every token trained on).
        out: the output mlx-lm directory, or a ``.gguf`` file (for a model whose layers GGUF's Q4_0, Q4_1 or
            Q8_0 blocks hold exactly: a GGUF file of those types, or recipe ``q4_0`` / ``q4_1`` / ``q8_0``),
            written exactly with an Ollama ``Modelfile`` beside it (:func:`mlxqat.export.export_gguf`; the
            mlx-lm directory it is made from stays in ``<out>.train/model``); checkpoints and the training log
            go to ``<out>.train/``.
        method: ``"lora"``, ``"scales"`` or ``"full"`` (see :mod:`mlxqat.training.finetune`).
        recipe: quantize a full-precision ``model`` with this recipe (round-to-nearest) first.
        mask_prompt: the loss counts only the completions' tokens (``False``: every token).
        val_batches: validation batches evaluated at each log record (``-1``: the whole split).
        general_data: general text (a file or folder, :func:`mlxqat.data.build_dataset`) to hold the model to its
            start on: windows of it are mixed into the training rows and distilled from the starting model
            (:func:`keep_general_loss`), and the drift (KL from the starting model) is measured on its validation
            documents after training; ``None``: train on the task alone.
        general_weight: the weight of that KL beside the completion loss.
        general_share: general windows mixed in per training example.
        resume: continue from the newest checkpoint in ``<out>.train/``.
        progress: show a progress bar.
        callback: called with every logged record (``val_loss`` included).
        training_kwargs: :class:`~mlxqat.training.args.TrainingArgs` fields (``steps``, ``batch_size``,
            ``seq_len``: the longest example accepted, ``learning_rate``: of what the method trains, ...).

    Returns:
        ``{"method", "before", "after", "saved": {"valid", "test"} completion losses, "gain_kept", "drift", "training",
        "out"}``; ``saved`` is measured on ``out`` read back from disk (:func:`read_back`); ``drift`` (with
        ``general_data``) is ``{"kl_to_start", "windows"}`` on its validation windows, else None.

    Raises:
        ValueError / FileNotFoundError: bad input (named), before any training.
    """
    t_start = time.perf_counter()
    seq_len_given = training_kwargs.get("seq_len") is not None
    args = finetune_args(method, **training_kwargs)  # every setting checked before any work
    if val_batches == 0 or val_batches < -1:
        raise ValueError(f"val_batches={val_batches}: use a positive number of batches, or -1 for the whole split")
    if recipe is not None:
        recipes_mod.get(recipe)  # an unknown name is refused now, not after loading the model
    if general_data is not None:
        if not (math.isfinite(general_weight) and general_weight > 0):
            raise ValueError(f"--general-weight {general_weight}: use a positive weight, e.g. 1.0")
        if not (math.isfinite(general_share) and general_share > 0):
            raise ValueError(f"--general-share {general_share}: use a positive share of general windows, e.g. 0.25")
        if not Path(general_data).exists():
            raise FileNotFoundError(f"--general-data {general_data} does not exist")
    sources = [model, data]
    gguf_out = Path(out).suffix.lower() == ".gguf"
    check_destination(out, sources=sources, kind="file" if gguf_out else "dir")
    if gguf_out:
        type_from_name(Path(out))  # a name asking for a type mlxqat does not write is refused before training
    work = check_work_dir(str(Path(out)) + ".train", sources=sources)
    with removed_on_failure(work):
        student, tokenizer, config, stored = load_quantized(model, recipe, method, gguf_out=gguf_out)
        context = config_context(config)
        if seq_len_given:
            check_seq_len(args.seq_len, context)
        limit = args.seq_len if seq_len_given or context is None else min(args.seq_len, context)
        ds = load_finetune_data(data, tokenizer, limit, mask_prompt=mask_prompt,
                                text_window=args.seq_len if seq_len_given else min(limit, TEXT_WINDOW))
        args = dataclasses.replace(args, seq_len=ds.seq_len)  # rows are as long as the longest example
        valid = ds.valid if val_batches == -1 else ds.valid[: val_batches * args.batch_size]
        print(f"data: {len(ds.train)} training, {len(ds.valid)} validation"
              + (f", {len(ds.test)} test" if ds.test is not None else "") + f" examples of up to {ds.seq_len + 1} "
              f"tokens ({', '.join(ds.formats['train'])}); loss on "
              f"{'every token' if not mask_prompt or ds.formats['train'] == ['plain text'] else 'completions'}",
              flush=True)
        rows, loss, start, drift_windows = ds.train, finetune_loss, None, None
        if general_data is not None:
            gen = build_dataset(general_data, tokenizer, ds.seq_len)
            mixed = spread(gen.train, max(1, round(general_share * len(ds.train))))
            general_rows = np.zeros((len(mixed), 2, mixed.shape[1]), dtype=np.int32)
            general_rows[:, 0], general_rows[:, 1, 1:] = mixed, GENERAL
            rows = np.concatenate([ds.train, general_rows])
            start = load_quantized(model, recipe, "scales")[0]  # the starting model's numbers, frozen
            start.freeze()
            loss = keep_general_loss(start, general_weight)
            drift_windows = spread(gen.val, DRIFT_WINDOWS)
            print(f"general text: {len(general_rows)} windows of {general_data} mixed in, distilled from the starting "
                  f"model (weight {general_weight:g})", flush=True)
        before = _losses(student, ds, valid, args.batch_size)
        print("before: " + ", ".join(f"{k} loss {v:.4f}" for k, v in before.items()), flush=True)
        report = ValidationLoss(student, valid, args.batch_size, callback)
        summary = train(student, None, rows, None, args, loss=loss, out_dir=work, resume=resume,
                        callback=report, progress=progress and f"fine-tune ({method})")
        after = _losses(student, ds, valid, args.batch_size)
        drift = None
        if start is not None:
            student.eval()
            drift = {"kl_to_start": evaluate(student, drift_windows, start)["kl"], "windows": len(drift_windows)}
            print(f"drift on general text: KL from the starting model {drift['kl_to_start']:.5f} "
                  f"({len(drift_windows)} validation windows)", flush=True)
            del start
        convert(student)
        restore_dtypes(student, stored)
        info = {
            "finetune": {"method": method, "base_model": str(model), "data": str(data), "mask_prompt": mask_prompt,
                         "recipe": recipe, "formats": ds.formats, "args": dataclasses.asdict(args),
                         **{k: v for k, v in summary.items() if k not in ("losses",)},
                         "validation": report.history},
            "metrics": {"completion_loss_before": before, "completion_loss_after": after, "drift": drift},
        }
        extra = {"train_log.jsonl": (work / "train_log.jsonl").read_text()} if (work / "train_log.jsonl").exists() else {}
        directory = work / "model" if gguf_out else out
        save(student, tokenizer, directory, config=config, info=info, extra_files=extra, sources=sources,
             compact_scales=False, title=f"Fine-tuned model ({method})",
             notes=f"Fine-tuned with `python -m mlxqat.finetune --method {method}` on `{data}`, in the format of "
                   f"`{model}` (same bits, group sizes, mode and dtypes).")
        del student, report  # the trained model's memory, before the saved one is read back
        if gguf_out:
            export_gguf(directory, out, exact=True, name=Path(out).stem)
        saved = _losses(read_back(out), ds, valid, args.batch_size)
    key = "test" if "test" in before else "valid"
    gain = before[key] - after[key]
    kept = (before[key] - saved[key]) / gain if gain > 0 else None
    print(f"{key} completion loss: before {before[key]:.4f}, after training {after[key]:.4f}, saved file "
          f"{saved[key]:.4f}" + (f" (gain kept {100 * kept:.2f}%)" if kept is not None else ""), flush=True)
    print(f"saved {out} ({time.perf_counter() - t_start:.0f} s in all)", flush=True)
    return {"method": method, "before": before, "after": after, "saved": saved, "gain_kept": kept, "drift": drift,
            "training": summary, "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mlxqat.finetune``: :func:`finetune`'s options plus the :class:`TrainingArgs`
    fields that apply (named as ``python -m mlxqat.train`` names them)."""
    p = ArgumentParser(
        prog="python -m mlxqat.finetune",
        description="Fine-tune a quantized model on your own data (mlx-lm's train/valid/test.jsonl) and save it in "
                    "the same quantized format, with what it learned.",
    )
    p.add_argument("--model", required=True,
                   help="Quantized mlx-lm directory (mlx_lm.convert -q, or mlxqat's output), a GGUF file of Q4_0, "
                        "Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K tensors (and Q6_K as mlxqat writes it; kept in their own "
                        "blocks), or a full-precision model / any GGUF file with --recipe.")
    p.add_argument("--data", required=True,
                   help="Directory with train.jsonl, valid.jsonl and optionally test.jsonl (mlx-lm's layout), or plain "
                        f"text: a .txt/.md/.py file or a folder of them (windows of --seq-len tokens, default {TEXT_WINDOW}).")
    p.add_argument("--out", required=True,
                   help="Output mlx-lm directory (same bits, group size and mode), or a .gguf file (same block types, "
                        "a Q4_K_M file as Q4_K_M) with an Ollama Modelfile beside it.")
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="lora: group-wise adapters merged into the offsets (integers and scales unchanged); "
                        "scales: scales and offsets (integers unchanged); full: every weight through the quantizer "
                        "(default: lora).")
    p.add_argument("--recipe", default=None,
                   help=f"Quantize a full-precision --model with this recipe first ({', '.join(recipes_mod.names())}).")
    p.add_argument("--mask-prompt", dest="mask_prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="Count only the completion's (assistant's) tokens in the loss (default: on; "
                        "--no-mask-prompt trains on every token).")
    p.add_argument("--val-batches", type=int, default=VAL_BATCHES,
                   help=f"Validation batches evaluated at each log record; -1: the whole split (default: {VAL_BATCHES}).")
    p.add_argument("--general-data", default=None,
                   help="General text (a file or folder) to hold the model to its start: windows of it are mixed into "
                        "training and distilled from the starting model, and the drift is reported (default: none).")
    p.add_argument("--general-weight", type=float, default=1.0,
                   help="Weight of the general-text KL beside the completion loss (default: 1.0).")
    p.add_argument("--general-share", type=float, default=0.25,
                   help="General windows mixed in per training example (default: 0.25).")
    p.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint in <out>.train/.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    for f in dataclasses.fields(TrainingArgs):
        if f.name in NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = DEFAULTS.get(f.name, f.default)
        help_ = f.metadata.get("help", "")
        if f.name == "learning_rate":
            help_ = ("Peak learning rate of what the method trains (default: "
                     + ", ".join(f"{m} {lr:g}" for m, lr in LEARNING_RATES.items()) + ").")
            default = None
        elif f.name == "seq_len":
            help_ = (f"The longest example accepted, in tokens; a longer line is an error (default: {DEFAULT_SEQ_LEN}, "
                     "or the model's context if shorter).")
            default = None
        elif f.name == "scale_learning_rate":
            help_ = "Peak learning rate of the scales and offsets under --method full (default: learning rate / 10)."
        elif f.name == "scale_step":
            help_ = ("How far a scale or offset moves per step: relative (a fraction of its group's scale) or "
                     "absolute (default: relative under --method scales, absolute under --method full).")
            default = None
        else:
            help_ += f" (default: {default})"
        if f.type in ("bool", bool, "Optional[bool]"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            typ = f.metadata.get("check") or {"int": int, "float": float, "Optional[float]": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, choices=f.metadata.get("choices"), default=default, help=help_)
    return p


@command(interrupted="interrupted; resume with --resume (from the checkpoints in <out>.train/, if any were written)")
def main(argv=None) -> int:
    """Entry point of ``python -m mlxqat.finetune``; returns the exit status (2: bad input, 130: Ctrl-C)."""
    kwargs = vars(build_parser().parse_args(argv))
    finetune(kwargs.pop("model"), kwargs.pop("data"), kwargs.pop("out"), **kwargs)
    return 0
