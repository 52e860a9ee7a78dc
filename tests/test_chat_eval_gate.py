"""The format-rigidity gate (rise = after - before, fails when rise > P, passes exactly at P)
through compare_reports and through the CLI's exit code; the report chart's legend (one
meaning per swatch); the JSON an older reader can still read; --out checked before scoring."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_chat_eval import CHAT_VOCAB, chatml_tokenizer, constant_llama
from test_eval_generate import _one_thread  # noqa: F401 (autouse fixture)

import eval.__main__ as cli
from eval.gate import compare_reports, gate_message
from eval.render import BEFORE_COLOR, FAIL_COLOR, PASS_COLOR, chart_figure, markdown_table
from eval.report import (
    SCHEMA,
    CapabilityReport,
    CategoryChange,
    CategoryScore,
    ForgettingReport,
    FormatRigidity,
    ReportError,
    percent,
)

REPO = Path(__file__).resolve().parents[1]


def _report(name, accuracies, rigidity=None, n_generated=30):
    cats = {k: CategoryScore(n=10, correct=round(v / 10), accuracy=float(v)) for k, v in accuracies.items()}
    fr = None if rigidity is None else FormatRigidity(task_format="^T-", n=n_generated,
                                                      in_format=round(rigidity * n_generated / 100), rate=rigidity)
    return CapabilityReport(
        run_name=name, model={"path": name, "adapter": None, "hash": name + "-hash"},
        suite={"name": "s", "version": "1", "path": "s.jsonl", "hash": "h", "rows": 10 * len(cats)},
        categories=cats, overall_accuracy=0.0, macro_accuracy=0.0, format_rigidity=fr)


BASE = _report("base", {"facts": 80, "chat": 90}, rigidity=5.0)


@pytest.mark.parametrize("after, bound, failed", [
    (12.0, 10.0, False),   # rise 7 < 10
    (15.0, 10.0, False),   # rise exactly 10: not *more* than the bound
    (15.5, 10.0, True),    # rise 10.5 > 10
    (3.0, 0.0, False),     # fewer answers in the task format: a negative rise never fails
    (5.0, 0.0, False),     # unchanged, bound 0
])
def test_format_rigidity_gate(after, bound, failed):
    tuned = _report("tuned", {"facts": 80, "chat": 90}, rigidity=after)
    f = compare_reports(BASE, tuned, max_format_rigidity=bound)
    assert f.format_rigidity_rise == pytest.approx(after - 5.0)
    assert (f.max_format_rigidity, f.format_rigidity_failed, f.passed) == (bound, failed, not failed)
    assert f.failed_categories == []  # the categories did not move
    message = gate_message(f)
    if failed:
        assert message == (f"FAIL: format rigidity rose {after - 5.0:+.1f} points, more than {bound:g} (non-task "
                           f"answers in the task's format: 5.0 -> {after:.1f}, after - before)")
    else:
        assert message.startswith("PASS: format rigidity rose") and f"within {bound:g}" in message


def test_the_bound_is_met_exactly_through_float_rounding():
    # 1/3 -> 2/3 of the answers: the rise is 33.33... points, computed as a difference of two
    # rounded ratios; a bound of exactly one third of the answers must pass
    base = _report("base", {"facts": 80}, rigidity=percent(1, 3))
    tuned = _report("tuned", {"facts": 80}, rigidity=percent(2, 3))
    assert compare_reports(base, tuned, max_format_rigidity=percent(1, 3)).passed
    assert not compare_reports(base, tuned, max_format_rigidity=percent(1, 3) - 1e-6).passed


def test_both_gates_fail_together_and_format_rigidity_is_named_first():
    tuned = _report("tuned", {"facts": 60, "chat": 88}, rigidity=65.0)
    f = compare_reports(BASE, tuned, max_drop=5, max_format_rigidity=10)
    assert f.failed_categories == ["facts"] and f.format_rigidity_failed and not f.passed
    message = gate_message(f)
    assert message.startswith("FAIL: format rigidity rose +60.0 points, more than 10 ")
    assert "; 1 category lost more than 5 points (forgetting = before - after): facts (80.0 -> 60.0, " \
           "forgetting +20.0)" in message
    table = markdown_table(_with(tuned, f))
    assert "| format rigidity (rise = after - before) | 30 | 5.0 | 65.0 | +60.0 | **FAIL** |" in table
    assert "| facts | 10 | 80.0 | 60.0 | +20.0 | **FAIL** |" in table
    assert "**gate: FAIL: format rigidity, facts**" in table
    assert "forgetting = accuracy before - after; format-rigidity rise = rigidity after - before" in table


def test_a_bound_without_rigidity_is_an_error():
    with pytest.raises(ReportError, match=r"needs the format rigidity of both reports, and \['tuned'\] has none"):
        compare_reports(BASE, _report("tuned", {"facts": 80, "chat": 90}), max_format_rigidity=5)
    with pytest.raises(ReportError, match=">= 0"):
        compare_reports(BASE, BASE, max_format_rigidity=-1)


def _with(report, forgetting):
    report.forgetting = forgetting
    return report


def test_report_json_without_the_format_gate_reads_in_the_old_reader():
    """A report that does not use the new fields writes exactly the schema /1 fields: the
    older reader built ForgettingReport(**fields) and RowResult(**fields) and refused others."""
    tuned = _with(_report("tuned", {"facts": 70, "chat": 90}, rigidity=6.0),
                  compare_reports(BASE, _report("tuned", {"facts": 70, "chat": 90}, rigidity=6.0), max_drop=5))
    data = tuned.to_dict()
    assert data["schema"] == SCHEMA
    old_forgetting_fields = {"baseline_run", "baseline_model_hash", "max_drop", "categories", "mean_forgetting",
                             "worst_forgetting", "worst_category", "target_before", "target_after", "target_gain",
                             "format_rigidity_before", "format_rigidity_after", "refusal_rate_before",
                             "refusal_rate_after", "failed_categories", "warnings", "passed"}
    assert set(data["forgetting"]) == old_forgetting_fields
    gated = _with(_report("tuned", {"facts": 70, "chat": 90}, rigidity=30.0),
                  compare_reports(BASE, _report("tuned", {"facts": 70, "chat": 90}, rigidity=30.0),
                                  max_format_rigidity=10))
    data = gated.to_dict()
    assert data["forgetting"]["format_rigidity_failed"] is True and data["forgetting"]["passed"] is False
    assert data["forgetting"]["format_rigidity_rise"] == 25.0 and data["forgetting"]["max_format_rigidity"] == 10
    back = CapabilityReport.from_dict(json.loads(json.dumps(data)))
    assert back.forgetting.format_rigidity_failed and not back.forgetting.passed


# ----------------------------------------------------------------------------- the chart legend


def _legend(fig):
    legend = fig.axes[0].get_legend()
    return {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)}


def _same(color_a, color_b) -> bool:
    from matplotlib.colors import to_rgba

    return to_rgba(color_a) == pytest.approx(to_rgba(color_b))


def _gated_report(failing: bool):
    tuned = _report("tuned", {"facts": 60 if failing else 79, "chat": 90}, rigidity=40.0 if failing else 6.0)
    return _with(tuned, compare_reports(BASE, tuned, max_drop=5, max_format_rigidity=10))


@pytest.mark.parametrize("failing", [True, False])
def test_legend_has_before_pass_and_fail_entries_and_bars_keep_their_meaning(failing):
    import matplotlib.pyplot as plt

    report = _gated_report(failing)
    fig = chart_figure(report)
    try:
        entries = _legend(fig)
        assert _same(entries["before (base)"].get_facecolor(), BEFORE_COLOR)
        assert _same(entries["after (tuned): within the gate"].get_facecolor(), PASS_COLOR)
        assert _same(entries["after (tuned): failed the gate"].get_facecolor(), FAIL_COLOR)
        assert "format-rigidity bound (before + 10)" in entries
        assert "hatched: format rigidity (higher = worse)" in entries
        # the after bars: red exactly where the gate failed, blue elsewhere (x order: chat, facts, rigidity)
        ax = fig.axes[0]
        before, after = ax.containers  # one BarContainer per ax.bar call: before, then after
        for bar, bad in zip(after, [False, failing, failing], strict=True):
            assert _same(bar.get_facecolor(), FAIL_COLOR if bad else PASS_COLOR)
        assert all(_same(bar.get_facecolor(), BEFORE_COLOR) for bar in before)
        assert [str(bar.get_hatch() or "") for bar in after] == ["", "", "//"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["chat", "facts", "format rigidity"]
        assert "higher = better" in ax.get_ylabel()
        numbers = sorted(t.get_text() for t in ax.texts)
        assert numbers == sorted(["+0.0", "+20.0" if failing else "+1.0", "+35.0" if failing else "+1.0"])
    finally:
        plt.close(fig)


def test_ungated_chart_has_no_pass_fail_entries():
    import matplotlib.pyplot as plt

    tuned = _report("tuned", {"facts": 60, "chat": 90})
    fig = chart_figure(_with(tuned, compare_reports(BASE, tuned)))
    try:
        assert set(_legend(fig)) == {"before (base)", "after (tuned), not gated"}
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def constant_world(tmp_path_factory):
    """A saved model that answers "aaaa" to everything, a chat suite whose task format "^a+$"
    every answer matches (rigidity 100), and its base report."""
    root = tmp_path_factory.mktemp("format_gate")
    old = os.environ.get("FORGETLESS_CACHE")
    os.environ["FORGETLESS_CACHE"] = str(root / "cache")
    model_dir = root / "model"
    constant_llama(ord("a"), vocab_size=CHAT_VOCAB).save_pretrained(model_dir)
    chatml_tokenizer().save_pretrained(model_dir)
    suite = root / "suite.jsonl"
    rows = [{"_meta": {"name": "g", "chat": True, "task_format": "^a+$"}}]
    rows += [{"category": "chat", "prompt": f"Q{i}?", "match": "contains", "answer": "a", "max_new_tokens": 4}
             for i in range(4)]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = root / "base.json"
    assert cli.run(["--model", str(model_dir), "--suite", str(suite), "--out", str(base), "--quiet"]) == 0
    yield dict(root=root, model=model_dir, suite=suite, base=base)
    if old is None:
        os.environ.pop("FORGETLESS_CACHE", None)
    else:
        os.environ["FORGETLESS_CACHE"] = old


def _baseline_with_rigidity(world, rate):
    data = json.loads(world["base"].read_text())
    assert data["format_rigidity"]["rate"] == 100.0 and data["format_rigidity"]["n"] == 4
    data["format_rigidity"]["rate"] = rate
    path = world["root"] / f"base_{rate}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("bound, code", [("10", 0), ("9.5", 1), ("10.5", 0)])
def test_cli_exit_code_of_the_format_gate(constant_world, capsys, bound, code):
    baseline = _baseline_with_rigidity(constant_world, 90.0)  # tuned (same model) has 100: rise 10
    out = constant_world["root"] / f"gate_{bound}" / "r.json"
    args = ["--model", str(constant_world["model"]), "--suite", str(constant_world["suite"]), "--out", str(out),
            "--quiet", "--baseline", str(baseline), "--max-format-rigidity", bound]
    assert cli.run(args) == code
    printed = capsys.readouterr().out
    assert ("FAIL: format rigidity rose +10.0 points, more than 9.5" in printed) == (code == 1)
    data = json.loads(out.read_text())["forgetting"]
    assert data["format_rigidity_rise"] == 10.0 and data["passed"] is (code == 0)


def test_cli_format_gate_bad_input_before_scoring(constant_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "score_model", _must_not_score)
    common = ["--model", str(constant_world["model"]), "--out", str(tmp_path / "r.json"), "--quiet"]
    no_format = tmp_path / "plain.jsonl"
    no_format.write_text('{"category": "c", "prompt": "p", "answer": "a"}\n')
    cases = [
        (["--suite", str(constant_world["suite"]), "--max-format-rigidity", "5"], "needs a baseline"),
        (["--suite", str(no_format), "--baseline", str(constant_world["base"]), "--max-format-rigidity", "5"],
         "needs the task's answer format"),
        (["--suite", str(constant_world["suite"]), "--baseline", str(constant_world["base"]),
          "--max-format-rigidity", "-1"], ">= 0 points"),
    ]
    for extra, message in cases:
        assert cli.run([*common, *extra]) == 2
        assert message in capsys.readouterr().err


def _must_not_score(*args, **kwargs):
    raise AssertionError("scoring started before the bad input was reported")


def test_out_under_a_file_or_unwritable_exits_2_before_scoring(constant_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "score_model", _must_not_score)
    monkeypatch.setattr(cli, "load_model", _must_not_score)
    a_file = tmp_path / "existing.txt"
    a_file.write_text("x")
    common = ["--model", str(constant_world["model"]), "--suite", str(constant_world["suite"]), "--quiet"]
    assert cli.run([*common, "--out", str(a_file / "r.json")]) == 2
    assert f"--out {a_file / 'r.json'}: {a_file} is a file, not a directory" in capsys.readouterr().err
    assert cli.run([*common, "--out", str(a_file / "deeper" / "r.json")]) == 2
    assert f"{a_file} is a file, not a directory" in capsys.readouterr().err
    assert cli.run([*common, "--out", "/proc/forgetless-test/r.json"]) == 2  # not creatable, even for root
    assert "--out /proc/forgetless-test/r.json: cannot write in /proc (" in capsys.readouterr().err
    # a good place that does not exist yet passes the check and is not created by it
    bad_suite = tmp_path / "bad.jsonl"
    bad_suite.write_text('{"category": "c", "prompt": "p"}\n')
    fresh = tmp_path / "fresh" / "deeper" / "r.json"
    assert cli.run(["--model", str(constant_world["model"]), "--suite", str(bad_suite), "--out", str(fresh)]) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_out_under_a_file_in_a_subprocess_has_no_traceback(constant_world, tmp_path):
    a_file = tmp_path / "existing.txt"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "eval", "--model", str(constant_world["model"]), "--suite",
                           str(constant_world["suite"]), "--out", str(a_file / "r.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a file, not a directory" in proc.stderr


def test_cli_chat_flag_on_a_tokenizer_without_a_template_exits_2(tmp_path, capsys):
    from tiny_models import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "plain_model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"category": "c", "prompt": "p", "answer": "a"}\n')
    assert cli.run(["--model", str(model_dir), "--suite", str(suite), "--out", str(tmp_path / "r.json"),
                    "--quiet", "--apply-chat-template", "--no-cache"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_gated_means_either_bound_was_given():
    changes = {"a": CategoryChange(1.0, 2.0, -1.0, False)}
    f = ForgettingReport(baseline_run="b", baseline_model_hash="", max_drop=None, categories=changes,
                         mean_forgetting=-1.0, worst_forgetting=-1.0, worst_category="a")
    assert f.passed and not f.gated
    f.max_format_rigidity = 3.0
    assert f.gated and f.passed
    f.format_rigidity_failed = True
    assert not f.passed


def test_eval_compare_shows_a_format_only_gate():
    from eval.compare import comparison_table, summarise

    tuned = _report("tuned", {"facts": 80, "chat": 90}, rigidity=40.0)
    summary = summarise(_with(tuned, compare_reports(BASE, tuned, max_format_rigidity=10)))
    assert summary.passed is False  # gated by format rigidity alone: not "n/a"
    assert comparison_table([summary]).splitlines()[-1].endswith("| 40.0 | n/a | FAIL |")
