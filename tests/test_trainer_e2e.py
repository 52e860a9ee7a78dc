"""End-to-end runs of the trainer on a tiny random Llama, one per method, plus the shared helpers
(``make_workspace``, ``run_config``) the other trainer test files import.

Independent references: PEFT's own loader (PeftModel.from_pretrained) for the adapter, HF's
from_pretrained for the full model, and a loss recomputed by hand from the saved files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from trainer.config import TrainConfig, validate
from trainer.data import IGNORE_INDEX, collate, read_jsonl, tokenize_file
from trainer.loop import train


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_workspace(root: Path, n_task: int = 48, n_general: int = 40, seed: int = 0) -> dict[str, Path]:
    """A saved tiny model + tokenizer, a learnable prompt/completion task and a text corpus."""
    model_dir = root / "model"
    if not (model_dir / "model.safetensors").exists():
        tiny_llama(seed=seed, hidden_size=32, intermediate_size=40, num_attention_heads=2,
                   num_key_value_heads=1, initializer_range=0.2).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "map", "owl"]
    task = []
    for _ in range(n_task):
        w = rng.choice(words)
        task.append({"prompt": f"{w}>", "completion": w[::-1]})
    general = [{"text": " ".join(rng.choice(words) for _ in range(4))} for _ in range(n_general)]
    return {"model": model_dir, "task": write_jsonl(root / "task.jsonl", task),
            "general": write_jsonl(root / "general.jsonl", general)}


def run_config(ws: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    """A fast config: tiny batches, a high lr so that a dozen steps move the loss, no demo."""
    values = dict(model=str(ws["model"]), data=str(ws["task"]), output_dir=str(out), max_steps=12,
                  per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                  validation_split=0.0, max_length=32, progress=False, lora_r=4, lora_alpha=8.0,
                  device="cpu", fisher_samples=16, per_device_eval_batch_size=8)
    values.update(overrides)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def mean_loss(model, tokenizer, path: Path) -> float:
    """Reference: mean token loss of ``model`` on the labelled tokens of a JSONL file (float64)."""
    data = tokenize_file(path, tokenizer, 32)
    batch = collate(data.examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked[keep]).sum() / keep.sum())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("trainer_e2e"))


def _loss_went_down(result) -> None:
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_full_finetune_trains_and_saves_an_hf_model(ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = run_config(ws, tmp_path / "full", method="full", learning_rate=3e-3)
    result = train(cfg)
    _loss_went_down(result)
    assert (tmp_path / "full" / "config.yaml").exists()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "ewc_penalty", "replay_share"} <= set(records[0])
    saved = result.saved_to
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    base = AutoModelForCausalLM.from_pretrained(ws["model"])
    # The saved model is the trained one: its loss on the task is well below the base's.
    assert mean_loss(model, tok, ws["task"]) < 0.8 * mean_loss(base, tok, ws["task"])


def test_lora_trains_and_the_adapter_loads_in_peft_with_the_same_logits(ws, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kernels.peft_format import load_adapter

    cfg = run_config(ws, tmp_path / "lora", method="lora", lora_targets=["q_proj", "v_proj", "down_proj"])
    result = train(cfg)
    _loss_went_down(result)
    adapter = result.saved_to
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws["model"]), str(adapter)).eval()
    ours = AutoModelForCausalLM.from_pretrained(ws["model"]).eval()
    load_adapter(ours, adapter)
    ids = torch.tensor([[5, 99, 104, 62, 7, 110, 258]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(ws["model"])(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the adapter is not a no-op


def test_ewc_estimates_saves_and_reuses_the_fisher(ws, tmp_path):
    from safetensors.torch import load_file

    # lambda 1: the penalty's gradient is applied in the optimizer step after clipping (AdamWEWC),
    # so it is not scaled down with the data gradient; at 10 it held this tiny model's loss up.
    cfg = run_config(ws, tmp_path / "ewc", method="ewc", learning_rate=3e-3, replay_data=str(ws["general"]),
                     ewc_lambda=1.0)
    result = train(cfg)
    _loss_went_down(result)
    fisher_file = result.fisher_file
    assert fisher_file is not None and fisher_file.exists()
    tensors = load_file(str(fisher_file))
    assert any(k.startswith("fisher.") for k in tensors) and any(k.startswith("anchor.") for k in tensors)
    base = load_file(str(ws["model"] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(tensors[f"anchor.{name}"], base[name], rtol=0, atol=0)
    assert (tensors[f"fisher.{name}"] >= 0).all() and tensors[f"fisher.{name}"].sum() > 0
    records = [json.loads(line) for line in (tmp_path / "ewc" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["ewc_penalty"] == 0.0 and records[-1]["ewc_penalty"] > 0.0  # w moved away from w*
    # Same model, data and settings: the second run reuses the file instead of estimating again.
    stamp = fisher_file.stat().st_mtime_ns
    again = train(run_config(ws, tmp_path / "ewc", method="ewc", learning_rate=3e-3, max_steps=1,
                             replay_data=str(ws["general"])))
    assert again.fisher_file == fisher_file and fisher_file.stat().st_mtime_ns == stamp
    # Online EWC: same base and data, so F_new = F and the merged Fisher is (gamma + 1) F.
    online = train(run_config(ws, tmp_path / "ewc2", method="ewc", learning_rate=3e-3, max_steps=1,
                              replay_data=str(ws["general"]), previous_fisher=str(fisher_file), ewc_online_gamma=0.5))
    merged = load_file(str(online.fisher_file))
    torch.testing.assert_close(merged[f"fisher.{name}"], 1.5 * tensors[f"fisher.{name}"], rtol=1e-5, atol=1e-12)


def test_lora_ewc_trains_with_the_base_fisher(ws, tmp_path):
    cfg = run_config(ws, tmp_path / "lora_ewc", method="lora_ewc", fisher_data=str(ws["general"]),
                     ewc_lambda=1.0)
    result = train(cfg)
    _loss_went_down(result)
    assert (result.saved_to / "adapter_config.json").exists()
    records = [json.loads(line) for line in (tmp_path / "lora_ewc" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["ewc_penalty"] == 0.0 and records[-1]["ewc_penalty"] > 0.0  # B starts at 0


def test_replay_rows_are_mixed_in_at_the_ratio(ws, tmp_path):
    cfg = run_config(ws, tmp_path / "replay", method="full", max_steps=5, per_device_train_batch_size=5,
                     replay_data=str(ws["general"]), replay_ratio=0.4, learning_rate=1e-3)
    result = train(cfg)
    assert (result.task_rows, result.replay_rows) == (15, 10)
    records = [json.loads(line) for line in (tmp_path / "replay" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replay_share"] == 0.4 for r in records)
    assert read_jsonl(ws["general"])  # the corpus itself is valid


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recompute_mlp_trains_the_same_steps_as_plain_autograd(ws, tmp_path, capsys, method):
    """recompute_mlp (the default) against recompute_mlp=false: the same 12 step losses and the
    same saved weights, to fp32 rounding (the forward is bitwise the same; only the backward's
    order of elementwise work differs)."""
    results = {}
    for flag in (True, False):
        results[flag] = train(run_config(ws, tmp_path / f"{method}-{flag}", method=method, recompute_mlp=flag,
                                         learning_rate=3e-3))
    assert "memory: 2 gated MLPs keep only gate(x) and up(x) for backward" in capsys.readouterr().out
    on, off = results[True].losses, results[False].losses
    assert sorted(on) == sorted(off) == list(range(1, 13))
    for step in on:
        assert on[step] == pytest.approx(off[step], rel=1e-4, abs=1e-6), step
    from safetensors.torch import load_file

    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    a, b = (load_file(str(results[flag].saved_to / name)) for flag in (True, False))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)
