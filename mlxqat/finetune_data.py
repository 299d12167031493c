"""Fine-tuning data: a directory in mlx-lm's layout, one example a row, the loss on the completion only.

    DIR/train.jsonl    one JSON object a line (required)
    DIR/valid.jsonl    the validation examples, evaluated as training runs (required)
    DIR/test.jsonl     held-out examples, measured before training and after saving (optional)

Each line is one of (as ``mlx_lm.lora`` reads them):

* ``{"text": ...}``: every token is trained on;
* ``{"prompt": ..., "completion": ...}``: the prompt's tokens (with the tokenizer's start token, as
  ``tokenizer.encode`` gives them), then the completion's, then the end-of-sequence token; the text is
  used as it is, with no chat template (mlx-lm renders such a pair as a chat when the tokenizer has a template);
* ``{"messages": [...]}``: the conversation rendered with the tokenizer's chat template; the last
  message, the assistant's, is the completion.

A plain text file (``.txt``, ``.md``, ``.py``) or a folder of them (and no ``train.jsonl``) also works: its
documents are split into training and validation by a hash of their names and cut into windows of
``text_window`` tokens, every token trained on (:func:`mlxqat.data.build_dataset`, what ``python -m
mlxqat.train --data`` reads).

With ``mask_prompt`` (the default) only the completion's tokens count in the loss; otherwise every
token does (mlx-lm's ``--mask-prompt`` is off by default; here it is on, ``--no-mask-prompt`` turns it
off). An example is one row, padded to the longest example (never packed with others, as mlx-lm
does); rows are the masked windows ``(n, 2, seq_len + 1)`` of :func:`mlxqat.training.loop.train`: token
ids, and 1 where the next-token target counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .data import TEXT_SUFFIXES, build_dataset, parse_jsonl_line, render_chat

SPLITS = ("train", "valid", "test")
REQUIRED = ("train", "valid")


@dataclass
class FinetuneData:
    """The examples of each split as masked windows ``(n, 2, seq_len + 1)`` int32, all of one width."""

    train: np.ndarray
    valid: np.ndarray
    test: Optional[np.ndarray]  # None: no test.jsonl
    formats: dict  # split -> the line formats it holds, e.g. {"train": ["messages"]}

    @property
    def seq_len(self) -> int:
        """Tokens per row less one: the longest example's length, padded to."""
        return self.train.shape[-1] - 1


def _no_completion(where: str, why: str) -> ValueError:
    return ValueError(f"{where}: {why}, so there is nothing to train on; give every line a completion "
                      "(or pass --no-mask-prompt to train on whole lines)")


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=special)) if text else []


def _chat_example(obj: dict, tokenizer, where: str, mask_prompt: bool) -> Tuple[List[int], int]:
    messages = obj["messages"]
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where} holds chat 'messages' but the tokenizer has no chat template; use a model whose "
                         "tokenizer_config.json has 'chat_template', or write the lines as prompt/completion pairs")
    whole = render_chat(tokenizer, messages, where)
    last = messages[-1]
    if not mask_prompt:
        return _encode(tokenizer, whole, False), 0
    if last.get("role") != "assistant":
        raise _no_completion(where, f"the last message is from {last.get('role')!r}, not the assistant")
    if not isinstance(last.get("content"), str) or not last["content"].strip():
        raise _no_completion(where, "the assistant's last message is empty")
    prompt = render_chat(tokenizer, messages[:-1], where, add_generation_prompt=True) if len(messages) > 1 else ""
    if not whole.startswith(prompt):
        raise ValueError(f"{where}: the chat template does not render the conversation before the last message as "
                         "the start of the whole one, so the completion's tokens cannot be told apart; write the "
                         "lines as prompt/completion pairs, or pass --no-mask-prompt")
    prompt_ids = _encode(tokenizer, prompt, False)
    return prompt_ids + _encode(tokenizer, whole[len(prompt):], False), len(prompt_ids)


def encode_example(obj: dict, tokenizer, where: str, mask_prompt: bool = True) -> Tuple[List[int], int]:
    """``(token ids, offset)`` of one JSONL object: the loss counts the tokens from ``offset`` on.

    Raises:
        ValueError: naming ``where`` (``file:line``): an unknown format, a value that is not text, or
            (with ``mask_prompt``) no completion to train on.
    """
    eos = tokenizer.eos_token_id
    if "messages" in obj:
        return _chat_example(obj, tokenizer, where, mask_prompt)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings "
                             f"(got {type(prompt).__name__} and {type(completion).__name__})")
        if not completion.strip() and mask_prompt:
            raise _no_completion(where, "the completion is empty")
        ids = _encode(tokenizer, prompt, True)
        offset = len(ids) if mask_prompt else 0
        return ids + _encode(tokenizer, completion, False) + ([eos] if eos is not None else []), offset
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, not {type(obj['text']).__name__}")
        ids = _encode(tokenizer, obj["text"], True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, 0
    raise ValueError(f"{where} has keys {sorted(obj)}; expected 'text', 'prompt' and 'completion', or 'messages'")


def _read_split(path: Path, tokenizer, seq_len: int, mask_prompt: bool):
    """``([(ids, offset)], formats)`` of one JSONL file."""
    examples, formats = [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            obj = parse_jsonl_line(raw, where)
            if obj is None:
                continue
            ids, offset = encode_example(obj, tokenizer, where, mask_prompt)
            if len(ids) > seq_len:
                raise ValueError(f"{where} is {len(ids)} tokens long, more than --seq-len {seq_len}; raise --seq-len "
                                 f"to {len(ids)} or more, or shorten the line")
            if len(ids) < 2 or offset >= len(ids):
                raise _no_completion(where, "no token follows the prompt")
            examples.append((ids, offset))
            formats.add(next(k for k in ("messages", "prompt", "text") if k in obj))
    if not examples:
        raise ValueError(f"{path} is empty: no examples (one JSON object a line, e.g. "
                         "{\"prompt\": \"...\", \"completion\": \"...\"})")
    return examples, sorted(formats)


def masked_rows(examples, width: int, pad: int) -> np.ndarray:
    """Masked windows ``(n, 2, width)`` of ``(ids, offset)`` examples: ids padded with ``pad``; the mask is 1
    at each position whose token is one of the example's from ``offset`` on (the targets the loss counts)."""
    rows = np.zeros((len(examples), 2, width), dtype=np.int32)
    rows[:, 0] = pad
    for i, (ids, offset) in enumerate(examples):
        rows[i, 0, : len(ids)] = ids
        rows[i, 1, max(offset, 1) : len(ids)] = 1
    return rows


def text_rows(path, tokenizer, window: int) -> FinetuneData:
    """Plain text (a file, or a folder without ``train.jsonl``) as fine-tuning rows: documents split by name into
    training and validation (:func:`mlxqat.data.build_dataset`), windows of ``window`` tokens, all counted."""
    ds = build_dataset(path, tokenizer, window)
    rows = {}
    for split, windows in (("train", ds.train), ("valid", ds.val)):
        r = np.zeros((len(windows), 2, windows.shape[1]), dtype=np.int32)
        r[:, 0], r[:, 1, 1:] = windows, 1
        rows[split] = r
    return FinetuneData(rows["train"], rows["valid"], None, {"train": ["plain text"], "valid": ["plain text"]})


def _is_text(path: Path) -> bool:
    if path.is_dir():
        return not any(os.path.isfile(path / f"{s}.jsonl") for s in SPLITS)
    return path.suffix in TEXT_SUFFIXES


def load_finetune_data(directory, tokenizer, seq_len: int, *, mask_prompt: bool = True,
                       text_window: Optional[int] = None) -> FinetuneData:
    """Read ``train.jsonl``, ``valid.jsonl`` and (if there) ``test.jsonl`` from ``directory``, or plain text.

    Args:
        directory: the data directory (mlx-lm's layout), or a text file or folder of text files (:func:`text_rows`).
        tokenizer: the model's tokenizer.
        seq_len: the longest example accepted, in tokens.
        mask_prompt: count only the completions' tokens in the loss.
        text_window: the window length of plain text, in tokens (default ``seq_len``).

    Returns:
        :class:`FinetuneData`, every split padded to the longest example of any.

    Raises:
        FileNotFoundError: no such directory, or no ``train.jsonl`` / ``valid.jsonl`` in it.
        ValueError: an empty file, a malformed line, a line with no completion, or one longer than ``seq_len``;
            the message names the file and line.
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"data directory {directory} does not exist")
    if _is_text(directory):
        return text_rows(directory, tokenizer, text_window or seq_len)
    if not directory.is_dir():
        raise ValueError(f"--data {directory} is a file; give a directory holding train.jsonl and valid.jsonl "
                         f"(and optionally test.jsonl), mlx-lm's layout, or plain text ({', '.join(TEXT_SUFFIXES)} "
                         "files or a folder of them)")
    for split in REQUIRED:
        if not os.path.isfile(directory / f"{split}.jsonl"):
            raise FileNotFoundError(f"{directory} has no {split}.jsonl; a fine-tuning data directory holds train.jsonl "
                                    "and valid.jsonl (and optionally test.jsonl), one JSON object a line, as mlx-lm's")
    read = {split: _read_split(directory / f"{split}.jsonl", tokenizer, seq_len, mask_prompt)
            for split in SPLITS if split in REQUIRED or os.path.isfile(directory / f"{split}.jsonl")}
    width = max(len(ids) for examples, _ in read.values() for ids, _ in examples)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows = {split: masked_rows(examples, width, pad) for split, (examples, _) in read.items()}
    return FinetuneData(rows["train"], rows["valid"], rows.get("test"), {s: f for s, (_, f) in read.items()})
