"""Task-sequence metrics from an accuracy matrix R (continual learning).

``R[i][j]`` = score on task j after training stage i (stage i trains task i), T x T, any
unit (points or fractions; the metrics come out in the same unit).

- average accuracy ``ACC = (1/T) sum_j R[T-1][j]``;
- backward transfer ``BWT = (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j])`` (Lopez-Paz & Ranzato
  2017, "Gradient Episodic Memory"); negative = forgetting;
- forward transfer ``FWT = (1/(T-1)) sum_{j>=1} (R[j-1][j] - b[j])``, only with the scores ``b``
  of the model before any training (same paper);
- forgetting (Chaudhry et al. 2018, "Riemannian Walk"): for task j at stage k,
  ``f[k][j] = max_{l<k} R[l][j] - R[k][j]``; the average forgetting at stage k is the mean of
  ``f[k][j]`` over j < k; ``forgetting`` is that at the last stage.

``python -m eval.sequences R.json`` prints the metrics as JSON; R.json holds ``[[...], ...]``
or ``{"R": [[...], ...], "b": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass


@dataclass
class SequenceMetrics:
    R: list[list[float]]
    average_accuracy: float
    backward_transfer: float | None  # None when T == 1
    forward_transfer: float | None  # None without b or when T == 1
    forgetting: float | None  # Chaudhry et al. at the last stage; None when T == 1
    forgetting_per_task: list[float]  # f[T-1][j] for j < T-1
    forgetting_by_stage: list[float | None]  # average forgetting after each stage (None at stage 0)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_matrix(R: list[list[float]]) -> list[list[float]]:
    if not isinstance(R, (list, tuple)) or not R:
        raise ValueError("R must be a non-empty T x T list of lists")
    T = len(R)
    rows = []
    for i, row in enumerate(R):
        if not isinstance(row, (list, tuple)) or len(row) != T:
            raise ValueError(f"R must be square (T x T, T = {T}); row {i} has "
                             f"{len(row) if isinstance(row, (list, tuple)) else 'no'} entries")
        values = []
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"R[{i}][{j}] must be a finite number, got {v!r}")
            values.append(float(v))
        rows.append(values)
    return rows


def stage_forgetting(R: list[list[float]], k: int) -> list[float]:
    """Chaudhry et al. forgetting of each task j < k at stage k: best earlier score minus current."""
    return [max(R[l][j] for l in range(k)) - R[k][j] for j in range(k)]


def sequence_metrics(R: list[list[float]], b: list[float] | None = None) -> SequenceMetrics:
    """ACC, BWT, FWT (with ``b``) and forgetting from the T x T matrix ``R``."""
    R = _check_matrix(R)
    T = len(R)
    if b is not None and len(b) != T:
        raise ValueError(f"b must have one score per task ({T}), got {len(b)}")
    last = R[T - 1]
    acc = sum(last) / T
    bwt = sum(last[j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None
    fwt = sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1) if b is not None and T > 1 else None
    by_stage: list[float | None] = [None]
    for k in range(1, T):
        f = stage_forgetting(R, k)
        by_stage.append(sum(f) / len(f))
    per_task = stage_forgetting(R, T - 1) if T > 1 else []
    return SequenceMetrics(R=R, average_accuracy=acc, backward_transfer=bwt, forward_transfer=fwt,
                           forgetting=by_stage[-1], forgetting_per_task=per_task, forgetting_by_stage=by_stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.sequences", description="ACC, BWT, forgetting from R")
    parser.add_argument("matrix", help='JSON file: [[...], ...] or {"R": [[...], ...], "b": [...]}')
    args = parser.parse_args(argv)
    try:
        with open(args.matrix, encoding="utf-8") as fh:
            data = json.load(fh)
        R, b = (data.get("R"), data.get("b")) if isinstance(data, dict) else (data, None)
        metrics = sequence_metrics(R, b)
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        print(f"python -m eval.sequences: error: {args.matrix}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
