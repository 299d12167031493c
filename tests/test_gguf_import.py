"""GGUF import: mlxqat.load("model.gguf") gives back the model, its config and its tokenizer.

Tiny llama / qwen2 / qwen3 / gemma3 models are written as GGUF by mlxqat's
exporter (F32, so every weight is exact), rewritten where a test needs other
tensor types or tokenizer metadata (``gguf``'s writer and quantizers, plus the
small K-quant quantizers below, which ``gguf`` does not have), and imported
back. llama.cpp (xllamacpp) is the reference for what a GGUF file means: its
``/tokenize`` for the tokenizers, its log-probabilities for the weights.

The real-model check (``test_smollm2_gguf``) runs when SmolLM2's GGUF is on
disk (``tools/fetch-models``; see ``real_models.py``).
"""

from __future__ import annotations

import json
import os

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType as VT
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen2

import mlxqat
import tiny
from llamacpp import TEXTS, LlamaCpp, documents
from numerics import near_ties
from real_models import SMOLLM2, needs
from mlxqat import export as ex
from mlxqat.gguf.format import is_gguf_file
from mlxqat.evaluate import kl_probe_inputs, mean_kl

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
GEMMA = dict(num_hidden_layers=6, sliding_window_pattern=6, sliding_window=16)  # what llama.cpp's Gemma 3 fixes

# ---------------------------------------------------------------------------
# Writing test files
# ---------------------------------------------------------------------------


def _source(tmp_path, tokenizer, arch="llama", seed=0, hidden=None, **overrides):
    """A tiny full-precision model directory; norms and biases randomized (a wrong offset would show)."""
    model_type = overrides.pop("model_type", arch)
    config = dict(tiny.CONFIGS[arch], model_type=model_type, **(GEMMA if arch == "gemma3_text" else {}))
    if hidden:
        config.update(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 4)
    config.update(overrides)
    mod = qwen2 if model_type == "qwen2" else tiny._MODULES[arch]
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, v * 2 if v.ndim == 2 else v + 0.3 * mx.random.normal(v.shape))
                                 for k, v in params]))
    mx.eval(model.parameters())
    directory = tiny.save_fp_model(model, config, tokenizer, tmp_path / f"src-{arch}-{seed}")
    mlxqat.storage.destinations.write_manifest(directory, {})  # a trusted directory: loads without the unverified warning
    return model, config, directory


def _f32_gguf(src, out):
    assert ex.export_gguf(src, out, "f32", exact=True, verbose=False)["exact"]
    return out


def rewrite_gguf(src, dst, *, kv=None, tensor=None):
    """Copy a GGUF file; ``kv``: ``{key: (value, type, item type) or None (drop)}``; ``tensor(name, w)``:
    ``(data, raw type or None)`` for a tensor's float32 values ``w`` (rows x columns), or None to copy it."""
    r = gguf.GGUFReader(str(src))
    kv = dict(kv or {})
    arch = kv.pop("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in kv:
            continue
        w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
    for key, value in kv.items():
        if value is not None:
            w.add_key_value(key, *value)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, GT(t.tensor_type)).reshape(shape)
        out = tensor(t.name, values) if tensor else None
        data, raw = out if out is not None else (np.array(t.data), None if t.tensor_type in (GT.F32, GT.F16)
                                                   else GT(t.tensor_type))
        w.add_tensor(t.name, data, raw_dtype=raw) if raw is not None else w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def _pack_k_scales(sc, mn):
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins (the inverse of gguf's Q4_K.get_scale_min)."""
    lo_d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    lo_m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    mix = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([lo_d, lo_m, mix], axis=1).astype(np.uint8)


def quantize_k(w: np.ndarray, qtype: GT) -> np.ndarray:
    """Round-to-nearest Q4_K / Q5_K / Q6_K blocks (gguf has dequantizers only); rows x bytes."""
    x = w.astype(np.float32).reshape(-1, 256)
    n = len(x)
    if qtype == GT.Q6_K:
        sub = x.reshape(n, 16, 16)
        scale = np.abs(sub).max(-1) / 31
        d = _f16(scale.max(-1) / 127)
        dd = d.astype(np.float32)[:, None]
        sc = np.clip(np.round(np.divide(scale, dd, out=np.zeros_like(scale), where=dd > 0)), -128, 127)
        eff = (dd * sc)[..., None]
        q = np.clip(np.round(np.divide(sub, eff, out=np.zeros_like(sub), where=eff > 0)) + 32, 0, 63)
        q = q.astype(np.uint8).reshape(n, 2, 128)  # halves of 128 values
        ql = (q[:, :, :64] & 0xF) | ((q[:, :, 64:] & 0xF) << 4)
        qh4 = (q >> 4).reshape(n, 2, 4, 32)
        qh = qh4[:, :, 0] | (qh4[:, :, 1] << 2) | (qh4[:, :, 2] << 4) | (qh4[:, :, 3] << 6)
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(n, 2)]
        return np.concatenate(parts, axis=1).reshape(w.shape[0], -1)
    maxq = 15 if qtype == GT.Q4_K else 31
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - low) / maxq, -low
    d, dmin = _f16(scale.max(-1) / 63), _f16(mins.max(-1) / 63)
    df, mf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(mins, mf, out=np.zeros_like(mins), where=mf > 0)), 0, 63).astype(np.uint8)
    eff, off = (df * sc)[..., None], (mf * mn)[..., None]
    q = np.clip(np.round(np.divide(sub + off, eff, out=np.zeros_like(sub), where=eff > 0)), 0, maxq).astype(np.uint8)
    pairs = q.reshape(n, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    head = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), _pack_k_scales(sc, mn)]
    if qtype == GT.Q5_K:
        bits = (q >> 4).reshape(n, 8, 32)
        qh = np.zeros((n, 32), np.uint8)
        for b in range(8):
            qh |= bits[:, b] << b
        head.append(qh)
    return np.concatenate(head + [qs], axis=1).reshape(w.shape[0], -1)


def _quantizer(qtype):
    def convert(name, w):
        if w.ndim != 2:
            return None
        if qtype in (GT.Q4_K, GT.Q5_K, GT.Q6_K):
            return quantize_k(w, qtype), qtype
        if qtype == GT.F16:
            return w.astype(np.float16), None
        return gguf.quants.quantize(w, qtype), qtype

    return convert


class Q8KInput(nn.Module):
    """A linear layer whose input is first rounded as ggml's CPU K-quant kernels round it (Q8_K:
    blocks of 256, int8 codes, scale -max/127 of the signed largest value, kept in float32)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def __call__(self, x):
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
        top = mx.take_along_axis(xb, mx.argmax(mx.abs(xb), axis=-1, keepdims=True), axis=-1)
        safe = mx.where(top == 0, 1, top)
        iscale = mx.where(top == 0, 0, -127 / safe)
        q = mx.minimum(mx.round(iscale * xb), 127)
        return self.linear((q * mx.where(top == 0, 0, 1 / mx.where(iscale == 0, 1, iscale))).reshape(x.shape))


def _ggml_k_like(model):
    for layer in model.layers:
        for block in (layer.self_attn, layer.mlp):
            block.update_modules({k: Q8KInput(v) for k, v in block.children().items() if isinstance(v, nn.Linear)})
    return model


def _ggml_gelu(x: mx.array) -> mx.array:
    """GELU (tanh form) as ggml's CPU backend computes it: looked up in a table of float16 values
    indexed by the float16 input, identity from 10 up and 0 from -10 down."""
    half = x.astype(mx.float16).astype(mx.float32)
    table = nn.gelu_approx(half).astype(mx.float16).astype(mx.float32)
    return mx.where(x <= -10, 0.0, mx.where(x >= 10, x, table))


class GgmlGeluMLP(nn.Module):
    """A Gemma MLP with :func:`_ggml_gelu` in place of MLX's GELU (same weights)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x):
        return self.down_proj(_ggml_gelu(self.gate_proj(x)) * self.up_proj(x))


def _ggml_gelu_like(model):
    for layer in model.layers:
        layer.mlp = GgmlGeluMLP(layer.mlp)
    return model


class _Reference:
    """A model asked as :class:`LlamaCpp` is asked by :func:`_compare_next_tokens` (top 5 log-probs)."""

    def __init__(self, model):
        self.model = model

    def top5(self, prefix, force):
        lp = np.array(nn.log_softmax(self.model(mx.array([prefix]))[0, -1].astype(mx.float32)))
        return [(int(t), float(lp[t])) for t in np.argsort(-lp)[:5]]


def _compare_next_tokens(model, cpp, tokenizer, n_prompts=8):
    """Over prefixes of the test corpus: (near-ties, top-5 |dlogprob| array). ``cpp``'s most likely next
    token is ``model``'s everywhere but at the near-ties (positions) returned, where ``model`` puts it
    within twice the largest measured log-prob difference of its own top-1 (:func:`numerics.near_ties`)."""
    ids = tokenizer.encode(tiny.CORPUS[:200])
    force = tokenizer.encode("a")[0]
    rows, chosen, diffs = [], [], []
    for end in np.linspace(8, len(ids) - 1, n_prompts).astype(int):
        prefix = ids[:end]
        lp = np.array(nn.log_softmax(model(mx.array([prefix]))[0, -1].astype(mx.float32)))
        top = cpp.top5(prefix, force)
        rows.append(lp)
        chosen.append(top[0][0])
        diffs += [abs(v - lp[t]) for t, v in top]
    diffs = np.array(diffs)
    return near_ties(np.stack(rows), chosen, 2 * float(diffs.max()), "next token:"), diffs


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

ROUND_TRIPS = {
    "llama": ("llama", {}),
    "llama-rope-llama3": ("llama", dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-rope-linear": ("llama", dict(max_position_embeddings=256, rope_scaling={"type": "linear", "factor": 4.0})),
    "llama-biases": ("llama", dict(attention_bias=True, num_key_value_heads=4)),
    "qwen2": ("llama", dict(model_type="qwen2", max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "gemma3_text": ("gemma3_text", {}),
}
CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "tie_word_embeddings", "rope_scaling",
               "max_position_embeddings", "attention_bias", "sliding_window", "sliding_window_pattern",
               "query_pre_attn_scalar", "rope_local_base_freq")


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_float32_gguf_round_trip_is_exact(tmp_path, tokenizer, case):
    """Weights bit for bit (Gemma's norms: 1 + w, what mlx-lm computes with), logits identical,
    config fields equal, the tokenizer splits and decodes text as the source tokenizer does."""
    arch, overrides = ROUND_TRIPS[case]
    source, config, src = _source(tmp_path, tokenizer, arch, **overrides)
    path = _f32_gguf(src, tmp_path / "m.gguf")
    model, tok, got = mlxqat.load(path, return_config=True)
    assert type(model) is type(source)
    want = {**tiny.CONFIGS[arch], **(GEMMA if arch == "gemma3_text" else {}), **config}
    for key in CONFIG_KEYS:
        if key in want:
            assert got[key] == want[key], key
    assert np.float32(got["rms_norm_eps"]) == np.float32(want["rms_norm_eps"])
    mine, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(source.parameters()))
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        if arch == "gemma3_text" and k.endswith("norm.weight"):
            assert mx.array_equal(1.0 + mine[k], 1.0 + v), k
        else:
            assert mx.array_equal(mine[k], v), k
    x = mx.array([tokenizer.encode(tiny.CORPUS[:200])])
    assert mx.array_equal(model(x), source(x))
    for text in TEXTS + documents(20):
        ids = tokenizer.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == tokenizer.decode(ids), text
    assert tok.eos_token_ids == {tokenizer.eos_token_id}


def test_export_mlx_from_gguf_and_every_loader_agree(tmp_path, tokenizer):
    """``python -m mlxqat.export X.gguf --format mlx`` writes a verified mlx-lm directory of the import."""
    from mlx_lm import load as mlx_lm_load

    source, _, src = _source(tmp_path, tokenizer, "qwen3")
    path = _f32_gguf(src, tmp_path / "m.gguf")
    assert ex.main([str(path), "--format", "mlx", "--out", str(tmp_path / "out")]) == 0
    imported, tok = mlxqat.load(path)
    saved, saved_tok = mlxqat.load(tmp_path / "out")  # verifies the manifest
    plain, plain_tok = mlx_lm_load(str(tmp_path / "out"))
    x = mx.array([tokenizer.encode(tiny.CORPUS[:120])])
    for m in (imported, saved, plain):
        assert mx.array_equal(m(x), source(x))
    for text in TEXTS:
        assert tok.encode(text) == saved_tok.encode(text) == plain_tok.encode(text) == tokenizer.encode(text)


def test_every_command_takes_a_gguf_model(tmp_path, tokenizer, capsys):
    """generate / profile (through generate's loader) and fp16 export open a GGUF; GGUF -> GGUF says what to do."""
    from mlxqat import generate as gen

    source, _, src = _source(tmp_path, tokenizer, "llama")
    path = _f32_gguf(src, tmp_path / "m.gguf")
    model, tok, info = gen.load_model(str(path), kernel="mlx")
    x = mx.array([tokenizer.encode(tiny.CORPUS[:80])])
    assert mx.array_equal(model(x), source(x)) and info["source"] == str(path)
    assert ex.main([str(path), "--format", "fp16", "--dtype", "float32", "--out", str(tmp_path / "fp")]) == 0
    fp, _ = mlxqat.load(tmp_path / "fp")
    assert mx.array_equal(fp(x), source(x))
    assert ex.main([str(path), "--format", "gguf", "--out", str(tmp_path / "again.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "is already a GGUF file" in err and "--format mlx" in err
    assert not (tmp_path / "again.gguf").exists()


# ---------------------------------------------------------------------------
# Tensor types
# ---------------------------------------------------------------------------

# Mean KL(source || imported) in nats, measured on this model (F16 7.7e-7, BF16 4.6e-5, Q8_0 3.6e-4, Q6_K 5.3e-3,
# Q5_1 1.9e-2, Q5_K 2.0e-2, Q5_0 2.4e-2, Q4_K 8.4e-2, Q4_1 8.5e-2, Q4_0 9.7e-2), with about 3x headroom.
TYPE_KL = {GT.F16: 3e-6, GT.BF16: 2e-4, GT.Q8_0: 1.5e-3, GT.Q6_K: 2e-2, GT.Q5_1: 6e-2, GT.Q5_0: 6e-2,
           GT.Q5_K: 6e-2, GT.Q4_1: 0.3, GT.Q4_0: 0.3, GT.Q4_K: 0.3}


@pytest.mark.parametrize("qtype", list(TYPE_KL), ids=lambda t: t.name)
def test_quantized_types_dequantize_to_what_the_file_holds(tmp_path, tokenizer, qtype):
    source, _, src = _source(tmp_path, tokenizer, "llama", hidden=256, tie_word_embeddings=False)
    f32 = _f32_gguf(src, tmp_path / "f32.gguf")
    path = rewrite_gguf(f32, tmp_path / f"{qtype.name}.gguf", tensor=_quantizer(qtype))
    model, _ = mlxqat.load(path)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert GT(t.tensor_type) == (qtype if qtype != GT.F16 else GT.F16)
    want = gguf.quants.dequantize(t.data, GT(t.tensor_type)).reshape(256, 256)
    want = mlxqat.gguf.writer.permute_rows(want, 4, inverse=True)
    assert np.array_equal(np.array(model.layers[1].self_attn.q_proj.weight), want)
    kl = mean_kl(source, model, kl_probe_inputs(source.args.vocab_size, tokenizer))
    print(f"\n{qtype.name}: KL(source || imported) = {kl:.2e}")
    assert 0 <= kl <= TYPE_KL[qtype]


def test_k_quants_compute_like_llama_cpp(tmp_path, tokenizer):
    """llama.cpp reads K-quant blocks as gguf's dequantizers (hence the import) do: with llama.cpp's 8-bit
    rounding of activations emulated, the same log-probs to float precision (a wrong layout moves them by nats)."""
    _, _, src = _source(tmp_path, tokenizer, "llama", hidden=256, tie_word_embeddings=False)
    f32 = _f32_gguf(src, tmp_path / "f32.gguf")
    types = {"attn_q": GT.Q4_K, "attn_k": GT.Q5_K, "attn_v": GT.Q6_K, "attn_output": GT.Q4_K,
             "ffn_gate": GT.Q5_K, "ffn_up": GT.Q6_K, "ffn_down": GT.Q4_K}

    def convert(name, w):
        qtype = types.get(name.split(".")[-2])
        return (quantize_k(w, qtype), qtype) if qtype else None

    path = rewrite_gguf(f32, tmp_path / "k.gguf", tensor=convert)
    model, _ = mlxqat.load(path)
    cpp = LlamaCpp(path, n_ctx=512)
    _, plain = _compare_next_tokens(model, cpp, tokenizer)
    ties, emulated = _compare_next_tokens(_ggml_k_like(model), cpp, tokenizer)
    print(f"\nK-quants vs llama.cpp: top-5 |dlogprob| max {plain.max():.2e} (median {np.median(plain):.2e}); "
          f"with ggml's Q8_K input rounding emulated: max {emulated.max():.2e} (median {np.median(emulated):.2e})")
    # measured: median 7e-7 emulated vs 3.6e-2 plain; a few entries move by ~1e-2 where float noise pushes
    # an activation across a rounding boundary
    assert len(ties) <= 1 and np.median(emulated) <= 1e-5 < np.median(plain) and plain.max() <= 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_float32_gguf_computes_like_llama_cpp(tmp_path, tokenizer, arch):
    model_src, _, src = _source(tmp_path, tokenizer, arch)
    path = _f32_gguf(src, tmp_path / "m.gguf")
    model, _ = mlxqat.load(path)
    cpp = LlamaCpp(path, n_ctx=512)
    ties, diffs = _compare_next_tokens(model, cpp, tokenizer)
    print(f"\n{arch} f32 vs llama.cpp: top-5 |dlogprob| max {diffs.max():.2e}, {len(ties)} near-ties in 8")
    if arch != "gemma3_text":
        assert len(ties) <= 1 and diffs.max() <= 1e-4
        return
    # llama.cpp's CPU GELU reads a float16 table indexed by the float16 input: alone it takes llama.cpp
    # ~1e-3 from MLX (median), ~1e-2 at most. Emulated, what is left is float32 rounding amplified by that
    # table: an error of one float32 ulp in a GELU input moves some across a float16 rounding boundary
    # (steps of 2^-11), so float32 implementations differ by ~1e-4 there, by how much depends on the
    # CPU's summation order. The yardstick is the same model computed exactly (MLX in float64, the table
    # emulated): llama.cpp must be about as close to it as MLX's own float32 computation is. Measured, over
    # 24 positions, AVX-512 / AVX2 / reference BLAS and 9 model seeds: llama.cpp's mean |dlogprob| 0.5x to
    # 1.5x MLX's, its max 0.2x to 2.4x (one float32 rounding against another: a ratio of two draws).
    n = 24  # positions: the statistics of rounding through the table need more than 8
    ties_emulated, emulated = _compare_next_tokens(_ggml_gelu_like(model), cpp, tokenizer, n)
    exact, _ = mlxqat.load(path)
    exact.set_dtype(mx.float64)
    _ggml_gelu_like(exact)
    _, own = _compare_next_tokens(model, _Reference(exact), tokenizer, n)  # MLX float32's rounding
    _, cpps = _compare_next_tokens(exact, cpp, tokenizer, n)  # llama.cpp's
    print(f"with ggml's float16 GELU table emulated: max {emulated.max():.2e} (median {np.median(emulated):.2e}, "
          f"plain median {np.median(diffs):.2e}); from the exact (float64) model: llama.cpp mean "
          f"{cpps.mean():.2e} max {cpps.max():.2e}, MLX float32 mean {own.mean():.2e} max {own.max():.2e}; "
          f"{len(ties_emulated)} near-ties in {n}")
    assert len(ties) <= 1 and diffs.max() <= 1e-2
    assert len(ties_emulated) <= 1
    assert cpps.mean() <= 2.5 * own.mean() and cpps.max() <= 3 * own.max()
    assert np.median(diffs) >= 3 * np.median(own)  # the table is what separated them, not rounding


# ---------------------------------------------------------------------------
# Tokenizers llama.cpp defines
# ---------------------------------------------------------------------------


def _agree_with_llama_cpp(path, tok, texts, strip_prefix_space=False):
    """Same token ids as llama.cpp's tokenizer, and the same text back. With ``strip_prefix_space`` (a
    vocabulary that prefixes a space), the decoded text loses that space, as Hugging Face's SentencePiece
    tokenizers and llama.cpp's ``llama_detokenize`` do (its server's /detokenize keeps it)."""
    cpp = LlamaCpp(path, n_ctx=512)
    for text in texts:
        assert tok.encode(text) == cpp.tokenize(text), text
        ids = tok.encode(text, add_special_tokens=False)
        want = cpp.detokenize(ids)
        assert tok.decode(ids) == (want[1:] if strip_prefix_space and want.startswith(" ") else want), text


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tmp_path, tokenizer):
    """SmolLM's BPE (every digit alone, then GPT-2's byte-level split) under llama.cpp's name for it."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([tiny.CORPUS + " 1234567 3.14159 2024"], trainer)
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>").save_pretrained(str(tmp_path / "tok"))
    source = load_tokenizer(tmp_path / "tok")
    _, _, src = _source(tmp_path, tokenizer, "llama")
    f32 = _f32_gguf(src, tmp_path / "gpt2.gguf")  # mlxqat's exporter refuses this pre-tokenizer: write it here
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    by_id = {i: (t, 1) for t, i in data["model"]["vocab"].items()}
    by_id.update({a["id"]: (a["content"], 3) for a in data["added_tokens"]})
    n_vocab = tiny.CONFIGS["llama"]["vocab_size"]
    tokens = [by_id.get(i, (f"[PAD{i}]", 5)) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    kv = {"tokenizer.ggml.pre": ("smollm", VT.STRING),
          "tokenizer.ggml.tokens": ([t for t, _ in tokens], VT.ARRAY, VT.STRING),
          "tokenizer.ggml.token_type": ([k for _, k in tokens], VT.ARRAY, VT.INT32),
          "tokenizer.ggml.merges": (merges, VT.ARRAY, VT.STRING),
          "tokenizer.ggml.eos_token_id": (2, VT.UINT32)}
    path = rewrite_gguf(f32, tmp_path / "smollm.gguf", kv=kv)
    _, tok = mlxqat.load(path)
    texts = TEXTS + documents(100, seed=1)
    for text in texts:
        assert tok.encode(text) == source.encode(text), text
    _agree_with_llama_cpp(path, tok, texts)


def _spm_vocab():
    """A SentencePiece-style vocabulary: control, user-defined (newline and space runs), byte and scored pieces."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator([tiny.CORPUS + " naïve café"], vocab_size=300, show_progress=False)
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "\n\n\n", "  ", "   ", "    ", "<div>"]
    byte = [f"<0x{b:02X}>" for b in range(256)]
    taken = set(control + user + byte)
    pieces = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]) if t not in taken]
    tokens = control + user + byte + pieces
    types = [3, 3, 3, 2, 3, 3] + [4] * len(user) + [6] * 256 + [1] * len(pieces)
    scores = [-1000.0] * (len(control) + len(user)) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


@pytest.mark.parametrize("space_prefix", [False, True], ids=["gemma-style", "llama2-style"])
def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path, tokenizer, space_prefix):
    tokens, types, scores = _spm_vocab()
    _, _, src = _source(tmp_path, tokenizer, "llama", vocab_size=len(tokens))
    f32 = _f32_gguf(src, tmp_path / "bpe.gguf")
    kv = {
        "tokenizer.ggml.model": ("llama", VT.STRING),
        "tokenizer.ggml.pre": ("default", VT.STRING),
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": (types, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.scores": (scores, VT.ARRAY, VT.FLOAT32),
        "tokenizer.ggml.bos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (1, VT.UINT32),
        "tokenizer.ggml.unknown_token_id": (3, VT.UINT32),
        "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
        "tokenizer.ggml.add_bos_token": (True, VT.BOOL),
        "tokenizer.ggml.add_space_prefix": (space_prefix, VT.BOOL),
    }
    path = rewrite_gguf(f32, tmp_path / "spm.gguf", kv=kv)
    _, tok = mlxqat.load(path)
    assert tok.encode("def")[0] == 2  # bos added, as the file says
    texts = TEXTS + documents(100, seed=2) + ["<start_of_turn>user\nHi<end_of_turn>\n", "a<div>b   c\n\n\n\nd"]
    _agree_with_llama_cpp(path, tok, texts, strip_prefix_space=space_prefix)


@pytest.mark.slow
@needs(SMOLLM2)
def test_smollm2_gguf():
    """A real model (SmolLM2-135M-Instruct, Q4_1): llama.cpp's token ids and a sensible continuation."""
    from mlx_lm import generate

    model, tok, config = mlxqat.load(SMOLLM2, return_config=True)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    _agree_with_llama_cpp(SMOLLM2, tok, TEXTS + documents(100, seed=3))
    assert "Paris" in generate(model, tok, "The capital of France is", max_tokens=8)


@pytest.mark.slow
@needs(SMOLLM2)
def test_smollm2_as_a_float32_gguf_computes_like_llama_cpp(tmp_path):
    """The real model, imported, written as an mlx-lm directory and then as an F32 GGUF: llama.cpp's
    next-token log-probs are the imported model's within 1e-4, through all 30 layers."""
    assert ex.main([str(SMOLLM2), "--format", "mlx", "--out", str(tmp_path / "mlx")]) == 0
    path = _f32_gguf(tmp_path / "mlx", tmp_path / "smollm2-f32.gguf")
    model, tok = mlxqat.load(path)
    ties, diffs = _compare_next_tokens(model, LlamaCpp(path, n_ctx=512), tok)
    print(f"\nSmolLM2 f32 vs llama.cpp: top-5 |dlogprob| max {diffs.max():.2e} (median {np.median(diffs):.2e})")
    assert len(ties) <= 1 and diffs.max() <= 1e-4


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_malformed_and_unsupported_files_are_clear_value_errors(tmp_path, tokenizer):
    _, _, src = _source(tmp_path, tokenizer, "llama")
    good = _f32_gguf(src, tmp_path / "good.gguf")

    def bad(name, match, **kw):
        path = rewrite_gguf(good, tmp_path / f"{name}.gguf", **kw)
        with pytest.raises(ValueError, match=match):
            mlxqat.load(path)

    bad("arch", r"architecture 'olmo2' is not supported.*gemma3, llama, qwen2, qwen3",
        kv={"general.architecture": ("olmo2", VT.STRING)})
    bad("missing", r"'llama.embedding_length' is missing", kv={"llama.embedding_length": None})
    bad("typed", r"'llama.block_count' is STRING; expected an integer",
        kv={"llama.block_count": ("2", VT.STRING)})
    bad("zero-heads", r"head_count' = 0 is outside", kv={"llama.attention.head_count": (0, VT.UINT32)})
    bad("eps", r"layer_norm_rms_epsilon' = -1.0", kv={"llama.attention.layer_norm_rms_epsilon": (-1.0, VT.FLOAT32)})
    bad("hidden", r"token_embd.weight has shape \[512, 64\], not \(vocab, 32\)",
        kv={"llama.embedding_length": (32, VT.UINT32)})
    bad("layers", r"tensor blk.2.attn_q.weight is missing", kv={"llama.block_count": (3, VT.UINT32)})
    bad("pre", r"tokenizer.ggml.pre='tekken'.*supported: .*smollm",
        kv={"tokenizer.ggml.pre": ("tekken", VT.STRING)})
    bad("tokmodel", r"tokenizer.ggml.model='bert' is not supported", kv={"tokenizer.ggml.model": ("bert", VT.STRING)})
    tokens = gguf.GGUFReader(str(good)).fields["tokenizer.ggml.tokens"].contents()
    bad("dup", r"appears twice", kv={"tokenizer.ggml.tokens": ([tokens[1]] + tokens[1:], VT.ARRAY, VT.STRING)})
    bad("toomany", r"the tokenizer has 600 tokens but the embedding has 512 rows",
        kv={"tokenizer.ggml.tokens": (tokens + [f"x{i}" for i in range(88)], VT.ARRAY, VT.STRING)})
    bad("eosid", r"eos_token_id=9999 is not a token id", kv={"tokenizer.ggml.eos_token_id": (9999, VT.UINT32)})

    def iq4(name, w):  # a tensor type llama.cpp has and the importer does not read
        if name == "blk.0.ffn_up.weight":
            return np.zeros((w.shape[0], w.shape[1] // 32 * 18), np.uint8), GT.IQ4_NL
        return None

    bad("iq4", r"blk.0.ffn_up.weight is IQ4_NL.*supported: F32, F16, BF16, Q8_0", tensor=iq4)

    data = good.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not fit the file|damaged or truncated|not a readable GGUF"):
        mlxqat.load(tmp_path / "short.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        mlxqat.load(tmp_path / "text.gguf")
    assert not is_gguf_file(tmp_path) and not is_gguf_file(tmp_path / "absent.gguf")
    blob = tmp_path / "sha256-0123"  # an Ollama blob: no extension, GGUF magic
    blob.write_bytes(data)
    assert is_gguf_file(blob) and mlxqat.load(blob)[0] is not None
