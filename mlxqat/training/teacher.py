"""The teacher: the frozen full-precision model's logits, as distillation and evaluation read them.

Two forms, one module:

* :class:`TeacherTargets` gives the trainer its targets per micro-batch: the
  live logits (or, for a loss that computes logits a chunk of tokens at a time,
  the teacher's final hidden states: :class:`TeacherHidden`), or only the
  ``top_k`` largest (values and token ids), kept in memory or on disk so later
  epochs, resumed runs and re-runs skip the teacher.
* :class:`CachedTeacher` is called like the model (``teacher(inputs)`` ->
  logits) and keeps the full logits of every window it has seen, keyed by the
  window's tokens: methods compared on the same windows (training, step
  selection, evaluation) run the teacher once per window.

:func:`top_k_logits` is the one rule for which logits a top-k cache keeps.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..head import HeadSplit, chunk_rows, logits_by_chunks, split_head
from ..storage.destinations import atomic_file


def top_k_logits(logits: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """The ``k`` largest logits of each position and their token ids (int32), in no particular order.

    Returns:
        ``(values, ids)``, each of shape ``logits.shape[:-1] + (k,)``.

    Raises:
        ValueError: ``k`` is not between 1 and the vocabulary size.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k={k} must be between 1 and the vocabulary size {vocab}")
    ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(logits, ids, axis=-1), ids.astype(mx.int32)


class TeacherHidden:
    """The teacher's final hidden states for a micro-batch, and its head: its logits, a chunk at a time.

    ``split.head(params, hidden[rows])`` (``params = split.head_params()``) are the
    teacher's logits of those rows; :meth:`logits` gives all of them at once.
    """

    def __init__(self, hidden: mx.array, split: HeadSplit):
        self.hidden, self.split = hidden, split

    def logits(self) -> mx.array:
        return mx.stop_gradient(self.split.head(self.split.head_params(), self.hidden))


class TeacherTargets:
    """The teacher's logits for a micro-batch: computed live, or top-k cached.

    ``targets(key, inputs)`` returns the teacher's logits ``(B, T, V)`` for
    ``inputs`` (``top_k=0``), or ``(values, ids)`` of its ``top_k`` largest
    logits (:func:`top_k_logits`). With ``top_k`` the teacher runs once per
    ``key``; the result is kept under ``cache_dir`` when given
    (``<key>.safetensors``, written atomically; read back when asked again), or
    else in memory; with every key a run needs cached (:func:`mlxqat.training.loop.prefill_teacher_targets`)
    the teacher may be ``None``.

    Memory: when the teacher splits into body and head (:func:`mlxqat.head.split_head`)
    the top-k are found ``chunk`` tokens at a time (``None``: automatic, :func:`mlxqat.head.chunk_rows`;
    ``0``: all at once), and with ``hidden=True`` live targets are :class:`TeacherHidden`
    rather than full logits, for a loss that computes them a chunk at a time.
    """

    def __init__(self, teacher, top_k: int = 0, cache_dir: Optional[Path] = None, *, chunk: Optional[int] = None,
                 hidden: bool = False):
        self.teacher, self.top_k, self.cache_dir, self.chunk = teacher, top_k, cache_dir, chunk
        self.split = split_head(teacher) if teacher is not None and chunk != 0 and (top_k or hidden) else None
        self.hidden = hidden and self.split is not None
        self._mem: Dict[str, tuple] = {}

    def _path(self, key: str) -> Optional[Path]:
        return Path(self.cache_dir) / f"{key}.safetensors" if self.cache_dir else None

    def cached(self, key: str) -> bool:
        """Whether the top-k targets of ``key`` are kept (in memory or on disk)."""
        path = self._path(key)
        return key in self._mem or (path is not None and path.exists())

    def __call__(self, key: str, inputs: mx.array):
        if not self.top_k:
            if self.teacher is None:
                raise ValueError("live teacher targets (top_k=0) need a teacher; none was given")
            if self.hidden:
                return TeacherHidden(mx.stop_gradient(self.split.body(inputs)), self.split)
            return mx.stop_gradient(self.teacher(inputs))
        if key in self._mem:
            return self._mem[key]
        path = self._path(key)
        if path is not None and path.exists():
            d = mx.load(str(path))
            return d["values"], d["ids"]
        if self.teacher is None:
            raise ValueError(f"the top-k targets of {key!r} are not cached ({path or 'no cache directory'}) "
                             "and there is no teacher to compute them")
        vals, ids = self._top_k(inputs)
        if path is None:
            self._mem[key] = (vals, ids)
        else:
            with atomic_file(path, check=False) as f:  # inside the job's work directory
                mx.save_safetensors(f, {"values": vals, "ids": ids})
        return vals, ids

    def _top_k(self, inputs: mx.array) -> Tuple[mx.array, mx.array]:
        """The teacher's top-k of ``inputs`` ``(B, T)``, evaluated; a chunk of tokens at a time when it splits."""
        if self.split is None:
            vals, ids = top_k_logits(mx.stop_gradient(self.teacher(inputs)), self.top_k)
            mx.eval(vals, ids)
            return vals, ids
        rows = chunk_rows(self.split.vocab, inputs.size, self.chunk)
        parts = logits_by_chunks(self.split, inputs, rows, lambda logits: top_k_logits(logits, self.top_k))
        shape = tuple(inputs.shape) + (self.top_k,)
        vals, ids = (mx.concatenate([p[i] for p in parts]).reshape(shape) for i in (0, 1))
        mx.eval(vals, ids)
        return vals, ids


class HiddenStateTeacher:
    """The teacher on a fixed set of windows, kept as its final hidden states and its head only.

    Called like the model on rows of those windows (``teacher(inputs)`` -> float32
    logits ``(B, T, V)``, computed from the kept hidden states by the teacher's own
    head), so step selection and evaluation read the teacher's logits while the
    rest of the teacher (its body: every block and, when untied, the input
    embedding) is freed. The hidden states take ``hidden / vocab`` of what the
    logits would (1% for SmolLM2's 576 / 49152).

    Args:
        model: the teacher; it must split into body and head (:func:`mlxqat.head.split_head`).
        windows: token windows ``(n, seq_len + 1)``; their first ``seq_len`` tokens are kept.

    Raises:
        ValueError: the model does not split into body and head; or (when called) a row
            that is not one of ``windows``' (the body that would compute it is gone).
    """

    def __init__(self, model: nn.Module, windows: np.ndarray, batch_size: int = 8):
        split = split_head(model)
        if split is None:
            raise ValueError(f"{type(model).__name__} does not split into body and head (mlxqat.head.split_head); "
                             "keep the whole teacher (do not use HiddenStateTeacher for it)")
        self._rows: Dict[bytes, mx.array] = {}
        for i in range(0, len(windows), batch_size):
            inputs = np.asarray(windows[i : i + batch_size, :-1])
            hidden = mx.stop_gradient(split.body(mx.array(inputs)))
            mx.eval(hidden)
            for row, h in zip(inputs, hidden):
                self._rows[CachedTeacher._key(row)] = h
        self.head = HeadSplit(None, split.layer, split.tied, split.softcap)  # the head alone: no body
        self.params = split.head_params()
        mx.eval(self.params)
        self.bytes = sum(h.nbytes for h in self._rows.values())

    def freeze(self, *args, **kwargs) -> "HiddenStateTeacher":
        return self

    def __call__(self, inputs: mx.array) -> mx.array:
        rows = []
        for row in np.array(inputs):
            key = CachedTeacher._key(row)
            if key not in self._rows:
                raise ValueError("this teacher keeps the hidden states of given windows only, and these tokens "
                                 "are not one of them; run the full teacher on them")
            rows.append(self._rows[key])
        return mx.stop_gradient(self.head.head(self.params, mx.stack(rows))).astype(mx.float32)


class CachedTeacher:
    """A frozen model whose float32 logits are kept per window, keyed by the window's tokens.

    Called like the model: ``teacher(inputs)`` with token ids ``(B, T)`` gives
    logits ``(B, T, V)`` in float32; rows seen before come from memory, the
    others from one forward pass of the model over just them. Anything that
    takes a teacher model takes it (:func:`mlxqat.train`, :func:`mlxqat.evaluate.evaluate`,
    :class:`TeacherTargets`, a DWQ ``target_fn``), so every consumer reads the
    same numbers. Rows beyond ``max_bytes`` of cache are computed again on each call.

    Attributes:
        bytes: memory the cached logits take.
        seconds: time spent running the model.
        calls: forward passes of the model so far.
    """

    def __init__(self, model: nn.Module, max_bytes: float = 6e9):
        self.model, self.max_bytes = model, max_bytes
        self._rows: Dict[bytes, mx.array] = {}
        self.bytes = 0
        self.seconds = 0.0
        self.calls = 0

    def freeze(self, *args, **kwargs) -> "CachedTeacher":
        """The model is frozen already (the trainer freezes its teacher)."""
        return self

    @staticmethod
    def _key(row: np.ndarray) -> bytes:
        return hashlib.sha1(row.astype(np.int32).tobytes()).digest()

    def __call__(self, inputs: mx.array) -> mx.array:
        arr = np.array(inputs)
        keys = [self._key(r) for r in arr]
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        fresh = {}
        if missing:
            t0 = time.perf_counter()
            logits = mx.stop_gradient(self.model(mx.array(arr[missing]))).astype(mx.float32)
            mx.eval(logits)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            for j, i in enumerate(missing):
                fresh[keys[i]] = logits[j]
                if self.bytes + logits[j].nbytes <= self.max_bytes:
                    self._rows[keys[i]] = logits[j]
                    self.bytes += logits[j].nbytes
        return mx.stack([self._rows.get(k, fresh.get(k)) for k in keys])

    def prefill(self, windows: np.ndarray, batch_size: int = 8) -> None:
        """Compute and keep the logits of ``windows`` ``(n, seq_len + 1)`` (their first ``seq_len`` tokens)."""
        for i in range(0, len(windows), batch_size):
            self(mx.array(windows[i : i + batch_size, :-1]))
