"""A linear head and its loss without the ``[tokens, vocab]`` logits: cross-entropy, the KL
between two heads' distributions, and the KL to a teacher's stored top-k.

``linear_cross_entropy(h, W, labels)`` is ``F.cross_entropy(h Wᵀ + b, labels, reduction="sum")``
(or ``"mean"`` over the tokens not equal to ``ignore_index``), differentiable in h, W and b.
With a 49,152-token vocabulary the logits of 8 x 512 tokens are 0.8 GB per fp32 copy, and
autograd keeps several (logits, softmax, their gradient); here they exist one chunk at a time.

Two implementations, picked by :func:`kernels.backend.select`:

* the **torch path** (CPU; also the tests' second oracle).  Tokens go in chunks of
  ``chunk_bytes // (V · bytes per logit)`` rows (:data:`CHUNK_BYTES` by default).  Per chunk,
  in one pass (Liger-Kernel's approach): the logits in the compute dtype, log-softmax and loss
  in fp32, the gradient of the logits ``softmax - onehot`` written over them in place, then
  ``dh = G W`` for the chunk and ``dW += Gᵀ h``, ``db += Σ G`` accumulated in fp32.  The
  autograd backward only multiplies these by ``grad_output``.  Peak memory: one chunk of
  logits (and its fp32 copy under bf16) plus dh, dW.
* the **Triton path** (CUDA; ``kernels/linear_cross_entropy_triton.py``): online softmax over
  vocabulary tiles in forward (per-token log-sum-exp and target logit only), and dh, dW, db
  from recomputed tiles in backward.  Nothing of size ``[N, V]`` is ever stored.

Precision: under autocast (CPU or CUDA) the matmuls run in the autocast dtype (h, W, b cast
down; W stays an fp32 master), softmax, loss and the accumulated dW, db in fp32 (float64 when
the inputs are float64, for ``gradcheck``); the loss returned is fp32.  A tied head (W the
embedding matrix) gets its gradient added to the embedding's by autograd as usual.

The KL functions reuse the same chunk loop, torch path only (no Triton kernel: on CUDA their
chunks run as cuBLAS GEMMs, which is what the chunking needs to be bounded in memory).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kernels import backend

__all__ = ["CHUNK_BYTES", "linear_cross_entropy", "linear_kl_divergence", "linear_kl_from_topk", "topk_log_probs"]

# Memory budget of one chunk's [rows, V] temporaries (logits, their fp32 copy under bf16, and
# for the KL the teacher's).  128 MiB is 341 tokens of a 49,152-token vocabulary under bf16
# (2 + 4 + 2 bytes a logit): each chunk's three GEMMs against the whole head pay for fresh
# library scratch, so taller chunks are faster (bench/probes/lce_chunk_size.py: 2.64 s for
# SmolLM2's head at 8 x 512 against 3.18 s at 64 MiB); it stays a small fraction of what
# the full logits take (8 x 512 tokens: 0.8 GB per fp32 copy).
CHUNK_BYTES = 128 << 20

_REDUCTIONS = ("sum", "mean")
# Per-token weights of the cross-entropy: none, or each token's own detached probability (DFT).
WEIGHTINGS = ("none", "probability")


# =========================================================================== the chunk loop


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(vocab: int, bytes_per_logit: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, vocab * bytes_per_logit))


class _Scratch:
    """The chunk loop's ``[rows, V]`` buffers, allocated once per call and reused by every chunk.

    A fresh tensor per chunk would be a fresh allocation per chunk: at 49k words a chunk's
    fp32 logits are over glibc's 32 MiB mmap threshold, so each one is mapped, page-faulted
    and unmapped again. Measured on SmolLM2-135M's head at 8 x 512 tokens under bf16 (64 MiB
    chunks, 2 threads, medians of 6): 3.22 s a call reused against 3.63 s fresh, 0.76 M
    against 1.13 M minor page faults."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, m: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``[m, V]`` view (``m <= rows``) of buffer ``name``: valid until the next take of it."""
        key = (name, dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty((self.rows, self.vocab), dtype=dtype, device=self.device)
        return buf[:m]


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype,
            scratch: _Scratch, name: str = "logits") -> torch.Tensor:
    """``h wᵀ + b`` in h's dtype (library GEMM, fp32 accumulation inside), returned in ``acc``,
    in ``scratch``'s buffers ``name`` (compute dtype) and ``name`` (acc dtype)."""
    z = scratch.take(name, h.shape[0], h.dtype)
    if b is None:
        torch.mm(h, w.t(), out=z)
    else:
        torch.addmm(b, h, w.t(), out=z)
    return z if z.dtype == acc else scratch.take(name, h.shape[0], acc).copy_(z)


ChunkLoss = Callable[[int, int, torch.Tensor, bool, _Scratch], tuple[torch.Tensor, torch.Tensor | None]]


def _head_pass(h, w, b, rows: int, need_dh: bool, need_dw: bool, need_db: bool, chunk_loss: ChunkLoss):
    """For chunks of rows of ``h`` (compute dtype): ``chunk_loss(start, stop, logits, need_grad, scratch)``
    returns the chunk's summed loss and the gradient of it in the logits (may overwrite the
    logits it was given); this accumulates ``(loss, dh, dW, db)`` (None where not needed;
    dh in h's dtype, dW and db in the accumulation dtype)."""
    n, d = h.shape
    acc = _acc_dtype(h.dtype)
    need_grad = need_dh or need_dw or need_db
    loss = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty((n, d), dtype=h.dtype, device=h.device) if need_dh else None
    dw = torch.zeros((w.shape[0], d), dtype=acc, device=h.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=acc, device=h.device) if need_db else None
    dw_chunk = None  # reused [V, D] partial when dW is accumulated in a wider dtype than h
    scratch = _Scratch(min(rows, n), w.shape[0], h.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        hc = h[start:stop]
        part, g = chunk_loss(start, stop, _logits(hc, w, b, acc, scratch), need_grad, scratch)
        loss += part
        if g is None:
            continue
        if db is not None:
            db += g.sum(0)
        if g.dtype != h.dtype:  # the compute-dtype logits buffer is free again: the GEMMs' input
            g = scratch.take("logits", stop - start, h.dtype).copy_(g)
        if dh is not None:
            torch.mm(g, w, out=dh[start:stop])
        if dw is not None:
            if dw.dtype == g.dtype:
                dw.addmm_(g.t(), hc)
            else:  # no mixed-dtype addmm on CPU: a bf16 partial per chunk, summed in fp32
                dw_chunk = torch.mm(g.t(), hc) if dw_chunk is None else torch.mm(g.t(), hc, out=dw_chunk)
                dw += dw_chunk
        del g
    return loss, dh, dw, db


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _row_count(h: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The mean's denominator when every row counts (the public faces dropped the others)."""
    return torch.tensor(float(h.shape[0]), dtype=loss.dtype, device=loss.device)


def _loss_scale(grad_out: torch.Tensor, denominator: torch.Tensor | None) -> torch.Tensor:
    return grad_out if denominator is None else grad_out / denominator


def _begin_torch_forward(ctx, h, w, b, want_grads: bool) -> tuple[torch.dtype, tuple[bool, bool, bool]]:
    """The KL Functions' common start: the compute dtype, which of (dh, dW, db) to produce, and
    the inputs' dtypes remembered for backward."""
    ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
    return backend.compute_dtype(h), tuple(want_grads and ctx.needs_input_grad[i] for i in range(3))


def _end_torch_forward(ctx, h: torch.Tensor, loss: torch.Tensor, grads, reduction: str) -> torch.Tensor:
    """Save the gradients the torch path computed in forward; the loss (a mean over rows when
    asked), in fp32 unless the run is in float64."""
    denominator = _row_count(h, loss) if reduction == "mean" else None
    ctx.save_for_backward(*grads, denominator)
    if denominator is not None:
        loss = loss / denominator
    return loss.float() if loss.dtype != torch.float64 else loss


def _torch_backward(ctx, grad_out: torch.Tensor, n_inputs: int) -> tuple:
    dh, dw, db, denominator = ctx.saved_tensors
    return _grads_out(ctx, (dh, dw, db), _loss_scale(grad_out, denominator), n_inputs)


def _grads_out(ctx, grads, scale: torch.Tensor | None, n_inputs: int) -> tuple:
    """The gradients ``(dh, dW, db)`` times ``scale`` (None: as they are), in the inputs'
    dtypes, then None for the other ``n_inputs - 3`` inputs."""
    if scale is not None and scale.device.type == "cpu" and float(scale) == 1.0:
        scale = None  # the usual loss.backward(): no pass over dW just to multiply by 1
    out = []
    for grad, dtype in zip(grads, ctx.dtypes, strict=True):
        if grad is not None and scale is not None:
            grad = grad * scale.to(grad.dtype)
        out.append(None if grad is None else grad.to(dtype))
    return (*out, *([None] * (n_inputs - 3)))


# =========================================================================== cross-entropy


def _ce_torch(h, w, b, labels, valid, chunk_bytes, need_dh, need_dw, need_db, weighting="none"):
    acc = _acc_dtype(h.dtype)
    # Per logit: the acc-dtype logits (overwritten by their gradient), plus under bf16 the
    # bf16 GEMM output and the bf16 copy of the gradient that feeds the two GEMMs.
    per_logit = acc.itemsize + (2 * h.dtype.itemsize if h.dtype != acc else 0)
    rows = _rows_per_chunk(w.shape[0], per_logit, chunk_bytes)
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    all_valid = bool(valid.all())

    def chunk_loss(start, stop, z, need_grad, scratch):
        lab, ok = safe[start:stop], valid[start:stop]
        target = z.gather(1, lab).squeeze(1)
        # log-sum-exp by hand, in place: torch.logsumexp would allocate a [rows, V] temporary,
        # and the exponentials are the softmax's numerators anyway.
        top = z.amax(dim=1, keepdim=True)
        total = z.sub_(top).exp_().sum(dim=1, keepdim=True)
        nll = torch.where(ok, (top + total.log()).squeeze(1) - target, 0.0)
        # DFT: each token's loss times its own probability exp(-nll), a constant for autograd,
        # so the gradient in the logits is that weight times (softmax - onehot).
        token_weight = torch.where(ok, (-nll).exp(), 0.0) if weighting == "probability" else None
        part = nll.sum() if token_weight is None else (token_weight * nll).sum()
        if not need_grad:
            return part, None
        g = z.div_(total)  # softmax, in place of the logits
        g.scatter_add_(1, lab, torch.full_like(lab, -1, dtype=g.dtype))
        if token_weight is not None:
            g.mul_(token_weight.unsqueeze(1))  # zero on ignored rows too
        elif not all_valid:
            g.mul_(ok.unsqueeze(1))
        return part, g

    return _head_pass(h, w, b, rows, need_dh, need_dw, need_db, chunk_loss)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Torch path: gradients computed in forward, scaled in backward.  Triton path: forward
    keeps the per-token log-sum-exp; backward recomputes tiles of the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_bytes, want_grads,
                weighting="none"):
        which = backend.select(hidden, weight)
        dtype = backend.compute_dtype(hidden)
        need_dh, need_dw, need_db = (want_grads and ctx.needs_input_grad[i] for i in range(3))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.which = which
        with backend.autocast_off(hidden):
            h = hidden.to(dtype)
            valid = labels != ignore_index
            count = valid.sum()
            denominator = count.to(_acc_dtype(dtype)) if reduction == "mean" else None
            if which == "torch":
                loss, dh, dw, db = _ce_torch(h, weight.to(dtype), _cast(bias, dtype), labels, valid, chunk_bytes,
                                             need_dh, need_dw, need_db, weighting)
                ctx.save_for_backward(dh, dw, db, denominator)
            else:
                from kernels import linear_cross_entropy_triton as lce

                labels32 = torch.where(valid, labels, -1).to(torch.int32)
                w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
                lse, target = lce.lce_forward(h, w, b, labels32)
                nll = torch.where(valid, lse - target, 0.0)
                # The kernels' per-token gradient scale carries the 0/1 of ignored tokens, and
                # under DFT each token's own detached probability exp(-nll) as well.
                token_weight = torch.where(valid, (-nll).exp(), 0.0) if weighting == "probability" else valid.float()
                loss = (token_weight * nll).sum()
                del w, b
                ctx.save_for_backward(h, weight, bias, labels32, lse, token_weight, denominator)
        ctx.needs = (need_dh, need_dw, need_db)
        if denominator is not None:
            loss = loss / denominator
        return loss.float() if loss.dtype != torch.float64 else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.which == "torch":
            dh, dw, db, denominator = ctx.saved_tensors
            return _grads_out(ctx, (dh, dw, db), _loss_scale(grad_out, denominator), 9)
        from kernels import linear_cross_entropy_triton as lce

        h, weight, bias, labels32, lse, token_weight, denominator = ctx.saved_tensors
        with backend.autocast_off(h):
            # grad_output and the mean's 1/count ride in the per-token weights of the kernels.
            row_scale = token_weight.float() * _loss_scale(grad_out, denominator).float()
            grads = lce.lce_backward(h, weight.to(h.dtype), _cast(bias, h.dtype), labels32, lse, row_scale,
                                     *ctx.needs)
        return _grads_out(ctx, grads, None, 9)


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be [vocab, hidden={hidden.shape[-1]}] "
                         f"for hidden states {tuple(hidden.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} must be [vocab={weight.shape[0]}]")


def _check_common(name: str, reduction: str, chunk_bytes: int) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r} is not one of {', '.join(_REDUCTIONS)}")
    if int(chunk_bytes) < 1:
        raise ValueError(f"{name}: chunk_bytes={chunk_bytes} must be positive")


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "sum", chunk_bytes: int | None = None, weighting: str = "none",
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without the full logits.

    ``hidden [..., d]``, ``weight [V, d]`` (a tied embedding's own Parameter is fine),
    ``labels`` with one entry per row of hidden (any shape with that many elements).
    Tokens whose label is ``ignore_index`` add zero loss and zero gradient.  ``"sum"`` is the
    summed loss (exact; a trainer divides by its own token count); ``"mean"`` divides by the
    number of non-ignored tokens (NaN when there are none, as ``F.cross_entropy``).  Returns an
    fp32 scalar (float64 for float64 inputs).  ``chunk_bytes``: the torch path's per-chunk
    memory budget (default :data:`CHUNK_BYTES`).

    ``weighting="probability"`` (DFT, arXiv 2508.05629): each token's loss ``nll`` is multiplied
    by the token's own probability ``exp(-nll)``, held constant for the gradient, which is
    then ``exp(-nll) (softmax - onehot)`` in the logits; the weight comes out of the same
    chunk pass (torch) or the same log-sum-exp (Triton), so it costs no extra GEMM."""
    _check_head("linear_cross_entropy", hidden, weight, bias)
    _check_common("linear_cross_entropy", reduction, chunk_bytes or CHUNK_BYTES)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"linear_cross_entropy: weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if labels.numel() != hidden2.shape[0] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"linear_cross_entropy: labels ({labels.dtype}, {tuple(labels.shape)}) must be integer "
                         f"with one entry per row of hidden {tuple(hidden.shape)}")
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: label {int(labels[first])} at position {first} is outside "
                         f"[0, {vocab}) and is not ignore_index={ignore_index}")
    kept = _kept_rows("linear_cross_entropy", labels != ignore_index, labels.shape[0], hidden.device)
    return LinearCrossEntropyFunction.apply(_rows(hidden2, kept), weight, bias, _rows(labels, kept), int(ignore_index),
                                            reduction, int(chunk_bytes or CHUNK_BYTES), torch.is_grad_enabled(),
                                            weighting)


# =========================================================================== KL between two heads


def _kl_torch(h, w, b, h_t, w_t, b_t, kind, chunk_bytes, need_dh, need_dw, need_db, beta=0.5):
    acc = _acc_dtype(h.dtype)
    # Per logit: student and teacher logits in acc dtype, one acc temporary (two for the JSD's
    # log-mixture), and the two heads' bf16 GEMM outputs under bf16.
    per_logit = (4 if kind == "jsd" else 3) * acc.itemsize + (2 * h.dtype.itemsize if h.dtype != acc else 0)
    rows = _rows_per_chunk(w.shape[0], per_logit, chunk_bytes)

    def chunk_loss(start, stop, z, need_grad, scratch):
        log_ps = z.sub_(torch.logsumexp(z, dim=1, keepdim=True))
        log_pt = _logits(h_t[start:stop], w_t, b_t, acc, scratch, "teacher")
        log_pt -= torch.logsumexp(log_pt, dim=1, keepdim=True)
        if kind == "jsd":
            return _jsd_chunk(log_ps, log_pt, beta, need_grad, scratch.take("difference", stop - start, acc),
                              scratch.take("mixture", stop - start, acc))
        if kind == "forward":  # sum p_t (log p_t - log p_s); d/dz_s = p_s - p_t
            diff = torch.sub(log_pt, log_ps, out=scratch.take("difference", stop - start, acc))
            p_t = log_pt.exp_()
            part = diff.mul_(p_t).sum()
            del diff
            return part, (log_ps.exp_().sub_(p_t) if need_grad else None)
        # reverse: sum p_s (log p_s - log p_t); d/dz_s = p_s (log p_s - log p_t - KL)
        r = torch.sub(log_ps, log_pt, out=scratch.take("difference", stop - start, acc))
        p_s = log_ps.exp_()
        rows_kl = torch.mul(p_s, r, out=log_pt).sum(1, keepdim=True)
        return rows_kl.sum(), (r.sub_(rows_kl).mul_(p_s) if need_grad else None)

    return _head_pass(h, w, b, rows, need_dh, need_dw, need_db, chunk_loss)


def _jsd_chunk(log_ps, log_pt, beta, need_grad, diff, mix):
    """Generalised Jensen-Shannon divergence of one chunk, with ``M = β p_t + (1-β) p_s``:
    ``β KL(p_t || M) + (1-β) KL(p_s || M)``, and its gradient in the student's logits.

    Derivation: the loss is ``β Σ p_t log p_t + (1-β) Σ p_s log p_s - Σ M log M``, so
    ``∂L/∂p_s(v) = (1-β)(log p_s(v) - log M(v)) =: a(v)`` (the ``+1`` terms cancel), and
    through the softmax ``∂L/∂z_s(u) = p_s(u) (a(u) - Σ_v p_s(v) a(v))``, where
    ``Σ_v p_s a = (1-β) KL(p_s || M)``.  ``log M`` is a log-add-exp of the two log-softmaxes
    (no underflow to ``log 0`` where both probabilities are tiny).  Overwrites every buffer."""
    log_m = torch.add(log_pt, math.log(beta), out=mix)
    torch.logaddexp(log_m, torch.add(log_ps, math.log1p(-beta), out=diff), out=log_m)
    teacher_terms = torch.sub(log_pt, log_m, out=diff)  # log p_t - log M
    teacher_part = teacher_terms.mul_(log_pt.exp_()).sum()  # KL(p_t || M), p_t written over log p_t
    r = torch.sub(log_ps, log_m, out=diff)  # log p_s - log M
    p_s = log_ps.exp_()
    rows_kl = torch.mul(p_s, r, out=log_m).sum(1, keepdim=True)  # KL(p_s || M) per row
    part = beta * teacher_part + (1.0 - beta) * rows_kl.sum()
    return part, (r.sub_(rows_kl).mul_(p_s).mul_(1.0 - beta) if need_grad else None)


class LinearKLFunction(torch.autograd.Function):
    """Gradients in forward (torch path), for the student's h, W and b only."""

    @staticmethod
    def forward(ctx, h, w, b, h_t, w_t, b_t, kind, reduction, chunk_bytes, want_grads, beta=0.5):
        dtype, need = _begin_torch_forward(ctx, h, w, b, want_grads)
        with torch.no_grad(), backend.autocast_off(h):
            loss, *grads = _kl_torch(h.to(dtype), w.to(dtype), _cast(b, dtype), h_t.to(dtype),
                                     w_t.to(dtype), _cast(b_t, dtype), kind, chunk_bytes, *need, beta=beta)
        return _end_torch_forward(ctx, h, loss, grads, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _torch_backward(ctx, grad_out, 11)


def _kept_rows(name: str, mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """Indices of the rows ``mask`` keeps, or None when it keeps them all.  Rows that count
    for nothing are dropped before the head, so they cost no GEMM (prompt tokens in SFT are
    often half of a batch); their gradient is zero through ``index_select``'s backward."""
    if mask is None:
        return None
    if mask.numel() != n or mask.is_floating_point():
        raise ValueError(f"{name}: mask ({mask.dtype}, {tuple(mask.shape)}) must be boolean with one entry "
                         f"per token ({n})")
    mask = mask.reshape(-1).to(device=device, dtype=torch.bool)
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def _rows(t: torch.Tensor | None, kept: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or kept is None else t.index_select(0, kept)


def linear_kl_divergence(
    h_student: torch.Tensor, W_student: torch.Tensor, h_teacher: torch.Tensor, W_teacher: torch.Tensor,
    mask: torch.Tensor | None = None, kind: str = "forward", bias_student: torch.Tensor | None = None,
    bias_teacher: torch.Tensor | None = None, reduction: str = "sum", chunk_bytes: int | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Token-level KL between the next-token distributions of two linear heads, summed over
    the tokens where ``mask`` is True (all when None; ``"mean"`` divides by their count).

    ``kind="forward"``: ``KL(teacher || student) = Σ_v p_t (log p_t - log p_s)``;
    ``kind="reverse"``: ``KL(student || teacher) = Σ_v p_s (log p_s - log p_t)``;
    ``kind="jsd"``: the generalised Jensen-Shannon divergence with ``M = β p_t + (1-β) p_s``,
    ``β KL(p_t || M) + (1-β) KL(p_s || M)`` (``beta`` in (0, 1); 0.5 is the symmetric JSD,
    bounded by log 2 per token).
    Gradients flow to ``h_student``, ``W_student`` and ``bias_student`` only; the teacher's
    tensors are treated as constants.  Both heads share the vocabulary (their widths may
    differ).  At most one chunk of ``[tokens, vocab]`` per head exists at a time."""
    name = "linear_kl_divergence"
    _check_head(name, h_student, W_student, bias_student)
    _check_head(name, h_teacher, W_teacher, bias_teacher)
    _check_common(name, reduction, chunk_bytes or CHUNK_BYTES)
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"{name}: kind={kind!r} is not 'forward', 'reverse' or 'jsd'")
    if kind == "jsd" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"{name}: beta={beta} must be in (0, 1) for kind='jsd'")
    if W_student.shape[0] != W_teacher.shape[0]:
        raise ValueError(f"{name}: the heads' vocabularies differ ({W_student.shape[0]} vs {W_teacher.shape[0]})")
    hs = h_student.reshape(-1, h_student.shape[-1])
    ht = h_teacher.reshape(-1, h_teacher.shape[-1])
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"{name}: student has {hs.shape[0]} tokens, teacher {ht.shape[0]}")
    kept = _kept_rows(name, mask, hs.shape[0], hs.device)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return LinearKLFunction.apply(_rows(hs, kept), W_student, bias_student, _rows(ht.detach(), kept),
                                  W_teacher.detach(), detach(bias_teacher), kind, reduction,
                                  int(chunk_bytes or CHUNK_BYTES), torch.is_grad_enabled(), float(beta))


# =========================================================================== stored top-k teacher


@torch.no_grad()
def topk_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens of a linear head and their log-probabilities, chunk by
    chunk, for storing a teacher: ``(ids int64 [..., k], log_probs fp32 [..., k])``, most
    likely first; the log-probabilities are normalised over the full vocabulary."""
    _check_head("topk_log_probs", hidden, weight, bias)
    if not 1 <= int(k) <= weight.shape[0]:
        raise ValueError(f"topk_log_probs: k={k} must be in [1, vocab={weight.shape[0]}]")
    h = hidden.reshape(-1, hidden.shape[-1])
    dtype = backend.compute_dtype(h)
    acc = _acc_dtype(dtype)
    ids = torch.empty((h.shape[0], k), dtype=torch.int64, device=h.device)
    values = torch.empty((h.shape[0], k), dtype=acc, device=h.device)
    with backend.autocast_off(h):
        h, w, b = h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        rows = _rows_per_chunk(w.shape[0], acc.itemsize + dtype.itemsize, chunk_bytes or CHUNK_BYTES)
        scratch = _Scratch(min(rows, h.shape[0]), w.shape[0], h.device)
        for start in range(0, h.shape[0], rows):
            z = _logits(h[start:start + rows], w, b, acc, scratch)
            top, idx = z.topk(int(k), dim=1)
            values[start:start + rows] = top - torch.logsumexp(z, dim=1, keepdim=True)
            ids[start:start + rows] = idx
    lead = hidden.shape[:-1]
    return ids.view(*lead, k), values.float().view(*lead, k)


def _kl_topk_torch(h, w, b, ids, lp_t, chunk_bytes, need_dh, need_dw, need_db):
    acc = _acc_dtype(h.dtype)
    vocab, k = w.shape[0], ids.shape[1]
    per_logit = 2 * acc.itemsize + (2 * h.dtype.itemsize if h.dtype != acc else 0)
    rows = _rows_per_chunk(vocab, per_logit, chunk_bytes)

    def chunk_loss(start, stop, z, need_grad, scratch):
        log_ps = z.sub_(torch.logsumexp(z, dim=1, keepdim=True))
        idx, lt = ids[start:stop], lp_t[start:stop].to(acc)
        p_t = lt.exp()
        tail_t = (1.0 - p_t.sum(1)).clamp_(min=0.0) if k < vocab else torch.zeros_like(p_t[:, 0])
        log_ps_top = log_ps.gather(1, idx)
        log_tail_s = torch.logsumexp(log_ps.scatter(1, idx, float("-inf")), dim=1)
        has_tail = tail_t > 0
        safe_tail = torch.where(has_tail, tail_t, 1.0)
        tail_term = torch.where(has_tail, tail_t * (safe_tail.log() - log_tail_s), 0.0)
        part = (p_t * (lt - log_ps_top)).sum() + tail_term.sum()
        if not need_grad:
            return part, None
        # d/dz = M p_s - p_t on the stored ids, p_s (M - T_t / T_s) elsewhere, with the mass
        # M = Σ_S p_t + T_t (1, unless the stored log-probs are rounded or k = V).
        mass = (p_t.sum(1) + tail_t).unsqueeze(1)
        ratio = torch.where(has_tail, tail_t / log_tail_s.exp(), 0.0).unsqueeze(1)
        p_s = log_ps.exp_()
        g_top = p_s.gather(1, idx).mul_(mass).sub_(p_t)
        g = p_s.mul_(mass - ratio)
        g.scatter_(1, idx, g_top)
        return part, g

    return _head_pass(h, w, b, rows, need_dh, need_dw, need_db, chunk_loss)


class LinearKLTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ids, lp_t, reduction, chunk_bytes, want_grads):
        dtype, need = _begin_torch_forward(ctx, h, w, b, want_grads)
        with torch.no_grad(), backend.autocast_off(h):
            loss, *grads = _kl_topk_torch(h.to(dtype), w.to(dtype), _cast(b, dtype), ids, lp_t, chunk_bytes, *need)
        return _end_torch_forward(ctx, h, loss, grads, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _torch_backward(ctx, grad_out, 8)


def linear_kl_from_topk(
    h_student: torch.Tensor, W_student: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None, bias_student: torch.Tensor | None = None, reduction: str = "sum",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) from a teacher stored as its top-k (:func:`topk_log_probs`).

    The approximation: the KL between the two distributions coarsened to k + 1 outcomes, the
    teacher's k stored tokens S and one bucket for every other token.  With
    ``T_t = 1 - Σ_S p_t`` and ``T_s = Σ_{v∉S} p_s`` (the student's exact tail, from its full
    softmax)::

        KL_k = Σ_{v∈S} p_t(v) (log p_t(v) - log p_s(v)) + T_t (log T_t - log T_s)

    (the tail term is 0 when ``T_t = 0``).  By the log-sum inequality ``KL_k <= KL`` with
    equality when the teacher has no mass outside S, or when inside the tail the student's
    distribution is proportional to the teacher's; what is lost is the shape of the
    teacher's tail, not its mass.  Gradient in the student's logits: ``p_s - p_t`` on S and
    ``p_s (1 - T_t / T_s)`` elsewhere (with the stored mass ``Σ_S p_t + T_t`` in place of 1
    when rounding makes it differ).  Summed over ``mask`` (or ``"mean"`` over its count);
    gradients to the student's h, W and b."""
    name = "linear_kl_from_topk"
    _check_head(name, h_student, W_student, bias_student)
    _check_common(name, reduction, chunk_bytes or CHUNK_BYTES)
    hs = h_student.reshape(-1, h_student.shape[-1])
    k = topk_ids.shape[-1] if topk_ids.dim() else 0
    if topk_ids.shape != topk_logprobs.shape or topk_ids.numel() != hs.shape[0] * k or k == 0:
        raise ValueError(f"{name}: topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
                         f"must both be [..., k] with one row per token ({hs.shape[0]})")
    ids = topk_ids.reshape(-1, k).to(device=hs.device, dtype=torch.int64)
    if bool(((ids < 0) | (ids >= W_student.shape[0])).any()):
        raise ValueError(f"{name}: topk_ids has ids outside [0, vocab={W_student.shape[0]})")
    kept = _kept_rows(name, mask, hs.shape[0], hs.device)
    lp = topk_logprobs.reshape(-1, k).to(hs.device).detach()
    return LinearKLTopKFunction.apply(_rows(hs, kept), W_student, bias_student, _rows(ids, kept), _rows(lp, kept),
                                      reduction, int(chunk_bytes or CHUNK_BYTES), torch.is_grad_enabled())
