"""Training data: text files, folders and JSONL, packed into fixed-length token windows.

Accepted inputs:

* a ``.txt`` / ``.py`` / ``.md`` file, or a folder of them (searched recursively);
* ``.jsonl`` with one object per line: ``{"text": ...}``,
  ``{"prompt": ..., "completion": ...}`` or chat ``{"messages": [...]}``
  (rendered with the tokenizer's chat template).

Documents are split into train/validation by a hash of their name (file path
or JSONL line number), so the split does not depend on file order or on the
machine. Each document is tokenized, followed by the end-of-sequence token,
and the token stream is cut into windows of ``seq_len + 1`` tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

TEXT_SUFFIXES = (".txt", ".py", ".md")


@dataclass
class Document:
    name: str  # stable identity used for the train/validation split
    text: str


def _split_of(name: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return "val" if (h / 2**64) < val_fraction else "train"


def _jsonl_documents(path: Path, tokenizer) -> List[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e})") from e
            name = f"{path.name}:{lineno}"
            if "text" in obj:
                text = obj["text"]
            elif "prompt" in obj and "completion" in obj:
                text = obj["prompt"] + obj["completion"]
            elif "messages" in obj:
                if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
                    raise ValueError(
                        f"{path}:{lineno} holds chat 'messages' but the tokenizer has no chat "
                        "template; use a model whose tokenizer_config.json has 'chat_template', "
                        "or convert the file to {\"text\": ...} lines"
                    )
                text = tokenizer.apply_chat_template(obj["messages"], tokenize=False)
            else:
                raise ValueError(
                    f"{path}:{lineno} has keys {sorted(obj)}; expected 'text', "
                    "'prompt'+'completion' or 'messages'"
                )
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: the text is {type(text).__name__}, not a string")
            docs.append(Document(name, text))
    return docs


def load_documents(path, tokenizer=None) -> List[Document]:
    """Read documents from a text file, a folder or a JSONL file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no usable text (empty files, unknown suffixes, bad JSONL).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
        docs = []
        for p in files:
            if p.suffix == ".jsonl":
                docs += _jsonl_documents(p, tokenizer)
            else:
                docs.append(Document(p.relative_to(path).as_posix(), p.read_text(encoding="utf-8", errors="replace")))
    elif path.suffix == ".jsonl":
        docs = _jsonl_documents(path, tokenizer)
    elif path.suffix in TEXT_SUFFIXES:
        docs = [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    else:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use a folder or a "
            f"{', '.join(TEXT_SUFFIXES + ('.jsonl',))} file"
        )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text to train on (no non-empty {TEXT_SUFFIXES} or .jsonl documents)")
    return docs


def tokenize_documents(docs: Sequence[Document], tokenizer) -> np.ndarray:
    """One token stream: each document's tokens followed by the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    out = []
    for d in docs:
        out.extend(tokenizer.encode(d.text, add_special_tokens=False))
        if eos is not None:
            out.append(eos)
    return np.asarray(out, dtype=np.int32)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into (n, seq_len + 1) windows (inputs + shifted targets)."""
    n = (len(tokens) - 1) // seq_len
    if n <= 0:
        raise ValueError(
            f"only {len(tokens)} tokens of data; need more than seq_len={seq_len} "
            "(add data or lower --seq-len)"
        )
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@dataclass
class Dataset:
    """Packed windows for training and validation."""

    train: np.ndarray  # (n_train, seq_len + 1) int32
    val: np.ndarray  # (n_val, seq_len + 1) int32

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def build_dataset(
    path,
    tokenizer,
    seq_len: int,
    val_fraction: float = 0.05,
    max_context: Optional[int] = None,
    max_train_windows: Optional[int] = None,
    max_val_windows: Optional[int] = None,
) -> Dataset:
    """Load, split, tokenize and pack ``path``.

    Raises:
        ValueError: ``seq_len`` beyond the model's context, or too little data.
    """
    check_seq_len(seq_len, max_context)
    docs = load_documents(path, tokenizer)
    train_docs = [d for d in docs if _split_of(d.name, val_fraction) == "train"]
    val_docs = [d for d in docs if _split_of(d.name, val_fraction) == "val"]
    if not val_docs or not train_docs:
        # too few documents to split by name: split the token stream instead
        tokens = tokenize_documents(docs, tokenizer)
        cut = max(seq_len + 1, int(len(tokens) * (1 - val_fraction)))
        train_tok, val_tok = tokens[:cut], tokens[cut - 1 :]
        if len(val_tok) <= seq_len:
            val_tok = train_tok[-(seq_len + 1) :]
    else:
        train_tok = tokenize_documents(train_docs, tokenizer)
        val_tok = tokenize_documents(val_docs, tokenizer)
    train = pack(train_tok, seq_len)
    val = pack(val_tok, seq_len) if len(val_tok) > seq_len else train[-1:]
    if max_train_windows:
        train = train[:max_train_windows]
    if max_val_windows:
        val = val[:max_val_windows]
    return Dataset(train, val)


def check_seq_len(seq_len: int, max_context: Optional[int]) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 2 tokens")
    if max_context is not None and seq_len > max_context:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {max_context} "
            f"tokens; use --seq-len {max_context} or less"
        )


def model_context(model) -> Optional[int]:
    """The longest sequence the model was built for, when its config says."""
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "max_seq_len", "n_ctx"):
        v = getattr(args, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def batch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    windows: np.ndarray, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[Tuple[int, mx.array]]:
    """Endless ``(step, batch)`` pairs; batch ``step`` depends only on (seed, step).

    Resuming from a checkpoint at ``start_step`` yields exactly the batches an
    uninterrupted run would have seen.
    """
    n = len(windows)
    if n < batch_size:
        raise ValueError(
            f"{n} training windows are fewer than batch_size={batch_size}; add data, "
            "or lower --batch-size or --seq-len"
        )
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        order = batch_order(n, seed, epoch)
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield step, mx.array(windows[np.sort(idx)])
        step += 1


def generate_windows(teacher, tokenizer, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """Self-generated data: ``n`` windows sampled from the teacher itself.

    Each sequence starts from a random vocabulary token and is sampled at
    ``temperature`` (the data-free recipe of LLM-QAT), so no user data is needed.
    """
    from mlx_lm.models.cache import make_prompt_cache

    vocab = int(teacher.args.vocab_size) if hasattr(teacher, "args") else tokenizer.vocab_size
    rng = np.random.default_rng(seed)
    key = mx.random.key(seed)
    out = np.zeros((n, seq_len + 1), dtype=np.int32)
    for row in range(n):
        tok = int(rng.integers(0, min(vocab, tokenizer.vocab_size)))
        cache = make_prompt_cache(teacher)
        seq = [tok]
        y = mx.array([[tok]])
        for _ in range(seq_len):
            logits = teacher(y, cache=cache)[:, -1, :]
            key, sub = mx.random.split(key)
            if temperature == 0:
                nxt = mx.argmax(logits, axis=-1)
            else:
                nxt = mx.random.categorical(logits / temperature, key=sub)
            tok = int(nxt.item())
            seq.append(tok)
            y = mx.array([[tok]])
        out[row] = seq
    return out
