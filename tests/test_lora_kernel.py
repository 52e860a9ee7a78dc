"""kernels.lora: the torch path and the Triton kernels (interpreter on CPU, compiled on CUDA)
against an independent float64 reference written with plain torch ops and autograd.

Tolerances.  Every output element is a sum of products; its float64 value is exact for our
purposes.  The classic forward-error bound says rounding a result (or an operand) at unit
roundoff ``u`` moves it by at most ``u`` times the magnitude of what is rounded, and a sum of
n terms accumulated in fp32 is off by at most ``n·2⁻²⁴·Σ|terms|``.  So each element is checked
against ``eps · bound``, where ``bound`` is the same reference evaluated on the absolute values
of every input (``Σ|terms|``, elementwise), and

* fp32: ``eps = 4·n·2⁻²⁴`` with n the longest reduction in the test (fp32 accumulation only);
* bf16 / fp16: ``eps = 6·u`` with u = 2⁻⁸ / 2⁻¹¹: along any path an element sees at most
  five roundings to the storage dtype (A or B cast down, ``u`` or ``dy B`` stored, the GEMM
  output, a rescale, the final add), while fp32 accumulation (n·2⁻²⁴) is negligible next to u.

A kernel that drops a term, uses another mask in backward than in forward, or accumulates in
bf16 misses these bounds by orders of magnitude.
"""
from __future__ import annotations

import pytest
import torch

from kernels import backend
from kernels.lora import lora_dropout_mask, lora_linear

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# "triton" runs the interpreter on CPU and the compiled kernels on CUDA.
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.interpret),
]


def _small_blocks():
    """Small tiles so the odd test shapes span several programs and masked edges."""
    from kernels import lora_triton

    return lora_triton.use_blocks(lora_triton.LoRABlocks(block_m=16, block_n=32, block_k=32, block_r=16))


def _run(which, fn):
    if which == "torch":
        with backend.forced("torch"):
            return fn()
    with backend.forced("triton"), _small_blocks():
        return fn()


def _reference(x, weight, bias, A, B, scale, keep, dropout_p, dy):
    """float64 y and gradients from plain torch ops; ``keep`` is the mask as float64 (or None)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, A, B)]
    xr, wr, ar, br = leaves
    br_bias = None if bias is None else bias.detach().double().requires_grad_()
    dropped = xr if keep is None else xr * keep / (1.0 - dropout_p)
    y = xr @ wr.t() + scale * (dropped @ ar.t()) @ br.t()
    if br_bias is not None:
        y = y + br_bias
    y.backward(dy.double())
    grads = {"x": xr.grad, "weight": wr.grad, "A": ar.grad, "B": br.grad}
    if br_bias is not None:
        grads["bias"] = br_bias.grad
    return y.detach(), grads


def _check(name, actual, x, weight, bias, A, B, scale, keep, dropout_p, dy, eps):
    exact_y, exact_g = _reference(x, weight, bias, A, B, scale, keep, dropout_p, dy)
    abs_ = lambda t: None if t is None else t.detach().abs()
    bound_y, bound_g = _reference(
        abs_(x), abs_(weight), abs_(bias), abs_(A), abs_(B), scale, keep, dropout_p, abs_(dy)
    )
    tiny = 1e-30
    for key, got in actual.items():
        exact = exact_y if key == "y" else exact_g[key]
        bound = bound_y if key == "y" else bound_g[key]
        err = (got.double() - exact).abs()
        limit = eps * bound + tiny
        worst = (err / limit).max().item()
        assert worst <= 1.0, (
            f"{name}: {key} off by {worst:.2f}x the bound (max err {err.max().item():.3e}, "
            f"eps {eps:.2e})"
        )


def _make(shape_x, out_f, r, dtype, lora_dtype, with_bias, grad_base, seed=0):
    gen = torch.Generator().manual_seed(seed)
    in_f = shape_x[-1]
    mk = lambda *s, dt=dtype: (torch.randn(*s, generator=gen) / 2).to(device=DEVICE, dtype=dt)
    x = mk(*shape_x).requires_grad_()
    weight = mk(out_f, in_f).requires_grad_(grad_base)
    bias = mk(out_f).requires_grad_(grad_base) if with_bias else None
    A = mk(r, in_f, dt=lora_dtype).requires_grad_()
    B = mk(out_f, r, dt=lora_dtype).requires_grad_()  # nonzero B: PEFT's zero init would hide bugs
    dy = mk(*shape_x[:-1], out_f)
    return x, weight, bias, A, B, dy


def _eps(dtype, n):
    if dtype == torch.float32:
        return 4 * n * 2.0**-24
    return 6 * UNIT_ROUNDOFF[dtype]


_FULL = [(True, 0.0), (True, 0.3), (False, 0.0), (False, 0.3)]
_SOME = [(True, 0.3), (False, 0.0)]  # keeps the interpreter budget down on the variants
CASES = [
    pytest.param(lead, in_f, out_f, r, dtype, lora_dtype, with_bias, p, id=f"{name}-{'bias' if with_bias else 'nobias'}-p{p}")
    for name, lead, in_f, out_f, r, dtype, lora_dtype, combos in [
        # (id, leading shape, in, out, r, x dtype, A/B dtype, bias/dropout combinations)
        ("2d-fp32", (37,), 96, 80, 5, torch.float32, torch.float32, _FULL),
        ("2d-bf16", (37,), 96, 80, 5, torch.bfloat16, torch.bfloat16, _FULL),
        ("3d-fp32", (2, 19), 96, 80, 5, torch.float32, torch.float32, _SOME),
        ("3d-bf16-x-fp32-lora", (3, 7), 40, 24, 3, torch.bfloat16, torch.float32, _SOME),
        ("2d-fp16", (37,), 96, 80, 5, torch.float16, torch.float16, _SOME),
    ]
    for with_bias, p in combos
]


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("lead, in_f, out_f, r, dtype, lora_dtype, with_bias, dropout_p", CASES)
def test_forward_and_gradients_match_float64(which, lead, in_f, out_f, r, dtype, lora_dtype, with_bias, dropout_p):
    x, weight, bias, A, B, dy = _make((*lead, in_f), out_f, r, dtype, lora_dtype, with_bias, grad_base=False)
    scale, seed = 1.75, 1234

    def go():
        y = lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, seed=seed)
        y.backward(dy)
        keep = None
        if dropout_p > 0:
            m = lead[0] if len(lead) == 1 else lead[0] * lead[1]
            keep = lora_dropout_mask(m, in_f, dropout_p, seed, DEVICE).view(*lead, in_f).double()
        return y, keep

    y, keep = _run(which, go)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert x.grad.dtype == dtype and A.grad.dtype == lora_dtype and B.grad.dtype == lora_dtype
    assert weight.grad is None
    n = max(in_f, out_f, x.numel() // in_f)
    actual = {"y": y, "x": x.grad, "A": A.grad, "B": B.grad}
    _check(f"{which}", actual, x, weight, bias, A, B, scale, keep, dropout_p, dy, _eps(dtype, n))


@pytest.mark.parametrize("which", BACKENDS)
def test_base_weight_and_bias_gradients_on_strided_weight(which):
    """weight/bias grads when they require grad; weight as a GPT-2 Conv1D-style transposed view."""
    x, _, bias, A, B, dy = _make((2, 11, 48), 40, 4, torch.float32, torch.float32, True, grad_base=True)
    conv1d_weight = (torch.randn(48, 40, generator=torch.Generator().manual_seed(3)) / 2).to(DEVICE)
    conv1d_weight.requires_grad_()
    weight = conv1d_weight.t()  # [out, in], non-contiguous
    y = _run(which, lambda: lora_linear(x, weight, bias, A, B, 0.5, dropout_p=0.2, seed=7))
    _run(which, lambda: y.backward(dy))
    keep = _run(which, lambda: lora_dropout_mask(22, 48, 0.2, 7, DEVICE)).view(2, 11, 48).double()
    actual = {"y": y, "x": x.grad, "A": A.grad, "B": B.grad, "weight": conv1d_weight.grad.t(), "bias": bias.grad}
    _check(which, actual, x, weight, bias, A, B, 0.5, keep, 0.2, dy, _eps(torch.float32, 48))


@pytest.mark.parametrize("which", BACKENDS)
def test_dropout_mask_fraction_and_seeding(which):
    p = 0.3
    keep = _run(which, lambda: lora_dropout_mask(96, 1000, p, 11, DEVICE))
    assert keep.shape == (96, 1000) and keep.dtype == torch.bool
    # 96 000 Bernoulli draws: the dropped fraction's std is sqrt(p(1-p)/n) ≈ 0.0015; allow ~6 std.
    assert abs((~keep).float().mean().item() - p) < 0.01
    # Rows and columns must not share one pattern (a mask keyed on the column only would).
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    again = _run(which, lambda: lora_dropout_mask(96, 1000, p, 11, DEVICE))
    other = _run(which, lambda: lora_dropout_mask(96, 1000, p, 12, DEVICE))
    assert torch.equal(keep, again) and not torch.equal(keep, other)


def test_seed_none_follows_torch_manual_seed():
    x, weight, bias, A, B, _ = _make((5, 16), 8, 2, torch.float32, torch.float32, True, grad_base=False)
    with backend.forced("torch"):
        torch.manual_seed(0)
        y1 = lora_linear(x, weight, bias, A, B, 1.0, dropout_p=0.5)
        torch.manual_seed(0)
        y2 = lora_linear(x, weight, bias, A, B, 1.0, dropout_p=0.5)
        y3 = lora_linear(x, weight, bias, A, B, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_shape_errors_are_clear():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 7), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0, dropout_p=1.0)


@pytest.mark.interpret
def test_triton_u_in_k_loop_variant_matches_float64():
    """The alternative forward (u accumulated in the base GEMM's K loop) stays correct."""
    from kernels import lora_triton

    x, weight, bias, A, B, dy = _make((37, 96), 80, 5, torch.bfloat16, torch.float32, True, grad_base=False)
    blocks = lora_triton.LoRABlocks(block_m=16, block_n=32, block_k=32, u_in_k_loop=True)
    with backend.forced("triton"), lora_triton.use_blocks(blocks):
        y = lora_linear(x, weight, bias, A, B, 0.8, dropout_p=0.25, seed=99)
        y.backward(dy)
        keep = lora_dropout_mask(37, 96, 0.25, 99, DEVICE).double()
    actual = {"y": y, "x": x.grad, "A": A.grad, "B": B.grad}
    _check("u_in_k_loop", actual, x, weight, bias, A, B, 0.8, keep, 0.25, dy, _eps(torch.bfloat16, 96))


@pytest.mark.parametrize("which", BACKENDS)
def test_frozen_input_skips_dx(which):
    """x without grad (e.g. the first LoRA layer after frozen embeddings): dA, dB still exact."""
    x, weight, bias, A, B, dy = _make((21, 40), 24, 3, torch.float32, torch.float32, False, grad_base=False)
    x.requires_grad_(False)
    y = _run(which, lambda: lora_linear(x, weight, bias, A, B, 2.0))
    _run(which, lambda: y.backward(dy))
    actual = {"y": y, "A": A.grad, "B": B.grad}
    _check(which, actual, x, weight, bias, A, B, 2.0, None, 0.0, dy, _eps(torch.float32, 40))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, lora_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32)], ids=["bf16-fp32lora", "bf16", "fp32"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_gpu_production_tiles_match_float64(dtype, lora_dtype, dropout_p):
    """Compiled kernels with their production tile sizes (no override), shapes off the tile grid."""
    lead, in_f, out_f, r = (3, 347), 520, 776, 16
    x, weight, bias, A, B, dy = _make((*lead, in_f), out_f, r, dtype, lora_dtype, True, grad_base=False)
    with backend.forced("triton"):
        y = lora_linear(x, weight, bias, A, B, 2.0, dropout_p=dropout_p, seed=5)
        y.backward(dy)
        keep = lora_dropout_mask(3 * 347, in_f, dropout_p, 5, DEVICE).view(*lead, in_f).double() if dropout_p else None
    actual = {"y": y, "x": x.grad, "A": A.grad, "B": B.grad}
    _check("gpu", actual, x, weight, bias, A, B, 2.0, keep, dropout_p, dy, _eps(dtype, 3 * 347))


@pytest.mark.gpu
def test_gpu_triton_and_torch_paths_agree_without_dropout():
    """Second oracle: the compiled kernels against the torch path on CUDA (cuBLAS), bf16."""
    x, weight, bias, A, B, dy = _make((2, 200, 256), 384, 16, torch.bfloat16, torch.bfloat16, True, False)
    outs = {}
    for which in ("triton", "torch"):
        xi, Ai, Bi = (t.detach().clone().requires_grad_() for t in (x, A, B))
        with backend.forced(which):
            y = lora_linear(xi, weight, bias, Ai, Bi, 2.0)
            y.backward(dy)
        outs[which] = [y, xi.grad, Ai.grad, Bi.grad]
    abs_ = lambda t: None if t is None else t.detach().abs()
    bound_y, bound_g = _reference(abs_(x), weight.abs(), bias.abs(), abs_(A), abs_(B), 2.0, None, 0.0, dy.abs())
    bounds = [bound_y, bound_g["x"], bound_g["A"], bound_g["B"]]
    # Each path is within eps·bound of the exact value, so they are within 2·eps·bound of each other.
    eps = _eps(torch.bfloat16, 400)
    for name, got, ref, bound in zip(("y", "x", "A", "B"), outs["triton"], outs["torch"], bounds, strict=True):
        worst = ((got.double() - ref.double()).abs() / (2 * eps * bound + 1e-30)).max().item()
        assert worst <= 1.0, f"{name}: triton and torch paths differ by {worst:.2f}x the bound"
