"""kernels.linear_cross_entropy against float64 references built from the full logits
(``F.cross_entropy`` / explicit log-softmax formulas, differentiated by autograd).

Tolerances.  In float64 both sides compute the same sums in another order: ``1e-10``
relative is far above that (n·2⁻⁵³) and far below any wrong term.  In fp32 and under bf16
autocast each element is checked against a first-order error bound computed from float64
values (``_bounds``), with u the unit roundoff of the compute dtype (2⁻²⁴ fp32, 2⁻⁸ bf16):

* a logit ``z = h·W_v + b_v`` is off by at most ``e_n = (3u + (D+2)·2⁻²⁴) · B_n`` where
  ``B_n = max_v Σ_d |h_nd W_vd| + |b_v|`` (bf16: h, W and the GEMM output each rounded once;
  fp32 accumulation of D terms); for fp32 ``u`` is 2⁻²⁴ and the 3u is absorbed;
* so ``log p = z - lse`` is off by ``2 e_n``, p by ``p · (2 e_n + 4·2⁻²⁴)``, and the loss of a
  token by ``2 e_n`` plus a few roundings of ``|lse|``;
* ``dh = G W`` with ``G = p - onehot``: ``(c_n P + k |G|) @ |W|`` with ``c_n = 2 e_n + 4·2⁻²⁴``
  and ``k = 3u + V·2⁻²⁴`` (G, W and the output rounded; V-term fp32 accumulation);
  ``dW = Gᵀ h`` likewise with ``|h|`` and ``N·2⁻²⁴``.
The asserted limit is twice the bound (second-order terms).  A missing bias, a wrong
ignored-token mask, or a chunk counted twice is off by orders of magnitude more.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import kernels.linear_cross_entropy as lce_mod
from kernels import backend
from kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_kl_divergence,
    linear_kl_from_topk,
    topk_log_probs,
)

N, D, V = 37, 48, 1000  # odd shapes: V is not a multiple of any tile
EPS32 = 2.0**-24
U = {torch.float32: EPS32, torch.bfloat16: 2.0**-8}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def _small_tiles(split: int = 3):
    """Small tiles so 37 x 48 x 1000 spans several programs, ragged edges and vocab splits."""
    from kernels import linear_cross_entropy_triton as lce_triton

    return lce_triton.use_blocks(lce_triton.LCEBlocks(block_n=16, block_v=128, block_d=32, num_warps=4,
                                                      num_stages=1, split=split))


def _running(which: str):
    if which == "torch":
        return backend.forced("torch")
    stack = contextlib.ExitStack()
    stack.enter_context(backend.forced("triton"))
    stack.enter_context(_small_tiles())
    return stack


def _problem(dtype=torch.float32, seed=0, with_bias=True, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    if ignored:
        labels[::5] = -100
        labels[7] = -100
    return h, w, b, labels


def _reference(h, w, b, labels, reduction):
    """float64 loss and gradients from the full logits and F.cross_entropy."""
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    z = hd @ wd.t() + (0 if bd is None else bd)
    loss = F.cross_entropy(z, labels, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), {"h": hd.grad, "w": wd.grad, "b": None if bd is None else bd.grad}, z.detach()


def _bounds(h, w, b, labels, z, reduction, u):
    """First-order error bounds (see the module docstring), from float64 values."""
    hd, wd = h.detach().double().abs(), w.detach().double().abs()
    babs = 0 if b is None else b.detach().double().abs()
    B = (hd @ wd.t() + babs).amax(1)
    e = (3 * u + (D + 2) * EPS32) * B
    c = 2 * e + 4 * EPS32
    valid = labels != -100
    p = torch.softmax(z, 1)
    g = p.clone()
    g[valid, labels[valid]] -= 1
    p, g = p * valid[:, None], g * valid[:, None]
    count = valid.sum().double() if reduction == "mean" else 1.0
    lse = torch.logsumexp(z, 1)
    target = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    per_token = torch.where(valid, 2 * e + 8 * EPS32 * (lse.abs() + target.abs()), 0.0)
    loss_terms = torch.where(valid, (lse - target).abs(), 0.0)
    loss_bound = (per_token.sum() + N * EPS32 * loss_terms.sum()) / count
    dh = ((c[:, None] * p + (3 * u + V * EPS32) * g.abs()) @ wd) / count
    dw = ((c[:, None] * p + (3 * u + N * EPS32) * g.abs()).t() @ hd) / count
    db = (c[:, None] * p + (3 * u + N * EPS32) * g.abs()).sum(0) / count
    return loss_bound, {"h": dh, "w": dw, "b": db}


def _assert_within(name, got, want, bound):
    err = (got.detach().double() - want).abs()
    worst = (err / (2 * bound + 1e-300)).max().item()
    assert worst <= 1.0, f"{name}: off by {worst:.2f}x twice the bound (max err {err.max().item():.3e})"


def _run_ce(which, h, w, b, labels, reduction, autocast=False, **kw):
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    with _running(which), (torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()):
        loss = linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, **kw)
    loss.backward()
    return loss


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("which", BACKENDS)
def test_fp32_matches_full_logits_float64(which, with_bias, reduction):
    h, w, b, labels = _problem(with_bias=with_bias)
    # 7 rows per chunk on the torch path: 37 tokens = five full chunks and a ragged one.
    loss = _run_ce(which, h, w, b, labels, reduction, chunk_bytes=7 * V * 4)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    want, grads, z = _reference(h, w, b, labels, reduction)
    loss_bound, bounds = _bounds(h, w, b, labels, z, reduction, EPS32)
    assert abs(loss.item() - want.item()) <= 2 * loss_bound.item()
    for key, t in (("h", h), ("w", w), ("b", b)):
        if t is not None:
            _assert_within(key, t.grad, grads[key], bounds[key])
    ignored = labels == -100
    assert torch.all(h.grad[ignored] == 0), "ignored tokens get no gradient"


@pytest.mark.parametrize("rows", [1, 7, 36, 37, 1000])
def test_torch_path_float64_any_chunking(rows):
    h, w, b, labels = _problem(torch.float64)
    loss = _run_ce("torch", h, w, b, labels, "sum", chunk_bytes=rows * V * 8)
    want, grads, _ = _reference(h, w, b, labels, "sum")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=0)
    for key, t in (("h", h), ("w", w), ("b", b)):
        torch.testing.assert_close(t.grad, grads[key], rtol=1e-10, atol=1e-12 * grads[key].abs().max().item())


@pytest.mark.parametrize("which", BACKENDS)
def test_bf16_autocast_matches_float64_within_bf16_bound(which):
    """fp32 master weights, fp32 hidden states, CPU bf16 autocast: bf16 GEMMs, fp32 softmax and
    accumulation; checked against the bf16 bound (u = 2⁻⁸)."""
    h, w, b, labels = _problem()
    loss = _run_ce(which, h, w, b, labels, "sum", autocast=True, chunk_bytes=7 * V * 8)
    assert loss.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    want, grads, z = _reference(h, w, b, labels, "sum")
    loss_bound, bounds = _bounds(h, w, b, labels, z, "sum", U[torch.bfloat16])
    assert abs(loss.item() - want.item()) <= 2 * loss_bound.item()
    for key, t in (("h", h), ("w", w), ("b", b)):
        _assert_within(key, t.grad, grads[key], bounds[key])
    # And it really ran in bf16: its loss error is far above what fp32 would leave.
    fp32_bound, _ = _bounds(h, w, b, labels, z, "sum", EPS32)
    assert abs(loss.item() - want.item()) > 2 * fp32_bound.item()


@pytest.mark.parametrize("which", BACKENDS)
def test_tied_embedding_gets_both_gradients(which):
    """The head is the embedding matrix, also used to make the hidden states: its gradient is
    the sum of both uses (autograd adds the head's to the embedding's)."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(V, D)
    mix = torch.randn(D, D, generator=gen) / D**0.5
    with torch.no_grad():
        emb.weight.copy_(0.3 * torch.randn(V, D, generator=gen))
    ids = torch.randint(0, V, (N,), generator=gen)
    labels = torch.roll(ids, -1)
    labels[-1] = -100
    with _running(which):
        hidden = torch.tanh(emb(ids) @ mix)
        linear_cross_entropy(hidden, emb.weight, labels).backward()
    weight = emb.weight.detach().double().requires_grad_()
    ref_hidden = torch.tanh(F.embedding(ids, weight) @ mix.double())
    F.cross_entropy(ref_hidden @ weight.t(), labels, ignore_index=-100, reduction="sum").backward()
    # fp32 sums of at most V terms through a few ops: V·2⁻²⁴ of the largest gradient, 4x margin.
    torch.testing.assert_close(emb.weight.grad.double(), weight.grad, rtol=0,
                               atol=4 * V * EPS32 * weight.grad.abs().max().item())
    rows_used = torch.zeros(V, dtype=torch.bool)
    rows_used[ids] = True
    assert emb.weight.grad[~rows_used].abs().sum() > 0, "rows never embedded still get the head's gradient"


def test_shapes_frozen_head_and_no_grad():
    h, w, b, labels = _problem(torch.float64)
    h3, labels3 = h.detach().view(1, N, D).requires_grad_(), labels.view(1, N)
    w.requires_grad_(False)
    with backend.forced("torch"):
        loss = linear_cross_entropy(h3, w, labels3, bias=b.detach(), reduction="mean")
        loss.backward()
        with torch.no_grad():
            again = linear_cross_entropy(h3, w, labels3, bias=b.detach(), reduction="mean")
    want, grads, _ = _reference(h, w, b, labels, "mean")
    assert w.grad is None and h3.grad.shape == (1, N, D)
    torch.testing.assert_close(h3.grad.view(N, D), grads["h"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(again, want, rtol=1e-10, atol=0)


def test_all_ignored_sum_is_zero_and_mean_is_nan():
    h, w, b, labels = _problem()
    labels[:] = -100
    with backend.forced("torch"):
        loss = linear_cross_entropy(h, w, labels, bias=b)
        loss.backward()
        mean = linear_cross_entropy(h, w, labels, bias=b, reduction="mean")
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    assert torch.isnan(mean)


def test_memory_is_one_chunk_of_logits(monkeypatch):
    """The torch path never holds more than one chunk of logits: every [rows, V] block it makes
    has at most the rows the budget allows (fp32: budget / (4 V); the KL's two heads and one
    temporary: budget / (12 V)), and it makes them only for the tokens that count."""
    shapes = []
    real = lce_mod._logits

    def spy(h, *args):
        shapes.append(tuple(h.shape))
        return real(h, *args)

    monkeypatch.setattr(lce_mod, "_logits", spy)
    h, w, b, labels = _problem()
    with backend.forced("torch"):
        linear_cross_entropy(h, w, labels, bias=b, chunk_bytes=10 * V * 4).backward()
        # Ignored tokens never reach the head: only the counted rows are multiplied.
        assert max(s[0] for s in shapes) == 10 and sum(s[0] for s in shapes) == int((labels != -100).sum())
        shapes.clear()
        hs = h.detach().requires_grad_()
        mask = torch.arange(N) % 4 != 0
        linear_kl_divergence(hs, w, h.detach() + 0.1, w.detach(), mask, chunk_bytes=10 * V * 12).backward()
        assert max(s[0] for s in shapes) == 10 and sum(s[0] for s in shapes) == 2 * int(mask.sum())


def test_bad_input_is_named():
    h, w, b, labels = _problem()
    labels[4] = V
    with pytest.raises(ValueError, match=rf"label {V} at position 4 is outside \[0, {V}\)"):
        linear_cross_entropy(h, w, labels)
    with pytest.raises(ValueError, match="must be \\[vocab, hidden=48\\]"):
        linear_cross_entropy(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="one entry per row"):
        linear_cross_entropy(h, w, labels[:5])
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(h, w, labels.clamp(max=V - 1), reduction="none")


# --------------------------------------------------------------------------- KL


def _kl_problem(seed=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen, dtype=torch.float64)).to(dtype)  # noqa: E731
    hs, ws, bs = mk(N, D), mk(V, D, scale=0.3), mk(V)
    ht, wt, bt = mk(N, 40), mk(V, 40, scale=0.3), mk(V)  # the teacher may be wider or narrower
    mask = torch.rand(N, generator=gen) > 0.3
    return hs, ws, bs, ht, wt, bt, mask


def _kl_reference(hs, ws, bs, ht, wt, bt, mask, kind):
    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    log_ps = torch.log_softmax(leaves[0] @ leaves[1].t() + leaves[2], 1)
    log_pt = torch.log_softmax(ht.double() @ wt.double().t() + bt.double(), 1)
    if kind == "forward":
        rows = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    else:
        rows = (log_ps.exp() * (log_ps - log_pt)).sum(1)
    loss = (rows * mask).sum()
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_kl_matches_full_logits(kind, dtype, rtol):
    """float64: to rounding.  fp32: logits of |z| < 10 from 48-term dot products are off by
    < 50·2⁻²⁴·10 ≈ 3e-5, log-probs and their differences by twice that: 1e-4 of the largest
    value covers it."""
    hs, ws, bs, ht, wt, bt, mask = _kl_problem(dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
    with backend.forced("torch"):
        loss = linear_kl_divergence(leaves[0], leaves[1], ht, wt, mask, kind=kind, bias_student=leaves[2],
                                    bias_teacher=bt, chunk_bytes=7 * V * 40)
    loss.backward()
    want, grads = _kl_reference(hs, ws, bs, ht, wt, bt, mask, kind)
    assert loss.item() > 0
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=0)
    for got, ref in zip(leaves, grads, strict=True):
        torch.testing.assert_close(got.grad.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    assert torch.all(leaves[0].grad[~mask] == 0)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kl_is_zero_when_student_is_teacher(kind):
    hs, ws, bs, *_ = _kl_problem(dtype=torch.float32)
    h = hs.clone().requires_grad_()
    with backend.forced("torch"):
        loss = linear_kl_divergence(h, ws, hs, ws, kind=kind, bias_student=bs, bias_teacher=bs)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kl_gradcheck_tiny_head(kind):
    gen = torch.Generator().manual_seed(9)
    hs, ws, bs = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((5, 4), (7, 4), (7,)))
    ht, wt = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True])

    def kl(h, w, b):
        return linear_kl_divergence(h, w, ht, wt, mask, kind=kind, bias_student=b, chunk_bytes=2 * 7 * 24)

    with backend.forced("torch"):
        assert torch.autograd.gradcheck(kl, (hs, ws, bs))
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear_cross_entropy(h, w, torch.tensor([1, -100, 6, 0, 3]), bias=b, reduction="mean"),
            (hs, ws, bs))


# --------------------------------------------------------------------------- stored top-k


def _topk_formula(hs, ws, bs, ids, lp_t, mask):
    """KL_k from the docstring, on float64 full logits (autograd for the gradient)."""
    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    log_ps = torch.log_softmax(leaves[0] @ leaves[1].t() + leaves[2], 1)
    p_t = lp_t.double().exp()
    head = (p_t * (lp_t.double() - log_ps.gather(1, ids))).sum(1)
    outside = torch.ones_like(log_ps, dtype=torch.bool).scatter(1, ids, False)
    # No token outside S (k = V): no tail, whatever the stored probabilities sum to.
    tail_t = torch.where(outside.any(1), (1 - p_t.sum(1)).clamp(min=0), 0.0)
    has_tail = tail_t > 0
    tail_s = torch.where(has_tail, (log_ps.exp() * outside).sum(1), 1.0)  # 1: no log(0) in the graph
    tail = torch.where(has_tail, tail_t * (torch.where(has_tail, tail_t, 1.0).log() - tail_s.log()), 0.0)
    loss = ((head + tail) * mask).sum()
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("k", [1, 16, V])
def test_topk_kl_matches_its_formula(k):
    hs, ws, bs, ht, wt, bt, mask = _kl_problem(seed=11)
    with backend.forced("torch"):
        ids, lp = topk_log_probs(ht, wt, k, bias=bt, chunk_bytes=5 * V * 16)
    full_t = torch.log_softmax(ht @ wt.t() + bt, 1)
    want_lp, want_ids = full_t.topk(k, dim=1)
    assert ids.shape == (N, k) and lp.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-6)  # stored as fp32
    leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
    with backend.forced("torch"):
        loss = linear_kl_from_topk(leaves[0], leaves[1], ids, lp, mask, bias_student=leaves[2],
                                   chunk_bytes=7 * V * 24)
    loss.backward()
    want, grads = _topk_formula(hs, ws, bs, ids, lp, mask)
    torch.testing.assert_close(loss.double(), want, rtol=1e-10, atol=1e-12)
    for got, ref in zip(leaves, grads, strict=True):
        torch.testing.assert_close(got.grad, ref, rtol=1e-9, atol=1e-10 * ref.abs().max().item())
    full, _ = _kl_reference(hs, ws, bs, ht, wt, bt, mask, "forward")
    assert loss.item() <= full.item() * (1 + 1e-9)  # the coarsened KL never exceeds the full one
    if k == V:
        torch.testing.assert_close(loss.double(), full, rtol=1e-6, atol=0)  # fp32 storage of log p_t


def test_topk_kl_gradcheck_tiny_head():
    gen = torch.Generator().manual_seed(13)
    hs, ws, bs = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((4, 3), (9, 3), (9,)))
    ids = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(4)])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1]] * 4, dtype=torch.float64))
    with backend.forced("torch"):
        assert torch.autograd.gradcheck(lambda h, w, b: linear_kl_from_topk(h, w, ids, lp, bias_student=b), (hs, ws, bs))
