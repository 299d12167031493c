"""``python -m mlxqat.generate``: stream text from a model, then print its speed and memory.

    python -m mlxqat.generate --prompt "def fibonacci(n):"          # the embedded stdlib model
    python -m mlxqat.generate --prompt "import os" --quantize int4   # ... RTN-quantized on the fly
    python -m mlxqat.generate --model qat-int4/ --prompt "..." --max-tokens 200 --temp 0.7 --top-p 0.9 --seed 0
    python -m mlxqat.generate --model qat-int4/ --chat              # chat with the tokenizer's template

Prompts: as ``mlx_lm.generate`` does, ``--prompt`` goes into the tokenizer's
chat template (as the user's message, after ``--system-prompt`` when given)
when the tokenizer has one, so an instruct model answers it;
``--ignore-chat-template`` sends the text as it is (plain completion). A
prompt must leave room in the model's context for one token; where the
model's config names no context length, prompts are limited to
:data:`UNKNOWN_CONTEXT_LIMIT` tokens unless ``--max-prompt-tokens`` says
otherwise (:func:`check_prompt_length`, which ``profile`` shares).

Text goes to stdout as it is generated; the statistics (prompt tokens/s,
generation tokens/s, peak memory) go to stderr, so ``> out.txt`` keeps only
the text. Decoding is mlx-lm's own (``mlx_lm.stream_generate`` with
``mlx_lm.sample_utils.make_sampler``): with the same model, prompt and seed the
text is the text ``mlx_lm.generate`` gives.

Models: without ``--model``, the embedded full-precision stdlib Llama
(``mlxqat/assets/stdlib-llama``) runs as it is; ``--quantize RECIPE``
quantizes any full-precision model with round-to-nearest on the fly
(:func:`mlxqat.convert.quantize_rtn`). Every model (a local directory, a GGUF
file, a Hugging Face id) is opened with :func:`mlxqat.load`, which checks the
sha256 manifest of directories written by mlxqat.

Kernels (``--kernel``): ``mlx`` runs 4-bit layers with MLX's
``quantized_matmul`` (``nn.QuantizedLinear``), ``mlxqat`` with this package's
int4 kernel (``KernelQuantizedLinear``), ``auto`` picks ours on the CPU (its
CPU path is as fast as MLX's for decoding and several times faster for
prompt processing, see ``benchmarks/results/kernels_cpu.json``) and MLX's on a
GPU, where ours has not been measured faster yet; ``python -m mlxqat.profile``
measures both on your machine.

Compute dtype (``--dtype``): ``auto`` is float32 on the CPU (MLX's CPU
backend is much slower in float16/bfloat16) and the model's own dtype on a
GPU. Quantized linear layers keep their stored scales; they compute in the
activation dtype either way.

Exit status: 0 done, 2 bad input (a missing model, an empty prompt,
``--max-tokens 0``, a prompt longer than the model's context or the prompt
limit, a tokenizer without a chat template for ``--chat`` or
``--system-prompt``), 130 interrupted with Ctrl-C (the
statistics of the text so far are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._cli import (ArgumentParser, UsageError, command, non_negative_float, non_negative_int, positive_int,
                   probability, unit_float)
from .convert import layer_specs, quantize_rtn, use_kernel
from .data import model_context
from .kernels import KernelQuantizedLinear
from .stdlib_data import embedded_model_path
from .storage.load import load

__all__ = [
    "GenerationStats",
    "apply_dtype",
    "chat_ids",
    "check_prompt",
    "check_prompt_length",
    "generate",
    "load_model",
    "main",
    "model_label",
    "prompt_ids",
    "resolve_kernel",
]

KERNELS = ("auto", "mlx", "mlxqat")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# The longest prompt processed, in tokens, for a model whose config names no context length
# (--max-prompt-tokens sets another): a 2 MB prompt is half a million tokens, minutes of prompt processing.
UNKNOWN_CONTEXT_LIMIT = 8192


@dataclasses.dataclass
class GenerationStats:
    """Speed and memory of one generation."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0  # prompt (prefill) tokens per second
    generation_tokens: int = 0
    generation_tps: float = 0.0  # generated tokens per second after the first
    peak_memory_gb: float = 0.0  # mx.get_peak_memory() at the end
    finish_reason: Optional[str] = None  # "stop" (end-of-sequence), "length", "interrupted"

    def summary(self) -> str:
        return (
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {_gb(self.peak_memory_gb)}"
        )


def _gb(gb: float) -> str:
    return f"{gb:.3f} GB" if gb >= 0.1 else f"{gb * 1e3:.1f} MB"


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def resolve_kernel(kernel: str) -> str:
    """``"mlx"`` or ``"mlxqat"`` for ``kernel`` in ``KERNELS`` on the current default device."""
    if kernel not in KERNELS:
        raise UsageError(f"--kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "auto":
        return "mlxqat" if mx.default_device() == mx.cpu else "mlx"
    return kernel


def _is_quantized_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.QuantizedLinear)


def apply_dtype(model: nn.Module, dtype: str = "auto") -> Optional[mx.Dtype]:
    """Cast the model's floating-point parameters to the compute dtype, in place.

    ``auto`` is float32 on the CPU and leaves the model as loaded on a GPU.
    The scales and biases of quantized linear layers keep their stored dtype:
    ``quantized_matmul`` computes in the activation dtype, so the numbers are
    the same, and the model keeps its memory footprint. Quantized embeddings
    are cast, because their output dtype follows their scales.

    Returns:
        The dtype cast to, or ``None`` when nothing was cast.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if mx.default_device() != mx.cpu:
            return None
        dtype = "float32"
    target = getattr(mx, dtype)
    keep = {p for p, m in model.named_modules() if _is_quantized_linear(m)}
    updates = []
    for path, v in tree_flatten(model.parameters()):
        prefix, _, leaf = path.rpartition(".")
        if prefix in keep and leaf in ("scales", "biases"):
            continue
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target:
            updates.append((path, v.astype(target)))
    if updates:
        model.update(tree_unflatten(updates))
    return target


def model_label(model: Optional[str]) -> str:
    """How a ``--model`` value is named in notes and results (``None``: the embedded model)."""
    if model is None:

        return f"{embedded_model_path().name} (embedded)"
    p = Path(model).expanduser()
    return str(p) if p.exists() else model


def load_model(
    model: Optional[str] = None,
    *,
    quantize: Optional[str] = None,
    kernel: str = "auto",
    dtype: str = "auto",
    verbose: bool = False,
) -> Tuple[nn.Module, object, dict]:
    """Open a model for generation.

    Args:
        model: what :func:`mlxqat.load` opens: a local model directory (saved by mlxqat,
            or any mlx-lm directory), a GGUF file, a Hugging Face id, or ``None`` for the
            embedded stdlib model.
        quantize: a recipe name (e.g. ``"int4"``) to quantize a full-precision
            model with round-to-nearest after loading; ``None`` to run it as it is.
        kernel: ``auto``, ``mlx`` or ``mlxqat`` (see the module docstring).
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        verbose: print notes (kernel, dtype, quantization) to stderr.

    Returns:
        ``(model, tokenizer, info)`` where ``info`` has ``source``, ``kernel``,
        ``dtype``, ``quantized`` and ``kernel_layers`` (layers running our kernel).

    Raises:
        FileNotFoundError / ValueError: a missing or damaged model (see :func:`mlxqat.load`),
            an unknown recipe.
        UsageError: a bad option, or ``quantize`` on a model that is already quantized.
    """

    kernel = resolve_kernel(kernel)
    m, tok = load(model)
    source = model_label(model)
    if quantize:
        if layer_specs(m):
            raise UsageError(
                f"--quantize {quantize}: {source} is already quantized; drop --quantize to run it as it is"
            )
        quantize_rtn(m, quantize)
    cast = apply_dtype(m, dtype)
    use_kernel(m, kernel)
    mx.eval(m.parameters())  # quantize/cast now, not inside the first timed step
    n_kernel = sum(isinstance(x, KernelQuantizedLinear) for _, x in m.named_modules())
    info = {
        "source": source,
        "quantized": bool(layer_specs(m)),
        "quantize": quantize,
        "kernel": kernel,
        "kernel_layers": n_kernel,
        "dtype": str(cast or "as loaded").replace("mlx.core.", ""),
    }
    if verbose:
        what = f"RTN {quantize}" if quantize else ("quantized" if info["quantized"] else "full precision")
        ker = ""
        if info["quantized"]:
            ker = f", kernel {kernel}" + (f" ({n_kernel} layers on the mlxqat int4 kernel)" if kernel == "mlxqat" else "")
        print(f"[{source}: {what}, compute {info['dtype']}{ker}]", file=sys.stderr, flush=True)
    return m, tok, info


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def check_prompt_length(
    n_tokens: int,
    context: Optional[int],
    max_prompt_tokens: Optional[int] = None,
    fix: str = "shorten the prompt to at most {limit} tokens",
) -> None:
    """Refuse a prompt of ``n_tokens`` that the model cannot take, or that is too long to process unasked.

    The rule of ``generate`` and ``profile``: a prompt leaves room for one generated token in the
    model's ``context`` (:func:`mlxqat.data.model_context`); ``max_prompt_tokens``
    (``--max-prompt-tokens``) limits it further, and where the context is unknown it is the limit
    (default :data:`UNKNOWN_CONTEXT_LIMIT`).

    Args:
        fix: what to do, with ``{limit}`` for the longest prompt that passes.

    Raises:
        UsageError: naming the length, the limit and the fix.
    """
    if context is not None and n_tokens >= context:
        raise UsageError(
            f"the prompt is {n_tokens} tokens, but the model's context is {context} tokens "
            f"(max_position_embeddings); {fix.format(limit=context - 1)}"
        )
    if max_prompt_tokens is not None and n_tokens > max_prompt_tokens:
        raise UsageError(
            f"the prompt is {n_tokens} tokens, more than --max-prompt-tokens {max_prompt_tokens}; "
            f"{fix.format(limit=max_prompt_tokens)}, or raise --max-prompt-tokens"
        )
    if context is None and max_prompt_tokens is None and n_tokens > UNKNOWN_CONTEXT_LIMIT:
        raise UsageError(
            f"the prompt is {n_tokens} tokens, and the model's config names no context length "
            f"(max_position_embeddings), so prompts are limited to {UNKNOWN_CONTEXT_LIMIT} tokens; "
            f"{fix.format(limit=UNKNOWN_CONTEXT_LIMIT)}, or pass --max-prompt-tokens {n_tokens} if the model "
            "takes that many"
        )


def check_prompt(prompt_ids: List[int], max_tokens: int, context: Optional[int],
                 max_prompt_tokens: Optional[int] = None) -> int:
    """Validate a tokenized prompt; return the number of tokens to generate.

    Raises:
        UsageError: no tokens, ``max_tokens < 1``, or a prompt that does not fit the context
            or the prompt limit (:func:`check_prompt_length`).
    """
    if max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: generate at least 1 token (e.g. --max-tokens 100)")
    if len(prompt_ids) == 0:
        raise UsageError("the prompt is empty: give some text with --prompt \"...\" (or --prompt - to read stdin)")
    check_prompt_length(len(prompt_ids), context, max_prompt_tokens)
    if context is not None and len(prompt_ids) + max_tokens > context:
        fit = context - len(prompt_ids)
        print(
            f"[--max-tokens {max_tokens} reduced to {fit}: the {len(prompt_ids)}-token prompt and the "
            f"text must fit the model's context of {context} tokens]",
            file=sys.stderr,
            flush=True,
        )
        return fit
    return max_tokens


def encode_prompt(tokenizer, prompt: str) -> List[int]:
    """Token ids of a raw prompt, as ``mlx_lm.stream_generate`` encodes a string."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (``chat_template`` in ``tokenizer_config.json``, or a GGUF's)."""
    return bool(getattr(tokenizer, "has_chat_template", False)) or getattr(tokenizer, "chat_template", None) is not None


def chat_ids(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, up to the assistant's turn, as the
    ``mlx_lm.generate`` command builds them (the template text, encoded without special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(tokenizer, prompt: str, *, chat_template: bool = True, system_prompt: Optional[str] = None) -> List[int]:
    """Token ids of the ``--prompt`` text, as the ``mlx_lm.generate`` command makes them: in the tokenizer's
    chat template (after ``system_prompt``) when it has one and ``chat_template``, else the text as it is.

    Raises:
        UsageError: ``system_prompt`` without a chat template to put it in.
    """
    if chat_template and has_chat_template(tokenizer):
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        return chat_ids(tokenizer, system + [{"role": "user", "content": prompt}])
    if system_prompt is not None:
        raise UsageError("--system-prompt: this model's tokenizer has no chat template to put it in (no "
                         "'chat_template' in tokenizer_config.json); drop --system-prompt, or write it into --prompt")
    return encode_prompt(tokenizer, prompt)


def generate(
    model: nn.Module,
    tokenizer,
    prompt,
    *,
    max_tokens: int = 128,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    on_text: Optional[Callable[[str], None]] = None,
) -> Tuple[str, GenerationStats]:
    """Generate text with mlx-lm's decoding loop and sampler; stream it to ``on_text``.

    Args:
        model, tokenizer: from :func:`load_model` (or ``mlx_lm.load``).
        prompt: text (encoded as ``mlx_lm.generate`` encodes it) or token ids.
        max_tokens: the most tokens to generate (fewer at an end-of-sequence token).
        temp, top_p, top_k, min_p: sampling (``temp=0``: greedy), as ``make_sampler``.
        seed: seed of MLX's random generator (``None``: leave it as it is).
        on_text: called with each new piece of text.

    Returns:
        ``(text, stats)``. On Ctrl-C the ``KeyboardInterrupt`` propagates with
        the text so far and the statistics in its ``partial`` attribute.
    """
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.generate import stream_generate
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    pieces: List[str] = []
    stats = GenerationStats(prompt_tokens=len(prompt))
    try:
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
            if r.text:
                pieces.append(r.text)
                if on_text is not None:
                    on_text(r.text)
            stats = GenerationStats(
                prompt_tokens=r.prompt_tokens,
                prompt_tps=r.prompt_tps,
                generation_tokens=r.generation_tokens,
                generation_tps=r.generation_tps,
                peak_memory_gb=r.peak_memory,
                finish_reason=r.finish_reason,
            )
    except KeyboardInterrupt as e:
        stats.finish_reason = "interrupted"
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        e.partial = ("".join(pieces), stats)
        raise
    return "".join(pieces), stats


def _stdout_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_stats(stats: GenerationStats) -> None:
    print("=" * 10, file=sys.stderr)
    print(stats.summary(), file=sys.stderr, flush=True)


def _generate_once(model, tokenizer, ids, args) -> GenerationStats:
    max_tokens = check_prompt(ids, args.max_tokens, model_context(model), args.max_prompt_tokens)
    return _generate_printed(model, tokenizer, ids, max_tokens, args)[1]


def _generate_printed(model, tokenizer, ids, max_tokens: int, args):
    """Generate with the command's sampling flags, text to stdout, stats after; ``(reply, stats)``."""
    try:
        reply, stats = generate(
            model, tokenizer, ids, max_tokens=max_tokens, temp=args.temp, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, seed=args.seed, on_text=_stdout_text,
        )
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    _print_stats(stats)
    return reply, stats


def _chat(model, tokenizer, args) -> int:
    if not has_chat_template(tokenizer):
        raise UsageError(
            "--chat: this model's tokenizer has no chat template (no 'chat_template' in "
            "tokenizer_config.json); use --prompt for plain completion, or a chat model"
        )
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    context = model_context(model)
    print("[chat: type a message and press Enter; Ctrl-D (end of input) quits]", file=sys.stderr, flush=True)
    while True:
        print(">> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_ids(tokenizer, messages)
        try:
            max_tokens = check_prompt(ids, args.max_tokens, context, args.max_prompt_tokens)
        except UsageError as e:
            print(f"error: {e}; starting a new conversation", file=sys.stderr, flush=True)
            messages = messages[:1] if args.system_prompt else []
            continue
        reply, _ = _generate_printed(model, tokenizer, ids, max_tokens, args)
        messages.append({"role": "assistant", "content": reply})


def run(args: argparse.Namespace) -> int:
    """The command behind :func:`main`, on parsed arguments."""
    if args.max_tokens < 1:  # before loading anything
        raise UsageError(f"--max-tokens {args.max_tokens}: generate at least 1 token (e.g. --max-tokens 100)")
    if args.chat and args.prompt is not None:
        raise UsageError("give either --prompt or --chat, not both")
    if args.chat and args.ignore_chat_template:
        raise UsageError("--chat talks through the tokenizer's chat template; drop --ignore-chat-template, or use "
                         "--prompt for plain completion")
    if args.system_prompt is not None and args.ignore_chat_template:
        raise UsageError("--system-prompt goes into the chat template, which --ignore-chat-template turns off; "
                         "drop one of them")
    if not args.chat:
        if args.prompt is None:
            raise UsageError("no prompt: pass --prompt \"...\" (or --prompt - to read stdin), or --chat")
        if args.prompt == "-":
            args.prompt = sys.stdin.read()
        if args.prompt == "":
            raise UsageError("the prompt is empty: give some text with --prompt \"...\"")
    model, tokenizer, _ = load_model(
        args.model, quantize=args.quantize, kernel=args.kernel, dtype=args.dtype, verbose=args.verbose
    )
    if args.chat:
        return _chat(model, tokenizer, args)
    templated = not args.ignore_chat_template and has_chat_template(tokenizer)
    ids = prompt_ids(tokenizer, args.prompt, chat_template=templated, system_prompt=args.system_prompt)
    if templated and args.verbose:
        print("[the prompt goes into the tokenizer's chat template; --ignore-chat-template sends it as it is]",
              file=sys.stderr, flush=True)
    _generate_once(model, tokenizer, ids, args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mlxqat.generate``; numbers are range-checked at parse time."""
    p = ArgumentParser(
        prog="python -m mlxqat.generate",
        description="Generate text with an mlx-lm / mlxqat model; print prompt and generation speed and peak memory.",
    )
    p.add_argument("--model", default=None,
                   help="Model directory or Hugging Face id (default: the embedded full-precision stdlib model).")
    p.add_argument("--prompt", "-p", default=None,
                   help="Prompt text ('-' reads stdin); in the tokenizer's chat template when it has one.")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="Send --prompt as it is, without the tokenizer's chat template (plain completion).")
    p.add_argument("--chat", action="store_true", help="Interactive chat with the tokenizer's chat template.")
    p.add_argument("--system-prompt", default=None, help="System message, in the chat template (--prompt or --chat).")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help=f"Refuse a prompt longer than N tokens (default: what fits the model's context; "
                        f"{UNKNOWN_CONTEXT_LIMIT} when its config names none).")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=128, help="Most tokens to generate (default: 128).")
    p.add_argument("--temp", type=non_negative_float, default=0.0, help="Sampling temperature; 0 is greedy (default: 0).")
    p.add_argument("--top-p", type=probability, default=1.0, help="Nucleus sampling mass in (0, 1]; 1 is off (default: 1).")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="Sample among the k most likely tokens; 0 is off.")
    p.add_argument("--min-p", type=unit_float, default=0.0, help="Min-p sampling threshold in [0, 1]; 0 is off.")
    p.add_argument("--seed", type=non_negative_int, default=None, help="Random seed (for reproducible sampling).")
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="4-bit matmul: mlx (MLX's), mlxqat (ours), auto (ours on CPU, MLX's on GPU).")
    p.add_argument("--quantize", default=None, metavar="RECIPE",
                   help="Quantize a full-precision model on the fly with round-to-nearest (e.g. int4).")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="Compute dtype; auto: float32 on CPU, the model's own on GPU.")
    p.add_argument("--quiet", dest="verbose", action="store_false", help="Don't print the loading note.")
    return p


@command(interrupted="[interrupted]")
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m mlxqat.generate``; returns the exit status (2: bad input, 130: Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt as e:  # the statistics of the text so far, then the note
        partial = getattr(e, "partial", None)
        sys.stdout.flush()
        if partial is not None:
            _print_stats(partial[1])
        raise


if __name__ == "__main__":
    sys.exit(main())
