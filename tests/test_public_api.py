"""The public surface users rely on: every name of ``mlxqat``, every command, every flag.

The lists below were read off the package before it was laid out in packages (storage/, gguf/,
training/); a move that loses a name, a command or a flag fails here.
"""

import subprocess
import sys

import pytest

import mlxqat
from mlxqat import cli

PUBLIC_NAMES = ["__version__", "ActQuantizedLinear", "FakeQuantEmbedding", "FakeQuantLinear", "IntegrityError",
                "LayerSpec", "Recipe", "TrainingArgs", "calibrate", "convert", "dequantize", "finetune", "load", "prepare",
                "quant", "recipes", "save", "train", "use_kernel", "verify"]

FLAGS = {
    "train": "--batch-size --block-batch-size --block-learning-rate --block-scale-learning-rate --block-target "
             "--block-windows --ce-weight --checkpoint-every --data --eval-windows --grad-accum --grad-checkpoint "
             "--grad-clip --help --keep-checkpoints --learn-scales --learning-rate --log-every --lora-learning-rate "
             "--lora-rank --lora-scale --loss-chunk --memory-limit --method --min-lr-ratio --model "
             "--no-grad-checkpoint --no-learn-scales --no-progress --no-ptq-start --no-save-master --optimizer-state-dtype "
             "--out --ptq-start --quant-delay --recipe --resume --reverse-kl --scale-dtype --scale-init --scale-learning-rate "
             "--schedule --seed --select-windows --self-generate --seq-len --steps --steps-per-block "
             "--teacher-top-k --temperature --trainable --warmup-steps --weight-decay",
    "finetune": "--batch-size --checkpoint-every --data --grad-accum --grad-checkpoint --grad-clip --help "
                "--keep-checkpoints --learning-rate --log-every --lora-rank --lora-scale --mask-prompt --method "
                "--min-lr-ratio --model --no-grad-checkpoint --no-mask-prompt --no-progress --optimizer-state-dtype "
                "--out --recipe --resume --scale-learning-rate --schedule --seed --seq-len --steps --val-batches "
                "--warmup-steps --weight-decay",
    "export": "--dtype --exact --format --help --json --name --no-modelfile --out --type",
    "verify": "--help --write",
    "generate": "--chat --dtype --help --kernel --max-tokens --min-p --model --prompt --quantize --quiet --seed "
                "--system-prompt --temp --top-k --top-p",
    "profile": "--baseline --baseline-model --gen-lengths --help --kernels --model --no-progress --out "
               "--prompt-lengths --quick --recipe --repeats --seed",
}


def test_every_public_name_is_there():
    assert set(PUBLIC_NAMES) <= set(mlxqat.__all__)
    for name in PUBLIC_NAMES:
        assert getattr(mlxqat, name) is not None, name
    assert callable(mlxqat.train) and callable(mlxqat.verify) and callable(mlxqat.finetune)  # not the modules
    assert mlxqat.TrainingArgs().steps > 0


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_command_keeps_its_flags(command, capsys):
    assert command in cli.COMMANDS
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    missing = [f for f in FLAGS[command].split() if f not in text]
    assert not missing, f"{command} lost {missing}"


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_python_dash_m_works_both_ways(command):
    for argv in (["-m", "mlxqat", command, "--help"], ["-m", f"mlxqat.{command}", "--help"]):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        assert r.stdout.startswith(f"usage: python -m mlxqat.{command}"), (argv, r.stdout[:200])
