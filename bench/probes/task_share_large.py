"""A row's task score as a share of plain LoRA's, on the task's 100 suite rows and on extra ones.

``python -m bench.probes.task_share_large --pair "reviews, 0" RUN/lora "RUN/self-replay 10%" [--pair ...]``

Issue 24's bar is ">= 95% of plain LoRA's task score"; with the task's 100 suite rows a share
of 94.5% has a paired interval about 10 points wide, so it cannot be told from 95%. This reads
two rows' forgetting reports (``<row>/forgetting_report.json``) that were scored with the
task's extra held-out prompts as their capability suite (``python -m trainer.demo.chat_tasks
extra-suite reviews --rows 900 --category task_extra --out FILE``, then the run with
``capability_suite=FILE``), and prints, for each pair, both rows' scores and the candidate's
share of the reference's with its paired bootstrap interval (matrix_intervals' share cell)
on the 100 rows, on the extra rows, and on all of them together.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.probes.matrix_intervals import _share
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


def pair_row(label: str, reference_dir: Path, candidate_dir: Path) -> str:
    ref = row_outcomes(reference_dir / "forgetting_report.json")
    cand = row_outcomes(candidate_dir / "forgetting_report.json")
    def cell(r: dict, c: dict, with_count: bool) -> str:
        keys = set(r) & set(c)
        if not keys:
            return ("0 | " if with_count else "") + " | | "
        score = (f"{100 * sum(r[k] for k in keys) / len(keys):.1f} | {100 * sum(c[k] for k in keys) / len(keys):.1f}"
                 f" | {_share(r, c)}")
        return f"{len(keys)} | {score}" if with_count else score

    # pooled: the two parts' rows keyed by (part, line), so suite line 3 and extra line 3 stay apart
    pooled_ref = {(part, line): v for part in (SUITE, EXTRA) for line, v in ref[part].items()}
    pooled_cand = {(part, line): v for part in (SUITE, EXTRA) for line, v in cand[part].items()}
    cells = [cell(ref[part], cand[part], True) for part in (SUITE, EXTRA)] + [cell(pooled_ref, pooled_cand, False)]
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
