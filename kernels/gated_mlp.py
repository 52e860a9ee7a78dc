"""Gated MLPs that keep two of their four big activations for backward: ``recompute_mlp_activations``.

A Llama / Qwen2 / Mistral / Gemma MLP is ``down(act(gate(x)) * up(x))``. Run by autograd as
written, it saves four ``[tokens, intermediate]`` tensors per layer for backward: ``gate(x)``
(for the activation's derivative), ``act(gate(x))`` and ``up(x)`` (for the product's), and the
product ``h`` itself (the down projection's input, for its weight or LoRA gradient). At
SmolLM2-135M's shape (intermediate 1536, 8 x 512 tokens) each is 25 MB in fp32, 12.6 MB in
bf16, and the MLPs' saved activations are most of a step's memory once the logits are gone.

Here only ``gate(x)`` and ``up(x)`` are kept:

* :class:`GatedProduct` computes ``h = act(g) * u`` and saves ``g`` and ``u``; its backward
  recomputes ``act(g)`` (elementwise, cheap) for ``dg = dh * u * act'(g)`` and ``du = dh * act(g)``.
  Liger-Kernel's SwiGLU does the same.
* the down projection would still save ``h``. A ``saved_tensors_hooks`` pair around its call
  swaps ``h`` (and any view of it, such as ``nn.Linear``'s 2-D reshape) for a note that
  says how to remake it from ``g`` and ``u``, which are kept anyway. This works for any down
  projection (``nn.Linear`` under autocast, :class:`kernels.lora_layers.LoRALinear`, a PEFT
  layer) because it hooks autograd's saving, not the layer.

The forward arithmetic is unchanged (the same ``act`` then the same multiply), so outputs
are bitwise the model's own; the gradients agree to rounding (tests compare with float64).
The cost is three more elementwise passes per layer in backward (``act(g)`` for this backward,
``act(g) * u`` for the down projection's): measured at SmolLM2-135M's shape it is lost in the
noise of a step (bench/probes/recompute_mlp.py; docs/benchmarks.md).
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["GatedProduct", "recompute_mlp_activations", "is_gated_mlp"]

_PATCHED = "_forgetless_recompute_mlp"


def _is_silu(act: Callable) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is torch.nn.functional.silu


class GatedProduct(torch.autograd.Function):
    """``act(g) * u``, saving only ``g`` and ``u``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[:2]
        if _is_silu(ctx.act):
            # Autograd's own silu + mul backward takes three elementwise passes; this takes a
            # fourth to remake silu(g). silu_backward computes silu'(g) in fp32 for half inputs.
            du = dh * torch.nn.functional.silu(g) if need_u else None
            dg = torch.ops.aten.silu_backward(dh * u, g) if need_g else None
            return dg, du, None
        # Any other activation: its derivative by autograd on a recomputed act(g).
        with torch.enable_grad():
            g_ = g.detach().requires_grad_(True)
            a = ctx.act(g_)
        du = dh * a.detach() if need_u else None
        dg = torch.autograd.grad(a, g_, dh * u)[0] if need_g else None
        return dg, du, None


class _Remake:
    """What is saved in place of ``h`` (or a view of it): how to remake it from ``g`` and ``u``."""

    __slots__ = ("g", "u", "act", "size", "stride", "offset")

    def __init__(self, g, u, act, view: torch.Tensor) -> None:
        # Detached aliases: same storage as the tensors GatedProduct saved, no extra memory and
        # no reference into the graph.
        self.g, self.u, self.act = g.detach(), u.detach(), act
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def remake(self) -> torch.Tensor:
        with torch.no_grad():
            h = self.act(self.g) * self.u
        return h.as_strided(self.size, self.stride, self.offset)


def _down_with_h_remade(down: nn.Module, g: torch.Tensor, u: torch.Tensor, act, h: torch.Tensor) -> torch.Tensor:
    # Only h's identity is captured, never h: autograd keeps the hooks alive with each saved
    # value, so a closure over h would keep it alive too and save nothing.
    storage, dtype, device = h.untyped_storage().data_ptr(), h.dtype, h.device

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.device == device and t.untyped_storage().data_ptr() == storage:
            return _Remake(g, u, act, t)
        return t

    def unpack(saved):
        return saved.remake() if isinstance(saved, _Remake) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return down(h)


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    g = self.gate_proj(x)
    u = self.up_proj(x)
    if not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad)):
        return self.down_proj(self.act_fn(g) * u)
    h = GatedProduct.apply(g, u, self.act_fn)
    # h must be contiguous in the layout act(g) * u produces again in backward.
    return _down_with_h_remade(self.down_proj, g, u, self.act_fn, h)


def is_gated_mlp(module: nn.Module) -> bool:
    """A module whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (HF's naming)."""
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
        type(module).__name__.endswith("MLP")


def recompute_mlp_activations(model: nn.Module) -> int:
    """Make every gated MLP of ``model`` keep only ``gate(x)`` and ``up(x)`` for backward.

    Replaces each such module's ``forward`` on the instance (idempotent); returns how many MLPs
    now run this way (0: none recognised, nothing changed). Modules are recognised by HF's
    naming (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``, a class named ``...MLP``);
    MLPs with a fused ``gate_up_proj`` or extra terms are left as they are.
    """
    count = 0
    for module in model.modules():
        if not is_gated_mlp(module):
            continue
        if not getattr(module, _PATCHED, False):
            module.forward = types.MethodType(_gated_mlp_forward, module)
            setattr(module, _PATCHED, True)
        count += 1
    return count
