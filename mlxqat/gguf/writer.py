"""GGUF files for llama.cpp, Ollama and LM Studio, written from MLX models.

Quantized layers that a GGUF block type holds exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0:
:mod:`mlxqat.gguf.blocks`) are *repacked* bit for bit, never re-rounded. Any
other layer is dequantized and re-quantized to the requested type with llama.cpp's quantizer for it
(:func:`mlxqat.gguf.blocks.quantize_blocks`; weighted by an importance matrix when one is given: :mod:`.imatrix`);
:mod:`mlxqat.export` then measures what that costs.

Tensor names come from :class:`gguf.TensorNameMap`; llama's query/key rows are
reordered to the interleaved rotary layout llama.cpp expects; Gemma 3 norm
weights get the ``+1`` that mlx-lm applies at run time; the tokenizer is
embedded (:mod:`mlxqat.gguf.tokenizer`) so llama.cpp splits text as the
model's own tokenizer does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import re

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType as GT
from mlx.utils import tree_flatten

from .. import quant
from .._version import __version__
from ..convert import head_path
from . import kquants
from .blocks import EXACT_TYPES, KQUANT_TYPES, WEIGHTED_TYPES, exact_blocks, quantize_blocks
from .format import GGUFExportError
from .tokenizer import add_tokenizer

#: ``--type`` names and their GGUF tensor types.
QTYPES: Dict[str, GT] = {
    "q4_0": GT.Q4_0,
    "q4_1": GT.Q4_1,
    "q5_0": GT.Q5_0,
    "q5_1": GT.Q5_1,
    "q8_0": GT.Q8_0,
    "q4_k": GT.Q4_K,
    "q5_k": GT.Q5_K,
    "q6_k": GT.Q6_K,
    "f16": GT.F16,
    "bf16": GT.BF16,
    "f32": GT.F32,
}


_FILE_TYPES = {
    GT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    GT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    GT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    GT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    GT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    GT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    GT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    GT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    GT.F16: gguf.LlamaFileType.MOSTLY_F16,
    GT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    GT.F32: gguf.LlamaFileType.ALL_F32,
}


_FLOAT_TYPES = (GT.F32, GT.F16, GT.BF16)

#: ``--type`` names of llama.cpp's type mixes: ``{name: (main type, file type)}``; each tensor's type is
#: :func:`mix_type`'s
MIXES: Dict[str, Tuple[GT, "gguf.LlamaFileType"]] = {"q4_k_m": (GT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M)}


def mix_type(mix: str, gguf_name: str, cols: int, n_layers: int, head: bool) -> GT:
    """The type llama.cpp's ``mix`` gives the matrix ``gguf_name`` (``blk.3.ffn_down``, without ``.weight``) of
    ``cols`` columns in a model of ``n_layers`` blocks; ``head``: it computes the logits (``output``, or the
    token embedding of a model that ties them)."""
    if mix != "q4_k_m":
        raise ValueError(f"mix={mix!r} is not one of {sorted(MIXES)}")
    block = re.match(r"blk\.(\d+)\.(.+)$", gguf_name)
    leaf = block.group(2) if block else gguf_name
    kind = "output" if head else leaf if leaf in kquants.Q4_K_M_KINDS else "other"
    return kquants.q4_k_m_type(kind, int(block.group(1)) if block else None, n_layers, cols)


_HEAD_AT_Q8 = (GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1)  # block types whose files keep the output head at Q8_0


@dataclass(frozen=True)
class ArchSpec:
    """How one mlx-lm ``model_type`` is written as a GGUF architecture."""

    gguf_arch: str  # llama.cpp's architecture name
    permute_qk: bool = False  # llama: HF rotary layout -> llama.cpp's interleaved one
    norm_shift: float = 0.0  # gemma: mlx-lm computes rms_norm(x, 1 + w)


ARCHS: Dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma3_text": ArchSpec("gemma3", norm_shift=1.0),
}


@dataclass
class GGUFTensor:
    """One tensor of the GGUF file, and where it came from."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    source: str  # MLX parameter path, e.g. "model.layers.0.self_attn.q_proj.weight"
    qtype: GT
    data: np.ndarray  # what is written: raw blocks (uint8) or float values
    shape: Tuple[int, ...]  # logical shape (rows, columns)
    exact: bool  # dequantizes to exactly the MLX weight
    note: str = ""  # how it was made (repacked, re-quantized, cast, why not exact)
    n_head: Optional[int] = None  # rows were permuted for llama's rotary layout

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantized(self) -> np.ndarray:
        """The float32 values llama.cpp computes with, in MLX's row order."""
        if self.qtype in (GT.F32, GT.F16):
            w = self.data.astype(np.float32)
        else:
            w = gguf.quants.dequantize(self.data, self.qtype)
        w = w.reshape(self.shape)
        if self.n_head is not None:
            w = permute_rows(w, self.n_head, inverse=True)
        return w


def permute_rows(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """Reorder the rows of a query/key projection between rotary layouts.

    mlx-lm's llama rotates pairs ``(i, i + head_dim/2)`` of each head (the
    Hugging Face layout); llama.cpp's llama rotates neighbours ``(2i, 2i+1)``.
    Whole rows move, so a quantized row keeps its codes, scales and biases.
    """
    n = w.shape[0]
    half = n // n_head // 2
    if not inverse:
        out = w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2)
    else:
        out = w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2)
    return out.reshape(w.shape)


def _np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _float_tensor(w: mx.array, qtype: GT) -> Tuple[np.ndarray, GT, bool]:
    """A float matrix as ``qtype`` (F32/F16/BF16): (data, type, exact)."""
    w32 = _np32(w)
    if qtype == GT.F32:
        return w32, GT.F32, True
    w = w.astype(mx.float32)
    if qtype == GT.F16:
        with np.errstate(over="ignore"):
            h = w32.astype(np.float16)
        return h, GT.F16, quant.holds_exactly(mx.float16, w)
    b = np.array(w.astype(mx.bfloat16).view(mx.uint16)).view(np.uint8)
    return b, GT.BF16, quant.holds_exactly(mx.bfloat16, w)


def _dtype_type(dtype: mx.Dtype) -> GT:
    return {mx.float16: GT.F16, mx.bfloat16: GT.BF16}.get(dtype, GT.F32)


def arch_spec(model_type: str) -> ArchSpec:
    """The GGUF architecture of an mlx-lm ``model_type``.

    Raises:
        GGUFExportError: for an architecture this exporter cannot express.
    """
    if model_type not in ARCHS:
        raise GGUFExportError(
            f"model_type={model_type!r} cannot be exported to GGUF by mlxqat yet; supported "
            f"architectures are {sorted(ARCHS)}. Export it with --format mlx (mlx-lm) instead"
        )
    return ARCHS[model_type]


def _check_arch(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse settings llama.cpp's implementation of the architecture would compute differently."""
    a = model.args
    if spec.gguf_arch == "llama":
        if any(t != "full_attention" for t in (getattr(a, "layer_types", None) or [])):
            raise GGUFExportError(
                "this llama model has sliding-window layers (layer_types); llama.cpp's llama "
                "architecture has none, so the GGUF would compute something else"
            )
    rs = getattr(a, "rope_scaling", None)
    if rs:
        kind = rs.get("type") or rs.get("rope_type", "default")
        if kind not in ("default", "linear") and not (kind == "llama3" and spec.gguf_arch == "llama"):
            raise GGUFExportError(
                f"rope_scaling type {kind!r} is not supported by the GGUF exporter (supported: "
                "linear, and llama3 for llama models); remove it from config.json only if the "
                "model was trained without it"
            )
    if spec.gguf_arch == "gemma3":
        head_dim = a.head_dim
        scale_ok = a.query_pre_attn_scalar == (
            a.hidden_size // a.num_attention_heads if a.num_hidden_layers == 62 else head_dim
        )
        if not scale_ok:
            raise GGUFExportError(
                f"gemma3: query_pre_attn_scalar={a.query_pre_attn_scalar} is not what llama.cpp "
                f"assumes for a {a.num_hidden_layers}-layer model (head_dim={head_dim}); not exportable"
            )
        n, p = a.num_hidden_layers, a.sliding_window_pattern
        if {i for i in range(n) if i % p == p - 1} != {i for i in range(n) if i % 6 == 5}:
            raise GGUFExportError(
                f"gemma3: sliding_window_pattern={p} places global-attention layers where "
                "llama.cpp (pattern 6) does not; not exportable"
            )
        if a.rope_local_base_freq != 10000.0:
            raise GGUFExportError(
                f"gemma3: rope_local_base_freq={a.rope_local_base_freq}; llama.cpp fixes it at 10000"
            )


@functools.lru_cache(maxsize=8)
def _name_map(gguf_arch: str, n_layers: int) -> "gguf.TensorNameMap":
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[_arch_enum(gguf_arch)], n_layers)


def gguf_base_name(model: nn.Module, path: str) -> Optional[str]:
    """The GGUF tensor name (without ``.weight``) of ``model``'s module at ``path`` (``model.layers.0.self_attn.q_proj``
    -> ``blk.0.attn_q``), or None when llama.cpp's architecture for the model has none."""
    return _name_map(arch_spec(model.args.model_type).gguf_arch, model.args.num_hidden_layers).get_name(path)


def plan_tensors(model: nn.Module, qtype: GT, model_type: str, mix: Optional[str] = None,
                 importance: Optional[Dict[str, np.ndarray]] = None) -> List[GGUFTensor]:
    """Decide the GGUF form of every parameter of ``model`` (nothing is written).

    Quantized layers are repacked exactly when their numbers fit a GGUF block
    type (the requested one, else another exact one), and re-quantized to
    ``qtype`` otherwise. For a block ``qtype``, full-precision matrices keep
    their dtype when the model has quantized layers (a recipe left them in
    full precision on purpose) and are quantized when it has none. A float
    ``qtype`` (F32/F16/BF16) applies to every matrix. Norms and biases are
    float32. A full-precision model written as a 4- or 5-bit block type keeps its
    output head (``lm_head``, or the tied embedding) at ``Q8_0``, as recipe
    ``q4_0`` does: round-to-nearest to the same file a QAT run exports. ``mix``
    (``"q4_k_m"``, :data:`MIXES`): each matrix's type is llama.cpp's for it in that
    mix (:func:`mix_type`) instead of ``qtype``. ``importance`` (GGUF tensor name -> mean squared activation
    per input column, :meth:`mlxqat.gguf.imatrix.ImportanceMatrix.importance`): the tensors that are quantized
    or re-quantized use llama.cpp's importance-weighted algorithms, as ``llama-quantize --imatrix`` does.
    """
    importance = importance or {}
    spec = arch_spec(model_type)
    _check_arch(model, spec)
    args = model.args
    n_layers = args.num_hidden_layers
    name_map = _name_map(spec.gguf_arch, n_layers)
    modules = dict(model.named_modules())
    params = dict(tree_flatten(model.parameters()))
    quantized = {p for p, m in modules.items() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    any_quantized = bool(quantized)
    n_head, n_kv = args.num_attention_heads, getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head = head_path(model)
    plan: List[GGUFTensor] = []
    for path, value in params.items():
        prefix, _, leaf = path.rpartition(".")
        if leaf == "act_scale" or (prefix in quantized and leaf in ("scales", "biases")):
            continue
        base = name_map.get_name(prefix)
        if base is None:
            raise GGUFExportError(
                f"{path}: no GGUF tensor name for {prefix!r} in llama.cpp's {spec.gguf_arch!r} "
                "architecture; this model has a layer the GGUF format of that architecture lacks"
            )
        name = f"{base}.{leaf}"
        heads = None
        if spec.permute_qk and not getattr(args, "rope_traditional", False):
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(base.rsplit(".", 1)[-1])
        want = qtype
        if mix is not None and (leaf == "weight" and (prefix in quantized or value.ndim == 2)):
            cols = value.shape[-1] * 32 // modules[prefix].bits if prefix in quantized else value.shape[-1]
            want = mix_type(mix, base, cols, n_layers, prefix == head)
        if prefix in quantized and leaf == "weight":
            plan.append(_quantized_tensor(name, path, modules[prefix], want, heads, only=mix is not None,
                                          importance=importance.get(name)))
        elif value.ndim == 2:
            keep = any_quantized and qtype not in _FLOAT_TYPES
            target = _dtype_type(value.dtype) if keep else want
            if not any_quantized and mix is None and qtype in _HEAD_AT_Q8 and prefix == head:
                target = GT.Q8_0
            plan.append(_matrix_tensor(name, path, value, target, heads, any_quantized, importance.get(name)))
        else:
            plan.append(_vector_tensor(name, path, value, spec, heads))
    plan.extend(_rope_freqs(model, spec))
    return plan


def _arch_enum(gguf_arch: str) -> str:
    return next(k.name for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)


def _quantized_tensor(name, path, m, qtype, heads, only: bool = False, importance=None) -> GGUFTensor:
    """``only``: the layer is exact in ``qtype`` or re-quantized to it (a mix's tensor: no other type stands in)."""
    mode = getattr(m, "mode", "affine")
    words = np.array(m.weight)
    n = words.shape[0]
    k = words.shape[1] * 32 // m.bits
    note = ""
    if mode == "affine" and qtype not in _FLOAT_TYPES:
        scales, biases = _np32(m.scales), _np32(m.biases)
        candidates = [qtype] + ([] if only else [t for t in EXACT_TYPES if t != qtype])
        reasons = []
        for t in candidates:
            blocks, why = exact_blocks(words, scales, biases, m.bits, m.group_size, t)
            if blocks is not None:
                if heads:
                    blocks = permute_rows(blocks, heads)
                how = "repacked exactly" + ("" if t == qtype else f" (as {t.name}: {qtype.name} {reasons[0]})")
                return GGUFTensor(name, path, t, blocks, (n, k), True, how, heads)
            reasons.append(why)
        note = reasons[0]
    elif mode != "affine":
        note = f"mode={mode!r} has no GGUF block form"
    w = quant.dequantized_weight(m)
    if qtype in _FLOAT_TYPES:
        t = _matrix_tensor(name, path, w, qtype, heads, True)
        t.note = f"dequantized to {t.qtype.name}" + ("" if t.exact else " (values not exact in that type)")
        return t
    return _requantized(name, path, _np32(w), qtype, heads, f"re-quantized to {qtype.name}: {note}", importance)


def _requantized(name, path, w32, qtype, heads, note, importance=None) -> GGUFTensor:
    if heads:
        w32 = permute_rows(w32, heads)
    if w32.shape[-1] % 32:
        h = w32.astype(np.float16)
        return GGUFTensor(name, path, GT.F16, h, w32.shape, False, note + f"; {w32.shape[-1]} columns: kept as F16", heads)
    if qtype in KQUANT_TYPES and w32.shape[-1] % kquants.QK_K:  # llama.cpp's fallback for rows K-quants cannot hold
        qtype = kquants.FALLBACK[qtype]
        note += f"; {w32.shape[-1]} columns: {qtype.name}, as llama.cpp writes such rows"
    if importance is not None and qtype in WEIGHTED_TYPES:
        if np.shape(importance) != (w32.shape[-1],):
            raise GGUFExportError(f"{name}: the importance matrix has {np.size(importance)} columns for it; the "
                                  f"model's has {w32.shape[-1]} (an importance matrix of another model?)")
        if not np.any(np.asarray(importance) > 0):  # llama.cpp's weighted quantizers would zero the tensor
            importance = None
            note += " (its importance is all zero: quantized without it)"
        else:
            note += " (importance-weighted)"
    else:
        importance = None
    return GGUFTensor(name, path, qtype, quantize_blocks(w32, qtype, importance), w32.shape, False, note, heads)


def _matrix_tensor(name, path, w: mx.array, target: GT, heads, keep_float: bool, importance=None) -> GGUFTensor:
    if target in _FLOAT_TYPES:
        data, t, exact = _float_tensor(w, target)
        if heads:
            data = permute_rows(data, heads)
        note = "full precision" if exact else f"cast to {t.name}"
        return GGUFTensor(name, path, t, data, tuple(w.shape), exact, note, heads)
    return _requantized(name, path, _np32(w), target, heads, f"full-precision weight quantized to {target.name}",
                        importance)


def _vector_tensor(name, path, value: mx.array, spec: ArchSpec, heads) -> GGUFTensor:
    note = "float32"
    if spec.norm_shift and path.endswith("norm.weight"):
        # The same addition mlx-lm does at run time, in the parameter's dtype.
        value = spec.norm_shift + value
        note = f"float32, +{spec.norm_shift:g} folded in"
    w = _np32(value)
    if heads:  # attention biases of q/k follow their rows
        w = permute_rows(w, heads)
    return GGUFTensor(name, path, GT.F32, w, tuple(w.shape), True, note, None)


def _rope_freqs(model: nn.Module, spec: ArchSpec) -> List[GGUFTensor]:
    """llama3 rotary scaling: llama.cpp divides its frequencies by ``rope_freqs``."""
    rope = getattr(model.layers[0].self_attn, "rope", None)
    freqs = getattr(rope, "_freqs", None)
    if freqs is None or spec.gguf_arch != "llama":
        return []
    dims = rope.dims
    base = model.args.rope_theta
    # mlx-lm's _freqs are scaled wavelengths base**(2i/d) * factor_i; the factor is what GGUF stores.
    factors = _np32(freqs) / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    f = factors.astype(np.float32)
    return [GGUFTensor("rope_freqs.weight", "(llama3 rope scaling)", GT.F32, f, f.shape, True, "float32")]


def _add_hparams(w: gguf.GGUFWriter, model: nn.Module, spec: ArchSpec) -> None:
    a = model.args
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    w.add_context_length(int(getattr(a, "max_position_embeddings", None) or 4096))
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_hidden_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_attention_heads)
    w.add_head_count_kv(getattr(a, "num_key_value_heads", None) or a.num_attention_heads)
    w.add_layer_norm_rms_eps(float(a.rms_norm_eps))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(a.rope_theta))
    w.add_vocab_size(a.vocab_size)
    rs = getattr(a, "rope_scaling", None)
    if rs and (rs.get("type") or rs.get("rope_type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if spec.gguf_arch == "gemma3":
        w.add_sliding_window(int(a.sliding_window))


def write_gguf(
    path: Path,
    model: nn.Module,
    tokenizer,
    tokenizer_dir: Path,
    plan: List[GGUFTensor],
    qtype: GT,
    *,
    name: str = "model",
    extra: Optional[Dict[str, str]] = None,
    mix: Optional[str] = None,
) -> None:
    """Write ``plan`` with the model's metadata and tokenizer to ``path`` (not atomic: see export); the file type
    is ``qtype``'s, or that of ``mix`` (:data:`MIXES`)."""
    spec = arch_spec(model.args.model_type)
    w = gguf.GGUFWriter(str(path), spec.gguf_arch)
    try:
        w.add_name(name)
        w.add_file_type(int(MIXES[mix][1] if mix else _FILE_TYPES[qtype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("general.quantized_by", f"mlxqat {__version__}")
        for k, v in (extra or {}).items():
            w.add_string(k, v)
        _add_hparams(w, model, spec)

        add_tokenizer(w, tokenizer, tokenizer_dir, model.args.vocab_size)
        for t in plan:
            if t.qtype in (GT.F32, GT.F16):
                w.add_tensor(t.name, np.ascontiguousarray(t.data))
            else:
                w.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
