"""The replay buffer of a task sequence: at most N earlier-stage examples, drawn by reservoir sampling.

Stage k of a sequence (``trainer.sequence``) replays rows of stages 1..k-1. The buffer is a
reservoir sample (Vitter's algorithm R) over the stream of the earlier stages' training rows in
stage order: after the stream, every row seen is in the buffer with the same probability
``N / rows seen``, whatever the stage it came from, and the buffer never holds more than N
rows. The stream and the RNG (seeded by the run's seed) are fixed, so the buffer of stage k is
rebuilt identically from scratch on every run and on a resume: nothing about it needs saving.

The buffer reaches training through the trainer's ordinary replay path: it is written as a
JSONL file and handed to the stage as ``replay_data``. When the sequence also replays general
data (``replay_data`` set, ``replay_ratio`` > 0), the file holds the buffer plus a seeded sample
of the general rows sized so that the buffer's rows are ``buffer_share`` of the file, and so
(the replay plan draws every replay row equally often) of the replayed rows.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from trainer.checkpoint import atomic_write_text

T = TypeVar("T")


def reservoir_sample(stream: Iterable[T], capacity: int, rng: random.Random) -> list[T]:
    """Algorithm R: a uniform sample of at most ``capacity`` items of ``stream``, in one pass."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    reservoir: list[T] = []
    for seen, item in enumerate(stream):
        if seen < capacity:
            reservoir.append(item)
            continue
        slot = rng.randrange(seen + 1)  # item i is kept with probability capacity / (i + 1)
        if slot < capacity:
            reservoir[slot] = item
    return reservoir


def stage_buffer(stage_rows: list[list[dict]], capacity: int, seed: int) -> list[dict]:
    """The buffer after the stages whose rows are ``stage_rows`` (in stage order); each row
    gains ``"_stage"`` (0-based index of the stage it came from) for the share checks and logs."""
    stream = ({**row, "_stage": s} for s, rows in enumerate(stage_rows) for row in rows)
    return reservoir_sample(stream, capacity, random.Random(f"replay-buffer-{seed}"))


def stage_shares(buffer: list[dict], n_stages: int) -> list[float]:
    """Share of the buffer's rows that came from each stage."""
    counts = [0] * n_stages
    for row in buffer:
        counts[row["_stage"]] += 1
    return [c / max(1, len(buffer)) for c in counts]


def replay_rows(buffer: list[dict], general: list[dict] | None, buffer_share: float, seed: int) -> list[dict]:
    """The rows of the replay file: the buffer (``_stage`` dropped), plus, with general replay,
    ``round(len(buffer) * (1 - share) / share)`` general rows drawn without replacement (seeded)."""
    rows = [{k: v for k, v in row.items() if k != "_stage"} for row in buffer]
    if general:
        want = round(len(rows) * (1.0 - buffer_share) / buffer_share) if rows else len(general)
        rng = random.Random(f"replay-general-{seed}")
        picks = rng.sample(range(len(general)), min(want, len(general)))
        rows += [general[i] for i in picks]
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> Path:
    """Write JSONL beside ``path`` and rename it into place: a reader never sees half a file."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
