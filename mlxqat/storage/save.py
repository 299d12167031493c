"""Saving a model as an mlx-lm directory: config, sharded safetensors, tokenizer, model card, manifest."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .._version import __version__
from ..convert import layer_specs, recipe_of
from ..footprint import format_size, memory_report
from ..layers import ActQuantizedLinear, is_fake_quant
from ..quant import compact
from .checks import PathLike
from .destinations import atomic_dir, check_destination, write_manifest
from .manifest import ACTIVATION_FILE, MANIFEST, MASTER_FILE, Manifest, check_member_name

MAX_SHARD_BYTES = 5 << 30


def model_config(model: nn.Module) -> dict:
    """The mlx-lm config dict of ``model`` (from its ``args`` dataclass)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError(
            f"{type(model).__name__} has no mlx-lm `args`; pass config= (the dict "
            "mlx_lm.load(..., return_config=True) returns) to save()"
        )
    # a field the source config did not set holds its default None: leave it out rather than write null, which
    # transformers' config classes (read by the tokenizer loader, in mlxqat.load and mlx_lm.load) refuse
    unset = {f.name for f in dataclasses.fields(args) if f.default is None}
    cfg = {k: v for k, v in dataclasses.asdict(args).items() if not (v is None and k in unset)}
    if "tie_word_embeddings" not in cfg and hasattr(model, "tie_word_embeddings"):
        cfg["tie_word_embeddings"] = bool(model.tie_word_embeddings)
    return cfg


def quantization_config(model: nn.Module) -> Optional[dict]:
    """mlx-lm's ``"quantization"`` entry: the common setting plus per-layer overrides."""

    specs = layer_specs(model)
    if not specs:
        return None
    common = Counter(tuple(sorted(s.items())) for s in specs.values()).most_common(1)[0][0]
    default = dict(common)
    q = {"group_size": default["group_size"], "bits": default["bits"], "mode": default["mode"]}
    for path, s in specs.items():
        if s != default:
            q[path] = s
    return q


def _make_shards(weights: Dict[str, mx.array], max_bytes: int):
    shards, size = [], 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def _write_weights(directory: Path, weights: Dict[str, mx.array], max_shard_bytes: int) -> None:
    shards = _make_shards(weights, max_shard_bytes)
    n = len(shards)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        for k in shard:
            index["weight_map"][k] = name
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


def _compact_scales(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """float32 scales/biases that are float16 numbers -> float16 (same values, half the bytes).

    Only for linear layers: ``quantized_matmul`` promotes to the activation
    dtype, so a float32 model computes the same numbers. Embeddings keep their
    dtype because their output dtype would follow it.
    """

    for path, m in model.named_modules():
        if type(m).__name__ == "QuantizedEmbedding" or not isinstance(m, nn.QuantizedLinear):
            continue
        scales, biases = weights.get(f"{path}.scales"), weights.get(f"{path}.biases")
        if scales is None or scales.dtype != mx.float32:
            continue
        halves = compact(scales, biases, mx.float16)
        if halves is not None:
            weights[f"{path}.scales"], weights[f"{path}.biases"] = halves


def _card_metrics(info: dict) -> dict:
    """The measured figures of a manifest: ``metrics``, then the training summary's scalars."""
    m = dict(info.get("metrics") or {})
    for k, v in (info.get("training") or {}).items():
        if isinstance(v, (int, float, str)):
            m.setdefault(f"training.{k}", v)
    return m


def _card_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):  # a row of figures, e.g. {"ppl": 12.3, "kl": 0.01}
        return ", ".join(f"{k} {_card_value(x)}" for k, x in v.items())
    return str(v)


def model_card(title: str, info: Dict[str, Any], memory: Optional[dict] = None, *, notes: str = "") -> str:
    """The README.md of a saved model directory (one card for :func:`save`, the exports and training).

    Args:
        title: heading (the model's name).
        info: the manifest entries: ``recipe`` (a recipe dictionary, or None: not
            quantized by mlxqat), ``metrics``, ``training``, ``exported_from``.
        memory: a memory report dictionary (:meth:`mlxqat.footprint.MemoryReport.to_dict`).
        notes: extra paragraphs.
    """
    source = info.get("exported_from") or ""
    lines = [f"# {title}", ""]
    lines.append(f"Made by mlxqat {__version__}" + (f" from `{source}`." if source else "."))
    lines += ["", "## Quantization", ""]
    recipe = info.get("recipe")
    if recipe:
        d = recipe.get("default", {})
        lines.append(
            f"Recipe `{recipe.get('name')}`: {recipe.get('description') or 'custom'}. "
            f"Default layer: {d.get('bits')}-bit, group {d.get('group_size')}, {d.get('mode')}"
            + (", learned scales" if d.get("learn_scales") else "")
            + (f", {d.get('act_bits')}-bit activations" if d.get("act_bits") else "")
            + "."
        )
        for pattern, spec in recipe.get("overrides", []):
            lines.append(f"- `{pattern}`: {spec.get('bits')}-bit, group {spec.get('group_size')}, {spec.get('mode')}")
        for pattern in recipe.get("skip", []):
            lines.append(f"- `{pattern}`: full precision")
    else:
        lines.append("No mlxqat recipe recorded for these weights.")
    if memory:
        lines += [
            "",
            "## Size",
            "",
            "| weights | bits per weight | size vs bf16 | values |",
            "|---|---|---|---|",
            f"| {format_size(memory['weight_bytes'])} | {memory['bits_per_weight']:.3f} | {memory['ratio_to_bf16']:.3f}x "
            f"| {memory['n_weights']:,} |",
        ]
    lines += ["", "## Measured", ""]
    metrics = _card_metrics(info)
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_card_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No metrics were recorded with this model.")
    if notes:
        lines += ["", notes]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from mlx_lm import load, generate",
        'model, tokenizer = load("path/to/this/folder")',
        'print(generate(model, tokenizer, "def fibonacci(n):", max_tokens=64))',
        "```",
        "",
        "`python -m mlxqat.verify path/to/this/folder` checks every file against the sha256 in `mlxqat.json`.",
        "",
    ]
    return "\n".join(lines)


def save(
    model: nn.Module,
    tokenizer,
    path: PathLike,
    *,
    config: Optional[dict] = None,
    info: Optional[Dict[str, Any]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_files: Optional[Dict[str, Union[str, bytes]]] = None,
    master_weights: Optional[Dict[str, mx.array]] = None,
    compact_scales: bool = True,
    sources: Iterable[PathLike] = (),
    title: Optional[str] = None,
    notes: str = "",
) -> dict:
    """Write a converted model as an mlx-lm directory (``mlx_lm.load(path)`` opens it).

    Args:
        model: a converted model (``mlxqat.convert``) or a full-precision one.
        tokenizer: the tokenizer (``mlx_lm`` TokenizerWrapper or a Hugging Face
            tokenizer); its files are saved beside the weights.
        path: destination directory: new, empty, or an earlier mlxqat output
            (replaced atomically); anything else is refused (:func:`check_destination`).
        config: the model's config dict; default: built from ``model.args``.
        info: extra entries for ``mlxqat.json`` (training summary, metrics). The
            recipe is read from the model's layers (:func:`mlxqat.convert.recipe_of`).
        max_shard_bytes: shard the weights above this size.
        extra_files: ``{name: text or bytes}`` written into the directory.
        master_weights: unquantized weights to keep beside the model
            (``master_weights.safetensors``, e.g. the trained QAT weights).
        compact_scales: store float32 scales/biases of linear layers as float16
            when that is lossless (the values are float16 numbers).
        sources: the paths the model was read from; ``path`` may not be or hold one.
        title, notes: the heading (default: the directory's name) and extra text of
            the model card ``README.md`` (:func:`model_card`) written beside the weights.

    Returns:
        The manifest written to ``mlxqat.json``.

    Raises:
        ValueError: fake-quant layers still present, non-finite weights, no
            tokenizer, a reserved ``info`` key or an ``extra_files`` name outside
            the directory.
        DestinationError: ``path`` holds something that is not an mlxqat output.
    """
    fq = [p for p, m in model.named_modules() if is_fake_quant(m)]
    if fq:
        raise ValueError(
            f"{len(fq)} layer(s) are still fake-quant (e.g. {fq[0]}); call "
            "mlxqat.convert(model) before save()"
        )
    if tokenizer is None:
        raise ValueError(
            "save() needs the tokenizer: mlx_lm.load reads tokenizer files from the "
            "model directory; pass the tokenizer returned by mlx_lm.load / mlxqat.load"
        )
    Manifest(info=dict(info or {}))  # a reserved key in info is refused now, before any work
    for name in extra_files or {}:
        check_member_name(name)
        if name == MANIFEST or name == "config.json" or name.startswith("model"):
            raise ValueError(f"extra_files name {name!r} would replace a file of the model; choose another name")
    check_destination(path, sources=sources)
    config = dict(config if config is not None else model_config(model))
    if "model_type" not in config:
        raise ValueError("config has no 'model_type'; mlx-lm cannot tell which architecture to build")
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    q = quantization_config(model)
    if q is not None:
        config["quantization"] = q
        config["quantization_config"] = q

    weights = dict(tree_flatten(model.parameters()))
    act_scales = {k: v for k, v in weights.items() if k.endswith(".act_scale")}
    act_bits = {}
    for k in act_scales:
        weights.pop(k)
    for p, m in model.named_modules():
        if isinstance(m, ActQuantizedLinear):
            act_bits[p] = m.act_bits
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            raise ValueError(f"{k} has NaN/Inf values; refusing to save a broken model")
    if compact_scales:
        _compact_scales(model, weights)


    recipe = recipe_of(model)
    manifest_info = {"recipe": recipe.to_dict() if recipe is not None else None}
    manifest_info["activation_quantization"] = act_bits
    manifest_info.update(info or {})
    extra_files = dict(extra_files or {})
    if "README.md" not in extra_files:
        memory = memory_report(model, params=weights).to_dict()
        extra_files["README.md"] = model_card(title or Path(path).name, manifest_info, memory, notes=notes)

    with atomic_dir(path, sources=sources) as tmp:
        _write_weights(tmp, weights, max_shard_bytes)
        if master_weights:
            mx.save_safetensors(str(tmp / MASTER_FILE), master_weights, metadata={"format": "mlx"})
        if act_scales:
            mx.save_safetensors(str(tmp / ACTIVATION_FILE), act_scales, metadata={"format": "mlxqat"})
        with open(tmp / "config.json", "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=2)
        tokenizer.save_pretrained(str(tmp))
        for name, content in extra_files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, mode) as f:
                f.write(content)
        manifest = write_manifest(tmp, manifest_info)
    return manifest
