import pytest

import tiny
from mlxqat import recipes
from mlxqat.recipes import LayerSpec, Recipe


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=7), r"bits=7 is not supported; use one of \(2, 3, 4, 5, 6, 8\)"),
        (dict(group_size=48), r"group_size=48 is not supported; use one of \(32, 64, 128\)"),
        (dict(mode="nf4"), r"mode='nf4' is not supported"),
        (dict(act_bits=16), r"act_bits=16 is not supported"),
        (dict(scale_dtype="bfloat16"), r"scale_dtype='bfloat16' is not supported"),
    ],
)
def test_invalid_specs_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec(**kwargs)


def test_builtins():
    assert {"int4", "int8", "q4_0", "int3", "int2"} <= set(recipes.names())
    assert recipes.get("int4").default == LayerSpec(4, 64, "affine")
    q = recipes.get("q4_0").default
    assert (q.bits, q.group_size, q.mode) == (4, 32, "symmetric")
    assert recipes.get("int2").default.bits_per_weight() == 2.5
    with pytest.raises(ValueError, match=r"unknown recipe 'int5'; built-in recipes are \["):
        recipes.get("int5")


def test_overrides_skip_glob_and_regex():
    r = Recipe(
        "t",
        LayerSpec(4, 64),
        overrides=(("*.mlp.down_proj", LayerSpec(8, 64)), (r"re:.*layers\.[01]\.self_attn\..*", LayerSpec(3, 32))),
        skip=("lm_head",),
    )
    assert r.spec_for("model.layers.3.mlp.down_proj").bits == 8
    assert r.spec_for("model.layers.1.self_attn.q_proj").bits == 3
    assert r.spec_for("model.layers.2.self_attn.q_proj").bits == 4
    assert r.spec_for("lm_head") is None
    assert Recipe.from_dict(r.to_dict()) == r


def test_with_options_applies_everywhere_and_rejects_unknown():
    r = recipes.get("int4", learn_scales=True)
    assert r.default.learn_scales
    with pytest.raises(ValueError, match=r"unknown LayerSpec option\(s\) \['learn_scale'\]"):
        recipes.get("int4", learn_scale=True)


def test_bad_override_shape():
    with pytest.raises(ValueError, match="must be a \\(pattern, LayerSpec\\) pair"):
        Recipe("t", overrides=(("*", 4),))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=4.0), r"bits=4\.0 must be an integer, not float"),
        (dict(bits=True), r"bits=True must be an integer, not bool"),
        (dict(group_size="64"), r"group_size='64' must be an integer, not str"),
        (dict(learn_scales="no"), r"learn_scales='no' must be True or False, not str"),
        (dict(learn_scales=1), r"learn_scales=1 must be True or False, not int"),
        (dict(act_bits=8.0), r"act_bits=8\.0 must be an integer or None, not float"),
        (dict(mode=None), r"mode=None must be a string, not NoneType"),
    ],
)
def test_spec_fields_of_the_wrong_type_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec(**kwargs)


def test_skip_and_overrides_must_be_sequences_of_patterns():
    with pytest.raises(ValueError, match=r"skip='lm_head' must be a tuple or list, e.g\. skip=\('lm_head',\)"):
        Recipe("t", skip="lm_head")
    with pytest.raises(ValueError, match=r"overrides='\*' must be a tuple or list"):
        Recipe("t", overrides="*")
    with pytest.raises(ValueError, match=r"pattern 3 must be a string"):
        Recipe("t", skip=(3,))
    with pytest.raises(ValueError, match=r"pattern 're:\(' is not a valid regular expression"):
        Recipe("t", overrides=(("re:(", LayerSpec()),))
    with pytest.raises(ValueError, match=r"default=4 must be a LayerSpec"):
        Recipe("t", default=4)
    r = Recipe("t", skip=["lm_head"], overrides=[("*.v_proj", LayerSpec(8, 64))])  # lists are fine
    assert r.skip == ("lm_head",) and r.spec_for("lm_head") is None
    assert r.spec_for("model.layers.0.self_attn.v_proj").bits == 8 and hash(r)
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_q4_0_keeps_the_output_head_at_8_bits_as_llama_cpp_does(arch):
    """llama.cpp's own Q4_0 files keep the output head (lm_head, or the tied embedding that serves as
    it) at a higher precision; q4_0 keeps it at 8 bits (exactly GGUF Q8_0), every other layer at 4."""
    from mlxqat.convert import head_path, prepare, recipe_of

    model, _ = tiny.make_model(arch)
    tied = not any(p == "lm_head" for p, _ in model.named_modules())
    prepare(model, "q4_0")
    head = head_path(model)
    assert head == ("model.embed_tokens" if tied else "lm_head")
    bits = {p: m.spec.bits for p, m in model.named_modules() if getattr(m, "spec", None) is not None}
    assert bits.pop(head) == 8
    assert set(bits.values()) == {4} and ("model.embed_tokens" in bits) == (not tied)
    assert recipe_of(model) == recipes.get("q4_0")  # the named recipe describes the model exactly
