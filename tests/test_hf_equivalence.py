"""Hugging Face GPT-2 as an outside oracle: a random-init GPT2LMHeadModel, mapped into both twins,
gives HF's own logits to within 1e-4 in fp32. No download: the model is built from a config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptmod.config import load_preset
from gptmod.hf_gpt2 import from_hf_gpt2

from conftest import jax_logits, jax_model, torch_logits, torch_model


def _hf(n_layer=3, n_embd=96, n_head=6, vocab=1000, n_positions=80, std=0.1, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        initializer_range=std,
        attn_implementation=attn,
    )
    model = GPT2LMHeadModel(hf_cfg).eval()
    # HF zero-inits biases and sets LayerNorm to 1/0: randomise, so every term counts
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = dataclasses.replace(
        load_preset("gpt2"),
        n_layer=n_layer,
        d_model=n_embd,
        n_head=n_head,
        n_kv_head=n_head,
        d_ff=4 * n_embd,
        vocab_size=vocab,
        max_seq_len=n_positions,
    )
    return model, cfg


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_gpt2_logits_both_frameworks(attn):
    hf, cfg = _hf(attn=attn)
    state, report = from_hf_gpt2(hf, cfg)
    assert report.fraction_copied() == 1.0
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.double().numpy()
    assert np.abs(ref).max() > 1.0  # the comparison is not on near-zero logits
    lt = torch_logits(torch_model(cfg, state), idx)
    lj = jax_logits(jax_model(cfg, state), idx)
    assert np.abs(lt - ref).max() <= 1e-4
    assert np.abs(lj - ref).max() <= 1e-4


def test_hf_gpt2_hidden_states_match_per_layer():
    hf, cfg = _hf()
    state, _ = from_hf_gpt2(hf.state_dict(), cfg)
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        hf_hidden = hf(torch.from_numpy(idx), output_hidden_states=True).hidden_states
        _, ours = torch_model(cfg, state)(torch.from_numpy(idx), return_hidden=True)
    # HF applies ln_f to its last hidden state; the residual streams before that must agree.
    for i in range(cfg.n_layer):
        np.testing.assert_allclose(ours[i].numpy(), hf_hidden[i].numpy(), atol=1e-5)


@pytest.mark.slow
def test_gpt2_small_shape_hf_equivalence():
    """GPT-2 small's exact shapes (12 layers, 768 wide, 50257 vocab) in fp32, on a short input."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    cfg = load_preset("gpt2")
    state, report = from_hf_gpt2(hf, cfg)
    assert report.counts().get("copied") == len(state)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 48))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.double().numpy()
    assert np.abs(torch_logits(torch_model(cfg, state), idx) - ref).max() <= 1e-4
    assert np.abs(jax_logits(jax_model(cfg, state), idx) - ref).max() <= 1e-4
