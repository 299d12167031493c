"""GGUF export: exact repacking, llama.cpp (via xllamacpp) agrees with MLX, clear refusals.

Log-probability tolerance, and why. On CPU, llama.cpp multiplies a quantized
weight by activations that it first rounds to 8-bit blocks of 32 values (Q8_0
for Q4_0/Q8_0 weights, Q8_1 with a float16 block sum for Q4_1). MLX does not
round activations, so the two disagree by exactly that rounding: on these
sharply trained tiny models about 0.2 nats on top-5 log-probabilities and
0.03 nats on the chosen token. The tests pin this down three ways:

* F32 GGUF (no activation rounding): llama.cpp equals MLX within 1e-4 nats
  (measured ~1e-5: summation order only; Gemma: 1e-2, llama.cpp's GELU goes
  through a float16 lookup table).
* Q4_0/Q4_1 against an MLX model that rounds activations the way ggml does
  (``GGMLActivations`` below): chosen-token log-probs within 1e-3 (measured
  5e-6 to 1.2e-4) and the median top-5 difference within 1e-4 (measured ~1e-6). Some
  entries still move by ~0.03: float noise pushes an activation across a
  rounding boundary, and the changed key/value stays in the cache.
* Q4_0/Q4_1 against the plain MLX model: top-5 log-probs within 0.5 nats and
  chosen-token ones within 0.1, i.e. the size of the activation-rounding
  effect measured above, with 2x headroom; and the same greedy tokens but at
  a few near-ties (at most 3 of 96), where MLX's top-1 and llama.cpp's choice
  are closer than twice the largest log-prob difference measured between the
  two. Which way such a tie falls depends on float summation order, i.e. on
  the CPU's kernels (AVX2 or AVX-512). MLX is read along llama.cpp's tokens
  (teacher forcing), so every position after a near-tie is compared too.
  The chosen-token bounds (both bullets) hold where MLX is sure of the token:
  where its top two are within the near-tie bound, the chosen token is one of
  two about equally likely ones and its log-prob moves as the top-5 do.
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

import mlxqat
import tiny
from llamacpp import LlamaCpp
from numerics import logprob_diffs, margins, near_ties, path_logprobs
from mlxqat.convert import head_path
from mlxqat import export as ex
from mlxqat.gguf.format import GGUFExportError
from mlxqat.gguf.reader import read_gguf_tensors
from mlxqat.gguf.writer import ARCHS, exact_blocks, permute_rows
from mlxqat.evaluate import kl_probe_inputs, mean_kl

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's OpenMP threads: don't spin between calls
GEMMA = dict(num_hidden_layers=6, sliding_window_pattern=6, sliding_window=16)  # llama.cpp fixes the pattern at 6
# Prompts from the training text: the model is sure of their continuations, so greedy decoding
# is not decided by near-ties that 8-bit activation rounding could flip.
PROMPTS = ["def fibonacci(n):", "class Point:", "The quick brown", "import os", "    return", "        self.x"]
N_NEW = 16


def _random_model(arch, seed=0, dtype=None):
    mod = tiny._MODULES[arch]
    config = dict(tiny.CONFIGS[arch], **(GEMMA if arch == "gemma3_text" else {}))
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, config


def _saved(tmp_path, tokenizer, model, config, recipe, name="src"):
    mlxqat.prepare(model, recipe)
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, tmp_path / name, config=config)
    return tmp_path / name


# ---------------------------------------------------------------------------
# Exact repacking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny.ARCHS)
@pytest.mark.parametrize("recipe", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_gguf_dequantizers_give_back_the_mlx_weights(tmp_path, tokenizer, arch, recipe):
    model, config = _random_model(arch, seed=1)
    src = _saved(tmp_path, tokenizer, model, config, recipe)
    result = ex.export_gguf(src, tmp_path / "m.gguf", recipe, exact=True, verbose=False)
    assert result["exact"] and result["kl"] == 0.0
    tensors = read_gguf_tensors(tmp_path / "m.gguf")
    modules = dict(model.named_modules())  # the converted model itself
    params = dict(tree_flatten(model.parameters()))
    spec = ARCHS[config["model_type"]]
    a = model.args
    checked = 0
    for t in result["tensors"]:
        qtype, data, shape = tensors[t["name"]]
        got = gguf.quants.dequantize(data, qtype).reshape(shape)
        prefix, _, leaf = t["source"].rpartition(".")
        m = modules[prefix]
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and leaf == "weight":
            head_8bit = recipe in ("q4_0", "q5_0") and prefix == head_path(model)  # their output head is Q8_0
            assert qtype.name.lower() == ("q8_0" if head_8bit else recipe), t
            want = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits))
        else:
            want = np.array(params[t["source"]].astype(mx.float32))
            if spec.norm_shift and t["source"].endswith("norm.weight"):
                want = want + np.float32(spec.norm_shift)
        if spec.permute_qk and t["name"].endswith(("attn_q.weight", "attn_k.weight")):
            heads = a.num_attention_heads if "attn_q" in t["name"] else a.num_key_value_heads
            got = permute_rows(got, heads, inverse=True)
        assert np.array_equal(got, want), t["name"]
        checked += 1
    assert checked == len(tensors)


def test_bf16_model_repacks_exactly(tmp_path, tokenizer):
    model, config = _random_model("llama", seed=2, dtype=mx.bfloat16)
    src = _saved(tmp_path, tokenizer, model, config, "q4_0")
    result = ex.export_gguf(src, tmp_path / "m.gguf", "q4_0", exact=True, verbose=False)
    assert result["exact"]
    qtype, data, shape = read_gguf_tensors(tmp_path / "m.gguf")["blk.0.ffn_down.weight"]
    m = model.layers[0].mlp.down_proj
    codes = np.array(mlxqat.quant.unpack(m.weight, 4)).astype(np.float32)
    s = np.repeat(np.array(m.scales.astype(mx.float32)), 32, axis=-1)
    assert np.array_equal(gguf.quants.dequantize(data, qtype).reshape(shape), (codes - 8) * s)


def test_exact_blocks_refuse_what_they_cannot_hold():
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(8, 64)).astype(np.float32))
    cases = [
        (mlxqat.quant.init_params(w, 4, 64, "affine"), 4, 64, gguf.GGMLQuantizationType.Q4_0, "group 64"),
        (mlxqat.quant.init_params(w, 4, 32, "affine"), 4, 32, gguf.GGMLQuantizationType.Q4_1, "float16"),
        (mlxqat.quant.init_params(w, 4, 32, "affine", "float16"), 4, 32, gguf.GGMLQuantizationType.Q4_0,
         "not -8\\*scales"),
        (mlxqat.quant.init_params(w, 8, 32, "affine", "float16"), 8, 32, gguf.GGMLQuantizationType.Q8_0,
         "not -128\\*scales"),
        (mlxqat.quant.init_params(w, 3, 32, "symmetric"), 3, 32, gguf.GGMLQuantizationType.Q4_0, "3-bit"),
    ]
    for (packed, s, b), bits, g, qtype, why in cases:
        blocks, reason = exact_blocks(np.array(packed), np.array(s), np.array(b), bits, g, qtype)
        assert blocks is None
        assert why.replace("\\", "") in reason, reason
    packed, s, b = mlxqat.quant.init_params(w, 4, 32, "symmetric")
    blocks, reason = exact_blocks(np.array(packed), np.array(s), np.array(b), 4, 32, gguf.GGMLQuantizationType.Q4_0)
    assert reason == "" and blocks.shape == (8, 2 * 18)


def test_requantized_export_warns_with_the_kl_of_the_written_file(tmp_path, tokenizer):
    model, config = _random_model("qwen3", seed=3)
    src = _saved(tmp_path, tokenizer, model, config, "int4")
    with pytest.warns(ex.ExportWarning, match=r"not exact.*KL\(MLX model \|\| GGUF weights\) = [0-9.e-]+ nats"):
        result = ex.export_gguf(src, tmp_path / "m.gguf", "q4_0", verbose=False)
    assert not result["exact"] and result["kl"] > 1e-6
    # The number in the warning is the KL of the weights in the file, recomputed from the file.
    reference, tok = mlxqat.load(src)
    candidate, _ = mlxqat.load(src)
    mlxqat.dequantize(candidate)  # the quantized layers, dequantized (mlxqat.quant)
    tensors = read_gguf_tensors(tmp_path / "m.gguf")
    updates = []
    for t in result["tensors"]:
        qtype, data, shape = tensors[t["name"]]
        if t["source"].endswith(".weight") and len(shape) == 2:
            assert qtype == gguf.GGMLQuantizationType.Q4_0
            updates.append((t["source"], mx.array(gguf.quants.dequantize(data, qtype).reshape(shape))))
    candidate.load_weights(updates, strict=False)
    kl = mean_kl(reference, candidate, kl_probe_inputs(reference.args.vocab_size, tok))
    assert kl == pytest.approx(result["kl"], rel=1e-4)
    # 8-bit costs far less than 4-bit
    model8, _ = _random_model("qwen3", seed=3)
    src8 = _saved(tmp_path, tokenizer, model8, config, "int8", name="src8")
    with pytest.warns(ex.ExportWarning):
        r8 = ex.export_gguf(src8, tmp_path / "m8.gguf", "q8_0", verbose=False)
    assert r8["kl"] < result["kl"] / 10


def test_full_precision_model_as_q4_0_is_the_reference_quantizer_with_an_8_bit_head(tmp_path, tokenizer):
    """Round-to-nearest Q4_0 of a full-precision model: gguf's own quantizer, tensor by tensor, and the
    output head at Q8_0 as recipe q4_0 keeps it, so it is the same file layout a q4_0 QAT run exports."""
    model, config = _random_model("qwen3", seed=6)
    mlxqat.save(model, tokenizer, tmp_path / "fp", config=config)
    with pytest.warns(ex.ExportWarning):
        result = ex.export_gguf(tmp_path / "fp", tmp_path / "rtn.gguf", "q4_0", verbose=False)
    head = head_path(model)
    weights = dict(tree_flatten(model.parameters()))
    tensors = read_gguf_tensors(tmp_path / "rtn.gguf")
    seen = set()
    for t in result["tensors"]:
        qtype, data, shape = tensors[t["name"]]
        if len(shape) != 2:
            continue
        want = gguf.GGMLQuantizationType.Q8_0 if t["source"] == f"{head}.weight" else gguf.GGMLQuantizationType.Q4_0
        assert qtype == want, (t["name"], qtype)
        w = np.array(weights[t["source"]].astype(mx.float32))
        assert np.array_equal(np.asarray(data).reshape(-1), gguf.quants.quantize(w, want).reshape(-1)), t["name"]
        seen.add(want)
    assert seen == {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0}
    assert result["qtype"] == "q4_0"


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_clear_errors_for_what_gguf_cannot_express(tmp_path, tokenizer):
    model, config = _random_model("llama", seed=4)
    src = _saved(tmp_path, tokenizer, model, config, "int4")
    with pytest.raises(GGUFExportError, match=r"cannot be written exactly as q4_0.*recipe q4_0, q5_0, q8_0, q4_1, q5_1, q4_k, q5_k or q6_k"):
        ex.export_gguf(src, tmp_path / "a.gguf", "q4_0", exact=True, verbose=False)
    with pytest.raises(ValueError, match="no GGUF type holds this model's weights exactly.*--type"):
        ex.export_gguf(src, tmp_path / "a.gguf", "auto", verbose=False)
    assert ex.main([str(src), "--format", "gguf", "--out", str(tmp_path / "a.gguf"), "--type", "q4_0", "--exact"]) == 2

    # static activation quantization: GGUF has no place for it
    a8, a8cfg = _random_model("llama", seed=4)
    mlxqat.prepare(a8, mlxqat.recipes.get("q4_0", act_bits=8))
    mlxqat.calibrate(a8, [mx.arange(24)[None]])
    mlxqat.convert(a8)
    mlxqat.save(a8, tokenizer, tmp_path / "a8", config=a8cfg)
    with pytest.raises(GGUFExportError, match="static activation quantization has no GGUF form"):
        ex.export_gguf(tmp_path / "a8", tmp_path / "a.gguf", "q4_0", exact=True, verbose=False)
    with pytest.warns(ex.ExportWarning, match="static activation quantization"):
        assert ex.export_gguf(tmp_path / "a8", tmp_path / "a8.gguf", "q4_0", verbose=False)["kl"] > 0

    # an architecture llama.cpp's GGUF has no form for
    other = tmp_path / "olmo"
    shutil.copytree(src, other)
    (other / "mlxqat.json").unlink()  # a plain mlx-lm directory, free to edit
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="olmo2")))
    with pytest.raises(GGUFExportError, match=r"model_type='olmo2' cannot be exported to GGUF.*--format mlx"):
        ex.export_gguf(other, tmp_path / "a.gguf", "q4_0", verbose=False)

    # Gemma 3 with global layers where llama.cpp has none
    g, gcfg = tiny.make_model("gemma3_text", 0)  # sliding_window_pattern=2
    gsrc = _saved(tmp_path, tokenizer, g, gcfg, "q4_0", name="gemma")
    with pytest.raises(GGUFExportError, match="sliding_window_pattern=2"):
        ex.export_gguf(gsrc, tmp_path / "a.gguf", "q4_0", verbose=False)

    # no tokenizer
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json is missing.*Copy the model's tokenizer files"):
        ex.export_gguf(other, tmp_path / "a.gguf", "q4_0", verbose=False)

    # a pre-tokenizer llama.cpp would not reproduce
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d+|\\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GGUFExportError, match="would tokenize text differently"):
        ex.export_gguf(other, tmp_path / "a.gguf", "q4_0", verbose=False)
    assert not (tmp_path / "a.gguf").exists()
    assert not list(tmp_path.glob(".a.gguf.tmp-*"))


# ---------------------------------------------------------------------------
# llama.cpp agrees with MLX
# ---------------------------------------------------------------------------


def _q8_blocks(x):
    """ggml's activation rounding: 32-value blocks, int8 codes, scale amax/127 stored as float16."""
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = mx.max(mx.abs(xb), axis=-1, keepdims=True)
    d = amax / 127
    q = mx.round(xb * mx.where(amax == 0, 0, 127 / mx.where(amax == 0, 1, amax)))
    return q, d, d.astype(mx.float16).astype(mx.float32)


class GGMLActivations(nn.Module):
    """An MLX quantized layer computing as ggml's CPU kernels do: activations rounded first.

    Q4_0 and Q8_0 weights meet Q8_0 activations; Q4_1 weights meet Q8_1
    activations, whose float16 block sum multiplies the weight's block minimum.
    """

    def __init__(self, layer, q8_1: bool):
        super().__init__()
        self.layer, self.q8_1 = layer, q8_1

    def as_linear(self, x):
        m = self.layer
        q, d, d16 = _q8_blocks(x)
        scales, biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
        y = mx.quantized_matmul((q * d16).reshape(x.shape), m.weight, scales, biases,
                                group_size=m.group_size, bits=m.bits)
        if self.q8_1:
            sums = mx.sum(q, axis=-1)
            s16 = (d[..., 0] * sums).astype(mx.float16).astype(mx.float32)
            y = y + (s16 - d16[..., 0] * sums) @ biases.T
        return y + m.bias if "bias" in m else y

    def __call__(self, x):
        if isinstance(self.layer, nn.QuantizedEmbedding):
            return self.layer(x)
        return self.as_linear(x)


def _ggml_like(model, q8_1):
    def swap(path, m):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return GGMLActivations(m, q8_1)
        return m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def _diffs(model, prompt_ids, out):
    """|llama.cpp - model| log-probs along llama.cpp's tokens: (chosen, top-5) arrays, and the model's
    log-probs there."""
    lp = path_logprobs(model, prompt_ids, out["ids"])
    return (*logprob_diffs(lp, out["logprobs"]), lp)


def _greedy_near_ties(paths, noise):
    """The near-ties of llama.cpp's greedy decodings ``paths`` (``[(prompt, MLX log-probs along its
    tokens, its tokens)]``): wherever else its token is MLX's top-1. ``noise``: the largest difference
    of one log-prob between the two; two tokens closer than twice that are a near-tie."""
    return [(prompt, i) for prompt, lp, ids in paths for i in near_ties(lp, ids, 2 * noise, repr(prompt))]


@pytest.fixture(scope="module")
def trained(tokenizer):
    """Briefly trained float models (peaked predictions) per architecture, cached for the module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            extra = dict(GEMMA, steps=150) if arch == "gemma3_text" else dict(steps=100)
            cache[arch] = tiny.train_briefly(arch, tokenizer, **extra)
        model, config = cache[arch]
        copy = type(model)(type(model.args).from_dict(config))
        copy.update(model.parameters())
        return copy, config

    return get


@pytest.mark.parametrize("recipe", ["q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_llama_cpp_decodes_like_mlx(tmp_path, tokenizer, trained, arch, recipe):
    model, config = trained(arch)
    src = _saved(tmp_path, tokenizer, model, config, recipe)
    assert ex.export_gguf(src, tmp_path / "m.gguf", recipe, exact=True, verbose=False)["exact"]
    cpp = LlamaCpp(tmp_path / "m.gguf")
    emulated, _ = mlxqat.load(src)
    _ggml_like(emulated, q8_1=recipe in ("q4_1", "q5_1"))
    plain_c, plain_t, emu_c, emu_t, paths = [], [], [], [], []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        by_ids = cpp.complete(ids)
        by_text = cpp.complete(prompt)  # llama.cpp tokenizes with the embedded tokenizer
        assert by_text["prompt_tokens"] == len(ids)
        assert by_text["ids"] == by_ids["ids"] and by_text["text"] == tokenizer.decode(by_ids["ids"]), prompt
        c, t, lp = _diffs(model, ids, by_ids)
        plain_c.append(c), plain_t.append(t)
        paths.append((prompt, lp, by_ids["ids"]))
        c, t, _ = _diffs(emulated, ids, by_ids)
        emu_c.append(c), emu_t.append(t)
    plain_c, plain_t, emu_c, emu_t = map(np.concatenate, (plain_c, plain_t, emu_c, emu_t))
    # llama.cpp's greedy tokens are MLX's but where 8-bit activation rounding decides a near-tie
    ties = _greedy_near_ties(paths, plain_t.max())
    # the chosen token's log-prob is ~0 and moves little where MLX is sure of it; where MLX's top two are
    # within the near-tie bound, the chosen token is one of two ~equal ones and moves as the top-5 do
    sure = np.concatenate([margins(lp) > 2 * plain_t.max() for _, lp, _ in paths])
    print(f"\n{arch} {recipe}: {len(PROMPTS) * N_NEW} tokens, {len(ties)} near-ties {ties}, {np.sum(~sure)} unsure; "
          f"|dlogprob| vs MLX: chosen (sure) max {plain_c[sure].max():.2e}, top-5 max {plain_t.max():.2e}; vs MLX "
          f"with ggml activation rounding: chosen (sure) max {emu_c[sure].max():.2e}, top-5 median "
          f"{np.median(emu_t):.2e} (plain: {np.median(plain_t):.2e})")
    assert len(ties) <= 3 and np.sum(~sure) <= 6
    assert plain_c[sure].max() <= 0.1 and plain_t.max() <= 0.5
    if arch != "gemma3_text":  # Gemma's GELU table adds its own ~1e-2 (see the F32 test)
        # With ggml's activation rounding emulated, the rest is float summation order (which can flip the
        # rounding of one 8-bit activation at a half-way point: a few 1e-3 at one token, seen with Q5_0)
        assert emu_c[sure].max() <= (1e-3 if recipe.startswith("q4") else 5e-3)
        assert np.median(emu_c[sure]) <= 1e-5
        assert np.median(emu_t) <= 1e-4 < np.median(plain_t)


@pytest.mark.parametrize("arch,tol", [("llama", 1e-4), ("qwen3", 1e-4), ("gemma3_text", 1e-2)])
def test_float32_gguf_matches_mlx_to_float_precision(tmp_path, tokenizer, trained, arch, tol):
    """Without activation rounding, llama.cpp and MLX compute the same graph: metadata, tensor
    names, the rotary permutation and norm offsets are right."""
    model, config = trained(arch)
    src = _saved(tmp_path, tokenizer, model, config, "q4_0")
    assert ex.export_gguf(src, tmp_path / "m.gguf", "f32", exact=True, verbose=False)["exact"]
    cpp = LlamaCpp(tmp_path / "m.gguf")
    worst, paths = 0.0, []
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        out = cpp.complete(ids)
        _, t, lp = _diffs(model, ids, out)
        worst = max(worst, t.max())
        paths.append((prompt, lp, out["ids"]))
    ties = _greedy_near_ties(paths, worst)
    print(f"\n{arch} f32: top-5 |dlogprob| max {worst:.2e}, {len(ties)} near-ties")
    assert worst <= tol and len(ties) <= 1


def test_llamacpp_scores_held_out_text_as_mlx_does(tmp_path, tokenizer, trained):
    """mlxqat.gguf.llamacpp's per-token scoring (what the quality benchmark's llama.cpp row reads): on an
    F32 file its log-probabilities and top-1 tokens are MLX's, position by position."""
    model, config = trained("llama")
    src = _saved(tmp_path, tokenizer, model, config, "q4_0")
    assert ex.export_gguf(src, tmp_path / "m.gguf", "f32", exact=True, verbose=False)["exact"]
    windows = [tokenizer.encode(t)[:16] for t in ("def fibonacci(n):\n    if n < 2:\n        return n",
                                                   "The quick brown fox jumps over the lazy dog again and again",
                                                   "Nguyễn đã ở Huế: ếch, ễnh ương và ướt át")]
    assert {len(w) for w in windows} == {16}
    got = LlamaCpp(tmp_path / "m.gguf").score(windows)
    # llama.cpp's server withholds the figures of a token whose bytes end inside a UTF-8 character: only where
    # the text so far ends inside one, and never in ASCII text
    inside = np.array([[tokenizer.decode(ids[:t + 1]).endswith("\ufffd") for t in range(1, 16)] for ids in windows])
    withheld = ~got["scored"]
    assert withheld[:2].sum() == 0 and withheld[2].sum() >= 2 and not (withheld & ~inside).any()
    assert (got["top1"][withheld] == -1).all() and np.isnan(got["logprobs"][withheld]).all()
    for i, ids in enumerate(windows):
        logits = model(mx.array(ids)[None])[0, :-1].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        want = lp[np.arange(len(ids) - 1), ids[1:]]
        assert got["logprobs"][i].shape == want.shape
        ok = got["scored"][i]
        noise = np.abs(got["logprobs"][i][ok] - want[ok]).max()
        assert noise <= 1e-4
        # llama.cpp's top-1 is MLX's but at a near-tie: within twice the measured difference of one log-prob
        assert len(near_ties(lp[ok], got["top1"][i][ok], 2 * noise, f"window {i}:")) <= 1
    ppl = LlamaCpp(tmp_path / "m.gguf").perplexity(windows)
    assert ppl == pytest.approx(float(np.exp(-got["logprobs"][got["scored"]].mean())), rel=1e-9)

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_tokenizer(directory, pattern, ignore_merges, nfc):
    """A byte-level BPE with a Llama 3 / Qwen 2 style regex split, trained on the test corpus."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny.CORPUS + "1234567 don't 3.14159 naïve café"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


def _digits_tokenizer(directory):
    """SmolLM's pre-tokenizer: every digit alone, then GPT-2's byte-level split."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny.CORPUS + "1234567 don't 3.14159 naïve café 2024"], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(directory))
    return load_tokenizer(directory)


TRICKY = [
    "def f(x):\n\treturn x  +  1\n\n\n",
    "don't it's we'll THEY'RE",
    "x=1;y=22;z=333;w=4444 3.14159 1234567",
    "héllo wörld — naïve café ✓ 日本語",
    "   leading spaces and trailing   ",
    "<|endoftext|>",
]


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_embedded_tokenizer_splits_text_like_the_model_tokenizer(tmp_path, tokenizer, trained, kind):
    if kind == "gpt-2":  # the byte-level BPE of tests/tiny.py
        model, config = trained("llama")
        tok = tokenizer
    elif kind == "smollm":
        tok = _digits_tokenizer(tmp_path / "tok")
        model, config = _random_model("qwen3", seed=5)
    else:
        tok = _split_tokenizer(tmp_path / "tok", LLAMA3_SPLIT if kind == "llama-bpe" else QWEN2_SPLIT,
                               ignore_merges=kind == "llama-bpe", nfc=kind == "qwen2")
        model, config = _random_model("qwen3", seed=5)  # vocabulary 512 >= the tokenizer's
    src = _saved(tmp_path, tok, model, config, "q4_0")
    ex.export_gguf(src, tmp_path / "m.gguf", "q4_0", verbose=False)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == kind
    cpp = LlamaCpp(tmp_path / "m.gguf")
    letter = tok.encode("a")[0]
    for text in TRICKY:
        ids = tok.encode(text)
        by_text = cpp.complete(text, n=1, force=letter)
        by_ids = cpp.complete(ids, n=1, force=letter)
        assert by_text["prompt_tokens"] == len(ids), text
        # same tokens in, same numbers out: any different id would change the log-probs
        assert by_text["logprobs"] == by_ids["logprobs"], text
        assert cpp.tokenize(text) == ids, text
    if kind == "llama-bpe":
        data = json.loads((src / "tokenizer.json").read_text())
        data["model"]["ignore_merges"] = False
        (src / "mlxqat.json").unlink()
        (src / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(GGUFExportError, match="without ignore_merges"):
            ex.export_gguf(src, tmp_path / "n.gguf", "q4_0", verbose=False)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"type": "linear", "factor": 4.0},
])
def test_rope_scaling_reaches_llama_cpp(tmp_path, tokenizer, rope_scaling):
    mod = tiny._MODULES["llama"]
    config = dict(tiny.CONFIGS["llama"], rope_scaling=rope_scaling, max_position_embeddings=256)
    mx.random.seed(6)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    src = _saved(tmp_path, tokenizer, model, config, "q4_0")
    result = ex.export_gguf(src, tmp_path / "m.gguf", "f32", exact=True, verbose=False)
    assert ("rope_freqs.weight" in {t["name"] for t in result["tensors"]}) == ("rope_type" in rope_scaling)
    cpp = LlamaCpp(tmp_path / "m.gguf")
    ids = tokenizer.encode(tiny.CORPUS[:120])  # long enough for the scaled frequencies to matter
    out = cpp.complete(ids, n=4)
    _, top, _ = _diffs(model, ids, out)
    assert top.max() <= 1e-4


@pytest.mark.parametrize("arch,extra", [
    ("qwen2", dict(model_type="qwen2", max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True)),
    ("llama", dict(attention_bias=True, mlp_bias=False, num_key_value_heads=4)),
])
def test_attention_biases_and_qwen2(tmp_path, tokenizer, arch, extra):
    """Architectures with q/k/v biases: the biases follow their rows through llama's permutation."""
    from mlx_lm.models import llama, qwen2

    mod = {"qwen2": qwen2, "llama": llama}[arch]
    config = dict(tiny.CONFIGS["llama"], **extra)
    mx.random.seed(8)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    biases = {k: v for k, v in tree_flatten(model.parameters()) if k.endswith("_proj.bias")}
    assert biases
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.5) for k, v in biases.items()]))
    src = _saved(tmp_path, tokenizer, model, config, "q4_1")
    result = ex.export_gguf(src, tmp_path / "m.gguf", "f32", exact=True, verbose=False)
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias"} <= {t["name"] for t in result["tensors"]}
    cpp = LlamaCpp(tmp_path / "m.gguf")
    ids = tokenizer.encode(tiny.CORPUS[:80])
    _, top, _ = _diffs(model, ids, cpp.complete(ids, n=4))
    assert top.max() <= 1e-4
