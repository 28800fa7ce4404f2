"""Find the final answer in a model's response, and compare answers.

last_number("so 1,234 - 5 = -3/4")   -> "-3/4"
marked_answer("... #### 42")          -> "42"
numbers_equal("1,000", "1000.0")      -> True
"""

from __future__ import annotations

import decimal
import math
import re
from fractions import Fraction

# A number: optional minus, digits with optional thousands commas, optional decimals, optionally
# a fraction "3/4". Not preceded by a letter, digit or dot, so "x2" and the "5" of "1.5" are
# not numbers of their own, and a minus right after a digit ("5-3") is an operator.
_NUMBER = re.compile(
    r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)?"
    r"|(?<![\w.])[-−]?\.\d+"
)
_LATEX_FRAC = re.compile(r"\\d?frac\{\s*([^{}]+?)\s*\}\{\s*([^{}]+?)\s*\}")
# "Answer: X", "Final answer: X", "the answer is X", "#### X": the rest of the line. Case-blind.
# "answer" must be followed by ":" or "is", so prose like "let me answer this" is no marker.
_MARKER_LINE = re.compile(
    r"\b(?:final\s+)?answer\**\s*(?:is\b\s*[:=]?|[:=])\s*(?P<a>[^\n]+)"
    r"|^\s*####\s*(?P<b>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_number(text: str) -> str | None:
    """The last number in `text` as written (commas and all), or None.

    Handles negatives ("-3", also the Unicode minus), decimals ("2.50", ".5"), thousands commas
    ("1,234,567") and fractions ("3/4"; LaTeX \\frac{3}{4} too). A number glued to a letter
    ("x2", "3rd") is skipped on the left only: "5kg" gives "5".
    """
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of each \\boxed{...}, matching nested braces."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def marked_answer(text: str) -> str | None:
    """The last explicitly marked final answer, or None when the response marks none.

    Markers: "\\boxed{...}" (MATH, Hendrycks et al. 2021), "#### ..." (GSM8K, Cobbe et al. 2021),
    "Answer: ...", "Final answer: ...", "The answer is ...". The answer is cleaned of markdown
    emphasis, surrounding $...$ and a trailing full stop.
    """
    candidates = _boxed(text)
    for m in _MARKER_LINE.finditer(text):
        candidates.append((m.start(), m.group("a") or m.group("b")))
    if not candidates:
        return None
    answer = _clean(max(candidates, key=lambda c: c[0])[1])
    # "Final Answer: The final answer is 5": the line holds a marker of its own; take the inner one.
    inner = marked_answer(answer) if _MARKER_LINE.search(answer) or _BOXED.search(answer) else None
    return inner or answer or None


def marked_answer_start(text: str) -> int | None:
    """The character offset where the last answer marker (the one `marked_answer` reads)
    begins, or None. Markers on one line count from the first ("Final answer: \\boxed{5}"), and
    a marker that opens its line ("Answer: 5", "**Answer:** 5") from the start of the line."""
    positions = [p for p, _ in _boxed(text)] + [m.start() for m in _MARKER_LINE.finditer(text)]
    if not positions:
        return None
    last = max(positions)
    line_start = text.rfind("\n", 0, last) + 1
    start = min(p for p in positions if p >= line_start)
    return line_start if not text[line_start:start].strip(" \t*_#>-") else start


def _clean(answer: str) -> str:
    answer = answer.strip().strip("*_`").strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    inner = _boxed(answer)
    if inner:  # "Answer: \boxed{5}"
        answer = inner[-1][1].strip()
    return answer.rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number string ("1,000", "-2.50", "3/4", "$5", "50%" as 50), or None."""
    s = text.strip().replace("−", "-").replace(",", "").replace(" ", "")
    s = _LATEX_FRAC.sub(r"\1/\2", s).lstrip("$").rstrip("%").rstrip(".")
    if s.startswith("-$"):
        s = "-" + s[2:]
    numerator, _, denominator = s.partition("/")
    try:
        value = Fraction(numerator)  # accepts "2.50", "-7", "1e3"
        return value / Fraction(denominator) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(text: str) -> str | None:
    """The canonical string of a number: "1,000" -> "1000", "5.0" -> "5", "-0.50" -> "-0.5",
    "3/4" -> "0.75" (exact decimals) or "1/3" (fractions without one). None when not a number."""
    value = parse_number(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # a terminating decimal: write it out exactly (a float would round big ones)
        with decimal.localcontext(prec=len(str(value.numerator)) + len(str(value.denominator))):
            exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
        return format(exact, "f").rstrip("0").rstrip(".")
    return f"{value.numerator}/{value.denominator}"


def numbers_equal(a: str, b: str, *, rel_tol: float = 1e-9) -> bool:
    """Whether two strings are the same number: exact for fractions and decimals, and within
    `rel_tol` (so "0.3333333333" does not equal 1/3, but float round-off does not count)."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return x == y or math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=0.0)


def normalize_text(text: str) -> str:
    """For exact-answer comparison: case, surrounding whitespace and quotes, runs of spaces and a
    trailing full stop do not count."""
    text = " ".join(text.split()).strip().strip("\"'`").strip().rstrip(".").strip()
    return text.casefold()


def answers_equal(answer: str, reference: str) -> bool:
    """Numbers compare by value when both sides are numbers; anything else as normalised text."""
    if parse_number(answer) is not None and parse_number(reference) is not None:
        return numbers_equal(answer, reference)
    return normalize_text(answer) == normalize_text(reference)


def final_number(response: str) -> str | None:
    """The numeric final answer: the last number inside the marked answer when there is one
    ("Answer: 42 apples"), otherwise the last number in the whole response. Canonical form."""
    marked = marked_answer(response)
    number = last_number(marked) if marked else None
    if number is None:
        number = last_number(response)
    return normalize_number(number) if number is not None else None
