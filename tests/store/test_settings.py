"""lmdistill.store.settings: the one settings lock (issue 14): what changed, and refusing to
continue an output made with other settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmdistill.errors import UserError
from lmdistill.store.digest import file_digest
from lmdistill.store.settings import changed_settings, check_settings, side_path, write_settings

FORMAT = "test.settings/1"


def test_changed_settings_names_nested_keys_dotted_and_sorted():
    old = {"teacher": "a", "sampling": {"temperature": 0.7, "n": 1}, "log": {"every": 1}}
    new = {"teacher": "b", "sampling": {"temperature": 0.0, "n": 1}, "log": {"every": 5}}
    assert changed_settings(old, new) == ["log.every", "sampling.temperature", "teacher"]
    assert changed_settings(old, new, ignore=("log", "teacher")) == ["sampling.temperature"]
    assert changed_settings(old, old) == []


def test_a_key_on_one_side_only_is_a_change():
    assert changed_settings({"a": 1}, {"a": 1, "b": None}) == []  # absent reads as None
    assert changed_settings({"a": 1}, {"a": 1, "b": 2}) == ["b"]
    assert changed_settings({"a": {"x": 1}}, {"a": 3}) == ["a"]


def test_an_output_continues_with_the_same_settings_and_not_with_others(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    settings = {"teacher": "t", "sampling": {"temperature": 0.7}}
    check_settings(out, settings, meta_format=FORMAT, writer="the test")  # new: fine
    write_settings(out, settings, meta_format=FORMAT)
    out.write_text('{"id": 1}\n')
    check_settings(out, settings, meta_format=FORMAT, writer="the test")  # same: fine
    other = {"teacher": "t", "sampling": {"temperature": 1.2}}
    with pytest.raises(UserError, match=r"sampling\.temperature 0\.7 -> 1\.2.*--overwrite"):
        check_settings(out, other, meta_format=FORMAT, writer="the test")


def test_an_output_someone_else_wrote_is_refused_in_one_line(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1}\n')
    with pytest.raises(UserError, match="not written by the test"):
        check_settings(out, {}, meta_format=FORMAT, writer="the test")
    side_path(out, ".meta.json").write_text(json.dumps({"format": "another/1"}))
    with pytest.raises(UserError, match=r"out\.jsonl\.meta\.json: unreadable") as raised:
        check_settings(out, {}, meta_format=FORMAT, writer="the test")
    assert "\n" not in str(raised.value)


def test_file_digest_is_the_sha256_of_the_bytes_and_a_missing_file_is_one_line(tmp_path: Path):
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 5000  # more than one read block
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(UserError, match="no such file"):
        file_digest(tmp_path / "missing")
