"""Base against tuned: per-category forgetting, mean and worst forgetting, target gain, the gate.

One sign convention throughout, **positive = worse**:

- forgetting of a category = accuracy before - accuracy after, in points (negative = improved);
  a category fails the gate when its forgetting is strictly larger than ``max_drop``;
- format-rigidity rise = rigidity after - rigidity before, in points (the share of non-task
  answers in the task's format; negative = fewer); the run fails when the rise is strictly
  larger than ``max_format_rigidity``.

Target gain is the one "positive = better" number: after - before on the target task.
"""
from __future__ import annotations

from .report import CapabilityReport, CategoryChange, ForgettingReport, ReportError

# Scores are ratios of small integers printed with a few decimals; a drop equal to the
# threshold must not fail because of float rounding.
_TOLERANCE = 1e-9


def compare_reports(base: CapabilityReport, tuned: CapabilityReport, max_drop: float | None = None,
                    max_format_rigidity: float | None = None) -> ForgettingReport:
    """The forgetting of ``tuned`` relative to ``base``; ``max_drop=None`` and
    ``max_format_rigidity=None`` report without gating.

    Every category of the base must be scored in the tuned report (otherwise the gate could
    pass by leaving a category out): ReportError names the missing ones.  Likewise a
    format-rigidity bound needs the rigidity of both reports (a task format was known).
    """
    if max_drop is not None and max_drop < 0:
        raise ReportError(f"max_drop must be >= 0 points, got {max_drop}")
    if max_format_rigidity is not None and max_format_rigidity < 0:
        raise ReportError(f"max_format_rigidity must be >= 0 points, got {max_format_rigidity}")
    missing = sorted(set(base.categories) - set(tuned.categories))
    if missing:
        raise ReportError(f"categories {missing} of the baseline ({base.run_name}) are not scored in "
                          f"{tuned.run_name}; score both with the same suite")
    warnings = []
    if base.suite.get("hash") and tuned.suite.get("hash") and base.suite["hash"] != tuned.suite["hash"]:
        warnings.append(f"the suites differ (baseline {base.suite.get('path')} vs {tuned.suite.get('path')}); "
                        f"only the shared categories are compared")
    extra = sorted(set(tuned.categories) - set(base.categories))
    if extra:
        warnings.append(f"categories {extra} have no baseline score and are not gated")

    changes: dict[str, CategoryChange] = {}
    for name in sorted(base.categories):
        before, after = base.categories[name].accuracy, tuned.categories[name].accuracy
        drop = before - after
        failed = max_drop is not None and drop > max_drop + _TOLERANCE
        changes[name] = CategoryChange(before=before, after=after, drop=drop, failed=failed)
    drops = {name: c.drop for name, c in changes.items()}
    worst_category = max(drops, key=lambda k: (drops[k], k))

    target_before = base.task.accuracy if base.task else None
    target_after = tuned.task.accuracy if tuned.task else None
    if (target_before is None) != (target_after is None):
        warnings.append("only one of the two reports has a target-task score; no target gain")
    target_gain = target_after - target_before if target_before is not None and target_after is not None else None

    rigidity_before = base.format_rigidity.rate if base.format_rigidity else None
    rigidity_after = tuned.format_rigidity.rate if tuned.format_rigidity else None
    rise = rigidity_after - rigidity_before if rigidity_before is not None and rigidity_after is not None else None
    if max_format_rigidity is not None and rise is None:
        lacking = [r.run_name for r in (base, tuned) if r.format_rigidity is None]
        raise ReportError(f"a format-rigidity bound needs the format rigidity of both reports, and {lacking} "
                          f"{'has' if len(lacking) == 1 else 'have'} none: score with the task's format "
                          f"(--task-format REGEX, or _meta.task_format in the suite or the --task suite)")
    if (base.format_rigidity and tuned.format_rigidity
            and base.format_rigidity.task_format != tuned.format_rigidity.task_format):
        warnings.append(f"format rigidity was measured with different task formats "
                        f"({base.format_rigidity.task_format!r} vs {tuned.format_rigidity.task_format!r})")
    rigidity_failed = max_format_rigidity is not None and rise > max_format_rigidity + _TOLERANCE

    return ForgettingReport(
        baseline_run=base.run_name,
        baseline_model_hash=str(base.model.get("hash", "")),
        max_drop=max_drop,
        categories=changes,
        mean_forgetting=sum(drops.values()) / len(drops),
        worst_forgetting=drops[worst_category],
        worst_category=worst_category,
        target_before=target_before,
        target_after=target_after,
        target_gain=target_gain,
        format_rigidity_before=rigidity_before,
        format_rigidity_after=rigidity_after,
        refusal_rate_before=base.safety.refusal_rate if base.safety else None,
        refusal_rate_after=tuned.safety.refusal_rate if tuned.safety else None,
        failed_categories=[name for name, c in changes.items() if c.failed],
        warnings=warnings,
        max_format_rigidity=max_format_rigidity,
        format_rigidity_rise=rise,
        format_rigidity_failed=rigidity_failed,
    )


def gate_message(forgetting: ForgettingReport) -> str:
    """One line for CI logs: PASS, or FAIL naming format rigidity and every category over its bound.

    Numbers carry their sign convention: forgetting = before - after and rigidity rise =
    after - before, both in points, positive = worse.
    """
    f = forgetting
    if not f.gated:
        return (f"no gate (--max-drop / --max-format-rigidity not set): mean forgetting {f.mean_forgetting:+.2f} "
                f"points (before - after, + = worse), worst {f.worst_category} {f.worst_forgetting:+.2f}")
    if f.passed:
        parts = []
        if f.max_drop is not None:
            parts.append(f"no category lost more than {f.max_drop:g} points (worst forgetting, before - after: "
                         f"{f.worst_category} {f.worst_forgetting:+.2f})")
        if f.max_format_rigidity is not None:
            parts.append(f"format rigidity rose {f.format_rigidity_rise:+.1f} points (after - before: "
                         f"{f.format_rigidity_before:.1f} -> {f.format_rigidity_after:.1f}), "
                         f"within {f.max_format_rigidity:g}")
        return "PASS: " + "; ".join(parts)
    parts = []
    if f.format_rigidity_failed:
        parts.append(f"format rigidity rose {f.format_rigidity_rise:+.1f} points, more than {f.max_format_rigidity:g} "
                     f"(non-task answers in the task's format: {f.format_rigidity_before:.1f} -> "
                     f"{f.format_rigidity_after:.1f}, after - before)")
    failed = [f"{name} ({c.before:.1f} -> {c.after:.1f}, forgetting {c.drop:+.1f})"
              for name, c in f.categories.items() if c.failed]
    if failed:
        parts.append(f"{len(failed)} categor{'y' if len(failed) == 1 else 'ies'} lost more than {f.max_drop:g} "
                     f"points (forgetting = before - after): " + ", ".join(failed))
    return "FAIL: " + "; ".join(parts)
