"""Hostile-user probe, storage (issue 22, section 3): what a saved, edited, damaged or interrupted model does.

Each test is one finding: a saved model that must load again, GGUF tensor data
at offsets that do not fit, config.json edits that silently change the model,
an architecture mlx-lm does not have, an output whose parent cannot be written,
temporaries left by killed writes, and ``verify`` after a kill between renames.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

import mlxqat
import tiny
from mlxqat import export as ex
from mlxqat.storage.destinations import DestinationError, check_destination, write_manifest
from mlxqat.storage.load import verify
from mlxqat.training import job
from mlxqat.cli import verify_main

TESTS = Path(__file__).parent


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a directory without a manifest warns
        return mlxqat.load(path)


def _edit_config(d, drop=(), **changes):
    cfg = json.loads((d / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def int4_model():
    model, config = tiny.make_model("llama", 0)
    mlxqat.prepare(model, "int4")
    mlxqat.convert(model)
    return model, config


# ---------------------------------------------------------------------------
# 1. load -> prepare -> convert -> save -> load, from a config without max_position_embeddings
# ---------------------------------------------------------------------------


def test_a_saved_model_loads_again_when_the_source_config_lacks_a_field(tmp_path, tokenizer):
    model, config = tiny.make_model("llama", 0)
    assert "max_position_embeddings" not in config
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "src")
    loaded, tok = _load(src)
    mlxqat.prepare(loaded, "int4")
    mlxqat.convert(loaded)
    mlxqat.save(loaded, tok, tmp_path / "out")  # no config=: built from the model's args
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert None not in written.values(), {k: v for k, v in written.items() if v is None}
    ours, _ = mlxqat.load(tmp_path / "out")
    theirs, _ = mlx_lm_load(str(tmp_path / "out"))
    ids = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(ours(ids), loaded(ids)).item() and mx.array_equal(theirs(ids), loaded(ids)).item()


# ---------------------------------------------------------------------------
# 2. GGUF tensor data offsets
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gguf")
    model, config = tiny.make_model("llama", 0)
    src = tiny.save_fp_model(model, config, tokenizer, root / "src")
    write_manifest(src, {})
    path = root / "m.gguf"
    assert ex.export_gguf(src, path, "f32", exact=True, verbose=False)["exact"]
    return path


def _tensor_offsets(path):
    """``[(name, byte position of its data-offset field, data offset)]`` in data order."""
    reader = gguf.GGUFReader(str(path))
    out = []
    for t in reader.tensors:
        f = t.field
        pos = f.offset + sum(p.nbytes for p in f.parts[:-1])
        out.append((t.name, pos, int(f.parts[-1][0])))
    return sorted(out, key=lambda x: x[2])


@pytest.mark.parametrize("move, message", [
    ("+1", "not a multiple of the alignment 32"),
    ("+7", "not a multiple of the alignment 32"),
    ("0", "overlaps the data of tensor 'token_embd.weight'"),
    ("end", "past the end of the file"),
])
def test_gguf_tensor_data_that_is_misaligned_overlapping_or_outside_is_refused(tmp_path, f32_gguf, move, message):
    data = bytearray(f32_gguf.read_bytes())
    offsets = _tensor_offsets(f32_gguf)
    assert offsets[0][0] == "token_embd.weight" and offsets[0][2] == 0
    name, pos, offset = offsets[2]
    new = {"+1": offset + 1, "+7": offset + 7, "0": 0, "end": (len(data) // 32) * 32}[move]
    data[pos:pos + 8] = new.to_bytes(8, "little")
    bad = tmp_path / f"moved{move}.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' has data offset {new}\b.*{re.escape(message)}"):
        mlxqat.load(bad)


def test_the_real_gguf_files_pass_the_data_offset_checks():
    from real_models import GEMMA3, SMOLLM2

    found = [p for p in (SMOLLM2, GEMMA3) if p.is_file()]
    if not found:
        pytest.skip("no real GGUF files in .models/ (bash tools/fetch-models)")
    for path in found:
        mlxqat.gguf.format.check_gguf_structure(path)


# ---------------------------------------------------------------------------
# 3. config.json edits in a directory without a manifest
# ---------------------------------------------------------------------------


@pytest.fixture
def untied_dir(tmp_path, tokenizer):
    """A llama with its own lm_head.weight, no manifest."""
    model, config = tiny.make_model("llama", 0)
    assert config["tie_word_embeddings"] is False
    return tiny.save_fp_model(model, config, tokenizer, tmp_path / "untied")


@pytest.mark.parametrize("edit", ["deleted", "flipped"])
def test_an_lm_head_the_config_ties_away_is_refused(untied_dir, edit):
    if edit == "deleted":
        _edit_config(untied_dir, drop=["tie_word_embeddings"])  # mlx-lm's llama then defaults to tied
    else:
        _edit_config(untied_dir, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head\.weight.*tie_word_embeddings.*set \"tie_word_embeddings\": false"):
        _load(untied_dir)


def test_a_missing_lm_head_the_config_asks_for_is_refused(tmp_path, tokenizer):
    model, config = tiny.make_model("qwen3", 0)
    assert config["tie_word_embeddings"] is True
    d = tiny.save_fp_model(model, config, tokenizer, tmp_path / "tied")
    _edit_config(d, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=false.*no lm_head\.weight.*\"tie_word_embeddings\": true"):
        _load(d)


def test_a_tied_model_with_a_copy_of_its_embedding_as_lm_head_still_loads(tmp_path, tokenizer):
    """Some checkpoints store the tied output layer twice; mlx-lm drops the copy, and so may we."""
    model, config = tiny.make_model("qwen3", 0)
    d = tiny.save_fp_model(model, config, tokenizer, tmp_path / "tied")
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    loaded, _ = _load(d)
    ids = mx.array([[1, 2, 3]])
    assert mx.array_equal(loaded(ids), model(ids)).item()


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"type": "linear", "factor": -2.0}, "rope_scaling factor=-2.0"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "rope_scaling factor=0"),
    ("rope_scaling", {"type": "linear", "factor": float("inf")}, "rope_scaling factor=inf"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "rope_scaling factor='2'"),
    ("rms_norm_eps", 1e5, "rms_norm_eps=100000.0; expected a small positive number in (0, 1)"),
    ("rms_norm_eps", 1.0, "rms_norm_eps=1.0; expected a small positive number in (0, 1)"),
])
def test_absurd_rope_scaling_and_norm_epsilon_are_refused(untied_dir, field, value, message):
    _edit_config(untied_dir, **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        _load(untied_dir)


# ---------------------------------------------------------------------------
# 4. an unknown model_type
# ---------------------------------------------------------------------------


def test_an_unknown_model_type_is_named_with_the_supported_ones(untied_dir):
    _edit_config(untied_dir, model_type="llamma")
    with pytest.raises(ValueError) as e:
        _load(untied_dir)
    text = str(e.value)
    assert "model_type='llamma'" in text and "does not fit" not in text, text
    assert re.search(r"supported: .*\bgemma3_text\b.*\bllama\b.*\bqwen3\b", text), text


# ---------------------------------------------------------------------------
# 5. an output whose parent cannot be written: refused before any work
# ---------------------------------------------------------------------------


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in (root ignores permission bits: use /proc)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
    elif os.path.isdir("/proc/self"):
        yield Path("/proc")
    else:
        pytest.skip("running as root without /proc: no directory is unwritable")


@pytest.mark.parametrize("below", ["out", "new/deeper/out"])
def test_an_unwritable_parent_is_refused_by_the_destination_check(unwritable, below):
    dest = unwritable / below
    with pytest.raises(DestinationError, match=rf"{re.escape(str(dest))} cannot be written: "
                                                  rf"{re.escape(str(unwritable))} is not writable"):
        check_destination(dest)


def test_train_refuses_an_unwritable_out_before_loading_anything(tmp_path, tokenizer, unwritable, monkeypatch, capsys):
    model, config = tiny.make_model("llama", 0)
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "src")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(job, "load", no_load)
    code = job.main(["--model", str(src), "--out", str(unwritable / "out"), "--memory-limit", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err, err


# ---------------------------------------------------------------------------
# 6. temporaries left by killed writes
# ---------------------------------------------------------------------------

KILLED_WRITE = """
import os, sys
sys.path.insert(0, {tests!r})
import mlxqat, tiny
from mlxqat.storage import destinations
from pathlib import Path
from mlx_lm.tokenizer_utils import load as load_tokenizer
model, config = tiny.make_model("llama", 0)
tok = load_tokenizer(Path({tok!r}))
mode = sys.argv[1]
if mode == "kill":
    destinations._fsync_tree = lambda root: os._exit(9)  # killed with the new version half-written
    mlxqat.save(model, tok, {out!r}, config=config)
else:  # a live writer: holds its temporary until told to go on, then is killed too
    with destinations.atomic_dir({out!r}) as tmp:
        (tmp / "part").write_text("being written")
        print(tmp.name, flush=True)
        sys.stdin.readline()
        os._exit(9)
"""


def test_temporaries_of_killed_writes_are_removed_by_the_next_write(tmp_path, tokenizer_dir, tokenizer, int4_model):
    model, config = int4_model
    out = tmp_path / "out"
    script = KILLED_WRITE.format(tests=str(TESTS), tok=str(tokenizer_dir), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (tmp_path / stale[0] / "model.safetensors").exists(), stale
    # files of the user's that only look alike, and a live writer's temporary, are kept
    mine = [".out.tmp-mine", ".out.tmp-12345", ".other.tmp-1-abcdefgh", "out.tmp-x"]
    for name in mine:
        (tmp_path / name).write_text("mine")
    live = subprocess.Popen([sys.executable, "-c", script, "live"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        live_tmp = live.stdout.readline().strip()
        assert live_tmp.startswith(".out.tmp-"), live_tmp
        mlxqat.save(model, tokenizer, out, config=config)
        assert not (tmp_path / stale[0]).exists(), "the killed write's temporary is still there"
        assert (tmp_path / live_tmp / "part").is_file(), "a live writer's temporary was removed"
        assert all((tmp_path / name).read_text() == "mine" for name in mine)
    finally:
        live.stdin.close()
        assert live.wait(timeout=60) == 9
    assert (tmp_path / live_tmp).exists()  # its writer is gone now: the next write removes it
    mlxqat.save(model, tokenizer, out, config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine + ["out"])
    mlxqat.verify(out)


# ---------------------------------------------------------------------------
# 7. verify after a kill between the two renames
# ---------------------------------------------------------------------------


def test_verify_restores_a_destination_killed_between_its_renames(tmp_path, tokenizer, int4_model, capsys):
    model, config = int4_model
    out = tmp_path / "out"
    mlxqat.save(model, tokenizer, out, config=config, info={"run": "old"})
    os.rename(out, tmp_path / ".out.mlxqat-old")  # the first rename done, the second never
    assert verify_main([str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("OK ") and "restored" in captured.err, captured
    assert mlxqat.verify(out)["run"] == "old" and not (tmp_path / ".out.mlxqat-old").exists()
    os.rename(out, tmp_path / ".out.mlxqat-old")
    assert verify(out)["run"] == "old"  # the library function repairs too (the one code path)
