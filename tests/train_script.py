"""Subprocess driver for the resume and distributed tests: a tiny deterministic QAT run.

    python train_script.py OUT_DIR STEPS [--resume] [--sleep S] [--global-batch B] [--grad-accum A]

Writes OUT_DIR/result_<rank>.json with the per-step losses and a checksum of
the trained parameters, and OUT_DIR/params_<rank>.safetensors.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlxqat  # noqa: E402
import tiny  # noqa: E402
from mlxqat.training.args import TrainingArgs
from mlxqat.training.loop import train  # noqa: E402


def windows(n, seq_len, seed=0):
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(n, seq_len + 1)).astype(np.int32)


def main():
    out = Path(sys.argv[1])
    steps = int(sys.argv[2])
    resume = "--resume" in sys.argv
    sleep = float(sys.argv[sys.argv.index("--sleep") + 1]) if "--sleep" in sys.argv else 0.0
    batch = int(sys.argv[sys.argv.index("--global-batch") + 1]) if "--global-batch" in sys.argv else 4
    accum = int(sys.argv[sys.argv.index("--grad-accum") + 1]) if "--grad-accum" in sys.argv else 1
    teacher, _ = tiny.make_model("llama", 0)
    student, _ = tiny.make_model("llama", 0)
    mlxqat.prepare(student, "int2")
    # float32 moments: data-parallel runs are compared with one process, equal up to float rounding,
    # which stochastic rounding to bfloat16 would turn into moments one bfloat16 step apart
    args = TrainingArgs(steps=steps, batch_size=batch, seq_len=16, learning_rate=1e-3, warmup_steps=2,
                        checkpoint_every=3, log_every=1, seed=7, optimizer_state_dtype="float32",
                        grad_accum=accum)
    cb = (lambda rec: time.sleep(sleep)) if sleep else None
    summary = train(student, teacher, windows(40, 16), None, args, out_dir=out, resume=resume,
                    callback=cb, progress=False)
    rank = mx.distributed.init().rank()
    params = dict(tree_flatten(student.trainable_parameters()))
    mx.save_safetensors(str(out / f"params_{rank}.safetensors"), params)
    with open(out / f"result_{rank}.json", "w") as f:
        json.dump({"losses": summary["losses"], "resumed_from": summary["resumed_from"]}, f)


if __name__ == "__main__":
    main()
