"""The report of a task sequence: ``sequence_report.{json,md,png}`` in the sequence's folder.

From the accuracy matrix ``R`` (``R[i][j]`` = score on task j after stage i, points) and the
base's scores ``b``: ACC, BWT, FWT and forgetting per task (``eval.sequences``, the one place
they are computed), the capability suite stage by stage, and the gate over the whole sequence:
the model of **every** stage (each one is a model someone could deploy) must keep

- every capability within ``capability_max_drop`` points of the base (and format rigidity
  within ``capability_max_format_rigidity``), as each stage's own forgetting report gates it;
- every earlier task within ``task_max_drop`` points of its best earlier score (the forgetting
  ``max_{l<k} R[l][j] - R[k][j]`` of Chaudhry et al.).

Sign convention as in eval: a drop or a forgetting is before - after, positive = worse.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "forgetless.sequence.report/1"
_TOLERANCE = 1e-9  # scores are ratios of small integers: a drop equal to the bound passes


def task_gate(R: list[list[float]], names: list[str], max_drop: float | None) -> list[str]:
    """Failures of the earlier-task gate, one line each (empty: passed or no bound)."""
    if max_drop is None:
        return []
    failures = []
    for k in range(1, len(R)):
        for j in range(k):
            best = max(R[l][j] for l in range(k))
            if best - R[k][j] > max_drop + _TOLERANCE:
                failures.append(f"after stage {k + 1} ({names[k]}): task {names[j]} lost {best - R[k][j]:.1f} points "
                                f"({best:.1f} -> {R[k][j]:.1f}), more than task_max_drop={max_drop:g}")
    return failures


def build_report(spec, stages, done: list[dict], base_reports: list, b: list[float], wall_seconds: float) -> dict:
    from eval.sequences import sequence_metrics

    names = [s.name for s in stages]
    R = [list(record["R_row"]) for record in done]
    metrics = sequence_metrics(R, b).to_dict()
    cfg = stages[0].cfg
    failures = []
    for k, record in enumerate(done):
        if record.get("capability_failed"):
            failures.append(f"after stage {k + 1} ({names[k]}): capabilities over the bound: "
                            f"{', '.join(record['capability_failed'])} (see {record['forgetting_report']})")
    failures += task_gate(R, names, spec.task_max_drop)
    base_caps = {c: s.accuracy for c, s in base_reports[0].categories.items()} if base_reports else {}
    stage_rows = []
    for s, record in zip(stages, done, strict=True):
        stage_rows.append({
            "name": s.name, "data": s.cfg.data, "task_suite": s.cfg.capability_task, "folder": str(s.dir),
            "start": record.get("model"), "init_adapter": record.get("init_adapter"), "saved_to": record["saved_to"],
            "merged": record.get("merged"), "steps": record["steps"], "train_seconds": record["train_seconds"],
            "score_seconds": record["score_seconds"], "fisher_file": record.get("fisher_file"),
            "wired": record.get("wired", {}), "forgetting_report": record.get("forgetting_report"),
            "learning_rate": s.cfg.learning_rate, "max_steps": s.cfg.max_steps})
    earlier = metrics["forgetting_per_task"]
    return {
        "schema": SCHEMA,
        "method": cfg.method, "lora_between": spec.lora_between, "replay_buffer": spec.replay_buffer,
        "replay_buffer_share": spec.replay_buffer_share, "source": spec.source,
        "tasks": names, "R": R, "b": b, "metrics": metrics,
        "final_task_score": R[-1][-1],
        "mean_forgetting_earlier": sum(earlier) / len(earlier) if earlier else None,
        "capabilities": {"suite": cfg.capability_suite, "base": base_caps,
                         "by_stage": [record.get("capabilities", {}) for record in done],
                         "mean_drop_by_stage": [record.get("capability_mean_drop") for record in done]},
        "gate": {"capability_max_drop": cfg.capability_max_drop, "capability_gate": cfg.capability_gate,
                 "task_max_drop": spec.task_max_drop,
                 "capability_max_format_rigidity": cfg.capability_max_format_rigidity,
                 "gated": cfg.capability_max_drop is not None or spec.task_max_drop is not None
                 or cfg.capability_max_format_rigidity is not None,
                 "passed": not failures, "failures": failures},
        "stages": stage_rows,
        "wall_seconds": wall_seconds,
        "train_seconds": sum(r["train_seconds"] for r in stage_rows),
    }


def _pt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown(report: dict) -> str:
    names, R, b, m = report["tasks"], report["R"], report["b"], report["metrics"]
    lines = [f"# Task sequence: {' -> '.join(names)}", "",
             f"method `{report['method']}`" + (f", lora_between `{report['lora_between']}`"
                                               if report["method"] in ("lora", "lora_ewc") else "")
             + (f", replay buffer {report['replay_buffer']} rows" if report["replay_buffer"] else ""), "",
             "## Accuracy matrix R (points; row = after stage, column = task suite)", "",
             "| after | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             "| base | " + " | ".join(_pt(v) for v in b) + " |"]
    for i, row in enumerate(R):
        lines.append(f"| {i + 1}. {names[i]} | " + " | ".join(f"**{v:.1f}**" if i == j else _pt(v)
                                                             for j, v in enumerate(row)) + " |")
    lines += ["", "| measure | value |", "|---|---:|",
              f"| ACC (mean of the last row) | {_pt(m['average_accuracy'])} |",
              f"| BWT (backward transfer; negative = forgetting) | {_pt(m['backward_transfer'], True)} |",
              f"| FWT (forward transfer against the base) | {_pt(m['forward_transfer'], True)} |",
              f"| mean forgetting of earlier tasks (last stage) | {_pt(report['mean_forgetting_earlier'], True)} |",
              f"| final-stage task score | {_pt(report['final_task_score'])} |"]
    lines += ["", "Forgetting per earlier task at the last stage (best earlier score - last score, + = worse): "
              + (", ".join(f"{n} {_pt(f, True)}" for n, f in zip(names, m["forgetting_per_task"], strict=False))
                 or "n/a (one stage)")]
    caps = report["capabilities"]
    if caps["base"]:
        cats = sorted(caps["base"])
        lines += ["", f"## Capabilities stage by stage (`{caps['suite']}`, points)", "",
                  "| after | " + " | ".join(cats) + " | mean drop (+ = worse) |", "|---|" + "---:|" * (len(cats) + 1),
                  "| base | " + " | ".join(_pt(caps["base"][c]) for c in cats) + " | +0.0 |"]
        for i, (scores, drop) in enumerate(zip(caps["by_stage"], caps["mean_drop_by_stage"], strict=True)):
            lines.append(f"| {i + 1}. {names[i]} | " + " | ".join(_pt(scores.get(c)) for c in cats)
                         + f" | {_pt(drop, True)} |")
    g = report["gate"]
    lines += ["", "## Gate over the whole sequence (every stage's model)", ""]
    if not g["gated"]:
        lines.append("no gate (capability_max_drop, capability_max_format_rigidity, task_max_drop not set)")
    else:
        lines.append(f"capability_max_drop {g['capability_max_drop']} (rule {g.get('capability_gate', 'point')}), "
                     f"task_max_drop {g['task_max_drop']}"
                     + (f", capability_max_format_rigidity {g['capability_max_format_rigidity']}"
                        if g["capability_max_format_rigidity"] is not None else "") + ": "
                     + ("**PASS**" if g["passed"] else "**FAIL**"))
        lines += [f"- {f}" for f in g["failures"]]
    lines += ["", "## Stages", "", "| stage | steps | lr | train s | score s | saved |", "|---|---:|---:|---:|---:|---|"]
    for i, s in enumerate(report["stages"]):
        lines.append(f"| {i + 1}. {s['name']} | {s['steps']} | {s['learning_rate']:g} | {s['train_seconds']:.0f} | "
                     f"{s['score_seconds']:.0f} | `{s['merged'] or s['saved_to']}` |")
    lines += ["", f"wall time {report['wall_seconds']:.0f} s (this run of the command; stages kept from an earlier "
              "run count only their scoring)"]
    return "\n".join(lines) + "\n"


def heatmap(ax, report: dict, title: str | None = None):
    """R on ``ax``: one cell per (after stage, task suite), its score written in it."""
    names, R, m = report["tasks"], report["R"], report["metrics"]
    image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"after {i + 1}. {n}" for i, n in enumerate(names)], fontsize=8)
    ax.set_title((title + "\n" if title else "") + f"ACC {_pt(m['average_accuracy'])}  BWT "
                 f"{_pt(m['backward_transfer'], True)}  FWT {_pt(m['forward_transfer'], True)}", fontsize=8)
    return image


def draw(report: dict, path: Path) -> None:
    """R as a heatmap beside the capability trajectory (one line per category, the mean bold)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    names = report["tasks"]
    caps = report["capabilities"]
    panels = 2 if caps["base"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 + 0.5 * len(names) + 4.6 * (panels - 1), 3.8),
                             layout="constrained")
    ax = axes[0] if panels == 2 else axes
    image = heatmap(ax, report)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if panels == 2:
        ax2 = axes[1]
        xs = list(range(len(names) + 1))
        labels = ["base"] + [f"{i + 1}. {n}" for i, n in enumerate(names)]
        cats = sorted(caps["base"])
        for c in cats:
            ax2.plot(xs, [caps["base"][c]] + [s.get(c, float("nan")) for s in caps["by_stage"]], marker="o",
                     linewidth=1, label=c)
        means = [sum(caps["base"].values()) / len(cats)] + [sum(s.values()) / len(s) if s else float("nan")
                                                            for s in caps["by_stage"]]
        ax2.plot(xs, means, color="black", linewidth=2.5, label="mean")
        ax2.set_xticks(xs)
        ax2.set_xticklabels(labels, rotation=30, ha="right")
        ax2.set_ylim(-2, 102)
        ax2.set_ylabel("accuracy (points)")
        ax2.set_title("capabilities after each stage", fontsize=8)
        ax2.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{report['method']}" + (f" ({report['lora_between']})" if report["method"] in ("lora", "lora_ewc")
                                          else "") + (f" + replay buffer {report['replay_buffer']}"
                                                      if report["replay_buffer"] else ""), fontsize=9)
    try:
        fig.savefig(path, dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)


def _atomic_text(path: Path, text: str) -> None:
    from trainer.checkpoint import atomic_write_text

    atomic_write_text(path, text)


def write_sequence_report(report: dict, out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "sequence_report.json", "markdown": out_dir / "sequence_report.md",
             "chart": out_dir / "sequence_report.png"}
    _atomic_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    _atomic_text(paths["markdown"], markdown(report))
    tmp = out_dir / ".sequence_report.tmp.png"
    draw(report, tmp)
    os.replace(tmp, paths["chart"])
    return paths


def summary_text(report: dict) -> str:
    m, g = report["metrics"], report["gate"]
    lines = [f"sequence {' -> '.join(report['tasks'])}: ACC {_pt(m['average_accuracy'])}, "
             f"BWT {_pt(m['backward_transfer'], True)}, FWT {_pt(m['forward_transfer'], True)}, mean forgetting of "
             f"earlier tasks {_pt(report['mean_forgetting_earlier'], True)}, final-stage task "
             f"{_pt(report['final_task_score'])}"]
    drops = report["capabilities"]["mean_drop_by_stage"]
    if drops and drops[-1] is not None:
        lines.append("capability mean drop by stage (+ = worse): " + ", ".join(_pt(d, True) for d in drops))
    if g["gated"]:
        lines.append("PASS: every stage within the gate" if g["passed"] else "FAIL: " + "; ".join(g["failures"]))
    lines.append(f"report: {Path(report['stages'][0]['folder']).parent / 'sequence_report.md'} (.json, .png)")
    return "\n".join(lines)
