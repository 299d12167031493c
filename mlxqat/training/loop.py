"""The QAT training loop: distil the full-precision teacher into a fake-quantized student.

``train(student, teacher, train_data, val_data, args)`` runs the loop (loss, optimizer, schedule,
accumulation, data parallelism, checkpoints and resume). The whole job behind
``python -m mlxqat.train`` is :mod:`mlxqat.training.job`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

from ..data import Dataset, iterate_batches
from ..evaluate import evaluate
from ..head import chunk_rows
from ..layers import FakeQuantEmbedding, is_fake_quant, set_fake_quant
from ..storage.destinations import atomic_file, work_dir
from .args import ACTIVATION_FLOATS, GRAD_CHECKPOINT_BYTES, TrainingArgs
from .checkpoints import TEACHER_CACHE, recipe_dict, load_checkpoint, resume_point, save_checkpoint
from .losses import default_loss
from .optim import make_optimizer, set_trainable
from .teacher import TeacherTargets


def _vocab_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding table (its vocabulary), if it has one."""
    for _, m in model.named_modules():
        if isinstance(m, (nn.Embedding, FakeQuantEmbedding, nn.QuantizedEmbedding)):
            return int(m.weight.shape[0])
    return None


def _check_token_ids(windows: Optional[np.ndarray], vocab: Optional[int], what: str) -> None:
    if windows is None or vocab is None or windows.size == 0:
        return
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{what} data holds token id {bad}, outside the student's vocabulary of {vocab} tokens "
            f"(ids 0..{vocab - 1}; the data's ids span {lo}..{hi}); tokenize with this model's own tokenizer"
        )


def _check_inputs(student: nn.Module, train_data: np.ndarray, val_data, args: TrainingArgs, world: int,
                  custom_loss: bool = False) -> None:
    """Refuse what would train nothing, crash mid-run or index outside the vocabulary."""
    if not any(is_fake_quant(m) for _, m in student.named_modules()):
        raise ValueError(
            f"the student ({type(student).__name__}) has no fake-quant layers, so there is nothing to "
            "train through a quantizer (the loss would be 0); call mlxqat.prepare(student, recipe) first"
        )
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(
            f"batch_size={args.batch_size} is not divisible by processes x grad_accum = "
            f"{world} x {args.grad_accum}; pick a multiple"
        )
    masked = train_data.ndim == 3 and train_data.shape[1] == 2
    if not (train_data.ndim == 2 or masked) or train_data.shape[-1] != args.seq_len + 1:
        raise ValueError(
            f"training windows have shape {train_data.shape}; expected (n, seq_len + 1), or (n, 2, seq_len + 1) "
            f"with a loss mask, with seq_len={args.seq_len}"
        )
    if masked and not custom_loss:
        raise ValueError("masked windows (n, 2, seq_len + 1) need a loss that reads the mask (loss=...); the "
                         "distillation loss takes windows (n, seq_len + 1)")
    if not np.issubdtype(train_data.dtype, np.integer):
        raise ValueError(f"training windows are {train_data.dtype}; expected integer token ids")
    vocab = _vocab_rows(student)
    _check_token_ids(train_data[:, 0] if masked else train_data, vocab, "training")
    _check_token_ids(None if val_data is None else np.asarray(val_data), vocab, "validation")
    if vocab is not None and args.teacher_top_k > vocab:
        raise ValueError(f"teacher_top_k={args.teacher_top_k} exceeds the vocabulary of {vocab} tokens; "
                         f"use at most {vocab}")


def _blocks(model: nn.Module):
    return getattr(getattr(model, "model", model), "layers", None)


def needs_grad_checkpoint(layers: int, hidden: int, args: TrainingArgs) -> bool:
    """``args.grad_checkpoint``, or when it is ``None`` (automatic): whether the activations one
    micro-batch keeps for the backward pass, estimated at :data:`ACTIVATION_FLOATS` float32 values
    per hidden unit, token and transformer block, exceed :data:`GRAD_CHECKPOINT_BYTES`."""
    if args.grad_checkpoint is not None:
        return args.grad_checkpoint
    tokens = args.batch_size // args.grad_accum * args.seq_len
    return layers * tokens * hidden * ACTIVATION_FLOATS * 4 > GRAD_CHECKPOINT_BYTES


def uses_grad_checkpoint(model: nn.Module, args: TrainingArgs) -> bool:
    """:func:`needs_grad_checkpoint` for ``model`` (an mlx-lm model: its ``model.layers`` and
    ``args.hidden_size``; other models are not checkpointed automatically)."""
    if args.grad_checkpoint is not None:
        return args.grad_checkpoint
    blocks, hidden = _blocks(model), getattr(getattr(model, "args", None), "hidden_size", None)
    if not blocks or not isinstance(hidden, int):
        return False
    return needs_grad_checkpoint(len(blocks), hidden, args)


def _grad_checkpoint(model: nn.Module, enabled: bool = True) -> None:
    """Recompute each transformer block of ``model`` in the backward pass instead of storing it
    (``enabled=False``: store it again). A per-model choice: the block class's ``__call__`` is
    wrapped once, and only blocks marked by this function take the checkpointed path."""
    layers = _blocks(model)
    if not layers:
        if enabled:
            raise ValueError("grad_checkpoint needs a model with .model.layers (an mlx-lm model)")
        return
    for layer in layers:
        cls = type(layer)
        if not getattr(cls, "_mlxqat_checkpointed", False):
            fn = cls.__call__

            def call(self, *a, _fn=fn, **k):
                if not getattr(self, "_mlxqat_checkpoint", False):
                    return _fn(self, *a, **k)

                def inner(params, *a, **k):
                    self.update(params)
                    return _fn(self, *a, **k)

                return mx.checkpoint(inner)(self.trainable_parameters(), *a, **k)

            cls.__call__ = call
            cls._mlxqat_checkpointed = True
        object.__setattr__(layer, "_mlxqat_checkpoint", enabled)


def _open_log(path: Optional[Path], resume_step: Optional[int]):
    """The training log, open for appending (a context giving ``None`` without a path); a resumed
    run first drops records past its checkpoint.

    Steps between the last checkpoint and an interruption are trained again, so
    their records would otherwise appear twice.
    """
    if path is None:
        return contextlib.nullcontext()
    if resume_step is None:
        return open(path, "w")
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if rec["step"] <= resume_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut off by the interruption
                continue
    with atomic_file(path, "w", check=False) as f:  # inside our work directory
        f.writelines(kept)
    return open(path, "a")


def _no_teacher(key: str, inputs: mx.array) -> None:
    """The teacher targets of a run without a teacher: none (its loss reads the data alone)."""
    return None


def _micro_batches(batch, step: int, args: TrainingArgs, rank: int, world: int):
    """``(key, inputs, targets)`` of each micro-batch this process trains on at ``step``; ``key`` names
    its teacher targets (:class:`~mlxqat.training.teacher.TeacherTargets`). Masked windows ``(B, 2, seq_len + 1)``
    give the token inputs ``(B, seq_len)`` and targets ``(B, 2, seq_len)``: next tokens and their loss mask."""
    micro = args.batch_size // (world * args.grad_accum)
    local = batch[rank * micro * args.grad_accum : (rank + 1) * micro * args.grad_accum]
    for j in range(args.grad_accum):
        mb = local[j * micro : (j + 1) * micro]
        inputs = mb[:, 0, :-1] if mb.ndim == 3 else mb[:, :-1]
        yield f"{step:08d}-{rank}-{j}", inputs, mb[..., 1:]


def prefill_teacher_targets(targets: TeacherTargets, train_data: np.ndarray, args: TrainingArgs, *, start: int = 0,
                            rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Compute (and cache) the teacher's top-k targets of every micro-batch of steps ``start .. args.steps - 1``,
    as :func:`train` will ask for them; afterwards training with ``targets`` runs no teacher.

    Returns:
        How many micro-batches ran the teacher (the others were cached already).

    Raises:
        ValueError: ``targets`` has no ``top_k`` (live logits cannot be cached).
    """

    if not targets.top_k:
        raise ValueError("prefill_teacher_targets needs top-k targets; set teacher_top_k (e.g. 64)")
    ran = 0
    bar = tqdm(total=args.steps - start, desc="teacher top-k", disable=not progress or rank != 0, dynamic_ncols=True)
    for step, batch in iterate_batches(np.asarray(train_data), args.batch_size, args.seed, start_step=start):
        if step >= args.steps:
            break
        for key, inputs, _ in _micro_batches(batch, step, args, rank, world):
            if not targets.cached(key):
                targets(key, inputs)
                ran += 1
        bar.update(1)
    bar.close()
    return ran


def _make_step(student, optimizer, targets_fn, loss: Callable, args: TrainingArgs, rank: int,
               world: int) -> Callable:
    """``step_fn(batch, step) -> loss``: one optimizer step over this process's share of ``batch``."""
    value_and_grad = nn.value_and_grad(student, loss)

    def step_fn(batch, step):
        grads, total = None, mx.array(0.0)
        for key, inputs, targets in _micro_batches(batch, step, args, rank, world):
            t_out = targets_fn(key, inputs)
            l, g = value_and_grad(student, inputs, targets, t_out)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + l
            # one micro-batch's forward and backward at a time, and the update after them: in one lazy
            # graph MLX would hold the activations of all of them and the optimizer's temporaries together
            mx.eval(grads, total)
        if args.grad_accum > 1:
            grads = tree_map(lambda g: g / args.grad_accum, grads)
            total = total / args.grad_accum
        if world > 1:
            grads = nn.average_gradients(grads)
            total = mx.distributed.all_sum(total) / world
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(student, grads)
        return total

    return step_fn


def train(
    student: nn.Module,
    teacher: Optional[nn.Module],
    train_data,
    val_data: Optional[np.ndarray] = None,
    args: Optional[TrainingArgs] = None,
    *,
    optimizer: Optional[optim.Optimizer] = None,
    loss: Optional[Callable] = None,
    out_dir: Optional[Path] = None,
    resume: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    progress: Union[bool, str] = True,
    teacher_targets: Optional[TeacherTargets] = None,
) -> dict:
    """Fine-tune a prepared ``student`` towards ``teacher`` on ``dataset.train``.

    Args:
        student: a model prepared with :func:`mlxqat.prepare` (float32 compute
            recommended on CPU; its parameters are the fp32 master copies).
        teacher: the full-precision model (frozen; not modified).
        train_data: packed windows (n, seq_len + 1), or a
            :class:`~mlxqat.data.Dataset` (then ``val_data`` defaults to its ``val``).
        val_data: windows to evaluate on at the end (loss, KL, top-1 in the summary).
        args: :class:`TrainingArgs` (default: ``TrainingArgs()``).
        optimizer: an MLX optimizer (default: :class:`QATOptimizer` from ``args``); the
            log reports its ``learning_rate``, and checkpoints hold its state.
        loss: ``loss(model, inputs, targets, teacher_out) -> scalar``, where ``teacher_out``
            is the teacher's logits or, with ``teacher_top_k``, ``(top_k_logits, top_k_ids)``
            (``None`` without a teacher: a loss of the data alone, such as a fine-tuning task's)
            (default: :func:`default_loss`, the distillation loss ``args`` describe). With masked
            windows ``(n, 2, seq_len + 1)`` (token ids and a per-token loss mask), ``targets`` is
            ``(B, 2, seq_len)``: the next tokens and their mask.
        out_dir: where checkpoints (``checkpoints/``) and ``train_log.jsonl`` go.
        resume: continue from the newest checkpoint in ``out_dir``; it must have been
            written with the same recipe, seq_len, batch_size, trainable mode and seed.
        callback: called with every logged record (dict), before it is written: it may add entries
            (e.g. a validation loss).
        progress: show a progress bar (a string: its label, default ``"QAT"``).
        teacher_targets: the teacher's logits per micro-batch (default: a
            :class:`TeacherTargets` of ``teacher`` and ``args.teacher_top_k``).

    Returns:
        A summary: steps, tokens, wall time, final loss, peak memory, whether blocks were
        checkpointed and the loss's chunk of tokens (0: the plain loss).

    Raises:
        ValueError: an unprepared student, token ids outside its vocabulary, windows
            of the wrong shape, a damaged checkpoint or one written with other settings.
        FloatingPointError: the loss became NaN/Inf (training stops, nothing saved).
    """
    args = args or TrainingArgs()
    if isinstance(train_data, Dataset):
        val_data = train_data.val if val_data is None else val_data
        train_data = train_data.train
    train_data = np.asarray(train_data)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    _check_inputs(student, train_data, val_data, args, world, custom_loss=loss is not None)
    if teacher is not None:
        teacher.freeze()
    optimizer = optimizer if optimizer is not None else make_optimizer(args)
    start = _start(student, optimizer, args, out_dir, resume)
    custom_loss = loss is not None
    loss = loss or default_loss(args, student)
    if teacher_targets is None and teacher is None and custom_loss:
        teacher_targets = _no_teacher  # the loss given needs no teacher
    if teacher_targets is None:
        cache = Path(out_dir) / TEACHER_CACHE if out_dir and args.teacher_top_k else None
        teacher_targets = TeacherTargets(teacher, args.teacher_top_k, cache, chunk=args.loss_chunk,
                                         hidden=getattr(loss, "split", None) is not None)
    step_fn = _make_step(student, optimizer, teacher_targets, loss, args, rank, world)

    if out_dir:
        work_dir(out_dir)  # ours, or refused: never a folder of the user's
    log_path = Path(out_dir) / "train_log.jsonl" if out_dir and rank == 0 else None
    with _open_log(log_path, start if resume else None) as log_f:
        losses, tokens, t0 = _loop(student, optimizer, step_fn, train_data, args, start,
                                   Path(out_dir) / "checkpoints" if out_dir else None, log_f, callback, progress, rank)
    set_fake_quant(student, True)
    student.eval()
    summary = {"steps": args.steps, "resumed_from": start, "tokens": tokens, "wall_s": time.perf_counter() - t0,
               "final_loss": losses[-1] if losses else None, "losses": losses,
               "peak_memory_gb": mx.get_peak_memory() / 1e9, "processes": world,
               "grad_checkpoint": uses_grad_checkpoint(student, args),
               "loss_chunk": chunk_rows(loss.split.vocab, args.batch_size // (world * args.grad_accum) * args.seq_len,
                                        args.loss_chunk) if getattr(loss, "split", None) is not None else 0}
    if val_data is not None and teacher is not None:

        summary["val"] = evaluate(student, np.asarray(val_data), teacher)
    return summary


def _start(student: nn.Module, optimizer, args: TrainingArgs, out_dir, resume: bool) -> int:
    """Make the student trainable and the optimizer ready; return the first step (a checkpoint's, on resume)."""
    set_trainable(student, args)
    student.train()
    _grad_checkpoint(student, uses_grad_checkpoint(student, args))
    optimizer.init(student.trainable_parameters())
    if not resume:
        return 0
    if out_dir is None:
        raise FileNotFoundError("--resume needs out_dir, where the checkpoints are")
    return load_checkpoint(resume_point(out_dir, args, recipe_dict(student)), student, optimizer, args)


def _loop(student, optimizer, step_fn, train_data, args: TrainingArgs, start: int, ckpt_dir, log_f,
          callback, progress: Union[bool, str], rank: int):
    """Steps ``start .. args.steps - 1``: log, call back, checkpoint. Returns ``(losses, tokens, t0)``."""

    losses = []
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=args.steps, initial=start, desc=progress if isinstance(progress, str) else "QAT",
               disable=not progress or rank != 0, dynamic_ncols=True)
    last_t, last_tokens = t0, 0  # at the previous log record
    try:
        for step, batch in iterate_batches(train_data, args.batch_size, args.seed, start_step=start):
            if step >= args.steps:
                break
            set_fake_quant(student, step >= args.quant_delay)
            loss = step_fn(batch, step)
            mx.eval(loss, student.trainable_parameters(), optimizer.state)
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise FloatingPointError(
                    f"loss is {loss_v} at step {step + 1}; lower --learning-rate (now "
                    f"{args.learning_rate}) or --scale-learning-rate"
                )
            losses.append(loss_v)
            tokens += batch.shape[0] * args.seq_len
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                now = time.perf_counter()
                rec = _record(done, losses[-args.log_every :], optimizer, (tokens - last_tokens) / max(now - last_t, 1e-9))
                last_t, last_tokens = now, tokens
                if callback:
                    callback(rec)  # first: it may add to the record (a validation loss)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", mem=f"{rec['peak_memory_gb']:.2f}GB")
                if log_f:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
            if ckpt_dir and args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps and rank == 0:
                save_checkpoint(ckpt_dir, student, optimizer, done, args)
    finally:
        bar.close()
    return losses, tokens, t0


def _record(step: int, recent_losses: List[float], optimizer, tokens_per_s: float) -> dict:
    """The log record at ``step``: mean of the recent losses, learning rate, speed, peak memory."""
    return {
        "step": step,
        "loss": float(np.mean(recent_losses)),
        "lr": float(optimizer.learning_rate.item()),
        "tokens_per_s": tokens_per_s,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
