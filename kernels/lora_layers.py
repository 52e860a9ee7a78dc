"""Drop-in LoRA layers for Hugging Face models: ``LoRALinear``, ``apply_lora``, ``merge_lora``.

``apply_lora(model)`` swaps the chosen ``nn.Linear`` / GPT-2 ``Conv1D`` modules for
:class:`LoRALinear` in place.  A ``LoRALinear`` *takes over* the base layer's own ``weight``
and ``bias`` Parameters (no copy), so parameter names stay ``<path>.weight`` / ``<path>.bias``
and anything keyed on the base model's names (a Fisher, an optimizer state, a checkpoint)
still lines up; it adds ``<path>.lora_A`` (``r x in``) and ``<path>.lora_B`` (``out x r``).
The forward is one call to :func:`kernels.lora.lora_linear`, which fuses the base matmul, the
bias and the low-rank update (and its dropout) instead of PEFT's three separate modules.

Initialisation and scaling follow PEFT exactly (A kaiming-uniform with a=sqrt(5), B zeros,
``scale = alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA), so the same seed-free recipe
trains the same way and adapters move freely between the two (see ``kernels.peft_format``).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import lora_linear

try:  # GPT-2 style layers; transformers is a hard dependency, but keep kernels importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        """Placeholder so isinstance checks work when transformers is absent."""

# Half-precision bases get fp32 adapters, as PEFT does by default (autocast_adapter_dtype):
# rank-r updates of a bf16 weight lose most of their bits if A and B are bf16 too.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)
CONFIG_ATTR = "forgetless_lora_config"


@dataclass
class LoRAConfig:
    """What ``apply_lora`` did to a model; stored as ``model.forgetless_lora_config``.

    ``target_modules`` are the full module paths that were wrapped (resolved from
    ``targets``); ``rank_pattern`` / ``alpha_pattern`` map PEFT-style regex keys to a rank or
    alpha that differs from the default for matching modules.
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    targets: list[str] | str | None
    target_modules: list[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` plus a trainable low-rank update ``scale * B @ A``.

    Attributes: ``weight`` and ``bias`` (the base layer's own Parameters, frozen), ``lora_A``
    (``[r, in]``), ``lora_B`` (``[out, r]``), ``r``, ``lora_alpha``, ``scale``, ``dropout_p``
    (applied to the LoRA branch only, and only in training mode) and ``fan_in_fan_out``
    (True for ``Conv1D``, whose weight is stored ``[in, out]``).
    """

    def __init__(
        self,
        base: nn.Linear | Conv1D,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")
        if int(r) != r or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.fan_in_fan_out = isinstance(base, Conv1D)
        weight = base.weight
        self.in_features, self.out_features = (
            tuple(weight.shape) if self.fan_in_fan_out else tuple(weight.shape)[::-1]
        )
        self.r = int(r)
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.scale = lora_scale(self.r, alpha, use_rslora)
        self.dropout_p = float(dropout)

        # Take over the base's Parameters (same objects: no copy, same names one level up) and
        # keep the emptied base module, unregistered, to hand back on merge with its class,
        # hooks and attributes intact.
        weight.requires_grad_(False)
        bias = base.bias
        if bias is not None:
            bias.requires_grad_(False)
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        del base.weight
        del base.bias
        self.__dict__["_base_module"] = base

        lora_dtype = torch.float32 if weight.dtype in _UPCAST_DTYPES else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=lora_dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=lora_dtype, device=weight.device))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) on ``[r, in]``, B = 0 (so the
        wrapped model starts exactly at the base model)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D, no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # True inside ``lora_disabled``: the layer is its frozen base (the base model's own output).
    disabled: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return nn.functional.linear(x, self.base_weight_out_in(), self.bias)
        dropout_p = self.dropout_p if self.training else 0.0
        # seed=None: lora_linear draws a fresh seed from torch's RNG per call, so each step
        # gets a new mask and torch.manual_seed makes runs reproducible.
        return lora_linear(
            x, self.base_weight_out_in(), self.bias, self.lora_A, self.lora_B, self.scale, dropout_p=dropout_p
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` as ``[out, in]`` in fp32 (what merging adds to the base weight)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def to_base(self, inplace: bool = False) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` computing ``x (W + s B A)^T + b``.

        ``inplace=False`` (default) leaves this layer untouched and returns a module with a new
        weight tensor (its bias is shared).  ``inplace=True`` folds the update into this
        layer's own weight storage (no second copy of W, what ``merge_lora`` uses) and hands
        back the original module object; this layer must not be used afterwards.  The
        returned parameters do not require grad (the base was frozen).
        """
        delta = self.delta_weight()
        if self.fan_in_fan_out:
            delta = delta.t()
        if inplace:
            weight = self.weight
            weight.copy_((weight.float() + delta).to(weight.dtype))
            base = self.__dict__["_base_module"]
        else:
            weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
            base = _empty_like_base(self.__dict__["_base_module"], self.in_features, self.out_features)
        base.register_parameter("weight", weight)
        base.register_parameter("bias", self.bias)
        return base

    def merged(self) -> nn.Module:
        """Non-destructive merge: see :meth:`to_base`."""
        return self.to_base(inplace=False)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"{kind}(in={self.in_features}, out={self.out_features}, bias={self.bias is not None}), "
            f"r={self.r}, alpha={self.lora_alpha}, scale={self.scale:g}, dropout={self.dropout_p:g}"
        )


def _empty_like_base(base: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A fresh module of the base's kind, built on the meta device (no allocation, no init)."""
    with torch.device("meta"):
        if isinstance(base, Conv1D):
            return Conv1D(out_features, in_features)
        return nn.Linear(in_features, out_features, bias=False)


# ---------------------------------------------------------------------------- model level


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """While active, every LoRA layer of ``model`` computes its base layer only: the model is the
    base model again, without a second copy of any weight (the KL anchor's base forward)."""
    layers = [layer for _, layer in lora_modules(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def store_base_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold every LoRA layer's frozen base weight in ``dtype`` (in place: same Parameter objects,
    new storage); returns how many parameters changed.

    For a run under bf16 autocast: every matmul casts the fp32 weight to bf16 anyway (``nn.Linear``
    under autocast and :func:`kernels.lora.lora_linear` alike), so products, losses and gradients
    stay bit for bit the same, while the fp32 copy's 4 bytes a weight and the two casts per step
    (forward and backward, ~2 bytes a weight each) go. A weight shared with a module that is not a
    LoRA layer (an output embedding tied to the input one) stays as it is: outside autocast its
    other user would see it change. Biases stay too (small, and read in fp32 by some kernels).

    The other frozen parameters are copied into the process's own memory (same values, same objects):
    ``from_pretrained`` maps the checkpoint file and leaves its parameters pointing into that one
    mapping, which stays resident, the whole file, while any parameter still points into it. Cast
    alone, the bf16 weights would sit on top of the mapped fp32 ones (measured on SmolLM2-135M:
    +0.2 GB of peak RSS instead of -0.2 GB); with the embeddings and norms (0.11 GB there) copied
    out, the mapping goes."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    changed, held = 0, set()
    for _, layer in lora_modules(model):
        weight = layer.weight
        if weight.dtype == dtype or not weight.is_floating_point() or owners.get(id(weight), 0) > 1:
            continue
        weight.data = weight.data.to(dtype)
        held.add(id(weight))
        changed += weight.numel()
    if changed:
        for p in model.parameters():
            if id(p) not in held and not p.requires_grad:  # trainable ones (the factors) are new anyway
                p.data = p.data.clone()
    return changed


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every ``LoRALinear`` in ``model`` as ``(module path, layer)``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoRALinear)


def default_target_paths(model: nn.Module) -> list[str]:
    """Every Linear/Conv1D inside the transformer blocks.

    "Inside the blocks" = under an ``nn.ModuleList`` (``model.layers``, ``transformer.h``,
    ``encoder.layer``...), which is how every HF decoder stores its blocks; this leaves out
    ``lm_head``, embeddings and any projector outside the stack.  A model with no ModuleList
    falls back to every linear layer except the output embedding (PEFT's "all-linear").
    """
    block_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    linear_paths = [name for name, m in model.named_modules() if is_linear_like(m)]
    if block_prefixes:
        return [p for p in linear_paths if any(p.startswith(prefix) for prefix in block_prefixes)]
    return all_linear_paths(model)


def all_linear_paths(model: nn.Module) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every Linear/Conv1D but the output embedding."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if is_linear_like(m) and m is not output]


def module_matches(path: str, targets: Sequence[str] | str) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regex that must match the whole path; a
    list matches a path equal to an entry or ending in ``.<entry>`` (a name or dotted suffix)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, targets: Sequence[str] | str | None) -> list[str]:
    """Module paths that ``targets`` selects; errors name what exists when nothing matches."""
    if targets is None:
        paths = default_target_paths(model)
        if not paths:
            raise ValueError(f"apply_lora found no nn.Linear or Conv1D layer in {type(model).__name__}")
        return paths
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return all_linear_paths(model)
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    matched = [(name, m) for name, m in model.named_modules() if name and module_matches(name, targets)]
    if not matched:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear_like(m)})
        raise ValueError(
            f"apply_lora targets {targets!r} match no module of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(names) or '(none)'}"
        )
    wrong = [f"{name} ({type(m).__name__})" for name, m in matched if not is_linear_like(m)]
    if wrong:
        hint = " (already LoRA layers: merge_lora first)" if any(isinstance(m, LoRALinear) for _, m in matched) else ""
        raise ValueError(
            f"apply_lora targets {targets!r} match modules that are not nn.Linear/Conv1D{hint}: "
            + ", ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else "")
        )
    return [name for name, _ in matched]


def pattern_value(patterns: Mapping[str, float], path: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key (a regex) matching the end
    of the module path on a dot boundary wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: Sequence[str] | str | None = None,
    use_rslora: bool = False,
    *,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`LoRALinear`, in place; returns ``model``.

    ``targets``: PEFT ``target_modules`` semantics (list of names / dotted suffixes, a regex
    string, or ``"all-linear"``); ``None`` = every linear layer inside the transformer blocks.
    Afterwards only the LoRA parameters require grad.  ``rank_pattern`` / ``alpha_pattern``
    (PEFT's, regex key -> value) override ``r`` / ``alpha`` per module.
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers; call merge_lora(model) first")
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = dict(alpha_pattern or {})
    paths = resolve_targets(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoRALinear(
            getattr(parent, child),
            r=int(pattern_value(rank_pattern, path, r)),
            alpha=pattern_value(alpha_pattern, path, alpha),
            dropout=dropout,
            use_rslora=use_rslora,
        )
        setattr(parent, child, layer)
    config = LoRAConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        use_rslora=use_rslora,
        targets=targets if targets is None or isinstance(targets, str) else list(targets),
        target_modules=paths,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    # Plain attribute (not a Module/Tensor), read by save_adapter.
    model.__dict__[CONFIG_ATTR] = config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``scale * B @ A`` into every LoRA layer's base weight and put the plain
    ``nn.Linear`` / ``Conv1D`` modules back, in place; returns ``model``.

    The result has the base model's exact module structure and parameter names, so HF
    ``save_pretrained`` / ``from_pretrained`` round-trip.  The merged weights stay frozen.
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA layers (apply_lora or load_adapter first)")
    for path, layer in layers:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.to_base(inplace=True))
    model.__dict__.pop(CONFIG_ATTR, None)
    return model
