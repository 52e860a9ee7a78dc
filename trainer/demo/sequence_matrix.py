"""``python -m trainer.demo.sequence_matrix``: the demo task sequence under several methods (issue 15).

Every row of the matrix file (``configs/sequence_matrix.yaml``) is one run of
``python -m trainer.sequence`` on the same sequence config (its ``config:``), with the row's
keys given as ``key=value`` overrides (so they apply to every stage). The result is one table,
``matrix.md`` / ``matrix.json`` in the output folder:

    row | ACC | BWT | FWT | mean forgetting of earlier tasks | final-stage task | capability mean drop
        | gate | train s | wall s

and ``heatmaps.png``, the accuracy matrix R of every row side by side. Each row keeps its own
folder (``<out>/<row>/``, the sequence's outputs); rerunning the command resumes: finished
stages are kept by the sequence itself, so a finished row is only re-read (and re-scored from
eval's cache).

Usage::

    python -m trainer.demo.sequence_matrix [--matrix configs/sequence_matrix.yaml] [--out runs/sequence_matrix]
                                           [--only NAME,NAME] [key=value ...]

``key=value`` pairs apply to every row (after the row's own keys), e.g. ``demo_base=tiny
max_steps=20`` for a quick check.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

from trainer.demo.compare import MatrixError, select_rows

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MATRIX = REPO / "configs" / "sequence_matrix.yaml"


def load_matrix(path: str | Path) -> tuple[Path, list[dict]]:
    p = Path(path)
    if not p.is_file():
        raise MatrixError(f"matrix file {p} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    config, rows = data.get("config"), data.get("runs")
    if not isinstance(config, str) or not isinstance(rows, list) or not rows:
        raise MatrixError(f"{p}: expected `config:` (the sequence config, relative to the repository) and `runs:` "
                          "(a non-empty list of rows, each with a name)")
    names = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or row["name"] in names:
            raise MatrixError(f"{p}: runs[{i}] needs a `name:` of its own")
        names.add(row["name"])
    config_path = Path(config) if Path(config).is_absolute() else REPO / config
    return config_path, rows


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def row_argv(config: Path, row: dict, cli: list[str], out: Path) -> list[str]:
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, list) else v

    keys = [f"{k}={value(v)}" for k, v in row.items() if k not in ("name", "note")]
    return ["--config", str(config), *keys, *cli, f"output_dir={out / slug(row['name'])}"]


def _pt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def table(results: list[tuple[dict, dict]]) -> str:
    head = ["row", "ACC", "BWT", "FWT", "mean forgetting of earlier tasks", "final-stage task",
            "capability mean drop", "gate", "train s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 6 + "---|---:|---:|"]
    for row, report in results:
        m = report["metrics"]
        drop = report["capabilities"]["mean_drop_by_stage"][-1]
        gate = "n/a" if not report["gate"]["gated"] else ("pass" if report["gate"]["passed"] else "FAIL")
        lines.append(f"| {row['name']} | {_pt(m['average_accuracy'])} | {_pt(m['backward_transfer'], True)} | "
                     f"{_pt(m['forward_transfer'], True)} | {_pt(report['mean_forgetting_earlier'], True)} | "
                     f"{_pt(report['final_task_score'])} | {_pt(drop, True)} | {gate} | "
                     f"{report['train_seconds']:.0f} | {report['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def draw_heatmaps(results: list[tuple[dict, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.sequence_report import heatmap

    cols = min(3, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.5 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    image = None
    for ax, (row, report) in zip(axes.flat, results, strict=False):
        image = heatmap(ax, report, title=row["name"])
    fig.colorbar(image, ax=axes, shrink=0.6, label="points")
    try:
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.sequence_matrix",
                                     description="Run the demo task sequence under several methods.")
    parser.add_argument("--matrix", default=str(DEFAULT_MATRIX), help="matrix YAML (config: + runs:)")
    parser.add_argument("--out", default="runs/sequence_matrix", help="output folder (one folder per row)")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every row")
    args = parser.parse_args(argv)
    from trainer import sequence
    from trainer.config import ConfigError
    from trainer.data import DataError

    out = Path(args.out)
    try:
        config, rows = load_matrix(args.matrix)
        rows = select_rows(rows, args.only, args.matrix)
        plans = []
        for row in rows:  # every row's config is checked before the first one trains
            spec = sequence.parse_spec(row_argv(config, row, args.overrides, out))
            plans.append((row, spec, sequence.stage_configs(spec)))
        started = time.time()
        results = []
        for row, spec, stages in plans:
            print(f"\n=== {row['name']}: {row.get('note', '')}", flush=True)
            results.append((row, sequence.run_sequence(spec, stages)))
            (out / "matrix.json").write_text(json.dumps([{"row": r, "report": rep} for r, rep in results], indent=2,
                                                        default=str))
    except (ConfigError, DataError, MatrixError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = (table(results) + f"\nsequence config: {config.relative_to(REPO) if config.is_relative_to(REPO) else config}"
            + (f"; for every row: {' '.join(args.overrides)}" if args.overrides else "")
            + f"\nmatrix wall time {time.time() - started:.0f} s\n")
    (out / "matrix.md").write_text(text)
    draw_heatmaps(results, out / "heatmaps.png")
    print("\n" + text)
    print(f"table: {out / 'matrix.md'}, {out / 'matrix.json'}; heatmaps: {out / 'heatmaps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
