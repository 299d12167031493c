"""How much memory a QAT run needs, before it starts, and which settings fit a machine.

:func:`estimate` models the peak bytes of a run from the model's shape
(:class:`ModelShape`: parameters, hidden size, layers, vocabulary) and the
training settings (:class:`~mlxqat.trainer.TrainingArgs`): float32 weights of
the student and, while it is resident, the teacher; gradients and AdamW
moments of what trains; the fake-quantized weights a forward pass computes;
activations (all blocks, or one block's and every block's input with gradient
checkpointing); and the logits of the loss (one chunk of tokens at a time, plus
the teacher's targets). Block-wise QAT (:mod:`mlxqat.blockwise`) holds one
block's training state next to the frozen model, and its float16 calibration
activations are reported apart.

The per-token activation factors and the transient factors are measured, not
derived: ``benchmarks/memory.py`` fits them on small models and checks the
estimate against ``mx.get_peak_memory()`` on the embedded model, SmolLM2-135M and
a randomly initialized ~0.5B llama. :func:`fitting_settings` lists the changes
(micro-batch, gradient checkpointing, moments in bfloat16, a top-k teacher cache,
block-wise mode) that bring a run under a memory limit; ``python -m
mlxqat.train`` prints the estimate and refuses, before any work, a run that
does not fit.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

GB = 1e9

# Measured factors (benchmarks/memory.py fits them; float32 elements unless stated).
ACT_PER_TOKEN_HIDDEN = 14.0  # stored activations per token of one block, in units of the hidden size
ACT_PER_TOKEN_INTER = 6.0  # ... of the MLP's intermediate size
ACT_PER_TOKEN_SCORES = 3.0  # ... of (heads x sequence length): attention scores and their softmax
FAKE_QUANT_COPIES = 2.0  # fake-quantized weight copies per quantized block weight kept for the backward pass
LOGIT_COPIES = 4.0  # float32 logit-sized temporaries of the loss and its backward, per token of a chunk
UPDATE_COPIES = 1.0  # trained weights written anew by an optimizer step while the old ones live
EVAL_LOGIT_COPIES = 3.0  # logit-sized temporaries of evaluation (student, teacher, KL), per token


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
    params_override: Optional[int] = None  # the exact count, when counted on a loaded model

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        """From an mlx-lm / Hugging Face ``config.json`` dict."""
        c = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            shape = cls(layers=int(c["num_hidden_layers"]), hidden=hidden, intermediate=int(c["intermediate_size"]),
                        heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                        head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]),
                        tied=bool(c.get("tie_word_embeddings", c.get("model_type", "").startswith("gemma"))),
                        name=name or c.get("_name_or_path", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"config has no usable {e} for a memory estimate (needs hidden_size, num_hidden_layers, "
                             "intermediate_size, num_attention_heads, vocab_size)") from None
        return shape

    @classmethod
    def from_model(cls, model, name: str = "") -> "ModelShape":
        """From a loaded mlx-lm model (its ``args``), with its exact parameter count."""
        from mlx.utils import tree_flatten

        args = model.args
        config = {k: getattr(args, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                 "num_attention_heads", "vocab_size") if hasattr(args, k)}
        config.update(num_key_value_heads=getattr(args, "num_key_value_heads", None),
                      head_dim=getattr(args, "head_dim", None), model_type=getattr(args, "model_type", ""),
                      tie_word_embeddings=getattr(args, "tie_word_embeddings", True))
        n = sum(v.size for k, v in tree_flatten(model.parameters())
                if not k.endswith((".scales", ".biases", ".act_scale", ".lora_a", ".lora_b")))
        return dataclasses.replace(cls.from_config(config, name), params_override=int(n))

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
        if self.params_override is not None:
            return self.params_override
        norms = self.layers * (4 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.layers * self.block_linear + self.embedding * (1 if self.tied else 2) + norms

    @property
    def quantized(self) -> int:
        """Weights a recipe quantizes: every linear layer, the head and the embedding."""
        return self.layers * self.block_linear + self.embedding * (1 if self.tied else 2)


@dataclass
class MemoryEstimate:
    """Peak bytes of a run, by part (``parts``) and in all (``total``)."""

    parts: Dict[str, float]
    params: int
    method: str
    cache_bytes: float = 0.0  # block-wise: float16 calibration activations (on disk when streamed)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.params

    def describe(self) -> str:
        """One line: the total, bytes per parameter and the largest parts."""
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:4]
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in top if v > 0)
        cache = f"; + {self.cache_bytes / GB:.2f} GB float16 activation cache" if self.cache_bytes else ""
        return (f"estimated peak {self.total / GB:.2f} GB ({self.bytes_per_param:.1f} bytes/parameter, "
                f"{self.method}): {parts} GB{cache}")


def _moment_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def trainable_params(shape: ModelShape, trainable: str, group_size: int = 64, lora_rank: int = 8,
                     learn_scales: bool = True) -> int:
    """Parameters that get gradients and optimizer state in a ``trainable`` mode."""
    scales = 2 * shape.quantized // group_size if learn_scales else 0  # a scale and a bias per group
    if trainable == "all":
        return shape.params + scales
    if trainable == "scales":
        return scales
    if trainable == "lora":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        io = (shape.hidden + q) * 2 + (shape.hidden + kv) * 2 + 3 * (shape.hidden + shape.intermediate)
        return shape.layers * lora_rank * io
    raise ValueError(f"trainable={trainable!r}: use 'all', 'scales' or 'lora'")


def _block_activations(shape: ModelShape, batch: int, seq_len: int) -> float:
    tokens = batch * seq_len
    per_token = (ACT_PER_TOKEN_HIDDEN * shape.hidden + ACT_PER_TOKEN_INTER * shape.intermediate
                 + ACT_PER_TOKEN_SCORES * shape.heads * seq_len)
    return 4.0 * tokens * per_token


def estimate(shape: ModelShape, args=None, *, method: str = "qat", teacher_resident: Optional[bool] = None,
             group_size: int = 64, learn_scales: bool = True, calibration_windows: int = 0) -> MemoryEstimate:
    """Peak bytes of a QAT run of ``shape`` with ``args`` (:class:`~mlxqat.trainer.TrainingArgs`).

    Args:
        method: ``"qat"`` (the whole model trains through the quantizer, ``args.trainable``) or
            ``"blockwise"`` (one block at a time, then scales end to end).
        teacher_resident: whether the teacher's float32 weights stay in memory while training
            (default: unless ``args.teacher_top_k`` caches its targets on disk).
        group_size, learn_scales: the recipe's group size and whether it learns scales.
        calibration_windows: block-wise: windows of activations cached (float16).
    """
    from .head import chunk_rows
    from .trainer import TrainingArgs, uses_grad_checkpoint_for

    args = args or TrainingArgs()
    micro = max(1, args.batch_size // args.grad_accum)
    tokens = micro * args.seq_len
    if teacher_resident is None:
        teacher_resident = not args.teacher_top_k
    P = shape.params
    moments = _moment_bytes(args.optimizer_state_dtype)
    parts: Dict[str, float] = {"student weights": 4.0 * P}
    if method == "blockwise":
        block = shape.block_linear + 2 * shape.block_linear // group_size
        parts["teacher weights"] = 4.0 * P if teacher_resident else 0.0
        parts["block training state"] = block * (4.0 + 2 * moments + 4.0 * (FAKE_QUANT_COPIES + UPDATE_COPIES))
        parts["activations"] = _block_activations(shape, micro, args.seq_len) + 2 * 4.0 * tokens * shape.hidden
        cache = 2.0 * 2 * calibration_windows * args.seq_len * shape.hidden  # inputs and targets, float16
        e2e = estimate(shape, dataclasses.replace(args, trainable="scales"), teacher_resident=teacher_resident,
                       group_size=group_size, learn_scales=True)
        if e2e.total > sum(parts.values()):  # the end-to-end phase (scales only) is the larger one
            return MemoryEstimate(e2e.parts, P, "blockwise (end-to-end scales phase)", cache)
        return MemoryEstimate(parts, P, "blockwise (block phase)", cache)
    if method != "qat":
        raise ValueError(f"method={method!r}: use 'qat' or 'blockwise'")
    trained = trainable_params(shape, args.trainable, group_size, args.lora_rank, learn_scales)
    parts["teacher weights"] = 4.0 * P if teacher_resident else 0.0
    parts["gradients"] = 4.0 * trained * (2 if args.grad_accum > 1 else 1)
    parts["optimizer moments"] = 2.0 * moments * trained
    parts["optimizer update"] = UPDATE_COPIES * (4.0 + 2 * moments) * trained
    checkpointed = uses_grad_checkpoint_for(shape.layers, args)
    fq_layers = 1 if checkpointed else shape.layers
    parts["fake-quantized weights"] = FAKE_QUANT_COPIES * 4.0 * (fq_layers * shape.block_linear + shape.embedding)
    block = _block_activations(shape, micro, args.seq_len)
    parts["activations"] = (block + 4.0 * tokens * shape.hidden * shape.layers) if checkpointed else block * shape.layers
    rows = chunk_rows(shape.vocab, tokens, args.loss_chunk)
    teacher_targets = 8.0 * tokens * args.teacher_top_k if args.teacher_top_k else 4.0 * tokens * shape.vocab
    parts["logits"] = teacher_targets + LOGIT_COPIES * 4.0 * rows * shape.vocab
    return MemoryEstimate(parts, P, f"QAT, trainable={args.trainable}")


def machine_memory() -> int:
    """Bytes of memory this machine gives a run: Metal's recommended working set on a Mac,
    else physical memory."""
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        if info.get("max_recommended_working_set_size"):
            return int(info["max_recommended_working_set_size"])
    except Exception:  # noqa: BLE001  (no GPU backend: fall back to the OS)
        pass
    if sys.platform == "darwin":
        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout.strip())
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fitting_settings(shape: ModelShape, args, limit: float, **kw) -> List[Tuple[str, MemoryEstimate]]:
    """Changes to ``args`` that bring the estimate under ``limit`` bytes, cheapest first, as
    ``[(flags, estimate)]``; the flags are ``python -m mlxqat.train``'s."""
    candidates = []
    steps = [("--grad-checkpoint", dict(grad_checkpoint=True)),
             ("--optimizer-state-dtype bfloat16", dict(optimizer_state_dtype="bfloat16")),
             ("--teacher-top-k 64", dict(teacher_top_k=64))]
    changed, flags = {}, []
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
    blockwise = estimate(shape, args, method="blockwise", **kw)
    if blockwise.total <= limit:
        out.append(("--method blockwise", blockwise))
    return out
