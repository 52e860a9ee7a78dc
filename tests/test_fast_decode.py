"""eval.fast_decode's lean one-token step against HF's own forward (logits, recomputed from scratch with
no cache) and HF ``generate`` (greedy, token for token), and its fallbacks to the HF forward."""
import pytest
import torch
from test_eval_generate import _one_thread  # noqa: F401 (autouse fixture)
from test_sampler import float64_sdpa, hf_generate_one, likely_stop_token, prompt_ids
from tiny_models import EOS_ID, PAD_ID, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer

import eval.fast_decode as fast_decode
from eval.fast_decode import LeanDecoder, unsupported_reason
from eval.generate import _cache_kwarg, _returned_cache, generate_ids
from eval.kv_cache import preallocated_cache
from kernels.backend import cpu_has_native_bf16
from kernels.lora_layers import apply_lora

# Float64 differences are rounding in different op groupings (SDPA kernels, the fused RMSNorm);
# float32 the same at float32's epsilon over a few layers.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
ROWS = [[5, 9, 33, 2, 71, 8, 8, 100], [40, 41], [7, 250, 3, 19, 12], [99]]  # left-padded to 8




def model_in(build, dtype, **overrides):
    model = build(seed=4, initializer_range=0.2, **overrides)
    model.set_attn_implementation("sdpa")  # eager turns fully masked padding rows into NaN in float64
    return model.to(dtype)


def reference_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """HF's forward over the whole left-padded sequences, no cache: the last position's logits."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[PAD_ID] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


def lean_steps(model, rows: list[list[int]], tokens: list[list[int]]) -> list[torch.Tensor]:
    """Prefill with HF into the preallocated cache (as eval.generate does), then one lean step per column
    of ``tokens`` (the token fed to each row at that step); the logits of every step."""
    width, steps = max(len(r) for r in rows), len(tokens[0])
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    attention = torch.zeros((len(rows), width + steps), dtype=torch.long)
    for i, r in enumerate(rows):
        attention[i, width - len(r):width] = 1
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(width + steps)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention[:, :width], position_ids=positions,
                    use_cache=True, **{_cache_kwarg(model): cache})
        decoder = LeanDecoder.for_model(model, _returned_cache(out))
        assert decoder is not None, unsupported_reason(model)
        last = positions[:, -1:].clone()
        logits = []
        for step in range(steps):
            attention[:, width + step] = 1
            last += 1
            token = torch.tensor([t[step] for t in tokens])
            logits.append(decoder.step(token, last, attention[:, :width + step + 1]))
    return logits


CASES = [(tiny_llama, {}), (tiny_qwen2, {}), (tiny_llama, {"attention_bias": True, "mlp_bias": True}),
         (tiny_llama, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
         (tiny_llama, {"num_key_value_heads": 4})]
CASE_IDS = ["llama", "qwen2", "llama-biases", "llama-linear-rope", "llama-mha"]


@pytest.mark.parametrize("copy_max_rows", [0, 8], ids=["views", "copy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("build,overrides", CASES, ids=CASE_IDS)
def test_lean_step_logits_equal_hf_forward(build, overrides, dtype, copy_max_rows, monkeypatch):
    monkeypatch.setattr(fast_decode, "COPY_MAX_ROWS", copy_max_rows)  # 8: the [in, out] copy for these 4 rows
    model = model_in(build, dtype, **overrides)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (len(ROWS), 4), generator=generator).tolist()
    got = lean_steps(model, ROWS, tokens)
    for step, logits in enumerate(got):
        seqs = [r + t[:step + 1] for r, t in zip(ROWS, tokens, strict=True)]
        expected = reference_logits(model, seqs)
        assert logits.dtype == expected.dtype and logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=0, atol=TOLERANCE[dtype], msg=f"step {step}")


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_greedy_through_lean_path_equals_hf_generate(build, monkeypatch):
    model, tok = float64_sdpa(build(seed=3, initializer_range=0.3)), tiny_tokenizer()
    rows = prompt_ids(tok)
    budgets = [5, 14, 3, 12, 9, 1, 14, 7]
    stop_ids = {EOS_ID, likely_stop_token(model, rows, 14)}
    expected = [hf_generate_one(model, ids, b, stop_ids) for ids, b in zip(rows, budgets, strict=True)]
    steps = []
    original = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: steps.append(1) or original(self, *a))
    # 1 and 2: the [in, out] weight copy; 3 and 8: the model's own tensors; 8: rows finish at
    # different steps and leave the cache mid-batch.
    for batch_size in (1, 2, 3, 8):
        got = generate_ids(model, rows, budgets, stop_ids=stop_ids, pad_id=PAD_ID, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"
    assert len(steps) > 20  # the lean path did the steps
    assert any(e and e[-1] in stop_ids for e in expected) and len({len(e) for e in expected}) > 3


def test_weight_copy_follows_in_place_updates(monkeypatch):
    """The [in, out] weight copy kept between calls is rebuilt after an optimizer-style update."""
    monkeypatch.setattr(fast_decode, "COPY_MAX_ROWS", 8)
    model = model_in(tiny_qwen2, torch.float64)
    tokens = [[3], [4], [5], [6]]
    lean_steps(model, ROWS, tokens)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(1.5)
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)
        model.lm_head.weight.mul_(0.5)
    got = lean_steps(model, ROWS, tokens)[0]
    expected = reference_logits(model, [r + t for r, t in zip(ROWS, tokens, strict=True)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def with_trained_lora(model, targets=None):
    """forgetless LoRA (r 4) with random, non-zero B (a fresh adapter's B is zero and would test nothing)."""
    apply_lora(model, r=4, alpha=8, targets=targets)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


@pytest.mark.parametrize("copy_max_rows", [0, 8], ids=["views", "copy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"]], ids=["all", "some"])
def test_lean_step_applies_lora_merge_free(targets, dtype, copy_max_rows, monkeypatch):
    """LoRALinear projections (all of them, or some: then q/k/v and gate/up mix wrapped and plain) give
    HF's forward of the LoRA model; the adapters are read afresh per batch, the base copy is kept."""
    monkeypatch.setattr(fast_decode, "COPY_MAX_ROWS", copy_max_rows)
    model = with_trained_lora(model_in(tiny_qwen2, dtype), targets)
    assert unsupported_reason(model) is None
    tokens = [[3, 9], [4, 8], [5, 7], [6, 6]]
    for _ in range(2):  # the second time after an adapter update (a training step between rollouts)
        got = lean_steps(model, ROWS, tokens)
        for step, logits in enumerate(got):
            expected = reference_logits(model, [r + t[:step + 1] for r, t in zip(ROWS, tokens, strict=True)])
            torch.testing.assert_close(logits, expected, rtol=0, atol=TOLERANCE[dtype])
        with torch.no_grad():
            model.model.layers[1].self_attn.v_proj.lora_B.mul_(-2.0)


def test_greedy_on_lora_model_equals_hf_generate():
    model, tok = float64_sdpa(with_trained_lora(tiny_llama(seed=3, initializer_range=0.3))), tiny_tokenizer()
    rows = prompt_ids(tok)
    expected = [hf_generate_one(model, ids, 9, {EOS_ID}) for ids in rows]
    for batch_size in (1, 8):
        got = generate_ids(model, rows, 9, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"


def test_lora_model_under_autocast_decodes_through_hf_forward():
    """An fp32 LoRA model sampled under a bf16 autocast (a bf16 training run's fp32 master weights): the
    lean steps step aside (their in-place LoRA update would meet a bf16 product and an fp32 factor,
    which crashed a real bf16 SDFT run) and the answers are HF generate's under the same autocast."""
    model, tok = with_trained_lora(tiny_llama(seed=3, initializer_range=0.3)), tiny_tokenizer()
    rows = prompt_ids(tok)[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = [hf_generate_one(model, ids, 6, {EOS_ID}) for ids in rows]
        got = generate_ids(model, rows, 6, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=1)
    assert got == expected


NATIVE_BF16 = (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
               and cpu_has_native_bf16())


@pytest.mark.skipif(not NATIVE_BF16, reason="oneDNN-packed bf16 decoding is used only on CPUs with native bf16")
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_packed_bf16_weights_give_torch_mm_logits_and_hf_greedy(build, monkeypatch):
    """A bf16 LoRA model on a CPU with native bf16 decodes on oneDNN-packed weights: its step logits
    equal the torch.mm path's bit for bit (Qwen2's q/k/v biases included), and on Llama the greedy
    answers equal HF generate's in bf16."""
    model = with_trained_lora(model_in(build, torch.bfloat16))
    tokens = [[3, 9], [4, 8], [5, 7], [6, 6]]
    packed = lean_steps(model, ROWS, tokens)
    assert fast_decode._weights(model, len(ROWS))[1][0].is_mkldnn
    monkeypatch.setattr(fast_decode, "PACK_BF16", False)
    monkeypatch.setattr(fast_decode, "COPY_MAX_ROWS", 0)
    plain = lean_steps(model, ROWS, tokens)
    for got, expected in zip(packed, plain, strict=True):
        assert torch.equal(got, expected)
    if build is tiny_llama:
        monkeypatch.setattr(fast_decode, "PACK_BF16", True)
        rows = prompt_ids(tiny_tokenizer())
        expected = [hf_generate_one(model, ids, 9, {EOS_ID}) for ids in rows]
        # one prompt a batch, as HF's reference runs: left-padded batches move bf16 roundings (in
        # either path), and that is not what this test is about
        assert generate_ids(model, rows, 9, stop_ids=[EOS_ID], pad_id=PAD_ID, batch_size=1) == expected


@pytest.mark.parametrize("build,overrides",
                         [(tiny_llama, {}), (tiny_qwen2, {}), (tiny_llama, {"num_key_value_heads": 1})],
                         ids=["llama-gqa", "qwen2-gqa", "llama-mqa"])
def test_bf16_grouped_query_attention_is_float64_attention(build, overrides, monkeypatch):
    """bf16 steps on the CPU run attention with each key/value head's query heads as one call's query
    positions (fast_decode.GROUP_QUERIES): the SDPA calls the lean step makes have that shape, and the
    step logits are the float64 model's within bf16 rounding, as close as HF's one-position form gets."""
    model = model_in(build, torch.bfloat16, **overrides)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    tokens = [[3, 9, 17], [4, 8, 1], [5, 7, 60], [6, 6, 2]]
    exact = model_in(build, torch.float64, **overrides)
    expected = [reference_logits(exact, [r + t[:step + 1] for r, t in zip(ROWS, tokens, strict=True)])
                for step in range(3)]
    query_shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        query_shapes.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    errors = {}
    for grouped in (True, False):
        monkeypatch.setattr(fast_decode, "GROUP_QUERIES", grouped)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        query_shapes.clear()
        got = lean_steps(model, ROWS, tokens)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        step_shape = (len(ROWS), kv_heads, heads // kv_heads, head_dim) if grouped else (len(ROWS), heads, 1, head_dim)
        assert query_shapes.count(step_shape) == 3 * model.config.num_hidden_layers, query_shapes
        errors[grouped] = max((g.double() - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    scale = max(e.abs().max().item() for e in expected)
    assert errors[True] < 0.05 * scale, errors  # bf16 through two layers: a few units of its 2^-8
    assert errors[True] <= 1.5 * errors[False] + 1e-3 * scale, errors


def _peft_wrapped(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return peft_model.base_model.model  # the Llama itself, its projections wrapped by PEFT


def _hooked(model):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 1.0)
    return model


@pytest.mark.parametrize("make,reason", [
    (lambda: tiny_gpt2(seed=3), "GPT2LMHeadModel"),
    (lambda: _peft_wrapped(tiny_llama(seed=3)), "neither nn.Linear nor LoRALinear"),
    (lambda: _hooked(tiny_llama(seed=3)), "hooks"),
    (lambda: tiny_llama(seed=3).train(), "training"),
], ids=["gpt2", "peft-wrapped", "hooked", "training"])
def test_fallback_to_hf_forward(make, reason, monkeypatch):
    model, tok = make(), tiny_tokenizer()
    assert reason in (unsupported_reason(model) or "")
    if model.training:
        return  # generate_ids switches to eval mode itself; the check above is what this case is for
    steps = []
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *a: steps.append(1))
    rows = prompt_ids(tok)[:4]
    got = generate_ids(model, rows, 6, stop_ids=[], pad_id=PAD_ID, batch_size=4)
    assert got == [hf_generate_one(model, ids, 6, set()) for ids in rows]
    assert steps == []


def test_disabled_switch_sends_supported_models_to_hf(monkeypatch):
    model = tiny_llama(seed=3)
    monkeypatch.setattr(fast_decode, "ENABLED", False)
    cache = preallocated_cache(4)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), use_cache=True, **{_cache_kwarg(model): cache})
    assert LeanDecoder.for_model(model, cache) is None
