"""Base against tuned: per-category forgetting, mean and worst forgetting, target gain, the gate.

One sign convention throughout, **positive = worse**:

- forgetting of a category = accuracy before - accuracy after, in points (negative = improved);
  a category fails the gate when its forgetting is strictly larger than ``max_drop``;
- format-rigidity rise = rigidity after - rigidity before, in points (the share of non-task
  answers in the task's format; negative = fewer); the run fails when the rise is strictly
  larger than ``max_format_rigidity``.

Target gain is the one "positive = better" number: after - before on the target task.

Two gate rules for the categories (``gate=``):

- ``point``: a category fails when its drop is larger than ``max_drop``;
- ``significant`` (the default): when its drop is larger than ``max_drop`` **and** the paired
  95% bootstrap interval of the drop lies above 0 (low > 0): the rows show a loss, not noise.
  A category whose rows do not pair up (reports without per-row outcomes) falls back to the
  point rule, with a warning.

Every comparison carries the paired statistics (eval.paired) whatever the rule: per category
and for the mean, the drop's interval, the exact McNemar p-value (0/1 scores), the row count
and the smallest detectable drop, plus both models' outcome on every paired row.
"""
from __future__ import annotations

from dataclasses import replace

from . import paired
from .report import GATE_RULES, CapabilityReport, CategoryChange, ForgettingReport, ReportError, RowResult

# Scores are ratios of small integers printed with a few decimals; a drop equal to the
# threshold must not fail because of float rounding.
_TOLERANCE = 1e-9
DEFAULT_GATE = "significant"


def check_gate_rule(gate: str, key: str = "gate") -> str:
    """``gate`` when it names a rule; ReportError naming ``key`` otherwise."""
    if gate not in GATE_RULES:
        raise ReportError(f"{key}={gate!r}: unknown gate rule; choose one of {', '.join(GATE_RULES)}")
    return gate


def _suite_rows(report: CapabilityReport) -> list[RowResult]:
    """The rows of the capability categories: a report lists its ``suite["rows"]`` suite rows,
    then the target task's ``task.n`` rows (whose categories may reuse a suite category's
    name), then any rows merged in after them (lm-eval tasks, eval.lm_eval_tasks)."""
    count = report.suite.get("rows") if isinstance(report.suite, dict) else None
    if not isinstance(count, int) or isinstance(count, bool):
        return list(report.rows)
    task_rows = report.task.n if report.task is not None else 0
    return report.rows[:count] + report.rows[count + task_rows:]


def category_rows(report: CapabilityReport) -> dict[str, list[RowResult]]:
    """The report's capability rows grouped by category (the target task's rows left out)."""
    return _rows_by_category(report)


def _rows_by_category(report: CapabilityReport) -> dict[str, list[RowResult]]:
    grouped: dict[str, list[RowResult]] = {}
    for row in _suite_rows(report):
        grouped.setdefault(row.category, []).append(row)
    return grouped


def _by_line(report: CapabilityReport, name: str, rows: list[RowResult]) -> dict[int, RowResult] | str:
    """A category's rows keyed by suite line, or why they cannot stand for its score."""
    by_line = {r.line: r for r in rows}
    if len(by_line) != len(rows):
        return f"{report.run_name} lists a suite line twice"
    expected = report.categories[name]
    right = sum(bool(r.correct) for r in rows)
    if len(rows) != expected.n or abs(100.0 * right / len(rows) - expected.accuracy) > 1e-6:
        return (f"{report.run_name}'s rows ({len(rows)}) do not add up to its score "
                f"({expected.n} rows, {expected.accuracy:.1f})")
    return by_line


def pair_rows(base: CapabilityReport, tuned: CapabilityReport,
              names: list[str]) -> tuple[dict[str, dict[int, tuple[float, float]]], dict[str, str]]:
    """Each category's outcomes paired by suite line: ({category: {line: (before, after)}},
    {category: why it does not pair}).  A category pairs when both reports hold one row per
    line of it, on the same lines with the same prompts, and those rows make up its score."""
    base_rows, tuned_rows = _rows_by_category(base), _rows_by_category(tuned)
    pairs: dict[str, dict[int, tuple[float, float]]] = {}
    problems: dict[str, str] = {}
    for name in names:
        if not base_rows.get(name) or not tuned_rows.get(name):
            problems[name] = "no per-row outcomes"
            continue
        before, after = _by_line(base, name, base_rows[name]), _by_line(tuned, name, tuned_rows[name])
        if isinstance(before, str) or isinstance(after, str):
            problems[name] = before if isinstance(before, str) else after
            continue
        if set(before) != set(after):
            problems[name] = f"the two reports scored different lines ({len(before)} and {len(after)} rows)"
            continue
        other = next((line for line in sorted(before) if before[line].prompt != after[line].prompt), None)
        if other is not None:
            problems[name] = f"suite line {other} holds different prompts in the two reports"
            continue
        pairs[name] = {line: (float(bool(before[line].correct)), float(bool(after[line].correct)))
                       for line in sorted(before)}
    return pairs, problems


def decide(change: CategoryChange, max_drop: float | None, gate: str) -> bool:
    """Whether one category fails: its drop is over the bound and, under ``significant`` with an
    interval known, the interval lies above 0."""
    if max_drop is None or not change.drop > max_drop + _TOLERANCE:
        return False
    if gate == "significant" and change.drop_ci95 is not None:
        return change.drop_ci95[0] > _TOLERANCE
    return True


def compare_reports(base: CapabilityReport, tuned: CapabilityReport, max_drop: float | None = None,
                    max_format_rigidity: float | None = None, gate: str = DEFAULT_GATE,
                    resamples: int = paired.DEFAULT_RESAMPLES, seed: int = paired.DEFAULT_SEED) -> ForgettingReport:
    """The forgetting of ``tuned`` relative to ``base``; ``max_drop=None`` and
    ``max_format_rigidity=None`` report without gating.  ``gate``: "significant" or "point"
    (module docstring); ``resamples`` and ``seed`` set the paired bootstrap.

    Every category of the base must be scored in the tuned report (otherwise the gate could
    pass by leaving a category out): ReportError names the missing ones.  Likewise a
    format-rigidity bound needs the rigidity of both reports (a task format was known).
    """
    check_gate_rule(gate)
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

    names = sorted(base.categories)
    pairs, unpaired = pair_rows(base, tuned, names)
    changes: dict[str, CategoryChange] = {}
    for name in names:
        before, after = base.categories[name].accuracy, tuned.categories[name].accuracy
        change = CategoryChange(before=before, after=after, drop=before - after, failed=False)
        if name in pairs:
            outcomes = list(pairs[name].values())
            stats = paired.paired_drop([b for b, _ in outcomes], [a for _, a in outcomes], resamples, seed)
            change = replace(change, drop_ci95=stats.ci95, mcnemar_p=stats.mcnemar_p, n_pairs=stats.n_pairs,
                             min_detectable_drop=stats.min_detectable_drop)
        changes[name] = replace(change, failed=decide(change, max_drop, gate))
    if pairs and unpaired:
        warnings.append("no paired statistics for " + "; ".join(f"{k} ({why})" for k, why in unpaired.items())
                        + (": the point rule decides " + ("it" if len(unpaired) == 1 else "them")
                           if gate == "significant" and max_drop is not None else ""))
    elif not pairs and gate == "significant" and max_drop is not None:
        warnings.append(f"the significant gate needs per-row outcomes that pair up by suite line, and "
                        f"{next(iter(unpaired.values()))}: the point rule decides (drop > {max_drop:g} alone)")
    mean_ci = mean_mdd = None
    if pairs and not unpaired:  # the mean's interval needs every category's rows
        by_category = {k: ([b for b, _ in v.values()], [a for _, a in v.values()]) for k, v in pairs.items()}
        mean_ci = paired.mean_drop_interval(by_category, resamples, seed)
        mean_mdd = paired.mean_min_detectable_drop([(len(v), changes[k].before) for k, v in pairs.items()])
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
        gate=gate if pairs else "point",
        mean_drop_ci95=mean_ci,
        mean_min_detectable_drop=mean_mdd,
        n_pairs=sum(len(v) for v in pairs.values()) if pairs else None,
        row_outcomes={k: {str(line): [_outcome(b), _outcome(a)] for line, (b, a) in v.items()}
                      for k, v in pairs.items()},
        bootstrap={"resamples": resamples, "seed": seed, "confidence": paired.CONFIDENCE} if pairs else {},
    )


def _outcome(value: float) -> float | int:
    return int(value) if value in (0.0, 1.0) else value  # 0/1 rows stay short in the JSON


def regate(forgetting: ForgettingReport, gate: str) -> ForgettingReport:
    """The same comparison decided by another rule, from the statistics it already holds (what
    ``python -m eval.compare --gate`` shows).  Categories without an interval keep the point rule."""
    check_gate_rule(gate)
    has_intervals = any(c.drop_ci95 is not None for c in forgetting.categories.values())
    changes = {k: replace(c, failed=decide(c, forgetting.max_drop, gate)) for k, c in forgetting.categories.items()}
    return replace(forgetting, categories=changes, failed_categories=[k for k, c in changes.items() if c.failed],
                   gate=gate if has_intervals else "point")


def interval_text(ci: list[float] | None) -> str:
    """``[+1.2, +8.8]`` (points, signed as the drop), or "" without an interval."""
    return "" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def rule_text(forgetting: ForgettingReport) -> str:
    if forgetting.gate == "significant":
        return (f"gate rule: significant (a category fails when its drop is over {forgetting.max_drop:g} points AND "
                f"its paired 95% interval lies above 0)")
    return f"gate rule: point (a category fails when its drop is over {forgetting.max_drop:g} points)"


def _category_text(name: str, c: CategoryChange) -> str:
    ci = f", 95% CI {interval_text(c.drop_ci95)}" if c.drop_ci95 is not None else ""
    return f"{name} ({c.before:.1f} -> {c.after:.1f}, forgetting {c.drop:+.1f}{ci})"


def gate_message(forgetting: ForgettingReport) -> str:
    """One line for CI logs: PASS, or FAIL naming format rigidity and every category over its bound,
    then the categories over the bound whose interval reaches 0 (significant rule) and the rule.

    Numbers carry their sign convention: forgetting = before - after and rigidity rise =
    after - before, both in points, positive = worse; intervals are paired 95% bootstrap bounds.
    """
    f = forgetting
    if not f.gated:
        mean_ci = f" {interval_text(f.mean_drop_ci95)}" if f.mean_drop_ci95 is not None else ""
        return (f"no gate (--max-drop / --max-format-rigidity not set): mean forgetting {f.mean_forgetting:+.2f}"
                f"{mean_ci} points (before - after, + = worse), worst {f.worst_category} {f.worst_forgetting:+.2f}")
    noise = []
    if f.max_drop is not None:
        noise = [_category_text(name, c) for name, c in f.categories.items()
                 if not c.failed and c.drop > f.max_drop + _TOLERANCE]
    tail = []
    if noise:
        tail.append(f"over {f.max_drop:g} points but the interval reaches 0 (not failed): " + ", ".join(noise))
    if f.max_drop is not None:
        tail.append(rule_text(f))
    if f.passed:
        parts = []
        if f.max_drop is not None:
            worst = f.categories[f.worst_category]
            ci = f" {interval_text(worst.drop_ci95)}" if worst.drop_ci95 is not None else ""
            parts.append(f"no category lost more than {f.max_drop:g} points (worst forgetting, before - after: "
                         f"{f.worst_category} {f.worst_forgetting:+.2f}{ci})")
        if f.max_format_rigidity is not None:
            parts.append(f"format rigidity rose {f.format_rigidity_rise:+.1f} points (after - before: "
                         f"{f.format_rigidity_before:.1f} -> {f.format_rigidity_after:.1f}), "
                         f"within {f.max_format_rigidity:g}")
        return "PASS: " + "; ".join(parts + tail)
    parts = []
    if f.format_rigidity_failed:
        parts.append(f"format rigidity rose {f.format_rigidity_rise:+.1f} points, more than {f.max_format_rigidity:g} "
                     f"(non-task answers in the task's format: {f.format_rigidity_before:.1f} -> "
                     f"{f.format_rigidity_after:.1f}, after - before)")
    failed = [_category_text(name, c) for name, c in f.categories.items() if c.failed]
    if failed:
        parts.append(f"{len(failed)} categor{'y' if len(failed) == 1 else 'ies'} lost more than {f.max_drop:g} "
                     f"points (forgetting = before - after): " + ", ".join(failed))
    return "FAIL: " + "; ".join(parts + tail)
