"""Saving to mlx-lm directories: mlx_lm.load opens them, hashes guard them, writes are atomic."""

import json

import mlx.core as mx
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load

import mlxqat
import tiny
from mlxqat.recipes import LayerSpec, Recipe

MIXED = Recipe(
    "mixed-test",
    LayerSpec(4, 64),
    overrides=(
        ("*.mlp.down_proj", LayerSpec(8, 32)),
        ("*.self_attn.v_proj", LayerSpec(6, 64)),
        (r"re:model\.layers\.1\.self_attn\.[qk]_proj", LayerSpec(3, 32)),
        ("*embed_tokens", LayerSpec(2, 64)),
    ),
    skip=("lm_head",),
)


def _converted(arch, recipe, seed=0):
    model, config = tiny.make_model(arch, seed)
    mlxqat.prepare(model, recipe)
    mlxqat.convert(model)
    return model, config


@pytest.mark.parametrize("recipe", ["int4", MIXED], ids=["uniform", "mixed"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_round_trip_through_mlx_lm(tmp_path, tokenizer, arch, recipe):
    model, config = _converted(arch, recipe)
    out = tmp_path / "out"
    manifest = mlxqat.save(model, tokenizer, out, config=config)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    cfg = json.loads((out / "config.json").read_text())
    if recipe == "int4":
        assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    else:
        q = cfg["quantization"]
        assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
        assert q["model.layers.1.self_attn.q_proj"]["bits"] == 3
        assert q["model.embed_tokens"]["bits"] == 2
        assert "lm_head" not in q
    loaded, tok = mlx_lm_load(str(out))
    prompt = "def fibonacci(n):"
    a = mlx_lm_generate(model, tokenizer, prompt, max_tokens=24)
    b = mlx_lm_generate(loaded, tok, prompt, max_tokens=24)
    assert a == b and len(a) > 0
    ids = mx.array(tokenizer.encode(prompt))
    assert mx.array_equal(model(ids[None]), loaded(ids[None])).item()
    # and our own loader verifies and restores the recipe
    ours, _ = mlxqat.load(out)
    assert ours.mlxqat_recipe.name == (recipe if isinstance(recipe, str) else recipe.name)


def test_activation_scales_survive_save_and_load(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 3)
    mlxqat.prepare(model, Recipe("a8", LayerSpec(4, 64, act_bits=8)))
    mlxqat.calibrate(model, [mx.random.randint(0, tiny.VOCAB, (2, 16))])
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    assert (tmp_path / "m" / "activation_scales.safetensors").exists()
    plain, _ = mlx_lm_load(str(tmp_path / "m"))  # mlx-lm opens it (weight-only view)
    ours, _ = mlxqat.load(tmp_path / "m")
    x = mx.arange(12)[None]
    assert mx.array_equal(ours(x), model(x)).item()
    assert not mx.array_equal(plain(x), model(x)).item()


def test_sharded_save_writes_an_index(tmp_path, tokenizer):
    model, config = _converted("llama", "int4")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded, _ = mlxqat.load(tmp_path / "m")
    x = mx.arange(8)[None]
    assert mx.array_equal(loaded(x), model(x)).item()


def test_tampered_file_is_refused(tmp_path, tokenizer):
    model, config = _converted("llama", "int4")
    out = tmp_path / "m"
    mlxqat.save(model, tokenizer, out, config=config)
    mlxqat.verify(out)
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(mlxqat.IntegrityError, match=r"model\.safetensors: sha256 .* but the manifest says"):
        mlxqat.verify(out)
    with pytest.raises(mlxqat.IntegrityError, match="re-export or re-download"):
        mlxqat.load(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(mlxqat.IntegrityError, match="tokenizer.json: missing"):
        mlxqat.verify(out)


def test_failure_mid_save_leaves_nothing_half_written(tmp_path, tokenizer, monkeypatch):
    model, config = _converted("llama", "int4")
    out = tmp_path / "m"

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(tokenizer._tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="injected"):
        mlxqat.save(model, tokenizer, out, config=config)
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary left behind
    monkeypatch.undo()
    # a good save, then a failing re-save: the good one stays intact
    mlxqat.save(model, tokenizer, out, config=config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        mlxqat.save(model, tokenizer, out, config=config)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    mlxqat.verify(out)


def test_save_refuses_bad_input(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, "int4")
    with pytest.raises(ValueError, match="call mlxqat.convert"):
        mlxqat.save(model, tokenizer, tmp_path / "a", config=config)
    mlxqat.convert(model)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        mlxqat.save(model, None, tmp_path / "a", config=config)
    with pytest.raises(ValueError, match="no 'model_type'"):
        mlxqat.save(model, tokenizer, tmp_path / "a", config={"hidden_size": 64})
    assert not (tmp_path / "a").exists()


def test_load_reports_missing_config_keys(tmp_path, tokenizer):
    model, config = _converted("llama", "int4")
    out = tmp_path / "m"
    mlxqat.save(model, tokenizer, out, config=config)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["hidden_size"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        mlxqat.load(out, verify_files=False)
    del cfg["model_type"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no 'model_type'"):
        mlxqat.load(out, verify_files=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mlxqat.load(tmp_path / "nowhere")


def test_load_a_plain_mlx_lm_directory_and_quantize_it(tmp_path, tokenizer):
    """The user's path: mlx_lm.load a full-precision model, prepare, convert, save."""
    model, config = tiny.make_model("gemma3_text", 0)
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "fp")
    fp, tok = mlxqat.load(src)
    mlxqat.prepare(fp, "q4_0")
    mlxqat.convert(fp)
    mlxqat.save(fp, tok, tmp_path / "q", config=config)
    again, _ = mlx_lm_load(str(tmp_path / "q"))
    x = mx.arange(9)[None]
    assert mx.array_equal(again(x), fp(x)).item()
