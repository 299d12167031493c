"""A language model as body and head, so a loss can compute its logits a chunk of tokens at a time.

The logits of a micro-batch are ``(batch, seq_len, vocab)`` float32: for a
large vocabulary (Gemma's 262144 tokens) they, and the copies a loss and its
backward pass keep, outweigh the rest of a training step. :func:`split_head`
finds where an mlx-lm model's body ends (the final, normed hidden states,
``model.model(inputs)``) and what its head computes from them: ``lm_head``, or
the input embedding used as the output projection when the model ties them,
then any final logit softcapping. A split is accepted only when body and head
together give the model's own logits on a probe; otherwise there is none and
callers compute logits the plain way.

:data:`LOSS_CHUNK_BYTES` sets the automatic chunk size (:func:`chunk_rows`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .layers import FakeQuantEmbedding, FakeQuantLinear

# float32 logits of one chunk of tokens (a loss's temporaries, with the operations MLX runs
# ahead, come to a few tens of times this), but never fewer rows than MIN_CHUNK_ROWS, below
# which the head's matmuls read its whole weight for too little work
LOSS_CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 64
PROBE_TOKENS = 8


def chunk_rows(vocab: int, tokens: int, chunk: Optional[int] = None) -> int:
    """Tokens per chunk: ``chunk``, or (``None``) as many as fit :data:`LOSS_CHUNK_BYTES` of float32
    logits, at least :data:`MIN_CHUNK_ROWS`; never more than ``tokens`` (``0``: all of them, no chunking)."""
    if chunk is None:
        chunk = max(MIN_CHUNK_ROWS, LOSS_CHUNK_BYTES // (4 * vocab))
    return tokens if chunk == 0 else min(chunk, tokens)


class HeadSplit:
    """``model(inputs) == split.head(split.head_params(), split.body(inputs))`` for one model.

    ``head_params()`` are the arrays the head computes with, taken from the model
    where gradients reach them: a fake-quant head's dequantized weight (computed
    once, not once per chunk), a plain layer's weight and bias, or, for other
    head layers, their trainable parameters. ``head(params, h)`` maps hidden
    states ``(..., hidden)`` to logits ``(..., vocab)`` and may run on any
    slice of tokens; :meth:`chunked_sum` runs it one slice at a time.
    """

    def __init__(self, model: nn.Module, head: nn.Module, tied: bool, softcap: Optional[float]):
        self.model, self.layer, self.tied, self.softcap = model, head, tied, softcap
        self.vocab: Optional[int] = None  # the logits' last dimension, once checked (split_head)
        # a plain layer or a weight-only fake-quant one: logits are h @ W.T (+ b), W computed once
        self.matmul = (type(head) in (nn.Linear, nn.Embedding, FakeQuantEmbedding)
                       or type(head) is FakeQuantLinear and head.spec.act_bits is None)

    def body(self, inputs: mx.array) -> mx.array:
        """The final hidden states ``(B, T, hidden)`` of token ids ``(B, T)``."""
        return self.model.model(inputs)

    def head_params(self) -> Dict[str, mx.array]:
        layer = self.layer
        if not self.matmul:
            return layer.trainable_parameters()
        w = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else layer.weight
        return {"weight": w, **({"bias": layer.bias} if not self.tied and "bias" in layer else {})}

    def _linear(self, params: Dict[str, mx.array], h: mx.array) -> mx.array:
        """The head before any final softcap."""
        if self.matmul:
            y = h @ params["weight"].T
            return y + params["bias"] if "bias" in params else y
        self.layer.update(params)  # any other layer: its own call, on the parameters given
        return self.layer.as_linear(h) if self.tied else self.layer(h)

    def _post(self, y: mx.array) -> mx.array:
        return mx.tanh(y / self.softcap) * self.softcap if self.softcap else y

    def head(self, params: Dict[str, mx.array], h: mx.array) -> mx.array:
        return self._post(self._linear(params, h))

    def chunked_sum(self, h: mx.array, rows: int, fn: Callable[[int, mx.array], mx.array]) -> mx.array:
        """``sum(fn(start, logits[start : start + rows]))`` over the tokens of ``h`` ``(tokens, hidden)``.

        Differentiable in ``h`` and the head's parameters, while only one chunk's
        logits (and ``fn``'s temporaries) exist at a time, in the forward pass and
        in the backward pass, which recomputes each chunk's logits. ``fn`` is
        evaluated chunk after chunk (not side by side, as MLX would schedule
        independent chunks), and the head's weight gradient is accumulated in place.
        ``fn(start, logits)`` returns a scalar; arrays it closes over get no gradient.
        """
        starts = list(range(0, h.shape[0], rows))
        params = self.head_params()
        keys = [k for k, _ in tree_flatten(params)]

        @mx.custom_function
        def total(params, h):
            out = None
            for s in starts:
                chunk = h[s : s + rows] if out is None else mx.depends(h[s : s + rows], out)
                part = fn(s, self.head(params, chunk))
                out = part if out is None else out + part
            return out

        @total.vjp
        def total_vjp(primals, cotangent, _):
            params, h = primals
            if self.matmul:
                return self._matmul_vjp(params, h, cotangent, starts, rows, fn)
            grads, dh = None, []
            for s in starts:
                def chunk_loss(h_rows, *values, s=s):
                    return fn(s, self.head(tree_unflatten(list(zip(keys, values))), h_rows))

                values = [v for _, v in tree_flatten(params)]
                h_rows = h[s : s + rows] if grads is None else mx.depends(h[s : s + rows], grads)  # one chunk at a time
                _, (dh_rows, *dvalues) = mx.vjp(chunk_loss, [h_rows, *values], [cotangent])
                grads = dvalues if grads is None else [a + b for a, b in zip(grads, dvalues)]
                dh.append(dh_rows)
            return tree_unflatten(list(zip(keys, grads or []))), mx.concatenate(dh)

        return total(params, h)

    def _matmul_vjp(self, params, h, cotangent, starts, rows, fn):
        w, bias = params["weight"], params.get("bias")
        dw = db = None
        dh = []
        for s in starts:
            # after the previous chunk's gradient: MLX would otherwise compute every chunk's
            # logits side by side, holding the whole micro-batch's at once
            h_rows = h[s : s + rows] if dw is None else mx.depends(h[s : s + rows], dw)
            y = self._linear(params, h_rows)
            _, (dy,) = mx.vjp(lambda y, s=s: fn(s, self._post(y)), [y], [cotangent])
            dy = dy.astype(w.dtype)
            dw = dy.T @ h_rows if dw is None else mx.addmm(dw, dy.T, h_rows)  # one (vocab, hidden) buffer
            if bias is not None:
                db = dy.sum(0) if db is None else db + dy.sum(0)
            dh.append(dy @ w)
        grads = {"weight": dw, **({"bias": db} if bias is not None else {})}
        return grads, mx.concatenate(dh)


def _candidates(model: nn.Module):
    """(head layer, tied) pairs the model may use: ``lm_head`` first, then the tied embedding."""
    if "lm_head" in model and isinstance(model["lm_head"], nn.Module):
        yield model["lm_head"], False
    emb = model.model.get("embed_tokens")
    if isinstance(emb, nn.Module) and hasattr(emb, "as_linear"):
        yield emb, True


def _softcap(model: nn.Module) -> Optional[float]:
    cap = getattr(model, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(model, "args", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def split_head(model) -> Optional[HeadSplit]:
    """The body/head split of an mlx-lm language model, or ``None`` when it has none this module knows.

    Known: models whose ``__call__`` is ``model.model(inputs)`` then ``lm_head`` or
    ``model.model.embed_tokens.as_linear`` (llama, qwen2, qwen3, gemma3_text, mistral and
    most others), optionally followed by ``final_logit_softcapping`` (gemma2). A
    candidate split is checked on :data:`PROBE_TOKENS` tokens against the model's
    own forward pass; models with another final step (cohere's ``logit_scale``, say)
    fail that check and get ``None``.
    """
    if not isinstance(model, nn.Module) or not isinstance(model.get("model"), nn.Module):
        return None
    probe = mx.arange(PROBE_TOKENS).reshape(1, PROBE_TOKENS)
    try:
        ref = mx.stop_gradient(model(probe))
        tol = (1e-5 if ref.dtype == mx.float32 else 1e-2) * (float(mx.max(mx.abs(ref)).item()) + 1e-6)
        for layer, tied in _candidates(model):
            split = HeadSplit(model, layer, tied, _softcap(model))
            got = split.head(split.head_params(), split.body(probe))
            if got.shape == ref.shape and float(mx.max(mx.abs(got - ref)).item()) <= tol:
                split.vocab = int(ref.shape[-1])
                return split
    except (TypeError, ValueError, AttributeError, RuntimeError, KeyError, IndexError):
        return None  # a body that does not take token ids alone, or a head of another shape
    return None


def logits_by_chunks(split: HeadSplit, inputs: mx.array, rows: int, fn: Callable[[mx.array], object]) -> list:
    """``[fn(logits)]`` for successive chunks of ``rows`` tokens of ``inputs`` (flattened ``B * T``),
    each chunk's logits computed, used and dropped before the next (each result is evaluated)."""
    h = split.body(inputs)
    h = h.reshape(-1, h.shape[-1])  # (B * T, hidden)
    params = split.head_params()
    out = []
    for start in range(0, h.shape[0], rows):
        r = fn(split.head(params, h[start : start + rows]))
        mx.eval(r)
        out.append(r)
    return out
