"""Atomic training checkpoints (trainable weights, optimizer state, data position), each with its own
manifest; what a resumed run must share with its checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..convert import recipe_of
from ..storage.destinations import atomic_dir, atomic_file, remove_output, write_manifest
from ..storage.load import verify
from ..storage.manifest import IntegrityError, read_manifest
from .args import TrainingArgs

TEACHER_CACHE = "teacher_cache"  # under out_dir: the top-k targets, one file per micro-batch


CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")


LATEST = "latest.json"


# Settings a resumed run must share with its checkpoint: they decide the parameters,
# the batches and what a step means. (Learning rates, logging etc. may change.)
RESUME_MUST_MATCH = ("seq_len", "batch_size", "trainable", "lora_rank", "lora_scale", "seed", "scale_step")


def recipe_dict(student: nn.Module) -> Optional[dict]:

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
            json.dump({"step": step, "args": asdict(args), "recipe": recipe_dict(student),
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


def recipe_difference(old: dict, new: dict) -> str:
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
    saved = {"scale_step": "absolute", **saved}  # checkpoints from before scale_step stepped absolutely
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
            f"checkpoint {path} was written with {recipe_difference(old_recipe, recipe)}; resume with "
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
    state = check_checkpoint(path, args, recipe_dict(student))
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
