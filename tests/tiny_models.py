"""Tiny random Hugging Face models and a byte-level tokenizer, built offline from configs.

Shared by the tests (and usable by benchmarks): nothing here downloads anything.  Every
builder seeds torch before constructing the model, so the same ``seed`` gives the same
weights, and returns the model in eval mode with fp32 weights.

* :func:`tiny_llama`  - ``LlamaForCausalLM``: bias-free ``nn.Linear`` q/k/v/o and a SwiGLU MLP.
* :func:`tiny_qwen2`  - ``Qwen2ForCausalLM``: like Llama but q/k/v carry a bias.
* :func:`tiny_gpt2`   - ``GPT2LMHeadModel``: GPT-2 ``Conv1D`` layers (weight stored ``[in, out]``).
* :func:`tiny_mistral` - ``MistralForCausalLM``: Llama-like with a sliding attention window (8).
* :func:`tiny_opt`    - ``OPTForCausalLM``: learned positions taken from the attention mask, not
  from ``position_ids`` (the packing tests' example of a model that cannot take packed rows).
* :func:`tiny_tokenizer` - byte-level ``PreTrainedTokenizerFast`` (256 byte tokens + specials),
  so any text round-trips; its vocabulary size is :data:`TINY_VOCAB_SIZE`.

The shapes are small and deliberately not powers of two (hidden 48, MLP 72) so that
shape bugs show up.  Override any config field by keyword, e.g.
``tiny_llama(num_hidden_layers=4, hidden_size=512)``.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# 256 byte tokens plus the specials; the tiny models default to this vocabulary so that
# tiny_tokenizer() output can be fed to them directly.
TINY_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


def _build(model_cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    # Eager attention: identical maths on every backend and no SDPA kernel choice to vary.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float()
    model.eval()
    return model


def _llama_like_fields(overrides: dict) -> dict:
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return fields


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, 48-wide random Llama (GQA: 4 query heads, 2 key/value heads)."""
    return _build(LlamaForCausalLM, LlamaConfig(**_llama_like_fields(overrides)), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A 2-layer, 48-wide random Qwen2: q/k/v projections have a bias (o_proj and MLP do not)."""
    model = _build(Qwen2ForCausalLM, Qwen2Config(**_llama_like_fields(overrides)), seed)
    # HF initialises biases to zero; random ones make the bias path actually tested.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def tiny_mistral(seed: int = 0, sliding_window: int | None = 8, **overrides) -> MistralForCausalLM:
    """A 2-layer, 48-wide random Mistral whose sliding window (8) is shorter than test rows."""
    fields = _llama_like_fields(overrides)
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return _build(MistralForCausalLM, MistralConfig(sliding_window=sliding_window, **fields), seed)


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    """A 2-layer, 48-wide random OPT (positions from the attention mask's cumulative sum)."""
    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=48, ffn_dim=72, num_hidden_layers=2,
                  num_attention_heads=4, word_embed_proj_dim=48, max_position_embeddings=128,
                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, dropout=0.0,
                  attention_dropout=0.0)
    fields.update(overrides)
    return _build(OPTForCausalLM, OPTConfig(**fields), seed)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A 2-layer, 48-wide random GPT-2 (Conv1D layers: c_attn, c_proj, c_fc; tied lm_head)."""
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=128,
        n_inner=72,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    fields.update(overrides)
    model = _build(GPT2LMHeadModel, GPT2Config(**fields), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".h." in f".{name}":
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): every UTF-8 byte is one token, ids 0..255.

    Specials: ``<pad>`` = 256, ``<s>`` = 257 (bos), ``</s>`` = 258 (eos).  No BOS is added
    automatically; callers add what their format needs.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sort so the id of a byte is stable across runs and machines.
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of_char()[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte -> printable-character table, inverted (char -> byte value)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}
