"""Quality metrics of a (quantized) model against its full-precision teacher.

Perplexity on held-out windows, KL(teacher || model) per token and top-1
agreement (how often both models put the same token first). Every KL in the
package is computed here: the distillation loss (:func:`kl_divergence`,
:func:`top_k_kl_divergence`), the per-layer sensitivity of mixed precision and
the export checks (:func:`mean_kl`). A fake-quant model is evaluated with its weights quantized once per
call (:func:`mlxqat.layers.quantized_once`): the same numbers, bit for bit, without re-quantizing every
weight for every batch.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .layers import quantized_once


def kl_divergence(teacher_logits: mx.array, student_logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Per-token KL(teacher || student) of the softmaxes at ``temperature`` (natural log)."""
    return kl_to_distribution(distribution(teacher_logits, temperature), student_logits, temperature)


def distribution(logits: mx.array, temperature: float = 1.0) -> Tuple[mx.array, mx.array]:
    """``(log_p, p)`` of the softmax of ``logits`` at ``temperature``: a fixed teacher's side of
    :func:`kl_to_distribution`, computed once where many students are compared with it."""
    t = logits.astype(mx.float32) / temperature
    log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
    return log_p, mx.exp(log_p)


def kl_to_distribution(teacher: Tuple[mx.array, mx.array], student_logits: mx.array,
                       temperature: float = 1.0) -> mx.array:
    """Per-token KL(teacher || student) with the teacher given as :func:`distribution` returns it
    (the same numbers as :func:`kl_divergence` on its logits)."""
    log_p, p = teacher
    s = student_logits.astype(mx.float32) / temperature
    log_q = s - mx.logsumexp(s, axis=-1, keepdims=True)
    return mx.sum(p * (log_p - log_q), axis=-1)


def top_k_kl_divergence(teacher_values: mx.array, teacher_ids: mx.array, student_logits: mx.array,
                        temperature: float = 1.0) -> mx.array:
    """Per-token KL(teacher || student) over the teacher's top-k tokens only (natural log).

    ``teacher_values`` / ``teacher_ids`` (``(..., k)``) are the teacher's largest
    logits and their token ids (:func:`mlxqat.training.teacher.top_k_logits`); the teacher's
    distribution is renormalised over them, the student's is its full softmax
    read at those ids.
    """
    t = teacher_values.astype(mx.float32) / temperature
    s = student_logits.astype(mx.float32) / temperature
    log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
    log_q_all = s - mx.logsumexp(s, axis=-1, keepdims=True)
    log_q = mx.take_along_axis(log_q_all, teacher_ids.astype(mx.int32), axis=-1)
    return mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)


def mean_kl(reference: Union[nn.Module, Sequence[mx.array]], candidate: nn.Module,
            inputs: Sequence[mx.array]) -> float:
    """Mean per-token KL(reference || candidate) in nats over batches of token ids.

    Args:
        reference: the reference model (run on each batch), or for each batch of
            ``inputs`` its logits or its :func:`distribution`, computed before.
        candidate: the model compared with it.
        inputs: token id arrays ``(B, T)``, one per forward pass.
    """
    total, count = 0.0, 0
    with quantized_once(candidate):
        for i, x in enumerate(inputs):
            ref = reference[i] if isinstance(reference, (list, tuple)) else reference(x)
            ref = ref if isinstance(ref, tuple) else distribution(ref)
            kl = kl_to_distribution(ref, candidate(x))
            total += float(mx.sum(kl).item())
            count += kl.size
    return total / max(count, 1)


def kl_probe_inputs(vocab_size: int, tokenizer=None, n_seq: int = 4, length: int = 64) -> List[mx.array]:
    """Fixed token sequences ``(1, length)`` to compare two models on: seeded random ids, plus a
    tokenized sample of code and prose when a ``tokenizer`` is given."""
    rng = np.random.default_rng(1234)
    seqs = [mx.array(rng.integers(0, vocab_size, (1, length)), dtype=mx.int32) for _ in range(n_seq)]
    if tokenizer is not None:
        text = (
            "def mean(values):\n    return sum(values) / len(values)\n"
            "The model was trained on a small corpus and exported for llama.cpp.\n"
        )
        ids = [i for i in tokenizer.encode(text) if i < vocab_size][:length]
        if len(ids) > 1:
            seqs.append(mx.array([ids], dtype=mx.int32))
    return seqs


EVAL_LOGIT_BYTES = 128 * 2**20  # float32 logits of one evaluation batch, at most (one window at least)


def eval_batch_size(vocab: int, seq_len: int, most: int = 8) -> int:
    """Windows per evaluation batch: ``most``, or fewer so that their float32 logits stay within
    :data:`EVAL_LOGIT_BYTES` (a 262k-token vocabulary: one window of 128 tokens)."""
    return max(1, min(most, EVAL_LOGIT_BYTES // (4 * vocab * max(seq_len, 1))))


def evaluate(
    model: nn.Module,
    windows: np.ndarray,
    teacher: Optional[nn.Module] = None,
    batch_size: Optional[int] = None,
    progress: Union[bool, str] = False,
    quantize_once: bool = True,
) -> Dict[str, float]:
    """Perplexity of ``model`` on ``windows`` (n, seq_len + 1) and, with a teacher, KL and top-1 agreement.

    ``batch_size``: windows per forward pass (default: :func:`eval_batch_size`, at most
    :data:`EVAL_LOGIT_BYTES` of float32 logits per batch). ``progress``: show a progress bar over
    the windows (a string: its label).

    ``quantize_once``: fake-quant layers quantize their weights once for the whole call
    (:func:`mlxqat.layers.quantized_once`; the same numbers, bit for bit), not once per batch.

    Returns:
        ``{"ppl", "nll", "tokens"}`` plus ``{"kl", "top1"}`` when ``teacher`` is given.
    """
    if batch_size is None:
        windows = np.asarray(windows)
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        batch_size = eval_batch_size(vocab, windows.shape[1] - 1) if isinstance(vocab, int) else 8
    with quantized_once(model) if quantize_once else contextlib.nullcontext():
        sums = _evaluate_batches(model, windows, teacher, batch_size, progress)
    nll_sum, kl_sum, agree, tokens = sums
    if tokens == 0:
        raise ValueError("evaluate() got no windows")
    out = {"nll": nll_sum / tokens, "ppl": math.exp(nll_sum / tokens), "tokens": tokens}
    if not math.isfinite(out["nll"]):
        raise FloatingPointError("the model's loss is NaN/Inf on the evaluation data")
    if teacher is not None:
        out["kl"] = kl_sum / tokens
        out["top1"] = agree / tokens
    return out


def _evaluate_batches(model, windows, teacher, batch_size: int, progress) -> Tuple[float, float, int, int]:
    """``(nll sum, KL sum, top-1 agreements, tokens)`` of :func:`evaluate`, a batch of windows at a time."""
    nll_sum, kl_sum, agree, tokens = 0.0, 0.0, 0, 0
    bar = tqdm(total=len(windows), desc=progress if isinstance(progress, str) else "evaluating", unit="window",
               disable=not progress, dynamic_ncols=True, leave=False)
    for i in range(0, len(windows), batch_size):
        batch = mx.array(windows[i : i + batch_size])
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, targets, reduction="sum")
        parts = [nll]
        if teacher is not None:
            # a model measured against itself: its own logits (the same ops on the same tokens, so the same bits)
            t_logits = logits if teacher is model else mx.stop_gradient(teacher(inputs)).astype(mx.float32)
            parts.append(mx.sum(kl_divergence(t_logits, logits)))
            parts.append(mx.sum(mx.argmax(logits, -1) == mx.argmax(t_logits, -1)))
        mx.eval(*parts)
        nll_sum += parts[0].item()
        if teacher is not None:
            kl_sum += parts[1].item()
            agree += int(parts[2].item())
        tokens += targets.size
        bar.update(len(batch))
    bar.close()
    return nll_sum, kl_sum, agree, tokens


# Masked windows ``(n, 2, seq_len + 1)``: token ids, and 1 where the next-token target counts in the loss (a
# completion's tokens) and 0 where it does not (a prompt's, padding). Each batch is cut after its last
# counted target, rounded up to a multiple of TRIM_MULTIPLE tokens (as mlx-lm pads its batches).
TRIM_MULTIPLE = 32


def trim_masked(inputs: mx.array, targets: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """``(inputs, next tokens, mask)``, each ``(B, T')``, of a batch of masked windows given as ``inputs``
    ``(B, T)`` (``windows[:, 0, :-1]``) and ``targets`` ``(B, 2, T)`` (``windows[:, :, 1:]``: next tokens and
    mask), cut after the batch's last counted target rounded up to :data:`TRIM_MULTIPLE` (a causal model's
    outputs at the positions kept do not depend on the padding dropped)."""
    mask = targets[:, 1]
    counted = np.flatnonzero(np.array(mx.any(mask != 0, axis=0)))
    n = inputs.shape[-1]
    if counted.size:
        n = min(n, -(-(int(counted[-1]) + 1) // TRIM_MULTIPLE) * TRIM_MULTIPLE)
    return inputs[:, :n], targets[:, 0, :n], mask[:, :n]


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """``(sum of the next-token cross-entropy over the counted targets, their number)``, in float32 nats:
    the fine-tuning loss and its held-out measure (:func:`completion_loss`) are this one sum."""
    m = mask.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return mx.sum(ce * m), mx.sum(m)


def completion_loss(model: nn.Module, windows: np.ndarray, batch_size: int = 8) -> Dict[str, float]:
    """Mean cross-entropy per counted token (a completion's) of ``model`` on masked windows ``(n, 2, seq_len + 1)``.

    Returns:
        ``{"loss": nats per counted token, "tokens": how many were counted, "examples": n}``.

    Raises:
        ValueError: no window, or none with a counted token.
        FloatingPointError: the loss is NaN/Inf.
    """
    windows = np.asarray(windows)
    # shortest first, so that each batch is cut short (trim_masked); the order is the data's, so the sum is too
    windows = windows[np.argsort(windows.shape[-1] - np.argmax(windows[:, 1, ::-1] != 0, axis=-1), kind="stable")]
    total, count = 0.0, 0.0
    with quantized_once(model):
        for i in range(0, len(windows), batch_size):
            batch = mx.array(windows[i : i + batch_size])
            inputs, targets, mask = trim_masked(batch[:, 0, :-1], batch[:, :, 1:])
            s, c = masked_cross_entropy(model(inputs), targets, mask)
            mx.eval(s, c)
            total, count = total + s.item(), count + c.item()
    if count == 0:
        raise ValueError("completion_loss() got no counted tokens (empty data, or every target masked)")
    loss = total / count
    if not math.isfinite(loss):
        raise FloatingPointError("the model's loss is NaN/Inf on the evaluation data")
    return {"loss": loss, "tokens": int(count), "examples": len(windows)}


def gap_recovered(ppl_rtn: float, ppl_method: float, ppl_full: float) -> float:
    """Share of the round-to-nearest perplexity gap a method closes: 1.0 = back to full precision."""
    if ppl_rtn <= ppl_full:
        return float("nan")
    return (ppl_rtn - ppl_method) / (ppl_rtn - ppl_full)


def format_table(rows: Dict[str, Dict[str, float]], ppl_full: Optional[float] = None, ppl_rtn: Optional[float] = None) -> str:
    """A markdown table of ``{name: metrics}``.

    With ``ppl_full``/``ppl_rtn``: the perplexity change against full precision,
    the share of the round-to-nearest perplexity gap each row closes, and how
    much smaller its KL to the teacher is than round-to-nearest's.
    """
    kl_rtn = rows.get("round-to-nearest", {}).get("kl")
    lines = [
        "| model | ppl | ppl vs fp | KL to fp | top-1 agree | ppl gap recovered | KL vs RTN |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        delta = gap = kl_red = ""
        if ppl_full is not None:
            delta = f"{100 * (m['ppl'] / ppl_full - 1):+.2f}%"
        if ppl_rtn is not None and ppl_full is not None and name not in ("full precision", "round-to-nearest"):
            g = gap_recovered(ppl_rtn, m["ppl"], ppl_full)
            gap = f"{100 * g:.0f}%" if g == g else "n/a (RTN gap <= 0)"
        if kl_rtn and "kl" in m and name not in ("full precision", "round-to-nearest"):
            kl_red = f"{100 * (m['kl'] / kl_rtn - 1):+.0f}%"
        kl = f"{m['kl']:.5f}" if "kl" in m else ""
        top1 = f"{100 * m['top1']:.2f}%" if "top1" in m else ""
        lines.append(f"| {name} | {m['ppl']:.4f} | {delta} | {kl} | {top1} | {gap} | {kl_red} |")
    return "\n".join(lines)
