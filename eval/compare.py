"""``python -m eval.compare REPORT...``: learning against forgetting across runs.

Prints one row per report (run, target gain, mean forgetting, worst forgetting, format
rigidity, refusal rate) and draws the scatter of target gain against mean forgetting, one
point per run: the Pareto view of Biderman et al. 2024, "LoRA Learns Less and Forgets Less"
(up and to the left is better: more learned, less forgotten).  Reports need a
``forgetting`` section (scored with ``--baseline``) for the gain and forgetting columns.
The worst category's and the mean's paired 95% intervals and the gate rule sit beside them;
``--gate significant|point`` decides every report again under one rule (eval.gate.regate).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .cli_options import add_gate_option
from .gate import regate
from .report import CapabilityReport, ReportError, read_report


@dataclass
class RunSummary:
    run: str
    target_gain: float | None
    mean_forgetting: float | None
    worst_forgetting: float | None
    worst_category: str | None
    format_rigidity: float | None
    refusal_rate: float | None
    passed: bool | None
    worst_ci95: list[float] | None = None  # paired 95% interval of the worst category's forgetting
    mean_ci95: list[float] | None = None
    gate: str | None = None  # the rule that decided ("significant" | "point"), None when not gated


def summarise(report: CapabilityReport, gate: str | None = None) -> RunSummary:
    """One row of the table; ``gate``: decide the categories again under that rule (eval.gate.regate),
    from the statistics the report holds; None keeps the report's own verdict."""
    f = report.forgetting
    if f is not None and gate is not None and f.max_drop is not None:
        f = regate(f, gate)
    return RunSummary(
        run=report.run_name,
        target_gain=f.target_gain if f else None,
        mean_forgetting=f.mean_forgetting if f else None,
        worst_forgetting=f.worst_forgetting if f else None,
        worst_category=f.worst_category if f else None,
        format_rigidity=report.format_rigidity.rate if report.format_rigidity else None,
        refusal_rate=report.safety.refusal_rate if report.safety else None,
        passed=(f.passed if f is not None and f.gated else None),
        worst_ci95=f.categories[f.worst_category].drop_ci95 if f else None,
        mean_ci95=f.mean_drop_ci95 if f else None,
        gate=f.gate if f is not None and f.max_drop is not None else None,
    )


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _interval(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def comparison_table(summaries: list[RunSummary]) -> str:
    """Markdown table, one row per run."""
    lines = ["| run | target gain (after - before) | mean forgetting (before - after) | worst forgetting | "
             "worst's 95% CI | mean's 95% CI | gate rule | format rigidity | refusal rate | gate |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for s in summaries:
        worst = "n/a" if s.worst_forgetting is None else f"{s.worst_forgetting:+.1f} ({s.worst_category})"
        gate = "n/a" if s.passed is None else ("pass" if s.passed else "FAIL")
        lines.append(f"| {s.run} | {_cell(s.target_gain, True)} | {_cell(s.mean_forgetting, True)} | {worst} | "
                     f"{_interval(s.worst_ci95)} | {_interval(s.mean_ci95)} | {s.gate or 'n/a'} | "
                     f"{_cell(s.format_rigidity)} | {_cell(s.refusal_rate)} | {gate} |")
    return "\n".join(lines) + "\n"


def draw_scatter(summaries: list[RunSummary], path: Path,
                 curves: dict[str, list[tuple[float, float]]] | None = None) -> int:
    """Target gain (y) against mean forgetting (x); returns the number of points drawn.

    ``curves``: named lines of (mean forgetting, target gain) points drawn through the scatter,
    e.g. a run's interpolation toward its base (eval.interpolate), alpha 0 to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in summaries if s.target_gain is not None and s.mean_forgetting is not None]
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for s in points:
        ax.scatter(s.mean_forgetting, s.target_gain, s=40)
        ax.annotate(s.run, (s.mean_forgetting, s.target_gain), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, line in (curves or {}).items():
        if line:
            xs, ys = zip(*line, strict=True)
            ax.plot(xs, ys, linestyle="--", marker=".", linewidth=1, alpha=0.7, label=f"{name} (alpha 0 to 1)")
    if curves:
        ax.legend(fontsize=7, loc="best")
    ax.axvline(0.0, color="gray", linewidth=0.5)
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.set_xlabel("mean forgetting (points, lower is better)")
    ax.set_ylabel("target-task gain (points, higher is better)")
    ax.set_title("learning vs forgetting")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(points)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="REPORT.json files written by python -m eval")
    parser.add_argument("--plot", default="learning_vs_forgetting.png", help="scatter PNG path")
    add_gate_option(parser, default=None, help_extra="; decides every report's categories again under this rule "
                                                      "from the intervals it holds (default: as each was gated)")
    args = parser.parse_args(argv)
    try:
        summaries = [summarise(read_report(p), args.gate) for p in args.reports]
    except ReportError as exc:
        print(f"python -m eval.compare: error: {exc}", file=sys.stderr)
        return 2
    print(comparison_table(summaries))
    drawn = draw_scatter(summaries, Path(args.plot))
    skipped = len(summaries) - drawn
    print(f"wrote {args.plot} ({drawn} point{'s' if drawn != 1 else ''}"
          + (f"; {skipped} run(s) without a baseline comparison or target score left out)" if skipped else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
