"""Fine-tuning a 4-bit model: mlxqat's methods against what mlx-lm users do today, on the same task and budget.

    python tools/build_docstring_task.py --out runs/finetune/data
    tools/with-blas python benchmarks/finetune.py --model .models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data runs/finetune/data --steps 20 --out benchmarks/results/finetune-smollm2

The full-precision model (``--model``, read by ``mlxqat.load``) is saved as a bfloat16 mlx-lm directory and
quantized by ``mlx_lm.convert -q`` (int4 g64 by default): the 4-bit model users start from. Rows, each with
the same data, steps, batch and example length, and the learning rate picked on the validation split from
``--lrs`` (never on the test split):

* ``mlx-lm LoRA, 16-bit``: ``mlx_lm lora`` on the bfloat16 model, adapter beside it (the upper bound, not 4-bit);
* ``mlx-lm LoRA on 4-bit, unfused``: on the 4-bit model, adapter beside it (not a pure 4-bit model);
* ``mlx-lm LoRA on 4-bit + fuse``: then ``mlx_lm fuse`` (the 4-bit model users ship today);
* ``16-bit LoRA, fused, then RTN``: the 16-bit adapter fused, then ``mlx_lm.convert -q``;
* ``mlxqat lora`` / ``scales`` / ``full``: ``mlxqat.finetune`` on the 4-bit model, the file it saved.

Each result is read back from disk and measured: the test split's completion loss (nats per completion token,
:func:`mlxqat.evaluate.completion_loss`), exact match and token F1 of the greedy answer (one line, at most
``--answer-tokens``), drift on general text no method trained on (KL to the full-precision model and
perplexity on :mod:`mlxqat.heldout` prose), the file size, training seconds and tokens per second. ``gain
kept`` is (loss of the 4-bit start - loss of the 4-bit result) / (loss of the 4-bit start - loss with the
trained adapter or weights before saving). Resumable: finished runs are kept in ``<out>.runs.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import mlxqat  # noqa: E402
from mlxqat.convert import convert, dequantize  # noqa: E402
from mlxqat.evaluate import completion_loss, evaluate  # noqa: E402
from mlxqat.layers import is_fake_quant  # noqa: E402
from mlxqat.finetune_data import load_finetune_data  # noqa: E402
from mlxqat.heldout import heldout_windows  # noqa: E402
from mlxqat.kernels import use_dequantized_matmul  # noqa: E402
from mlxqat.profile import chip_name  # noqa: E402
from mlxqat.training.finetune import LEARNING_RATES, read_back  # noqa: E402

PY = sys.executable
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                  "{% if messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}")
MLX_LM_LRS = (1e-5, 1e-4, 1e-3)
MLXQAT_LRS = {"lora": (3e-4, 1e-3, 3e-3), "scales": (3e-5, 1e-4, 3e-4), "full": (3e-5, 1e-4, 3e-4)}  # scales: relative steps


def run(cmd, log: Path) -> str:
    """Run a command (mlx-lm's CLI), its output kept in ``log``; raise with its tail when it fails."""
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{text[-2000:]}")
    return text


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


class Bench:
    def __init__(self, a):
        self.a, self.work = a, Path(a.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.fp_dir, self.q_dir = self.work / "fp-bf16", self.work / f"int{a.bits}-g{a.group_size}"
        if not (self.fp_dir / "config.json").exists():
            m, t, c = mlxqat.load(a.model, return_config=True)
            m.set_dtype(mx.bfloat16)
            mlxqat.save(m, t, self.fp_dir, config=dict(c, torch_dtype="bfloat16"))
        if not (self.q_dir / "config.json").exists():
            run([PY, "-m", "mlx_lm", "convert", "--hf-path", self.fp_dir, "-q", "--q-bits", str(a.bits),
                 "--q-group-size", str(a.group_size), "--mlx-path", self.q_dir], self.work / "convert.log")
        self.fp, self.tokenizer = mlxqat.load(self.fp_dir)
        self.fp.set_dtype(mx.float32)
        self.data = load_finetune_data(a.data, self.tokenizer, 2048)
        self.general = heldout_windows(self.tokenizer, 128, a.general_windows, kinds=("prose",))["prose"]
        self.seq = int(self.data.train.shape[-1])
        self.cache_path = Path(str(a.out) + ".runs.json")
        self.cache = json.loads(self.cache_path.read_text()) if a.resume and self.cache_path.exists() else {}

    def keep(self, key, value):
        self.cache[key] = value
        self.cache_path.write_text(json.dumps(self.cache, indent=1) + "\n")
        return value

    # --- measures --------------------------------------------------------------------------------------------

    def losses(self, model, splits=("valid", "test")) -> dict:
        model.eval()
        return {s: completion_loss(model, getattr(self.data, s), 4)["loss"] for s in splits}

    def answers(self, model) -> dict:
        """Exact match and token F1 of the greedy one-line answer to each test prompt."""
        from mlx_lm import generate
        from mlx_lm.sample_utils import make_sampler

        exact, f1s = 0, []
        rows = [json.loads(x) for x in (Path(self.a.data) / "test.jsonl").read_text().splitlines() if x.strip()]
        for row in rows:
            if "messages" in row:
                prompt = self.tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)
                ref = row["messages"][-1]["content"]
            else:
                prompt, ref = self.tokenizer.encode(row["prompt"]), row["completion"]
            out = generate(model, self.tokenizer, prompt=prompt, max_tokens=self.a.answer_tokens,
                           sampler=make_sampler(0.0), verbose=False)
            got = out.strip().split("\n")[0].strip()
            exact += got == ref.strip()
            a, b = got.split(), ref.strip().split()
            common = sum(min(a.count(w), b.count(w)) for w in set(a))
            f1s.append(0.0 if not common else 2 * common / (len(a) + len(b)))
        return {"exact": exact / len(rows), "f1": float(np.mean(f1s))}

    def drift(self, model) -> dict:
        r = evaluate(model, self.general, self.fp)
        return {"general_kl": r["kl"], "general_ppl": r["ppl"]}

    def measure(self, model, answers=True) -> dict:
        out = self.losses(model)
        out.update(self.drift(model))
        if answers:
            out.update(self.answers(model))
        return out

    def answers_of(self, model) -> dict:
        """:meth:`answers` with every quantized or fake-quant layer made a plain float32 layer holding its
        dequantized weight (the same numbers, computed once rather than at every generated token)."""
        from mlx.utils import tree_unflatten

        for _, m in model.named_modules():
            if is_fake_quant(m):
                convert(model)
                break
        adapters = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "lora_a")]
        if adapters:  # mlx-lm's unfused LoRA layers: the adapter added to the dequantized weight, in float
            model.update_modules(tree_unflatten(adapters))
        dequantize(model, mx.float32)
        return self.answers(model)

    # --- methods ---------------------------------------------------------------------------------------------

    def mlx_lm_lora(self, base: Path, lr: float) -> Path:
        """mlx-lm's LoRA training (``mlx_lm lora --train``, its own code and defaults: rank 8, scale 20, Adam,
        constant rate), run in this process so that a quantized base computes as dequantize + matmul on a CPU
        (:func:`mlxqat.kernels.use_dequantized_matmul`: the same numbers as ``quantized_matmul``, whose CPU
        path makes one step take minutes), in float32 as mlxqat's methods compute here."""
        import contextlib
        import io
        import types

        from mlx_lm import load as mlx_lm_load
        from mlx_lm.lora import CONFIG_DEFAULTS, train_model
        from mlx_lm.tuner.datasets import load_dataset

        a = self.a
        adapter = self.work / f"adapter-{base.name}-{lr:g}"
        if adapter.exists():
            shutil.rmtree(adapter)
        args = types.SimpleNamespace(**dict(
            CONFIG_DEFAULTS, model=str(base), train=True, data=a.data, iters=a.steps, batch_size=a.batch_size,
            learning_rate=lr, num_layers=a.num_layers, mask_prompt=True, max_seq_length=self.seq + 1,
            val_batches=1, steps_per_eval=10 ** 6, steps_per_report=max(1, a.steps // 4),
            save_every=10 ** 6, adapter_path=str(adapter), seed=0))
        np.random.seed(0)
        model, tokenizer = mlx_lm_load(str(base))
        use_dequantized_matmul(model)
        model.set_dtype(mx.float32)  # a CPU multiplies bfloat16 without BLAS, many times slower; values are exact
        if getattr(tokenizer, "chat_template", None) is None:
            # mlx-lm reads prompt/completion lines through a chat template, which a base model lacks: give it the
            # plain one, BOS + prompt + completion + EOS, the tokens mlxqat trains and measures for such lines
            tokenizer._tokenizer.chat_template = PLAIN_TEMPLATE
        train_set, valid_set, _ = load_dataset(args, tokenizer)
        t = time.time()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            train_model(args, model, train_set, valid_set)
        (self.work / f"{adapter.name}.log").write_text(log.getvalue())
        (adapter / "bench.json").write_text(json.dumps({"seconds": time.time() - t}))
        return adapter

    def with_adapter(self, base: Path, adapter: Path):
        from mlx_lm import load as mlx_lm_load

        model, _ = mlx_lm_load(str(base), adapter_path=str(adapter))
        use_dequantized_matmul(model)
        model.set_dtype(mx.float32)  # every stored value is exact in float32; every row computes as read_back's
        return model

    def fused(self, base: Path, adapter: Path, name: str) -> Path:
        out = self.work / name
        if out.exists():
            shutil.rmtree(out)
        run([PY, "-m", "mlx_lm", "fuse", "--model", base, "--adapter-path", adapter, "--save-path", out],
            self.work / f"{name}.log")
        return out

    def rtn(self, src: Path, name: str) -> Path:
        out = self.work / name
        if out.exists():
            shutil.rmtree(out)
        run([PY, "-m", "mlx_lm", "convert", "--hf-path", src, "-q", "--q-bits", str(self.a.bits), "--q-group-size",
             str(self.a.group_size), "--mlx-path", out], self.work / f"{name}.log")
        return out

    def quantized(self, path: Path):
        return read_back(path)  # the stored codes, scales and biases, computing in float32

    def search(self, key, lrs, train_and_measure):
        """Train at each rate (cached), keep the one with the lowest validation loss."""
        trials = {}
        for lr in lrs:
            k = f"{key}@{lr:g}"
            trials[lr] = self.cache.get(k) or self.keep(k, train_and_measure(lr))
            print(f"{k}: valid {trials[lr]['valid']:.4f}", flush=True)
        best = min(trials, key=lambda lr: trials[lr]["valid"])
        return dict(trials[best], learning_rate=best, trials={f"{lr:g}": t["valid"] for lr, t in trials.items()})

    def rows(self) -> list:
        a, out = self.a, []
        if "start" not in self.cache:
            start = dict(self.measure(self.quantized(self.q_dir), answers=False), bytes=dir_bytes(self.q_dir))
            self.keep("start", dict(start, **self.answers_of(self.quantized(self.q_dir))))
        start = self.cache["start"]
        full = self.cache.get("fp") or self.keep("fp", self.measure(self.fp))
        out.append(dict(full, method="16-bit model, no tuning", bytes=dir_bytes(self.fp_dir)))
        out.append(dict(start, method=f"int{a.bits} g{a.group_size} start (mlx_lm.convert), no tuning"))

        def lora16(lr):
            ad = self.mlx_lm_lora(self.fp_dir, lr)
            r = self.measure(self.with_adapter(self.fp_dir, ad), answers=False)
            return dict(r, adapter=str(ad), **json.loads((ad / "bench.json").read_text()))

        def lora4(lr):
            ad = self.mlx_lm_lora(self.q_dir, lr)
            r = self.measure(self.with_adapter(self.q_dir, ad), answers=False)
            return dict(r, adapter=str(ad), **json.loads((ad / "bench.json").read_text()))

        up = self.search("mlx-lm LoRA 16-bit", a.mlx_lm_lrs, lora16)
        up.update(self.cache.get("up answers") or self.keep("up answers", self.answers_of(self.with_adapter(self.fp_dir, Path(up["adapter"])))))
        out.append(dict(up, method="mlx-lm LoRA, 16-bit (upper bound, not 4-bit)"))
        l4 = self.search("mlx-lm LoRA 4-bit", a.mlx_lm_lrs, lora4)
        l4.update(self.cache.get("l4 answers") or self.keep("l4 answers", self.answers_of(self.with_adapter(self.q_dir, Path(l4["adapter"])))))
        out.append(dict(l4, method="mlx-lm LoRA on 4-bit, adapter unfused (not pure 4-bit)"))
        if "fused" not in self.cache:
            fused = self.fused(self.q_dir, Path(l4["adapter"]), "mlx-lm-fused-4bit")
            r = self.measure(self.quantized(fused), answers=False)
            self.keep("fused", dict(r, **self.answers_of(self.quantized(fused)), bytes=dir_bytes(fused), dir=str(fused)))
        out.append(dict(self.cache["fused"], method="mlx-lm LoRA on 4-bit + mlx_lm fuse (4-bit)",
                        learning_rate=l4["learning_rate"], seconds=l4["seconds"], reference=l4))
        if "fp fused rtn" not in self.cache:
            f16 = self.fused(self.fp_dir, Path(up["adapter"]), "mlx-lm-fused-16bit")
            q = self.rtn(f16, "mlx-lm-fused-16bit-rtn")
            r = self.measure(self.quantized(q), answers=False)
            self.keep("fp fused rtn", dict(r, **self.answers_of(self.quantized(q)), bytes=dir_bytes(q), dir=str(q)))
        out.append(dict(self.cache["fp fused rtn"], method="16-bit LoRA, fused, then round-to-nearest 4-bit",
                        learning_rate=up["learning_rate"], seconds=up["seconds"], reference=up))
        for method in a.methods:
            def ours(lr, method=method):
                target = self.work / f"mlxqat-{method}-{lr:g}"
                for p in (target, Path(str(target) + ".train")):
                    if p.exists():
                        shutil.rmtree(p)
                t = time.time()
                r = mlxqat.finetune(str(self.q_dir), a.data, str(target), method=method, learning_rate=lr,
                                    steps=a.steps, batch_size=a.batch_size, log_every=a.steps, val_batches=1,
                                    progress=False)
                seconds = time.time() - t
                m = self.measure(self.quantized(target), answers=False)
                return dict(m, dir=str(target), seconds=seconds, after_test=r["after"]["test"], bytes=dir_bytes(target))
            row = self.search(f"mlxqat {method}", getattr(a, f"{method}_lrs"), ours)
            row.update(self.cache.get(f"{method} answers") or self.keep(f"{method} answers", self.answers_of(self.quantized(Path(row["dir"])))))
            out.append(dict(row, method=f"mlxqat {method} (4-bit)", reference={"test": row["after_test"]}))
        for r in out:  # gain kept: of what the trained adapter / weights reached before saving
            ref = r.get("reference")
            if ref is not None:
                gain = start["test"] - ref["test"]
                r["gain_kept"] = (start["test"] - r["test"]) / gain if gain > 0 else None
            r["gain_vs_upper"] = (start["test"] - r["test"]) / (start["test"] - up["test"])
        return out


def table(result: dict) -> str:
    lines = [
        "# Fine-tuning a 4-bit model",
        "",
        f"Model: `{result['model']}` as int{result['bits']} g{result['group_size']} (`mlx_lm.convert -q` of its bfloat16 "
        f"copy). Data: `{result['data']}` ({result['examples']}). Every method: {result['steps']} steps of "
        f"{result['batch_size']} examples, the learning rate with the lowest validation loss among the listed "
        f"trials. Machine: {result['machine']}. Command: `{result['command']}`; {result['minutes']:.1f} min.",
        "",
        "| method | lr (trials: valid loss) | test loss | gain kept after save | gain / 16-bit LoRA's | exact | token F1 "
        "| general-text KL to fp | general ppl | MB | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        trials = ", ".join(f"{k}: {v:.3f}" for k, v in r.get("trials", {}).items())
        lr = f"{r['learning_rate']:g} ({trials})" if "learning_rate" in r else ""
        kept = f"{100 * r['gain_kept']:.1f}%" if r.get("gain_kept") is not None else ""
        lines.append(
            f"| {r['method']} | {lr} | {r['test']:.4f} | {kept} | {100 * r['gain_vs_upper']:.0f}% | "
            f"{100 * r.get('exact', float('nan')):.1f}% | {r.get('f1', float('nan')):.3f} | {r['general_kl']:.4f} | "
            f"{r['general_ppl']:.3f} | {r.get('bytes', 0) / 1e6:.1f} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="The full-precision model (directory, Hugging Face id or GGUF; default: the embedded one).")
    p.add_argument("--data", required=True, help="mlx-lm data directory: train, valid and test.jsonl.")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=16, help="mlx-lm LoRA's --num-layers.")
    p.add_argument("--mlx-lm-lrs", type=float, nargs="+", default=list(MLX_LM_LRS))
    p.add_argument("--methods", nargs="+", default=["lora", "scales", "full"])
    for method, lrs in MLXQAT_LRS.items():
        p.add_argument(f"--{method}-lrs", type=float, nargs="+", default=list(lrs),
                       help=f"Learning rates tried for mlxqat --method {method} (default: {' '.join(map(str, lrs))}).")
    p.add_argument("--general-windows", type=int, default=16)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--work", default=str(ROOT / "runs" / "finetune-bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune"))
    p.add_argument("--resume", action="store_true", help="Keep the finished runs of <out>.runs.json.")
    a = p.parse_args(argv)
    t0 = time.time()
    bench = Bench(a)
    rows = bench.rows()
    d = bench.data
    result = {"model": a.model, "data": a.data, "bits": a.bits, "group_size": a.group_size, "steps": a.steps,
              "batch_size": a.batch_size, "machine": f"{platform.system()} {platform.machine()}, {chip_name()}",
              "examples": f"{len(d.train)} / {len(d.valid)} / {len(d.test)} train / valid / test",
              "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "minutes": (time.time() - t0) / 60, "rows": rows}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
