"""Prompts synthesized by the teacher itself, Magpie-style (Xu et al. 2024, "Magpie: Alignment Data
Synthesis from Scratch by Prompting Aligned LLMs with Nothing"):

    lmdistill prompts synthesize --teacher smollm2-135m-instruct --n 200 --out prompts.jsonl

An aligned chat model given its chat template up to where a user's words start writes a user's
request, because that is what follows there in its training data. An optional task kind (the
request's first words, "How do I", "Write a short poem about") or topic (a system turn) steers
it. Every sample then passes, in order, filters that each count what they drop:

  failed          the teacher returned no text for it
  unfinished      it hit max_tokens (a request cut off mid-sentence)
  length          fewer than min_words or more than max_words words
  language        not English (non-ASCII letters, or no common English word)
  not_a_request   no question or instruction, or the teacher went on to answer it (a reply's
                  opener, a second paragraph, chat-template debris)
  near_duplicate  its word 3-gram Jaccard with a kept prompt, or with a prompt of an `avoid`
                  file (the training prompts, for a held-out set), is at least 0.5

Output, next to each other:
  OUT                 one record per kept prompt: id, prompt, kind, topic (and split when given)
  OUT.raw.jsonl       every sample drawn, kept or not, appended one round at a time
  OUT.stats.json      samples drawn, kept, dropped per filter, and the kept set's diversity
  OUT.meta.json       the settings OUT was made with

Resumable: a rerun with the same settings reads OUT.raw.jsonl back (cutting a torn last line)
and draws only the rounds still missing; round r is seeded with `seed + first sample index`, so
the samples are those an uninterrupted run draws. Other settings are refused, as in `generate`.

A teacher must continue raw text (`Capability.CONTINUATION`: a local model). A chat API closes
every turn it is given, so it cannot be asked to write the user's words; it is refused with a
message saying so."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.data.diversity import NEAR_DUPLICATE, Diversity, NgramIndex, diversity, words
from lmdistill.data.jsonl import JsonlAppender, read_appended, write_json_atomic, write_jsonl_atomic
from lmdistill.errors import UserError, did_you_mean
from lmdistill.pipelines.generate import check_settings, content_id, side_path, write_settings
from lmdistill.teachers.base import Capability, SamplingParams, Teacher

META_FORMAT = "lmdistill.synthesize/1"
# What a teacher is asked for, in the error when it cannot give it.
PURPOSE = (
    "Magpie prompt synthesis, which continues the chat template where a user's words start; "
    "a chat API always closes the user turn it is given"
)
ROUND = 32  # samples drawn per round: what a crash can lose, and the unit of seeding

# Task kinds: the first words of the request. The teacher writes the rest. Everyday requests of
# the kinds issue #21 measured students on (tips, how-tos, rewrites, short poems, comparisons,
# polite notes, explanations), plus "open": no words given, pure Magpie.
KINDS: dict[str, tuple[str, ...]] = {
    "open": ("",),
    "tips": ("Give me three tips for", "What are some tips for", "Any advice on how to"),
    "howto": ("How do I", "How can I", "What is the best way to"),
    "rewrite": (
        "Rewrite this sentence to sound more friendly:",
        "Rewrite this sentence in simpler words:",
        "Make this sentence more formal:",
    ),
    "poem": ("Write a short poem about", "Write a haiku about", "Write a four-line poem about"),
    "comparison": ("What is the difference between", "Compare", "Which is better for"),
    "note": (
        "Write a polite note to",
        "Write a short thank-you message to",
        "Write a polite email",
    ),
    "explanation": ("Explain", "Why do", "Can you explain why"),
}
FILTERS = (
    "failed",
    "unfinished",
    "length",
    "language",
    "not_a_request",
    "near_duplicate",
)

_QUESTION_WORDS = frozenset(
    [
        "how",
        "what",
        "why",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "can",
        "could",
        "would",
        "should",
        "will",
        "is",
        "are",
        "do",
        "does",
        "did",
        "may",
        "might",
        "shall",
    ]
)
_INSTRUCTION_WORDS = frozenset(
    [
        "write",
        "rewrite",
        "give",
        "list",
        "explain",
        "describe",
        "compare",
        "suggest",
        "tell",
        "help",
        "make",
        "create",
        "draft",
        "compose",
        "summarize",
        "summarise",
        "recommend",
        "provide",
        "share",
        "translate",
        "name",
        "plan",
        "find",
        "show",
        "teach",
        "convert",
        "edit",
        "fix",
        "improve",
        "outline",
        "brainstorm",
        "please",
        "any",
    ]
)
# Phrases that make a request out of a statement: "I need a ...", "I'm looking for ...".
_ASKING = re.compile(
    r"\b(can you|could you|would you|will you|help me|i need|i want|i'd like|i would like|"
    r"i'm looking for|i am looking for|looking for|please|any (tips|advice|ideas|suggestions))\b"
)
# How a reply opens: a sample that starts like this is the teacher answering, not asking.
_REPLY_OPENERS = re.compile(
    r"^(sure|certainly|of course|absolutely|here is|here's|here are|as an ai|i'm sorry|"
    r"i am sorry|great question|thank you for)\b"
)
_ENGLISH = frozenset(
    [
        "the",
        "a",
        "an",
        "to",
        "of",
        "and",
        "for",
        "in",
        "on",
        "with",
        "my",
        "me",
        "i",
        "you",
        "your",
        "is",
        "are",
        "it",
        "how",
        "what",
        "this",
        "that",
        "do",
        "can",
        "about",
        "be",
        "or",
        "from",
        "at",
        "by",
        "as",
        "if",
        "so",
        "not",
        "no",
        "but",
        "all",
        "some",
        "more",
        "most",
        "have",
        "has",
        "had",
        "was",
        "were",
        "will",
        "would",
        "should",
        "could",
        "we",
        "our",
        "they",
        "their",
        "them",
        "he",
        "she",
        "his",
        "her",
        "its",
        "who",
        "which",
        "when",
        "where",
        "why",
        "there",
        "here",
        "than",
        "then",
        "into",
        "over",
        "out",
        "up",
        "one",
        "two",
        "three",
        "few",
        "many",
        "much",
        "very",
        "just",
        "also",
        "best",
        "good",
        "new",
        "make",
        "get",
        "use",
        "like",
        "want",
        "need",
        "know",
        "help",
        "tips",
        "way",
        "day",
        "time",
        "people",
    ]
)


@dataclass(frozen=True)
class SynthesisSettings:
    """What to draw and what to keep. `kinds` and `starts` are the requests' first words (the
    named kinds' own starts, then the given ones), cycled over the samples; `topics` become a
    system turn ("The user asks about TOPIC."), cycled over the rounds of starts."""

    n: int
    kinds: tuple[str, ...] = ()
    starts: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    system: str | None = None  # a system turn for every sample (a topic's turn replaces it)
    temperature: float = 1.0  # Magpie samples at 1.0: the model's own distribution of requests
    top_p: float = 1.0
    max_tokens: int = 64
    min_words: int = 4
    max_words: int = 60
    near_duplicate: float = NEAR_DUPLICATE
    max_samples: int | None = None  # draws at most this many; default 4 * n
    seed: int = 0
    split: str | None = None  # written into every record ("train" / "test")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"n must be >= 1, got {self.n}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise UserError(
                f"unknown task kind '{unknown[0]}'{did_you_mean(unknown[0], KINDS)}; choose from: "
                + ", ".join(KINDS)
            )
        if not 1 <= self.min_words <= self.max_words:
            raise UserError(
                f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}"
            )
        if not 0 < self.near_duplicate <= 1:
            raise UserError(f"near_duplicate must be in (0, 1], got {self.near_duplicate}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if any(not t.strip() for t in self.topics):
            raise UserError("a topic is empty")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)

    @property
    def sample_budget(self) -> int:
        return self.max_samples if self.max_samples is not None else 4 * self.n

    def steers(self) -> list[tuple[str, str]]:
        """(kind, first words) per step of the cycle; [("open", "")] when nothing steers."""
        out = [(kind, start) for kind in self.kinds for start in KINDS[kind]]
        out += [("start", start) for start in self.starts]
        return out or [("open", "")]


@dataclass
class SynthesisSummary:
    out_path: Path
    samples: int = 0  # drawn in all (this run and earlier ones)
    drawn_now: int = 0
    kept: int = 0
    passed: int = 0  # through every filter; kept are the first n of them
    dropped: Counter[str] = field(default_factory=Counter)
    diversity: Diversity | None = None

    def report(self) -> str:
        dropped = ", ".join(f"{name} {self.dropped[name]}" for name in FILTERS)
        lines = [
            f"{self.kept} prompts kept of {self.samples} samples ({self.drawn_now} drawn in this "
            f"run) in {self.out_path}",
            f"dropped: {dropped}",
        ]
        if self.diversity is not None:
            lines.append(f"diversity: {self.diversity.line()}")
        return "\n".join(lines)


def prompt_texts(source: str | Path, split: str | None = None) -> list[str]:
    """The user turns of every prompt in `source` (any prompt source `generate` reads), or of
    those whose `split` field is `split`: what diversity is measured on, and what a held-out set
    must not nearly repeat."""
    from lmdistill.pipelines.generate import read_prompts

    texts = []
    for prompt in read_prompts(source):
        if split is None or prompt.fields.get("split") == split:
            texts += [m["content"] for m in prompt.messages if m.get("role") == "user"]
    return texts


def avoid_texts(paths: Iterable[str | Path]) -> list[str]:
    return [text for path in paths for text in prompt_texts(path)]


class _Sieve:
    """The filters, in order, over samples as they arrive; keeps the survivors and counts drops."""

    def __init__(self, s: SynthesisSettings, avoid: Sequence[str]) -> None:
        self.s = s
        self.index = NgramIndex(threshold=s.near_duplicate)
        for text in avoid:
            self.index.add(text)
        self.kept: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter({name: 0 for name in FILTERS})
        self.passed = 0  # samples through every filter (beyond n when a round overshoots)

    def offer(self, raw: dict[str, Any]) -> None:
        reason = self.reject(raw)
        if reason is not None:
            self.dropped[reason] += 1
            return
        text = raw_prompt(raw)
        self.index.add(text)
        self.passed += 1
        if len(self.kept) < self.s.n:
            self.kept.append(raw)

    def reject(self, raw: dict[str, Any]) -> str | None:
        if raw.get("failure") is not None or raw.get("text") is None:
            return "failed"
        if raw.get("finish_reason") == "length":
            return "unfinished"
        text = raw_prompt(raw)
        count = len(words(text))
        if count < self.s.min_words or count > self.s.max_words:
            return "length"
        if not is_english(text):
            return "language"
        if not is_request(text):
            return "not_a_request"
        if self.index.is_near_duplicate(text):
            return "near_duplicate"
        return None


def raw_prompt(raw: dict[str, Any]) -> str:
    """The request a sample makes: its first words (the steer) and the teacher's continuation."""
    start, text = raw.get("start") or "", (raw.get("text") or "").strip()
    if not start:
        return text
    glue = "" if text[:1] in (",", ".", "?", "!", ":", ";") else " "
    return f"{start}{glue}{text}".strip()


def is_english(text: str) -> bool:
    """Mostly ASCII letters, and a fifth of the words common English ones: a cheap language check
    that needs no model (a fastText-style identifier would be better for many languages)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    ascii_share = sum(c.isascii() for c in letters) / len(letters)
    w = words(text)
    known = _ENGLISH | _QUESTION_WORDS | _INSTRUCTION_WORDS
    # A fifth of an English request's words are this common; another language's are not.
    return ascii_share >= 0.97 and sum(x in known for x in w) >= 0.2 * len(w)


def is_request(text: str) -> bool:
    """A question or an instruction from a user, and nothing after it: no reply's opener, no
    second paragraph (the model went on to answer), no chat-template debris."""
    lowered = text.lower().strip()
    if "<|" in text or _REPLY_OPENERS.match(lowered):
        return False
    # One line, or a line ending in ':' and the text it introduces ("Rewrite this: ..."); more
    # is the model writing on past the request.
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 2 or (len(lines) == 2 and not lines[0].rstrip().endswith(":")):
        return False
    first = words(lowered)[:1]
    return (
        lowered.rstrip("\"' )").endswith("?")
        or bool(first and first[0] in _QUESTION_WORDS | _INSTRUCTION_WORDS)
        or bool(_ASKING.search(lowered))
    )


def _settings(teacher: Teacher, s: SynthesisSettings, avoid: Sequence[str]) -> dict[str, Any]:
    # Through JSON, as the meta file holds them: tuples become lists and compare equal on resume.
    settings = {"teacher": teacher.name, **asdict(s), "avoid": [str(p) for p in avoid]}
    return json.loads(json.dumps(settings))


def synthesize(
    teacher: Teacher,
    s: SynthesisSettings,
    out: str | Path,
    *,
    avoid: Sequence[str | Path] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> SynthesisSummary:
    """Draw samples round by round until `s.n` prompts pass the filters or `s.sample_budget`
    samples are drawn, then write OUT (the first `s.n` kept, in sample order) and its stats."""
    teacher.require(Capability.CONTINUATION, PURPOSE)
    out = Path(out)
    raw_path = side_path(out, ".raw.jsonl")
    settings = _settings(teacher, s, avoid)
    writer = "lmdistill prompts synthesize"
    if overwrite:
        for path in (out, raw_path, side_path(out, ".meta.json"), side_path(out, ".stats.json")):
            path.unlink(missing_ok=True)
    elif raw_path.exists() and not side_path(out, ".meta.json").exists():
        raise UserError(f"{raw_path} exists but {out}.meta.json does not; use --overwrite")
    check_settings(out, settings, meta_format=META_FORMAT, writer=writer)
    sieve = _Sieve(s, avoid_texts(avoid))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_settings(out, settings, meta_format=META_FORMAT)
    summary = SynthesisSummary(out)
    steers = s.steers()
    with JsonlAppender(raw_path) as appender:
        drawn = [record for _, record in read_appended(raw_path)]
        for record in drawn:
            sieve.offer(record)
        summary.samples = len(drawn)
        while len(sieve.kept) < s.n and summary.samples < s.sample_budget:
            first = summary.samples
            count = min(ROUND, s.sample_budget - first)
            records = [_steer(i, steers, s) for i in range(first, first + count)]
            systems = [r["topic_system"] or s.system for r in records]
            texts = [
                teacher.pre_query(system) + r["start"]
                for system, r in zip(systems, records, strict=True)
            ]
            params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=s.seed + first,
            )
            for result in teacher.iter_continue(texts, params):
                record = records[result.index]
                if result.failure is not None:
                    record["failure"] = result.failure.reason
                else:
                    generation = result.generations[0]
                    record["text"] = generation.text
                    record["finish_reason"] = generation.finish_reason
            appender.append(records)
            for record in records:
                sieve.offer(record)
            summary.samples += count
            summary.drawn_now += count
            if progress:
                print(
                    f"synthesize: {summary.samples} samples drawn, {len(sieve.kept)}/{s.n} kept",
                    file=sys.stderr,
                    flush=True,
                )
    kept = [_output_record(record, s) for record in sieve.kept]
    write_jsonl_atomic(out, kept)
    summary.kept = len(kept)
    summary.passed = sieve.passed
    summary.dropped = sieve.dropped
    summary.diversity = diversity([r["prompt"] for r in kept]) if kept else None
    write_json_atomic(
        side_path(out, ".stats.json"),
        {
            "samples": summary.samples,
            "kept": summary.kept,
            "passed": summary.passed,
            "dropped": dict(summary.dropped),
            "diversity": asdict(summary.diversity) if summary.diversity else None,
        },
    )
    return summary


def _steer(i: int, steers: list[tuple[str, str]], s: SynthesisSettings) -> dict[str, Any]:
    kind, start = steers[i % len(steers)]
    topic = s.topics[(i // len(steers)) % len(s.topics)] if s.topics else None
    return {
        "sample": i,
        "kind": kind,
        "start": start,
        "topic": topic,
        "topic_system": f"The user asks about {topic}." if topic else None,
        "text": None,
        "finish_reason": None,
    }


def _output_record(raw: dict[str, Any], s: SynthesisSettings) -> dict[str, Any]:
    prompt = raw_prompt(raw)
    record = {
        "id": content_id([{"role": "user", "content": prompt}]),
        "prompt": prompt,
        "kind": raw["kind"],
    }
    if raw.get("topic"):
        record["topic"] = raw["topic"]
    if s.split is not None:
        record["split"] = s.split
    return record


def synthesize_with(
    teacher_spec: str,
    s: SynthesisSettings,
    out: str | Path,
    *,
    avoid: Sequence[str | Path] = (),
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 32,
) -> SynthesisSummary:
    """`synthesize` with the teacher a spec names, loaded and closed here (the command's call).
    Whether it can continue text is asked before loading: an API teacher would otherwise fail on
    `batch_size`, a local model's option, instead of on what it cannot do."""
    from lmdistill.teachers.registry import check_teacher, load_teacher

    if Capability.CONTINUATION not in check_teacher(teacher_spec):
        raise UserError(f"teacher '{teacher_spec}' cannot continue raw text (needed for {PURPOSE})")
    teacher = load_teacher(teacher_spec, batch_size=batch_size)
    try:
        return synthesize(teacher, s, out, avoid=avoid, overwrite=overwrite, progress=progress)
    finally:
        teacher.close()
