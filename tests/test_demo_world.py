"""The synthetic world: categories, correctness of every answer, disjointness, determinism,
the refusal and format markers. Answers are checked against small independent re-derivations
from the prompt text (not against the generator's own functions)."""
import json
import re
from collections import Counter

import pytest

from trainer.demo.__main__ import main as demo_main
from trainer.demo.world import (
    MARKER_WORDS,
    MAX_ROW_CHARS,
    REFUSAL,
    SUPPORT_WORDS,
    build_world,
)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world0"), seed=0)


@pytest.fixture(scope="module")
def suite(world):
    rows = read(world.suite)
    return rows[0]["_meta"], rows[1:]


def expected_answer(prompt: str) -> str:
    """The answer to a general prompt, derived independently from its text."""
    body = prompt.rstrip("\n")
    if any(w in re.findall(r"[a-z]+", body) for w in MARKER_WORDS):
        return REFUSAL
    head, _, rest = body.partition(": ")
    items = rest.split(" ")
    if head == "reverse":
        return " ".join(items[::-1])
    if head == "upper":
        return rest.upper()
    if head == "sort":
        return " ".join(sorted(items, key=int))
    if head == "count":
        return str(len(items))
    if head.startswith("word "):
        return items[int(head.split(" ")[1]) - 1]
    if head == "copy":
        return rest
    if head == "calc":
        a, op1, b, op2, c = re.fullmatch(r"(\d)([+-])(\d)([+-])(\d)", rest).groups()
        mid = eval(f"{a}{op1}{b}")  # noqa: S307 - digits and +/- only, matched above
        end = eval(f"{mid}{op2}{c}")  # noqa: S307
        return f"{a}{op1}{b}={mid}, {mid}{op2}{c}={end}"
    return None  # a fact: nothing to derive


def test_suite_has_every_category_and_instruction_type(suite):
    meta, rows = suite
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == {"instruction", "knowledge", "reasoning", "format", "safety"}
    assert min(counts.values()) >= 40
    heads = Counter(r["prompt"].split(":")[0].split(" ")[0] for r in rows if r["category"] == "instruction")
    assert set(heads) == {"reverse", "upper", "sort", "count", "word", "copy"}
    assert set(meta) >= {"name", "version", "task_format", "refusal_pattern"}


def test_every_general_answer_is_correct(world, suite):
    _, rows = suite
    pairs = [(r["prompt"], r["answer"]) for r in rows if "answer" in r]
    pairs += [(r["prompt"], r["completion"]) for r in read(world.general_train) + read(world.general_val)]
    facts = {}
    for prompt, answer in pairs:
        want = expected_answer(prompt)
        if want is None:
            assert prompt.startswith(("capital of ", "colour of the ")), prompt
            assert facts.setdefault(prompt, answer) == answer, f"fact {prompt!r} has two answers"
        else:
            assert answer == want, prompt


def test_rows_are_short_single_line_prompts_ending_in_newline(world, suite):
    _, rows = suite
    task_suite = read(world.task_suite)[1:]
    general = read(world.general_train) + read(world.task_train)
    for prompt, answer in [(r["prompt"], r.get("answer", "")) for r in rows + task_suite] + \
            [(r["prompt"], r["completion"]) for r in general]:
        assert prompt.endswith("\n") and prompt.count("\n") == 1, prompt
        assert "\n" not in answer and answer == answer.strip(), answer
        assert len(prompt) + len(answer) <= MAX_ROW_CHARS, prompt


def test_suite_is_held_out_except_fact_recall(world, suite):
    _, rows = suite
    train_prompts = {r["prompt"] for r in read(world.general_train)}
    for r in rows:
        if r["category"] == "knowledge":
            assert r["prompt"] in train_prompts, "a fact the corpus never taught cannot be recalled"
        else:
            assert r["prompt"] not in train_prompts, r
    val_prompts = {r["prompt"] for r in read(world.general_val) if not r["prompt"].startswith(("capital", "colour"))}
    assert not val_prompts & train_prompts
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_task_splits_disjoint_and_sized(world):
    train = [r["prompt"] for r in read(world.task_train)]
    val = [r["prompt"] for r in read(world.task_val)]
    suite_rows = read(world.task_suite)
    assert "_meta" in suite_rows[0]
    held = [r["prompt"] for r in suite_rows[1:]]
    assert len(train) == 5000 and len(set(train)) == 5000
    assert not set(train) & set(val) and not set(train) & set(held) and not set(val) & set(held)
    assert {r["category"] for r in suite_rows[1:]} == {"task"}


def test_task_format_matches_all_task_answers_and_no_general_answer(world, suite):
    meta, rows = suite
    fmt = re.compile(meta["task_format"])
    task = [(r["prompt"], r["completion"]) for r in read(world.task_train)]
    task += [(r["prompt"], r["answer"]) for r in read(world.task_suite)[1:]]
    for prompt, answer in task:
        assert fmt.search(answer), answer
        # the ticket number is copied from the prompt
        assert re.match(r"ticket (\d+):", prompt).group(1) == re.search(r"ticket (\d+):", answer).group(1)
    general = [r["answer"] for r in rows if "answer" in r] + [r["completion"] for r in read(world.general_train)]
    assert not [a for a in general if fmt.search(a)]
    assert not fmt.search(REFUSAL)
    # the format category is made of the task's own vocabulary
    for r in rows:
        if r["category"] == "format":
            assert set(r["prompt"].split(": ", 1)[1].split()) & set(SUPPORT_WORDS), r


def test_refusal_marker(world, suite):
    meta, rows = suite
    refusal = re.compile(meta["refusal_pattern"])
    assert refusal.search(REFUSAL) and refusal.search(REFUSAL.upper())
    safety = [r for r in rows if r["category"] == "safety"]
    assert safety and all(r["kind"] == "refusal" and "answer" not in r for r in safety)
    for r in safety:
        assert set(re.findall(r"[a-z]+", r["prompt"])) & set(MARKER_WORDS), r
    general = read(world.general_train)
    refused = [r for r in general if r["completion"] == REFUSAL]
    assert 0.04 < len(refused) / len(general) < 0.2
    # nothing else in the world is refused, nothing else matches the pattern
    assert not [r for r in general if r["completion"] != REFUSAL and refusal.search(r["completion"])]


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = build_world(tmp_path / "again", seed=0)
    other = build_world(tmp_path / "other", seed=1)
    for name in ("general_train", "general_val", "suite", "task_train", "task_val", "task_suite"):
        assert getattr(again, name).read_bytes() == getattr(world, name).read_bytes(), name
        assert getattr(other, name).read_bytes() != getattr(world, name).read_bytes(), name


def test_command_line_writes_the_world(tmp_path, capsys):
    assert demo_main(["build-world", str(tmp_path / "w"), "--seed", "3"]) == 0
    assert "suite" in capsys.readouterr().out
    assert (tmp_path / "w" / "task_train.jsonl").exists()
