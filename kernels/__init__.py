"""forgetless kernels: fused LoRA, Fisher-in-backward and fused EWC, each with a Triton
kernel and a torch path (see ``kernels.backend`` for which one runs)."""
