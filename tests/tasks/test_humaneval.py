import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmdistill.errors import UserError
from lmdistill.tasks import get_task
from lmdistill.tasks.humaneval import HumanEval


@pytest.fixture(scope="module")
def task() -> HumanEval:
    return HumanEval(timeout_s=10, memory_mb=512)


@pytest.mark.slow
def test_all_164_canonical_solutions_pass(task):
    examples = task.examples()
    assert len(examples) == 164
    start = time.monotonic()
    # Threads are enough: each run is its own process; 2 workers for a 2-core machine.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda e: task.run(e, e.metadata["canonical_solution"]), examples))
    failed = {e.id: r.stderr[-300:] for e, r in zip(examples, results, strict=True) if not r.ok}
    assert failed == {}
    print(f"\n164 canonical HumanEval solutions in {time.monotonic() - start:.1f}s")


def test_wrong_solution_fails(task):
    example = task.examples(limit=1)[0]
    assert task.score(example, "    return None\n") == 0.0
    assert task.score(example, "") == 0.0


def test_wrong_solution_that_hangs_fails_at_the_timeout():
    quick = HumanEval(timeout_s=1)
    example = quick.examples(limit=1)[0]
    assert quick.score(example, "    while True:\n        pass\n") == 0.0


def test_chat_style_whole_function_in_a_fence_passes(task):
    example = next(e for e in task.examples() if e.id == "HumanEval/0")
    response = (
        "Here is the function:\n```python\n"
        "def has_close_elements(numbers, threshold):\n"
        f"{example.metadata['canonical_solution']}\n```\nIt compares every pair."
    )
    assert task.score(example, response) == 1.0


def test_completion_is_cut_at_the_stop_sequences(task):
    example = next(e for e in task.examples() if e.id == "HumanEval/0")
    response = (
        example.metadata["canonical_solution"]
        + "\n\nprint(has_close_elements([], 1))\nassert False\n"
    )
    assert task.score(example, response) == 1.0


def test_examples_are_the_problems_in_order_and_test_only(task):
    examples = task.examples()
    assert [e.id for e in examples[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert "def has_close_elements" in examples[0].messages[0]["content"]
    assert task.examples(limit=5, seed=1) == task.examples(limit=5, seed=1)
    with pytest.raises(UserError, match="only a test split"):
        task.examples(split="train")


def test_registry_name():
    assert isinstance(get_task("humaneval"), HumanEval)
