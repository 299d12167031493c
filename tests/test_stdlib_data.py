"""The stdlib corpus splits, the reference tokenizer, and the shipped reference model."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxqat import stdlib_data
from mlxqat.stdlib_data import SPLITS, embedded_model_path, read_split_text, split_of, stdlib_files

MODEL_DIR = embedded_model_path()


@pytest.fixture(scope="module")
def files_by_split():
    return {s: stdlib_files(s) for s in SPLITS}


@pytest.fixture(scope="module")
def shipped():
    from mlx_lm import load

    model, tokenizer = load(str(MODEL_DIR))
    model.set_dtype(mx.float32)  # CPU compute stays float32, as in training.json's figures
    return model, tokenizer


@pytest.fixture(scope="module")
def training():
    return json.loads((MODEL_DIR / "training.json").read_text())


# ---------------------------------------------------------------------------
# Corpus and splits
# ---------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_every_file(files_by_split):
    everything = stdlib_files()
    assert len(everything) > 300
    seen = [p for s in SPLITS for p in files_by_split[s]]
    assert len(seen) == len(set(seen)), "a file is in two splits"
    assert set(seen) == set(everything)
    for s in SPLITS:
        assert files_by_split[s], f"split {s} is empty"


def test_split_is_deterministic_and_ordered(files_by_split):
    root = stdlib_data.stdlib_root()
    for s in SPLITS:
        again = stdlib_files(s)
        assert again == files_by_split[s]
        rel = [p.relative_to(root).as_posix() for p in again]
        assert rel == sorted(rel)
        assert all(split_of(r) == s for r in rel)


def test_split_rule_is_pinned():
    # The shipped model was trained on "train" only: if this rule changes, its
    # validation and test figures silently include training files.
    assert split_of("os.py") == "validation"
    assert split_of("tarfile.py") == "validation"
    assert split_of("argparse.py") == "train"
    assert split_of("email/parser.py") == "train"


def test_split_proportions(files_by_split):
    n = sum(len(v) for v in files_by_split.values())
    share = {s: len(files_by_split[s]) / n for s in SPLITS}
    assert 0.85 < share["train"] < 0.95, share
    assert 0.02 < share["validation"] < 0.09, share
    assert 0.02 < share["test"] < 0.09, share


def test_excluded_directories_are_absent():
    root = stdlib_data.stdlib_root()
    for p in stdlib_files():
        parts = p.relative_to(root).parts
        assert not set(parts[:-1]) & {"test", "tests", "idlelib", "site-packages", "__pycache__"}, p
        assert p.suffix == ".py"


def test_read_split_text():
    files = stdlib_files("validation")
    whole = read_split_text("validation")
    assert whole.count(stdlib_data.EOS_TOKEN) == len(files)
    assert whole.startswith(stdlib_data.read_source(files[0]) + stdlib_data.EOS_TOKEN)
    assert read_split_text("validation", max_chars=5000) == whole[:5000]
    assert read_split_text("test", separator="#--\n").count("#--\n") == len(stdlib_files("test"))


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match="validation"):
        stdlib_files("val")
    with pytest.raises(ValueError, match="max_chars"):
        read_split_text("train", max_chars=0)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


SNIPPETS = [
    "def f(x):\n    return x  # trailing spaces   \n",
    "\tif a:\r\n\t\tpass\r\n\n\n   \n",
    "  leading spaces and  double  spaces ",
    "naïve café — 日本語 ∑ 🐍 \u00a0 \u200b zero-width",
    's = "\\x00\\n" + r\'\\d+\' + f"{x!r:>10}"',
    "",
]


def test_tokenizer_round_trips_text(shipped):
    _, tokenizer = shipped
    # Real stdlib source, unicode and odd whitespace all come back verbatim.
    source = [stdlib_data.read_source(p)[:3000] for p in stdlib_files("test")[:5]]
    for text in SNIPPETS + source:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, repr(text[:80])


def test_tokenizer_is_gpt2_style_byte_level(shipped):
    _, tokenizer = shipped
    spec = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE"
    assert tokenizer.eos_token == stdlib_data.EOS_TOKEN
    assert tokenizer.encode(stdlib_data.EOS_TOKEN) == [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------


def test_shipped_model_files(training):
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for dim in (config["hidden_size"], config["intermediate_size"], head_dim):
        assert dim % 64 == 0, config
    weights = mx.load(str(MODEL_DIR / "model.safetensors"))
    assert all(w.dtype == mx.float16 for w in weights.values())
    assert sum(w.size for w in weights.values()) == training["parameters"]
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 12e6, f"{total / 1e6:.1f} MB"


def test_shipped_model_perplexity_matches_training_json(shipped, training):
    model, tokenizer = shipped
    ref = training["metrics"]["validation_slice"]
    seq_len, n_tokens = ref["seq_len"], ref["tokens"]
    # The training stream is every file's tokens followed by the end-of-text id,
    # which is what encoding the joined text gives (the separator is a special token).
    ids = tokenizer.encode(read_split_text("validation", max_chars=8 * n_tokens))
    tokens = np.asarray(ids[: n_tokens + 1], dtype=np.int32)
    assert tokens.size == n_tokens + 1
    windows = n_tokens // seq_len
    idx = np.arange(windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    batch = mx.array(tokens[idx])  # (windows, seq_len + 1)
    nll = 0.0
    for i in range(0, windows, 16):
        logits = model(batch[i : i + 16, :-1])
        nll += nn.losses.cross_entropy(logits, batch[i : i + 16, 1:], reduction="sum").item()
    ppl = math.exp(nll / (windows * seq_len))
    assert ppl == pytest.approx(ref["ppl"], rel=0.10)
    assert ppl < 200, "the shipped model has not learned the corpus"


def test_windows_are_spread_over_the_split(shipped):
    from mlxqat.data import pack, spread, stdlib_windows, tokenize_documents, Document

    w = np.arange(10 * 3).reshape(10, 3)
    assert np.array_equal(spread(w, 4), w[[0, 3, 6, 9]]) and spread(w, 20) is w
    tok = shipped[1]
    first = pack(tokenize_documents([Document("train", read_split_text("train", max_chars=4 * 16 * 64 * 4))], tok), 64)
    got = stdlib_windows(tok, "train", 64, 16, oversample=4)
    assert got.shape == (16, 65)
    # every 4th window of a 4x longer stretch: the last window lies far past the first 16 windows
    assert np.array_equal(got[0], first[0]) and np.array_equal(got[-1], first[-1]) and len(first) >= 60
