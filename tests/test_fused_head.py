"""The trainer's loss with the fused head (hidden states + kernels.linear_cross_entropy) against
Hugging Face's own ``model(..., labels=...).loss`` on the same global batch: loss and every
gradient within 1e-5, for full fine-tuning and LoRA, with gradient accumulation (the loop's
normalisation: sum over micro-batches / labelled tokens of the whole global batch), padded and
packed micro-batches, on tiny Llama (tied and untied), Qwen2 (biases) and GPT-2 (Conv1D, tied)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer
from torch import nn

from kernels import apply_lora
from trainer.data import collate, count_loss_tokens, encode_row
from trainer.loss import PLAIN, Head, choose_head, to_device
from trainer.packing import build_batch

ROWS = [{"prompt": "hi>", "completion": "ab"}, {"prompt": "a longer prompt>", "completion": "yes"},
        {"prompt": "q>", "completion": "a much longer answer"}, {"prompt": "x>", "completion": "z"},
        {"prompt": "mid size>", "completion": "mid"}]
BUILDERS = {"llama": tiny_llama, "llama_tied": lambda seed: tiny_llama(seed, tie_word_embeddings=True),
            "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def _examples():
    tok = tiny_tokenizer()
    return [encode_row(tok, r) for r in ROWS], tok.pad_token_id


def _model(name: str, lora: bool) -> nn.Module:
    model = BUILDERS[name](seed=5)
    if lora:
        apply_lora(model, r=4, alpha=8)
        with torch.no_grad():  # B = 0 at init would hide the LoRA path entirely
            for p_name, p in model.named_parameters():
                if "lora_B" in p_name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(p_name)))
    model.train()
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ours(model, head: Head, examples, pad_id, micro: int, packing: bool):
    batches = [build_batch(examples[i:i + micro], pad_id, packing) for i in range(0, len(examples), micro)]
    n = sum(count_loss_tokens(b) for b in batches)
    total = 0.0
    for b in batches:
        loss_sum = head.loss_sum(model, to_device(b, torch.device("cpu")), contextlib.nullcontext)
        (loss_sum / n).backward()
        total += float(loss_sum)
    return total / n, _grads(model)


def _hf(model, examples, pad_id):
    batch = collate(examples, pad_id)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return float(loss), _grads(model)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fused_head_loss_and_grads_equal_hf_loss_with_accumulation(one_thread, name, lora, packing):
    examples, pad_id = _examples()
    model = _model(name, lora)
    head = choose_head(model, examples[0], pad_id, torch.device("cpu"), want=True, sharded=False)
    assert head.fused, head.reason
    ref_loss, ref_grads = _hf(model, examples, pad_id)
    model.zero_grad(set_to_none=True)
    loss, grads = _ours(model, head, examples, pad_id, micro=2, packing=packing)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        torch.testing.assert_close(g, ref_grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_tied_head_gradient_lands_on_the_shared_embedding(one_thread):
    examples, pad_id = _examples()
    model = _model("gpt2", lora=False)
    assert model.lm_head.weight is model.transformer.wte.weight
    head = choose_head(model, examples[0], pad_id, torch.device("cpu"), want=True, sharded=False)
    _, grads = _ours(model, head, examples, pad_id, micro=5, packing=False)
    model.zero_grad(set_to_none=True)
    _, plain = _ours(model, PLAIN, examples, pad_id, micro=5, packing=False)
    # The shared weight's gradient is the embedding's part plus the head's part, in one tensor.
    torch.testing.assert_close(grads["transformer.wte.weight"], plain["transformer.wte.weight"], rtol=1e-5, atol=1e-6)


class _ScaledLogits(nn.Module):
    """A model whose logits are 2 * (h W^T): the head is not what the fused path would compute."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.lm_head = inner.lm_head

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, **kwargs):
        self.inner.lm_head = self.lm_head  # the swap happens on this module's attribute
        out = self.inner(**kwargs)
        if isinstance(self.lm_head, nn.Linear):  # not while the trainer has swapped the head out
            out.logits = out.logits * 2.0
        return out


def test_a_head_that_is_not_h_w_plus_b_falls_back_to_the_plain_path(one_thread):
    examples, pad_id = _examples()
    model = _ScaledLogits(tiny_llama(seed=1))
    head = choose_head(model, examples[0], pad_id, torch.device("cpu"), want=True, sharded=False)
    assert not head.fused and "not h W^T + b" in head.reason
    assert not choose_head(tiny_llama(seed=1), examples[0], pad_id, torch.device("cpu"), want=True,
                           sharded=True).fused
    assert choose_head(tiny_llama(seed=1), examples[0], pad_id, torch.device("cpu"), want=False,
                       sharded=False).reason == "fused_head=false"
