"""kernels.gated_mlp: the MLP that keeps only gate(x) and up(x) for backward.

References: autograd on the unpatched model in float64 (gradients), the model's own forward
(outputs, bitwise), and a hand count of the bytes two [tokens, intermediate] tensors take
per layer (memory, measured with the bench's tensor-memory tracker).
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen2
from transformers.activations import ACT2FN

from bench.harness import TensorMemoryTracker
from kernels.gated_mlp import GatedProduct, recompute_mlp_activations
from kernels.lora_layers import apply_lora


@pytest.mark.parametrize("act_name", ["silu", "gelu_pytorch_tanh", "relu"])
def test_gated_product_gradients_match_float64_autograd(act_name):
    act = ACT2FN[act_name]
    torch.manual_seed(0)
    g = torch.randn(37, 53, dtype=torch.float64) * 3
    u = torch.randn(37, 53, dtype=torch.float64)
    dh = torch.randn(37, 53, dtype=torch.float64)
    g32, u32 = (t.float().requires_grad_(True) for t in (g, u))
    out = GatedProduct.apply(g32, u32, act)
    out.backward(dh.float())
    g64, u64 = (t.clone().requires_grad_(True) for t in (g, u))
    ref = act(g64) * u64
    ref.backward(dh)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g32.grad.double(), g64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u32.grad.double(), u64.grad, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = (logits.float() ** 2).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_patched_model_matches_its_own_autograd_in_float64(build, lora):
    ids = torch.randint(0, 200, (3, 19))
    models = []
    for _ in range(2):
        model = build(seed=1).double().train()
        if lora:
            apply_lora(model, r=4, alpha=8)
            for name, p in model.named_parameters():  # B != 0 so the adapters' gradients are not trivial
                if name.endswith("lora_B"):
                    torch.nn.init.normal_(p, std=0.1)
        models.append(model)
    assert recompute_mlp_activations(models[1]) == 2
    out_ref, grads_ref = _loss_and_grads(models[0], ids)
    out, grads = _loss_and_grads(models[1], ids)
    assert torch.equal(out, out_ref)  # same forward arithmetic
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_gradients_stay_within_bf16_rounding_of_the_unpatched_model():
    ids = torch.randint(0, 200, (2, 23))
    ref_model, model = tiny_llama(seed=2).train(), tiny_llama(seed=2).train()
    recompute_mlp_activations(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, grads_ref = _loss_and_grads(ref_model, ids)
        out, grads = _loss_and_grads(model, ids)
    assert torch.equal(out, out_ref)
    for name in grads:
        ref = grads_ref[name]
        # Both sides round the same bf16 products; the activation's derivative is computed in
        # fp32 here and in fp32 inside torch's silu backward, so only a few bf16 ulps can differ.
        assert (grads[name] - ref).norm() <= 2e-2 * ref.norm() + 1e-6, name


def test_forward_keeps_two_fewer_intermediate_tensors_per_layer():
    batch, seq, inter, layers = 4, 64, 520, 3
    ids = torch.randint(0, 200, (batch, seq))

    def live_after_forward(patch: bool) -> int:
        model = tiny_llama(seed=3, intermediate_size=inter, num_hidden_layers=layers).train()
        if patch:
            recompute_mlp_activations(model)
        tracker = TensorMemoryTracker()
        with tracker:
            logits = model(input_ids=ids).logits
            live = tracker.live
        del logits
        return live

    saved = live_after_forward(False) - live_after_forward(True)
    # act(g) and h: two fp32 [batch * seq, intermediate] tensors per layer.
    assert saved == 2 * layers * batch * seq * inter * 4


def test_no_grad_forward_and_unrecognised_modules_are_left_alone():
    model = tiny_llama(seed=4)
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert recompute_mlp_activations(model) == 2
        assert recompute_mlp_activations(model) == 2  # idempotent
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert recompute_mlp_activations(torch.nn.Sequential(torch.nn.Linear(3, 3))) == 0
