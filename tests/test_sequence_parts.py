"""The parts of a task sequence that need no model: the replay buffer's reservoir and the demo
sequence's two extra tasks (refunds, shipping)."""
from __future__ import annotations

import math
import re

import pytest

from trainer.demo import sequence_tasks as st
from trainer.demo.tokenizer import ALPHABET
from trainer.demo.world import MAX_ROW_CHARS, TASK_FORMAT
from trainer.replay_buffer import replay_rows, reservoir_sample, stage_buffer, stage_shares


def _stages(sizes: list[int]) -> list[list[dict]]:
    return [[{"prompt": f"s{s} r{i}", "completion": "x"} for i in range(n)] for s, n in enumerate(sizes)]


def test_the_reservoir_never_holds_more_than_its_capacity():
    for n, capacity in ((0, 5), (3, 5), (5, 5), (200, 5), (200, 0)):
        import random

        sample = reservoir_sample(range(n), capacity, random.Random(0))
        assert len(sample) == min(n, capacity)
        assert len(set(sample)) == len(sample)  # without replacement
    assert len(stage_buffer(_stages([400, 400]), 50, seed=0)) == 50


def test_the_buffer_is_the_same_for_the_same_seed_and_differs_for_another():
    stages = _stages([300, 300, 300])
    assert stage_buffer(stages, 60, seed=1) == stage_buffer(stages, 60, seed=1)
    assert stage_buffer(stages, 60, seed=1) != stage_buffer(stages, 60, seed=2)


def test_each_earlier_stage_gets_its_uniform_share():
    """Reservoir sampling keeps every row seen with probability N / M, so stage s's share of the
    buffer is hypergeometric with mean n_s / M. Tolerance: 4 standard deviations of one buffer's
    share (N=300 of M=1,200 rows, 3 stages of 400: sd = sqrt(p(1-p)/N * (M-N)/(M-1)) = 0.0236
    -> 0.094), and 4 sd of the mean share over 40 seeds (0.015)."""
    sizes, capacity = [400, 400, 400], 300
    M, p = sum(sizes), 1 / 3
    sd = math.sqrt(p * (1 - p) / capacity * (M - capacity) / (M - 1))
    means = [0.0, 0.0, 0.0]
    for seed in range(40):
        shares = stage_shares(stage_buffer(_stages(sizes), capacity, seed), 3)
        assert all(abs(s - p) <= 4 * sd for s in shares), (seed, shares)
        means = [m + s / 40 for m, s in zip(means, shares, strict=True)]
    assert all(abs(m - p) <= 4 * sd / math.sqrt(40) for m in means), means
    # Unequal stages: shares follow the rows each stage contributed (uniform over rows).
    shares = stage_shares(stage_buffer(_stages([900, 300]), 400, seed=0), 2)
    sd = math.sqrt(0.75 * 0.25 / 400 * (1200 - 400) / 1199)
    assert abs(shares[0] - 0.75) <= 4 * sd


def test_general_rows_join_the_buffer_at_the_asked_share():
    buffer = stage_buffer(_stages([100, 100]), 40, seed=0)
    general = [{"text": f"g{i}"} for i in range(1000)]
    rows = replay_rows(buffer, general, buffer_share=0.25, seed=0)
    assert sum("text" in r for r in rows) == 120 and sum("prompt" in r for r in rows) == 40
    assert all("_stage" not in r for r in rows)
    assert replay_rows(buffer, None, 0.25, 0) == [{k: v for k, v in r.items() if k != "_stage"} for r in buffer]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return st.build_tasks(root / "a"), st.build_tasks(root / "b")


def test_the_demo_tasks_are_generated_identically_and_in_their_own_formats(tasks):
    import json

    first, second = tasks
    formats = {"tickets": TASK_FORMAT, "refunds": st.REFUNDS_FORMAT, "shipping": st.SHIPPING_FORMAT}
    for name, files in first.items():
        for split, path in files.items():
            assert path.read_bytes() == second[name][split].read_bytes(), (name, split)
        train = [json.loads(line) for line in files["train"].read_text().splitlines()]
        suite = [json.loads(line) for line in files["suite"].read_text().splitlines()]
        meta, suite = suite[0]["_meta"], suite[1:]
        assert meta["task_format"] == formats[name]
        assert len(train) == st.TASKS[name].train and len(suite) == st.TASKS[name].suite
        assert not {r["prompt"] for r in suite} & {r["prompt"] for r in train}  # held out
        for prompt, answer in [(r["prompt"], r["completion"]) for r in train] + [(r["prompt"], r["answer"]) for r in suite]:
            assert len(prompt) + len(answer) <= MAX_ROW_CHARS and set(prompt + answer) <= set(ALPHABET)
            # Its own format, and none of the other two tasks'.
            assert [n for n, f in formats.items() if re.search(f, answer)] == [name], answer


def test_a_demo_task_name_resolves_to_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path))
    values = st.resolve_task_names({"data": "demo-task:shipping", "capability_task": "demo-task:shipping",
                                    "eval_data": "demo-task:refunds", "lora_r": 4})
    assert values["data"].endswith("shipping_train.jsonl") and values["capability_task"].endswith("shipping_suite.jsonl")
    assert values["eval_data"].endswith("refunds_val.jsonl") and values["lora_r"] == 4
    with pytest.raises(st.TaskNameError, match="unknown demo task 'parcels'"):
        st.resolve_task_names({"data": "demo-task:parcels"})
    with pytest.raises(st.TaskNameError, match="names the files of"):
        st.resolve_task_names({"replay_data": "demo-task:refunds"})
