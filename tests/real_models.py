"""The real pretrained models the tests check against, fetched by ``tools/fetch-models`` into ``.models/``.

``.ci/run`` fetches them; elsewhere the tests that need one skip, naming the command. The
environment variables ``MLXQAT_SMOLLM2_GGUF`` / ``MLXQAT_GEMMA3_GGUF`` point at copies elsewhere.
"""

import os
from pathlib import Path

import pytest

_MODELS = Path(__file__).resolve().parents[1] / ".models"
SMOLLM2 = Path(os.environ.get("MLXQAT_SMOLLM2_GGUF", _MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
GEMMA3 = Path(os.environ.get("MLXQAT_GEMMA3_GGUF", _MODELS / "gemma-3-270m-q4_k_m.gguf"))


def needs(path: Path):
    """Skip the test unless the model file ``path`` is there."""
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} is absent: run tools/fetch-models (350 MB)")
