"""Magpie prompt synthesis (`lmdistill prompts synthesize`): the pre-query text, the filters and
their counts, deduplication against files to avoid, resuming, refusing what cannot work."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.data.diversity import jaccard, ngrams
from lmdistill.errors import UserError
from lmdistill.pipelines.synthesize import (
    FILTERS,
    SynthesisSettings,
    _Sieve,
    is_request,
    synthesize,
)
from lmdistill.teachers.base import (
    Capability,
    Generation,
    GenerationResult,
    SamplingParams,
    Teacher,
)
from lmdistill.teachers.local import HFTeacher


class ScriptedTeacher(Teacher):
    """Continues text #i of the whole run with SCRIPT[i] (what the pipeline does with a teacher's
    continuations, apart from the model), recording what it was asked."""

    name = "scripted"
    capabilities = Capability.TEXT | Capability.CONTINUATION

    def __init__(self, script: list[tuple[str, str]]) -> None:
        self.script, self.asked, self.seeds = script, [], []

    def pre_query(self, system: str | None = None) -> str:
        return f"<sys>{system or ''}</sys><user>"

    def iter_generate(self, conversations, params):  # pragma: no cover - not used
        raise NotImplementedError

    def iter_continue(
        self, texts: Sequence[str], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.seeds.append(params.seed)
        for i, text in enumerate(texts):
            reply, finish = self.script[len(self.asked)]
            self.asked.append(text)
            yield GenerationResult(i, [Generation(reply, finish, 1, 1, 0.0)])


_THINGS = [
    "tomatoes",
    "basil",
    "roses",
    "tulips",
    "mint",
    "lettuce",
    "carrots",
    "onions",
    "garlic",
    "peppers",
]


def _script(n: int) -> list[tuple[str, str]]:
    """n requests, no two near-duplicates (each its own 3-grams after the first two words)."""
    return [
        (f"How do {_THINGS[i % 10]} {i} grow {_THINGS[(i * 3 + 1) % 10]} {i * 7}?", "stop")
        for i in range(n)
    ]


def test_pre_query_is_the_template_cut_where_the_users_words_start(tiny_model_dir: Path) -> None:
    teacher = HFTeacher(tiny_model_dir)
    assert teacher.pre_query() == "<|im_start|>user\n"
    assert teacher.pre_query("Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    assert teacher.can(Capability.CONTINUATION)


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        (None, None, "failed"),
        ("How do I fix a bike chain that keeps", "length", "unfinished"),
        ("Why?", "stop", "length"),
        ("¿Cómo puedo aprender a cocinar platos sencillos en casa?", "stop", "language"),
        ("The weather was nice and we walked to the park.", "stop", "not_a_request"),
        ("Sure! Here are three tips for sleeping better.", "stop", "not_a_request"),
        ("How do I bake bread?\nFirst, mix flour.\nThen knead.", "stop", "not_a_request"),
        ("What is the capital of France?", "stop", "near_duplicate"),  # in the avoid list
    ],
)
def test_each_filter_drops_what_it_names(text, finish, reason) -> None:
    sieve = _Sieve(SynthesisSettings(n=5), avoid=["What is the capital of France?"])
    sieve.offer({"start": "", "text": text, "finish_reason": finish})
    assert sieve.dropped[reason] == 1 and sum(sieve.dropped.values()) == 1
    assert sieve.kept == []


def test_requests_pass_the_request_check() -> None:
    for text in (
        "Rewrite this sentence in simpler words:\nThe meeting was postponed indefinitely.",
        "I'm looking for a gift for my mother who likes gardening.",
        "Write a polite note to my neighbour about the noise.",
        "Is it safe to swim after eating",
    ):
        assert is_request(text), text


def test_kept_prompts_repeat_neither_each_other_nor_the_avoid_file(tmp_path: Path) -> None:
    avoid = tmp_path / "train.jsonl"
    script = _script(6)
    avoid.write_text(json.dumps({"prompt": script[3][0]}) + "\n")
    script[4] = (script[1][0].replace("?", "!?"), "stop")  # repeats sample 1
    teacher = ScriptedTeacher(script)
    out = tmp_path / "p.jsonl"
    summary = synthesize(
        teacher, SynthesisSettings(n=10, max_samples=6), out, avoid=[avoid], progress=False
    )
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert summary.kept == len(prompts) == 4 and summary.dropped["near_duplicate"] == 2
    for i, a in enumerate(prompts):
        assert jaccard(ngrams(a), ngrams(avoid.read_text())) < 0.5
        assert all(jaccard(ngrams(a), ngrams(b)) < 0.5 for b in prompts[i + 1 :])
    stats = json.loads((tmp_path / "p.jsonl.stats.json").read_text())
    assert stats["samples"] == 6 == sum(stats["dropped"].values()) + stats["passed"]
    assert set(stats["dropped"]) == set(FILTERS)


def test_kinds_start_the_request_and_topics_become_a_system_turn(tmp_path: Path) -> None:
    teacher = ScriptedTeacher([("growing tomatoes on a balcony?", "stop")] * 4)
    settings = SynthesisSettings(n=1, kinds=("howto",), topics=("gardening",), max_samples=1)
    synthesize(teacher, settings, tmp_path / "p.jsonl", progress=False)
    assert teacher.asked[0] == "<sys>The user asks about gardening.</sys><user>How do I"
    record = json.loads((tmp_path / "p.jsonl").read_text())
    assert record["prompt"] == "How do I growing tomatoes on a balcony?"
    assert (record["kind"], record["topic"]) == ("howto", "gardening")


def test_it_stops_once_n_are_kept_and_seeds_each_round_by_its_first_sample(tmp_path) -> None:
    teacher = ScriptedTeacher(_script(200))
    summary = synthesize(teacher, SynthesisSettings(n=40, seed=7), tmp_path / "p.jsonl")
    assert summary.kept == 40 and summary.samples == 64  # two rounds of 32
    assert teacher.seeds == [7, 7 + 32]


def test_a_rerun_continues_after_a_torn_write_and_draws_what_an_uninterrupted_run_drew(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """On the real (tiny) model with sampling: the raw samples of an interrupted and resumed run
    equal those of an uninterrupted one, byte for byte."""
    settings = SynthesisSettings(n=100, max_samples=64, max_tokens=6, seed=3)
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    synthesize(HFTeacher(tiny_model_dir, batch_size=16), settings, whole, progress=False)
    raw = (tmp_path / "whole.jsonl.raw.jsonl").read_bytes()
    lines = raw.splitlines(keepends=True)
    assert len(lines) == 64
    # What a crash in the second round leaves: the first round and a torn line.
    (tmp_path / "cut.jsonl.raw.jsonl").write_bytes(b"".join(lines[:32]) + lines[32][:10])
    meta = (tmp_path / "whole.jsonl.meta.json").read_text()
    (tmp_path / "cut.jsonl.meta.json").write_text(meta)
    summary = synthesize(HFTeacher(tiny_model_dir, batch_size=16), settings, cut, progress=False)
    assert summary.drawn_now == 32
    assert (tmp_path / "cut.jsonl.raw.jsonl").read_bytes() == raw
    assert cut.read_bytes() == whole.read_bytes()


def test_other_settings_on_the_same_output_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    synthesize(ScriptedTeacher(_script(8)), SynthesisSettings(n=2), out, progress=False)
    with pytest.raises(UserError, match="other settings"):
        synthesize(ScriptedTeacher(_script(8)), SynthesisSettings(n=2, seed=1), out)


def test_a_teacher_that_cannot_continue_text_is_refused_naming_why(tmp_path: Path) -> None:
    teacher = ScriptedTeacher([])
    teacher.capabilities = Capability.TEXT  # what a chat API gives
    with pytest.raises(UserError, match=r"cannot give continuation .*closes the user turn"):
        synthesize(teacher, SynthesisSettings(n=1), tmp_path / "p.jsonl")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kinds", "tips,poems"], "unknown task kind 'poems' (did you mean poem?)"),
        (["--n", "0"], "n must be >= 1"),
        (["--teacher", "http://127.0.0.1:9/v1"], "cannot continue raw text"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys, args, message) -> None:
    base = {"--teacher": str(tiny_model_dir), "--n": "2", "--out": str(tmp_path / "p.jsonl")}
    flags = dict(base)
    rest = []
    for i in range(0, len(args), 2):
        if args[i] in flags:
            flags[args[i]] = args[i + 1]
        else:
            rest += args[i : i + 2]
    argv = ["prompts", "synthesize", *[x for kv in flags.items() for x in kv], *rest]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_prints_the_diversity_of_a_prompt_set(tmp_path: Path, capsys) -> None:
    path = tmp_path / "p.jsonl"
    rows = ["How do I boil an egg?", "How do I boil an egg?", "Write a haiku about rain."]
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(rows)))
    assert main(["prompts", "diversity", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 prompts" in out and "near-duplicates 33.3%" in out
