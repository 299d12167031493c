"""Quantization numerics: the one place that says what a quantized weight is.

Storage is MLX's affine format: integer codes packed LSB-first into uint32
words, one ``scale`` and one ``bias`` per group of ``group_size`` consecutive
input features, and the dequantized weight ``scale * code + bias``.

Three ways of choosing scales and biases share that format:

* ``affine``     MLX's own quantizer (``mx.quantize``): min/max per group.
* ``symmetric``  llama.cpp's Q4_0 rule generalised to any bit width: the value
                 of largest magnitude ``m`` in a group gives
                 ``scale = m / -2**(bits-1)`` (rounded to float16, as GGUF
                 stores it) and ``bias = -2**(bits-1) * scale``.
* channel-wise   ``group_size=-1``: one scale/bias per output row, stored as the
                 same value repeated over every storage group of that row.
* ``zeropoint``  affine with a whole number of steps as offset: ``bias = -k * scale``,
                 ``k`` an integer in ``0 .. 2**bits - 1`` (:func:`integer_offsets`): the
                 integer zero point of compressed-tensors, GPTQ and AWQ checkpoints
                 that transformers and vLLM run (:mod:`mlxqat.hf`).
* ``kquant``     GGUF's Q4_K / Q5_K / Q6_K: groups of 32 whose scales and offsets are
                 themselves 6-bit integers against two float16 numbers per
                 256 weights (``scale = d * sc``, ``bias = -dmin * m``,
                 :func:`kquant_grid`); they start from llama.cpp's reference
                 quantizer (:func:`mlxqat.gguf.kquants.quantize`) and are kept
                 in float32, where those products are exact. At 6 bits, Q6_K
                 with its 16-weight sub-blocks in pairs: ``scale = d * sc``
                 with ``sc`` a signed 8-bit integer, ``bias = -32 * scale``.

Every fake-quant forward goes through :func:`mx.dequantize` on the packed codes,
so the fake-quant weight and the weight of the converted layer are the same
bits, whatever the backend does inside ``dequantize``.

This module is about 750 lines, past the project's 600: every rule for what a
stored scale and offset may be (affine, symmetric, K-quant, whole-step zero
point) lives here beside the fake-quant gradients that keep them, so that one
file owns the numerics contract.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .gguf.kquants import FALLBACK as KTYPE_FALLBACK
from .gguf.kquants import QK_K, qtype_of
from .gguf.kquants import quantize as kquant_quantize

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
CHANNELWISE = -1
MODES = ("affine", "symmetric", "kquant", "zeropoint")
LEARNED_SCALE_MODES = ("affine", "kquant", "zeropoint")  # modes whose per-group scales and offsets can train
FREE_OFFSET_MODES = ("affine",)  # modes whose offsets are free floats (QA-LoRA merges adapters into them)
KQUANT_BITS = (4, 5, 6)  # Q4_K, Q5_K and Q6_K
KQUANT_SUPER = QK_K  # weights per K-quant super-block: a row's length must be a multiple of it
KQUANT_SUBS = 8  # groups of 32 per super-block
# by bits: the recipe of rows that are not a multiple of 256 (llama.cpp's fallback types)
KQUANT_FALLBACK = {b: KTYPE_FALLBACK[qtype_of(b)].name.lower() for b in KQUANT_BITS}
KQUANT6_HALF = 32  # a Q6_K weight is scale * (code - 32)


def storage_group_size(group_size: int, in_features: int) -> int:
    """The group size used in storage for a layer with ``in_features`` inputs.

    Channel-wise quantization (``group_size=-1``) is stored with the largest
    supported group size that divides ``in_features``.

    Raises:
        ValueError: if no supported group size divides ``in_features``.
    """
    if group_size != CHANNELWISE:
        if in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features}; "
                f"use a group size from {SUPPORTED_GROUP_SIZES} that divides it"
            )
        return group_size
    for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(
        f"in_features={in_features} is not a multiple of 32, so it cannot be "
        "stored in MLX's quantized format; skip this layer in the recipe"
    )


def bits_per_weight(bits: int, group_size: int, in_features: int, scale_bits: int = 16) -> float:
    """Stored bits per weight: the code plus one scale and one bias per storage group.

    The one rule for every report (``LayerSpec.bits_per_weight``, the bit
    allocation of :mod:`mlxqat.mixed`, :func:`mlxqat.footprint.memory_report`).
    Channel-wise layers store their per-row scale once per storage group
    (:func:`storage_group_size`), so they cost what that group size costs.

    Args:
        bits: code bits.
        group_size: 32, 64, 128, or -1 (channel-wise).
        in_features: the layer's input width (decides a channel-wise storage group).
        scale_bits: bits of one stored scale (and of one bias): 16 for the
            float16/bfloat16 files mlxqat writes, 32 for float32 scales.
    """
    return bits + 2 * scale_bits / storage_group_size(group_size, in_features)


def snap_to(dtype: mx.Dtype, x: mx.array) -> mx.array:
    """``x`` rounded to the nearest ``dtype`` values, kept in ``x.dtype``.

    Scales and biases snapped to float16 are stored losslessly in float16
    files and GGUF block headers; the codes must then be computed from the
    snapped values (as :func:`init_params` does).
    """
    return x.astype(dtype).astype(x.dtype)


def holds_exactly(dtype: mx.Dtype, x) -> bool:
    """Whether every value of ``x`` (an MLX or NumPy array) is a ``dtype`` value (casting loses nothing)."""
    x = mx.array(x) if not isinstance(x, mx.array) else x
    return bool(mx.array_equal(snap_to(dtype, x), x).item())


def compact(scales: mx.array, biases: mx.array, dtype: mx.Dtype = mx.float16) -> Optional[Tuple[mx.array, mx.array]]:
    """``(scales, biases)`` stored as ``dtype`` when that loses nothing, else None.

    Float32 scales snapped to float16 (``scale_dtype="float16"``) take half
    the bytes this way and keep every value.
    """
    if scales.dtype == dtype or biases is None or biases.dtype != scales.dtype:
        return None
    if not (holds_exactly(dtype, scales) and holds_exactly(dtype, biases)):
        return None
    return scales.astype(dtype), biases.astype(dtype)


def _grouped(w: mx.array, group_size: int) -> mx.array:
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _expand(p: mx.array, group_size: int) -> mx.array:
    """Per-group parameters (..., K/g) broadcast to (..., K/g, 1)."""
    return p[..., None]


def check_finite(w: mx.array, name: str = "weight") -> None:
    """Raise ``ValueError`` if ``w`` holds NaN or Inf (quantizing them is silent garbage)."""
    if not bool(mx.all(mx.isfinite(w)).item()):
        n_bad = int(mx.sum(~mx.isfinite(w)).item())
        raise ValueError(
            f"{name} has {n_bad} NaN/Inf values; quantization would hide them. "
            "Fix the checkpoint (or the training run that produced it) first"
        )


def init_params(
    w: mx.array,
    bits: int,
    group_size: int,
    mode: str,
    scale_dtype: Optional[str] = None,
    importance: Optional[np.ndarray] = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Quantize ``w`` (out_features, in_features) with the rule of ``mode``.

    ``importance`` (in_features,), mode ``kquant`` only: the mean squared input of each column, for
    llama.cpp's importance-weighted K-quant algorithm (:func:`mlxqat.gguf.kquants.quantize`).

    ``scale_dtype="float16"`` rounds scales and biases to float16 values (kept
    in ``w.dtype``) and recomputes the codes, so the result is exactly
    representable in GGUF's float16 block headers.

    Returns:
        ``(packed, scales, biases)`` in MLX's affine storage format, scales and
        biases in ``w.dtype``.
    """
    in_features = w.shape[-1]
    g = storage_group_size(group_size, in_features)
    if mode == "kquant":
        return _kquant_params(w, bits, group_size, importance)
    if importance is not None:
        raise ValueError(f"an importance matrix weights mode 'kquant' only, not mode={mode!r}")
    if mode == "zeropoint":  # the range stretched to hold 0 (a whole step then lands on it), as GPTQ does
        scales, lo = _zeropoint_range(w, bits, group_size, g)
        if scale_dtype is not None:
            scales = snap_to(getattr(mx, scale_dtype), scales)
        biases = integer_offsets(scales, lo, bits)
        return pack(quantize_codes(w, scales, biases, bits, g), bits), scales, biases
    if mode == "affine" and group_size != CHANNELWISE:
        packed, scales, biases = mx.quantize(w, g, bits)
        if scale_dtype is None:
            return packed, scales, biases
    elif mode == "symmetric":
        scales, biases = _symmetric_scales(w, bits, group_size, g)
    elif mode == "affine":
        scales, biases = _channel_affine_scales(w, bits, g)
    else:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if scale_dtype is not None:
        scales, biases = snap_to(getattr(mx, scale_dtype), scales), snap_to(getattr(mx, scale_dtype), biases)
    codes = quantize_codes(w, scales, biases, bits, g)
    return pack(codes, bits), scales, biases


def _kquant_params(w: mx.array, bits: int, group_size: int, importance: Optional[np.ndarray] = None
                   ) -> Tuple[mx.array, mx.array, mx.array]:
    """llama.cpp's round-to-nearest Q4_K / Q5_K / Q6_K (sub-blocks in pairs) of ``w`` as MLX affine arrays
    (float32 scales and biases); importance-weighted with ``importance``."""
    if group_size != 32 or w.shape[-1] % KQUANT_SUPER:
        raise ValueError(f"mode 'kquant' needs group_size 32 and rows of a multiple of {KQUANT_SUPER} weights "
                         f"(got group_size={group_size}, {w.shape[-1]} weights a row)")
    parts = kquant_quantize(np.array(w.astype(mx.float32)), qtype_of(bits), paired=bits == 6, importance=importance)
    scales, biases = parts.scales_biases(qtype_of(bits))
    if bits == 6:  # Q6_K's sub-blocks of 16 in pairs: one MLX group of 32 each
        scales, biases = scales[..., ::2], biases[..., ::2]
    # float32 whatever w's dtype: the products d * sc need it
    return pack(mx.array(parts.codes.astype(np.uint32)), bits), mx.array(scales), mx.array(biases)


def _make_integer_offsets(bits: int):
    top = 2**bits - 1

    @mx.custom_function
    def snap(scales, biases):
        s = scales.astype(mx.float32)
        safe = mx.where(s == 0, mx.ones_like(s), s)
        k = mx.clip(mx.round(-biases.astype(mx.float32) / safe), 0, top)
        return mx.where(s == 0, biases.astype(mx.float32), -k * s).astype(biases.dtype)

    @snap.vjp
    def snap_vjp(primals, cotangent, output):
        return mx.zeros_like(primals[0]), cotangent  # straight through to the float offsets

    return snap


def integer_offsets(scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """``biases`` moved to a whole number of steps: ``-k * scale`` with ``k = clip(round(-bias / scale), 0,
    2**bits - 1)`` (a group whose scale is 0 keeps its bias). Values already there come back unchanged; the
    gradient passes straight through to the biases."""
    key = ("zeropoint", bits)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_integer_offsets(bits)
    return _FQ_CACHE[key](scales, biases)


def _at_top(values: mx.array, idx: mx.array) -> mx.array:
    """True at position ``idx`` (..., 1) of the last axis of ``values``."""
    return mx.arange(values.shape[-1]) == idx


def _kquant_round(values: mx.array, top: mx.array) -> mx.array:
    """``values`` (..., 8) as ``unit * clip(round(values / unit), 0, 63)`` with ``unit = float16(top / 63)``, the
    largest at exactly 63 units (a subnormal ``unit`` is too coarse for ``top / unit`` to round to 63 by itself;
    without it, applying the grid twice could move the values)."""
    unit = snap_to(mx.float16, top / 63.0)
    safe = mx.where(unit == 0, mx.ones_like(unit), unit)
    ints = mx.clip(mx.round(values / safe[..., None]), 0, 63)
    ints = mx.where(_at_top(values, mx.argmax(values, axis=-1, keepdims=True)), 63.0, ints)
    return mx.where((unit == 0)[..., None], mx.zeros_like(values), unit[..., None] * ints)


def _make_kquant_grid():
    @mx.custom_function
    def grid(scales, biases):
        shape = scales.shape
        s = scales.astype(mx.float32).reshape(*shape[:-1], -1, KQUANT_SUBS)
        m = -biases.astype(mx.float32).reshape(*shape[:-1], -1, KQUANT_SUBS)
        s_top, m_top = mx.maximum(mx.max(s, axis=-1), 0.0), mx.maximum(mx.max(m, axis=-1), 0.0)
        sq = _kquant_round(s, s_top).reshape(shape)
        bq = -_kquant_round(m, m_top).reshape(shape)
        return sq.astype(scales.dtype), bq.astype(biases.dtype)

    @grid.vjp
    def grid_vjp(primals, cotangents, outputs):
        return tuple(cotangents)  # straight through: the float32 masters train, the grid is applied in each forward

    return grid


def _make_kquant6_grid():
    @mx.custom_function
    def grid(scales, biases):
        shape = scales.shape
        s = scales.astype(mx.float32).reshape(*shape[:-1], -1, KQUANT_SUBS)
        idx = mx.argmax(mx.abs(s), axis=-1, keepdims=True)
        top = mx.take_along_axis(s, idx, axis=-1)[..., 0]  # the signed scale of largest magnitude
        unit = snap_to(mx.float16, top / -128.0)  # llama.cpp's d: the largest scale is -128 of it
        safe = mx.where(unit == 0, mx.ones_like(unit), unit)
        ints = mx.clip(mx.round(s / safe[..., None]), -128, 127)
        ints = mx.where(_at_top(s, idx), -128.0, ints)  # exactly, as llama.cpp's: a subnormal d rounds it otherwise
        sq = mx.where((unit == 0)[..., None], mx.zeros_like(s), unit[..., None] * ints).reshape(shape)
        return sq.astype(scales.dtype), (-KQUANT6_HALF * sq).astype(biases.dtype)

    @grid.vjp
    def grid_vjp(primals, cotangents, outputs):
        ds, db = cotangents  # bias = -32 * scale: its gradient reaches the scale; the stored bias is not free
        return ds - KQUANT6_HALF * db, mx.zeros_like(primals[1])

    return grid


def kquant_grid(scales: mx.array, biases: mx.array, bits: int = 4) -> Tuple[mx.array, mx.array]:
    """Per-group ``scales`` and ``biases`` (..., K/32) moved onto GGUF's K-quant grid: in each run of 8 groups
    (256 weights), ``scale = d * sc`` and ``bias = -dmin * m`` with ``sc``, ``m`` integers in 0..63 and
    ``d = float16(max scale / 63)``, ``dmin = float16(max -bias / 63)`` (llama.cpp's rule). ``bits=6`` (Q6_K):
    ``scale = d * sc`` with ``sc`` in -128..127, ``d = float16(-s / 128)`` for the scale ``s`` of largest
    magnitude, and ``bias = -32 * scale``. Values on such a grid, whose largest integer in each run is 63 (-128
    for Q6_K: what llama.cpp's reference quantizer and mlxqat write), come back unchanged, so a saved model reads
    back as it trained; a file quantized with fewer steps at the top (an importance-matrix quantization) would
    move, and fine-tuning refuses it. The gradient passes straight through."""
    if scales.shape[-1] % KQUANT_SUBS:
        raise ValueError(f"{scales.shape[-1]} groups a row: K-quant scales come in runs of {KQUANT_SUBS}")
    if bits not in KQUANT_BITS:
        raise ValueError(f"bits={bits!r}: the K-quants are {KQUANT_BITS}-bit")
    key = ("kquant_grid", bits == 6)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_kquant6_grid() if bits == 6 else _make_kquant_grid()
    return _FQ_CACHE[key](scales, biases)


def _symmetric_scales(w, bits, group_size, g):
    half = 2 ** (bits - 1)
    if group_size == CHANNELWISE:
        wg = w[..., None, :]  # (N, 1, K): one group per row
    else:
        wg = _grouped(w, g)  # (N, K/g, g)
    # The element of largest magnitude, with its sign (llama.cpp's rule): it
    # lands exactly on code 0, so the whole range [-half, half-1] is used.
    idx = mx.argmax(mx.abs(wg), axis=-1, keepdims=True)
    signed_max = mx.take_along_axis(wg, idx, axis=-1)[..., 0].astype(mx.float32)
    scales = snap_to(mx.float16, signed_max / -half).astype(w.dtype)  # GGUF stores float16
    if group_size == CHANNELWISE:
        scales = mx.repeat(scales, w.shape[-1] // g, axis=-1)
    biases = scales * -half
    return scales, biases


def _zeropoint_range(w, bits, group_size, g):
    """Per-group ``(scale, low end)`` of the range ``[min(w, 0), max(w, 0)]`` in ``2**bits - 1`` steps: a group
    whose weights all have one sign keeps 0 inside its range, so its offset is a whole number of steps."""
    w32 = w.astype(mx.float32)
    wg = w32[..., None, :] if group_size == CHANNELWISE else _grouped(w32, g)
    lo = mx.minimum(mx.min(wg, axis=-1), 0.0)
    hi = mx.maximum(mx.max(wg, axis=-1), 0.0)
    scales = (hi - lo) / (2**bits - 1)
    if group_size == CHANNELWISE:
        scales, lo = (mx.repeat(a, w.shape[-1] // g, axis=-1) for a in (scales, lo))
    return scales.astype(w.dtype), lo.astype(w.dtype)


def _channel_affine_scales(w, bits, g):
    qmax = 2**bits - 1
    w32 = w.astype(mx.float32)
    lo = mx.min(w32, axis=-1, keepdims=True)
    hi = mx.max(w32, axis=-1, keepdims=True)
    scales = mx.maximum(hi - lo, 1e-8) / qmax
    biases = lo
    n_groups = w.shape[-1] // g
    scales = mx.repeat(scales, n_groups, axis=-1).astype(w.dtype)
    biases = mx.repeat(biases, n_groups, axis=-1).astype(w.dtype)
    return scales, biases


SCALE_INITS = ("minmax", "mse")


def mse_clip_params(
    w: mx.array,
    bits: int,
    group_size: int,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> Tuple[mx.array, mx.array]:
    """Affine scales and biases that clip each group's range where that lowers the error.

    For every group the range ``[a * min, a * max]`` is tried for ``a`` on a
    grid from 1 down to ``min_ratio``, and the ``a`` whose round-to-nearest
    reconstruction has the smallest squared error is kept. At 2 and 3 bits the
    min/max range wastes most codes on a few outliers; this is the starting
    point learned scales train from (``LayerSpec(scale_init="mse")``).
    ``group_size=-1`` searches one range per output row.

    Returns:
        ``(scales, biases)`` in ``w.dtype``, shaped ``(out, in / storage group)``.
    """
    return _clip_search(w, bits, group_size, grid, min_ratio, None)


def weighted_clip_params(
    w: mx.array, bits: int, group_size: int, column_weights: mx.array, grid: int = 20, min_ratio: float = 0.5,
) -> Tuple[mx.array, mx.array]:
    """:func:`mse_clip_params` with each input column's squared error weighted by ``column_weights``
    (``(in_features,)``; negative, NaN or Inf count as 0).

    With the diagonal of a layer's ``E[x x^T]`` as weights, a group's error is the diagonal part of
    the layer's output error ``tr((W - Wq) H (W - Wq)^T)``: columns fed large inputs are clipped less.
    """
    c = mx.array(column_weights).astype(mx.float32).reshape(-1)
    if c.shape[0] != w.shape[-1]:
        raise ValueError(f"column_weights has {c.shape[0]} values; the weight has {w.shape[-1]} input columns")
    return _clip_search(w, bits, group_size, grid, min_ratio, mx.where(mx.isfinite(c) & (c > 0), c, 0.0))


def _clip_search(w, bits, group_size, grid, min_ratio, column_weights):
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio={min_ratio} must be in (0, 1]")
    if grid < 1:
        raise ValueError(f"grid={grid} must be at least 1")
    qmax = 2**bits - 1
    g = storage_group_size(group_size, w.shape[-1])
    w32 = w.astype(mx.float32)
    wg = w32[..., None, :] if group_size == CHANNELWISE else _grouped(w32, g)
    lo0 = mx.min(wg, axis=-1, keepdims=True)
    hi0 = mx.max(wg, axis=-1, keepdims=True)
    if column_weights is not None:  # laid out as the groups are
        cw = column_weights[None, :] if group_size == CHANNELWISE else _grouped(column_weights, g)

    def error(s, b):
        q = mx.clip(mx.round((wg - b) / s), 0, qmax)
        if column_weights is None:
            return mx.sum(mx.square(q * s + b - wg), axis=-1, keepdims=True)
        return mx.sum(mx.square(q * s + b - wg) * cw, axis=-1, keepdims=True)

    # The first candidate is the min/max quantizer itself (MLX's, which also
    # places one range end exactly on a code), so the search never loses to it.
    if group_size == CHANNELWISE:
        s0, b0 = _channel_affine_scales(w32, bits, g)
        best_s, best_b = s0[..., :1, None], b0[..., :1, None]
    else:
        _, s0, b0 = mx.quantize(w32, g, bits)
        best_s, best_b = s0[..., None], b0[..., None]
    best_s = mx.where(best_s == 0, mx.full(best_s.shape, 1e-8, mx.float32), best_s)
    best_err = error(best_s, best_b)
    for i in range(grid + 1):
        a = 1.0 - (1.0 - min_ratio) * i / grid
        lo, hi = a * lo0, a * hi0
        s = mx.maximum(hi - lo, 1e-8) / qmax
        err = error(s, lo)
        better = err < best_err
        best_err = mx.where(better, err, best_err)
        best_s = mx.where(better, s, best_s)
        best_b = mx.where(better, lo, best_b)
        mx.eval(best_err, best_s, best_b)
    scales, biases = best_s[..., 0], best_b[..., 0]
    if group_size == CHANNELWISE:
        scales = mx.repeat(scales, w.shape[-1] // g, axis=-1)
        biases = mx.repeat(biases, w.shape[-1] // g, axis=-1)
    return scales.astype(w.dtype), biases.astype(w.dtype)


def _code_units(w: mx.array, scales: mx.array, biases: mx.array, group_size: int):
    """``(u, s, b, zero)``: ``w`` in code units ``(w - bias) / scale`` per group (0 where the scale is 0),
    the float32 scales and biases broadcast to the groups, and where the scale is 0. Float32
    arithmetic whatever the storage dtype, as MLX's quantizer does."""
    wg = _grouped(w.astype(mx.float32), group_size)
    s = _expand(scales, group_size).astype(mx.float32)
    b = _expand(biases, group_size).astype(mx.float32)
    zero = s == 0
    u = (wg - b) / mx.where(zero, mx.ones_like(s), s)
    return mx.where(zero, mx.zeros_like(u), u), s, b, zero


def quantize_codes(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Integer codes ``clip(round((w - bias) / scale), 0, 2**bits - 1)`` as uint32.

    A zero scale (a group of equal values) maps every element to the code
    nearest ``-bias / 0``'s limit, i.e. the group is reproduced by its bias.
    """
    u, _, _, _ = _code_units(w, scales, biases, group_size)
    q = mx.clip(mx.round(u), 0, 2**bits - 1)
    return q.reshape(w.shape).astype(mx.uint32)


def untie(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
    margin: float = 0.25, tol: float = 1e-5,
) -> mx.array:
    """``w`` with every element that sits on a rounding boundary moved off it, codes unchanged.

    An element whose ``(w - bias) / scale`` lies within ``tol`` of a half-integer
    is moved to ``margin`` of a step from the code it rounds to (a quarter step by
    default, where an element of a continuous weight sits on average). The
    quantized weight is the same; what changes is that training no longer flips
    those elements all at once: weights dequantized from a quantized file (a
    GGUF, say) lie on a grid that often puts half of them exactly on the
    boundaries of the new one, where the first update of any size would move
    each of them by a whole step. Elements whose dtype cannot hold the move are
    left as they are.
    """
    u, s, b, zero = _code_units(w, scales, biases, group_size)
    code = mx.round(u)
    off = u - code
    tie = (mx.abs(off) > 0.5 - tol) & ~zero & (code >= 0) & (code <= 2**bits - 1)
    moved = ((code + mx.sign(off) * (0.5 - margin)) * s + b).reshape(w.shape).astype(w.dtype)
    out = mx.where(tie.reshape(w.shape), moved, w)
    same = quantize_codes(out, scales, biases, bits, group_size) == quantize_codes(w, scales, biases, bits, group_size)
    return mx.where(same, out, w)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes (..., K) into uint32 words (..., K*bits/32), LSB first.

    This is the bit stream MLX's ``quantize`` writes: code ``i`` occupies bits
    ``[i*bits, (i+1)*bits)`` of the little-endian stream.
    """
    k = codes.shape[-1]
    if (k * bits) % 32:
        raise ValueError(f"{k} codes of {bits} bits do not fill whole uint32 words")
    lead = codes.shape[:-1]
    if 32 % bits == 0:
        per_word = 32 // bits
        c = codes.astype(mx.uint32).reshape(*lead, k // per_word, per_word)
        shifts = mx.arange(per_word, dtype=mx.uint32) * bits
        return mx.sum(c << shifts, axis=-1).astype(mx.uint32)
    # 3, 5, 6 bits: a chunk of 8 // gcd(bits, 8) codes fills whole bytes.
    per_chunk = 8 // math.gcd(bits, 8)
    n_bytes = per_chunk * bits // 8
    c = codes.astype(mx.uint64).reshape(*lead, k // per_chunk, per_chunk)
    shifts = mx.arange(per_chunk, dtype=mx.uint64) * bits
    chunk = mx.sum(c << shifts, axis=-1)  # (..., n_chunks) uint64
    byte_shifts = mx.arange(n_bytes, dtype=mx.uint64) * 8
    stream = (chunk[..., None] >> byte_shifts) & 0xFF  # (..., n_chunks, n_bytes)
    stream = stream.reshape(*lead, -1, 4).astype(mx.uint32)
    word_shifts = mx.arange(4, dtype=mx.uint32) * 8
    return mx.sum(stream << word_shifts, axis=-1).astype(mx.uint32)


def unpack(packed: mx.array, bits: int) -> mx.array:
    """Inverse of :func:`pack`: uint32 words (..., W) -> uint32 codes (..., W*32/bits)."""
    lead = packed.shape[:-1]
    w = packed.astype(mx.uint32)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
        return ((w[..., None] >> shifts) & mask).reshape(*lead, -1).astype(mx.uint32)
    # 3, 5, 6 bits: bytes of the stream regrouped into chunks that hold whole codes (as in pack).
    per_chunk = 8 // math.gcd(bits, 8)
    n_bytes = per_chunk * bits // 8
    stream = (w[..., None] >> (mx.arange(4, dtype=mx.uint32) * 8)) & 0xFF  # (..., W, 4)
    stream = stream.reshape(*lead, -1, n_bytes).astype(mx.uint64)  # (..., n_chunks, n_bytes)
    chunk = mx.sum(stream << (mx.arange(n_bytes, dtype=mx.uint64) * 8), axis=-1)  # (..., n_chunks)
    codes = (chunk[..., None] >> (mx.arange(per_chunk, dtype=mx.uint64) * bits)) & mask
    return codes.reshape(*lead, -1).astype(mx.uint32)


def unpack_numpy(words, bits: int):
    """:func:`unpack` for NumPy arrays: uint32 words (..., W) -> uint8 codes (..., W*32/bits)."""

    return np.array(unpack(mx.array(np.asarray(words, dtype=np.uint32)), bits)).astype(np.uint8)


def dequantize(
    packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int, mode: str = "affine"
) -> mx.array:
    """``scale * code + bias`` through MLX's own kernel (the converted layer's numerics)."""
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits, mode=mode)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a real quantized layer (MLX's ``QuantizedLinear`` / ``QuantizedEmbedding`` or a subclass)."""
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The float32 weight of a quantized layer: ``scale * code + bias`` evaluated in float32.

    This is what ``quantized_matmul`` computes with for float32 activations,
    whatever dtype the scales are stored in (mlxqat stores float16-valued
    scales as float16).
    """
    biases = layer.get("biases")
    return dequantize(
        layer.weight, layer.scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32),
        layer.bits, layer.group_size, getattr(layer, "mode", "affine"),
    )


def layer_storage(layer: nn.Module, scale_bits: Optional[int] = None) -> Tuple[int, int]:
    """``(stored bits, number of weights)`` of a quantized layer's matrix: codes, scales and biases.

    ``scale_bits``: bits of one stored scale (default: those of the layer's ``scales`` dtype).
    """
    n_weights = layer.weight.size * 32 // layer.bits
    scale_bits = scale_bits or 8 * layer.scales.itemsize
    in_features = layer.weight.shape[-1] * 32 // layer.bits
    # The shared rule, with the layer's own storage group and scale dtype; an array
    # count would give the same number (tests/test_export.py holds them equal).
    bits = bits_per_weight(layer.bits, layer.group_size, in_features, scale_bits) * n_weights
    if layer.get("biases") is None:  # modes without biases (MLX's mxfp4 and friends)
        bits -= scale_bits * n_weights // layer.group_size
    return int(round(bits)), n_weights


def quantize_learned(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Packed codes of ``w`` under given (learned) scales and biases."""
    return pack(quantize_codes(w, scales, biases, bits, group_size), bits)


# ---------------------------------------------------------------------------
# Fake-quant with custom gradients
# ---------------------------------------------------------------------------


def _make_fake_quant_derived(bits: int, group_size: int, mode: str, scale_dtype):
    @mx.custom_function
    def fq(w):
        g = storage_group_size(group_size, w.shape[-1])
        packed, s, b = init_params(w, bits, group_size, mode, scale_dtype)
        return dequantize(packed, s, b, bits, g)

    @fq.vjp
    def fq_vjp(primals, cotangent, output):
        # Straight-through: scales follow the weights, every weight is in range.
        return (cotangent,)

    return fq


def _make_fake_quant_learned(bits: int, group_size: int):
    qmax = 2**bits - 1

    @mx.custom_function
    def fq(w, s, b):
        return dequantize(quantize_learned(w, s, b, bits, group_size), s, b, bits, group_size)

    @fq.vjp
    def fq_vjp(primals, cotangent, output):
        w, s, b = primals
        wg = _grouped(w.astype(mx.float32), group_size)
        sg = _expand(s, group_size).astype(mx.float32)
        bg = _expand(b, group_size).astype(mx.float32)
        safe_s = mx.where(sg == 0, mx.ones_like(sg), sg)
        u = mx.round((wg - bg) / safe_s)
        inside = (u >= 0) & (u <= qmax)
        q = mx.clip(u, 0, qmax)
        gg = _grouped(cotangent, group_size)
        # w: straight-through inside the representable range, zero where clipped.
        dw = mx.where(inside, gg, mx.zeros_like(gg)).reshape(w.shape).astype(w.dtype)
        gg = gg.astype(mx.float32)
        # s, b: the exact derivative of s*q + b with the codes held fixed,
        # which is what a finite difference that flips no code measures.
        ds = mx.sum(gg * q, axis=-1).astype(s.dtype)
        db = mx.sum(gg, axis=-1).astype(b.dtype)
        return dw, ds, db

    return fq


_FQ_CACHE: dict = {}


def fake_quant(
    w: mx.array,
    bits: int,
    group_size: int,
    mode: str = "affine",
    scales: Optional[mx.array] = None,
    biases: Optional[mx.array] = None,
    scale_dtype: Optional[str] = None,
) -> mx.array:
    """The dequantized weight a converted layer will hold, with training gradients.

    Without ``scales``/``biases`` they are derived from ``w`` (the rule of
    ``mode``) and the gradient to ``w`` is the straight-through identity. With
    learned ``scales``/``biases`` (shape (..., K/g)), codes are recomputed from
    ``w`` each call; ``w`` gets the straight-through gradient where its code is
    not clipped, and scales/biases the exact gradient of ``scale*code + bias``.
    """
    if scales is None:
        key = ("derived", bits, group_size, mode, scale_dtype)
        if key not in _FQ_CACHE:
            _FQ_CACHE[key] = _make_fake_quant_derived(bits, group_size, mode, scale_dtype)
        return _FQ_CACHE[key](w)
    g = storage_group_size(group_size, w.shape[-1])
    key = ("learned", bits, g)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_fake_quant_learned(bits, g)
    return _FQ_CACHE[key](w, scales, biases)


def _make_dequantize_frozen(bits: int, group_size: int):
    @mx.custom_function
    def dq(packed, s, b):
        return dequantize(packed, s, b, bits, group_size)

    @dq.vjp
    def dq_vjp(primals, cotangent, output):
        packed, s, b = primals
        q = unpack(packed, bits).astype(mx.float32)
        q = _grouped(q, group_size)
        gg = _grouped(cotangent.astype(mx.float32), group_size)
        return mx.zeros_like(packed), mx.sum(gg * q, axis=-1).astype(s.dtype), mx.sum(gg, axis=-1).astype(b.dtype)

    return dq


def dequantize_frozen(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """``scale * code + bias`` for fixed codes, differentiable in scales and biases.

    Used when only scales/biases train: the codes are fixed once, so every
    step moves the same grid points (no re-rounding undoes the update).
    """
    key = ("frozen", bits, group_size)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_dequantize_frozen(bits, group_size)
    return _FQ_CACHE[key](packed, scales, biases)


def _make_round_as_stored(dtype: mx.Dtype):
    @mx.custom_function
    def r(x):
        return x.astype(dtype).astype(x.dtype)

    @r.vjp
    def r_vjp(primals, cotangent, output):
        return (cotangent,)  # straight through: the master copy keeps every update, however small

    return r


def round_as_stored(x: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    """``x`` rounded to the values of ``dtype`` (kept in ``x.dtype``), as storing it in ``dtype`` does.

    The gradient passes straight through, so float32 master scales and offsets train while every
    forward computes with the values a file of ``dtype`` scales will hold (:func:`snap_to`, with
    a training gradient). ``dtype`` ``None`` or wider than ``x``: ``x`` unchanged.
    """
    if dtype is None or dtype == x.dtype or dtype == mx.float32:
        return x
    key = ("stored", dtype)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_round_as_stored(dtype)
    return _FQ_CACHE[key](x)


def _make_fake_quant_activation(bits: int):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    @mx.custom_function
    def fq(x, scale):
        return mx.clip(mx.round(x / scale), lo, hi) * scale

    @fq.vjp
    def fq_vjp(primals, cotangent, output):
        x, scale = primals
        u = x / scale
        inside = (u >= lo - 0.5) & (u <= hi + 0.5)
        return mx.where(inside, cotangent, mx.zeros_like(cotangent)), mx.zeros_like(scale)

    return fq


def fake_quant_activation(x: mx.array, scale: mx.array, bits: int = 8) -> mx.array:
    """Symmetric per-tensor activation quantization with a static ``scale``.

    ``clip(round(x / scale), -2**(bits-1), 2**(bits-1)-1) * scale``, computed in
    ``x.dtype``; the same call runs in the fake-quant and the converted layer.
    """
    key = ("act", bits)
    if key not in _FQ_CACHE:
        _FQ_CACHE[key] = _make_fake_quant_activation(bits)
    return _FQ_CACHE[key](x, scale.astype(x.dtype))
