"""Models from GGUF files (llama.cpp, Ollama, LM Studio): weights dequantized, tokenizer rebuilt.

``mlxqat.load("model.gguf")`` goes through :func:`load_gguf`: the file is
checked (:func:`mlxqat.validate.read_gguf`), its metadata becomes the mlx-lm
config of the architecture, every tensor is dequantized with the ``gguf``
package's reference code (one tensor at a time) into the mlx-lm model, and the
tokenizer is rebuilt from the vocabulary the file embeds. Nothing is written:
``mlxqat.save`` / ``python -m mlxqat.export X.gguf --format mlx`` make an
mlx-lm directory of the result.

What llama.cpp's converter changed is undone here, with the same helpers the
GGUF exporter uses (:mod:`mlxqat.gguf_export`): llama's query/key rows go back
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
import os
import stat
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType as VT

from . import gguf_export as ge
from .gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, SPM_SPACE

PathLike = Union[str, os.PathLike]

#: GGUF architecture -> mlx-lm ``model_type``.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
#: Tensor types that are dequantized (with ``gguf.quants``).
TENSOR_TYPES = (GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q4_K, GT.Q5_K, GT.Q6_K)

# llama.cpp's pre-tokenizer names (llama-vocab.cpp) grouped by the split they mean.
_GPT2_SPLIT = "gpt2"  # ByteLevel's own regex
_SMOLLM = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")
_GPT2 = ("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "exaone4")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
_LLAMA3_KEEP_MERGES = ("dbrx", "smaug-bpe")  # the Llama 3 split without ignore_merges
_QWEN2 = ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2")
#: Pre-tokenizer names this importer reproduces.
PRE_TOKENIZERS = tuple(sorted(_SMOLLM + _GPT2 + _LLAMA3 + _LLAMA3_KEEP_MERGES + _QWEN2))

# Token texts llama.cpp ends generation on (besides eos), when the vocabulary has them.
_END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                      "<|end_of_text|>", "<EOT>")
_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED = (int(gguf.TokenType[k]) for k in ("UNKNOWN", "CONTROL", "USER_DEFINED"))


def is_gguf_file(path: PathLike) -> bool:
    """True if ``path`` is a regular file named ``*.gguf`` or starting with the GGUF magic (an Ollama blob)."""
    p = Path(path).expanduser()
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return False
        if p.suffix.lower() == ".gguf":
            return True
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

_INTS = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
_FLOATS = (VT.FLOAT32, VT.FLOAT64)
_REQUIRED = object()


class Metadata:
    """Typed access to a GGUF file's key/value metadata; a missing or mistyped value is a ValueError."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def _missing(self, key: str, default):
        if default is _REQUIRED:
            raise ValueError(f"{self.path}: metadata {key!r} is missing; the GGUF file is incomplete or damaged")
        return default

    def _scalar(self, key: str, kinds, what: str, default):
        field = self.fields.get(key)
        if field is None:
            return self._missing(key, default)
        if len(field.types) != 1 or field.types[0] not in kinds:
            got = "/".join(t.name for t in field.types) or "nothing"
            raise ValueError(f"{self.path}: metadata {key!r} is {got}; expected {what}. The GGUF file is damaged")
        return field.parts[field.data[0]][0] if field.types[0] != VT.STRING else bytes(field.parts[field.data[0]])

    def int(self, key: str, default=_REQUIRED, low: int = 0, high: int = 1 << 31) -> int:
        value = self._scalar(key, _INTS, "an integer", default)
        if value is default:
            return value
        value = int(value)
        if not low <= value <= high:
            raise ValueError(f"{self.path}: metadata {key!r} = {value} is outside [{low}, {high}]; the file is damaged")
        return value

    def float(self, key: str, default=_REQUIRED, positive: bool = True) -> float:
        value = self._scalar(key, _FLOATS + _INTS, "a number", default)
        if value is default:
            return value
        # the shortest decimal of a float32 value (1e-05, not 9.999999747378752e-06): the same float32
        value = float(str(value)) if isinstance(value, np.float32) else float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"{self.path}: metadata {key!r} = {value}; expected a finite positive number")
        return value

    def bool(self, key: str, default=_REQUIRED) -> bool:
        value = self._scalar(key, (VT.BOOL,), "true or false", default)
        return value if value is default else bool(value)

    def str(self, key: str, default=_REQUIRED) -> str:
        value = self._scalar(key, (VT.STRING,), "a string", default)
        return value if value is default else _utf8(value, key, self.path)

    def _array(self, key: str, kinds, what: str, default):
        field = self.fields.get(key)
        if field is None:
            return self._missing(key, default)
        if len(field.types) != 2 or field.types[0] != VT.ARRAY or field.types[1] not in kinds:
            got = "/".join(t.name for t in field.types) or "an empty array"
            raise ValueError(f"{self.path}: metadata {key!r} is {got}; expected an array of {what}")
        return field

    def strings(self, key: str, default=_REQUIRED) -> List[str]:
        field = self._array(key, (VT.STRING,), "strings", default)
        if field is default:
            return field
        return [_utf8(bytes(field.parts[i]), key, self.path) for i in field.data]

    def numbers(self, key: str, default=_REQUIRED, dtype=np.float64) -> np.ndarray:
        field = self._array(key, _FLOATS + _INTS, "numbers", default)
        if field is default:
            return field
        if not field.data:
            return np.zeros(0, dtype)
        return np.concatenate([field.parts[i] for i in field.data]).astype(dtype)


def _utf8(raw: bytes, key: str, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: metadata {key!r} is not valid UTF-8 ({e}); the file is damaged") from None


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


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
    arch = ge.ARCHS[model_type].gguf_arch
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(enum, n_layers)


def _load_weights(model: nn.Module, config: dict, tensors: dict, path: Path, dtype: mx.Dtype) -> None:
    """Dequantize every tensor into ``model`` (built from ``config``), undoing llama.cpp's conversions."""
    from mlx.utils import tree_flatten

    spec = ge.ARCHS[config["model_type"]]
    names = _name_map(config["model_type"], config["num_hidden_layers"])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
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
        w = _dequantize(tensors[gguf_name], path)
        kind = gguf_name.split(".")[-2]
        if spec.permute_qk and kind in heads:  # llama.cpp's interleaved rotary rows -> Hugging Face's halves
            w = ge.permute_rows(w, heads[kind], inverse=True)
        if spec.norm_shift and mlx_name.endswith("norm.weight"):
            w = w - np.float32(spec.norm_shift)  # mlx-lm adds it back: rms_norm(x, 1 + w)
        weights[mlx_name] = mx.array(w).astype(dtype)
        mx.eval(weights[mlx_name])
        del w
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _pre_tokenizer(pre: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level, False
    if pre in _SMOLLM:  # llama.cpp: "\p{N}" then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _LLAMA3 + _LLAMA3_KEEP_MERGES + _QWEN2:
        split = QWEN2_SPLIT if pre in _QWEN2 else LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), pre in _LLAMA3
    raise ValueError(
        f"{path}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer mlxqat's GGUF import cannot reproduce yet; "
        f"supported: {', '.join(PRE_TOKENIZERS)}"
    )


def _spm_merges(tokens: List[str], scores: np.ndarray) -> List[Tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece merging: the best-scored result first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-float(scores[i]), i, vocab[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _backend_tokenizer(meta: Metadata, tokens: List[str], types: np.ndarray, path: Path):
    """``(tokenizers.Tokenizer, add_space_prefix)`` as llama.cpp tokenizes with this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    model = meta.str("tokenizer.ggml.model")
    if model == "gpt2":
        merges = []
        vocab = {t: i for i, t in enumerate(tokens)}
        for m in meta.strings("tokenizer.ggml.merges"):
            cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            pair = (m[:cut], m[cut + 1:]) if cut > 0 else None
            if pair and pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab:
                merges.append(pair)
        pre, ignore_merges = _pre_tokenizer(meta.str("tokenizer.ggml.pre", ""), path)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        prefix = False
    elif model == "llama":
        scores = meta.numbers("tokenizer.ggml.scores", np.zeros(len(tokens)), dtype=np.float32)
        if len(scores) < len(tokens):
            raise ValueError(f"{path}: {len(scores)} tokenizer scores for {len(tokens)} tokens")
        unk = meta.int("tokenizer.ggml.unknown_token_id", 0, high=len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores), byte_fallback=True,
                                   unk_token=tokens[unk] if unk < len(tokens) else None, fuse_unk=True))
        prefix = meta.bool("tokenizer.ggml.add_space_prefix", True)
        steps = ([normalizers.Prepend(SPM_SPACE)] if prefix else []) + [normalizers.Replace(" ", SPM_SPACE)]
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence(
            [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported by mlxqat's GGUF import "
                         "(supported: gpt2, i.e. byte-level BPE, and llama, i.e. SentencePiece)")
    # llama.cpp matches control, user-defined and unknown tokens whole before splitting the text.
    special = [AddedToken(t, special=k != _TT_USER_DEFINED, normalized=False)
               for t, k in zip(tokens, types.tolist()) if k in (_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED)]
    tok.add_special_tokens([a for a in special if a.special])
    tok.add_tokens([a for a in special if not a.special])
    return tok, prefix


def gguf_tokenizer(meta: Metadata, n_vocab: int):
    """The file's tokenizer as an mlx-lm ``TokenizerWrapper`` (a Hugging Face fast tokenizer inside).

    Returns:
        ``(tokenizer, eos_token_ids)``.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    path = meta.path
    tokens = meta.strings("tokenizer.ggml.tokens")
    if not tokens or len(tokens) > n_vocab:
        raise ValueError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding has {n_vocab} rows; "
                         "the vocabulary does not belong to this model")
    if len(set(tokens)) != len(tokens):
        seen = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"{path}: token {dup!r} appears twice in tokenizer.ggml.tokens; the file is damaged")
    types = meta.numbers("tokenizer.ggml.token_type", np.ones(len(tokens)), dtype=np.int64)[: len(tokens)]
    if len(types) < len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens; the file is damaged")
    backend, prefix = _backend_tokenizer(meta, tokens, types, path)

    def token(key):
        i = meta.int(f"tokenizer.ggml.{key}_token_id", None, high=1 << 31)
        if i is not None and i >= len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id={i} is not a token id (< {len(tokens)})")
        return i

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    spm = meta.str("tokenizer.ggml.model") == "llama"
    add_bos = meta.bool("tokenizer.ggml.add_bos_token", spm or meta.str("tokenizer.ggml.pre", "") in _LLAMA3)
    add_eos = meta.bool("tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError(f"{path}: the tokenizer adds a bos/eos token but names none")
    single = " ".join(([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if add_eos else []))
    pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
    marks = {tokens[i]: i for i, on in ((bos, add_bos), (eos, add_eos)) if on}
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(marks.items()))
    named = {k: tokens[i] for k, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
             if i is not None}
    chat_template = meta.str("tokenizer.chat_template", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos,
                                   clean_up_tokenization_spaces=False, chat_template=chat_template, **named)
    index = {t: i for i, t in enumerate(tokens)}
    eos_ids = sorted({i for i in [eos] if i is not None}
                     | {index[t] for t in _END_OF_GENERATION if t in index})
    detok = (lambda t: SPMStreamingDetokenizer(t, trim_space=prefix)) if spm else BPEStreamingDetokenizer
    return TokenizerWrapper(fast, detok, eos_token_ids=eos_ids), eos_ids


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_gguf(path: PathLike, *, dtype: mx.Dtype = mx.float32) -> Tuple[nn.Module, object, dict]:
    """Load a GGUF file as an mlx-lm model, tokenizer and config (in memory; nothing is written).

    Args:
        path: a ``.gguf`` file of a llama, qwen2, qwen3 or gemma3 (text) model, with tensors of
            type F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K.
        dtype: the float type of the model's weights (default float32: quantized tensors are
            dequantized exactly, and MLX on the CPU computes fastest in float32).

    Returns:
        ``(model, tokenizer, config)``: an mlx-lm model with float weights, an mlx-lm
        ``TokenizerWrapper``, and the mlx-lm ``config.json`` dict (``mlxqat.save`` writes both).

    Raises:
        ValueError: a malformed file, an unsupported architecture, tensor type or tokenizer (named).
        FileNotFoundError: no such file.
    """
    from mlx_lm.utils import _get_classes

    from .validate import check_config_values, check_finite, read_gguf

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
    _load_weights(model, config, tensors, path, dtype)
    mx.eval(model.parameters())
    check_finite(model, str(path))
    try:
        mx.eval(model(mx.array([[0, 0]], dtype=mx.int32)))
    except Exception as e:
        raise ValueError(f"{path}: the imported model does not run ({type(e).__name__}: {e})") from e
    return model, tokenizer, config


__all__ = ["ARCHITECTURES", "PRE_TOKENIZERS", "TENSOR_TYPES", "Metadata", "gguf_config", "gguf_tokenizer",
           "is_gguf_file", "load_gguf"]
