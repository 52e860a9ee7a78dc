"""Fused EWC step and LoRA-under-Fisher against autograd of the explicit penalties (float64)."""
import pytest
import torch

from kernels import backend
from kernels.ewc import consolidate, ewc_step, lora_ewc_step, lora_fisher_penalty, online_update

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (257,)]


def _ewc_problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    anchors = [(p.detach().float() + 0.3 * torch.randn(p.shape, generator=g)).to(dtype) for p in params]
    fishers = [torch.rand(p.shape, generator=g) for p in params]
    # Some parameters start with a gradient, others without (.grad is None).
    for p in params[::2]:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return params, anchors, fishers


def _autograd_reference(params, anchors, fishers, lam):
    """Explicit penalty in float64, differentiated by autograd; plus the existing grads."""
    leaves = [p.detach().double().requires_grad_(True) for p in params]
    penalty = sum((lam / 2) * (f.double() * (p - a.double()) ** 2).sum()
                  for p, a, f in zip(leaves, anchors, fishers, strict=True))
    grads = torch.autograd.grad(penalty, leaves)
    before = [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double() for p in params]
    return penalty.detach(), [b + g for b, g in zip(before, grads, strict=True)]


def _check_ewc(choice, dtype, grad_rtol, **kw):
    params, anchors, fishers = _ewc_problem(dtype)
    lam = 0.7
    want_penalty, want_grads = _autograd_reference(params, anchors, fishers, lam)
    before = [p.detach().clone() for p in params]
    with backend.forced(choice):
        penalty = ewc_step(params, anchors, fishers, lam, **kw)
    assert penalty.dtype == torch.float32 and not penalty.requires_grad
    # The penalty is accumulated in fp32 whatever the parameter dtype.
    assert abs(penalty.double() - want_penalty) <= 1e-5 * want_penalty
    for p, w, b in zip(params, want_grads, before, strict=True):
        assert p.grad.dtype == dtype
        # bf16 grads: one rounding of the updated value (2^-8 relative) is the whole error.
        torch.testing.assert_close(p.grad.double(), w, rtol=grad_rtol, atol=grad_rtol)
        assert torch.equal(p.detach(), b)  # parameters untouched


def test_ewc_step_torch_matches_autograd(monkeypatch):
    import kernels.ewc as ewc_mod

    monkeypatch.setattr(ewc_mod, "EWC_TORCH_CHUNK", 16)  # several chunks per tensor, ragged ends
    _check_ewc("torch", torch.float32, 1e-5)


def test_ewc_step_torch_bf16_params():
    _check_ewc("torch", torch.bfloat16, 8e-3)


@pytest.mark.interpret
def test_ewc_step_interpreter_matches_autograd():
    # block 8: tensors span several blocks and end in partial (masked) ones.
    _check_ewc("triton", torch.float32, 1e-5, block=8)


@pytest.mark.interpret
def test_ewc_step_interpreter_bf16_params():
    _check_ewc("triton", torch.bfloat16, 8e-3, block=16)


def test_ewc_step_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ewc_step([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(4)], 1.0)


def test_online_update_and_consolidate():
    F = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    new = {"a": torch.tensor([0.5, 0.0]), "b": torch.tensor([[1.0]])}
    online_update(F, new, gamma=0.5)
    assert F["a"].tolist() == [1.0, 1.0] and F["b"].tolist() == [[3.0]]
    params = [torch.nn.Parameter(torch.tensor([3.0, -1.0]))]
    anchors = [torch.zeros(2)]
    consolidate(params, anchors)
    assert anchors[0].tolist() == [3.0, -1.0]


# ------------------------------------------------------------------ LoRA under F_W


def _lora_problem(r, n_in, n_out, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=g).to(dtype).requires_grad_(True)
    B = torch.randn(n_out, r, generator=g).to(dtype).requires_grad_(True)
    F = torch.rand(n_out, n_in, generator=g)
    return A, B, F


def _lora_reference(A, B, F, scale, lam):
    """Materialises B A in float64."""
    A64 = A.detach().double().requires_grad_(True)
    B64 = B.detach().double().requires_grad_(True)
    D = scale * B64 @ A64
    penalty = lam / 2 * (F.double() * D * D).sum()
    dA, dB = torch.autograd.grad(penalty, (A64, B64))
    return penalty.detach(), dA, dB


LORA_SHAPES = [(4, 13, 9), (1, 5, 7), (3, 20, 33), (8, 1, 2)]


def _check_lora_penalty(choice, r, n_in, n_out, rtol=1e-5, **kw):
    A, B, F = _lora_problem(r, n_in, n_out)
    scale, lam = 1.7, 0.3
    want_p, want_dA, want_dB = _lora_reference(A, B, F, scale, lam)
    with backend.forced(choice):
        penalty = lora_fisher_penalty(A, B, F, scale, lam, **kw)
    (2.0 * penalty).backward()
    torch.testing.assert_close(penalty.double(), want_p, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(A.grad.double(), 2 * want_dA, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(B.grad.double(), 2 * want_dB, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("r,n_in,n_out", LORA_SHAPES)
def test_lora_fisher_penalty_torch_matches_materialised(r, n_in, n_out):
    _check_lora_penalty("torch", r, n_in, n_out)


def test_lora_fisher_penalty_torch_row_chunks(monkeypatch):
    import kernels.ewc as ewc_mod

    monkeypatch.setattr(ewc_mod, "TORCH_CHUNK_BYTES", 4 * 20 * 3)  # 3 rows of B per chunk
    _check_lora_penalty("torch", 3, 20, 11)


@pytest.mark.interpret
@pytest.mark.parametrize("r,n_in,n_out", LORA_SHAPES)
def test_lora_fisher_penalty_interpreter_matches_materialised(r, n_in, n_out):
    _check_lora_penalty("triton", r, n_in, n_out, block_o=8, block_i=8)


@pytest.mark.parametrize("choice", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_lora_ewc_step_adds_into_grads(choice):
    terms, refs = [], []
    for seed, (r, n_in, n_out) in enumerate([(2, 6, 5), (3, 4, 9)]):
        A, B, F = _lora_problem(r, n_in, n_out, seed=seed)
        F = F.t().contiguous().t() if seed else F  # one strided Fisher (e.g. a Conv1D view)
        A.grad = torch.ones_like(A)
        scale = 0.5 + seed
        terms.append((A, B, F, scale))
        refs.append(_lora_reference(A, B, F, scale, 0.9))
    with backend.forced(choice):
        penalty = lora_ewc_step(terms, 0.9)
    torch.testing.assert_close(penalty.double(), sum(r[0] for r in refs), rtol=1e-5, atol=1e-6)
    for (A, B, _, _), (_, dA, dB) in zip(terms, refs, strict=True):
        torch.testing.assert_close(A.grad.double(), dA + 1.0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(B.grad.double(), dB, rtol=1e-5, atol=1e-5)
