"""The real bundled teachers' conversion cache, shared by their integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmdistill.teachers import bundled

# A fixed dir under the repo (gitignored), so a conversion (~20 s) happens once per machine, not
# once per test run; a cache dir chosen by the environment wins.
REAL_CACHE = Path(
    os.environ.get(bundled.CACHE_ENV) or Path(__file__).parents[2] / ".cache" / "lmdistill-test"
)


@pytest.fixture(scope="module")
def real_cache() -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bundled.CACHE_ENV, str(REAL_CACHE))
        yield REAL_CACHE
