"""`lmdistill prompts`: make and measure prompt sets (`lmdistill.pipelines.synthesize`,
`lmdistill.data.diversity`)."""

from __future__ import annotations

import argparse
from pathlib import Path

SYNTHESIZE = """\
Synthesize user requests with the teacher itself (Magpie): the teacher's chat template up to
where a user's words start, continued by the teacher. --kinds and --start give the requests'
first words, --topics a system turn; both steer a small teacher toward everyday requests.
Samples are filtered (unfinished, length, language, not a request, near-duplicate: word 3-gram
Jaccard >= 0.5 with a kept prompt or with a prompt of an --avoid file), each filter's drops are
printed, and so is the diversity of what is kept (distinct-1/2/3, near-duplicate share).
Next to OUT go OUT.raw.jsonl (every sample), OUT.stats.json and OUT.meta.json. Run the same
command again to continue after an interruption. Needs a teacher that continues raw text (a
local model); a chat API cannot write the user's side of a turn."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prompts", help="synthesize prompts with the teacher; measure them")
    sub = p.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "synthesize",
        help="synthesize user requests with the teacher (Magpie), filtered and deduplicated",
        description=SYNTHESIZE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--teacher", required=True, metavar="SPEC", help="a local teacher spec")
    s.add_argument("--n", type=int, required=True, metavar="N", help="prompts to keep")
    s.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl")
    s.add_argument(
        "--kinds",
        type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
        default=(),
        metavar="K,...",
        help="task kinds (first words of the request): open, tips, howto, rewrite, poem, "
        "comparison, note, explanation",
    )
    s.add_argument(
        "--start",
        action="append",
        default=[],
        metavar="TEXT",
        help="more first words of a request, e.g. 'Suggest a name for' (repeatable)",
    )
    s.add_argument(
        "--topics",
        type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
        default=(),
        metavar="T,...",
        help="topics (as a system turn)",
    )
    s.add_argument("--system", default=None, metavar="TEXT", help="a system turn for every sample")
    s.add_argument(
        "--avoid",
        action="append",
        default=[],
        metavar="FILE",
        help="prompts the output must not nearly repeat, e.g. the training prompts (repeatable)",
    )
    s.add_argument(
        "--max-samples", type=int, default=None, metavar="N", help="draw at most N (default 4n)"
    )
    s.add_argument("--min-words", type=int, default=4, metavar="N")
    s.add_argument("--max-words", type=int, default=60, metavar="N")
    s.add_argument("--temperature", type=float, default=1.0, metavar="T")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P")
    s.add_argument("--max-tokens", type=int, default=64, metavar="N", help="per request")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", default=None, help="a 'split' field for every record, e.g. train")
    s.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    s.add_argument("--overwrite", action="store_true", help="start over instead of continuing")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run)

    d = sub.add_parser(
        "diversity",
        help="distinct-1/2/3 and near-duplicate share of a prompt set",
        description="How varied a prompt set is: distinct word n-grams over all n-grams "
        "(n = 1, 2, 3) and the share of prompts whose word 3-gram Jaccard with an earlier one "
        "is at least 0.5.",
    )
    d.add_argument("source", metavar="SOURCE", help="prompts: JSONL/Parquet/CSV, dir or hf:NAME")
    d.add_argument("--split", default=None, help="only records with this 'split'")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.data.diversity import diversity
    from lmdistill.pipelines.synthesize import SynthesisSettings, prompt_texts, synthesize_with

    if args.prompts_command == "diversity":
        print(diversity(prompt_texts(args.source, split=args.split)).line())
        return 0
    settings = SynthesisSettings(
        n=args.n,
        kinds=args.kinds,
        starts=tuple(args.start),
        topics=args.topics,
        system=args.system,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        min_words=args.min_words,
        max_words=args.max_words,
        max_samples=args.max_samples,
        seed=args.seed,
        split=args.split,
    )
    summary = synthesize_with(
        args.teacher,
        settings,
        args.out,
        avoid=args.avoid,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        batch_size=args.batch_size,
    )
    print(summary.report())
    return 0
