"""Quantization numerics: exact agreement with MLX, packing, gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxqat import quant

BITS = quant.SUPPORTED_BITS
GROUPS = quant.SUPPORTED_GROUP_SIZES
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_affine_fake_quant_is_mlx_round_trip_bit_for_bit(bits, group_size, dtype):
    mx.random.seed(bits * 1000 + group_size)
    w = (mx.random.normal((24, 256)) * 0.05).astype(dtype)
    expected = mx.dequantize(*mx.quantize(w, group_size, bits), group_size=group_size, bits=bits)
    got = quant.fake_quant(w, bits, group_size, "affine")
    assert got.dtype == dtype
    assert mx.array_equal(got, expected).item()
    # ... and it is not the identity
    assert not mx.array_equal(got, w).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_symmetric_round_trips_through_mx_dequantize(bits, group_size, dtype):
    mx.random.seed(bits * 7 + group_size)
    w = (mx.random.normal((16, 256)) * 0.05).astype(dtype)
    packed, scales, biases = quant.init_params(w, bits, group_size, "symmetric")
    half = 2 ** (bits - 1)
    # biases = -2**(bits-1) * scales exactly
    assert mx.array_equal(biases, scales * -half).item()
    # scales are float16 values (what GGUF stores)
    assert mx.array_equal(scales.astype(mx.float16).astype(dtype), scales).item()
    got = quant.fake_quant(w, bits, group_size, "symmetric")
    ref = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    assert mx.array_equal(got, ref).item()
    # the element of largest magnitude in each group is code 0 (llama.cpp's rule)
    codes = np.array(quant.unpack(packed, bits)).reshape(16, -1, group_size)
    wg = np.array(w.astype(mx.float32)).reshape(16, -1, group_size)
    amax_idx = np.abs(wg).argmax(-1)
    assert (np.take_along_axis(codes, amax_idx[..., None], -1) == 0).all()
    # reconstruction error is at most a step (one scale), plus the clipped top code
    err = np.abs(np.array(got.astype(mx.float32)) - np.array(w.astype(mx.float32)))
    step = np.abs(np.repeat(np.array(scales.astype(mx.float32)), group_size, axis=-1))
    assert (err <= step * 1.01 + 1e-3).all()


@pytest.mark.parametrize("mode", ["affine", "symmetric"])
def test_channelwise_has_one_scale_per_row(mode):
    w = mx.random.normal((8, 384)) * 0.1
    packed, scales, biases = quant.init_params(w, 4, quant.CHANNELWISE, mode)
    assert scales.shape == (8, 3)  # stored as 3 groups of 128, same values
    assert mx.array_equal(scales, mx.broadcast_to(scales[:, :1], scales.shape)).item()
    assert mx.array_equal(biases, mx.broadcast_to(biases[:, :1], biases.shape)).item()
    got = quant.fake_quant(w, 4, quant.CHANNELWISE, mode)
    assert mx.array_equal(got, mx.dequantize(packed, scales, biases, 128, 4)).item()
    assert float(mx.abs(got - w).max()) < float(mx.abs(w).max()) / 7


def test_scale_dtype_float16_makes_scales_float16_exact():
    w = mx.random.normal((4, 128))
    packed, s, b = quant.init_params(w, 4, 32, "affine", "float16")
    assert s.dtype == mx.float32
    assert mx.array_equal(s.astype(mx.float16).astype(mx.float32), s).item()
    assert mx.array_equal(b.astype(mx.float16).astype(mx.float32), b).item()


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    rows=st.integers(1, 5),
    words=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, words, seed):
    k = words * 32  # any multiple of 32 codes fills whole words for every bit width
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(rows, k)).astype(np.uint32)
    packed = quant.pack(mx.array(codes), bits)
    assert packed.shape == (rows, k * bits // 32)
    assert (np.array(quant.unpack(packed, bits)) == codes).all()
    # the bit stream is LSB-first over little-endian words
    stream = np.unpackbits(np.array(packed).view(np.uint8), axis=-1, bitorder="little")
    decoded = (stream.reshape(rows, k, bits) << np.arange(bits)).sum(-1)
    assert (decoded == codes).all()


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_mx_quantize(bits):
    w = mx.random.normal((6, 128))
    wq, s, b = mx.quantize(w, 32, bits)
    assert mx.array_equal(quant.pack(quant.unpack(wq, bits), bits), wq).item()


@pytest.mark.parametrize("mode,group_size", [("affine", 64), ("symmetric", 32), ("affine", -1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_straight_through_gradient_is_identity(bits, mode, group_size):
    w = mx.random.normal((8, 128))
    g = mx.random.normal((8, 128))
    grad = mx.grad(lambda w: mx.sum(quant.fake_quant(w, bits, group_size, mode) * g))(w)
    assert mx.array_equal(grad, g).item()


def _near_code_centers(bits, group_size, seed):
    """Weights near code centres, so a small change of scale flips no code."""
    rng = np.random.default_rng(seed)
    n, k = 4, 2 * group_size
    s = rng.uniform(0.01, 0.03, size=(n, k // group_size)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, size=(n, k // group_size)).astype(np.float32)
    q = rng.integers(0, 2**bits, size=(n, k))
    noise = rng.uniform(-0.1, 0.1, size=(n, k))
    w = (np.repeat(s, group_size, 1) * (q + noise) + np.repeat(b, group_size, 1)).astype(np.float32)
    return mx.array(w), mx.array(s), mx.array(b)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, 128), (3, 64)])
def test_learned_scale_gradients_match_finite_differences(bits, group_size):
    w, s, b = _near_code_centers(bits, group_size, seed=bits)
    g = mx.random.normal(w.shape)

    def f(w, s, b):
        return mx.sum(quant.fake_quant(w, bits, group_size, "affine", s, b) * g)

    dw, ds, db = mx.grad(f, argnums=(0, 1, 2))(w, s, b)
    ds, db = np.array(ds), np.array(db)
    assert np.isfinite(ds).all() and np.isfinite(db).all()
    assert (ds != 0).all() and (db != 0).all()
    g64 = np.array(g, dtype=np.float64)

    def f64(s_, b_):
        out = quant.fake_quant(w, bits, group_size, "affine", mx.array(s_), mx.array(b_))
        return float((np.array(out, dtype=np.float64) * g64).sum())

    s_np, b_np = np.array(s), np.array(b)
    codes = np.array(quant.quantize_codes(w, s, b, bits, group_size))
    for i in range(s_np.shape[0]):
        for j in range(s_np.shape[1]):
            # as large as keeps every code (|u| shifts by < 0.3 of a step): float32 noise stays small
            eps = 0.3 / (2**bits - 1) * s_np[i, j]
            sp, sm = s_np.copy(), s_np.copy()
            sp[i, j] += eps
            sm[i, j] -= eps
            for s_ in (sp, sm):  # no code flips: the finite difference sees one linear piece
                assert (np.array(quant.quantize_codes(w, mx.array(s_), b, bits, group_size)) == codes).all()
            fd = (f64(sp, b_np) - f64(sm, b_np)) / (float(sp[i, j]) - float(sm[i, j]))
            assert fd == pytest.approx(ds[i, j], rel=2e-3, abs=1e-3)
            bp, bm = b_np.copy(), b_np.copy()
            bp[i, j] += 0.3 * s_np[i, j]
            bm[i, j] -= 0.3 * s_np[i, j]
            fd = (f64(s_np, bp) - f64(s_np, bm)) / (float(bp[i, j]) - float(bm[i, j]))
            assert fd == pytest.approx(db[i, j], rel=2e-3, abs=1e-3)
    # weights: straight-through where not clipped (all are, by construction)
    assert mx.array_equal(dw, g).item()


def test_learned_weight_gradient_is_zero_where_clipped():
    s = mx.full((1, 1), 0.1)
    b = mx.zeros((1, 1))
    w = mx.concatenate([mx.full((1, 16), 0.5), mx.full((1, 16), 5.0)], axis=1)  # 5.0 > 15*0.1
    w = mx.concatenate([w, w], axis=1)  # 64 wide, group 64 -> scales (1, 1)
    dw = mx.grad(lambda w: mx.sum(quant.fake_quant(w, 4, 64, "affine", s, b)))(w)
    expected = mx.concatenate([mx.ones((1, 16)), mx.zeros((1, 16))] * 2, axis=1)
    assert mx.array_equal(dw, expected).item()


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_fake_quant_lands_on_the_grid(bits):
    x = mx.random.normal((4, 64)) * 3
    scale = mx.array(0.05)
    y = quant.fake_quant_activation(x, scale, bits)
    q = np.array(y / scale)
    assert np.allclose(q, np.round(q), atol=1e-4)
    assert q.min() >= -(2 ** (bits - 1)) - 1e-4 and q.max() <= 2 ** (bits - 1) - 1 + 1e-4
    inside = np.abs(np.array(x)) < 0.05 * (2 ** (bits - 1) - 1)
    assert np.abs(np.array(y) - np.array(x))[inside].max() <= 0.025 + 1e-6
    grad = np.array(mx.grad(lambda x: mx.sum(quant.fake_quant_activation(x, scale, bits)))(x))
    assert (grad[inside] == 1).all()


def test_nan_weights_are_refused():
    w = mx.random.normal((4, 64))
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quant.check_finite(w, "layer.weight")


def test_group_size_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        quant.storage_group_size(64, 96)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    group_size=st.sampled_from([32, 64, -1]),
    rows=st.integers(1, 6),
    outlier=st.floats(1.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_mse_clip_search_never_reconstructs_worse_than_minmax(bits, group_size, rows, outlier, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, 128)).astype(np.float32)
    w[rng.integers(rows), rng.integers(128)] *= outlier  # a heavy-tailed group
    w = mx.array(w)
    g = quant.storage_group_size(group_size, 128)

    def err(scales, biases):
        codes = quant.quantize_codes(w, scales, biases, bits, g)
        deq = quant.dequantize(quant.pack(codes, bits), scales, biases, bits, g)
        return float(mx.sum((deq - w) ** 2))

    minmax = quant._channel_affine_scales(w, bits, g) if group_size == -1 else quant.init_params(w, bits, g, "affine")[1:]
    s, b = quant.mse_clip_params(w, bits, group_size)
    assert s.shape == minmax[0].shape and b.shape == minmax[1].shape
    # the grid starts at the min/max range, so the search can only lower the error
    assert err(s, b) <= err(*minmax) * (1 + 1e-5) + 1e-6
    if group_size == -1:  # one range per row, repeated over its storage groups
        assert bool(mx.all(s == s[:, :1]))


def test_mse_clip_search_clips_an_outlier_at_2_bits():
    w = mx.concatenate([mx.linspace(-1, 1, 63), mx.array([20.0])])[None, :]
    s, b = quant.mse_clip_params(w, 2, 64)
    full_range = (20.0 + 1.0) / 3
    assert float(s[0, 0]) < 0.6 * full_range  # the range was clipped (ratio 0.5 is the grid's end)


def test_scale_init_options_are_validated():
    from mlxqat.recipes import LayerSpec

    assert LayerSpec(2, 64, learn_scales=True, scale_init="mse").scale_init == "mse"
    with pytest.raises(ValueError, match="scale_init='best'"):
        LayerSpec(2, 64, learn_scales=True, scale_init="best")
    with pytest.raises(ValueError, match="needs learn_scales=True"):
        LayerSpec(2, 64, scale_init="mse")
    with pytest.raises(ValueError, match="min_ratio"):
        quant.mse_clip_params(mx.ones((2, 64)), 2, 64, min_ratio=0.0)


def test_snapping_to_float16_is_lossless_storage():
    x = mx.array([0.1, 1.0, 3.14159, 65504.0, 1e-8], dtype=mx.float32)
    s = quant.snap_to(mx.float16, x)
    assert s.dtype == mx.float32 and quant.holds_exactly(mx.float16, s)
    assert not quant.holds_exactly(mx.float16, x)
    assert mx.array_equal(s.astype(mx.float16).astype(mx.float32), s).item()
    assert quant.holds_exactly(mx.float16, np.array(s)) and not quant.holds_exactly(mx.float16, np.array([1e6], np.float32))
    assert quant.compact(s, -8 * s) is None  # -8 * 65504 overflows float16
    halves = quant.compact(s[:3], -8 * s[:3])
    assert halves[0].dtype == mx.float16 and mx.array_equal(halves[0].astype(mx.float32), s[:3]).item()
    assert quant.compact(x[:3], -8 * x[:3]) is None  # not float16 values: kept as they are


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_and_dequantize_a_layer_match_mlx(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    layer = nn.QuantizedLinear.from_linear(nn.Linear(128, 8), group_size=32, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, 32, bits)
    codes = quant.unpack_numpy(np.array(layer.weight), bits)
    assert codes.dtype == np.uint8 and codes.shape == (8, 128) and codes.max() < 2**bits
    s = np.repeat(np.array(layer.scales), 32, axis=-1)
    b = np.repeat(np.array(layer.biases), 32, axis=-1)
    want = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=bits)
    assert np.allclose(codes * s + b, np.array(want), atol=1e-6)
    assert mx.array_equal(quant.dequantized_weight(layer), want).item()
    bits_stored, n = quant.layer_storage(layer)
    assert n == 8 * 128 and bits_stored == 8 * (layer.weight.nbytes + layer.scales.nbytes + layer.biases.nbytes)


def _grid_weights(seed: int, shape=(64, 256)) -> mx.array:
    """Weights as a model dequantized from a 5-bit symmetric file holds them (GGUF Q5_0's grid)."""
    mx.random.seed(seed)
    return quant.fake_quant(mx.random.normal(shape) * 0.05, 5, 32, "symmetric", scale_dtype="float16")


def _changed_codes(w, step, bits=4, group_size=32, mode="symmetric"):
    before = quant.fake_quant(w, bits, group_size, mode, scale_dtype="float16")
    after = quant.fake_quant(w + step, bits, group_size, mode, scale_dtype="float16")
    return float(mx.mean(before != after).item())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["symmetric", "affine"]), bits=st.sampled_from([2, 3, 4, 8]))
def test_untie_keeps_every_code_and_leaves_no_weight_on_a_boundary(seed, mode, bits):
    w = _grid_weights(seed)
    _, s, b = quant.init_params(w, bits, 32, mode, "float16")
    u = quant.untie(w, s, b, bits, 32)
    assert mx.array_equal(quant.quantize_codes(u, s, b, bits, 32), quant.quantize_codes(w, s, b, bits, 32)).item()
    x = (u - _expand_b(b, u)) / _expand_b(s, u)
    inside = (mx.round(x) >= 0) & (mx.round(x) <= 2**bits - 1)  # clipped elements have no boundary to leave
    near = inside & (mx.abs(x - mx.floor(x) - 0.5) < 0.9e-5)
    assert not mx.any(near).item()  # none left near a half-way point ...
    moved = mx.abs(u - w) / mx.abs(_expand_b(s, u))
    assert float(mx.max(moved).item()) <= 0.25 + 1e-4  # ... and none moved more than a quarter step


def _expand_b(p, like):
    return mx.repeat(p, like.shape[-1] // p.shape[-1], axis=-1)


def test_untie_stops_a_tiny_update_from_flipping_a_grid_model_wholesale():
    """A Q5_0-grid model put on Q4_0: half its weights sit on Q4_0's rounding boundaries, so any update
    flips a quarter of all codes at once (what made QAT of a GGUF-born Gemma 3 diverge at its first
    step); untied, an update of 1e-6 flips almost none."""
    w = _grid_weights(7)
    step = mx.array(np.sign(np.random.default_rng(0).standard_normal(w.shape)).astype(np.float32)) * 1e-6
    assert _changed_codes(w, step) > 0.1
    _, s, b = quant.init_params(w, 4, 32, "symmetric", "float16")
    assert _changed_codes(quant.untie(w, s, b, 4, 32), step) < 0.001
