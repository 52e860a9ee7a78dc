"""The demo's character-level tokenizer: the project's one way to build it.

One token per character of a fixed alphabet (printable ASCII and the newline), plus
``<pad>``, ``<eos>`` (also used as BOS) and ``<unk>``. It is a BPE model with no merges, so
it is built offline by the ``tokenizers`` library and saved as a standard ``tokenizer.json``
that ``AutoTokenizer.from_pretrained`` loads as a ``PreTrainedTokenizerFast``.

No special token is added on encode: character-level tokenization is then concatenation
invariant (``ids(prompt) + ids(completion) == ids(prompt + completion)``), so however the
trainer and eval split a row, they see the same ids.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2
ALPHABET = "\n" + "".join(c for c in string.printable if c.isprintable())  # "\n" + 95 printable ASCII


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer: ids 0-2 are the specials, then one id per alphabet character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()  # join characters back without separators
    # No normalizer, no pre-tokenizer: spaces and newlines are characters like any other.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD, eos_token=EOS, bos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    return tok


def save_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(out))
    return out
