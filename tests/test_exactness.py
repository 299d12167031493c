"""The core promise: the converted model computes what the fake-quant model computed."""

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlxqat
import tiny

RECIPES = ["int4", "int8", "q4_0", "int3", "int2"]
SEEDS = range(5)


def _logits_and_tokens(model, prompt):
    logits = model(prompt[None])
    mx.eval(logits)
    return logits, tiny.greedy(model, prompt, 32)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_converted_equals_fake_quant(arch, recipe):
    for seed in SEEDS:
        model, _ = tiny.make_model(arch, seed)
        mx.random.seed(100 + seed)
        prompt = mx.random.randint(0, tiny.VOCAB, (12,))
        fp_logits = model(prompt[None])
        mlxqat.prepare(model, recipe)
        fq_logits, fq_tokens = _logits_and_tokens(model, prompt)
        # quantization changed the model (the test could fail)
        assert float(mx.abs(fq_logits - fp_logits).max()) > 1e-4
        mlxqat.convert(model)
        assert not any(mlxqat.layers.is_fake_quant(m) for _, m in model.named_modules())
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        q_logits, q_tokens = _logits_and_tokens(model, prompt)
        assert float(mx.abs(q_logits - fq_logits).max()) <= 1e-5, (arch, recipe, seed)
        assert q_tokens == fq_tokens, (arch, recipe, seed)


@pytest.mark.parametrize("scale_init", ["minmax", "mse"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_learned_scales_and_channelwise_convert_exactly(arch, scale_init):
    recipe = mlxqat.Recipe(
        "custom",
        mlxqat.LayerSpec(4, 64, learn_scales=True, scale_init=scale_init),
        overrides=(
            ("*mlp.down_proj", mlxqat.LayerSpec(3, -1, "symmetric")),
            ("*mlp.up_proj", mlxqat.LayerSpec(2, -1, learn_scales=True, scale_init=scale_init)),
        ),
    )
    model, _ = tiny.make_model(arch, 1)
    mlxqat.prepare(model, recipe)
    # move the learned scales/biases away from their init, as training would
    for _, m in model.named_modules():
        if isinstance(m, mlxqat.FakeQuantLinear) and m.spec.learn_scales:
            m.scales = m.scales * 1.1
            m.biases = m.biases + 0.01
    prompt = mx.arange(10)
    fq_logits, fq_tokens = _logits_and_tokens(model, prompt)
    mlxqat.convert(model)
    q_logits, q_tokens = _logits_and_tokens(model, prompt)
    assert float(mx.abs(q_logits - fq_logits).max()) <= 1e-5
    assert q_tokens == fq_tokens


def test_activation_quantization_converts_exactly():
    recipe = mlxqat.Recipe("a8w4", mlxqat.LayerSpec(4, 64, act_bits=8))
    model, _ = tiny.make_model("llama", 2)
    mlxqat.prepare(model, recipe)
    with pytest.raises(RuntimeError, match="calibrate"):
        model(mx.arange(4)[None])
    batches = [mx.random.randint(0, tiny.VOCAB, (2, 16)) for _ in range(3)]
    scales = mlxqat.calibrate(model, batches)
    assert len(scales) == 15  # 7 linears x 2 blocks + lm_head (embeddings are weight-only)
    assert all(s > 0 for s in scales.values())
    prompt = mx.arange(10)
    fq_logits, fq_tokens = _logits_and_tokens(model, prompt)
    mlxqat.convert(model)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "ActQuantizedLinear" in kinds
    q_logits, q_tokens = _logits_and_tokens(model, prompt)
    assert float(mx.abs(q_logits - fq_logits).max()) <= 1e-5
    assert q_tokens == fq_tokens


def test_prepare_skips_layers_that_do_not_fit_with_a_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fits = nn.Linear(64, 64)
            self.odd = nn.Linear(48, 64)

        def __call__(self, x):
            return self.fits(x)

    net = Net()
    with pytest.warns(UserWarning, match="odd: group_size=64 does not divide in_features=48"):
        mlxqat.prepare(net, "int4")
    assert isinstance(net.fits, mlxqat.FakeQuantLinear)
    assert isinstance(net.odd, nn.Linear)
    with pytest.raises(ValueError, match="odd: group_size=64 does not divide"):
        mlxqat.prepare(Net(), "int4", strict=True)


def test_prepare_refuses_nan_weights():
    model, _ = tiny.make_model("llama", 0)
    w = model.model.layers[0].mlp.up_proj.weight
    w[0, 0] = float("inf")
    model.model.layers[0].mlp.up_proj.weight = w
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has 1 NaN/Inf"):
        mlxqat.prepare(model, "int4")


def test_convert_without_prepare_is_an_error():
    model, _ = tiny.make_model("llama", 0)
    with pytest.raises(ValueError, match="prepare"):
        mlxqat.convert(model)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_converted_with_our_kernel_generates_the_same_tokens(arch):
    model, _ = tiny.make_model(arch, 3)
    mlxqat.prepare(model, "int4")
    prompt = mx.arange(5, 17)
    fq_tokens = tiny.greedy(model, prompt, 24)
    mlxqat.convert(model, kernel="mlxqat")
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "KernelQuantizedLinear" in kinds
    assert tiny.greedy(model, prompt, 24) == fq_tokens
    mlxqat.use_kernel(model, "mlx")
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "KernelQuantizedLinear" not in kinds and "QuantizedLinear" in kinds
    assert tiny.greedy(model, prompt, 24) == fq_tokens
