"""Loading any model (mlx-lm directory, Hugging Face id, GGUF file, the embedded model), checked before MLX reads it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..convert import attach_recipe, layer_specs, use_kernel
from ..gguf.format import is_gguf_file
from ..gguf.reader import load_gguf
from ..layers import ActQuantizedLinear
from ..recipes import Recipe
from ..stdlib_data import embedded_model_path
from .checks import (PathLike, check_config_values, check_directory_entries, check_finite,
                     check_layers_against_files, check_model_type, check_module_parameters, check_output_layer,
                     check_quantized_tensors, check_weight_files, read_json_file, safetensors_header)
from .destinations import recover_interrupted
from .manifest import ACTIVATION_FILE, MANIFEST, IntegrityError, Manifest, read_manifest


def verify(directory: PathLike) -> dict:
    """Check a saved directory against ``mlxqat.json``: every file listed, unchanged, nothing else.

    A directory whose replacement was killed between its two renames is
    repaired first, as every command does (:func:`recover_interrupted`).

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no directory or no manifest.
        IntegrityError: the manifest was edited or damaged; a file is missing,
            extra, changed, or not a regular file.
    """
    directory = Path(directory)
    recover_interrupted(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: nothing to verify (expected a model directory with {MANIFEST})")
    manifest = Manifest.read(directory)
    problems = manifest.problems(directory)
    if problems:
        error = IntegrityError(
            f"{directory} failed verification ({len(problems)} problem(s)): " + "; ".join(problems[:5])
            + ". The directory changed after it was saved: re-export or re-download the model"
        )
        error.problems = problems
        raise error
    return manifest.to_dict()


def _attach_recipe(model: nn.Module, manifest: dict, directory: Path) -> None:
    """Give the loaded quantized layers their specs from the manifest's recipe (:func:`mlxqat.convert.recipe_of`
    then reads it back from them)."""
    if not manifest.get("recipe"):
        return

    try:
        attach_recipe(model, Recipe.from_dict(manifest["recipe"]))
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{directory}/{MANIFEST}: the recipe entry is damaged ({e})") from e


def _restore_activation_quant(model: nn.Module, directory: Path, manifest: dict) -> None:

    act_bits = manifest.get("activation_quantization") or {}
    if not act_bits:
        return
    if not isinstance(act_bits, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in act_bits.values()
    ):
        raise ValueError(f"{directory}/{MANIFEST}: activation_quantization must map layer paths to bit widths")
    header = safetensors_header(directory / ACTIVATION_FILE)
    scales = mx.load(str(directory / ACTIVATION_FILE))
    modules = dict(model.named_modules())
    for path in act_bits:
        entry = header.get(f"{path}.act_scale")
        if not isinstance(modules.get(path), nn.QuantizedLinear) or entry is None or entry != (entry[0], ()) or entry[0] not in ("F16", "BF16", "F32"):
            raise ValueError(
                f"{directory}: activation quantization of {path!r} does not match the model "
                f"(no such quantized layer, or no scalar {path}.act_scale in {ACTIVATION_FILE})"
            )

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
    """Read ``config.json`` and check its types and bounds (:mod:`mlxqat.storage.checks`); clear errors if not."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not os.path.lexists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist: {directory} is not an mlx-lm model directory")
    cfg = read_json_file(cfg_path, "config.json")
    check_config_values(cfg, str(cfg_path))
    if "model_type" not in cfg:
        raise ValueError(f"{cfg_path} has no 'model_type'; add the architecture name (e.g. \"llama\")")
    check_model_type(cfg, str(cfg_path))
    return cfg


_warned_unverified: set = set()


def _smoke_test(model: nn.Module, directory: Path) -> None:
    """Run two tokens through the model: a config the architecture code cannot run is refused at load time."""
    try:
        mx.eval(model(mx.array([[0, 0]], dtype=mx.int32)))
    except Exception as e:  # the architecture's own code raising on an inconsistent config
        raise ValueError(
            f"{directory}: the model does not run with its config.json ({type(e).__name__}: {e}); "
            "restore config.json from the original model"
        ) from e


def _checked_classes(tensors: dict, directory: Path):
    """mlx-lm's model classes, with the built model checked against the files before it is quantized."""
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.utils import _get_classes


    def get(config: dict):
        model_class, args_class = _get_classes(config)

        def build(args):
            model = model_class(args)
            check_layers_against_files(model, tensors, config, str(directory))
            check_output_layer(model, tensors, config, directory)
            return model

        return build, args_class

    return get


def resolve_model_path(path: PathLike) -> Path:
    """A local directory, or a Hugging Face id resolved to its local snapshot (downloading it)."""
    p = Path(path).expanduser()
    recover_interrupted(p)
    if os.path.lexists(p):
        return p
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or p.suffix:
        raise FileNotFoundError(f"{path}: no such directory (the path does not exist), and not a Hugging Face id owner/name")
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.utils import _download

    try:
        return Path(_download(text))
    except Exception as e:  # hub errors (offline, unknown repo) have many types
        raise FileNotFoundError(
            f"{path}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}); check the path or the repository id"
        ) from e


def load(
    path: Optional[PathLike] = None,
    *,
    verify_files: bool = True,
    kernel: str = "mlx",
    lazy: bool = False,
    return_config: bool = False,
    full_precision: bool = False,
):
    """Load a model directory saved by :func:`save`, any mlx-lm directory, a Hugging Face id, or a GGUF file.

    Before MLX reads anything: the manifest is verified when there is one (a
    directory without one loads with a warning), ``config.json`` and every
    safetensors header are checked, and the quantized layers' shapes are
    checked against each other; then the weights are read (unless ``lazy``) and
    must be finite. The tokenizer never runs code from the directory.

    Args:
        path: the model; ``None`` is the full-precision stdlib Llama shipped with mlxqat.
        full_precision: refuse a quantized model (for QAT's teacher and starting
            point, or a full-precision baseline).

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with ``return_config``.

    Raises:
        IntegrityError: a file does not match the manifest.
        ValueError / FileNotFoundError: a missing, malformed or inconsistent file,
            named in the message; with ``full_precision``, a quantized model.
    """
    if path is None:

        path = embedded_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the embedded model is missing from this installation ({path}); pass a "
                                    "model directory (--model DIR) or reinstall mlxqat")
    model, tokenizer, config = _load(path, verify_files, kernel, lazy)
    if full_precision:

        quantized = list(layer_specs(model))
        if quantized:
            raise ValueError(f"{path} is already quantized ({len(quantized)} quantized layers, e.g. {quantized[0]}); "
                             "pass its full-precision original")
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _load(path: PathLike, verify_files: bool, kernel: str, lazy: bool):
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.utils import (
        load_model,
        load_tokenizer,
    )


    if is_gguf_file(path):  # a GGUF file: dequantized in memory, tokenizer rebuilt (mlxqat.gguf.reader)
        model, tokenizer, config = load_gguf(path)
        if kernel != "mlx":

            use_kernel(model, kernel)
        return model, tokenizer, config
    directory = resolve_model_path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is neither a directory nor a GGUF file; pass the model's "
                                "directory (with config.json) or a GGUF file")
    manifest = {}
    if os.path.lexists(directory / MANIFEST):
        manifest = verify(directory) if verify_files else read_manifest(directory)
    elif str(directory) not in _warned_unverified:
        _warned_unverified.add(str(directory))
        warnings.warn(
            f"{directory} has no {MANIFEST}, so changes to its files cannot be detected; if you trust "
            f"them, add one with `python -m mlxqat.verify --write {directory}`",
            stacklevel=3,
        )
    check_directory_entries(directory)
    config = check_config(directory)
    tensors = check_weight_files(directory)
    check_quantized_tensors(tensors, config, str(directory))
    try:
        model, config = load_model(directory, lazy=True, get_model_classes=_checked_classes(tensors, directory))
    except FileNotFoundError:
        raise
    except ValueError as e:
        if str(e).startswith(str(directory)):  # one of our own checks: already names the directory
            raise
        raise ValueError(f"{directory}: the weights do not fit config.json ({e})") from e
    except Exception as e:  # a config the architecture cannot be built from
        raise ValueError(f"{directory}/config.json does not describe a loadable {config.get('model_type')} model "
                         f"({type(e).__name__}: {e}); restore it from the original model") from e
    check_module_parameters(model, str(directory))
    _restore_activation_quant(model, directory, manifest)
    if not lazy:
        mx.eval(model.parameters())
        check_finite(model, str(directory))
        _smoke_test(model, directory)
    try:
        tokenizer = load_tokenizer(directory, {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: the tokenizer files could not be read ({e})") from e
    except Exception as e:  # tokenizers raise their own exception types on damaged files
        raise ValueError(f"{directory}: the tokenizer files could not be read ({type(e).__name__}: {e})") from e
    _attach_recipe(model, manifest, directory)
    if kernel != "mlx":

        use_kernel(model, kernel)
    return model, tokenizer, config
