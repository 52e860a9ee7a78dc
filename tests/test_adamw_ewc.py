"""kernels.adamw_ewc.AdamWEWC against torch.optim.AdamW fed the explicit EWC penalty's gradient
(autograd of ``lam/2 sum F (p - p*)^2``), step by step.

The reference is torch's own single-tensor AdamW in float64; the torch path (float64) must
agree to float64 rounding.  The Triton kernels (the interpreter here, fp32) are checked
against the float64 reference run from the same fp32 start: each step rounds each of p, m, v
a handful of times (under ten fp32 operations per element), so after ``STEPS`` steps the
error stays below ``10 * STEPS * 2^-24`` relative to the values' scale (``FP32_TOL``).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import kernels.adamw_ewc as adamw_ewc
from kernels import backend
from kernels.adamw_ewc import AdamWEWC, adamw_ewc_step

STEPS = 5
FP32_TOL = 10 * STEPS * 2.0**-24
# Odd sizes; which parameters have a Fisher, and which group (weight decay 0.1 or 0) they are in.
SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (257,), (33, 9)]
HAS_FISHER = [True, False, True, True, False, True]
GROUP = [0, 0, 1, 1, 0, 1]
LAM, LR, BETAS, EPS = 0.7, 0.05, (0.9, 0.99), 1e-8
WEIGHT_DECAY = (0.1, 0.0)


def _problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    anchors = [(p.double() + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(dtype) for p in start]
    fishers = [torch.rand(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in start]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(STEPS)]
    # Parameter 3 has no gradient at step 1 (AdamW skips it: its step count falls behind).
    grads[1][3] = None
    return start, anchors, fishers, grads


def _groups(params):
    return [{"params": [p for p, g in zip(params, GROUP, strict=True) if g == k], "weight_decay": wd}
            for k, wd in enumerate(WEIGHT_DECAY)]


def _reference(start, anchors, fishers, grads):
    """float64 torch.optim.AdamW (single-tensor) with the penalty gradient from autograd."""
    params = [torch.nn.Parameter(p.detach().double().clone()) for p in start]
    opt = torch.optim.AdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, foreach=False, fused=False)
    for step_grads in grads:
        with torch.enable_grad():
            penalty = sum((LAM / 2) * (f.double() * (p - a.double()) ** 2).sum()
                          for p, a, f, has in zip(params, anchors, fishers, HAS_FISHER, strict=True) if has)
            penalty_grads = torch.autograd.grad(penalty, params, allow_unused=True)
        for p, g, pg in zip(params, step_grads, penalty_grads, strict=True):
            p.grad = None if g is None else g.double() + (0 if pg is None else pg)
        opt.step()
    return params, opt


def _ours(start, anchors, fishers, grads, which, steps=STEPS, dtype=None):
    params = [torch.nn.Parameter(p.detach().clone() if dtype is None else p.detach().to(dtype)) for p in start]
    with_fisher = [i for i, has in enumerate(HAS_FISHER) if has]
    opt = AdamWEWC(_groups(params), LAM, {params[i]: anchors[i] for i in with_fisher},
                   {params[i]: fishers[i] for i in with_fisher}, lr=LR, betas=BETAS, eps=EPS)
    for step_grads in grads[:steps]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        before = [None if p.grad is None else p.grad.clone() for p in params]
        with backend.forced(which):
            opt.step()
        for p, b in zip(params, before, strict=True):  # .grad is left as the caller made it
            assert (p.grad is None and b is None) or torch.equal(p.grad, b)
    return params, opt


def test_torch_path_matches_adamw_plus_penalty_gradient_float64(monkeypatch):
    # Small pieces: tensors split across pieces and pieces of several tensors share one call.
    monkeypatch.setattr(adamw_ewc, "TORCH_CHUNK", 16)
    start, anchors, fishers, grads = _problem(torch.float64)
    want, want_opt = _reference(start, anchors, fishers, grads)
    got, opt = _ours(start, anchors, fishers, grads, "torch")
    for i, (p, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(p, w, rtol=1e-12, atol=1e-12, msg=f"param {i}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key].double(), want_opt.state[w][key].double(),
                                       rtol=1e-12, atol=1e-12, msg=f"param {i} {key}")
    assert float(opt.state[got[3]]["step"]) == STEPS - 1


@pytest.mark.interpret
def test_triton_path_matches_float64_reference(monkeypatch):
    # 64-element blocks: the odd sizes span several programs with ragged ends.
    monkeypatch.setattr(adamw_ewc, "_INTERPRETER_BLOCK", 64)
    monkeypatch.setattr(adamw_ewc, "TRITON_BLOCK", 64)
    start, anchors, fishers, grads = _problem(torch.float32)
    want, want_opt = _reference(start, anchors, fishers, grads)
    got, opt = _ours(start, anchors, fishers, grads, "triton")
    for i, (p, w) in enumerate(zip(got, want, strict=True)):
        assert p.dtype == torch.float32
        scale = w.abs().max().item()
        torch.testing.assert_close(p.double(), w.detach(), rtol=FP32_TOL, atol=FP32_TOL * scale, msg=f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            ref = want_opt.state[w][key]
            torch.testing.assert_close(opt.state[p][key].double(), ref, rtol=FP32_TOL,
                                       atol=FP32_TOL * ref.abs().max().item(), msg=f"param {i} {key}")


def test_without_fisher_or_with_lam_zero_it_is_adamw():
    start, anchors, fishers, grads = _problem(torch.float64)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt = AdamWEWC(_groups(params), 0.0, {params[0]: anchors[0]}, {params[0]: fishers[0]}, lr=LR, betas=BETAS)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, foreach=False)
    for step_grads in grads:
        for p, r, g in zip(params, ref, step_grads, strict=True):
            p.grad, r.grad = (None, None) if g is None else (g.clone(), g.clone())
        with backend.forced("torch"):
            opt.step()
        ref_opt.step()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_state_dict_round_trip_resumes_identically(which):
    start, anchors, fishers, grads = _problem(torch.float32)
    straight, straight_opt = _ours(start, anchors, fishers, grads, which)
    first, first_opt = _ours(start, anchors, fishers, grads, which, steps=3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    with_fisher = [i for i, has in enumerate(HAS_FISHER) if has]
    opt = AdamWEWC(_groups(resumed), LAM, {resumed[i]: anchors[i] for i in with_fisher},
                   {resumed[i]: fishers[i] for i in with_fisher}, lr=0.123, betas=BETAS, eps=EPS)
    opt.load_state_dict(saved["optim"])
    assert opt.param_groups[0]["lr"] == LR  # the hyperparameters come back from the checkpoint
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        with backend.forced(which):
            opt.step()
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], straight_opt.state[q][key])


def test_loads_a_torch_adamw_checkpoint():
    """Same state keys as torch.optim.AdamW: a run checkpointed with AdamW resumes here."""
    start, _, _, grads = _problem(torch.float64)
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=BETAS, foreach=False)
    for step_grads in grads[:2]:
        for p, g in zip(ref, step_grads, strict=True):
            p.grad = None if g is None else g.clone()
        ref_opt.step()
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = AdamWEWC(_groups(params), 0.0)
    # A copy, as a checkpoint is: state_dict() hands out the live moment tensors themselves.
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for step_grads in grads[2:]:
        for p, r, g in zip(params, ref, step_grads, strict=True):
            p.grad, r.grad = (None, None) if g is None else (g.clone(), g.clone())
        with backend.forced("torch"):
            opt.step()
        ref_opt.step()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_penalty_is_the_explicit_formula():
    start, anchors, fishers, _ = _problem(torch.float32)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    with_fisher = [i for i, has in enumerate(HAS_FISHER) if has]
    opt = AdamWEWC(params, LAM, {params[i]: anchors[i] for i in with_fisher},
                   {params[i]: fishers[i] for i in with_fisher})
    want = sum(LAM / 2 * (fishers[i].double() * (start[i].double() - anchors[i].double()) ** 2).sum()
               for i in with_fisher)
    got = opt.penalty()
    assert got.dtype == torch.float32 and not got.requires_grad
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()


def test_functional_step_needs_both_anchors_and_fishers():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="both anchors and fishers"):
        adamw_ewc_step([p], [p], [p], [p], [torch.ones(())], lr=0.1, betas=BETAS, eps=EPS,
                       weight_decay=0.0, lam=1.0, anchors=[p])


def test_bad_anchors_and_fishers_are_named():
    a, b = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))
    stranger = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"anchor of param_groups\[0\]\['params'\]\[1\] \(5,\) is \(4,\)"):
        AdamWEWC([a, b], 1.0, {b: torch.zeros(4)}, {b: torch.zeros(5)})
    with pytest.raises(ValueError, match="not one of the optimizer's parameters"):
        AdamWEWC([a, b], 1.0, {stranger: torch.zeros(4, 3)}, {stranger: torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="same parameters as keys"):
        AdamWEWC([a, b], 1.0, {a: torch.zeros(4, 3)}, {b: torch.zeros(5)})
    with pytest.raises(ValueError, match="invalid hyperparameters"):
        AdamWEWC([a], 1.0, lr=-1.0)
