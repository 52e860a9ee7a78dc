"""forgetless kernels: fused LoRA, Fisher-in-backward, fused EWC (and AdamW with EWC folded
into its step), and the linear head's cross-entropy / KL without the full logits.

Each op has a Triton kernel and a plain-torch path with the same math; ``kernels.backend``
decides which one runs (compiled Triton on CUDA tensors, torch on CPU, the Triton
interpreter when forced under ``TRITON_INTERPRET=1``).  This package imports nothing else
of the project.

The linear head's losses are imported from their module,
``from kernels.linear_cross_entropy import linear_cross_entropy, ...``: exporting the function
here under the module's own name would shadow the module.
"""
import importlib.metadata as _metadata

# Hugging Face ships a distribution named `kernels` too (transformers 5.25+ requires it). Both
# import as `kernels`, so with it installed either transformers imports this package expecting
# theirs or ours is shadowed; fail here with the fix instead of a confusing ImportError later.
try:
    _hf_kernels = _metadata.version("kernels")
except _metadata.PackageNotFoundError:
    _hf_kernels = None
if _hf_kernels is not None:
    raise ImportError(
        f"Hugging Face's `kernels` package ({_hf_kernels}) is installed and has the same import name as "
        "forgetless's `kernels/`; transformers>=5.25 pulls it in. Fix: "
        "pip install 'transformers<5.25' && pip uninstall -y kernels")

from kernels.adamw_ewc import AdamWEWC, adamw_ewc_step
from kernels.ewc import consolidate, ewc_step, lora_ewc_step, lora_fisher_penalty, online_update
from kernels.fisher import linear_grad_and_fisher, linear_grad_and_fisher_
from kernels.lora import lora_linear
from kernels.lora_layers import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora
from kernels.peft_format import AdapterFormatError, load_adapter, save_adapter

__all__ = [
    "AdamWEWC",
    "AdapterFormatError",
    "LoRAConfig",
    "LoRALinear",
    "adamw_ewc_step",
    "apply_lora",
    "consolidate",
    "ewc_step",
    "linear_grad_and_fisher",
    "linear_grad_and_fisher_",
    "load_adapter",
    "lora_ewc_step",
    "lora_fisher_penalty",
    "lora_linear",
    "lora_modules",
    "merge_lora",
    "online_update",
    "save_adapter",
]
