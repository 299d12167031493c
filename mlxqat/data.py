"""Training data: text files, folders and JSONL, packed into fixed-length token windows.

Accepted inputs:

* a ``.txt`` / ``.py`` / ``.md`` file, or a folder of them (searched recursively);
* ``.jsonl`` with one object per line: ``{"text": ...}``,
  ``{"prompt": ..., "completion": ...}`` or chat ``{"messages": [...]}``
  (rendered with the tokenizer's chat template, under a time limit per document).

Documents are split into train/validation by a hash of their name (file path
or JSONL line number), so the split does not depend on file order or on the
machine. Each document is tokenized, followed by the end-of-sequence token,
and the token stream is cut into windows of ``seq_len + 1`` tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .stdlib_data import read_split_text

TEXT_SUFFIXES = (".txt", ".py", ".md")
MIN_SEQ_LEN = 2  # the shortest seq_len (tokens per window) accepted


@dataclass
class Document:
    name: str  # stable identity used for the train/validation split
    text: str


def _split_of(name: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return "val" if (h / 2**64) < val_fraction else "train"


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file.

    Raises:
        ValueError: naming the file, when it holds NUL bytes or is not UTF-8
            (a binary file, such as a PNG renamed ``.txt``, is not training text).
    """
    data = Path(path).read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"{path} is a binary file, not text (a NUL byte at offset {nul}); remove it from the "
            "data or convert it to UTF-8 text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); "
            "convert it to UTF-8 or remove it from the data"
        ) from None


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def parse_jsonl_line(raw: bytes, where: str) -> Optional[dict]:
    """One JSONL line as a dict (``None`` for a blank line); ValueError naming ``where`` otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte {raw[e.start:e.start + 1]!r}); convert the file to UTF-8") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where} is {_JSON_KINDS.get(type(obj), type(obj).__name__)}, not a JSON object; each line "
            "must be an object such as {\"text\": \"...\"}"
        )
    return obj


def _document_text(obj: dict, tokenizer, where: str) -> str:
    """The training text of one JSONL object: ``text``, ``prompt + completion`` or rendered ``messages``."""
    if "text" in obj:
        text = obj["text"]
    elif "prompt" in obj and "completion" in obj:
        if not (isinstance(obj["prompt"], str) and isinstance(obj["completion"], str)):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings")
        text = obj["prompt"] + obj["completion"]
    elif "messages" in obj:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{where} holds chat 'messages' but the tokenizer has no chat "
                "template; use a model whose tokenizer_config.json has 'chat_template', "
                "or convert the file to {\"text\": ...} lines"
            )
        text = render_chat(tokenizer, obj["messages"], where)
    else:
        raise ValueError(
            f"{where} has keys {sorted(obj)}; expected 'text', "
            "'prompt'+'completion' or 'messages'"
        )
    if not isinstance(text, str):
        raise ValueError(f"{where}: the text is {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: Path, tokenizer) -> List[Document]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            obj = parse_jsonl_line(raw, where)
            if obj is not None:
                docs.append(Document(f"{path.name}:{lineno}", _document_text(obj, tokenizer, where)))
    return docs


# ---------------------------------------------------------------------------
# Chat templates: untrusted code, run with a time limit
# ---------------------------------------------------------------------------

TEMPLATE_TIME_LIMIT_S = 10.0  # per document


class _TemplateTimeout(BaseException):
    """Raised by the alarm inside a template; a BaseException so no ``except Exception`` swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt the body after ``seconds`` (SIGALRM: the main thread on POSIX; elsewhere no limit).

    An alarm set by someone else is put back, less the time spent here.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _TemplateTimeout()

    t0 = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


def _template_errors() -> tuple:
    errors: tuple = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                     RecursionError, MemoryError)
    try:
        from jinja2.exceptions import TemplateError  # includes the sandbox's SecurityError
    except ImportError:
        return errors
    return errors + (TemplateError,)


def render_chat(tokenizer, messages, where: str, add_generation_prompt: bool = False) -> str:
    """``messages`` rendered with the tokenizer's chat template, within :data:`TEMPLATE_TIME_LIMIT_S`
    (``add_generation_prompt``: followed by the start of the assistant's turn).

    Raises:
        ValueError: naming ``where`` (``file:line``): malformed messages, a template
            error (including the jinja2 sandbox refusing unsafe code), or a template
            that ran past the time limit.
    """
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of objects such as "
            "{\"role\": \"user\", \"content\": \"...\"}"
        )
    try:
        with _time_limit(TEMPLATE_TIME_LIMIT_S):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _TemplateTimeout:
        raise ValueError(
            f"{where}: the tokenizer's chat template ran longer than {TEMPLATE_TIME_LIMIT_S:g} s on this "
            "document and was stopped; check 'chat_template' in tokenizer_config.json, or convert the "
            "file to {\"text\": ...} lines"
        ) from None
    except _template_errors() as e:
        raise ValueError(
            f"{where}: the tokenizer's chat template failed on this document ({type(e).__name__}: {e}); "
            "fix the line, or 'chat_template' in tokenizer_config.json"
        ) from e


def load_documents(path, tokenizer=None) -> List[Document]:
    """Read documents from a text file, a folder or a JSONL file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no usable text (empty files, unknown suffixes, bad JSONL), a binary
            or non-UTF-8 file, or a chat template that fails or runs too long; the
            message names the file (and line).
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
                docs.append(Document(p.relative_to(path).as_posix(), read_text_file(p)))
    elif path.suffix == ".jsonl":
        docs = _jsonl_documents(path, tokenizer)
    elif path.suffix in TEXT_SUFFIXES:
        docs = [Document(path.name, read_text_file(path))]
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


def spread(windows: np.ndarray, n: int) -> np.ndarray:
    """``n`` windows evenly spaced over ``windows`` (all of them if there are fewer)."""
    if len(windows) <= n:
        return windows
    return windows[np.linspace(0, len(windows) - 1, n).round().astype(int)]


def split_selection(windows: np.ndarray, n_select: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(evaluation, selection)`` windows: ``n_select`` of them, spread evenly, set aside to pick the best
    step on (``selection`` is ``None`` when there are too few windows to spare them)."""
    if n_select <= 0 or len(windows) < 2 * n_select:
        return windows, None
    chosen = np.zeros(len(windows), dtype=bool)
    chosen[np.linspace(0, len(windows) - 1, n_select).astype(int)] = True
    return windows[~chosen], windows[chosen]


def stdlib_windows(tokenizer, split: str, seq_len: int, n: int, oversample: Optional[int] = None) -> np.ndarray:
    """``n`` windows of a standard-library split (:mod:`mlxqat.stdlib_data`), spread over it.

    With ``oversample`` only the first ``oversample * n`` windows' worth of text is read
    (the training split is large); every k-th is kept either way, so the windows come from
    many files, not the first few.
    """

    chars = max(n * oversample, 64) * seq_len * 4 if oversample else None  # ~4 characters per token
    text = read_split_text(split, max_chars=chars)
    return spread(pack(tokenize_documents([Document(split, text)], tokenizer), seq_len), n)


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
    """Refuse windows shorter than :data:`MIN_SEQ_LEN` or longer than the model's context."""
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len={seq_len} is too short; use at least {MIN_SEQ_LEN} tokens")
    if max_context is not None and seq_len > max_context:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {max_context} "
            f"tokens; use --seq-len {max_context} or less"
        )


CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_ctx")  # config entries that name the context


def config_context(config) -> Optional[int]:
    """The longest sequence a model was built for, from its config: a ``config.json`` dict or an mlx-lm
    ``ModelArgs``; ``None`` when it does not say."""
    for key in CONTEXT_KEYS:
        v = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def model_context(model) -> Optional[int]:
    """The longest sequence the model was built for, when its config says (:func:`config_context`)."""
    return config_context(getattr(model, "args", None))


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


def generate_windows(teacher, tokenizer, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                     batch_size: int = 16) -> np.ndarray:
    """Self-generated data: ``n`` windows sampled from the teacher itself.

    Each sequence starts from a random vocabulary token and is sampled at
    ``temperature`` (the data-free recipe of LLM-QAT), so no user data is needed;
    ``batch_size`` sequences are sampled side by side.
    """
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.models.cache import make_prompt_cache

    vocab = int(teacher.args.vocab_size) if hasattr(teacher, "args") else tokenizer.vocab_size
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, min(vocab, tokenizer.vocab_size), size=n)
    key = mx.random.key(seed)
    out = np.zeros((n, seq_len + 1), dtype=np.int32)
    for row in range(0, n, batch_size):
        y = mx.array(starts[row : row + batch_size, None].astype(np.int32))
        cache = make_prompt_cache(teacher)
        seq = [y]
        for _ in range(seq_len):
            logits = teacher(y, cache=cache)[:, -1, :]
            key, sub = mx.random.split(key)
            if temperature == 0:
                y = mx.argmax(logits, axis=-1, keepdims=True)
            else:
                y = mx.random.categorical(logits / temperature, key=sub)[:, None]
            seq.append(y)
            mx.eval(y)
        out[row : row + batch_size] = np.array(mx.concatenate(seq, axis=1))
    return out
