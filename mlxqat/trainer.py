"""The QAT training loop: distil the full-precision teacher into a fake-quantized student.

``train(student, teacher, train_data, val_data, args)`` runs the loop (loss,
optimizer, schedule, accumulation, data parallelism, checkpoints and resume).
The whole job behind ``python -m mlxqat.train`` is :mod:`mlxqat.job`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ._cli import (Number, finite_float, non_negative_float, non_negative_int, positive_float, positive_int,
                   unit_float)
from .data import MIN_SEQ_LEN, Dataset, iterate_batches
from .evaluate import kl_divergence, top_k_kl_divergence
from .head import HeadSplit, chunk_rows, split_head
from .io import IntegrityError, atomic_dir, atomic_file, read_manifest, remove_output, verify, work_dir, write_manifest
from .layers import FakeQuantEmbedding, FakeQuantLinear, freeze_codes, is_fake_quant, set_fake_quant
from .lora import QALoRALinear, apply_lora
from .teacher import TeacherHidden, TeacherTargets

TRAINABLE = ("all", "scales", "lora")
SCHEDULES = ("cosine", "linear", "constant")
STATE_DTYPES = ("float32", "bfloat16")
# grad_checkpoint=None turns checkpointing on when a micro-batch's activations, estimated at
# ACTIVATION_FLOATS per hidden unit, token and block (llama-like blocks), exceed GRAD_CHECKPOINT_BYTES
ACTIVATION_FLOATS = 16
GRAD_CHECKPOINT_BYTES = 512 * 2**20


def _arg(default, help: str, check: Optional[Number] = None, choices: Optional[tuple] = None):
    """A :class:`TrainingArgs` field: ``check`` / ``choices`` are enforced in ``__post_init__``
    and, for ``python -m mlxqat.train``, at parse time (its flags are built from these fields)."""
    meta = {"help": help}
    if check is not None:
        meta["check"] = check
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class TrainingArgs:
    """Settings of :func:`train`; each field is also a flag of ``python -m mlxqat.train``.

    Raises:
        ValueError: a value outside its range (named, with the range), or settings that
            contradict each other.
    """

    steps: int = _arg(100, "Optimizer steps.", positive_int)
    batch_size: int = _arg(8, "Windows per optimizer step (all processes together).", positive_int)
    seq_len: int = _arg(256, "Tokens per window.", Number(int, low=MIN_SEQ_LEN))
    learning_rate: float = _arg(1e-5, "Peak learning rate of the weights.", positive_float)
    scale_learning_rate: Optional[float] = _arg(
        None, "Peak learning rate of learned scales/biases (default: learning_rate / 10; scales are small "
        "numbers and Adam steps are absolute).", positive_float)
    lora_learning_rate: float = _arg(1e-3, "Peak learning rate of LoRA adapters.", positive_float)
    schedule: str = _arg("cosine", "cosine, linear or constant (after warmup).", choices=SCHEDULES)
    warmup_steps: int = _arg(10, "Linear warmup steps.", non_negative_int)
    min_lr_ratio: float = _arg(0.1, "Final learning rate / peak, for cosine and linear.", unit_float)
    weight_decay: float = _arg(0.0, "AdamW weight decay.", non_negative_float)
    grad_clip: float = _arg(1.0, "Clip the global gradient norm (0: off).", non_negative_float)
    grad_accum: int = _arg(1, "Micro-batches per optimizer step.", positive_int)
    grad_checkpoint: Optional[bool] = _arg(
        None, "Recompute block activations in the backward pass (default: automatic, on when a micro-batch's "
        f"activations would take more than {GRAD_CHECKPOINT_BYTES // 2**20} MB, estimated at {ACTIVATION_FLOATS} "
        "floats per hidden unit, token and block).")
    loss_chunk: Optional[int] = _arg(
        None, "Tokens whose logits the loss computes at once, each chunk recomputed in the backward pass "
        "(default: automatic, 16 MB of float32 logits per chunk and at least 64 tokens; 0: the whole "
        "micro-batch at once).",
        non_negative_int)
    optimizer_state_dtype: str = _arg(
        "bfloat16", "dtype of AdamW's moments: bfloat16 (half the memory of float32, stochastically rounded; "
        "the weights stay float32) or float32.", choices=STATE_DTYPES)
    temperature: float = _arg(1.0, "Distillation temperature.", positive_float)
    reverse_kl: float = _arg(0.0, "Weight of reverse KL in the KL mix (0: forward KL).", unit_float)
    ce_weight: float = _arg(0.0, "Weight of next-token cross-entropy added to the KL.", non_negative_float)
    trainable: str = _arg("all", "all (full QAT), scales (scales/biases only) or lora.", choices=TRAINABLE)
    lora_rank: int = _arg(8, "LoRA rank.", positive_int)
    lora_scale: float = _arg(1.0, "LoRA output multiplier.", finite_float)
    quant_delay: int = _arg(0, "First steps trained without fake quantization (fewer than --steps).",
                            non_negative_int)
    teacher_top_k: int = _arg(0, "Cache the teacher's top-k logits once and drop the teacher (0: run the "
                              "teacher every step).", non_negative_int)
    log_every: int = _arg(10, "Steps between log lines.", positive_int)
    checkpoint_every: int = _arg(0, "Steps between checkpoints (0: none).", non_negative_int)
    keep_checkpoints: int = _arg(3, "Newest checkpoints kept; older ones are deleted (0: keep all).",
                                 non_negative_int)
    seed: int = _arg(0, "Seed of the data order and adapters.", non_negative_int)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be True or False")
            if f.type == "Optional[bool]" and not isinstance(value, (bool, type(None))):
                raise ValueError(f"{f.name}={value!r} must be True or False (or None: automatic)")
            if "check" in f.metadata and value is not None:
                f.metadata["check"].check(value, f.name)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name}={value!r} is not supported; use one of {f.metadata['choices']}")
        checks = [
            (self.batch_size % self.grad_accum == 0,
             f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}"),
            (not (self.teacher_top_k and self.reverse_kl), "reverse_kl needs the full teacher; set teacher_top_k=0"),
            (self.quant_delay < self.steps,
             f"quant_delay={self.quant_delay} is not below steps={self.steps}: no step would train through "
             f"the quantizer; use a quant_delay below {self.steps} (0: quantize from the first step)"),
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
        main = _constant(peak)
    if args.warmup_steps <= 0:
        return main
    warm = optim.linear_schedule(peak / args.warmup_steps, peak, args.warmup_steps - 1) if args.warmup_steps > 1 else _constant(peak)
    return optim.join_schedules([warm, main], [args.warmup_steps])


def _constant(value: float) -> Callable:
    """A schedule that stays at ``value``; an array, as MLX's optimizers expect of a schedule."""
    return lambda _: mx.array(value, dtype=mx.float32)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


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
    (:class:`~mlxqat.teacher.TeacherHidden`).
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
    :class:`~mlxqat.teacher.TeacherHidden`, the teacher's logits are computed a chunk at
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
        from .layers import weight_released

        released = [name for name, m in student.named_modules() if weight_released(m)]
        if released:
            raise ValueError(f"{len(released)} layers (e.g. {released[0]}) have frozen codes and no float weights "
                             "left (block-wise QAT or scales-only training released them); train them with "
                             "trainable='scales'")
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


def stochastic_round(x: mx.array, dtype, key: mx.array) -> mx.array:
    """``x`` (float32) rounded to bfloat16 up or down at random, with the probability that makes
    the result's expectation ``x``: updates smaller than bfloat16's spacing survive on average."""
    if dtype != mx.bfloat16:
        return x.astype(dtype)
    noise = mx.random.randint(0, 1 << 16, x.shape, dtype=mx.uint32, key=key)
    bits = (x.astype(mx.float32).view(mx.uint32) + noise) & 0xFFFF0000  # bfloat16 is float32's top half
    return bits.view(mx.float32).astype(mx.bfloat16)


class LowPrecisionAdamW(optim.AdamW):
    """AdamW whose moments are stored in ``state_dtype``; each update is computed in float32.

    With bfloat16 the moments take half the memory. Storing them rounds stochastically
    (:func:`stochastic_round`): the second moment moves by 0.1% a step (``beta2 = 0.999``),
    below bfloat16's resolution, and round-to-nearest would freeze it. The random bits are
    a function of ``(seed, step, parameter order)``, so a resumed run rounds as an
    uninterrupted one would.
    """

    def __init__(self, *args, state_dtype=mx.bfloat16, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dtype, self.seed = state_dtype, seed
        self._key = None

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, self.state_dtype)
        state["v"] = mx.zeros(parameter.shape, self.state_dtype)

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._key = mx.random.key(self.seed * 1_000_003 + int(self.step.item()))
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b1, b2 = self.betas
        self._key, km, kv = mx.random.split(self._key, 3)
        m = state["m"] = stochastic_round(b1 * state["m"].astype(mx.float32) + (1 - b1) * gradient,
                                          self.state_dtype, km)
        v = state["v"] = stochastic_round(b2 * state["v"].astype(mx.float32) + (1 - b2) * mx.square(gradient),
                                          self.state_dtype, kv)
        # AdamW's update of the stored moments: their float32 forms are freed as soon as they are rounded
        dt = gradient.dtype
        m, v = m.astype(dt), v.astype(dt)
        lr = self.learning_rate.astype(dt)
        parameter = parameter * (1 - lr * self.weight_decay)
        if self.bias_correction:
            c1 = (lr / (1 - b1**self.step)).astype(dt)
            c2 = mx.rsqrt(1 - b2**self.step).astype(dt)
            return parameter - c1 * m / (mx.sqrt(v) * c2 + self.eps)
        return parameter - lr * m / (mx.sqrt(v) + self.eps)


class QATOptimizer(optim.MultiOptimizer):
    """AdamW with its own warmup and decay (:func:`lr_schedule`) for each kind of trained parameter.

    The parts are named: ``scales`` (learned scales and biases, ``args.scale_lr``),
    ``lora`` (adapters, ``args.lora_learning_rate``) and ``weights`` (everything
    else, ``args.learning_rate``). :attr:`learning_rate` is the weights' one, the
    rate the training log reports. Their moments are stored in ``args.optimizer_state_dtype``
    (:class:`LowPrecisionAdamW` for bfloat16).
    """

    def __init__(self, args: TrainingArgs):
        def adamw(peak):
            kw = dict(learning_rate=lr_schedule(peak, args), weight_decay=args.weight_decay)
            if args.optimizer_state_dtype == "float32":
                return optim.AdamW(**kw)
            return LowPrecisionAdamW(**kw, state_dtype=getattr(mx, args.optimizer_state_dtype), seed=args.seed)

        # the order of the parts is the order of their states in a checkpoint
        super().__init__([adamw(args.scale_lr), adamw(args.lora_learning_rate), adamw(args.learning_rate)],
                         [_is_scale, _is_lora])
        self.scales, self.lora, self.weights = self.optimizers

    @property
    def learning_rate(self) -> mx.array:
        return self.weights.learning_rate

    @learning_rate.setter
    def learning_rate(self, value) -> None:
        for o in self.optimizers:
            o.learning_rate = value


def make_optimizer(args: TrainingArgs) -> QATOptimizer:
    """The optimizer :func:`train` uses unless it is given one."""
    return QATOptimizer(args)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

TEACHER_CACHE = "teacher_cache"  # under out_dir: the top-k targets, one file per micro-batch
CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")
LATEST = "latest.json"
# Settings a resumed run must share with its checkpoint: they decide the parameters,
# the batches and what a step means. (Learning rates, logging etc. may change.)
RESUME_MUST_MATCH = ("seq_len", "batch_size", "trainable", "lora_rank", "lora_scale", "seed")


def _recipe_dict(student: nn.Module) -> Optional[dict]:
    from .convert import recipe_of  # read from the layers' own specs

    recipe = recipe_of(student)
    return recipe.to_dict() if recipe is not None else None


def save_checkpoint(directory: Path, student: nn.Module, optimizer, step: int, args: TrainingArgs) -> Path:
    """Atomically write trainable parameters, optimizer state and position at ``step``.

    The checkpoint directory carries a sha256 manifest (``mlxqat.json``, kind
    ``"checkpoint"``), written last; ``latest.json`` then points at it, and
    checkpoints beyond the newest ``args.keep_checkpoints`` are deleted.
    """
    directory = Path(directory)
    dest = directory / f"step_{step:07d}"
    with atomic_dir(dest) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(student.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        with open(tmp / "state.json", "w") as f:
            # The data order is a function of (seed, step) and nothing else draws
            # random numbers after set-up, so (seed, step) is the whole RNG state.
            json.dump({"step": step, "args": asdict(args), "recipe": _recipe_dict(student),
                       "rng": {"seed": args.seed, "data_step": step}}, f)
        write_manifest(tmp, {"step": step}, kind="checkpoint")
    with atomic_file(directory / LATEST, "w", check=False) as f:  # inside our work directory
        json.dump({"checkpoint": dest.name, "step": step}, f)
    prune_checkpoints(directory, args.keep_checkpoints)
    return dest


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The checkpoint ``latest.json`` names, or ``None`` when there is no ``latest.json``.

    Raises:
        ValueError: ``latest.json`` is damaged or names a checkpoint that is not there.
    """
    directory = Path(directory)
    p = directory / LATEST
    if not p.exists():
        return None
    fix = f"delete {directory} to start over, or run without --resume"
    try:
        name = json.loads(p.read_text(encoding="utf-8"))["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, not {"checkpoint": ...}
        raise ValueError(f"{p} is damaged ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{p} names {name!r}, not a checkpoint directory like 'step_0000100'; {fix}")
    if not (directory / name).is_dir():
        raise ValueError(f"{p} names {name}, but {directory / name} does not exist; {fix}")
    return directory / name


def _is_our_checkpoint(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir() or not CHECKPOINT_NAME.fullmatch(path.name):
        return False
    try:
        return read_manifest(path).get("kind") == "checkpoint"
    except (OSError, ValueError, AttributeError):
        return False


def prune_checkpoints(directory: Path, keep: int) -> List[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``directory`` (``keep=0``: none).

    Only directories this module wrote are touched (named ``step_NNNNNNN`` with a
    manifest of kind ``"checkpoint"``), and never the one ``latest.json`` names.

    Returns:
        The deleted directories.
    """
    directory = Path(directory)
    if keep <= 0:
        return []
    try:
        current = latest_checkpoint(directory)
    except ValueError:
        return []  # no trustworthy pointer: delete nothing
    ours = sorted((int(CHECKPOINT_NAME.fullmatch(p.name).group(1)), p)
                  for p in directory.iterdir() if _is_our_checkpoint(p))
    deleted = []
    for _, p in ours[:-keep]:
        if current is not None and p.name == current.name:
            continue
        remove_output(p)
        deleted.append(p)
    return deleted


def _recipe_difference(old: dict, new: dict) -> str:
    """``"recipe 'int4' vs 'int3'"`` or the spec fields that differ (``learn_scales=True vs False``)."""
    if old.get("name") != new.get("name"):
        return f"recipe {old.get('name')!r}, this run has recipe {new.get('name')!r}"
    a, b = old.get("default") or {}, new.get("default") or {}
    diffs = [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"recipe {old.get('name')!r} with " + (", ".join(diffs) or "other overrides or skip patterns")


def _check_resumable(path: Path, state: dict, args: TrainingArgs, recipe: Optional[dict]) -> None:
    """Refuse to continue a checkpoint with settings that would make another run of it."""
    fix = "or run without --resume to start over"
    saved = state.get("args") or {}
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"checkpoint {path} was written with {name}={saved[name]!r}, this run has "
                f"{name}={getattr(args, name)!r}; resume with {flag} {saved[name]}, {fix}"
            )
    old_recipe = state.get("recipe")
    if old_recipe is not None and recipe is not None and old_recipe != recipe:
        raise ValueError(
            f"checkpoint {path} was written with {_recipe_difference(old_recipe, recipe)}; resume with "
            f"the same --recipe and --learn-scales/--scale-init/--scale-dtype, {fix}"
        )
    if args.steps < state["step"]:
        raise ValueError(
            f"--steps {args.steps} is below the step of checkpoint {path} ({state['step']}); "
            f"use --steps {state['step']} or more, {fix}"
        )


def check_checkpoint(path: Path, args: Optional[TrainingArgs] = None, recipe: Optional[dict] = None) -> dict:
    """Verify a checkpoint's files and, given ``args`` / ``recipe``, that it can be resumed with them.

    Returns:
        Its ``state.json``.

    Raises:
        ValueError: the checkpoint is damaged (its files do not match its manifest),
            or ``args`` / ``recipe`` differ from the ones it was written with.
    """
    path = Path(path)
    fix = f"delete {path.parent} to start over, or run without --resume"
    try:
        verify(path)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint {path} is incomplete ({e}); {fix}") from None
    except IntegrityError as e:
        detail = "; ".join(getattr(e, "problems", None) or [str(e)])
        raise ValueError(f"checkpoint {path} is damaged, its files do not match its manifest ({detail}); {fix}") from None
    except (ValueError, KeyError, TypeError) as e:  # bad JSON in state.json
        raise ValueError(f"checkpoint {path} is damaged ({e}); {fix}") from None
    if args is not None:
        _check_resumable(path, state, args, recipe)
    return state


def resume_point(out_dir: Path, args: TrainingArgs, recipe: Optional[dict] = None) -> Path:
    """The checkpoint ``--resume`` would continue from, checked against ``args`` (before any work).

    Raises:
        FileNotFoundError: no checkpoint under ``out_dir``.
        ValueError: see :func:`check_checkpoint`.
    """
    ckpt_dir = Path(out_dir) / "checkpoints"
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}; run without --resume first")
    check_checkpoint(latest, args, recipe)
    return latest


def load_checkpoint(path: Path, student: nn.Module, optimizer, args: Optional[TrainingArgs] = None) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step.

    Raises:
        ValueError: see :func:`check_checkpoint`; or its tensors do not fit the student.
    """
    path = Path(path)
    state = check_checkpoint(path, args, _recipe_dict(student))
    params = mx.load(str(path / "trainable.safetensors"))
    expected = {k for k, _ in tree_flatten(student.trainable_parameters())}
    if set(params) != expected:
        raise ValueError(
            f"checkpoint {path} does not match this model/recipe "
            f"({len(set(params) ^ expected)} parameter names differ); resume with the same settings"
        )
    student.load_weights(list(params.items()), strict=False)
    optimizer.init(student.trainable_parameters())
    # moments saved in another dtype (optimizer_state_dtype changed) continue in this run's
    fresh = dict(tree_flatten(optimizer.state))
    saved = {k: v.astype(fresh[k].dtype) if k in fresh and v.dtype != fresh[k].dtype else v
             for k, v in mx.load(str(path / "optimizer.safetensors")).items()}
    optimizer.state = tree_unflatten(list(saved.items()))
    return int(state["step"])


# ---------------------------------------------------------------------------
# Checks before training
# ---------------------------------------------------------------------------


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


def _check_inputs(student: nn.Module, train_data: np.ndarray, val_data, args: TrainingArgs, world: int) -> None:
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
    if train_data.ndim != 2 or train_data.shape[1] != args.seq_len + 1:
        raise ValueError(
            f"training windows have shape {train_data.shape}; expected (n, seq_len + 1) "
            f"with seq_len={args.seq_len}"
        )
    if not np.issubdtype(train_data.dtype, np.integer):
        raise ValueError(f"training windows are {train_data.dtype}; expected integer token ids")
    vocab = _vocab_rows(student)
    _check_token_ids(train_data, vocab, "training")
    _check_token_ids(None if val_data is None else np.asarray(val_data), vocab, "validation")
    if vocab is not None and args.teacher_top_k > vocab:
        raise ValueError(f"teacher_top_k={args.teacher_top_k} exceeds the vocabulary of {vocab} tokens; "
                         f"use at most {vocab}")


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


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


def _micro_batches(batch, step: int, args: TrainingArgs, rank: int, world: int):
    """``(key, inputs, targets)`` of each micro-batch this process trains on at ``step``; ``key`` names
    its teacher targets (:class:`~mlxqat.teacher.TeacherTargets`)."""
    micro = args.batch_size // (world * args.grad_accum)
    local = batch[rank * micro * args.grad_accum : (rank + 1) * micro * args.grad_accum]
    for j in range(args.grad_accum):
        mb = local[j * micro : (j + 1) * micro]
        yield f"{step:08d}-{rank}-{j}", mb[:, :-1], mb[:, 1:]


def prefill_teacher_targets(targets: TeacherTargets, train_data: np.ndarray, args: TrainingArgs, *, start: int = 0,
                            rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Compute (and cache) the teacher's top-k targets of every micro-batch of steps ``start .. args.steps - 1``,
    as :func:`train` will ask for them; afterwards training with ``targets`` runs no teacher.

    Returns:
        How many micro-batches ran the teacher (the others were cached already).

    Raises:
        ValueError: ``targets`` has no ``top_k`` (live logits cannot be cached).
    """
    from tqdm import tqdm

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
        optimizer: an MLX optimizer (default: :class:`QATOptimizer` from ``args``); the
            log reports its ``learning_rate``, and checkpoints hold its state.
        loss: ``loss(model, inputs, targets, teacher_out) -> scalar``, where ``teacher_out``
            is the teacher's logits or, with ``teacher_top_k``, ``(top_k_logits, top_k_ids)``
            (default: :func:`default_loss`, the distillation loss ``args`` describe).
        out_dir: where checkpoints (``checkpoints/``) and ``train_log.jsonl`` go.
        resume: continue from the newest checkpoint in ``out_dir``; it must have been
            written with the same recipe, seq_len, batch_size, trainable mode and seed.
        callback: called with every logged record (dict).
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
    _check_inputs(student, train_data, val_data, args, world)
    if teacher is not None:
        teacher.freeze()
    optimizer = optimizer if optimizer is not None else make_optimizer(args)
    start = _start(student, optimizer, args, out_dir, resume)
    loss = loss or default_loss(args, student)
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
        from .evaluate import evaluate

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
    return load_checkpoint(resume_point(out_dir, args, _recipe_dict(student)), student, optimizer, args)


def _loop(student, optimizer, step_fn, train_data, args: TrainingArgs, start: int, ckpt_dir, log_f,
          callback, progress: bool, rank: int):
    """Steps ``start .. args.steps - 1``: log, call back, checkpoint. Returns ``(losses, tokens, t0)``."""
    from tqdm import tqdm

    losses = []
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(total=args.steps, initial=start, desc="QAT", disable=not progress or rank != 0, dynamic_ncols=True)
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


def args_from_dict(d: dict) -> TrainingArgs:
    names = {f.name for f in fields(TrainingArgs)}
    return TrainingArgs(**{k: v for k, v in d.items() if k in names})
