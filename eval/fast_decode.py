"""A lean one-token decoding step for Llama-family models, used by eval.generate's sampler.

Why: on SmolLM2-135M (30 layers, hidden 576) at batch 1 on a 2-core CPU, HF's Llama forward spends
about 28 of a step's ~69 ms of CPU outside the matrix multiplies: per-module Python (``nn.Module``
calls, hooks bookkeeping, mask building, the cache's ``update`` protocol, output dataclasses).
:class:`LeanDecoder` computes the same step as straight tensor ops over the same weights: per layer
RMSNorm, the q/k/v projections (one stacked GEMM in the small-batch copy, below), RoPE on q and k at
once, the keys and values written into the sampler's preallocated KV cache (eval.kv_cache) in place,
SDPA over the filled slots with the left padding masked, o_proj, RMSNorm, gate/up projections, the
SiLU-gated product, down_proj; then the final norm and the LM head on the one position.

What it covers (:func:`unsupported_reason` says why not, and the caller then runs HF's forward):

* exactly ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (Qwen2's q/k/v biases, Llama's optional
  ``attention_bias`` / ``mlp_bias`` are applied), SiLU MLP, every layer full attention (no sliding
  window), eval mode;
* every projection a plain ``nn.Linear`` or a kernels.lora_layers ``LoRALinear`` over one, the LM head
  and the embedding plain ``nn.Linear`` / ``nn.Embedding``.  LoRA is applied merge-free, as kernels.lora's
  torch path computes it (``y = x W^T + b; y += scale * (x A^T) B^T``; fp32 adapters of a bf16 base cast
  down), with A and B read afresh for every batch (a rollout after an optimizer step sees the new
  adapter; the base-weight copy below is not re-made for it); a ``lora_disabled`` layer is its base.
  Anything else around a projection (PEFT's LoRA layers, quantised linears, a Conv1D-based LoRALinear)
  falls back to the HF forward;
* no forward hooks or pre-hooks on any module, nor global ones (the lean step would skip them);
* only the one-token steps: the prefill stays on HF's forward (it runs once per batch, and its
  left-padding masks are HF's), which fills the same preallocated cache the steps then extend.

Exactness: the ops are HF's in HF's order and dtypes (RMSNorm in float32 then cast back, as HF does
even for float64 models; cos/sin from the model's own ``rotary_emb`` module, so every rope_scaling
type HF supports comes for free), so logits equal HF's to rounding (tests/test_fast_decode.py: 1e-10
in float64, 1e-5 in float32) and greedy outputs equal HF ``generate`` token for token.

Weights: batches of more than ``COPY_MAX_ROWS`` (2) rows, and any batch off the CPU, read the
model's own parameters (views, no copy; q/k/v and gate/up stay separate GEMMs: stacking them measured
no faster at batch 16, within the noise of a busy core, and would cost a copy).  Batches of 1-2 rows on
the CPU read a copy of every projection and of the LM head transposed to ``[in, out]`` and contiguous
(q/k/v and gate/up stacked while at it): MKL's GEMV on that layout streams the weights 1.5-2x faster
than on ``nn.Linear``'s ``[out, in]`` (measured on this AMD EPYC, 1 thread, 60 out-of-cache
``[3072, 576]`` matrices: 11-15 ms vs 16-23 ms at 1 row, 23 vs 44 at 2 rows, and slower from 4 rows on).
The copy costs as much memory as the model (0.54 GB for SmolLM2-135M in float32), is kept per model
between calls and re-made when any source parameter's storage or version counter moved (an optimizer
step), like eval.generate's bf16 copy.  Its sums run in a different order than HF's, so float32
logits differ from HF's by rounding (~1e-6 relative), which could flip a greedy pick only at a near tie.

bf16 models on a CPU that multiplies bf16 natively (AVX512_BF16 / AMX, oneDNN's bf16 linear
available; ``PACK_BF16``) read oneDNN-packed copies of every projection and of the LM head (q/k/v and
gate/up stacked) at every batch size: ``torch.ops.mkldnn._linear_pointwise`` on a weight packed once
by ``_reorder_linear_weight`` returns torch.mm's (and addmm's, bias included) products bit for bit,
and took 0.40-0.61x of torch.mm's bf16 time at 1 row and 0.59-0.79x at 16 rows on SmolLM2's five
decoding GEMM shapes (``OMP_NUM_THREADS=1 taskset -c 1 python -m bench.probes.packed_bf16_gemm``, idle
AMD EPYC with AVX512_BF16, 2026-12-07; it also checks the bit-for-bit equality at 1-32 rows), where torch.mm's bf16 GEMV was slower than its fp32 one (a lean step at 1
row: 46 ms in bf16 against 41 ms in fp32).  The packed copy costs the weights' bf16 size (0.27 GB for
SmolLM2-135M) and is re-made like the [in, out] copy.

Attention in bf16 on the CPU (``GROUP_QUERIES``): PyTorch's CPU flash attention is 3.9-5.6x slower
in bf16 (16 rows, 64-192 cached keys) with one query position per head (HF's form) than with each
key/value head's query heads as the query positions of one call, which the lean step then runs (same
sums; a last-bit difference in a few outputs at some cache lengths, so bf16 greedy answers can part
from HF's at near-ties). It was half of a bf16 step at batch 16; ``python -m
bench.probes.decode_attention`` and docs/benchmarks.md (run AG). fp32 and fp64 keep HF's form (faster
there) and its outputs bit for bit; fp16 too (not measured).

Measured (SmolLM2-135M-Instruct, float32, 1 thread pinned to a core shared with other jobs; CPU ms
per one-token step after a 64-token prefill, median of alternating rounds, two sessions): batch 1:
HF forward 92 / 70, lean with the copy 57 / 48 (1.6x / 1.45x), lean on the model's tensors 70 / 59;
batch 16: HF 230 / 170, lean 226 / 159 (1.02x / 1.07x: there ~80% of the step is ``aten::mm`` and
~8% SDPA, which HF runs too).  LoRA r16 on every projection, batch 4: HF 157, lean 112 (1.4x).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import cpu_has_native_bf16
from kernels.lora_layers import LoRALinear

from .kv_cache import CacheLayerMixin

# False sends every model through HF's forward (a switch for benchmarks and A/B checks).
ENABLED = True
# bf16 models on a CPU with native bf16 decode on oneDNN-packed weights (see _packs); False: torch.mm.
PACK_BF16 = True
# bf16 steps on the CPU run attention with the query heads of each key/value head as the query
# positions of one SDPA call (see LeanDecoder.step); False: one query position per head, as HF runs it.
GROUP_QUERIES = True
# Batches of at most this many rows decode from a copy of the weights laid out [in, out] (see the
# module docstring: 1.5-2x faster GEMVs here); larger ones from the model's own tensors.  0: never copy.
COPY_MAX_ROWS = 2
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _supported_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(model classes, RMSNorm classes) this module reproduces; imported late (transformers is heavy)."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2RMSNorm

    return (LlamaForCausalLM, Qwen2ForCausalLM), (LlamaRMSNorm, Qwen2RMSNorm)


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    global_hooks = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks)
    if any(len(h) for h in global_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def unsupported_reason(model) -> str | None:
    """Why the lean step cannot reproduce ``model``'s forward, or None when it can."""
    model_classes, norm_classes = _supported_classes()
    if type(model) not in model_classes:
        return f"{type(model).__name__} is not one of {[c.__name__ for c in model_classes]}"
    if CacheLayerMixin is None:
        return "this transformers has no layered cache API (eval.kv_cache)"
    if model.training:
        return "the model is in training mode"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (only silu)"
    if getattr(config, "use_sliding_window", False) or any(
            t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return "sliding-window attention layers"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    inner = model.model
    if type(model.lm_head) is not nn.Linear or type(inner.embed_tokens) is not nn.Embedding:
        return "the LM head or the embedding is not a plain nn.Linear / nn.Embedding"
    if type(inner.norm) not in norm_classes:
        return f"final norm is {type(inner.norm).__name__}"
    for i, layer in enumerate(inner.layers):
        modules = [getattr(layer.self_attn, n) for n in _PROJECTIONS] + [getattr(layer.mlp, n) for n in _MLP]
        wrapped = [type(m).__name__ for m in modules if type(m) is not nn.Linear and not _plain_lora(m)]
        if wrapped:
            kinds = sorted(set(wrapped))
            return f"layer {i} has projections that are neither nn.Linear nor LoRALinear ({kinds})"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(norm) not in norm_classes for norm in norms):
            return f"layer {i} has a norm that is not RMSNorm"
    if _has_hooks(model):
        return "forward hooks are registered"
    return None


def _plain_lora(module: nn.Module) -> bool:
    """A LoRALinear over an nn.Linear whose adapters this module can apply (kernels.lora's torch maths)."""
    return type(module) is LoRALinear and not module.fan_in_fan_out


# A LoRA update: (A transposed [in, r], B transposed [r, out], scale), views in the base weight's dtype.
Adapter = tuple[torch.Tensor, torch.Tensor, float]
# (weight transposed to [in, out]: a view of the parameter, or a contiguous copy; bias [out] or None;
# the LoRA update, read afresh for every batch, or None).
Linear = tuple[torch.Tensor, torch.Tensor | None, Adapter | None]


def _project(x: torch.Tensor, linear: Linear) -> torch.Tensor:
    # What F.linear runs on a 2D input (mm, or addmm with the bias) without its three dispatch layers
    # (linear -> t -> matmul): measured ~15 us of a busy core's time per projection, ~2 ms a step.
    # The LoRA update as kernels.lora's torch path adds it: y += scale * (x A^T) B^T, merge-free.
    weight_t, bias, adapter = linear
    if weight_t.is_mkldnn:  # a oneDNN-packed bf16 weight (see _packs): bit for bit addmm's / mm's result
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight_t, bias, "none", [], "")
    else:
        y = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    if adapter is not None:
        a_t, b_t, scale = adapter
        y.addmm_(torch.mm(x, a_t), b_t, alpha=scale)
    return y


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor
    input_eps: float
    qkv: list[Linear]  # q, k, v; or in the copy one stacked [hidden, (heads + 2 * kv_heads) * head_dim]
    o: Linear
    post_norm: torch.Tensor
    post_eps: float
    gate_up: list[Linear]  # gate, up; or in the copy one stacked [hidden, 2 * intermediate] (gate, then up)
    down: Linear


def _linear(module: nn.Linear, layout: str) -> Linear:
    bias = module.bias.detach() if module.bias is not None else None
    if layout == "packed":
        return _pack(module.weight.detach()), bias, None
    weight_t = module.weight.detach().t()
    return (weight_t.contiguous() if layout == "copy" else weight_t), bias, None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # oneDNN's layout for its bf16 linear, made once: the same products as torch.mm (bit for bit,
    # measured at 1-16 rows) in about half the time at 1 row on AVX512_BF16 (see the module doc).
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _adapter(module: nn.Module) -> Adapter | None:
    if type(module) is nn.Linear or module.disabled:
        return None
    dtype = module.weight.dtype  # fp32 adapters of a bf16 base are cast down, as kernels.lora does
    return module.lora_A.detach().to(dtype).t(), module.lora_B.detach().to(dtype).t(), float(module.scale)


def _with_adapters(linears: list[Linear], modules: list[nn.Module]) -> list[Linear]:
    if len(linears) != len(modules):
        return linears  # a stacked group: built only where no member has an adapter
    return [(w, b, _adapter(m)) for (w, b, _), m in zip(linears, modules, strict=True)]


def _group(modules: list[nn.Module], layout: str) -> list[Linear]:
    if layout != "views" and all(type(m) is nn.Linear for m in modules):
        return _stacked(modules, layout)
    return [_linear(m, layout) for m in modules]


def _stacked(modules: list[nn.Linear], layout: str) -> list[Linear]:
    weight = torch.cat([m.weight.detach() for m in modules])
    weight_t = _pack(weight) if layout == "packed" else weight.t().contiguous()
    if all(m.bias is None for m in modules):
        return [(weight_t, None, None)]
    biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
    return [(weight_t, torch.cat(biases), None)]


def _build_weights(model, layout: str) -> tuple[list[_LayerWeights], Linear]:
    """``layout``: "views" (the parameters themselves), "copy" ([in, out] contiguous copies) or
    "packed" (oneDNN-packed bf16 copies)."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        layers.append(_LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            input_eps=float(layer.input_layernorm.variance_epsilon),
            qkv=_group(qkv, layout), o=_linear(attn.o_proj, layout),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            post_eps=float(layer.post_attention_layernorm.variance_epsilon),
            gate_up=_group(gate_up, layout),
            down=_linear(mlp.down_proj, layout)))
    return layers, _linear(model.lm_head, layout)


def _signature(model) -> tuple:
    # Storage and version of every parameter the copy is made of: an in-place update (an optimizer
    # step) bumps the version, a reassignment moves the storage.  LoRA factors are not copied (read
    # live per batch), so training an adapter does not re-make the copy.
    params = [p for name, p in model.model.layers.named_parameters() if ".lora_" not in f".{name}"]
    params.append(model.lm_head.weight)
    return tuple((p.data_ptr(), p._version) for p in params)


# Per model: (signature of its parameters, the [in, out] copy of its weights) for small batches.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packs(model) -> bool:
    """A bf16 model on a CPU that multiplies bf16 natively, with oneDNN's bf16 linear available."""
    weight = model.lm_head.weight
    return (PACK_BF16 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and cpu_has_native_bf16())


def _weights(model, rows: int) -> tuple[list[_LayerWeights], Linear]:
    if _packs(model):
        layout = "packed"  # every batch size: faster than torch.mm at 1 and at 16 rows
    elif rows > COPY_MAX_ROWS or model.lm_head.weight.device.type != "cpu":
        return _build_weights(model, "views")  # views of the parameters: nothing to keep
    else:
        layout = "copy"
    signature = (layout, _signature(model))
    kept = _COPIES.get(model)
    if kept is not None and kept[0] == signature:
        return kept[1]
    with torch.no_grad():
        weights = _build_weights(model, layout)
    _COPIES[model] = (signature, weights)
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF's LlamaRMSNorm op for op: normalise in float32 (for float64 models too), cast back, then scale.
    # (F.rms_norm is one call but measured slower here: 42 vs 30 us at [1, 576], busy core.)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LeanDecoder:
    """One-token steps of a supported model (see :func:`unsupported_reason`) over a preallocated cache.

    Built once per batch by eval.generate after the prefill; :meth:`step` takes the new token of every
    row still in the batch, its position and the attention mask over all cached positions plus the
    new one, appends the keys and values to ``cache`` and returns the next-token logits ``[rows, vocab]``.
    The cache's rows may be reselected between steps (``batch_select_indices``): each step reads the
    layer buffers afresh."""

    def __init__(self, model, cache) -> None:
        config, attn = model.config, model.model.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.layers, self.head = _weights(model, int(cache.layers[0].keys.shape[0]))
        if any(type(m) is LoRALinear for m in model.model.layers.modules()):
            self.layers = [replace(
                weights, qkv=_with_adapters(weights.qkv, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                          layer.self_attn.v_proj]),
                o=_with_adapters([weights.o], [layer.self_attn.o_proj])[0],
                gate_up=_with_adapters(weights.gate_up, [layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=_with_adapters([weights.down], [layer.mlp.down_proj])[0])
                for weights, layer in zip(self.layers, model.model.layers, strict=True)]
        self.embedding = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.final_eps = float(model.model.norm.variance_epsilon)
        self.rotary = model.model.rotary_emb
        self.cache_layers = list(cache.layers)
        if len(self.cache_layers) != len(self.layers):
            raise ValueError(f"cache has {len(self.cache_layers)} layers, the model {len(self.layers)}")
        # bf16 on the CPU: attention with grouped queries (module docstring, GROUP_QUERIES); measured
        # only in bf16, so fp16 keeps HF's form with fp32 and fp64.
        self.group_queries = (GROUP_QUERIES and self.embedding.device.type == "cpu"
                              and self.embedding.dtype == torch.bfloat16)
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip_halves(x) * [-sin_first_half, sin_second_half] exactly (a sign flip).
        self._sin_sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)]).to(self.embedding)

    @classmethod
    def for_model(cls, model, cache) -> LeanDecoder | None:
        """A decoder for ``model`` over ``cache``, or None where the HF forward must run instead."""
        if not ENABLED or unsupported_reason(model) is not None:
            return None
        # Its ops run in the weights' own dtype; under an enabled autocast (e.g. a bf16 training run
        # sampling with fp32 master weights) the in-place LoRA update would meet a bf16 product and
        # an fp32 factor. HF's forward honours autocast; callers that want bf16 speed decode in a
        # bf16 copy instead (generate_ids(precision="bf16"), as SDFT's rollout does).
        if torch.is_autocast_enabled(next(model.parameters()).device.type):
            return None
        layers = getattr(cache, "layers", None)
        if not layers or not all(isinstance(layer, CacheLayerMixin) and hasattr(layer, "capacity")
                                 and getattr(layer, "is_initialized", False) for layer in layers):
            return None
        return cls(model, cache)

    def step(self, token: torch.Tensor, position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``token`` [rows], ``position`` [rows, 1], ``attention_mask`` [rows, cached + 1] (1 = attend)."""
        rows = token.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        x = F.embedding(token, self.embedding)  # [rows, hidden]
        cos, sin = self.rotary(x, position)  # [rows, 1, head_dim] each, in x's dtype
        sin = sin * self._sin_sign
        mask = attention_mask.bool()[:, None, None, :]  # [rows, 1, 1, keys]
        for weights, cache in zip(self.layers, self.cache_layers, strict=True):
            h = _rms_norm(x, weights.input_norm, weights.input_eps)
            if len(weights.qkv) == 1:
                qkv = _project(h, weights.qkv[0]).view(rows, qk_heads + kv_heads, head_dim)
                qk, v = qkv[:, :qk_heads], qkv[:, qk_heads:]
            else:
                q_proj, k_proj, v_proj = weights.qkv
                qk = torch.cat((_project(h, q_proj), _project(h, k_proj)), -1).view(rows, qk_heads, head_dim)
                v = _project(h, v_proj).view(rows, kv_heads, head_dim)
            qk = qk * cos + qk.unflatten(-1, (2, head_dim // 2)).flip(-2).flatten(-2) * sin
            end = cache.length + 1
            if end > cache.capacity:
                raise RuntimeError(f"preallocated KV cache holds {cache.capacity} positions, asked for {end}")
            cache.keys[:, :, cache.length].copy_(qk[:, heads:])
            cache.values[:, :, cache.length].copy_(v)
            cache.length = end
            if self.group_queries:  # query head h reads key/value head h // groups, as HF's repeat_kv
                queries = qk[:, :heads].view(rows, kv_heads, heads // kv_heads, head_dim)
                gqa = False
            else:
                queries, gqa = qk[:, :heads, None], heads != kv_heads
            out = F.scaled_dot_product_attention(
                queries, cache.keys[:, :, :end], cache.values[:, :, :end], attn_mask=mask,
                scale=self.scaling, enable_gqa=gqa)  # [rows, heads, 1, head_dim] or [rows, kv_heads, groups, ...]
            x = x + _project(out.reshape(rows, heads * head_dim), weights.o)
            h = _rms_norm(x, weights.post_norm, weights.post_eps)
            if len(weights.gate_up) == 1:
                gate, up = _project(h, weights.gate_up[0]).chunk(2, dim=-1)
            else:
                gate, up = (_project(h, linear) for linear in weights.gate_up)
            x = x + _project(F.silu(gate) * up, weights.down)
        return _project(_rms_norm(x, self.final_norm, self.final_eps), self.head)
