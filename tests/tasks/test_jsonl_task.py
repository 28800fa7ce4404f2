import json
from pathlib import Path

import pytest

from lmdistill.errors import InputError, UserError
from lmdistill.tasks import get_task
from lmdistill.tasks.jsonl import JsonlTask


def write(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def qa(tmp_path: Path) -> Path:
    return write(
        tmp_path / "qa.jsonl",
        {"id": "q1", "prompt": "What is 600 + 400?", "answer": "1000"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "reference": "Paris",
        },
        {"prompt": "2 * 3?", "answer": 6, "split": "train", "metadata": {"level": 1}},
    )


def test_loads_prompts_messages_and_splits(qa):
    task = get_task(f"jsonl:{qa}")
    test = task.examples()
    assert [e.id for e in test] == ["q1", "qa/2"]
    assert test[0].messages == [{"role": "user", "content": "What is 600 + 400?"}]
    assert test[1].messages[0]["role"] == "system"
    (train,) = task.examples(split="train")
    assert train.reference == 6 and train.metadata["level"] == 1


def test_number_rule_by_default(qa):
    task = get_task(f"jsonl:{qa}")
    example = task.examples()[0]
    assert task.score(example, "600 + 400 = 1,000.\nAnswer: 1,000") == 1.0
    assert task.score(example, "I get 1000.0") == 1.0
    assert task.score(example, "Answer: 999") == 0.0


def test_marker_exact_and_regex_rules(qa):
    marker = get_task(f"jsonl:{qa}@marker")
    paris = marker.examples()[1]
    assert marker.score(paris, "Thinking... The answer is paris.") == 1.0
    assert marker.score(paris, "Paris") == 0.0  # no marker
    exact = get_task(f"jsonl:{qa}@exact")
    assert exact.score(paris, "  Paris\n") == 1.0
    assert exact.score(paris, "It is Paris") == 0.0
    regex = get_task(f"jsonl:{qa}@regex=CITY\\((\\w+)\\)")
    assert regex.score(paris, "CITY(Rome) no, CITY(Paris)") == 1.0
    assert regex.extract("nothing") is None


def test_limit_is_a_seeded_subset(tmp_path):
    path = write(tmp_path / "many.jsonl", *({"prompt": f"q{i}", "answer": i} for i in range(50)))
    task = JsonlTask(path)
    a = task.examples(limit=10, seed=1)
    assert a == task.examples(limit=10, seed=1) and a != task.examples(limit=10, seed=2)
    assert [e.metadata["line"] for e in a] == sorted(e.metadata["line"] for e in a)


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("{not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object"),
        ('{"answer": "1"}', ":2: field 'prompt'"),
        ('{"prompt": "a", "messages": [], "answer": "1"}', ":2: field 'messages'"),
        ('{"prompt": "", "answer": "1"}', ":2: field 'prompt'"),
        ('{"prompt": "a"}', ":2: field 'answer'"),
        ('{"prompt": "a", "answer": null}', ":2: field 'answer'"),
        ('{"prompt": "a", "answer": ""}', ":2: field 'answer'"),
        ('{"messages": "hi", "answer": "1"}', ":2: field 'messages'"),
        (
            '{"messages": [{"role": "bot", "content": "x"}], "answer": "1"}',
            ":2: field 'messages[0].role'",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}], "answer": "1"}',
            ":2: field 'messages[0].content'",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}',
            ":2: field 'messages[0]'",
        ),
        ('{"prompt": "a", "answer": "1", "split": "dev"}', ":2: field 'split'"),
        (
            '{"prompt": "a", "answer": "1", "id": "dup"}',
            ":2: field 'id': duplicate id 'dup' (first on line 1)",
        ),
        ('{"prompt": "a", "answer": "1", "metadata": [1]}', ":2: field 'metadata'"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, line, where):
    path = write(tmp_path / "bad.jsonl", {"id": "dup", "prompt": "ok", "answer": "1"}, line)
    with pytest.raises(InputError) as err:
        get_task(f"jsonl:{path}")
    assert str(err.value).startswith(f"{path}{where}")
    assert err.value.line == 2


def test_missing_empty_and_split_less_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(InputError, match="no records"):
        get_task(f"jsonl:{write(tmp_path / 'empty.jsonl', '')}")
    only_test = get_task(f"jsonl:{write(tmp_path / 't.jsonl', {'prompt': 'a', 'answer': 1})}")
    with pytest.raises(UserError, match='"split": "train"'):
        only_test.examples(split="train")


def test_bad_rule_and_unknown_task(tmp_path, qa):
    with pytest.raises(UserError, match="bad extraction regex"):
        get_task(f"jsonl:{qa}@regex=(")
    with pytest.raises(UserError, match="unknown task 'nope'"):
        get_task("nope")


def test_non_utf8_file_is_a_one_line_input_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:1: not UTF-8"):
        get_task(f"jsonl:{path}")
