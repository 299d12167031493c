"""Export a converted model: GGUF (llama.cpp, Ollama, LM Studio), mlx-lm directory, unquantized weights.

    python -m mlxqat.export qat-int4/ --format gguf --out model-q4_0.gguf [--type q4_0|q4_1|q5_0|q5_1|q8_0|f16] [--exact]
    python -m mlxqat.export full-precision/ --format gguf --type q4_k_m --imatrix imatrix.gguf --out model.gguf
    ollama create my-model -f model-q4_0.Modelfile      # the Modelfile written beside the GGUF
    python -m mlxqat.export qat-int4/ --format mlx  --out mlx-dir/
    python -m mlxqat.export qat-int4/ --format fp16 --out unquantized/
    python -m mlxqat.export qat-q4_0/ --format hf --out hf-dir/    # transformers / vLLM (compressed-tensors)
    python -m mlxqat.verify mlx-dir/

The source is a directory written by :func:`mlxqat.save` or any local mlx-lm
directory. Every export prints a memory report (bytes on disk, bits per
weight, size relative to bf16). Files appear at the destination only once
complete: an interrupted export leaves nothing there.

A GGUF export also writes an Ollama ``Modelfile`` beside the file (``model-q4_0.Modelfile``:
``FROM``, the chat ``TEMPLATE`` when the chat format is one :mod:`mlxqat.gguf.ollama` writes and
checks, the end-of-turn stop tokens) and prints the ``ollama create`` line.

GGUF exactness: layers quantized by the recipes ``q4_0``, ``q4_1`` and
``q8_0`` are repacked into GGUF blocks bit for bit. Anything else is
re-quantized; the export then warns with the KL divergence that adds (measured
between the MLX model and the re-quantized weights, on fixed token
sequences), or, with ``exact=True`` / ``--exact``, refuses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import quant
from ._cli import ArgumentParser, command
from .convert import dequantize, recipe_of
from .evaluate import kl_probe_inputs, mean_kl
from .footprint import memory_report
from .gguf import imatrix as imatrix_file
from .gguf import ollama
from .gguf import writer as ge
from .gguf.blocks import EXACT_TYPES, WEIGHTED_TYPES, exact_recipes
from .hf import write_hf
from .recipes import names as recipe_names
from .gguf.format import is_gguf_file
from .gguf.reader import load_gguf
from .gguf.tokenizer import adds_bos_eos, end_of_turn, read_tokenizer
from .storage.checks import PathLike, safetensors_header
from .storage.destinations import DestinationError, atomic_path, check_destination
from .storage.load import check_config, load
from .storage.manifest import MANIFEST, MASTER_FILE, Manifest, is_mlxqat_output
from .storage.save import save

FORMATS = ("gguf", "mlx", "fp16", "hf")


class ExportWarning(UserWarning):
    """An export that is not exact (re-quantized weights, dropped activation quantization)."""


def _open_source(src_dir: PathLike, out_dir: PathLike, keep_blocks: bool = False):
    """``(src, model, tokenizer, config)`` of an export's source, once ``out_dir`` is known to be writable;
    ``keep_blocks``: a GGUF file's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K matrices stay quantized layers with their own blocks."""
    src = Path(src_dir)
    config = None if is_gguf_file(src) else check_config(src)  # a GGUF file: config from its metadata
    check_destination(out_dir, sources=[src])  # fail fast, before loading
    if keep_blocks and config is None:
        model, tokenizer, loaded_config = load_gguf(src, keep_quantized=True)
        loaded_config.pop("gguf_float_layers")
    else:
        model, tokenizer, loaded_config = load(src, return_config=True)
    return src, model, tokenizer, loaded_config if config is None else config


def _source_info(src: Path) -> dict:
    """The source's manifest entries to carry over (training, metrics, ...); the recipe is read from the
    loaded layers instead (:func:`mlxqat.convert.recipe_of`)."""
    if not (src / MANIFEST).exists():
        return {}
    info = dict(Manifest.read(src).info)
    info.pop("recipe", None)
    return info


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr)


# GGUF type names as llama.cpp's files carry them (model-Q4_K_S.gguf), whether mlxqat writes the type or not
_TYPE_NAME = re.compile(r"(?<![a-z0-9])(iq[1-4]_(?:xxs|xs|nl|s|m)|q[2-8]_k(?:_[sml])?|q[2-8]_[01]|tq[12]_0)(?![a-z0-9])")


def type_from_name(path: Path) -> Optional[str]:
    """The GGUF type a file name asks for (``model-q4_0.gguf`` -> ``q4_0``), if exactly one.

    Raises:
        ValueError: the name asks for a type mlxqat does not write (``model-Q4_K_S.gguf``).
    """
    named = set(_TYPE_NAME.findall(path.stem.lower()))
    foreign = sorted(named - set(ge.QTYPES) - set(ge.MIXES))
    if foreign:
        raise ValueError(f"{path.name} names GGUF type {foreign[0]}, which mlxqat does not write; pass --type (one of "
                         f"{', '.join(sorted(ge.QTYPES) + sorted(ge.MIXES))}) or name the file for the type it holds")
    parts = set(re.split(r"[^a-z0-9_]+", path.stem.lower()))
    found = [t for t in list(ge.QTYPES) + list(ge.MIXES) if t in parts or any(p.endswith("_" + t) for p in parts)]
    return found[0] if len(found) == 1 else None


def exact_types(model: nn.Module) -> Dict[str, Optional[str]]:
    """``{quantized layer: the GGUF type that holds it exactly}`` (the first of
    :data:`~mlxqat.gguf.blocks.EXACT_TYPES` that does: ``q4_0``, ``q5_0``, ``q8_0``, ``q4_1``, ``q5_1``), ``None``
    for a layer none holds (it would be re-quantized)."""
    out: Dict[str, Optional[str]] = {}
    for path, m in model.named_modules():
        if quant.is_quantized(m):
            out[path] = None
            if getattr(m, "mode", "affine") != "affine":
                continue
            scales, biases = np.array(m.scales.astype(mx.float32)), np.array(m.biases.astype(mx.float32))
            for qtype, (bits, name) in EXACT_TYPES.items():
                if bits != m.bits:
                    continue
                blocks, _ = ge.exact_blocks(np.array(m.weight), scales, biases, m.bits, m.group_size, qtype)
                if blocks is not None:
                    out[path] = name
                    break
    return out


def _auto_qtype(plan_model: nn.Module) -> str:
    """The GGUF type that holds most of the model's quantized layers exactly (``q4_0``'s 8-bit head,
    one layer among many, leaves the file Q4_0, as llama.cpp names its own files by their main type); a model
    quantized with the recipe of a mix (``q4_k_m``) is that mix."""
    recipes = {getattr(getattr(m, "recipe", None), "name", None) for _, m in plan_model.named_modules()
               if quant.is_quantized(m)}
    if len(recipes) == 1 and next(iter(recipes)) in ge.MIXES:
        return next(iter(recipes))
    if not (len(recipes) == 1 and next(iter(recipes)) in recipe_names()):  # not one built-in recipe: a mix, maybe
        for mix, (main, _) in ge.MIXES.items():
            plan = ge.plan_tensors(plan_model, main, plan_model.args.model_type, mix=mix)
            if all(t.exact for t in plan):
                return mix
    counts: Dict[str, int] = {}
    for name in exact_types(plan_model).values():
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise ValueError(
            f"no GGUF type holds this model's weights exactly (exact: recipes {exact_recipes('and')}); "
            f"pass --type {exact_recipes()} or f16 to re-quantize (the export reports the KL it adds)"
        )
    return max(counts, key=counts.get)


def export_gguf(
    src_dir: PathLike,
    out_path: PathLike,
    qtype: str = "auto",
    exact: bool = False,
    *,
    name: Optional[str] = None,
    modelfile: bool = True,
    imatrix: Optional[PathLike] = None,
    verbose: bool = True,
) -> dict:
    """Write a GGUF file (llama.cpp, Ollama, LM Studio) from a model directory.

    Args:
        src_dir: a directory saved by :func:`mlxqat.save`, or any mlx-lm directory.
        out_path: the ``.gguf`` file to write (replaced atomically).
        qtype: ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``, ``q4_k``, ``q5_k``, ``q6_k``, ``f16``,
            ``bf16``, ``f32``; ``q4_k_m`` (llama.cpp's mix: each tensor the type llama.cpp's rule gives it); or
            ``auto``: the type the file name names (``model-q4_0.gguf``), else the mix of the recipe the
            model was quantized with, else the type that holds the quantized layers exactly.
        exact: refuse (``ValueError``) unless every tensor dequantizes to exactly
            the MLX weight and nothing the MLX model computes is dropped.
        name: ``general.name`` in the file (default: the source folder's name), and the
            Ollama model name the printed ``ollama create`` line suggests.
        modelfile: also write an Ollama ``Modelfile`` beside the file
            (:func:`mlxqat.gguf.ollama.modelfile_path`), replacing only one mlxqat wrote.
        imatrix: an importance matrix file (``python -m mlxqat imatrix``, or llama.cpp's ``llama-imatrix``):
            the tensors that are quantized or re-quantized use llama.cpp's importance-weighted algorithms
            (repacked exact tensors are unchanged).
        verbose: print the plan summary, warnings, the memory report and the ``ollama create``
            line to stderr.

    Returns:
        ``{"path", "qtype", "exact", "kl", "tensors": [...], "memory": {...}, "modelfile",
        "chat_format", "ollama_create"}``; ``kl`` is the measured mean per-token KL (nats) of a
        non-exact export, else 0; ``modelfile`` (its path) and ``ollama_create`` are None without
        one, ``chat_format`` None where no TEMPLATE was written.

    Raises:
        GGUFExportError: an architecture or tokenizer GGUF cannot express, or
            ``exact=True`` for a model whose weights need re-quantizing.
        DestinationError: ``out_path``, or the Modelfile beside it, holds something mlxqat did not write.
        FileNotFoundError: no config, or no tokenizer.json in ``src_dir``.
    """
    src = Path(src_dir)
    out = Path(out_path)
    if is_gguf_file(src):
        raise ValueError(
            f"{src} is already a GGUF file; to re-quantize it, write it as an mlx-lm directory first "
            f"(python -m mlxqat.export {src} --format mlx --out DIR), then train or export DIR"
        )
    config = check_config(src)
    inputs = [src] + ([Path(imatrix)] if imatrix is not None else [])
    check_destination(out, sources=inputs, kind="file")  # fail fast, before any work
    modelfile_out = _check_modelfile(out, src) if modelfile else None
    ge.arch_spec(config["model_type"])  # fail fast, before loading weights
    read_tokenizer(src)  # fail fast on a missing or unsupported tokenizer
    im = imatrix_file.load(imatrix) if imatrix is not None else None
    model, tokenizer = load(src)
    if qtype == "auto":
        qtype, why = type_from_name(out), "named in the file name"
        if qtype is None:
            qtype, why = _auto_qtype(model), "holds the quantized weights exactly"
        _say(verbose, f"GGUF type {qtype} ({why})")
    if qtype not in ge.QTYPES and qtype not in ge.MIXES:
        raise ValueError(f"qtype={qtype!r} is not one of {sorted(ge.QTYPES) + sorted(ge.MIXES)} or 'auto'")
    mix = qtype if qtype in ge.MIXES else None
    gt = ge.MIXES[qtype][0] if mix else ge.QTYPES[qtype]
    importance = None
    if im is not None:
        importance = {n: im.importance(n) for n in im.sums}
        names = {ge.gguf_base_name(model, p) for p, _ in model.named_modules()}
        if not any(n.rsplit(".", 1)[0] in names for n in importance):
            raise ValueError(f"the importance matrix {imatrix} names none of this model's tensors "
                             f"(e.g. {next(iter(importance), 'nothing')}); compute one for this model with "
                             f"python -m mlxqat imatrix --model {src} --out imatrix.gguf")
    plan = ge.plan_tensors(model, gt, model.args.model_type, mix=mix, importance=importance)
    if im is not None:
        used = sum("importance-weighted" in t.note for t in plan)
        blocks = [t for t in plan if t.name.startswith("blk.") and not t.exact and t.qtype in WEIGHTED_TYPES]
        missing = [t.name for t in blocks if t.name not in importance]
        extra = sorted(set(importance) - {t.name for t in plan})
        _say(verbose, f"importance matrix {imatrix}: used for {used} of the {len(blocks)} block matrices quantized "
                      "here" + ("" if plan and not all(t.exact for t in plan) else
                                " (every tensor was repacked exactly: nothing to weight)"))
        if missing or extra:
            warnings.warn(f"the importance matrix {imatrix} does not fit this model exactly: "
                          + (f"no entry for {len(missing)} matrices (e.g. {missing[0]}: quantized without one)"
                             if missing else "")
                          + ("; " if missing and extra else "")
                          + (f"{len(extra)} entries name tensors the model lacks (e.g. {extra[0]})" if extra else "")
                          + f". Compute one for this model: python -m mlxqat.imatrix --model {src} --out imatrix.gguf",
                          ExportWarning, stacklevel=2)
    inexact = [t for t in plan if not t.exact]
    act = [p for p, m in model.named_modules() if hasattr(m, "act_bits") and isinstance(m, nn.QuantizedLinear)]
    problems = [f"{t.source}: {t.note}" for t in inexact] + [
        f"{p}: static activation quantization has no GGUF form (llama.cpp computes without it)" for p in act
    ]
    kl = 0.0
    if problems:
        if exact:
            raise ge.GGUFExportError(
                f"{len(problems)} tensor(s) cannot be written exactly as {qtype}, e.g. {problems[0]}. "
                f"Quantize with recipe {qtype if mix else exact_recipes()} for an exact "
                "GGUF, or drop --exact to re-quantize"
            )
        kl = _requantization_kl(src, model, tokenizer, plan)
        msg = (
            f"GGUF {qtype} export is not exact: {len(problems)} tensor(s) re-quantized or changed "
            f"(e.g. {problems[0]}). Measured cost: KL(MLX model || GGUF weights) = {kl:.3g} nats "
            f"per token on fixed sequences. For an exact export train with recipe {qtype if mix else exact_recipes()}."
        )
        warnings.warn(msg, ExportWarning, stacklevel=2)
    with atomic_path(out, sources=inputs) as tmp:
        ge.write_gguf(
            tmp, model, tokenizer, src, plan, gt, name=name or src.resolve().name,
            extra={"mlxqat.exact": str(not problems).lower(), **_imatrix_keys(imatrix, im)}, mix=mix,
        )
    report = memory_report(out)
    types: Dict[str, int] = {}
    for t in plan:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    other = [t for t in plan if t.exact and t.qtype != gt and t.qtype in EXACT_TYPES and mix is None]
    if other:
        _say(verbose, f"{len(other)} quantized tensor(s) kept exactly as {other[0].qtype.name} "
                      f"(re-quantizing them to {qtype} would only add error)")
    n_exact = len(plan) - len(inexact)
    _say(verbose, f"wrote {out}: {len(plan)} tensors ({n_exact} exact; {types}), {qtype}; {report}")
    ollama_info = {"modelfile": None, "chat_format": None, "ollama_create": None}
    if modelfile_out is not None:
        ollama_info = _write_modelfile(out, modelfile_out, tokenizer, src, name or out.stem, verbose)
    return {
        "path": str(out),
        "qtype": qtype,
        "exact": not problems,
        "kl": kl,
        "types": types,
        "tensors": [
            {"name": t.name, "source": t.source, "type": t.qtype.name, "exact": t.exact, "note": t.note}
            for t in plan
        ],
        "memory": report.to_dict(),
        **ollama_info,
    }


def _imatrix_keys(path, im) -> Dict[str, str]:
    """The keys llama-quantize records about the importance matrix it used (the string ones)."""
    if im is None:
        return {}
    keys = {"quantize.imatrix.file": Path(path).name}
    if im.datasets:
        keys["quantize.imatrix.dataset"] = str(im.datasets[-1])
    return keys


def _check_modelfile(out: Path, src: Path) -> Path:
    """The Modelfile path beside ``out``, once it is known that mlxqat may write it (before any work)."""
    path = ollama.modelfile_path(out)
    ollama.check_gguf_name(out)
    if os.path.lexists(path) and not is_mlxqat_output(path):
        raise DestinationError(
            f"{path} already exists and is not a Modelfile mlxqat wrote (or it was edited since); the GGUF "
            f"export writes the Ollama Modelfile there and replaces only its own, so nothing was written: move "
            f"{path} away, or pass --no-modelfile (modelfile=False)"
        )
    return check_destination(path, sources=[src], kind="file")


def _write_modelfile(out: Path, path: Path, tokenizer, src: Path, name: str, verbose: bool) -> dict:
    """Write the Ollama Modelfile of ``out`` to ``path`` atomically; print the ``ollama create`` line."""
    fmt, why = ollama.chat_format(tokenizer, adds_bos_eos(tokenizer)[0])
    eot = end_of_turn(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(eot)] if fmt is None and eot is not None else []
    model_name = ollama.ollama_name(name)
    text = ollama.modelfile_text(out, fmt, why, name=model_name, stops=stops)
    with atomic_path(path, sources=[src]) as tmp:
        tmp.write_bytes(text.encode("utf-8"))  # the bytes the mark's sha256 covers, on any platform
    create = f"ollama create {model_name} -f {shlex.quote(str(path))}"
    if fmt is not None:
        _say(verbose, f"wrote {path}: TEMPLATE {why}")
    else:
        _say(verbose, f"wrote {path} without a TEMPLATE: {why}")
    _say(verbose, f"to run it in Ollama: {create}  then: ollama run {model_name}")
    return {"modelfile": str(path), "chat_format": fmt.name if fmt else None, "ollama_create": create}


def _requantization_kl(src: Path, model: nn.Module, tokenizer, plan: List[ge.GGUFTensor]) -> float:
    """KL between the MLX model and an MLX model running the GGUF's weights."""
    candidate, _ = load(src)
    dequantize(candidate)
    params = dict(tree_flatten(candidate.parameters()))
    updates = []
    for t in plan:
        if not t.exact and t.source in params:
            updates.append((t.source, mx.array(t.dequantized()).astype(params[t.source].dtype)))
    candidate.load_weights(updates, strict=False)
    return mean_kl(model, candidate, kl_probe_inputs(model.args.vocab_size, tokenizer))


def export_mlx(src_dir: PathLike, out_dir: PathLike, *, verbose: bool = True) -> dict:
    """Write an mlx-lm directory (``mlx_lm.load`` opens it) with a model card and sha256 manifest.

    Args:
        src_dir: a directory saved by :func:`mlxqat.save`, any mlx-lm directory, or a GGUF file (its Q4_0,
            Q4_1, Q5_0, Q5_1 and Q8_0 matrices as MLX quantized layers holding the same codes, scales and
            offsets, 4-, 5- or 8-bit in groups of 32; other tensors dequantized to float32, :mod:`mlxqat.gguf.reader`).
        out_dir: destination directory (replaced atomically).

    Returns:
        The manifest written to ``mlxqat.json``.
    """
    src, model, tokenizer, config = _open_source(src_dir, out_dir, keep_blocks=True)
    info = _source_info(src)
    info.update({"exported_from": str(src), "memory": memory_report(model).to_dict()})
    manifest = save(model, tokenizer, out_dir, config=config, info=info, sources=[src], title=src.resolve().name)
    _say(verbose, f"wrote {out_dir}: {len(manifest['files'])} files; {memory_report(out_dir)}")
    return manifest


def export_fp16(src_dir: PathLike, out_dir: PathLike, *, dtype: str = "float16", verbose: bool = True) -> dict:
    """Write the model's unquantized weights as an mlx-lm directory, for tools that quantize themselves.

    If ``src_dir`` has ``master_weights.safetensors`` (the float master weights
    of a QAT run), those are written; otherwise the quantized layers are
    dequantized, i.e. the file holds exactly the values the quantized model
    computes with (rounded to ``dtype``). Static activation quantization is
    not kept.

    Args:
        src_dir: a directory saved by :func:`mlxqat.save`, or any mlx-lm directory.
        out_dir: destination directory (replaced atomically).
        dtype: ``float16``, ``bfloat16`` or ``float32``.

    Returns:
        The manifest written to ``mlxqat.json``.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r} is not one of 'float16', 'bfloat16', 'float32'")
    src, model, tokenizer, config = _open_source(src_dir, out_dir)
    source_recipe = recipe_of(model)
    source_recipe = source_recipe.to_dict() if source_recipe is not None else None
    info = _source_info(src)
    dequantize(model, mx.float32)
    master = src / MASTER_FILE
    if master.exists():
        safetensors_header(master)
        weights = mx.load(str(master))
        params = dict(tree_flatten(model.parameters()))
        unknown = sorted(set(weights) - set(params))
        bad = [k for k in weights if k in params and weights[k].shape != params[k].shape]
        if unknown or bad:
            raise ValueError(
                f"{master} does not match the model: unknown tensors {unknown[:3]}, wrong shapes "
                f"{bad[:3]}; it was saved for a different architecture or recipe"
            )
        model.load_weights(list(weights.items()), strict=False)
        what = f"the float master weights of the QAT run ({MASTER_FILE})"
    else:
        what = "the dequantized QAT weights (exactly what the quantized model computes with)"
    target = getattr(mx, dtype)
    model.update(tree_map(lambda v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    info.update({"weights": what, "source_recipe": source_recipe, "exported_from": str(src),
                 "memory": memory_report(model).to_dict()})
    notes = f"These are {what}, in {dtype}" + (
        f", from a model quantized with recipe `{source_recipe.get('name')}`." if source_recipe else ".")
    _say(verbose, f"fp16 export: writing {what} as {dtype}")
    manifest = save(model, tokenizer, out_dir, config=config, info=info, sources=[src],
                    title=f"{src.resolve().name} ({dtype})", notes=notes)
    _say(verbose, f"wrote {out_dir}: {len(manifest['files'])} files; {memory_report(out_dir)}")
    return manifest


def export_hf(src_dir: PathLike, out_dir: PathLike, *, verbose: bool = True) -> dict:
    """Write a Hugging Face directory that transformers and vLLM load: compressed-tensors "pack-quantized"
    weights holding the model's own integers and scales (:mod:`mlxqat.hf`).

    Args:
        src_dir: a directory saved by :func:`mlxqat.save` (or any mlx-lm directory) whose quantized layers have
            whole-step offsets: symmetric recipes (``q4_0``, ``q5_0``, ``q8_0``) or integer zero points
            (``int4_zp``, ``mode="zeropoint"``).
        out_dir: destination directory (replaced atomically).

    Returns:
        ``{"out", "groups", "ignore", "files"}``.

    Raises:
        mlxqat.hf.HFExportError: a layer with float offsets (named, with the recipe to use), before anything is written.
    """
    src, model, tokenizer, config = _open_source(src_dir, out_dir)
    info = _source_info(src)
    info["exported_from"] = str(src)
    result = write_hf(model, tokenizer, config, out_dir, sources=[src], info=info)
    _say(verbose, f"wrote {out_dir}: {len(result['files'])} files, compressed-tensors pack-quantized "
                  f"({sum(g['targets'] for g in result['groups'].values())} quantized linear layers)")
    return result


@command()
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m mlxqat.export``; returns the exit status (2: bad input)."""
    parser = ArgumentParser(
        prog="python -m mlxqat.export",
        description="Export an mlxqat / mlx-lm model directory to GGUF, an mlx-lm directory, or unquantized weights.",
    )
    parser.add_argument("src_dir", help="model directory (saved by mlxqat.save, or any mlx-lm directory)")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="gguf, mlx (mlx-lm directory), fp16, or hf (transformers / vLLM, compressed-tensors)")
    parser.add_argument("--out", required=True, help="destination .gguf file or directory")
    parser.add_argument(
        "--type", dest="qtype", default="auto", choices=["auto", *ge.QTYPES, *ge.MIXES], type=str.lower,
        help="GGUF tensor type, or q4_k_m (llama.cpp's mix, each tensor its own type); auto: the type named in "
        "--out (model-q4_0.gguf), else the mix of the model's recipe (q4_k_m), else the type that holds the "
        "quantized weights exactly",
    )
    parser.add_argument("--exact", action="store_true", help="GGUF: refuse instead of re-quantizing")
    parser.add_argument("--imatrix", default=None, metavar="FILE",
                        help="GGUF: an importance matrix (python -m mlxqat imatrix, or llama.cpp's llama-imatrix): "
                             "tensors that are quantized or re-quantized use llama.cpp's importance-weighted rounding")
    parser.add_argument("--name", default=None,
                        help="GGUF: general.name in the file and the Ollama model name (default: the source's name)")
    parser.add_argument("--no-modelfile", dest="modelfile", action="store_false",
                        help="GGUF: do not write the Ollama Modelfile beside the file (OUT.Modelfile)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="fp16 format: the float type written")
    parser.add_argument("--json", action="store_true", help="print the export summary as JSON on stdout")
    args = parser.parse_args(argv)
    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):
        if issubclass(category, ExportWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    warnings.showwarning = one_line
    if args.imatrix is not None and args.format != "gguf":
        parser.error(f"--imatrix weights GGUF quantization; --format {args.format} does not quantize with it")
    try:
        if args.format == "gguf":
            result = export_gguf(args.src_dir, args.out, args.qtype, args.exact, name=args.name,
                                 modelfile=args.modelfile, imatrix=args.imatrix)
            result.pop("tensors")
        elif args.format == "mlx":
            result = {"files": len(export_mlx(args.src_dir, args.out)["files"])}
        elif args.format == "hf":
            result = export_hf(args.src_dir, args.out)
            result["files"] = len(result["files"])
        else:
            result = {"files": len(export_fp16(args.src_dir, args.out, dtype=args.dtype)["files"])}
    finally:
        warnings.showwarning = show
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
