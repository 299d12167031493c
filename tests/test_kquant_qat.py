"""QAT for GGUF's K-quants (recipes q4_k, q5_k, q6_k, and llama.cpp's q4_k_m mix): the fake-quant computes what
the exported Q4_K / Q5_K / Q6_K blocks hold, bit for bit; rows that are not a multiple of 256 weights take
llama.cpp's fallback types; the mix gives each tensor the type llama.cpp's own Q4_K_M gives it; llama.cpp reads
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
    with pytest.raises(ValueError, match="mode='kquant' is GGUF's Q4_K, Q5_K or Q6_K"):
        mlxqat.LayerSpec(8, 32, "kquant")


def test_the_q6_k_grid_holds_signed_8_bit_integers_and_is_its_own_fixed_point():
    rng = np.random.default_rng(1)
    s = mx.array((rng.uniform(0.001, 0.05, (4, 16)) * rng.choice([-1, 1], (4, 16))).astype(np.float32))
    b = mx.array(rng.normal(size=(4, 16)).astype(np.float32))  # not -32 * s: the grid ties it
    sq, bq = quant.kquant_grid(s, b, 6)
    runs = np.array(sq).reshape(4, 2, 8)
    top = np.take_along_axis(runs, np.abs(runs).argmax(-1)[..., None], -1)[..., 0]
    unit = (top / -128).astype(np.float16).astype(np.float32)
    ints = runs / unit[..., None]
    assert np.array_equal(ints, np.rint(ints)) and ints.min() == -128 and ints.max() <= 127
    assert np.array_equal(np.array(bq), -32 * np.array(sq))
    again = quant.kquant_grid(sq, bq, 6)
    assert mx.array_equal(again[0], sq) and mx.array_equal(again[1], bq)
    assert float(mx.abs(sq - s).max()) <= float(mx.abs(s).max()) / 128 * 1.01  # within a step
    grad = mx.grad(lambda s_, b_: mx.sum(quant.kquant_grid(s_, b_, 6)[0] * 3 + quant.kquant_grid(s_, b_, 6)[1]),
                   argnums=(0, 1))(s, b)
    assert mx.array_equal(grad[0], mx.full(s.shape, 3.0 - 32.0)) and mx.array_equal(grad[1], mx.zeros(b.shape))


@pytest.mark.parametrize("bits", [4, 6])
def test_the_grid_is_its_own_fixed_point_when_d_is_subnormal(bits):
    """Scales below ~1e-3 put ``d`` among float16's subnormals, too coarse for ``top / d`` to round back to the
    top integer by itself: the grid still holds the top there, so a saved model reads back as it trained."""
    rng = np.random.default_rng(3)
    top = np.geomspace(1e-6, 1e-2, 4000).astype(np.float32)[:, None]
    s = rng.uniform(0.05, 1.0, (4000, 8)).astype(np.float32) * top
    if bits == 6:
        s *= rng.choice([-1, 1], s.shape).astype(np.float32)
    s = mx.array(s.reshape(2000, 16))
    b = -s if bits == 4 else -32 * s
    once = quant.kquant_grid(s, b, bits)
    twice = quant.kquant_grid(*once, bits)
    assert mx.array_equal(once[0], twice[0]) and mx.array_equal(once[1], twice[1])
    unit = np.array(s).reshape(-1, 8)
    idx = np.abs(unit).argmax(-1)
    kept = np.array(once[0]).reshape(-1, 8)[np.arange(len(idx)), idx]
    d = (unit[np.arange(len(idx)), idx] / (63 if bits == 4 else -128)).astype(np.float16).astype(np.float32)
    live = d != 0  # all but the runs whose d underflows to 0, which become 0
    assert live.mean() > 0.8 and (kept[~live] == 0).all()
    assert np.array_equal(kept[live], (d * (63 if bits == 4 else -128))[live])  # the top at exactly 63 / -128 of d


def test_paired_q6_k_is_llama_cpps_algorithm_on_groups_of_32_and_reads_back_in_pairs():
    from mlxqat.gguf import kquants
    from mlxqat.gguf.blocks import NoMLXForm, exact_blocks, mlx_arrays

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    paired = kquants.quantize(w, GT.Q6_K, paired=True)
    assert np.array_equal(paired.sc[:, ::2], paired.sc[:, 1::2])
    assert (paired.sc.reshape(-1, 16).min(-1) == -128).all()  # llama.cpp's rule: the largest scale is -128 of d
    blocks = kquants.pack(paired, GT.Q6_K)
    words, scales, biases = mlx_arrays(blocks, GT.Q6_K, w.shape)
    assert scales.shape == (8, 16) and mx.array_equal(biases, -32 * scales)
    mine = np.array(mx.dequantize(words, scales, biases, group_size=32, bits=6))
    assert np.array_equal(mine, gguf.quants.dequantize(blocks, GT.Q6_K).reshape(w.shape))  # llama.cpp's values
    again, why = exact_blocks(np.array(words), np.array(scales), np.array(biases), 6, 32, GT.Q6_K)
    assert why == "" and np.array_equal(again, blocks)  # byte for byte
    err_paired = np.abs(paired.dequantize(GT.Q6_K) - w).mean()
    plain = kquants.quantize(w, GT.Q6_K)
    assert err_paired < 1.3 * np.abs(plain.dequantize(GT.Q6_K) - w).mean()  # the pairs cost little
    with pytest.raises(NoMLXForm, match="16 weights"):
        mlx_arrays(kquants.pack(plain, GT.Q6_K), GT.Q6_K, w.shape)  # llama.cpp's own Q6_K: halves differ


@pytest.mark.parametrize("recipe,qtype,fallback", [("q4_k", GT.Q4_K, GT.Q5_0), ("q5_k", GT.Q5_K, GT.Q5_1),
                                                   ("q6_k", GT.Q6_K, GT.Q8_0)])
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
    model.set_dtype(mx.float32)
    _llama_cpp_agrees(tmp_path / "m.gguf", model, tokenizer, ("def fibonacci(n):", "class Point:", "The quick brown"))


def _llama_cpp_agrees(path, model, tokenizer, prompts) -> None:
    """llama.cpp's log-probabilities of its own greedy continuations of ``prompts`` are MLX's, within the
    rounding of activations to 8 bits that its K-quant dot products do."""
    cpp = LlamaCpp(path)
    chosen, top = [], []
    for prompt in prompts:
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



def _types_follow_the_mix(reader: gguf.GGUFReader, n_layers: int) -> bool:
    """Every matrix of the file has the type llama.cpp's Q4_K_M rule gives it (the head: ``output``, or the token
    embedding when there is none)."""
    from mlxqat.gguf.writer import mix_type

    names = {t.name for t in reader.tensors}
    head = "output" if "output.weight" in names else "token_embd"
    for t in reader.tensors:
        if len(t.shape) == 2:
            base = t.name.removesuffix(".weight")
            assert t.tensor_type == mix_type("q4_k_m", base, int(t.shape[0]), n_layers, base == head), t.name
    return True


def test_the_q4_k_m_rule_gives_every_tensor_of_a_real_llama_cpp_file_its_type():
    """llama.cpp's own Q4_K_M of Gemma 3 270M: the mix's rule gives each of its matrices the type it has."""
    from real_models import GEMMA3

    if not GEMMA3.is_file():
        pytest.skip(f"{GEMMA3} is absent: run tools/fetch-models")
    reader = gguf.GGUFReader(str(GEMMA3))
    n_layers = int(reader.fields["gemma3.block_count"].parts[-1][0])
    assert sum(len(t.shape) == 2 for t in reader.tensors) == 1 + 7 * n_layers  # tied: no output.weight
    assert _types_follow_the_mix(reader, n_layers)


def test_q4_k_m_qat_exports_exactly_with_llama_cpps_types_and_llama_cpp_agrees(models, tokenizer, tmp_path):
    from mlxqat.convert import block_count

    teacher, config = models()
    teacher.freeze()
    windows = _windows(tokenizer)
    student, _ = models()
    assert block_count(student) == 2
    quantize_qat(student, teacher, windows[::2], "q4_k_m", steps=8, batch_size=4, seq_len=32, log_every=4,
                 progress=False)
    down = [student.model.layers[i].mlp.down_proj.spec.bits for i in range(2)]
    assert down == [4, 6]  # of 2 blocks, llama.cpp gives the last (7 * 2 // 8 = 1) more bits, not the first
    mlxqat.convert(student)
    mlxqat.save(student, tokenizer, tmp_path / "qat", config=config)
    result = export_gguf(tmp_path / "qat", tmp_path / "qat-q4_k_m.gguf", exact=True, modelfile=False,
                         verbose=False)
    assert result["qtype"] == "q4_k_m" and result["exact"]
    reader = gguf.GGUFReader(str(tmp_path / "qat-q4_k_m.gguf"))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert _types_follow_the_mix(reader, 2)
    # llama.cpp's Q4_K_M of an untied 2-block model with rows of 256 and 512: the output head and the last
    # block's attn_v and ffn_down Q6_K, everything else (the token embedding too) Q4_K
    six = {"output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    assert {t.name: t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {
        t.name: GT.Q6_K if t.name in six else GT.Q4_K for t in reader.tensors if len(t.shape) == 2}
    assert sum(len(t.shape) == 2 for t in reader.tensors) == 16
    # round-to-nearest from the full-precision model: the same type for every tensor
    full, _ = models()
    mlxqat.save(full, tokenizer, tmp_path / "full", config=config)
    with pytest.warns(UserWarning, match="not exact"):
        rtn = export_gguf(tmp_path / "full", tmp_path / "rtn.gguf", "q4_k_m", modelfile=False, verbose=False)
    assert [t["type"] for t in rtn["tensors"]] == [t["type"] for t in result["tensors"]]
    _llama_cpp_agrees(tmp_path / "qat-q4_k_m.gguf", student, tokenizer, ("def fibonacci(n):", "class Point:"))
    # the Q4_K_M file fine-tunes in its own blocks: every tensor keeps its type, the gain survives the save
    from test_finetune import FAST, LEARNING_RATES, _data_dir

    out = tmp_path / "tuned-q4_k_m.gguf"
    tuned = mlxqat.finetune(str(tmp_path / "qat-q4_k_m.gguf"), str(_data_dir(tmp_path)), str(out), method="scales",
                            learning_rate=LEARNING_RATES["scales"], **FAST)
    assert tuned["gain_kept"] == 1.0 and tuned["after"]["test"] < tuned["before"]["test"]
    a, b = read_gguf_tensors(tmp_path / "qat-q4_k_m.gguf"), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    assert any(not np.array_equal(a[k][1], b[k][1]) for k in a if a[k][0] == GT.Q6_K)  # the Q6_K scales moved


def test_q6_k_files_load_in_their_blocks_when_the_halves_share_a_scale(models, tokenizer, tmp_path):
    """mlxqat's Q6_K (recipe q6_k) reads back as the quantized layers it was; llama.cpp's own Q6_K (a scale for
    every 16 weights, what ``--type q6_k`` writes from a full-precision model) is read as float weights and
    named as such, so fine-tuning asks for a recipe instead of moving the file's numbers."""
    model, config = models()
    mlxqat.save(model, tokenizer, tmp_path / "full", config=config)
    with pytest.warns(UserWarning, match="not exact"):
        export_gguf(tmp_path / "full", tmp_path / "rtn.gguf", "q6_k", modelfile=False, verbose=False)
    _, _, cfg = load_gguf(tmp_path / "rtn.gguf", keep_quantized=True)
    assert len(cfg["gguf_float_layers"]) == 16 and set(cfg["gguf_float_layers"].values()) == {"Q6_K with a scale per 16 weights"}
    quantize_rtn(model, "q6_k")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q6_k", exact=True, modelfile=False, verbose=False)
    loaded, _, cfg = load_gguf(tmp_path / "m.gguf", keep_quantized=True)
    assert cfg["gguf_float_layers"] == {}
    a, b = dict(model.named_modules()), dict(loaded.named_modules())
    for path, m in a.items():
        if quant.is_quantized(m):
            assert b[path].spec == m.spec and b[path].bits == 6
            assert all(mx.array_equal(getattr(b[path], k), getattr(m, k)) for k in ("weight", "scales", "biases"))


def test_the_q4_k_m_rule_by_hand():
    """llama.cpp's use_more_bits picks, written out for 30 and 18 blocks, and its fallbacks."""
    from mlxqat.gguf import kquants

    assert [i for i in range(30) if kquants.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(18) if kquants.use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
    t = kquants.q4_k_m_type
    assert [t("attn_v", 3, 30, 1024), t("attn_v", 5, 30, 1024), t("attn_v", 5, 30, 576)] == [GT.Q4_K, GT.Q6_K, GT.Q8_0]
    assert [t("attn_qkv", 0, 30, 1024), t("attn_qkv", 3, 30, 1024)] == [GT.Q6_K, GT.Q4_K]
    assert [t("output", None, 30, 1024), t("output", None, 30, 640), t("other", 3, 30, 576)] == [
        GT.Q6_K, GT.Q8_0, GT.Q5_0]
    with pytest.raises(ValueError, match="needs its layer index"):
        t("ffn_down", None, 30, 1024)


def test_a_mix_export_refuses_layers_of_another_type(models, tokenizer, tmp_path):
    """A model quantized with another recipe is not written as Q4_K_M under that label: its layers do not hold
    the mix's types, so --exact refuses, naming the layer."""
    from mlxqat.gguf.format import GGUFExportError

    model, config = models()
    quantize_rtn(model, "q4_k")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    with pytest.raises(GGUFExportError, match=r"cannot be written exactly as q4_k_m, e\.g\. .*recipe q4_k_m"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k_m", exact=True, modelfile=False, verbose=False)


def test_k_quant_recipes_from_a_16_bit_model_keep_their_scales_and_a_q4_k_m_file_stays_q4_k_m(models, tokenizer,
                                                                                              tmp_path):
    """A float16 model quantized with q4_k_m keeps float32 K-quant scales (the embedding's too) and float16
    Q5_0 / Q8_0 ones, so the GGUF is exact; fine-tuning that file writes a Q4_K_M file again; a file name asking
    for a type mlxqat does not write is refused before anything trains."""
    from test_finetune import FAST, LEARNING_RATES, _data_dir

    wide, config = models()  # rows of 256 and 512: K-quants everywhere, the embedding too
    wide.set_dtype(mx.float16)
    quantize_rtn(wide, "q4_k_m")
    assert wide.model.embed_tokens.scales.dtype == mx.float32 and wide.model.embed_tokens.bits == 4
    mlxqat.save(wide, tokenizer, tmp_path / "w", config=config)
    assert export_gguf(tmp_path / "w", tmp_path / "w.gguf", exact=True, modelfile=False, verbose=False)["exact"]
    model, config = models(wide=False)  # rows of 64: llama.cpp's fallbacks (Q5_0, Q8_0) everywhere
    model.set_dtype(mx.float16)
    quantize_rtn(model, "q4_k_m")
    mlxqat.save(model, tokenizer, tmp_path / "m", config=config)
    result = export_gguf(tmp_path / "m", tmp_path / "m.gguf", exact=True, modelfile=False, verbose=False)
    assert result["qtype"] == "q4_k_m" and result["exact"]
    data = _data_dir(tmp_path)
    # from the 16-bit model, the fallbacks' scales train as float16 values: the .gguf out is exact
    tuned = mlxqat.finetune(str(tmp_path / "m"), str(data), str(tmp_path / "from-dir.gguf"), method="scales",
                            learning_rate=LEARNING_RATES["scales"], **FAST)
    assert tuned["gain_kept"] == 1.0 and tuned["after"]["test"] < tuned["before"]["test"]
    with pytest.raises(ValueError, match="names GGUF type q4_k_s, which mlxqat does not write"):
        mlxqat.finetune(str(tmp_path / "m.gguf"), str(data), str(tmp_path / "t-Q4_K_S.gguf"), method="scales",
                        **FAST)
    assert not (tmp_path / "t-Q4_K_S.gguf.train").exists()
    out = tmp_path / "tuned.gguf"
    tuned = mlxqat.finetune(str(tmp_path / "m.gguf"), str(data), str(out), method="full",
                            learning_rate=LEARNING_RATES["full"], **FAST)
    assert tuned["gain_kept"] == 1.0
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    a, b = read_gguf_tensors(tmp_path / "m.gguf"), read_gguf_tensors(out)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
