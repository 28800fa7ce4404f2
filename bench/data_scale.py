"""The training data path at scale (issue 13, item 3): synthetic chat data of 10k and 1M examples
through lmdistill's real `Trainer` to its first optimizer step (tokenize into the token cache,
hold out the eval split, pack the first epoch, collate the first micro-batch, one step of a tiny
student), each size in a fresh process: first with an empty token cache (cold: it tokenizes),
then again (warm: it reads the cache).

Tokenizer: the bundled SmolLM2-135M-Instruct's (49,152 tokens, its ChatML template with a default
system prompt); the student: a 2-layer, 64-wide Llama on that vocabulary, so the step itself is
cheap and what is measured is the data path. Records: a user question of 5-30 words and an answer
of 10-80 words (~60-150 tokens rendered), max_length 512, 4096 tokens per micro-batch.

Memory: peak RSS (VmHWM) of each child process, everything included (Python, torch, the
tokenizer, the model); the growth with the data is what the ratio shows.

    .venv/bin/python bench/data_scale.py   # 50 min measured on 2 cores at load ~11 (tokenizing 1M)
    .venv/bin/python bench/data_scale.py --sizes 10000,100000

The last line is one JSON object: rss_ratio_1m_vs_10k (cold runs; the warm ratio beside it),
first_step_s_1m (warm: process start to the end of the first optimizer step),
tokenize_examples_per_s (the cold 1M run's tokenization), and the measurements behind them.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any heavy import: a child's first-step time starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m-instruct"
WORDS = [
    "the",
    "a",
    "model",
    "teacher",
    "student",
    "learns",
    "quickly",
    "from",
    "data",
    "and",
    "then",
    "answers",
    "every",
    "question",
    "about",
    "history",
    "science",
    "river",
    "mountain",
    "light",
    "energy",
    "number",
    "small",
    "large",
    "first",
    "last",
    "because",
    "however",
    "explain",
    "why",
    "how",
    "what",
    "which",
    "water",
    "planet",
    "cell",
    "language",
    "memory",
    "city",
    "music",
    "paint",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-data-scale"))
    p.add_argument("--sizes", default="10000,1000000", help="comma-separated example counts")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--keep-cache", action="store_true", help="skip the cold runs if cached")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    return p.parse_args(argv)


def write_data(path: Path, n: int) -> None:
    """n chat records (JSONL), deterministic, written once."""
    if path.is_file():
        return
    rng = random.Random(n)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 30))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 80))) + "."
            record = {"messages": [{"role": "user", "content": question}], "response": answer}
            out.write(json.dumps(record) + "\n")
    tmp.replace(path)


def student_dir(work: Path) -> Path:
    """A 2-layer, 64-wide Llama with the bundled teacher's tokenizer, saved once."""
    out = work / "student"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmdistill.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(TEACHER))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across
    fork + exec into it, so a child started by a large parent would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this fresh process: Trainer set-up and its first optimizer step."""
    from lmdistill.training import loop
    from lmdistill.training.config import TrainConfig

    tokenizing = {"s": 0.0}
    load = loop.load_examples

    def timed_load(*args, **kwargs):  # what tokenization (or reading the cache) costs
        t = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            tokenizing["s"] += time.perf_counter() - t

    loop.load_examples = timed_load
    config = TrainConfig.model_validate(
        {
            "run_dir": spec["run_dir"],
            "student": {"model": spec["student"]},
            "data": {"path": spec["data"], "max_length": spec["max_length"]},
            "batch": {"tokens_per_micro_batch": 4096},
            "objectives": [{"kind": "sft"}],
            "optim": {"steps": 1},
            "log": {"progress": False, "tensorboard": False},
        }
    )
    trainer = loop.Trainer(config)
    record = trainer.train_step(trainer.step_batches(0))
    first_step = time.perf_counter() - STARTED
    return {
        "first_step_s": round(first_step, 2),
        "load_examples_s": round(tokenizing["s"], 2),
        "peak_rss_mib": round(peak_rss_kib() / 1024, 1),
        "train_examples": trainer.info["train_examples"],
        "micro_batches_epoch0": len(trainer.stream.plan(0)),
        "first_step_tokens": record["tokens"],
    }


def measure(work: Path, size: int, data: Path, student: Path, args, tag: str) -> dict[str, Any]:
    run_dir = work / f"run-{size}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {"run_dir": str(run_dir), "student": str(student), "data": str(data)}
    spec["max_length"] = args.max_length
    env = {**os.environ, "LMDISTILL_TOKEN_CACHE": str(work / "tokens")}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    if out.returncode != 0:
        sys.exit(f"child ({size}, {tag}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{size:>9} examples, {tag}: {result}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    student = student_dir(work)
    if not args.keep_cache:
        shutil.rmtree(work / "tokens", ignore_errors=True)
    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        data = work / f"chat-{size}.jsonl"
        write_data(data, size)
        results[size] = {
            "cold": measure(work, size, data, student, args, "cold"),
            "warm": measure(work, size, data, student, args, "warm"),
        }
    small, large = results[sizes[0]], results[sizes[-1]]
    summary = {
        "sizes": sizes,
        "rss_ratio_1m_vs_10k": round(
            large["cold"]["peak_rss_mib"] / small["cold"]["peak_rss_mib"], 3
        ),
        "rss_ratio_warm": round(large["warm"]["peak_rss_mib"] / small["warm"]["peak_rss_mib"], 3),
        "first_step_s_1m": large["warm"]["first_step_s"],
        "first_step_s_1m_cold": large["cold"]["first_step_s"],
        "tokenize_examples_per_s": round(sizes[-1] / large["cold"]["load_examples_s"], 1),
        "results": {str(k): v for k, v in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
