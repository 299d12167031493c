"""Held-out text of several kinds (mlxqat.heldout): real text every installation has, split by document."""

import hashlib

import numpy as np
import pytest

import tiny
from mlxqat import heldout
from mlxqat.data import generate_windows
from mlxqat.stdlib_data import stdlib_root

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def test_each_kind_is_real_text_of_its_own_kind():
    prose, code, docs = heldout.prose_documents(), heldout.code_documents(), heldout.docs_documents()
    assert len(prose) >= 3 and sum(len(d.text) for d in prose) > 20_000
    assert len(code) >= 20 and all(d.name.endswith((".h", ".hpp")) for d in code)
    assert sum("#include" in d.text or "#define" in d.text for d in code) > len(code) // 2
    assert len(docs) > 50
    # none of it is the default training text (the standard library's Python source)
    stdlib_start = (stdlib_root() / "json" / "decoder.py").read_text()[:400]
    assert not any(stdlib_start in d.text for d in prose + code + docs)
    # prose is English: mostly letters and spaces, few braces
    text = " ".join(d.text for d in prose)
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8
    code_text = " ".join(d.text for d in code[:20])
    assert code_text.count(";") / len(code_text) > 10 * text.count(";") / len(text)


def test_chat_prompts_come_from_descriptions_set_aside_from_the_prose():
    prose_names = {d.name.split(":", 1)[1] for d in heldout.prose_documents()}
    chat_names = {n for n in heldout.PROSE_DISTRIBUTIONS if hashlib.sha256(n.encode()).digest()[0] < heldout.CHAT_SHARE}
    assert chat_names and not (prose_names & chat_names)
    prompts = heldout.chat_prompts(8)
    assert len(prompts) == 8 and len(set(prompts)) == 8
    prose_text = "\n".join(d.text for d in heldout.prose_documents())
    for p in prompts:
        ask, _, paragraph = p.partition("\n\n")
        assert ask in heldout.CHAT_ASKS and len(paragraph) >= heldout.MIN_PARAGRAPH_CHARS
        assert paragraph[:100] not in prose_text


def test_windows_are_spread_over_each_kind(tokenizer):
    w = heldout.heldout_windows(tokenizer, 32, 6, kinds=("prose", "code", "docs"))
    assert set(w) == {"prose", "code", "docs"}
    for kind, arr in w.items():
        assert arr.shape == (6, 33) and arr.dtype == np.int32
        assert len({r.tobytes() for r in arr}) == 6, kind
    with pytest.raises(ValueError, match="unknown held-out kind 'poetry'"):
        heldout.kind_documents("poetry")


def test_chat_kind_holds_the_models_own_replies_in_its_template(tokenizer):
    model, _ = tiny.make_model("llama")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        heldout.chat_documents(model, tokenizer, 2)
    assert "chat" not in heldout.heldout_windows(tokenizer, 16, 2, kinds=("chat",), model=model)
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    try:
        docs = heldout.chat_documents(model, tokenizer, 3, max_reply_tokens=8)
        again = heldout.chat_documents(model, tokenizer, 3, max_reply_tokens=8)
        w = heldout.heldout_windows(tokenizer, 8, 4, kinds=("chat",), model=model, n_chat=3)
    finally:
        tokenizer._tokenizer.chat_template = None
    assert [d.text for d in docs] == [d.text for d in again]  # seeded: the same replies every time
    for d, p in zip(docs, heldout.chat_prompts(3)):
        assert d.text.startswith(f"user: {p}\nassistant: ")
    assert w["chat"].shape[1] == 9


def test_generate_windows_samples_side_by_side_reproducibly():
    model, _ = tiny.make_model("llama")

    class Tok:
        vocab_size = 300

    a = generate_windows(model, Tok(), 5, 12, seed=3, batch_size=2)
    b = generate_windows(model, Tok(), 5, 12, seed=3, batch_size=2)
    c = generate_windows(model, Tok(), 5, 12, seed=4, batch_size=2)
    assert a.shape == (5, 13) and (a == b).all() and not (a == c).all()
    assert a[:, 0].max() < 300 and a.min() >= 0 and a.max() < model.args.vocab_size  # starts are the tokenizer's
    greedy = generate_windows(model, Tok(), 2, 12, seed=3, temperature=0)
    for row in greedy:  # temperature 0: each next token is the model's argmax after the prefix
        logits = model(__import__("mlx.core", fromlist=["array"]).array(row[None, :-1]))
        assert (np.array(logits.argmax(-1))[0] == row[1:]).all()
