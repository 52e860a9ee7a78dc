"""The kernels' torch paths under CPU bf16 autocast (fp32 master weights, fp32 LoRA factors,
bf16 compute), against float64 references.

Tolerance of the LoRA op.  bf16 keeps 8 significant bits, so one rounding moves a value by at
most ``u = 2⁻⁸`` of itself.  Every element of y, dx, dA, dB is a sum of products; checked
elementwise against ``eps · bound``, where ``bound`` is the float64 reference evaluated on the
absolute values of every input (the sum of |terms|, so cancellation cannot hide an error).
Along any path an element sees at most five roundings of size u: the autocast cast of x, the
cast of W or A or B, the stored intermediate (``u = x Aᵀ`` or ``v = dy B``), the GEMM output,
and the in-place add or rescale that finishes it; fp32 accumulation adds ``n·2⁻²⁴`` (n < 100
here: under 0.01 u).  So ``eps = 6u``: five roundings plus one u for second-order terms.
A path that runs in fp32 passes easily; one that drops a term or rescales twice misses by
orders of magnitude.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY_VOCAB_SIZE, tiny_gpt2, tiny_llama

from kernels import backend
from kernels.ewc import ewc_step, lora_fisher_penalty
from kernels.fisher import linear_grad_and_fisher
from kernels.lora import lora_dropout_mask, lora_linear
from kernels.lora_layers import apply_lora, lora_modules

U_BF16 = 2.0**-8
EPS_BF16 = 6 * U_BF16


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------- detection


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_tile amx_bf16 amx_int8\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", False),  # Arm: not counted
    ("", False),
])
def test_cpu_has_native_bf16_reads_the_flags(monkeypatch, tmp_path, text, expected):
    fake = tmp_path / "cpuinfo"
    fake.write_text(text)
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    backend.cpu_has_native_bf16.cache_clear()
    try:
        assert backend.cpu_has_native_bf16() is expected
    finally:
        backend.cpu_has_native_bf16.cache_clear()


def test_cpu_has_native_bf16_is_false_without_cpuinfo(monkeypatch):
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", no_file)
    backend.cpu_has_native_bf16.cache_clear()
    try:
        assert backend.cpu_has_native_bf16() is False
    finally:
        backend.cpu_has_native_bf16.cache_clear()


def test_compute_dtype_follows_autocast():
    x = torch.ones(2)
    assert backend.compute_dtype(x) == torch.float32
    with _autocast():
        assert backend.compute_dtype(x) == torch.bfloat16
        assert backend.compute_dtype(torch.ones(2, dtype=torch.int64)) == torch.int64
        with backend.autocast_off(x):
            assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------- the LoRA op


def _reference(x, weight, bias, A, B, scale, keep, dropout_p, dy):
    """float64 y and gradients of x, A, B from plain torch ops; ``keep`` as float64 or None."""
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, A, B))
    wr = weight.detach().double()
    dropped = xr if keep is None else xr * keep / (1.0 - dropout_p)
    y = xr @ wr.t() + scale * (dropped @ ar.t()) @ br.t()
    if bias is not None:
        y = y + bias.detach().double()
    y.backward(dy.double())
    return {"y": y.detach(), "x": xr.grad, "A": ar.grad, "B": br.grad}


OP_CASES = [
    pytest.param("torch", x_dtype, with_bias, p, id=f"torch-{str(x_dtype)[6:]}-{'bias' if with_bias else 'nobias'}-p{p}")
    for x_dtype in (torch.float32, torch.bfloat16) for with_bias in (True, False) for p in (0.0, 0.25)
] + [
    # The Triton launchers under autocast (the interpreter here, compiled on CUDA): W and b are
    # cast to the compute dtype before launch, as the compiled configs expect.
    pytest.param("triton", torch.float32, True, 0.0, id="triton-float32-bias-p0.0", marks=pytest.mark.interpret),
]


@pytest.mark.parametrize("which, x_dtype, with_bias, dropout_p", OP_CASES)
def test_lora_op_under_cpu_autocast_matches_float64(which, x_dtype, with_bias, dropout_p):
    gen = torch.Generator().manual_seed(0)
    lead, in_f, out_f, r, scale, seed = (3, 13), 40, 56, 5, 1.75, 77
    mk = lambda *s: torch.randn(*s, generator=gen) / 2  # noqa: E731
    x = mk(*lead, in_f).to(x_dtype).requires_grad_()
    weight = mk(out_f, in_f)  # fp32 master weight, frozen
    bias = mk(out_f) if with_bias else None
    A = mk(r, in_f).requires_grad_()  # fp32 LoRA factors
    B = mk(out_f, r).requires_grad_()  # non-zero B: PEFT's zero init would hide bugs
    # dy as autocast hands it back (bf16): its bf16 values are the exact ones for the reference.
    dy = mk(*lead, out_f).bfloat16()
    with backend.forced(which):
        with _autocast():
            y = lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, seed=seed)
        y.backward(dy)
        keep = None
        if dropout_p:
            keep = lora_dropout_mask(lead[0] * lead[1], in_f, dropout_p, seed, "cpu").view(*lead, in_f).double()
    assert y.dtype == torch.bfloat16, "under autocast the op computes (and returns) bf16, like nn.Linear"
    assert x.grad.dtype == x_dtype and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    p = dropout_p  # 0.25 is a multiple of 2⁻¹⁶: the torch path's mask rate is exactly p
    exact = _reference(x, weight, bias, A, B, scale, keep, p, dy)
    bound = _reference(x.abs(), weight.abs(), None if bias is None else bias.abs(), A.abs(), B.abs(),
                       scale, keep, p, dy.abs())
    got = {"y": y, "x": x.grad, "A": A.grad, "B": B.grad}
    for key, value in got.items():
        err = (value.double() - exact[key]).abs()
        worst = (err / (EPS_BF16 * bound[key] + 1e-30)).max().item()
        assert worst <= 1.0, f"{key}: off by {worst:.2f}x the 6u bound (max err {err.max().item():.3e})"


def test_lora_op_under_autocast_is_bf16_not_fp32():
    """The same op outside autocast is fp32-exact; inside, its error is of bf16's size: the
    autocast dtype is really used (a path that ignored it would pass the bound test above)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 96, generator=gen), torch.randn(80, 96, generator=gen)
    A, B = torch.randn(4, 96, generator=gen), torch.randn(80, 4, generator=gen)
    exact = x.double() @ w.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    with backend.forced("torch"), _autocast():
        y = lora_linear(x, w, None, A, B, 0.5)
    rel = ((y.double() - exact).abs().max() / exact.abs().max()).item()
    assert 2.0**-12 < rel < EPS_BF16


def test_projections_reading_one_x_share_one_bf16_copy_and_keep_exact_gradients():
    """q, k and v read the same x: under autocast they save one bf16 copy of it, not three
    (checked on what autograd saved), and each still gets the gradient of its own float64
    reference; an x changed in place in between gets a fresh copy."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 24, generator=gen).requires_grad_()
    layers = [(torch.randn(out_f, 24, generator=gen), torch.randn(3, 24, generator=gen).requires_grad_(),
               torch.randn(out_f, 3, generator=gen).requires_grad_()) for out_f in (24, 8, 8)]
    with backend.forced("torch"), _autocast():
        ys = [lora_linear(x, w, None, A, B, 0.5) for w, A, B in layers]
    saved = [y.grad_fn.saved_tensors[0] for y in ys]
    assert saved[0].dtype == torch.bfloat16
    assert all(t.data_ptr() == saved[0].data_ptr() for t in saved)
    dys = [torch.randn(y.shape, generator=gen).bfloat16() for y in ys]
    torch.autograd.backward(ys, dys)
    x64 = x.detach().double().requires_grad_()
    ref = []
    for (w, A, B), dy in zip(layers, dys, strict=True):
        A64 = A.detach().double().requires_grad_()
        y = x64 @ w.double().t() + 0.5 * (x64 @ A64.t()) @ B.detach().double().t()
        y.backward(dy.double())
        ref.append((A.grad, A64.grad))
    for got, exact in ref:
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 2 * EPS_BF16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=4 * EPS_BF16 * x64.grad.abs().max().item())

    x2 = torch.randn(5, 24, generator=gen)
    with backend.forced("torch"), _autocast():
        w, A, B = layers[0]
        first = lora_linear(x2, w, None, A, B, 0.5).grad_fn.saved_tensors[0]
        x2.mul_(2.0)
        second = lora_linear(x2, w, None, A, B, 0.5).grad_fn.saved_tensors[0]
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(second.float(), x2.bfloat16().float())


# ----------------------------------------------------------------------- layers, penalty, Fisher


def _with_live_lora(model, gen: torch.Generator):
    """``model`` with LoRA r4 on every block linear and a non-zero B (drawn from ``gen``), so a
    lost or doubled LoRA term shows in the outputs."""
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lora_model_trains_under_cpu_autocast(build, one_thread):
    """A tiny model with LoRA layers (nn.Linear and GPT-2 Conv1D) under autocast against the same
    model in float64: bf16 logits, fp32 loss and fp32 LoRA gradients whose relative error is a
    few u.  Per op the error is at most 6u of the |terms| bound (test above); through two blocks
    forward and back it compounds, so the model-level check allows 16u (6%) on the gradients'
    relative norm and 4u on the loss, and mainly guards against gross errors (a LoRA term lost
    or scaled twice under autocast is an O(1) error: B is non-zero here)."""
    gen = torch.Generator().manual_seed(1)
    model = _with_live_lora(build(), gen)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (3, 13), generator=gen)
    reference = copy.deepcopy(model).double()
    want = reference(input_ids=ids, labels=ids).loss
    want.backward()
    with backend.forced("torch"):
        with _autocast():
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - want.item()) <= 4 * U_BF16 * want.item()
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            ref = ref_params[name].grad
            rel = ((param.grad.double() - ref).norm() / ref.norm()).item()
            assert rel <= 16 * U_BF16, f"{name}: relative gradient error {rel:.3g}"
            checked += 1
    assert checked == 2 * len(lora_modules(model))


def test_lora_fisher_penalty_stays_fp32_under_autocast():
    """The LoRA-EWC penalty and its gradients are fp32 under autocast: error at fp32's level
    (n·2⁻²⁴ of the |terms| bound, n = in + r), far below what a bf16 matmul would leave."""
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(3, 29, generator=gen).requires_grad_()
    B = torch.randn(21, 3, generator=gen).requires_grad_()
    F = torch.rand(21, 29, generator=gen)
    with backend.forced("torch"), _autocast():
        penalty = lora_fisher_penalty(A, B, F, 1.5, 0.7)
        penalty.backward()
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    want = 0.35 * (F.double() * (1.5 * Bd @ Ad) ** 2).sum()
    want.backward()
    assert penalty.dtype == torch.float32
    tol = 8 * 32 * 2.0**-24
    assert abs(penalty.item() - want.item()) <= tol * want.item()
    for got, ref in ((A.grad, Ad.grad), (B.grad, Bd.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_ewc_step_under_autocast_matches_float64():
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (33,))]
    anchors = [p.detach() + 0.2 * torch.randn(p.shape, generator=gen) for p in params]
    fishers = [torch.rand(p.shape, generator=gen) for p in params]
    with backend.forced("torch"), _autocast():
        penalty = ewc_step(params, anchors, fishers, 0.9)
    want = sum(0.45 * (f.double() * (p.double() - a.double()) ** 2).sum()
               for p, a, f in zip(params, anchors, fishers, strict=True))
    assert abs(penalty.item() - want.item()) <= 1e-6 * want.item()
    for p, a, f in zip(params, anchors, fishers, strict=True):
        torch.testing.assert_close(p.grad.double(), 0.9 * f.double() * (p.double() - a.double()),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape_t", [(), (11,)], ids=["T1", "T11"])
def test_fisher_is_accumulated_in_fp32_under_autocast(shape_t):
    """bf16 activations and output gradients (as autocast produces them) give the fp32-exact
    Fisher of those bf16 values: within fp32 accumulation error, not bf16's 2⁻⁸."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, *shape_t, 24, generator=gen).bfloat16()
    dy = torch.randn(5, *shape_t, 16, generator=gen).bfloat16()
    with backend.forced("torch"), _autocast():
        grad, fisher = linear_grad_and_fisher(x, dy)
    x3, dy3 = x.double().view(5, -1, 24), dy.double().view(5, -1, 16)
    per_sample = torch.einsum("nto,nti->noi", dy3, x3)
    assert grad.dtype == fisher.dtype == torch.float32
    tol = 4 * 11 * 2.0**-24
    bound = torch.einsum("nto,nti->noi", dy3.abs(), x3.abs())
    assert ((grad.double() - per_sample.sum(0)).abs() <= tol * bound.sum(0) + 1e-30).all()
    assert ((fisher.double() - (per_sample**2).sum(0)).abs() <= 3 * tol * (bound**2).sum(0) + 1e-30).all()


# ----------------------------------------------------------------------- the frozen base held in bf16


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_frozen_base_held_in_bf16_changes_no_number_under_autocast(build, one_thread):
    """``store_base_weights``: the LoRA layers' frozen weights become bf16 (the same Parameter
    objects), everything else stays fp32, and under autocast the logits, the loss and every LoRA
    gradient equal bit for bit those of the model holding fp32 weights (autocast rounds each weight
    to bf16 before its matmul: the reference is torch's own autocast of the fp32 layers), with the
    adapters on and off."""
    from kernels.lora_layers import lora_disabled, store_base_weights

    gen = torch.Generator().manual_seed(3)
    model = _with_live_lora(build(), gen)
    held = copy.deepcopy(model)
    weights = [layer.weight for _, layer in lora_modules(held)]
    assert store_base_weights(held, torch.bfloat16) == sum(w.numel() for w in weights)
    assert [layer.weight for _, layer in lora_modules(held)] == weights  # same objects, new storage
    lora_ids = {id(w) for w in weights}
    for name, p in held.named_parameters():
        assert p.dtype == (torch.bfloat16 if id(p) in lora_ids else torch.float32), name
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 11), generator=gen)
    outs = []
    for m in (model, held):
        with backend.forced("torch"):
            with _autocast():
                out = m(input_ids=ids, labels=ids)
                with torch.no_grad(), lora_disabled(m):
                    base_logits = m(input_ids=ids).logits
            out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        outs.append((out.logits, out.loss, base_logits, grads))
    (logits, loss, base_logits, grads), (logits2, loss2, base_logits2, grads2) = outs
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2) and torch.equal(base_logits, base_logits2)
    assert grads.keys() == grads2.keys() and len(grads) == 2 * len(weights)
    for name, g in grads.items():
        assert torch.equal(g, grads2[name]), name


def test_frozen_base_shared_with_another_module_stays_fp32():
    """A weight that a LoRA layer shares with a module that is not one (a tied output embedding)
    keeps its dtype: outside autocast the other module would read bf16."""
    from kernels.lora_layers import store_base_weights

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 6, bias=False)
            self.head = torch.nn.Linear(6, 6, bias=False)
            self.head.weight = self.proj.weight
            self.other = torch.nn.Linear(6, 6)

    model = Tied()
    apply_lora(model, r=2, alpha=4, targets=["proj", "other"])
    assert store_base_weights(model, torch.bfloat16) == 36
    assert model.proj.weight.dtype == torch.float32 and model.head.weight is model.proj.weight
    assert model.other.weight.dtype == torch.bfloat16 and model.other.bias.dtype == torch.float32
    assert store_base_weights(model, torch.bfloat16) == 0  # already held: nothing to do


def test_holding_the_base_in_bf16_lets_go_of_the_checkpoints_mapping(tmp_path):
    """``from_pretrained`` maps the safetensors file; after ``store_base_weights`` no parameter
    points into that mapping any more (read from /proc/self/maps), so the file's fp32 pages are
    no longer held, and every parameter kept its values."""
    import os

    from transformers import AutoModelForCausalLM

    from kernels.lora_layers import store_base_weights

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux's /proc/self/maps")
    tiny_llama().save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    checkpoint = str(tmp_path / "model.safetensors")

    def mapped() -> list[tuple[int, int]]:
        with open("/proc/self/maps") as maps:
            return [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in maps
                    if line.rstrip().endswith(checkpoint)]

    def in_file(model) -> list[str]:
        ranges = mapped()
        return [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]

    if not in_file(model):
        pytest.skip("this transformers copies the checkpoint instead of mapping it")
    apply_lora(model, r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert store_base_weights(model, torch.bfloat16) > 0
    assert in_file(model) == []
    for n, p in model.named_parameters():
        want = before[n].to(p.dtype)
        assert torch.equal(p.detach(), want), n
