"""GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K) as integers and their two-level scales, both ways.

A K-quant row is cut into super-blocks of 256 weights. Q4_K and Q5_K split each into eight
sub-blocks of 32 weights; sub-block ``j`` has a 6-bit scale ``sc[j]`` and a 6-bit min ``m[j]``,
themselves integers against the super-block's float16 ``d`` and ``dmin``, and a weight with code
``q`` is ``d * sc[j] * q - dmin * m[j]`` (codes of 4 or 5 bits). Q6_K splits it into sixteen
sub-blocks of 16 weights with signed 8-bit scales and no min: ``d * sc[j] * (q - 32)``, 6-bit codes.

In MLX terms a Q4_K / Q5_K sub-block is an affine group of 32 with ``scale = d * sc[j]`` and
``bias = -dmin * m[j]``, both exact in float32 (an 11-bit float16 significand times a 6-bit
integer). MLX has no groups of 16, so a Q6_K matrix has an MLX form when its sub-blocks come in
pairs with one scale (a 6-bit group of 32 with ``scale = d * sc`` and ``bias = -32 * scale``):
what ``quantize(..., paired=True)`` and QAT for Q6_K write. :func:`pack` writes the parts as the blocks llama.cpp reads and :func:`unpack` reads
them back, byte for byte; :func:`factor` finds ``(d, sc)`` for float32 scales that have that
form (the export of a layer whose scales were trained on that grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from gguf import GGMLQuantizationType as GT

QK_K = 256  # weights per super-block (mlxqat.quant.KQUANT_SUPER reads it from here)


@dataclass(frozen=True)
class KType:
    """The layout of one K-quant type."""

    bits: int  # of a weight's code
    sub: int  # weights per sub-block
    scale_bits: int  # of a sub-block's scale (and min) integer
    has_min: bool
    block_bytes: int

    @property
    def subs(self) -> int:
        return QK_K // self.sub


KTYPES: Dict[GT, KType] = {
    GT.Q4_K: KType(4, 32, 6, True, 144),
    GT.Q5_K: KType(5, 32, 6, True, 176),
    GT.Q6_K: KType(6, 16, 8, False, 210),
}


@dataclass
class KParts:
    """A K-quant matrix of ``rows x cols`` as integers: ``codes`` (rows, cols) uint8; ``sc`` and ``m``
    (rows, cols / sub) the sub-blocks' scale and min integers (``m`` None for Q6_K; Q6_K's ``sc`` is
    int8); ``d`` and ``dmin`` (rows, cols / 256) float16 (``dmin`` None for Q6_K)."""

    codes: np.ndarray
    sc: np.ndarray
    d: np.ndarray
    m: Optional[np.ndarray] = None
    dmin: Optional[np.ndarray] = None

    def scales_biases(self, qtype: GT) -> Tuple[np.ndarray, np.ndarray]:
        """Per sub-block float32 ``(scale, bias)`` with ``weight = scale * code + bias`` (Q6_K: the code is
        ``q`` in 0..63 and the bias ``-32 * scale``), as llama.cpp computes them."""
        t = KTYPES[qtype]
        d = np.repeat(self.d.astype(np.float32), t.subs, axis=-1)
        scale = d * self.sc.astype(np.float32)
        if not t.has_min:
            return scale, -32.0 * scale
        dmin = np.repeat(self.dmin.astype(np.float32), t.subs, axis=-1)
        return scale, -(dmin * self.m.astype(np.float32))

    def dequantize(self, qtype: GT) -> np.ndarray:
        """The float32 weights, in llama.cpp's order of operations."""
        t = KTYPES[qtype]
        rows, cols = self.codes.shape
        scale, bias = self.scales_biases(qtype)
        q = self.codes.reshape(rows, cols // t.sub, t.sub).astype(np.float32)
        if not t.has_min:
            return (scale[..., None] * (q - 32.0)).reshape(rows, cols)
        return (scale[..., None] * q - (-bias)[..., None]).reshape(rows, cols)


#: llama.cpp's type for a row whose length is not a multiple of 256 (its ``tensor_type_fallback``)
FALLBACK: Dict[GT, GT] = {GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0}


def qtype_of(bits: int) -> GT:
    """The K-quant type of an MLX ``kquant`` layer of ``bits``: 4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K."""
    try:
        return {4: GT.Q4_K, 5: GT.Q5_K, 6: GT.Q6_K}[bits]
    except KeyError:
        raise ValueError(f"no K-quant type of {bits} bits (Q4_K: 4, Q5_K: 5, Q6_K: 6)") from None


# --- llama.cpp's Q4_K_M mix (its llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M, dense models) -----------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """Whether llama.cpp's mixes give layer ``i_layer`` of ``n_layers`` the larger type: the first and last
    eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


#: the tensor kinds the Q4_K_M rule tells apart (llama.cpp's tensor categories)
Q4_K_M_KINDS = ("output", "attn_v", "ffn_down", "attn_qkv", "other")


def q4_k_m_type(kind: str, i_layer: Optional[int], n_layers: int, cols: int) -> GT:
    """The type llama.cpp's Q4_K_M gives a matrix of ``cols`` columns: ``kind`` ``"output"`` (the output head,
    or the token embedding of a model that ties them) Q6_K; ``"attn_v"``, ``"attn_qkv"`` (a fused projection,
    which llama.cpp counts as a value projection) and ``"ffn_down"`` Q6_K in the layers :func:`use_more_bits`
    picks, else Q4_K; everything else Q4_K; then :data:`FALLBACK` for rows that are not a multiple of 256.
    (llama.cpp also gives the value projections of its 70B llamas Q5_K instead of Q4_K; not modelled here.)"""
    if kind not in Q4_K_M_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {Q4_K_M_KINDS}")
    t = GT.Q4_K
    if kind == "output":
        t = GT.Q6_K
    elif kind in ("attn_v", "attn_qkv", "ffn_down"):
        if i_layer is None:
            raise ValueError(f"a {kind} matrix needs its layer index")
        t = GT.Q6_K if use_more_bits(i_layer, n_layers) else GT.Q4_K
    return FALLBACK[t] if cols % QK_K else t


def _check(qtype: GT, cols: int) -> KType:
    if qtype not in KTYPES:
        raise ValueError(f"{getattr(qtype, 'name', qtype)} is not a K-quant type ({', '.join(t.name for t in KTYPES)})")
    if cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows whose length is a multiple of {QK_K}; this one has {cols}")
    return KTYPES[qtype]


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block (..., 8) -> llama.cpp's 12 bytes (..., 12)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def _unpack_scales(b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return sc, m


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16))[..., None].view(np.uint8)


def pack(parts: KParts, qtype: GT) -> np.ndarray:
    """The GGUF blocks of ``parts``: (rows, cols / 256 * block bytes) uint8, as llama.cpp stores them.

    Raises:
        ValueError: a code, scale or min outside its type's range, or a row length not a multiple of 256.
    """
    rows, cols = parts.codes.shape
    t = _check(qtype, cols)
    nb = cols // QK_K
    codes = parts.codes.astype(np.int64)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= 1 << t.bits:
        raise ValueError(f"{qtype.name} codes must be in 0..{(1 << t.bits) - 1}")
    q = codes.astype(np.uint8).reshape(rows, nb, QK_K)
    d = _f16(parts.d.reshape(rows, nb))
    if not t.has_min:
        sc = parts.sc.astype(np.int64)
        if sc.min(initial=0) < -128 or sc.max(initial=0) > 127:
            raise ValueError("Q6_K scales must be int8 (-128..127)")
        w = q.reshape(rows, nb, 2, 128)  # halves of 128 weights
        low = w & 0x0F
        ql = low[..., :64] | (low[..., 64:] << 4)  # (rows, nb, 2, 64): nibble s holds weights s*64 + l
        high = (w >> 4).reshape(rows, nb, 2, 4, 32)  # 2-bit pieces: t*32 + l
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        scales = sc.astype(np.int8).reshape(rows, nb, 16).view(np.uint8)
        out = np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), scales, d], axis=-1)
        return out.reshape(rows, nb * t.block_bytes)
    for name, v in (("scales", parts.sc), ("mins", parts.m)):
        v = np.asarray(v).astype(np.int64)
        if v.min(initial=0) < 0 or v.max(initial=0) > 63:
            raise ValueError(f"{qtype.name} sub-block {name} must be 6-bit integers (0..63)")
    scales = _pack_scales(parts.sc.reshape(rows, nb, 8), parts.m.reshape(rows, nb, 8))
    dmin = _f16(parts.dmin.reshape(rows, nb))
    low = (q & 0x0F).reshape(rows, nb, 4, 2, 32)
    qs = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(rows, nb, 128)  # sub-block 2i low, 2i+1 high
    pieces = [d, dmin, scales]
    if t.bits == 5:
        bit = ((q >> 4) & 1).reshape(rows, nb, 8, 32)
        qh = np.zeros((rows, nb, 32), np.uint8)
        for j in range(8):
            qh |= bit[:, :, j, :] << j
        pieces.append(qh)
    pieces.append(qs)
    return np.concatenate(pieces, axis=-1).reshape(rows, nb * t.block_bytes)


def unpack(blocks: np.ndarray, qtype: GT, shape: Tuple[int, int]) -> KParts:
    """The integers and float16 scales of ``qtype`` blocks holding a ``shape`` matrix (inverse of :func:`pack`)."""
    rows, cols = shape
    t = _check(qtype, cols)
    nb = cols // QK_K
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    if b.size != rows * nb * t.block_bytes:
        raise ValueError(f"{qtype.name} blocks of {b.size} bytes do not hold a {rows} x {cols} matrix")
    b = b.reshape(rows, nb, t.block_bytes)
    if not t.has_min:
        ql, qh, scales, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
        ql = ql.reshape(rows, nb, 2, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # (rows, nb, 2, 128)
        qh = qh.reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        high = (qh & 3).reshape(rows, nb, 2, 128)
        codes = (low | (high << 4)).reshape(rows, cols)
        sc = scales.copy().view(np.int8).reshape(rows, nb * 16)
        return KParts(codes=codes, sc=sc, d=d.copy().view(np.float16)[..., 0])
    d, dmin = b[..., 0:2].copy().view(np.float16)[..., 0], b[..., 2:4].copy().view(np.float16)[..., 0]
    sc, m = _unpack_scales(b[..., 4:16])
    qs = b[..., -128:].reshape(rows, nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(rows, nb, QK_K)
    if t.bits == 5:
        qh = b[..., 16:48].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        codes = codes | ((qh & 1).reshape(rows, nb, QK_K) << 4)
    return KParts(codes=codes.reshape(rows, cols), sc=sc.reshape(rows, nb * 8), d=d, m=m.reshape(rows, nb * 8),
                  dmin=dmin)


def factor(values: np.ndarray, per: int, largest: int, signed: bool = False) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(d, ints)`` with ``values == d * ints`` exactly in float32, ``d`` float16 per run of ``per`` values
    and integers in ``0..largest`` (``signed``: in ``-largest-1..largest``, and ``d`` of either sign, as
    llama.cpp's Q6_K scales have), or ``None`` when some run has no such form. ``values`` (rows, n) float32, n
    a multiple of ``per``: the float32 scales (or mins) of a layer whose sub-block scales were kept on a
    K-quant grid."""
    v = np.asarray(values, dtype=np.float32)
    rows, n = v.shape
    runs = v.reshape(rows, n // per, per)
    top = np.abs(runs).max(axis=-1)  # the largest |value| is d * k for one k in 1..largest (+1 when signed)
    ks = np.arange(1, largest + (2 if signed else 1), dtype=np.float32)
    d = np.zeros(top.shape, np.float16)
    ints = np.zeros(runs.shape, np.int64)
    found = top == 0
    lo = -largest - 1 if signed else 0
    for k in ks:
        for sign in ((1, -1) if signed else (1,)):
            cand = (sign * (top / k)).astype(np.float16)
            c32 = cand.astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.rint(runs / c32[..., None])
            ok = (~found) & (c32 != 0) & np.all((q >= lo) & (q <= largest) & ((c32[..., None] * q) == runs), axis=-1)
            d = np.where(ok, cand, d)
            ints = np.where(ok[..., None], q.astype(np.int64), ints)
            found |= ok
    if not found.all():
        return None
    return d, ints.reshape(rows, n)


# --- round-to-nearest, llama.cpp's reference algorithm (no importance matrix) -----------------------------------

def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # half to even, as llama.cpp's nearest_int


def seqsum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis one term after another in float32 (the order of a C loop)."""
    return np.cumsum(x, axis=-1, dtype=np.float32)[..., -1]


def _affine_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of ``x`` (S, n) with error weights ``w`` (S, n): the weighted least-squares scale and min over a
    sweep of grid sizes (llama.cpp's ``make_qkx2_quants`` / ``make_qkx3_quants``, squared error). Returns
    ``(scale, min >= 0, codes)``; the value of a code ``l`` is ``scale * l - min``."""
    f = np.float32
    mn = np.minimum(x.min(axis=-1), f(0))  # the value of code 0; a winning step moves it (and the grid with it)
    hi = x.max(axis=-1)
    flat = hi == mn
    sum_w, sum_x = seqsum(w), seqsum(w * x)
    iscale = f(nmax) / np.where(flat, f(1), hi - mn)
    scale = f(1) / iscale
    codes = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * codes + mn[:, None] - x
    best = seqsum(w * (diff * diff))
    for i in range(nstep + 1):
        span = hi - mn
        iscale = (f(rmin) + f(rdelta) * f(i) + f(nmax)) / np.where(span == 0, f(1), span)
        l = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)
        wl = w * l
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * l), seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f(1)), this_scale)
        this_min = np.where(pos, f(0), this_min)
        diff = this_scale[:, None] * l + this_min[:, None] - x
        err = seqsum(w * (diff * diff))
        take = ok & (err < best) & ~flat
        codes = np.where(take[:, None], l, codes)
        best, scale, mn = np.where(take, err, best), np.where(take, this_scale, scale), np.where(take, this_min, mn)
    scale = np.where(flat, f(0), scale)
    codes = np.where(flat[:, None], f(0), codes)
    return scale.astype(np.float32), (-mn).astype(np.float32), codes


def symmetric_search(x: np.ndarray, nmax: int, weights: Optional[np.ndarray] = None):
    """Per row of ``x`` (S, n): llama.cpp's ``make_qx_quants`` (squared weights, or ``weights`` (S, n)): the
    scale of codes ``l`` in ``-nmax..nmax-1`` (value ``scale * l``) over a sweep of grid sizes. Returns
    ``(scale, l + nmax)``."""
    f = np.float32
    idx = np.argmax(np.abs(x), axis=-1)  # the first largest |x|
    top = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(top) < f(1e-15)
    top = np.where(zero, f(1), top)
    w = x * x if weights is None else weights

    def sweep(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        return l, seqsum(w * x * l), seqsum(w * l * l)

    l_best, sumlx, suml2 = sweep(-f(nmax) / top)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    best = scale * sumlx
    for i in [k for k in range(-9, 10) if k]:
        l, slx, sl2 = sweep(-(f(nmax) + f(0.1) * f(i)) / top)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        s = slx / np.where(sl2 > 0, sl2, f(1))
        l_best = np.where(take[:, None], l, l_best)
        scale = np.where(take, s, scale)
        best = np.where(take, s * slx, best)
    scale = np.where(zero, f(0), scale)
    l_best = np.where(zero[:, None], f(-nmax), l_best)
    return scale.astype(np.float32), (l_best + nmax).astype(np.uint8)


def check_importance(importance, cols: int) -> np.ndarray:
    """``importance`` as float32 (cols,), or ValueError: another shape, or a value that is not finite or is
    negative (llama.cpp's weighted quantizers would write zeros or NaN weights from it)."""
    qw = np.asarray(importance, dtype=np.float32)
    if qw.shape != (cols,):
        raise ValueError(f"importance has shape {qw.shape}; this matrix of {cols} columns needs ({cols},)")
    if not np.all(np.isfinite(qw)) or np.any(qw < 0):
        bad = qw[~np.isfinite(qw) | (qw < 0)][0]
        raise ValueError(f"importance of this matrix holds {bad}: it must be finite and >= 0 (a mean squared "
                         "activation); recompute the importance matrix")
    return qw


def weighted_affine_search(x: np.ndarray, w: np.ndarray, nmax: int):
    """Per row of ``x`` (S, n) with importance ``w`` (S, n): llama.cpp's ``make_qkx3_quants`` (weighted squared
    error, 37 grid sizes from ``nmax - 0.9`` in steps of 0.05), the search its quantizers run when given an
    importance matrix. Returns ``(scale, min >= 0, codes)``; the value of a code ``l`` is ``scale * l - min``."""
    return _affine_search(x, w, nmax, -0.9, 0.05, 36)


def _scales_search(x: np.ndarray, w: np.ndarray, nmax: int):
    """Per row of ``x`` (S, n) of non-negative sub-block scales (or mins) with weights ``w``: llama.cpp's
    ``make_qp_quants``, which puts them on a grid of ``0..nmax`` times one step (best of nine grid sizes, then
    up to five passes moving one integer at a time). Returns ``(step, integers)``."""
    f = np.float32
    top = np.maximum(x.max(axis=-1), f(0))
    dead = top < f(1e-15)
    top = np.where(dead, f(1), top)
    iscale = f(nmax) / top
    l = _rint(iscale[:, None] * x)
    diff = x - (f(1) / iscale)[:, None] * l
    best = seqsum(w * diff * diff)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_i = (f(0.1) * f(i) + f(nmax)) / top
        l = np.minimum(f(nmax), _rint(iscale_i[:, None] * x))
        diff = x - (f(1) / iscale_i)[:, None] * l
        mse = seqsum(w * diff * diff)
        take = mse < best
        best, iscale = np.where(take, mse, best), np.where(take, iscale_i, iscale)
    l = np.minimum(f(nmax), _rint(iscale[:, None] * x)).astype(np.float32)
    sumlx, suml2 = seqsum(w * x * l), seqsum(w * l * l)
    for _ in range(5):
        for i in range(x.shape[-1]):
            wi, xi, li = w[:, i], x[:, i], l[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(f(nmax), _rint(xi * sl2 / np.where(ok, slx, f(1))))
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            l[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
    step = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    return np.where(dead, f(0), step).astype(np.float32), np.where(dead[:, None], f(0), l).astype(np.int64)


def _affine_parts(x, codes, d, ls, dmin, lm, nmax: int, shape) -> KParts:
    """Q4_K / Q5_K parts once the sub-block scale and min integers and ``d``, ``dmin`` are chosen: the codes
    rounded again on the final grid (a sub-block whose scale is 0 keeps the search's codes), as llama.cpp does."""
    f = np.float32
    rows, cols = shape
    nb = cols // QK_K
    dj = (d.astype(np.float32)[:, None] * ls.astype(np.float32)).reshape(-1)
    dm = (dmin.astype(np.float32)[:, None] * lm.astype(np.float32)).reshape(-1)
    live = dj != 0
    q = np.clip(_rint((x + dm[:, None]) / np.where(live, dj, f(1))[:, None]), 0, nmax)
    codes = np.where(live[:, None], q, codes).astype(np.uint8)
    return KParts(codes=codes.reshape(rows, cols), sc=ls.reshape(rows, nb * 8), d=d.reshape(rows, nb),
                  m=lm.reshape(rows, nb * 8), dmin=dmin.reshape(rows, nb))


def _weighted_kparts(w: np.ndarray, t: KType, importance: np.ndarray) -> KParts:
    """llama.cpp's ``quantize_row_q{4,5}_K_impl`` with an importance matrix (one value per column)."""
    f = np.float32
    rows, cols = w.shape
    nb = cols // QK_K
    nmax = (1 << t.bits) - 1
    sup = w.reshape(-1, QK_K)
    sigma2 = (f(2) * seqsum(sup * sup) / f(QK_K)).astype(np.float32)
    x = w.reshape(-1, t.sub)
    qw = np.broadcast_to(np.asarray(importance, np.float32).reshape(1, nb, QK_K), (rows, nb, QK_K)).reshape(-1, t.sub)
    weights = qw * np.sqrt(np.repeat(sigma2, t.subs)[:, None] + x * x)
    scales, mins, codes = weighted_affine_search(x, weights, nmax)
    sw = seqsum(weights).reshape(-1, t.subs)
    d, ls = _scales_search(scales.reshape(-1, t.subs), sw, 63)
    dmin, lm = _scales_search(mins.reshape(-1, t.subs), sw, 63)
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    return _affine_parts(x, codes, d, ls, dmin, lm, nmax, w.shape)


def quantize(w: np.ndarray, qtype: GT, paired: bool = False, importance: Optional[np.ndarray] = None) -> KParts:
    """Round-to-nearest ``qtype`` parts of a float32 matrix ``w`` (rows, cols): llama.cpp's quantizer for the
    type, bit for bit. Without ``importance``, its reference algorithm (each sub-block's scale and min from a
    least-squares sweep, the scales quantized against the super-block's largest, the codes rounded again with
    them); with ``importance`` (cols,), the mean squared activation of each input column (an importance
    matrix's row for this tensor, :mod:`mlxqat.gguf.imatrix`), the searches llama.cpp runs with one: errors
    weighted by it, the sub-block scales and mins put on their 6-bit grid by a weighted search too.
    Sums run in a C loop's order; where llama.cpp's build fuses multiply-adds a rare tie may round otherwise.

    ``paired`` (Q6_K only): the same algorithm on sub-blocks of 32, each scale written to both halves, the Q6_K
    that MLX's 6-bit groups of 32 hold exactly (the start of QAT for Q6_K)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    t = _check(qtype, cols)
    if paired and t.has_min:
        raise ValueError(f"paired sub-blocks are a Q6_K form; {qtype.name} has sub-blocks of 32 already")
    if importance is not None:
        importance = check_importance(importance, cols)
        if t.has_min:
            return _weighted_kparts(w, t, importance)
    f = np.float32
    nb = cols // QK_K
    sub = 2 * t.sub if paired else t.sub
    subs = QK_K // sub
    x = w.reshape(-1, sub)
    if not t.has_min:
        qw = None if importance is None else np.broadcast_to(importance.reshape(1, -1, sub), (rows, cols // sub, sub))
        scales, codes = symmetric_search(x, 32, None if qw is None else qw.reshape(-1, sub))
        s = scales.reshape(-1, subs)
        idx = np.argmax(np.abs(s), axis=-1)
        top = np.take_along_axis(s, idx[:, None], axis=-1)[:, 0]
        dead = np.abs(top) < f(1e-15)
        iscale = f(-128) / np.where(dead, f(1), top)
        d = np.where(dead, f(0), f(1) / iscale).astype(np.float16)
        sc = np.minimum(127, _rint(iscale[:, None] * s)).astype(np.int64)
        sc = np.where(dead[:, None], 0, sc)
        dj = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1)
        live = dj != 0
        q = np.clip(_rint(x / np.where(live, dj, f(1))[:, None]), -32, 31) + 32
        codes = np.where(live[:, None], q, codes).astype(np.uint8)
        codes = np.where(np.repeat(dead, subs)[:, None], 0, codes).astype(np.uint8)  # llama.cpp zeroes the block
        sc = np.repeat(sc.reshape(rows, nb * subs), t.subs // subs, axis=-1)
        return KParts(codes=codes.reshape(rows, cols), sc=sc.astype(np.int8), d=d.reshape(rows, nb))
    nmax = (1 << t.bits) - 1
    rmin, rdelta, nstep = (-1.0, 0.1, 20) if t.bits == 4 else (-0.5, 0.1, 15)
    av = np.sqrt(seqsum(x * x) / np.float32(x.shape[-1]))
    scales, mins, codes = _affine_search(x, av[:, None] + np.abs(x), nmax, rmin, rdelta, nstep)  # make_qkx2_quants
    s, m = scales.reshape(-1, t.subs), mins.reshape(-1, t.subs)
    top_s, top_m = np.maximum(s.max(axis=-1), f(0)), np.maximum(m.max(axis=-1), f(0))
    inv_s = np.where(top_s > 0, f(63) / np.where(top_s > 0, top_s, f(1)), f(0))
    inv_m = np.where(top_m > 0, f(63) / np.where(top_m > 0, top_m, f(1)), f(0))
    ls = np.minimum(63, _rint(inv_s[:, None] * s)).astype(np.int64)
    lm = np.minimum(63, _rint(inv_m[:, None] * m)).astype(np.int64)
    d, dmin = (top_s / f(63)).astype(np.float16), (top_m / f(63)).astype(np.float16)
    return _affine_parts(x, codes, d, ls, dmin, lm, nmax, w.shape)
