import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    tiny.make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tokenizer_dir)
