"""Base against tuned: per-category drop, mean and worst forgetting, target gain, the gate.

Forgetting of a category = score before - score after, in points (negative = improved).
A category fails the gate when its drop is strictly larger than ``max_drop``.
"""
from __future__ import annotations

from .report import CapabilityReport, CategoryChange, ForgettingReport, ReportError

# Scores are ratios of small integers printed with a few decimals; a drop equal to the
# threshold must not fail because of float rounding.
_TOLERANCE = 1e-9


def compare_reports(base: CapabilityReport, tuned: CapabilityReport, max_drop: float | None = None) -> ForgettingReport:
    """The forgetting of ``tuned`` relative to ``base``; ``max_drop=None`` reports without gating.

    Every category of the base must be scored in the tuned report (otherwise the gate could
    pass by leaving a category out): ReportError names the missing ones.
    """
    if max_drop is not None and max_drop < 0:
        raise ReportError(f"max_drop must be >= 0 points, got {max_drop}")
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
        format_rigidity_before=base.format_rigidity.rate if base.format_rigidity else None,
        format_rigidity_after=tuned.format_rigidity.rate if tuned.format_rigidity else None,
        refusal_rate_before=base.safety.refusal_rate if base.safety else None,
        refusal_rate_after=tuned.safety.refusal_rate if tuned.safety else None,
        failed_categories=[name for name, c in changes.items() if c.failed],
        warnings=warnings,
    )


def gate_message(forgetting: ForgettingReport) -> str:
    """One line for CI logs: PASS, or FAIL naming every category over the threshold."""
    if forgetting.max_drop is None:
        return (f"no gate (--max-drop not set): mean forgetting {forgetting.mean_forgetting:.2f} points, "
                f"worst {forgetting.worst_category} {forgetting.worst_forgetting:.2f}")
    if forgetting.passed:
        return (f"PASS: no category dropped more than {forgetting.max_drop:g} points "
                f"(worst: {forgetting.worst_category} {forgetting.worst_forgetting:+.2f})")
    parts = [f"{name} ({c.before:.1f} -> {c.after:.1f}, drop {c.drop:.1f})"
             for name, c in forgetting.categories.items() if c.failed]
    return (f"FAIL: {len(parts)} categor{'y' if len(parts) == 1 else 'ies'} dropped more than "
            f"{forgetting.max_drop:g} points: " + ", ".join(parts))
