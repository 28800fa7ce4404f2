import dataclasses
import json

import pytest

from lmdistill.errors import UserError
from lmdistill.tasks import Example, get_task
from lmdistill.tasks.reasoning_gym import BUILTIN, ReasoningGymTask

GYM_TASKS = sorted(BUILTIN)


@pytest.mark.parametrize("name", GYM_TASKS)
def test_examples_are_deterministic_and_seed_dependent(name):
    task = get_task(name)
    first = task.examples(limit=4, seed=1)
    assert first == get_task(name).examples(limit=4, seed=1)
    assert [e.id for e in first] != [e.id for e in task.examples(limit=4, seed=2)]
    assert len({e.id for e in first}) == 4


@pytest.mark.parametrize("name", GYM_TASKS)
def test_train_and_test_never_share_a_question(name):
    task = get_task(name)
    test = {e.metadata["question"] for e in task.examples(split="test", limit=20, seed=0)}
    train = {e.metadata["question"] for e in task.examples(split="train", limit=20, seed=0)}
    train |= {e.metadata["question"] for e in task.examples(split="train", limit=20, seed=1)}
    assert len(test) == 20 and not test & train


@pytest.mark.parametrize("name", GYM_TASKS)
def test_correct_answer_scores_one_and_wrong_scores_zero(name):
    task = get_task(name)
    for example in task.examples(limit=3, seed=0):
        correct = f"Let me work it out step by step.\nAnswer: {example.reference}"
        assert task.score(example, correct) == 1.0, (example.id, correct)
        assert task.score(example, "Answer: 987654") == 0.0
        assert task.score(example, "") == 0.0


def test_prompt_asks_for_reasoning_and_a_marked_answer():
    (example,) = get_task("gsm_symbolic").examples(limit=1)
    assert example.messages[0]["role"] == "user"
    assert "step by step" in example.messages[0]["content"]
    assert "Answer: <number>" in example.messages[0]["content"]


def test_number_tasks_fall_back_to_the_last_number_and_normalise():
    task = get_task("arithmetic")
    example = task.examples(limit=1)[0]
    ref = int(example.reference)
    assert task.score(example, f"I think it is {ref:,}.0") == 1.0
    assert task.extract(f"working: 1 + 2 = 3 ... so {ref}") == str(ref)


def test_partial_credit_is_off_by_default():
    # basic_arithmetic's own scorer gives len(oracle)/len(answer) when the oracle is a
    # substring of the answer: "30" for "3" would score 0.5.
    binary = get_task("arithmetic_1digit")
    example = next(e for e in binary.examples(limit=50) if e.reference in "123456789")
    wrong = f"Answer: {example.reference}0"
    assert binary.score(example, wrong) == 0.0
    shaped = ReasoningGymTask("shaped", BUILTIN["arithmetic_1digit"], partial_credit=True)
    assert 0.0 < shaped.score(example, wrong) < 1.0


def test_examples_survive_json_and_still_score():
    task = get_task("countdown")  # its scorer reads the entry's metadata, not only the answer
    example = task.examples(limit=1)[0]
    copy = Example(**json.loads(json.dumps(dataclasses.asdict(example))))
    assert task.score(copy, f"Answer: {example.reference}") == 1.0


def test_small_question_space_runs_out_with_a_clear_error():
    with pytest.raises(UserError, match="distinct"):
        get_task("arithmetic_1digit").examples(limit=5000)


def test_any_reasoning_gym_dataset_by_name():
    task = get_task("rg:lcm")
    example = task.examples(limit=1)[0]
    assert task.score(example, f"Answer: {example.reference}") == 1.0
    with pytest.raises(UserError, match="no dataset"):
        get_task("rg:no_such_dataset")
