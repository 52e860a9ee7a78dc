"""Data: masking (against a loss computed by hand on completion tokens), formats, truncation,
the replay plan's shares, and per-rank sharding of a global batch."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from tiny_models import EOS_ID, tiny_llama, tiny_tokenizer

from trainer.data import (
    IGNORE_INDEX,
    REPLAY,
    DataError,
    collate,
    encode_row,
    micro_batches,
    plan_batches,
    read_jsonl,
    tokenize_file,
)
from trainer.loss import token_loss_sum


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _bytes(text: str) -> list[int]:
    """The tiny tokenizer's ids are the UTF-8 bytes: an independent tokenizer for the checks."""
    return list(text.encode("utf-8"))


def test_prompt_completion_is_prompt_plus_completion_plus_eos_with_loss_on_completion(tok):
    ex = encode_row(tok, {"prompt": "ab>", "completion": "xyz"})
    assert ex.input_ids == _bytes("ab>") + _bytes("xyz") + [EOS_ID]
    assert ex.labels == [IGNORE_INDEX] * 3 + _bytes("xyz") + [EOS_ID]


def test_text_rows_learn_every_token_and_messages_only_the_assistant(tok):
    ex = encode_row(tok, {"text": "hi"})
    assert ex.input_ids == ex.labels == _bytes("hi") + [EOS_ID]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "B"}]
    ex = encode_row(tok, {"messages": msgs})
    # The plain template (no chat template on the tiny tokenizer): "role: content", EOS after
    # assistant turns, a newline after the others.
    expected = (_bytes("user: q\n") + _bytes("assistant: A") + [EOS_ID]
                + _bytes("user: r\n") + _bytes("assistant: B") + [EOS_ID])
    assert ex.input_ids == expected
    learned = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert learned == _bytes("A") + [EOS_ID] + _bytes("B") + [EOS_ID]


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = encode_row(tok, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]})
    assert ex.input_ids == _bytes("<user>q") + [EOS_ID] + _bytes("<assistant>A") + [EOS_ID]
    learned = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert learned == _bytes("A") + [EOS_ID]


def test_masked_prompt_tokens_add_nothing_to_the_loss_or_its_gradient(tok):
    """token_loss_sum against a float64 per-token loop over completion tokens only, loss and grads."""
    model = tiny_llama(seed=3, initializer_range=0.2).double()
    rows = [{"prompt": "hello>", "completion": "ab"}, {"prompt": "x>", "completion": "long answer"}]
    batch = collate([encode_row(tok, r) for r in rows], tok.pad_token_id)
    ours = token_loss_sum(model, batch, contextlib.nullcontext)
    grads_ours = torch.autograd.grad(ours, list(model.parameters()), allow_unused=True)

    reference = torch.zeros((), dtype=torch.float64)
    for r in rows:  # one row at a time, no padding: prompt positions never enter the sum
        prompt, completion = _bytes(r["prompt"]), _bytes(r["completion"]) + [EOS_ID]
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        for t in range(len(prompt), len(prompt) + len(completion)):
            reference = reference - logp[t - 1, ids[0, t]]
    grads_ref = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for g, h in zip(grads_ours, grads_ref, strict=True):
        if g is None or h is None:
            assert (g is None or g.abs().max() == 0) and (h is None or h.abs().max() == 0)
        else:
            torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)


def test_long_rows_are_truncated_and_counted(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "p>", "completion": "c" * 40}, {"prompt": "p" * 40, "completion": "c"}, {"text": "short"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    data = tokenize_file(path, tok, max_length=16)
    assert data.truncated == 2 and data.dropped == 1  # the second row's completion is past the cut
    assert len(data.examples) == 1 and len(data.examples[0].input_ids) == 16
    assert "2 truncated" in data.summary() and "1 dropped" in data.summary()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', "bad.jsonl:1: missing field 'completion'"),
    ('{"text": "ok"}\n\n{"question": "a"}\n', "bad.jsonl:3: missing field"),
    ('{"prompt": "a", "completion": ""}\n', "bad.jsonl:1: empty completion"),
    ("\n\n", "bad.jsonl: empty file"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: 'messages' has no non-empty assistant"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_jsonl(path)


def test_text_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8 text \(invalid continuation byte at byte 13\)"):
        read_jsonl(path)


@pytest.mark.parametrize("ratio, batch", [(0.2, 10), (0.3, 7), (0.25, 4), (0.0, 5)])
def test_replay_share_per_batch_and_per_run(ratio, batch):
    steps = 200
    plan = plan_batches(n_task=37, n_replay=23, replay_ratio=ratio, global_batch=batch, steps=steps, seed=5)
    per_batch = [sum(kind == REPLAY for kind, _ in b) for b in plan]
    # Every batch is within one row of the target count, and the run total within one row.
    target = batch * ratio
    assert all(math.floor(target + 1e-9) <= k <= math.ceil(target - 1e-9) for k in per_batch)
    assert abs(sum(per_batch) - ratio * batch * steps) <= 1.0
    # Replay rows are spread through the batch, not always at the front.
    if ratio > 0:
        first = [b.index(next(x for x in b if x[0] == REPLAY)) for b in plan if any(x[0] == REPLAY for x in b)]
        assert len(set(first)) > 1
    # Epochs: every task row appears before any repeats.
    task_rows = [i for b in plan for kind, i in b if kind != REPLAY]
    assert sorted(task_rows[:37]) == list(range(37))
    assert plan == plan_batches(37, 23, ratio, batch, steps, seed=5)  # deterministic
    assert plan != plan_batches(37, 23, ratio, batch, steps, seed=6)


def test_ranks_and_micro_batches_partition_the_global_batch():
    rows = list(range(12))
    shards = [micro_batches(rows, per_device=3, accumulation=2, rank=k, world=2) for k in range(2)]
    flat = sorted(x for shard in shards for mb in shard for x in mb)
    assert flat == rows
    assert micro_batches(rows, 6, 2, 0, 1) == [rows[:6], rows[6:]]
