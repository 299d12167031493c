"""mlxqat.evaluate owns every KL: per token (full and top-k), the mean over batches, and its probe inputs."""

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxqat import evaluate as ev
from mlxqat import export, mixed
from mlxqat.training.args import TrainingArgs
from mlxqat.training.losses import distillation_loss
from mlxqat.recipes import LayerSpec
from mlxqat.training.teacher import top_k_logits


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(seed, shape=(2, 5, 40), scale=3.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_divergence_matches_its_definition(temperature):
    t, s = _logits(0), _logits(1)
    lp = _np_log_softmax(np.array(t, dtype=np.float64) / temperature)
    lq = _np_log_softmax(np.array(s, dtype=np.float64) / temperature)
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    got = ev.kl_divergence(t, s, temperature)
    assert got.shape == (2, 5)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-6)
    assert float(mx.max(mx.abs(ev.kl_divergence(t, t, temperature)))) < 1e-6


def test_top_k_kl_with_the_whole_vocabulary_is_the_full_kl():
    t, s = _logits(2), _logits(3)
    vals, ids = top_k_logits(t, t.shape[-1])
    np.testing.assert_allclose(np.array(ev.top_k_kl_divergence(vals, ids, s, 2.0)),
                               np.array(ev.kl_divergence(t, s, 2.0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 8])
def test_top_k_kl_renormalises_the_teacher_over_its_top_k(k):
    t, s = _logits(4), _logits(5)
    vals, ids = top_k_logits(t, k)
    lp = _np_log_softmax(np.array(vals, dtype=np.float64))  # teacher renormalised over its k tokens
    lq = np.take_along_axis(_np_log_softmax(np.array(s, dtype=np.float64)), np.array(ids), -1)
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(np.array(ev.top_k_kl_divergence(vals, ids, s)), want, rtol=1e-4, atol=1e-6)


def test_the_distillation_loss_is_built_on_these_kls():
    t, s, y = _logits(6), _logits(7), mx.zeros((2, 5), dtype=mx.int32)
    for T in (1.0, 2.0):
        args = TrainingArgs(temperature=T)
        full = distillation_loss(s, t, y, args)
        assert full.item() == (T * T * mx.mean(ev.kl_divergence(t, s, T))).item()
        top = distillation_loss(s, top_k_logits(t, 8), y, args)
        assert top.item() == (T * T * mx.mean(ev.top_k_kl_divergence(*top_k_logits(t, 8), s, T))).item()


@pytest.fixture(scope="module")
def models():
    a, _ = tiny.make_model("llama", seed=0)
    b, _ = tiny.make_model("llama", seed=0, scale=1.05)
    return a, b


def test_mean_kl_is_the_token_mean(models):
    a, b = models
    inputs = ev.kl_probe_inputs(tiny.VOCAB, n_seq=3, length=16)
    want = np.mean(np.concatenate([np.array(ev.kl_divergence(a(x), b(x))).ravel() for x in inputs]))
    got = ev.mean_kl(a, b, inputs)
    assert got == pytest.approx(float(want), rel=1e-5) and got > 0
    assert ev.mean_kl(a, a, inputs) == pytest.approx(0, abs=1e-6)
    # the reference's logits computed before give the same number (mixed precision's sensitivity pass)
    assert ev.mean_kl([a(x) for x in inputs], b, inputs) == got


def test_kl_probe_inputs_are_fixed(tokenizer):
    one, two = ev.kl_probe_inputs(300, tokenizer), ev.kl_probe_inputs(300, tokenizer)
    assert len(one) == 5 and all(mx.array_equal(x, y).item() for x, y in zip(one, two))
    assert all(x.shape == (1, 64) and x.dtype == mx.int32 for x in one[:4])
    assert int(mx.max(mx.concatenate([x.reshape(-1) for x in one]))) < 300
    assert one[4].tolist()[0] == tokenizer.encode("def mean(values):\n    return sum(values) / len(values)\n"
                                                  "The model was trained on a small corpus and exported for llama.cpp.\n")[:64]
    assert len(ev.kl_probe_inputs(300)) == 4


def test_sensitivity_and_export_measure_with_evaluate(models):
    """No second KL: mixed precision's per-layer KL is evaluate.mean_kl, and export has none of its own."""
    a, _ = models
    windows = np.random.default_rng(0).integers(0, tiny.VOCAB, (4, 17))
    spec = LayerSpec(2, 64)
    sens = mixed.layer_sensitivity(a, windows, [spec], batch_size=2)
    path = "model.layers.0.mlp.down_proj"
    batches = [mx.array(windows[i : i + 2, :-1]) for i in (0, 2)]
    reference = [a(x) for x in batches]
    layer = a.model.layers[0].mlp.down_proj
    original = layer.weight
    layer.weight = mixed.rtn_weight(original, spec)
    try:
        want = ev.mean_kl(reference, a, batches)
    finally:
        layer.weight = original
    assert sens[path][0] == want > 0
    assert not hasattr(export, "measure_kl") and not hasattr(export, "_kl_inputs")


def test_evaluation_shows_progress_and_measures_the_same(models, capsys):
    teacher, student = models
    windows = np.random.default_rng(0).integers(0, 256, (12, 17))
    quiet = ev.evaluate(student, windows, teacher, batch_size=4)
    capsys.readouterr()
    shown = ev.evaluate(student, windows, teacher, batch_size=4, progress="round-to-nearest")
    err = capsys.readouterr().err
    assert shown == quiet
    assert "round-to-nearest" in err and "0/12" in err  # a bar over the 12 windows, labelled
