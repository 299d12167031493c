"""K-quant blocks (Q4_K, Q5_K, Q6_K): packed as llama.cpp reads them, byte for byte both ways."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

from mlxqat.gguf import kquants
from mlxqat.gguf.kquants import KParts, factor, pack, unpack


def _parts(qtype, rows=3, cols=512, seed=0) -> KParts:
    t = kquants.KTYPES[qtype]
    rng = np.random.default_rng(seed)
    nb = cols // 256
    codes = rng.integers(0, 1 << t.bits, (rows, cols)).astype(np.uint8)
    d = (rng.uniform(1e-4, 2e-2, (rows, nb))).astype(np.float16)
    if not t.has_min:
        return KParts(codes=codes, sc=rng.integers(-128, 128, (rows, nb * 16)).astype(np.int8), d=d)
    sc = rng.integers(0, 64, (rows, nb * 8))
    m = rng.integers(0, 64, (rows, nb * 8))
    sc[0, :8] = [0, 63, 1, 62, 32, 31, 16, 48]  # every bit of the 12-byte scale packing
    return KParts(codes=codes, sc=sc, d=d, m=m, dmin=rng.uniform(1e-4, 1e-2, (rows, nb)).astype(np.float16))


@pytest.mark.parametrize("qtype", [GT.Q4_K, GT.Q5_K, GT.Q6_K])
def test_blocks_dequantize_in_the_gguf_package_to_the_parts_values(qtype):
    parts = _parts(qtype)
    blocks = pack(parts, qtype)
    assert blocks.shape == (3, 2 * kquants.KTYPES[qtype].block_bytes) and blocks.dtype == np.uint8
    want = dequantize(blocks, qtype)  # the gguf package's reading of llama.cpp's layout
    got = parts.dequantize(qtype)
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))  # bit for bit
    back = unpack(blocks, qtype, (3, 512))
    assert np.array_equal(back.codes, parts.codes) and np.array_equal(back.sc.astype(np.int64), parts.sc.astype(np.int64))
    assert np.array_equal(back.d.view(np.uint16), parts.d.view(np.uint16))
    if kquants.KTYPES[qtype].has_min:
        assert np.array_equal(back.m, parts.m) and np.array_equal(back.dmin.view(np.uint16), parts.dmin.view(np.uint16))
    assert np.array_equal(pack(back, qtype), blocks)


@pytest.mark.parametrize("qtype", [GT.Q4_K, GT.Q6_K])
def test_float32_scales_on_the_grid_factor_back_into_the_same_values(qtype):
    parts = _parts(qtype, seed=1)
    t = kquants.KTYPES[qtype]
    scale, _ = parts.scales_biases(qtype)
    d, ints = factor(scale, t.subs, 63 if t.has_min else 127, signed=not t.has_min)
    again = np.repeat(d.astype(np.float32), t.subs, axis=-1) * ints.astype(np.float32)
    assert np.array_equal(again, scale)
    assert ints.max() <= (63 if t.has_min else 127) and ints.min() >= (0 if t.has_min else -128)
    off = scale.copy()
    off[1, 3] = np.nextafter(off[1, 3], np.float32(1))  # one value off the grid
    assert factor(off, t.subs, 63) is None


def test_bad_parts_are_refused():
    parts = _parts(GT.Q4_K)
    with pytest.raises(ValueError, match="multiple of 256"):
        pack(KParts(codes=parts.codes[:, :320], sc=parts.sc[:, :10], d=parts.d, m=parts.m[:, :10], dmin=parts.dmin), GT.Q4_K)
    bad = KParts(codes=parts.codes, sc=parts.sc + 1, d=parts.d, m=parts.m, dmin=parts.dmin)
    with pytest.raises(ValueError, match="6-bit integers"):
        pack(bad, GT.Q4_K)
    with pytest.raises(ValueError, match="codes must be in 0..15"):
        pack(KParts(codes=parts.codes + 16, sc=parts.sc, d=parts.d, m=parts.m, dmin=parts.dmin), GT.Q4_K)
    with pytest.raises(ValueError, match="not a K-quant type"):
        pack(parts, GT.Q4_0)
    with pytest.raises(ValueError, match="do not hold a 3 x 512 matrix"):
        unpack(np.zeros(10, np.uint8), GT.Q4_K, (3, 512))


@pytest.mark.parametrize("qtype", [GT.Q4_K, GT.Q5_K, GT.Q6_K])
def test_round_to_nearest_is_close_and_finer_types_are_closer(qtype):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 768)) * 0.02).astype(np.float32)
    w[2, :256] = 0.0  # an all-zero super-block
    w[3, 5] = 0.4  # an outlier
    parts = kquants.quantize(w, qtype)
    got = dequantize(pack(parts, qtype), qtype)  # what llama.cpp computes from the blocks
    assert np.array_equal(got, parts.dequantize(qtype))
    assert np.all(got[2, :256] == 0)
    err = np.sqrt(np.mean((got - w) ** 2)) / np.sqrt(np.mean(w ** 2))
    # relative RMS error of a Gaussian matrix: about 2^-bits x a small factor
    bound = {GT.Q4_K: 0.12, GT.Q5_K: 0.06, GT.Q6_K: 0.03}[qtype]
    assert 0 < err < bound, err
    # each sub-block's codes are the nearest on its own grid (llama.cpp rounds the codes again after the scales)
    t = kquants.KTYPES[qtype]
    scale, bias = parts.scales_biases(qtype)
    x = w.reshape(16, -1, t.sub)
    near = np.clip(np.rint((x - bias[..., None]) / np.where(scale == 0, 1, scale)[..., None]), 0, (1 << t.bits) - 1)
    live = scale != 0
    assert np.array_equal(near[live], parts.codes.reshape(16, -1, t.sub)[live].astype(np.float64))
