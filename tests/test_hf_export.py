"""Hugging Face export (compressed-tensors pack-quantized): the file holds MLX's own integers and scales;
transformers (optional: torch, compressed-tensors) computes the same logits; float offsets are refused."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
import tiny
from mlxqat import quant
from mlxqat.convert import quantize_rtn
from mlxqat.evaluate import evaluate
from mlxqat.export import export_hf
from mlxqat.hf import HFExportError, whole_steps
from mlxqat.training.qat import quantize_qat


def _saved(tmp_path, tokenizer, recipe, arch="llama"):
    model, config = tiny.train_briefly(arch, tokenizer, steps=40)
    model.set_dtype(mx.float32)
    quantize_rtn(model, recipe)
    model.set_dtype(mx.float32)
    mlxqat.save(model, tokenizer, tmp_path / recipe, config=config)
    return model, tmp_path / recipe


def _decompressed(directory) -> dict:
    """Each quantized layer's weight as compressed-tensors' own decompressor reads it (float32 scales)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    cfg = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    out = {}
    for group in cfg["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
        for t in group["targets"]:
            state = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if k.startswith(t + ".weight_")}
            state["weight_scale"] = state["weight_scale"].to(torch.float32)
            out[t] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
    return out


@pytest.mark.parametrize("recipe,symmetric", [("q4_0", True), ("int4_zp", False)])
def test_the_packed_weights_are_the_mlx_weights(tmp_path, tokenizer, recipe, symmetric):
    model, src = _saved(tmp_path, tokenizer, recipe)
    result = export_hf(src, tmp_path / "hf", verbose=False)
    assert all(g["symmetric"] is symmetric for g in result["groups"].values() if g["num_bits"] == 4)
    got = _decompressed(tmp_path / "hf")
    modules = dict(model.named_modules())
    assert set(got) == {p for p, m in modules.items() if isinstance(m, nn.QuantizedLinear)}
    for path, w in got.items():
        m = modules[path]
        want = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                             group_size=m.group_size, bits=m.bits)
        assert np.array_equal(w, np.array(want)), path  # bit for bit
    assert mlxqat.verify(tmp_path / "hf")["files"]  # a manifest, as every mlxqat output has


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_transformers_computes_what_mlx_computes(tmp_path, tokenizer, arch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, src = _saved(tmp_path, tokenizer, "q4_0", arch)
    export_hf(src, tmp_path / "hf", verbose=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = tokenizer.encode(tiny.CORPUS)[:48]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(theirs - ours).max() < 1e-4  # float32 summation order only
    assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))


def test_float_offsets_are_refused_naming_the_layer_and_the_recipe(tmp_path, tokenizer):
    _, src = _saved(tmp_path, tokenizer, "int4")
    with pytest.raises(HFExportError, match=r"(lm_head|model\.\S+): 4-bit group 64 with float offsets .*int4_zp"):
        export_hf(src, tmp_path / "hf", verbose=False)
    assert not (tmp_path / "hf").exists()  # nothing written
    p = subprocess.run([sys.executable, "-m", "mlxqat", "export", str(src), "--format", "hf", "--out",
                        str(tmp_path / "hf")], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "int4_zp" in p.stderr


def test_integer_zero_points_train_and_stay_whole_steps(tokenizer):
    teacher, _ = tiny.train_briefly("llama", tokenizer, steps=40)
    teacher.set_dtype(mx.float32)
    teacher.freeze()
    student, _ = tiny.train_briefly("llama", tokenizer, steps=40)
    student.set_dtype(mx.float32)
    ids = np.array(tokenizer.encode(tiny.CORPUS * 2), dtype=np.int32)
    windows = np.stack([ids[i:i + 33] for i in range(0, len(ids) - 33, 9)])
    rtn, _ = tiny.train_briefly("llama", tokenizer, steps=40)
    rtn.set_dtype(mx.float32)
    quantize_rtn(rtn, "int4_zp", fake_quant=True)
    train, val = windows[::2], windows[1::2]
    quantize_qat(student, teacher, train, "int4_zp", steps=12, batch_size=4, seq_len=32, log_every=4,
                 progress=False, scale_dtype="float16")
    kl_rtn, kl_qat = evaluate(rtn, val, teacher)["kl"], evaluate(student, val, teacher)["kl"]
    assert kl_qat < 0.8 * kl_rtn, (kl_rtn, kl_qat)
    layer = student.model.layers[0].mlp.down_proj
    assert layer.spec.mode == "zeropoint" and layer.spec.learn_scales
    mlxqat.convert(student)
    for _, m in student.named_modules():
        if quant.is_quantized(m):
            k = whole_steps(np.array(m.scales.astype(mx.float32)), np.array(m.biases.astype(mx.float32)), m.bits)
            assert k is not None and k.min() >= 0 and k.max() <= 15


def test_zero_point_ranges_hold_zero_so_one_signed_groups_keep_their_values():
    w = mx.array(np.concatenate([np.linspace(1.0, 1.2, 64), np.full(64, 0.05), np.linspace(-0.3, 0.2, 64),
                                 np.zeros(64)])[None].astype(np.float32))
    packed, scales, biases = quant.init_params(w, 4, 64, "zeropoint")
    err = np.abs(np.array(quant.dequantize(packed, scales, biases, 4, 64) - w)).reshape(4, 64).max(-1)
    step = np.array(scales)[0]
    assert np.all(err <= step / 2 + 1e-7), (err, step)  # within half a step of the stretched range
    assert err[1] == 0 and err[3] == 0  # a constant group and a zero group exactly
    assert whole_steps(np.array(scales), np.array(biases), 4) is not None

