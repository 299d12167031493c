"""The one QAT pipeline: recipe defaults by bit width, the best step kept, plain RTN as the baseline."""

import numpy as np
import pytest

import tiny
from mlxqat import recipes
from mlxqat.data import Document, pack, tokenize_documents
from mlxqat.evaluate import evaluate
from mlxqat.training.qat import prepare_qat, qat_args, quantize_qat


def _windows(tokenizer, seq_len=32):
    return pack(tokenize_documents([Document("c", tiny.CORPUS * 3)], tokenizer), seq_len)


@pytest.mark.parametrize("name,bits,learned,init", [
    ("int4", 4, True, "mse"), ("int3", 3, True, "mse"), ("int2", 2, True, "mse"),
    ("q4_0", 4, False, "minmax"), ("mobile", 2, False, "minmax"),
])
def test_recipes_carry_their_measured_qat_defaults(name, bits, learned, init):
    r = recipes.get(name)
    assert r.qat_defaults() == recipes.QAT_DEFAULTS[bits]
    q = r.for_qat()
    assert all(s.learn_scales == learned and s.scale_init == init for s in q.specs())
    plain = r.plain()
    assert all(not s.learn_scales and s.scale_init == "minmax" for s in plain.specs())
    assert [(s.bits, s.group_size, s.mode) for s in plain.specs()] == [(s.bits, s.group_size, s.mode) for s in r.specs()]


def test_for_qat_follows_the_mode_and_explicit_choices():
    r = recipes.get("int4")
    assert not r.for_qat("lora").default.learn_scales
    assert r.for_qat("scales").default.learn_scales
    assert r.for_qat(learn_scales=False).default.learn_scales is False
    assert r.for_qat(scale_init="minmax").default.scale_init == "minmax"
    with pytest.raises(ValueError, match="mode='affine'"):
        recipes.get("q4_0").for_qat(scale_init="mse")  # Q4_0's biases are tied to its scales


def test_qat_args_fill_only_what_was_not_given():
    a = qat_args("int2")
    assert (a.learning_rate, a.scale_learning_rate, a.warmup_steps) == (1e-4, 1e-5, 5)
    b = qat_args("int4", learning_rate=3e-4, warmup_steps=None)
    assert b.learning_rate == 3e-4 and b.scale_lr == pytest.approx(3e-5) and b.warmup_steps == 5
    c = qat_args("int4", learning_rate=3e-4, scale_learning_rate=1e-6)
    assert c.scale_lr == 1e-6


def test_quantize_qat_trains_the_recipe_and_keeps_the_best_step(tokenizer):
    windows = _windows(tokenizer)
    teacher, _ = tiny.make_model("llama", 0, scale=3.0)
    student, _ = tiny.make_model("llama", 0, scale=3.0)
    summary = quantize_qat(student, teacher, windows[:-8], "int3", select_windows=windows[-8:-4], steps=20,
                           batch_size=4, seq_len=32, log_every=5, learning_rate=1e-3, progress=False)
    assert summary["recipe"]["default"]["learn_scales"] is True
    assert [s for s, _ in summary["selection_kl"]] == [0, 5, 10, 15, 20]
    best_kl = min(kl for _, kl in summary["selection_kl"])
    assert summary["best_step"] == next(s for s, kl in summary["selection_kl"] if kl == best_kl)
    # the restored parameters are that step's: their KL on the selection windows is the best one
    assert evaluate(student, windows[-8:-4], teacher)["kl"] == pytest.approx(best_kl, rel=1e-5)


def test_a_diverging_run_returns_its_starting_point(tokenizer):
    windows = _windows(tokenizer)
    teacher, _ = tiny.make_model("llama", 0, scale=3.0)
    student, _ = tiny.make_model("llama", 0, scale=3.0)
    start, _ = tiny.make_model("llama", 0, scale=3.0)
    prepare_qat(start, windows[:-8], "int3", seq_len=32)  # the start quantize_qat makes: its PTQ start included
    select = windows[-8:-4]
    summary = quantize_qat(student, teacher, windows[:-8], "int3", select_windows=select, steps=6, batch_size=4,
                           seq_len=32, log_every=3, learning_rate=0.5, warmup_steps=0, progress=False)
    assert summary["best_step"] == 0 and summary["selection_kl"][-1][1] > summary["selection_kl"][0][1]
    assert evaluate(student, select, teacher)["kl"] == pytest.approx(evaluate(start, select, teacher)["kl"], rel=1e-6)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen3", True), ("gemma3_text", False), ("gemma3_text", True)])
def test_the_shared_student_is_the_teacher_on_the_same_arrays(arch, tied):
    """A tied Gemma 3 head (what every Gemma 3 checkpoint and GGUF has) drops its lm_head at load; the
    student must be built the same way, or it computes with a head that was never loaded."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxqat.training.qat import shared_student

    teacher, config = tiny.make_model(arch, 0, scale=3.0)
    if arch == "gemma3_text" and tied:  # as mlx-lm's loader leaves it for a checkpoint without lm_head.weight
        teacher.sanitize({k: v for k, v in tree_flatten(teacher.parameters()) if k != "lm_head.weight"})
    student = shared_student(teacher, config)
    pt, ps = dict(tree_flatten(teacher.parameters())), dict(tree_flatten(student.parameters()))
    assert pt.keys() == ps.keys() and all(ps[k] is pt[k] for k in pt)  # the very same arrays: no copy
    x = mx.array(np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 12)))
    assert mx.array_equal(student(x), teacher(x)).item()
