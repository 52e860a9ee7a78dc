"""Chat-template prompts: a suite row as the user turn of a conversation, and where the answer ends.

A chat model answers an assistant turn, not a raw continuation; lm-evaluation-harness's
``--apply_chat_template`` renders each prompt as one user message with the generation prompt
appended.  The rendered string already holds every special token the template wants (BOS
included, when the template writes ``{{ bos_token }}``), so it is tokenized without the
tokenizer's own specials: adding them again would give Llama-style models two BOS tokens.
"""
from __future__ import annotations

from .suite import SuiteError

# Rendered as the assistant's message to find what the template writes after an answer.
_ANSWER_MARKER = "forgetless-end-of-answer-marker"


class ChatTemplateError(SuiteError):
    """A chat prompt was asked for and the tokenizer cannot render one."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, why: str) -> None:
    """ChatTemplateError naming ``why`` (who asked for the template) when the tokenizer has none."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"{why}, but the tokenizer ({name}) has no chat template; score without the template "
            f"(drop --apply-chat-template, or set \"chat\": false in the suite's _meta), or use a "
            f"tokenizer that has one (tokenizer_config.json \"chat_template\" or chat_template.jinja)")


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def render_chat(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as a user turn followed by the assistant's generation prompt, as text."""
    try:
        return tokenizer.apply_chat_template(chat_messages(prompt, system), add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template is user code (Jinja): any failure is theirs
        raise ChatTemplateError(f"the tokenizer's chat template failed on a prompt ({type(exc).__name__}: "
                                f"{exc}); prompt: {prompt[:80]!r}") from None


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: EOS, and the special token the template writes
    right after an assistant message (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3).

    Found by rendering a conversation whose answer is a marker and reading the first token
    after it; a template that cannot render it (some allow only certain role orders) leaves EOS.
    """
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    if not has_chat_template(tokenizer):
        return ids
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _ANSWER_MARKER}], tokenize=False)
    except Exception:  # noqa: BLE001 - see the docstring: EOS alone is still a correct stop
        return ids
    at = text.find(_ANSWER_MARKER)
    if at < 0:
        return ids
    tail = text[at + len(_ANSWER_MARKER):]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if tail_ids and tail_ids[0] in special:
        ids.add(int(tail_ids[0]))
    return ids
