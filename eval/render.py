"""Write a report: REPORT.json plus a Markdown table (REPORT.md) and a chart (REPORT.png) beside it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .gate import category_rows
from .paired import min_detectable_drop, score_interval
from .report import CapabilityReport, report_json


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


SIGN_NOTE = ("forgetting = accuracy before - after; format-rigidity rise = rigidity after - before; "
             "both in points, positive = worse")
STATS_NOTE = ("95% CI: paired bootstrap over the category's rows (before and after resampled together); "
              "McNemar p: exact, from the rows only one model got right; min detectable drop: 80% power, "
              "two-sided alpha 0.05, at the base's score (eval/README.md)")


def _interval(ci: list[float] | None, signed: bool = True) -> str:
    if ci is None:
        return "n/a"
    return f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if signed else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def _detectable(mdd: float | None, base_score: float) -> str:
    """The min detectable drop; marked when it is above the base score (no loss can show)."""
    if mdd is None:
        return "n/a"
    return f"{mdd:.1f}" + (" (none detectable)" if mdd > base_score else "")


def _p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown_table(report: CapabilityReport) -> str:
    """Per-category scores (before/after/forgetting when a baseline was compared), format
    rigidity beside them, and the detectors."""
    f = report.forgetting
    lines = [f"# Capability report: {report.run_name}", "",
             f"model `{report.model.get('path')}`" + (f" + adapter `{report.model['adapter']}`"
                                                       if report.model.get("adapter") else "")
             + f", suite `{report.suite.get('name')}` {report.suite.get('version', '')} "
               f"({report.suite.get('rows')} rows)", ""]
    rigidity = report.format_rigidity
    if f is None:
        rows = category_rows(report)
        lines += ["| category | n | accuracy | 95% CI | min detectable drop |", "|---|---:|---:|---:|---:|"]
        for name, s in sorted(report.categories.items()):
            outcomes = [float(bool(r.correct)) for r in rows.get(name, [])]
            ci = score_interval(outcomes) if len(outcomes) == s.n and s.n else None  # rows that make the score
            lines.append(f"| {name} | {s.n} | {s.accuracy:.1f} | {_interval(ci, signed=False)} | "
                         f"{_detectable(min_detectable_drop(s.n, s.accuracy), s.accuracy)} |")
        if rigidity:
            lines.append(f"| format rigidity (lower = better) | {rigidity.n} | {rigidity.rate:.1f} | | |")
        lines += ["", f"_95% CI: bootstrap over the category's rows; min detectable drop: the smallest loss a "
                      f"gate against this model can see on these rows ({STATS_NOTE.split('; ')[-1]})._"]
    else:
        bounds = []
        if f.max_drop is not None:
            bounds.append(f"max forgetting {f.max_drop:g} points per category")
        if f.max_format_rigidity is not None:
            bounds.append(f"max format-rigidity rise {f.max_format_rigidity:g} points")
        if f.max_drop is not None:
            bounds.append(f"gate rule **{f.gate}**" + (" (drop over the bound AND its 95% interval above 0)"
                                                      if f.gate == "significant" else " (the drop alone)"))
        lines += [f"baseline: `{f.baseline_run}`" + ("" if not bounds else ", " + ", ".join(bounds)), "",
                  "| category | n | before | after | forgetting (+ = worse) | gate | 95% CI of forgetting | "
                  "McNemar p | min detectable drop |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for name, c in f.categories.items():
            gate = "n/a" if f.max_drop is None else ("**FAIL**" if c.failed else "pass")
            lines.append(f"| {name} | {report.categories[name].n} | {c.before:.1f} | {c.after:.1f} | "
                         f"{c.drop:+.1f} | {gate} | {_interval(c.drop_ci95)} | {_p_value(c.mcnemar_p)} | "
                         f"{_detectable(c.min_detectable_drop, c.before)} |")
        if f.format_rigidity_before is not None and f.format_rigidity_after is not None:
            gate = ("n/a" if f.max_format_rigidity is None
                    else ("**FAIL**" if f.format_rigidity_failed else "pass"))
            rise = f.format_rigidity_after - f.format_rigidity_before
            lines.append(f"| format rigidity (rise = after - before) | {rigidity.n if rigidity else ''} | "
                         f"{f.format_rigidity_before:.1f} | {f.format_rigidity_after:.1f} | {rise:+.1f} | {gate} "
                         f"| | | |")
        lines += ["", f"_{SIGN_NOTE}; {STATS_NOTE}._"]
    lines += ["", "| measure | value |", "|---|---:|",
              f"| overall accuracy (micro) | {report.overall_accuracy:.1f} |",
              f"| accuracy (mean of categories) | {report.macro_accuracy:.1f} |"]
    if report.task:
        lines.append(f"| target task `{report.task.name}` | {report.task.accuracy:.1f} |")
    if report.perplexity:
        lines.append(f"| perplexity ({report.perplexity.tokens} tokens) | {report.perplexity.perplexity:.3f} |")
    if rigidity:
        lines.append(f"| format rigidity (non-task answers in task format) | {rigidity.rate:.1f} |")
    if report.safety:
        lines.append(f"| refusal rate on refusal rows | {report.safety.refusal_rate:.1f} |")
    if f is not None:
        mean_ci = f" {_interval(f.mean_drop_ci95)}" if f.mean_drop_ci95 is not None else ""
        lines += [f"| mean forgetting (before - after, + = worse) | {f.mean_forgetting:+.1f}{mean_ci} |",
                  f"| worst forgetting ({f.worst_category}; before - after) | {f.worst_forgetting:+.1f} |",
                  f"| target gain (after - before, + = better) | {_fmt(f.target_gain, signed=True)} |"]
        if f.mean_min_detectable_drop is not None:
            lines.append(f"| min detectable mean forgetting ({f.n_pairs} paired rows) | "
                         f"{f.mean_min_detectable_drop:.1f} |")
        if f.gated:
            failed = (["format rigidity"] if f.format_rigidity_failed else []) + f.failed_categories
            verdict = "PASS" if f.passed else "FAIL: " + ", ".join(failed)
            lines += ["", f"**gate: {verdict}**"]
        for w in f.warnings:
            lines.append(f"\n> warning: {w}")
    return "\n".join(lines) + "\n"


# One colour per meaning, on every chart: the legend always says what each swatch is.
BEFORE_COLOR, PASS_COLOR, FAIL_COLOR = "tab:gray", "tab:blue", "tab:red"
RIGIDITY_HATCH = "//"
RIGIDITY_LABEL = "format rigidity"


def chart_figure(report: CapabilityReport):
    """The report's chart as a matplotlib Figure (the caller saves and closes it).

    Bars per category (accuracy, higher = better) and, when measured, a hatched format-rigidity
    group at the right (share of non-task answers in the task's format, higher = worse).  With
    a baseline: grey before bars, after bars blue when within the gate (or not gated) and red
    when they failed it; the number above each pair is its forgetting (before - after) or, for
    format rigidity, its rise (after - before): positive = worse in both.  A dashed line marks
    the format-rigidity bound (before + the allowed rise) when that gate was asked for.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (CI has no display)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = sorted(report.categories)
    f = report.forgetting
    rigidity = report.format_rigidity
    labels = names + ([RIGIDITY_LABEL] if rigidity else [])
    after = [report.categories[n].accuracy for n in names] + ([rigidity.rate] if rigidity else [])
    hatches = [""] * len(names) + [RIGIDITY_HATCH] * bool(rigidity)
    width = max(4.0, 0.9 * len(labels) + 1.5)
    if f is None:
        fig, ax = plt.subplots(figsize=(width, 4.4))
    else:  # a second panel below: each category's forgetting with its paired 95% interval
        fig, (ax, drop_ax) = plt.subplots(2, 1, figsize=(width, 7.6), gridspec_kw={"height_ratios": [3, 2]})
    xs = list(range(len(labels)))
    handles = []
    if f is None:
        ax.bar(xs, after, width=0.6, color=PASS_COLOR, hatch=hatches, edgecolor="black", linewidth=0.5)
        handles.append(Patch(facecolor=PASS_COLOR, edgecolor="black", linewidth=0.5, label=report.run_name))
    else:
        before = [f.categories[n].before if n in f.categories else float("nan") for n in names]  # nan: no bar
        failed = [n in f.failed_categories for n in names]
        if rigidity:
            before.append(f.format_rigidity_before if f.format_rigidity_before is not None else float("nan"))
            failed.append(f.format_rigidity_failed)
        ax.bar([x - 0.2 for x in xs], before, width=0.4, color=BEFORE_COLOR, hatch=hatches, edgecolor="black",
               linewidth=0.5)
        ax.bar([x + 0.2 for x in xs], after, width=0.4, color=[FAIL_COLOR if bad else PASS_COLOR for bad in failed],
               hatch=hatches, edgecolor="black", linewidth=0.5)
        worse = [f.categories[n].drop if n in f.categories else None for n in names]
        if rigidity:
            worse.append(f.format_rigidity_rise if f.format_rigidity_rise is not None else
                         (None if f.format_rigidity_before is None else rigidity.rate - f.format_rigidity_before))
        for x, value, b, a in zip(xs, worse, before, after, strict=True):
            if value is not None:
                top = max(a, b if b == b else 0.0)  # b == b: not nan
                ax.text(x, min(top, 100.0) + 1.5, f"{value:+.1f}", ha="center", va="bottom", fontsize=7)
        handles += [Patch(facecolor=BEFORE_COLOR, edgecolor="black", linewidth=0.5, label=f"before ({f.baseline_run})")]
        if f.gated:
            handles += [Patch(facecolor=PASS_COLOR, edgecolor="black", linewidth=0.5,
                              label=f"after ({report.run_name}): within the gate"),
                        Patch(facecolor=FAIL_COLOR, edgecolor="black", linewidth=0.5,
                              label=f"after ({report.run_name}): failed the gate")]
        else:
            handles.append(Patch(facecolor=PASS_COLOR, edgecolor="black", linewidth=0.5,
                                 label=f"after ({report.run_name}), not gated"))
        if rigidity and f.max_format_rigidity is not None and f.format_rigidity_before is not None:
            bound = f.format_rigidity_before + f.max_format_rigidity
            x = xs[-1]
            ax.hlines(min(bound, 104.0), x - 0.45, x + 0.45, colors="black", linestyles="dashed", linewidth=1.2)
            handles.append(Line2D([], [], color="black", linestyle="dashed", linewidth=1.2,
                                  label=f"format-rigidity bound (before + {f.max_format_rigidity:g})"))
    if rigidity:
        ax.axvline(len(names) - 0.5, color="gray", linewidth=0.5)
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=RIGIDITY_HATCH, linewidth=0.5,
                             label="hatched: format rigidity (higher = worse)"))
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylim(0, 110)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    ax.set_ylabel("points\naccuracy: higher = better" + ("; format rigidity: lower = better" if rigidity else ""),
                  fontsize=8)
    title = f"{report.suite.get('name')}: accuracy per category"
    if f is not None:
        title += ("\nabove the bars: forgetting (before - after)"
                  + ("; rigidity rise (after - before)" if rigidity else "") + "; + = worse")
    ax.set_title(title, fontsize=9)
    # Outside the axes, so that no bar is hidden; savefig(bbox_inches="tight") keeps it in the file.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    if f is not None:
        _draw_drops(drop_ax, report, names, xs)
        fig.subplots_adjust(hspace=0.6)  # room for the upper panel's slanted labels
    return fig


def _draw_drops(ax, report: CapabilityReport, names: list[str], xs: list[int]) -> None:
    """Forgetting per category (before - after, points) as a dot with its paired 95% interval as
    an error bar; red when the category failed the gate; the bound dashed, zero solid."""
    from matplotlib.lines import Line2D

    f = report.forgetting
    shown = [(x, n, f.categories[n]) for x, n in zip(xs, names, strict=False) if n in f.categories]
    for x, _, c in shown:
        color = FAIL_COLOR if c.failed else PASS_COLOR
        if c.drop_ci95 is not None:
            low, high = c.drop_ci95
            ax.errorbar([x], [c.drop], yerr=[[max(0.0, c.drop - low)], [max(0.0, high - c.drop)]], fmt="o",
                        color=color, ecolor=color, capsize=4, markersize=5, linewidth=1.2)
        else:
            ax.plot([x], [c.drop], marker="o", color=color, markersize=5, linestyle="none")
    ax.axhline(0.0, color="black", linewidth=0.6)
    handles = [Line2D([], [], color=PASS_COLOR, marker="o", linewidth=1.2, label="forgetting, 95% interval"),
               Line2D([], [], color=FAIL_COLOR, marker="o", linewidth=1.2, label="failed the gate")]
    if f.max_drop is not None:
        ax.axhline(f.max_drop, color="black", linestyle="dashed", linewidth=1.0)
        handles.append(Line2D([], [], color="black", linestyle="dashed", linewidth=1.0,
                              label=f"max drop {f.max_drop:g} ({f.gate} rule)"))
    ax.set_xticks(xs[:len(names)])
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(xs) - 0.4)  # the panel above's columns (its last may be format rigidity)
    ax.set_ylabel("forgetting, points\n(before - after, + = worse)", fontsize=8)
    ax.set_title("forgetting per category with its paired 95% bootstrap interval"
                 + ("" if any(c.drop_ci95 is not None for _, _, c in shown) else " (no per-row outcomes: none)"),
                 fontsize=9)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def draw_chart(report: CapabilityReport, path: Path) -> None:
    """``chart_figure`` saved as a PNG at ``path``."""
    fig = chart_figure(report)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
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
