"""Triton kernels for the fused LoRA linear (see ``kernels/lora.py`` for the math and the
autograd Function that calls :func:`lora_fwd` / :func:`lora_bwd`).

Notation: ``x [M, K=in]``, ``W [N=out, K]``, ``A [R, K]``, ``B [N, R]``, ``s`` the LoRA scale,
``keep`` the dropout mask, ``ls = s / (1 - p)`` (inverted-dropout rescale folded into s).

Forward, two launches:
  1. ``_lora_down_kernel``  u = (x ⊙ keep) Aᵀ            [M, R] fp32 (also saved for backward)
  2. ``_lora_fwd_kernel``   y = x Wᵀ + b + ls · u Bᵀ      the rank-R product is added in the
     epilogue of the base GEMM, before the single store: no [M, N] temporary, one pass over y.

  Why a pre-kernel for u rather than accumulating it in the base GEMM's K loop (the
  ``U_IN_K_LOOP`` variant, one constexpr away): in the loop, u is recomputed once per N-tile,
  i.e. N/BLOCK_N times.  At the Llama-8B shapes (K=4096, N=4096 or 14336, R=16 padded to 16,
  BLOCK_N=128) that is R/BLOCK_N = 12.5% extra tensor-core FLOPs, and with dropout each of
  the N/BLOCK_N programs over a row block re-runs Philox on the whole x tile: ~10 integer ops
  per element per N-tile, more issue slots than the MMA it rides along with.  The pre-kernel
  reads x once more (M·K·2 bytes = 64 MiB at M=8192, K=4096: ~15 µs at 4.8 TB/s, i.e. ~3% of
  the ~0.5 ms base GEMM), runs Philox once per element, and its output u is needed by the
  backward anyway.  With dropout the pre-kernel is clearly better; at p=0 the two are within
  a few percent by this count (not yet timed on a GPU: ``bench/gpu_check.sh`` does).

Backward, two launches:
  3. ``_lora_bwd_dyb_kernel`` (one program per row block, loop over N; reads dy once):
     v = dy B [M, R] fp32, and per row block the partial dBᵖ = dyᵀ u [N, R], summed afterwards
     (deterministic; 58 MiB of partials at M=8192, N=14336 vs 235 MiB for a second pass over dy).
  4. ``_lora_bwd_dx_kernel`` (one program per (row block, K block), loop over N):
     dx = dy W + ls · ((v A) ⊙ keep) with the LoRA term in the epilogue, and in the same
     epilogue the partial dAᵖ = ls · vᵀ (x ⊙ keep) [R, K block]: ``dy B`` feeds both dx and dA,
     and the mask is regenerated once per x element for both.  v must be complete before any
     dx tile can finish, which is why 3 and 4 are separate launches.

Dropout: ``keep = tl.rand(seed, row * K + col) >= p`` (Philox keyed on the global element
index), so the mask does not depend on block sizes and backward regenerates the forward's.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from kernels import backend

# --------------------------------------------------------------------------- device helpers


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Row blocks are visited GROUP_M at a time so the W tiles they share stay in L2.
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def _keep_mask(seed, rows, cols, K, p):
    """True where x[rows, cols] is kept; keyed on the global element index (int64-safe)."""
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    return tl.rand(seed, offsets) >= p


# --------------------------------------------------------------------------- kernels


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, u_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um,
    seed, p,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, cols, K, p), x, 0.0)
        a_t = tl.load(  # Aᵀ tile [BLOCK_K, BLOCK_R]
            a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(ranks[None, :] < R) & (cols[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(x.to(DOT_DTYPE), a_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(u_ptr + rows[:, None] * stride_um + ranks[None, :], acc, mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, u_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_um, stride_ym, stride_yn,
    lora_scale, seed, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, U_IN_K_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(  # Wᵀ tile [BLOCK_K, BLOCK_N]
            w_ptr + outs[None, :] * stride_wn + cols[:, None] * stride_wk,
            mask=(outs[None, :] < N) & (cols[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(x.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if U_IN_K_LOOP:
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, rows, cols, K, p), x, 0.0)
            a_t = tl.load(
                a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                mask=(ranks[None, :] < R) & (cols[:, None] < K),
                other=0.0,
            )
            u = tl.dot(x.to(DOT_DTYPE), a_t.to(DOT_DTYPE), u, input_precision=PRECISION)
    u_mask = (rows[:, None] < M) & (ranks[None, :] < R)
    u_ptrs = u_ptr + rows[:, None] * stride_um + ranks[None, :]
    if U_IN_K_LOOP:
        if pid_n == 0:  # one program per row block saves u (an `if`, not `mask & scalar`:
            tl.store(u_ptrs, u, mask=u_mask)  # triton 3.9's interpreter rejects that mask)
    else:
        u = tl.load(u_ptrs, mask=u_mask, other=0.0)
    # Epilogue: the rank-R LoRA product, then bias, then the one store of y.
    b_t = tl.load(  # Bᵀ tile [BLOCK_R, BLOCK_N]
        b_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
        mask=(outs[None, :] < N) & (ranks[:, None] < R),
        other=0.0,
    )
    acc = tl.dot((u * lora_scale).to(DOT_DTYPE), b_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + outs[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (outs[None, :] < N),
    )


@triton.jit
def _lora_bwd_dyb_kernel(
    dy_ptr, b_ptr, u_ptr, v_ptr, db_part_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_vm, stride_dbp_m, stride_dbp_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_rank_mask = (rows[:, None] < M) & (ranks[None, :] < R)
    u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :], mask=row_rank_mask, other=0.0).to(DOT_DTYPE)
    v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
            mask=(rows[:, None] < M) & (outs[None, :] < N),
            other=0.0,
        ).to(DOT_DTYPE)
        b = tl.load(
            b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
            mask=(outs[:, None] < N) & (ranks[None, :] < R),
            other=0.0,
        )
        v = tl.dot(dy, b.to(DOT_DTYPE), v, input_precision=PRECISION)
        db_part = tl.dot(tl.trans(dy), u, input_precision=PRECISION)  # [BLOCK_N, BLOCK_R]
        tl.store(
            db_part_ptr + pid_m * stride_dbp_m + outs[:, None] * stride_dbp_n + ranks[None, :],
            db_part,
            mask=(outs[:, None] < N) & (ranks[None, :] < R),
        )
    tl.store(v_ptr + rows[:, None] * stride_vm + ranks[None, :], v, mask=row_rank_mask)


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, v_ptr, a_ptr, x_ptr, dx_ptr, da_part_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_vm, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dap_m, stride_dap_r,
    lora_scale, seed, p,
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    tile_mask = (rows[:, None] < M) & (cols[None, :] < K)
    v = tl.load(v_ptr + rows[:, None] * stride_vm + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
    v = v.to(DOT_DTYPE)
    if NEED_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(
                dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
                mask=(rows[:, None] < M) & (outs[None, :] < N),
                other=0.0,
            )
            w = tl.load(
                w_ptr + outs[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=(outs[:, None] < N) & (cols[None, :] < K),
                other=0.0,
            )
            acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        # Regenerated once, after the loop, and used by both dx and dA (which hold it in two
        # different register layouts).  Held as an fp32 multiplier: an i1 mask that changes
        # layout goes through shared memory, which the compiler rejects for 1-bit elements
        # (found by kernels.compile_check; the interpreter accepts it).
        keep = _keep_mask(seed, rows, cols, K, p).to(tl.float32)
    if NEED_DX:
        a = tl.load(
            a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=(ranks[:, None] < R) & (cols[None, :] < K),
            other=0.0,
        )
        lora = tl.dot(v, a.to(DOT_DTYPE), input_precision=PRECISION)
        if HAS_DROPOUT:
            lora = lora * keep
        acc += lora_scale * lora
        tl.store(
            dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
            acc.to(dx_ptr.dtype.element_ty),
            mask=tile_mask,
        )
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_mask, other=0.0)
    if HAS_DROPOUT:
        x = x.to(tl.float32) * keep
    da_part = tl.dot(tl.trans(v), x.to(DOT_DTYPE), input_precision=PRECISION)  # [BLOCK_R, BLOCK_K]
    tl.store(
        da_part_ptr + pid_m * stride_dap_m + ranks[:, None] * stride_dap_r + cols[None, :],
        da_part,
        mask=(ranks[:, None] < R) & (cols[None, :] < K),
    )


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, cols, K, p)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < K))


# --------------------------------------------------------------------------- launch configs


@dataclasses.dataclass(frozen=True)
class LoRABlocks:
    """Tile sizes and launch settings; every kernel above takes its blocks at launch."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    block_r: int = 16  # minimum padded rank; tl.dot needs >= 16 on GPUs
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    u_in_k_loop: bool = False  # see the module docstring


# bf16/fp16 on GPU: 3 stages of a 128x64 x tile and a 64x128 W tile = 96 KiB of shared memory.
GPU_BLOCKS_16BIT = LoRABlocks()
# fp32 doubles the bytes per tile: halve BLOCK_N and BLOCK_K to stay well under sm_80's
# 163 KiB (at 128/128/32 the dx kernel needed 168 KiB on sm_90; see kernels.compile_check).
GPU_BLOCKS_FP32 = LoRABlocks(block_n=64, block_k=32)
# Under the interpreter cost scales with programs x loop trips, not tile size: few, big tiles.
INTERPRETER_BLOCKS = LoRABlocks(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=1)

# The mask helper: big tiles for the interpreter; 4096 elements per program on a GPU (a
# 32x1024 tile took ptxas over a minute: Philox unrolled over 128 elements per thread).
KEEP_MASK_BLOCKS_INTERPRETER = (64, 1024)
KEEP_MASK_BLOCKS_GPU = (16, 256)

_override: LoRABlocks | None = None


@contextlib.contextmanager
def use_blocks(blocks: LoRABlocks) -> Iterator[None]:
    """Force tile sizes inside a ``with`` block (tests use small tiles to cover edges)."""
    global _override
    previous, _override = _override, blocks
    try:
        yield
    finally:
        _override = previous


def _blocks_for(dtype: torch.dtype) -> LoRABlocks:
    if _override is not None:
        return _override
    if backend.interpreter_enabled():
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS_16BIT


def _dot_settings(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(DOT_DTYPE, PRECISION) for x's dtype.

    The interpreter multiplies bf16 bit patterns wrongly in tl.dot, so it always gets fp32.
    fp32 on GPU follows torch's own switch for matmuls (tf32 only when the user allowed it).
    """
    if backend.interpreter_enabled() or dtype == torch.float32:
        tf32 = (not backend.interpreter_enabled()) and torch.backends.cuda.matmul.allow_tf32
        return tl.float32, ("tf32" if tf32 else "ieee")
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"


def _block_r(blocks: LoRABlocks, r: int) -> int:
    return max(blocks.block_r, triton.next_power_of_2(r))


# --------------------------------------------------------------------------- host launchers


_INT32_LIMIT = 2**31


def _check_offsets_fit_int32(M: int, N: int, K: int) -> None:
    # Element offsets are computed in int32 inside the kernels (cheaper address math).
    if max(M * N, M * K, N * K) >= _INT32_LIMIT:
        raise ValueError(
            f"lora_linear (Triton): a [{M}, {max(N, K)}] operand has over 2^31 elements; "
            "split the batch into smaller chunks of tokens"
        )


def lora_fwd(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    """Returns ``(y [M, N] in x's dtype, u [M, R] fp32 = (x ⊙ keep) Aᵀ, unscaled)``."""
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    _check_offsets_fit_int32(M, N, K)
    blocks = _blocks_for(x2.dtype)
    block_r = _block_r(blocks, R)
    dot_dtype, precision = _dot_settings(x2.dtype)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    u = torch.empty((M, R), device=x2.device, dtype=torch.float32)
    if M == 0:
        return y, u
    has_dropout = dropout_p > 0.0
    launch = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if not blocks.u_in_k_loop:
        _lora_down_kernel[(triton.cdiv(M, blocks.block_m),)](
            x2, lora_A, u, M, K, R,
            x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), u.stride(0),
            seed, dropout_p,
            HAS_DROPOUT=has_dropout, BLOCK_M=blocks.block_m, BLOCK_K=blocks.block_k, BLOCK_R=block_r,
            DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
        )  # fmt: skip
    grid = (triton.cdiv(M, blocks.block_m) * triton.cdiv(N, blocks.block_n),)
    _lora_fwd_kernel[grid](
        x2, weight, bias if bias is not None else y, lora_A, lora_B, u, y,
        M, N, K, R,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        u.stride(0), y.stride(0), y.stride(1),
        scale / (1.0 - dropout_p), seed, dropout_p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, U_IN_K_LOOP=blocks.u_in_k_loop,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, BLOCK_R=block_r,
        GROUP_M=blocks.group_m, DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
    )  # fmt: skip
    return y, u


def lora_bwd(dy2, x2, weight, lora_A, lora_B, u, scale, dropout_p, seed, need_dx):
    """Returns ``(dx [M, K] in x's dtype or None, dA [R, K] fp32, dB [N, R] fp32)``."""
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    blocks = _blocks_for(x2.dtype)
    block_r = _block_r(blocks, R)
    dot_dtype, precision = _dot_settings(x2.dtype)
    lora_scale = scale / (1.0 - dropout_p)
    dev = x2.device
    if M == 0:
        dx = torch.zeros_like(x2) if need_dx else None
        return dx, torch.zeros((R, K), device=dev), torch.zeros((N, R), device=dev)
    launch = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    num_m = triton.cdiv(M, blocks.block_m)
    v = torch.empty((M, R), device=dev, dtype=torch.float32)
    db_part = torch.empty((num_m, N, R), device=dev, dtype=torch.float32)
    _lora_bwd_dyb_kernel[(num_m,)](
        dy2, lora_B, u, v, db_part, M, N, R,
        dy2.stride(0), dy2.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), v.stride(0),
        db_part.stride(0), db_part.stride(1),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_R=block_r,
        DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
    )  # fmt: skip
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format) if need_dx else None
    da_part = torch.empty((num_m, R, K), device=dev, dtype=torch.float32)
    grid = (num_m * triton.cdiv(K, blocks.block_k),)
    _lora_bwd_dx_kernel[grid](
        dy2, weight, v, lora_A, x2, dx if need_dx else x2, da_part,
        M, N, K, R,
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), v.stride(0),
        lora_A.stride(0), lora_A.stride(1), x2.stride(0), x2.stride(1),
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        da_part.stride(0), da_part.stride(1),
        lora_scale, seed, dropout_p,
        HAS_DROPOUT=dropout_p > 0.0, NEED_DX=need_dx,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, BLOCK_R=block_r,
        GROUP_M=blocks.group_m, DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
    )  # fmt: skip
    dA = da_part.sum(0).mul_(lora_scale)
    dB = db_part.sum(0).mul_(lora_scale)
    return dx, dA, dB


def keep_mask(rows: int, cols: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Materialise the kernels' keep mask (tests and debugging only)."""
    out = torch.empty((rows, cols), device=device, dtype=torch.int8)
    block_m, block_k = KEEP_MASK_BLOCKS_INTERPRETER if backend.interpreter_enabled() else KEEP_MASK_BLOCKS_GPU
    if rows and cols:
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
        _keep_mask_kernel[grid](out, rows, cols, seed, dropout_p, BLOCK_M=block_m, BLOCK_K=block_k)
    return out.bool()


# --------------------------------------------------------------------------- compile specs


def _compile_specs():
    """Every production launch config, for ``kernels.compile_check`` (sm_80 / sm_90 on the CPU).

    Unit strides are constexprs, as the JIT specialises them on contiguous tensors; the
    ``conv1d_w`` variants have the transposed weight of a GPT-2 Conv1D (unit stride on out).
    """
    from kernels.compile_check import CompileSpec, infer_signature

    floats = ("p", "lora_scale")
    specs = []

    def add(name, fn, pointers, constexprs, blocks, divisible=()):
        specs.append(CompileSpec(
            name, fn, infer_signature(fn, pointers, constexprs, floats), constexprs,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages, divisible_by_16=divisible,
        ))  # fmt: skip

    for tag, x_t, blocks, dot_dtype in (
        ("bf16", "*bf16", GPU_BLOCKS_16BIT, tl.bfloat16),
        ("fp32", "*fp32", GPU_BLOCKS_FP32, tl.float32),
    ):
        # bf16 activations with fp32 LoRA weights: the mixed case exercises the in-kernel casts.
        lora_t, f32p = "*fp32", "*fp32"
        tiles = dict(BLOCK_M=blocks.block_m, BLOCK_K=blocks.block_k, BLOCK_R=blocks.block_r,
                     DOT_DTYPE=dot_dtype, PRECISION="ieee")  # fmt: skip
        add(f"lora_down/{tag}", _lora_down_kernel, dict(x_ptr=x_t, a_ptr=lora_t, u_ptr=f32p),
            dict(stride_xk=1, stride_ak=1, HAS_DROPOUT=True, **tiles), blocks,
            ("K", "stride_xm", "stride_ar"))  # fmt: skip
        fwd_ptrs = dict(x_ptr=x_t, w_ptr=x_t, bias_ptr=x_t, a_ptr=lora_t, b_ptr=lora_t, u_ptr=f32p, y_ptr=x_t)
        # Variants only where the tiles are the production ones: the transposed (Conv1D) weight
        # and the u-in-the-K-loop forward on the bf16 path.
        w_layouts = [("", dict(stride_wk=1))] + ([("/conv1d_w", dict(stride_wn=1))] if tag == "bf16" else [])
        fwd_variants = [(suffix, strides, False) for suffix, strides in w_layouts]
        if tag == "bf16":
            fwd_variants.append(("/u_in_k_loop", dict(stride_wk=1), True))
        for suffix, w_strides, u_in_loop in fwd_variants:
            add(f"lora_fwd/{tag}{suffix}", _lora_fwd_kernel, fwd_ptrs,
                dict(stride_xk=1, stride_ak=1, stride_br=1, stride_yn=1, **w_strides,
                     HAS_BIAS=True, HAS_DROPOUT=True, U_IN_K_LOOP=u_in_loop,
                     BLOCK_N=blocks.block_n, GROUP_M=blocks.group_m, **tiles),
                blocks, ("N", "K", "stride_xm", "stride_ym", "stride_um", *w_strides.keys() ^ {"stride_wk", "stride_wn"}))  # fmt: skip
        add(f"lora_bwd_dyb/{tag}", _lora_bwd_dyb_kernel,
            dict(dy_ptr=x_t, b_ptr=lora_t, u_ptr=f32p, v_ptr=f32p, db_part_ptr=f32p),
            dict(stride_dyn=1, stride_br=1, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                 BLOCK_R=blocks.block_r, DOT_DTYPE=dot_dtype, PRECISION="ieee"),
            blocks, ("N", "stride_dym", "stride_bn", "stride_um", "stride_vm", "stride_dbp_m", "stride_dbp_n"))  # fmt: skip
        for suffix, w_strides in w_layouts:
            add(f"lora_bwd_dx/{tag}{suffix}", _lora_bwd_dx_kernel,
                dict(dy_ptr=x_t, w_ptr=x_t, v_ptr=f32p, a_ptr=lora_t, x_ptr=x_t, dx_ptr=x_t, da_part_ptr=f32p),
                dict(stride_dyn=1, stride_ak=1, stride_xk=1, stride_dxk=1, **w_strides,
                     HAS_DROPOUT=True, NEED_DX=True, BLOCK_N=blocks.block_n, GROUP_M=blocks.group_m, **tiles),
                blocks, ("N", "K", "stride_dym", "stride_xm", "stride_dxm", "stride_vm", "stride_dap_m",
                         "stride_dap_r", *w_strides.keys() ^ {"stride_wk", "stride_wn"}))  # fmt: skip
    add("keep_mask", _keep_mask_kernel, dict(out_ptr="*i8"), dict(BLOCK_M=KEEP_MASK_BLOCKS_GPU[0], BLOCK_K=KEEP_MASK_BLOCKS_GPU[1]),
        LoRABlocks(num_warps=4, num_stages=1), ("K",))  # fmt: skip
    return specs


COMPILE_SPECS = _compile_specs
