"""`lmdistill cache-logits`: the teacher's top-k log-probs for training data, stored once
(`lmdistill.teachers.cache.build_cache`)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the teacher once over a training data file and store its top-k log-probs at every position
that has a training target, in sharded memory-mapped files under DIR. A recipe then trains with
teacher.cache: DIR and no teacher loaded. Rerun the same command to resume an interrupted cache
(complete shards are kept). The data's records are those `lmdistill train` reads (messages +
response, or messages with assistant turns); they are rendered with the teacher's tokenizer, and
training refuses a cache made with another tokenizer.

The cache is compact by default: per position the fewest of the top-k tokens whose probabilities
sum to --mass, ids bit-packed to the vocabulary's width, log-probs in 8 bits relative to the
top-1 (within 1/32 nat); ~51 bytes/token at k = 32 on SmolLM2. --exact writes every top-k
log-prob in float16 (128 bytes/token at k = 32), the layout of lmdistill before issue #20."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-logits",
        help="cache the teacher's top-k log-probs for training data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher", required=True, metavar="SPEC", help="bundled name, model dir or Hub name"
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="training records: JSONL, Parquet or CSV, a save_to_disk dir, or hf:NAME",
    )
    p.add_argument(
        "--fields",
        default=None,
        metavar="MAP",
        help="field mapping, as the recipe's data.fields (alpaca, dolly, sharegpt, KEY=COLUMN,...)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the cache dir")
    p.add_argument("--top-k", type=int, default=32, metavar="K", help="default %(default)s")
    p.add_argument(
        "--mass",
        type=float,
        default=None,
        metavar="P",
        # The default is lmdistill.teachers.cache.DEFAULT_MASS (not imported here: it loads torch).
        help="keep per position the fewest top tokens whose probabilities sum to P, at most K "
        "(default 0.96; 1 keeps all K)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="every top-k log-prob in float16, fixed k (the larger layout of earlier versions)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        metavar="N",
        help="tokens per example, as in the recipe's data.max_length (default %(default)s)",
    )
    p.add_argument(
        "--tokens-per-batch", type=int, default=8192, metavar="N", help="default %(default)s"
    )
    p.add_argument(
        "--examples-per-shard", type=int, default=2048, metavar="N", help="default %(default)s"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from lmdistill.data.records import field_map
    from lmdistill.teachers.cache import build_cache
    from lmdistill.teachers.registry import load_teacher

    hf_logging.disable_progress_bar()
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    fields = field_map(args.fields)  # a bad mapping is reported before the teacher loads
    teacher = load_teacher(args.teacher, **options)
    report = build_cache(
        teacher,
        args.data,
        args.out,
        top_k=args.top_k,
        max_length=args.max_length,
        examples_per_shard=args.examples_per_shard,
        tokens_per_batch=args.tokens_per_batch,
        fields=fields,
        mass=args.mass,
        exact=args.exact,
    )
    print(
        f"cached {report.positions} positions in {report.shards} shards "
        f"({report.shards_skipped} already complete) to {report.out_dir}: "
        f"{report.bytes_per_token:.1f} bytes/token, {report.seconds:.1f} s"
    )
    return 0
