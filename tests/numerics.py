"""Float32 comparisons that hold on any CPU (DESIGN.md, "Tests that hold on any CPU").

The order in which float32 terms are summed depends on the BLAS kernel a CPU gets (OpenBLAS picks
AVX2 or AVX-512 kernels, llama.cpp its own), so two correct implementations agree only up to
rounding of that order. A test either derives its tolerance from the values' own magnitude and
number of terms, or measures the computation's own sensitivity to float32 rounding:

* :func:`near_ties`: greedy choices of another implementation against this model's log-probabilities
  along the same tokens (teacher forcing); a different choice must be a near-tie within the measured
  noise, and the caller asserts how many there may be.
* :func:`path_logprobs`: those log-probabilities, one forward pass over prompt + continuation;
  :func:`logprob_diffs`: how far the other implementation's own log-probabilities are from them.
* :func:`gradient_noise`: how far the gradients of a loss move when the cotangent of the logits is
  rounded differently by one float32 ulp, per parameter tensor: the unit of any comparison of two
  ways of computing the same gradients (a gradient that cancels moves by its terms' size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one ulp of 1.0 in float32


def path_logprobs(model, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
    """``model``'s float32 log-probabilities of the next token at each step of ``continuation`` after
    ``prompt`` (teacher forcing): row ``i`` is the distribution ``continuation[i]`` was chosen from."""
    ids = list(prompt) + list(continuation)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    lp = nn.log_softmax(logits, axis=-1)
    return np.array(lp[len(prompt) - 1 : len(ids) - 1])


def logprob_diffs(logprobs, steps) -> tuple:
    """|other - this model| log-probabilities at each step of another implementation's decoding
    ``steps`` (``[(chosen id, its log-prob, [(id, log-prob), ...])]``, as ``LlamaCpp.complete`` gives
    them), against this model's ``logprobs`` along the same tokens (:func:`path_logprobs`):
    ``(chosen, top)`` arrays, the chosen tokens' and those of the other side's top-n list."""
    chosen, top = [], []
    for row, (tid, logprob, tops) in zip(np.asarray(logprobs), steps, strict=True):
        chosen.append(abs(logprob - row[tid]))
        top += [abs(v - row[t]) for t, v in tops]
    return np.array(chosen), np.array(top)


def margins(logprobs) -> np.ndarray:
    """Per row of ``logprobs``, how far the most likely token is above the second (nats)."""
    top2 = np.sort(np.asarray(logprobs, dtype=np.float64), axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def near_ties(logprobs, chosen: Sequence[int], near_tie: float, what: str = "") -> list:
    """Check another implementation's greedy tokens ``chosen`` against this model's ``logprobs`` along
    the same path (``(len(chosen), vocab)``, as :func:`path_logprobs` gives them).

    Where this model's top-1 is ``chosen[i]`` the two agree. Elsewhere the choice is a near-tie only if
    this model puts ``chosen[i]`` within ``near_tie`` nats of its own top-1, i.e. the two tokens are
    closer than the measured difference between the implementations can separate; any other
    disagreement fails. Returns the near-tie positions: the caller asserts how many it accepts.
    Because the log-probabilities are taken along ``chosen``'s own path, every position after a
    near-tie is still compared on the same prefix.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    assert lp.shape[0] == len(chosen), (lp.shape, len(chosen))
    ties = []
    for i, c in enumerate(chosen):
        top = int(lp[i].argmax())
        if top == int(c):
            continue
        gap = float(lp[i, top] - lp[i, int(c)])
        assert gap <= near_tie, (f"{what} step {i}: the other side chose token {c}, this model's top-1 {top} is "
                                 f"{gap:.3g} nats above it, more than the noise bound {near_tie:.3g}")
        ties.append(i)
    return ties


def _with_cotangent_noise(noise: mx.array) -> Callable:
    @mx.custom_function
    def f(x):
        return x

    @f.vjp
    def f_vjp(primals, cotangent, output):
        return cotangent * (1 + noise)

    return f


def gradient_noise(model, loss: Callable, inputs, targets, teacher_out, reference: dict[str, mx.array],
                   seeds: int = 4, rel: float = EPS32) -> dict[str, float]:
    """Per parameter tensor, the largest change of ``reference`` (the gradients of ``loss(model, inputs,
    targets, teacher_out)``, ``loss`` taking the model's logits through ``model(inputs)``) when the
    cotangent of the logits is multiplied by ``1 + rel * N(0, 1)``, over ``seeds`` draws.

    That is float32 rounding of the backward pass's first step, propagated through everything after
    it: a gradient that is a small difference of large terms moves by ``rel`` times those terms, not
    by ``rel`` times itself. Two computations of the same gradients that sum in different orders
    differ by about this much.
    """
    worst = dict.fromkeys(reference, 0.0)
    for s in range(seeds):
        key = mx.random.key(1000 + s)

        def noisy_loss(m, x, y, t, key=key):
            return loss(_Logits(m, key, rel), x, y, t)

        _, grads = nn.value_and_grad(model, noisy_loss)(model, inputs, targets, teacher_out)
        mx.eval(grads)
        for k, g in tree_flatten(grads):
            worst[k] = max(worst[k], float(mx.max(mx.abs(g - reference[k])).item()))
    return worst


class _Logits:
    """``model`` called as itself, its logits' cotangent jittered (see :func:`gradient_noise`)."""

    def __init__(self, model, key, rel):
        self.model, self.key, self.rel = model, key, rel

    def __call__(self, x, *a, **kw):
        out = self.model(x, *a, **kw)
        noise = self.rel * mx.random.normal(out.shape, dtype=mx.float32, key=self.key)
        return _with_cotangent_noise(noise)(out)

    def __getattr__(self, name):
        return getattr(self.model, name)
