"""A row's task score as a share of plain LoRA's, on the task's 100 suite rows and on extra ones.

``python -m bench.probes.task_share_large --pair "reviews, 0" RUN/lora "RUN/self-replay 10%" [--pair ...]``

Issue 24's bar is ">= 95% of plain LoRA's task score"; with the task's 100 suite rows a share
of 94.5% has a paired interval about 10 points wide, so it cannot be told from 95%. This reads
two rows' forgetting reports (``<row>/forgetting_report.json``) that were scored with the
task's extra held-out prompts as their capability suite (``python -m trainer.demo.chat_tasks
extra-suite reviews --rows 900 --category task_extra --out FILE``, then the run with
``capability_suite=FILE``), and prints, for each pair, both rows' scores and the candidate's
share of the reference's with its paired bootstrap interval (:func:`eval.paired.ratio_interval`)
on the 100 rows, on the extra rows, and on all of them together.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.paired import ratio_interval
from eval.report import read_report

SUITE, EXTRA = "task", "task_extra"


def row_outcomes(report_path: Path) -> dict[str, dict[int, float]]:
    """category -> suite line -> 1/0, for the task rows (``task``) and the extra ones."""
    report = read_report(report_path)
    out: dict[str, dict[int, float]] = {SUITE: {}, EXTRA: {}}
    for r in report.rows:
        if r.category in out:
            out[r.category][r.line] = float(bool(r.correct))
    return out


def share_cell(reference: list[float], candidate: list[float]) -> str:
    if not reference or not sum(reference):
        return ""
    low, high = ratio_interval(reference, candidate)
    return f"{sum(candidate) / sum(reference):.1%} [{low:.1%}, {high:.1%}]"


def pair_row(label: str, reference_dir: Path, candidate_dir: Path) -> str:
    ref = row_outcomes(reference_dir / "forgetting_report.json")
    cand = row_outcomes(candidate_dir / "forgetting_report.json")
    cells, pooled_ref, pooled_cand = [], [], []
    for part in (SUITE, EXTRA):
        lines = sorted(set(ref[part]) & set(cand[part]))
        r, c = [ref[part][i] for i in lines], [cand[part][i] for i in lines]
        pooled_ref += r
        pooled_cand += c
        n = len(lines)
        cells.append(f"{n} | {100 * sum(r) / n:.1f} | {100 * sum(c) / n:.1f} | {share_cell(r, c)}" if n else
                     "0 | | | ")
    n = len(pooled_ref)
    cells.append(f"{100 * sum(pooled_ref) / n:.1f} | {100 * sum(pooled_cand) / n:.1f} | "
                 f"{share_cell(pooled_ref, pooled_cand)}" if n else " | | ")
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "REFERENCE", "CANDIDATE"),
                    help="a label and two row folders (the reference, e.g. plain LoRA, then the candidate)")
    args = ap.parse_args(argv)
    for label, ref, cand in args.pair:
        for folder in (ref, cand):
            if not (Path(folder) / "forgetting_report.json").is_file():
                ap.error(f"{folder}: no forgetting_report.json (has the row finished?)")
    print("| pair | suite rows | reference | candidate | share | extra rows | reference | candidate | share "
          "| all: reference | candidate | share |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|")
    for label, ref, cand in args.pair:
        print(pair_row(label, Path(ref), Path(cand)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
