"""Methods as compositions, and the LoRA+EWC terms on GPT-2's transposed Conv1D weights."""
from __future__ import annotations

import torch
from tiny_models import tiny_gpt2, tiny_llama

from trainer.config import TrainConfig
from trainer.methods import EWCPenalty, FullWeights, LoRAEWCPenalty, LoRAWeights, build_method


def test_each_method_is_what_trains_plus_what_holds_back():
    kinds = {m: build_method(TrainConfig(method=m)) for m in ("full", "lora", "ewc", "lora_ewc")}
    assert isinstance(kinds["full"].weights, FullWeights) and kinds["full"].penalty is None
    assert isinstance(kinds["lora"].weights, LoRAWeights) and kinds["lora"].penalty is None
    assert isinstance(kinds["ewc"].weights, FullWeights) and isinstance(kinds["ewc"].penalty, EWCPenalty)
    assert isinstance(kinds["lora_ewc"].weights, LoRAWeights)
    assert isinstance(kinds["lora_ewc"].penalty, LoRAEWCPenalty)


def test_lora_ewc_terms_transpose_the_fisher_of_conv1d_weights(tmp_path):
    """GPT-2 Conv1D weights are [in, out]; the LoRA penalty wants F_W as [out, in]."""
    model = tiny_gpt2()
    cfg = TrainConfig(method="lora_ewc", lora_targets=["c_attn", "c_fc"], lora_r=2)
    method = build_method(cfg)
    names = method.penalty.fisher_params(model, method.weights)
    assert names and all(n.endswith(".weight") for n in names)
    fisher = {n: torch.rand(dict(model.named_parameters())[n].shape) for n in names}
    method.prepare(model, fisher_source=lambda m: fisher, fisher_cache=lambda m, n: tmp_path / "fisher.safetensors")
    assert len(method.penalty.terms) == len(names)
    for (A, B, f_w, scale), name in zip(method.penalty.terms, names, strict=True):
        stored = fisher[name]  # [in, out] like the Conv1D weight
        assert f_w.shape == (B.shape[0], A.shape[1]) == stored.t().shape
        torch.testing.assert_close(f_w, stored.t().contiguous(), rtol=0, atol=0)
        assert scale == cfg.lora_alpha / cfg.lora_r


def test_ewc_penalty_covers_every_weight_and_anchors_at_the_base(tmp_path):
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method(TrainConfig(method="ewc"))
    method.prepare(model, fisher_source=lambda m: {n: torch.ones_like(p) for n, p in m.named_parameters()
                                                   if p.requires_grad},
                   fisher_cache=lambda m, n: tmp_path / "fisher.safetensors")
    assert len(method.penalty.params) == len(base)
    assert all(p.requires_grad for p in model.parameters())
    for p, a in zip(method.penalty.params, method.penalty.anchors, strict=True):
        assert a is not p and torch.equal(a, p.detach())
    # Moving a weight by d gives the penalty lam/2 * F * d^2 and the gradient lam * F * d.
    with torch.no_grad():
        method.penalty.params[0].add_(0.5)
    for p in model.parameters():
        p.grad = None
    penalty = method.after_backward(model)
    n = method.penalty.params[0].numel()
    assert abs(penalty - 1.0 / 2 * n * 0.25) < 1e-4 * n
    torch.testing.assert_close(method.penalty.params[0].grad, torch.full_like(method.penalty.params[0], 0.5))
