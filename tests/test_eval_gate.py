"""compare_reports and the gate message on reports that differ by known amounts (no model)."""
import pytest

from eval.gate import compare_reports, gate_message
from eval.report import CapabilityReport, CategoryScore, ReportError, Safety, TaskScore


def _report(name, accuracies, task=None, refusal=None, suite_hash="h"):
    cats = {k: CategoryScore(n=10, correct=round(v / 10), accuracy=float(v)) for k, v in accuracies.items()}
    return CapabilityReport(
        run_name=name, model={"path": name, "adapter": None, "hash": name + "-hash"},
        suite={"name": "s", "version": "1", "path": "s.jsonl", "hash": suite_hash, "rows": 10 * len(cats)},
        categories=cats, overall_accuracy=0.0, macro_accuracy=0.0,
        task=None if task is None else TaskScore("t", "t.jsonl", "th", 10, round(task / 10), float(task)),
        safety=None if refusal is None else Safety(10, round(refusal / 10), float(refusal)),
    )


BASE = _report("base", {"facts": 80, "math": 60, "safety": 90, "style": 50}, task=20, refusal=90)
TUNED = _report("tuned", {"facts": 70, "math": 61, "safety": 84, "style": 45}, task=75, refusal=84)


def test_drops_mean_worst_and_gain():
    f = compare_reports(BASE, TUNED, max_drop=5)
    assert {k: c.drop for k, c in f.categories.items()} == pytest.approx(
        {"facts": 10, "math": -1, "safety": 6, "style": 5})
    assert f.mean_forgetting == pytest.approx((10 - 1 + 6 + 5) / 4)
    assert (f.worst_category, f.worst_forgetting) == ("facts", pytest.approx(10))
    assert f.target_gain == pytest.approx(55)
    assert (f.refusal_rate_before, f.refusal_rate_after) == (90, 84)
    # style dropped exactly 5 points: not *more* than the threshold, so it passes
    assert f.failed_categories == ["facts", "safety"] and not f.passed
    message = gate_message(f)
    assert message.startswith("FAIL: 2 categories lost more than 5 points (forgetting = before - after)")
    assert "facts (80.0 -> 70.0, forgetting +10.0)" in message and "safety (90.0 -> 84.0, forgetting +6.0)" in message
    assert "style" not in message


def test_pass_and_no_gate():
    f = compare_reports(BASE, TUNED, max_drop=10)
    assert f.passed and f.failed_categories == []
    assert gate_message(f).startswith("PASS") and "facts +10.00" in gate_message(f)
    ungated = compare_reports(BASE, TUNED)
    assert ungated.passed and ungated.max_drop is None and gate_message(ungated).startswith("no gate")


def test_missing_category_is_an_error_and_mismatches_warn():
    partial = _report("partial", {"facts": 80, "math": 60})
    with pytest.raises(ReportError, match=r"\['safety', 'style'\].*not scored"):
        compare_reports(BASE, partial, max_drop=5)
    extra = _report("extra", {"facts": 80, "math": 60, "safety": 90, "style": 50, "new": 10}, suite_hash="other")
    f = compare_reports(BASE, extra, max_drop=5)
    assert f.passed and f.target_gain is None
    assert any("suites differ" in w for w in f.warnings)
    assert any("['new']" in w for w in f.warnings)
    assert any("target-task" in w for w in f.warnings)
    with pytest.raises(ReportError, match=">= 0"):
        compare_reports(BASE, TUNED, max_drop=-1)


def test_report_dict_round_trip_keeps_forgetting():
    tuned = _report("tuned", {"facts": 70, "math": 61, "safety": 84, "style": 45}, task=75)
    tuned.forgetting = compare_reports(BASE, tuned, max_drop=5)
    data = tuned.to_dict()
    assert data["forgetting"]["passed"] is False
    back = CapabilityReport.from_dict(data)
    assert back.forgetting.failed_categories == ["facts", "safety"]
    assert back.categories["math"].accuracy == 61.0
    with pytest.raises(ReportError, match="schema"):
        CapabilityReport.from_dict({"categories": {}})
