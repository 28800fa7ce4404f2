"""`lmdistill generate`: teacher responses for a file of prompts (`lmdistill.pipelines.generate`)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Generate teacher responses for a set of prompts, one record per (prompt, sample).

Prompts come from a JSONL, Parquet or CSV file, a dir written by datasets' save_to_disk
(DIR[@SPLIT]), or a Hub dataset, streamed (hf:NAME[:CONFIG][@SPLIT]). Each record has "prompt"
(a string) or "messages" (a chat list), an optional "id", and any other fields, which are copied
to the output; --fields reads other shapes (alpaca, dolly, sharegpt, or e.g.
prompt=question,context=passage). Next to OUT go OUT.meta.json (the settings OUT was
made with) and OUT.failed.jsonl (prompts that failed after retries). Run the same command again
to continue after an interruption or to retry failures; responses are cached, so nothing is paid
for twice. Exit status: 0 all done, 1 some prompts failed, 2 an error to fix."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate teacher responses for a file of prompts",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher",
        required=True,
        metavar="SPEC",
        help="bundled name (smollm2-135m-instruct), model dir, Hub name ORG/NAME[@REV], "
        "openai:MODEL, or server URL",
    )
    p.add_argument(
        "--prompts", required=True, metavar="SOURCE", help="the prompts (file, dir or hf:NAME)"
    )
    p.add_argument(
        "--fields",
        default=None,
        metavar="MAP",
        help="field mapping: alpaca, dolly, sharegpt, or KEY=COLUMN,... with keys prompt, "
        "context, response, messages",
    )
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="where the responses go")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--n", type=int, default=1, metavar="N", help="samples per prompt (default 1)"
    )
    sampling.add_argument(
        "--temperature", type=float, default=0.7, metavar="T", help="default 0.7; 0 = greedy"
    )
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P", help="default 1.0")
    sampling.add_argument(
        "--max-tokens", type=int, default=256, metavar="N", help="per response (default 256)"
    )
    sampling.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="sampling seed, if the teacher takes one",
    )
    sampling.add_argument("--system", default=None, metavar="TEXT", help="system prompt to prepend")
    sampling.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        metavar="K",
        help="also save K top log-probs per token",
    )
    api = p.add_argument_group("API teachers (openai:MODEL or a URL)")
    api.add_argument(
        "--base-url", default=None, metavar="URL", help="endpoint (default $OPENAI_BASE_URL)"
    )
    api.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    api.add_argument(
        "--concurrency", type=int, default=None, metavar="N", help="requests in flight (default 16)"
    )
    api.add_argument(
        "--max-retries", type=int, default=None, metavar="N", help="retries per request (default 6)"
    )
    api.add_argument(
        "--retry-base-delay",
        type=float,
        default=None,
        metavar="S",
        help="first backoff in seconds (default 0.5)",
    )
    api.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="per request (default 60)"
    )
    api.add_argument(
        "--price-input", type=float, default=None, metavar="USD_PER_M", help="for the cost estimate"
    )
    api.add_argument(
        "--price-output",
        type=float,
        default=None,
        metavar="USD_PER_M",
        help="for the cost estimate",
    )
    local = p.add_argument_group("local teachers")
    local.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="sequences per batch (default 16)"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="response cache (default $LMDISTILL_RESPONSE_CACHE, else in the user cache dir)",
    )
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    run.add_argument(
        "--overwrite", action="store_true", help="start OUT over, even with other settings"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lmdistill.data.records import field_map
    from lmdistill.pipelines.generate import generate, read_prompts, teacher_spec
    from lmdistill.pipelines.response_cache import ResponseCache, default_cache_path
    from lmdistill.teachers.base import Prices, SamplingParams
    from lmdistill.teachers.registry import load_teacher

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        n=args.n,
        seed=args.seed,
        top_logprobs=args.top_logprobs,
    )
    # Cheap checks first: a bad prompts file should not wait for a model to load.
    prompts = read_prompts(args.prompts, field_map(args.fields))
    given = {
        "api_key_env": args.api_key_env,
        "concurrency": args.concurrency,
        "max_retries": args.max_retries,
        "retry_base_delay_s": args.retry_base_delay,
        "timeout_s": args.timeout,
        "batch_size": args.batch_size,
    }
    # Only the options the user gave: each teacher keeps its own defaults, and one it does not
    # take is reported by name.
    spec, options = teacher_spec(
        args.teacher,
        {key: value for key, value in given.items() if value is not None},
        base_url=args.base_url,
        top_logprobs=args.top_logprobs,
    )
    prices = None
    if args.price_input is not None or args.price_output is not None:
        prices = Prices(args.price_input or 0.0, args.price_output or 0.0)
    teacher = load_teacher(spec, **options)
    cache = None if args.no_cache else ResponseCache(args.cache or default_cache_path())
    try:
        summary = generate(
            teacher,
            prompts,
            args.out,
            params,
            system=args.system,
            cache=cache,
            overwrite=args.overwrite,
            prices=prices,
        )
    finally:
        teacher.close()
        if cache is not None:
            cache.close()
    print(summary.report())
    if summary.complete:
        return 0
    summary.check_reachable(teacher.name)
    print(
        f"lmdistill generate: {summary.failed_samples} samples failed; "
        "run the same command again to retry them",
        file=sys.stderr,
    )
    return 1
