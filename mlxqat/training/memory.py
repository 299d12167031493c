"""How much memory a QAT run needs, known before it starts, and which settings fit a machine.

:func:`estimate` gives the peak bytes of ``python -m mlxqat.train`` from the
model's shape (:class:`ModelShape`, read from ``config.json`` or a GGUF file's
metadata without loading a weight) and the training settings
(:class:`~mlxqat.training.args.TrainingArgs`). Its parts:

* what stays resident: the student's float32 weights and learned scales, the
  teacher (float32; only its head and a few hidden states once its top-k
  targets are cached), the AdamW moments and the gradients of what trains;
* what one training step adds on top, while it runs: activations kept for the
  backward pass (every block's, or one block's plus each block's input with
  gradient checkpointing), fake-quantized weights, the logits of one chunk of
  tokens of the loss and the teacher's logits.

The resident parts are counted exactly. The per-step parts are sizes the code
computes (tokens x hidden size x blocks, tokens x vocabulary, a block's
weights, ...) times factors fitted to peaks MLX measured
(``mx.get_peak_memory()``) on models from 4M to 135M parameters, by
``benchmarks/memory.py``, which also checks the estimate against measured
peaks. Evaluation (the before/after table) is a phase of its own:
:func:`mlxqat.evaluate.evaluate` holds at most
:data:`~mlxqat.evaluate.EVAL_LOGIT_BYTES` of logits per batch.

:func:`fitting_settings` lists the changes (gradient checkpointing, a
micro-batch, a top-k teacher cache, block-wise training) that bring a run under
a memory limit; ``python -m mlxqat.train --memory-limit GB`` refuses, before
any work, a run whose estimate is over the limit and prints them.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..data import config_context
from ..evaluate import eval_batch_size
from ..gguf.format import Metadata, is_gguf_file, read_gguf
from ..gguf.reader import gguf_config
from ..head import chunk_rows
from ..stdlib_data import embedded_model_path
from ..storage.load import check_config, resolve_model_path
from .args import TrainingArgs
from .loop import needs_grad_checkpoint, train, uses_grad_checkpoint
from .qat import prepare_qat, release_teacher, shared_student

GB = 1e9

# Factors of the per-step parts, by what trains; fitted by `python benchmarks/memory.py --fit`
# (non-negative least squares on relative error) on the measured peaks of benchmarks/results/memory.json.
# Each multiplies a float32 size: "inter" tokens x blocks x intermediate size, "scores" tokens x blocks x
# heads x sequence length, "hidden" tokens x blocks x hidden size (blocks: 1 with checkpointing),
# "inputs" tokens x hidden x all blocks (checkpointing only), "fake_quant" blocks x a block's weights,
# "embedding" vocabulary x hidden, "logits" loss-chunk tokens x vocabulary, "teacher_logits"
# chunk tokens x vocabulary (a live teacher's logits, computed a chunk at a time like the student's).
FACTORS: Dict[str, Dict[str, float]] = {
    "all": dict(hidden=0.0, inter=3.54, scores=4.04, inputs=1.42, fake_quant=1.45, embedding=0.0, logits=1.57, teacher_logits=2.17, batch_logits=2.82, update=0.0),
    "scales": dict(hidden=0.0, inter=5.99, scores=2.6, inputs=0.0, fake_quant=1.84, embedding=0.0, logits=2.9, teacher_logits=3.44, batch_logits=2.59, update=0.0),
    "lora": dict(hidden=0.0, inter=3.39, scores=0.0, inputs=0.0, fake_quant=1.72, embedding=0.0, logits=1.83, teacher_logits=3.52, batch_logits=4.34, update=0.0),
}
FACTORS["quantized"] = FACTORS["all"]  # the same steps, with the few float parameters (norms) frozen
EVAL_FACTOR = 5.0  # float32 logit-sized arrays evaluation holds at once (student, teacher, their softmaxes, KL)
BLOCK_FACTOR = 4.0  # a block's weight-sized temporaries while it trains alone (fake-quantized weights, update)


class DoesNotFit(ValueError):
    """A run's estimated peak memory is over the limit (the message names settings that fit)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    name: str = ""
    weight_bytes: int = 4  # bytes of a block weight as the checkpoint stores it (2: bfloat16/float16)
    context: Optional[int] = None  # the longest sequence it was built for, when the config says

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        """From an mlx-lm / Hugging Face ``config.json`` dict (a ``text_config`` inside it wins)."""
        c = dict(config, **(config.get("text_config") or {}))
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            return cls(layers=int(c["num_hidden_layers"]), hidden=hidden, intermediate=int(c["intermediate_size"]),
                       heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                       head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]),
                       tied=bool(c.get("tie_word_embeddings", str(c.get("model_type", "")).startswith("gemma"))),
                       name=name or str(c.get("_name_or_path", "")),
                       weight_bytes=2 if str(c.get("torch_dtype") or c.get("dtype")) in ("bfloat16", "float16") else 4,
                       context=config_context(c))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the model's config has no usable {e} for a memory estimate (it needs hidden_size, "
                             "num_hidden_layers, intermediate_size, num_attention_heads and vocab_size)") from None

    @property
    def block_linear(self) -> int:
        """Weights of one block's linear layers (attention and MLP)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden  # two RMS norms a block, one at the end
        return self.layers * self.block_linear + self.embedding * (1 if self.tied else 2) + norms


def read_shape(model=None) -> ModelShape:
    """The shape of a model directory, GGUF file or the embedded model (``None``), from its
    config or metadata alone: no weight is read."""

    if model is None:

        model = embedded_model_path()
    if is_gguf_file(model):

        reader = read_gguf(Path(model))
        config = gguf_config(Metadata(reader, Path(model)), {t.name: t for t in reader.tensors})
        config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}  # read as float32
    else:

        config = check_config(resolve_model_path(model))
    return ModelShape.from_config(config, name=Path(str(model)).name)


@dataclass
class MemoryEstimate:
    """Peak bytes of a run, by part (``parts``) and in all (``total``)."""

    parts: Dict[str, float]
    params: int
    phase: str
    cache_bytes: float = 0.0  # block-wise: float16 calibration activations (memory-mapped files)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.params

    def describe(self) -> str:
        """One line: the total, bytes per parameter, the phase and the largest parts."""
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:4]
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in top if v > 0)
        cache = f"; + {self.cache_bytes / GB:.2f} GB float16 activations on disk" if self.cache_bytes else ""
        return (f"estimated peak memory {self.total / GB:.2f} GB ({self.bytes_per_param:.1f} bytes/parameter, "
                f"{self.phase}): {parts} GB{cache}")


def _quantized_count(shape: ModelShape) -> int:
    """Weights a recipe quantizes: every block's linear layers, the embedding and (untied) the head."""
    return shape.layers * shape.block_linear + shape.embedding * (1 if shape.tied else 2)


def _scale_count(shape: ModelShape, group_size: int) -> int:
    return 2 * _quantized_count(shape) // group_size  # a scale and a bias per group


def trainable_count(shape: ModelShape, trainable: str, group_size: int = 64, lora_rank: int = 8) -> int:
    """Parameters that get gradients and AdamW moments in a ``trainable`` mode (learned scales assumed)."""
    if trainable in ("all", "quantized"):
        return shape.params + _scale_count(shape, group_size)
    if trainable == "scales":
        return _scale_count(shape, group_size)
    if trainable == "lora":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        io = 2 * (shape.hidden + q) + 2 * (shape.hidden + kv) + 3 * (shape.hidden + shape.intermediate)
        return shape.layers * lora_rank * io
    raise ValueError(f"trainable={trainable!r}: use 'all', 'quantized', 'scales' or 'lora'")


def model_bytes(shape: ModelShape, held: bool = False) -> float:
    """The float32 model's bytes; ``held``: its block weights in the checkpoint's own type
    (:func:`mlxqat.training.blockwise.hold_weights`, block-wise QAT)."""
    blocks = shape.layers * shape.block_linear
    return (shape.weight_bytes if held else 4.0) * blocks + 4.0 * (shape.params - blocks)


def _teacher_bytes(shape: ModelShape, args, kept_windows: int, held: bool = False) -> float:
    if not args.teacher_top_k:
        return model_bytes(shape, held)
    return 4.0 * shape.embedding + 4.0 * kept_windows * args.seq_len * shape.hidden  # its head, kept hidden states


def _step_parts(shape: ModelShape, args, factors: Dict[str, float], checkpointed: bool,
                trained: int) -> Dict[str, float]:

    tokens = args.batch_size // args.grad_accum * args.seq_len
    rows = chunk_rows(shape.vocab, tokens, args.loss_chunk)
    blocks = 1 if checkpointed else shape.layers
    size = {
        "hidden": 4.0 * tokens * blocks * shape.hidden,
        "inter": 4.0 * tokens * blocks * shape.intermediate,
        "scores": 4.0 * tokens * blocks * shape.heads * args.seq_len,
        "inputs": 4.0 * tokens * shape.hidden * shape.layers if checkpointed else 0.0,
        "fake_quant": 4.0 * blocks * shape.block_linear,
        "embedding": 4.0 * shape.embedding,
        "logits": 4.0 * rows * shape.vocab,
        "teacher_logits": 0.0 if args.teacher_top_k else 4.0 * rows * shape.vocab,  # live: chunk by chunk
        "batch_logits": 4.0 * tokens * shape.vocab,
        "update": 4.0 * trained,
    }
    f = {k: factors[k] * v for k, v in size.items()}
    return {"activations": f["hidden"] + f["inter"] + f["scores"] + f["inputs"],
            "fake-quantized weights": f["fake_quant"] + f["embedding"],
            "logits": f["logits"] + f["teacher_logits"] + f["batch_logits"],
            "optimizer update": f["update"]}


def student_bytes(shape: ModelShape, trainable: str, group_size: int = 64, bits: int = 4) -> float:
    """What the student holds beyond the teacher's arrays it shares (:func:`mlxqat.training.qat.shared_student`):
    its own float32 weights once they train (``all``), or packed codes where codes are frozen
    (``scales``: the float weights are released), plus learned scales and biases."""
    if trainable in ("all", "quantized"):
        return 4.0 * (shape.params + _scale_count(shape, group_size))
    if trainable == "scales":
        return _quantized_count(shape) * bits / 8 + 4.0 * _scale_count(shape, group_size)
    return 0.0  # lora: the base stays the teacher's arrays; the adapters are counted as trained


def training_estimate(shape: ModelShape, args, *, group_size: int = 64, bits: int = 4,
                      kept_windows: int = 0, held: bool = False) -> MemoryEstimate:
    """Peak bytes of :func:`mlxqat.training.loop.train` on a student prepared by :func:`mlxqat.training.qat.prepare_qat`
    (``held``: the teacher's block weights in the checkpoint's own type, as block-wise QAT keeps them)."""

    trained = trainable_count(shape, args.trainable, group_size, args.lora_rank)
    moments = 2 if args.optimizer_state_dtype == "bfloat16" else 4
    # the teacher's arrays the student still holds once the teacher is released (top-k targets):
    # all of them under LoRA; under "scales" only the few it does not quantize (norms)
    shared = 4.0 * shape.params if args.trainable == "lora" and args.teacher_top_k else 0.0
    parts = {
        "student weights": student_bytes(shape, args.trainable, group_size, bits) + shared,
        "teacher": _teacher_bytes(shape, args, kept_windows, held),
        "optimizer moments": 2.0 * moments * trained,
        "gradients": 4.0 * trained * (2 if args.grad_accum > 1 else 1),
    }
    checkpointed = needs_grad_checkpoint(shape.layers, shape.hidden, args)
    parts.update(_step_parts(shape, args, FACTORS[args.trainable], checkpointed, trained))
    return MemoryEstimate(parts, shape.params, f"QAT steps, trainable={args.trainable}"
                          + (", checkpointed" if checkpointed else ""))


def evaluation_estimate(shape: ModelShape, seq_len: int, *, student: float = 0.0, held: bool = False) -> MemoryEstimate:
    """Peak bytes of :func:`mlxqat.evaluate.evaluate` against the float32 teacher, for a model holding
    ``student`` bytes of its own beyond the teacher's arrays (0: round-to-nearest on shared weights)."""

    batch = eval_batch_size(shape.vocab, seq_len)
    parts = {"teacher": model_bytes(shape, held), "student weights": student,
             "logits": EVAL_FACTOR * 4.0 * batch * seq_len * shape.vocab}
    return MemoryEstimate(parts, shape.params, "evaluation")


def blockwise_estimate(shape: ModelShape, args, *, group_size: int = 64, bits: int = 4, block_batch_size: int = 4,
                       calibration_windows: int = 0) -> MemoryEstimate:
    """Peak bytes of the block phase of :func:`mlxqat.training.blockwise.blockwise_qat` in the job: the model's
    weights once (the teacher and the student share them until a block trains; a trained block keeps
    packed codes; block weights in the checkpoint's own type, :func:`mlxqat.training.blockwise.hold_weights`),
    learned scales, one block's float32 copy and training state, and activations."""
    moments = 2 if args.optimizer_state_dtype == "bfloat16" else 4
    block = shape.block_linear + 2 * shape.block_linear // group_size
    tokens = block_batch_size * args.seq_len
    parts = {
        "model weights (teacher and student share them)": model_bytes(shape, held=True),
        "learned scales": 4.0 * _scale_count(shape, group_size),
        "trained blocks' packed codes": shape.layers * shape.block_linear * bits / 8,
        "block training state": block * (4.0 + 2.0 * moments + 4.0 * BLOCK_FACTOR)
                                + 4.0 * shape.block_linear,  # its float32 copy
        "activations": 4.0 * tokens * (FACTORS["all"]["inter"] * shape.intermediate
                                       + FACTORS["all"]["scores"] * shape.heads * args.seq_len + 4 * shape.hidden),
    }
    cache = 2.0 * 2 * calibration_windows * args.seq_len * shape.hidden  # two float16 streams
    return MemoryEstimate(parts, shape.params, "block-wise block phase", cache)


def estimate(shape: ModelShape, args=None, *, method: str = "qat", group_size: int = 64, bits: int = 4,
             eval_seq_len: Optional[int] = None, kept_windows: int = 0, block_batch_size: int = 4,
             calibration_windows: int = 0) -> MemoryEstimate:
    """The peak of a whole ``python -m mlxqat.train`` run: the largest of its phases.

    Args:
        shape: the model's :class:`ModelShape`.
        args: :class:`~mlxqat.training.args.TrainingArgs` (default: its defaults).
        method: ``"qat"`` or ``"blockwise"`` (a block phase, then scales end to end).
        group_size, bits: the recipe's quantization group size and (widest) bit width.
        eval_seq_len: evaluation's window length (default: ``args.seq_len``).
        kept_windows: windows whose teacher hidden states stay in memory with a top-k cache.
        block_batch_size, calibration_windows: the block phase's batch and calibration windows.

    Returns:
        The :class:`MemoryEstimate` of the phase with the highest peak (its ``phase`` names it).
    """

    args = args or TrainingArgs()
    if method not in ("qat", "blockwise"):
        raise ValueError(f"method={method!r}: use 'qat' or 'blockwise'")
    trainable = "scales" if method == "blockwise" else args.trainable
    held = method == "blockwise"
    phases = [evaluation_estimate(shape, eval_seq_len or args.seq_len,
                                  student=student_bytes(shape, trainable, group_size, bits), held=held)]
    if method == "blockwise":
        phases.append(blockwise_estimate(shape, args, group_size=group_size, bits=bits, block_batch_size=block_batch_size,
                                         calibration_windows=calibration_windows))
        args = dataclasses.replace(args, trainable="scales")
    phases.append(training_estimate(shape, args, group_size=group_size, bits=bits, kept_windows=kept_windows,
                                    held=held))
    peak = max(phases, key=lambda e: e.total)
    peak.cache_bytes = max(p.cache_bytes for p in phases)
    return peak


def machine_memory() -> int:
    """Bytes of memory a run may use here: Metal's recommended working set on a Mac, else the
    machine's physical memory."""
    try:

        info = mx.metal.device_info() if mx.metal.is_available() else {}
        if info.get("max_recommended_working_set_size"):
            return int(info["max_recommended_working_set_size"])
    except Exception:  # noqa: BLE001  (no Metal backend: the OS knows)
        pass
    if sys.platform == "darwin":
        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout.strip())
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fitting_settings(shape: ModelShape, args, limit: float, **kw) -> List[Tuple[str, MemoryEstimate]]:
    """Changes to ``args`` that bring the estimate under ``limit`` bytes, as ``[(flags, estimate)]``:
    the first of gradient checkpointing, a top-k teacher cache and smaller micro-batches (added in
    that order) that fits, and block-wise mode when it fits. The flags are ``python -m mlxqat.train``'s."""
    steps = [("--grad-checkpoint", dict(grad_checkpoint=True)), ("--teacher-top-k 64", dict(teacher_top_k=64))]
    changed, flags, candidates = {}, [], []
    for flag, change in steps:
        if all(getattr(args, k) == v for k, v in change.items()):
            continue
        changed.update(change)
        flags.append(flag)
        candidates.append((" ".join(flags), dataclasses.replace(args, **changed)))
    accum = args.grad_accum
    while args.batch_size // accum > 1 and args.batch_size % (accum * 2) == 0:
        accum *= 2
        candidates.append((" ".join(flags + [f"--grad-accum {accum}"]),
                           dataclasses.replace(args, **changed, grad_accum=accum)))
    out = []
    for label, a in candidates:
        e = estimate(shape, a, **kw)
        if e.total <= limit:
            out.append((label, e))
            break
    for label, a in (("--method blockwise", args), ("--method blockwise --teacher-top-k 64",
                                                    dataclasses.replace(args, teacher_top_k=64))):
        e = estimate(shape, a, method="blockwise", **kw)
        if e.total <= limit:
            out.append((label, e))
            break
    return out


def measure_training(build, windows, recipe="int4", **training_kwargs) -> dict:
    """The measured peak of QAT steps as the job runs them, for checking :func:`estimate`.

    ``build()`` returns ``(teacher, config)``: the float32 model and its mlx-lm config; the
    student shares the teacher's weights (:func:`mlxqat.training.qat.shared_student`), is prepared (:func:`mlxqat.training.qat.prepare_qat`), the teacher released to its top-k cache when
    ``teacher_top_k`` is set (:func:`mlxqat.training.qat.release_teacher`), then
    :func:`mlxqat.training.loop.train` runs on ``windows`` with ``training_kwargs``.

    Returns:
        ``{"peak": bytes, "params", "args", "checkpointed", "s_per_step", "final_loss"}``: ``peak``
        is MLX's peak allocation (``mx.get_peak_memory()``) less what was allocated before ``build``.
    """



    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    teacher, config = build()
    teacher.freeze()
    student = shared_student(teacher, config)
    params = sum(v.size for _, v in tree_flatten(teacher.parameters()))
    _, args = prepare_qat(student, windows, recipe, **training_kwargs)
    mx.eval(student.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run" if args.teacher_top_k else None
        if work is not None:
            teacher = release_teacher(teacher, windows, None, args, work, progress=False)
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        summary = train(student, teacher, windows, args=args, progress=False, out_dir=work)
        seconds = time.perf_counter() - t0
    return {"peak": mx.get_peak_memory() - base, "params": params, "args": args,
            "checkpointed": uses_grad_checkpoint(student, args), "s_per_step": seconds / args.steps,
            "final_loss": summary["final_loss"]}
