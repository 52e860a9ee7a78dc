"""Checkpoints and resume: an interrupted-and-resumed run has the same losses as an uninterrupted
one (the reference is that uninterrupted run, computed in the same test); periodic checkpoints,
save_total_limit, early stopping that restores the best weights."""
from __future__ import annotations

import json

import pytest
from test_trainer_e2e import make_workspace, mean_loss, run_config, write_jsonl

from trainer import checkpoint as ckpt
from trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("trainer_resume"))


def _stop_at(k: int):
    def hook(step: int, record: dict) -> None:
        if step == k:
            raise KeyboardInterrupt
    return hook


def test_interrupt_saves_a_checkpoint_and_resume_gives_the_same_losses(ws, tmp_path):
    # Dropout, replay and accumulation all in play: RNG, data position and optimizer state matter.
    common = dict(method="lora", lora_dropout=0.2, replay_data=str(ws["general"]), replay_ratio=0.25,
                  gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=8,
                  lr_scheduler_type="cosine", warmup_steps=2)
    full_run = train(run_config(ws, tmp_path / "straight", **common))

    with pytest.raises(KeyboardInterrupt):
        train(run_config(ws, tmp_path / "broken", **common), on_step_end=_stop_at(3))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "broken")] == ["checkpoint-3"]
    resumed = train(run_config(ws, tmp_path / "broken", resume_from_checkpoint="latest", **common))
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert abs(resumed.losses[step] - full_run.losses[step]) <= 1e-6, step
    # metrics.jsonl of the resumed run reads like one run: steps 1..8 once each.
    steps = [json.loads(line)["step"] for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    # The summary counts the rows of the whole run, not only of the resumed part: 8 steps of a
    # global batch of 2 x 2 rows, the replay share as the uninterrupted run trained them.
    assert full_run.task_rows + full_run.replay_rows == 8 * 2 * 2
    assert (resumed.task_rows, resumed.replay_rows) == (full_run.task_rows, full_run.replay_rows)
    assert f"rows trained: {full_run.task_rows} task + {full_run.replay_rows} replay" in resumed.summary()


def test_a_checkpoint_from_before_the_row_counts_still_resumes(ws, tmp_path):
    """Checkpoints written before TrainerState carried the row counts load with counts 0."""
    import torch

    path = ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, {}, ckpt.TrainerState(step=3, task_rows=9))
    blob = torch.load(path / "state.pt", weights_only=True)
    del blob["trainer"]["task_rows"], blob["trainer"]["replay_rows"]
    torch.save(blob, path / "state.pt")
    _, _, state, _ = ckpt.load_checkpoint(path)
    assert (state.step, state.task_rows, state.replay_rows) == (3, 0, 0)


def test_periodic_checkpoints_rotate_and_resume_from_a_path(ws, tmp_path):
    common = dict(method="full", learning_rate=3e-3, weight_decay=0.1, max_steps=6, lr_scheduler_type="linear")
    first = train(run_config(ws, tmp_path / "a", save_steps=2, save_total_limit=2, **common))
    kept = ckpt.list_checkpoints(tmp_path / "a")
    assert [p.name for p in kept] == ["checkpoint-4", "checkpoint-6"]
    assert not list((tmp_path / "a").glob(".tmp-*"))
    assert sorted(p.name for p in kept[0].iterdir()) == ["state.pt", "trainable.safetensors", "trainer_state.json"]
    resumed = train(run_config(ws, tmp_path / "b", resume_from_checkpoint=str(kept[0]), **common))
    for step in (5, 6):
        assert abs(resumed.losses[step] - first.losses[step]) <= 1e-6


def test_early_stopping_restores_the_best_weights(ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Validation asks for the opposite of training (the word back, not reversed): as the model
    # learns the task, validation loss first falls (format, EOS) then rises.
    rows = [json.loads(line) for line in ws["task"].read_text().splitlines()]
    contrary = write_jsonl(tmp_path / "contrary.jsonl",
                           [{"prompt": r["prompt"], "completion": r["prompt"][:-1]} for r in rows[:16]])
    result = train(run_config(ws, tmp_path / "es", method="full", learning_rate=3e-3, max_steps=30,
                              eval_data=str(contrary), eval_steps=1, early_stopping_patience=2))
    assert result.stopped_early and max(result.losses) < 30
    best = result.best_step
    assert result.eval_losses[best] == min(result.eval_losses.values())
    assert max(result.eval_losses) == best + 2  # stopped after two evaluations without improvement
    model = AutoModelForCausalLM.from_pretrained(result.saved_to)
    tok = AutoTokenizer.from_pretrained(result.saved_to)
    assert abs(mean_loss(model, tok, contrary) - result.eval_losses[best]) < 1e-4
