"""Tool-use distillation: drive a model through tool calls, keep the clean traces, measure.

    tools, task = default_tools(), ToolUseTask()
    teacher = load_teacher("smollm2-135m-instruct")
    generate_tool_traces(teacher, task, "traces.jsonl", split="train", limit=500)
    stats = filter_tool_traces("traces.jsonl", "clean.jsonl", tools, task=task)
    # train on clean.jsonl like any SFT data: load_examples(...) puts the loss on the assistant
    # turns only (call text and final answer), never on the tool results
    metrics = evaluate_tool_use(student, task, tools, limit=100)

A trace is one JSONL record: the example's `id`, `split`, `reference` and `metadata`, the
`tools` schemas, `messages` in the OpenAI shape (user prompt, assistant `tool_calls`, `tool`
results, final assistant answer), a `status` ("ok", "unparseable_call", "max_turns",
"generation_failed"), an `error` message and the `usage` ({prompt_tokens, completion_tokens}
summed over the turns; 0 for a bare generate function). The model sees the conversation in the
format of `lmdistill.data.tool_format` (its template's own tool format when it has one, else the
<tool_call> text convention); the trace stores the calls parsed out of it, so the student can be
trained in its own format whatever the teacher's was.

`generate_tool_traces` writes its file resumably, as `lmdistill generate` does: OUT.meta.json
holds the settings, traces are appended a chunk at a time, a rerun continues with the examples
not in OUT yet, and OUT.failed.jsonl lists the traces whose generation failed (retried next run).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lmdistill.data.jsonl import (
    JsonlAppender,
    describe,
    iter_jsonl,
    read_appended,
    write_jsonl_atomic,
)
from lmdistill.data.tool_format import (
    TOOL_CALL_OPEN,
    Message,
    parse_tool_calls,
    plain_messages,
    render_tool_chat,
)
from lmdistill.errors import InputError, UserError
from lmdistill.store.settings import check_settings, side_path, write_settings
from lmdistill.tasks.base import Example, Split, Task
from lmdistill.tasks.tools import (
    UNPARSEABLE,
    ToolError,
    ToolRegistry,
    arguments_match,
    default_tools,
)
from lmdistill.teachers.base import GenerationResult, SamplingParams, Teacher, sampling_dict

# A bare generation function: conversations already in the fallback text format -> replies.
GenerateFn = Callable[[list[list[Message]]], list[str]]
Model = Teacher | GenerateFn

OK, UNPARSEABLE_CALL, MAX_TURNS, GENERATION_FAILED = (
    "ok",
    "unparseable_call",
    "max_turns",
    "generation_failed",
)
NO_TOOL_CALL, NO_FINAL_ANSWER, WRONG_ANSWER = "no_tool_call", "no_final_answer", "wrong_answer"
DEFAULT_PARAMS = SamplingParams(temperature=0.0, max_tokens=256)


# ---------------------------------------------------------------------------------- the loop
class _Reply(NamedTuple):
    """One model turn: the reply text (None when there is none, `failure` says why) and the
    tokens it cost (0 for a bare generate function, which reports none)."""

    text: str | None
    failure: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _reply(result: GenerationResult) -> _Reply:
    if result.failure is not None or not result.generations:
        failure = result.failure
        return _Reply(None, f"{failure.reason}: {failure.detail}" if failure else "no result")
    generation = result.generations[0]
    return _Reply(generation.text, "", generation.prompt_tokens, generation.completion_tokens)


def _generate(
    model: Model, chats: list[list[Message]], tools: list[dict], params: SamplingParams
) -> list[_Reply]:
    """The reply to each conversation."""
    if not isinstance(model, Teacher):
        replies = model([plain_messages(chat, tools) for chat in chats])
        if len(replies) != len(chats):
            raise UserError(
                f"the generate function returned {len(replies)} replies for {len(chats)}"
            )
        return [_Reply(reply) for reply in replies]
    from lmdistill.teachers.local import HFTeacher

    out = [_Reply(None, "no result")] * len(chats)
    if isinstance(model, HFTeacher):
        # Render with the model's own tokenizer so a template with native tool support is used
        # (HFTeacher.encode_chat would drop `tools`).
        tokenizer, limit = model.tokenizer, model.context_length
        prompts, indices = [], []
        for i, chat in enumerate(chats):
            text = render_tool_chat(tokenizer, chat, tools, add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if limit is not None and len(ids) >= limit:
                out[i] = _Reply(
                    None, f"prompt_too_long: {len(ids)} tokens, the context holds {limit}"
                )
            else:
                prompts.append(ids)
                indices.append(i)
        for start in range(0, len(indices), model.batch_size):
            chunk = indices[start : start + model.batch_size]
            batch = prompts[start : start + model.batch_size]
            for result in model.generate_batch(chunk, batch, params):
                out[result.index] = _reply(result)
        return out
    # Any other teacher (an API, vLLM): the fallback text format through its chat interface.
    conversations = [plain_messages(chat, tools) for chat in chats]
    for result in model.iter_generate(conversations, params):
        out[result.index] = _reply(result)
    return out


def run_tool_loops(
    model: Model,
    examples: Sequence[Example],
    tools: ToolRegistry | None = None,
    *,
    max_turns: int = 4,
    params: SamplingParams = DEFAULT_PARAMS,
    split: Split | None = None,
    task: str | None = None,
) -> list[dict[str, Any]]:
    """A trace (see the module doc) for each example, all examples batched turn by turn.

    Each turn the model replies; calls are parsed, checked and run with the real tools, and their
    results (or "error: ..." when a call is invalid or refused, as an agent runtime would answer)
    are appended; a reply without a call is the final answer. A reply with a call that cannot be
    read ends the trace (status "unparseable_call"); so does running out of turns ("max_turns").
    A trace's `usage` sums the tokens of its turns (each turn's prompt is the whole conversation).
    `model`: a Teacher, or a function from conversations (fallback text format) to replies."""
    if max_turns < 1:
        raise UserError(f"max_turns must be >= 1, got {max_turns}")
    tools = tools if tools is not None else default_tools()
    schemas = tools.schemas
    chats = [[dict(m) for m in ex.messages] for ex in examples]
    status: list[str | None] = [None] * len(examples)
    errors = [""] * len(examples)
    usage = [[0, 0] for _ in examples]  # prompt, completion tokens over the turns
    for turn in range(max_turns):
        active = [i for i, s in enumerate(status) if s is None]
        if not active:
            break
        replies = _generate(model, [chats[i] for i in active], schemas, params)
        for i, reply in zip(active, replies, strict=True):
            usage[i][0] += reply.prompt_tokens
            usage[i][1] += reply.completion_tokens
            if reply.text is None:
                status[i], errors[i] = GENERATION_FAILED, reply.failure
                continue
            parsed = parse_tool_calls(reply.text)
            if parsed.errors:
                chats[i].append({"role": "assistant", "content": reply.text.strip()})
                status[i], errors[i] = UNPARSEABLE_CALL, "; ".join(parsed.errors)
            elif not parsed.calls:
                chats[i].append({"role": "assistant", "content": parsed.content})
                status[i] = OK
            else:
                _run_calls(chats[i], parsed.content, parsed.calls, tools, turn)
    for i, s in enumerate(status):
        if s is None:
            status[i], errors[i] = MAX_TURNS, f"no final answer within {max_turns} turns"
    return [
        {
            "id": ex.id,
            **({"task": task} if task else {}),
            **({"split": split} if split else {}),
            "tools": schemas,
            "messages": chats[i],
            "reference": ex.reference,
            "metadata": ex.metadata,
            "status": status[i],
            "error": errors[i],
            "usage": {"prompt_tokens": usage[i][0], "completion_tokens": usage[i][1]},
        }
        for i, ex in enumerate(examples)
    ]


def _run_calls(
    chat: list[Message],
    content: str,
    calls: list[tuple[str, dict[str, Any]]],
    tools: ToolRegistry,
    turn: int,
) -> None:
    ids = [f"call_{turn}_{j}" for j in range(len(calls))]
    chat.append(
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
                for call_id, (name, arguments) in zip(ids, calls, strict=True)
            ],
        }
    )
    for call_id, (name, arguments) in zip(ids, calls, strict=True):
        try:
            result = tools.call(name, arguments)
        except ToolError as exc:
            result = f"error: {exc}"
        chat.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": result})


def run_tool_loop(
    model: Model,
    example: Example,
    tools: ToolRegistry | None = None,
    *,
    max_turns: int = 4,
    params: SamplingParams = DEFAULT_PARAMS,
) -> dict[str, Any]:
    """The trace of one example (see `run_tool_loops`, which batches many)."""
    return run_tool_loops(model, [example], tools, max_turns=max_turns, params=params)[0]


TRACES_FORMAT = "lmdistill.tool_traces/1"  # the format of a traces file's OUT.meta.json
_WRITER = "generate_tool_traces"


def generate_tool_traces(
    teacher: Model,
    task: Task,
    out_path: str | Path,
    *,
    tools: ToolRegistry | None = None,
    split: Split = "train",
    limit: int | None = None,
    seed: int = 0,
    max_turns: int = 4,
    params: SamplingParams = DEFAULT_PARAMS,
    overwrite: bool = False,
    chunk_size: int = 64,
) -> dict[str, int]:
    """Run the tool loop on `task`'s examples of `split` into the JSONL file `out_path`.

    Resumable as `lmdistill generate` is: the examples run `chunk_size` at a time, and each
    chunk's traces are appended (fsync) as it ends, so an interruption loses at most one chunk.
    OUT.meta.json holds the settings (teacher, sampling, task, split, tools, max_turns); a rerun
    with the same settings cuts a torn last line and runs only the examples not in OUT yet, one
    with others raises UserError unless `overwrite` starts OUT over. A trace whose generation
    failed (an API outage, a prompt too long) is not written to OUT but listed in
    OUT.failed.jsonl, so the next run retries it. A bare generate function counts as the teacher
    named by its `__qualname__`. Returns the number of traces per status over `task`'s examples:
    those in OUT, and those that failed in this run."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    out_path = Path(out_path)
    tools = tools if tools is not None else getattr(task, "tools", None) or default_tools()
    settings = _trace_settings(teacher, task, tools, split, max_turns, params)
    if not overwrite:
        check_settings(out_path, settings, meta_format=TRACES_FORMAT, writer=_WRITER)
    examples = task.examples(split=split, limit=limit, seed=seed)
    failed_path = side_path(out_path, ".failed.jsonl")
    with JsonlAppender(out_path) as out:
        done = _start_over(out, failed_path) if overwrite else _done_statuses(out_path)
        write_settings(out_path, settings, meta_format=TRACES_FORMAT)
        counts = Counter(done[ex.id] for ex in examples if ex.id in done)
        pending = [ex for ex in examples if ex.id not in done]
        loop = _Loop(teacher, tools, max_turns, params, split, task.name)
        counts.update(loop.append(pending, out, failed_path, chunk_size))
    return dict(counts)


def _trace_settings(
    model: Model,
    task: Task,
    tools: ToolRegistry,
    split: Split,
    max_turns: int,
    params: SamplingParams,
) -> dict[str, Any]:
    """What a traces file is made with (its OUT.meta.json): a rerun must not mix in others."""
    name = model.name if isinstance(model, Teacher) else getattr(model, "__qualname__", None)
    return {
        "teacher": name or type(model).__name__,
        "sampling": sampling_dict(params),
        "task": task.name,
        "split": split,
        "tools": tools.names,
        "max_turns": max_turns,
    }


def _start_over(out: JsonlAppender, failed_path: Path) -> dict[str, str]:
    """Empty OUT and drop its failure list (overwrite); nothing is done then."""
    out.truncate()
    failed_path.unlink(missing_ok=True)
    return {}


def _done_statuses(out_path: Path) -> dict[str, str]:
    """id -> status of the traces already in OUT, after cutting a torn last line."""
    done = {}
    for line, record in read_appended(out_path):
        trace_id, status = record.get("id"), record.get("status")
        if not isinstance(trace_id, str) or not isinstance(status, str):
            bad = "id" if not isinstance(trace_id, str) else "status"
            raise InputError(out_path, f"not a trace of {_WRITER}", line=line, field=bad)
        done[trace_id] = status
    return done


@dataclass
class _Loop:
    """The tool loop's settings, for running chunks of examples into a traces file."""

    model: Model
    tools: ToolRegistry
    max_turns: int
    params: SamplingParams
    split: Split
    task: str

    def append(
        self, examples: list[Example], out: JsonlAppender, failed_path: Path, chunk_size: int
    ) -> Counter[str]:
        """Run `examples` a chunk at a time, appending each chunk's traces to `out` and the
        failed ones to `failed_path`; the number of traces per status."""
        counts: Counter[str] = Counter()
        failed: list[dict[str, Any]] = []
        for start in range(0, len(examples), chunk_size):
            traces = run_tool_loops(
                self.model,
                examples[start : start + chunk_size],
                self.tools,
                max_turns=self.max_turns,
                params=self.params,
                split=self.split,
                task=self.task,
            )
            out.append([t for t in traces if t["status"] != GENERATION_FAILED])
            counts.update(t["status"] for t in traces)
            new_failures = [t for t in traces if t["status"] == GENERATION_FAILED]
            if new_failures:  # the previous run's list is stale once this run has failures
                failed += new_failures
                write_jsonl_atomic(failed_path, failed)
        if not failed:
            failed_path.unlink(missing_ok=True)  # the failures it listed are done now
        return counts


# ------------------------------------------------------------------------- checking a trace
@dataclass
class TraceCheck:
    """What one trace did. `problem`: the first reason it is unusable for training (None: clean).
    `calls`: (name, arguments, problem or None) of each call attempt, in order (an unreadable
    call has name and arguments None and problem "unparseable"). `answer`: the final answer."""

    problem: str | None
    detail: str
    calls: list[tuple[str | None, Any, str | None]]
    answer: str | None


def _bad(path: str | Path, line: int, field: str, message: str) -> InputError:
    return InputError(path, message, line=line, field=field)


def check_record_shape(record: dict[str, Any], path: str | Path, line: int) -> None:
    """InputError naming path:line:field when a trace record is not the documented shape."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(path, line, "messages", f"must be a non-empty list, got {describe(messages)}")
    tools = record.get("tools", [])
    if not isinstance(tools, list):
        raise _bad(
            path, line, "tools", f"must be a list of function schemas, got {describe(tools)}"
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(path, line, where, "must be an object with a 'role'")
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise _bad(path, line, f"{where}.content", f"must be a string, got {describe(content)}")
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise _bad(path, line, f"{where}.tool_calls", f"must be a list, got {describe(calls)}")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise _bad(
                    path, line, f"{where}.tool_calls[{j}]", 'must be {"function": {"name", ...}}'
                )


def _arguments(call: dict[str, Any]) -> dict[str, Any] | None:
    arguments = call["function"].get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def check_trace(record: dict[str, Any], tools: ToolRegistry) -> TraceCheck:
    """Read a (shape-checked) trace: its call attempts, whether each is valid, its final answer,
    and the first reason it cannot be trained on."""
    calls: list[tuple[str | None, Any, str | None]] = []
    problem, detail = None, ""

    def note(reason: str, why: str) -> None:
        nonlocal problem, detail
        if problem is None:
            problem, detail = reason, why

    answer = None
    for message in record["messages"]:
        if message["role"] != "assistant":
            continue
        answer = None
        for call in message.get("tool_calls") or []:
            name, arguments = call["function"].get("name"), _arguments(call)
            if not isinstance(name, str) or arguments is None:
                calls.append((None, None, UNPARSEABLE))
                note(UNPARSEABLE, f"call to {name!r}: arguments are not a JSON object")
                continue
            found = tools.check(name, arguments)
            calls.append((name, arguments, found.reason if found else None))
            if found:
                note(found.reason, found.detail)
        content = message.get("content") or ""
        if TOOL_CALL_OPEN in content:  # a call left in the text: it was never read or run
            calls.append((None, None, UNPARSEABLE))
            note(UNPARSEABLE, record.get("error") or "a <tool_call> the parser could not read")
        elif not message.get("tool_calls"):
            answer = content
    status = record.get("status", OK)
    if status == GENERATION_FAILED:
        problem, detail = GENERATION_FAILED, record.get("error", "")
    elif status == UNPARSEABLE_CALL:
        note(UNPARSEABLE, record.get("error", ""))
    if problem is None and not calls:
        note(NO_TOOL_CALL, "the answer was given without calling a tool")
    if problem is None and (status != OK or answer is None or not answer.strip()):
        note(NO_FINAL_ANSWER, record.get("error") or "the trace does not end with an answer")
    return TraceCheck(problem, detail, calls, answer if answer and answer.strip() else None)


def _example(record: dict[str, Any]) -> Example:
    return Example(
        id=str(record.get("id", "")),
        messages=[],
        reference=record.get("reference"),
        metadata=record.get("metadata") or {},
    )


# ---------------------------------------------------------------------------------- filtering
@dataclass
class FilterStats:
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def report(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} of {self.read} traces (dropped: {reasons})"


def filter_tool_traces(
    in_path: str | Path,
    out_path: str | Path,
    tools: ToolRegistry | None = None,
    *,
    task: Task | None = None,
    require_call: bool = True,
) -> FilterStats:
    """Keep the traces fit to train on: every call readable and schema-valid (known tool,
    required arguments present and of the right type, nothing extra), a final answer, at least
    one call (`require_call`), and with `task`, a final answer it scores 1.0 (the same verifier
    that grades the benchmark filters the data, STYLE.md principle 8). Writes `out_path`
    atomically; a malformed line raises InputError naming file:line:field."""
    tools = tools if tools is not None else default_tools()
    stats, kept = FilterStats(), []
    for line, record in iter_jsonl(in_path):
        check_record_shape(record, in_path, line)
        stats.read += 1
        check = check_trace(record, tools)
        problem = check.problem
        if problem == NO_TOOL_CALL and not require_call:
            problem = None
        if problem is None and task and task.score(_example(record), check.answer or "") < 1:
            problem = WRONG_ANSWER
        if problem is None:
            kept.append(record)
        else:
            stats.dropped[problem] = stats.dropped.get(problem, 0) + 1
    stats.kept = len(kept)
    write_jsonl_atomic(out_path, kept)
    return stats


# ------------------------------------------------------------------------------------ metrics
@dataclass
class ToolMetrics:
    """Rates over n traces, each in [0, 1]:

    call_validity: the trace made at least one call and every call parsed and fit its schema.
    tool_name_accuracy: the first call named the expected tool.
    argument_accuracy: the first call named the expected tool with the expected arguments
        (numbers by value; the tool's own `equivalent` when it has one).
    final_answer_accuracy: the trace ended with an answer the task scores 1.0.
    statuses / problems: counts of loop statuses and of `check_trace` problems."""

    n: int
    call_validity: float
    tool_name_accuracy: float
    argument_accuracy: float
    final_answer_accuracy: float
    statuses: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TOOL_METRIC_NAMES: tuple[str, ...] = (
    "call_validity",
    "tool_name_accuracy",
    "argument_accuracy",
    "final_answer_accuracy",
)


def trace_scores(
    record: dict[str, Any],
    check: TraceCheck,
    tools: ToolRegistry,
    score: Callable[[Example, str], float] | None = None,
) -> dict[str, float]:
    """The four metrics of one trace (see `ToolMetrics`), each 0.0 or 1.0, by name;
    `check` is the trace's `check_trace`."""
    expected = (record.get("metadata") or {}).get("expected_call") or {}
    name, arguments, _ = check.calls[0] if check.calls else (None, None, None)
    valid = bool(check.calls) and all(p is None for _, _, p in check.calls)
    named = name is not None and name == expected.get("name")
    argued = (
        named
        and isinstance(arguments, dict)
        and arguments_match(expected.get("arguments") or {}, arguments, tools.get(name))
    )
    answered = (
        score is not None
        and check.answer is not None
        and record.get("status", OK) == OK
        and score(_example(record), check.answer) >= 1.0
    )
    values = (valid, named, argued, answered)
    return {metric: float(v) for metric, v in zip(TOOL_METRIC_NAMES, values, strict=True)}


def tool_metrics(
    traces: Iterable[dict[str, Any]],
    tools: ToolRegistry | None = None,
    score: Callable[[Example, str], float] | None = None,
) -> ToolMetrics:
    """The four tool-use metrics over traces (pure: no model). Each trace needs
    `metadata.expected_call` ({"name", "arguments"}) for the name and argument accuracies, and
    `score` (e.g. `ToolUseTask().score`) for the final-answer accuracy (0 without one)."""
    tools = tools if tools is not None else default_tools()
    rows: list[dict[str, float]] = []
    statuses: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    for record in traces:
        check = check_trace(record, tools)
        statuses[record.get("status", OK)] += 1
        if check.problem:
            problems[check.problem] += 1
        rows.append(trace_scores(record, check, tools, score))
    means = {m: sum(r[m] for r in rows) / len(rows) if rows else 0.0 for m in TOOL_METRIC_NAMES}
    return ToolMetrics(n=len(rows), **means, statuses=dict(statuses), problems=dict(problems))


def evaluate_tool_use(
    model: Model,
    task: Task | None = None,
    tools: ToolRegistry | None = None,
    *,
    split: Split = "test",
    limit: int | None = 100,
    seed: int = 0,
    max_turns: int = 4,
    params: SamplingParams = DEFAULT_PARAMS,
    traces_path: str | Path | None = None,
) -> ToolMetrics:
    """Run `model` through the tool loop on `task` (default: `ToolUseTask`) and measure the four
    metrics; the traces are written to `traces_path` when given."""
    if task is None:
        from lmdistill.tasks.tool_use import ToolUseTask

        task = ToolUseTask()
    tools = tools if tools is not None else getattr(task, "tools", None) or default_tools()
    examples = task.examples(split=split, limit=limit, seed=seed)
    traces = run_tool_loops(
        model, examples, tools, max_turns=max_turns, params=params, split=split, task=task.name
    )
    if traces_path is not None:
        write_jsonl_atomic(traces_path, traces)
    return tool_metrics(traces, tools, task.score)
