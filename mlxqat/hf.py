"""Hugging Face directories that transformers and vLLM load: compressed-tensors "pack-quantized" weights.

    python -m mlxqat export qat-q4_0/ --format hf --out hf-dir/

compressed-tensors stores an integer weight ``q`` (``-2^(b-1) .. 2^(b-1)-1``) with a float scale per group
and, for asymmetric schemes, an integer zero point ``z``: ``w = (q - z) * scale``. Its packing is MLX's:
``q + 2^(b-1)`` as unsigned ``b``-bit fields, least significant first, in 32-bit words. So an MLX layer
whose offset is an integer number of steps, ``bias = -k * scale`` with ``k`` in ``0 .. 2^b - 1``, is held
exactly: the packed codes are the same words, ``z = k - 2^(b-1)``, and a symmetric layer (``k = 2^(b-1)``,
recipes ``q4_0``, ``q5_0``, ``q8_0``) needs no zero point at all. An MLX affine layer with free float
offsets (``int4``, ``q4_1``: ``mlx_lm.convert``'s format) has no such form and is refused, naming the layer;
quantized embeddings, which compressed-tensors does not quantize, are written dequantized.

The dense packing (``ceil(n * bits / 32)`` words for ``n`` values) is that of compressed-tensors 0.20 and
later; 4- and 8-bit layers pack the same way in every version, 3-, 5- and 6-bit ones need 0.20.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import quant
from .storage.destinations import atomic_dir, write_manifest

# mlx-lm model_type -> the transformers class that builds it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM"}
WEIGHTS = "model.safetensors"


class HFExportError(ValueError):
    """A model that the compressed-tensors format cannot hold exactly (named layer, and the recipe to use)."""


def whole_steps(scales: np.ndarray, biases: np.ndarray, bits: int) -> Optional[np.ndarray]:
    """``k`` with ``biases == -k * scales`` exactly (float32), ``k`` integers in ``0 .. 2^bits - 1``, or ``None``.

    A group whose scale is 0 takes the ``k`` that keeps its offset (only ``bias == 0`` has one: ``k`` then is
    ``2^(bits-1)``, the symmetric choice)."""
    s, b = np.asarray(scales, np.float32), np.asarray(biases, np.float32)
    safe = np.where(s == 0, np.float32(1), s)
    k = np.rint(-b / safe)
    k = np.where(s == 0, np.where(b == 0, 2 ** (bits - 1), -1), k)
    ok = (k >= 0) & (k <= 2 ** bits - 1) & ((s == 0) | ((-k.astype(np.float32)) * s == b))
    return k.astype(np.int64) if bool(ok.all()) else None


def _scale_dtype(scales: np.ndarray) -> mx.Dtype:
    """The narrowest float type that holds every scale exactly."""
    return next((dt for dt in (mx.float16, mx.bfloat16) if quant.holds_exactly(dt, scales)), mx.float32)


def _layer_tensors(path: str, m: nn.Module) -> Tuple[Dict[str, mx.array], dict]:
    """The compressed-tensors tensors of quantized linear layer ``m`` and its weights scheme."""
    bits, g = m.bits, m.group_size
    scales = np.array(m.scales.astype(mx.float32))
    biases = np.array(m.biases.astype(mx.float32))
    k = whole_steps(scales, biases, bits)
    if k is None:
        raise HFExportError(
            f"{path}: {bits}-bit group {g} with float offsets (affine, as mlx_lm.convert and recipes int4 / q4_1 "
            "store them) has no exact compressed-tensors form, whose offsets are whole steps (an integer zero "
            "point); quantize or train with a symmetric recipe (q4_0, q5_0, q8_0) or an integer zero point "
            "(recipe int4_zp, or mode='zeropoint' for any bits: recipes.get('int3', mode='zeropoint'))")
    half = 2 ** (bits - 1)
    symmetric = bool((k == half).all())
    dt = _scale_dtype(scales)
    out = {
        f"{path}.weight_packed": m.weight.view(mx.int32),  # the same bits: q + 2^(b-1), LSB first
        f"{path}.weight_scale": mx.array(scales).astype(dt),
        f"{path}.weight_shape": mx.array([m.weight.shape[0], m.weight.shape[1] * 32 // bits], dtype=mx.int64),
    }
    if not symmetric:  # the zero point z = k - 2^(b-1), stored as the weights are (z + 2^(b-1) = k), along rows
        out[f"{path}.weight_zero_point"] = _pack_rows(k.astype(np.uint32), bits)
    scheme = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": g,
              "dynamic": False}
    return out, scheme


def _pack_rows(values: np.ndarray, bits: int) -> mx.array:
    """Unsigned ``bits``-bit ``values`` (rows, cols) packed along the rows (dim 0) into int32 words, as
    compressed-tensors packs zero points: each column's values in order, 32 at a time into ``bits`` words,
    the last run padded with zeros, ``ceil(rows * bits / 32)`` words a column."""
    rows, cols = values.shape
    padded = np.zeros((-(-rows // 32) * 32, cols), np.uint32)
    padded[:rows] = values
    packed = quant.pack(mx.array(np.ascontiguousarray(padded.T)), bits)  # (cols, padded rows * bits / 32)
    return packed[:, : -(-rows * bits // 32)].view(mx.int32).T


def hf_config(config: dict, groups: Dict[str, dict], ignore: List[str], dense_dtype: str) -> dict:
    """The transformers ``config.json`` of an mlx-lm ``config`` with a compressed-tensors quantization."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFExportError(f"model_type {model_type!r}: the Hugging Face export knows {sorted(ARCHITECTURES)}")
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    out["architectures"] = [ARCHITECTURES[model_type]]
    out["torch_dtype"] = dense_dtype
    out["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {name: {"targets": g["targets"], "weights": g["weights"], "input_activations": None,
                                 "output_activations": None, "format": "pack-quantized"}
                          for name, g in groups.items()},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return out


def write_hf(model: nn.Module, tokenizer, config: dict, out_dir, *, sources=(), info: Optional[dict] = None,
              dense_dtype: str = "float32") -> dict:
    """Write ``model`` (converted, quantized) as a Hugging Face directory with compressed-tensors weights.

    Quantized linear layers become ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (and
    ``weight_zero_point`` where not symmetric), the very integers and scales MLX computes with; every
    other tensor (norms, quantized embeddings dequantized) is written in ``dense_dtype``, or float32
    where that dtype would change a value.

    Raises:
        HFExportError: a quantized layer with float offsets (named, with the recipe to use), or an
            architecture transformers builds under another layout.
    """
    modules = dict(model.named_modules())
    tensors: Dict[str, mx.array] = {}
    groups: Dict[str, dict] = {}
    handled = set()
    for path, m in modules.items():
        if isinstance(m, nn.QuantizedLinear):
            if getattr(m, "mode", "affine") != "affine":
                raise HFExportError(f"{path}: MLX mode {m.mode!r} has no compressed-tensors form")
            t, scheme = _layer_tensors(path, m)
            tensors.update(t)
            if "bias" in m:
                tensors[f"{path}.bias"] = m.bias
            key = json.dumps(scheme, sort_keys=True)
            groups.setdefault(key, {"targets": [], "weights": scheme})["targets"].append(path)
            handled.add(path)
    dense_dt = getattr(mx, dense_dtype)
    for name, v in tree_flatten(model.parameters()):
        prefix, _, leaf = name.rpartition(".")
        if prefix in handled:
            continue
        m = modules.get(prefix)
        if isinstance(m, nn.QuantizedEmbedding):
            if leaf != "weight":
                continue
            v = quant.dequantized_weight(m)
        v = v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
        tensors[name] = v.astype(dense_dt) if quant.holds_exactly(dense_dt, v) else v
    if not groups:
        raise HFExportError("the model has no quantized linear layer; export a quantized model (mlxqat.convert)")
    named = {f"group_{i}": g for i, g in enumerate(groups.values())}
    ignore = [p for p, m in modules.items() if isinstance(m, nn.Linear) and p not in handled]
    cfg = hf_config(config, named, ignore, dense_dtype)

    with atomic_dir(out_dir, sources=sources) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS), {k: tensors[k] for k in sorted(tensors)}, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        manifest = write_manifest(tmp, dict(info or {}, layout="Hugging Face, compressed-tensors pack-quantized"))
    return {"out": str(out_dir), "groups": {k: {"targets": len(g["targets"]), **g["weights"]} for k, g in named.items()},
            "ignore": ignore, "files": manifest["files"]}
