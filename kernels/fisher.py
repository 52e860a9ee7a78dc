"""Fisher-accumulating linear backward: the weight gradient and the exact per-sample
Fisher diagonal of a linear layer in one pass.

For a linear layer ``y = x W^T`` (``W`` is ``[out, in]``) with inputs ``x`` of shape
``(N, T, in)`` (or ``(N, in)``, i.e. ``T = 1``) and output gradients ``dy`` of shape
``(N, T, out)``, sample ``n``'s weight gradient is ``G_n = dy_n^T x_n`` (a sum over its T
positions).  This module computes

    grad_weight = sum_n G_n                 (the ordinary weight gradient)
    fisher      = sum_n G_n * G_n           (elementwise: the per-sample squares)

with fp32 accumulation, never holding the N per-sample gradients at once:

* Triton: one program per ``(out, in)`` tile loops over samples n and positions t,
  accumulating ``P = dy_n[:, tile]^T x_n[:, tile]`` in registers, then ``grad += P`` and
  ``fisher += P * P``.  Same FLOPs as the weight gradient plus one FMA per element per sample.
* torch (the CPU fast path): per row tile of ``[out, in]`` (``TORCH_TILE_BYTES``) and per
  sample, one matmul into a cache-resident tile, then ``fisher += P * P`` (``addcmul_``);
  memory beyond the accumulators is one tile.  For ``T = 1`` it is ``mm(dy^2, x^2)``.

``lengths`` (optional, one integer per sample) makes sample n its first ``lengths[n]``
positions: the rest are skipped, not multiplied.  In a right-padded batch of a causal LM,
``dy`` is exactly zero after each row's last loss position, so passing those lengths gives
the same result for less work (a quarter less when a quarter of the batch is padding).

The caller normalises (divides by N) if it wants a mean.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend

# Size of the fp32 per-sample gradient tile of the torch path.  The tile and the Fisher rows
# it is added to stay in the last-level cache while the samples go by; larger tiles mean
# fewer, larger matmuls.  Measured on the 2-core EPYC (32 MiB L3) by
# `python -m bench.probes.fisher_tile_size` (fisher-only in-place form, T = 48..256, the
# 4x512 Llama's layers): 4 MiB costs 1.10-1.63x the plain weight gradient, 1 MiB 1.22-1.83x,
# 256 KiB about 2x.
TORCH_TILE_BYTES = 4 << 20


# --------------------------------------------------------------------------- Triton


@triton.jit
def _grad_fisher_kernel(
    x_ptr, dy_ptr, grad_ptr, fisher_ptr, len_ptr,
    N, T, IN, OUT, SAMPLES_PER_PROGRAM,
    stride_xn, stride_xt, stride_xi,
    stride_dn, stride_dt, stride_do,
    stride_go, stride_gi,
    stride_fo, stride_fi,
    HAS_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, SPLIT_N: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Grid: (out tiles, in tiles, sample groups).  With SPLIT_N the samples are divided
    # between programs (more programs for small layers on a large GPU); each program's
    # partial sums of whole samples are then atomically added: per-sample products are
    # always complete inside one program, so squaring stays exact.
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    first_n = tl.program_id(2) * SAMPLES_PER_PROGRAM
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < OUT
    mask_i = offs_i < IN

    grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # Per-sample base pointers advance by pointer arithmetic (64-bit), so n * stride never
    # overflows int32 on large activations.
    x_base = x_ptr + first_n.to(tl.int64) * stride_xn
    dy_base = dy_ptr + first_n.to(tl.int64) * stride_dn
    for k in range(0, SAMPLES_PER_PROGRAM):
        # Past the last sample every position is masked off. Folding the scalar test into a
        # position limit keeps the mask a block comparison: `block & scalar_bool` is not a bool
        # mask under triton 3.9's interpreter ("mask has unsupported dtype").
        in_range = (first_n + k < N).to(tl.int32)
        if HAS_LENGTHS:  # sample n is its first lengths[n] positions (clamped to [0, T])
            length = tl.load(len_ptr + tl.minimum(first_n + k, N - 1)).to(tl.int32)
            t_limit = tl.minimum(tl.maximum(length, 0), T) * in_range
        else:
            t_limit = T * in_range
        per_sample = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, t_limit, BLOCK_T):  # skipped positions cost no iterations
            t = t0 + offs_t
            mask_t = t < t_limit
            dy = tl.load(
                dy_base + t[:, None] * stride_dt + offs_o[None, :] * stride_do,
                mask=mask_t[:, None] & mask_o[None, :], other=0.0,
            )
            x = tl.load(
                x_base + t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
                mask=mask_t[:, None] & mask_i[None, :], other=0.0,
            )
            per_sample += tl.dot(
                tl.trans(dy.to(DOT_DTYPE)), x.to(DOT_DTYPE), input_precision=INPUT_PRECISION
            )
        grad += per_sample
        fisher += per_sample * per_sample
        x_base += stride_xn
        dy_base += stride_dn

    mask = mask_o[:, None] & mask_i[None, :]
    f_ptrs = fisher_ptr + offs_o[:, None] * stride_fo + offs_i[None, :] * stride_fi
    g_ptrs = grad_ptr + offs_o[:, None] * stride_go + offs_i[None, :] * stride_gi
    if SPLIT_N:  # the accumulators hold the running sums (zeroed for the out-of-place form)
        tl.atomic_add(f_ptrs, fisher, mask=mask)
        if HAS_GRAD:
            tl.atomic_add(g_ptrs, grad, mask=mask)
    else:
        if ACCUMULATE:
            fisher += tl.load(f_ptrs, mask=mask, other=0.0)
        tl.store(f_ptrs, fisher, mask=mask)
        if HAS_GRAD:
            if ACCUMULATE:
                grad += tl.load(g_ptrs, mask=mask, other=0.0)
            tl.store(g_ptrs, grad, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(x: torch.Tensor, dy: torch.Tensor, interpreting: bool):
    """The dtype both operands are cast to before ``tl.dot``.

    Mixed inputs and anything under the interpreter (whose bf16 dot is wrong) go to fp32."""
    if interpreting or x.dtype != dy.dtype or x.dtype not in _TL_DTYPES:
        return tl.float32
    return _TL_DTYPES[x.dtype]


def _input_precision(dot_dtype) -> str:
    # fp32 operands follow torch's own matmul setting, so the Fisher is as exact as the
    # weight gradient torch would compute ("tf32" only when the user allowed it).
    if dot_dtype == tl.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _default_blocks(out_features: int, in_features: int, interpreting: bool) -> tuple[int, int, int]:
    if interpreting:
        # The interpreter pays per program and per loop iteration, not per element.
        return (min(128, triton.next_power_of_2(out_features)),
                min(128, triton.next_power_of_2(in_features)), 64)
    return 64, 64, 32


def _grad_fisher_triton(
    x3: torch.Tensor, dy3: torch.Tensor, grad_acc: torch.Tensor | None, fisher_acc: torch.Tensor,
    lengths: torch.Tensor | None, accumulate: bool, interpreting: bool,
    block_o: int | None = None, block_i: int | None = None, block_t: int | None = None,
    sample_groups: int | None = None, num_warps: int = 4, num_stages: int = 2,
) -> None:
    n, t, in_features = x3.shape
    out_features = dy3.shape[2]
    d_o, d_i, d_t = _default_blocks(out_features, in_features, interpreting)
    block_o, block_i, block_t = block_o or d_o, block_i or d_i, block_t or d_t
    dot_dtype = _dot_dtype(x3, dy3, interpreting)
    tiles = triton.cdiv(out_features, block_o) * triton.cdiv(in_features, block_i)
    if sample_groups is None:
        sample_groups = 1
        if x3.is_cuda:  # small layers: split the samples until the GPU has ~2 programs per SM
            sms = torch.cuda.get_device_properties(x3.device).multi_processor_count
            sample_groups = max(1, min(n, (2 * sms) // tiles))
    samples_per_program = triton.cdiv(n, max(1, sample_groups))
    groups = triton.cdiv(n, samples_per_program)
    split = groups > 1
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i), groups)
    has_grad = grad_acc is not None
    if split and not accumulate:  # the programs add into the accumulators
        fisher_acc.zero_()
        if has_grad:
            grad_acc.zero_()
    g = grad_acc if has_grad else fisher_acc  # placeholder pointer, never touched
    has_lengths = lengths is not None
    lens = lengths.to(device=x3.device, dtype=torch.int32).contiguous() if has_lengths else fisher_acc
    _grad_fisher_kernel[grid](
        x3, dy3, g, fisher_acc, lens,
        n, t, in_features, out_features, samples_per_program,
        x3.stride(0), x3.stride(1), x3.stride(2),
        dy3.stride(0), dy3.stride(1), dy3.stride(2),
        g.stride(0), g.stride(1),
        fisher_acc.stride(0), fisher_acc.stride(1),
        HAS_GRAD=has_grad, ACCUMULATE=accumulate, SPLIT_N=split, HAS_LENGTHS=has_lengths,
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=_input_precision(dot_dtype),
        num_warps=num_warps, num_stages=num_stages,
    )


# --------------------------------------------------------------------------- torch


def _grad_fisher_torch(
    x3: torch.Tensor, dy3: torch.Tensor, grad_acc: torch.Tensor | None, fisher_acc: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> None:
    """Adds into the accumulators (which the caller zeroed for the out-of-place form)."""
    n, t, in_features = x3.shape
    out_features = dy3.shape[2]
    x3, dy3 = x3.float(), dy3.float()
    rows_per_sample = [t] * n if lengths is None else [min(max(int(v), 0), t) for v in lengths.tolist()]
    if t == 1:
        # One position per sample: G_n is the outer product dy_n x_n^T, so
        # sum_n G_n^2 = (dy^2)^T (x^2) exactly, with no per-sample block at all.
        x2, dy2 = x3[:, 0, :], dy3[:, 0, :]
        if lengths is not None:
            kept = torch.tensor(rows_per_sample, device=x3.device) > 0
            x2, dy2 = x2[kept], dy2[kept]
        fisher_acc.addmm_(dy2.square().t(), x2.square())
        if grad_acc is not None:
            grad_acc.addmm_(dy2.t(), x2)
        return
    # Row tiles of the [out, in] block, samples innermost: the per-sample product of a tile
    # and its Fisher rows stay in cache while the samples go by, so the extra cost over the
    # weight gradient is one fused multiply-add per element per sample (addcmul_), not
    # full-size per-sample tensors going through memory.
    rows = max(64, TORCH_TILE_BYTES // (4 * in_features))
    tile = torch.empty((min(rows, out_features), in_features), dtype=torch.float32, device=x3.device)
    for o0 in range(0, out_features, rows):
        o1 = min(out_features, o0 + rows)
        block = tile[: o1 - o0]
        fisher_rows = fisher_acc[o0:o1]
        grad_rows = grad_acc[o0:o1] if grad_acc is not None else None
        for i, rows_i in enumerate(rows_per_sample):
            if rows_i == 0:
                continue
            torch.mm(dy3[i, :rows_i, o0:o1].t(), x3[i, :rows_i], out=block)
            fisher_rows.addcmul_(block, block)
            if grad_rows is not None:
                grad_rows.add_(block)


# --------------------------------------------------------------------------- public


def _as_3d(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != dy.dim() or x.dim() not in (2, 3):
        raise ValueError(
            f"x and dy must both be (N, in)/(N, out) or (N, T, in)/(N, T, out); got x {tuple(x.shape)}, "
            f"dy {tuple(dy.shape)}"
        )
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} disagree on the (N, T) dimensions")
    if x.dim() == 2:
        return x.unsqueeze(1), dy.unsqueeze(1)
    return x, dy


def _check_acc(name: str, acc: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> None:
    if acc is None:
        return
    if tuple(acc.shape) != shape or acc.dtype != torch.float32 or acc.device != device:
        raise ValueError(
            f"{name} must be a float32 tensor of shape {shape} on {device}; got {acc.dtype} "
            f"{tuple(acc.shape)} on {acc.device}"
        )


def _check_lengths(lengths: torch.Tensor | None, n: int) -> None:
    if lengths is None:
        return
    if lengths.dim() != 1 or lengths.shape[0] != n or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be an integer tensor of shape ({n},), one per sample; got "
                         f"{lengths.dtype} {tuple(lengths.shape)}")


def linear_grad_and_fisher_(
    x: torch.Tensor, dy: torch.Tensor, grad_acc: torch.Tensor | None, fisher_acc: torch.Tensor,
    *, block_o: int | None = None, block_i: int | None = None, block_t: int | None = None,
    sample_groups: int | None = None, lengths: torch.Tensor | None = None,
) -> None:
    """In place: ``grad_acc += sum_n dy_n^T x_n`` (skipped when ``grad_acc`` is None) and
    ``fisher_acc += sum_n (dy_n^T x_n)^2``; accumulators are fp32 ``[out, in]`` (any strides).

    ``lengths``: optional integer tensor ``(N,)``; sample n is then its first ``lengths[n]``
    positions (values are clamped to ``[0, T]``; see the module docstring).
    ``block_*`` set the Triton tile sizes (powers of two; ignored on the torch path);
    ``sample_groups`` splits the samples between that many programs per tile, whose sums are
    added atomically (default: 1 off CUDA, enough to fill the GPU on CUDA)."""
    x3, dy3 = _as_3d(x, dy)
    shape = (dy3.shape[2], x3.shape[2])
    _check_acc("fisher_acc", fisher_acc, shape, x.device)
    _check_acc("grad_acc", grad_acc, shape, x.device)
    _check_lengths(lengths, x3.shape[0])
    choice = backend.select(x, dy)
    if choice == "torch" or x3.shape[0] == 0:
        _grad_fisher_torch(x3, dy3, grad_acc, fisher_acc, lengths)
    else:
        _grad_fisher_triton(x3, dy3, grad_acc, fisher_acc, lengths, accumulate=True,
                            interpreting=choice == "interpret",
                            block_o=block_o, block_i=block_i, block_t=block_t, sample_groups=sample_groups)


def linear_grad_and_fisher(
    x: torch.Tensor, dy: torch.Tensor,
    *, block_o: int | None = None, block_i: int | None = None, block_t: int | None = None,
    sample_groups: int | None = None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_weight, fisher)``, both fp32 ``[out, in]``, for x ``(N, [T,] in)`` and dy
    ``(N, [T,] out)``: ``grad_weight = sum_n dy_n^T x_n``, ``fisher = sum_n (dy_n^T x_n)^2``.
    Keyword arguments as for :func:`linear_grad_and_fisher_`."""
    x3, dy3 = _as_3d(x, dy)
    shape = (dy3.shape[2], x3.shape[2])
    _check_lengths(lengths, x3.shape[0])
    choice = backend.select(x, dy)
    if choice == "torch" or x3.shape[0] == 0:
        grad = torch.zeros(shape, dtype=torch.float32, device=x.device)
        fisher = torch.zeros(shape, dtype=torch.float32, device=x.device)
        _grad_fisher_torch(x3, dy3, grad, fisher, lengths)
        return grad, fisher
    grad = torch.empty(shape, dtype=torch.float32, device=x.device)
    fisher = torch.empty(shape, dtype=torch.float32, device=x.device)
    _grad_fisher_triton(x3, dy3, grad, fisher, lengths, accumulate=False, interpreting=choice == "interpret",
                        block_o=block_o, block_i=block_i, block_t=block_t, sample_groups=sample_groups)
    return grad, fisher


# --------------------------------------------------------------------------- compile test


def _compile_specs() -> list:
    """The launch configurations :func:`_grad_fisher_triton` uses on CUDA, for
    ``python -m kernels.compile_check`` (contiguous inputs: unit strides are constexpr 1)."""
    from kernels.compile_check import CompileSpec, infer_signature

    specs = []
    block_o, block_i, block_t = _default_blocks(0, 0, interpreting=False)
    # fp16 compiles like bf16; the fisher-only variants (estimate_fisher's) also take the
    # split-samples (atomic) path and per-sample lengths.
    for name, dtype, dot_dtype, precision, grad_variants in (
        ("bf16", "*bf16", tl.bfloat16, "ieee", (True, False)),
        ("fp32", "*fp32", tl.float32, "ieee", (True,)),
        ("fp32_tf32", "*fp32", tl.float32, "tf32", (False,)),
    ):
        for has_grad in grad_variants:
            constexprs = dict(
                stride_xi=1, stride_do=1, stride_gi=1, stride_fi=1,
                HAS_GRAD=has_grad, ACCUMULATE=True, SPLIT_N=not has_grad, HAS_LENGTHS=not has_grad,
                BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t,
                DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
            )
            pointers = {"x_ptr": dtype, "dy_ptr": dtype, "grad_ptr": "*fp32", "fisher_ptr": "*fp32",
                        "len_ptr": "*i32"}
            specs.append(CompileSpec(
                name=f"grad_fisher/{name}" + ("" if has_grad else "/fisher_only/split_n/lengths"),
                fn=_grad_fisher_kernel,
                signature=infer_signature(_grad_fisher_kernel, pointers, constexprs),
                constexprs=constexprs, num_warps=4, num_stages=2,
                divisible_by_16=("IN", "OUT", "stride_xn", "stride_xt", "stride_dn", "stride_dt",
                                 "stride_go", "stride_fo"),
            ))
    return specs


COMPILE_SPECS = _compile_specs
