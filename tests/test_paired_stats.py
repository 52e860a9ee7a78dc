"""Paired statistics of a drop (eval.paired) and the gate that decides on them (eval.gate).

References: hand-computed binomial tails and bootstrap distributions, scipy's exact binomial
test, the closed-form normal interval on large samples, and an explicit row-index bootstrap
loop; never the code's own earlier output.
"""
import json
import math

import numpy as np
import pytest

from eval import paired
from eval.gate import compare_reports, gate_message, regate
from eval.render import chart_figure, markdown_table, write_report
from eval.report import CapabilityReport, CategoryScore, ReportError, RowResult, TaskScore

# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("b, c, expected", [
    (1, 6, 2 * (1 + 7) / 2 ** 7),          # 2 P(X <= 1), X ~ Bin(7, 1/2) = 16/128
    (6, 0, 2 / 2 ** 6),                    # all six discordant rows lost
    (5, 0, 2 / 2 ** 5),                    # five: 0.0625, not significant
    (10, 3, 2 * (1 + 13 + 78 + 286) / 2 ** 13),
    (4, 4, 1.0),                           # 2 P(X <= 4) > 1 -> capped at 1
    (0, 0, 1.0),                           # no discordant row
])
def test_mcnemar_exact_p_against_hand_computed_tails(b, c, expected):
    assert paired.mcnemar_p_from_counts(b, c) == pytest.approx(expected, rel=1e-12)
    assert paired.mcnemar_p_from_counts(c, b) == pytest.approx(expected, rel=1e-12)  # two-sided: symmetric


def test_mcnemar_from_rows_counts_only_discordant_pairs_and_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    # 1 row lost, 6 gained, 20 right in both, 13 wrong in both
    before = [1] * 1 + [0] * 6 + [1] * 20 + [0] * 13
    after = [0] * 1 + [1] * 6 + [1] * 20 + [0] * 13
    assert paired.mcnemar_exact_p(before, after) == pytest.approx(16 / 128)
    rng = np.random.default_rng(3)
    for _ in range(5):
        b, c = (int(x) for x in rng.integers(0, 40, size=2))
        if b + c:
            assert paired.mcnemar_p_from_counts(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert paired.mcnemar_exact_p([0.5, 1.0], [0.0, 1.0]) is None  # not 0/1 scores


# ----------------------------------------------------------------------------- the bootstrap


@pytest.mark.parametrize("before, after, d", [
    ([1] * 7, [0] * 7, 100.0),
    ([1, 0, 1], [1, 0, 1], 0.0),
    ([0.5] * 4, [0.25] * 4, 25.0),
])
def test_identical_pairs_give_a_point_interval(before, after, d):
    assert paired.bootstrap_interval(before, after) == [d, d]


def test_small_tables_against_the_hand_computed_bootstrap_distribution():
    # n = 2, d = (100, 0): a resample's mean is 0, 50 or 100 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% points are 0 and 100.
    assert paired.bootstrap_interval([1, 0], [0, 0]) == [0.0, 100.0]
    # n = 4, d = (100, 0, 0, 0): mean = 25 k with k ~ Bin(4, 1/4): P(k = 0) = 81/256 > 2.5%,
    # P(k >= 3) = 13/256 = 5.1% > 2.5% and P(k = 4) = 1/256 < 2.5%: the interval is [0, 75].
    assert paired.bootstrap_interval([1, 1, 0, 0], [0, 1, 0, 0]) == [0.0, 75.0]


def test_large_sample_matches_the_normal_closed_form():
    rng = np.random.default_rng(11)
    n = 3000
    before = (rng.random(n) < 0.65).astype(float)
    after = before.copy()
    flips = rng.random(n) < 0.15
    after[flips] = 1 - after[flips]
    d = 100 * (before - after)
    half = 1.959964 * d.std() / math.sqrt(n)  # plug-in SE: the bootstrap's own variance
    low, high = paired.bootstrap_interval(before, after)
    assert low == pytest.approx(d.mean() - half, abs=0.15)
    assert high == pytest.approx(d.mean() + half, abs=0.15)


def _index_bootstrap_interval(statistic, n: int, seed: int, resamples: int = 20000) -> np.ndarray:
    """Reference: draw n row indices per resample, one resample at a time; 95% percentile bounds."""
    rng = np.random.default_rng(seed)
    return np.quantile([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)], [0.025, 0.975])


def test_the_count_draw_matches_an_explicit_row_index_bootstrap():
    # Reference: resample row indices one resample at a time (before and after together).
    rng = np.random.default_rng(5)
    before = (rng.random(60) < 0.7).astype(float)
    after = np.where(rng.random(60) < 0.25, 1 - before, before)
    ref = _index_bootstrap_interval(lambda idx: 100 * (before[idx].mean() - after[idx].mean()), 60, seed=123)
    ours = paired.bootstrap_interval(before, after, resamples=20000)
    step = 100 / 60  # a resampled mean moves in steps of one row
    assert ours == pytest.approx(list(ref), abs=step + 1e-9)


def test_ratio_interval_matches_an_explicit_row_index_bootstrap():
    # Issue 24's task-score share (candidate / reference) against a per-resample index loop.
    rng = np.random.default_rng(11)
    reference = (rng.random(100) < 0.8).astype(float)
    candidate = np.where(rng.random(100) < 0.3, 1 - reference, reference)
    expected = _index_bootstrap_interval(lambda idx: candidate[idx].sum() / reference[idx].sum(), 100, seed=321)
    ours = paired.ratio_interval(reference, candidate, resamples=20000)
    assert ours == pytest.approx(list(expected), abs=0.015)  # Monte Carlo noise of two bootstraps
    assert ours[0] < candidate.sum() / reference.sum() < ours[1]


def test_ratio_interval_hand_cases():
    same = [1, 0, 1, 1, 0, 1]
    assert paired.ratio_interval(same, same) == [1.0, 1.0]  # every resample's ratio is 1
    assert paired.ratio_interval(same, [0] * 6) == [0.0, 0.0]
    with pytest.raises(ValueError, match="reference scores 0"):
        paired.ratio_interval([0, 0, 0], [1, 0, 1])


def test_seeded_bounds_are_reproducible():
    rng = np.random.default_rng(0)
    before = (rng.random(150) < 0.6).astype(float)
    after = np.where(rng.random(150) < 0.3, 1 - before, before)
    first = paired.bootstrap_interval(before, after, seed=7)
    assert paired.bootstrap_interval(list(before), list(after), seed=7) == first
    pairs = {"a": (before[:70], after[:70]), "b": (before[70:], after[70:])}
    assert paired.mean_drop_interval(pairs, seed=7) == paired.mean_drop_interval(dict(reversed(pairs.items())), seed=7)
    with pytest.raises(ValueError, match="equally long"):
        paired.bootstrap_interval([1, 0], [1])


def test_mean_over_categories_keeps_the_categories_apart():
    # constant differences per category: the mean's interval is the mean of the two drops
    pairs = {"a": ([1] * 5, [0] * 5), "b": ([1] * 40, [1] * 40)}
    assert paired.mean_drop_interval(pairs) == [50.0, 50.0]
    # large categories: the normal interval of (d_a + d_b) / 2 with var = (s_a^2/n_a + s_b^2/n_b) / 4
    rng = np.random.default_rng(2)
    cats = {}
    for name, n, p in (("a", 2000, 0.8), ("b", 500, 0.5)):
        before = (rng.random(n) < p).astype(float)
        cats[name] = (before, np.where(rng.random(n) < 0.2, 1 - before, before))
    d = {k: 100 * (b - a) for k, (b, a) in cats.items()}
    centre = (d["a"].mean() + d["b"].mean()) / 2
    half = 1.959964 * math.sqrt(d["a"].var() / 2000 + d["b"].var() / 500) / 2
    low, high = paired.mean_drop_interval(cats)
    assert low == pytest.approx(centre - half, abs=0.2) and high == pytest.approx(centre + half, abs=0.2)


def test_one_models_score_interval_and_its_table():
    # 3 right of 4: score = 25 k, k ~ Bin(4, 3/4): P(k <= 1) = 13/256 = 5.1% > 2.5% > P(k = 0): [25, 100]
    assert paired.score_interval([1, 1, 1, 0]) == [25.0, 100.0]
    assert paired.score_interval([0, 0, 0]) == [0.0, 0.0]
    table = markdown_table(_report("base", {"facts": [1, 1, 1, 0]}))
    # the floor, 6 rows of 4 = 150 points, is more than the 75 points there are to lose
    assert "| facts | 4 | 75.0 | [25.0, 100.0] | 150.0 (none detectable) |" in table


# ----------------------------------------------------------------------------- min detectable drop


def test_min_detectable_drop_formula():
    z = 1.959964 + 0.841621  # z_{0.975} + z_{0.80}
    assert paired.min_detectable_drop(200, 50.0) == pytest.approx(z * math.sqrt(0.25 / 200) * 100, rel=1e-5)
    assert paired.min_detectable_drop(24, 50.0) == pytest.approx(z * math.sqrt(0.25 / 24) * 100, rel=1e-5)
    # at 100% the binomial term is 0: the floor of 6 rows (2 * 0.5^6 < 0.05 < 2 * 0.5^5) holds
    assert paired.min_detectable_drop(24, 100.0) == pytest.approx(100 * 6 / 24)
    assert paired.min_detectable_drop(0, 50.0) is None
    # the mean of two categories: sqrt(sum p(1-p)/n) / C
    expected = z * math.sqrt(0.25 / 200 + 0.09 / 100) / 2 * 100
    assert paired.mean_min_detectable_drop([(200, 50.0), (100, 90.0)]) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- the gate


def _report(name: str, outcomes: dict[str, list[int]], suite_hash: str = "h") -> CapabilityReport:
    """A report whose categories are made of the given 0/1 rows (suite lines numbered across categories)."""
    rows, line = [], 1
    for cat, values in outcomes.items():
        for v in values:
            rows.append(RowResult(category=cat, kind="exact", line=line, prompt=f"q{line}", correct=bool(v)))
            line += 1
    cats = {k: CategoryScore(n=len(v), correct=sum(v), accuracy=100.0 * sum(v) / len(v)) for k, v in outcomes.items()}
    return CapabilityReport(run_name=name, model={"path": name, "hash": name}, categories=cats,
                            suite={"name": "s", "version": "1", "path": "s.jsonl", "hash": suite_hash, "rows": len(rows)},
                            overall_accuracy=0.0, macro_accuracy=0.0, rows=rows)


def _flip(values: list[int], where: list[int]) -> list[int]:
    return [1 - v if i in where else v for i, v in enumerate(values)]


def test_a_few_random_flips_pass_significant_and_fail_point():
    rng = np.random.default_rng(1)  # 10 random rows flip: 7 lost, 3 gained
    base_rows = [int(x) for x in rng.random(200) < 0.7]
    flipped = [int(i) for i in rng.choice(200, size=10, replace=False)]
    tuned_rows = _flip(base_rows, flipped)
    base, tuned = _report("base", {"chat": base_rows}), _report("tuned", {"chat": tuned_rows})
    drop = 100 * (sum(base_rows) - sum(tuned_rows)) / 200
    lost = sum(base_rows[i] == 1 for i in flipped)
    assert drop > 1.0 and paired.mcnemar_p_from_counts(lost, 10 - lost) > 0.05  # over the bound, yet noise
    point = compare_reports(base, tuned, max_drop=1.0, gate="point")
    significant = compare_reports(base, tuned, max_drop=1.0, gate="significant")
    assert point.failed_categories == ["chat"] and not point.passed
    assert significant.passed and significant.gate == "significant"
    change = significant.categories["chat"]
    assert change.drop_ci95[0] <= 0 < change.drop_ci95[1] and change.n_pairs == 200
    assert change.mcnemar_p == pytest.approx(paired.mcnemar_p_from_counts(lost, 10 - lost))
    message = gate_message(significant)
    assert message.startswith("PASS: no category lost more than 1 points")
    assert "interval reaches 0 (not failed): chat" in message and "gate rule: significant" in message
    assert "gate rule: point" in gate_message(point) and "95% CI [" in gate_message(point)


def test_a_wiped_out_category_fails_both_rules():
    base = _report("base", {"facts": [1] * 25 + [0] * 5, "chat": [1, 0] * 15})
    tuned = _report("tuned", {"facts": [0] * 30, "chat": [1, 0] * 15})
    for gate in ("point", "significant"):
        f = compare_reports(base, tuned, max_drop=10, gate=gate)
        assert f.failed_categories == ["facts"], gate
        assert f.categories["facts"].drop_ci95[0] > 0
    assert f.categories["facts"].mcnemar_p == pytest.approx(2 / 2 ** 25)
    assert f.mean_drop_ci95[0] > 0 and f.n_pairs == 60


def test_exactly_at_the_bound():
    # 20 of 200 rows lost: a drop of exactly 10 points is not *more* than 10, under either rule;
    # just over the bound it fails both (the interval lies well above 0)
    base = _report("base", {"facts": [1] * 200})
    tuned = _report("tuned", {"facts": [0] * 20 + [1] * 180})
    for gate in ("point", "significant"):
        assert compare_reports(base, tuned, max_drop=10, gate=gate).passed
        assert not compare_reports(base, tuned, max_drop=9.99, gate=gate).passed
    # 3 of 30 rows lost, also exactly 10 points: over 9.99, but no resample without a lost row is
    # rare enough ((27/30)^30 = 4.2% > 2.5%), so the interval starts at 0 (McNemar: p = 0.25)
    small = compare_reports(_report("base", {"facts": [1] * 30}), _report("tuned", {"facts": [0] * 3 + [1] * 27}),
                            max_drop=9.99, gate="significant")
    assert small.passed and small.categories["facts"].drop_ci95[0] == 0.0
    assert small.categories["facts"].mcnemar_p == pytest.approx(0.25)
    # an interval whose low end is exactly 0 does not lie above 0: significant passes, point fails
    base2, tuned2 = _report("base", {"facts": [1, 0]}), _report("tuned", {"facts": [0, 0]})
    f = compare_reports(base2, tuned2, max_drop=10, gate="significant")
    assert f.categories["facts"].drop_ci95 == [0.0, 100.0] and f.passed
    assert not compare_reports(base2, tuned2, max_drop=10, gate="point").passed


def test_regate_and_an_unknown_rule():
    rng = np.random.default_rng(1)  # 10 random rows flip: 7 lost, 3 gained
    base_rows = [int(x) for x in rng.random(200) < 0.7]
    tuned_rows = _flip(base_rows, [int(i) for i in rng.choice(200, size=10, replace=False)])
    f = compare_reports(_report("b", {"chat": base_rows}), _report("t", {"chat": tuned_rows}), max_drop=1.0)
    assert f.gate == "significant" and f.passed  # the default rule
    assert not regate(f, "point").passed and regate(regate(f, "point"), "significant").passed
    with pytest.raises(ReportError, match="unknown gate rule"):
        compare_reports(_report("b", {"chat": base_rows}), _report("t", {"chat": tuned_rows}), gate="strict")


def test_json_round_trip_keeps_the_statistics_and_the_row_outcomes():
    base = _report("base", {"facts": [1, 1, 0, 1], "chat": [1, 0]})
    tuned = _report("tuned", {"facts": [0, 1, 0, 1], "chat": [1, 1]})
    tuned.forgetting = compare_reports(base, tuned, max_drop=5)
    data = json.loads(json.dumps(tuned.to_dict()))
    f = data["forgetting"]
    assert f["gate"] == "significant" and f["bootstrap"] == {"resamples": 10000, "seed": 0, "confidence": 0.95}
    # suite lines: facts 1-4, chat 5-6; [before, after] per line
    assert f["row_outcomes"] == {"chat": {"5": [1, 1], "6": [0, 1]},
                                 "facts": {"1": [1, 0], "2": [1, 1], "3": [0, 0], "4": [1, 1]}}
    facts = f["categories"]["facts"]
    assert facts["n_pairs"] == 4 and facts["mcnemar_p"] == 1.0 and len(facts["drop_ci95"]) == 2
    back = CapabilityReport.from_dict(data)
    assert back.forgetting.categories["facts"].drop_ci95 == facts["drop_ci95"]
    assert back.forgetting.mean_drop_ci95 == f["mean_drop_ci95"]
    data["forgetting"]["gate"] = "loose"
    with pytest.raises(ReportError, match="forgetting.gate"):
        CapabilityReport.from_dict(data)


def test_old_reports_without_rows_load_and_fall_back_to_the_point_rule():
    old_forgetting = {"baseline_run": "base", "baseline_model_hash": "x", "max_drop": 5.0,
                      "categories": {"facts": {"before": 80.0, "after": 70.0, "drop": 10.0, "failed": True}},
                      "mean_forgetting": 10.0, "worst_forgetting": 10.0, "worst_category": "facts",
                      "failed_categories": ["facts"], "warnings": [], "passed": False}
    old = {"schema": "forgetless.eval.report/1", "run_name": "old", "model": {"path": "m"}, "suite": {"name": "s"},
           "categories": {"facts": {"n": 10, "correct": 7, "accuracy": 70.0}}, "overall_accuracy": 70.0,
           "macro_accuracy": 70.0, "forgetting": old_forgetting}
    report = CapabilityReport.from_dict(old)
    change = report.forgetting.categories["facts"]
    assert (change.drop_ci95, change.mcnemar_p, change.n_pairs, change.min_detectable_drop) == (None,) * 4
    assert report.forgetting.gate == "point" and not report.forgetting.passed
    base = CapabilityReport.from_dict({**old, "run_name": "base", "forgetting": None,
                                       "categories": {"facts": {"n": 10, "correct": 8, "accuracy": 80.0}}})
    f = compare_reports(base, report, max_drop=5)  # significant asked, no rows to pair
    assert f.gate == "point" and f.failed_categories == ["facts"]
    assert any("the significant gate needs per-row outcomes" in w for w in f.warnings)
    report.forgetting = f
    assert "gate" not in report.to_dict()["forgetting"]  # nothing new to say: the old reader still reads it


def test_rows_that_do_not_make_up_the_score_are_not_paired():
    base = _report("base", {"facts": [1] * 10, "chat": [1] * 10})
    base.categories["facts"].accuracy = 50.0  # edited by hand: its rows are not what scored it
    tuned = _report("tuned", {"facts": [1] * 10, "chat": [1] * 9 + [0]})
    f = compare_reports(base, tuned, max_drop=5)
    assert f.categories["facts"].drop_ci95 is None and f.categories["chat"].drop_ci95 is not None
    assert f.failed_categories == []  # facts improved; chat lost 10 points but its interval reaches 0
    assert f.mean_drop_ci95 is None and any("facts (" in w for w in f.warnings)
    moved = _report("tuned", {"facts": [1] * 10, "chat": [1] * 10}, suite_hash="other")
    moved.rows[0].prompt = "another question"
    g = compare_reports(_report("base", {"facts": [1] * 10, "chat": [1] * 10}), moved)
    assert g.categories["facts"].drop_ci95 is None and "different prompts" in " ".join(g.warnings)


def test_target_task_rows_are_left_out_and_rows_merged_after_them_pair():
    """A report lists suite rows, then the target task's rows (here in a category named like a
    suite category, on the same line numbers), then merged rows (lm-eval tasks)."""
    def build(name, facts, task, arc):
        report = _report(name, {"facts": facts})
        report.task = TaskScore("t", "t.jsonl", "th", len(task), sum(task), 100.0 * sum(task) / len(task))
        report.rows += [RowResult(category="facts", kind="exact", line=i + 1, prompt=f"task{i}", correct=bool(v))
                        for i, v in enumerate(task)]
        report.rows += [RowResult(category="arc_easy", kind="choice", line=i + 1, prompt=f"arc{i}", correct=bool(v))
                        for i, v in enumerate(arc)]
        report.categories["arc_easy"] = CategoryScore(len(arc), sum(arc), 100.0 * sum(arc) / len(arc))
        return report

    base = build("base", [1, 1, 0, 1], task=[0, 0, 0], arc=[1, 1, 1, 0, 1])
    tuned = build("tuned", [1, 0, 0, 1], task=[1, 1, 1], arc=[0, 0, 0, 0, 0])
    f = compare_reports(base, tuned, max_drop=5)
    assert f.warnings == [] and f.n_pairs == 9
    assert f.row_outcomes["facts"] == {"1": [1, 1], "2": [1, 0], "3": [0, 0], "4": [1, 1]}
    assert f.categories["arc_easy"].mcnemar_p == pytest.approx(2 / 2 ** 4) and f.categories["arc_easy"].n_pairs == 5


# ----------------------------------------------------------------------------- table, chart, CLI


def test_table_and_chart_show_the_intervals(tmp_path):
    base = _report("base", {"facts": [1] * 25 + [0] * 5, "chat": [1, 0] * 15})
    tuned = _report("tuned", {"facts": [0] * 30, "chat": [0, 0] + [1, 0] * 14})
    tuned.forgetting = compare_reports(base, tuned, max_drop=5)
    table = markdown_table(tuned)
    facts = tuned.forgetting.categories["facts"]
    assert f"| facts | 30 | 83.3 | 0.0 | +83.3 | **FAIL** | [{facts.drop_ci95[0]:+.1f}, {facts.drop_ci95[1]:+.1f}] |" \
           in table
    assert "gate rule **significant**" in table and "McNemar p" in table
    fig = chart_figure(tuned)
    try:
        bars = [c for c in fig.axes[1].containers if c.__class__.__name__ == "ErrorbarContainer"]
        assert len(bars) == 2  # one error bar per category
        segments = bars[0].lines[2][0].get_segments()
        assert [segments[0][0][1], segments[0][1][1]] == pytest.approx(sorted(tuned.forgetting.categories["chat"].drop_ci95))
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    paths = write_report(tuned, tmp_path / "r.json")
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("module", ["eval.__main__", "eval.interpolate", "eval.compare"])
def test_an_unknown_gate_rule_exits_2_before_any_model_loads(module, capsys, monkeypatch):
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr("eval.__main__.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = {"eval.__main__": ["--model", "m", "--suite", "s.jsonl", "--out", "r.json", "--gate", "strict"],
            "eval.interpolate": ["--base-model", "b", "--model", "t", "--suite", "s", "--max-drop", "5", "--out", "o",
                                 "--gate", "strict"],
            "eval.compare": ["r.json", "--gate", "strict"]}[module]
    entry = mod.main if module == "eval.compare" else mod.run
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    assert "--gate: invalid choice: 'strict'" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["point", "significant"])
def test_the_trainer_passes_capability_gate_to_the_report_and_the_interpolation(rule, tmp_path, monkeypatch):
    import types

    import torch

    import eval as ev
    import eval.interpolate as interpolate
    import kernels.peft_format
    import trainer.loop
    from trainer.config import TrainConfig
    from trainer.run import forgetting_report, interpolation_report

    seen = {}
    base = _report("base", {"facts": [1] * 30})
    tuned = _report("tuned", {"facts": [0] * 3 + [1] * 27})

    def fake_score_against_base(*args, **kwargs):
        seen["report"] = kwargs["gate"]
        tuned.forgetting = compare_reports(base, tuned, kwargs["max_drop"], gate=kwargs["gate"])
        return tuned

    def fake_interpolate(*args, **kwargs):
        seen["interpolation"] = kwargs["gate"]
        return types.SimpleNamespace(files={"json": "i.json", "chart": "i.png"}, passed=True)

    monkeypatch.setattr(trainer.loop, "load_model", lambda cfg, device: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(kernels.peft_format, "load_adapter", lambda model, path: model)
    monkeypatch.setattr(ev, "score_against_base", fake_score_against_base, raising=False)
    monkeypatch.setattr(interpolate, "interpolate_to_gate", fake_interpolate)
    saved = tmp_path / "adapter"
    saved.mkdir()
    (saved / "adapter_config.json").write_text("{}")
    cfg = TrainConfig(model=str(tmp_path), output_dir=str(tmp_path / "out"), capability_suite="s.jsonl",
                      capability_max_drop=9.99, capability_gate=rule, device="cpu")
    (tmp_path / "out").mkdir()
    code = forgetting_report(cfg, types.SimpleNamespace(saved_to=str(saved)))
    # 3 of 30 rows lost (10 points over a 9.99 bound): the point rule fails, the interval reaches 0
    assert code == (1 if rule == "point" else 0)
    written = json.loads((tmp_path / "out" / "forgetting_report.json").read_text())["forgetting"]
    assert written["gate"] == rule and seen["report"] == rule
    assert interpolation_report(cfg, types.SimpleNamespace(saved_to=str(saved))) == 0
    assert seen["interpolation"] == rule
