"""mlxqat.kernels.use_dequantized_matmul: the same numbers as MLX's quantized layers, gradients to
scales and biases, and a swap that shares the layer's arrays and can be undone."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlxqat
import tiny
from mlxqat import quant
from mlxqat.kernels import (DequantizedActQuantizedLinear, DequantizedEmbedding, DequantizedLinear,
                            KernelQuantizedLinear, use_dequantized_matmul)
from mlxqat.layers import ActQuantizedLinear


def _swapped(module):
    holder = nn.Module()
    holder.layer = module
    use_dequantized_matmul(holder)
    return holder.layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_linear_matches_quantized_matmul(bits, group_size):
    q = nn.Linear(128, 96).to_quantized(group_size=group_size, bits=bits)
    x = mx.random.normal((5, 7, 128), key=mx.random.key(bits))
    ref = q(x)
    d = _swapped(q)
    assert type(d) is DequantizedLinear and isinstance(d, nn.QuantizedLinear)
    assert mx.allclose(d(x), ref, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("bits", [3, 4])
def test_embedding_head_matches(bits):
    q = nn.Embedding(96, 64).to_quantized(group_size=32, bits=bits)
    x = mx.random.normal((3, 64))
    ids = mx.array([[1, 5, 95]])
    ref_head, ref_rows = q.as_linear(x), q(ids)
    d = _swapped(q)
    assert type(d) is DequantizedEmbedding
    assert mx.allclose(d.as_linear(x), ref_head, atol=1e-4, rtol=1e-4).item()
    assert mx.array_equal(d(ids), ref_rows).item()  # lookups are untouched


def test_activation_quantized_layer_keeps_its_rounding():
    q = ActQuantizedLinear(64, 32, bias=True, group_size=32, bits=4, act_bits=8)
    q.act_scale = mx.array(0.05)
    x = mx.random.normal((4, 64))
    ref = q(x)
    d = _swapped(q)
    assert type(d) is DequantizedActQuantizedLinear and d.act_bits == 8 and d.act_scale is q.act_scale
    assert mx.allclose(d(x), ref, atol=1e-4, rtol=1e-4).item()
    plain = nn.QuantizedLinear(64, 32, bias=True, group_size=32, bits=4)
    plain.update({k: q[k] for k in ("weight", "scales", "biases", "bias")})
    plain = _swapped(plain)
    rounded = quant.fake_quant_activation(x, q.act_scale, 8)
    assert mx.allclose(d(x), plain(rounded), atol=1e-5).item()
    assert not mx.allclose(d(x), plain(x), atol=1e-3).item()  # the input rounding is there


def test_gradients_reach_scales_and_biases():
    q = _swapped(nn.Linear(64, 32).to_quantized(group_size=32, bits=4))
    x = mx.random.normal((3, 64), key=mx.random.key(1))

    def loss(params):
        q.update(params)
        return mx.sum(q(x) ** 2)

    params = {"scales": q.scales, "biases": q.biases}
    g = mx.grad(loss)(params)
    eps = 1e-3
    for name in ("scales", "biases"):  # the loss is quadratic in both: central differences are exact
        bump = eps * (mx.arange(params[name].size).reshape(params[name].shape) == 0)
        fd = (loss(dict(params, **{name: params[name] + bump})) - loss(dict(params, **{name: params[name] - bump}))) / (2 * eps)
        assert abs(g[name][0, 0].item() - fd.item()) < 2e-2 * max(1.0, abs(fd.item())), name


def test_swap_shares_arrays_keeps_state_and_undoes():
    model, _ = tiny.make_model("qwen3", seed=2)  # tied embedding: the head is QuantizedEmbedding.as_linear
    nn.quantize(model, group_size=32, bits=3)
    model.model.layers[0].self_attn.q_proj.unfreeze(keys=["scales"], recurse=False)
    before = dict(tree_flatten(model.parameters()))
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = model(ids)
    use_dequantized_matmul(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is DequantizedLinear and type(model.model.embed_tokens) is DequantizedEmbedding
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # shared, not copied
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable
    assert mx.allclose(model(ids), ref, atol=1e-4, rtol=1e-4).item()
    use_dequantized_matmul(model, enabled=False)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding
    assert mx.array_equal(model(ids), ref).item()


def test_other_layers_are_left_alone():
    model, _ = tiny.make_model("llama", seed=3)
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model, kernel="mlxqat")
    kernels = [p for p, m in model.named_modules() if isinstance(m, KernelQuantizedLinear)]
    assert kernels
    use_dequantized_matmul(model)
    assert all(type(m) is KernelQuantizedLinear for p, m in model.named_modules() if p in kernels)
    assert not any(isinstance(m, DequantizedLinear) for _, m in model.named_modules())
    floats, _ = tiny.make_model("llama", seed=3)
    types_before = [(p, type(m)) for p, m in floats.named_modules()]
    use_dequantized_matmul(floats)
    assert [(p, type(m)) for p, m in floats.named_modules()] == types_before
