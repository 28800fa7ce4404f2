"""The report renders: report.json has the documented keys, report.html parses and embeds its
plots as PNG data URIs, report.md holds the tables; training curves appear with a run dir."""

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from lmdistill.eval import lm_eval_adapter, runner
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.report import write_report
from lmdistill.eval.runner import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


# The training run's data as the report finds it through run_dir/config.yaml: two samples of one
# prompt (one prompt, not two), a held-out record (not trained on), and a near-duplicate.
TRAINING_RECORDS = [
    {"messages": [{"role": "user", "content": "How do I boil an egg?"}], "split": "train"},
    {"messages": [{"role": "user", "content": "How do I boil an egg?"}], "split": "train"},
    {"messages": [{"role": "user", "content": "How do I boil an egg"}], "split": "train"},
    {"messages": [{"role": "user", "content": "Write a haiku about rain."}], "split": "train"},
    {"messages": [{"role": "user", "content": "Name a red fruit."}], "split": "test"},
]


@pytest.fixture(scope="module")
def report_dir(tiny_model_dir, tiny_student_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    mc = tmp / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": f"Pick {c}.", "choices": ["a", "b", "c"], "answer": c}) + "\n"
            for c in "abcab"
        )
    )
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "info": {"note": "not a number"}})
        + "\n"
        + "".join(
            json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 100.0 + s}) + "\n"
            for s in range(1, 6)
        )
        + json.dumps({"step": 5, "eval/loss": 0.5})
        + "\n"
    )
    data = tmp / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAINING_RECORDS))
    (run_dir / "config.yaml").write_text(f"data:\n  path: {data}\n  split: train\n")
    sizes = {str(tiny_model_dir): 10_000, str(tiny_student_dir): 1_000}
    patch = pytest.MonkeyPatch()
    # The report must go ahead when a task cannot run: lm-eval is in the dev install (for the
    # serve tests), so its absence is simulated here.
    patch.setattr(lm_eval_adapter, "lm_eval_available", lambda: False)
    patch.setattr(
        runner.cost_module,
        "measure_models",
        lambda specs, **kw: {
            "models": {
                role: {
                    "params_total": sizes[spec],
                    "params_non_embedding": sizes[spec] // 2,
                    "disk_bytes": sizes[spec] * 4,
                    "model_memory_bytes": sizes[spec] * 8,
                    "latency_per_token_s": sizes[spec] / 1e6,
                    "tokens_per_s": 1e6 / sizes[spec],
                    "latency_rounds_s": [sizes[spec] / 1e6 * f for f in (1.0, 1.1, 0.9)],
                    "tokens_per_s_rounds": [1e6 / sizes[spec] * f for f in (1.0, 0.9, 1.1)],
                    "new_tokens": 32,
                    "batch_size": 8,
                }
                for role, spec in specs.items()
            },
            "conditions": {
                "rounds": 3,
                "load_average_before": 0.2,
                "load_average_after": 9.0,  # as if another job started meanwhile
                "cpu_count": 2,
            },
        },
    )
    try:
        results = evaluate(
            str(tiny_student_dir),
            [f"mc-jsonl:{mc}", "lmeval:arc_easy"],
            teacher=str(tiny_model_dir),
            baseline=str(tiny_model_dir),
            settings=EvalSettings(max_tokens=4),
            run_dir=run_dir,
            log=None,
        )
    finally:
        patch.undo()
    out = tmp / "out"
    write_report(results, out)
    return out


def test_report_json_has_the_documented_keys(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    assert {"tasks", "cost", "models", "settings"} <= data.keys()
    (name,) = [n for n in data["tasks"] if n.startswith("mc-jsonl:")]
    task = data["tasks"][name]
    for key in ("teacher", "student", "baseline", "n", "retention", "metrics", "intervals"):
        assert key in task, key
    assert task["n"] == 5
    if task["teacher"] > 0:
        assert task["retention"] == pytest.approx(task["student"] / task["teacher"])
    assert data["tasks"]["lmeval:arc_easy"]["skipped"].startswith(
        "lm-eval-harness is not installed"
    )
    assert data["cost"]["reduction"]["student"]["params"] == pytest.approx(10.0)
    assert data["settings"]["seeds"]["examples"] == 0


def test_report_gives_the_diversity_of_the_prompts_the_student_trained_on(report_dir):
    from dataclasses import asdict

    from lmdistill.data.diversity import diversity

    trained = ["How do I boil an egg?", "How do I boil an egg", "Write a haiku about rain."]
    data = json.loads((report_dir / "report.json").read_text())
    assert data["training_prompts"] == asdict(diversity(trained))
    assert data["training_prompts"]["near_duplicate_share"] == pytest.approx(1 / 3)
    md = (report_dir / "report.md").read_text()
    assert "## Training prompts" in md and "33.3%" in md


def test_report_html_parses_and_embeds_pngs(report_dir):
    parser = Collector()
    parser.feed((report_dir / "report.html").read_text())
    parser.close()
    assert "table" in parser.tags
    assert len(parser.images) == 3  # scores, retention vs size, training curves
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_report_md_and_samples(report_dir):
    text = (report_dir / "report.md").read_text()
    assert "## Scores" in text and "## Cost" in text and "retention (student/teacher)" in text
    assert "skipped" in text
    assert (report_dir / "plots" / "training.png").read_bytes().startswith(PNG_MAGIC)
    samples = list((report_dir / "samples" / "student").glob("*.jsonl"))
    assert len(samples) == 1 and json.loads(samples[0].read_text().splitlines()[0])["id"]


def test_the_cost_table_gives_timed_ratios_with_their_spread_and_flags_a_busy_machine(report_dir):
    """Issue #20: the timed ratios are medians over interleaved rounds, shown with their spread,
    and the load average seen while timing (here 9.0 on 2 CPUs) is said next to the figure."""
    lines = (report_dir / "report.md").read_text().splitlines()
    (latency,) = [line for line in lines if line.startswith("| latency per token")]
    assert "10.00x [10.00, 10.00] ⚠ doubtful: busy machine (load average 9.0 on 2 CPUs)" in latency
    (params,) = [line for line in lines if line.startswith("| parameters |")]
    assert "10.00x |" in params and "⚠" not in params  # counted, not timed: no spread, no flag
    assert "3 rounds; load average 0.2 then 9.0 on 2 CPUs." in "\n".join(lines)


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="headless Chromium is not installed",
)
def test_report_html_opens_in_headless_chromium(report_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            f"--screenshot={shot}",
            (report_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC)
