"""``python -m trainer.demo.compare``: the methods matrix of issue 6 on the demo base and task.

Every row of a matrix (``configs/compare.yaml`` for the demo, ``configs/smollm2_compare.yaml`` for
the real model) is one training run through the trainer's own API
(:func:`trainer.run.resolve_demo`, :func:`trainer.loop.train`, then
:func:`trainer.run.forgetting_report`, the same code ``python -m trainer.run`` ends with), on
the same base, the same task data, the same seed and the same optimizer-step budget (the
``common`` block; a row may stop earlier with early stopping). The result is one table:

    method | task | drop per capability | mean forgetting | format rigidity | refusal rate
           | gate | steps | train wall s | tokens/s

(the base's own scores on the line above the table; a drop is before - after, positive = forgot)
printed, saved as ``matrix.md`` / ``matrix.json`` in the output directory, and the
learning-vs-forgetting scatter drawn by :func:`eval.compare.draw_scatter` (``pareto.png``). A
row with ``interpolate: auto`` is followed by its interpolated model (the largest alpha that
passes the gate, ``eval.interpolate``), and its curve is drawn through the scatter.

Usage::

    python -m trainer.demo.compare [--matrix configs/compare.yaml] [--out runs/compare]
                                   [--only NAME,NAME] [--resume] [key=value ...]

``--resume`` keeps the rows a previous run of the same matrix finished (their ``row.json``) and
runs the others: a matrix of real-model runs takes hours on a CPU.

``key=value`` pairs are trainer config keys applied to every row (after the file), e.g.
``demo_base=tiny max_steps=20 capability_limit=20`` for a quick check.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MATRIX = REPO / "configs" / "compare.yaml"
CAPABILITIES = ("instruction", "knowledge", "reasoning", "format", "safety")


class MatrixError(ValueError):
    """A problem with the matrix file the user can fix."""


@dataclass
class MatrixRow:
    """One finished run of the matrix (scores in points, 0-100)."""

    name: str
    note: str
    overrides: dict[str, Any]
    task: float | None = None
    capabilities: dict[str, float] = field(default_factory=dict)
    mean_forgetting: float | None = None
    format_rigidity: float | None = None
    refusal_rate: float | None = None
    passed: bool | None = None
    steps: int = 0
    stopped_early: bool = False
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    report: str | None = None
    error: str | None = None
    drops: dict[str, float] = field(default_factory=dict)  # before - after, points
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (alpha, forgetting, task gain)


def load_matrix(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(common overrides, rows) from the matrix YAML; each row has ``name`` and optional ``note``."""
    p = Path(path)
    if not p.is_file():
        raise MatrixError(f"matrix file {p} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    common, rows = data.get("common") or {}, data.get("runs") or []
    if not isinstance(common, dict) or not isinstance(rows, list) or not rows:
        raise MatrixError(f"{p}: expected `common:` (a mapping) and `runs:` (a non-empty list)")
    names = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise MatrixError(f"{p}: runs[{i}] needs a `name:`")
        if row["name"] in names:
            raise MatrixError(f"{p}: runs[{i}]: duplicate name {row['name']!r}")
        names.add(row["name"])
    return common, rows


def row_config(common: dict[str, Any], row: dict[str, Any], cli: dict[str, str], out_dir: Path):
    """The resolved TrainConfig of one row: the file's common block, the row, then the command line."""
    from trainer.config import build_config
    from trainer.run import resolve_demo

    values = {**common, **{k: v for k, v in row.items() if k not in ("name", "note")}, **cli}
    values["output_dir"] = str(out_dir / row["name"])
    cfg = build_config(values, source=f"matrix row {row['name']}")
    return resolve_demo(cfg, set(values))


def run_row(common: dict[str, Any], row: dict[str, Any], cli: dict[str, str], out_dir: Path) -> list[MatrixRow]:
    """Train one row and score it against the base (the default run's own report code); with
    ``interpolate: auto`` also its interpolated model."""
    import eval as ev
    from trainer.loop import TrainingDiverged, train
    from trainer.run import forgetting_report

    result = MatrixRow(name=row["name"], note=row.get("note", ""),
                       overrides={k: v for k, v in row.items() if k not in ("name", "note")})
    cfg = row_config(common, row, cli, out_dir)
    print(f"\n=== {row['name']}: {row.get('note', '')}", flush=True)
    try:
        trained = train(cfg)
    except TrainingDiverged as e:
        result.error = f"diverged: {e}"
        return [result]
    print(trained.summary(), flush=True)
    forgetting_report(cfg, trained)
    scored_row(result, ev.read_report(Path(cfg.output_dir) / "forgetting_report.json"),
               Path(cfg.output_dir) / "forgetting_report.json")
    result.steps = max(trained.losses) if trained.losses else trained.steps
    result.stopped_early = trained.stopped_early
    result.wall_seconds = trained.wall_seconds
    result.tokens_per_second = trained.tokens_per_second
    rows = [result]
    if cfg.interpolate == "auto":
        rows.append(interpolated_row(cfg, trained, result))
    for r in rows:
        Path(cfg.output_dir, "row.json" if r is result else "row-interpolated.json").write_text(
            json.dumps(vars(r), indent=2))
    return rows


def scored_row(row: MatrixRow, report, path: Path) -> MatrixRow:
    """Fill a row's score columns from its forgetting report."""
    f = report.forgetting
    row.task = report.task.accuracy if report.task else None
    row.capabilities = {c: s.accuracy for c, s in report.categories.items()}
    row.drops = {c: ch.drop for c, ch in f.categories.items()} if f else {}
    row.mean_forgetting = f.mean_forgetting if f else None
    row.format_rigidity = report.format_rigidity.rate if report.format_rigidity else None
    row.refusal_rate = report.safety.refusal_rate if report.safety else None
    row.passed = f.passed if f is not None and f.gated else None
    row.report = str(path)
    return row


def interpolated_row(cfg, trained, row: MatrixRow) -> MatrixRow:
    """``interpolate=auto``: the run's output mixed back toward the base (the largest alpha that
    passes the gate), as a row of its own, with the curve for the scatter."""
    import eval as ev
    from trainer.run import interpolation_report

    out = MatrixRow(name=f"{row.name} interpolated", note="", overrides=row.overrides)
    interpolation_report(cfg, trained)
    folder = Path(cfg.output_dir) / "interpolation"
    curve = json.loads((folder / "interpolation.json").read_text())
    base_task = curve["base"].get("task_score")
    out.curve = [(p["alpha"], p["mean_forgetting"], p["task_score"] - base_task if base_task is not None else None)
                 for p in curve["points"]]
    if curve["chosen_alpha"] is None:
        out.error = "no alpha passes the gate"
        return out
    out.name = f"{row.name} @ alpha {curve['chosen_alpha']:g}"
    out.note = f"eval.interpolate: the largest alpha of {[p['alpha'] for p in curve['points']]} that passes"
    scored_row(out, ev.read_report(folder / "report.json"), folder / "report.json")
    out.steps, out.wall_seconds, out.tokens_per_second = row.steps, row.wall_seconds, row.tokens_per_second
    return out


def resumed_interpolation(cfg, row: MatrixRow) -> MatrixRow:
    """--resume: a finished row whose interpolation did not finish gets only that part run."""
    from types import SimpleNamespace

    saved = next(p for p in (Path(cfg.output_dir) / "adapter", Path(cfg.output_dir) / "model") if p.is_dir())
    out = interpolated_row(cfg, SimpleNamespace(saved_to=saved), row)
    Path(cfg.output_dir, "row-interpolated.json").write_text(json.dumps(vars(out), indent=2))
    return out


def finished_rows(out_dir: Path, name: str) -> list[MatrixRow] | None:
    """A row (and its interpolated row) a previous run of the matrix finished, for --resume."""
    rows = []
    for file in ("row.json", "row-interpolated.json"):
        path = out_dir / name / file
        if path.is_file():
            data = json.loads(path.read_text())
            data["curve"] = [tuple(p) for p in data.get("curve", [])]
            rows.append(MatrixRow(**data))
    return rows or None


def base_row(rows: list[MatrixRow]) -> MatrixRow | None:
    """The base model's own scores, read from the first scored row's baseline columns."""
    import eval as ev

    for r in rows:
        if r.report:
            report = ev.read_report(r.report)
            f = report.forgetting
            return MatrixRow(name="base (before)", note="the base model, not fine-tuned", overrides={},
                             task=f.target_before, capabilities={c: ch.before for c, ch in f.categories.items()},
                             mean_forgetting=0.0, format_rigidity=f.format_rigidity_before,
                             refusal_rate=f.refusal_rate_before)
    return None


def _pt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def matrix_table(rows: list[MatrixRow], base: MatrixRow | None = None) -> str:
    """The issue's table, markdown: one line per run, points; each capability as its drop
    (before - after, positive = forgotten), the base's own scores on the line above."""
    caps = [c for c in CAPABILITIES if any(c in r.capabilities for r in rows)]
    caps += sorted({c for r in rows for c in r.capabilities} - set(caps))
    lines = []
    if base is not None:
        lines += ["base model (before): task " + _pt(base.task) + ", "
                  + ", ".join(f"{c} {_pt(base.capabilities.get(c))}" for c in caps)
                  + f", format rigidity {_pt(base.format_rigidity)}, refusal rate {_pt(base.refusal_rate)}", ""]
    head = ["method", "task", *(f"{c} drop" for c in caps), "mean forgetting", "format rigidity", "refusal rate",
            "gate", "steps", "train wall s", "tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(caps) + 4) + "---|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.error} |" + " |" * (len(head) - 2))
            continue
        gate = "n/a" if r.passed is None else ("pass" if r.passed else "FAIL")
        steps = f"{r.steps}{' (early stop)' if r.stopped_early else ''}" if r.steps else "-"
        cells = [r.name, _pt(r.task), *(_pt(r.drops.get(c), True) for c in caps), _pt(r.mean_forgetting, True),
                 _pt(r.format_rigidity), _pt(r.refusal_rate), gate, steps,
                 f"{r.wall_seconds:.0f}" if r.steps else "-", f"{r.tokens_per_second:,.0f}" if r.steps else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_pareto(rows: list[MatrixRow], path: Path) -> int:
    """eval.compare's learning-vs-forgetting scatter, one point per run, labelled by row name."""
    import eval as ev
    from eval.compare import draw_scatter, summarise

    summaries = [replace(summarise(ev.read_report(r.report)), run=r.name) for r in rows if r.report]
    curves = {r.name: [(f, g) for _, f, g in r.curve if f is not None and g is not None] for r in rows if r.curve}
    return draw_scatter(summaries, path, curves=curves)


def select_rows(rows: list[dict[str, Any]], only: str, matrix: str | Path) -> list[dict[str, Any]]:
    """The rows ``--only a,b`` names (all rows when ``only`` is empty); an unknown name is an error."""
    if not only:
        return rows
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {r["name"] for r in rows})
    if unknown:
        raise MatrixError(f"--only: no rows named {', '.join(unknown)} in {matrix}")
    return [r for r in rows if r["name"] in wanted]


def _split_cli(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise MatrixError(f"cannot read {pair!r}: expected key=value (a trainer config key)")
        key, value = pair.split("=", 1)
        out[key.lstrip("-").replace("-", "_")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo.compare",
                                     description="Run the methods matrix on the demo base and task.")
    parser.add_argument("--matrix", default=str(DEFAULT_MATRIX), help="matrix YAML (common: + runs:)")
    parser.add_argument("--out", default="runs/compare", help="output directory (one folder per run)")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--resume", action="store_true", help="keep the rows a previous run of --out finished")
    parser.add_argument("overrides", nargs="*", help="key=value trainer config keys applied to every row")
    args = parser.parse_args(argv)
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.run import use_one_thread_for_small_models

    try:
        common, rows = load_matrix(args.matrix)
        cli = _split_cli(args.overrides)
        rows = select_rows(rows, args.only, args.matrix)
        # every row's config is built and checked before the first one trains
        configs = [row_config(common, row, cli, Path(args.out)) for row in rows]
        for row, config in zip(rows, configs, strict=True):
            if not config.capability_suite:
                raise MatrixError(f"row {row['name']!r} has no capability_suite: the matrix scores every "
                                  "row against the base, so it needs one (e.g. the shipped "
                                  "eval/suites/chat_general.jsonl); to train without scoring, use "
                                  "python -m trainer.run")
        use_one_thread_for_small_models(Path(configs[0].model))
        out = Path(args.out)
        start = time.time()
        results = []
        for row, cfg in zip(rows, configs, strict=True):
            done = finished_rows(out, row["name"]) if args.resume else None
            if done:
                print(f"=== {row['name']}: finished before (--resume), kept", flush=True)
                if len(done) == 1 and cfg.interpolate == "auto" and not done[0].error:
                    done.append(resumed_interpolation(cfg, done[0]))
            results.extend(done or run_row(common, row, cli, out))
            (out / "matrix.json").write_text(json.dumps([vars(r) for r in results], indent=2))
    except (ConfigError, DataError, MatrixError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = matrix_table(results, base_row(results))
    budget = {k: v for k, v in {**common, **cli}.items() if k not in ("progress",)}
    text = (f"{table}\nsame for every row unless the row says otherwise: "
            + ", ".join(f"{k}={v}" for k, v in budget.items())
            + f"\nmatrix wall time {time.time() - start:.0f} s\n")
    (out / "matrix.md").write_text(text)
    drawn = draw_pareto(results, out / "pareto.png")
    print("\n" + text)
    print(f"table: {out / 'matrix.md'}, {out / 'matrix.json'}; plot ({drawn} runs): {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
