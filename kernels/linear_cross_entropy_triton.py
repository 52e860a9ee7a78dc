"""Triton kernels for the linear cross-entropy (see ``kernels/linear_cross_entropy.py`` for the
math, the torch path and the autograd Function that calls :func:`lce_forward` /
:func:`lce_backward`).

Notation: ``h [N, D]`` hidden states, ``W [V, D]`` the head, ``b [V]``, ``S = h Wᵀ + b`` the
logits, never stored; ``lse`` the per-token log-sum-exp; ``c_n`` the per-token gradient scale
(``grad_output / denominator``, 0 for ignored tokens), and ``G = c ⊙ (softmax(S) - onehot)``
the gradient of the loss with respect to S.

Forward, one launch (``_lce_fwd_kernel``): per block of tokens, loop over vocabulary tiles;
each tile of S is a ``BLOCK_N x BLOCK_V`` product accumulated over D in ``BLOCK_D`` steps, and
folds into a running max and sum of exponentials (online softmax) and the target logit.
The vocabulary can be split between ``split_v`` programs per token block (their partial
log-sum-exps are combined on the host) so that a few thousand tokens still fill a GPU.

Backward, two launches, each recomputing its tiles of S from h and W (one more product each,
the price of never storing ``[N, V]``):

* ``_lce_bwd_dh_kernel``: per token block (and vocabulary split), loop over vocabulary tiles:
  G tile, then ``dh[rows] += G W[tile]`` for each D block;
* ``_lce_bwd_dw_kernel``: per vocabulary block (and token split), loop over token tiles:
  G tile, then ``dW[tile] += Gᵀ h[rows]`` for each D block, and ``db[tile] += Σ G``.

Why two kernels and not one with atomics (Cut Cross-Entropy's choice, which computes each G
tile once for both products): a program owns its output rows, so the sums are plain
read-add-write of rows that stay in L2, deterministic from run to run, with no fp32 atomics
on ``[N, D]`` and ``[V, D]`` (V/BLOCK_V and N/BLOCK_N atomic adds per element respectively).
The cost is one more recomputation of S: five ``N·V·D`` products in all instead of four.
Not timed on a GPU yet (this project has none here): ``bench/gpu_check.sh`` is where to.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from kernels import backend

# --------------------------------------------------------------------------- kernels


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                 stride_hn, stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """S[rows, tile] = h[rows] W[tile]ᵀ + b[tile] in fp32; columns past V are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w_t = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_v[None, :] * stride_wv,
                      mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_part_ptr, target_part_ptr,
    N, V, D, TILES_PER_SPLIT,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * TILES_PER_SPLIT * BLOCK_V
    v_stop = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        s = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, PRECISION)
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        running_max = new_max
        is_target = offs_v[None, :] == labels[:, None]
        target += tl.sum(tl.where(is_target, s, 0.0), axis=1)
    # An empty split (past V) leaves -inf; the host's logsumexp over splits ignores it.
    lse = running_max + tl.log(running_sum)
    tl.store(lse_part_ptr + split * N + offs_n, lse, mask=mask_n)
    tl.store(target_part_ptr + split * N + offs_n, target, mask=mask_n)


@triton.jit
def _grad_logits_tile(s, lse, labels, row_scale, offs_v, mask_v):
    """G = c ⊙ (softmax(S) - onehot(label)) for one tile (0 past V)."""
    p = tl.where(mask_v[None, :], tl.exp(s - lse[:, None]), 0.0)
    p = p - tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    return p * row_scale[:, None]


@triton.jit
def _lce_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, scale_ptr, dh_part_ptr,
    N, V, D, TILES_PER_SPLIT,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_ps, stride_pn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    row_scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    out_base = dh_part_ptr + split.to(tl.int64) * stride_ps
    v_start = split * TILES_PER_SPLIT * BLOCK_V
    v_stop = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        s = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, PRECISION)
        g = _grad_logits_tile(s, lse, labels, row_scale, offs_v, mask_v).to(DOT_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            out = out_base + offs_n[:, None] * stride_pn + offs_d[None, :]
            out_mask = mask_n[:, None] & mask_d[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(g, w.to(DOT_DTYPE), acc, input_precision=PRECISION)
            tl.store(out, acc, mask=out_mask)


@triton.jit
def _lce_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, scale_ptr, dw_part_ptr, db_part_ptr,
    N, V, D, TILES_PER_SPLIT,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_ps, stride_pv,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    split = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    out_base = dw_part_ptr + split.to(tl.int64) * stride_ps
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    n_start = split * TILES_PER_SPLIT * BLOCK_N
    n_stop = tl.minimum(N, n_start + TILES_PER_SPLIT * BLOCK_N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_stop
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        row_scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        s = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, PRECISION)
        g = _grad_logits_tile(s, lse, labels, row_scale, offs_v, mask_v)
        if NEED_DB:
            db += tl.sum(g, axis=0)
        g_t = tl.trans(g.to(DOT_DTYPE))
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            out = out_base + offs_v[:, None] * stride_pv + offs_d[None, :]
            out_mask = mask_v[:, None] & mask_d[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(g_t, h.to(DOT_DTYPE), acc, input_precision=PRECISION)
            tl.store(out, acc, mask=out_mask)
    if NEED_DB:
        tl.store(db_part_ptr + split * V + offs_v, db, mask=mask_v)


# --------------------------------------------------------------------------- tile sizes


@dataclasses.dataclass(frozen=True)
class LCEBlocks:
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    split: int | None = None  # programs sharing one block's loop (None: enough to fill the GPU)


# 16-bit inputs: per stage a 64x64 h tile and a 64x128 W tile (24 KiB): 3 stages fit every target.
GPU_BLOCKS_16BIT = LCEBlocks()
# fp32 doubles the bytes per tile: two stages (kernels.compile_check checks the sizes).
GPU_BLOCKS_FP32 = LCEBlocks(block_d=32, num_stages=2)
# The interpreter pays per program and loop trip, not per element: few, large tiles.
INTERPRETER_BLOCKS = LCEBlocks(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=1, split=1)

_override: LCEBlocks | None = None


@contextlib.contextmanager
def use_blocks(blocks: LCEBlocks) -> Iterator[None]:
    """Force tile sizes (and the split) inside a ``with`` block; tests use small tiles."""
    global _override
    previous, _override = _override, blocks
    try:
        yield
    finally:
        _override = previous


def _blocks_for(dtype: torch.dtype) -> LCEBlocks:
    if _override is not None:
        return _override
    if backend.interpreter_enabled():
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS_16BIT


def _dot_settings(dtype: torch.dtype) -> tuple:
    """(DOT_DTYPE, PRECISION): fp32 under the interpreter (its bf16 dot is wrong); fp32 on the
    GPU follows torch's matmul switch (tf32 only when allowed); bf16/fp16 stay as they are."""
    if backend.interpreter_enabled() or dtype == torch.float32:
        tf32 = (not backend.interpreter_enabled()) and torch.backends.cuda.matmul.allow_tf32
        return tl.float32, ("tf32" if tf32 else "ieee")
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"


def _split(blocks: LCEBlocks, programs: int, tiles: int, device: torch.device) -> int:
    """How many programs share one block's loop: enough for ~2 programs per SM."""
    if blocks.split is not None:
        return max(1, min(blocks.split, tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(2 * sms, max(1, programs))))


# --------------------------------------------------------------------------- launchers


def _common(h, w, blocks):
    dot_dtype, precision = _dot_settings(h.dtype)
    return dict(HAS_BIAS=False, BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_D=blocks.block_d,
                DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=blocks.num_warps,
                num_stages=blocks.num_stages)


_INT32_LIMIT = 2**31


def _check_offsets_fit_int32(n: int, v: int, d: int) -> None:
    # Element offsets inside the kernels are int32 (cheaper address math).
    if max(n * d, v * d) >= _INT32_LIMIT:
        raise ValueError(f"linear_cross_entropy (Triton): an operand of [{max(n, v)}, {d}] has over 2^31 "
                         "elements; pass fewer tokens per call")


def lce_forward(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor):
    """``(lse [N] fp32, target logit [N] fp32)``; ``labels`` int32 (ignored ones out of [0, V))."""
    n, d = h.shape
    v = w.shape[0]
    _check_offsets_fit_int32(n, v, d)
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty
    blocks = _blocks_for(h.dtype)
    token_blocks = triton.cdiv(n, blocks.block_n)
    tiles = triton.cdiv(v, blocks.block_v)
    split = _split(blocks, token_blocks, tiles, h.device)
    per_split = triton.cdiv(tiles, split)
    lse_part = torch.empty((split, n), dtype=torch.float32, device=h.device)
    target_part = torch.empty((split, n), dtype=torch.float32, device=h.device)
    launch = _common(h, w, blocks) | dict(HAS_BIAS=b is not None)
    _lce_fwd_kernel[(token_blocks, split)](
        h, w, b if b is not None else h, labels, lse_part, target_part,
        n, v, d, per_split, h.stride(0), h.stride(1), w.stride(0), w.stride(1), **launch,
    )
    if split == 1:
        return lse_part[0], target_part[0]
    return torch.logsumexp(lse_part, dim=0), target_part.sum(0)


def lce_backward(h, w, b, labels, lse, row_scale, need_dh: bool, need_dw: bool, need_db: bool):
    """``(dh [N, D] fp32 | None, dW [V, D] fp32 | None, db [V] fp32 | None)`` for the loss whose
    per-token weights are ``row_scale`` (0 for ignored tokens)."""
    n, d = h.shape
    v = w.shape[0]
    blocks = _blocks_for(h.dtype)
    launch = _common(h, w, blocks) | dict(HAS_BIAS=b is not None)
    bias_arg = b if b is not None else h
    dh = dw = db = None
    if n == 0:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=h.device)  # noqa: E731
        return (zeros(0, d) if need_dh else None, zeros(v, d) if need_dw else None, zeros(v) if need_db else None)
    if need_dh:
        token_blocks = triton.cdiv(n, blocks.block_n)
        tiles = triton.cdiv(v, blocks.block_v)
        split = _split(blocks, token_blocks, tiles, h.device)
        part = torch.zeros((split, n, d), dtype=torch.float32, device=h.device)
        _lce_bwd_dh_kernel[(token_blocks, split)](
            h, w, bias_arg, labels, lse, row_scale, part,
            n, v, d, triton.cdiv(tiles, split),
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), part.stride(0), part.stride(1), **launch,
        )
        dh = part[0] if split == 1 else part.sum(0)
    if need_dw or need_db:
        vocab_blocks = triton.cdiv(v, blocks.block_v)
        tiles = triton.cdiv(n, blocks.block_n)
        # A token split multiplies the [V, D] partials: only when the vocabulary is too small
        # to fill the GPU by itself.
        split = _split(blocks, vocab_blocks, tiles, h.device) if vocab_blocks < 64 or blocks.split else 1
        part = torch.zeros((split, v, d) if need_dw else (1, 1, 1), dtype=torch.float32, device=h.device)
        db_part = torch.empty((split, v), dtype=torch.float32, device=h.device)
        _lce_bwd_dw_kernel[(vocab_blocks, split)](
            h, w, bias_arg, labels, lse, row_scale, part, db_part,
            n, v, d, triton.cdiv(tiles, split),
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), part.stride(0), part.stride(1),
            NEED_DB=need_db, **launch,
        )
        if need_dw:
            dw = part[0] if split == 1 else part.sum(0)
        if need_db:
            db = db_part.sum(0)
    return dh, dw, db


# --------------------------------------------------------------------------- compile specs


def _compile_specs() -> list:
    """Every production launch config, for ``kernels.compile_check`` (contiguous h and W: the
    D strides are constexpr 1, as the JIT specialises them)."""
    from kernels.compile_check import CompileSpec, infer_signature

    specs = []
    for tag, ptr, blocks, dot_dtype in (("bf16", "*bf16", GPU_BLOCKS_16BIT, tl.bfloat16),
                                        ("fp32", "*fp32", GPU_BLOCKS_FP32, tl.float32)):
        tiles = dict(stride_hd=1, stride_wd=1, HAS_BIAS=True, BLOCK_N=blocks.block_n,
                     BLOCK_V=blocks.block_v, BLOCK_D=blocks.block_d, DOT_DTYPE=dot_dtype, PRECISION="ieee")
        inputs = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr, labels_ptr="*i32")
        divisible = ("D", "stride_hn", "stride_wv")
        for name, fn, outputs, extra in (
            ("lce_fwd", _lce_fwd_kernel, dict(lse_part_ptr="*fp32", target_part_ptr="*fp32"), {}),
            ("lce_bwd_dh", _lce_bwd_dh_kernel, dict(lse_ptr="*fp32", scale_ptr="*fp32", dh_part_ptr="*fp32"), {}),
            ("lce_bwd_dw", _lce_bwd_dw_kernel,
             dict(lse_ptr="*fp32", scale_ptr="*fp32", dw_part_ptr="*fp32", db_part_ptr="*fp32"), dict(NEED_DB=True)),
        ):
            constexprs = tiles | extra
            specs.append(CompileSpec(
                name=f"{name}/{tag}", fn=fn,
                signature=infer_signature(fn, inputs | outputs, constexprs),
                constexprs=constexprs, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                divisible_by_16=divisible + (("stride_ps", "stride_pn") if name == "lce_bwd_dh" else ())
                + (("stride_ps", "stride_pv") if name == "lce_bwd_dw" else ()),
            ))
    return specs


COMPILE_SPECS = _compile_specs
