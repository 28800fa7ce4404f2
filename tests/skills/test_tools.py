"""Tool use: the tools, schema checks, the text format, loss masks, the loop, filter and metrics
(lmdistill.tasks.tools, lmdistill.skills.tool_use, lmdistill.data.tool_format)."""

from __future__ import annotations

import json

import pytest
from tiny import CHAT_TEMPLATE, make_tiny_model, make_tokenizer, save_tiny_model_dir

from lmdistill.data.sft import IGNORE_INDEX, Conversation, conversation, encode, load_examples
from lmdistill.data.tool_format import (
    parse_tool_calls,
    plain_messages,
    supports_native_tools,
)
from lmdistill.errors import InputError, UserError
from lmdistill.skills.tool_use import (
    evaluate_tool_use,
    filter_tool_traces,
    generate_tool_traces,
    run_tool_loop,
    run_tool_loops,
    tool_metrics,
)
from lmdistill.tasks.registry import get_task
from lmdistill.tasks.tool_use import ToolUseTask
from lmdistill.tasks.tools import (
    Tool,
    ToolError,
    arguments_match,
    calculate,
    convert_units,
    default_tools,
    lookup,
    tool_subset,
)
from lmdistill.teachers.base import SamplingParams
from lmdistill.teachers.local import HFTeacher
from lmdistill.teachers.registry import load_teacher

TOOLS = default_tools()

# A ChatML template with native tool support, written like Qwen2.5's: tools in the system turn,
# calls as <tool_call> JSON, results in a "tool" turn.
NATIVE_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:\\n' }}"
    "{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\\n' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def call(name, arguments, call_id="call_0_0", raw=None):
    text = raw if raw is not None else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def trace(calls, answer="Answer: 408", *, status="ok", expected=None, reference="408", **extra):
    """A hand-written trace: one assistant turn per call (with its result), then the answer."""
    messages = [{"role": "user", "content": "What is 12 * 34?"}]
    for i, c in enumerate(calls):
        messages.append({"role": "assistant", "content": "", "tool_calls": [c]})
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    expected = expected or {"name": "calculator", "arguments": {"expression": "12 * 34"}}
    return {
        "id": "t",
        "tools": TOOLS.schemas,
        "messages": messages,
        "reference": reference,
        "metadata": {"kind": "multiply", "expected_call": expected},
        "status": status,
        "error": "",
        **extra,
    }


TOOL_RECORD = {
    "tools": TOOLS.schemas,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 * 34?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("calculator", {"expression": "12 * 34"})],
        },
        {"role": "tool", "tool_call_id": "call_0_0", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "Answer: 408"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# -------------------------------------------------------------------------------- the tools
def test_calculator_is_exact():
    assert calculate("48213 * 90817") == str(48213 * 90817)
    assert calculate("0.1 + 0.2") == "0.3"  # exact decimals, not binary floats
    assert calculate("(3.5 + 2) / 4") == "1.375"
    assert calculate("2 ** 100") == str(2**100)
    assert calculate("7 × 6 ÷ 3") == "14"


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",
        "().__class__.__bases__",
        "open('/etc/passwd')",
        "lambda: 1",
        "x + 1",
        "9 ** 9 ** 9",  # would take forever and all memory
        "10 ** 1000",
        "1 / 0",
        "2 ^ 10",
        "1" * 300,
        "True + 1",
    ],
)
def test_calculator_refuses_unsafe_or_huge_input(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_convert_units_and_lookup_run_offline():
    assert convert_units(12.5, "m", "ft") == "41.0105 ft"
    assert convert_units(100, "C", "F") == "212 F"
    assert convert_units(1, "week", "h") == "168 h"
    with pytest.raises(ToolError, match="cannot convert"):
        convert_units(1, "kg", "m")
    with pytest.raises(ToolError, match="absolute zero"):
        convert_units(-500, "C", "K")
    assert lookup("kenya", "capital") == "Nairobi"
    assert lookup("USA", "currency") == "United States dollar"
    with pytest.raises(ToolError, match="no country"):
        lookup("Atlantis", "capital")


@pytest.mark.parametrize(
    ("name", "arguments", "reason"),
    [
        ("calculator", {"expression": "1 + 1"}, None),
        ("search_web", {"query": "x"}, "unknown_tool"),
        ("calculator", {}, "missing_argument"),
        ("calculator", {"expression": 12}, "wrong_type"),
        ("convert_units", {"value": "12", "from_unit": "m", "to_unit": "ft"}, "wrong_type"),
        ("convert_units", {"value": 1, "from_unit": "meters", "to_unit": "ft"}, "invalid_argument"),
        ("lookup", {"country": "Kenya", "field": "capital", "x": 1}, "unexpected_argument"),
        ("calculator", ["1 + 1"], "wrong_type"),
    ],
)
def test_calls_are_checked_against_the_schema(name, arguments, reason):
    problem = TOOLS.check(name, arguments)
    assert (problem.reason if problem else None) == reason
    if reason is not None:
        with pytest.raises(ToolError):
            TOOLS.call(name, arguments)


def test_a_tool_needs_a_function_schema_with_a_valid_json_schema():
    with pytest.raises(UserError, match="not a valid JSON schema"):
        Tool({"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}, print)
    with pytest.raises(UserError, match=r"function\.name"):
        Tool({"type": "function", "function": {"description": "no name"}}, print)


def test_arguments_compare_numbers_by_value_and_expressions_by_result():
    expected = {"value": 12.5, "from_unit": "m", "to_unit": "ft"}
    assert arguments_match(expected, {"value": 12.50, "from_unit": "m", "to_unit": "ft"})
    assert arguments_match(expected, {"value": "12.5", "from_unit": "M", "to_unit": "ft"})
    assert not arguments_match(expected, {"value": 12.6, "from_unit": "m", "to_unit": "ft"})
    calc = TOOLS["calculator"]
    assert arguments_match({"expression": "12 * 34"}, {"expression": "34*12"}, calc)
    assert not arguments_match({"expression": "12 * 34"}, {"expression": "12 + 34"}, calc)
    assert arguments_match(
        {"country": "United States", "field": "capital"},
        {"country": "USA", "field": "capital"},
        TOOLS["lookup"],
    )


# ------------------------------------------------------------------------------- the format
@pytest.mark.parametrize(
    ("reply", "calls", "errors"),
    [
        ("Answer: 5", [], 0),
        ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}\n</tool_call>',
         [("calculator", {"expression": "1"})], 0),
        # arguments as a JSON string (OpenAI), an unclosed last block, Llama's bare JSON
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', [("f", {"a": 1})], 0),
        ('<tool_call>{"name": "f", "arguments": {}}', [("f", {})], 0),
        ('{"name": "f", "parameters": {"a": 2}}', [("f", {"a": 2})], 0),
        ("<tool_call>calculator(1+1)</tool_call>", [], 1),
        ('<tool_call>{"arguments": {}}</tool_call>', [], 1),
        # a result the model invented after its call is ignored
        ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_response>9</tool_response>'
         '<tool_call>{"name": "g", "arguments": {}}</tool_call>', [("f", {})], 0),
    ],
)  # fmt: skip
def test_parse_tool_calls(reply, calls, errors):
    parsed = parse_tool_calls(reply)
    assert parsed.calls == calls
    assert len(parsed.errors) == errors


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, SMOLLM2_TEMPLATE])
def test_templates_that_ignore_tools_are_not_native(tokenizer, template):
    tok = make_tokenizer()
    tok.chat_template = template
    assert not supports_native_tools(tok)


def test_a_template_that_renders_tools_is_native():
    tok = make_tokenizer()
    tok.chat_template = NATIVE_TEMPLATE
    assert supports_native_tools(tok)


def loss_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.targets if t != IGNORE_INDEX])


def assert_loss_only_on(tokenizer, example, assistant_texts):
    """Token by token: a token carries the loss iff it lies inside one of the assistant turns
    (located in the rendered text independently of the code under test)."""
    text = tokenizer.decode(example.input_ids)
    spans, start = [], 0
    for piece in assistant_texts:
        lo = text.index(piece, start)
        spans.append((lo, lo + len(piece)))
        start = lo + len(piece)
    offset = 0
    for t, token in enumerate(example.input_ids):
        piece = tokenizer.decode([token])
        inside = any(lo <= offset < hi for lo, hi in spans)
        # targets[t - 1] is the loss of predicting token t
        carries = t > 0 and example.targets[t - 1] != IGNORE_INDEX
        assert carries == inside, (t, piece, offset)
        offset += len(piece)


def test_fallback_puts_the_loss_on_calls_and_answers_never_on_results(tokenizer):
    messages = conversation(TOOL_RECORD, "data.jsonl", 1)
    assert isinstance(messages, Conversation) and messages.tools == TOOLS.schemas
    example = encode(tokenizer, messages, max_length=4096, index=0)
    call_text = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call>'
    )
    assert loss_text(tokenizer, example) == f"{call_text}<|im_end|>Answer: 408<|im_end|>"
    assert_loss_only_on(tokenizer, example, [f"{call_text}<|im_end|>", "Answer: 408<|im_end|>"])
    text = tokenizer.decode(example.input_ids)
    assert "<tool_response>\n408\n</tool_response>" in text  # the result is prompt, not target
    assert '"name": "lookup"' in text  # the schemas are in the system turn


def test_native_template_puts_the_loss_on_calls_and_answers_never_on_results():
    tok = make_tokenizer()
    tok.chat_template = NATIVE_TEMPLATE
    example = encode(tok, conversation(TOOL_RECORD, "data.jsonl", 1), max_length=4096, index=0)
    text = tok.decode(example.input_ids)
    assert "<|im_start|>tool\n408<|im_end|>" in text  # rendered by the template itself
    assert "<tool_response>" not in text
    call_text = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call>'
    )
    assert loss_text(tok, example) == f"{call_text}<|im_end|>Answer: 408<|im_end|>"
    assert_loss_only_on(tok, example, [f"{call_text}<|im_end|>", "Answer: 408<|im_end|>"])


def test_two_results_share_one_user_turn_in_the_fallback():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call("a", {}), call("b", {}, "c2")]},
        {"role": "tool", "tool_call_id": "call_0_0", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
    ]
    plain = plain_messages(messages, None)
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    assert plain[1]["content"].count("<tool_call>") == 2
    assert plain[2]["content"].count("<tool_response>") == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.update(tools="calculator"), "tools"),
        (lambda r: r.update(tools=[{"name": "calculator"}]), "tools[0]"),
        (lambda r: r["messages"][2].update(tool_calls={"name": "x"}), "messages[2].tool_calls"),
        (
            lambda r: r["messages"][2].update(tool_calls=[{"name": "x"}]),
            "messages[2].tool_calls[0]",
        ),
        (lambda r: r["messages"][3].update(content=None), "messages[3].content"),
    ],
)
def test_conversation_names_the_bad_field_of_a_tool_record(change, field):
    record = json.loads(json.dumps(TOOL_RECORD))
    change(record)
    with pytest.raises(InputError) as info:
        conversation(record, "data.jsonl", 7)
    assert info.value.line == 7 and info.value.field == field


# --------------------------------------------------------------------------------- the loop
def oracle(examples):
    """A perfect tool user: the expected call, then the tool's result as the answer."""
    by_question = {ex.messages[0]["content"]: ex for ex in examples}

    def generate(chats):
        replies = []
        for chat in chats:
            ex = by_question[next(m["content"] for m in chat if m["role"] == "user")]
            last = chat[-1]["content"]
            if last.startswith("<tool_response>"):
                result = last.splitlines()[1]
                replies.append(f"The tool says so.\nAnswer: {result}")
            else:
                body = json.dumps(ex.metadata["expected_call"])
                replies.append(f"Let me use a tool.\n<tool_call>\n{body}\n</tool_call>")
        return replies

    return generate


def test_the_loop_runs_the_real_tools_and_reaches_the_answer():
    task = ToolUseTask()
    examples = task.examples(split="train", limit=6)
    traces = run_tool_loops(oracle(examples), examples, TOOLS)
    for ex, t in zip(examples, traces, strict=True):
        assert t["status"] == "ok"
        roles = [m["role"] for m in t["messages"]]
        assert roles == ["user", "assistant", "tool", "assistant"]
        expected = ex.metadata["expected_call"]
        result = TOOLS.call(expected["name"], expected["arguments"])
        assert t["messages"][2]["content"] == result
        assert t["messages"][1]["content"] == "Let me use a tool."
        assert task.score(ex, t["messages"][-1]["content"]) == 1.0
    metrics = tool_metrics(traces, TOOLS, task.score)
    assert (metrics.call_validity, metrics.tool_name_accuracy) == (1.0, 1.0)
    assert (metrics.argument_accuracy, metrics.final_answer_accuracy) == (1.0, 1.0)


def test_the_loop_answers_invalid_calls_with_an_error_and_stops_at_max_turns():
    ex = ToolUseTask().examples(split="train", limit=1)[0]

    def always_bad(chats):
        return ['<tool_call>{"name": "calculator", "arguments": {}}</tool_call>'] * len(chats)

    t = run_tool_loop(always_bad, ex, TOOLS, max_turns=2)
    assert t["status"] == "max_turns"
    results = [m["content"] for m in t["messages"] if m["role"] == "tool"]
    assert len(results) == 2 and all(r.startswith("error: calculator") for r in results)
    garbled = run_tool_loop(lambda chats: ["<tool_call>calc(1)"] * len(chats), ex, TOOLS)
    assert garbled["status"] == "unparseable_call" and "not JSON" in garbled["error"]


# ------------------------------------------------------------------------ filter and metrics
CALC = {"expression": "12 * 34"}


def test_the_filter_drops_invalid_calls_with_reasons(tmp_path):
    traces = [
        trace([call("calculator", CALC)]),  # kept
        trace([call("calculator", CALC)], answer="Answer: 407"),  # wrong answer
        trace([call("search", {"q": "x"})]),
        trace([call("calculator", {})]),
        trace([call("calculator", {"expression": 5})]),
        trace([call("calculator", {}, raw="{not json")]),
        trace([], answer="<tool_call>calc</tool_call>", status="unparseable_call"),
        trace([], answer="Answer: 408"),  # no call: a guess, not tool use
        trace([call("calculator", CALC)], answer=None, status="max_turns"),
    ]
    source = tmp_path / "traces.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in traces))
    stats = filter_tool_traces(source, tmp_path / "clean.jsonl", TOOLS, task=ToolUseTask())
    assert stats.read == 9 and stats.kept == 1
    assert stats.dropped == {
        "wrong_answer": 1,
        "unknown_tool": 1,
        "missing_argument": 1,
        "wrong_type": 1,
        "unparseable": 2,
        "no_tool_call": 1,
        "no_final_answer": 1,
    }
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert kept == traces[:1]
    loose = filter_tool_traces(source, tmp_path / "loose.jsonl", TOOLS, require_call=False)
    assert loose.kept == 3  # right and wrong answer after a call, and the answer without one


def test_filtered_traces_load_as_training_data(tmp_path, tokenizer):
    source = tmp_path / "traces.jsonl"
    source.write_text(json.dumps(trace([call("calculator", CALC)], split="train")) + "\n")
    filter_tool_traces(source, tmp_path / "clean.jsonl", TOOLS)
    data = load_examples(tmp_path / "clean.jsonl", tokenizer, max_length=4096, split="train")
    trained = loss_text(tokenizer, data.examples[0])
    assert trained.startswith("<tool_call>") and trained.endswith("Answer: 408<|im_end|>")
    assert "result 0" not in trained


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"messages": "hi"}', "messages"),
        ('{"messages": [{"content": "x"}]}', "messages[0]"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        ('{"messages": [{"role": "assistant", "content": "", "tool_calls": {}}]}',
         "messages[0].tool_calls"),
    ],
)  # fmt: skip
def test_a_bad_trace_line_names_file_line_and_field(tmp_path, line, field):
    source = tmp_path / "traces.jsonl"
    source.write_text(json.dumps(trace([call("calculator", CALC)])) + "\n" + line + "\n")
    with pytest.raises(InputError) as info:
        filter_tool_traces(source, tmp_path / "out.jsonl", TOOLS)
    assert (info.value.path, info.value.line, info.value.field) == (str(source), 2, field)
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_the_four_metrics_on_hand_written_traces():
    score = ToolUseTask().score
    traces = [
        trace([call("calculator", CALC)]),  # all four right
        trace([call("calculator", {"expression": "34*12"})], answer="Answer: 400"),  # wrong answer
        trace([call("calculator", {"expression": "12 + 34"})], answer="Answer: 46"),  # wrong args
        trace([call("lookup", {"country": "Kenya", "field": "capital"})], answer="Answer: 408"),
        trace([call("calculator", {"expression": 12})]),  # invalid call, right name, answer right
        trace([], answer="Answer: 408"),  # no call at all
        trace([], answer="<tool_call>oops", status="unparseable_call"),
        trace([call("calculator", CALC)], answer=None, status="max_turns"),
    ]
    m = tool_metrics(traces, TOOLS, score)
    assert m.n == 8
    assert m.call_validity == pytest.approx(5 / 8)  # 1, 2, 3, 4, 8
    assert m.tool_name_accuracy == pytest.approx(5 / 8)  # 1, 2, 3, 5, 8
    assert m.argument_accuracy == pytest.approx(3 / 8)  # 1, 2 (same value), 8
    assert m.final_answer_accuracy == pytest.approx(4 / 8)  # 1, 4, 5, 6
    assert m.statuses == {"ok": 6, "unparseable_call": 1, "max_turns": 1}
    assert m.problems == {
        "wrong_type": 1,
        "no_tool_call": 1,
        "unparseable": 1,
        "no_final_answer": 1,
    }
    empty = tool_metrics([], TOOLS, score)
    assert empty.n == 0 and empty.call_validity == 0.0


# ------------------------------------------------------------------------------------ task
def test_the_task_splits_are_disjoint_and_reproducible():
    task = get_task("tool_use")
    train = task.examples(split="train", limit=60, seed=3)
    test = task.examples(split="test", limit=60, seed=3)
    assert not {e.id for e in train} & {e.id for e in test}
    assert [e.id for e in test] == [e.id for e in task.examples(split="test", limit=60, seed=3)]
    assert {e.metadata["kind"] for e in test} == {"multiply", "convert", "lookup"}
    for ex in test:
        expected = ex.metadata["expected_call"]
        assert TOOLS.check(expected["name"], expected["arguments"]) is None


@pytest.mark.parametrize(
    ("kind", "reference", "response", "score"),
    [
        ("multiply", "4378560021", "The product is 4,378,560,021.", 1.0),
        ("multiply", "4378560021", "Answer: 4378560020", 0.0),
        ("convert", "41.0105", "Answer: 41.01 feet", 1.0),
        ("convert", "41.0105", "Answer: 40.9", 0.0),
        ("lookup", "55100000", "Answer: about 55.1 million people", 1.0),
        ("lookup", "Nairobi", "The capital of Kenya is Nairobi.", 1.0),
        ("lookup", "Brasília", "Answer: brasilia", 1.0),
        ("lookup", "Washington, D.C.", "Answer: Washington DC", 1.0),
        ("lookup", "Nairobi", "Answer: Mombasa", 0.0),
        ("lookup", "Euro", "Answer: Europe", 0.0),
    ],
)
def test_the_task_scores_final_answers(kind, reference, response, score):
    from lmdistill.tasks.base import Example

    ex = Example("x", [], reference, {"kind": kind})
    assert ToolUseTask().score(ex, response) == score


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_on_a_tiny_model(tmp_path):
    """A random tiny model makes no valid call; the loop must still end, record why, and the
    metrics must be computed."""
    tok = make_tokenizer()
    model = make_tiny_model(tok)
    model.config.max_position_embeddings = 4096  # the tool prompt is ~1,900 tiny-BPE tokens
    teacher = HFTeacher(model, tokenizer=tok, name="tiny")
    task = ToolUseTask()
    params = SamplingParams(max_tokens=12)
    statuses = generate_tool_traces(
        teacher, task, tmp_path / "traces.jsonl", limit=3, max_turns=2, params=params
    )
    assert sum(statuses.values()) == 3
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert all(t["status"] in ("ok", "unparseable_call", "max_turns") for t in traces)
    assert all(t["split"] == "train" and t["task"] == "tool_use" for t in traces)
    assert all(t["messages"][1]["role"] == "assistant" for t in traces)
    stats = filter_tool_traces(tmp_path / "traces.jsonl", tmp_path / "clean.jsonl", TOOLS)
    assert stats.read == 3 and stats.kept + sum(stats.dropped.values()) == 3
    metrics = evaluate_tool_use(
        teacher, task, limit=2, max_turns=2, params=params, traces_path=tmp_path / "eval.jsonl"
    )
    assert metrics.n == 2
    assert 0.0 <= metrics.call_validity <= 1.0 and metrics.final_answer_accuracy == 0.0
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2


def test_a_prompt_longer_than_the_context_is_recorded_not_raised(tmp_path):
    teacher = load_teacher(str(save_tiny_model_dir(tmp_path / "model")))  # 256 positions
    metrics = evaluate_tool_use(teacher, limit=2, params=SamplingParams(max_tokens=4))
    assert metrics.statuses == {"generation_failed": 2}
    assert metrics.problems == {"generation_failed": 2}
    assert metrics.call_validity == 0.0


# ---------------------------------------------------------------- resuming trace generation
def interrupting(examples, asked, fail_on=None):
    """The oracle, noting each question it is asked in `asked`; it raises (a crash) when asked
    `fail_on`. Every call of this factory makes a function of the same name (the same teacher)."""
    answer = oracle(examples)

    def generate(chats):
        questions = [next(m["content"] for m in chat if m["role"] == "user") for chat in chats]
        if fail_on in questions:
            raise RuntimeError("the teacher crashed")
        asked.update(questions)
        return answer(chats)

    return generate


def test_an_interrupted_run_keeps_its_traces_and_a_rerun_makes_only_the_rest(tmp_path):
    task = ToolUseTask()
    examples = task.examples(split="train", limit=6)
    whole, out = tmp_path / "whole.jsonl", tmp_path / "traces.jsonl"
    generate_tool_traces(interrupting(examples, set()), task, whole, limit=6, chunk_size=2)

    with pytest.raises(RuntimeError, match="crashed"):  # dies in the third chunk
        generate_tool_traces(
            interrupting(examples, set(), fail_on=examples[4].messages[0]["content"]),
            task,
            out,
            limit=6,
            chunk_size=2,
        )
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == [ex.id for ex in examples[:4]]  # the finished chunks are on disk

    asked: set[str] = set()
    counts = generate_tool_traces(interrupting(examples, asked), task, out, limit=6, chunk_size=2)
    assert asked == {ex.messages[0]["content"] for ex in examples[4:]}
    assert counts == {"ok": 6}
    assert out.read_text() == whole.read_text()  # same ids, same traces, once each

    text = out.read_text()  # a crash mid-write of the last trace
    out.write_text(text[: text.rstrip("\n").rfind("\n") + 30])
    asked.clear()
    generate_tool_traces(interrupting(examples, asked), task, out, limit=6, chunk_size=2)
    assert asked == {examples[5].messages[0]["content"]}
    assert out.read_text() == whole.read_text()


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path):
    task = ToolUseTask()
    examples = task.examples(split="train", limit=2)
    out = tmp_path / "traces.jsonl"
    generate_tool_traces(interrupting(examples, set()), task, out, limit=2)
    before = out.read_bytes()
    changes = [
        ({"max_turns": 3}, r"max_turns 4 -> 3"),
        ({"tools": tool_subset(["calculator"])}, r"tools \[.*\] -> \['calculator'\]"),
        ({"params": SamplingParams(temperature=0.5, max_tokens=256)}, r"temperature 0\.0 -> 0\.5"),
        ({"split": "test"}, r"split 'train' -> 'test'"),
    ]
    for change, message in changes:
        with pytest.raises(UserError, match=message) as info:
            generate_tool_traces(interrupting(examples, set()), task, out, limit=2, **change)
        assert str(out) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"teacher 'interrupting\.<locals>\.generate' -> "):
        generate_tool_traces(oracle(examples), task, out, limit=2)
    assert out.read_bytes() == before

    generate_tool_traces(
        interrupting(examples, set()), task, out, limit=2, max_turns=3, overwrite=True
    )
    assert len(out.read_text().splitlines()) == 2
    assert json.loads((tmp_path / "traces.jsonl.meta.json").read_text())["max_turns"] == 3


def test_a_file_not_written_as_traces_is_not_appended_to(tmp_path):
    out = tmp_path / "traces.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(UserError, match="not written by generate_tool_traces"):
        generate_tool_traces(lambda chats: ["hi"] * len(chats), ToolUseTask(), out, limit=1)
    assert out.read_text() == '{"mine": 1}\n'


def test_an_api_outage_is_retried_next_run_and_tokens_are_counted(tmp_path):
    """A real API teacher (tests/faultserver.py) that goes down after 3 requests: the finished
    traces stay, the failed ones are listed beside OUT and made by the next run, not before."""
    from faultserver import FaultPlan, FaultServer

    from lmdistill.teachers.openai_api import OpenAITeacher

    task = ToolUseTask()
    out, failed = tmp_path / "traces.jsonl", tmp_path / "traces.jsonl.failed.jsonl"
    with FaultServer(FaultPlan(always="500", ok_first=3)) as server:
        teacher = OpenAITeacher(
            "fault",
            base_url=server.base_url,
            timeout_s=0.5,
            retry_base_delay_s=0.002,
            max_retries=1,
        )
        counts = generate_tool_traces(teacher, task, out, limit=6, chunk_size=2)
        assert counts == {"ok": 3, "generation_failed": 3}  # a plain answer: one turn, no call
        kept = [json.loads(line) for line in out.read_text().splitlines()]
        listed = [json.loads(line) for line in failed.read_text().splitlines()]
        assert len(kept) == 3 and len(listed) == 3
        assert {t["status"] for t in listed} == {"generation_failed"}
        assert all("server_error" in t["error"] for t in listed)

        server.plan.always = None  # the API is back
        sent = server.request_count
        assert generate_tool_traces(teacher, task, out, limit=6, chunk_size=2) == {"ok": 6}
        assert server.request_count - sent == 3 and not failed.exists()
        generate_tool_traces(teacher, task, tmp_path / "whole.jsonl", limit=6)
    traces = [json.loads(line) for line in out.read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert sorted(traces, key=lambda t: t["id"]) == sorted(whole, key=lambda t: t["id"])
    assert len({t["id"] for t in traces}) == 6
    for t in traces:  # the server counts words; one turn each
        assert t["usage"]["prompt_tokens"] > 0
        assert t["usage"]["completion_tokens"] == len(t["messages"][-1]["content"].split(" "))
