"""Why on-policy distillation hurts the bench's students: how often each student's greedy answer
ends, and what the teacher predicts inside the answers that do not.

    .venv/bin/python scripts/opd_loops.py                 # reads runs/bench-methods
    .venv/bin/python scripts/opd_loops.py --out DIR --model opd/seed0 --answers 12

Reads the held-out records `bench/methods.py` cached (its eval cache: each student's greedy answer
to the 262 held-out prompts) and prints, per student, the share of answers that ended (an end of
turn within the bench's 96 tokens) and their mean length in words. Then, for the first `--answers`
answers of `--model` that did not end, it runs the bundled teacher over prompt + answer and prints
the teacher's mean probability of the token the student wrote next, over each answer's second
half, and its mean probability of ending the turn there. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmdistill.models import resolve_model_dir
from lmdistill.training.students import load_model_dir

TEACHER = "smollm2-135m-instruct"


def held_out_records(out: Path) -> dict[str, list[dict]]:
    """Student name (METHOD/seedN, a construction under DIR/students, or the teacher's name)
    -> its held-out records."""
    found = {}
    for path in sorted((out / "eval-cache").glob("*/*.json")):
        cached = json.loads(path.read_text())
        if not str(cached.get("task", "")).startswith("rel-jsonl:"):
            continue
        model = str(cached["model"]).removesuffix("/final")
        for part in ("/runs/", "/students/"):
            model = model.split(part, 1)[-1]
        found[model] = cached["records"]
    return found


@torch.no_grad()
def teacher_inside(records: list[dict], count: int) -> dict[str, float]:
    teacher, tokenizer = load_model_dir(resolve_model_dir(TEACHER))
    teacher.eval()
    end = tokenizer.eos_token_id
    looping = [r for r in records if not r["ended"]][:count]
    follow, ending = [], []
    for r in looping:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        log_probs = teacher(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        positions = range(len(prompt_ids) - 1, len(ids) - 1)  # each predicts ids[t + 1]
        second_half = list(positions)[len(positions) // 2 :]
        follow += [float(log_probs[t, ids[t + 1]].exp()) for t in second_half]
        ending += [float(log_probs[t, end].exp()) for t in second_half]
    return {
        "answers": len(looping),
        "teacher_p_student_next": sum(follow) / max(len(follow), 1),
        "teacher_p_end": sum(ending) / max(len(ending), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    p.add_argument("--model", default="opd/seed0", help="the student to look inside (METHOD/seedN)")
    p.add_argument("--answers", type=int, default=12)
    a = p.parse_args(argv)
    students = held_out_records(a.out)
    if a.model not in students:
        raise SystemExit(f"{a.out}: no held-out records for {a.model!r}; have {sorted(students)}")
    ended = {}
    for name, records in sorted(students.items()):
        ended[name] = sum(bool(r["ended"]) for r in records) / len(records)
        words = sum(len(r["response"].split()) for r in records) / len(records)
        print(f"{name:32s} ended {ended[name]:.2f}  words {words:.1f}")
    inside = teacher_inside(students[a.model], a.answers)
    print(
        f"inside {inside['answers']} unended answers of {a.model}: the teacher gives the "
        f"student's next token {inside['teacher_p_student_next']:.3f} and the end of the turn "
        f"{inside['teacher_p_end']:.4f} (mean probability over each answer's second half)"
    )
    print(json.dumps({"ended": ended, a.model: inside}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
