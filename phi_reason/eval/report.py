"""Benchmark report: markdown text (pure) and PNG plots (accuracy by level, length histograms)."""
from __future__ import annotations

import math
import pathlib


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def render_markdown(summary: dict, title: str, settings: dict | None = None) -> str:
    k = summary["samples_per_problem"]
    lines = [f"# {title}", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in settings.items()]
        lines.append("")
    lines += [
        "| metric | value |", "|---|---|",
        f"| problems | {summary['problems']} |",
        f"| samples per problem (K) | {k} |",
        f"| pass@1 (mean over K) | {_pct(summary['pass@1'])} |",
        f"| maj@{k} | {_pct(summary[f'maj@{k}'])} |",
    ]
    lines += [f"| pass@{kk} (unbiased) | {_pct(v)} |" for kk, v in summary["pass@k"].items()]
    lines += [
        f"| mean tokens, correct | {_num(summary['mean_tokens_correct'])} |",
        f"| mean tokens, incorrect | {_num(summary['mean_tokens_incorrect'])} |",
        f"| truncation rate (hit max tokens) | {_pct(summary['truncation_rate'])} |",
        "| grading statuses | " + ", ".join(
            f"{s}: {n}" for s, n in sorted(summary["status_counts"].items())) + " |",
        "",
    ]
    for name, key in (("subject", "by_subject"), ("level", "by_level")):
        groups = summary[key]
        if not groups:
            continue
        lines += [f"## By {name}", "", f"| {name} | problems | pass@1 | maj@{k} |",
                  "|---|---|---|---|"]
        lines += [f"| {g} | {row['problems']} | {_pct(row['pass@1'])} | {_pct(row[f'maj@{k}'])} |"
                  for g, row in groups.items()]
        lines.append("")
    return "\n".join(lines)


def write_plots(summary: dict, records: list[dict], out_dir) -> list[pathlib.Path]:
    """accuracy_by_level.png (when levels exist) and length_hist.png; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from phi_reason.files import atomic_open

    out_dir = pathlib.Path(out_dir)
    written = []

    def save(fig, name):
        path = out_dir / name
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    levels = summary["by_level"]
    if levels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(levels)
        ax.bar(names, [100 * levels[n]["pass@1"] for n in names], color="#4c72b0")
        ax.set_xlabel("level")
        ax.set_ylabel("pass@1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Accuracy by level")
        save(fig, "accuracy_by_level.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ok = [r["num_tokens"] for r in records if r["correct"]]
    bad = [r["num_tokens"] for r in records if not r["correct"]]
    top = max(ok + bad + [1])
    bins = min(40, max(5, int(math.sqrt(len(records)) + 1)))
    ax.hist([ok, bad], bins=bins, range=(0, top), label=["correct", "incorrect"],
            color=["#55a868", "#c44e52"], alpha=0.8)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("responses")
    ax.legend()
    ax.set_title("Response lengths")
    save(fig, "length_hist.png")
    return written


def write_report(summary: dict, records: list[dict], out_dir, title: str,
                 settings: dict | None = None) -> pathlib.Path:
    """report.md plus plots in out_dir; returns the markdown path."""
    from phi_reason.files import atomic_open

    out_dir = pathlib.Path(out_dir)
    plots = write_plots(summary, records, out_dir)
    text = render_markdown(summary, title, settings)
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    path = out_dir / "report.md"
    with atomic_open(path) as f:
        f.write(text)
    return path
