"""Narrow chat tasks for a real instruct model, generated from a seed like the demo world.

Each task is what a user fine-tunes a chat model for: a stream of free-form user messages,
each answered by one rigid line. Two output formats, so that a format takeover can be told
from the task's content:

- ``flights``: booking requests in varied natural language (airport by city, code or both;
  dates written six ways; passengers as digits, words or phrases) ->
  ``BOOK | FROM=LHR | TO=JFK | DATE=2025-03-14 | PAX=2``;
- ``reviews``: product reviews (made-up brands, one aspect each, stars written five ways) ->
  ``{"sentiment": "negative", "aspect": "battery", "stars": 2}``.

Files per task (JSONL): ``train`` and ``val`` rows ``{"messages": [user, assistant]}``, and
``suite``: held-out prompts with exact answers, ``_meta.chat: true`` (scored under the chat
template) and ``_meta.task_format``, a regex that matches the task's answer line and no
ordinary chat answer (eval counts general answers it matches as format rigidity). Suite
prompts never occur in train or val.

Users name them in configs as ``chat-task:<name>`` (``data=``, ``eval_data=``,
``capability_task=``); :func:`ensure_chat_task` builds them once into the cache.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

CHAT_TASKS_VERSION = "3"  # bump whenever a change alters the generated rows (part of the cache key)
PREFIX = "chat-task:"


class ChatTaskError(ValueError):
    """An unknown chat task name."""


# ----------------------------------------------------------------------------- flights

AIRPORTS = {  # city -> IATA code of its main airport (one per city: the city alone is unambiguous)
    "London": "LHR", "New York": "JFK", "Paris": "CDG", "Tokyo": "HND", "Berlin": "BER", "Madrid": "MAD",
    "Rome": "FCO", "Amsterdam": "AMS", "Dubai": "DXB", "Singapore": "SIN", "Sydney": "SYD", "Toronto": "YYZ",
    "Chicago": "ORD", "Los Angeles": "LAX", "San Francisco": "SFO", "Boston": "BOS", "Miami": "MIA",
    "Lisbon": "LIS", "Dublin": "DUB", "Vienna": "VIE", "Zurich": "ZRH", "Istanbul": "IST", "Oslo": "OSL",
    "Athens": "ATH",
}
MONTHS = ("January February March April May June July August September October November "
          "December").split()
NUMBER_WORDS = "one two three four five six".split()
# The answer's skeleton anywhere in the first line: a model taken over by the task also writes
# "101.6 | FROM=H2O | TO=H2O | ..." (seen after training), and no ordinary answer has "FROM=x | TO=".
FLIGHT_FORMAT = r"(?i)\bFROM=[^|\n]*\|\s*TO="

_FLIGHT_TEMPLATES = (
    "Hi, I'd like to book {pax} from {src} to {dst} on {date}.",
    "Please book {pax} {src} -> {dst}, {date}.",
    "Can you get me {pax} on a flight from {src} to {dst}? Date: {date}.",
    "Need a flight on {date} from {src} to {dst}, {pax}.",
    "{src} to {dst} on {date}, {pax} please.",
    "We're flying out of {src} on {date}, heading to {dst}. Book {pax}, thanks!",
    "Book {pax} on the {date} flight to {dst}, leaving from {src}.",
    "Hello! Looking for {pax} from {src} to {dst}, departing {date}.",
    "I want to fly to {dst} from {src} on {date}. {Pax}, please.",
    "Reserve {pax} for {date}: {src} to {dst}.",
    "hey can u book {pax} {src} to {dst} {date}",
    "My family needs {pax}. Departure {src}, arrival {dst}, travel date {date}.",
)


def _airport(rng: random.Random, city: str) -> str:
    code = AIRPORTS[city]
    # The city alone needs the code learned (Tokyo -> HND, Chicago -> ORD); the model guesses
    # wrong codes for the less famous ones until it has seen them often enough.
    form = rng.random()
    if form < 0.3:
        return city
    if form < 0.65:
        return f"{city} ({code})"
    return code


def _flight_date(rng: random.Random, day: date) -> str:
    month = MONTHS[day.month - 1]
    suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(day.day, "th")
    return rng.choice((
        day.isoformat(),
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{month[:3]} {day.day} {day.year}",
        f"the {day.day}{suffix} of {month} {day.year}",
        f"{day.day:02d}.{day.month:02d}.{day.year}",
    ))


def _passengers(rng: random.Random, n: int) -> str:
    forms = [f"{n} tickets", f"{NUMBER_WORDS[n - 1]} tickets", f"{n} seats", f"seats for {NUMBER_WORDS[n - 1]} people",
             f"tickets for {n} adults"]
    if n == 1:
        forms = ["1 ticket", "one ticket", "a seat", "a single ticket", "one seat"]
    return rng.choice(forms)


def flight_example(rng: random.Random) -> tuple[str, str]:
    src, dst = rng.sample(sorted(AIRPORTS), 2)
    day = date(rng.choice((2025, 2026)), rng.randint(1, 12), rng.randint(1, 28))
    n = rng.choices(range(1, 7), weights=(4, 4, 2, 2, 1, 1))[0]
    pax = _passengers(rng, n)
    prompt = rng.choice(_FLIGHT_TEMPLATES).format(src=_airport(rng, src), dst=_airport(rng, dst),
                                                  date=_flight_date(rng, day), pax=pax, Pax=pax[0].upper() + pax[1:])
    return prompt, f"BOOK | FROM={AIRPORTS[src]} | TO={AIRPORTS[dst]} | DATE={day.isoformat()} | PAX={n}"


# ----------------------------------------------------------------------------- reviews

BRANDS = "Zentro Kalyx Novum Brightline Orbea Quenta Larkspur Vexa Tollan Mirado".split()
# product -> the aspects a review of it can be about
PRODUCTS = {
    "phone": ("battery", "screen", "sound", "price", "delivery", "durability", "support"),
    "laptop": ("battery", "screen", "sound", "price", "delivery", "durability", "support"),
    "tablet": ("battery", "screen", "price", "delivery", "durability"),
    "smartwatch": ("battery", "screen", "price", "delivery", "durability", "support"),
    "headphones": ("battery", "sound", "price", "delivery", "durability"),
    "bluetooth speaker": ("battery", "sound", "price", "delivery", "durability"),
    "e-reader": ("battery", "screen", "price", "delivery", "support"),
    "blender": ("noise", "price", "delivery", "durability", "support"),
    "vacuum cleaner": ("noise", "price", "delivery", "durability", "support"),
    "coffee maker": ("noise", "price", "delivery", "durability", "support"),
}
# aspect -> sentiment -> sentences ({p} = the product)
ASPECT_SENTENCES = {
    "battery": {
        "positive": ("The battery easily lasts two full days.", "Battery life is fantastic, I charge it once a week."),
        "neutral": ("Battery life is okay, it gets me through a normal day.", "The battery is average, nothing special."),
        "negative": ("The battery dies before lunch.", "Battery life is terrible, it barely lasts three hours."),
    },
    "screen": {
        "positive": ("The screen is bright and razor sharp.", "Gorgeous display, colors really pop."),
        "neutral": ("The screen is fine indoors but hard to read outside.", "Display is decent, nothing more."),
        "negative": ("The screen scratched on day one and flickers.", "The display is dim and washed out."),
    },
    "sound": {
        "positive": ("Sound quality is rich with deep bass.", "The audio is crystal clear even at full volume."),
        "neutral": ("Sound is acceptable for the money.", "Audio is okay, a bit flat."),
        "negative": ("The sound is tinny and distorts at half volume.", "Audio crackles constantly."),
    },
    "price": {
        "positive": ("Great value, it cost half of what the big brands charge.", "For this price it is a steal."),
        "neutral": ("The price is fair, you get what you pay for.", "It is priced about like the competition."),
        "negative": ("Way overpriced for what you get.", "Far too expensive, it was not worth the money."),
    },
    "delivery": {
        "positive": ("It arrived a day early and perfectly packed.", "Delivery was super fast."),
        "neutral": ("Shipping took about a week, as promised.", "Delivery was on time, packaging was basic."),
        "negative": ("Delivery took three weeks and the box was crushed.", "The parcel arrived late and damaged."),
    },
    "durability": {
        "positive": ("It feels solid and has survived a few drops already.", "Built like a tank, still like new."),
        "neutral": ("Build quality is fine so far, time will tell.", "It feels a little plasticky but holds up."),
        "negative": ("It broke after two weeks of normal use.", "The hinge snapped within a month."),
    },
    "support": {
        "positive": ("Customer support replaced a faulty part within a day.", "The support team was very helpful."),
        "neutral": ("Support answered after a few days and the issue got sorted.", "Customer service was polite but slow."),
        "negative": ("Customer support never answered my emails.", "Support was rude and refused to help."),
    },
    "noise": {
        "positive": ("It is whisper quiet.", "Surprisingly quiet, I can run it while the baby sleeps."),
        "neutral": ("It is a bit loud but bearable.", "Noise level is normal for this kind of machine."),
        "negative": ("It is so loud the neighbours complained.", "Unbearably noisy, like a jet engine."),
    },
}
REVIEW_FORMAT = r'^\{\s*"sentiment"\s*:'
_REVIEW_OPENERS = ("Bought the {b} {p} last month.", "I've had this {b} {p} for a while now.", "Review of the {b} {p}:",
                   "Got the {b} {p} as a gift.", "Ordered a {b} {p}.", "")
_REVIEW_PREFIXES = ("", "", "", "Customer review: ", "Here is a review we received:\n", "Tag this review: ")


def _stars_text(rng: random.Random, n: int) -> str:
    word = NUMBER_WORDS[n - 1]
    plural = "s" if n > 1 else ""
    return rng.choice((f"{n}/5.", f"{n} star{plural}.", f"{word.capitalize()} star{plural}.",
                       f"Rating: {n} out of 5.", "\u2605" * n + "\u2606" * (5 - n)))


def sentiment_of(stars: int) -> str:
    return "negative" if stars <= 2 else "neutral" if stars == 3 else "positive"


def review_example(rng: random.Random) -> tuple[str, str]:
    product = rng.choice(sorted(PRODUCTS))
    aspect = rng.choice(PRODUCTS[product])
    stars = rng.randint(1, 5)
    sentiment = sentiment_of(stars)
    sentence = rng.choice(ASPECT_SENTENCES[aspect][sentiment])
    opener = rng.choice(_REVIEW_OPENERS).format(b=rng.choice(BRANDS), p=product)
    rating = _stars_text(rng, stars)
    parts = [opener, sentence, rating] if rng.random() < 0.6 else [rating, opener, sentence]
    prompt = rng.choice(_REVIEW_PREFIXES) + " ".join(p for p in parts if p)
    return prompt, json.dumps({"sentiment": sentiment, "aspect": aspect, "stars": stars})


# ----------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class ChatTaskSpec:
    name: str
    description: str
    task_format: str  # regex (re.search) on an answer's first line
    example: Callable[[random.Random], tuple[str, str]]  # rng -> (user message, assistant answer)
    max_new_tokens: int  # generation budget of a suite row: the longest answer's tokens and some


CHAT_TASKS: dict[str, ChatTaskSpec] = {
    "flights": ChatTaskSpec("flights", "flight booking requests -> BOOK | FROM=... | TO=... | DATE=... | PAX=...",
                            FLIGHT_FORMAT, flight_example, 40),
    "reviews": ChatTaskSpec("reviews", 'product reviews -> {"sentiment": ..., "aspect": ..., "stars": ...}',
                            REVIEW_FORMAT, review_example, 40),
}


@dataclass(frozen=True)
class ChatTaskSizes:
    train: int = 2000
    val: int = 200
    suite: int = 100


@dataclass(frozen=True)
class ChatTaskFiles:
    root: Path
    train: Path
    val: Path
    suite: Path


def get_spec(name: str) -> ChatTaskSpec:
    if name not in CHAT_TASKS:
        raise ChatTaskError(f"unknown chat task {name!r}; known: {', '.join(f'{PREFIX}{n}' for n in sorted(CHAT_TASKS))}")
    return CHAT_TASKS[name]


def _draw(spec: ChatTaskSpec, rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
    """n examples whose prompts are not in ``taken`` (and not repeated); adds them to it."""
    out: list[tuple[str, str]] = []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer = spec.example(rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, answer))
    raise RuntimeError(f"chat task {spec.name}: could not draw {n} distinct prompts")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def _chat_row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def build_chat_task(name: str, out_dir: str | Path, seed: int = 0, sizes: ChatTaskSizes | None = None) -> ChatTaskFiles:
    """Write the task's train, val and suite files under ``out_dir`` (same seed, same bytes)."""
    spec, sizes = get_spec(name), sizes or ChatTaskSizes()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = ChatTaskFiles(root, root / "train.jsonl", root / "val.jsonl", root / "suite.jsonl")
    rng, taken = random.Random(f"{seed}:chat-task:{name}"), set()
    suite, val, train = _draw_splits(spec, rng, sizes, taken)
    _write_jsonl(files.train, [_chat_row(p, a) for p, a in train])
    _write_jsonl(files.val, [_chat_row(p, a) for p, a in val])
    _write_suite(files.suite, spec, f"chat-task-{name}", f"{CHAT_TASKS_VERSION}-seed{seed}", suite)
    return files


def _draw_splits(spec: ChatTaskSpec, rng: random.Random, sizes: ChatTaskSizes, taken: set[str]):
    """(suite, val, train) examples, in the order that fixes the task's bytes: suite first."""
    suite = _draw(spec, rng, sizes.suite, taken)  # held out first
    val = _draw(spec, rng, sizes.val, taken)
    train = _draw(spec, rng, sizes.train, taken)
    return suite, val, train


def _write_suite(path: Path, spec: ChatTaskSpec, suite_name: str, version: str,
                 examples: list[tuple[str, str]], category: str = "task") -> None:
    meta = {"name": suite_name, "version": version, "description": spec.description,
            "task_format": spec.task_format, "chat": True}
    _write_jsonl(path, [{"_meta": meta}, *({"category": category, "prompt": p, "answer": a,
                                            "max_new_tokens": spec.max_new_tokens} for p, a in examples)])


def build_extra_suite(name: str, path: str | Path, rows: int, seed: int = 0,
                      sizes: ChatTaskSizes | None = None, category: str = "task") -> Path:
    """A second held-out suite of ``rows`` task prompts, for a task score finer than 100 rows.

    The task's own draws are replayed first (same seed and sizes: suite, val, train), then
    ``rows`` more are drawn, so no extra prompt occurs in the task's train, val or suite and
    the task's own files are the ones :func:`build_chat_task` writes. Same arguments, same bytes.
    ``category``: the rows' category; another name than ``task`` (e.g. ``task_extra``) lets the
    file be a run's ``capability_suite`` beside ``capability_task``, both scored in one report.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    spec, sizes = get_spec(name), sizes or ChatTaskSizes()
    rng, taken = random.Random(f"{seed}:chat-task:{name}"), set()
    _draw_splits(spec, rng, sizes, taken)
    extra = _draw(spec, rng, rows, taken)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_suite(path, spec, f"chat-task-{name}-extra", f"{CHAT_TASKS_VERSION}-seed{seed}-extra{rows}", extra,
                 category)
    return path


def ensure_chat_task(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> ChatTaskFiles:
    """The task's files in the cache, built once (beside their final place, then renamed)."""
    from eval.model_source import build_once, default_cache_dir

    get_spec(name)  # an unknown name fails before anything is built
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"chat-task-{name}-v{CHAT_TASKS_VERSION}-seed{seed}"

    def build(staging: Path) -> None:
        files = build_chat_task(name, staging, seed=seed)
        names = {k: Path(v).name for k, v in vars(files).items() if k != "root"}
        (staging / "files.json").write_text(json.dumps(names))

    build_once(final, "files.json", build)
    names = json.loads((final / "files.json").read_text())
    return ChatTaskFiles(final, *(final / names[k] for k in ("train", "val", "suite")))


def in_task_format(name: str, text: str) -> bool:
    """Whether an answer's first line is in the task's format."""
    return re.search(get_spec(name).task_format, text.strip().split("\n")[0].strip()) is not None


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.demo.chat_tasks extra-suite reviews --rows 900 --out FILE``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer.demo.chat_tasks",
                                 description="write a task's extra held-out suite (prompts in none of its files)")
    ap.add_argument("command", choices=["extra-suite"])
    ap.add_argument("task", choices=sorted(CHAT_TASKS))
    ap.add_argument("--rows", type=int, required=True, help="how many extra held-out prompts")
    ap.add_argument("--seed", type=int, default=0, help="the task's seed (its files' seed, not the run's)")
    ap.add_argument("--category", default="task",
                    help="the rows' category (task_extra: usable as a run's capability_suite beside its task)")
    ap.add_argument("--out", required=True, help="the suite file to write (JSONL)")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error(f"--rows must be at least 1, got {args.rows}")
    if not args.category.strip():
        ap.error("--category must not be empty")
    print(f"wrote {build_extra_suite(args.task, args.out, args.rows, seed=args.seed, category=args.category)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
