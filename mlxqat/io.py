"""Saving and loading mlx-lm model directories, with a sha256 manifest.

A saved directory is an ordinary mlx-lm model directory (``mlx_lm.load``
opens it) plus ``mlxqat.json``: the recipe, training summary and metrics, and
the sha256 of every file. Directories are written atomically: everything goes
to a temporary sibling that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import __version__
from .layers import ActQuantizedLinear, is_fake_quant

MANIFEST = "mlxqat.json"
ACTIVATION_FILE = "activation_scales.safetensors"
MASTER_FILE = "master_weights.safetensors"
MAX_SHARD_BYTES = 5 << 30

PathLike = Union[str, os.PathLike]


class IntegrityError(ValueError):
    """A file of a saved model does not match its manifest."""


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(dest: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``dest`` on success.

    If the body raises (or the process dies), ``dest`` is untouched: it keeps
    its previous content or stays absent, and the temporary directory is
    removed (or, after a kill, left under a ``.name.tmp-*`` name).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            old.rmdir()
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: PathLike, mode: str = "wb"):
    """Open a temporary sibling of ``dest`` for writing; rename it into place on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: PathLike, info: Dict[str, Any]) -> dict:
    """Write ``mlxqat.json`` into ``directory`` with the sha256 of every other file."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = sha256_file(p)
    manifest = {"format": "mlxqat", "format_version": 1, "mlxqat_version": __version__}
    manifest.update(info)
    manifest["files"] = files
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
    return manifest


def read_manifest(directory: PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {directory} was not saved by mlxqat (or the manifest "
            "was removed); re-save it with mlxqat.save or `python -m mlxqat.export`"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}); the manifest is damaged") from e


def verify(directory: PathLike) -> dict:
    """Check every file listed in ``mlxqat.json`` against its sha256.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no manifest.
        IntegrityError: a listed file is missing or its content changed.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, expected in manifest.get("files", {}).items():
        p = directory / name
        if not p.exists():
            problems.append(f"{name}: missing")
            continue
        actual = sha256_file(p)
        if actual != expected:
            problems.append(f"{name}: sha256 {actual[:16]}... but the manifest says {expected[:16]}...")
    if problems:
        raise IntegrityError(
            f"{directory} failed verification ({len(problems)} file(s)): "
            + "; ".join(problems)
            + ". The files changed after they were saved: re-export or re-download the model"
        )
    return manifest


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def model_config(model: nn.Module) -> dict:
    """The mlx-lm config dict of ``model`` (from its ``args`` dataclass)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError(
            f"{type(model).__name__} has no mlx-lm `args`; pass config= (the dict "
            "mlx_lm.load(..., return_config=True) returns) to save()"
        )
    cfg = dataclasses.asdict(args)
    if "tie_word_embeddings" not in cfg and hasattr(model, "tie_word_embeddings"):
        cfg["tie_word_embeddings"] = bool(model.tie_word_embeddings)
    return cfg


def quantization_config(model: nn.Module) -> Optional[dict]:
    """mlx-lm's ``"quantization"`` entry: the common setting plus per-layer overrides."""
    from .convert import layer_specs

    specs = layer_specs(model)
    if not specs:
        return None
    common = Counter(tuple(sorted(s.items())) for s in specs.values()).most_common(1)[0][0]
    default = dict(common)
    q = {"group_size": default["group_size"], "bits": default["bits"], "mode": default["mode"]}
    for path, s in specs.items():
        if s != default:
            q[path] = s
    return q


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------


def _make_shards(weights: Dict[str, mx.array], max_bytes: int):
    shards, size = [], 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def _write_weights(directory: Path, weights: Dict[str, mx.array], max_shard_bytes: int) -> None:
    shards = _make_shards(weights, max_shard_bytes)
    n = len(shards)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        for k in shard:
            index["weight_map"][k] = name
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


def _compact_scales(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """float32 scales/biases that are float16 numbers -> float16 (same values, half the bytes).

    Only for linear layers: ``quantized_matmul`` promotes to the activation
    dtype, so a float32 model computes the same numbers. Embeddings keep their
    dtype because their output dtype would follow it.
    """
    for path, m in model.named_modules():
        if type(m).__name__ == "QuantizedEmbedding" or not isinstance(m, nn.QuantizedLinear):
            continue
        keys = [f"{path}.scales", f"{path}.biases"]
        arrs = [weights.get(k) for k in keys]
        if any(a is None or a.dtype != mx.float32 for a in arrs):
            continue
        halves = [a.astype(mx.float16) for a in arrs]
        if all(mx.array_equal(h.astype(mx.float32), a).item() for h, a in zip(halves, arrs)):
            for k, h in zip(keys, halves):
                weights[k] = h


def save(
    model: nn.Module,
    tokenizer,
    path: PathLike,
    *,
    config: Optional[dict] = None,
    info: Optional[Dict[str, Any]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_files: Optional[Dict[str, Union[str, bytes]]] = None,
    master_weights: Optional[Dict[str, mx.array]] = None,
    compact_scales: bool = True,
) -> dict:
    """Write a converted model as an mlx-lm directory (``mlx_lm.load(path)`` opens it).

    Args:
        model: a converted model (``mlxqat.convert``) or a full-precision one.
        tokenizer: the tokenizer (``mlx_lm`` TokenizerWrapper or a Hugging Face
            tokenizer); its files are saved beside the weights.
        path: destination directory; replaced atomically if it exists.
        config: the model's config dict; default: built from ``model.args``.
        info: extra entries for ``mlxqat.json`` (training summary, metrics).
        max_shard_bytes: shard the weights above this size.
        extra_files: ``{name: text or bytes}`` written into the directory.
        master_weights: unquantized weights to keep beside the model
            (``master_weights.safetensors``, e.g. the trained QAT weights).
        compact_scales: store float32 scales/biases of linear layers as float16
            when that is lossless (the values are float16 numbers).

    Returns:
        The manifest written to ``mlxqat.json``.

    Raises:
        ValueError: fake-quant layers still present, non-finite weights, no tokenizer.
    """
    fq = [p for p, m in model.named_modules() if is_fake_quant(m)]
    if fq:
        raise ValueError(
            f"{len(fq)} layer(s) are still fake-quant (e.g. {fq[0]}); call "
            "mlxqat.convert(model) before save()"
        )
    if tokenizer is None:
        raise ValueError(
            "save() needs the tokenizer: mlx_lm.load reads tokenizer files from the "
            "model directory; pass the tokenizer returned by mlx_lm.load / mlxqat.load"
        )
    config = dict(config if config is not None else model_config(model))
    if "model_type" not in config:
        raise ValueError("config has no 'model_type'; mlx-lm cannot tell which architecture to build")
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    q = quantization_config(model)
    if q is not None:
        config["quantization"] = q
        config["quantization_config"] = q

    weights = dict(tree_flatten(model.parameters()))
    act_scales = {k: v for k, v in weights.items() if k.endswith(".act_scale")}
    act_bits = {}
    for k in act_scales:
        weights.pop(k)
    for p, m in model.named_modules():
        if isinstance(m, ActQuantizedLinear):
            act_bits[p] = m.act_bits
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            raise ValueError(f"{k} has NaN/Inf values; refusing to save a broken model")
    if compact_scales:
        _compact_scales(model, weights)

    manifest_info = {"recipe": None}
    recipe = getattr(model, "mlxqat_recipe", None)
    if recipe is not None:
        manifest_info["recipe"] = recipe.to_dict()
    manifest_info["activation_quantization"] = act_bits
    manifest_info.update(info or {})

    with atomic_dir(path) as tmp:
        _write_weights(tmp, weights, max_shard_bytes)
        if master_weights:
            mx.save_safetensors(str(tmp / MASTER_FILE), master_weights, metadata={"format": "mlx"})
        if act_scales:
            mx.save_safetensors(str(tmp / ACTIVATION_FILE), act_scales, metadata={"format": "mlxqat"})
        with open(tmp / "config.json", "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=2)
        tokenizer.save_pretrained(str(tmp))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        manifest = write_manifest(tmp, manifest_info)
    return manifest


def _restore_activation_quant(model: nn.Module, directory: Path, manifest: dict) -> None:
    act_bits = manifest.get("activation_quantization") or {}
    if not act_bits:
        return
    scales = mx.load(str(directory / ACTIVATION_FILE))

    def swap(path, m):
        if path in act_bits and isinstance(m, nn.QuantizedLinear):
            out_dims, packed_in = m.weight.shape
            in_dims = packed_in * 32 // m.bits
            aq = ActQuantizedLinear(in_dims, out_dims, "bias" in m, m.group_size, m.bits, act_bits[path])
            aq.update(dict(m.items()))
            aq.act_scale = scales[f"{path}.act_scale"]
            aq.freeze()
            return aq
        return m

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def check_config(directory: PathLike) -> dict:
    """Read ``config.json`` and check the keys mlx-lm needs; clear errors if not."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist: {directory} is not an mlx-lm model directory")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if "model_type" not in cfg:
        raise ValueError(f"{cfg_path} has no 'model_type'; add the architecture name (e.g. \"llama\")")
    return cfg


def load(path: PathLike, *, verify_files: bool = True, kernel: str = "mlx"):
    """Load a model directory saved by :func:`save` (or any local mlx-lm directory).

    Verifies the sha256 manifest when there is one, loads with ``mlx_lm.load``,
    and restores static activation quantization.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        IntegrityError: a file does not match the manifest.
        ValueError / FileNotFoundError: a missing or incomplete directory or config.
    """
    from mlx_lm import load as mlx_lm_load

    directory = Path(path)
    check_config(directory)
    manifest = {}
    if (directory / MANIFEST).exists():
        manifest = verify(directory) if verify_files else read_manifest(directory)
    try:
        model, tokenizer = mlx_lm_load(str(directory))
    except TypeError as e:
        raise ValueError(f"{directory}/config.json is incomplete for its architecture: {e}") from e
    _restore_activation_quant(model, directory, manifest)
    if manifest.get("recipe"):
        from .recipes import Recipe

        model.mlxqat_recipe = Recipe.from_dict(manifest["recipe"])
    if kernel != "mlx":
        from .convert import use_kernel

        use_kernel(model, kernel)
    return model, tokenizer
