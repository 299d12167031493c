"""Round-to-nearest (:func:`mlxqat.convert.quantize_rtn`): the plain recipe, converted or fake-quant, stored as saved."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
import tiny
from mlxqat.convert import quantize_rtn
from mlxqat.layers import ActQuantizedLinear, FakeQuantLinear


def _windows(n=8, seq_len=16):
    return np.random.default_rng(0).integers(0, tiny.VOCAB, size=(n, seq_len + 1)).astype(np.int32)


@pytest.mark.parametrize("recipe", ["int4", "q4_0", "int3"])
def test_rtn_is_the_plain_recipe_converted_with_float16_scales(recipe):
    x = mx.array(_windows(2)[:, :-1])
    ref, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(ref, mlxqat.recipes.get(recipe, scale_dtype="float16").plain())
    fq = quantize_rtn(tiny.make_model("llama", 0)[0], recipe, fake_quant=True)
    assert mx.array_equal(fq(x), ref(x)).item()  # fake-quant: the plain recipe itself, bit for bit
    model, _ = tiny.make_model("llama", 0)
    fp_logits = model(x)
    assert quantize_rtn(model, recipe) is model
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and not any(isinstance(m, FakeQuantLinear) for _, m in model.named_modules())
    assert all(m.scales.dtype == m.biases.dtype == mx.float16 for m in layers)  # as mlxqat.save stores them
    q_logits = model(x)
    assert float(mx.abs(q_logits - ref(x)).max()) <= 1e-5  # converted: the same numbers, another kernel
    assert float(mx.abs(q_logits - fp_logits).max()) > 1e-4  # and quantization changed the model


def test_the_rest_of_the_model_keeps_its_dtype():
    model, _ = tiny.make_model("llama", 0)
    model.set_dtype(mx.bfloat16)
    quantize_rtn(model, "int4")
    assert model.model.norm.weight.dtype == mx.bfloat16
    assert model.model.layers[0].mlp.up_proj.scales.dtype == mx.float16


def test_scale_dtype_none_keeps_float32_scales():
    model, _ = tiny.make_model("llama", 0)
    quantize_rtn(model, "int4", scale_dtype=None)
    up = model.model.layers[0].mlp.up_proj
    assert up.scales.dtype == mx.float32
    assert not mx.array_equal(up.scales.astype(mx.float16).astype(mx.float32), up.scales).item()


def test_activation_recipes_need_calibration_windows():
    model, _ = tiny.make_model("llama", 0)
    with pytest.raises(ValueError, match=r"^recipe 'mobile' quantizes activations; give token windows"):
        quantize_rtn(model, "mobile")
    quantize_rtn(model, "mobile", _windows())
    act = [m for _, m in model.named_modules() if isinstance(m, ActQuantizedLinear)]
    assert act and all(float(m.act_scale) > 0 for m in act)


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match=r"unknown recipe 'int9'"):
        quantize_rtn(tiny.make_model("llama", 0)[0], "int9")
