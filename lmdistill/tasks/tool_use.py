"""`tool_use`: questions a small model can only answer right by calling a tool.

Procedurally generated, in three kinds (taken in turn):

  multiply  "What is 48213 * 907?"  -> calculator {"expression": "48213 * 907"}
            (4-6 digits times 3-5 digits: beyond a small model's mental arithmetic)
  convert   "How many feet are in 12.5 meters?" -> convert_units {"value": 12.5,
            "from_unit": "m", "to_unit": "ft"}
  lookup    "What is the capital of Kenya?" -> lookup {"country": "Kenya", "field": "capital"}
            (facts from the bundled table lmdistill/assets/countries.json; 36 countries x 4
            fields, so this kind runs out of fresh questions after ~100 train / ~40 test)

Each example's `metadata` holds the kind and the `expected_call` ({"name", "arguments"}) that
the tool-use metrics compare against; `reference` is the final answer, computed by the same
tools. A question belongs to `test` or `train` by a hash of its text, so the splits never share
one, whatever the seed and limit.

Scoring the final answer (the marked answer, "Answer: ...", when there is one, else the whole
response): numbers by value within 0.1% (a conversion rounded to a few decimals is right;
"125.7 million" counts as 125700000), exact for products; text answers (capital, currency,
continent) when the reference appears in the answer as whole words, ignoring case, accents and
punctuation ("The capital of Kenya is Nairobi." is right).

The prompts do not carry the tools: run them through the tool loop (the `tool-use` evaluation
task, `lmdistill.eval.tool_use`; `lmdistill.skills.tool_use.evaluate_tool_use` /
`generate_tool_traces`), which adds the tool schemas and executes the calls. A plain single-turn
evaluation of this task (`--tasks tool_use`) measures answering without tools.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from fractions import Fraction
from typing import Any

from lmdistill.tasks.base import Example, Split, Task, check_limit, check_split
from lmdistill.tasks.extract import marked_answer, parse_number
from lmdistill.tasks.tools import (
    LOOKUP_FIELDS,
    ToolRegistry,
    calculate,
    convert_units,
    countries,
    default_tools,
    fold_text,
    lookup,
)

KINDS = ("multiply", "convert", "lookup")
DEFAULT_SIZE = 300  # examples returned when no limit is given (the generator is endless)
TEST_FRACTION = 0.3
INSTRUCTION = (
    "Use a tool to find the answer, then give the final answer on its own line as "
    '"Answer: <answer>".'
)
# unit -> (singular, plural) as a question writes it
_UNIT_NAMES = {
    "m": ("meter", "meters"),
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "in": ("inch", "inches"),
    "kg": ("kilogram", "kilograms"),
    "g": ("gram", "grams"),
    "lb": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "min": ("minute", "minutes"),
    "h": ("hour", "hours"),
    "day": ("day", "days"),
    "week": ("week", "weeks"),
    "L": ("liter", "liters"),
    "gal": ("gallon", "gallons"),
    "C": ("degree Celsius", "degrees Celsius"),
    "F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "K": ("kelvin", "kelvins"),
}
_GROUPS = [
    ["m", "km", "cm", "mi", "ft", "in"],
    ["kg", "g", "lb", "oz"],
    ["min", "h", "day", "week"],
    ["L", "gal"],
    ["C", "F", "K"],
]
_FIELD_QUESTIONS = {
    "capital": "What is the capital of {country}?",
    "currency": "What currency is used in {country}?",
    "population": "What is the population of {country}?",
    "continent": "On which continent is {country}?",
}
_SCALE = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*(thousand|million|billion)\b", re.IGNORECASE)
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}


def _make(rng: random.Random, kind: str) -> tuple[str, dict[str, Any], str]:
    """(question, expected call, reference answer) of one fresh question of `kind`."""
    if kind == "multiply":
        a, b = rng.randint(1000, 999_999), rng.randint(100, 99_999)
        template = rng.choice(
            ["What is {a} * {b}?", "What is {a} times {b}?", "Compute {a} × {b}."]
        )
        arguments: dict[str, Any] = {"expression": f"{a} * {b}"}
        return (
            template.format(a=a, b=b),
            {"name": "calculator", "arguments": arguments},
            (calculate(arguments["expression"])),
        )
    if kind == "convert":
        source, target = rng.sample(rng.choice(_GROUPS), 2)
        low = -40 if source in ("C", "F") else 1
        value = round(rng.uniform(low, 500), 1)
        if source == "K":
            value = round(rng.uniform(200, 400), 1)
        if _UNIT_NAMES[source][0].startswith("degree") or source == "K":
            question = f"What is {value} {_UNIT_NAMES[source][1]} in {_UNIT_NAMES[target][1]}?"
        else:
            question = f"How many {_UNIT_NAMES[target][1]} are in {value} {_UNIT_NAMES[source][1]}?"
        arguments = {"value": value, "from_unit": source, "to_unit": target}
        answer = convert_units(value, source, target).split()[0]
        return question, {"name": "convert_units", "arguments": arguments}, answer
    country = rng.choice(sorted(countries()))
    field = rng.choice(LOOKUP_FIELDS)
    arguments = {"country": country, "field": field}
    question = _FIELD_QUESTIONS[field].format(country=country)
    return question, {"name": "lookup", "arguments": arguments}, lookup(country, field)


def split_of(question: str) -> Split:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def _scaled_number(text: str) -> Fraction | None:
    """The last number of `text`, times its scale word ("125.7 million")."""
    matches = list(_SCALE.finditer(text))
    if matches:
        value = parse_number(matches[-1].group(1))
        if value is not None:
            return value * _SCALES[matches[-1].group(2).lower()]
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return parse_number(numbers[-1]) if numbers else None


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", fold_text(text)).split())


class ToolUseTask(Task):
    """Questions that need one tool call (see the module doc)."""

    name = "tool_use"

    def __init__(self, kinds: tuple[str, ...] = KINDS) -> None:
        unknown = set(kinds) - set(KINDS)
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        self.kinds = kinds
        self.tools: ToolRegistry = default_tools()

    def examples(
        self, *, split: Split = "test", limit: int | None = None, seed: int = 0
    ) -> list[Example]:
        check_split(self.name, split)
        check_limit(limit)
        wanted = DEFAULT_SIZE if limit is None else limit
        rng = random.Random(f"tool_use/{seed}")
        seen: set[str] = set()
        out: list[Example] = []
        # A kind that runs out of fresh questions (lookup) stops being asked after enough misses.
        misses = dict.fromkeys(self.kinds, 0)
        turn = 0
        while len(out) < wanted and any(m < 200 for m in misses.values()):
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            if misses[kind] >= 200:
                continue
            question, call, reference = _make(rng, kind)
            if question in seen or split_of(question) != split:
                misses[kind] += question in seen
                continue
            seen.add(question)
            digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]
            out.append(
                Example(
                    id=f"tool_use/{digest}",
                    messages=[{"role": "user", "content": f"{question}\n{INSTRUCTION}"}],
                    reference=reference,
                    metadata={"kind": kind, "question": question, "expected_call": call},
                )
            )
        return out

    def extract(self, response: str) -> str | None:
        return marked_answer(response) or response.strip() or None

    def score(self, example: Example, response: str) -> float:
        answer = self.extract(response)
        if answer is None:
            return 0.0
        reference = str(example.reference)
        expected = parse_number(reference)
        if expected is None:  # a text fact: the reference's words inside the answer
            ref, ans = _words(reference), _words(answer)
            return float(bool(ref) and f" {ref} " in f" {ans} ")
        value = _scaled_number(answer)
        if value is None:
            return 0.0
        if example.metadata.get("kind") == "multiply":
            return float(value == expected)
        return float(math.isclose(float(value), float(expected), rel_tol=1e-3, abs_tol=1e-6))
