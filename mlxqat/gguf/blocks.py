"""The GGUF block types that hold an MLX quantized matrix exactly, both ways.

A quantized MLX layer stores integer codes with one ``scale`` and one ``bias``
per group. Eight GGUF block types store the same numbers with group 32 and
float16 headers, so those layers are *repacked* bit for bit, never re-rounded:

==========  =======================================  ==========================
GGUF type   GGUF value of code ``q``                 MLX layer that maps exactly
==========  =======================================  ==========================
``Q4_0``    ``(q - 8) * d``                          4-bit, group 32, bias = -8*scale
``Q4_1``    ``q * d + m``                            4-bit, group 32 (any bias)
``Q5_0``    ``(q - 16) * d``                         5-bit, group 32, bias = -16*scale
``Q5_1``    ``q * d + m``                            5-bit, group 32 (any bias)
``Q8_0``    ``int8 * d`` with ``int8 = q - 128``     8-bit, group 32, bias = -128*scale
``Q4_K``    ``d * sc * q - dmin * m``                4-bit, group 32, float32 scales
``Q5_K``    (``sc``, ``m``: 6-bit, per 32 weights;   5-bit, group 32, float32 scales
            ``d``, ``dmin``: float16, per 256)       (recipes ``q4_k``, ``q5_k``)
``Q6_K``    ``d * sc * (q - 32)``, ``sc`` int8 per   6-bit, group 32, float32 scales,
            16 weights, ``d`` float16 per 256        bias = -32*scale (recipe ``q6_k``):
                                                     the 16-weight halves share ``sc``
==========  =======================================  ==========================

and ``d``/``m`` must be float16 values (recipes ``q4_0``, ``q4_1``, ``q5_0``,
``q5_1`` and ``q8_0`` guarantee it), the K-quants' scales and offsets on their
two-level grid (``q4_k`` / ``q5_k`` / ``q6_k``: :func:`mlxqat.quant.kquant_grid`). :func:`exact_blocks` writes such a layer as blocks (the GGUF
export); :func:`mlx_arrays` reads blocks back into the layer's arrays (a GGUF
file fine-tuned in its own type).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as GT

from .. import quant
from . import kquants
from .kquants import check_importance, factor, seqsum, symmetric_search, weighted_affine_search

#: The block types an MLX layer holds exactly: ``{type: (bits, the recipe whose layers they are)}``; the
#: symmetric types (offset tied to the scale) come first, so a layer that both kinds hold is written as the
#: symmetric one, as llama.cpp would.
EXACT_TYPES: Dict[GT, Tuple[int, str]] = {GT.Q4_0: (4, "q4_0"), GT.Q5_0: (5, "q5_0"), GT.Q8_0: (8, "q8_0"),
                                          GT.Q4_1: (4, "q4_1"), GT.Q5_1: (5, "q5_1"),
                                          GT.Q4_K: (4, "q4_k"), GT.Q5_K: (5, "q5_k"), GT.Q6_K: (6, "q6_k")}
KQUANT_TYPES = (GT.Q4_K, GT.Q5_K, GT.Q6_K)  # groups of 32 with float32 scales on the K-quant grid (:mod:`.kquants`)


class NoMLXForm(ValueError):
    """Blocks of an exact type whose numbers this file's tensor does not fit an MLX layer with (Q6_K whose
    16-weight halves have scales of their own: MLX's groups are 32 or more)."""


def exact_recipes(last: str = "or") -> str:
    """The recipes whose layers a GGUF block type holds exactly, for messages: ``"q4_0, ..., q4_k or q5_k"``."""
    names = [name for _, name in EXACT_TYPES.values()]
    return ", ".join(names[:-1]) + f" {last} " + names[-1]
SYMMETRIC = {GT.Q4_0: 8, GT.Q5_0: 16, GT.Q8_0: 128}  # the tied offset of each symmetric type: -this * scale
GROUP = 32  # weights per block of every exact type


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)  # (..., 2)


def exact_blocks(
    words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int, qtype: GT
) -> Tuple[Optional[np.ndarray], str]:
    """Repack one MLX quantized matrix as GGUF ``qtype`` blocks without re-rounding.

    Args:
        words: (N, K*bits/32) uint32 packed codes.
        scales, biases: (N, K/group_size) float32 (exact copies of the MLX values).

    Returns:
        ``(blocks, "")`` with blocks (N, bytes per row) uint8, or ``(None, why)``
        when ``qtype`` cannot hold these numbers exactly.
    """
    want = EXACT_TYPES.get(qtype, (None,))[0]
    if want is None:
        return None, f"{qtype.name} is not a block type"
    if bits != want or group_size != GROUP:
        return None, f"{bits}-bit group {group_size} has no exact {qtype.name} form ({want}-bit group {GROUP})"
    if qtype in KQUANT_TYPES:
        return _kquant_blocks(words, scales, biases, bits, qtype)
    if not quant.holds_exactly(mx.float16, scales):
        return None, "scales are not float16 values (use a recipe with scale_dtype='float16')"
    n, n_groups = scales.shape
    codes = quant.unpack_numpy(words, bits).reshape(n, n_groups, GROUP)
    if qtype in SYMMETRIC:
        half = SYMMETRIC[qtype]
        if not np.array_equal(biases, -float(half) * scales):
            return None, (f"biases are not -{half}*scales ({qtype.name} is symmetric; use recipe "
                          f"{EXACT_TYPES[qtype][1]})")
        return legacy_blocks(codes, scales, None, qtype), ""
    if not quant.holds_exactly(mx.float16, biases):
        return None, f"biases are not float16 values (use recipe {EXACT_TYPES[qtype][1]})"
    return legacy_blocks(codes, scales, biases, qtype), ""


def legacy_blocks(codes: np.ndarray, d: np.ndarray, m: Optional[np.ndarray], qtype: GT) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks (rows, bytes per row) uint8 from ``codes`` (rows, groups, 32) in
    ``0..2**bits - 1``, each group's ``d`` and (Q4_1 / Q5_1) ``m`` (rows, groups), float16 values; a code ``q``
    is worth ``(q - half) * d`` in the symmetric types and ``q * d + m`` in the others."""
    n = codes.shape[0]
    header = [_f16_bytes(d)] if m is None else [_f16_bytes(d), _f16_bytes(m)]

    def rows(*parts):  # (n, groups, bytes) -> (n, groups * bytes), zero rows too
        out = np.concatenate(header + list(parts), axis=-1)
        return out.reshape(n, out.shape[1] * out.shape[2])

    if qtype == GT.Q8_0:
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return rows(q)
    codes = codes.astype(np.uint8)
    nibbles = (codes[..., :16] & np.uint8(15)) | ((codes[..., 16:] & np.uint8(15)) << np.uint8(4))  # q[j] low, q[j+16] high
    if EXACT_TYPES[qtype][0] == 5:  # the fifth bit of code j is bit j of a little-endian uint32
        high = np.packbits((codes >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")
        return rows(high, nibbles)
    return rows(nibbles)


def _kquant_blocks(words, scales, biases, bits, qtype) -> Tuple[Optional[np.ndarray], str]:
    n, n_groups = scales.shape
    if (n_groups * GROUP) % kquants.QK_K:
        return None, f"rows of {n_groups * GROUP} weights: {qtype.name} needs a multiple of {kquants.QK_K}"
    if qtype == GT.Q6_K:
        return _q6_k_blocks(words, scales, biases)
    s = factor(np.asarray(scales, np.float32), 8, 63)
    m = factor(-np.asarray(biases, np.float32), 8, 63)
    if s is None or m is None:
        return None, (f"{'scales' if s is None else 'biases'} are not on the {qtype.name} grid (6-bit integers times "
                      f"a float16 per 256 weights; use recipe {EXACT_TYPES[qtype][1]})")
    codes = quant.unpack_numpy(words, bits).reshape(n, n_groups * GROUP)
    parts = kquants.KParts(codes=codes, sc=s[1], d=s[0], m=m[1], dmin=m[0])
    return kquants.pack(parts, qtype), ""


def _q6_k_blocks(words, scales, biases) -> Tuple[Optional[np.ndarray], str]:
    n, n_groups = scales.shape
    scales = np.asarray(scales, np.float32)
    if not np.array_equal(np.asarray(biases, np.float32), -32.0 * scales):
        return None, "biases are not -32*scales (Q6_K is symmetric; use recipe q6_k)"
    found = factor(scales, 8, 127, signed=True)
    if found is None:
        return None, ("scales are not on the Q6_K grid (signed 8-bit integers times a float16 per 256 weights; "
                      "use recipe q6_k)")
    d, sc = found
    codes = quant.unpack_numpy(words, 6).reshape(n, n_groups * GROUP)
    parts = kquants.KParts(codes=codes, sc=np.repeat(sc, 2, axis=-1).astype(np.int8), d=d)
    return kquants.pack(parts, GT.Q6_K), ""


def mlx_arrays(blocks: np.ndarray, qtype: GT, shape: Tuple[int, int]) -> Tuple[mx.array, mx.array, mx.array]:
    """The MLX layer that ``qtype`` blocks hold: ``(packed uint32 codes, float16 scales, float16 biases)``
    (float32 for the K-quants, whose ``d * sc`` and ``-dmin * m`` need it).

    The inverse of :func:`exact_blocks`: ``exact_blocks(*mlx_arrays(b, t, shape), bits, 32, t)`` gives ``b``
    back, and MLX's ``scale * code + bias`` is the value llama.cpp dequantizes each weight to.

    Args:
        blocks: the tensor's raw blocks, (rows, bytes per row) or flat, uint8.
        qtype: one of :data:`EXACT_TYPES`.
        shape: (rows, columns) of the matrix.

    Raises:
        NoMLXForm: Q6_K blocks whose 16-weight halves have scales of their own.
        ValueError: another type, or blocks that do not fill ``shape``.
    """
    if qtype not in EXACT_TYPES:
        raise ValueError(f"{qtype.name} blocks have no exact MLX form (exact: {', '.join(t.name for t in EXACT_TYPES)})")
    bits = EXACT_TYPES[qtype][0]
    rows, cols = shape
    if qtype in KQUANT_TYPES:  # float32 scales and biases: d * sc and -dmin * m are exact there
        parts = kquants.unpack(blocks, qtype, shape)
        scales, biases = parts.scales_biases(qtype)
        if not (np.all(np.isfinite(scales)) and np.all(np.isfinite(biases))):
            raise ValueError(f"{qtype.name} blocks hold NaN or Inf scales or mins")
        if qtype == GT.Q6_K:
            if not np.array_equal(parts.sc[..., ::2], parts.sc[..., 1::2]):
                raise NoMLXForm("Q6_K sub-blocks of 16 weights with scales of their own (MLX groups hold 32)")
            scales, biases = scales[..., ::2], biases[..., ::2]
        words = quant.pack(mx.array(parts.codes.astype(np.uint32)), bits)
        return words, mx.array(scales), mx.array(biases)
    header = 2 if qtype in SYMMETRIC else 4
    high_bytes = 4 if bits == 5 else 0
    block_bytes = header + high_bytes + GROUP * min(bits, 4 if bits == 5 else 8) // 8  # 5-bit: 4 + 4 bits a code
    if cols % GROUP or np.asarray(blocks).size != rows * cols // GROUP * block_bytes:
        raise ValueError(f"{qtype.name} blocks of {np.asarray(blocks).size} bytes do not hold a {rows} x {cols} matrix")
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, cols // GROUP, block_bytes)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    payload = b[..., header + high_bytes:]
    if qtype == GT.Q8_0:
        codes = (payload.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        codes = np.concatenate([payload & np.uint8(15), payload >> np.uint8(4)], axis=-1)
        if bits == 5:
            high = np.unpackbits(b[..., header:header + 4], axis=-1, bitorder="little")
            codes = codes | (high << np.uint8(4))
    if qtype in SYMMETRIC:
        biases = (-float(SYMMETRIC[qtype]) * d.astype(np.float32)).astype(np.float16)  # exact: a power of two x d
    else:
        biases = b[..., 2:4].copy().view(np.float16)[..., 0]
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(biases))):
        raise ValueError(f"{qtype.name} blocks hold NaN or Inf scales (or offsets that overflow float16)")
    words = quant.pack(mx.array(codes.reshape(rows, cols).astype(np.uint32)), bits)
    return words, mx.array(d), mx.array(biases)


# --- llama.cpp's quantizers, with or without an importance matrix (:mod:`.imatrix`) -----------------------

#: the block types whose quantizer uses an importance matrix (llama.cpp's Q8_0 ignores it)
WEIGHTED_TYPES = (GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q4_K, GT.Q5_K, GT.Q6_K)
_LEGACY = {GT.Q4_0: (8, True), GT.Q5_0: (16, True), GT.Q4_1: (15, False), GT.Q5_1: (31, False)}


def quantize_blocks(w: np.ndarray, qtype: GT, importance: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``qtype`` blocks (rows, bytes per row) of a float32 matrix ``w`` (a 1-D ``w`` is one row) as
    llama.cpp's quantizer writes them: with ``importance`` (cols,), finite and >= 0, its importance-weighted
    algorithm for the type (Q8_0 has none), without it the reference one (the ``gguf`` package's, identical
    to llama.cpp's)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    w = w.reshape(1, -1) if w.ndim == 1 else w
    rows, cols = w.shape
    if cols % GROUP:
        raise ValueError(f"{qtype.name} blocks hold rows of a multiple of {GROUP} weights; these have {cols}")
    if qtype in kquants.KTYPES:  # kquants.quantize checks the importance
        return kquants.pack(kquants.quantize(w, qtype, importance=importance), qtype)
    if importance is not None:
        importance = check_importance(importance, cols)
    if importance is None or qtype not in _LEGACY:
        return gguf.quants.quantize(w, qtype)
    qw = importance
    f = np.float32
    sigma2 = (seqsum(w * w) / f(cols)).astype(np.float32)  # per row
    x = w.reshape(rows, cols // 32, 32)
    weights = qw.reshape(1, -1, 32) * np.sqrt(sigma2[:, None, None] + x * x)
    nmax, symmetric = _LEGACY[qtype]
    x, weights = x.reshape(-1, 32), weights.reshape(-1, 32)
    if symmetric:  # llama.cpp's make_qx_quants with the weights
        scale, codes = symmetric_search(x, nmax, weights)
        return legacy_blocks(codes.reshape(rows, cols // 32, 32), scale.reshape(rows, cols // 32), None, qtype)
    scale, the_min, codes = weighted_affine_search(x, weights, nmax)  # make_qkx3_quants
    return legacy_blocks(codes.astype(np.uint8).reshape(rows, cols // 32, 32), scale.reshape(rows, cols // 32),
                         (-the_min).reshape(rows, cols // 32), qtype)
