"""The teacher: the frozen full-precision model's logits, as distillation and evaluation read them.

Two forms, one module:

* :class:`TeacherTargets` gives the trainer its targets per micro-batch: the
  live logits, or only the ``top_k`` largest (values and token ids), kept in
  memory and on disk so later epochs, resumed runs and re-runs skip the teacher.
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

from .io import atomic_file


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


class TeacherTargets:
    """The teacher's logits for a micro-batch: computed live, or top-k cached.

    ``targets(key, inputs)`` returns the teacher's logits ``(B, T, V)`` for
    ``inputs`` (``top_k=0``), or ``(values, ids)`` of its ``top_k`` largest
    logits (:func:`top_k_logits`). With ``top_k`` the teacher runs once per
    ``key`` and the result is kept in memory and under ``cache_dir`` when
    given (``<key>.safetensors``, written atomically); a later call with the
    same key reads it back instead of running the teacher.
    """

    def __init__(self, teacher, top_k: int = 0, cache_dir: Optional[Path] = None):
        self.teacher, self.top_k, self.cache_dir = teacher, top_k, cache_dir
        self._mem: Dict[str, tuple] = {}

    def __call__(self, key: str, inputs: mx.array):
        if not self.top_k:
            return mx.stop_gradient(self.teacher(inputs))
        if key in self._mem:
            return self._mem[key]
        path = Path(self.cache_dir) / f"{key}.safetensors" if self.cache_dir else None
        if path is not None and path.exists():
            d = mx.load(str(path))
            out = (d["values"], d["ids"])
        else:
            vals, ids = top_k_logits(mx.stop_gradient(self.teacher(inputs)), self.top_k)
            mx.eval(vals, ids)
            out = (vals, ids)
            if path is not None:
                with atomic_file(path, check=False) as f:  # inside the job's work directory
                    mx.save_safetensors(f, {"values": vals, "ids": ids})
        self._mem[key] = out
        return out


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
