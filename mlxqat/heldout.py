"""Held-out text of several kinds, to measure a quantized model on text it was not trained on.

A model is quantized once and then used on everything, so its quality is
measured on text unlike the text it was trained or calibrated on. Every kind
here is real text every installation of mlxqat has, none of it the default
training text (the CPython standard library source, :mod:`mlxqat.stdlib_data`):

``prose``
    English prose: the long descriptions (READMEs) of the packages mlxqat and
    mlx-lm install (:data:`PROSE_DISTRIBUTIONS`), read from their metadata.
``code``
    C and C++ source: the headers numpy and mlx ship.
``docs``
    Python's documentation prose (``pydoc_data.topics``).
``chat``
    Conversations in the model's own chat template: a user turn built from a
    package README paragraph (those set aside for chat, not in ``prose``) and
    the model's own sampled reply (:func:`chat_documents`; needs the model and a
    tokenizer with a chat template).

:func:`heldout_windows` packs each kind into ``(n, seq_len + 1)`` windows,
spread over the whole text. Documents are whole files or whole package
descriptions, so no document is split between kinds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from pydoc_data.topics import topics as pydoc_topics

from .data import Document, pack, render_chat, spread, tokenize_documents

KINDS = ("prose", "code", "docs", "chat")
# Packages whose long descriptions are the prose (the product's dependencies and theirs: always installed);
# one that is missing or has no description is left out.
PROSE_DISTRIBUTIONS = ("mlx", "mlx-lm", "numpy", "tokenizers", "gguf", "tqdm", "matplotlib", "transformers",
                       "jinja2", "huggingface-hub", "regex", "safetensors", "fsspec", "pillow", "pyparsing")
# A description goes to the chat prompts when the first byte of the sha256 of its package name is below this
# (of 256), to the prose otherwise: a stable split by document that does not depend on which packages exist.
CHAT_SHARE = 80
CODE_SUFFIXES = (".h", ".hpp")
# What a chat user turn asks about its paragraph (cycled).
CHAT_ASKS = (
    "Summarize this in two sentences:",
    "Explain this to someone new to programming:",
    "What are the key points here?",
    "Rewrite this more simply:",
)
MIN_PARAGRAPH_CHARS = 200


def _description(name: str) -> Optional[str]:
    """A distribution's long description (the METADATA body), or None when missing or short."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    body = dist.read_text("METADATA") or ""
    text = body.split("\n\n", 1)[1] if "\n\n" in body else ""
    return text.strip() if len(text.strip()) >= MIN_PARAGRAPH_CHARS else None


def _for_chat(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < CHAT_SHARE


def prose_documents() -> List[Document]:
    """The package descriptions of :data:`PROSE_DISTRIBUTIONS` not set aside for chat prompts."""
    docs = []
    for name in PROSE_DISTRIBUTIONS:
        text = _description(name)
        if text is not None and not _for_chat(name):
            docs.append(Document(f"prose:{name}", text))
    return docs


def code_documents() -> List[Document]:
    """The C and C++ headers numpy and mlx ship, one document per file, in path order."""
    roots = (Path(np.__file__).parent / "_core" / "include", Path(mx.__file__).parent / "include")
    docs = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(f"code:{path.relative_to(root.parent)}", text))
    return docs


def docs_documents() -> List[Document]:
    """Python's documentation prose, one document per topic."""
    return [Document(f"docs:{k}", pydoc_topics[k]) for k in sorted(pydoc_topics)]


def chat_prompts(n: int) -> List[str]:
    """``n`` user turns: an ask (:data:`CHAT_ASKS`) and a README paragraph of the packages set aside for chat."""
    paragraphs = []
    for name in PROSE_DISTRIBUTIONS:
        text = _description(name)
        if text is None or not _for_chat(name):
            continue
        for para in text.split("\n\n"):
            para = para.strip()
            if len(para) >= MIN_PARAGRAPH_CHARS and not para.startswith(("```", "    ", "|", "<", "!")):
                paragraphs.append(para[:1200])
    if not paragraphs:
        raise ValueError("no package description is installed to build chat prompts from; "
                         f"install one of {', '.join(PROSE_DISTRIBUTIONS)}")
    picked = [paragraphs[i] for i in np.linspace(0, len(paragraphs) - 1, min(n, len(paragraphs))).round().astype(int)]
    return [f"{CHAT_ASKS[i % len(CHAT_ASKS)]}\n\n{p}" for i, p in enumerate(picked)]


def chat_documents(model, tokenizer, n: int, max_reply_tokens: int = 192, temperature: float = 0.7,
                   seed: int = 0) -> List[Document]:
    """``n`` conversations in the tokenizer's chat template: a user turn (:func:`chat_prompts`) and
    ``model``'s own reply, sampled at ``temperature`` (at most ``max_reply_tokens`` tokens).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    from mlx_lm.generate import batch_generate  # lazy: mlx_lm imports transformers (about 1 s)
    from mlx_lm.sample_utils import make_sampler  # lazy: as above

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat text needs a tokenizer with a chat template; this model has none")
    asks = [[{"role": "user", "content": p}] for p in chat_prompts(n)]
    starts = [render_chat(tokenizer, m, f"chat prompt {i}", add_generation_prompt=True) for i, m in enumerate(asks)]
    prompts = [tokenizer.encode(s, add_special_tokens=False) for s in starts]
    mx.random.seed(seed)
    replies = batch_generate(model, tokenizer, prompts, max_tokens=max_reply_tokens,
                             sampler=make_sampler(temp=temperature)).texts
    docs = []
    for i, (messages, reply) in enumerate(zip(asks, replies)):
        messages = messages + [{"role": "assistant", "content": reply.strip()}]
        docs.append(Document(f"chat:{i}", render_chat(tokenizer, messages, f"chat conversation {i}")))
    return docs


def kind_documents(kind: str, model=None, tokenizer=None, n_chat: int = 16) -> List[Document]:
    """The documents of one of :data:`KINDS` (``chat`` needs ``model`` and ``tokenizer``)."""
    if kind == "prose":
        return prose_documents()
    if kind == "code":
        return code_documents()
    if kind == "docs":
        return docs_documents()
    if kind == "chat":
        if model is None or tokenizer is None:
            raise ValueError("the chat kind needs the model and its tokenizer (the replies are the model's own)")
        return chat_documents(model, tokenizer, n_chat)
    raise ValueError(f"unknown held-out kind {kind!r}; choose from {', '.join(KINDS)}")


def heldout_windows(tokenizer, seq_len: int, n: int, kinds: Sequence[str] = ("prose", "code", "docs"),
                    model=None, n_chat: int = 16) -> Dict[str, np.ndarray]:
    """``{kind: (<= n, seq_len + 1) windows}`` spread over each kind's whole text.

    Each document's tokens are followed by the end-of-sequence token (as training data is packed);
    ``chat`` (in ``kinds``) samples ``n_chat`` replies from ``model``, and is left out, with a
    message, when the tokenizer has no chat template.
    """
    out = {}
    for kind in kinds:
        if kind == "chat" and getattr(tokenizer, "chat_template", None) is None:
            print("held-out text: no chat template, so no chat windows", flush=True)
            continue
        docs = kind_documents(kind, model, tokenizer, n_chat)
        out[kind] = spread(pack(tokenize_documents(docs, tokenizer), seq_len), n)
    return out
