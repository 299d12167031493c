"""llama.cpp as the reference for GGUF tests (:mod:`mlxqat.gguf.llamacpp`: its server in-process through
the xllamacpp package, asked directly and over its loopback HTTP address). Tests skip when
xllamacpp is missing.

``TEXTS`` and :func:`documents` are the texts that llama.cpp and the model's own tokenizer must
split alike."""

from __future__ import annotations

import pytest

from mlxqat.gguf.llamacpp import PROBE_TEXTS, probe_documents


def LlamaCpp(path, n_ctx: int = 256):
    """:class:`mlxqat.gguf.llamacpp.LlamaCpp`; the test skips where xllamacpp is missing."""
    pytest.importorskip("xllamacpp")
    from mlxqat.gguf.llamacpp import LlamaCpp as Server

    return Server(path, n_ctx)


TEXTS, documents = PROBE_TEXTS, probe_documents  # the product's tokenizer probes
