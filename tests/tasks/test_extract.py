import pytest

from lmdistill.tasks.extract import (
    answers_equal,
    final_number,
    last_number,
    marked_answer,
    normalize_number,
    numbers_equal,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is 1,234 apples", "1,234"),
        ("it drops to -7 degrees", "-7"),
        ("costs $2.50 each", "2.50"),
        ("half is .5", ".5"),
        ("the ratio is 3/4", "3/4"),
        (r"\boxed{\frac{3}{4}}", "3/4"),
        ("5-3=2", "2"),  # the minus after a digit is an operator
        ("x2 and then 5kg", "5"),  # "x2" is a name, "5kg" a number with a unit
        ("1,2,3", "3"),  # a list, not a thousands separator
        ("1,000,000.", "1,000,000"),
        ("−4 with a Unicode minus", "−4"),
        ("no digits here", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1: 2+2=4\nAnswer: 4", "4"),
        ("work\n#### 1,000", "1,000"),
        (r"so we get \boxed{x^{2}+1} at last", "x^{2}+1"),
        ("The answer is 7.", "7"),
        ("The final answer is: Paris", "Paris"),
        ("**Answer:** 12", "12"),
        ("**Answer**: twelve", "twelve"),
        (r"Answer: \boxed{9}", "9"),
        ("Answer: $x = 3$", "x = 3"),
        ("Answer: 1\nwait, no.\nAnswer: 2", "2"),  # the last marker wins
        (r"\boxed{1} ... Final answer: 2", "2"),
        ("Final Answer: The final answer is 5", "5"),
        ("let me answer this question: 5", None),  # prose, not a marker
        ("just 42", None),
    ],
)
def test_marked_answer(text, expected):
    assert marked_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("5.0", "5"),
        ("-0.50", "-0.5"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("$5", "5"),
        ("50%", "50"),
        ("1e3", "1000"),
        ("123456789012345678901234567890.5", "123456789012345678901234567890.5"),
        ("seven", None),
        ("1/0", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("1,000", "1000")
    assert numbers_equal("5.0", "5")
    assert numbers_equal("0.75", "3/4")
    assert not numbers_equal("0.333", "1/3")
    assert not numbers_equal("5", "five")


def test_answers_equal_compares_numbers_by_value_and_text_loosely():
    assert answers_equal("1,000", "1000.0")
    assert answers_equal("  Paris. ", "paris")
    assert not answers_equal("Paris", "London")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("2 + 3 = 5, times 2 is 10.\nAnswer: 10 apples", "10"),
        ("first 3, then 4.0", "4"),  # no marker: the last number
        ("#### 1,234", "1234"),
        ("Answer: unknown, but maybe 7", "7"),
        ("Answer: none", None),
        ("nothing", None),
    ],
)
def test_final_number(response, expected):
    assert final_number(response) == expected
