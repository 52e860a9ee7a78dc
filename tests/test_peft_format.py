"""save_adapter / load_adapter against PEFT 0.21 itself, and merge_lora through HF save/load.

Every round trip compares logits with the model that wrote the file, computed by the other
implementation (PEFT or plain HF), so a wrong key, scale or transpose shows up as a logit gap.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import TINY_VOCAB_SIZE, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM

from kernels.lora_layers import apply_lora, lora_modules, merge_lora
from kernels.peft_format import AdapterFormatError, load_adapter, save_adapter

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB_SIZE, (2, 11), generator=torch.Generator().manual_seed(seed))


def randomise_lora_B(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=generator))


def peft_adapter(kind: str, out_dir: Path, **lora_kwargs) -> tuple[torch.Tensor, Path]:
    """Train-free PEFT adapter with non-zero B saved by PEFT; returns (PEFT's logits, dir)."""
    model = get_peft_model(BUILDERS[kind](), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        logits = model(token_batch()).logits
    model.save_pretrained(out_dir)
    return logits, out_dir


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_save_adapter_loads_in_peft(kind, tmp_path):
    model = apply_lora(BUILDERS[kind](), r=4, alpha=6)
    randomise_lora_B(model)
    with torch.no_grad():
        ours = model(token_batch()).logits
    save_adapter(model, tmp_path / "adapter")
    theirs_model = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path / "adapter")
    with torch.no_grad():
        theirs = theirs_model(token_batch()).logits
    assert rel_err(ours, theirs) < 1e-5
    # Same file layout as PEFT's own save of the same adapter.
    theirs_model.save_pretrained(tmp_path / "peft_copy")
    ours_state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    peft_state = load_file(tmp_path / "peft_copy" / "adapter_model.safetensors")
    assert sorted(ours_state) == sorted(peft_state)
    for key, tensor in peft_state.items():
        assert torch.equal(ours_state[key], tensor), key
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    assert not list(tmp_path.glob(".adapter*"))  # no temporary directory left behind


@pytest.mark.parametrize(
    "kind, lora_kwargs",
    [
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("qwen2", dict(r=3, lora_alpha=5, use_rslora=True, target_modules="all-linear")),
        ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        # Per-module rank and alpha; a regex target_modules string.
        ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|up_proj)",
                       rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 3})),
    ],
    ids=["llama-list", "qwen2-rslora-all-linear", "gpt2-conv1d", "llama-patterns"],
)
def test_peft_saved_adapter_loads_here(kind, lora_kwargs, tmp_path):
    theirs, adapter_dir = peft_adapter(kind, tmp_path / "peft", **lora_kwargs)
    model = load_adapter(BUILDERS[kind](), adapter_dir)
    with torch.no_grad():
        ours = model(token_batch()).logits
    assert rel_err(ours, theirs) < 1e-5
    if "rank_pattern" in lora_kwargs:
        ranks = {path: layer.r for path, layer in lora_modules(model)}
        assert ranks["model.layers.1.self_attn.q_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4
        # ... and our save writes the per-module ranks back in a form PEFT reloads.
        save_adapter(model, tmp_path / "ours")
        reloaded = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path / "ours")
        with torch.no_grad():
            assert rel_err(reloaded(token_batch()).logits, theirs) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_then_hf_save_roundtrip(kind, tmp_path):
    model = apply_lora(BUILDERS[kind](), r=4, alpha=6)
    randomise_lora_B(model)
    with torch.no_grad():
        unmerged = model(token_batch()).logits
    base_keys = set(BUILDERS[kind]().state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == base_keys
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    with torch.no_grad():
        assert rel_err(reloaded(token_batch()).logits, unmerged) < 1e-5


def test_save_replaces_existing_adapter_atomically(tmp_path, monkeypatch):
    model = apply_lora(tiny_llama(), r=2, alpha=4, targets=["q_proj"])
    target = save_adapter(model, tmp_path / "adapter")
    first = (target / "adapter_model.safetensors").read_bytes()
    randomise_lora_B(model, seed=3)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == first  # old adapter intact
    monkeypatch.undo()
    save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    model = apply_lora(tiny_llama(), r=2, alpha=4, targets=["q_proj", "v_proj"])
    return save_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


def tampered(src: Path, dst: Path, config_changes=None, state_change=None) -> Path:
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(src / "adapter_model.safetensors")
    if state_change:
        state_change(state)
    save_file(state, dst / "adapter_model.safetensors")
    return dst


def _drop_one(state):
    state.pop(sorted(state)[0])


def _add_one(state):
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 48)


def _reshape_one(state):
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    state[key] = torch.zeros(3, state[key].shape[1])


@pytest.mark.parametrize(
    "config_changes, state_change, message",
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"peft_type": "IA3"}, None, "only 'LORA'"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "bias='all'"),
        ({"target_modules": ["query"]}, None, "match no module"),
        (None, _drop_one, "1 missing"),
        (None, _add_one, "1 unexpected.*up_proj"),
        (None, _reshape_one, "shape mismatch"),
    ],
    ids=["dora", "ia3", "modules_to_save", "bias", "no-targets", "missing-key", "unexpected-key", "shape"],
)
def test_load_errors_are_clear_and_leave_model_untouched(good_adapter, tmp_path, config_changes, state_change, message):
    bad = tampered(good_adapter, tmp_path / "bad", config_changes, state_change)
    model = tiny_llama()
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(model, bad)
    assert not lora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


def test_load_missing_files_and_pickles(good_adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good_adapter / "adapter_config.json").read_text())
    torch.save(load_file(good_adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="convert"):
        load_adapter(tiny_llama(), pickled)
    (pickled / "adapter_config.json").write_text("{\n  \"r\": 2,\n  oops\n}")
    with pytest.raises(AdapterFormatError, match="adapter_config.json:3"):
        load_adapter(tiny_llama(), pickled)


def test_load_into_lora_model_is_refused(good_adapter):
    model = load_adapter(tiny_llama(), good_adapter)
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lora_modules(model)}) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapter(copy.deepcopy(model), good_adapter)
