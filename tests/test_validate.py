"""Malformed model files are a ValueError naming the file, never a signal, a hang or a silent load."""

import json
import os
import struct
import time
import warnings

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlxqat
import tiny
from mlxqat.storage.checks import check_module_parameters


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, tokenizer):
    """An int4 model directory without a manifest: only the checks stand between it and MLX."""
    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model)
    out = tmp_path_factory.mktemp("plain") / "m"
    mlxqat.save(model, tokenizer, out, config=config)
    (out / "mlxqat.json").unlink()
    return out


@pytest.fixture
def model_dir(plain_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(plain_dir, d)
    return d


def _load(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = mlxqat.load(d)
    mx.eval(model(mx.array([[1, 2, 3]])))
    return model


def _edit_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_the_untouched_directory_loads(model_dir):
    assert _load(model_dir) is not None


def test_transposed_scales_are_refused_not_a_signal(model_dir):
    """[N, 1] scales stored as [1, N] (same bytes) ended the process with SIGFPE inside MLX."""

    def transpose(h):
        for k, v in h.items():
            if k.endswith("self_attn.q_proj.scales"):
                v["shape"] = v["shape"][::-1]

    _edit_header(model_dir / "model.safetensors", transpose)
    with pytest.raises(ValueError, match="q_proj"):
        _load(model_dir)


def test_quantized_shapes_that_disagree_are_refused_before_compute(model_dir):
    model = _load(model_dir)
    layer = model.model.layers[0].mlp.up_proj
    layer.scales = layer.scales[:, :0]
    with pytest.raises(ValueError, match=r"up_proj\.scales has shape"):
        check_module_parameters(model, "m")


def test_huge_layer_count_is_refused_at_once(model_dir):
    _edit_config(model_dir, num_hidden_layers=2000006)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_hidden_layers=2000006; expected an integer in \[1, 1024\]"):
        _load(model_dir)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", "64", "hidden_size='64'"),
        ("hidden_size", 64.0, "hidden_size=64.0"),
        ("vocab_size", -1, "vocab_size=-1"),
        ("rms_norm_eps", "tiny", "rms_norm_eps='tiny'"),
        ("tie_word_embeddings", "no", "tie_word_embeddings='no'"),
        ("num_key_value_heads", 3, "not a multiple of num_key_value_heads=3"),
        ("model_type", "../../evil", "is not an architecture name"),
        ("quantization", {"group_size": 48, "bits": 4}, "group_size=48"),
        ("quantization", {"group_size": 64, "bits": 7}, "bits=7"),
        ("quantization", [4], "expected an object"),
    ],
)
def test_config_types_and_bounds(model_dir, field, value, message):
    _edit_config(model_dir, **{field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _load(model_dir)


def test_missing_config_field_is_a_clear_error(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["num_attention_heads"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads"):
        _load(model_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["model.norm.weight"].update(dtype="I32"), "model.norm.weight is mlx.core.int32"),
        (lambda h: h["model.norm.weight"].update(dtype="F16"), "of the wrong size"),
        (lambda h: h["model.norm.weight"].update(data_offsets=[0, 10**9]), "outside the"),
        (lambda h: h["model.norm.weight"].update(shape=[-4]), "has shape"),
        (lambda h: h.update({"x": 1}), "needs exactly dtype, shape and data_offsets"),
    ],
    ids=["int dtype", "half dtype", "offsets past the end", "negative shape", "junk entry"],
)
def test_safetensors_header_damage(model_dir, edit, message):
    _edit_header(model_dir / "model.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        _load(model_dir)


def test_redirected_offsets_that_overlap_are_refused(model_dir):
    def redirect(h):
        same = [k for k in h if k.endswith(".scales")]
        h[same[1]]["data_offsets"] = list(h[same[0]]["data_offsets"])

    _edit_header(model_dir / "model.safetensors", redirect)
    with pytest.raises(ValueError, match="share bytes"):
        _load(model_dir)


def test_header_length_beyond_the_file(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(ValueError, match="header length"):
        _load(model_dir)


def test_an_extra_weight_file_without_manifest_cannot_override_a_tensor(model_dir):
    model = _load(model_dir)
    mx.save_safetensors(str(model_dir / "model-zz-extra.safetensors"), {"model.norm.weight": model.model.norm.weight * 0})
    with pytest.raises(ValueError, match=r"model-zz-extra\.safetensors is not in model\.safetensors\.index\.json"):
        _load(model_dir)
    (model_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="'model.norm.weight' is in both"):
        _load(model_dir)


def test_nan_weights_are_refused(model_dir):
    weights = mx.load(str(model_dir / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * float("nan")
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(ValueError, match="model.norm.weight holds NaN or Inf"):
        _load(model_dir)


def test_tokenizer_code_in_the_directory_is_never_run(model_dir, tmp_path):
    marker = tmp_path / "ran"
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_dir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    try:
        _load(model_dir)
    except ValueError as e:  # refusing is fine too; running the code is not
        assert "tokenizer" in str(e)
    assert not marker.exists()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                              "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "quantization",
                              "tie_word_embeddings", "rope_scaling", "head_dim", "max_position_embeddings"]),
       value=JSON_VALUES)
def test_any_config_value_loads_or_is_a_value_error(plain_dir, tmp_path_factory, field, value):
    import shutil

    d = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(plain_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        _load(d)
    except (ValueError, FileNotFoundError) as e:
        assert str(e)
    shutil.rmtree(d)
    assert os.path.exists(plain_dir / "config.json")


def test_a_layer_size_that_does_not_fit_its_group_is_refused_not_a_signal(model_dir):
    """intermediate_size=1 made MLX quantize a 1-input down_proj at group 64: SIGFPE."""
    _edit_config(model_dir, intermediate_size=1)
    with pytest.raises(ValueError, match=r"config\.json does not match the weights"):
        _load(model_dir)


@pytest.mark.parametrize("value", [0.5, float("inf"), 3, "fp8"])
def test_quantization_config_of_the_wrong_type(model_dir, value):
    _edit_config(model_dir, quantization_config=value)
    with pytest.raises(ValueError, match="quantization_config"):
        _load(model_dir)


def test_a_config_the_architecture_cannot_run_is_refused_at_load(tmp_path, tokenizer):
    model, config = tiny.make_model("gemma3_text", 0)
    d = tiny.save_fp_model(model, config, tokenizer, tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["sliding_window_pattern"]  # mlx-lm's default (6) is more than the 2 layers
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not run with its config.json"):
        _load(d)


def test_a_hugging_face_cache_snapshot_of_links_verifies(tmp_path, tokenizer):
    """Hub downloads are links into blobs/: allowed there, and only there."""
    import shutil

    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model)
    src = tmp_path / "saved"
    mlxqat.save(model, tokenizer, src, config=config)
    repo = tmp_path / "models--me--qat"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    assert mlxqat.verify(snap)["files"] and _load(snap) is not None
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to("/etc/hostname")
    with pytest.raises(mlxqat.IntegrityError, match="tokenizer.json: not a regular file"):
        mlxqat.verify(snap)
