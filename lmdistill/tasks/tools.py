"""Tools a model can call: a JSON-schema declaration plus the Python function that runs it.

    tools = default_tools()                        # calculator, convert_units, lookup
    tools.schemas                                  # OpenAI function-calling schemas, for prompts
    tools.check("calculator", {"expression": 1})   # CallProblem("wrong_type", ...)
    tools.call("calculator", {"expression": "12 * 34"})  # "408"
    tool_subset(["calculator", "lookup"])          # a registry of just those two

A schema is the OpenAI shape `{"type": "function", "function": {"name", "description",
"parameters"}}`, with `parameters` a JSON schema (validated with `jsonschema`, Draft 2020-12).
A call is checked against it before the function runs; a call that breaks it, or a function that
refuses its input, raises `ToolError` (the tool loop hands its message back to the model as the
tool's result, as a real agent runtime would).

The bundled tools run offline and are safe on any input: the calculator walks the expression's
syntax tree (no `eval`) with exact fractions and caps on size, so `9**9**9` or `__import__` are
refused rather than run; unit conversion is a table; lookup reads a small bundled JSON table.
"""

from __future__ import annotations

import ast
import decimal
import functools
import json
import math
import operator
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from typing import Any

import jsonschema

from lmdistill.errors import UserError

ToolSchema = dict[str, Any]

# Why a call is unusable; also the filter's and the metrics' reason names.
UNPARSEABLE = "unparseable"  # not a readable {"name", "arguments"} object
UNKNOWN_TOOL = "unknown_tool"
MISSING_ARGUMENT = "missing_argument"
WRONG_TYPE = "wrong_type"
UNEXPECTED_ARGUMENT = "unexpected_argument"
INVALID_ARGUMENT = "invalid_argument"  # any other schema violation (enum, range, ...)
_REASON_BY_VALIDATOR = {
    "required": MISSING_ARGUMENT,
    "type": WRONG_TYPE,
    "additionalProperties": UNEXPECTED_ARGUMENT,
}


class ToolError(Exception):
    """A call a tool cannot run: `reason` is a short category (above, or "refused" when the
    function itself declines the input), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CallProblem:
    reason: str
    detail: str


@dataclass(frozen=True)
class Tool:
    """A schema and the function it declares, called with the arguments as keywords.

    equivalent: optional (expected arguments, actual arguments) -> bool, for argument accuracy
    where different arguments mean the same call (two calculator expressions with one value);
    by default arguments are compared field by field (see `arguments_match`)."""

    schema: ToolSchema
    fn: Callable[..., Any]
    equivalent: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None
    _validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        function = self.schema.get("function") if isinstance(self.schema, dict) else None
        if self.schema.get("type") != "function" or not isinstance(function, dict):
            raise UserError('a tool schema must be {"type": "function", "function": {...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise UserError("a tool schema needs function.name (a non-empty string)")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise UserError(
                f"tool '{function['name']}': parameters is not a valid JSON schema: {exc.message}"
            ) from None
        object.__setattr__(self, "_validator", jsonschema.Draft202012Validator(parameters))

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]

    def check(self, arguments: Any) -> CallProblem | None:
        """The first way `arguments` break the schema (the most relevant, by jsonschema's
        `best_match`), or None."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        detail = f"{self.name}: {where + ': ' if where else ''}{error.message}"
        return CallProblem(_REASON_BY_VALIDATOR.get(error.validator, INVALID_ARGUMENT), detail)

    def __call__(self, arguments: dict[str, Any]) -> str:
        """Check, then run; the result as text (JSON for anything but a string)."""
        problem = self.check(arguments)
        if problem is not None:
            raise ToolError(problem.reason, problem.detail)
        result = self.fn(**arguments)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


class ToolRegistry:
    """Tools by name."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise UserError(f"two tools are named '{tool.name}'")
            self._tools[tool.name] = tool

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    @property
    def schemas(self) -> list[ToolSchema]:
        return [tool.schema for tool in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def get(self, name: Any) -> Tool | None:
        return self._tools.get(name) if isinstance(name, str) else None

    def __len__(self) -> int:
        return len(self._tools)

    def check(self, name: Any, arguments: Any) -> CallProblem | None:
        """Why the call (`name`, `arguments`) is invalid, or None when it is schema-valid."""
        if not isinstance(name, str) or name not in self._tools:
            known = ", ".join(self._tools) or "none"
            return CallProblem(UNKNOWN_TOOL, f"no tool named {name!r} (tools: {known})")
        return self._tools[name].check(arguments)

    def call(self, name: Any, arguments: Any) -> str:
        """Run a call; ToolError when it is invalid or the tool refuses it."""
        problem = self.check(name, arguments)
        if problem is not None:
            raise ToolError(problem.reason, problem.detail)
        return self._tools[name](arguments)


# ------------------------------------------------------------------------ number formatting
def format_number(value: Fraction | float | int, significant: int = 15) -> str:
    """A number as plain decimal text: integers exactly, others to `significant` digits, no
    exponent and no trailing zeros ("0.1" + "0.2" -> "0.3", 1/3 -> "0.333333333333333")."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    if isinstance(value, int):
        return str(value)
    with decimal.localcontext(prec=significant):
        if isinstance(value, Fraction):
            number = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
        else:
            number = +decimal.Decimal(repr(float(value)))
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# -------------------------------------------------------------------------------- calculator
_MAX_EXPRESSION_CHARS = 200
_MAX_NODES = 100
_MAX_BITS = 2048  # numbers above ~10^616 are refused: nothing real needs them, and pow explodes
_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _refuse(message: str) -> ToolError:
    return ToolError("refused", message)


def _check_size(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise _refuse("the result is too large")
    return value


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _refuse(f"only numbers are allowed, not {node.value!r}")
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise _refuse("the number is not finite")
        # Fraction(repr) keeps the decimal the user wrote: 0.1 is 1/10, not a binary float.
        return _check_size(Fraction(repr(node.value)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1:
                raise _refuse("only whole-number powers are supported")
            bits = max(left.numerator.bit_length(), left.denominator.bit_length())
            if bits * abs(right.numerator) > _MAX_BITS + 64 and abs(left) != 1:
                raise _refuse("the result is too large")
            if left == 0 and right < 0:
                raise _refuse("division by zero")
            return _check_size(left**right.numerator)
        if isinstance(node.op, ast.BitXor):
            raise _refuse("'^' is not a power here; write powers as **")
        apply = _BINARY.get(type(node.op))
        if apply is None:
            raise _refuse(f"operator {type(node.op).__name__} is not supported")
        if isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod) and right == 0:
            raise _refuse("division by zero")
        return _check_size(Fraction(apply(left, right)))
    raise _refuse(f"{type(node).__name__} is not allowed; use numbers, + - * / // % ** and ( )")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, exactly (fractions; 15 significant digits for a
    non-integer result). Refuses anything but numbers, + - * / // % ** and parentheses."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise _refuse(f"the expression is longer than {_MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _refuse(f"not an arithmetic expression: {expression!r}") from None
    if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
        raise _refuse("the expression is too long")
    return format_number(_evaluate(tree.body))


def _same_value(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Two calculator calls are the same call when their expressions have the same value."""
    try:
        return calculate(str(expected["expression"])) == calculate(str(actual["expression"]))
    except (KeyError, ToolError):
        return False


CALCULATOR = Tool(
    schema={
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression exactly, e.g. '48213 * 90817' or "
            "'(3.5 + 2) / 4'. Supports + - * / // % ** and parentheses.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "the expression to evaluate"}
                },
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
    fn=calculate,
    equivalent=_same_value,
)


# ---------------------------------------------------------------------------- unit conversion
# unit -> (dimension, size in the dimension's base unit); exact definitions (NIST SP 811).
UNITS: dict[str, tuple[str, Fraction]] = {
    "m": ("length", Fraction(1)),
    "km": ("length", Fraction(1000)),
    "cm": ("length", Fraction(1, 100)),
    "mm": ("length", Fraction(1, 1000)),
    "mi": ("length", Fraction("1609.344")),
    "yd": ("length", Fraction("0.9144")),
    "ft": ("length", Fraction("0.3048")),
    "in": ("length", Fraction("0.0254")),
    "kg": ("mass", Fraction(1)),
    "g": ("mass", Fraction(1, 1000)),
    "mg": ("mass", Fraction(1, 1_000_000)),
    "t": ("mass", Fraction(1000)),
    "lb": ("mass", Fraction("0.45359237")),
    "oz": ("mass", Fraction("0.45359237") / 16),
    "s": ("time", Fraction(1)),
    "ms": ("time", Fraction(1, 1000)),
    "min": ("time", Fraction(60)),
    "h": ("time", Fraction(3600)),
    "day": ("time", Fraction(86400)),
    "week": ("time", Fraction(604800)),
    "L": ("volume", Fraction(1)),
    "mL": ("volume", Fraction(1, 1000)),
    "gal": ("volume", Fraction("3.785411784")),  # US gallon
    "C": ("temperature", Fraction(1)),
    "F": ("temperature", Fraction(1)),
    "K": ("temperature", Fraction(1)),
}


def _to_kelvin(value: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return value + Fraction("273.15")
    if unit == "F":
        return (value - 32) * Fraction(5, 9) + Fraction("273.15")
    return value


def _from_kelvin(value: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return value - Fraction("273.15")
    if unit == "F":
        return (value - Fraction("273.15")) * Fraction(9, 5) + 32
    return value


def convert(value: float, from_unit: str, to_unit: str) -> Fraction:
    """`value` in `from_unit` expressed in `to_unit`, exactly."""
    if from_unit not in UNITS or to_unit not in UNITS:
        raise _refuse(f"unknown unit; known units: {', '.join(UNITS)}")
    (dimension, size), (to_dimension, to_size) = UNITS[from_unit], UNITS[to_unit]
    if dimension != to_dimension:
        raise _refuse(f"cannot convert {dimension} ({from_unit}) to {to_dimension} ({to_unit})")
    exact = Fraction(repr(float(value)))
    if dimension == "temperature":
        kelvin = _to_kelvin(exact, from_unit)
        if kelvin < 0:
            raise _refuse("that temperature is below absolute zero")
        return _from_kelvin(kelvin, to_unit)
    return exact * size / to_size


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """`value from_unit` in `to_unit`, to 6 significant digits, e.g. "41.0105 ft"."""
    if not math.isfinite(value) or abs(value) > 1e15:
        raise _refuse("the value must be a finite number below 1e15 in size")
    return f"{format_number(convert(value, from_unit, to_unit), 6)} {to_unit}"


CONVERT_UNITS = Tool(
    schema={
        "type": "function",
        "function": {
            "name": "convert_units",
            "description": "Convert a quantity between units of length (m km cm mm mi yd ft in), "
            "mass (kg g mg t lb oz), time (s ms min h day week), volume (L mL gal) or "
            "temperature (C F K).",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number", "description": "the quantity to convert"},
                    "from_unit": {"type": "string", "enum": list(UNITS)},
                    "to_unit": {"type": "string", "enum": list(UNITS)},
                },
                "required": ["value", "from_unit", "to_unit"],
                "additionalProperties": False,
            },
        },
    },
    fn=convert_units,
)


# ------------------------------------------------------------------------------------- lookup
LOOKUP_FIELDS = ("capital", "currency", "population", "continent")
_ALIASES = {
    "usa": "United States",
    "us": "United States",
    "united states of america": "United States",
    "america": "United States",
    "uk": "United Kingdom",
    "great britain": "United Kingdom",
    "britain": "United Kingdom",
    "korea": "South Korea",
    "republic of korea": "South Korea",
    "holland": "Netherlands",
    "the netherlands": "Netherlands",
    "türkiye": "Turkey",
    "viet nam": "Vietnam",
}


@functools.cache
def countries() -> dict[str, dict[str, Any]]:
    """The bundled country table (lmdistill/assets/countries.json): name -> facts."""
    text = resources.files("lmdistill").joinpath("assets/countries.json").read_text("utf-8")
    return json.loads(text)["countries"]


def fold_text(text: str) -> str:
    """Case-, accent- and spacing-insensitive key."""
    text = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in text if not unicodedata.combining(c)).casefold().split())


def find_country(name: str) -> str | None:
    """The table's name for a country as a user might write it, or None."""
    key = fold_text(name).removeprefix("the ")
    if key in _ALIASES:
        return _ALIASES[key]
    return next((c for c in countries() if fold_text(c) == key), None)


def lookup(country: str, field: str) -> str:
    """One fact about a country from the bundled table."""
    found = find_country(country)
    if found is None:
        raise _refuse(f"no country named {country!r} in the table")
    if field not in LOOKUP_FIELDS:
        raise _refuse(f"unknown field {field!r}; fields: {', '.join(LOOKUP_FIELDS)}")
    return str(countries()[found][field])


def _same_lookup(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Two lookups are the same when they name the same country (aliases count) and field."""
    country = actual.get("country")
    return (
        isinstance(country, str)
        and find_country(country) == find_country(str(expected.get("country")))
        and actual.get("field") == expected.get("field")
        and actual.keys() == expected.keys()
    )


LOOKUP = Tool(
    schema={
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up a fact about a country: its capital, currency, population "
            "or continent.",
            "parameters": {
                "type": "object",
                "properties": {
                    "country": {"type": "string", "description": "the country's name"},
                    "field": {"type": "string", "enum": list(LOOKUP_FIELDS)},
                },
                "required": ["country", "field"],
                "additionalProperties": False,
            },
        },
    },
    fn=lookup,
    equivalent=_same_lookup,
)


def default_tools() -> ToolRegistry:
    """The bundled tools: calculator, convert_units, lookup."""
    return ToolRegistry([CALCULATOR, CONVERT_UNITS, LOOKUP])


def tool_subset(names: Iterable[str], tools: ToolRegistry | None = None) -> ToolRegistry:
    """The tools of `tools` (default: the bundled ones) named in `names`, in that order; all of
    them when `names` is empty. UserError naming the first unknown name."""
    tools = tools if tools is not None else default_tools()
    wanted = list(names)
    if not wanted:
        return tools
    unknown = [name for name in wanted if name not in tools]
    if unknown:
        raise UserError(f"unknown tool {unknown[0]!r}; tools: {', '.join(tools.names)}")
    return ToolRegistry([tools[name] for name in wanted])


# ---------------------------------------------------------------------- comparing arguments
def _number(value: Any) -> Fraction | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Fraction(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return Fraction(value.strip().replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def values_match(expected: Any, actual: Any) -> bool:
    """Numbers (or numeric strings) by value; strings ignoring case, accents and whitespace;
    lists and objects element by element."""
    x, y = _number(expected), _number(actual)
    if x is not None and y is not None:
        return x == y or math.isclose(float(x), float(y), rel_tol=1e-9)
    if isinstance(expected, str) and isinstance(actual, str):
        return "".join(fold_text(expected).split()) == "".join(fold_text(actual).split())
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return expected.keys() == actual.keys() and all(
            values_match(expected[k], actual[k]) for k in expected
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            values_match(a, b) for a, b in zip(expected, actual, strict=True)
        )
    return expected == actual


def arguments_match(
    expected: dict[str, Any], actual: dict[str, Any], tool: Tool | None = None
) -> bool:
    """Whether a call's arguments are the expected ones: the tool's own `equivalent` when it
    has one, else the same fields with matching values (`values_match`)."""
    if tool is not None and tool.equivalent is not None:
        return tool.equivalent(expected, actual)
    return values_match(dict(expected), dict(actual))
