"""int4_matmul on the CPU path, its errors, its gradients, and KernelQuantizedLinear.

Accuracy is judged by ``mlxqat.kernels.check.error_ratio`` (tolerance per dtype
stated and justified there: one output ulp of the dtype, 2**-10 for float16
and 2**-7 for bfloat16 and 0 for float32, plus 1e-5 of sum |x||W| for float32
summation order); a ratio <= 1 passes.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from mlxqat.kernels import KernelQuantizedLinear, int4_matmul, is_supported
from mlxqat.kernels import int4 as int4_mod
from mlxqat.kernels.check import error_ratio, reference

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
GROUPS = [32, 64, 128]


def quantized(n, k, group_size, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    w = mx.random.normal((n, k)) * 0.05
    wq, s, b = mx.quantize(w, group_size, 4)
    return wq, s.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (8,), (33,), (2, 3)], ids=str)
def test_cpu_path_matches_reference(dtype, group_size, lead):
    k = 3 * 96 if group_size == 32 else 3 * group_size  # not a multiple of 512
    wq, s, b = quantized(72, k, group_size, dtype)
    x = mx.random.normal(lead + (k,)).astype(dtype)
    y = int4_matmul(x, wq, s, b, group_size, backend="cpu")
    assert y.shape == lead + (72,) and y.dtype == dtype
    assert error_ratio(y.reshape(-1, 72), x.reshape(-1, k), wq, s, b, group_size) <= 1.0


def test_cpu_path_float32_is_mlx_exactly_for_few_rows():
    wq, s, b = quantized(64, 256, 64)
    x = mx.random.normal((2, 256))
    y = int4_matmul(x, wq, s, b, 64, backend="cpu")
    assert mx.array_equal(y, mx.quantized_matmul(x, wq, s, b, group_size=64, bits=4)).item()


def test_dequantize_float32_is_mx_dequantize_bit_for_bit():
    for g in GROUPS:
        wq, s, b = quantized(48, 384, g)
        ours = int4_mod.dequantize_float32(wq, s, b, g)
        assert mx.array_equal(ours, mx.dequantize(wq, s, b, group_size=g, bits=4)).item()


def test_chunked_dequantization_matches_one_piece(monkeypatch):
    wq, s, b = quantized(200, 256, 64)
    x = mx.random.normal((16, 256))
    whole = int4_matmul(x, wq, s, b, 64, backend="cpu")
    monkeypatch.setattr(int4_mod, "CPU_DEQUANT_CHUNK", 256 * 48)  # 48-row chunks, last one partial
    chunked = int4_matmul(x, wq, s, b, 64, backend="cpu")
    assert error_ratio(chunked, x, wq, s, b, 64) <= 1.0
    np.testing.assert_allclose(np.array(chunked), np.array(whole), rtol=0, atol=1e-5)


def test_mixed_dtypes_promote_like_quantized_matmul():
    wq, s, b = quantized(40, 128, 32, mx.float16)
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    y = int4_matmul(x, wq, s, b, 32, backend="cpu")
    assert y.dtype == mx.quantized_matmul(x, wq, s, b, group_size=32, bits=4).dtype == mx.float32
    assert error_ratio(y, x, wq, s, b, 32) <= 1.0


def test_non_contiguous_inputs_give_the_right_answer():
    wq, s, b = quantized(64, 128, 64)
    xt = mx.random.normal((128, 5)).T  # (5, 128) view with transposed strides
    y = int4_matmul(xt, wq, s, b, 64, backend="cpu")
    assert error_ratio(y, mx.array(np.array(xt)), wq, s, b, 64) <= 1.0
    # every other output row of a bigger weight: row-strided views of all three
    wq2, s2, b2 = quantized(128, 128, 64)
    y2 = int4_matmul(xt, wq2[::2], s2[::2], b2[::2], 64, backend="cpu")
    ref = reference(xt, mx.array(np.array(wq2[::2])), mx.array(np.array(s2[::2])), mx.array(np.array(b2[::2])), 64)
    np.testing.assert_allclose(np.array(y2), np.array(ref), rtol=0, atol=1e-5)


def test_empty_batch():
    wq, s, b = quantized(16, 64, 32)
    y = int4_matmul(mx.zeros((0, 64)), wq, s, b, 32, backend="cpu")
    assert y.shape == (0, 16)


@pytest.mark.parametrize("m", [1, 6])
def test_gradients_match_dequantized_matmul(m):
    wq, s, b = quantized(48, 128, 32)
    x = mx.random.normal((m, 128))
    cot = mx.random.normal((m, 48))

    def ours(x, s, b):
        return (int4_matmul(x, wq, s, b, 32, backend="cpu") * cot).sum()

    def dense(x, s, b):
        return ((x @ mx.dequantize(wq, s, b, group_size=32, bits=4).T) * cot).sum()

    got = mx.grad(ours, argnums=(0, 1, 2))(x, s, b)
    want = mx.grad(dense, argnums=(0, 1, 2))(x, s, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4)


def test_gpu_vjp_formula_matches_autodiff():
    # The Metal/CUDA paths get gradients from _int4_vjp; check it here on CPU.
    wq, s, b = quantized(40, 192, 64, mx.float16)
    x = mx.random.normal((3, 192)).astype(mx.float16)
    cot = mx.random.normal((3, 40)).astype(mx.float16)
    dx, dw, ds, db = int4_mod._int4_vjp(64, (x, wq, s, b), cot, None)

    def dense(x, s, b):
        w = mx.dequantize(wq, s, b, group_size=64, bits=4)
        return x @ w.T

    f32 = [a.astype(mx.float32) for a in (x, s, b)]
    _, (ex, es, eb) = mx.vjp(dense, f32, [cot.astype(mx.float32)])
    assert dx.dtype == mx.float16 and ds.dtype == mx.float16 and dw.dtype == mx.uint32
    for g, e in ((dx, ex), (ds, es), (db, eb)):
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(e), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------ bad input --

def test_errors_name_the_bad_value_and_the_fix():
    wq, s, b = quantized(16, 128, 64)
    x = mx.random.normal((2, 128))
    with pytest.raises(TypeError, match=r"int32.*astype"):
        int4_matmul(x.astype(mx.int32), wq, s, b, 64)
    with pytest.raises(TypeError, match=r"w_packed has dtype .*float32.*uint32"):
        int4_matmul(x, wq.astype(mx.float32), s, b, 64)
    with pytest.raises(ValueError, match=r"group_size=48 .*32, 64 or 128"):
        int4_matmul(x, wq, s, b, 48)
    with pytest.raises(ValueError, match=r"x has 96 features .* 128 per row"):
        int4_matmul(x[:, :96], wq, s, b, 64)
    with pytest.raises(ValueError, match=r"scales has shape \(16, 2\) .* needs \(16, 4\)"):
        int4_matmul(x, wq, s, b, 32)
    with pytest.raises(TypeError, match=r"mx.array"):
        int4_matmul(np.array(x), wq, s, b, 64)
    with pytest.raises(TypeError, match=r"scales .* and biases .* share one dtype"):
        int4_matmul(x, wq, s, b.astype(mx.float16), 64)
    with pytest.raises(ValueError, match=r"backend='tpu'"):
        int4_matmul(x, wq, s, b, 64, backend="tpu")


def test_k_not_divisible_by_group_size_is_an_error():
    # 96 codes per row with 64-wide groups cannot come from mx.quantize; say so.
    wq, s, b = quantized(8, 96, 32)
    x = mx.random.normal((1, 96))
    with pytest.raises(ValueError, match=r"K=96 is not divisible by group_size=64"):
        int4_matmul(x, wq, s[:, :1], b[:, :1], 64)


@pytest.mark.skipif(int4_mod.gpu_backend() is not None, reason="a Metal or CUDA GPU is present")
def test_auto_dispatch_uses_cpu_without_a_gpu():
    assert int4_mod.gpu_backend() is None  # CI has neither Metal nor CUDA
    wq, s, b = quantized(16, 64, 32)
    for backend in ("metal", "cuda"):
        with pytest.raises(ValueError, match=f"backend='{backend}' needs"):
            int4_matmul(mx.zeros((1, 64)), wq, s, b, 32, backend=backend)


# ----------------------------------------------------------------- layer --

def tiny_llama(tie=True):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
                           tie_word_embeddings=tie)
    mx.random.seed(3)
    model = llama.Model(args)
    nn.quantize(model, 64, 4)
    mx.eval(model.parameters())
    return model


def swap_in_kernel_layers(model):
    swaps = tree_map_with_path(
        lambda path, m: KernelQuantizedLinear.from_quantized(m) if is_supported(m) else m,
        model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(tree_unflatten(tree_flatten(swaps, is_leaf=nn.Module.is_module)))
    return model


def greedy(model, prompt, steps):
    """Argmax decoding with a KV cache: the prompt is one M=len(prompt) call,
    then every new token is an M=1 call."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


def test_converted_model_generates_the_same_greedy_tokens():
    base = tiny_llama()
    kern = swap_in_kernel_layers(tiny_llama())
    n_kernel = sum(isinstance(m, KernelQuantizedLinear) for _, m in kern.named_modules())
    assert n_kernel == 14  # 7 projections per layer x 2 layers
    prompt = [1, 17, 42, 99, 5, 203, 64, 7, 150, 33, 12]  # 11 tokens: prefill path, then decode path
    assert greedy(kern, prompt, 12) == greedy(base, prompt, 12)
    lb, lk = base(mx.array([prompt])), kern(mx.array([prompt]))
    np.testing.assert_allclose(np.array(lk), np.array(lb), rtol=0, atol=1e-4)


def test_layer_keeps_parameters_so_saved_weights_are_unchanged(tmp_path):
    base = tiny_llama()
    kern = swap_in_kernel_layers(tiny_llama())
    pb, pk = dict(tree_flatten(base.parameters())), dict(tree_flatten(kern.parameters()))
    assert pb.keys() == pk.keys()
    assert all(pb[k].dtype == pk[k].dtype and mx.array_equal(pb[k], pk[k]).item() for k in pb)
    path = str(tmp_path / "model.safetensors")
    mx.save_safetensors(path, pk)
    fresh = tiny_llama()
    fresh.load_weights(path, strict=True)  # a plain QuantizedLinear model opens it
    q = fresh.model.layers[0].self_attn.q_proj
    assert type(q) is nn.QuantizedLinear and q.group_size == 64 and q.bits == 4


def test_from_quantized_shares_arrays_and_trainable_state():
    ql = nn.QuantizedLinear(128, 32, bias=True, group_size=32, bits=4)
    ql.unfreeze(keys=["scales", "biases"], recurse=False)
    layer = KernelQuantizedLinear.from_quantized(ql)
    assert layer.weight is ql.weight and layer.scales is ql.scales and layer.bias is ql.bias
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["biases", "scales"]
    x = mx.random.normal((4, 128))
    np.testing.assert_allclose(np.array(layer(x)), np.array(ql(x)), rtol=0, atol=1e-5)
    assert "group_size=32" in repr(layer)


@pytest.mark.parametrize("kwargs", [dict(bits=8, group_size=64), dict(bits=2, group_size=64),
                                    dict(bits=4, group_size=32, mode="mxfp4")], ids=str)
def test_unsupported_layers_are_refused(kwargs):
    ql = nn.QuantizedLinear(128, 32, **kwargs)
    assert not is_supported(ql)
    with pytest.raises(ValueError, match="keep this layer as nn.QuantizedLinear"):
        KernelQuantizedLinear.from_quantized(ql)
