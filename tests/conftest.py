import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmdistill.teachers.bundled import CACHE_ENV

# Tiny models are faster on one thread, and two test processes (or a test and its server) must not
# fight over the 2 cores; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tokenized data (lmdistill.data.tokens) goes to a dir of this test session, never the user's
    cache dir; subprocesses inherit it."""
    from lmdistill.data.tokens import TOKEN_CACHE_ENV

    root = tmp_path_factory.mktemp("token-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama with a byte-level BPE tokenizer and a ChatML template, saved as an
    HF model dir (loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained)."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline, for this test and the subprocesses it starts.
    huggingface_hub reads its settings once at import, so its constants are set as well."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# The real bundled teachers' conversion cache, shared by the tests that load them: a fixed dir
# under the repo (gitignored), so a conversion (~20 s) happens once per machine, not once per test
# run; a cache dir chosen by the environment wins.
REAL_CACHE = Path(
    os.environ.get(CACHE_ENV) or Path(__file__).parents[1] / ".cache" / "lmdistill-test"
)


@pytest.fixture(scope="module")
def real_cache() -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(REAL_CACHE))
        yield REAL_CACHE
