"""Mixed precision: sensitivity pass, exact bit allocation, recipes that prepare, convert and save."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest

import mlxqat
import tiny
from mlxqat import mixed
from mlxqat.recipes import LayerSpec

G64 = tuple(LayerSpec(b, 64) for b in (2, 4, 8))


def _windows(n=4, seq=32, vocab=tiny.VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, seq + 1)).astype(np.int32)


def test_allocation_is_the_exact_optimum_within_budget():
    rng = np.random.default_rng(1)
    sizes = {f"l{i}": int(n) for i, n in enumerate(rng.integers(1, 20, 6) * 64)}
    # more bits, less damage, as measured sensitivities behave
    sens = {p: sorted(rng.random(3).tolist(), reverse=True) for p in sizes}
    total = sum(sizes.values())
    for budget in (2.6, 3.5, 5.0, 8.5):
        got = mixed.allocate_bits(sens, sizes, G64, budget, resolution=20000)
        assert mixed.bits_per_weight(got, sizes) <= budget + 1e-9
        best = None
        for combo in itertools.product(range(3), repeat=len(sizes)):
            cost = sum(sizes[p] * G64[j].bits_per_weight() for p, j in zip(sizes, combo)) / total
            if cost <= budget:
                val = sum(sens[p][j] for p, j in zip(sizes, combo))
                best = val if best is None else min(best, val)
        got_val = sum(sens[p][G64.index(s)] for p, s in got.items())
        assert got_val == pytest.approx(best, rel=1e-9)


def test_allocation_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        mixed.allocate_bits({"a": [1.0, 0.5, 0.1]}, {"a": 64}, G64, 2.0)


def test_channelwise_cost_uses_the_storage_group():
    # in_features=64 stores channel-wise scales per 64 inputs: 2 + 32/64 bits
    assert LayerSpec(2, -1).bits_per_weight(64) == 2.5
    assert LayerSpec(2, -1).bits_per_weight(256) == 2.25
    assert LayerSpec(2, -1).bits_per_weight(96) == 3.0  # stored per 32 inputs
    with pytest.raises(ValueError, match="pass in_features"):
        LayerSpec(2, -1).bits_per_weight()


def test_sensitivity_orders_bits_and_restores_the_model():
    model, _ = tiny.make_model("llama", 0, scale=3.0)
    w0 = model.model.layers[0].mlp.down_proj.weight
    sens = mixed.layer_sensitivity(model, _windows(), G64, batch_size=2)
    assert model.model.layers[0].mlp.down_proj.weight is w0  # restored
    assert set(sens) == set(mixed.quantizable_layers(model, G64))
    for path, (k2, k4, k8) in sens.items():
        assert k2 > k4 > k8 >= 0, path


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_reusing_earlier_blocks_measures_the_same_sensitivity(arch):
    """Replaying the full-precision outputs of the blocks before a layer's own gives the very numbers of
    running the whole model (odd batch count: the replayed batch order matters), and the block classes
    compute normally afterwards."""
    model, _ = tiny.make_model(arch, 0, scale=3.0)
    w = _windows(n=5)
    fast = mixed.layer_sensitivity(model, w, G64, batch_size=2)
    slow = mixed.layer_sensitivity(model, w, G64, batch_size=2, reuse_blocks=False)
    assert fast == slow
    x = mx.array(w[:2, :-1])
    twin, _ = tiny.make_model(arch, 0, scale=3.0)
    assert mx.array_equal(model(x), twin(x)).item()  # __call__ restored


def test_a_model_whose_blocks_do_not_chain_falls_back_to_whole_passes(monkeypatch):
    """A model whose blocks are not one chain of hidden states (here: a block is called twice) fails the
    replay check, and every pass runs the whole model: still the same numbers."""
    model, _ = tiny.make_model("llama", 0, scale=3.0)
    inner = model.model
    original = type(inner).__call__

    def twice(self, inputs, *args, **kwargs):
        out = original(self, inputs, *args, **kwargs)
        return out + 0.5 * self.layers[0](out, None, None)

    monkeypatch.setattr(type(inner), "__call__", twice)
    checks = []
    check = mixed._replay_matches
    monkeypatch.setattr(mixed, "_replay_matches", lambda *a: checks.append(check(*a)) or checks[-1])
    w = _windows(n=3)
    fast = mixed.layer_sensitivity(model, w, G64, batch_size=2)
    slow = mixed.layer_sensitivity(model, w, G64, batch_size=2, reuse_blocks=False)
    assert checks == [False]
    assert fast == slow and all(v[0] > 0 for v in fast.values())


def test_proxy_is_validated_by_rank_correlation():
    model, _ = tiny.make_model("llama", 0, scale=3.0)
    w = _windows()
    sens = mixed.layer_sensitivity(model, w, G64, batch_size=2)
    proxy = mixed.proxy_sensitivity(model, w, G64, batch_size=2)
    assert set(proxy) == set(sens)
    rho = mixed.rank_correlation(sens, proxy)
    assert 0.5 < rho <= 1.0  # bits dominate both orderings
    assert mixed.rank_correlation(sens, sens) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_recipe_meets_budget_and_saves_per_layer_overrides(arch, tmp_path, tokenizer):
    model, config = tiny.train_briefly(arch, tokenizer, steps=20)
    w = _windows(vocab=config["vocab_size"])
    recipe = mixed.mixed_recipe(model, w, budget_bpw=3.5)
    assert "reached" in recipe.description
    sizes = mixed.layer_sizes(model)
    assignment = {p: recipe.spec_for(p) for p in sizes}
    assert mixed.bits_per_weight(assignment, sizes) <= 3.5 + 1e-9
    assert len({s.bits for s in assignment.values()}) > 1  # really mixed
    mlxqat.prepare(model, recipe)
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    for p, s in assignment.items():
        got = q.get(p, {"bits": q["bits"], "group_size": q["group_size"]})
        assert (got["bits"], got["group_size"]) == (s.bits, s.group_size), p
    from mlx_lm import load

    loaded, _ = load(str(tmp_path / "m"))
    x = mx.array(w[:1, :-1])
    assert mx.allclose(loaded(x), model(x), atol=1e-4).item()


def test_mobile_recipe_is_channelwise_with_int8_activations(tokenizer):
    model, config = tiny.train_briefly("llama", tokenizer, steps=20)
    w = _windows(vocab=config["vocab_size"])
    recipe = mixed.mobile_recipe(model, w, budget_bpw=2.8)
    sizes = mixed.layer_sizes(model)
    specs = {p: recipe.spec_for(p) for p in sizes}
    assert all(s.group_size == -1 for s in specs.values())
    assert min(s.bits for s in specs.values()) == 2
    for p, s in specs.items():
        assert (s.act_bits == 8) == (p.rsplit(".", 1)[-1] in mixed.MOBILE_ACT_LAYERS), p
    mlxqat.prepare(model, recipe)
    mlxqat.calibrate(model, [mx.array(w[:2, :-1])])
    fq = model(mx.array(w[:1, :-1]))
    mlxqat.convert(model)
    assert mx.allclose(model(mx.array(w[:1, :-1])), fq, atol=1e-4).item()


@pytest.mark.parametrize("name", ["mixed", "mobile"])
def test_static_recipes_are_registered(name):
    r = mlxqat.recipes.get(name)
    assert r.name == name
    model, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(model, r)
    if name == "mobile":
        assert any(getattr(m, "spec", None) is not None and m.spec.act_bits == 8 for _, m in model.named_modules())
