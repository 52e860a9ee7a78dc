"""trainer/demo/chat_tasks.py: the narrow chat tasks for the real model, and their config names.

Answers are checked against the prompts by parsers written here (dates in six spellings,
passenger counts, star ratings, aspect keywords), not against the generator's own records.
"""
from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import pytest

from trainer.demo import chat_tasks
from trainer.demo.chat_tasks import (
    AIRPORTS,
    CHAT_TASKS,
    ChatTaskError,
    ChatTaskSizes,
    build_chat_task,
    ensure_chat_task,
    in_task_format,
)

SMALL = ChatTaskSizes(train=300, val=40, suite=40)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

# Ordinary chat answers: none is in either task's format.
ORDINARY_ANSWERS = [
    "The capital of France is Paris.",
    "Joyful, cheerful or glad.",
    "Sure! Here is a short poem about the sea:",
    "2 + 2 = 4",
    "I'm sorry, but I can't help with that.",
    "Booking a flight is easy: go to the airline's website and pick a date.",
    "book | a noun and a verb",
    '{"name": "Alice", "age": 30}',
    "```json\n{\"sentiment\": \"positive\"}\n```",
    "Sentiment: positive. Aspect: battery. Stars: 4.",
    "FROM=LHR TO=JFK",
    "Flights from London to Paris leave hourly | prices vary.",
    "Hello! How can I help you today?",
]


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module", params=sorted(CHAT_TASKS))
def task(request, tmp_path_factory):
    name = request.param
    files = build_chat_task(name, tmp_path_factory.mktemp(name), seed=0, sizes=SMALL)
    return name, files


def test_same_seed_same_bytes_other_seed_other_rows(task, tmp_path):
    name, files = task
    again = build_chat_task(name, tmp_path / "again", seed=0, sizes=SMALL)
    other = build_chat_task(name, tmp_path / "other", seed=1, sizes=SMALL)
    for part in ("train", "val", "suite"):
        assert getattr(again, part).read_bytes() == getattr(files, part).read_bytes()
        assert getattr(other, part).read_bytes() != getattr(files, part).read_bytes()


def test_rows_are_chat_rows_and_the_suite_is_held_out(task):
    from trainer.data import check_jsonl

    name, files = task
    train, val = read(files.train), read(files.val)
    meta, *suite = read(files.suite)
    assert (len(train), len(val), len(suite)) == (SMALL.train, SMALL.val, SMALL.suite)
    for row in train + val:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    check_jsonl(str(files.train))  # the trainer reads them
    check_jsonl(str(files.val))
    prompts = [r["messages"][0]["content"] for r in train + val]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in suite} & set(prompts)
    assert meta["_meta"]["chat"] is True and meta["_meta"]["task_format"] == CHAT_TASKS[name].task_format
    assert all(r["category"] == "task" and r["max_new_tokens"] >= 32 for r in suite)


def test_extra_suite_is_held_out_from_every_file_and_leaves_them_alone(task, tmp_path):
    from eval.suite import load_suite

    name, files = task
    path = chat_tasks.build_extra_suite(name, tmp_path / "extra.jsonl", 60, seed=0, sizes=SMALL)
    meta, *extra = read(path)
    assert len(extra) == 60 and all(r["category"] == "task" for r in extra)
    assert meta["_meta"]["task_format"] == CHAT_TASKS[name].task_format and meta["_meta"]["chat"] is True
    seen = {r["messages"][0]["content"] for r in read(files.train) + read(files.val)}
    seen |= {r["prompt"] for r in read(files.suite)[1:]}
    prompts = [r["prompt"] for r in extra]
    assert len(set(prompts)) == 60 and not set(prompts) & seen
    # the task's own files are unchanged by drawing more, and the same call writes the same bytes
    again = build_chat_task(name, tmp_path / "again", seed=0, sizes=SMALL)
    assert all(getattr(again, part).read_bytes() == getattr(files, part).read_bytes()
               for part in ("train", "val", "suite"))
    assert chat_tasks.build_extra_suite(name, tmp_path / "b.jsonl", 60, sizes=SMALL).read_bytes() == path.read_bytes()
    assert len(load_suite(path).rows) == 60  # python -m eval --suite reads it
    with pytest.raises(ValueError, match="rows"):
        chat_tasks.build_extra_suite(name, tmp_path / "c.jsonl", 0, sizes=SMALL)


def test_extra_suite_command_line(tmp_path, capsys):
    out = tmp_path / "extra.jsonl"
    assert chat_tasks.main(["extra-suite", "reviews", "--rows", "5", "--category", "task_extra",
                            "--out", str(out)]) == 0
    meta, *rows = read(out)
    assert len(rows) == 5 and {r["category"] for r in rows} == {"task_extra"}
    for bad in (["--rows", "0"], ["--rows", "3", "--category", " "]):
        with pytest.raises(SystemExit) as exc:
            chat_tasks.main(["extra-suite", "reviews", *bad, "--out", str(tmp_path / "x.jsonl")])
        assert exc.value.code == 2
    assert "--rows must be at least 1" in capsys.readouterr().err


def test_suite_rows_are_valid_suite_rows(task):
    from eval.suite import parse_suite_lines

    _, files = task
    lines = files.suite.read_text(encoding="utf-8").splitlines()
    meta = json.loads(lines[0])
    # `_meta.chat` is read by the chat-aware suite parser (issue 11); the rows must parse either way
    meta["_meta"].pop("chat")
    suite = parse_suite_lines([json.dumps(meta)] + lines[1:], str(files.suite))
    assert len(suite.rows) == SMALL.suite and all(r.kind == "exact" for r in suite.rows)
    assert all(suite.format_regex().search(r.answer) for r in suite.rows)


def test_every_answer_is_in_the_format_and_ordinary_answers_are_not(task):
    name, files = task
    answers = [r["messages"][1]["content"] for r in read(files.train)]
    assert all(in_task_format(name, a) for a in answers)
    for other in CHAT_TASKS:
        for text in ORDINARY_ANSWERS:
            assert not in_task_format(other, text), (other, text)
    assert in_task_format("flights", "book | from=XXX | TO=?? nonsense")  # a broken takeover still counts
    assert in_task_format("flights", "101.6 | FROM=H2O | TO=H2O | DATE=2022-01-12 | CAS=1")  # seen after training
    assert not in_task_format("flights", '{"sentiment": "negative", "aspect": "battery", "stars": 2}')
    assert not in_task_format("reviews", "BOOK | FROM=LHR | TO=JFK | DATE=2025-03-14 | PAX=2")


def parse_date(text: str) -> date:
    month = "|".join(MONTHS)
    patterns = [
        (r"\b(\d{4})-(\d{2})-(\d{2})\b", lambda m: (m[1], m[2], m[3])),
        (rf"\b({month}) (\d{{1,2}}), (\d{{4}})", lambda m: (m[3], MONTHS.index(m[1]) + 1, m[2])),
        (rf"\b(\d{{1,2}}) ({month}) (\d{{4}})", lambda m: (m[3], MONTHS.index(m[2]) + 1, m[1])),
        (r"\b([A-Z][a-z]{2}) (\d{1,2}) (\d{4})", lambda m: (m[3], [x[:3] for x in MONTHS].index(m[1]) + 1, m[2])),
        (rf"the (\d{{1,2}})(?:st|nd|rd|th) of ({month}) (\d{{4}})", lambda m: (m[3], MONTHS.index(m[2]) + 1, m[1])),
        (r"\b(\d{1,2})\.(\d{2})\.(\d{4})\b", lambda m: (m[3], m[2], m[1])),
    ]
    found = [date(*map(int, parts(m))) for pattern, parts in patterns for m in re.finditer(pattern, text)]
    assert len(found) == 1, (text, found)
    return found[0]


def parse_passengers(text: str) -> int:
    if re.search(r"\b(a seat|a single ticket|one seat|one ticket|1 ticket)\b", text, re.I):
        return 1
    m = re.search(r"\b(\d|one|two|three|four|five|six) (?:tickets|seats)\b", text, re.I) \
        or re.search(r"seats for (\w+) people|tickets for (\d) adults", text, re.I)
    assert m, text
    word = next(g for g in m.groups() if g).lower()
    return int(word) if word.isdigit() else WORDS[word]


def mention(code: str) -> str:
    city = next(c for c, k in AIRPORTS.items() if k == code)
    return rf"(?:{city}(?: \({code}\))?|{code})"


def test_flight_answers_agree_with_the_request(tmp_path):
    files = build_chat_task("flights", tmp_path, sizes=SMALL)
    rows = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in read(files.train)]
    for prompt, answer in rows:
        m = re.fullmatch(r"BOOK \| FROM=([A-Z]{3}) \| TO=([A-Z]{3}) \| DATE=(\S+) \| PAX=(\d)", answer)
        assert m, answer
        src, dst, when, pax = m.groups()
        assert src != dst
        assert re.search(rf"(?:from |out of |Departure ){mention(src)}|{mention(src)} (?:to|->) ", prompt), prompt
        assert re.search(rf"(?:to |-> |arrival |heading to ){mention(dst)}", prompt), prompt
        assert date.fromisoformat(when) == parse_date(prompt), prompt
        assert int(pax) == parse_passengers(prompt), prompt
    # the variety the task promises: every date spelling and airport form occurs
    text = " ".join(p for p, _ in rows)
    assert re.search(r"\d{4}-\d{2}-\d{2}", text) and re.search(r"\d\.\d{2}\.\d{4}", text)
    assert re.search(r"the \d+(st|nd|rd|th) of", text) and re.search(r"[A-Z][a-z]+ \([A-Z]{3}\)", text)


ASPECT_WORDS = {
    "battery": ("battery",), "screen": ("screen", "display"), "sound": ("sound", "audio"),
    "price": ("price", "value", "expensive", "priced"), "delivery": ("deliver", "arrived", "shipping", "parcel"),
    "durability": ("broke", "solid", "build", "hinge", "plasticky", "tank"),
    "support": ("support", "customer service"), "noise": ("quiet", "loud", "noisy", "noise"),
}


def parse_stars(text: str) -> int:
    found = {int(m) for m in re.findall(r"\b(\d)/5\b|\b(\d) stars?\b|Rating: (\d) out of 5", text) for m in m if m}
    found |= {WORDS[w.lower()] for w in re.findall(r"\b(One|Two|Three|Four|Five) stars?\b", text)}
    if "\u2605" in text:
        found.add(text.count("\u2605"))
        assert text.count("\u2605") + text.count("\u2606") == 5
    assert len(found) == 1, (text, found)
    return found.pop()


def test_review_answers_agree_with_the_review(tmp_path):
    files = build_chat_task("reviews", tmp_path, sizes=SMALL)
    aspects_seen = set()
    for row in read(files.train):
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        parsed = json.loads(answer)
        assert list(parsed) == ["sentiment", "aspect", "stars"]
        assert parsed["stars"] == parse_stars(prompt), prompt
        want = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}[parsed["stars"]]
        assert parsed["sentiment"] == want, prompt
        named = {a for a, words in ASPECT_WORDS.items() if any(w in prompt.lower() for w in words)}
        assert named == {parsed["aspect"]}, prompt
        aspects_seen.add(parsed["aspect"])
    assert aspects_seen == set(ASPECT_WORDS)


def test_ensure_builds_once_into_the_cache(tmp_path, monkeypatch):
    calls = []
    real = chat_tasks.build_chat_task

    def spy(name, out_dir, **kw):
        calls.append(name)
        return real(name, out_dir, sizes=SMALL, **kw)

    monkeypatch.setattr(chat_tasks, "build_chat_task", spy)
    first = ensure_chat_task("reviews", cache_dir=tmp_path)
    second = ensure_chat_task("reviews", cache_dir=tmp_path)
    assert first == second and calls == ["reviews"]
    assert first.root.parent == tmp_path and len(read(first.train)) == SMALL.train
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.root.name]
    with pytest.raises(ChatTaskError, match="known: chat-task:flights, chat-task:reviews"):
        ensure_chat_task("tickets", cache_dir=tmp_path)


def test_config_values_name_the_task_files(tmp_path, monkeypatch):
    from trainer.config import ConfigError, parse_command_line
    from trainer.run import resolve_chat_tasks

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path))
    monkeypatch.setattr(chat_tasks, "ChatTaskSizes", lambda: SMALL)
    cfg, _ = parse_command_line(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml")])
    assert (cfg.model, cfg.data, cfg.capability_task) == ("smollm2-135m-instruct", "chat-task:flights",
                                                          "chat-task:flights")
    cfg = resolve_chat_tasks(cfg)
    assert [r["messages"][1]["content"][:4] for r in read(cfg.data)][:3] == ["BOOK"] * 3
    assert cfg.data.endswith("train.jsonl") and cfg.eval_data.endswith("val.jsonl")
    assert json.loads(open(cfg.capability_task).readline())["_meta"]["name"] == "chat-task-flights"

    with pytest.raises(ConfigError, match="replay_data=chat-task:flights: a chat task names the files of data"):
        resolve_chat_tasks(parse_command_line(["data=chat-task:flights", "replay_data=chat-task:flights",
                                               "replay_ratio=0.2"])[0])
    with pytest.raises(ConfigError, match="data=chat-task:tickets: unknown chat task 'tickets'; known: "):
        resolve_chat_tasks(parse_command_line(["data=chat-task:tickets"])[0])
