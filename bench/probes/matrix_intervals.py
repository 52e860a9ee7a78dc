"""The real-model matrix as a table with paired intervals and both gate rules' verdicts.

``python -m bench.probes.matrix_intervals runs/smollm2_matrix [--extra runs/smollm2_matrix/trl-sdft] [--reference lora]``

Reads each row's forgetting report (``<row>/forgetting_report.json``, written by the trainer; a
TRL row's ``report.json``, written by ``python -m eval``) and prints one markdown table: task score,
each category's drop (before - after, points) with its paired 95% interval, the mean forgetting
with its interval, format rigidity, the verdict under ``significant`` and under ``point`` (the
same statistics, :func:`eval.gate.regate`), the train wall time and peak memory (metrics.jsonl /
row.json where present), and, with ``--reference ROW``, each row's task score as a share of that
row's (issue 24's ">= 95% of plain LoRA") with its paired bootstrap interval over the task rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.gate import regate
from eval.paired import ratio_interval
from eval.report import read_report


def _verdict(forgetting, rule: str) -> str:
    decided = regate(forgetting, rule)
    rigid = " + rigidity" if forgetting.format_rigidity_failed else ""
    if decided.passed and not forgetting.format_rigidity_failed:
        return "pass"
    names = ", ".join(decided.failed_categories)
    return f"FAIL ({names}{rigid})" if names else "FAIL (rigidity)"


def _cell(c) -> str:
    ci = c.drop_ci95
    return f"{c.drop:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else f"{c.drop:+.1f}"


def _row_report(path: Path) -> Path | None:
    for name in ("forgetting_report.json", "report.json"):
        found = sorted(path.rglob(name))
        if found:
            return found[0]
    return None


def _cost(path: Path) -> str:
    for row_json in path.rglob("row.json"):
        data = json.loads(row_json.read_text())
        wall, peak = data.get("train_wall_s") or data.get("wall_seconds"), data.get("peak_memory_mb")
        if wall:
            return f"{float(wall):.0f} s" + (f", {float(peak):,.0f} MB" if peak else "")
    trl = path / "trl_row.json"
    if trl.is_file():
        data = json.loads(trl.read_text())
        return f"{data['train_wall_s']:.0f} s, {data['peak_rss_mb']:,.0f} MB"
    return ""


def _task_outcomes(report) -> dict[int, float]:
    """Suite line -> 1/0 for the task rows of a report (the held-out task prompts)."""
    return {r.line: float(bool(r.correct)) for r in report.rows if r.category == "task"}


def _share(reference: dict[int, float] | None, outcomes: dict[int, float]) -> str:
    """``share [low, high]`` of the reference's task score, paired over the rows both scored."""
    lines = sorted(set(reference or {}) & set(outcomes))
    if not lines or not sum(reference[i] for i in lines):
        return ""
    ref, cand = [reference[i] for i in lines], [outcomes[i] for i in lines]
    low, high = ratio_interval(ref, cand)
    return f"{sum(cand) / sum(ref):.1%} [{low:.1%}, {high:.1%}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("matrix", help="the compare runner's --out directory (one folder per row)")
    ap.add_argument("--extra", action="append", default=[], help="another row folder (e.g. the TRL row)")
    ap.add_argument("--reference", default=None, help="row folder name whose task score the others are a share of "
                                                      "(e.g. lora)")
    args = ap.parse_args(argv)
    rows = [p for p in sorted(Path(args.matrix).iterdir()) if p.is_dir()]
    rows += [Path(p) for p in args.extra if Path(p).resolve() not in {r.resolve() for r in rows}]  # listed once
    reference = None
    if args.reference:
        found = _row_report(Path(args.matrix) / args.reference)
        if found is None:
            ap.error(f"--reference {args.reference}: no report under {Path(args.matrix) / args.reference}")
        reference = _task_outcomes(read_report(found))
    header_done = False
    for row in rows:
        report_path = _row_report(row)
        if report_path is None:
            print(f"{row.name}: no forgetting report yet", file=sys.stderr)
            continue
        report = read_report(report_path)
        f = report.forgetting
        if f is None:
            continue
        cats = sorted(f.categories)
        if not header_done:
            share = f" share of {args.reference} |" if reference else ""
            print("| row | task |" + share + " " + " | ".join(cats)
                  + " | mean forgetting | format rigidity | significant | point | train |")
            print("|---|---:|" + ("---:|" if reference else "") + "---:|" * len(cats) + "---:|---:|---|---|---|")
            before = " | ".join(f"{f.categories[c].before:.1f}" for c in cats)
            print(f"| base (scores) | {f.target_before or 0:.1f} |" + (" |" if reference else "") + f" {before} | | "
                  f"{f.format_rigidity_before if f.format_rigidity_before is not None else ''} | | | |")
            header_done = True
        mean_ci = f.mean_drop_ci95
        mean = f"{f.mean_forgetting:+.1f}" + (f" [{mean_ci[0]:+.1f}, {mean_ci[1]:+.1f}]" if mean_ci else "")
        rigidity = f"{f.format_rigidity_after:.1f}" if f.format_rigidity_after is not None else ""
        task = f"{f.target_after:.1f}" if f.target_after is not None else ""
        share = f" {_share(reference, _task_outcomes(report))} |" if reference else ""
        print(f"| {row.name} | {task} |{share} " + " | ".join(_cell(f.categories[c]) for c in cats)
              + f" | {mean} | {rigidity} | {_verdict(f, 'significant')} | {_verdict(f, 'point')} | {_cost(row)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
