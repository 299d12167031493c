"""Models from GGUF files (llama.cpp, Ollama, LM Studio): weights dequantized, tokenizer rebuilt.

``mlxqat.load("model.gguf")`` goes through :func:`load_gguf`: the file is
checked (:func:`mlxqat.gguf.format.read_gguf`), its metadata becomes the mlx-lm
config of the architecture, every tensor is dequantized with the ``gguf``
package's reference code (one tensor at a time) into the mlx-lm model, and the
tokenizer is rebuilt from the vocabulary the file embeds. Nothing is written:
``mlxqat.save`` / ``python -m mlxqat.export X.gguf --format mlx`` make an
mlx-lm directory of the result.

What llama.cpp's converter changed is undone here, with the same helpers the
GGUF exporter uses (:mod:`mlxqat.gguf.writer`): llama's query/key rows go back
to the Hugging Face rotary layout, Gemma 3's norms lose the ``+1`` folded into
them, and a missing ``output.weight`` means tied embeddings.

The tokenizer follows llama.cpp's own (``llama-vocab.cpp``): byte-level BPE
vocabularies (``tokenizer.ggml.model = gpt2``) split text with the regexes of
the file's pre-tokenizer name; SentencePiece vocabularies (``llama``, e.g.
Gemma) merge the best-scored pair first and fall back to byte tokens. Control,
user-defined and unknown tokens are matched whole before either, as llama.cpp
does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType as VT
from mlx.utils import tree_flatten

from .. import recipes
from ..storage.checks import PathLike, check_config_values, check_finite
from .blocks import EXACT_TYPES, GROUP, NoMLXForm, mlx_arrays
from .writer import ARCHS, permute_rows
from .format import Metadata, read_gguf
from .tokenizer import gguf_tokenizer

#: GGUF architecture -> mlx-lm ``model_type``.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


#: Tensor types that are dequantized (with ``gguf.quants``).
TENSOR_TYPES = (GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q4_K, GT.Q5_K, GT.Q6_K)


def gguf_config(meta: Metadata, tensors: Dict[str, object]) -> dict:
    """The mlx-lm config dict of the model a GGUF file describes.

    Args:
        meta: the file's :class:`Metadata`.
        tensors: ``{GGUF name: reader tensor}`` (for the vocabulary size, biases and tied embeddings).

    Raises:
        ValueError: an unsupported architecture or rope scaling, missing or inconsistent metadata.
    """
    path = meta.path
    arch = meta.str("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported by mlxqat's GGUF import; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Convert the original Hugging Face model with mlx-lm instead"
        )
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        if key in meta and meta.fields[key].types[:1] == [VT.ARRAY]:
            raise ValueError(f"{path}: {key} differs per layer; mlx-lm's {arch} has one head count for all layers")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{path}: no token_embd.weight tensor; the GGUF file is incomplete")
    hidden = meta.int(f"{arch}.embedding_length", low=1, high=1 << 17)
    heads = meta.int(f"{arch}.attention.head_count", low=1, high=4096)
    kv_heads = meta.int(f"{arch}.attention.head_count_kv", heads, low=1, high=4096)
    head_dim = meta.int(f"{arch}.attention.key_length", hidden // heads, low=1, high=4096)
    value_dim = meta.int(f"{arch}.attention.value_length", head_dim, low=1, high=4096)
    rope_dim = meta.int(f"{arch}.rope.dimension_count", head_dim, low=1, high=4096)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{path}: key_length={head_dim}, value_length={value_dim}, rope.dimension_count={rope_dim}; "
            f"mlx-lm's {arch} needs them equal (no partial rotary embedding)"
        )
    shape = tuple(int(x) for x in embed.shape)  # GGUF order: (hidden, vocab)
    if len(shape) != 2 or shape[0] != hidden:
        raise ValueError(f"{path}: token_embd.weight has shape {list(reversed(shape))}, not (vocab, {hidden})")
    tied = "output.weight" not in tensors
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": meta.int(f"{arch}.block_count", low=1, high=1024),
        "intermediate_size": meta.int(f"{arch}.feed_forward_length", low=1, high=1 << 20),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": meta.float(f"{arch}.attention.layer_norm_rms_epsilon"),
        "vocab_size": shape[1],
        "max_position_embeddings": meta.int(f"{arch}.context_length", 4096, low=1, high=1 << 24),
        "rope_theta": meta.float(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": tied,
    }
    rope_scaling = _rope_scaling(meta, arch, tensors, config["rope_theta"], head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if arch in ("llama", "qwen3", "gemma3"):
        config["head_dim"] = head_dim
    elif head_dim != hidden // heads:
        raise ValueError(f"{path}: qwen2 with key_length={head_dim} != embedding_length/head_count; mlx-lm's qwen2 "
                         "derives the head size")
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if arch == "gemma3":
        config.update(
            sliding_window=meta.int("gemma3.attention.sliding_window", low=1, high=1 << 24),
            # what llama.cpp fixes for Gemma 3 (llama-model.cpp): every 6th layer global, local base 10000,
            # attention scale 1/sqrt(head_dim) except the 62-layer (27B) model
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=hidden // heads if config["num_hidden_layers"] == 62 else head_dim,
        )
    return config


def _rope_scaling(meta: Metadata, arch: str, tensors: dict, base: float, dims: int) -> Optional[dict]:
    kind = meta.str(f"{arch}.rope.scaling.type", "none")
    factor = meta.float(f"{arch}.rope.scaling.factor", None)
    if kind == "none" and factor is None and f"{arch}.rope.scale_linear" in meta:
        kind, factor = "linear", meta.float(f"{arch}.rope.scale_linear")
    if "rope_freqs.weight" in tensors:
        if arch != "llama" or kind != "none" and not (kind == "linear" and factor in (None, 1.0)):
            raise ValueError(f"{meta.path}: rope_freqs.weight with a {arch} model and rope scaling {kind!r} is not "
                             "supported (only Llama 3 frequency scaling)")
        return _llama3_scaling(meta.path, _dequantize(tensors["rope_freqs.weight"], meta.path), base, dims)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if factor is None:
        raise ValueError(f"{meta.path}: rope scaling {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn" and arch != "gemma3":
        orig = meta.int(f"{arch}.rope.scaling.original_context_length", low=1, high=1 << 24)
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise ValueError(f"{meta.path}: rope scaling {kind!r} is not supported for {arch} (supported: linear, "
                     "Llama 3 rope_freqs, yarn for llama/qwen)")


def _llama3_factors(base: float, dims: int, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """The per-frequency divisors mlx-lm's ``Llama3RoPE`` applies (its formula, in float64)."""
    freqs = base ** (np.arange(0, dims, 2) / dims)
    wavelens = 2 * np.pi * freqs
    scaled = np.where(wavelens > old / low, freqs * factor, freqs)
    smooth = (old / wavelens - low) / (high - low)
    medium = (wavelens > old / high) & (wavelens < old / low)
    return np.where(medium, scaled / ((1 - smooth) / factor + smooth), scaled) / freqs


def _llama3_scaling(path: Path, stored: np.ndarray, base: float, dims: int) -> Optional[dict]:
    """Llama 3 rope scaling parameters that reproduce ``rope_freqs.weight`` (low_freq_factor taken as 1)."""
    stored = stored.astype(np.float64).reshape(-1)
    if stored.shape != (dims // 2,) or not np.all(np.isfinite(stored)) or np.any(stored <= 0):
        raise ValueError(f"{path}: rope_freqs.weight has {stored.size} values; expected {dims // 2} positive ones")
    factor = float(stored.max())
    if np.allclose(stored, 1.0):
        return None
    candidates = [(1.0, 4.0, 8192.0)]  # Llama 3.1 / 3.2
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    medium = np.where((stored > 1 + 1e-6) & (stored < factor * (1 - 1e-6)))[0]
    if len(medium) >= 2:  # solve s_i = (old / w_i - 1) / (high - 1) from two medium frequencies
        s = (1 / stored[medium] - 1 / factor) / (1 - 1 / factor)
        wa, wb, sa, sb = wavelens[medium[0]], wavelens[medium[-1]], s[0], s[-1]
        if wa * sa != wb * sb:
            k = (wb - wa) / (wa * sa - wb * sb)
            old = round(wa * (1 + sa * k))
            if k > 0 and old > 0:
                candidates.insert(0, (1.0, round(1 + k, 6), float(old)))
    for low, high, old in candidates:
        if np.allclose(_llama3_factors(base, dims, factor, low, high, old), stored, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(old)}
    raise ValueError(f"{path}: rope_freqs.weight is not Llama 3 frequency scaling that mlx-lm can express")


def _dequantize(t, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 (rows, columns), dequantized by ``gguf.quants``."""
    qtype = GT(t.tensor_type)
    if qtype not in TENSOR_TYPES:
        raise ValueError(
            f"{path}: tensor {t.name} is {qtype.name}, which mlxqat's GGUF import does not read; supported: "
            f"{', '.join(x.name for x in TENSOR_TYPES)}. Requantize the file (llama-quantize) to one of them"
        )
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        if qtype == GT.F32:
            return np.array(t.data, dtype=np.float32).reshape(shape)
        data = t.data.reshape(-1, t.data.shape[-1])  # rows of raw values or blocks
        out = np.empty((data.shape[0], math.prod(shape) // max(data.shape[0], 1)), np.float32)
        step = max(1, (1 << 22) // max(out.shape[1], 1))  # ~16 MB of float32 at a time: few temporaries
        for start in range(0, data.shape[0], step):
            out[start:start + step] = gguf.quants.dequantize(data[start:start + step], qtype)
        return out.reshape(shape)
    except (ValueError, TypeError, IndexError) as e:  # data shorter than the shape, misaligned blocks
        raise ValueError(f"{path}: tensor {t.name} ({qtype.name} {list(shape)}) cannot be read ({e}); "
                         "the file is damaged or truncated") from e


def _name_map(model_type: str, n_layers: int):
    arch = ARCHS[model_type].gguf_arch
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(enum, n_layers)


def _hf_rows(rows: np.ndarray, gguf_name: str, config: dict) -> np.ndarray:
    """A matrix's rows (values or whole rows of blocks) back from llama.cpp's interleaved rotary order to Hugging
    Face's halves, for the query and key projections of architectures whose converter permutes them."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    kind = gguf_name.split(".")[-2]
    if ARCHS[config["model_type"]].permute_qk and kind in heads:
        return permute_rows(rows, heads[kind], inverse=True)
    return rows


def _load_weights(model: nn.Module, config: dict, tensors: dict, path: Path, dtype: mx.Dtype) -> Dict[str, str]:
    """Dequantize every tensor into ``model`` (built from ``config``), undoing llama.cpp's conversions;
    returns ``{MLX parameter: GGUF tensor}``."""

    spec = ARCHS[config["model_type"]]
    names = _name_map(config["model_type"], config["num_hidden_layers"])
    params = dict(tree_flatten(model.parameters()))
    plan = {}
    for mlx_name, p in params.items():
        prefix, _, leaf = mlx_name.rpartition(".")
        base = names.get_name(prefix)
        gguf_name = f"{base}.{leaf}" if base else None
        if gguf_name not in tensors:
            if mlx_name == "lm_head.weight" and config["tie_word_embeddings"]:
                continue  # tied: the embedding serves as output layer
            raise ValueError(f"{path}: tensor {gguf_name or mlx_name} is missing; the {config['model_type']} "
                             f"model from this file's metadata needs it (the file is incomplete or damaged)")
        t = tensors[gguf_name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if shape != tuple(p.shape):
            raise ValueError(f"{path}: tensor {gguf_name} has shape {list(shape)} but the metadata makes it "
                             f"{list(p.shape)}; the file's metadata does not match its tensors")
        plan[mlx_name] = gguf_name
    unused = sorted(set(tensors) - set(plan.values()) - {"rope_freqs.weight"})
    if unused:
        raise ValueError(f"{path}: tensors {unused[:5]} have no place in mlx-lm's {config['model_type']} model; "
                         "the file holds an architecture variant mlxqat cannot import")
    weights = {}
    for mlx_name, gguf_name in plan.items():
        w = _hf_rows(_dequantize(tensors[gguf_name], path), gguf_name, config)
        if spec.norm_shift and mlx_name.endswith("norm.weight"):
            w = w - np.float32(spec.norm_shift)  # mlx-lm adds it back: rms_norm(x, 1 + w)
        weights[mlx_name] = mx.array(w).astype(dtype)
        mx.eval(weights[mlx_name])
        del w
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    return plan


def _keep_blocks(model: nn.Module, config: dict, tensors: dict, plan: Dict[str, str], path: Path) -> Dict[str, str]:
    """Make each linear layer and embedding stored as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K (16-weight halves sharing a
    scale) an MLX quantized layer holding the
    file's own codes, scales and offsets (:func:`mlxqat.gguf.blocks.mlx_arrays`), with the spec of the recipe
    that exports it exactly; returns ``{layer path: GGUF type name}`` of the matrices kept as floats."""
    modules = dict(model.named_modules())
    kept, floats = {}, {}
    for mlx_name, gguf_name in plan.items():
        prefix, _, leaf = mlx_name.rpartition(".")
        if leaf != "weight" or not isinstance(modules.get(prefix), (nn.Linear, nn.Embedding)):
            continue
        t = tensors[gguf_name]
        qtype = GT(t.tensor_type)
        if qtype not in EXACT_TYPES:
            floats[prefix] = qtype.name
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            blocks = _hf_rows(np.array(t.data).reshape(shape[0], -1), gguf_name, config)  # whole rows of blocks
            kept[prefix] = (qtype, *mlx_arrays(blocks, qtype, shape))
        except NoMLXForm:
            floats[prefix] = f"{qtype.name} with a scale per 16 weights"
        except ValueError as e:
            raise ValueError(f"{path}: tensor {gguf_name} ({qtype.name} {list(shape)}) cannot be read ({e}); "
                             "the file is damaged or truncated") from e
    nn.quantize(model, class_predicate=lambda p, m: p in kept and {"group_size": GROUP,
                                                                   "bits": EXACT_TYPES[kept[p][0]][0]})
    new = dict(model.named_modules())
    for prefix, (qtype, words, scales, biases) in kept.items():
        layer = new[prefix]
        layer.weight, layer.scales, layer.biases = words, scales, biases
        recipe = recipes.get(EXACT_TYPES[qtype][1])
        layer.spec, layer.recipe = recipe.default, recipe
    return floats


def load_gguf(path: PathLike, *, dtype: mx.Dtype = mx.float32,
              keep_quantized: bool = False) -> Tuple[nn.Module, object, dict]:
    """Load a GGUF file as an mlx-lm model, tokenizer and config (in memory; nothing is written).

    Args:
        path: a ``.gguf`` file of a llama, qwen2, qwen3 or gemma3 (text) model, with tensors of
            type F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K.
        dtype: the float type of the model's weights (default float32: quantized tensors are
            dequantized exactly, and MLX on the CPU computes fastest in float32).
        keep_quantized: linear layers and embeddings stored as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K
            (16-weight halves sharing a scale, as mlxqat writes it) become MLX
            quantized layers with the file's own codes, scales and offsets (4- or 8-bit, group 32,
            float16 scales), each with the spec of recipe ``q4_0`` / ``q4_1`` / ``q8_0``, so the
            model fine-tunes in its own type and exports back to exactly those blocks; matrices of
            other types are dequantized, and ``config["gguf_float_layers"]`` names them with their type.

    Returns:
        ``(model, tokenizer, config)``: an mlx-lm model with float weights (quantized layers where
        kept), an mlx-lm ``TokenizerWrapper``, and the mlx-lm ``config.json`` dict (``mlxqat.save``
        writes both).

    Raises:
        ValueError: a malformed file, an unsupported architecture, tensor type or tokenizer (named).
        FileNotFoundError: no such file.
    """
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.utils import _get_classes


    path = Path(path).expanduser()
    reader = read_gguf(path)
    meta = Metadata(reader, path)
    try:
        tensors = {t.name: t for t in reader.tensors}
        config = gguf_config(meta, tensors)
        check_config_values(config, str(path))
        tokenizer, eos_ids = gguf_tokenizer(meta, config["vocab_size"])
    except ValueError:
        raise
    except Exception as e:  # gguf / tokenizers errors on values the checks above let through
        raise ValueError(f"{path}: the GGUF metadata cannot be read ({type(e).__name__}: {e}); "
                         "the file is damaged") from e
    bos = meta.int("tokenizer.ggml.bos_token_id", None, high=1 << 31)
    config.update({"eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0]},
                  **({"bos_token_id": bos} if bos is not None else {}))
    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception as e:  # the architecture's own checks on the sizes
        raise ValueError(f"{path}: mlx-lm cannot build a {config['model_type']} model from this file's metadata "
                         f"({type(e).__name__}: {e})") from e
    plan = _load_weights(model, config, tensors, path, dtype)
    if keep_quantized:
        config["gguf_float_layers"] = _keep_blocks(model, config, tensors, plan, path)
    mx.eval(model.parameters())
    check_finite(model, str(path))
    try:
        mx.eval(model(mx.array([[0, 0]], dtype=mx.int32)))
    except Exception as e:
        raise ValueError(f"{path}: the imported model does not run ({type(e).__name__}: {e})") from e
    return model, tokenizer, config


def read_gguf_tensors(path) -> Dict[str, Tuple[GT, np.ndarray, Tuple[int, ...]]]:
    """``{name: (type, raw data, shape rows x columns)}`` of a GGUF file (for checks and reports)."""

    reader = read_gguf(Path(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = (GT(t.tensor_type), np.array(t.data), shape)
    return out
