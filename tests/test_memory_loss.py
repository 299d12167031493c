"""Less memory per QAT step: the chunked loss, bfloat16 optimizer moments, automatic checkpointing,
the teacher freed while its top-k targets are cached."""

import gc
import json
import shutil
import weakref

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import gemma2, llama

import mlxqat
import tiny
from numerics import gradient_noise
from mlxqat import recipes
from mlxqat.head import split_head
from mlxqat.lora import QALoRALinear, apply_lora
from mlxqat.training.qat import release_teacher
from mlxqat.training.teacher import TeacherHidden, TeacherTargets
from mlxqat.training.optim import LowPrecisionAdamW, stochastic_round
from mlxqat.training.args import TrainingArgs
from mlxqat.training.losses import default_loss, distillation_loss
from mlxqat.training.loop import train, uses_grad_checkpoint


def _pair(arch="llama", **config):
    """A teacher and an int4-prepared student of the same tiny model."""
    if config:
        mod = {"llama": llama, "gemma2": gemma2}[arch]
        base = dict(tiny.CONFIGS["llama"], model_type=arch, head_dim=16, **config)
        models = []
        for _ in range(2):
            mx.random.seed(0)
            models.append(mod.Model(mod.ModelArgs.from_dict(base)))
        teacher, student = models
    else:
        teacher, _ = tiny.make_model(arch, 0, scale=3.0)
        student, _ = tiny.make_model(arch, 0, scale=3.0)
    mlxqat.prepare(student, recipes.get("int4").for_qat())
    teacher.freeze()
    return teacher, student


def _batch(vocab=tiny.VOCAB, b=2, t=16, seed=1):
    x = mx.random.randint(0, vocab, (b, t + 1), key=mx.random.key(seed))
    return x[:, :-1], x[:, 1:]


def _loss_and_grads(student, loss, inputs, targets, teacher_out):
    value, grads = nn.value_and_grad(student, loss)(student, inputs, targets, teacher_out)
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


def _plain(args):
    return lambda m, x, y, t: distillation_loss(m(x), t, y, args)


def _assert_same(student, args, inputs, targets, full, chunked, t_out, rel=1e-5):
    """The chunked loss ``chunked`` (teacher targets ``t_out``) has the plain loss's value and gradients
    (teacher targets ``full``) up to float32 summation order.

    Each gradient tensor may differ by ``rel`` of its own largest entry, plus what summation order can
    move it by: :func:`numerics.gradient_noise` measures how far one float32 ulp of noise on each logit's
    cotangent moves it (a tensor that is a small difference of large terms moves by the terms' size),
    and the two losses group the sums over the ``inputs.size`` tokens differently, each partial sum
    rounded to within an ulp of itself and at most ``inputs.size`` terms large.
    """
    la, ga = _loss_and_grads(student, _plain(args), inputs, targets, full)
    lb, gb = _loss_and_grads(student, chunked, inputs, targets, t_out)
    assert lb == pytest.approx(la, rel=rel)
    assert set(ga) == set(gb)
    noise = gradient_noise(student, _plain(args), inputs, targets, full, ga)
    for k in ga:
        diff = float(mx.max(mx.abs(ga[k] - gb[k])).item())
        bound = rel * float(mx.max(mx.abs(ga[k])).item()) + inputs.size * noise[k]
        assert diff <= bound, (k, diff, bound)


SETTINGS = [dict(), dict(ce_weight=0.5, temperature=2.0), dict(reverse_kl=0.3)]
# reverse KL needs the full teacher (TrainingArgs refuses it with teacher_top_k)
CASES = [(kind, i) for kind in ("logits", "top_k", "hidden") for i, kw in enumerate(SETTINGS)
         if not (kind == "top_k" and "reverse_kl" in kw)]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])  # lm_head; lm_head + scaled embedding; tied
@pytest.mark.parametrize("teacher_kind,settings", CASES)
def test_chunked_loss_has_the_plain_loss_and_gradients(arch, teacher_kind, settings):
    kw = SETTINGS[settings]
    teacher, student = _pair(arch)
    inputs, targets = _batch()
    args = TrainingArgs(loss_chunk=5, **kw)  # 32 tokens: six chunks of 5 and one of 2
    full = teacher(inputs)
    if teacher_kind == "top_k":
        full = t_out = TeacherTargets(teacher, 20, chunk=7)("k", inputs)
    elif teacher_kind == "hidden":
        t_out = TeacherTargets(teacher, 0, hidden=True)("k", inputs)
        assert isinstance(t_out, TeacherHidden)
    else:
        t_out = full
    chunked = default_loss(args, student)
    assert chunked.split is not None
    _assert_same(student, args, inputs, targets, full, chunked, t_out)


def test_a_head_of_another_kind_is_called_as_itself_chunk_by_chunk():
    teacher, student = _pair("llama")
    apply_lora(student, rank=4)  # the head is a QALoRALinear: its adapters are what trains
    split = split_head(student)
    assert isinstance(split.layer, QALoRALinear) and not split.matmul
    student.update(tree_map(lambda p: p + 0.01, student.trainable_parameters()))  # lora_b away from 0
    inputs, targets = _batch()
    args = TrainingArgs(loss_chunk=5, ce_weight=0.3)
    t_out = TeacherTargets(teacher, 0, hidden=True)("k", inputs)
    _assert_same(student, args, inputs, targets, teacher(inputs), default_loss(args, student), t_out)


def test_a_final_softcap_is_part_of_the_head_and_an_unknown_final_step_falls_back_to_the_plain_loss():
    teacher, student = _pair("gemma2", final_logit_softcapping=2.0, query_pre_attn_scalar=16)
    split = split_head(student)
    assert split is not None and split.softcap == 2.0 and split.tied
    inputs, targets = _batch()
    args = TrainingArgs(loss_chunk=6)
    _assert_same(student, args, inputs, targets, teacher(inputs), default_loss(args, student), teacher(inputs))

    class Scaled(llama.Model):  # logits scaled after the head: not a split this module knows
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return super().__call__(inputs, cache, input_embeddings) * 0.5

    mx.random.seed(0)
    odd = Scaled(llama.ModelArgs.from_dict(tiny.CONFIGS["llama"]))
    mlxqat.prepare(odd, "int4")
    assert split_head(odd) is None
    loss = default_loss(args, odd)
    assert loss.split is None
    t = teacher(inputs)
    assert _loss_and_grads(odd, loss, inputs, targets, t)[0] == _loss_and_grads(odd, _plain(args), inputs, targets, t)[0]
    assert TeacherTargets(odd, 0, hidden=True).hidden is False  # its teacher targets stay logits


def test_top_k_targets_found_by_chunks_are_the_whole_logits_top_k():
    teacher, _ = _pair("qwen3")
    inputs, _ = _batch()
    whole = TeacherTargets(teacher, 16, chunk=0)("k", inputs)
    chunked = TeacherTargets(teacher, 16, chunk=3)("k", inputs)
    assert chunked[0].shape == (2, 16, 16) and chunked[1].dtype == mx.int32
    for (v1, i1), (v2, i2) in [(whole, chunked)]:
        order1, order2 = mx.argsort(i1, axis=-1), mx.argsort(i2, axis=-1)
        assert mx.array_equal(mx.take_along_axis(i1, order1, -1), mx.take_along_axis(i2, order2, -1))
        np.testing.assert_allclose(mx.take_along_axis(v1, order1, -1), mx.take_along_axis(v2, order2, -1), rtol=1e-5)


def _peak(fn) -> int:
    mx.eval(fn())  # warm: one-time allocations out of the way
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory()


def test_the_chunked_loss_peaks_far_below_the_plain_loss_on_a_large_vocabulary():
    vocab = 32768
    teacher, student = _pair("llama", vocab_size=vocab, tie_word_embeddings=True)
    inputs, targets = _batch(vocab, b=2, t=256)  # logits: 2 x 256 x 32768 float32 = 64 MiB a copy
    args = TrainingArgs(loss_chunk=16)
    teacher_targets = TeacherTargets(teacher, 0, hidden=True)

    def step(loss):
        return nn.value_and_grad(student, loss)(student, inputs, targets, teacher_targets("k", inputs))

    plain = _peak(lambda: step(_plain(args)))
    chunked = _peak(lambda: step(default_loss(args, student)))
    weights = sum(v.nbytes for _, v in tree_flatten(student.parameters()) + tree_flatten(teacher.parameters()))
    assert chunked < 0.4 * plain, (chunked, plain, weights)


def test_stochastic_rounding_to_bfloat16_is_unbiased_and_lands_on_a_neighbour():
    x = mx.full((20000,), 1.0 + 2.0**-10, mx.float32)  # 1/8 of the way from 1.0 to the next bfloat16
    r = stochastic_round(x, mx.bfloat16, mx.random.key(0)).astype(mx.float32)
    assert set(np.unique(np.array(r)).tolist()) == {1.0, 1.0 + 2.0**-7}
    assert float(mx.mean(r).item()) == pytest.approx(1.0 + 2.0**-10, abs=2e-5)
    # round to nearest would keep every one of these at 1.0: the mean would not move
    assert float(mx.mean(x.astype(mx.bfloat16).astype(mx.float32)).item()) == 1.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_low_precision_adamw_is_adamw_with_rounded_moments(weight_decay):
    shapes = [(300, 40), (40,)]
    params = {f"p{i}": mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate(shapes)}
    grads = [{k: mx.random.normal(v.shape, key=mx.random.key(100 + 10 * t + i)) * (1 + t)
              for i, (k, v) in enumerate(params.items())} for t in range(20)]

    def run(opt):
        p = dict(params)
        for g in grads:
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
        return p

    kw = dict(learning_rate=1e-2, weight_decay=weight_decay)
    ref = run(optim.AdamW(**kw))
    same = run(LowPrecisionAdamW(**kw, state_dtype=mx.float32))
    assert all(mx.array_equal(ref[k], same[k]) for k in ref)  # the float32 form is AdamW exactly
    low = run(LowPrecisionAdamW(**kw, state_dtype=mx.bfloat16))
    for k in ref:
        moved = float(mx.max(mx.abs(ref[k] - params[k])).item())
        assert 0 < float(mx.max(mx.abs(low[k] - ref[k])).item()) <= 0.02 * moved, k


def _run(out, steps, resume=False, **kw):
    teacher, student = _pair("llama")
    windows = np.random.default_rng(0).integers(0, tiny.VOCAB, size=(24, 17)).astype(np.int32)
    args = TrainingArgs(steps=steps, batch_size=4, seq_len=16, learning_rate=1e-3, warmup_steps=0,
                        checkpoint_every=2, **kw)
    summary = train(student, teacher, windows, None, args, out_dir=out, resume=resume, progress=False)
    return summary, dict(tree_flatten(student.trainable_parameters()))


def test_bfloat16_moments_are_the_default_are_saved_as_such_and_resume_exactly(tmp_path):
    ref, _ = _run(tmp_path / "f32", 6, optimizer_state_dtype="float32")
    low, low_params = _run(tmp_path / "bf16", 6)  # the default
    saved = mx.load(str(tmp_path / "bf16" / "checkpoints" / "step_0000004" / "optimizer.safetensors"))
    moments = [v for k, v in saved.items() if k.endswith((".m", ".v"))]
    assert moments and all(v.dtype == mx.bfloat16 for v in moments)
    assert low["losses"][0] == ref["losses"][0] and low["losses"][1:] != ref["losses"][1:]

    # as if the run had stopped after its checkpoint at step 2
    shutil.copytree(tmp_path / "bf16", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000004")
    (tmp_path / "resumed" / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_0000002",
                                                                                  "step": 2}))
    resumed, resumed_params = _run(tmp_path / "resumed", 6, resume=True, optimizer_state_dtype="bfloat16")
    assert resumed["resumed_from"] == 2
    np.testing.assert_allclose(resumed["losses"], low["losses"][2:], rtol=0, atol=1e-6)
    assert max(float(mx.max(mx.abs(low_params[k] - resumed_params[k])).item()) for k in low_params) <= 1e-6
    # a float32 checkpoint continues with bfloat16 moments (and back)
    assert _run(tmp_path / "f32", 8, resume=True)[0]["resumed_from"] == 4
    assert _run(tmp_path / "f32", 10, resume=True, optimizer_state_dtype="float32")[0]["resumed_from"] == 6


def test_gradient_checkpointing_turns_itself_on_when_activations_would_be_large():
    model, _ = tiny.make_model("llama")  # 2 blocks of 64 hidden units
    auto = TrainingArgs(batch_size=8, seq_len=256)
    assert auto.grad_checkpoint is None
    assert not uses_grad_checkpoint(model, auto)  # 2 x 2048 tokens x 64 x 16 floats: 8 MB
    long = TrainingArgs(batch_size=8, seq_len=32768)  # 1 GB
    assert uses_grad_checkpoint(model, long)
    assert not uses_grad_checkpoint(model, TrainingArgs(batch_size=8, seq_len=32768, grad_accum=4))  # 256 MB
    assert uses_grad_checkpoint(model, TrainingArgs(grad_checkpoint=True))
    assert not uses_grad_checkpoint(model, TrainingArgs(batch_size=8, seq_len=32768, grad_checkpoint=False))
    assert not uses_grad_checkpoint(nn.Sequential(nn.Linear(4, 4)), long)  # not an mlx-lm model: off
    with pytest.raises(ValueError, match=r"grad_checkpoint='auto' must be True or False \(or None: automatic\)"):
        TrainingArgs(grad_checkpoint="auto")


def test_release_teacher_caches_every_step_frees_the_body_and_trains_the_same(tmp_path):
    windows = np.random.default_rng(0).integers(0, tiny.VOCAB, size=(24, 17)).astype(np.int32)
    keep = windows[:3]
    args = TrainingArgs(steps=4, batch_size=4, grad_accum=2, seq_len=16, teacher_top_k=32, learning_rate=1e-3,
                        warmup_steps=0, log_every=1)
    teacher, student = _pair("qwen3")  # tied: the kept head is the input embedding
    ref = train(student, teacher, windows, None, args, out_dir=tmp_path / "live", progress=False)["losses"]

    teacher, student = _pair("qwen3")
    logits = teacher(mx.array(keep[:, :-1]))
    body = weakref.ref(teacher.model)
    teacher = release_teacher(teacher, windows, keep, args, tmp_path / "released", progress=False)
    gc.collect()
    assert body() is None  # nothing but the head and the kept hidden states is left
    assert len(list((tmp_path / "released" / "teacher_cache").glob("*.safetensors"))) == 4 * 2  # steps x micro-batches
    np.testing.assert_allclose(teacher(mx.array(keep[:, :-1])), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keeps the hidden states of given windows only"):
        teacher(mx.array(windows[5:6, :-1]))
    got = train(student, teacher, windows, None, args, out_dir=tmp_path / "released", progress=False)["losses"]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="release_teacher needs cached targets: set teacher_top_k"):
        release_teacher(teacher, windows, keep, TrainingArgs(), tmp_path / "x")
