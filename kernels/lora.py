"""Fused LoRA linear: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with dropout on the LoRA branch only.

Shapes: ``x (..., in)``, ``weight [out, in]`` (may be a strided view such as a GPT-2 Conv1D
weight ``.t()``), ``bias [out] | None``, ``lora_A [r, in]``, ``lora_B [out, r]``.

Two implementations of the same math, picked by :func:`kernels.backend.select`:

* the **torch path** (CPU fast path, second oracle in tests): three library GEMMs, the LoRA
  term added in place with ``addmm_(..., alpha=s)`` so no ``[M, out]`` temporary exists;
* the **Triton path** (``kernels/lora_triton.py``): the LoRA term in the epilogue of the base
  GEMM, backward fused around ``dy B``.

Precision: under autocast (CPU or CUDA) the op computes in the autocast dtype, as the
``nn.Linear`` it replaces would: x, W and b are cast down, the fp32 A and B are cast down
inside, and the gradients of A and B come back in fp32 (``kernels.backend.compute_dtype``).

Memory: the autograd Function saves ``x`` (which the caller holds anyway), the weights and
the small ``[M, r]`` product ``u = drop(x) Aᵀ``.  It never saves ``drop(x)`` or the dropout
mask: the mask is regenerated in backward from ``seed`` (torch path: a ``torch.Generator``
seeded with it; Triton path: Philox keyed on ``(seed, row * in + col)``).  PEFT, by
contrast, keeps the dropped copy of ``x`` plus the mask alive until backward.
"""
from __future__ import annotations

import weakref

import torch

from kernels import backend

__all__ = ["lora_linear", "LoRALinearFunction", "lora_dropout_mask"]

# Seeds are drawn below 2**31 so they fit a Triton int32 argument on every backend.
_SEED_BOUND = 2**31 - 1


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes dropout reproducible.
    return int(torch.randint(_SEED_BOUND, (1,)).item())


# --------------------------------------------------------------------------- torch path
def _torch_keep_mask(rows: int, cols: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask, True where an element of x is KEPT.

    Four mask elements per 64-bit draw: full-range random int64s viewed as int16 lanes, kept
    when the lane is >= ``round(p·2¹⁶) - 2¹⁵``.  So the drop probability is ``p`` rounded to a
    multiple of 2⁻¹⁶ (off by at most 7.6e-6; 0.05 becomes 0.050003).  In exchange the mask
    costs a quarter of the generator calls: measured single-threaded at 2048x512, 1.3 ms
    against 7.8 ms for ``torch.rand(...) >= p`` and 26 ms for ``F.dropout`` (PEFT's), so
    generating it twice (forward and backward) still costs far less than PEFT's one dropout.
    """
    n = rows * cols
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    # random_(-2**63, None) is torch's spelling of "every 64-bit pattern equally likely".
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    threshold = round(dropout_p * 65536) - 32768
    return bits.view(torch.int16)[:n].view(rows, cols) >= threshold


def _torch_drop_prob(dropout_p: float) -> float:
    """The drop probability the torch-path mask really has (``p`` rounded to 2⁻¹⁶), so the
    inverted-dropout rescale ``1/(1-p)`` keeps the LoRA term exactly unbiased."""
    return round(dropout_p * 65536) / 65536


def _lora_fwd_torch(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    """Returns ``(y2 [M, out], u [M, r])``; computes in x's dtype (library GEMMs accumulate
    bf16/fp16 in fp32 internally); fp32 A/B are cast down once, they are tiny."""
    dtype = x2.dtype
    A = lora_A.to(dtype)
    B = lora_B.to(dtype)
    w_t = weight.to(dtype).t()
    if bias is not None:
        y = torch.addmm(bias.to(dtype), x2, w_t)
    else:
        y = torch.mm(x2, w_t)
    # u is stored WITHOUT the 1/(1-p) dropout rescale; it is folded into the GEMM alphas.
    if dropout_p > 0.0:
        keep = _torch_keep_mask(x2.shape[0], x2.shape[1], dropout_p, seed, x2.device)
        # The only [M, in] temporary (x ⊙ keep); it dies here and is never saved for backward.
        u = torch.mm(x2.mul(keep), A.t())
        del keep
    else:
        u = torch.mm(x2, A.t())
    y.addmm_(u, B.t(), alpha=scale / (1.0 - _torch_drop_prob(dropout_p)))
    return y, u


def _lora_bwd_torch(dy2, x2, weight, lora_A, lora_B, u, scale, dropout_p, seed, need_dx, need_dw, need_db):
    """Returns ``(dx2, dA, dB, dW, db)`` in the compute dtype (None where not needed)."""
    dtype = x2.dtype
    A = lora_A.to(dtype)
    B = lora_B.to(dtype)
    dy2 = dy2.to(dtype)
    # s and the inverted-dropout rescale, in one alpha
    lora_scale = scale / (1.0 - _torch_drop_prob(dropout_p))
    v = torch.mm(dy2, B)  # [M, r]: dy B feeds both dx and dA
    dB = torch.mm(dy2.t(), u).mul_(lora_scale)
    keep = None
    if dropout_p > 0.0:
        keep = _torch_keep_mask(x2.shape[0], x2.shape[1], dropout_p, seed, x2.device)
        dA = torch.mm(v.t(), x2.mul(keep)).mul_(lora_scale)
    else:
        dA = torch.mm(v.t(), x2).mul_(lora_scale)
    dx = None
    if need_dx:
        w = weight.to(dtype)
        if keep is not None:
            # dx = dy W + s/(1-p) · ((dy B) A ⊙ keep): the LoRA part is built first and masked
            # in place, then the base GEMM accumulates onto it (addmm_ with beta).
            dx = torch.mm(v, A).mul_(keep)
            dx.addmm_(dy2, w, beta=lora_scale)
        else:
            dx = torch.mm(dy2, w)
            dx.addmm_(v, A, alpha=lora_scale)
    dW = torch.mm(dy2.t(), x2) if need_dw else None
    db = dy2.sum(0) if need_db else None
    return dx, dA, dB, dW, db


def lora_dropout_mask(
    rows: int, cols: int, dropout_p: float, seed: int, device: torch.device | str = "cpu", which: str | None = None
) -> torch.Tensor:
    """The boolean KEEP mask ``[rows, cols]`` that :func:`lora_linear` applies to ``x`` viewed
    as ``[M, in]`` for this ``seed`` (for tests and debugging; training never materialises it).

    ``which`` is the backend (``"torch" | "triton" | "interpret"``); default: what
    :func:`kernels.backend.select` picks for a tensor on ``device``.
    """
    device = torch.device(device)
    if which is None:
        which = backend.select(torch.empty(0, device=device))
    if which == "torch":
        return _torch_keep_mask(rows, cols, dropout_p, seed, device)
    from kernels import lora_triton

    return lora_triton.keep_mask(rows, cols, dropout_p, seed, device)


# --------------------------------------------------------------------------- autograd
# (weakref to x, x's version, dtype, weakref to its cast copy) of the last cast: see _cast_shared.
_last_cast: tuple | None = None


def _cast_shared(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, reusing the previous call's copy when it was made from this same ``x``
    (same object, unchanged since) and is still alive.

    Attention's q, k and v projections read one x, as do an MLP's gate and up. Under autocast
    each ``F.linear`` casts x again and saves its own bf16 copy for backward; here they share
    one: at SmolLM2-135M's shape (8 x 512 tokens, width 576) three fewer 4.7 MB copies a layer
    are made and kept. Only weak references are held, so nothing outlives its graph."""
    global _last_cast
    if x.dtype == dtype:
        return x
    if _last_cast is not None:
        x_ref, version, cast_dtype, copy_ref = _last_cast
        if x_ref() is x and version == x._version and cast_dtype == dtype:
            copy = copy_ref()
            if copy is not None:
                return copy
    copy = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(copy))
    return copy


class LoRALinearFunction(torch.autograd.Function):
    """One Function for both backends; saves x, the weights and ``u = drop(x) Aᵀ`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        which = backend.select(x, weight, lora_A, lora_B)
        in_features = x.shape[-1]
        # Under autocast (CPU or CUDA) the op computes in the autocast dtype, like the nn.Linear
        # it replaces: x, W and b are cast down, A and B stay fp32 masters (cast down inside).
        dtype = backend.compute_dtype(x)
        ctx.bias_meta = None if bias is None else (bias.dtype, bias.requires_grad)
        with backend.autocast_off(x):
            # The cast copy of x is what is saved, as autocast's F.linear saves its bf16 x; one
            # copy shared by the projections that read the same x (see _cast_shared).
            xc = _cast_shared(x, dtype)
            x2 = xc.reshape(-1, in_features)
            if which == "torch":
                y2, u = _lora_fwd_torch(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
            else:
                from kernels import lora_triton

                w, b = _weights_in(dtype, weight, bias)
                y2, u = lora_triton.lora_fwd(x2, w, b, lora_A, lora_B, scale, dropout_p, seed)
                del w, b
        # xc, not x2: a reshape of a non-contiguous x would be a copy, kept alive for nothing.
        # The weight saved is the caller's (a cast copy is made again in backward, not kept).
        ctx.save_for_backward(xc, weight, lora_A, lora_B, u)
        ctx.which = which
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.x_dtype = x.dtype
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        with backend.autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.which == "torch":
                dx2, dA, dB, dW, db = _lora_bwd_torch(
                    dy2, x2, weight, lora_A, lora_B, u, ctx.scale, ctx.dropout_p, ctx.seed,
                    need_dx, need_dw, need_db,
                )
            else:
                from kernels import lora_triton

                w, _ = _weights_in(x2.dtype, weight, None)
                dx2, dA, dB = lora_triton.lora_bwd(
                    dy2.to(x2.dtype), x2, w, lora_A, lora_B, u, ctx.scale, ctx.dropout_p, ctx.seed, need_dx
                )
                del w
                # The frozen base weight's gradient is not LoRA's hot path: library GEMM on both backends.
                dy_c = dy2.to(x2.dtype)
                dW = torch.mm(dy_c.t(), x2) if need_dw else None
                db = dy_c.sum(0) if need_db else None
        dx = dx2.view(x.shape).to(ctx.x_dtype) if need_dx else None
        dA = dA.to(lora_A.dtype) if need_dA else None
        dB = dB.to(lora_B.dtype) if need_dB else None
        dW = dW.to(weight.dtype) if dW is not None else None
        db = db.to(ctx.bias_meta[0]) if db is not None else None
        return dx, dW, db, dA, dB, None, None, None


def _weights_in(dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None):
    """W and b in the compute dtype for the Triton kernels, whose compiled configs take them in
    x's dtype (``kernels.compile_check``); the torch path casts inside its own GEMM calls."""
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + b + scale·(drop(x) Aᵀ) Bᵀ`` for ``x (..., in)``; output in x's dtype.

    ``dropout_p`` applies to the LoRA branch only (inverted dropout, like ``nn.Dropout``);
    pass it as 0 in eval mode.  ``seed=None`` with ``dropout_p > 0`` draws a seed from
    torch's RNG; the same seed gives the same mask on the same backend.
    """
    in_features = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"lora_linear: weight {tuple(weight.shape)} must be [out, in={in_features}]")
    out_features = weight.shape[0]
    r = lora_A.shape[0]
    if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(
            f"lora_linear: lora_A {tuple(lora_A.shape)} must be [r, {in_features}] and lora_B "
            f"{tuple(lora_B.shape)} must be [{out_features}, r]"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} must be [{out_features}]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p={dropout_p} must be in [0, 1)")
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed()
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), dropout_p, int(seed or 0))
