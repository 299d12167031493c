"""A GGUF user's path: a Q4_1 / Q4_0 GGUF file in, fine-tuned in its own blocks, a GGUF of the same types out.

The files are tiny llamas quantized with recipes q4_1 / q4_0 and exported exactly (as llama.cpp's own Q4_1 /
Q4_0 files store them); llama.cpp itself (xllamacpp, optional) scores the completions of both files.
"""

from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
from mlxqat.export import ExportWarning, export_gguf
from mlxqat.gguf.blocks import mlx_arrays
from mlxqat.gguf.reader import load_gguf, read_gguf_tensors
from mlxqat.training import finetune as ft
from test_finetune import FAST, LEARNING_RATES, _data_dir, _quantized_dir

GT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("finetune-gguf")
    out = {"root": root, "data": _data_dir(root)}
    for recipe in ("q4_1", "q4_0", "q5_1", "q5_0"):
        src = _quantized_dir(root, tokenizer, recipe, dtype=mx.float32)
        out[recipe] = root / f"{recipe}.gguf"
        export_gguf(src, out[recipe], exact=True, modelfile=False, verbose=False)
    return out


def _types(path) -> dict:
    return {k: t for k, (t, _, _) in read_gguf_tensors(path).items()}


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0])
def test_blocks_read_back_to_what_llama_cpp_dequantizes(qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 128)) * 0.05).astype(np.float32)
    blocks = gguf.quants.quantize(w, qtype)
    words, scales, biases = mlx_arrays(blocks, qtype, w.shape)
    assert scales.dtype == biases.dtype == mx.float16
    bits = {GT.Q8_0: 8, GT.Q5_0: 5, GT.Q5_1: 5}.get(qtype, 4)
    if bits < 8:  # every code occurs: each bit of the layout is read back
        assert len(np.unique(np.array(mlxqat.quant.unpack(words, bits)))) == 2 ** bits
    ours = mx.dequantize(words, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits)
    assert np.array_equal(np.array(ours), gguf.quants.dequantize(blocks, qtype))
    from mlxqat.gguf.blocks import exact_blocks

    again, why = exact_blocks(np.array(words), np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32)),
                              bits, 32, qtype)
    assert why == "" and np.array_equal(again, blocks.reshape(again.shape))  # the same bytes, both ways
    with pytest.raises(ValueError, match="do not hold a 6 x 96 matrix"):
        mlx_arrays(blocks, qtype, (6, 96))


def test_a_gguf_loads_with_its_own_blocks(files):
    model, _, config = load_gguf(files["q4_1"], keep_quantized=True)
    reference, _, _ = load_gguf(files["q4_1"])
    assert config["gguf_float_layers"] == {}
    q = model.model.layers[0].self_attn.q_proj  # rows permuted back from llama.cpp's rotary order, as blocks
    assert isinstance(q, nn.QuantizedLinear) and isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert q.bits == 4 and q.group_size == 32 and q.spec.mode == "affine" and q.scales.dtype == mx.float16
    w = mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32), group_size=32, bits=4)
    assert mx.array_equal(w, reference.model.layers[0].self_attn.q_proj.weight)
    x = mx.array([[1, 2, 3, 4, 5]])
    model.set_dtype(mx.float32)
    assert mx.allclose(model(x), reference(x), atol=1e-5)


@pytest.fixture(scope="module")
def tuned(files):
    out = files["root"] / "tuned-q4_1.gguf"
    result = mlxqat.finetune(str(files["q4_1"]), str(files["data"]), str(out), method="lora",
                             learning_rate=LEARNING_RATES["lora"], **FAST)
    return result, out


def test_a_q4_1_gguf_comes_out_q4_1_with_its_integers_and_scales(tuned, files):
    result, out = tuned
    assert result["after"]["test"] < result["before"]["test"] - 0.05, result
    assert result["saved"]["test"] == result["after"]["test"] and result["gain_kept"] == 1.0
    a, b = read_gguf_tensors(files["q4_1"]), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # every tensor keeps its type
    changed_offsets = 0
    for name, (t, data, shape) in a.items():
        other = b[name][1]
        if t == GT.Q4_1:  # block: d (2 bytes), m (2 bytes), 16 bytes of nibbles
            x, y = data.reshape(-1, 20), other.reshape(-1, 20)
            assert np.array_equal(x[:, :2], y[:, :2]) and np.array_equal(x[:, 4:], y[:, 4:]), name
            changed_offsets += not np.array_equal(x[:, 2:4], y[:, 2:4])
        elif "norm" in name or t == GT.Q8_0:
            assert np.array_equal(data, other), name  # what LoRA does not adapt is the input's, byte for byte
    assert changed_offsets >= 10  # the adapters went into the offsets
    assert (out.parent / "tuned-q4_1.Modelfile").is_file()
    assert (Path(str(out) + ".train") / "model" / "config.json").is_file()  # the mlx-lm directory it was made from


def test_llama_cpp_sees_the_gain_mlx_measured(tuned, files, tokenizer):
    pytest.importorskip("xllamacpp")
    from mlxqat.finetune_data import load_finetune_data
    from mlxqat.gguf.llamacpp import LlamaCpp

    result, out = tuned
    test = load_finetune_data(files["data"], tokenizer, 64).test
    before = LlamaCpp(files["q4_1"], n_ctx=128).completion_loss(test)
    after = LlamaCpp(out, n_ctx=128).completion_loss(test)
    mlx_before, mlx_after = result["before"]["test"], result["saved"]["test"]
    # llama.cpp rounds activations to 8 bits in its Q4_1 / Q8_0 dot products: close, not equal
    assert abs(before["loss"] - mlx_before) <= 0.02 * mlx_before
    assert abs(after["loss"] - mlx_after) <= 0.02 * mlx_after
    gain, mlx_gain = before["loss"] - after["loss"], mlx_before - mlx_after
    assert abs(gain - mlx_gain) <= 0.1 * mlx_gain, (before, after, result)
    print(f"llama.cpp {before['loss']:.5f} -> {after['loss']:.5f}, MLX {mlx_before:.5f} -> {mlx_after:.5f}")


def test_a_q4_0_gguf_trains_its_scales_and_stays_q4_0(files, tmp_path):
    with pytest.raises(ValueError, match="symmetric .*use --method scales or --method full"):
        mlxqat.finetune(str(files["q4_0"]), str(files["data"]), str(tmp_path / "lora.gguf"), method="lora", **FAST)
    out = tmp_path / "scales.gguf"
    result = mlxqat.finetune(str(files["q4_0"]), str(files["data"]), str(out), method="scales",
                             learning_rate=LEARNING_RATES["scales"], **FAST)
    assert result["gain_kept"] == 1.0
    a, b = read_gguf_tensors(files["q4_0"]), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    for name, (t, data, _) in a.items():
        if t == GT.Q4_0:  # block: d (2 bytes), 16 bytes of nibbles
            x, y = data.reshape(-1, 18), b[name][1].reshape(-1, 18)
            assert np.array_equal(x[:, 2:], y[:, 2:]) and not np.array_equal(x[:, :2], y[:, :2]), name


@pytest.mark.parametrize("recipe,method", [("q5_1", "lora"), ("q5_0", "scales")])
def test_a_5_bit_gguf_comes_out_in_its_own_blocks(files, tmp_path, recipe, method):
    out = tmp_path / f"tuned-{recipe}.gguf"
    result = mlxqat.finetune(str(files[recipe]), str(files["data"]), str(out), method=method,
                             learning_rate=LEARNING_RATES[method], **FAST)
    assert result["after"]["test"] < result["before"]["test"] and result["gain_kept"] == 1.0
    a, b = read_gguf_tensors(files[recipe]), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    qtype, header = (GT.Q5_1, 4) if recipe == "q5_1" else (GT.Q5_0, 2)
    n = 0
    for name, (t, data, _) in a.items():
        if t == qtype:  # block: d (and m), 4 bytes of fifth bits, 16 bytes of nibbles
            x, y = data.reshape(-1, header + 20), b[name][1].reshape(-1, header + 20)
            assert np.array_equal(x[:, header:], y[:, header:]), name  # the 5-bit integers, byte for byte
            if method == "lora":  # d too; the offsets m took the adapters
                assert np.array_equal(x[:, :2], y[:, :2]), name
            n += not np.array_equal(x[:, :header], y[:, :header])
    assert n >= 10


def test_what_cannot_stay_in_its_type_is_refused_before_training(files, workspace_int4, tmp_path):
    f16 = tmp_path / "f16.gguf"
    with pytest.warns(ExportWarning, match="not exact"):  # int4 g64 values in float16: a file of F16 matrices
        export_gguf(workspace_int4, f16, "f16", modelfile=False, verbose=False)
    with pytest.raises(ValueError, match=r"are F16 .*pass --recipe q4_0, q5_0, q8_0, q4_1, q5_1, q4_k, q5_k or q6_k"):
        mlxqat.finetune(str(f16), str(files["data"]), str(tmp_path / "a.gguf"), **FAST)
    with pytest.raises(ValueError, match=r"no exact GGUF form \(e\.g\. .*4-bit, group 64"):
        mlxqat.finetune(str(workspace_int4), str(files["data"]), str(tmp_path / "b.gguf"), **FAST)
    assert not list(tmp_path.glob("*.train"))  # nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf"]


@pytest.fixture(scope="module")
def workspace_int4(files, tokenizer):
    return _quantized_dir(files["root"], tokenizer, "int4")


def test_a_q4_1_gguf_exports_to_mlx_in_its_own_blocks(files, tmp_path):
    """``export X.gguf --format mlx`` keeps Q4_1 / Q8_0 matrices quantized, with the file's numbers."""
    from mlx_lm import load as mlx_lm_load

    from mlxqat.export import export_mlx

    export_mlx(files["q4_1"], tmp_path / "mlx", verbose=False)
    import json

    q = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32
    reference, _, _ = load_gguf(files["q4_1"])  # dequantized to float32
    plain, _ = mlx_lm_load(str(tmp_path / "mlx"))
    layer = plain.model.layers[0].mlp.down_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4 and layer.group_size == 32
    w = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32), group_size=32, bits=4)
    assert mx.array_equal(w, reference.model.layers[0].mlp.down_proj.weight)
    x = mx.array([[1, 2, 3, 4, 5, 6]])
    plain.set_dtype(mx.float32)
    assert mx.allclose(plain(x), reference(x), atol=1e-4)
    gguf_bytes = files["q4_1"].stat().st_size
    assert sum(f.stat().st_size for f in (tmp_path / "mlx").glob("*.safetensors")) < 1.5 * gguf_bytes
