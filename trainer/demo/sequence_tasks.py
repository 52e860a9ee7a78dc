"""Three narrow tasks of the demo world for task sequences: tickets, refunds, shipping.

``tickets`` is the demo's support task (trainer/demo/world.py, unchanged: its files are the demo
world's). ``refunds`` and ``shipping`` are two more tasks of the same shop, generated here from a
seed the same way, each with its own answer format, so that a model tuned on one answers the
others in the wrong format and the accuracy matrix of a sequence shows it:

- tickets:  ``ticket 482: my lamp is broken``        -> ``[SUPPORT] ticket 482: replaced``
- refunds:  ``refund 517: mug, box dented``          -> ``id=517 refund=partial item=mug``
- shipping: ``track 4821 to oslo``                   -> ``TRK-4821 | OSLO | 3 days``

Each task maps a few phrasings to a small label set (the decision, the delivery time of a city)
and copies fields of the prompt (a number, an item, a city), as the ticket task does. The
characters are the demo tokenizer's (printable ASCII) and every row stays under the world's
:data:`MAX_ROW_CHARS`. Their files live in the cache beside the demo world, in a folder keyed by
:data:`TASKS_VERSION` (the demo world and its WORLD_VERSION are untouched).

Config values ``demo-task:<name>`` name a task's files: ``data`` -> train rows, ``eval_data``
-> validation rows, ``capability_task`` -> the held-out task suite (eval's format, with the
format regex in ``_meta.task_format``).
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.demo.world import _ITEMS, REFUSAL_PATTERN, TASK_FORMAT, _support, _unique, _write_jsonl

TASKS_VERSION = "1"  # bump whenever a change alters the generated rows of refunds or shipping
PREFIX = "demo-task:"
TASK_FILE_KEYS = {"data": "train", "eval_data": "val", "capability_task": "suite"}

# refunds: the decision follows from the reason the customer gives.
_REFUND_REASONS = {
    "full": ("arrived broken", "never came", "wrong item"),
    "partial": ("box dented", "part lost", "came late"),
    "credit": ("changed mind", "too pricey", "a gift"),
    "denied": ("used a year", "no receipt", "too old"),
}
_REFUND_TEMPLATES = ("refund {n}: {i}, {r}\n", "refund {n}: {r} ({i})\n", "return {n}: {i} {r}\n")
REFUNDS_FORMAT = r"^\s*id=\d+ refund=(full|partial|credit|denied) item=[a-z]+\s*$"

# shipping: each city has a fixed delivery time.
_CITY_DAYS = {"oslo": 3, "rome": 2, "lima": 9, "kiev": 4, "doha": 6, "riga": 3, "bern": 1, "baku": 7,
              "nice": 2, "cork": 5}
_SHIP_TEMPLATES = ("track {n} to {c}\n", "where is {n}? sent to {c}\n", "status of parcel {n} for {c}\n")
SHIPPING_FORMAT = r"^\s*TRK-\d{4} \| [A-Z]+ \| \d+ days?\s*$"


def _refund(rng: random.Random) -> tuple[str, str]:
    decision = rng.choice(sorted(_REFUND_REASONS))
    reason, item = rng.choice(_REFUND_REASONS[decision]), rng.choice(_ITEMS)
    number = rng.randint(100, 999)
    prompt = rng.choice(_REFUND_TEMPLATES).format(n=number, i=item, r=reason)
    return prompt, f"id={number} refund={decision} item={item}"


def _shipping(rng: random.Random) -> tuple[str, str]:
    city = rng.choice(sorted(_CITY_DAYS))
    number = rng.randint(1000, 9999)
    days = _CITY_DAYS[city]
    prompt = rng.choice(_SHIP_TEMPLATES).format(n=number, c=city)
    return prompt, f"TRK-{number} | {city.upper()} | {days} day{'s' if days > 1 else ''}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    make: Callable[[random.Random], tuple[str, str]]
    task_format: str
    train: int = 3000
    val: int = 200
    suite: int = 150


TASKS = {
    "tickets": TaskSpec("tickets", _support, TASK_FORMAT),  # files: the demo world's (300-row suite)
    "refunds": TaskSpec("refunds", _refund, REFUNDS_FORMAT),
    "shipping": TaskSpec("shipping", _shipping, SHIPPING_FORMAT),
}


class TaskNameError(ValueError):
    """``demo-task:<name>`` with an unknown name."""


def build_tasks(out_dir: str | Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write refunds and shipping (train, val, suite) under ``out_dir``; returns their paths.
    The suite is drawn first and the other splits never repeat its prompts."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    for spec in (TASKS["refunds"], TASKS["shipping"]):
        rng = random.Random(f"{seed}:sequence-task:{spec.name}")
        taken: set[str] = set()
        suite = _unique(spec.make, rng, spec.suite, taken, f"{spec.name} suite")
        val = _unique(spec.make, rng, spec.val, taken, f"{spec.name} val")
        train = _unique(spec.make, rng, spec.train, taken, f"{spec.name} train")
        files = {split: root / f"{spec.name}_{split}.jsonl" for split in ("train", "val", "suite")}
        meta = {"name": f"forgetless-demo-{spec.name}", "version": f"{TASKS_VERSION}-seed{seed}",
                "task_format": spec.task_format, "refusal_pattern": REFUSAL_PATTERN}
        _write_jsonl(files["train"], ({"prompt": p, "completion": a} for p, a in train))
        _write_jsonl(files["val"], ({"prompt": p, "completion": a} for p, a in val))
        _write_jsonl(files["suite"], [{"_meta": meta},
                                      *({"category": "task", "prompt": p, "answer": a} for p, a in suite)])
        paths[spec.name] = files
    return paths


def tasks_dir(seed: int = 0) -> Path:
    from trainer.demo.base import default_cache_dir

    return default_cache_dir() / f"demo-sequence-tasks-v{TASKS_VERSION}-seed{seed}"


def ensure_task(name: str) -> dict[str, Path]:
    """The files of task ``name`` (train, val, suite), built once into the cache."""
    if name not in TASKS:
        raise TaskNameError(f"unknown demo task {name!r}; known: {', '.join(PREFIX + n for n in TASKS)}")
    if name == "tickets":
        from trainer.run import demo_world

        world = demo_world()
        return {"train": world["task_train"], "val": world["task_val"], "suite": world["task_suite"]}
    from trainer.demo.base import build_once

    final = tasks_dir()

    def build(staging: Path) -> None:
        built = build_tasks(staging)
        names = {task: {split: p.name for split, p in files.items()} for task, files in built.items()}
        (staging / "files.json").write_text(json.dumps(names))

    build_once(final, "files.json", build)
    names = json.loads((final / "files.json").read_text())[name]
    return {split: final / file for split, file in names.items()}


def resolve_task_names(values: dict) -> dict:
    """``values`` with every ``demo-task:<name>`` in data / eval_data / capability_task replaced
    by that task's file; other values as they are. TaskNameError for an unknown name or key."""
    out = dict(values)
    for key, value in values.items():
        if not (isinstance(value, str) and value.startswith(PREFIX)):
            continue
        if key not in TASK_FILE_KEYS:
            raise TaskNameError(f"{key}={value}: a demo task names the files of "
                                f"{', '.join(TASK_FILE_KEYS)} only")
        out[key] = str(ensure_task(value[len(PREFIX):])[TASK_FILE_KEYS[key]])
    return out
