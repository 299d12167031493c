"""The settings of a training run: :class:`TrainingArgs`, every field a checked ``--flag`` of ``python -m mlxqat.train``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from .._cli import (Number, finite_float, non_negative_float, non_negative_int, positive_float, positive_int,
                    unit_float)
from ..data import MIN_SEQ_LEN

TRAINABLE = ("all", "scales", "lora", "quantized")


SCHEDULES = ("cosine", "linear", "constant")


STATE_DTYPES = ("float32", "bfloat16")


SCALE_STEPS = ("absolute", "relative")


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
    scale_step: str = _arg(
        "absolute", "How far a learned scale or offset moves per step: absolute (the scales' learning rate, in "
        "the scales' own units) or relative (the learning rate times the magnitude of its group's scale, so every "
        "group, layer and format moves by the same fraction of its quantization step).", choices=SCALE_STEPS)
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
    trainable: str = _arg("all", "all (full QAT), scales (scales/biases only), lora, or quantized (the fake-quant "
                          "layers' weights and scales/biases; norms and other float parameters frozen).",
                          choices=TRAINABLE)
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


def args_from_dict(d: dict) -> TrainingArgs:
    names = {f.name for f in fields(TrainingArgs)}
    return TrainingArgs(**{k: v for k, v in d.items() if k in names})
