"""Does the data-free forgetting proxy track the gate? KL(base || tuned) on the task's validation
rows (``kl_to_base_val`` in a run's ``metrics.jsonl``, ``trainer/forgetting_proxy.py``) against the
mean forgetting the capability suite measures, checkpoint by checkpoint (issue 24, part 3; RL's
Razor, arXiv 2509.04259, says forgetting follows that KL).

For each run directory: its ``config.yaml`` (the model, the method, the suites), every
``checkpoint-<step>`` whose step logged ``kl_to_base_val``; each checkpoint's weights are loaded
into the model the run trained (LoRA: the adapters the method puts in; full: every weight) and
scored against the base with ``eval.score_against_base`` on the suite (the run's
``capability_suite`` unless ``--suite``), with the run's ``capability_task`` for the task score.
Writes a PNG (KL on x, mean forgetting on y, one series per run, the step beside each point), a
JSON of the points, and prints a table and the rank correlation (Spearman) per run and overall.

The run must have logged the proxy at its checkpoints and kept them: ``eval_steps=N save_steps=N
save_total_limit=0`` (LoRA logs the proxy always; full fine-tuning with ``max_kl_to_base`` set or
a ``kl_to_base`` anchor). Example (the real model, both tasks; the lead's command)::

    python -m trainer.run --config configs/smollm2.yaml data=chat-task:flights eval_steps=10 \\
        save_steps=10 save_total_limit=0 output_dir=runs/kl_flights
    python -m bench.probes.kl_proxy_vs_gate runs/kl_flights runs/kl_reviews --out kl_vs_forgetting.png

Each run's points are kept in ``<run>/kl_vs_gate_points.json`` (reused while the suite, the limit
and the checkpoints are the same): score runs in parallel, one process each, then plot them together.

Exit 2 on bad input (a directory without config.yaml, no checkpoint with a logged KL, no suite).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


# Each run's scored checkpoints, kept in its folder: scoring is the slow part (minutes a checkpoint),
# so runs can be scored in parallel processes and plotted together afterwards.
POINTS_CACHE = "kl_vs_gate_points.json"


class ProbeError(ValueError):
    """Bad input: the message names the directory or file and what to do."""


@dataclass
class Point:
    run: str
    step: int
    kl_to_base_val: float
    mean_forgetting: float
    worst_forgetting: float
    worst_category: str
    task_score: float | None
    passed: bool | None


def logged_kl(run_dir: Path) -> dict[int, float]:
    """step -> kl_to_base_val from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ProbeError(f"{path}: not found (is {run_dir} a forgetless output_dir?)")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}:{n}: not JSON ({e})") from None
        if "kl_to_base_val" in record:
            out[int(record["step"])] = float(record["kl_to_base_val"])
    return out


def run_config(run_dir: Path):
    from trainer.config import ConfigError, build_config, load_yaml

    path = run_dir / "config.yaml"
    try:
        return build_config(load_yaml(str(path)), source=str(path))
    except ConfigError as e:
        raise ProbeError(str(e)) from None


def checkpoints_with_kl(run_dir: Path, kl: dict[int, float]) -> list[tuple[int, Path]]:
    from trainer.checkpoint import list_checkpoints

    found = [(int(p.name.split("-")[1]), p) for p in list_checkpoints(run_dir)]
    usable = [(step, p) for step, p in found if step in kl]
    if not usable:
        raise ProbeError(f"{run_dir}: no checkpoint at a step that logged kl_to_base_val (checkpoints at "
                         f"{[s for s, _ in found] or 'none'}, KL at {sorted(kl) or 'none'}); train with eval_steps=N "
                         "save_steps=N save_total_limit=0")
    return usable


def score_run(run_dir: Path, suite: str | None, limit: int | None, device: torch.device,
              progress: bool) -> list[Point]:
    """Every usable checkpoint of one run, scored against the run's base."""
    import eval as ev
    from trainer import distributed as D
    from trainer.checkpoint import load_checkpoint
    from trainer.loop import load_model
    from trainer.methods import build_method

    cfg = run_config(run_dir)
    kl = logged_kl(run_dir)
    steps = checkpoints_with_kl(run_dir, kl)
    suite = suite or cfg.capability_suite
    if not suite:
        raise ProbeError(f"{run_dir}: the run has no capability_suite; pass --suite FILE.jsonl")
    cache = run_dir / POINTS_CACHE
    key = {"suite": str(suite), "limit": limit, "steps": [step for step, _ in steps]}
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            print(f"{run_dir.name}: {len(saved['points'])} checkpoints scored before ({cache})", flush=True)
            return [Point(**p) for p in saved["points"]]
    base, tokenizer = load_model(cfg, device)
    tuned, _ = load_model(cfg, device)
    build_method(cfg).weights.prepare(tuned)  # the trainable layout the checkpoints were saved from
    base.eval()
    points = []
    for step, path in steps:
        weights, _, _, _ = load_checkpoint(path)
        D.load_trainable(tuned, weights)
        tuned.eval()
        report = ev.score_against_base(base, tuned, tokenizer, suite, max_drop=cfg.capability_max_drop,
                                       max_format_rigidity=cfg.capability_max_format_rigidity,
                                       task=cfg.capability_task, limit=limit, progress=progress,
                                       base_model_path=cfg.model, tuned_model_path=str(path))
        f = report.forgetting
        points.append(Point(run=run_dir.name, step=step, kl_to_base_val=kl[step], mean_forgetting=f.mean_forgetting,
                            worst_forgetting=f.worst_forgetting, worst_category=f.worst_category,
                            task_score=report.task.accuracy if report.task else None,
                            passed=f.passed if f.gated else None))
        print(f"{run_dir.name} step {step}: KL {kl[step]:.4f}, mean forgetting {f.mean_forgetting:+.2f}, "
              f"task {points[-1].task_score}", flush=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "points": [asdict(p) for p in points]}, indent=2), encoding="utf-8")
    tmp.replace(cache)
    return points


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (average ranks for ties); None below 3 points or with a constant side."""
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / (sx * sy)


def plot(points: list[Point], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run in dict.fromkeys(p.run for p in points):
        mine = sorted((p for p in points if p.run == run), key=lambda p: p.step)
        ax.plot([p.kl_to_base_val for p in mine], [p.mean_forgetting for p in mine], marker="o", label=run)
        for p in mine:
            ax.annotate(str(p.step), (p.kl_to_base_val, p.mean_forgetting), textcoords="offset points",
                        xytext=(3, 3), fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("KL(base || tuned) per token on the task's validation rows (nats)")
    ax.set_ylabel("mean forgetting (points, + = worse)")
    ax.set_title("forgetting proxy vs the capability suite, per checkpoint")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run (config.yaml, metrics.jsonl, "
                                                            "checkpoint-*)")
    parser.add_argument("--suite", help="capability suite JSONL (default: each run's capability_suite)")
    parser.add_argument("--limit", type=int, help="score only the first N rows of each suite")
    parser.add_argument("--out", type=Path, default=Path("kl_vs_forgetting.png"), help="the PNG (a .json beside it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        for run in args.runs:
            if not (run / "config.yaml").is_file():
                raise ProbeError(f"{run}: no config.yaml (give the output_dir of a forgetless run)")
        points = [p for run in args.runs
                  for p in score_run(run, args.suite, args.limit, torch.device(args.device), args.progress)]
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, args.out)
    data = args.out.with_suffix(".json")
    per_run = {run: spearman([p.kl_to_base_val for p in points if p.run == run],
                             [p.mean_forgetting for p in points if p.run == run])
               for run in dict.fromkeys(p.run for p in points)}
    overall = spearman([p.kl_to_base_val for p in points], [p.mean_forgetting for p in points])
    data.write_text(json.dumps({"points": [asdict(p) for p in points], "spearman": per_run,
                                "spearman_overall": overall}, indent=2), encoding="utf-8")
    print("| run | step | KL to base (val) | mean forgetting | worst | task | gate |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        gate = "-" if p.passed is None else ("pass" if p.passed else "FAIL")
        task = "-" if p.task_score is None else f"{p.task_score:.1f}"
        print(f"| {p.run} | {p.step} | {p.kl_to_base_val:.4f} | {p.mean_forgetting:+.2f} | "
              f"{p.worst_category} {p.worst_forgetting:+.2f} | {task} | {gate} |")
    show = lambda r: "n/a (under 3 points or constant)" if r is None else f"{r:+.2f}"  # noqa: E731
    for run, r in per_run.items():
        print(f"Spearman(KL, mean forgetting) {run}: {show(r)}")
    print(f"Spearman overall: {show(overall)}")
    print(f"plot: {args.out}; points: {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
