"""Padding-free (packed) batches against the same rows run one at a time, and the fallback.

References: each row run alone (batch of one, no padding) through Hugging Face's own loss
(``model(input_ids, labels=...).loss``, mean over the row's labelled tokens, times their count)
and its autograd gradient; hand-written label tensors; transformers' own flash-attention
offsets (``prepare_fa_kwargs_from_position_ids``). fp32 throughout, tolerance 1e-5.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2

from trainer.config import ConfigError, build_config
from trainer.data import (
    IGNORE_INDEX,
    REPLAY,
    Example,
    collate,
    count_input_tokens,
    count_loss_tokens,
    group_by_length,
    micro_batches,
    plan_batches,
)
from trainer.packing import (
    build_batch,
    model_inputs,
    pack_examples,
    packed_row_budget,
    packing_support,
    probe_packing,
    resolve_layout,
    token_loss_sum_from_logits,
)

X = IGNORE_INDEX
BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "mistral": tiny_mistral}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rows(seed: int = 0) -> list[Example]:
    """Rows of different lengths: a text row, a prompt/completion row (prompt labels -100) and
    a row longer than Mistral's sliding window (8), so the window is exercised too."""
    gen = random.Random(seed)
    ids = [[gen.randrange(0, 256) for _ in range(n)] for n in (11, 6, 17)]
    return [Example(ids[0], list(ids[0])),
            Example(ids[1], [X, X, X] + ids[1][3:]),
            Example(ids[2], [X] * 5 + ids[2][5:])]


def _model(arch: str, attention: str):
    model = BUILDERS[arch]()
    model.set_attn_implementation(attention)
    return model


# ----------------------------------------------------------------------------- the tensors
def test_packed_tensors_by_hand():
    rows = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [X, 9]), Example([10, 11, 12, 13], [X, X, 12, 13])]
    batch = pack_examples(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels", "shift_labels", "row_spans"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # -100 at each row's first position: nothing predicts it.
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9, X, X, 12, 13]]
    # t holds the label of t+1 of the same row; -100 at every row's last position (2, 4, 8).
    assert batch["shift_labels"].tolist() == [[6, 7, X, 9, X, X, 12, 13, X]]
    assert batch["row_spans"].tolist() == [[0, 0, 3], [0, 3, 2], [0, 5, 4]]
    assert "attention_mask" not in batch and "attention_mask" not in model_inputs(batch)
    # The classic shift of the packed labels is the same thing (so HF's own loss is right too).
    assert batch["labels"][:, 1:].tolist() == batch["shift_labels"][:, :-1].tolist()
    assert count_loss_tokens(batch) == 5
    assert count_input_tokens(batch) == 9


def test_rows_packed_into_several_rows_by_hand():
    """First-fit decreasing into rows of at most 5 tokens: the 4-token example opens row 0, the
    3-token one does not fit beside it and opens row 1, the 2-token one fits row 1 (3 + 2 = 5)."""
    rows = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [X, 9]), Example([10, 11, 12, 13], [X, X, 12, 13])]
    batch = pack_examples(rows, pad_id=0, max_row_tokens=5)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 0], [5, 6, 7, 8, 9]]
    # The pad tail of row 0 is a segment of its own (position 0), so nothing real attends to it.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[X, X, 12, 13, X], [X, 6, 7, X, 9]]
    assert batch["shift_labels"].tolist() == [[X, 12, 13, X, X], [6, 7, X, 9, X]]
    assert batch["row_spans"].tolist() == [[1, 0, 3], [1, 3, 2], [0, 0, 4]]
    assert count_loss_tokens(batch) == 5
    assert count_input_tokens(batch) == 9  # the pad tail is not a real token
    # A budget below the longest example: that example gets a row of its own, never split.
    assert pack_examples(rows, max_row_tokens=1)["input_ids"].shape == (3, 4)


def test_build_batch_packs_into_rows_of_the_longest_example():
    rows = _rows()  # 11, 6 and 17 tokens
    packed = build_batch(rows, pad_id=0, packing=True)
    assert packed["input_ids"].shape == (2, 17) and "attention_mask" not in packed  # [17], [11 + 6]
    assert packed["position_ids"][1].tolist() == list(range(11)) + list(range(6))
    padded = build_batch(rows, pad_id=0, packing=False)
    assert padded["input_ids"].shape == (3, 17) and "attention_mask" in padded
    # Rows of equal length: packed is the padded batch without the mask (each row its own).
    same = [Example([1, 2, 3], [1, 2, 3]), Example([4, 5, 6], [4, 5, 6])]
    batch = build_batch(same, pad_id=0, packing=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_packed_rows_take_two_short_examples_when_long_ones_set_the_width():
    """A flights micro-batch of 16 at 10% self-replay: 14 task rows of 90 tokens, replay rows of
    160 and 168. Rows of the longest example (168) hold one task row each with a 78-token pad
    tail: 16 x 168 = 2,688 tokens computed for 1,588 real ones. A budget of 1.25 x 168 = 210 takes
    two task rows a row: [168], [160] and seven [90, 90], 9 rows of 180 = 1,620 tokens."""
    lengths = [90] * 14 + [160, 168]
    assert packed_row_budget(lengths) == 210
    batch = build_batch([Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths], pad_id=0,
                        packing=True)
    assert batch["input_ids"].shape == (9, 180)
    assert sorted(batch["row_spans"][:, 2].tolist()) == sorted(lengths)  # every example once, whole
    # Examples of one length gain nothing from wider rows: each stays a row of its own.
    same = build_batch([Example([1] * 512, [1] * 512) for _ in range(8)], pad_id=0, packing=True)
    assert same["input_ids"].shape == (8, 512)


def test_padded_collate_keeps_its_keys_and_adds_shift_labels_by_hand():
    rows = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [X, 9])]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [X, 9, X]]
    assert batch["shift_labels"].tolist() == [[6, 7, X], [9, X, X]]
    assert count_loss_tokens(batch) == 3 == count_loss_tokens(pack_examples(rows))
    assert count_input_tokens(batch) == 5 == count_input_tokens(pack_examples(rows))


def test_count_loss_tokens_is_the_same_for_both_layouts_and_the_hand_count():
    rows = _rows()
    by_hand = sum(sum(label != X for label in ex.labels[1:]) for ex in rows)
    assert count_loss_tokens(collate(rows, pad_id=0)) == by_hand
    assert count_loss_tokens(pack_examples(rows)) == by_hand
    # Without shift_labels (a batch built elsewhere) the old rule still applies.
    plain = {k: v for k, v in collate(rows, pad_id=0).items() if k != "shift_labels"}
    assert count_loss_tokens(plain) == by_hand


def test_flash_attention_offsets_match_transformers():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = pack_examples(_rows(), flash_attention_kwargs=True)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 11, 17, 34]
    assert batch["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert batch["cu_seq_lens_q"].dtype == cu_q.dtype == torch.int32
    assert batch["max_length_q"] == int(max_q) == 17 and batch["max_length_k"] == int(max_k)
    # Several packed rows: the offsets run over the flattened batch, pad tails included.
    batch = pack_examples(_rows(), max_row_tokens=17, flash_attention_kwargs=True)
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 17, 28, 34]
    assert batch["max_length_q"] == int(max_q) == 17


def test_bad_rows_are_clear_errors():
    with pytest.raises(ValueError, match="no examples"):
        pack_examples([])
    with pytest.raises(ValueError, match="example 1 has no tokens"):
        pack_examples([Example([1], [1]), Example([], [])])
    with pytest.raises(ValueError, match="example 0 has 2 input ids but 1 labels"):
        pack_examples([Example([1, 2], [1])])


# ------------------------------------------------------------------ losses and gradients
def _alone_loss_sum(model, ex: Example) -> torch.Tensor:
    """HF's own loss of one row alone (mean over its labelled tokens) times their count."""
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor([ex.labels])
    n = int((labels[:, 1:] != X).sum())
    return model(input_ids=ids, labels=labels, use_cache=False).loss * n


LAYOUTS = {"one_row": None, "rows_of_17": 17}  # 17 = the longest example: rows [17], [11, 6]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_packed_rows_give_each_rows_loss_and_gradient(arch, attention, layout):
    model = _model(arch, attention)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _rows()
    batch = pack_examples(rows, pad_id=0, max_row_tokens=LAYOUTS[layout])
    logits = model(**model_inputs(batch), use_cache=False).logits
    for ex, (r, start, n) in zip(rows, batch["row_spans"].tolist(), strict=True):
        packed_row = token_loss_sum_from_logits(logits[r, start:start + n], batch["shift_labels"][r, start:start + n])
        packed_grads = torch.autograd.grad(packed_row, params, retain_graph=True)
        alone = _alone_loss_sum(model, ex)
        alone_grads = torch.autograd.grad(alone, params)
        torch.testing.assert_close(packed_row, alone, atol=1e-5, rtol=1e-5)
        for (name, _), g_packed, g_alone in zip(model.named_parameters(), packed_grads, alone_grads, strict=True):
            torch.testing.assert_close(g_packed, g_alone, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_packed_loss_sum_equals_the_padded_batch_and_hf_loss(arch, layout):
    model = _model(arch, "sdpa")
    rows = _rows(seed=1)
    packed, padded = pack_examples(rows, max_row_tokens=LAYOUTS[layout]), collate(rows, pad_id=0)
    assert count_loss_tokens(packed) == count_loss_tokens(padded)
    with torch.no_grad():
        packed_sum = token_loss_sum_from_logits(model(**model_inputs(packed), use_cache=False).logits,
                                                packed["shift_labels"])
        padded_sum = token_loss_sum_from_logits(model(**model_inputs(padded), use_cache=False).logits,
                                                padded["shift_labels"])
        # HF's own loss on the packed batch (labels shifted by HF) is the same mean.
        hf_mean = model(**model_inputs(packed), labels=packed["labels"], use_cache=False).loss
    torch.testing.assert_close(packed_sum, padded_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_sum / count_loss_tokens(packed), hf_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_no_token_attends_across_rows(arch, attention, layout):
    """Change one example's tokens: every other example's logits stay exactly the same (masked
    keys get weight 0, not ~0), in both directions (an earlier example changing a later one
    is what causality alone would allow), and the changed one's do change."""
    model = _model(arch, attention)
    rows = _rows(seed=2)

    def logits_by_example(examples):
        batch = pack_examples(examples, max_row_tokens=LAYOUTS[layout])
        with torch.no_grad():
            logits = model(**model_inputs(batch), use_cache=False).logits
        return [logits[r, start:start + n] for r, start, n in batch["row_spans"].tolist()]

    base = logits_by_example(rows)
    for j in range(len(rows)):
        changed = list(rows)
        changed[j] = Example([(t + 7) % 256 for t in rows[j].input_ids], rows[j].labels)
        after = logits_by_example(changed)
        for i in range(len(rows)):
            if i == j:
                assert not torch.equal(after[i], base[i])
            else:
                assert torch.equal(after[i], base[i]), (j, i)


def test_mistral_window_is_active_in_these_tests():
    """The 17-token row is longer than tiny Mistral's window of 8, so the sliding-window mask
    (masking_utils' other packed path) is what the Mistral cases above exercise."""
    ids = torch.tensor([_rows()[2].input_ids])
    with torch.no_grad():
        windowed = tiny_mistral(sliding_window=8)(ids).logits
        unwindowed = tiny_mistral(sliding_window=None)(ids).logits
    assert not torch.allclose(windowed[:, 8:], unwindowed[:, 8:], atol=1e-4)
    torch.testing.assert_close(windowed[:, :8], unwindowed[:, :8])


# ------------------------------------------------------------------------ which models pack
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_packing_support_says_yes_where_the_probe_agrees(arch, attention):
    model = _model(arch, attention)
    ok, reason = packing_support(model)
    assert ok and arch in reason and attention in reason
    probe = probe_packing(model)
    assert probe.ok(), probe


def test_packing_support_says_no_for_opt_which_really_leaks():
    model = tiny_opt()
    ok, reason = packing_support(model)
    assert not ok and "'opt'" in reason and "not verified" in reason
    # And rightly: OPT takes positions from the attention mask, so packed rows get the wrong
    # positions and later rows' logits depend on earlier rows.
    probe = probe_packing(model)
    assert not probe.confined and probe.packed_vs_alone > 1e-3


def test_packing_support_says_no_for_unverified_attention_and_non_hf_models():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    ok, reason = packing_support(model)
    assert not ok and "flash_attention_2" in reason
    ok, reason = packing_support(torch.nn.Linear(2, 2))
    assert not ok and "no Hugging Face config" in reason


def test_resolve_layout_auto_true_false():
    llama, opt = tiny_llama(), tiny_opt()
    layout = resolve_layout("auto", False, llama)
    assert layout.packing and not layout.group_by_length and "llama" in layout.reason
    layout = resolve_layout("auto", False, opt)
    assert not layout.packing and layout.group_by_length and "'opt'" in layout.reason
    with pytest.raises(ConfigError, match="packing=true, but model_type='opt'"):
        resolve_layout("true", False, opt)
    layout = resolve_layout("false", True, llama)
    assert not layout.packing and layout.group_by_length


def test_config_keys():
    cfg = build_config({"packing": True, "group_by_length": "yes"})  # YAML reads `packing: true` as a bool
    assert (cfg.packing, cfg.group_by_length) == ("true", True)
    assert (build_config({}).packing, build_config({}).group_by_length) == ("auto", False)
    with pytest.raises(ConfigError, match="packing='sometimes': must be one of auto, true, false"):
        build_config({"packing": "sometimes"})


# ----------------------------------------------------------------------- group_by_length
def test_group_by_length_keeps_every_row_and_the_replay_count():
    gen = random.Random(3)
    task = [Example([1] * gen.randint(3, 60), [1] * 3) for _ in range(40)]
    replay = [Example([2] * gen.randint(80, 200), [2] * 3) for _ in range(15)]
    sources = {0: task, REPLAY: replay}
    plan = plan_batches(len(task), len(replay), 0.2, global_batch=8, steps=12, seed=5)
    again = plan_batches(len(task), len(replay), 0.2, global_batch=8, steps=12, seed=5)
    for batch in plan:
        grouped = group_by_length(batch, sources)
        assert Counter(grouped) == Counter(batch)  # every row exactly once
        assert sum(kind == REPLAY for kind, _ in grouped) == sum(kind == REPLAY for kind, _ in batch)
        lengths = [len(sources[kind][i].input_ids) for kind, i in grouped]
        assert lengths == sorted(lengths, reverse=True)
        # Split over 2 ranks x 2 micro-steps of 2 rows: the shards still cover the batch once.
        shards = [row for rank in (0, 1) for mb in micro_batches(grouped, 2, 2, rank, 2) for row in mb]
        assert Counter(shards) == Counter(batch)
    assert plan == again  # grouping reorders copies; the plan (what resume relies on) is untouched


def test_group_by_length_cuts_padding_on_a_mixed_batch():
    short = [Example([1] * 10, [1] * 10) for _ in range(6)]
    long = [Example([2] * 50, [2] * 50) for _ in range(2)]
    sources = {0: short, REPLAY: long}
    batch = [(0, 0), (REPLAY, 0), (0, 1), (0, 2), (REPLAY, 1), (0, 3), (0, 4), (0, 5)]

    def padded_tokens(rows):
        return sum(collate([sources[k][i] for k, i in mb], 0)["input_ids"].numel()
                   for mb in micro_batches(rows, 2, 4, 0, 1))

    assert padded_tokens(batch) == 2 * (2 * 50) + 2 * (2 * 10)  # two micro-batches hold a long row each
    assert padded_tokens(group_by_length(batch, sources)) == 2 * 50 + 3 * 2 * 10
