"""The QAT training loop: distil the full-precision teacher into a fake-quantized student.

``train(student, teacher, train_data, val_data, args)`` runs the loop (loss,
optimizer, schedule, accumulation, data parallelism, checkpoints and resume).
The whole job behind ``python -m mlxqat.train`` is :mod:`mlxqat.train`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .data import Dataset, iterate_batches
from .evaluate import kl_divergence
from .io import atomic_dir, atomic_file
from .layers import FakeQuantEmbedding, FakeQuantLinear, freeze_codes, set_fake_quant
from .lora import QALoRALinear, apply_lora

TRAINABLE = ("all", "scales", "lora")


@dataclass
class TrainingArgs:
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Windows per optimizer step (all processes together)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per window."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of the weights."})
    scale_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Peak learning rate of learned scales/biases (default: learning_rate / 10; scales are small numbers and Adam steps are absolute)."}
    )
    lora_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of LoRA adapters."})
    schedule: str = field(default="cosine", metadata={"help": "cosine, linear or constant (after warmup)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate / peak, for cosine and linear."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm (0: off)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute block activations in the backward pass."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    reverse_kl: float = field(default=0.0, metadata={"help": "Weight of reverse KL in the KL mix (0: forward KL)."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of next-token cross-entropy added to the KL."})
    trainable: str = field(default="all", metadata={"help": "all (full QAT), scales (scales/biases only) or lora."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_scale: float = field(default=1.0, metadata={"help": "LoRA output multiplier."})
    quant_delay: int = field(default=0, metadata={"help": "First steps trained without fake quantization."})
    teacher_top_k: int = field(default=0, metadata={"help": "Cache the teacher's top-k logits once and drop the teacher (0: run the teacher every step)."})
    log_every: int = field(default=10, metadata={"help": "Steps between log lines."})
    checkpoint_every: int = field(default=0, metadata={"help": "Steps between checkpoints (0: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and adapters."})

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1"),
            (self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
             f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate={self.learning_rate} must be positive"),
            (self.schedule in ("cosine", "linear", "constant"), f"schedule={self.schedule!r}: use cosine, linear or constant"),
            (self.trainable in TRAINABLE, f"trainable={self.trainable!r}: use one of {TRAINABLE}"),
            (self.temperature > 0, f"temperature={self.temperature} must be positive"),
            (0 <= self.reverse_kl <= 1, f"reverse_kl={self.reverse_kl} must be in [0, 1]"),
            (self.ce_weight >= 0, f"ce_weight={self.ce_weight} must be >= 0"),
            (not (self.teacher_top_k and self.reverse_kl), "reverse_kl needs the full teacher; set teacher_top_k=0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def scale_lr(self) -> float:
        return self.scale_learning_rate if self.scale_learning_rate is not None else self.learning_rate / 10


def lr_schedule(peak: float, args: TrainingArgs) -> Callable:
    """Warmup then cosine / linear decay to ``min_lr_ratio * peak`` (or constant)."""
    decay_steps = max(1, args.steps - args.warmup_steps)
    end = peak * args.min_lr_ratio
    if args.schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, end)
    elif args.schedule == "linear":
        main = optim.linear_schedule(peak, end, decay_steps)
    else:
        main = lambda _: peak  # noqa: E731
    if args.warmup_steps <= 0:
        return main
    warm = optim.linear_schedule(peak / args.warmup_steps, peak, args.warmup_steps - 1) if args.warmup_steps > 1 else (lambda _: peak)
    return optim.join_schedules([warm, main], [args.warmup_steps])


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def distillation_loss(
    student_logits: mx.array,
    teacher: mx.array | tuple,
    targets: mx.array,
    args: TrainingArgs,
) -> mx.array:
    """Mean per-token loss: ``T^2 * KL mix + ce_weight * cross-entropy``.

    ``teacher`` is the teacher's full logits, or ``(top_k_logits, top_k_ids)``
    from the on-disk cache (forward KL over those tokens).
    """
    T = args.temperature
    s = student_logits.astype(mx.float32)
    if isinstance(teacher, tuple):
        t_vals, t_ids = teacher
        t = t_vals.astype(mx.float32) / T
        log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
        log_q_all = s / T - mx.logsumexp(s / T, axis=-1, keepdims=True)
        log_q = mx.take_along_axis(log_q_all, t_ids.astype(mx.int32), axis=-1)
        kl = mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)
    else:
        kl = kl_divergence(teacher, s, T)
        if args.reverse_kl:
            kl = (1 - args.reverse_kl) * kl + args.reverse_kl * kl_divergence(s, teacher, T)
    loss = (T * T) * mx.mean(kl)
    if args.ce_weight:
        loss = loss + args.ce_weight * nn.losses.cross_entropy(s, targets, reduction="mean")
    return loss


# ---------------------------------------------------------------------------
# Trainable parameters
# ---------------------------------------------------------------------------


def set_trainable(student: nn.Module, args: TrainingArgs) -> None:
    """Freeze/unfreeze the student for ``args.trainable``."""
    if args.trainable == "lora":
        if not any(isinstance(m, QALoRALinear) for _, m in student.named_modules()):
            apply_lora(student, args.lora_rank, args.lora_scale, seed=args.seed)
        return
    if args.trainable == "all":
        student.unfreeze()
        return
    student.freeze()
    n = 0
    for _, m in student.named_modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) and m.spec.learn_scales:
            freeze_codes(m)
            m.unfreeze(keys=["scales", "biases"], recurse=False)
            n += 1
    if n == 0:
        raise ValueError(
            "trainable='scales' needs learned scales: prepare with a recipe that has "
            "learn_scales=True (e.g. recipes.get('int4', learn_scales=True))"
        )


def _is_scale(path: str, _g=None) -> bool:
    return path.endswith(".scales") or path.endswith(".biases")


def _is_lora(path: str, _g=None) -> bool:
    return path.endswith(".lora_a") or path.endswith(".lora_b")


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    def adamw(peak):
        return optim.AdamW(learning_rate=lr_schedule(peak, args), weight_decay=args.weight_decay)

    return optim.MultiOptimizer(
        [adamw(args.scale_lr), adamw(args.lora_learning_rate), adamw(args.learning_rate)],
        [_is_scale, _is_lora],
    )


# ---------------------------------------------------------------------------
# Teacher cache
# ---------------------------------------------------------------------------


class TeacherTargets:
    """The teacher's logits for a micro-batch: computed live, or top-k cached.

    With ``top_k`` the teacher runs once per micro-batch and only its ``top_k``
    largest logits (and their token ids) are kept, in memory and under
    ``cache_dir`` when given; later epochs, resumed runs and re-runs read them
    back instead of running the teacher.
    """

    def __init__(self, teacher: nn.Module, top_k: int = 0, cache_dir: Optional[Path] = None):
        self.teacher, self.top_k, self.cache_dir = teacher, top_k, cache_dir
        self._mem: Dict[str, tuple] = {}

    def __call__(self, key: str, inputs: mx.array):
        if not self.top_k:
            return mx.stop_gradient(self.teacher(inputs))
        if key in self._mem:
            return self._mem[key]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir else None
        if path is not None and path.exists():
            d = mx.load(str(path))
            out = (d["values"], d["ids"])
        else:
            logits = mx.stop_gradient(self.teacher(inputs))
            ids = mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
            vals = mx.take_along_axis(logits, ids, axis=-1)
            ids = ids.astype(mx.int32)
            mx.eval(vals, ids)
            out = (vals, ids)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.tmp.safetensors")
                mx.save_safetensors(str(tmp), {"values": vals, "ids": ids})
                os.replace(tmp, path)
        self._mem[key] = out
        return out


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(directory: Path, student: nn.Module, optimizer, step: int, args: TrainingArgs) -> Path:
    """Atomically write trainable parameters, optimizer state and position at ``step``."""
    directory = Path(directory)
    dest = directory / f"step_{step:07d}"
    with atomic_dir(dest) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(student.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        with open(tmp / "state.json", "w") as f:
            # The data order is a function of (seed, step) and nothing else draws
            # random numbers after set-up, so (seed, step) is the whole RNG state.
            json.dump({"step": step, "args": asdict(args), "rng": {"seed": args.seed, "data_step": step}}, f)
    with atomic_file(directory / "latest.json", "w") as f:
        json.dump({"checkpoint": dest.name, "step": step}, f)
    return dest


def latest_checkpoint(directory: Path) -> Optional[Path]:
    p = Path(directory) / "latest.json"
    if not p.exists():
        return None
    with open(p) as f:
        return Path(directory) / json.load(f)["checkpoint"]


def load_checkpoint(path: Path, student: nn.Module, optimizer, seed: Optional[int] = None) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    path = Path(path)
    params = mx.load(str(path / "trainable.safetensors"))
    student.load_weights(list(params.items()), strict=False)
    expected = {k for k, _ in tree_flatten(student.trainable_parameters())}
    if set(params) != expected:
        raise ValueError(
            f"checkpoint {path} does not match this model/recipe "
            f"({len(set(params) ^ expected)} parameter names differ); resume with the same settings"
        )
    optimizer.init(student.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    with open(path / "state.json") as f:
        state = json.load(f)
    if seed is not None and state["rng"]["seed"] != seed:
        raise ValueError(
            f"checkpoint {path} was written with seed={state['rng']['seed']}; resume with "
            f"--seed {state['rng']['seed']} (now {seed}) to see the same batches"
        )
    return int(state["step"])


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of storing it."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if not layers:
        raise ValueError("grad_checkpoint needs a model with .model.layers (an mlx-lm model)")
    cls = type(layers[0])
    if getattr(cls, "_mlxqat_checkpointed", False):
        return
    fn = cls.__call__

    def checkpointed(self, *a, **k):
        def inner(params, *a, **k):
            self.update(params)
            return fn(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *a, **k)

    cls.__call__ = checkpointed
    cls._mlxqat_checkpointed = True


def train(
    student: nn.Module,
    teacher: Optional[nn.Module],
    train_data,
    val_data: Optional[np.ndarray] = None,
    args: Optional[TrainingArgs] = None,
    *,
    out_dir: Optional[Path] = None,
    resume: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
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
        out_dir: where checkpoints (``checkpoints/``) and ``train_log.jsonl`` go.
        resume: continue from the newest checkpoint in ``out_dir``.
        callback: called with every logged record (dict).

    Returns:
        A summary: steps, tokens, wall time, final loss, peak memory.

    Raises:
        FloatingPointError: the loss became NaN/Inf (training stops, nothing saved).
    """
    from tqdm import tqdm

    args = args or TrainingArgs()
    if isinstance(train_data, Dataset):
        val_data = train_data.val if val_data is None else val_data
        train_data = train_data.train
    train_data = np.asarray(train_data)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(
            f"batch_size={args.batch_size} is not divisible by processes x grad_accum = "
            f"{world} x {args.grad_accum}; pick a multiple"
        )
    if train_data.ndim != 2 or train_data.shape[1] != args.seq_len + 1:
        raise ValueError(
            f"training windows have shape {train_data.shape}; expected (n, seq_len + 1) "
            f"with seq_len={args.seq_len}"
        )
    if teacher is not None:
        teacher.freeze()
    targets_fn = teacher_targets or TeacherTargets(teacher, args.teacher_top_k, Path(out_dir) / "teacher_cache" if out_dir and args.teacher_top_k else None)

    set_trainable(student, args)
    student.train()
    if args.grad_checkpoint:
        _grad_checkpoint(student)
    optimizer = make_optimizer(args)
    optimizer.init(student.trainable_parameters())
    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir else None
    start = 0
    if resume:
        if ckpt_dir is None or latest_checkpoint(ckpt_dir) is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}; run without --resume first")
        start = load_checkpoint(latest_checkpoint(ckpt_dir), student, optimizer, args.seed)

    def loss_fn(model, inputs, targets, teacher_out):
        logits = model(inputs)
        return distillation_loss(logits, teacher_out, targets, args)

    value_and_grad = nn.value_and_grad(student, loss_fn)
    micro = args.batch_size // (world * args.grad_accum)

    def step_fn(batch, step):
        local = batch[rank * micro * args.grad_accum : (rank + 1) * micro * args.grad_accum]
        grads, loss = None, mx.array(0.0)
        for j in range(args.grad_accum):
            mb = local[j * micro : (j + 1) * micro]
            inputs, targets = mb[:, :-1], mb[:, 1:]
            t_out = targets_fn(f"{step:08d}-{rank}-{j}", inputs)
            l, g = value_and_grad(student, inputs, targets, t_out)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + l
        if args.grad_accum > 1:
            grads = tree_map(lambda g: g / args.grad_accum, grads)
            loss = loss / args.grad_accum
        if world > 1:
            grads = nn.average_gradients(grads)
            loss = mx.distributed.all_sum(loss) / world
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(student, grads)
        return loss

    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(out_dir) / "train_log.jsonl" if out_dir and rank == 0 else None
    log_f = open(log_path, "a" if resume else "w") if log_path else None
    losses = []
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=args.steps, initial=start, desc="QAT", disable=not progress or rank != 0, dynamic_ncols=True)
    last_t, last_tokens = t0, 0
    try:
        batches = iterate_batches(train_data, args.batch_size, args.seed, start_step=start)
        for step, batch in batches:
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
                rec = {
                    "step": done,
                    "loss": float(np.mean(losses[-args.log_every :])),
                    "lr": float(optimizer.optimizers[2].learning_rate.item()),
                    "tokens_per_s": (tokens - last_tokens) / max(now - last_t, 1e-9),
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                last_t, last_tokens = now, tokens
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", mem=f"{rec['peak_memory_gb']:.2f}GB")
                if log_f:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                if callback:
                    callback(rec)
            if ckpt_dir and args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps and rank == 0:
                save_checkpoint(ckpt_dir, student, optimizer, done, args)
    finally:
        bar.close()
        if log_f:
            log_f.close()
    set_fake_quant(student, True)
    student.eval()
    summary = {
        "steps": args.steps,
        "resumed_from": start,
        "tokens": tokens,
        "wall_s": time.perf_counter() - t0,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "processes": world,
    }
    if val_data is not None and teacher is not None:
        from .evaluate import evaluate

        summary["val"] = evaluate(student, np.asarray(val_data), teacher)
    return summary


def args_from_dict(d: dict) -> TrainingArgs:
    names = {f.name for f in fields(TrainingArgs)}
    return TrainingArgs(**{k: v for k, v in d.items() if k in names})
