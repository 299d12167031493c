"""llama.cpp as the reference for GGUF tests: its server in-process (xllamacpp, a PyPI package),
asked directly and over its loopback HTTP address. Tests skip when xllamacpp is missing.

``TEXTS`` and :func:`documents` are the texts that llama.cpp and the model's own tokenizer must
split alike."""

from __future__ import annotations

import json
import random
import urllib.request

import pytest


class LlamaCpp:
    """A llama.cpp server for one GGUF file: greedy decoding with log-probabilities, tokenization."""

    def __init__(self, path, n_ctx: int = 256):
        xlc = pytest.importorskip("xllamacpp")
        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
        p.sampling.temp, p.sampling.top_k = 0.0, 1
        p.cache_type_k = p.cache_type_v = 0  # float32 KV cache: no float16 rounding of keys/values
        p.flash_attn_type = 0
        p.warmup = False
        self.server = xlc.Server(p)
        self.address = self.server.listening_address

    def complete(self, prompt, n: int = 16, n_probs: int = 5, force=None):
        """Greedy continuation; ``force`` (a token id) is chosen whatever the model says: its
        log-probs are still the model's own, and a printable token keeps them in the reply."""
        request = {"prompt": prompt, "n_predict": n, "n_probs": n_probs, "temperature": 0.0, "top_k": 1,
                   "cache_prompt": False, "ignore_eos": True}
        if force is not None:
            request["logit_bias"] = [[force, 1000.0]]
        r = self.server.handle_completions(request)
        assert "error" not in r, r
        assert r["choices"][0]["logprobs"], r
        steps = r["choices"][0]["logprobs"]["content"]
        return {
            "ids": [s["id"] for s in steps],
            "logprobs": [(s["id"], s["logprob"], [(t["id"], t["logprob"]) for t in s["top_logprobs"]]) for s in steps],
            "text": r["choices"][0]["text"],
            "prompt_tokens": r["usage"]["prompt_tokens"],
        }

    def top5(self, ids, force):
        """llama.cpp's 5 most likely next tokens after ``ids`` as ``[(id, logprob)]`` (``force``: a
        printable token sampled whatever the model says, so that the reply keeps the step's log-probs)."""
        return self.complete(ids, n=1, n_probs=5, force=force)["logprobs"][0][2]

    def _post(self, route, body):
        request = urllib.request.Request(self.address + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())

    def tokenize(self, text):
        return self._post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def detokenize(self, ids):
        return self._post("/detokenize", {"tokens": ids})["content"]


TEXTS = [
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


def documents(n: int, seed: int = 0) -> list:
    """``n`` varied strings: words, code, numbers, Unicode, long runs of spaces, tabs and newlines."""
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
