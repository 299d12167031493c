"""The memory model (mlxqat.training.memory): its estimate against MLX's measured peaks, the shapes it
reads without loading weights, and the job's early refusal of a run that does not fit."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

import mlxqat
from mlxqat.training import job, memory
from mlxqat.evaluate import EVAL_LOGIT_BYTES, eval_batch_size
from mlxqat.stdlib_data import embedded_model_path
from mlxqat.training.args import TrainingArgs

# shapes unlike the ones benchmarks/memory.py fits the factors on
SHAPE = dict(hidden_size=320, num_hidden_layers=3, intermediate_size=896, num_attention_heads=5, num_key_value_heads=1,
             vocab_size=5000, tie_word_embeddings=False)
CASES = {
    "defaults": ({}, dict(batch_size=2, seq_len=192)),
    "tied, float32 moments": (dict(tie_word_embeddings=True), dict(batch_size=4, seq_len=96,
                                                                    optimizer_state_dtype="float32")),
    "checkpointed": (dict(num_hidden_layers=5), dict(batch_size=4, seq_len=128, grad_checkpoint=True)),
    "top-k teacher": ({}, dict(batch_size=2, seq_len=128, teacher_top_k=32)),
    "wide vocabulary, whole-batch loss": (dict(vocab_size=20000), dict(batch_size=2, seq_len=96, loss_chunk=0)),
    "scales only": ({}, dict(batch_size=4, seq_len=128, trainable="scales")),
    "lora": (dict(hidden_size=384, num_attention_heads=6), dict(batch_size=2, seq_len=192, trainable="lora")),
}


def _build(config):
    def make():
        mx.random.seed(0)
        return llama.Model(llama.ModelArgs.from_dict(dict(model_type="llama", rms_norm_eps=1e-5, **config)))

    def build():
        teacher = make()
        mx.eval(teacher.parameters())
        return teacher, dict(model_type="llama", rms_norm_eps=1e-5, **config)

    return build


@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_is_within_15_percent_of_the_measured_peak(case):
    change, settings = CASES[case]
    config = {**SHAPE, **change}
    steps = 2
    windows = np.random.default_rng(0).integers(0, config["vocab_size"],
                                                (steps * settings["batch_size"], settings["seq_len"] + 1))
    measured = memory.measure_training(_build(config), windows.astype(np.int32), "int4", steps=steps, warmup_steps=0,
                                       log_every=steps, **settings)
    est = memory.training_estimate(memory.ModelShape.from_config(config), measured["args"])
    assert measured["checkpointed"] == est.phase.endswith("checkpointed")
    assert abs(est.total / measured["peak"] - 1) < 0.15, (case, est.parts, measured["peak"])


def test_shapes_are_read_from_config_or_gguf_metadata_without_the_weights(tmp_path):
    from mlxqat.export import main as export_main

    embedded = memory.read_shape(None)
    model, _, config = mlxqat.load(None, return_config=True)
    assert embedded == memory.ModelShape.from_config(config, name=embedded.name)
    assert embedded.params == sum(v.size for _, v in tree_flatten(model.parameters()))  # what bytes/param divides by
    # a GGUF file: the same shape from its metadata
    assert export_main([str(embedded_model_path()), "--format", "gguf", "--type", "f32",
                        "--out", str(tmp_path / "m.gguf")]) == 0
    # (its block weights are read as float32: 4 bytes each, where the embedded checkpoint stores them in 2)
    held = {v.dtype for k, v in tree_flatten(model.parameters()) if k.startswith("model.layers.") and v.ndim == 2}
    assert embedded.weight_bytes == (2 if held <= {mx.bfloat16, mx.float16} else 4)
    from_gguf = memory.read_shape(tmp_path / "m.gguf")
    assert from_gguf.weight_bytes == 4
    assert dataclasses.replace(from_gguf, name="") == dataclasses.replace(embedded, name="", weight_bytes=4)


def test_bad_configs_get_one_clear_line():
    with pytest.raises(ValueError, match="hidden_size"):
        memory.ModelShape.from_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="trainable='everything'"):
        memory.trainable_count(memory.ModelShape.from_config(SHAPE), "everything")
    with pytest.raises(ValueError, match="method='fast'"):
        memory.estimate(memory.ModelShape.from_config(SHAPE), method="fast")


def test_each_saving_lowers_the_estimate_and_fitting_settings_fit():
    shape = memory.ModelShape.from_config(json.loads((embedded_model_path() / "config.json").read_text()))
    args = TrainingArgs(batch_size=8, seq_len=256, grad_checkpoint=False)
    full = memory.estimate(shape, args)
    assert memory.estimate(shape, TrainingArgs(batch_size=8, seq_len=256, grad_checkpoint=True)).total < full.total
    assert memory.estimate(shape, TrainingArgs(batch_size=8, seq_len=256, grad_accum=4)).total < full.total
    assert memory.estimate(shape, TrainingArgs(batch_size=8, seq_len=256, teacher_top_k=64)).total < full.total
    assert memory.estimate(shape, args, method="blockwise").total < full.total
    limit = 0.7 * full.total
    fits = memory.fitting_settings(shape, args, limit)
    assert fits and all(e.total <= limit for _, e in fits)
    assert all(flag.startswith("--") for flags, _ in fits for flag in flags.split(" ") if flag.startswith("-"))
    assert memory.fitting_settings(shape, args, 1e3) == []  # 1 kB: nothing fits


def test_the_job_refuses_a_run_over_the_limit_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "q"
    assert job.main(["--out", str(out), "--memory-limit", "0.000001", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--memory-limit" in err[0] and "no setting fits" in err[0]
    assert "estimated peak memory" in captured.out
    assert not out.exists() and not (tmp_path / "q.train").exists()
    shape = memory.read_shape(None)
    need = memory.estimate(shape, job.qat_args(mlxqat.recipes.get("int4")), eval_seq_len=None).total
    with pytest.raises(memory.DoesNotFit, match="settings that fit: --grad-checkpoint"):
        job.run(out=str(out), memory_limit=0.8 * need / memory.GB, progress=False)
    assert not out.exists()


def test_evaluation_batches_hold_a_bounded_amount_of_logits():
    assert eval_batch_size(4096, 256) == 8
    assert eval_batch_size(262144, 256) == 1  # one window even when it alone is over the bound
    for vocab in (512, 49152, 151936, 262144):
        b = eval_batch_size(vocab, 512)
        assert b == 1 or 4 * vocab * 512 * b <= EVAL_LOGIT_BYTES
