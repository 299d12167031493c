"""The distillation losses: KL to the teacher at a temperature (forward, reverse or mixed), plus cross-entropy,
all at once or a chunk of tokens at a time through the output head."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..evaluate import kl_divergence, top_k_kl_divergence
from ..head import HeadSplit, chunk_rows, split_head
from .args import TrainingArgs
from .teacher import TeacherHidden


def token_losses(student_logits: mx.array, teacher, targets: mx.array, args: TrainingArgs) -> mx.array:
    """Per-token loss ``T^2 * KL mix + ce_weight * cross-entropy`` (shape ``targets.shape``).

    ``teacher`` is the teacher's logits of the same tokens, or ``(top_k_logits, top_k_ids)``
    from the on-disk cache (forward KL over those tokens).
    """
    T = args.temperature
    s = student_logits.astype(mx.float32)
    if isinstance(teacher, tuple):
        kl = top_k_kl_divergence(*teacher, s, T)
    else:
        kl = kl_divergence(teacher, s, T)
        if args.reverse_kl:
            kl = (1 - args.reverse_kl) * kl + args.reverse_kl * kl_divergence(s, teacher, T)
    loss = (T * T) * kl
    if args.ce_weight:
        loss = loss + args.ce_weight * nn.losses.cross_entropy(s, targets)
    return loss


def distillation_loss(
    student_logits: mx.array,
    teacher: mx.array | tuple | TeacherHidden,
    targets: mx.array,
    args: TrainingArgs,
) -> mx.array:
    """Mean per-token loss: ``T^2 * KL mix + ce_weight * cross-entropy`` (:func:`token_losses`).

    ``teacher`` is the teacher's full logits, ``(top_k_logits, top_k_ids)``
    from the on-disk cache (forward KL over those tokens), or its hidden states
    (:class:`~mlxqat.training.teacher.TeacherHidden`).
    """
    if isinstance(teacher, TeacherHidden):
        teacher = teacher.logits()
    return mx.mean(token_losses(student_logits, teacher, targets, args))


def chunked_distillation_loss(split: HeadSplit, inputs: mx.array, targets: mx.array, teacher,
                              args: TrainingArgs) -> mx.array:
    """:func:`distillation_loss` of ``split.model(inputs)``, holding one chunk of logits at a time.

    The student's body runs once; then its head's logits and the loss are computed
    ``args.loss_chunk`` tokens at a time (:func:`mlxqat.head.chunk_rows`;
    :meth:`mlxqat.head.HeadSplit.chunked_sum`), and the backward pass recomputes each
    chunk's logits rather than keeping them. A fake-quant head's weight is dequantized
    once for all chunks. ``teacher`` is as for :func:`distillation_loss`; given as
    :class:`~mlxqat.training.teacher.TeacherHidden`, the teacher's logits are computed a chunk at
    a time as well (and again in the backward pass). Same loss and gradients as the
    plain loss, up to float rounding; costs one more head matmul per token (two with a
    hidden-state teacher).
    """
    h = split.body(inputs)
    n = targets.size
    rows = chunk_rows(split.vocab, n, args.loss_chunk)
    targets = targets.reshape(n)
    if isinstance(teacher, TeacherHidden):
        t_split, t_params, t_hidden = teacher.split, teacher.split.head_params(), teacher.hidden.reshape(n, -1)

        def teacher_rows(s):
            return mx.stop_gradient(t_split.head(t_params, t_hidden[s : s + rows]))
    else:
        flat = tuple(a.reshape(n, a.shape[-1]) for a in (teacher if isinstance(teacher, tuple) else (teacher,)))

        def teacher_rows(s):
            rows_ = tuple(a[s : s + rows] for a in flat)
            return rows_ if isinstance(teacher, tuple) else rows_[0]

    def chunk_loss(s, logits):
        return mx.sum(token_losses(logits, teacher_rows(s), targets[s : s + rows], args))

    return split.chunked_sum(h.reshape(n, -1), rows, chunk_loss) / n


def default_loss(args: TrainingArgs, student: Optional[nn.Module] = None) -> Callable:
    """``loss(model, inputs, targets, teacher_out)``: the distillation loss ``args`` describe.

    Given the ``student`` (the model the loss will be called with) and unless
    ``args.loss_chunk == 0``: :func:`chunked_distillation_loss`, when the student splits
    into body and head (:func:`mlxqat.head.split_head`); otherwise, and for models that
    do not split, :func:`distillation_loss` of the model's whole logits. The returned
    function's ``split`` attribute is the split used (``None``: plain loss).
    """
    split = split_head(student) if student is not None and args.loss_chunk != 0 else None

    def loss(model, inputs, targets, teacher_out):
        if split is not None and model is split.model:
            return chunked_distillation_loss(split, inputs, targets, teacher_out, args)
        return distillation_loss(model(inputs), teacher_out, targets, args)

    loss.split = split
    return loss
