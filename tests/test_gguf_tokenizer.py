"""GGUF export of SentencePiece-style tokenizers (Gemma 3, Llama 2): llama.cpp splits text as the model's own.

The tokenizers are built here as Hugging Face ``tokenizer.json`` files laid
out as converted SentencePiece models are: BPE with byte fallback, ``▁`` for
a space, every merge of two tokens into a token listed in score order,
control tokens, user-defined runs of newlines and spaces, 256 byte tokens.
llama.cpp (xllamacpp) is the reference: the exported file must make it give
the ids the Hugging Face tokenizer gives, over many documents.

The real-model check (``test_gemma3_270m_round_trip``, slow, about 3 GB of memory) runs when Gemma 3
270M's GGUF is on disk (``tools/fetch-models``; see ``real_models.py``).
"""

from __future__ import annotations

import json
import os

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxqat
import tiny
from llamacpp import TEXTS, LlamaCpp, documents
from numerics import logprob_diffs, near_ties, path_logprobs
from real_models import GEMMA3, needs
from mlxqat import export as ex
from mlxqat.gguf.format import GGUFExportError
from mlxqat.gguf.tokenizer import _spm_merges
from mlxqat.gguf.tokenizer import SPM_SPACE, read_tokenizer

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
GEMMA = dict(num_hidden_layers=6, sliding_window_pattern=6, sliding_window=16)  # what llama.cpp's Gemma 3 fixes
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
EXTRA = ["<start_of_turn>user\nHi   there<end_of_turn>\n<start_of_turn>model\n", "a<div>b   c\n\n\n\nd",
         " " * 70 + "x", "\n" * 12, "====  ====\t----", "<0x41> [PAD9]", "ab" * 50]
DOCS = TEXTS + documents(110, seed=11) + EXTRA


def spm_tokenizer(directory, layout="gemma"):
    """A SentencePiece-style ``tokenizer.json`` in ``directory``; ``layout``: ``gemma`` (spaces replaced),
    ``gemma-split`` (plus the Split on " " that Gemma's converted tokenizers carry) or ``llama2`` (a space
    prepended too). Returns the mlx-lm tokenizer loaded from there."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import (AddedToken, SentencePieceBPETokenizer, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)
    from transformers import PreTrainedTokenizerFast

    space = SPM_SPACE
    prefix = layout == "llama2"
    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator([tiny.CORPUS + " naïve café 東京 Москва 0123456789 ======== --------"],
                                vocab_size=420, show_progress=False)
    # user-defined runs, as Gemma's: matched whole before BPE (spaces in their normalized form, or raw)
    runs = [space * k for k in (2, 3, 4, 8, 16)] if not prefix else [" " * k for k in (2, 3, 4, 8)]
    user = ["\n", "\n\n", "\n\n\n", "\t", "<div>"] + runs
    byte = [f"<0x{b:02X}>" for b in range(256)]
    taken = set(CONTROL + user + byte)
    pieces = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]) if t not in taken]
    pieces += [p for p in ("==", "===", "====", "--", "----", space * 2) if p not in pieces and p not in taken]
    tokens = CONTROL + user + byte + pieces
    scores = [-1000.0] * (len(CONTROL) + len(user)) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    normal = set(pieces)
    merges = [(a, b) for a, b in _spm_merges(tokens, np.array(scores)) if a + b in normal]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    replace = normalizers.Replace(" ", space)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), replace]) if prefix else replace
    if layout == "gemma-split":
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=space in t) for t in user])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


def _export(tmp_path, tok, model=None, config=None, recipe="f32"):
    if model is None:
        config = dict(tiny.CONFIGS["gemma3_text"], vocab_size=len(tok._tokenizer), **GEMMA)
        mx.random.seed(0)
        model = tiny._MODULES["gemma3_text"].Model(tiny._MODULES["gemma3_text"].ModelArgs.from_dict(config))
    src = tmp_path / "src"
    if recipe != "f32":
        mlxqat.prepare(model, recipe)
        mlxqat.convert(model)
    mlxqat.save(model, tok, src, config=config)
    path = tmp_path / "m.gguf"
    assert ex.export_gguf(src, path, recipe if recipe != "f32" else "f32", exact=True, verbose=False)["exact"]
    return src, path


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("layout", ["gemma", "gemma-split", "llama2"])
def test_sentencepiece_tokenizer_is_embedded_as_llama_cpp_reads_it(tmp_path, layout):
    """llama.cpp tokenizes >= 100 documents as the Hugging Face tokenizer does; the GGUF imports back to
    a tokenizer that does too; the metadata is what llama.cpp's own converter writes."""
    tok = spm_tokenizer(tmp_path / "tok", layout)
    _, path = _export(tmp_path, tok)
    r = gguf.GGUFReader(str(path))
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.pre") == "default"
    assert _field(r, "tokenizer.ggml.add_space_prefix") == (layout == "llama2")
    assert _field(r, "tokenizer.ggml.add_bos_token") is True and _field(r, "tokenizer.ggml.bos_token_id") == 2
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    scores = np.array(_field(r, "tokenizer.ggml.scores"))
    assert tokens[:6] == CONTROL and types[:6] == [3] * 6
    assert [types[tokens.index(f"<0x{b:02X}>")] for b in range(256)] == [6] * 256
    assert "  " in tokens and types[tokens.index("  ")] == 4  # a user-defined run of spaces, as raw text
    assert SPM_SPACE * 2 not in tokens[:30]
    # scores follow the merge order (here the pieces' order): a piece merged earlier scores higher
    ids = sorted(tokens.index(p) for p in ("==", "===", "====", "▁the", "▁self"))
    assert np.all(np.diff(scores[ids]) < 0), scores[ids]

    cpp = LlamaCpp(path, n_ctx=1024)
    assert len(DOCS) >= 100
    _, imported = mlxqat.load(path)
    differ = [t for t in DOCS if cpp.tokenize(t) != tok.encode(t)]
    print(f"\n{layout}: llama.cpp tokenizes {len(DOCS) - len(differ)}/{len(DOCS)} documents as Hugging Face")
    assert not differ, differ[:3]
    for text in DOCS:  # export -> import: the same tokenizer
        assert imported.encode(text) == tok.encode(text), text
        assert imported.decode(tok.encode(text, add_special_tokens=False)) == tok.decode(
            tok.encode(text, add_special_tokens=False)), text


PROMPTS = ["def fibonacci(n):", "class Point:", "The quick brown", "import os", "    return", "        self.x"]


@pytest.mark.parametrize("recipe", ["q4_0", "f32"])
def test_gemma_style_model_decodes_like_mlx(tmp_path, recipe):
    """A Gemma 3 model with a SentencePiece-style tokenizer: llama.cpp turns the prompt text into the same
    ids and greedy-decodes the same tokens as MLX, but at a few near-ties (:func:`numerics.near_ties`:
    MLX, read along llama.cpp's tokens, puts llama.cpp's choice within twice the largest log-prob
    difference measured between the two of its own top-1; which way those fall depends on the CPU's
    float summation order, and for q4_0 on llama.cpp's 8-bit rounding of activations)."""
    tok = spm_tokenizer(tmp_path / "tok")
    model, config = tiny.train_briefly("gemma3_text", tok, steps=150, **GEMMA)
    reference = type(model)(type(model.args).from_dict(config))
    reference.update(model.parameters())
    src, path = _export(tmp_path, tok, model, config, recipe)
    mlx_model = mlxqat.load(src)[0] if recipe != "f32" else reference
    cpp = LlamaCpp(path)
    paths, noise = [], 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = cpp.complete(prompt)
        assert out["prompt_tokens"] == len(ids) and cpp.tokenize(prompt) == ids, prompt
        assert out["text"] == tok.decode(out["ids"]), prompt
        lp = path_logprobs(mlx_model, ids, out["ids"])
        noise = max(noise, float(logprob_diffs(lp, out["logprobs"])[1].max()))
        paths.append((prompt, lp, out["ids"]))
    ties = [(prompt, i) for prompt, lp, got in paths for i in near_ties(lp, got, 2 * noise, repr(prompt))]
    print(f"\n{recipe}: top-5 |dlogprob| max {noise:.2e}, {len(ties)} near-ties in {len(PROMPTS) * 16}")
    assert len(ties) <= 3


def _edited(tmp_path, name, edit):
    """A copy of the Gemma-style tokenizer directory with ``edit(tokenizer.json dict)`` applied."""
    src = tmp_path / "tok"
    if not src.exists():
        spm_tokenizer(src)
    data = json.loads((src / "tokenizer.json").read_text())
    edit(data)
    out = tmp_path / name
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_refuses_what_llama_cpp_would_tokenize_differently(tmp_path):
    assert read_tokenizer(_edited(tmp_path, "ok", lambda d: None))["model"] == "llama"

    def refused(name, edit, match):
        with pytest.raises(GGUFExportError, match=match) as e:
            read_tokenizer(_edited(tmp_path, name, edit))
        assert "llama.cpp would tokenize text differently" in str(e.value)

    def drop_merge(d):  # the last merge into '▁the'
        m = d["model"]["merges"]
        m.pop(max(k for k, x in enumerate(m) if "".join(x.split(" ") if isinstance(x, str) else x) == "▁the"))

    refused("merge", drop_merge, r"tokens '[^']+' and '[^']+' join into the token '▁the' but the tokenizer has no")

    def interleave(d):
        m = d["model"]["merges"]
        i = next(k for k in range(1, len(m) - 1) if "".join(m[k - 1]) == "".join(m[k]))
        m[i], m[i + 1] = m[i + 1], m[i]

    refused("order", interleave, r"are not consecutive")
    refused("byte", lambda d: d["model"]["vocab"].pop("<0x7F>"), r"without the byte token <0x7F>")
    refused("metaspace-first", lambda d: d.update(normalizer=None, pre_tokenizer={
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}), r"scheme='first'")
    refused("metaspace-split", lambda d: d.update(normalizer=None, pre_tokenizer={
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}), r"split=true")
    refused("words", lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), r"splits the text into words")
    refused("nfkc", lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}), r"NFKC")
    refused("duplicate", lambda d: d["added_tokens"][-1].update(content="<eos>"), r"tokens 1 and \d+ are both '<eos>'")
    refused("dropout", lambda d: d["model"].update(dropout=0.1), r"dropout=0.1")
    refused("lstrip", lambda d: d["added_tokens"][4].update(lstrip=True), r"'<start_of_turn>' has lstrip=true")
    # Metaspace that prepends always is Llama 2's layout; never is Gemma's
    refused("prefixed", lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        r"added token '▁▁' is matched after the '▁' prefix is added")

    def metaspace(scheme):
        def edit(d):
            d.update(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "split": False,
                                                     "prepend_scheme": scheme})
            for a in d["added_tokens"]:
                a["normalized"] = False
        return edit

    assert read_tokenizer(_edited(tmp_path, "always", metaspace("always")))["add_space_prefix"] is True
    assert read_tokenizer(_edited(tmp_path, "never", metaspace("never")))["add_space_prefix"] is False


@pytest.mark.slow
@needs(GEMMA3)
def test_gemma3_270m_round_trip(tmp_path):
    """Gemma 3 270M: GGUF -> MLX q4_0 -> GGUF. llama.cpp tokenizes as the original file and the Hugging
    Face tokenizer do, and greedy-decodes MLX's tokens (a different choice only at a near-tie: llama.cpp
    rounds activations to 8 bits, MLX does not)."""
    from mlxqat.convert import quantize_rtn

    model, tok, config = mlxqat.load(GEMMA3, return_config=True)
    quantize_rtn(model, "q4_0")
    mlxqat.save(model, tok, tmp_path / "q4_0", config=config)
    path = tmp_path / "gemma-q4_0.gguf"
    assert ex.export_gguf(tmp_path / "q4_0", path, "q4_0", exact=True, verbose=False)["exact"]
    texts = TEXTS + documents(20, seed=5) + EXTRA[:3]
    original = LlamaCpp(GEMMA3, n_ctx=512)
    want = [original.tokenize(t) for t in texts]
    del original
    cpp = LlamaCpp(path, n_ctx=512)
    assert [cpp.tokenize(t) for t in texts] == want == [tok.encode(t) for t in texts]
    for prompt in ("The capital of France is", "def fibonacci(n):", "Water boils at"):
        ids = tok.encode(prompt)
        out = cpp.complete(prompt, n=8, n_probs=2)
        assert out["prompt_tokens"] == len(ids)
        for step, cid in enumerate(out["ids"]):
            lp = np.array(nn.log_softmax(model(mx.array([ids]))[0, -1].astype(mx.float32)))
            if int(lp.argmax()) != cid:  # a near-tie, in both
                assert lp.max() - lp[cid] < 0.5 and out["logprobs"][step][2][1][0] == int(lp.argmax()), prompt
                break
            ids.append(cid)
