"""Importance matrices: mlxqat's quantizers equal llama.cpp's own C code (``ggml_quantize_chunk`` in the
llama.cpp library the ``xllamacpp`` package ships), with and without an importance matrix, bit for bit; the
matrix is collected from the layers' real inputs, read and written in llama.cpp's formats, and used by the
GGUF export."""

import ctypes
import glob
import os
import struct

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
import tiny
from real_models import SMOLLM2, needs
from mlxqat.export import export_gguf
from mlxqat.gguf import imatrix
from mlxqat.gguf.blocks import WEIGHTED_TYPES, quantize_blocks
from mlxqat.gguf.format import GGUFExportError

GT = gguf.GGMLQuantizationType
ALL_TYPES = (GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0, GT.Q4_K, GT.Q5_K, GT.Q6_K)


def _llama_cpp_quantize():
    """llama.cpp's ``ggml_quantize_chunk`` (its quantizers, as llama-quantize calls them) through ctypes."""
    xllamacpp = pytest.importorskip("xllamacpp")
    so = glob.glob(os.path.join(os.path.dirname(xllamacpp.__file__), "xllamacpp*.so"))
    if not so:
        pytest.skip("the xllamacpp package has no llama.cpp library here")
    lib = ctypes.CDLL(so[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(w, qtype, importance=None):
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        out = np.zeros((rows, lib.ggml_row_size(int(qtype), cols)), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                None if imp is None else imp.ctypes.data)
        return out

    return quantize


def _matrix(seed, rows=48, cols=768):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.005, 0.05, (rows, 1))).astype(np.float32)
    w[1, :256] = 0.0  # an all-zero super-block
    w[2, 7] = 0.6  # an outlier
    w[3, 32:64] = 0.013  # a flat sub-block
    w[4] = np.abs(w[4])  # a row with no negative weight
    imp = rng.gamma(0.4, 1.0, cols).astype(np.float32)
    imp[::97] = 0.0  # columns no token ever used
    return w, imp


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["reference", "importance"])
def test_quantizers_equal_llama_cpps_bit_for_bit(qtype, weighted):
    llama_cpp = _llama_cpp_quantize()
    for seed in (0, 1):
        w, imp = _matrix(seed)
        importance = imp if weighted else None
        assert np.array_equal(quantize_blocks(w, qtype, importance), llama_cpp(w, qtype, importance)), seed


@needs(SMOLLM2)
def test_quantizers_equal_llama_cpps_on_a_real_models_weights():
    """SmolLM2's own matrices, with importances spread as real activation statistics are."""
    from mlxqat.gguf.reader import read_gguf_tensors

    llama_cpp = _llama_cpp_quantize()
    tensors = read_gguf_tensors(SMOLLM2)
    rng = np.random.default_rng(0)
    for name, qtypes in (("blk.3.ffn_down.weight", (GT.Q6_K, GT.Q4_K)), ("blk.5.attn_q.weight", (GT.Q5_0, GT.Q4_1))):
        qtype0, data, shape = tensors[name]
        w = gguf.quants.dequantize(data, qtype0).reshape(shape)[:64].astype(np.float32)
        if w.shape[1] % 256:
            qtypes = tuple(t for t in qtypes if t not in (GT.Q4_K, GT.Q6_K))
        imp = (rng.lognormal(0.0, 1.5, w.shape[1]) ** 2).astype(np.float32)
        for qtype in qtypes:
            assert np.array_equal(quantize_blocks(w, qtype, imp), llama_cpp(w, qtype, imp)), (name, qtype)


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
def test_the_importance_lowers_the_error_where_it_is_large(qtype):
    w, _ = _matrix(3)
    imp = np.full(w.shape[1], 1e-3, np.float32)
    imp[::8] = 1.0  # one column in eight carries the activations
    err = {}
    for name, importance in (("plain", None), ("weighted", imp)):
        got = gguf.quants.dequantize(quantize_blocks(w, qtype, importance), qtype).reshape(w.shape)
        err[name] = float(np.sum(imp * (got - w) ** 2))
    assert err["weighted"] < 0.9 * err["plain"], err


def test_bad_importance_and_shapes_are_refused():
    w, imp = _matrix(0)
    for qtype in (GT.Q4_K, GT.Q5_0, GT.Q8_0):
        with pytest.raises(ValueError, match=r"importance has shape \(767,\); this matrix of 768 columns needs \(768,\)"):
            quantize_blocks(w, qtype, imp[:-1])
        for bad in (np.nan, np.inf, -1.0):
            wrong = imp.copy()
            wrong[5] = bad
            with pytest.raises(ValueError, match=f"holds {bad}: it must be finite and >= 0"):
                quantize_blocks(w, qtype, wrong)
    with pytest.raises(ValueError, match="Q4_K blocks hold rows of a multiple of 32 weights; these have 40"):
        quantize_blocks(w[:, :40], GT.Q4_K)
    one = quantize_blocks(w[0], GT.Q5_0, imp)  # a 1-D weight is one row
    assert np.array_equal(one, quantize_blocks(w[:1], GT.Q5_0, imp))
    assert quantize_blocks(w[:0], GT.Q5_1, imp).shape[0] == 0


# --- collecting, files, export ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_model(tokenizer):
    model, config = tiny.train_briefly("llama", tokenizer, steps=30, hidden_size=256, intermediate_size=512)
    model.set_dtype(mx.float32)
    return model, config


def _windows(tokenizer, n=3, length=24):
    ids = np.array(tokenizer.encode(tiny.CORPUS * 2), dtype=np.int32)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def test_collect_sums_each_layers_real_input_and_leaves_the_model_as_it_was(wide_model, tokenizer):
    model, _ = wide_model
    windows = _windows(tokenizer)
    before = model(mx.array(windows[0][None]))
    im = imatrix.collect(model, windows, dataset="corpus")
    assert not any(isinstance(m, imatrix._Tap) for _, m in model.named_modules())
    assert mx.array_equal(model(mx.array(windows[0][None])), before)
    n_layers = len(model.model.layers)
    assert len(im.sums) == 7 * n_layers and "token_embd.weight" not in im.sums and "output.weight" not in im.sums
    assert set(im.counts.values()) == {3 * 24} and (im.chunk_count, im.chunk_size, im.datasets) == (3, 24, ["corpus"])
    # q, k and v read the same input: the normed hidden states of the embedding
    want = 0.0
    for ids in windows:
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(mx.array(ids[None])))
        want = want + np.array(mx.sum(x.reshape(-1, x.shape[-1]) ** 2, axis=0))
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(im.sums[f"blk.0.{name}.weight"], want, rtol=1e-5)
    np.testing.assert_array_equal(im.sums["blk.1.ffn_gate.weight"], im.sums["blk.1.ffn_up.weight"])
    assert im.sums["blk.1.ffn_down.weight"].shape == (512,)
    np.testing.assert_allclose(im.importance("blk.0.attn_q.weight"), want / 72, rtol=1e-5)


def test_files_round_trip_in_llama_cpps_formats(wide_model, tokenizer, tmp_path):
    model, _ = wide_model
    im = imatrix.collect(model, _windows(tokenizer, n=2))
    path = imatrix.save(im, tmp_path / "imatrix.gguf")
    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.chunk_count").contents() == 2 and r.get_field("imatrix.chunk_size").contents() == 24
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [256, 1] and list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    back = imatrix.load(path)
    assert back.counts == im.counts and all(np.array_equal(back.sums[k], im.sums[k]) for k in im.sums)
    imatrix.save(im, path)  # its own file: replaced
    # llama.cpp's older .dat format: per entry the mean x number of calls
    name, ncall = "blk.0.attn_q.weight", 5
    values = (im.importance(name) * ncall).astype("<f4")
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
    (tmp_path / "old.dat").write_bytes(blob + values.tobytes() + struct.pack("<i", 5))
    old = imatrix.load(tmp_path / "old.dat")
    np.testing.assert_allclose(old.importance(name), im.importance(name), rtol=1e-6)
    (tmp_path / "junk.dat").write_bytes(b"\x07\x00\x00\x00junk")
    with pytest.raises(ValueError, match="is not an importance matrix"):
        imatrix.load(tmp_path / "junk.dat")


def test_export_uses_the_importance_matrix_for_what_it_quantizes(wide_model, tokenizer, tmp_path):
    model, config = wide_model
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "full")
    im = imatrix.collect(model, _windows(tokenizer))
    im_path = imatrix.save(im, tmp_path / "imatrix.gguf")
    with pytest.warns(UserWarning, match="not exact"):
        plain = export_gguf(src, tmp_path / "plain.gguf", "q4_k_m", modelfile=False, verbose=False)
    with pytest.warns(UserWarning, match="not exact"):
        weighted = export_gguf(src, tmp_path / "weighted.gguf", "q4_k_m", modelfile=False, verbose=False,
                               imatrix=im_path)
    notes = {t["name"]: t["note"] for t in weighted["tensors"]}
    assert all(("importance-weighted" in notes[n]) == (n in im.sums) for n in notes)
    assert [t["type"] for t in weighted["tensors"]] == [t["type"] for t in plain["tensors"]]
    r = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "weighted.gguf")).tensors}
    q = r["blk.1.ffn_down.weight"]
    w = np.array(model.model.layers[1].mlp.down_proj.weight, dtype=np.float32)
    assert np.array_equal(np.array(q.data).reshape(-1), quantize_blocks(w, GT(q.tensor_type), im.importance(q.name)).reshape(-1))
    assert weighted["kl"] > 0 and plain["kl"] > 0


def test_export_refuses_an_importance_matrix_of_another_model(wide_model, tokenizer, tmp_path):
    model, config = wide_model
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "full")
    other = imatrix.ImportanceMatrix({"blk.0.attn_q.weight": np.ones(100, np.float32)}, {"blk.0.attn_q.weight": 4})
    imatrix.save(other, tmp_path / "other.gguf")
    with pytest.raises(GGUFExportError, match=r"blk\.0\.attn_q\.weight: the importance matrix has 100 columns"):
        export_gguf(src, tmp_path / "m.gguf", "q4_k", modelfile=False, verbose=False, imatrix=tmp_path / "other.gguf")
    none = imatrix.ImportanceMatrix({"x.weight": np.ones(256, np.float32)}, {"x.weight": 4})
    imatrix.save(none, tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="names none of this model's tensors"):
        export_gguf(src, tmp_path / "m.gguf", "q4_k", modelfile=False, verbose=False, imatrix=tmp_path / "none.gguf")
    model_file = tmp_path / "model-q8_0.gguf"
    with pytest.warns(UserWarning, match="not exact"):
        export_gguf(src, model_file, "q8_0", modelfile=False, verbose=False)
    with pytest.raises(ValueError, match="is a GGUF file but not an importance matrix"):
        export_gguf(src, tmp_path / "m.gguf", "q4_k", modelfile=False, verbose=False, imatrix=model_file)
    assert not (tmp_path / "m.gguf").exists()


def test_the_command_writes_a_file_and_refuses_bad_input(wide_model, tokenizer, tmp_path, capsys):
    from mlxqat.cli import main

    assert main(["imatrix", "--out", str(tmp_path / "im.gguf"), "--windows", "2", "--seq-len", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    im = imatrix.load(tmp_path / "im.gguf")
    assert im.chunk_count == 2 and im.chunk_size == 32 and set(im.counts.values()) == {64}
    assert main(["imatrix", "--out", str(tmp_path / "im2.gguf"), "--windows", "0"]) == 2
    assert "--windows 0" in capsys.readouterr().err
    (tmp_path / "mine.gguf").write_bytes(b"not mlxqat's")
    assert main(["imatrix", "--out", str(tmp_path / "mine.gguf"), "--windows", "1", "--seq-len", "32"]) == 2
    assert (tmp_path / "mine.gguf").read_bytes() == b"not mlxqat's"


@pytest.mark.parametrize("recipe", ["q4_k", "q6_k"])
def test_qats_ptq_start_tries_the_importance_weighted_k_quants(wide_model, tokenizer, recipe):
    """K-quant layers get llama.cpp's importance-weighted quantizer as a PTQ candidate (diag(H) as the matrix):
    where it wins, the layer holds exactly its scales, and no layer starts worse than round-to-nearest."""
    from mlxqat import ptq, recipes
    from mlxqat.gguf import kquants
    from mlxqat.layers import FakeQuantLinear

    model, config = wide_model
    student = type(model)(type(model.args).from_dict(config))
    student.update(model.parameters())
    w0 = {p: np.array(m.weight) for p, m in student.named_modules() if isinstance(m, nn.Linear)}
    mlxqat.prepare(student, recipes.get(recipe).for_qat())
    windows = np.stack(_windows(tokenizer, n=6, length=25))
    hs = {}
    for chunk in ptq.capture_hessians(student, windows):
        for g in chunk:
            for p, _ in g.members:
                hs[p] = np.diagonal(np.array(g.h / g.tokens))
    report = ptq.ptq_start(student, windows, candidates=("rtn/imatrix",))
    won = [p for p, r in report["per_layer"].items() if r["chosen"] == "rtn/imatrix"]
    assert won and report["error"]["ptq"] < report["error"]["rtn"]
    qtype = kquants.qtype_of(recipes.get(recipe).default.bits)
    layers = {p: m for p, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    for p in won:
        if w0[p].shape[1] % 256:
            continue  # a fallback layer (not a K-quant)
        scales, biases = kquants.quantize(w0[p], qtype, paired=qtype == GT.Q6_K, importance=hs[p]).scales_biases(qtype)
        step = 2 if qtype == GT.Q6_K else 1
        assert np.array_equal(np.array(layers[p].scales), scales[:, ::step]), p
        assert np.array_equal(np.array(layers[p].biases), biases[:, ::step]), p
    for r in report["per_layer"].values():
        assert r["errors"][r["chosen"]] <= r["errors"]["rtn/minmax"]


def test_collect_refuses_overflowing_activations_and_odd_windows(wide_model, tokenizer):
    model, config = wide_model
    windows = _windows(tokenizer, n=2)
    with pytest.raises(ValueError, match=r"a window of token ids has shape \(2, 24\); give 1-D windows"):
        imatrix.collect(model, [np.stack(windows)])
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        imatrix.collect(model, [np.zeros(0, np.int32)])
    broken = type(model)(type(model.args).from_dict(config))
    broken.update(model.parameters())
    broken.model.layers[0].mlp.up_proj.weight = broken.model.layers[0].mlp.up_proj.weight * 1e30
    with pytest.raises(ValueError, match=r"activations that are not finite reached blk\.0\.ffn_down\.weight in window 1"):
        imatrix.collect(broken, windows)
    assert not any(isinstance(m, imatrix._Tap) for _, m in broken.named_modules())  # put back after the error
    prepared = type(model)(type(model.args).from_dict(config))
    mlxqat.prepare(prepared, "int4")
    with pytest.raises(ValueError, match=r"collect on the full-precision model \(before mlxqat.prepare\)"):
        imatrix.collect(prepared, windows)


def test_damaged_files_get_one_clear_error(wide_model, tokenizer, tmp_path):
    model, _ = wide_model
    good = imatrix.save(imatrix.collect(model, _windows(tokenizer, n=1)), tmp_path / "good.gguf")
    blob = good.read_bytes()
    for cut in (40, len(blob) - 100):
        (tmp_path / "cut.gguf").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="damaged or truncated GGUF file"):
            imatrix.load(tmp_path / "cut.gguf")
    inf = imatrix.ImportanceMatrix({"blk.0.attn_q.weight": np.full(256, np.inf, np.float32)},
                                   {"blk.0.attn_q.weight": 3})
    imatrix.save(inf, tmp_path / "inf.gguf")
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight holds sums of squares that are negative or not finite"):
        imatrix.load(tmp_path / "inf.gguf")
    with pytest.raises(FileNotFoundError, match=r"importance matrix .*nope.gguf: no such file; make one with python -m mlxqat.imatrix"):
        imatrix.load(tmp_path / "nope.gguf")


def test_export_weights_only_what_has_a_weighted_quantizer_and_warns_on_a_partial_matrix(wide_model, tokenizer,
                                                                                           tmp_path):
    model, config = wide_model
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "full")
    im = imatrix.collect(model, _windows(tokenizer, n=2))
    path = imatrix.save(im, tmp_path / "im.gguf")
    with pytest.warns(UserWarning, match="not exact"):
        q8 = export_gguf(src, tmp_path / "m-q8_0.gguf", "q8_0", modelfile=False, verbose=False, imatrix=path)
    assert not any("importance" in t["note"] for t in q8["tensors"])  # Q8_0 has no weighted quantizer
    r = gguf.GGUFReader(str(tmp_path / "m-q8_0.gguf"))
    assert r.get_field("quantize.imatrix.file").contents() == "im.gguf"
    # an all-zero entry is not used (llama.cpp's weighted quantizers would zero the tensor); missing entries warn
    partial = imatrix.ImportanceMatrix(dict(im.sums), dict(im.counts))
    partial.sums["blk.0.attn_q.weight"] = np.zeros(256, np.float32)
    del partial.sums["blk.1.ffn_up.weight"]
    partial.sums["blk.9.attn_q.weight"] = np.ones(256, np.float32)
    partial.counts["blk.9.attn_q.weight"] = 1
    imatrix.save(partial, tmp_path / "partial.gguf")
    with pytest.warns(UserWarning) as caught:
        out = export_gguf(src, tmp_path / "m.gguf", "q4_k", modelfile=False, verbose=False,
                          imatrix=tmp_path / "partial.gguf")
    said = " ".join(str(w.message) for w in caught)
    assert "no entry for 1 matrices (e.g. blk.1.ffn_up.weight" in said and "1 entries name tensors the model lacks (e.g. blk.9" in said
    notes = {t["name"]: t["note"] for t in out["tensors"]}
    assert "all zero: quantized without it" in notes["blk.0.attn_q.weight"]
    w = np.array(model.model.layers[0].self_attn.q_proj.weight, dtype=np.float32)
    from mlxqat.gguf.writer import permute_rows

    q = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["blk.0.attn_q.weight"]
    plain = permute_rows(quantize_blocks(w, GT.Q4_K), model.args.num_attention_heads)
    assert np.array_equal(np.array(q.data).reshape(-1), plain.reshape(-1))


def test_the_commands_never_write_over_their_inputs(wide_model, tokenizer, tmp_path, capsys):
    from mlxqat.cli import main

    model, config = wide_model
    src = tiny.save_fp_model(model, config, tokenizer, tmp_path / "full")
    path = imatrix.save(imatrix.collect(model, _windows(tokenizer, n=1)), tmp_path / "im.gguf")
    before = path.read_bytes()
    assert main(["export", str(src), "--format", "gguf", "--type", "q4_k", "--imatrix", str(path), "--out",
                 str(path)]) == 2
    assert path.read_bytes() == before and "im.gguf" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "mlx", "--imatrix", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "--imatrix weights GGUF quantization" in capsys.readouterr().err
    assert main(["imatrix", "--model", str(src), "--out", str(src / "imatrix.gguf"), "--windows", "1",
                 "--seq-len", "16", "--no-progress"]) == 2
    assert not (src / "imatrix.gguf").exists()
    assert main(["export", str(src), "--format", "gguf", "--type", "q4_k", "--imatrix", str(tmp_path / "no.gguf"),
                 "--out", str(tmp_path / "m.gguf")]) == 2
    assert "no such file; make one with python -m mlxqat.imatrix" in capsys.readouterr().err
