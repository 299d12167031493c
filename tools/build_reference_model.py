"""Train the project's reference model: a small Llama on the CPython standard library.

    python tools/build_reference_model.py                    # on a GPU: about 1 min (H100)
    tools/with-blas python tools/build_reference_model.py    # on 2 CPU cores: hours (~3 s/step)
    tools/with-blas python tools/build_reference_model.py --steps 50 --out /tmp/tiny

The shipped model was trained with the defaults on an NVIDIA H100 (MLX's CUDA
backend, ``MLX_ENABLE_TF32=0``, ``--corpus`` pointing at this machine's token
cache): 4000 steps x 16 x 256 tokens (about 4 tokens per parameter) in 65 s.

Steps (everything deterministic for a given interpreter, seed and flags):
1. corpus: the stdlib ``*.py`` files of the running interpreter, split 90/5/5 by a
   hash of the relative path (``mlxqat.stdlib_data``);
2. a byte-level BPE tokenizer (GPT-2 style: ByteLevel pre-tokenizer and decoder,
   no normalizer, ``<|endoftext|>`` between files) trained on the train split;
3. pre-training of an mlx-lm ``llama`` model in float32 (AdamW, warmup + cosine);
4. the model saved in float16 as an mlx-lm directory (default
   ``mlxqat/assets/stdlib-llama``, the package's embedded model) with
   ``training.json``: hyperparameters, wall time, and the validation / test
   perplexity of the saved weights and of round-to-nearest int4 / int3 / int2 g64.

The tokenizer and the token ids are cached under ``benchmarks/cache/`` and a
checkpoint is written every ``--checkpoint-every`` steps, so a killed run resumes
where it stopped (``--no-resume`` starts over).

``--corpus DIR`` trains on a prepared cache directory as it is (``stats.json``,
``train/validation/test.npy``, ``tokenizer/``; e.g. ``benchmarks/cache/stdlib-<key>``
copied from another machine) without reading the running interpreter's stdlib, so
a machine with another Python version trains on exactly the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models import llama
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

from mlxqat import stdlib_data  # noqa: E402
from mlxqat.storage.destinations import atomic_dir, atomic_file, work_dir
from mlxqat.storage.destinations import write_manifest  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
# Bump when the tokenizer recipe or the token layout changes (invalidates the cache).
DATA_FORMAT = 1
RTN_BITS = (4, 3, 2)
RTN_GROUP_SIZE = 64
# Tokens of the validation split at the start of the stream whose perplexity is
# recorded separately, so tests can check the shipped model quickly.
SLICE_TOKENS = 8192


@dataclass
class Config:
    steps: int = 4000  # optimizer steps (2000 gave val ppl 23.3; 4000 x 32 overfits the 2.6M-token corpus)
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence (the model's training context)
    vocab_size: int = 4096  # BPE vocabulary, special token included
    hidden_size: int = 256  # multiples of 128 let g64 and g128 quantize every layer
    num_hidden_layers: int = 4
    intermediate_size: int = 640  # ~2.5x hidden, a multiple of 128
    num_attention_heads: int = 4  # head_dim 64
    learning_rate: float = 2e-3  # peak
    min_lr_ratio: float = 0.1  # cosine ends at learning_rate * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # AdamW, matrices only (not norms)
    grad_clip: float = 1.0  # global gradient-norm clip
    init_std: float = 0.02  # normal init; residual outputs scaled by 1/sqrt(2 * layers)
    seed: int = 0

    def model_config(self, vocab_size: int, eos_token_id: int) -> dict:
        """The mlx-lm (and Hugging Face) config.json of the model."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.seq_len,
            "vocab_size": vocab_size,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": eos_token_id,
            "torch_dtype": "float16",
        }


# ---------------------------------------------------------------------------
# Corpus and tokenizer (cached)
# ---------------------------------------------------------------------------


def corpus_key(vocab_size: int) -> str:
    """A hash of everything the tokenizer and the token ids depend on."""
    h = hashlib.sha256(f"format={DATA_FORMAT} vocab={vocab_size}\n".encode())
    root = stdlib_data.stdlib_root()
    for split in stdlib_data.SPLITS:
        for path in stdlib_data.stdlib_files(split):
            h.update(f"{split} {path.relative_to(root).as_posix()} ".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def train_tokenizer(texts, vocab_size: int, directory: Path) -> None:
    """Train a GPT-2 style byte-level BPE on ``texts``; save it as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE round-trips any text exactly (llama.cpp "gpt2").
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[stdlib_data.EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=stdlib_data.EOS_TOKEN,
        bos_token=None,
        clean_up_tokenization_spaces=False,  # decode must return the text verbatim
        model_max_length=1 << 20,
    )
    fast.save_pretrained(str(directory))
    # transformers 5 writes its new class name, which transformers 4 cannot load.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def prepare_corpus(vocab_size: int, cache: Path = CACHE) -> tuple[Path, dict, dict]:
    """Train (or reuse) the tokenizer and tokenize every split.

    Returns:
        ``(tokenizer_dir, tokens, stats)``: ``tokens[split]`` is a uint16 array, the
        files of the split encoded one by one, each followed by the end-of-text id
        (the encoding of ``stdlib_data.read_split_text(split)``).
    """
    from tokenizers import Tokenizer

    directory = cache / f"stdlib-{corpus_key(vocab_size)}"
    tok_dir = directory / "tokenizer"
    if not (directory / "stats.json").exists():
        t0 = time.time()
        texts = {s: [stdlib_data.read_source(p) for p in stdlib_data.stdlib_files(s)] for s in stdlib_data.SPLITS}
        with atomic_dir(directory) as tmp:
            print(f"training a {vocab_size}-token BPE on {len(texts['train'])} files ...", flush=True)
            train_tokenizer(texts["train"], vocab_size, tmp / "tokenizer")
            tok = Tokenizer.from_file(str(tmp / "tokenizer" / "tokenizer.json"))
            eos = tok.token_to_id(stdlib_data.EOS_TOKEN)
            stats = {"python": platform.python_version(), "stdlib": str(stdlib_data.stdlib_root())}
            for split, docs in texts.items():
                ids = []
                for enc in tok.encode_batch(docs):
                    ids.extend(enc.ids)
                    ids.append(eos)
                arr = np.asarray(ids, dtype=np.uint16)
                np.save(tmp / f"{split}.npy", arr)
                stats[split] = {"files": len(docs), "chars": sum(map(len, docs)), "tokens": int(arr.size)}
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        print(f"corpus ready in {time.time() - t0:.0f}s: {directory}", flush=True)
    return load_corpus(directory)


def load_corpus(directory: Path, vocab_size=None) -> tuple[Path, dict, dict]:
    """The tokenizer directory, token ids and stats of a prepared cache directory,
    used as it is (nothing is re-read or re-tokenized).

    Raises:
        SystemExit: a file is missing, or the tokenizer's vocabulary is not ``vocab_size``.
    """
    directory = Path(directory)
    need = ["stats.json", "tokenizer/tokenizer.json", *(f"{s}.npy" for s in stdlib_data.SPLITS)]
    missing = [n for n in need if not (directory / n).is_file()]
    if missing:
        raise SystemExit(f"{directory} is not a prepared corpus directory (missing {', '.join(missing)}); "
                         f"point --corpus at a benchmarks/cache/stdlib-<key> directory")
    tok_dir = directory / "tokenizer"
    if vocab_size is not None:
        vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
        if len(vocab) != vocab_size:
            raise SystemExit(f"the tokenizer in {directory} has {len(vocab)} tokens but --vocab-size is "
                             f"{vocab_size}; pass --vocab-size {len(vocab)}")
    stats = json.loads((directory / "stats.json").read_text())
    tokens = {s: np.load(directory / f"{s}.npy") for s in stdlib_data.SPLITS}
    return tok_dir, tokens, stats


# ---------------------------------------------------------------------------
# Model, data, training
# ---------------------------------------------------------------------------


def build_model(cfg: Config, model_config: dict) -> llama.Model:
    """A fresh float32 llama with GPT-2 style init (seeded by ``cfg.seed``)."""
    mx.random.seed(cfg.seed)
    model = llama.Model(llama.ModelArgs.from_dict(model_config))
    resid_std = cfg.init_std / math.sqrt(2 * cfg.num_hidden_layers)

    def init(path, p):
        if p.ndim != 2:
            return p  # norm weights stay 1
        std = resid_std if path.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
        return std * mx.random.normal(p.shape, dtype=mx.float32)

    from mlx.utils import tree_map_with_path

    model.update(tree_map_with_path(init, model.parameters()))
    mx.eval(model.parameters())
    return model


def batch_at(tokens: np.ndarray, step: int, cfg: Config) -> tuple[mx.array, mx.array]:
    """The batch of ``step``: random windows, a pure function of (seed, step) so runs resume exactly."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, tokens.size - cfg.seq_len - 1, size=cfg.batch_size)
    idx = starts[:, None] + np.arange(cfg.seq_len + 1)[None, :]
    window = mx.array(tokens[idx].astype(np.int32))  # (B, L + 1)
    return window[:, :-1], window[:, 1:]


def loss_fn(model, x, y):
    logits = model(x)  # (B, L, vocab)
    return nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")


def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 16, max_tokens=None) -> float:
    """Perplexity over ``tokens`` cut into consecutive windows of ``seq_len`` predictions.

    Each window sees only its own tokens (no carried context); a trailing partial
    window is dropped. With ``max_tokens``, only ``max_tokens // seq_len`` windows
    evenly spaced over the whole stream are scored (a sample of every part of the split).
    """
    n = (tokens.size - 1) // seq_len
    if n == 0:
        raise ValueError(f"{tokens.size} tokens do not fill one window of seq_len={seq_len}")
    rows = np.arange(n)
    if max_tokens is not None and max_tokens // seq_len < n:
        rows = np.unique(np.linspace(0, n - 1, max(max_tokens // seq_len, 1)).round().astype(np.int64))
    nll = 0.0
    for i in range(0, rows.size, batch_size):
        idx = rows[i : i + batch_size, None] * seq_len + np.arange(seq_len + 1)[None, :]
        window = mx.array(tokens[idx].astype(np.int32))  # (b, seq_len + 1)
        logits = model(window[:, :-1]).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, window[:, 1:], reduction="sum").item()
    return math.exp(nll / (rows.size * seq_len))


def make_optimizer(cfg: Config) -> optim.Optimizer:
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps),
            optim.cosine_decay(cfg.learning_rate, decay_steps, cfg.learning_rate * cfg.min_lr_ratio),
        ],
        [cfg.warmup_steps],
    )
    return optim.MultiOptimizer(
        [
            optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=cfg.weight_decay),
            optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.0),
        ],
        filters=[lambda path, p: p.ndim >= 2],
    )


def run_key(cfg: Config, corpus_dir: str) -> str:
    """Checkpoints are only resumed by a run with the same settings and data."""
    blob = json.dumps({"cfg": dataclasses.asdict(cfg), "corpus": corpus_dir}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, model, optimizer, step: int, elapsed: float) -> None:
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    tmp = path / ".checkpoint.tmp.safetensors"  # renamed into place once complete
    mx.save_safetensors(str(tmp), arrays)
    tmp.replace(path / "checkpoint.safetensors")
    with atomic_file(path / "checkpoint.json", "w", check=False) as f:  # inside our work directory
        json.dump({"step": step, "elapsed_s": elapsed}, f)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, float]:
    meta = json.loads((path / "checkpoint.json").read_text())
    arrays = mx.load(str(path / "checkpoint.safetensors"))
    model.update(tree_unflatten([(k[6:], v) for k, v in arrays.items() if k.startswith("model.")]))
    optimizer.state = tree_unflatten([(k[10:], v) for k, v in arrays.items() if k.startswith("optimizer.")])
    return meta["step"], meta["elapsed_s"]


def train(cfg: Config, model, tokens: np.ndarray, val_tokens: np.ndarray, ckpt_dir: Path,
          resume: bool = True, checkpoint_every: int = 250, eval_every: int = 500) -> dict:
    """Pre-train ``model`` in place; returns step count, tokens seen and wall time."""
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    start, elapsed = 0, 0.0
    if resume and (ckpt_dir / "checkpoint.json").exists():
        start, elapsed = load_checkpoint(ckpt_dir, model, optimizer)
        print(f"resuming from step {start} ({elapsed:.0f}s already spent)", flush=True)
    work_dir(ckpt_dir)

    state = [model.state] + [o.state for o in optimizer.optimizers]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return loss

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", dynamic_ncols=True,
               mininterval=2.0)
    t_last, ema, elapsed_at_start = time.time(), None, elapsed
    step_times = []
    for step in bar:
        x, y = batch_at(tokens, step, cfg)
        loss = step_fn(x, y)
        mx.eval(state, loss)
        now = time.time()
        elapsed += now - t_last
        step_times.append(now - t_last)
        t_last = now
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        done = step + 1
        tok_s = (done - start) * tokens_per_step / max(elapsed - elapsed_at_start, 1e-9)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if done % eval_every == 0 or done == cfg.steps:
            ppl = perplexity(model, val_tokens, cfg.seq_len, max_tokens=16384)
            tqdm.write(f"step {done}: train loss (ema) {ema:.4f}, val ppl (16k-token sample) {ppl:.2f}, "
                       f"{elapsed:.0f}s")
            t_last = time.time()  # evaluation time is not training time
        if done % checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, model, optimizer, done, elapsed)
            t_last = time.time()
    bar.close()
    run = {"steps": cfg.steps, "tokens_seen": cfg.steps * tokens_per_step, "train_wall_s": round(elapsed, 1)}
    if step_times:  # median over the steps this process ran (the first includes compilation)
        run["step_s_median"] = round(float(np.median(step_times)), 5)
    return run


# ---------------------------------------------------------------------------
# Evaluation and saving
# ---------------------------------------------------------------------------


def rounded_fp16(model, cfg_dict: dict) -> llama.Model:
    """A float32 copy of ``model`` whose weights are rounded through float16 (the shipped weights)."""
    copy = llama.Model(llama.ModelArgs.from_dict(cfg_dict))
    copy.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), model.parameters()))
    mx.eval(copy.parameters())
    return copy


def rtn_model(model, cfg_dict: dict, bits: int, group_size: int = RTN_GROUP_SIZE) -> llama.Model:
    """A float32 copy of ``model`` with every matrix round-to-nearest quantized and dequantized.

    The weights are exactly those of ``nn.quantize`` (or ``mlx_lm.convert -q``) applied
    to the float16 model: ``mx.quantize`` of the float16 matrix, dequantized. They are
    kept in plain float32 layers because the CPU ``quantized_matmul`` is ~10x slower.
    Every 2-D parameter of a llama is a Linear or the (tied) embedding.
    """
    def rtn(p):
        if p.ndim != 2:
            return p.astype(mx.float32)
        w = p.astype(mx.float16)
        return mx.dequantize(*mx.quantize(w, group_size, bits), group_size, bits).astype(mx.float32)

    copy = llama.Model(llama.ModelArgs.from_dict(cfg_dict))
    copy.update(tree_map(rtn, model.parameters()))
    mx.eval(copy.parameters())
    return copy


def evaluate(model, cfg_dict: dict, tokens: dict, seq_len: int, sample_tokens: int) -> dict:
    """Perplexities of the shipped float16 weights, and of float32 and RTN int4 / int3 / int2 g64.

    The float16 model is scored on the whole validation and test splits; the
    comparisons (float32, RTN) on ``sample_tokens`` per split, windows evenly spaced
    over the split, against the float16 model on the same windows.
    """
    full = partial(perplexity, seq_len=seq_len)
    sample = partial(perplexity, seq_len=seq_len, max_tokens=sample_tokens)
    shipped = rounded_fp16(model, cfg_dict)
    metrics = {"float16": {"validation_ppl": round(full(shipped, tokens["validation"]), 4),
                           "test_ppl": round(full(shipped, tokens["test"]), 4),
                           "validation_tokens": (tokens["validation"].size - 1) // seq_len * seq_len,
                           "test_tokens": (tokens["test"].size - 1) // seq_len * seq_len}}
    metrics["validation_slice"] = {
        "tokens": SLICE_TOKENS, "seq_len": seq_len,
        "ppl": round(perplexity(shipped, tokens["validation"][: SLICE_TOKENS + 1], seq_len), 4),
    }
    val16, test16 = sample(shipped, tokens["validation"]), sample(shipped, tokens["test"])
    val32 = sample(model, tokens["validation"])
    change = 100 * (val16 / val32 - 1)
    metrics["sample"] = {
        "tokens_per_split": min(sample_tokens // seq_len, (tokens["test"].size - 1) // seq_len) * seq_len,
        "float16": {"validation_ppl": round(val16, 4), "test_ppl": round(test16, 4)},
        "float32": {"validation_ppl": round(val32, 4), "float16_change_pct": round(change, 4)},
    }
    if abs(change) > 0.1:
        print(f"WARNING: float16 weights change val ppl by {change:.3f}% (> 0.1%)")
    for bits in RTN_BITS:
        q = rtn_model(model, cfg_dict, bits)
        v, t = sample(q, tokens["validation"]), sample(q, tokens["test"])
        metrics["sample"][f"rtn_int{bits}_g{RTN_GROUP_SIZE}"] = {
            "validation_ppl": round(v, 4), "test_ppl": round(t, 4),
            "validation_gap_pct": round(100 * (v / val16 - 1), 3),
            "test_gap_pct": round(100 * (t / test16 - 1), 3),
        }
        print(f"RTN int{bits} g{RTN_GROUP_SIZE}: val ppl {v:.3f} ({100 * (v / val16 - 1):+.2f}%), "
              f"test ppl {t:.3f} ({100 * (t / test16 - 1):+.2f}%)", flush=True)
    return metrics


def save_model_dir(out: Path, model, cfg_dict: dict, tok_dir: Path, training: dict) -> None:
    """Write the float16 mlx-lm directory atomically: config, weights, tokenizer, training.json, manifest."""
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        for f in sorted(tok_dir.iterdir()):
            (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        write_manifest(tmp, {"embedded_model": "stdlib-llama, trained by tools/build_reference_model.py"})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    parser.add_argument("--out", type=Path, default=stdlib_data.embedded_model_path(),
                        help="model directory to write (default: the package's embedded model)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--sample-tokens", type=int, default=32768,
                        help="tokens per split for the float32 / RTN comparisons (evenly spaced windows)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="prepared token cache directory (benchmarks/cache/stdlib-<key>) to use as it is, "
                             "instead of tokenizing this interpreter's stdlib")
    args = vars(parser.parse_args(argv))
    out, resume = args.pop("out"), args.pop("resume")
    corpus = args.pop("corpus")
    checkpoint_every, eval_every = args.pop("checkpoint_every"), args.pop("eval_every")
    sample_tokens = args.pop("sample_tokens")
    cfg = Config(**args)
    if cfg.hidden_size % cfg.num_attention_heads:
        parser.error(f"--hidden-size {cfg.hidden_size} is not divisible by --num-attention-heads")

    t0 = time.time()
    if corpus is not None:
        tok_dir, tokens, stats = load_corpus(corpus, cfg.vocab_size)
    else:
        tok_dir, tokens, stats = prepare_corpus(cfg.vocab_size)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    cfg_dict = cfg.model_config(len(tokenizer.get_vocab()), tokenizer.eos_token_id)
    model = build_model(cfg, cfg_dict)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"llama {cfg.hidden_size}x{cfg.num_hidden_layers} ({n_params / 1e6:.2f}M params), train "
          f"{stats['train']['tokens']:,} tokens, {cfg.steps} steps x {cfg.batch_size}x{cfg.seq_len}", flush=True)

    ckpt_dir = CACHE / f"run-{run_key(cfg, tok_dir.parent.name)}"
    run = train(cfg, model, tokens["train"], tokens["validation"], ckpt_dir, resume,
                checkpoint_every, eval_every)
    print("evaluating ...", flush=True)
    t_eval = time.time()
    metrics = evaluate(model, cfg_dict, tokens, cfg.seq_len, sample_tokens)
    metrics["eval_wall_s"] = round(time.time() - t_eval, 1)
    training = {
        "description": "mlx-lm llama pre-trained on the CPython standard library source "
                       "(tools/build_reference_model.py); perplexities of the saved float16 weights "
                       "computed in float32, RTN = mlx nn.quantize of every Linear and the tied embedding",
        "hyperparameters": dataclasses.asdict(cfg),
        "optimizer": "AdamW betas (0.9, 0.95), linear warmup + cosine, decay on matrices only",
        "parameters": int(n_params),
        **run,
        "tokens_per_parameter": round(run["tokens_seen"] / n_params, 2),
        "total_wall_s": round(time.time() - t0, 1),
        "corpus": stats,
        "corpus_cache": tok_dir.parent.name,
        "metrics": metrics,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "mlx": mx.__version__},
    }
    save_model_dir(Path(out), model, cfg_dict, tok_dir, training)
    print(json.dumps({"out": str(out), "parameters": n_params, **run, "metrics": metrics}, indent=2))
    return training


if __name__ == "__main__":
    main()
