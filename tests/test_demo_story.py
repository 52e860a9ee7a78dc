"""The demo's forgetting story at seconds scale (issue 6), through the methods-matrix runner.

On the tiny demo base (pretrained in seconds; that pretraining beats the random init is
tests/test_demo_base.py's), a two-row matrix trains full fine-tuning at a high learning rate
with and without 20% general replay on the same step budget. Forgetting is measured on
held-out general rows with the demo builder's completion loss (itself checked against a
float64 per-row loop in tests/test_demo_base.py), not with the trainer's own numbers: the
tiny base is too weak for exact-match capability scores to move, its loss is not.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from trainer.demo import compare
from trainer.demo.base import completion_loss, encode_rows, read_rows
from trainer.demo.tokenizer import build_tokenizer

STEPS = 40
MATRIX = {
    "common": {"model": "demo", "demo_base": "tiny", "data": "demo", "eval_data": "demo",
               "capability_suite": "demo", "capability_task": "demo", "capability_limit": 12,
               "replay_data": "demo", "replay_ratio": 0.0, "method": "full", "learning_rate": 3e-3,
               "per_device_train_batch_size": 16, "max_steps": STEPS, "warmup_steps": 0, "seed": 0,
               "progress": False},
    "runs": [{"name": "full"}, {"name": "full+replay", "replay_ratio": 0.2}],
}
TIMING_KEYS = {"wall_seconds", "tokens_per_second", "report"}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Run the two-row matrix twice (fresh output directories), in one private cache."""
    root = tmp_path_factory.mktemp("story")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGETLESS_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    matrix = root / "matrix.yaml"
    matrix.write_text(yaml.safe_dump(MATRIX))
    try:
        codes = [compare.main(["--matrix", str(matrix), "--out", str(root / f"run{i}")]) for i in (1, 2)]
    finally:
        torch.set_num_threads(threads)  # the runner trains small models on one thread
        mp.undo()
    return root, codes


def general_loss(model_dir: Path, world: Path) -> float:
    tok = build_tokenizer()
    rows = encode_rows(read_rows(world / "general_val.jsonl")[:200], tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return completion_loss(model, rows, tok.pad_token_id, batch_size=100)


def test_high_lr_full_finetuning_forgets_more_without_replay(story):
    root, codes = story
    assert codes == [0, 0]
    cache = root / "cache"
    world = next(cache.glob("demo-world-*"))
    base = next(cache.glob("base-*"))
    before = general_loss(base, world)
    full = general_loss(root / "run1" / "full" / "model", world)
    replay = general_loss(root / "run1" / "full+replay" / "model", world)
    assert full > before + 0.5, (before, full)  # narrow fine-tuning costs general ability (measured +1.76)
    assert full - before > 2 * (replay - before), (before, full, replay)  # replay keeps most of it (measured +0.61)
    rows = json.loads((root / "run1" / "matrix.json").read_text())
    assert [r["name"] for r in rows] == ["full", "full+replay"] and all(r["steps"] == STEPS for r in rows)
    assert "| full+replay |" in (root / "run1" / "matrix.md").read_text()
    assert (root / "run1" / "pareto.png").stat().st_size > 0


def test_two_runs_give_the_same_report(story):
    root, _ = story
    first, second = (json.loads((root / f"run{i}" / "matrix.json").read_text()) for i in (1, 2))
    strip = [[{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in run] for run in (first, second)]
    assert strip[0] == strip[1]
    for name in ("full", "full+replay"):
        reports = [json.loads((root / f"run{i}" / name / "forgetting_report.json").read_text()) for i in (1, 2)]
        assert [r["rows"] for r in reports][0] == [r["rows"] for r in reports][1]
        a, b = (AutoModelForCausalLM.from_pretrained(root / f"run{i}" / name / "model").state_dict() for i in (1, 2))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        metrics = [(root / f"run{i}" / name / "metrics.jsonl").read_text().splitlines() for i in (1, 2)]
        losses = [[json.loads(line)["loss"] for line in m] for m in metrics]
        assert losses[0] == losses[1]


def test_matrix_file_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "m.yaml"
    bad.write_text(yaml.safe_dump({"common": {}, "runs": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(compare.MatrixError, match="duplicate name 'a'"):
        compare.load_matrix(bad)
    assert compare.main(["--matrix", str(bad), "--out", str(tmp_path / "o")]) == 2
    bad.write_text(yaml.safe_dump({"common": {"learning_rat": 1}, "runs": [{"name": "a"}]}))
    assert compare.main(["--matrix", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "learning_rate" in capsys.readouterr().err  # the closest valid key is suggested
    assert not (tmp_path / "o").exists()  # nothing trained
    # No suite to score the rows on: said before anything trains, not a traceback after the first row.
    bad.write_text(yaml.safe_dump({"common": {}, "runs": [{"name": "a"}]}))
    assert compare.main(["--matrix", str(bad), "--out", str(tmp_path / "o"), "capability_suite=none"]) == 2
    assert "has no capability_suite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_shipped_matrix_parses_and_covers_the_issue_methods():
    common, rows = compare.load_matrix(compare.DEFAULT_MATRIX)
    methods = {(r.get("method", common.get("method")), float(r.get("replay_ratio", common["replay_ratio"])) > 0)
               for r in rows}
    assert {("full", False), ("full", True), ("lora", False), ("lora", True), ("ewc", False), ("ewc", True),
            ("lora_ewc", False)} <= methods
    assert any(r.get("early_stopping_patience", 0) > 0 for r in rows)
    assert {r.get("lora_r") for r in rows if r.get("method") == "lora"} >= {1, 2, 4, 8}


@pytest.mark.parametrize("name", ["compare", "lora_ewc_sweep"])
def test_every_shipped_matrix_resolves_to_valid_trainer_configs(name, tmp_path):
    # A key the trainer does not know, or a value it rejects, fails here rather than after the
    # rows before it have trained.
    common, rows = compare.load_matrix(compare.DEFAULT_MATRIX.parent / f"{name}.yaml")
    for row in rows:
        cfg = compare.row_config(common, row, {}, tmp_path)
        # Every value the file sets is the value the run gets (the row over the common block).
        for key, value in {**common, **row}.items():
            if key not in ("name", "note", "model", "data", "eval_data", "capability_suite",
                           "capability_task", "replay_data"):  # "demo" is resolved to real paths
                assert getattr(cfg, key) == value, (row["name"], key)
