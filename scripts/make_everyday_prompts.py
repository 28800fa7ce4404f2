"""Write lmdistill/assets/everyday_train.jsonl and everyday_test.jsonl: everyday requests (tips,
how-tos, rewrites, short poems, comparisons, polite notes, explanations, and open Magpie samples)
synthesized by the bundled teacher with `lmdistill prompts synthesize` (issue #21).

    nice -n 5 .venv/bin/python scripts/make_everyday_prompts.py

Two runs of the same command, so the two sets are made the same way:

  train  seed 0, split "train"; must not nearly repeat the bundled prompts (both files)
  test   seed 1, split "test"; must not nearly repeat anything the student trains on or is
         judged on elsewhere: the bundled prompts, prompts_extra_test.jsonl and the train set
         (word 3-gram Jaccard < 0.5 with every one of them; tests/test_everyday_prompts.py
         checks it)

Then the prompts that a reading by hand found not to be real requests (gibberish, a request
that makes no sense, a question to the assistant about itself) are dropped, by id, from
HAND_DROPPED below. The synthesis work files (OUT.raw.jsonl, .meta.json, .stats.json) stay in
runs/everyday-prompts/, so an interrupted run continues. On 2 busy CPU cores a few hundred
samples take most of an hour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "lmdistill" / "assets"
WORK = ROOT / "runs" / "everyday-prompts"
KINDS = "tips,howto,rewrite,poem,comparison,note,explanation,open"
# Two rounds of 32 samples each: what 2 busy cores draw in under an hour. The held-out set keeps
# every sample that passes; the quickstart takes the first 48 of each.
TRAIN_N, TEST_N, SAMPLES = 48, 64, 64

# Read by hand (2026-12-03): samples that are not a request a user would make.
HAND_DROPPED: dict[str, str] = {}


def synthesize(name: str, n: int, seed: int, split: str, avoid: list[Path]) -> Path:
    out = WORK / f"{name}.jsonl"
    command = [
        sys.executable,
        "-m",
        "lmdistill",
        "prompts",
        "synthesize",
        "--teacher",
        "smollm2-135m-instruct",
        "--n",
        str(n),
        "--max-samples",
        str(SAMPLES),
        "--kinds",
        KINDS,
        "--max-tokens",
        "48",
        "--max-words",
        "40",
        "--seed",
        str(seed),
        "--split",
        split,
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    for path in avoid:
        command += ["--avoid", str(path)]
    subprocess.run(command, check=True)
    return out


def publish(work_file: Path, asset: Path) -> int:
    records = [json.loads(line) for line in work_file.read_text().splitlines()]
    kept = [r for r in records if r["id"] not in HAND_DROPPED]
    asset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    print(
        f"{asset.relative_to(ROOT)}: {len(kept)} prompts ({len(records) - len(kept)} dropped by hand)"
    )
    return len(kept)


def main() -> None:
    bundled = [ASSETS / "prompts.jsonl", ASSETS / "prompts_extra_test.jsonl"]
    train = synthesize("everyday_train", TRAIN_N, 0, "train", bundled)
    test = synthesize("everyday_test", TEST_N, 1, "test", [*bundled, train])
    publish(train, ASSETS / "everyday_train.jsonl")
    publish(test, ASSETS / "everyday_test.jsonl")


if __name__ == "__main__":
    main()
