"""AdamW with the EWC penalty folded into its step.

EWC adds ``P = lam/2 * sum F (p - p*)^2`` to the loss; its gradient ``lam F (p - p*)`` is an
elementwise term, so instead of a pass of its own over the weights (``kernels.ewc.ewc_step``)
it can ride in the optimizer's pass, which reads ``p, g, m, v`` anyway: two more reads
(anchor ``p*`` and Fisher ``F``) and nothing more written.  The step is exactly

    g' = g + lam * F * (p - p*)         (p before this step; params without a Fisher: g' = g)
    p  = p * (1 - lr * weight_decay)    (decoupled weight decay)
    m  = beta1 m + (1 - beta1) g'       v = beta2 v + (1 - beta2) g'^2
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

i.e. what adding the penalty's gradient to ``.grad`` and calling ``torch.optim.AdamW`` does;
``.grad`` itself is left untouched.

Layers, as for the other ops:

* ``_adamw_ewc_kernel`` (Triton, CUDA): one launch per dtype group walks a table of tensor
  pointers, reading p, g, m, v (and p*, F where the tensor has them) once and writing p, m, v;
* ``_step_triton`` builds the tables (per-tensor step size and bias correction, since tensors
  may have taken different numbers of steps) and launches;
* ``_step_torch`` (CPU): ``g'`` for cache-sized pieces of the EWC tensors into one reused
  buffer (two torch ops), then torch's fused C++ AdamW (``torch._fused_adamw_``) on those
  pieces; tensors without a Fisher go to it directly.  Chosen by
  ``python -m bench.probes.adamw_ewc_torch_forms`` over whole-list ``_foreach`` forms: as fast,
  and no parameter-sized temporary;
* :func:`adamw_ewc_step` dispatches through :func:`kernels.backend.select`;
* :class:`AdamWEWC`, a drop-in for ``torch.optim.AdamW`` (same hyperparameters, param groups,
  the same per-parameter state keys ``step``/``exp_avg``/``exp_avg_sq``, so state dicts move
  between the two), plus :meth:`AdamWEWC.penalty` on demand.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels.fisher import _TL_DTYPES

__all__ = ["AdamWEWC", "adamw_ewc_step"]

# Elements of the reused fp32 buffer that holds g' on the torch path (1 MiB: stays in cache
# between the two ops that write it and the fused AdamW that reads it).
TORCH_CHUNK = 1 << 18
# Elements per Triton program: 16 per thread at 4 warps, four 16-byte loads of each array.
TRITON_BLOCK = 2048
_INTERPRETER_BLOCK = 65536  # the interpreter pays per program, not per element


# =========================================================================== Triton


@triton.jit
def _adamw_ewc_kernel(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, anchor_ptrs, fisher_ptrs,
    numels, step_sizes, bias2_sqrts, block_tensor, block_start,
    decay, beta1, beta2, eps, lam,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    A_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr, HAS_EWC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    numel = tl.load(numels + which)
    step_size = tl.load(step_sizes + which)
    bias2_sqrt = tl.load(bias2_sqrts + which)
    p_ptr = tl.load(param_ptrs + which).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(grad_ptrs + which).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(exp_avg_ptrs + which).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(exp_avg_sq_ptrs + which).to(tl.pointer_type(S_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_EWC:
        a_ptr = tl.load(anchor_ptrs + which).to(tl.pointer_type(A_DTYPE))
        f_ptr = tl.load(fisher_ptrs + which).to(tl.pointer_type(F_DTYPE))
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g + lam * f * (p - a)  # the penalty's gradient at p before the step
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp form
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)


def _step_triton(ps, gs, ms, vs, steps, anchors, fishers, hp: dict, interpreting: bool,
                 block: int | None = None) -> None:
    device = ps[0].device
    block = block or (_INTERPRETER_BLOCK if interpreting else TRITON_BLOCK)
    numels = torch.tensor([p.numel() for p in ps], dtype=torch.int64)
    blocks_per = (numels + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(ps)), blocks_per)
    first_block = torch.cumsum(blocks_per, 0) - blocks_per
    block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor]) * block
    beta1, beta2 = hp["betas"]
    counts = [float(s) for s in steps]
    step_sizes = torch.tensor([hp["lr"] / (1.0 - beta1**t) for t in counts], dtype=torch.float32)
    bias2_sqrts = torch.tensor([math.sqrt(1.0 - beta2**t) for t in counts], dtype=torch.float32)

    def table(ts):
        return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)

    has_ewc = anchors is not None
    anchor_t = table(anchors) if has_ewc else table(ps)  # placeholders, never read without EWC
    fisher_t = table(fishers) if has_ewc else anchor_t
    if len(block_tensor) == 0:
        return
    _adamw_ewc_kernel[(len(block_tensor),)](
        table(ps), table(gs), table(ms), table(vs), anchor_t, fisher_t,
        numels.to(device), step_sizes.to(device), bias2_sqrts.to(device),
        block_tensor.to(device), block_start.to(device),
        1.0 - hp["lr"] * hp["weight_decay"], beta1, beta2, hp["eps"], hp["lam"],
        P_DTYPE=_TL_DTYPES[ps[0].dtype], G_DTYPE=_TL_DTYPES[gs[0].dtype], S_DTYPE=_TL_DTYPES[ms[0].dtype],
        A_DTYPE=_TL_DTYPES[anchors[0].dtype] if has_ewc else tl.float32,
        F_DTYPE=_TL_DTYPES[fishers[0].dtype] if has_ewc else tl.float32,
        HAS_EWC=has_ewc, BLOCK=block, num_warps=4, num_stages=1,
    )


# =========================================================================== torch


def _fused_adamw(ps, gs, ms, vs, steps, hp: dict) -> None:
    """torch's own fused AdamW (one C++ pass); the caller has already advanced ``steps``."""
    beta1, beta2 = hp["betas"]
    torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=hp["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=hp["weight_decay"], eps=hp["eps"], amsgrad=False, maximize=False)


def _step_torch(ps, gs, ms, vs, steps, anchors, fishers, hp: dict, chunk: int | None = None) -> None:
    if ps[0].device.type != "cpu":  # the fused op wants its step counters beside the params
        steps = [s.to(ps[0].device) for s in steps]
    if anchors is None:
        _fused_adamw(ps, gs, ms, vs, steps, hp)
        return
    # g' = g + lam F (p - p*) for pieces of the tensors, packed one after another into a
    # reused buffer; when it is full, one fused AdamW call updates those pieces.
    chunk = chunk or TORCH_CHUNK
    lam = hp["lam"]
    buffer = torch.empty(min(chunk, sum(p.numel() for p in ps)), dtype=ps[0].dtype, device=ps[0].device)
    pending: tuple[list, ...] = ([], [], [], [], [])
    used = 0
    for p, g, m, v, step, a, f in zip(ps, gs, ms, vs, steps, anchors, fishers, strict=True):
        p, g, m, v, a, f = (t.view(-1) for t in (p, g, m, v, a, f))
        start = 0
        while start < p.numel():
            if used == buffer.numel():
                _fused_adamw(*pending, hp)
                pending, used = ([], [], [], [], []), 0
            stop = min(p.numel(), start + buffer.numel() - used)
            piece = buffer[used:used + stop - start]
            torch.sub(p[start:stop], a[start:stop], out=piece)
            torch.addcmul(g[start:stop], f[start:stop], piece, value=lam, out=piece)
            for dst, t in zip(pending, (p[start:stop], piece, m[start:stop], v[start:stop], step), strict=True):
                dst.append(t)
            used += stop - start
            start = stop
    if pending[0]:
        _fused_adamw(*pending, hp)


# =========================================================================== dispatch


def adamw_ewc_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *,
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, lam: float = 0.0,
    anchors: Sequence[torch.Tensor] | None = None, fishers: Sequence[torch.Tensor] | None = None,
    block: int | None = None,
) -> None:
    """One AdamW(+EWC) step, in place, over tensors of one device and dtype group.

    ``steps`` are the per-tensor step counters (scalar tensors) already advanced to this step's
    ``t``.  ``anchors`` and ``fishers`` (both or neither) apply the EWC term to every tensor of
    the call.  ``block`` sets the Triton block size (tests)."""
    if not params:
        return
    if (anchors is None) != (fishers is None):
        raise ValueError("adamw_ewc_step: pass both anchors and fishers, or neither")
    hp = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
              weight_decay=float(weight_decay), lam=float(lam))
    choice = backend.select(*params)
    with torch.no_grad(), backend.autocast_off(params[0]):
        if choice == "torch":
            _step_torch(params, grads, exp_avgs, exp_avg_sqs, steps, anchors, fishers, hp)
        else:
            _step_triton(params, grads, exp_avgs, exp_avg_sqs, steps, anchors, fishers, hp,
                         choice == "interpret", block)


# =========================================================================== optimizer


class AdamWEWC(torch.optim.Optimizer):
    """``torch.optim.AdamW`` whose step also applies EWC's ``lam * F * (p - p*)`` to the
    gradient of the parameters that have an anchor and a Fisher.

    ``anchors`` and ``fishers`` map parameters (the Parameter objects of ``params``) to
    tensors of their shape; parameters absent from them take a plain AdamW step.  They are
    held by reference: ``kernels.ewc.consolidate`` / ``online_update`` on them act on the next
    step; :meth:`set_ewc` replaces them.  ``lam`` is an attribute (``opt.lam``), not a group
    hyperparameter.  ``state_dict()`` holds what AdamW's does (the same keys, so a checkpoint
    of either loads into the other); anchors, Fishers and ``lam`` are not in it, as they are
    the method's data, saved with it.
    """

    def __init__(
        self, params: Iterable, lam: float = 0.0,
        anchors: Mapping[torch.Tensor, torch.Tensor] | None = None,
        fishers: Mapping[torch.Tensor, torch.Tensor] | None = None,
        *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamWEWC: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.lam = float(lam)
        self._ewc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_ewc(anchors or {}, fishers or {})

    def set_ewc(self, anchors: Mapping[torch.Tensor, torch.Tensor], fishers: Mapping[torch.Tensor, torch.Tensor],
                lam: float | None = None) -> None:
        """Replace the anchors and Fishers (and ``lam`` when given); keys are parameters."""
        by_id = {id(p): (gi, pi, p) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        if {id(k) for k in anchors} != {id(k) for k in fishers}:
            raise ValueError("AdamWEWC: anchors and fishers must have the same parameters as keys")
        ewc = {}
        for key, anchor in anchors.items():
            if id(key) not in by_id:
                raise ValueError(f"AdamWEWC: an anchor is keyed by a tensor of shape {tuple(key.shape)} that is "
                                 "not one of the optimizer's parameters")
            gi, pi, p = by_id[id(key)]
            fisher = fishers[key]
            where = f"param_groups[{gi}]['params'][{pi}] {tuple(p.shape)}"
            for name, t in (("anchor", anchor), ("Fisher", fisher)):
                if t.shape != p.shape or t.device != p.device:
                    raise ValueError(f"AdamWEWC: the {name} of {where} is {tuple(t.shape)} on {t.device}; "
                                     f"it must match the parameter ({p.device})")
                if not t.is_contiguous() or not p.is_contiguous():
                    raise ValueError(f"AdamWEWC: {where} and its {name} must be contiguous")
            ewc[id(key)] = (anchor, fisher)
        self._ewc = ewc
        if lam is not None:
            self.lam = float(lam)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("AdamWEWC implements neither amsgrad nor maximize (a group asks for one)")
            buckets: dict[tuple, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise ValueError("AdamWEWC: sparse gradients and complex parameters are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                ewc = self._ewc.get(id(p)) if self.lam != 0.0 else None
                key = (p.device, p.dtype, p.grad.dtype, state["exp_avg"].dtype,
                       None if ewc is None else (ewc[0].dtype, ewc[1].dtype))
                lists = buckets.setdefault(key, ([], [], [], [], [], [], []))
                items = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                         *(ewc if ewc is not None else (None, None)))
                for dst, t in zip(lists, items, strict=True):
                    dst.append(t)
            for key, (ps, gs, ms, vs, steps, anchors, fishers) in buckets.items():
                has_ewc = key[-1] is not None
                adamw_ewc_step(ps, gs, ms, vs, steps, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                               weight_decay=group["weight_decay"], lam=self.lam,
                               anchors=anchors if has_ewc else None, fishers=fishers if has_ewc else None)
        return loss

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """``lam/2 * sum F (p - p*)^2`` over the parameters with a Fisher, as an fp32 scalar
        (no graph), computed now from the current parameters: one read of p, p* and F, in
        cache-sized pieces.  Meant for logging every few steps, not every step."""
        totals: dict[torch.device, torch.Tensor] = {}  # one float64 sum per device, one sync at the end
        for group in self.param_groups:
            for p in group["params"]:
                ewc = self._ewc.get(id(p))
                if ewc is None:
                    continue
                anchor, fisher = (t.view(-1) for t in ewc)
                flat = p.detach().view(-1)
                total = totals.setdefault(p.device, torch.zeros((), dtype=torch.float64, device=p.device))
                for start in range(0, flat.numel(), TORCH_CHUNK):
                    stop = min(flat.numel(), start + TORCH_CHUNK)
                    diff = flat[start:stop].float() - anchor[start:stop].float()
                    total += torch.dot(diff * fisher[start:stop].float(), diff).double()
        penalty = sum((t.cpu() for t in totals.values()), torch.zeros((), dtype=torch.float64))
        return (penalty * (0.5 * self.lam)).float()


# =========================================================================== compile test


def _compile_specs() -> list:
    """The CUDA launch configurations of :func:`_step_triton` (fp32 master weights with and
    without EWC, and bf16 weights and state with an fp32 Fisher)."""
    from kernels.compile_check import CompileSpec, infer_signature

    specs = []
    tables = ("param_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs", "anchor_ptrs", "fisher_ptrs",
              "numels", "block_tensor", "block_start")
    for name, dtype, has_ewc in (("fp32", tl.float32, True), ("fp32/no_ewc", tl.float32, False),
                                 ("bf16", tl.bfloat16, True)):
        constexprs = dict(P_DTYPE=dtype, G_DTYPE=dtype, S_DTYPE=dtype, A_DTYPE=dtype, F_DTYPE=tl.float32,
                          HAS_EWC=has_ewc, BLOCK=TRITON_BLOCK)
        pointers = dict.fromkeys(tables, "*i64") | {"step_sizes": "*fp32", "bias2_sqrts": "*fp32"}
        specs.append(CompileSpec(
            name=f"adamw_ewc/{name}", fn=_adamw_ewc_kernel,
            signature=infer_signature(_adamw_ewc_kernel, pointers, constexprs,
                                      floats=("decay", "beta1", "beta2", "eps", "lam")),
            constexprs=constexprs, num_warps=4, num_stages=1,
        ))
    return specs


COMPILE_SPECS = _compile_specs
