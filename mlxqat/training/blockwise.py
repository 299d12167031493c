"""Block-wise QAT: one transformer block at a time, then scales end to end (as EfficientQAT).

Phase one, :func:`blockwise_qat` (EfficientQAT's Block-AP), prepares the student
with the recipe's QAT form and trains its blocks in order, each on its own: all
of the block's weights and its learned scales and biases move so that the
fake-quantized block reproduces the full-precision block on calibration
activations (mean squared error). Gradients and optimizer state exist for one
block at a time. Phase two (EfficientQAT's E2E-QP) freezes the integer codes and
trains only the scales and biases through the whole model, distilled from the
full-precision logits as in full QAT: :func:`mlxqat.training.qat.quantize_qat` with
``trainable="scales"`` on the student phase one prepared.
``python -m mlxqat.train --method blockwise`` runs both.

What a block learns from. Block ``i`` is fed what the student's quantized blocks
``0 .. i-1`` (and its quantized embedding) compute, so it can make up for the
error they leave. Its target is, with ``target="fp"`` (the default), the
full-precision model's own hidden state after block ``i`` (the full-precision
block on full-precision inputs); with ``target="same"``, the full-precision
block on the student's inputs (each block matches only itself). The
full-precision block is the student's own block before it trains, run with
fake quantization off, so no teacher model is needed in this phase.

Activations are float16 arrays ``(windows, seq_len, hidden)``: memory-mapped
``.npy`` files under ``out_dir`` (read a batch at a time), or arrays in memory.
Blocks are called with what the model itself passes them (attention mask,
cache), recorded once per block from a forward pass, so sliding-window and
global layers (Gemma 3) each get their own mask; this assumes, as mlx-lm models
do without a cache, that those arguments depend on the sequence length only.

Memory. A float32 copy of a block's weights exists only while that block
trains: :func:`hold_weights` gives a float32 model (teacher and student share
its arrays) back the checkpoint's own bfloat16 / float16 arrays of every
block's weights, an exact round trip, and they compute as float32 (a matmul
promotes them; a fake-quant layer upcasts them). Each block is upcast when its
turn comes and, trained, keeps only packed codes. From a bfloat16 checkpoint
the run holds 2 bytes per block weight instead of 4, and computes exactly what
the float32 run computes.

Resuming. After each block, the next block's inputs (``acts_NNN/``) and the
block's trained parameters (``block_NNN/``) are written atomically with a sha256
manifest, then ``state.json`` moves on. A killed run resumed with the same
settings retrains at most the block it was in and ends with the same
parameters, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .. import recipes as recipes_mod
from .._cli import positive_float, positive_int
from ..data import iterate_batches
from ..layers import HELD_DTYPES, freeze_codes, is_fake_quant, set_fake_quant, untie_weights, weight_released
from ..storage.destinations import atomic_dir, atomic_file, remove_output, work_dir, write_manifest
from ..storage.load import verify
from .args import TrainingArgs
from .optim import QATOptimizer
from .qat import prepare_student

__all__ = ["blockwise_qat", "model_blocks", "resume_state", "hold_weights", "TARGETS",
           "STEPS_PER_BLOCK", "BLOCK_WINDOWS", "BLOCK_BATCH_SIZE", "BLOCK_LEARNING_RATE"]

TARGETS = ("fp", "same")
# Defaults of python -m mlxqat.train --method blockwise: the learning rate swept on the embedded model at int4
# (1e-5, 3e-5, 1e-4, 3e-4 at 100 steps x 4 windows per block: KL 0.0299, 0.0284, 0.0303, 0.0393 after the block phase)
STEPS_PER_BLOCK = 100
BLOCK_WINDOWS = 64
BLOCK_BATCH_SIZE = 4
BLOCK_LEARNING_RATE = 3e-5
STATE = "state.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def hold_weights(model: nn.Module, stored: Dict[str, mx.array]) -> int:
    """Give ``model``'s transformer blocks back their weights as stored (``stored``: the model's
    ``tree_flatten(parameters())`` before it was cast to float32) where those were bfloat16 or
    float16; return how many weights are held. The values are the same (the float32 ones were
    their exact upcast); they take half the memory, and compute as float32."""
    held = 0
    for i, block in enumerate(model_blocks(model)):
        for name, m in block.named_modules():
            w = stored.get(f"model.layers.{i}.{name}.weight" if name else f"model.layers.{i}.weight")
            if isinstance(m, nn.Linear) and w is not None and w.dtype in HELD_DTYPES and w.shape == m.weight.shape:
                m.weight = w
                held += w.size
    return held


def _held(blocks: list) -> list:
    """The blocks' modules whose weight is held narrower than float32 (:func:`hold_weights`)."""
    return [m for b in blocks for _, m in b.named_modules()
            if isinstance(m.get("weight"), mx.array) and m["weight"].dtype in HELD_DTYPES]


@contextlib.contextmanager
def _float32_for_setup(blocks: list):
    """Within the body the held weights read as float32 (lazily, not computed); afterwards every
    module holding one gets the narrow array back, its other new arrays (learned scales initialised
    from the float32 values) computed one module at a time, so only one float32 weight exists at once."""
    originals = {}
    for m in _held(blocks):
        up = m.weight.astype(mx.float32)
        originals[id(up)] = m.weight
        m.weight = up
    try:
        yield
    finally:
        for b in blocks:
            for _, m in b.named_modules():
                w = m.get("weight")
                if isinstance(w, mx.array) and id(w) in originals:
                    mx.eval([v for k, v in m.items() if isinstance(v, mx.array) and k != "weight"])
                    m.weight = originals[id(w)]


def _upcast(block: nn.Module) -> None:
    """A float32 copy of ``block``'s held weights, to train (the model's other blocks keep theirs)."""
    for m in _held([block]):
        m.weight = m.weight.astype(mx.float32)
    mx.eval(block.parameters())


def model_blocks(model: nn.Module) -> list:
    """The transformer blocks of an mlx-lm model (``model.model.layers``).

    Raises:
        ValueError: the model has no such list.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ValueError(
            f"block-wise QAT needs an mlx-lm model whose transformer blocks are model.model.layers "
            f"(llama, qwen, gemma, ...); {type(model).__name__} has none: use --method qat"
        )
    return layers


class _Stop(Exception):
    """Raised inside a forward pass to hand back the first block's input."""

    def __init__(self, h):
        super().__init__()
        self.h = h


@contextlib.contextmanager
def wrapped_block_calls(blocks: list, wrap: Callable):
    """For the duration, the ``__call__`` of each of the blocks' classes is ``wrap(original)``; restored
    after. The wrapper is the class's, so it must pass instances other than ``blocks`` through."""
    originals = {cls: cls.__call__ for cls in {type(b) for b in blocks}}
    for cls, fn in originals.items():
        cls.__call__ = wrap(fn)
    try:
        yield
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn


@contextlib.contextmanager
def _recording(blocks: list, stop_at_first: bool = False):
    """Record the arguments each block is called with after its hidden state: ``{index: (args, kwargs)}``.

    With ``stop_at_first`` the forward pass stops at the first block, raising
    :class:`_Stop` with its input.
    """
    calls: Dict[int, Tuple[tuple, dict]] = {}
    index = {id(b): i for i, b in enumerate(blocks)}

    def wrap(fn):
        def recorded(self, h, *args, **kwargs):
            i = index.get(id(self))
            if i is not None:
                calls.setdefault(i, (args, kwargs))
                calls.setdefault("hidden", h.shape[-1])
                if stop_at_first and i == 0:
                    raise _Stop(h)
            return fn(self, h, *args, **kwargs)

        return recorded

    with wrapped_block_calls(blocks, wrap):
        yield calls


def _block_calls(model: nn.Module, blocks: list, tokens: mx.array) -> Tuple[Dict[int, Tuple[tuple, dict]], int]:
    """What the model passes each block besides the hidden state, and the hidden size, from one forward
    pass on ``tokens``."""
    with _recording(blocks) as calls:
        mx.eval(model(tokens))
    missing = [i for i in range(len(blocks)) if i not in calls]
    if missing:
        raise ValueError(f"the model's forward pass did not call blocks {missing}; block-wise QAT needs "
                         "every block of model.model.layers called once, in order")
    return calls, calls.pop("hidden")


def _to_float16(h: mx.array, where: str) -> np.ndarray:
    peak = float(mx.max(mx.abs(h)).item())
    if not peak <= FLOAT16_MAX:  # NaN fails too
        raise ValueError(f"{where}: activations reach {peak:g}, beyond float16's range ({FLOAT16_MAX:g}), "
                         "where block-wise QAT keeps them; use --method qat for this model")
    return np.asarray(h.astype(mx.float16))


def _embed(model: nn.Module, blocks: list, windows: np.ndarray, out: np.ndarray, batch_size: int) -> None:
    """The first block's inputs for ``windows`` (tokens ``(n, seq_len)``), written into ``out``."""
    for k in range(0, len(windows), batch_size):
        try:
            with _recording(blocks, stop_at_first=True):
                model(mx.array(windows[k : k + batch_size]))
        except _Stop as s:
            out[k : k + batch_size] = _to_float16(s.h, "the embedding")
        else:
            raise ValueError("the model's forward pass never reached its first block")


def _run(block, call, x: np.ndarray, batch_size: int, out: Optional[np.ndarray] = None,
         target: Optional[np.ndarray] = None, where: str = "") -> Optional[dict]:
    """Run ``block`` over ``x`` a batch at a time; write the outputs to ``out`` and/or measure them against ``target``.

    Returns:
        With ``target``: ``{"mse", "rel"}``, the mean squared error and that error
        relative to the target's mean square.
    """
    args, kwargs = call
    err = power = 0.0
    for k in range(0, len(x), batch_size):
        y = block(mx.array(x[k : k + batch_size]).astype(mx.float32), *args, **kwargs)
        if out is not None:
            out[k : k + batch_size] = _to_float16(y, where)
        if target is not None:
            t = mx.array(target[k : k + batch_size]).astype(mx.float32)
            e, p = mx.sum(mx.square(y.astype(mx.float32) - t)), mx.sum(mx.square(t))
            mx.eval(e, p)
            err, power = err + e.item(), power + p.item()
    if target is None:
        return None
    return {"mse": err / target.size, "rel": err / power if power > 0 else float("nan")}


def _train_block(block, call, x: np.ndarray, target: np.ndarray, args: TrainingArgs, bar) -> List[float]:
    """``args.steps`` AdamW steps of block-output MSE; returns the losses."""
    cargs, ckwargs = call

    def loss_fn(blk, xb, yb):
        return mx.mean(mx.square(blk(xb, *cargs, **ckwargs).astype(mx.float32) - yb))

    block.unfreeze()
    optimizer = QATOptimizer(args)
    optimizer.init(block.trainable_parameters())
    value_and_grad = nn.value_and_grad(block, loss_fn)
    rows = np.arange(len(x))[:, None]
    losses = []
    for step, batch in iterate_batches(rows, args.batch_size, args.seed):
        if step >= args.steps:
            break
        idx = np.asarray(batch)[:, 0]
        xb = mx.array(x[idx]).astype(mx.float32)
        yb = mx.array(target[idx]).astype(mx.float32)
        loss, grads = value_and_grad(block, xb, yb)
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(block, grads)
        mx.eval(loss, block.parameters(), optimizer.state)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the block loss is {losses[-1]} at step {step + 1}; lower "
                                     f"--block-learning-rate (now {args.learning_rate})")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses


# ---------------------------------------------------------------------------
# Activations and checkpoints on disk
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _activations(root: Optional[Path], name: str, shape: tuple, files: Tuple[str, ...], info: dict):
    """New float16 arrays ``{file: array}`` of ``shape``: in memory (no ``root``), or ``.npy`` memory maps in
    ``root/name``, which appears (with its manifest) only when the body succeeds."""
    if root is None:
        yield {f: np.zeros(shape, np.float16) for f in files}
        return
    with atomic_dir(root / name) as tmp:
        arrays = {f: np.lib.format.open_memmap(tmp / f"{f}.npy", mode="w+", dtype=np.float16, shape=shape)
                  for f in files}
        yield arrays
        for f, a in arrays.items():
            a.flush()
            if f.startswith("scratch"):
                (tmp / f"{f}.npy").unlink()
        arrays.clear()  # the maps close before the directory is hashed and renamed
        write_manifest(tmp, info, kind="checkpoint")


def _open(root: Path, name: str, files: Tuple[str, ...]) -> Dict[str, np.ndarray]:
    verify(root / name)
    return {f: np.load(root / name / f"{f}.npy", mmap_mode="r") for f in files}


def _save_block(root: Path, index: int, block: nn.Module, record: dict) -> None:
    with atomic_dir(root / f"block_{index:03d}") as tmp:
        mx.save_safetensors(str(tmp / "parameters.safetensors"), dict(tree_flatten(block.parameters())))
        write_manifest(tmp, {"block": index, "record": record}, kind="checkpoint")


def _write_state(root: Path, done: int, settings: dict, records: list) -> None:
    with atomic_file(root / STATE, "w", check=False) as f:  # inside the block phase's own folder
        json.dump({"done": done, "settings": settings, "blocks": records}, f)


def resume_state(root) -> dict:
    """The block phase's ``state.json`` under ``root`` (``done``, ``settings``, ``blocks``).

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is damaged.
    """
    path = Path(root) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no block-wise checkpoint under {root}; run without --resume first")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["done"]), dict(state["settings"]), list(state["blocks"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete {root} to start over, "
                         "or run without --resume") from None
    return state


def _check_settings(root: Path, saved: dict, settings: dict) -> None:
    diffs = [f"{k}={saved.get(k)!r} (now {settings.get(k)!r})" for k in sorted(set(saved) | set(settings))
             if saved.get(k) != settings.get(k)]
    if diffs:
        raise ValueError(f"the block-wise checkpoint in {root} was written with other settings: {'; '.join(diffs)}; "
                         "resume with the same --recipe, data and --block-* flags, or run without --resume")


def _settings(trained, windows: np.ndarray, args: TrainingArgs, target: str) -> dict:
    return {"recipe": trained.to_dict(), "target": target, "steps_per_block": args.steps,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "scale_learning_rate": args.scale_lr,
            "warmup_steps": args.warmup_steps, "grad_clip": args.grad_clip, "seed": args.seed,
            "windows": [int(n) for n in windows.shape],
            "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()}


# ---------------------------------------------------------------------------
# The phase
# ---------------------------------------------------------------------------


def blockwise_qat(
    student: nn.Module,
    windows: np.ndarray,
    recipe="int4",
    *,
    steps_per_block: int = STEPS_PER_BLOCK,
    batch_size: int = BLOCK_BATCH_SIZE,
    learning_rate: float = BLOCK_LEARNING_RATE,
    scale_learning_rate: Optional[float] = None,
    target: str = "fp",
    learn_scales: Optional[bool] = None,
    scale_init: Optional[str] = None,
    grad_clip: float = 1.0,
    seed: int = 0,
    out_dir=None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[Callable[[dict], None]] = None,
    release_weights: bool = True,
) -> dict:
    """Prepare ``student`` with ``recipe``'s QAT form and train it block by block (not converted).

    Args:
        student: the full-precision mlx-lm model (float32), or one already prepared with the same recipe.
        windows: calibration token windows ``(n, seq_len + 1)`` (the last token is not used).
        recipe: a recipe name or :class:`~mlxqat.recipes.Recipe`; the student gets
            ``recipe.for_qat("scales", learn_scales, scale_init)``: learned scales, which the
            scales-only end-to-end phase that follows needs.
        steps_per_block, batch_size: optimizer steps per block, windows per step.
        learning_rate: peak learning rate of the block's weights (AdamW, warmup then cosine).
        scale_learning_rate: of its learned scales/biases (default: ``learning_rate / 10``).
        target: ``"fp"``: the full-precision model's hidden states; ``"same"``: the
            full-precision block on the student's own inputs (see the module notes).
        learn_scales, scale_init: as :meth:`Recipe.for_qat`.
        grad_clip, seed: gradient-norm clip (0: off) and the seed of the batch order.
        out_dir: a folder of the block phase's own for activations and checkpoints
            (``None``: activations in memory, nothing saved).
        resume: continue from the checkpoints in ``out_dir`` (same settings required).
        progress: show a progress bar.
        callback: called with each block's record once that block is saved.
        release_weights: once a block is trained (and saved), freeze its integer codes and give
            back its float32 weights' memory (:func:`mlxqat.layers.freeze_codes`), as the
            scales-only end-to-end phase that follows needs them; ``False`` keeps the float
            weights (to train them further).

    Returns:
        ``{"blocks": [{"block", "before", "after", "kept", "final_loss", "wall_s"}], "peak_memory_gb",
        "resident_memory_gb", "wall_s", "tokens", "target", "resumed_from_block", "recipe"}``: the peak
        of MLX's memory during the phase and the part of it the prepared model holds throughout;
        ``tokens`` the block-steps' tokens (every block sees them once); ``before`` / ``after`` are
        ``{"mse", "rel"}`` of the block on its calibration inputs at the start and after training.
        A block whose error training did not lower keeps its start (``kept="start"``).

    Raises:
        ValueError: bad settings, a model without ``model.model.layers``, activations beyond
            float16's range, or a checkpoint written with other settings.
        FileNotFoundError: ``resume`` without a checkpoint.
    """

    windows = _check_arguments(windows, target, steps_per_block, batch_size, learning_rate, scale_learning_rate)
    tokens = windows[:, :-1]
    args = TrainingArgs(steps=steps_per_block, batch_size=batch_size, seq_len=tokens.shape[1],
                        learning_rate=learning_rate, scale_learning_rate=scale_learning_rate,
                        warmup_steps=min(5, steps_per_block // 4), grad_clip=grad_clip, seed=seed)
    trained = recipes_mod.get(recipe).for_qat("scales", learn_scales, scale_init)
    if not any(s.learn_scales for s in trained.specs()):
        raise ValueError("block-wise QAT trains learned scales end to end after the blocks; drop --no-learn-scales")
    blocks = model_blocks(student)
    settings = _settings(trained, windows, args, target)
    root = Path(out_dir) if out_dir is not None else None
    state = resume_state(root) if resume and root is not None else None
    if resume and root is None:
        raise FileNotFoundError("resume needs out_dir, where the block-wise checkpoints are")
    if state is not None:
        _check_settings(root, state["settings"], settings)
    elif root is not None and root.exists():
        remove_output(root)  # a previous run's: start over (refused if the folder is not ours)
    if root is not None:
        work_dir(root)

    t0 = time.perf_counter()
    with _float32_for_setup(blocks):
        prepare_student(student, trained, windows)
    mx.reset_peak_memory()
    resident = mx.get_active_memory()  # the model itself: what the block phase adds is peak - resident
    # what the blocks are passed does not depend on quantization: found in full precision, without a
    # fake-quantized copy of every weight
    plain = [m for _, m in student.named_modules() if is_fake_quant(m) and m.fake_quant_enabled and not weight_released(m)]
    for m in plain:
        m.fake_quant_enabled = False
    calls, hidden = _block_calls(student, blocks, mx.array(tokens[:1]))
    for m in plain:
        m.fake_quant_enabled = True
    shape = tokens.shape + (int(hidden),)
    streams = ("quantized", "fp") if target == "fp" else ("quantized",)
    done, records, acts = _begin(student, blocks, root, state, settings, tokens, shape, streams, batch_size,
                                 release_weights)

    bar = tqdm(total=len(blocks) * steps_per_block, initial=done * steps_per_block, desc="block-wise QAT",
               disable=not progress, dynamic_ncols=True)
    try:
        for i in range(done, len(blocks)):
            acts = _block_phase_step(student, blocks, i, calls[i], acts, root, shape, streams, args, bar)
            records.append(acts.pop("record"))
            if root is not None:
                _save_block(root, i, blocks[i], records[-1])
                _write_state(root, i + 1, settings, records)
                remove_output(root / f"acts_{i:03d}")
            if callback is not None:
                callback(records[-1])
            if release_weights:
                release_block(blocks[i])
    finally:
        bar.close()
    if root is not None and (root / f"acts_{len(blocks):03d}").exists():
        remove_output(root / f"acts_{len(blocks):03d}")  # the last block's outputs: no block takes them
    return {"blocks": records, "peak_memory_gb": mx.get_peak_memory() / 1e9, "resident_memory_gb": resident / 1e9,
            "wall_s": time.perf_counter() - t0,
            "tokens": int(len(blocks) * steps_per_block * batch_size * tokens.shape[1]), "target": target,
            "resumed_from_block": done, "recipe": trained.to_dict()}


def _check_arguments(windows, target, steps_per_block, batch_size, learning_rate, scale_learning_rate) -> np.ndarray:
    """``windows`` as an array, once every argument has been checked (ValueError naming the bad one)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; use one of {TARGETS}")
    positive_int.check(steps_per_block, "steps_per_block")
    positive_int.check(batch_size, "batch_size")
    positive_float.check(learning_rate, "learning_rate")
    if scale_learning_rate is not None:
        positive_float.check(scale_learning_rate, "scale_learning_rate")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 3 or not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"calibration windows must be integer token ids (n, seq_len + 1); got {windows.dtype} "
                         f"{windows.shape}")
    if len(windows) < batch_size:
        raise ValueError(f"{len(windows)} calibration windows are fewer than the block batch size {batch_size}; "
                         "give more windows (--block-windows) or lower --block-batch-size")
    return windows


def release_block(block: nn.Module) -> None:
    """Freeze the integer codes of ``block``'s learned-scale layers and release their float weights."""
    for _, m in block.named_modules():
        if is_fake_quant(m) and m.spec.learn_scales:
            freeze_codes(m)


def _begin(student, blocks, root, state, settings, tokens, shape, streams, batch_size, release):
    """``(done, records, acts)``: blocks trained so far (restored from ``root``), their records and the
    next block's inputs; for a fresh start, the first block's inputs computed (and saved)."""
    if state is not None:
        done = int(state["done"])
        for j in range(done):
            verify(root / f"block_{j:03d}")
            blocks[j].load_weights(str(root / f"block_{j:03d}" / "parameters.safetensors"))
            if release:
                release_block(blocks[j])
        acts = _open(root, f"acts_{done:03d}", streams) if done < len(blocks) else {}
        return done, list(state["blocks"]), acts
    with _activations(root, "acts_000", shape, streams, {"inputs_of_block": 0}) as acts:
        _embed(student, blocks, tokens, acts["quantized"], batch_size)
        if "fp" in streams:
            set_fake_quant(student, False)
            _embed(student, blocks, tokens, acts["fp"], batch_size)
            set_fake_quant(student, True)
    if root is None:
        return 0, [], acts
    _write_state(root, 0, settings, [])
    return 0, [], _open(root, "acts_000", streams)


def _block_phase_step(student, blocks, i, call, acts, root, shape, streams, args, bar) -> dict:
    """Train block ``i`` on its inputs ``acts``; return the next block's inputs (and ``"record"``)."""
    t0 = time.perf_counter()
    block = blocks[i]
    _upcast(block)
    x_q = acts["quantized"]
    files = streams if streams == ("quantized", "fp") else ("quantized", "scratch_target")
    target_name = files[1]
    with _activations(root, f"acts_{i + 1:03d}", shape, files, {"inputs_of_block": i + 1}) as out:
        set_fake_quant(block, False)  # the full-precision block, before any change
        _run(block, call, acts.get("fp", x_q), args.batch_size, out=out[target_name], where=f"block {i}")
        set_fake_quant(block, True)
        target = out[target_name]
        before = _run(block, call, x_q, args.batch_size, target=target)
        start = block.parameters()  # (arrays are immutable: training replaces them, keeping these)
        untie_weights(block)  # same codes; training then moves boundary weights one by one
        losses = _train_block(block, call, x_q, target, args, bar)
        after, kept = _run(block, call, x_q, args.batch_size, target=target), "trained"
        if not after["mse"] < before["mse"]:  # training made it worse: the block keeps its start
            block.update(start)
            after, kept = before, "start"
        _run(block, call, x_q, args.batch_size, out=out["quantized"], where=f"block {i}")
        record = {"block": i, "before": before, "after": after, "kept": kept, "final_loss": losses[-1],
                  "wall_s": time.perf_counter() - t0}
        if root is None:
            nxt = {"quantized": out["quantized"]}
            if "fp" in streams:
                nxt["fp"] = out["fp"]
    if root is not None:
        nxt = _open(root, f"acts_{i + 1:03d}", streams) if i + 1 < len(blocks) else {}
    nxt["record"] = record
    return nxt
