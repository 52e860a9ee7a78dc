"""The real-model matrices parse into valid trainer configs (keys and values), without the real
model: a typo in a row fails here, not after the rows before it trained for an hour."""
from pathlib import Path

import pytest

from trainer.config import build_config
from trainer.demo import compare
from trainer.run import CHAT_RECIPE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["smollm2_matrix", "smollm2_compare", "smollm2_default_check"])
def test_real_model_matrix_rows_are_valid_configs(name):
    common, rows = compare.load_matrix(CONFIGS / f"{name}.yaml")
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    assert not any("," in n for n in names)  # --only splits on commas
    for row in rows:
        values = {k: v for k, v in {**common, **row}.items() if k not in ("name", "note")}
        cfg = build_config(values, source=f"{name}: {row['name']}")
        for key, value in values.items():
            assert getattr(cfg, key) == value, (row["name"], key)


def test_the_issue_24_matrix_covers_its_rows():
    common, rows = compare.load_matrix(CONFIGS / "smollm2_matrix.yaml")
    rows = [{**common, **row} for row in rows]
    kinds = {(r["method"], r.get("objective", "sft"), r.get("sdft_teacher"), r.get("sdft_divergence")) for r in rows}
    assert {("lora", "sft", None, None), ("lora", "sdft", "base", "forward"), ("lora", "sdft", "base", "reverse"),
            ("lora", "sdft", "ema", "forward"), ("lora", "dft", None, None), ("full", "sdft", "base", "forward")} <= kinds
    assert any(r.get("objective") == "dft" and r.get("kl_to_base", 0) > 0 for r in rows)  # ASFT
    assert any(r["learning_rate"] == 2e-4 and r.get("early_stopping_patience", 0) > 0 for r in rows)
    assert any(r.get("replay_data") == "self" and r["replay_ratio"] == 0.2 for r in rows)  # the session-6 default
    assert any(r.get("replay_data") == CHAT_RECIPE["replay_data"] and r["replay_ratio"] == CHAT_RECIPE["replay_ratio"]
               for r in rows)  # today's chat default
    assert all(r["capability_gate"] == "significant" and r["capability_max_drop"] == 10 for r in rows)
