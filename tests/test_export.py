"""Exports other than GGUF numerics: mlx-lm directories, unquantized weights, memory
reports, the command lines, integrity checks and interrupted exports."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

import mlxqat
import tiny
from mlxqat import export as ex, recipes
from mlxqat.recipes import LayerSpec, Recipe

from mlxqat.cli import verify_main  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]
MIXED = Recipe(
    "mixed-export",
    LayerSpec(4, 32, "symmetric"),
    overrides=(("*.mlp.down_proj", LayerSpec(8, 64)),),
    skip=("lm_head",),
    description="test recipe",
)


def _src(tmp_path, tokenizer, recipe="q4_0", arch="llama", info=None, name="src"):
    model, config = tiny.make_model(arch, 0)
    n_float = sum(v.size for _, v in tree_flatten(model.parameters()))
    mlxqat.prepare(model, recipe)
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, tmp_path / name, config=config, info=info)
    return tmp_path / name, model, config, n_float


def _run(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


# ---------------------------------------------------------------------------
# Memory report
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,bits,gguf_bpw", [("q4_0", 4, 4.5), ("q4_1", 4, 5.0), ("q5_0", 5, 5.5), ("q5_1", 5, 6.0),
                                                  ("q8_0", 8, 8.5)])
def test_memory_report(tmp_path, tokenizer, recipe, bits, gguf_bpw):
    uniform = dataclasses.replace(recipes.get(recipe), overrides=())  # every matrix at `bits` (q4_0's head is 8-bit)
    src, model, config, n_float = _src(tmp_path, tokenizer, uniform)
    r = ex.memory_report(model)  # in memory: float32 scales and biases, group 32
    assert r.bits_per_weight == bits + 2 * 32 / 32
    assert r.n_weights == n_float
    assert r.ratio_to_bf16 == pytest.approx(r.weight_bytes / (2 * n_float))
    assert r.bytes_on_disk is None
    d = ex.memory_report(src)
    assert d.bytes_on_disk == sum(p.stat().st_size for p in src.iterdir())
    stored = mx.load(str(src / "model.safetensors"))  # (mlxqat.save may keep scales as float16)
    packed = [k[: -len(".scales")] for k in stored if k.endswith(".scales")]
    matrix_bits = sum(8 * stored[f"{p}.{leaf}"].nbytes for p in packed for leaf in ("weight", "scales", "biases"))
    assert d.bits_per_weight == pytest.approx(matrix_bits / sum(stored[f"{p}.weight"].size * 32 // bits for p in packed))
    assert d.n_weights == n_float
    out = tmp_path / "m.gguf"
    ex.export_gguf(src, out, recipe, exact=True, verbose=False)
    g = ex.memory_report(out)
    # GGUF blocks: codes + float16 scale (+ float16 minimum for Q4_1) per 32 weights
    assert g.bits_per_weight == gguf_bpw
    assert g.bytes_on_disk == out.stat().st_size and g.n_weights == n_float
    assert g.ratio_to_bf16 < 1 and g.weight_bytes < g.bytes_on_disk
    assert f"{gguf_bpw:.3f} bits per weight" in str(g)


# ---------------------------------------------------------------------------
# mlx-lm directory export
# ---------------------------------------------------------------------------


def test_export_mlx_directory_with_model_card(tmp_path, tokenizer, capsys):
    metrics = {"ppl": 12.5, "ppl_fp": 12.25, "kl_to_teacher": 0.0123}
    src, model, config, _ = _src(tmp_path, tokenizer, MIXED, info={"metrics": metrics})
    out = tmp_path / "mlx-dir"
    manifest = ex.export_mlx(src, out)
    assert "README.md" in manifest["files"] and manifest["recipe"]["name"] == "mixed-export"
    loaded, tok = mlx_lm_load(str(out))
    x = mx.array([tokenizer.encode("def fibonacci(n):")])
    assert mx.array_equal(loaded(x), model(x)).item()
    card = (out / "README.md").read_text()
    report = ex.memory_report(loaded)
    assert "Recipe `mixed-export`: test recipe" in card
    assert "`*.mlp.down_proj`: 8-bit, group 64, affine" in card and "`lm_head`: full precision" in card
    assert f"| {report.bits_per_weight:.3f} | {report.ratio_to_bf16:.3f}x |" in card
    assert "| ppl | 12.5 |" in card and "| kl_to_teacher | 0.0123 |" in card
    assert "bits per weight" in capsys.readouterr().err
    assert verify_main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"OK {len(manifest['files'])} files"


def test_tampered_export_fails_verify_and_load(tmp_path, tokenizer, capsys):
    src, *_ = _src(tmp_path, tokenizer)
    out = tmp_path / "mlx-dir"
    ex.export_mlx(src, out, verbose=False)
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    assert verify_main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors: content changed" in err and "re-export or re-download" in err
    with pytest.raises(mlxqat.IntegrityError, match=r"model\.safetensors: content changed"):
        mlxqat.load(out)
    proc = _run("-m", "mlxqat.verify", str(out))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr
    assert verify_main([str(tmp_path / "nowhere")]) == 2
    assert "mlxqat.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Unquantized export
# ---------------------------------------------------------------------------


def test_export_fp16_dequantizes_or_uses_master_weights(tmp_path, tokenizer, capsys):
    src, model, config, _ = _src(tmp_path, tokenizer, "q4_0")
    out = tmp_path / "fp16"
    ex.export_fp16(src, out)
    assert "dequantized QAT weights" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    w = mx.load(str(out / "model.safetensors"))
    q = model.layers[1].self_attn.v_proj
    want = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4).astype(mx.float16)
    assert w["model.layers.1.self_attn.v_proj.weight"].dtype == mx.float16
    assert mx.array_equal(w["model.layers.1.self_attn.v_proj.weight"], want).item()
    assert "dequantized QAT weights" in (out / "README.md").read_text()
    fp, _ = mlx_lm_load(str(out))  # opens as a plain float16 model
    assert not any("Quantized" in type(m).__name__ for _, m in fp.named_modules())

    # With the trainer's float master weights beside the model, those are exported.
    master, _ = tiny.make_model("llama", 7)
    masters = dict(tree_flatten(master.parameters()))
    mx.save_safetensors(str(tmp_path / "master.safetensors"), masters)
    src2 = tmp_path / "src2"
    model2, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(model2, "q4_0")
    mlxqat.convert(model2)
    mlxqat.save(model2, tokenizer, src2, config=config,
                extra_files={ex.MASTER_FILE: (tmp_path / "master.safetensors").read_bytes()})
    ex.export_fp16(src2, tmp_path / "fp16b", dtype="float32")
    assert "float master weights" in capsys.readouterr().err
    w = mx.load(str(tmp_path / "fp16b" / "model.safetensors"))
    for k, v in masters.items():
        assert mx.array_equal(w[k], v).item(), k
    # master weights that belong to another model are refused
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), {"model.layers.0.mlp.up_proj.weight": mx.zeros((3, 3))})
    src3 = tmp_path / "src3"
    mlxqat.save(model2, tokenizer, src3, config=config,
                extra_files={ex.MASTER_FILE: (tmp_path / "bad.safetensors").read_bytes()})
    with pytest.raises(ValueError, match="does not match the model: .*wrong shapes"):
        ex.export_fp16(src3, tmp_path / "fp16c")
    assert not (tmp_path / "fp16c").exists()


# ---------------------------------------------------------------------------
# Command line and interrupted exports
# ---------------------------------------------------------------------------


def test_command_line(tmp_path, tokenizer, capsys):
    src, *_ = _src(tmp_path, tokenizer, "q4_1", arch="qwen3")
    assert ex.main([str(src), "--format", "gguf", "--out", str(tmp_path / "a.gguf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["qtype"] == "q4_1" and summary["exact"] and summary["memory"]["bits_per_weight"] == 5.0
    # --type auto takes the type the file name asks for ...
    assert ex.main([str(src), "--format", "gguf", "--out", str(tmp_path / "model-q8_0.gguf"), "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert "GGUF type q8_0 (named in the file name)" in out.err
    # ... but layers that are exact in another block type stay exact rather than be re-rounded
    assert summary["exact"] and summary["types"]["Q4_1"] == 2 * 7 + 1 and "Q8_0" not in summary["types"]
    assert "kept exactly as Q4_1" in out.err
    src8, *_ = _src(tmp_path, tokenizer, "int8", arch="qwen3", name="src8")
    assert ex.main([str(src8), "--format", "gguf", "--out", str(tmp_path / "model-q8_0.gguf"), "--json"]) == 0
    out = capsys.readouterr()
    assert "warning: GGUF q8_0 export is not exact" in out.err and "KL(MLX model || GGUF weights)" in out.err
    summary = json.loads(out.out)
    assert summary["qtype"] == "q8_0" and not summary["exact"] and 0 < summary["kl"] < 1e-3
    assert ex.main([str(src), "--format", "fp16", "--out", str(tmp_path / "fp")]) == 0
    assert ex.main([str(src), "--format", "mlx", "--out", str(tmp_path / "mlx")]) == 0
    mlxqat.verify(tmp_path / "mlx")
    assert ex.main([str(tmp_path / "missing"), "--format", "mlx", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    proc = _run("-m", "mlxqat.export", str(src), "--format", "gguf", "--out", str(tmp_path / "b.gguf"))
    assert proc.returncode == 0, proc.stderr
    assert "bits per weight" in proc.stderr
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()  # deterministic


def test_failed_export_leaves_no_file(tmp_path, tokenizer, monkeypatch):
    import gguf

    src, *_ = _src(tmp_path, tokenizer)
    out = tmp_path / "out" / "m.gguf"

    def boom(self, *a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="injected"):
        ex.export_gguf(src, out, verbose=False)
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()
    ex.export_gguf(src, out, verbose=False)
    good = out.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        ex.export_gguf(src, out, "q4_1", verbose=False)
    assert out.read_bytes() == good  # and its Modelfile beside it, nothing else
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.Modelfile", "m.gguf"]


KILL_MID_WRITE = """
import os, signal, sys
import gguf, mlx.core as mx
from mlxqat import export as ex, recipes

def die(*a, **k):
    # some bytes reach the disk, then the process is killed without any cleanup
    with open(os.path.join(sys.argv[3], "started"), "w"):
        pass
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "gguf":
    real = gguf.GGUFWriter.write_tensors_to_file
    def partial(self, *a, **k):
        self.fout[0].write(b"\\0" * 1000)
        self.fout[0].flush()
        die()
    gguf.GGUFWriter.write_tensors_to_file = partial
    ex.export_gguf(sys.argv[2], os.path.join(sys.argv[3], "m.gguf"), verbose=False)
else:
    mx.save_safetensors = die
    ex.export_mlx(sys.argv[2], os.path.join(sys.argv[3], "mlx-dir"), verbose=False)
"""


@pytest.mark.parametrize("fmt,name", [("gguf", "m.gguf"), ("mlx", "mlx-dir")])
def test_killed_export_leaves_nothing_at_the_destination(tmp_path, tokenizer, fmt, name):
    src, *_ = _src(tmp_path, tokenizer)
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = _run("-c", KILL_MID_WRITE, fmt, str(src), str(dest), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (dest / "started").exists()  # it was killed mid-write, not before
    assert not (dest / name).exists()
    leftovers = [p.name for p in dest.iterdir() if p.name != "started"]
    assert all(p.startswith(f".{name}.tmp-") for p in leftovers), leftovers


# ---------------------------------------------------------------------------
# Destinations: only mlxqat's own earlier outputs are replaced
# ---------------------------------------------------------------------------


def _tree(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("fmt", ["mlx", "fp16", "gguf"])
def test_export_never_replaces_user_files(tmp_path, tokenizer, capsys, fmt):
    src, *_ = _src(tmp_path, tokenizer)
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (tmp_path / "plain.gguf").write_bytes(b"GGUF not really")
    before = _tree(tmp_path)
    main = importlib.import_module("mlxqat.export").main
    for out, message in [(user, "folder holding files mlxqat did not write"), (src, "source model"),
                         (tmp_path / "plain.gguf", "a file mlxqat did not write"), (src / "x", "source model")]:
        assert main([str(src), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert _tree(tmp_path) == before


def test_gguf_export_replaces_only_its_own_file(tmp_path, tokenizer):
    src, *_ = _src(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    ex.export_gguf(src, out, "q4_0", exact=True, verbose=False)
    first = out.read_bytes()
    ex.export_gguf(src, out, "q4_0", exact=True, verbose=False)  # our own file: replaced
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "src"]
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ValueError, match="folder.gguf already exists and is a folder"):
        ex.export_gguf(src, tmp_path / "folder.gguf", "q4_0", exact=True, verbose=False)


def test_damaged_gguf_is_a_clear_error(tmp_path, tokenizer):
    src, *_ = _src(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    ex.export_gguf(src, out, "q4_0", exact=True, verbose=False)
    data = bytearray(out.read_bytes())
    data[8:16] = (2**60).to_bytes(8, "little")  # tensor count
    out.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="claims 1152921504606846976 tensors"):
        ex.memory_report(out)
    out.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="m.gguf"):
        ex.memory_report(out)


def test_an_unwritable_destination_is_one_error_line(tmp_path, tokenizer, capsys):
    src, *_ = _src(tmp_path, tokenizer)
    main = importlib.import_module("mlxqat.export").main
    for fmt, out in [("mlx", "/proc/mlxqat-export-test"), ("gguf", "/proc/mlxqat-export-test.gguf")]:
        assert main([str(src), "--format", fmt, "--out", out]) == 2  # /proc refuses new files, even to root
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err  # refused by the destination check, before any work
        assert err[0].startswith(f"error: {out} cannot be written: /proc is not writable"), err[0]


def test_a_gguf_value_type_changed_to_array_is_refused_at_once(tmp_path, tokenizer):
    """A string's type id 8 -> 9 (array) made gguf's reader loop for hours on a count read from text."""
    import time

    src, *_ = _src(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    ex.export_gguf(src, out, "q4_0", exact=True, verbose=False)
    data = bytearray(out.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 8
    data[at : at + 4] = (9).to_bytes(4, "little")
    out.write_bytes(bytes(data))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"m\.gguf: an array of \d+ items at byte \d+ does not fit the file"):
        ex.memory_report(out)
    assert time.perf_counter() - t0 < 5


def test_one_bits_per_weight_rule_for_channelwise_layers():
    """The recipe's cost, the bit allocator's and the memory report give the same number for
    channel-wise layers, and it is the stored bits over the weights."""
    import mlx.nn as nn

    from mlxqat import mixed

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 16, bias=False)  # channel-wise scales stored per 64 inputs
            self.b = nn.Linear(96, 16, bias=False)  # 96 = 3 x 32: stored per 32 inputs

        def __call__(self, x):
            return self.b(mx.concatenate([self.a(x), x[..., :80]], axis=-1))

    model = TwoLayers()
    model.set_dtype(mx.float16)  # scales and biases follow the weights: 16 bits each
    spec = LayerSpec(2, -1)
    mlxqat.prepare(model, Recipe("channel-wise", spec))
    mlxqat.convert(model)
    stored = sum(8 * (m.weight.nbytes + m.scales.nbytes + m.biases.nbytes) for m in (model.a, model.b))
    n = 16 * 64 + 16 * 96
    real = stored / n
    assert real == (16 * 64 * (2 + 32 / 64) + 16 * 96 * (2 + 32 / 32)) / n  # 2.8, not 2 + 32/128
    assert (16 * 64 * spec.bits_per_weight(64) + 16 * 96 * spec.bits_per_weight(96)) / n == real
    assert mixed.bits_per_weight({"a": spec, "b": spec}, {"a": (16 * 64, 64), "b": (16 * 96, 96)}) == real
    assert ex.memory_report(model).bits_per_weight == real


def test_q4_0_with_its_8_bit_head_is_a_q4_0_file(tmp_path, tokenizer, capsys):
    """The automatic GGUF type is that of most quantized layers: q4_0's head, one Q8_0 layer, leaves it Q4_0."""
    src, model, *_ = _src(tmp_path, tokenizer, "q4_0", arch="qwen3")  # qwen3 here ties its embeddings
    assert ex.main([str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["qtype"] == "q4_0" and summary["exact"]
    assert summary["types"]["Q8_0"] == 1 and summary["types"]["Q4_0"] > 1
