"""A GGUF file run by llama.cpp itself, in this process (the optional ``xllamacpp`` package:
``pip install 'mlxqat[llamacpp]'``): tokenization, greedy decoding with log-probabilities, and
per-token scoring of held-out text, the numbers a llama.cpp or Ollama user gets from the file.

    from mlxqat.gguf.llamacpp import LlamaCpp
    lc = LlamaCpp("model-q4_0.gguf")
    lc.tokenize("def f(x):")              # token ids, as llama.cpp splits the text
    lc.score([[1, 2, 3, ...], ...])       # log-probabilities of each next token, and llama.cpp's top-1
    lc.apply_template([{"role": "user", "content": "Hi"}])  # the chat prompt llama.cpp builds from the file
"""

from __future__ import annotations

import json
import math
import random
import urllib.request
from typing import Dict, Iterable, List, Sequence

import numpy as np


def _xllamacpp():
    try:
        # lazy: optional dependency (pip install 'mlxqat[llamacpp]')
        import xllamacpp
    except ImportError:
        raise ImportError("running a GGUF in llama.cpp needs the xllamacpp package: pip install 'mlxqat[llamacpp]'") from None
    return xllamacpp


class WithheldToken(RuntimeError):
    """llama.cpp's server gave no log-probability for a token that ends inside a UTF-8 character."""


class LlamaCpp:
    """A llama.cpp server for one GGUF file (float32 KV cache, greedy sampling, 2 threads by default)."""

    def __init__(self, path, n_ctx: int = 256, threads: int = 2, *, jinja: bool = True):
        """``jinja``: run the file's chat template itself (False: llama.cpp's built-in format for it)."""
        xlc = _xllamacpp()
        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
        p.sampling.temp, p.sampling.top_k = 0.0, 1
        p.cache_type_k = p.cache_type_v = 0  # float32 KV cache: no float16 rounding of keys/values
        p.flash_attn_type = 0
        p.warmup = False
        p.verbosity = -1  # no log lines from llama.cpp's server
        p.use_jinja = jinja
        self.n_ctx = n_ctx
        self.server = xlc.Server(p)
        self.address = self.server.listening_address

    def _completion(self, request: dict) -> list:
        r = self.server.handle_completions(request)
        if "error" not in r and not r["choices"][0].get("logprobs") and "\ufffd" in r["choices"][0].get("text", ""):
            raise WithheldToken(f"llama.cpp withheld the log-probability of a token that ends inside a UTF-8 "
                                f"character ({r['choices'][0]['text']!r})")
        if "error" in r or not r["choices"][0].get("logprobs"):
            raise RuntimeError(f"llama.cpp answered {str(r)[:300]}")
        return r

    def complete(self, prompt, n: int = 16, n_probs: int = 5, force=None, cache_prompt: bool = False,
                 ignore_eos: bool = True) -> dict:
        """Greedy continuation of ``prompt`` (text or token ids); ``force`` (a token id) is chosen
        whatever the model says, while its log-probabilities stay the model's own. ``ignore_eos``
        decodes past end-of-text (llama.cpp then gives that token no probability at all)."""
        request = {"prompt": prompt, "n_predict": n, "n_probs": n_probs, "temperature": 0.0, "top_k": 1,
                   "cache_prompt": cache_prompt, "ignore_eos": ignore_eos}
        if force is not None:
            request["logit_bias"] = [[int(force), 1000.0]]
        r = self._completion(request)
        steps = r["choices"][0]["logprobs"]["content"]
        return {
            "ids": [s["id"] for s in steps],
            "logprobs": [(s["id"], s["logprob"], [(t["id"], t["logprob"]) for t in s["top_logprobs"]]) for s in steps],
            "text": r["choices"][0]["text"],
            "prompt_tokens": r["usage"]["prompt_tokens"],
        }

    def _forced(self, ids, t: int):
        """``(id, logprob, [(top id, logprob)])`` of token ``ids[t]`` after ``ids[:t]`` (the prefix from llama.cpp's
        prompt cache; end-of-text keeps its probability), or None where the server withholds it (a token that
        ends inside a UTF-8 character)."""
        try:
            return self.complete(ids[:t], n=1, n_probs=1, force=ids[t], cache_prompt=True,
                                 ignore_eos=False)["logprobs"][0]
        except WithheldToken:
            return None

    def top5(self, ids, force):
        """llama.cpp's 5 most likely next tokens after ``ids`` as ``[(id, logprob)]``."""
        return self.complete(ids, n=1, n_probs=5, force=force)["logprobs"][0][2]

    def score(self, windows: Iterable[Sequence[int]]) -> Dict[str, np.ndarray]:
        """llama.cpp's log-probability of every next token of each window, and its own top-1 there.

        Token ``t`` of a window is scored after tokens ``0..t-1`` (one forced token per request, the
        prefix reused from llama.cpp's prompt cache, as when it generates). Returns ``logprobs`` and
        ``top1`` arrays of shape ``(n_windows, len - 1)``, and ``scored``, False where llama.cpp's server
        withholds the figures because the token ends inside a UTF-8 character (a byte of a character
        split over several tokens; the same tokens for every file, so files compare on the same
        positions): ``logprobs`` is NaN and ``top1`` -1 there.
        """
        logprobs: List[List[float]] = []
        top1: List[List[int]] = []
        scored: List[List[bool]] = []
        windows = [[int(i) for i in w] for w in windows]
        if len({len(w) for w in windows}) > 1:
            raise ValueError(f"windows of {sorted({len(w) for w in windows})} tokens: score windows of one length")
        for ids in windows:
            if len(ids) > self.n_ctx:
                raise ValueError(f"a window of {len(ids)} tokens is longer than n_ctx={self.n_ctx}; pass n_ctx >= {len(ids)}")
            lp, top, ok = [], [], []
            for t in range(1, len(ids)):
                step = self._forced(ids, t)
                lp.append(math.nan if step is None else step[1])
                top.append(-1 if step is None else step[2][0][0])
                ok.append(step is not None)
            logprobs.append(lp)
            top1.append(top)
            scored.append(ok)
        out = {"logprobs": np.array(logprobs, dtype=np.float64), "top1": np.array(top1, dtype=np.int64),
               "scored": np.array(scored, dtype=bool)}
        if not np.isfinite(out["logprobs"][out["scored"]]).all():
            raise FloatingPointError("llama.cpp gave a non-finite log-probability")
        return out

    def completion_loss(self, windows) -> Dict[str, float]:
        """llama.cpp's mean negative log-probability per counted token of masked windows ``(n, 2, width)``
        (:mod:`mlxqat.finetune_data`: token ids, and 1 where the token is a completion's): the figure
        :func:`mlxqat.evaluate.completion_loss` computes in MLX, computed by llama.cpp from the file.

        Each counted token is scored after the tokens before it (the prompt evaluated once, then reused
        from llama.cpp's cache). Returns ``{"loss", "tokens", "examples", "withheld"}``: ``withheld`` counts the
        tokens left out because llama.cpp's server gives no figure for a token that ends inside a UTF-8
        character (see :meth:`score`).
        """
        total, count, withheld = 0.0, 0, 0
        windows = np.asarray(windows)
        for ids, mask in windows:
            ids = [int(i) for i in ids]
            for t in np.flatnonzero(mask):
                if t + 1 > self.n_ctx:
                    raise ValueError(f"a completion token at position {t} is past n_ctx={self.n_ctx}; pass n_ctx > {t}")
                step = self._forced(ids, t)
                if step is None:
                    withheld += 1
                    continue
                total -= step[1]
                count += 1
        if count == 0:
            raise ValueError("completion_loss() got no counted tokens (empty data, or every target masked)")
        if not math.isfinite(total):
            raise FloatingPointError("llama.cpp gave a non-finite log-probability")
        return {"loss": total / count, "tokens": count, "examples": len(windows), "withheld": withheld}

    def perplexity(self, windows) -> float:
        """``exp`` of the mean negative log-probability of :meth:`score` (over the tokens it scores)."""
        got = self.score(windows)
        return math.exp(-float(got["logprobs"][got["scored"]].mean()))

    def _post(self, route, body):
        request = urllib.request.Request(self.address + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())

    def tokenize(self, text):
        """Token ids of ``text`` as llama.cpp splits it (special tokens added and parsed)."""
        return self._post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def detokenize(self, ids):
        return self._post("/detokenize", {"tokens": ids})["content"]

    def props(self) -> dict:
        """What llama.cpp read from the file: ``chat_template``, ``bos_token``, ``eos_token``, ..."""
        with urllib.request.urlopen(self.address + "/props", timeout=60) as reply:
            return json.loads(reply.read())

    def apply_template(self, messages: List[dict]) -> str:
        """The prompt llama.cpp's chat endpoint builds for ``messages`` (with the generation prompt;
        a last assistant message is continued)."""
        return self._post("/apply-template", {"messages": messages})["prompt"]


# Texts that llama.cpp and a model's own tokenizer must split alike: code, contractions, numbers,
# Unicode, runs of spaces, tabs and newlines, special tokens, the empty string.
PROBE_TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "don't it's we'll THEY'RE I'M",
    "x=1;y=22;z=333;w=4444 3.14159 1234567",
    "héllo wörld — naïve café ✓ 日本語 😀👍🏽",
    "   leading spaces and trailing   ",
    "\ttabs\tand\n\n\nnewlines\r\n",
    "<|endoftext|>The quick brown fox<|endoftext|>",
    "                                fifty-ish spaces",
    "", " ", "\n", "0000", "a" * 80,
]
_WORDS = ("the of and to in is model token llama gemma quantization café naïve 東京 Москва 12 345 6789 "
          "x_y fooBar don't I'll <|im_end|> def return self.x == ==== ---- (n - 1) [0x41]").split()
_SEPS = [" ", "  ", "   ", "\n", "\t", ", ", ". ", "\n\n", "    ", "", " " * 40, "\n    ", "\n" * 7, "\t\t"]


def probe_documents(n: int, seed: int = 0) -> list:
    """Tokenizer probes beyond :data:`PROBE_TEXTS`: ``n`` varied strings: words, code, numbers, Unicode, long runs of spaces, tabs and newlines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            w = rng.choice(_WORDS)
            r = rng.random()
            w = w.upper() if r < 0.15 else str(rng.randint(0, 10 ** rng.randint(1, 9))) if r < 0.25 else (
                chr(rng.choice([0x4E00, 0x3042, 0x0410, 0x00E9, 0x1F600, 0x05D0]) + rng.randint(0, 40))
                if r < 0.3 else w)
            parts += [w, rng.choice(_SEPS)]
        out.append("".join(parts))
    return out
