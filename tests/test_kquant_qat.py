"""QAT for GGUF's K-quants (recipes q4_k, q5_k): the fake-quant computes what the exported Q4_K / Q5_K blocks
hold, bit for bit; rows that are not a multiple of 256 weights take llama.cpp's fallback types; llama.cpp reads
the exported files as MLX computes them; a Q4_K file fine-tunes in its own blocks."""

from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
import tiny
from llamacpp import LlamaCpp
from numerics import logprob_diffs, path_logprobs
from mlxqat import quant
from mlxqat.convert import quantize_rtn
from mlxqat.evaluate import evaluate
from mlxqat.export import export_gguf
from mlxqat.gguf.reader import load_gguf, read_gguf_tensors
from mlxqat.training.qat import quantize_qat

GT = gguf.GGMLQuantizationType
WIDE = dict(hidden_size=256, intermediate_size=512)  # every row a multiple of 256: all K-quant blocks


@pytest.fixture(scope="module")
def models(tokenizer):
    cache = {}

    def get(wide: bool = True):
        if wide not in cache:
            cache[wide] = tiny.train_briefly("llama", tokenizer, steps=60, **(WIDE if wide else {}))
        model, config = cache[wide]
        copy = type(model)(type(model.args).from_dict(config))
        copy.update(model.parameters())
        copy.set_dtype(mx.float32)
        return copy, config

    return get


def _windows(tokenizer, length=33):
    ids = np.array(tokenizer.encode(tiny.CORPUS * 3), dtype=np.int32)
    return np.stack([ids[i:i + length] for i in range(0, len(ids) - length, 7)])


def test_the_grid_holds_six_bit_integers_and_is_its_own_fixed_point():
    rng = np.random.default_rng(0)
    s = mx.array(rng.uniform(0.001, 0.05, (4, 16)).astype(np.float32))
    b = mx.array(-rng.uniform(0.0, 0.4, (4, 16)).astype(np.float32))
    sq, bq = quant.kquant_grid(s, b)
    for values in (np.array(sq), -np.array(bq)):
        runs = values.reshape(4, 2, 8)
        unit = (runs.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
        ints = runs / unit[..., None]
        assert np.array_equal(ints, np.rint(ints)) and ints.max() == 63 and ints.min() >= 0
    again = quant.kquant_grid(sq, bq)
    assert mx.array_equal(again[0], sq) and mx.array_equal(again[1], bq)  # saved values read back unchanged
    assert float(mx.abs(sq - s).max()) <= float(s.max()) / 63  # within a step of the grid
    grad = mx.grad(lambda s_, b_: mx.sum(quant.kquant_grid(s_, b_)[0] * 3 + quant.kquant_grid(s_, b_)[1]),
                   argnums=(0, 1))(s, b)
    assert mx.array_equal(grad[0], mx.full(s.shape, 3.0)) and mx.array_equal(grad[1], mx.ones(b.shape))
    with pytest.raises(ValueError, match="mode='kquant' is GGUF's Q4_K or Q5_K"):
        mlxqat.LayerSpec(6, 32, "kquant")


@pytest.mark.parametrize("recipe,qtype,fallback", [("q4_k", GT.Q4_K, GT.Q5_0), ("q5_k", GT.Q5_K, GT.Q5_1)])
@pytest.mark.parametrize("wide", [True, False])
def test_round_to_nearest_exports_bit_for_bit(models, tokenizer, tmp_path, recipe, qtype, fallback, wide):
    model, config = models(wide)
    x = mx.array([tokenizer.encode(tiny.CORPUS)[:48]])
    quantize_rtn(model, recipe, fake_quant=True)
    fake = model(x)
    mlxqat.convert(model)
    assert float(mx.abs(model(x) - fake).max()) < 1e-3  # the same numbers through quantized_matmul
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    result = export_gguf(tmp_path / "m", tmp_path / "m.gguf", recipe, exact=True, modelfile=False, verbose=False)
    assert result["exact"] and result["kl"] == 0.0
    assert set(result["types"]) == {qtype.name if wide else fallback.name, "F32"}
    tensors = read_gguf_tensors(tmp_path / "m.gguf")
    modules = dict(model.named_modules())
    for t in result["tensors"]:
        prefix, _, leaf = t["source"].rpartition(".")
        m = modules[prefix]
        if quant.is_quantized(m) and leaf == "weight":
            gt, data, shape = tensors[t["name"]]
            got = gguf.quants.dequantize(data, gt).reshape(shape)
            want = np.array(mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                                          group_size=32, bits=m.bits))
            if "attn_q" in t["name"] or "attn_k" in t["name"]:  # llama.cpp's rotary row order
                from mlxqat.gguf.writer import permute_rows

                heads = model.args.num_attention_heads if "attn_q" in t["name"] else model.args.num_key_value_heads
                got = permute_rows(got, heads, inverse=True)
            assert np.array_equal(got, want), t["name"]  # bit for bit


def test_qat_trains_on_the_grid_and_exports_what_it_trained(models, tokenizer, tmp_path):
    teacher, config = models()
    teacher.freeze()
    windows = _windows(tokenizer)
    train, val = windows[::2], windows[1::2][:16]
    rtn, _ = models()
    quantize_rtn(rtn, "q4_k", fake_quant=True)
    student, _ = models()
    summary = quantize_qat(student, teacher, train, "q4_k", steps=24, batch_size=4, seq_len=32, log_every=4,
                           progress=False, select_windows=val[:4], scale_dtype="float16")
    kl_rtn, kl_qat = evaluate(rtn, val, teacher)["kl"], evaluate(student, val, teacher)["kl"]
    assert kl_qat < 0.8 * kl_rtn, (kl_rtn, kl_qat)
    print(f"q4_k KL: RTN {kl_rtn:.4f}, QAT {kl_qat:.4f}")
    layer = student.model.layers[0].mlp.down_proj
    assert layer.spec.mode == "kquant" and layer.spec.learn_scales and layer.scales.dtype == mx.float32
    assert summary["best_step"] >= 0
    mlxqat.convert(student)
    assert evaluate(student, val, teacher)["kl"] == pytest.approx(kl_qat, rel=1e-3)
    mlxqat.save(student, tokenizer, tmp_path / "qat", config=config)
    result = export_gguf(tmp_path / "qat", tmp_path / "qat.gguf", exact=True, modelfile=False, verbose=False)
    assert result["qtype"] == "q4_k" and result["exact"] and result["types"] == {"Q4_K": 16, "F32": 5}


def test_llama_cpp_reads_the_q4_k_export_as_mlx_computes(models, tokenizer, tmp_path):
    model, config = models()
    quantize_rtn(model, "q4_k")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    assert export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k", exact=True, modelfile=False,
                       verbose=False)["exact"]
    cpp = LlamaCpp(tmp_path / "m.gguf")
    model.set_dtype(mx.float32)
    chosen, top = [], []
    for prompt in ("def fibonacci(n):", "class Point:", "The quick brown"):
        ids = tokenizer.encode(prompt)
        out = cpp.complete(ids)
        c, t = logprob_diffs(path_logprobs(model, ids, out["ids"]), out["logprobs"])
        chosen.append(c), top.append(t)
    chosen, top = np.concatenate(chosen), np.concatenate(top)
    # llama.cpp rounds activations to 8 bits in its K-quant dot products, with one scale per 256 values (Q8_K;
    # Q4_0's dot products use one per 32), so unlikely tokens of the top 5 move more: close, not equal
    assert np.median(top) < 0.05 and top.max() < 1.0 and chosen.max() < 0.2, (np.median(top), top.max())


def test_a_q4_k_gguf_fine_tunes_in_its_own_blocks(models, tokenizer, tmp_path):
    from test_finetune import FAST, LEARNING_RATES, _data_dir

    model, config = models()
    quantize_rtn(model, "q4_k")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k", exact=True, modelfile=False, verbose=False)
    loaded, _, cfg = load_gguf(tmp_path / "m.gguf", keep_quantized=True)
    assert cfg["gguf_float_layers"] == {}
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.spec.mode == "kquant" and layer.scales.dtype == mx.float32
    data = _data_dir(tmp_path)
    with pytest.raises(ValueError, match="K-quant"):
        mlxqat.finetune(str(tmp_path / "m.gguf"), str(data), str(tmp_path / "lora.gguf"), method="lora", **FAST)
    out = tmp_path / "tuned.gguf"
    result = mlxqat.finetune(str(tmp_path / "m.gguf"), str(data), str(out), method="full",
                             learning_rate=LEARNING_RATES["full"], **FAST)
    assert result["gain_kept"] == 1.0 and result["after"]["test"] < result["before"]["test"]
    a, b = read_gguf_tensors(tmp_path / "m.gguf"), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # Q4_K in, Q4_K out
    assert sum(not np.array_equal(a[k][1], b[k][1]) for k in a if a[k][0] == GT.Q4_K) >= 8


def test_a_k_quant_file_with_fewer_steps_at_the_top_is_refused_for_fine_tuning(models, tokenizer, tmp_path):
    from test_finetune import FAST, _data_dir

    model, config = models()
    quantize_rtn(model, "q4_k")
    layer = model.model.layers[0].mlp.down_proj
    runs = np.array(layer.scales.astype(mx.float32)).reshape(-1, 8)
    unit = (runs.max(-1) / 31).astype(np.float16).astype(np.float32)  # a valid grid whose top integer is 31
    ints = np.clip(np.rint(runs / unit[:, None]), 0, 31)
    layer.scales = mx.array((unit[:, None] * ints).reshape(layer.scales.shape))
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k", exact=True, modelfile=False, verbose=False)
    with pytest.raises(ValueError, match=r"K-quant layers \(e\.g\. model\.layers\.0\.mlp\.down_proj\) .* not 63 steps"):
        mlxqat.finetune(str(tmp_path / "m.gguf"), str(_data_dir(tmp_path)), str(tmp_path / "t.gguf"),
                        method="scales", **FAST)

