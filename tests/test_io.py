"""Saving to mlx-lm directories: mlx_lm.load opens them, hashes guard them, writes are atomic."""

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load

import mlxqat
import tiny
from mlxqat.storage.destinations import DestinationError, recover_interrupted, write_manifest
from mlxqat.storage.load import verify
from mlxqat.storage.manifest import Manifest, read_manifest, sha256_file
from mlxqat.export import export_mlx
from mlxqat.convert import recipe_of
from mlxqat.recipes import LayerSpec, Recipe

from mlxqat.cli import verify_main  # noqa: E402

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
    # and our own loader verifies and restores the recipe: each layer carries its spec again
    ours, _ = mlxqat.load(out)
    declared = mlxqat.recipes.get(recipe)
    assert recipe_of(ours) == declared and recipe_of(model) == declared
    assert ours.model.layers[0].mlp.down_proj.spec == declared.spec_for("model.layers.0.mlp.down_proj")
    assert json.loads((out / "mlxqat.json").read_text())["recipe"] == declared.to_dict()


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
    with pytest.raises(mlxqat.IntegrityError, match=r"model\.safetensors: content changed"):
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
    with pytest.warns(UserWarning, match="no mlxqat.json"):
        fp, tok = mlxqat.load(src)
    mlxqat.prepare(fp, "q4_0")
    mlxqat.convert(fp)
    mlxqat.save(fp, tok, tmp_path / "q", config=config)
    again, _ = mlx_lm_load(str(tmp_path / "q"))
    x = mx.arange(9)[None]
    assert mx.array_equal(again(x), fp(x)).item()


# ---------------------------------------------------------------------------
# The destination rule: nothing the user owns is replaced
# ---------------------------------------------------------------------------


def _snapshot(root):
    """Every path under ``root`` with its bytes (None for folders)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def int4_model():
    return _converted("llama", "int4")


def test_a_folder_of_user_files_is_never_replaced(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(DestinationError, match=r"d already exists and is a folder holding files mlxqat did not write \(notes\.txt\)"):
        mlxqat.save(model, tokenizer, d, config=config)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["cwd", "parent of cwd", "plain file", "symlink", "device", "empty string"])
def test_destinations_that_are_refused(tmp_path, tokenizer, int4_model, monkeypatch, what):
    model, config = int4_model
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    (tmp_path / "plain.txt").write_text("plain")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    dest = {
        "cwd": work, "parent of cwd": tmp_path, "plain file": tmp_path / "plain.txt",
        "symlink": tmp_path / "link", "device": "/dev/null", "empty string": "",
    }[what]
    before = _snapshot(tmp_path)
    message = {
        "cwd": "current directory", "parent of cwd": "current directory", "plain file": "a file mlxqat did not write",
        "symlink": "a symbolic link", "device": "a device or special file", "empty string": "output path is empty",
    }[what]
    with pytest.raises(DestinationError, match=message):
        mlxqat.save(model, tokenizer, dest, config=config)
    assert _snapshot(tmp_path) == before
    assert os.path.exists("/dev/null") and not os.path.isdir("/dev/null")


def test_source_model_is_never_the_destination(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    src = tmp_path / "src"
    mlxqat.save(model, tokenizer, src, config=config)
    before = _snapshot(tmp_path)
    for dest in (src, src / "inside", tmp_path):
        with pytest.raises(DestinationError, match="source model"):
            mlxqat.save(model, tokenizer, dest, config=config, sources=[src])
    with pytest.raises(DestinationError, match="source model"):
        export_mlx(src, src)
    assert _snapshot(tmp_path) == before
    mlxqat.verify(src)


def test_own_outputs_and_empty_folders_are_replaced_atomically(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    out = tmp_path / "out"
    out.mkdir()  # an empty folder made by the user holds nothing to lose
    first = mlxqat.save(model, tokenizer, out, config=config, info={"run": 1})
    second = mlxqat.save(model, tokenizer, out, config=config, info={"run": 2})
    assert first["run"] == 1 and second["run"] == 2 and mlxqat.verify(out)["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup left
    # a user file added to an mlxqat output makes it the user's: refused
    (out / "my-notes.md").write_text("mine")
    with pytest.raises(DestinationError, match="my-notes.md"):
        mlxqat.save(model, tokenizer, out, config=config)
    assert (out / "my-notes.md").read_text() == "mine"


KILL_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, {tests!r})
import mlxqat, tiny
from mlxqat.storage import destinations
from mlx_lm.tokenizer_utils import load as load_tokenizer
model, config = tiny.make_model("llama", 0)
mlxqat.prepare(model, "int4"); mlxqat.convert(model)
from pathlib import Path
tok = load_tokenizer(Path({tok!r}))
mlxqat.save(model, tok, {out!r}, config=config, info={{"run": "old"}})
real = os.rename
def rename(a, b):
    real(a, b)
    if str(b).endswith(".mlxqat-old"):
        os._exit(9)  # killed between the two renames
destinations.os.rename = rename
mlxqat.save(model, tok, {out!r}, config=config, info={{"run": "new"}})
"""


def test_a_kill_between_the_two_renames_is_repaired(tmp_path, tokenizer_dir):
    import subprocess
    import sys

    out = tmp_path / "out"
    script = KILL_BETWEEN_RENAMES.format(tests=str(Path(__file__).parent), tok=str(tokenizer_dir), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() and (tmp_path / ".out.mlxqat-old").is_dir()  # the old version is findable
    model, _ = mlxqat.load(out)  # ... and the next run restores it
    assert mlxqat.verify(out)["run"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.tmp-")) == ["out"]


def test_recover_finishes_a_replacement_whose_new_version_is_in_place(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    out, stale = tmp_path / "out", tmp_path / ".out.mlxqat-old"
    mlxqat.save(model, tokenizer, out, config=config, info={"run": "new"})
    mlxqat.save(model, tokenizer, tmp_path / "old", config=config, info={"run": "old"})
    os.rename(tmp_path / "old", stale)  # killed after the second rename, before the clean-up
    assert recover_interrupted(out) == "cleaned"
    assert not stale.exists() and mlxqat.verify(out)["run"] == "new"


def test_save_refuses_names_outside_the_directory_and_reserved_keys(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    for bad in ("../x", "/etc/x", "a/../../x", ""):
        with pytest.raises(ValueError, match="not a file name inside the directory"):
            mlxqat.save(model, tokenizer, tmp_path / "o", config=config, extra_files={bad: "x"})
    with pytest.raises(ValueError, match="would replace a file of the model"):
        mlxqat.save(model, tokenizer, tmp_path / "o", config=config, extra_files={"config.json": "{}"})
    with pytest.raises(ValueError, match=r"info sets \['files', 'format'\]"):
        mlxqat.save(model, tokenizer, tmp_path / "o", config=config, info={"format": "x", "files": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# The manifest covers every file and itself
# ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tokenizer, int4_model):
    model, config = int4_model
    out = tmp_path / "m"
    mlxqat.save(model, tokenizer, out, config=config)
    return out


def _rewrite_manifest(out, edit, redigest=True):
    m = json.loads((out / "mlxqat.json").read_text())
    edit(m)
    if redigest:  # as a careful editor would: digest and layout as mlxqat writes them
        rewritten = Manifest(kind=m["kind"], info=Manifest.info_of(m), files=m["files"])
        (out / "mlxqat.json").write_text(rewritten.text())
    else:
        (out / "mlxqat.json").write_text(json.dumps(m))


def test_an_added_weight_file_is_refused(saved, int4_model):
    model, _ = int4_model
    mx.save_safetensors(str(saved / "model-zz-extra.safetensors"), {"lm_head.weight": model.lm_head.weight})
    for fn in (mlxqat.verify, mlxqat.load):
        with pytest.raises(mlxqat.IntegrityError, match=r"model-zz-extra\.safetensors: not in the manifest"):
            fn(saved)
    assert verify_main([str(saved)]) == 2


def test_an_edited_manifest_is_refused(saved):
    _rewrite_manifest(saved, lambda m: m.update(recipe={"name": "evil"}), redigest=False)
    with pytest.raises(mlxqat.IntegrityError, match="was edited after it was written"):
        mlxqat.load(saved)


def test_a_removed_entry_with_a_changed_file_is_refused(saved):
    (saved / "tokenizer_config.json").write_text("{}")
    _rewrite_manifest(saved, lambda m: m["files"].pop("tokenizer_config.json"))
    with pytest.raises(mlxqat.IntegrityError, match=r"tokenizer_config\.json: not in the manifest"):
        mlxqat.verify(saved)


@pytest.mark.parametrize("name", ["/etc/hostname", "../../x", "/dev/zero", "sub/../../x", "a\\b"])
def test_manifest_paths_are_confined(saved, name, capsys):
    _rewrite_manifest(saved, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(mlxqat.IntegrityError, match="not a file name inside the directory"):
        mlxqat.verify(saved)
    assert verify_main([str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and sha256_file("/etc/hostname")[:8] not in err


def test_fifos_and_links_in_a_model_directory_are_refused_without_hanging(saved):
    os.mkfifo(saved / "model-00002.safetensors")
    with pytest.raises(mlxqat.IntegrityError, match="not a regular file"):
        mlxqat.verify(saved)
    os.unlink(saved / "model-00002.safetensors")
    (saved / "tokenizer.json").unlink()
    (saved / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(mlxqat.IntegrityError, match="tokenizer.json: not a regular file"):
        mlxqat.load(saved)


def test_a_directory_without_manifest_warns_once_and_verify_write_adds_one(saved):
    (saved / "mlxqat.json").unlink()
    with pytest.warns(UserWarning, match=r"has no mlxqat\.json.*python -m mlxqat\.verify --write"):
        mlxqat.load(saved)
    with pytest.raises(FileNotFoundError, match="verify --write"):
        mlxqat.verify(saved)
    assert verify_main(["--write", str(saved)]) == 0
    mlxqat.verify(saved)
    (saved / "extra.txt").write_text("added later")
    with pytest.raises(mlxqat.IntegrityError, match="extra.txt"):
        mlxqat.load(saved)


def test_a_reformatted_manifest_is_refused(saved):
    m = json.loads((saved / "mlxqat.json").read_text())
    (saved / "mlxqat.json").write_text(json.dumps(m, indent=4))  # same content, other bytes
    with pytest.raises(mlxqat.IntegrityError, match="was edited after it was written"):
        mlxqat.verify(saved)


def test_an_old_format_manifest_says_how_to_upgrade(saved):
    _rewrite_manifest(saved, lambda m: (m.update(format_version=1), m.pop("manifest_sha256")), redigest=False)
    with pytest.raises(mlxqat.IntegrityError, match="format_version 1.*verify --write"):
        mlxqat.load(saved)


def test_manifest_bytes_are_the_version_2_format(tmp_path):
    """The on-disk form: header keys, info, files, then a sha256 of the canonical JSON of the rest."""
    import hashlib

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_bytes(b"abc")
    written = write_manifest(tmp_path, {"recipe": None, "metrics": {"ppl": 1.5}}, kind="model")
    body = {"format": "mlxqat", "format_version": 2, "kind": "model", "mlxqat_version": mlxqat.__version__,
            "recipe": None, "metrics": {"ppl": 1.5},
            "files": {"config.json": hashlib.sha256(b"{}").hexdigest(), "sub/a.txt": hashlib.sha256(b"abc").hexdigest()}}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    raw = (tmp_path / "mlxqat.json").read_bytes()
    assert raw == (json.dumps(body, indent=2) + "\n").encode() and written == body
    m = Manifest.from_bytes(raw, tmp_path / "mlxqat.json")
    assert (m.kind, m.info, m.files) == ("model", {"recipe": None, "metrics": {"ppl": 1.5}}, body["files"])
    assert m.text().encode() == raw and read_manifest(tmp_path) == body == verify(tmp_path)
    with pytest.raises(ValueError, match=r"reserves for itself"):
        Manifest(info={"files": {}})


def test_recipe_of_reads_the_layers_when_the_recipe_does_not_describe_them(tmp_path, tokenizer):
    """Layers prepared in two passes: the saved recipe names every layer, and it rebuilds the same specs."""
    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, Recipe("attn", LayerSpec(8, 32), skip=("*mlp*", "*embed_tokens", "lm_head")))
    mlxqat.prepare(model, Recipe("mlp", LayerSpec(3, 64), skip=("*embed_tokens",)))
    got = recipe_of(model)
    specs = {p: m.spec for p, m in model.named_modules() if hasattr(m, "to_quantized") and hasattr(m, "spec")}
    assert got.name == "custom" and {got.spec_for(p) for p in specs} == {LayerSpec(8, 32), LayerSpec(3, 64)}
    assert all(got.spec_for(p) == s for p, s in specs.items())
    assert got.spec_for("model.embed_tokens") is None
    again, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(again, got)
    assert {p: m.spec for p, m in again.named_modules() if hasattr(m, "to_quantized") and hasattr(m, "spec")} == specs
    mlxqat.convert(model)
    assert recipe_of(model) == got  # converted layers keep their specs
    manifest = mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    assert Recipe.from_dict(manifest["recipe"]) == got
    loaded, _ = mlxqat.load(tmp_path / "m")
    assert recipe_of(loaded) == got
    assert recipe_of(tiny.make_model("llama", 0)[0]) is None  # nothing quantized


def test_save_writes_the_model_card(tmp_path, tokenizer):
    model, config = _converted("llama", MIXED)
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config, info={"metrics": {"QAT": {"ppl": 2.5, "kl": 0.125}}})
    card = (tmp_path / "m" / "README.md").read_text()
    report = mlxqat.footprint.memory_report(tmp_path / "m")
    assert card.startswith("# m\n") and "Recipe `mixed-test`" in card and "`lm_head`: full precision" in card
    assert f"| {report.bits_per_weight:.3f} | {report.ratio_to_bf16:.3f}x |" in card
    assert "| QAT | ppl 2.5, kl 0.125 |" in card
