"""Fused EWC: the penalty and its gradient without an autograd graph over every parameter,
and LoRA held by the base model's Fisher without materialising ``B A``.

EWC (Kirkpatrick et al. 2017) adds ``P = lam/2 * sum_i F_i (theta_i - theta*_i)^2`` to the
task loss, whose gradient is ``lam * F * (theta - theta*)``.  :func:`ewc_step` computes both
in one pass over each parameter (one launch per dtype group: the Triton kernel walks a
table of tensor pointers; the torch path uses ``torch._foreach_*`` ops) and adds the gradient
into ``p.grad``.  :func:`online_update` is online EWC's ``F <- gamma F + F_new`` and
:func:`consolidate` sets the anchors ``theta* <- theta``.

LoRA under a base Fisher: with ``D = s * B A`` (the adapter's change to ``W``, ``A [r, in]``,
``B [out, r]``) the penalty is ``P = lam/2 * sum F_W * D^2``; with ``G = dP/dD = lam F_W * D``,
``dP/dA = s * B^T G`` and ``dP/dB = s * G A^T``.  Both paths work tile by tile (Triton) or on
chunks of rows of ``B`` (torch), so the full ``[out, in]`` product never exists.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels.fisher import _TL_DTYPES

# Bound on the fp32 [rows, in] blocks the torch LoRA path holds at once.
TORCH_CHUNK_BYTES = 16 << 20
# Elements per chunk of the torch EWC step (fp32 temporaries of 2 x 1 MiB).
EWC_TORCH_CHUNK = 1 << 18


# =========================================================================== EWC step


@triton.jit
def _ewc_step_kernel(
    param_ptrs, anchor_ptrs, fisher_ptrs, grad_ptrs, numels,
    block_tensor, block_start, partial_ptr, lam,
    P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    numel = tl.load(numels + which)
    p_ptr = tl.load(param_ptrs + which).to(tl.pointer_type(P_DTYPE))
    a_ptr = tl.load(anchor_ptrs + which).to(tl.pointer_type(A_DTYPE))
    f_ptr = tl.load(fisher_ptrs + which).to(tl.pointer_type(F_DTYPE))
    g_ptr = tl.load(grad_ptrs + which).to(tl.pointer_type(G_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fd = f * (p - a)
    tl.store(g_ptr + offs, (g + lam * fd).to(G_DTYPE), mask=mask)
    # One partial per program, summed on the host: deterministic, no atomics.
    tl.store(partial_ptr + pid, tl.sum(fd * (p - a), axis=0))


def _ewc_group_triton(params, anchors, fishers, grads, lam: float, interpreting: bool,
                      block: int | None = None) -> torch.Tensor:
    device = params[0].device
    block = block or (65536 if interpreting else 4096)
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    blocks_per = (numels + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(params)), blocks_per)
    first_block = torch.cumsum(blocks_per, 0) - blocks_per
    block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor]) * block

    def ptrs(ts):
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)

    partials = torch.empty(len(block_tensor), dtype=torch.float32, device=device)
    _ewc_step_kernel[(len(block_tensor),)](
        ptrs(params), ptrs(anchors), ptrs(fishers), ptrs(grads), numels.to(device),
        block_tensor.to(device), block_start.to(device), partials, float(lam),
        P_DTYPE=_TL_DTYPES[params[0].dtype], A_DTYPE=_TL_DTYPES[anchors[0].dtype],
        F_DTYPE=_TL_DTYPES[fishers[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        BLOCK=block, num_warps=4, num_stages=1,
    )
    return partials.sum()


def _ewc_group_torch(params, anchors, fishers, grads, lam: float) -> torch.Tensor:
    # Cache-sized chunks: the temporaries (p - p*, F (p - p*)) stay in cache, so memory
    # traffic is one read of p, p*, F, g and one write of g, instead of a full-size
    # temporary per op (which is what foreach ops or autograd allocate and page in).
    chunk = EWC_TORCH_CHUNK
    largest = min(chunk, max(p.numel() for p in params))
    diff_buf = torch.empty(largest, dtype=torch.float32, device=params[0].device)
    weighted_buf = torch.empty_like(diff_buf)
    sums = []
    for p, a, f, g in zip(params, anchors, fishers, grads, strict=True):
        p, a, f, g = p.view(-1), a.view(-1), f.view(-1), g.view(-1)
        for start in range(0, p.numel(), chunk):
            stop = min(p.numel(), start + chunk)
            diff = diff_buf[: stop - start]
            if p.dtype == a.dtype == torch.float32:
                torch.sub(p[start:stop], a[start:stop], out=diff)
            else:  # subtract in fp32, not in the parameters' low precision
                diff.copy_(p[start:stop]).sub_(a[start:stop])
            weighted = torch.mul(diff, f[start:stop], out=weighted_buf[: stop - start])
            g[start:stop].add_(weighted.to(g.dtype), alpha=lam)
            sums.append(torch.dot(diff, weighted))
    return torch.stack(sums).sum()


def _check_same_shapes(params, anchors, fishers) -> None:
    if not len(params) == len(anchors) == len(fishers):
        raise ValueError(
            f"ewc_step needs one anchor and one Fisher per parameter; got {len(params)} params, "
            f"{len(anchors)} anchors, {len(fishers)} fishers"
        )
    for i, (p, a, f) in enumerate(zip(params, anchors, fishers, strict=True)):
        if p.shape != a.shape or p.shape != f.shape:
            raise ValueError(
                f"ewc_step entry {i}: param {tuple(p.shape)}, anchor {tuple(a.shape)} and Fisher "
                f"{tuple(f.shape)} must have the same shape"
            )
        if not (a.is_contiguous() and f.is_contiguous()):
            raise ValueError(f"ewc_step entry {i}: anchors and Fishers must be contiguous buffers")


def ewc_step(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
    lam: float, *, block: int | None = None,
) -> torch.Tensor:
    """Adds ``lam * F * (p - p*)`` into each ``p.grad`` (created as zeros when None) and
    returns the penalty ``lam/2 * sum F (p - p*)^2`` as an fp32 scalar tensor (no graph).

    Parameters are grouped by device and dtypes; each group is one kernel launch (Triton)
    or one set of ``torch._foreach_*`` calls (torch).  ``block`` sets the Triton block size."""
    params, anchors, fishers = list(params), list(anchors), list(fishers)
    _check_same_shapes(params, anchors, fishers)
    if not params:
        return torch.zeros(())
    groups: dict[tuple, list[int]] = {}
    for i, (p, a, f) in enumerate(zip(params, anchors, fishers, strict=True)):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if not p.grad.is_contiguous() or not p.is_contiguous():
            raise ValueError(f"ewc_step entry {i}: the parameter and its .grad must be contiguous")
        key = (p.device, p.dtype, a.dtype, f.dtype, p.grad.dtype)
        groups.setdefault(key, []).append(i)
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    with torch.no_grad(), backend.autocast_off(params[0]):
        for idx in groups.values():
            ps = [params[i].detach() for i in idx]
            an = [anchors[i] for i in idx]
            fs = [fishers[i] for i in idx]
            gs = [params[i].grad for i in idx]
            choice = backend.select(*ps)
            if choice == "torch":
                part = _ewc_group_torch(ps, an, fs, gs, lam)
            else:
                part = _ewc_group_triton(ps, an, fs, gs, lam, choice == "interpret", block)
            total = total + part.to(total.device)
    return total * (0.5 * lam)


def _pairs(a, b, what: str):
    if isinstance(a, Mapping):
        if set(a) != set(b):
            missing = sorted(set(a) ^ set(b))
            raise KeyError(f"{what}: the two dicts differ in keys, e.g. {missing[:3]}")
        return [a[k] for k in a], [b[k] for k in a]
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} vs {len(b)} tensors")
    return a, b


@torch.no_grad()
def online_update(fishers, new_fishers, gamma: float) -> None:
    """Online EWC, in place: ``F <- gamma * F + F_new`` (lists, or dicts keyed alike)."""
    old, new = _pairs(fishers, new_fishers, "online_update")
    if not old:
        return
    torch._foreach_mul_(old, gamma)
    torch._foreach_add_(old, [n.to(o.dtype) for o, n in zip(old, new, strict=True)])


@torch.no_grad()
def consolidate(params, anchors) -> None:
    """Sets the anchors to the current parameters, in place: ``theta* <- theta``."""
    ps, an = _pairs(params, anchors, "consolidate")
    for p, a in zip(ps, an, strict=True):
        a.copy_(p.detach())


# =========================================================================== LoRA under F_W


@triton.jit
def _lora_fisher_dA_kernel(
    a_ptr, b_ptr, f_ptr, da_ptr, R, IN, OUT, scale, lam,
    stride_ar, stride_ai, stride_bo, stride_br, stride_fo, stride_fi, stride_dar, stride_dai,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One program per column tile of A: dA[:, tile] = s * sum over row tiles B[o]^T G[o, tile].
    pid_i = tl.program_id(0)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, BLOCK_R)
    mask_i = offs_i < IN
    mask_r = offs_r < R
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_i[None, :] * stride_ai,
                mask=mask_r[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
    da = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < OUT
        b = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br,
                    mask=mask_o[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs_o[:, None] * stride_fo + offs_i[None, :] * stride_fi,
                    mask=mask_o[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        d = scale * tl.dot(b, a, input_precision=INPUT_PRECISION)
        g = lam * f * d
        da += tl.dot(tl.trans(b), g, input_precision=INPUT_PRECISION)
    tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_i[None, :] * stride_dai, scale * da,
             mask=mask_r[:, None] & mask_i[None, :])


@triton.jit
def _lora_fisher_dB_kernel(
    a_ptr, b_ptr, f_ptr, db_ptr, partial_ptr, R, IN, OUT, scale, lam,
    stride_ar, stride_ai, stride_bo, stride_br, stride_fo, stride_fi, stride_dbo, stride_dbr,
    HAS_GRAD: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One program per row tile of B: dB[tile] = s * sum over column tiles G[tile, i] A[:, i]^T,
    # and the penalty partial sum 1/2 sum G * D of the tile row.
    pid_o = tl.program_id(0)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, BLOCK_R)
    mask_o = offs_o < OUT
    mask_r = offs_r < R
    b = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br,
                mask=mask_o[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    penalty = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < IN
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_i[None, :] * stride_ai,
                    mask=mask_r[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs_o[:, None] * stride_fo + offs_i[None, :] * stride_fi,
                    mask=mask_o[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        d = scale * tl.dot(b, a, input_precision=INPUT_PRECISION)
        g = lam * f * d
        penalty += g * d
        if HAS_GRAD:
            db += tl.dot(g, tl.trans(a), input_precision=INPUT_PRECISION)
    tl.store(partial_ptr + pid_o, 0.5 * tl.sum(tl.sum(penalty, axis=1), axis=0))
    if HAS_GRAD:
        tl.store(db_ptr + offs_o[:, None] * stride_dbo + offs_r[None, :] * stride_dbr, scale * db,
                 mask=mask_o[:, None] & mask_r[None, :])


def _lora_fisher_triton(A, B, F, scale: float, lam: float, need_grads: bool, interpreting: bool,
                        block_o: int | None = None, block_i: int | None = None):
    r, in_features = A.shape
    out_features = B.shape[0]
    block_r = max(16, triton.next_power_of_2(r))
    if interpreting:
        block_o = block_o or min(128, triton.next_power_of_2(out_features))
        block_i = block_i or min(128, triton.next_power_of_2(in_features))
    else:
        block_o, block_i = block_o or 64, block_i or 64
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    device = A.device
    n_row_tiles = triton.cdiv(out_features, block_o)
    partials = torch.empty(n_row_tiles, dtype=torch.float32, device=device)
    dA = dB = None
    if need_grads:
        dA = torch.empty((r, in_features), dtype=torch.float32, device=device)
        dB = torch.empty((out_features, r), dtype=torch.float32, device=device)
        _lora_fisher_dA_kernel[(triton.cdiv(in_features, block_i),)](
            A, B, F, dA, r, in_features, out_features, float(scale), float(lam),
            A.stride(0), A.stride(1), B.stride(0), B.stride(1), F.stride(0), F.stride(1),
            dA.stride(0), dA.stride(1),
            BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r, INPUT_PRECISION=precision,
            num_warps=4, num_stages=2,
        )
    db_arg = dB if need_grads else partials
    _lora_fisher_dB_kernel[(n_row_tiles,)](
        A, B, F, db_arg, partials, r, in_features, out_features, float(scale), float(lam),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), F.stride(0), F.stride(1),
        dB.stride(0) if need_grads else 0, dB.stride(1) if need_grads else 0,
        HAS_GRAD=need_grads, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
        INPUT_PRECISION=precision, num_warps=4, num_stages=2,
    )
    return partials.sum(), dA, dB


def _lora_fisher_torch(A, B, F, scale: float, lam: float, need_grads: bool,
                       chunk_bytes: int = TORCH_CHUNK_BYTES):
    r, in_features = A.shape
    out_features = B.shape[0]
    A32, B32 = A.float(), B.float()
    rows = max(1, min(out_features, chunk_bytes // max(1, 4 * in_features)))
    penalty = torch.zeros((), dtype=torch.float32, device=A.device)
    dA = torch.zeros((r, in_features), dtype=torch.float32, device=A.device) if need_grads else None
    dB = torch.empty((out_features, r), dtype=torch.float32, device=A.device) if need_grads else None
    for o0 in range(0, out_features, rows):
        b = B32[o0:o0 + rows]
        d = torch.mm(b, A32).mul_(scale)        # D rows, [rows, in]
        g = d * F[o0:o0 + rows]                  # F * D (in d's layout); lam applied below
        penalty += torch.dot(g.reshape(-1), d.reshape(-1))
        if need_grads:
            dA.addmm_(b.t(), g, alpha=scale * lam)
            torch.mm(g, A32.t(), out=dB[o0:o0 + rows]).mul_(scale * lam)
    return penalty * (0.5 * lam), dA, dB


def _check_lora_shapes(A, B, F) -> None:
    if A.dim() != 2 or B.dim() != 2 or F.dim() != 2 or B.shape[1] != A.shape[0] \
            or tuple(F.shape) != (B.shape[0], A.shape[1]):
        raise ValueError(
            f"LoRA under Fisher needs A [r, in], B [out, r], fisher_W [out, in]; got A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, fisher_W {tuple(F.shape)}"
        )


def _lora_fisher(A, B, F, scale, lam, need_grads, block_o=None, block_i=None):
    _check_lora_shapes(A, B, F)
    choice = backend.select(A, B, F)
    # The penalty is fp32 whatever the training precision: under autocast the torch path's
    # matmuls would otherwise run in bf16 against the fp32 Fisher.
    with backend.autocast_off(A):
        if choice == "torch":
            return _lora_fisher_torch(A, B, F, scale, lam, need_grads)
        return _lora_fisher_triton(A, B, F, scale, lam, need_grads, choice == "interpret", block_o, block_i)


class _LoRAFisherPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, F, scale, lam, block_o, block_i):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.no_grad():
            penalty, dA, dB = _lora_fisher(A.detach(), B.detach(), F.detach(), scale, lam, need,
                                           block_o, block_i)
        ctx.save_for_backward(*((dA, dB) if need else ()))
        ctx.dtypes = (A.dtype, B.dtype)
        return penalty

    @staticmethod
    def backward(ctx, grad_out):
        grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dA, dB = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_a = (grad_out * dA).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_b = (grad_out * dB).to(ctx.dtypes[1])
        return grad_a, grad_b, None, None, None, None, None


def lora_fisher_penalty(
    A: torch.Tensor, B: torch.Tensor, fisher_W: torch.Tensor, scale: float, lam: float,
    *, block_o: int | None = None, block_i: int | None = None,
) -> torch.Tensor:
    """``lam/2 * sum fisher_W * (scale * B @ A)^2`` as a differentiable fp32 scalar (in A and B),
    never materialising ``B @ A``.  ``A [r, in]``, ``B [out, r]``, ``fisher_W [out, in]``."""
    return _LoRAFisherPenalty.apply(A, B, fisher_W, float(scale), float(lam), block_o, block_i)


def lora_ewc_step(terms: Sequence[tuple], lam: float) -> torch.Tensor:
    """For ``terms = [(lora_A, lora_B, fisher_W [out, in], scale), ...]``: adds the gradients of
    ``lam/2 * sum fisher_W * (scale * B A)^2`` into ``lora_A.grad`` / ``lora_B.grad`` (created as
    zeros when None) and returns the summed penalty (fp32 scalar, no graph)."""
    total = None
    for A, B, F, scale in terms:
        with torch.no_grad():
            penalty, dA, dB = _lora_fisher(A.detach(), B.detach(), F, scale, lam, True)
        for p, d in ((A, dA), (B, dB)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(d.to(p.grad.dtype))
        total = penalty if total is None else total + penalty.to(total.device)
    return total if total is not None else torch.zeros(())


# =========================================================================== compile test


def _compile_specs() -> list:
    """The CUDA launch configurations of this module's kernels, for
    ``python -m kernels.compile_check`` (unit strides are constexpr 1, as the JIT makes them)."""
    from kernels.compile_check import CompileSpec, infer_signature

    specs = []
    tables = ("param_ptrs", "anchor_ptrs", "fisher_ptrs", "grad_ptrs", "numels", "block_tensor", "block_start")
    for name, p_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        constexprs = dict(P_DTYPE=p_dtype, A_DTYPE=p_dtype, F_DTYPE=tl.float32, G_DTYPE=p_dtype, BLOCK=4096)
        pointers = dict.fromkeys(tables, "*i64") | {"partial_ptr": "*fp32"}
        specs.append(CompileSpec(
            name=f"ewc_step/{name}", fn=_ewc_step_kernel,
            signature=infer_signature(_ewc_step_kernel, pointers, constexprs, floats=("lam",)),
            constexprs=constexprs, num_warps=4, num_stages=1,
        ))
    # Small rank in fp32 and the largest rank block in bf16 (the costliest tiles); compiling
    # every combination takes minutes on a shared CPU for little extra coverage.
    for name, ab, block_r in (("fp32", "*fp32", 16), ("bf16", "*bf16", 64)):
        common = dict(BLOCK_O=64, BLOCK_I=64, BLOCK_R=block_r, INPUT_PRECISION="ieee",
                      stride_ai=1, stride_br=1, stride_fi=1)
        floats = ("scale", "lam")
        for fn, extra, out_ptr in (
            (_lora_fisher_dA_kernel, dict(stride_dai=1), {"da_ptr": "*fp32"}),
            (_lora_fisher_dB_kernel, dict(stride_dbr=1, HAS_GRAD=True),
             {"db_ptr": "*fp32", "partial_ptr": "*fp32"}),
        ):
            constexprs = common | extra
            pointers = {"a_ptr": ab, "b_ptr": ab, "f_ptr": "*fp32"} | out_ptr
            specs.append(CompileSpec(
                name=f"{fn.__name__.strip('_').replace('_kernel', '')}/{name}/r{block_r}", fn=fn,
                signature=infer_signature(fn, pointers, constexprs, floats=floats),
                constexprs=constexprs, num_warps=4, num_stages=2,
                divisible_by_16=("IN", "OUT", "stride_ar", "stride_bo", "stride_fo"),
            ))
    return specs


COMPILE_SPECS = _compile_specs
