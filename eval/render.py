"""Write a report: REPORT.json plus a Markdown table (REPORT.md) and a chart (REPORT.png) beside it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .report import CapabilityReport, report_json


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(report: CapabilityReport) -> str:
    """Per-category scores (before/after/drop when a baseline was compared) and the detectors."""
    f = report.forgetting
    lines = [f"# Capability report: {report.run_name}", "",
             f"model `{report.model.get('path')}`" + (f" + adapter `{report.model['adapter']}`"
                                                       if report.model.get("adapter") else "")
             + f", suite `{report.suite.get('name')}` {report.suite.get('version', '')} "
               f"({report.suite.get('rows')} rows)", ""]
    if f is None:
        lines += ["| category | n | accuracy |", "|---|---:|---:|"]
        for name, s in sorted(report.categories.items()):
            lines.append(f"| {name} | {s.n} | {s.accuracy:.1f} |")
    else:
        lines += [f"baseline: `{f.baseline_run}`" + ("" if f.max_drop is None else f", max drop {f.max_drop:g} points"),
                  "", "| category | n | before | after | drop | gate |", "|---|---:|---:|---:|---:|---|"]
        for name, c in f.categories.items():
            gate = "n/a" if f.max_drop is None else ("**FAIL**" if c.failed else "pass")
            lines.append(f"| {name} | {report.categories[name].n} | {c.before:.1f} | {c.after:.1f} | "
                         f"{c.drop:+.1f} | {gate} |")
    lines += ["", "| measure | value |", "|---|---:|",
              f"| overall accuracy (micro) | {report.overall_accuracy:.1f} |",
              f"| accuracy (mean of categories) | {report.macro_accuracy:.1f} |"]
    if report.task:
        lines.append(f"| target task `{report.task.name}` | {report.task.accuracy:.1f} |")
    if report.perplexity:
        lines.append(f"| perplexity ({report.perplexity.tokens} tokens) | {report.perplexity.perplexity:.3f} |")
    if report.format_rigidity:
        lines.append(f"| format rigidity (non-task answers in task format) | {report.format_rigidity.rate:.1f} |")
    if report.safety:
        lines.append(f"| refusal rate on refusal rows | {report.safety.refusal_rate:.1f} |")
    if f is not None:
        lines += [f"| mean forgetting | {f.mean_forgetting:+.1f} |",
                  f"| worst forgetting ({f.worst_category}) | {f.worst_forgetting:+.1f} |",
                  f"| target gain | {_fmt(f.target_gain, signed=True)} |"]
        if f.max_drop is not None:
            verdict = "PASS" if f.passed else "FAIL: " + ", ".join(f.failed_categories)
            lines += ["", f"**gate: {verdict}**"]
        for w in f.warnings:
            lines.append(f"\n> warning: {w}")
    return "\n".join(lines) + "\n"


def draw_chart(report: CapabilityReport, path: Path) -> None:
    """Bars per category: after only, or before/after side by side when a baseline was compared."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (CI has no display)
    import matplotlib.pyplot as plt

    names = sorted(report.categories)
    after = [report.categories[n].accuracy for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4.0))
    xs = range(len(names))
    f = report.forgetting
    if f is None:
        ax.bar(list(xs), after, width=0.6, color="tab:blue", label=report.run_name)
    else:
        before = [f.categories[n].before if n in f.categories else float("nan") for n in names]  # no bar
        ax.bar([x - 0.2 for x in xs], before, width=0.4, color="tab:gray", label=f"before ({f.baseline_run})")
        colors = ["tab:red" if n in f.failed_categories else "tab:blue" for n in names]
        ax.bar([x + 0.2 for x in xs], after, width=0.4, color=colors, label=f"after ({report.run_name})")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (points)")
    ax.set_title(f"{report.suite.get('name')}: accuracy per category")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    # mkstemp makes the file 0600; a report is an ordinary output, so it gets the mode a plain
    # open() would give it (0666 minus the umask; reading the umask means setting it back).
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def write_report(report: CapabilityReport, out_path: str | Path) -> dict[str, Path]:
    """Write OUT.json, OUT.md and OUT.png (same stem); returns the three paths."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out, "markdown": out.with_suffix(".md"), "chart": out.with_suffix(".png")}
    if paths["markdown"] == out:  # out_path itself ends in .md: do not overwrite the JSON
        paths["markdown"] = out.with_name(out.name + ".md")
    _atomic_write_text(paths["json"], report_json(report))
    _atomic_write_text(paths["markdown"], markdown_table(report))
    draw_chart(report, paths["chart"])
    return paths
