"""The retention report: what the student kept, and what it costs, side by side with its teacher.

`write_report(results, out_dir)` writes
  report.json   for machines: {"tasks": {NAME: {"teacher", "student", "baseline", "retention",
                "n", intervals, every metric}}, "comparisons": [the student minus each other
                model, with paired intervals and a verdict], "cost": {...}, "models", "settings",
                "training_prompts": the diversity of the prompts the student trained on}
  report.md     the tables, with the plots as PNG files beside it (plots/)
  report.html   one self-contained page: the same tables, the plots embedded as base64 PNGs
  samples/      per model role and task, one JSONL line per example (responses, scores)

Plots (matplotlib, drawn without pyplot so no GUI backend is touched): scores with their
intervals per task and model; retention against parameter count; training curves when the
results name a run dir holding metrics.jsonl.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmdistill.data.jsonl import write_jsonl_atomic
from lmdistill.eval.compare import compare
from lmdistill.eval.results import ROLES, EvalResults, Score, TaskResult
from lmdistill.store.atomic import (
    read_jsonl_tolerant,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

_ROLE_COLOURS = {"teacher": "#1f77b4", "student": "#d62728", "baseline": "#7f7f7f"}
_EXTRA_COLOURS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
_LOWER_IS_BETTER = frozenset({"kl", "perplexity"})
_MAX_CURVES = 8


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


# --------------------------------------------------------------------------------- json
def _interval(score: Score | None) -> list[float] | None:
    return None if score is None else [score.low, score.high]


def task_json(task: TaskResult) -> dict[str, Any]:
    """One task's entry of report.json."""
    entry: dict[str, Any] = {
        "kind": task.kind,
        "metric": task.primary,
        "higher_is_better": task.higher_is_better,
        "description": task.description,
    }
    if task.skipped is not None:
        return {**entry, "skipped": task.skipped}
    headline = task.results.get("student") or next(iter(task.results.values()))
    entry["n"] = headline.metrics[task.primary].n
    for role, result in task.results.items():
        entry[role] = result.metrics[task.primary].value
    entry["intervals"] = {
        r: _interval(res.metrics[task.primary]) for r, res in task.results.items()
    }
    for role, score in task.retention.items():
        prefix = "" if role == "student" else f"{role}_"
        entry[f"{prefix}retention"] = None if score is None else score.value
        entry[f"{prefix}retention_interval"] = _interval(score)
    metrics: dict[str, dict[str, Any]] = {}
    for role, result in task.results.items():
        for name, score in result.metrics.items():
            metrics.setdefault(name, {})[role] = {
                "value": score.value,
                "low": score.low,
                "high": score.high,
                "n": score.n,
                "method": score.method,
            }
    entry["metrics"] = metrics
    entry["details"] = {r: res.details for r, res in task.results.items()}
    entry["seconds"] = {r: res.seconds for r, res in task.results.items()}
    entry["cached"] = {r: res.cached for r, res in task.results.items()}
    entry["tokens"] = {
        r: {"prompt": res.prompt_tokens, "completion": res.completion_tokens}
        for r, res in task.results.items()
    }
    return entry


def report_json(results: EvalResults) -> dict[str, Any]:
    return {
        "lmdistill_version": results.version,
        "created": results.created,
        "seconds": results.seconds,
        "models": {
            role: {"spec": m.spec, "fingerprint": m.fingerprint}
            for role, m in results.models.items()
        },
        "settings": results.settings,
        "tasks": {task.name: task_json(task) for task in results.tasks},
        "comparisons": [c.to_json() for c in compare(results, confidence=_confidence(results))],
        "cost": results.cost,
        "run_dir": results.run_dir,
        "training_prompts": training_prompts_json(results),
    }


# ----------------------------------------------------------------- training prompt diversity
def training_prompts(results: EvalResults) -> list[str] | None:
    """The user turns the student trained on, when the results name a training run whose saved
    config points at a readable data file (its `data.split` applied); else None."""
    if not results.run_dir:
        return None
    import yaml

    from lmdistill.data.records import iter_records

    try:
        config = yaml.safe_load((Path(results.run_dir) / "config.yaml").read_text())
        data = config["data"]
        split = data.get("split")
        texts = []
        for _, record in iter_records(data["path"]):
            if split is not None and record.get("split") != split:
                continue
            messages = record.get("messages")
            if isinstance(messages, list):
                texts += [m["content"] for m in messages if m.get("role") == "user"]
            elif isinstance(record.get("prompt"), str):
                texts.append(record["prompt"])
    except Exception:  # a moved or rewritten run dir: the report is written without it
        return None
    # One record per (prompt, sample): a prompt sampled n times is one prompt, not n.
    return list(dict.fromkeys(texts)) or None


def training_prompts_json(results: EvalResults) -> dict[str, Any] | None:
    from lmdistill.data.diversity import diversity

    texts = training_prompts(results)
    return asdict(diversity(texts)) if texts else None


def diversity_table(results: EvalResults) -> Table | None:
    d = training_prompts_json(results)
    if d is None:
        return None
    rows = [
        [
            str(d["prompts"]),
            f"{d['distinct_1']:.3f}",
            f"{d['distinct_2']:.3f}",
            f"{d['distinct_3']:.3f}",
            f"{d['near_duplicate_share']:.1%}",
        ]
    ]
    return Table(
        "Training prompts",
        ["prompts", "distinct-1", "distinct-2", "distinct-3", "near-duplicates"],
        rows,
        note=(
            "How varied the prompts the student trained on are: distinct word n-grams over all "
            "n-grams, and the share of prompts whose word 3-gram Jaccard with an earlier one is "
            f"at least {d['threshold']} (a set of templates scores low on both counts)."
        ),
    )


# ------------------------------------------------------------------------------- tables
def _fmt(score: Score | None) -> str:
    if score is None:
        return "–"
    if score.method in ("exact", "point"):
        return f"{score.value:.3f}"
    return f"{score.value:.3f} [{score.low:.3f}, {score.high:.3f}]"


def _roles(results: EvalResults) -> list[str]:
    """Teacher, student, baseline, then any extra models, in the order they were evaluated."""
    return [
        *(r for r in ROLES if r in results.models),
        *(r for r in results.models if r not in ROLES),
    ]


def scores_table(results: EvalResults) -> Table:
    roles = _roles(results)
    others = [r for r in roles if r != "teacher"] if "teacher" in roles else []
    headers = ["task", "metric", "n", *roles, *(f"retention ({r}/teacher)" for r in others)]
    rows = []
    for task in results.tasks:
        if task.skipped is not None:
            rows.append([task.name, task.primary, "–", *(["skipped"] * (len(headers) - 3))])
            continue
        n = next(iter(task.results.values())).metrics[task.primary].n
        cells = [
            _fmt(task.results[r].metrics.get(task.primary)) if r in task.results else "–"
            for r in roles
        ]
        retention = [_fmt(task.retention.get(r)) for r in others]
        rows.append([task.name, task.primary, str(n), *cells, *retention])
    return Table(
        "Scores",
        headers,
        rows,
        f"value [{_confidence(results):.0%} interval]; retention = student / teacher on the same "
        "examples, with a paired bootstrap interval.",
    )


def comparisons_table(results: EvalResults) -> Table | None:
    """The student minus each other non-teacher model, per task and metric (`compare.py`)."""
    found = compare(results, confidence=_confidence(results))
    if not found:
        return None
    rows = [
        [
            c.task,
            c.metric + ("" if c.higher_is_better else " (lower is better)"),
            c.other,
            f"{c.difference.value:+.3f} [{c.difference.low:+.3f}, {c.difference.high:+.3f}]",
            str(c.difference.n),
            c.verdict,
        ]
        for c in found
    ]
    return Table(
        "Student against the other models",
        ["task", "metric", "against", "student minus it", "n", "verdict"],
        rows,
        f"Paired over the same examples, {_confidence(results):.0%} bootstrap interval; "
        "'better' or 'worse' only when the interval excludes 0.",
    )


def _confidence(results: EvalResults) -> float:
    return float(results.settings.get("confidence", 0.95))


def metrics_table(results: EvalResults) -> Table:
    roles = _roles(results)
    rows = []
    for task in results.tasks:
        if task.skipped is not None:
            continue
        names = list(dict.fromkeys(n for res in task.results.values() for n in res.metrics))
        for name in names:
            arrow = " (lower is better)" if name in _LOWER_IS_BETTER else ""
            cells = [
                _fmt(task.results[r].metrics.get(name)) if r in task.results else "–" for r in roles
            ]
            rows.append([task.name, name + arrow, *cells])
    return Table("All metrics", ["task", "metric", *roles], rows)


def details_table(results: EvalResults) -> Table:
    roles = _roles(results)
    rows = []
    for task in results.tasks:
        if task.skipped is not None:
            rows.append([task.name, *([task.skipped] + ["–"] * (len(roles) - 1))])
            continue
        cells = []
        for role in roles:
            result = task.results.get(role)
            if result is None:
                cells.append("–")
                continue
            parts = [f"{k}={_short(v)}" for k, v in result.details.items()]
            parts.append("cached" if result.cached else f"{result.seconds:.1f} s")
            cells.append(", ".join(parts))
        rows.append([task.name, *cells])
    return Table("Run details", ["task", *roles], rows)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "–"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "–"


# (label, key in a model's cost entry, formatter, key in `reduction`)
_COST_ROWS: tuple[tuple[str, str, Any, str | None], ...] = (
    ("parameters", "params_total", _count, "params"),
    ("parameters without embeddings", "params_non_embedding", _count, "non_embedding_params"),
    ("disk size", "disk_bytes", _bytes, "disk"),
    ("model memory while generating", "model_memory_bytes", _bytes, "model_memory"),
    ("peak RSS of the whole process", "peak_rss_bytes", _bytes, None),
    (
        "latency per token, batch 1 (ms)",
        "latency_per_token_s",
        lambda v: _number(v * 1000 if isinstance(v, int | float) else v, ".1f"),
        "latency_per_token",
    ),
    ("tokens/s, batched", "tokens_per_s", lambda v: _number(v, ".1f"), "throughput"),
    ("evaluation input tokens", "eval_prompt_tokens", _count, None),
    ("evaluation output tokens", "eval_completion_tokens", _count, None),
    ("API spend on this evaluation (USD)", "spend_usd", lambda v: _number(v, ".4f"), "api_spend"),
)


def cost_table(results: EvalResults) -> Table | None:
    cost = results.cost
    if not cost:
        return None
    roles = [r for r in _roles(results) if r in cost["models"]]
    others = [r for r in roles if r != "teacher"] if "teacher" in roles else []
    headers = ["", *roles, *(f"teacher / {r}" for r in others)]
    rows = []
    for label, key, fmt, reduction_key in _COST_ROWS:
        values = [cost["models"][r].get(key) for r in roles]
        if all(v is None for v in values):
            continue
        ratios = []
        for role in others:
            ratio = cost.get("reduction", {}).get(role, {}).get(reduction_key or "")
            ratios.append(_ratio_cell(cost, role, reduction_key, ratio))
        rows.append([label, *(fmt(v) for v in values), *ratios])
    machine = cost.get("machine", {})
    first = cost["models"][roles[0]] if roles else {}
    note = (
        f"Measured on {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} CPUs"
        f"{', GPU ' + machine['gpu'] if machine.get('gpu') else ''}), torch {machine.get('torch', '?')}, "
        f"{first.get('new_tokens', '?')} greedy tokens per prompt, batch {first.get('batch_size', '?')}. "
        "Ratios say how many times cheaper (or faster, for tokens/s) each model is than the "
        "teacher; a timed ratio is the median over rounds in which the models ran in turn "
        "[lowest, highest round], flagged when the rounds or the machine's load make it doubtful."
    )
    shared = [
        f"{r} as {cost['models'][r]['timed_as']}"
        for r in roles
        if cost["models"][r].get("timed_as")
    ]
    if shared:
        note += (
            f" Timed once per model shape (the same config and dtype decode the same tokens at "
            f"the same cost): {', '.join(shared)}."
        )
    conditions = cost.get("conditions", {})
    if conditions.get("rounds"):
        loads = [
            conditions.get(k)
            for k in ("load_average_before", "load_average_after")
            if isinstance(conditions.get(k), int | float)
        ]
        note += f" {conditions['rounds']} rounds" + (
            f"; load average {' then '.join(f'{x:.1f}' for x in loads)} on "
            f"{conditions.get('cpu_count', '?')} CPUs."
            if loads
            else "."
        )
    if "prices" in cost:
        p = cost["prices"]
        note += (
            f" Prices: {p['input_per_m']} / {p['output_per_m']} USD per million input / output "
            f"tokens, for the {p['applies_to']}."
        )
    return Table("Cost", headers, rows, note)


def _ratio_cell(cost: dict[str, Any], role: str, name: str | None, ratio: Any) -> str:
    """ "2.70x", or for a timing measured in rounds "2.70x [2.51, 2.93]", with a warning when the
    rounds or the load make it doubtful (`cost.noise`)."""
    from lmdistill.eval.cost import noise

    if not isinstance(ratio, int | float):
        return "–"
    cell = f"{ratio:.2f}x"
    spread = cost.get("spread", {}).get(role, {}).get(name or "")
    if spread:
        cell += f" [{spread[0]:.2f}, {spread[1]:.2f}]"
        doubt = noise(cost, role, name or "")
        if doubt:
            cell += f" ⚠ doubtful: {doubt}"
    return cell


def models_table(results: EvalResults) -> Table:
    rows = [[role, m.spec, m.fingerprint] for role, m in results.models.items()]
    return Table("Models", ["role", "model", "fingerprint"], rows)


def all_tables(results: EvalResults) -> list[Table]:
    tables = [models_table(results), scores_table(results)]
    comparisons = comparisons_table(results)
    if comparisons is not None:
        tables.append(comparisons)
    tables.append(metrics_table(results))
    cost = cost_table(results)
    if cost is not None:
        tables.append(cost)
    diverse = diversity_table(results)
    if diverse is not None:
        tables.append(diverse)
    tables.append(details_table(results))
    return tables


# -------------------------------------------------------------------------------- plots
def figure_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_scores(results: EvalResults) -> bytes | None:
    """Each task's headline metric per model, with its interval."""
    from matplotlib.figure import Figure

    tasks = [t for t in results.tasks if t.skipped is None and t.results]
    if not tasks:
        return None
    roles = _roles(results)
    fig = Figure(figsize=(7.5, 0.6 + 0.55 * len(tasks) * max(1, len(roles)) / 1.5))
    ax = fig.add_subplot()
    step = 0.8 / max(1, len(roles))
    for j, role in enumerate(roles):
        ys, xs, lo, hi = [], [], [], []
        for i, task in enumerate(tasks):
            score = task.results[role].metrics[task.primary] if role in task.results else None
            if score is None:
                continue
            ys.append(i - 0.4 + step * (j + 0.5))
            xs.append(score.value)
            lo.append(max(0.0, score.value - score.low))
            hi.append(max(0.0, score.high - score.value))
        ax.errorbar(
            xs,
            ys,
            xerr=[lo, hi],
            fmt="o",
            capsize=3,
            color=_ROLE_COLOURS.get(role, _EXTRA_COLOURS[j % len(_EXTRA_COLOURS)]),
            label=role,
        )
    ax.set_yticks(range(len(tasks)), [f"{t.name}\n({t.primary})" for t in tasks])
    ax.invert_yaxis()
    ax.set_xlabel(f"score ({_confidence(results):.0%} interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("Scores per task")
    return figure_png(fig)


def plot_retention_vs_size(results: EvalResults) -> bytes | None:
    """Retention of each task against each model's parameter count (the teacher at 1)."""
    from matplotlib.figure import Figure

    cost = results.cost or {}
    sizes = {
        role: data.get("params_total")
        for role, data in cost.get("models", {}).items()
        if isinstance(data.get("params_total"), int)
    }
    tasks = [t for t in results.tasks if t.retention and any(t.retention.values())]
    if "teacher" not in sizes or not tasks:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for task in tasks:
        points = [(sizes["teacher"], 1.0, 0.0, 0.0)]
        for role, score in task.retention.items():
            if score is not None and role in sizes:
                points.append(
                    (sizes[role], score.value, score.value - score.low, score.high - score.value)
                )
        points.sort()
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[[max(0.0, p[2]) for p in points], [max(0.0, p[3]) for p in points]],
            fmt="o-",
            capsize=3,
            label=task.name,
        )
    by_size: dict[int, list[str]] = {}
    for role, size in sizes.items():
        by_size.setdefault(size, []).append(role)
    for size, roles in by_size.items():  # models of one size share a label
        ax.annotate(
            ", ".join(roles),
            (size, 0),
            xycoords=("data", "axes fraction"),
            xytext=(2, 4),
            textcoords="offset points",
            fontsize="small",
        )
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the role labels at either end
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("parameters")
    ax.set_ylabel("retention (score / teacher's)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Retention vs size")
    return figure_png(fig)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a training run's metrics.jsonl, through the one tolerant reader: a run
    being written (or killed) may end in a partial line, dropped here without a warning."""
    return [r for _, r in read_jsonl_tolerant(run_dir / "metrics.jsonl", warn=lambda _: None)]


def _curve_order(name: str) -> tuple[int, str]:
    return (0 if "loss" in name and "/" not in name else 1 if name.startswith("eval/") else 2, name)


def plot_training(run_dir: Path) -> bytes | None:
    """Every numeric series of metrics.jsonl against the step, losses first (at most 8)."""
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        step = record.get("step", index)
        for key, value in record.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if key != "step" and numeric and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    names = sorted(series, key=_curve_order)[:_MAX_CURVES]
    if not names:
        return None
    columns = min(2, len(names))
    rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(4.2 * columns, 2.6 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        xs, ys = series[name]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("step", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    fig.tight_layout()
    return figure_png(fig)


def all_plots(results: EvalResults) -> dict[str, bytes]:
    plots = {
        "scores": plot_scores(results),
        "retention_vs_size": plot_retention_vs_size(results),
    }
    if results.run_dir is not None:
        plots["training"] = plot_training(Path(results.run_dir))
    return {name: png for name, png in plots.items() if png is not None}


# ------------------------------------------------------------------------------ render
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: EvalResults, tables: list[Table], plots: dict[str, bytes]) -> str:
    lines = [
        "# lmdistill evaluation report",
        "",
        f"Created {results.created} by lmdistill {results.version} in {results.seconds:.0f} s. "
        f"{_settings_line(results)}",
        "",
    ]
    for table in tables:
        lines += [f"## {table.title}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
        lines.append("|" + "---|" * len(table.headers))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        if table.note:
            lines += ["", table.note]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name}](plots/{name}.png)" for name in plots]
        lines.append("")
    return "\n".join(lines)


def _settings_line(results: EvalResults) -> str:
    s = results.settings
    limit = s.get("limit") or "task default"
    decoding = "greedy" if not s.get("temperature") else f"temperature {s['temperature']}"
    return (
        f"Settings: limit {limit}, {s.get('n_samples', 1)} sample(s) per prompt ({decoding}), "
        f"max {s.get('max_tokens')} tokens, seed {s.get('seed')}."
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:72rem;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 .3rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
p.note{color:#555;font-size:.85rem;max-width:60rem}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
"""


def render_html(results: EvalResults, tables: list[Table], plots: dict[str, bytes]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>lmdistill evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lmdistill evaluation report</h1>",
        f"<p>Created {e(results.created)} by lmdistill {e(results.version)} in "
        f"{results.seconds:.0f} s. {e(_settings_line(results))}</p>",
    ]
    for table in tables:
        parts.append(f"<h2>{e(table.title)}</h2><table><thead><tr>")
        parts += [f"<th>{e(h)}</th>" for h in table.headers]
        parts.append("</tr></thead><tbody>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
        if table.note:
            parts.append(f'<p class="note">{e(table.note)}</p>')
    if plots:
        parts.append("<h2>Plots</h2>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"


def write_samples(results: EvalResults, out_dir: Path) -> None:
    for task in results.tasks:
        for role, result in task.results.items():
            if not result.records:
                continue
            path = out_dir / "samples" / role / f"{_slug(task.name)}.jsonl"
            write_jsonl_atomic(path, result.records)


def write_report(results: EvalResults, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md (+ plots/*.png), report.html and samples/ into `out_dir`
    (see the module docstring). Returns the paths of the three reports.

    Each file is written atomically (`lmdistill.store`), report.md last, so a report.md that
    exists has every other file beside it; `lmdistill run` also builds the whole dir aside."""
    out = Path(out_dir)
    tables = all_tables(results)
    plots = all_plots(results)
    for name, png in plots.items():
        write_bytes_atomic(out / "plots" / f"{name}.png", png)
    write_samples(results, out)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "html": out / "report.html",
    }
    write_json_atomic(paths["json"], report_json(results))
    write_text_atomic(paths["html"], render_html(results, tables, plots))
    write_text_atomic(paths["markdown"], render_markdown(results, tables, plots))
    return paths
