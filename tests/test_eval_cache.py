"""quantized_once: a fake-quant model evaluated with its weights quantized once computes the same bits.

Every metric (ppl, nll, KL, top-1) and every logit must be exactly equal (atol=0) to the ordinary
forward, which re-quantizes each weight in every pass; the context must leave the module as it was.
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxqat
import tiny
from mlxqat import layers as L
from mlxqat import evaluate as evaluate_mod
from mlxqat.convert import calibrate, prepare_quantized, quantize_rtn
from mlxqat.evaluate import completion_loss, evaluate, mean_kl
from mlxqat.recipes import LayerSpec, Recipe
from mlxqat.stdlib_data import embedded_model_path
from mlxqat.storage.load import load
from mlxqat.training.args import TrainingArgs
from mlxqat.training.optim import set_trainable


def _windows(vocab, n=6, seq_len=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, seq_len + 1)).astype(np.int32)


def _fq_layers(model):
    return [m for _, m in model.named_modules() if L.is_fake_quant(m)]


def _perturb_scales(model):
    """Move learned scales and biases off their initial values, as training would."""
    for m in _fq_layers(model):
        if m.spec.learn_scales and "scales" in m:
            m.scales = m.scales * 1.07
            if "biases" in m:
                m.biases = m.biases + 0.003


def _int4_learned(model, windows):
    mlxqat.prepare(model, mlxqat.recipes.get("int4", learn_scales=True))
    _perturb_scales(model)


def _frozen(release):
    def setup(model, windows):
        mlxqat.prepare(model, Recipe("frozen", LayerSpec(4, 64, learn_scales=True), overrides=(
            ("*mlp.down_proj", LayerSpec(4, 32, "symmetric", learn_scales=True)),)))
        for m in _fq_layers(model):
            L.freeze_codes(m, release=release)  # scales-only training: codes fixed (the float weight released)
        _perturb_scales(model)
    return setup


def _static_activations(model, windows):
    mlxqat.prepare(model, Recipe("acts", LayerSpec(4, 64), overrides=(
        ("*.v_proj", LayerSpec(4, 64, act_bits=8)), ("*mlp.gate_proj", LayerSpec(3, -1, act_bits=8)))))
    calibrate(model, [mx.array(windows[:4, :-1])])


def _quant_delay(model, windows):
    """Some layers with fake quantization off (a quant delay), the rest on."""
    mlxqat.prepare(model, "int4")
    for i, m in enumerate(_fq_layers(model)):
        m.fake_quant_enabled = i % 2 == 0


def _held_bf16(model, windows):
    """Block-wise QAT's held weights: a float32 model with some weights kept in bfloat16."""
    mlxqat.prepare(model, mlxqat.recipes.get("int4", learn_scales=True))
    for i, m in enumerate(_fq_layers(model)):
        if i % 3 == 0 and isinstance(m, L.FakeQuantLinear):
            m.weight = m.weight.astype(mx.bfloat16)


def _from_quantized(model, windows):
    """A quantized model's own codes and float16 scales (mlxqat.finetune's starting point)."""
    quantize_rtn(model, "int4")  # float16 scales: every forward rounds the trained ones to them
    prepare_quantized(model, keep_codes=True, learn_scales=True)
    _perturb_scales(model)


def _from_quantized_float(model, windows):
    """A quantized model's layers with float master weights that re-quantize to its codes (full QAT of it)."""
    quantize_rtn(model, "int4")
    prepare_quantized(model, keep_codes=False, learn_scales=True)
    _perturb_scales(model)


def _plain(name):
    def setup(model, windows):
        mlxqat.prepare(model, name)
    return setup


SETUPS = {
    "int4": _plain("int4"),
    "int4-learned": _int4_learned,
    "q4_0": _plain("q4_0"),
    "int2": _plain("int2"),
    "mobile": lambda m, w: (mlxqat.prepare(m, "mobile"), calibrate(m, [mx.array(w[:4, :-1])])),
    "static-activations": _static_activations,
    "frozen-codes": _frozen(release=True),
    "frozen-codes-weight-kept": _frozen(release=False),
    "quant-delay": _quant_delay,
    "held-bf16": _held_bf16,
    "from-quantized": _from_quantized,
    "from-quantized-float": _from_quantized_float,
}


def _student(arch, setup, windows):
    model, _ = tiny.make_model(arch, seed=3, scale=2.0)
    SETUPS[setup](model, windows)
    mx.eval(model.parameters())
    return model


def _assert_same_eval(model, windows, teacher):
    plain = evaluate(model, windows, teacher, batch_size=2, quantize_once=False)
    once = evaluate(model, windows, teacher, batch_size=2)
    assert once == plain  # ppl, nll, kl, top1, tokens: exactly
    x = mx.array(windows[:, :-1])
    want = model(x)
    mx.eval(want)
    with L.quantized_once(model):
        first = model(x)  # the weights computed on entry
        mx.eval(first)
        again = model(x)  # and again
        mx.eval(again)
    for got in (first, again):
        assert got.dtype == want.dtype
        assert np.array_equal(np.array(got), np.array(want))
    assert np.array_equal(np.array(model(x)), np.array(want))  # and afterwards


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_quantized_once_is_bit_identical(arch, setup):
    windows = _windows(tiny.VOCAB)
    teacher, _ = tiny.make_model(arch, seed=3, scale=2.0)
    model = _student(arch, setup, windows)
    assert _fq_layers(model)
    _assert_same_eval(model, windows, teacher)


@pytest.fixture(scope="module")
def embedded():
    teacher, _ = load(embedded_model_path(), full_precision=True)
    teacher.set_dtype(mx.float32)
    return teacher


@pytest.mark.parametrize("setup", ["int4", "int4-learned", "q4_0", "int2", "static-activations",
                                   "frozen-codes-weight-kept", "quant-delay"])
def test_quantized_once_is_bit_identical_on_the_embedded_model(embedded, setup):
    windows = _windows(embedded.args.vocab_size, n=4, seq_len=64, seed=1)
    model, _ = load(embedded_model_path(), full_precision=True)
    model.set_dtype(mx.float32)
    SETUPS[setup](model, windows)
    mx.eval(model.parameters())
    _assert_same_eval(model, windows, embedded)


def test_mean_kl_and_completion_loss_are_unchanged(monkeypatch):
    windows = _windows(tiny.VOCAB, seed=2)
    teacher, _ = tiny.make_model("qwen3", seed=3, scale=2.0)
    model = _student("qwen3", "int4-learned", windows)
    inputs = [mx.array(windows[i : i + 2, :-1]) for i in range(0, len(windows), 2)]
    masked = np.stack([windows, np.ones_like(windows)], axis=1)
    masked[:, 1, :5] = 0
    masked[1, 1, 12:] = 0
    once = mean_kl(teacher, model, inputs), completion_loss(model, masked, batch_size=2)
    with L.quantized_once(model):  # nested: the outer context's weights
        nested = mean_kl(teacher, model, inputs), completion_loss(model, masked, batch_size=2)
    monkeypatch.setattr(evaluate_mod, "quantized_once", contextlib.nullcontext)
    plain = mean_kl(teacher, model, inputs), completion_loss(model, masked, batch_size=2)
    assert once == plain == nested
    assert plain[0] > 0


def _snapshot(model):
    return {k: v for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("setup", ["int4", "int4-learned", "frozen-codes-weight-kept"])
def test_the_context_leaves_the_module_as_it_was(setup, tmp_path):
    windows = _windows(tiny.VOCAB, seed=4)
    model = _student("qwen3", setup, windows)
    model.train()
    before, trainable = _snapshot(model), dict(tree_flatten(model.trainable_parameters()))
    x = mx.array(windows[:2, :-1])
    with L.quantized_once(model):
        mx.eval(model(x))
        inside = _snapshot(model)
        model.save_weights(str(tmp_path / "inside.safetensors"))
        assert all(m._quantized_once is not None for m in _fq_layers(model))
    assert inside.keys() == before.keys() and all(inside[k] is before[k] for k in before)
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert dict(tree_flatten(model.trainable_parameters())).keys() == trainable.keys()
    assert set(mx.load(str(tmp_path / "inside.safetensors"))) == set(before)
    for m in _fq_layers(model):
        assert m._quantized_once is None and "_quantized_once" not in vars(m) and "_quantized_once" not in m

    # an exception inside restores it too
    with pytest.raises(RuntimeError):
        with L.quantized_once(model):
            mx.eval(model(x))
            raise RuntimeError("boom")
    assert all(m._quantized_once is None for m in _fq_layers(model))


def _loss(model, x, y):
    return nn.losses.cross_entropy(model(x), y).mean()


@pytest.mark.parametrize("setup", ["int4", "int4-learned", "frozen-codes"])
def test_gradients_and_training_after_and_inside_are_unaffected(setup):
    windows = _windows(tiny.VOCAB, seed=5)
    x, y = mx.array(windows[:, :-1]), mx.array(windows[:, 1:])
    twin = _student("qwen3", setup, windows)  # never enters the context
    model = _student("qwen3", setup, windows)
    for m in (twin, model):
        set_trainable(m, TrainingArgs(trainable="scales" if setup == "frozen-codes" else "all"))
    vg = nn.value_and_grad(model, _loss)
    vg_twin = nn.value_and_grad(twin, _loss)
    with L.quantized_once(model):
        mx.eval(model(x))
        l_in, g_in = vg(model, x, y)  # a gradient transform inside: its inputs are new arrays, computed afresh
    l_twin, g_twin = vg_twin(twin, x, y)
    l_out, g_out = vg(model, x, y)
    assert l_in.item() == l_twin.item() == l_out.item()
    flat_twin = dict(tree_flatten(g_twin))
    for g in (g_in, g_out):
        flat = dict(tree_flatten(g))
        assert flat.keys() == flat_twin.keys()
        assert all(np.array_equal(np.array(flat[k]), np.array(flat_twin[k])) for k in flat)
    # a few optimizer steps after the context: the same trajectory as the twin's
    for m, f in ((model, vg), (twin, vg_twin)):
        opt = optim.AdamW(1e-3)
        for _ in range(3):
            _, g = f(m, x, y)
            opt.update(m, g)
            mx.eval(m.parameters(), opt.state)
    a, b = _snapshot(model), _snapshot(twin)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert np.array_equal(np.array(model(x)), np.array(twin(x)))


def test_an_update_inside_the_context_is_seen():
    """Replaced weights (an optimizer step, model.update) compute afresh: nothing stale is kept."""
    windows = _windows(tiny.VOCAB, seed=6)
    x = mx.array(windows[:2, :-1])
    model = _student("llama", "int4-learned", windows)
    with L.quantized_once(model):
        mx.eval(model(x))
        for m in _fq_layers(model):
            m.weight = m.weight * 1.5
            m.scales = m.scales * 1.5
        got = model(x)
        mx.eval(got)
        L.set_fake_quant(model, False)
        off = model(x)
        mx.eval(off)
    assert np.array_equal(np.array(off), np.array(model(x)))
    L.set_fake_quant(model, True)
    assert np.array_equal(np.array(got), np.array(model(x)))


def test_nested_contexts_keep_the_outer_cache():
    model = _student("llama", "int4", _windows(tiny.VOCAB))
    with L.quantized_once(model):
        with L.quantized_once(model):
            pass
        assert all(m._quantized_once is not None for m in _fq_layers(model))
    assert all(m._quantized_once is None for m in _fq_layers(model))


def test_a_model_without_fake_quant_layers_or_a_plain_callable_is_left_alone():
    model, _ = tiny.make_model("llama")
    with L.quantized_once(model) as m:
        assert m is model
    with L.quantized_once(len) as f:
        assert f is len


@pytest.mark.parametrize("setup", ["int4", "int4-learned", "held-bf16", "quant-delay", "from-quantized-float",
                                   "frozen-codes-weight-kept"])
def test_inside_the_context_no_weight_is_quantized_again(setup, monkeypatch):
    windows = _windows(tiny.VOCAB, seed=7)
    model = _student("qwen3", setup, windows)  # tied: the embedding is also the output head
    x = mx.array(windows[:2, :-1])
    calls = []
    dequantized = L._dequantized
    def counted(layer, w):  # a layer with fake quantization off computes with its weight as it is
        calls.extend([layer] if layer.fake_quant_enabled else [])
        return dequantized(layer, w)

    monkeypatch.setattr(L, "_dequantized", counted)
    with L.quantized_once(model):
        entry = len(calls)
        mx.eval(model(x), model(x))
        assert len(calls) == entry  # every forward used the weights computed on entry
    kept = [m for m in _fq_layers(model) if m.fake_quant_enabled and not L.weight_released(m)]
    assert entry == len(kept)
    mx.eval(model(x))
    assert len(calls) > entry  # outside, every forward quantizes again


def test_layers_with_released_weights_dequantize_their_codes_as_outside():
    """Frozen codes (scales-only training): no float copy of weights the model holds as packed codes."""
    windows = _windows(tiny.VOCAB, seed=11)
    model = _student("llama", "frozen-codes", windows)
    with L.quantized_once(model):
        assert all(m._quantized_once == {} for m in _fq_layers(model))
        assert all(L._kept(m, False) is None for m in _fq_layers(model))


def test_a_model_measured_against_itself_runs_once_and_gives_the_same_numbers():
    windows = _windows(tiny.VOCAB, seed=8)
    model, _ = tiny.make_model("llama", seed=3, scale=2.0)
    twin, _ = tiny.make_model("llama", seed=3, scale=2.0)  # the same weights, another object
    calls = []
    original = type(model).__call__
    counted = type("Counted", (type(model),), {"__call__": lambda self, x: calls.append(1) or original(self, x)})
    model.__class__ = counted
    got = evaluate(model, windows, model, batch_size=2)
    assert len(calls) == 3  # one forward per batch, not two
    assert got == evaluate(twin, windows, twin, batch_size=2) == evaluate(twin, windows, model, batch_size=2)
    assert got["kl"] == 0.0 and got["top1"] == 1.0


@pytest.mark.parametrize("setup", ["int4-learned", "q4_0"])
def test_best_step_keeps_the_teachers_logits_and_the_same_numbers(setup):
    from mlxqat.training.qat import BestStep
    from mlxqat.training.teacher import CachedTeacher

    windows = _windows(tiny.VOCAB, n=10, seed=9)  # two batches of evaluate, one of them short
    teacher, _ = tiny.make_model("gemma3_text", seed=3, scale=2.0)
    model = _student("gemma3_text", setup, windows)
    selector = BestStep(model, windows, teacher)
    assert isinstance(selector.teacher, CachedTeacher)
    calls = selector.teacher.calls
    assert calls >= 1
    for m in _fq_layers(model):  # as a training step would
        m.weight = m.weight * 1.01
    selector({"step": 1})
    assert selector.teacher.calls == calls  # the kept logits: no teacher pass
    live = evaluate(model, windows, teacher, quantize_once=False)["kl"]
    assert selector.history[1] == (1, live)
    assert selector.history[0][1] != live  # the check measured the changed model


def test_best_step_runs_the_teacher_live_when_its_logits_would_not_fit(monkeypatch):
    from mlxqat.training import qat

    windows = _windows(tiny.VOCAB, n=4, seed=10)
    teacher, _ = tiny.make_model("llama", seed=3, scale=2.0)
    model = _student("llama", "int4", windows)
    monkeypatch.setattr(qat, "EVAL_LOGIT_BYTES", 4 * 24 * tiny.VOCAB * 4 - 1)
    selector = qat.BestStep(model, windows, teacher)
    assert selector.teacher is teacher
    assert selector.history[0][1] == evaluate(model, windows, teacher, quantize_once=False)["kl"]
