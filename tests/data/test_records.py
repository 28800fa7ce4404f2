"""Input records from Parquet, CSV, saved datasets and Hub datasets, with field mappings
(lmdistill.data.records), read by the prompt and training readers. Offline: Hub datasets are
faked at `datasets.load_dataset`, except the one that checks the uncached error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.data.records import (
    FieldMap,
    field_map,
    hub_dataset,
    iter_records,
    source_digest,
)
from lmdistill.errors import InputError, UserError
from lmdistill.pipelines.generate import read_prompts

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]
SHAREGPT = [
    {
        "id": "c1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
        ],
    }
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_csv_and_saved_dataset_give_the_same_prompts(tmp_path: Path) -> None:
    import datasets

    rows = [{"id": "a", "prompt": "What is 2 + 3?"}, {"id": "b", "prompt": "Say hi,\nplease."}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,prompt\na,What is 2 + 3?\nb,"Say hi,\nplease."\n')
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sources = [jsonl, write_parquet(tmp_path / "p.parquet", rows), csv_path, tmp_path / "saved"]
    expected = [(p.id, p.messages) for p in read_prompts(jsonl)]
    for source in sources:
        assert [(p.id, p.messages) for p in read_prompts(source)] == expected, source


def test_a_bad_row_is_named_by_source_row_and_field(tmp_path: Path) -> None:
    parquet = write_parquet(tmp_path / "p.parquet", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(InputError, match=r"p\.parquet:2: field 'prompt': must be a non-empty"):
        read_prompts(parquet)
    csv_path = tmp_path / "p.csv"
    # The bad row starts on line 4: the row before it spans lines 2-3.
    csv_path.write_text('prompt,id\n"two\nlines",a\n,b\n')
    with pytest.raises(InputError, match=r"p\.csv:4: field 'prompt'"):
        read_prompts(csv_path)


def test_a_dataset_dict_dir_takes_a_split(tmp_path: Path) -> None:
    import datasets

    splits = {
        "train": datasets.Dataset.from_list([{"prompt": "train one"}]),
        "test": datasets.Dataset.from_list([{"prompt": "test one"}, {"prompt": "test two"}]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert len(read_prompts(f"{tmp_path / 'dd'}@test")) == 2
    with pytest.raises(UserError, match=r"several splits; name one as .*@SPLIT \(train, test\)"):
        read_prompts(tmp_path / "dd")
    with pytest.raises(UserError, match="no split 'dev'"):
        read_prompts(f"{tmp_path / 'dd'}@dev")


def test_alpaca_rows_train_without_conversion(tmp_path: Path) -> None:
    from tiny import make_tokenizer

    from lmdistill.data.sft import load_examples

    parquet = write_parquet(tmp_path / "alpaca.parquet", ALPACA)
    records = [r for _, r in iter_records(parquet, field_map("alpaca"))]
    assert records[0]["prompt"] == "Add the numbers.\n\n2 and 3" and records[0]["response"] == "5"
    assert records[1]["prompt"] == "Name a colour."  # an empty input adds nothing
    assert set(records[0]) == {"prompt", "response"}
    data = load_examples(parquet, make_tokenizer(), max_length=64, fields=field_map("alpaca"))
    assert len(data.examples) == 2
    with pytest.raises(InputError, match=r"alpaca\.parquet:1: .*set data\.fields \(alpaca"):
        load_examples(parquet, make_tokenizer(), max_length=64)  # the shape needs the mapping


def test_mapped_errors_name_the_users_column(tmp_path: Path) -> None:
    rows = [*ALPACA, {"instruction": 7, "input": "", "output": "x"}]
    parquet = write_parquet(
        tmp_path / "a.parquet", [{**r, "instruction": str(r["instruction"])} for r in rows[:2]]
    )
    bad = tmp_path / "a.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"a\.jsonl:3: field 'instruction': must be a non-empty"):
        list(iter_records(bad, field_map("alpaca")))
    assert len(list(iter_records(parquet, field_map("alpaca")))) == 2


def test_sharegpt_conversations_are_chat_messages(tmp_path: Path) -> None:
    from lmdistill.data.sft import conversation

    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT))
    fields = field_map("sharegpt")
    ((row, record),) = list(iter_records(path, fields))
    messages = conversation(record, path, row)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    # As prompts, the conversation stops before the answer the teacher is to write.
    (prompt,) = read_prompts(path, fields)
    assert prompt.id == "c1" and [m["role"] for m in prompt.messages] == ["system", "user"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:1: field 'conversations\[0\]\.from'"):
        list(iter_records(bad, fields))


def test_a_csv_cell_may_hold_a_json_chat_list(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    messages = [{"role": "user", "content": "Hi, there"}]
    path.write_text('messages\n"' + json.dumps(messages).replace('"', '""') + '"\n')
    (prompt,) = read_prompts(path)
    assert prompt.messages == messages


def test_dolly_prompts_drop_the_datasets_own_response(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": "Summarise.",
            "context": "A long text.",
            "response": "Short.",
            "category": "summarization",
        }
    ]
    parquet = write_parquet(tmp_path / "dolly.parquet", rows)
    (prompt,) = read_prompts(parquet, field_map("dolly"))
    assert prompt.messages == [{"role": "user", "content": "Summarise.\n\nA long text."}]
    assert prompt.fields == {"category": "summarization"}


def test_field_maps_parse_presets_and_pairs_and_name_mistakes() -> None:
    assert field_map(None) is None
    assert field_map("prompt=question, response=answer") == FieldMap(
        prompt="question", response="answer"
    )
    assert field_map({"messages": "turns"}) == FieldMap(messages="turns")
    with pytest.raises(
        UserError, match=r"unknown field mapping 'alpacca' \(did you mean alpaca\?\)"
    ):
        field_map("alpacca")
    with pytest.raises(UserError, match=r"unknown key\(s\) answer"):
        field_map("answer=output")


def test_a_recipe_names_a_bad_mapping_by_its_key(tmp_path: Path) -> None:
    from lmdistill.training.config import validate

    raw = {
        "run_dir": str(tmp_path),
        "student": {"model": "x"},
        "data": {"path": "d.jsonl", "fields": "nope=1"},
    }
    with pytest.raises(UserError, match=r"data\.fields: .*unknown key\(s\) nope"):
        validate(raw, "r.yaml")


def test_hub_dataset_specs_parse() -> None:
    assert hub_dataset("hf:tatsu-lab/alpaca") == hub_dataset("hf:tatsu-lab/alpaca@train")
    spec = hub_dataset("hf:openai/gsm8k:main@test")
    assert (spec.name, spec.config, spec.split) == ("openai/gsm8k", "main", "test")
    for bad in ("hf:", "hf:x:", "hf:x@"):
        with pytest.raises(UserError, match=r"expected hf:NAME\[:CONFIG\]\[@SPLIT\]"):
            hub_dataset(bad)


@pytest.mark.parametrize("offline", [False, True])
def test_hub_datasets_stream_online_and_read_the_cache_offline(monkeypatch, offline: bool) -> None:
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1" if offline else "0")
    calls = []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_list(ALPACA).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    prompts = read_prompts("hf:tatsu-lab/alpaca@train", field_map("alpaca"))
    assert [p.messages[0]["content"] for p in prompts] == [
        "Add the numbers.\n\n2 and 3",
        "Name a colour.",
    ]
    assert calls == [("tatsu-lab/alpaca", None, "train", not offline)]


def test_an_uncached_hub_dataset_offline_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "hf").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmdistill",
            "generate",
            "--teacher",
            "smollm2-135m-instruct",
            "--prompts",
            "hf:org/no-such-data",
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "lmdistill generate: error: hf:org/no-such-data: cannot read it"
    ), done.stderr


def test_digests_identify_content_and_mapping(tmp_path: Path) -> None:
    import datasets

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "a", "response": "b"}\n')
    # A file's digest is its sha256, as earlier versions recorded (caches stay valid).
    assert source_digest(jsonl) == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    assert source_digest(jsonl, field_map("alpaca")) != source_digest(jsonl)
    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "s1"))
    datasets.Dataset.from_list([{"prompt": "b"}]).save_to_disk(str(tmp_path / "s2"))
    assert source_digest(tmp_path / "s1") != source_digest(tmp_path / "s2")
    assert source_digest("hf:a/b@train") != source_digest("hf:a/b@test")


def test_a_run_recipe_reads_a_saved_dataset_and_fingerprints_its_content(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import datasets
    import yaml

    from lmdistill.pipelines.run import fingerprints, load_recipe, make_prompts, plan

    saved = tmp_path / "alpaca"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    path = tmp_path / "recipe.yaml"
    raw = {
        "run_dir": str(tmp_path / "run"),
        "teacher": str(tiny_model_dir),
        "prompts": {"path": str(saved), "fields": "alpaca"},
        "generate": {"max_tokens": 4},
    }
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)  # checks the first record through the mapping
    out = tmp_path / "prompts.jsonl"
    assert make_prompts(recipe.prompts, out) == "2 prompts"
    first = json.loads(out.read_text().splitlines()[0])
    assert first["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
    before = fingerprints(plan(recipe))
    datasets.Dataset.from_list(ALPACA[:1]).save_to_disk(str(saved))
    assert fingerprints(plan(recipe))["prompts"] != before["prompts"]
    raw["prompts"]["fields"] = "alpacca"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"prompts\.fields: .*did you mean alpaca"):
        load_recipe(path)


def test_a_teacher_cache_of_mapped_data_is_tied_to_its_mapping(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lmdistill.teachers.cache import TopkCache, build_cache
    from lmdistill.teachers.local import HFTeacher

    teacher = HFTeacher(tiny_model_dir, device="cpu")
    parquet = write_parquet(tmp_path / "alpaca.parquet", ALPACA)
    alpaca = field_map("alpaca")
    report = build_cache(
        teacher, parquet, tmp_path / "cache", top_k=4, max_length=64, progress=False, fields=alpaca
    )
    assert report.positions > 0
    cache = TopkCache(tmp_path / "cache")
    cache.check_compatible(teacher.tokenizer, parquet, 64, alpaca)
    with pytest.raises(UserError, match="made from other data"):
        cache.check_compatible(teacher.tokenizer, parquet, 64, field_map("prompt=instruction"))


def test_a_null_cell_is_an_absent_field(tmp_path: Path) -> None:
    """One table holding prompt rows and chat rows: each row's other column is null."""
    rows = [
        {"prompt": "Hi?", "messages": None},
        {"prompt": None, "messages": [{"role": "user", "content": "Hello?"}]},
    ]
    prompts = read_prompts(write_parquet(tmp_path / "mixed.parquet", rows))
    assert [p.messages[0]["content"] for p in prompts] == ["Hi?", "Hello?"]
