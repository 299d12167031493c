"""Tiny mlx-lm models and a byte-level BPE tokenizer for tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import gemma3_text, llama, qwen3

VOCAB = 512

CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        rope_theta=10000.0,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        query_pre_attn_scalar=16,
        sliding_window=32,
        sliding_window_pattern=2,
        max_position_embeddings=512,
    ),
}

_MODULES = {"llama": llama, "qwen3": qwen3, "gemma3_text": gemma3_text}
ARCHS = tuple(CONFIGS)


def make_model(arch: str = "llama", seed: int = 0, scale: float = 1.0):
    """A tiny random model of ``arch``; returns ``(model, config)``.

    Weights are drawn with a larger spread than the default init so that logits
    vary enough for quantization to change them.
    """
    mod = _MODULES[arch]
    config = dict(CONFIGS[arch])
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    if scale != 1.0:
        from mlx.utils import tree_map

        model.update(tree_map(lambda p: p * scale if p.ndim == 2 else p, model.parameters()))
    mx.eval(model.parameters())
    return model, config


CORPUS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
    "The quick brown fox jumps over the lazy dog. import os, sys, json\n"
) * 4


def make_tokenizer(directory: Path, vocab_size: int = 300):
    """Train a small byte-level BPE on ``CORPUS`` and save it as a HF tokenizer in ``directory``.

    Returns the mlx-lm TokenizerWrapper loaded from there.
    """
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None)
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


def save_fp_model(model, config: dict, tokenizer, directory: Path) -> Path:
    """Write a full-precision mlx-lm directory (as a user's downloaded model)."""
    from mlx.utils import tree_flatten

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(str(directory))
    return directory


def greedy(model, prompt: mx.array, n: int = 32) -> list:
    """Greedy continuation of ``prompt`` (1-D ids) for ``n`` tokens, full recompute each step."""
    ids = prompt.tolist()
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        ids.append(int(mx.argmax(logits).item()))
    return ids[len(prompt.tolist()):]


def train_briefly(arch: str, tokenizer, steps: int = 150, seed: int = 0, **overrides):
    """A tiny ``arch`` model trained for ``steps`` Adam steps on ``CORPUS``; returns ``(model, config)``.

    Its vocabulary is the tokenizer's, and its predictions are peaked enough
    that greedy decoding is not decided by near-ties (random weights give
    nearly flat logits). ``overrides`` change config entries.
    """
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    mod = _MODULES[arch]
    config = dict(CONFIGS[arch], vocab_size=len(tokenizer._tokenizer), **overrides)
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(config))
    data = mx.array(tokenizer.encode(CORPUS))
    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    rng = np.random.default_rng(seed)
    length, batch = 48, 8
    for _ in range(steps):
        starts = rng.integers(0, data.size - length - 1, batch).tolist()
        x = mx.stack([data[s : s + length] for s in starts])
        y = mx.stack([data[s + 1 : s + length + 1] for s in starts])
        _, grads = step(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return model, config
