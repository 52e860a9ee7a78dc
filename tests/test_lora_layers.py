"""LoRALinear / apply_lora / merge_lora against PEFT 0.21 (the reference) and float64 torch.

Parity: the same tiny random HF model is wrapped by us and by PEFT, both get the same
(non-zero) A and B, and logits and every LoRA gradient must agree to 1e-5 relative in fp32.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import TINY_VOCAB_SIZE, tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn
from transformers.pytorch_utils import Conv1D

from kernels.lora_layers import LoRALinear, apply_lora, lora_modules, merge_lora

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
LINEAR_NAMES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def token_batch(seed: int = 0, shape=(3, 13)) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def ours_and_peft(kind: str, r: int = 5, alpha: float = 7.0, use_rslora: bool = False, targets=None):
    """Our LoRA model and PEFT's on identical base weights, sharing non-zero A and B."""
    base = BUILDERS[kind]()
    ours = apply_lora(copy.deepcopy(base), r=r, alpha=alpha, targets=targets, use_rslora=use_rslora)
    target_names = sorted({path.rsplit(".", 1)[-1] for path, _ in lora_modules(ours)})
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_names, use_rslora=use_rslora)
    )
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for path, layer in lora_modules(ours):
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=generator))
            theirs = peft_model.base_model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return ours, peft_model


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_logits_and_lora_grads_match_peft(kind, use_rslora):
    ours, theirs = ours_and_peft(kind, use_rslora=use_rslora)
    ours.train()
    theirs.train()
    ids = token_batch()
    logits_ours = ours(ids).logits
    logits_peft = theirs(ids).logits
    assert rel_err(logits_ours, logits_peft) < 1e-5
    lm_loss(logits_ours, ids).backward()
    lm_loss(logits_peft, ids).backward()
    layers = lora_modules(ours)
    linears_per_block = 4 if kind == "gpt2" else 7  # GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(layers) == 2 * linears_per_block
    for path, layer in layers:
        peft_layer = theirs.base_model.model.get_submodule(path)
        assert layer.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
        assert rel_err(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad) < 1e-5, path
        assert rel_err(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad) < 1e-5, path


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_default_targets_names_and_frozen_params(kind):
    base = BUILDERS[kind]()
    base_names = {name for name, _ in base.named_parameters()}
    originals = dict(base.named_parameters())
    model = apply_lora(base)
    paths = [path for path, _ in lora_modules(model)]
    # Every linear layer inside the blocks, nothing else (no lm_head, no embeddings).
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(LINEAR_NAMES[kind])
    assert all(".h." in p or ".layers." in p for p in paths)
    names = {name for name, _ in model.named_parameters()}
    lora_names = {f"{p}.lora_{ab}" for p in paths for ab in "AB"}
    assert names == base_names | lora_names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names
    # The base Parameters are taken over (same objects), not copied.
    for name, param in model.named_parameters():
        if name in originals:
            assert param is originals[name], name
    layer = dict(lora_modules(model))[paths[0]]
    assert layer.fan_in_fan_out == (kind == "gpt2")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_init_leaves_model_unchanged(kind):
    base = BUILDERS[kind]()
    ids = token_batch(1)
    with torch.no_grad():
        before = base(ids).logits
        model = apply_lora(base, r=6, alpha=12)
        after = model(ids).logits
    assert torch.equal(before, after)  # B = 0 exactly
    for _, layer in lora_modules(model):
        # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)), PEFT's default.
        bound = 1.0 / math.sqrt(layer.in_features)
        assert layer.lora_A.abs().max() <= bound
        assert layer.lora_A.abs().max() > 0.8 * bound
        assert torch.count_nonzero(layer.lora_B) == 0
        assert layer.scale == 2.0


def test_targets_follow_peft_matching_rules():
    model = tiny_llama()
    apply_lora(model, targets=["q_proj", "mlp.down_proj"])
    assert sorted(p for p, _ in lora_modules(model)) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
    ]
    model = apply_lora(tiny_llama(), targets=r".*\.1\.self_attn\.(k|v)_proj")
    assert sorted(p for p, _ in lora_modules(model)) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
    ]
    model = apply_lora(tiny_llama(), targets="all-linear")
    assert len(lora_modules(model)) == 14 and "lm_head" not in dict(lora_modules(model))


def test_target_errors_are_clear():
    with pytest.raises(ValueError, match=r"match no module.*q_proj"):
        apply_lora(tiny_llama(), targets=["query"])
    with pytest.raises(ValueError, match=r"not nn.Linear/Conv1D.*self_attn"):
        apply_lora(tiny_llama(), targets=["self_attn"])
    model = apply_lora(tiny_llama())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_merged_weights_match_peft_merge(kind):
    ours, theirs = ours_and_peft(kind)
    ids = token_batch(2)
    with torch.no_grad():
        unmerged = ours(ids).logits
        single = {path: layer.merged() for path, layer in lora_modules(ours)}
        merged_ours = merge_lora(ours)
        merged_peft = theirs.merge_and_unload()
        assert not lora_modules(merged_ours)
        peft_state = merged_peft.state_dict()
        for name, tensor in merged_ours.state_dict().items():
            assert rel_err(tensor, peft_state[name]) < 1e-6, name
        for path, module in single.items():
            assert type(module) is type(merged_peft.get_submodule(path))
            assert rel_err(module.weight, peft_state[f"{path}.weight"]) < 1e-6
        assert rel_err(merged_ours(ids).logits, unmerged) < 1e-5


def test_merge_restores_plain_modules_and_unmerged_is_untouched():
    model = apply_lora(tiny_qwen2(), r=3, alpha=5)
    path, layer = lora_modules(model)[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    weight_before = layer.weight.detach().clone()
    plain = layer.merged()  # non-destructive
    assert torch.equal(layer.weight, weight_before)
    expected = weight_before.double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    assert rel_err(plain.weight, expected) < 1e-6
    assert plain.bias is layer.bias
    merge_lora(model)
    assert type(model.get_submodule(path)) is nn.Linear
    assert not hasattr(model, "forgetless_lora_config")


def _single_layer(base: nn.Module, r: int, dropout: float) -> LoRALinear:
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_matches_float64_reference(conv1d):
    torch.manual_seed(0)
    base = Conv1D(11, 13) if conv1d else nn.Linear(13, 11)
    w_out_in = (base.weight.t() if conv1d else base.weight).detach().double().clone()
    bias = base.bias.detach().double().clone()
    layer = _single_layer(base, r=3, dropout=0.25).eval()
    x = torch.randn(2, 5, 13, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A.double(), layer.lora_B.double()
    y_ref = x.double() @ w_out_in.t() + bias + layer.scale * (x.double() @ A.t()) @ B.t()
    assert rel_err(y, y_ref) < 1e-6
    dy = torch.randn_like(y)
    y.backward(dy)
    dy2 = dy.double().reshape(-1, 11)
    x2 = x.double().reshape(-1, 13)
    assert rel_err(layer.lora_B.grad, layer.scale * dy2.t() @ (x2 @ A.t())) < 1e-6
    assert rel_err(layer.lora_A.grad, layer.scale * (dy2 @ B).t() @ x2) < 1e-6
    assert rel_err(x.grad, (dy2 @ (w_out_in + layer.scale * B @ A)).reshape(x.shape)) < 1e-6
    assert layer.weight.grad is None and layer.bias.grad is None


def test_dropout_only_in_training_and_unbiased():
    torch.manual_seed(0)
    layer = _single_layer(nn.Linear(13, 11), r=3, dropout=0.3)
    x = torch.randn(4, 13)
    with torch.no_grad():
        layer.eval()
        y_eval = layer(x)
        assert torch.equal(layer(x), y_eval)
        layer.train()
        samples = torch.stack([layer(x) for _ in range(3000)])
    assert not torch.equal(samples[0], y_eval)
    assert not torch.equal(samples[0], samples[1])  # a new mask per call
    # Inverted dropout on the (linear) LoRA branch: E[y_train] = y_eval.  5 standard errors.
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((samples.mean(0) - y_eval).abs() <= 5 * stderr + 1e-6).all()


def test_model_gradient_under_dropout_matches_finite_differences():
    """gradcheck (float64 finite differences) re-seeds torch before every forward, so each
    evaluation sees the same masks; it fails if backward used a different mask than forward.
    A small Linear -> tanh -> Conv1D stack, because HF models compute RMSNorm in fp32 even
    in a float64 model, which would drown the finite differences."""
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(7, 9), nn.Tanh(), Conv1D(5, 9)), r=2, alpha=3, dropout=0.4)
    model = model.double().train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    params = [p.detach().clone().normal_(std=0.5).requires_grad_() for p in (dict(model.named_parameters())[n] for n in names)]
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)

    def forward(x, *lora_params):
        torch.manual_seed(7)
        return torch.func.functional_call(model, dict(zip(names, lora_params, strict=True)), (x,))

    y_train = forward(x, *params)
    model.eval()
    y_eval = forward(x, *params)
    model.train()
    assert not torch.equal(y_train, y_eval)  # dropout is really on
    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)
