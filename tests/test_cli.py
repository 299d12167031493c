"""The ``mlxqat`` dispatcher (:mod:`mlxqat.cli`): every command in process, and the package's functions kept."""

import json

import pytest

import mlxqat
import tiny
from mlxqat import cli
from mlxqat.storage.load import verify
from mlxqat.training.finetune import finetune
from mlxqat.training.loop import train


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A tiny full-precision llama directory and its int4 conversion (mlxqat.save)."""
    root = tmp_path_factory.mktemp("cli")
    model, config = tiny.make_model("llama", 0)
    config = dict(config, max_position_embeddings=64)
    fp = tiny.save_fp_model(model, config, tokenizer, root / "fp")
    mlxqat.prepare(model, mlxqat.recipes.get("int4", scale_dtype="float16"))
    mlxqat.convert(model)
    mlxqat.save(model, tokenizer, root / "q4", config=config)
    return {"fp": fp, "q4": root / "q4", "root": root}


def test_mlxqat_command_dispatches_to_each_module(models, capsys):
    assert cli.main([]) == 0 and "generate" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"mlxqat {mlxqat.__version__}\n"
    assert cli.main(["verify", str(models["q4"])]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(models["fp"]), "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "--max-tokens 0" in capsys.readouterr().err
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    for name in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0, name
        assert capsys.readouterr().out.startswith(f"usage: python -m mlxqat.{name}"), name
    assert cli.main(["train", "--bogus-flag"]) == 2


def test_running_every_command_keeps_mlxqat_train_and_verify_the_functions(models, capsys, tmp_path):
    """``mlxqat.train`` / ``.verify`` / ``.finetune`` are functions and ``python -m mlxqat.train`` / ... modules:
    running the commands must not put the modules in the functions' place."""
    fp, q4 = str(models["fp"]), str(models["q4"])
    text = tmp_path / "t.txt"
    text.write_text(tiny.CORPUS * 4)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(json.dumps({"prompt": "class Point:", "completion": " pass"}) + "\n")
    runs = [
        ["train", "--model", fp, "--data", str(text), "--out", str(tmp_path / "qat"), "--steps", "1",
         "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--select-windows", "0", "--no-progress"],
        ["finetune", "--model", q4, "--data", str(data), "--out", str(tmp_path / "tuned"), "--steps", "1",
         "--batch-size", "1", "--no-progress"],
        ["export", q4, "--format", "mlx", "--out", str(tmp_path / "mlx")],
        ["imatrix", "--model", fp, "--out", str(tmp_path / "imatrix.gguf"), "--windows", "1", "--seq-len", "16",
         "--no-progress"],
        ["verify", str(tmp_path / "qat")],
        ["generate", "--model", q4, "--prompt", "x", "--max-tokens", "2", "--quiet"],
        ["profile", "--model", q4, "--prompt-lengths", "4", "--gen-lengths", "2", "--repeats", "1",
         "--out", str(tmp_path / "profile"), "--no-progress"],
    ]
    assert [r[0] for r in runs] == list(cli.COMMANDS)
    for argv in runs:
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    capsys.readouterr()
    assert mlxqat.train is train and mlxqat.verify is verify and mlxqat.finetune is finetune
    assert mlxqat.verify(tmp_path / "qat")["files"]  # still callable as the function
