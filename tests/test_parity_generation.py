"""Parity rows of the generate paths (gptmod/parity/generation.py): correct twins
pass with a margin, and each realistic one-twin generate bug, applied to ONE
twin with mock.patch, fails the row that should see it.

The tiny cases shrink the vocabulary to 512 tokens. With tiny's random weights the next-token
distribution over 50257 tokens is nearly flat, so the token at a top-p cut carries ~2e-5 of the
mass: less than what fp32 rounding of a 50257-term softmax may move (near_ties excuses it, rightly),
and a twin keeping one token too few would be excused with it. Over 512 tokens the token at the cut
carries ~2e-3, far above that rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptmod.config import load_preset
from gptmod.parity import generation
from gptmod.parity.runner import Options, make_case

jg = importlib.import_module("gptmod_jax.generate")
tg = importlib.import_module("gptmod_torch.generate")
tmodel = importlib.import_module("gptmod_torch.model")

TINY = dataclasses.replace(load_preset("tiny"), vocab_size=512)
TOP_P = {"temperature": 0.8, "top_p": 0.9}


@pytest.fixture(scope="module")
def tiny32():
    return make_case("tiny", TINY, "float32", Options(seq_len=32), None)


@pytest.fixture
def clean_jit():
    """JAX's compiled programs dropped before and after: a patched function must be traced in, and
    no later test may reuse a program traced with the patch."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def by_check(rows) -> dict:
    return {r.check: r for r in rows}


# ----------------------------------------------------------------------------- generate paths


@pytest.mark.slow
def test_every_generate_path_gives_the_full_forwards_greedy_tokens(tiny32):
    rows = list(generation.check_generate_paths(tiny32, 8))
    assert [r.check for r in rows] == [f"generate:{p}" for p in generation.PATHS]
    for r in rows:
        assert r.passed, (r.check, r.note)
        # Exact counts: no mismatch at all (diff is the worst float64 margin
        # among mismatches), no near-tie.
        assert r.diff == 0.0 and "0 near-ties excused" in r.note, (r.check, r.note)


def test_jax_decoding_one_position_late_fails_generate(tiny32, clean_jit):
    real = jg.decode_one_token
    with mock.patch.object(
        jg, "decode_one_token", lambda model, tok_B, pos_B: real(model, tok_B, pos_B + 1)
    ):
        rows = by_check(
            generation.check_generate_paths(tiny32, 8, paths=["torch-eager", "jax-jit"])
        )
    assert rows["generate:jax-jit"].passed is False, rows["generate:jax-jit"].note
    # Random weights' argmax survives it (their logits are dominated by the current token); the
    # logits do not: the first decode step (step 1; step 0 is the prefill) is already off.
    assert "jax generate's logits off float64" in rows["generate:jax-jit"].note
    assert rows["generate:jax-jit"].where == "step 1"
    assert rows["generate:jax-jit"].e_jax > rows["generate:jax-jit"].e_max
    assert rows["generate:torch-eager"].passed


# ----------------------------------------------------------------------------- ragged batches


def test_ragged_batch_rows_equal_their_solo_runs(tiny32):
    (row,) = generation.check_ragged(tiny32)
    assert row.check == "ragged" and row.passed, row.note
    assert row.ratio <= 0.8, (row.ratio, row.note)
    assert "prompts of [16, 11, 5] tokens + 4 steps" in row.note
    assert "0 argmax near-ties excused" in row.note


def test_kv_cache_writing_every_row_into_row_0_fails_ragged(tiny32):
    def update(self, pos_BT, k_BTKH, v_BTKH):  # the bug: every row's keys and values land in row 0
        rows_B1 = torch.zeros((pos_BT.shape[0], 1), dtype=torch.long, device=pos_BT.device)
        self.k[rows_B1, :, pos_BT] = k_BTKH
        self.v[rows_B1, :, pos_BT] = v_BTKH
        return self.k, self.v

    with mock.patch.object(tmodel.KVCache, "update", update):
        (row,) = generation.check_ragged(tiny32)
    assert row.check == "ragged" and row.passed is False
    assert "torch batched vs solo logits differ" in row.note
    assert row.where.startswith("row "), row.where


# --------------------------------------------------------------------------- sampling distributions


# top-k, top-p, and all four knobs at once
SOME = [generation.SETTINGS[1], TOP_P, generation.SETTINGS[-1]]


@pytest.mark.slow
def test_sampling_distributions_agree(tiny32, clean_jit):
    rows = list(generation.check_sampling(tiny32, SOME))
    assert [r.check for r in rows] == [
        "sampling T=1 top_k=50",
        "sampling T=0.8 top_p=0.9",
        "sampling T=0.6 top_k=40 top_p=0.95 min_p=0.02",
    ]
    for r in rows:
        assert r.passed, (r.check, r.note)
        assert r.ratio <= 0.8, (r.check, r.ratio, r.note)
        assert "near-ties excused: torch 0, jax 0 tokens, 0 steps left out of TV" in r.note, r.note
    # The filters did filter: top-k 50 allows 50 tokens (random logits have
    # no ties), top-p fewer than all 512.
    assert "allowed tokens per step 50..50 " in rows[0].note
    assert "..512 " not in rows[1].note


def test_sampling_in_bfloat16():
    case = make_case("tiny", TINY, "bfloat16", Options(seq_len=32), None)
    (row,) = generation.check_sampling(case, [TOP_P], steps=4)
    assert row.passed, row.note
    # Rule 2's share (each twin's logits against float64, of e_max); the TV
    # budget of bf16 logits is loose.
    assert max(row.e_torch, row.e_jax) <= 0.8 * row.e_max and row.diff <= row.budget, row.note


def test_reference_support_follows_the_documented_rule():
    # Hand-checked: probabilities 0.6, 0.25, 0.1, 0.05 at T=1.
    x = np.log(np.array([[0.6, 0.25, 0.1, 0.05]]))
    assert generation.reference_support(x, {"temperature": 1.0, "top_k": 2}).tolist() == [
        [1, 1, 0, 0]
    ]
    # top-p: the third token has 0.85 more likely above it, so it stays only when p > 0.85.
    assert generation.reference_support(x, {"temperature": 1.0, "top_p": 0.84}).tolist() == [
        [1, 1, 0, 0]
    ]
    assert generation.reference_support(x, {"temperature": 1.0, "top_p": 0.86}).tolist() == [
        [1, 1, 1, 0]
    ]
    # Ties at the cut are kept: 0.4, 0.3, 0.3 at p = 0.5 keeps both 0.3s.
    tie = np.log(np.array([[0.4, 0.3, 0.3]]))
    assert generation.reference_support(tie, {"temperature": 1.0, "top_p": 0.5}).tolist() == [
        [1, 1, 1]
    ]
    # min-p 0.1: keep p >= 0.06; 0.05 goes. Temperature 2 flattens first:
    # sqrt-ratios, 0.05 -> sqrt(1/12) > 0.1.
    assert generation.reference_support(x, {"temperature": 1.0, "min_p": 0.1}).tolist() == [
        [1, 1, 1, 0]
    ]
    assert generation.reference_support(x, {"temperature": 2.0, "min_p": 0.1}).tolist() == [
        [1, 1, 1, 1]
    ]
    assert generation.tv_bound(0.01, 0.5) == pytest.approx(math.expm1(0.04) / 2)


def _uncapped(real):
    """A generate-module head function with the soft-cap undone: cap *
    atanh(logits / cap) inverts cap * tanh."""

    def f(model, *args):
        cap = model.cfg.logit_softcap
        return cap * jnp.arctanh(real(model, *args) / cap)

    return f


def test_jax_generate_skipping_the_softcap_fails_sampling(tiny32, clean_jit):
    assert TINY.logit_softcap == 30.0
    with (
        mock.patch.object(jg, "prefill", _uncapped(jg.prefill)),
        mock.patch.object(jg, "decode_one_token", _uncapped(jg.decode_one_token)),
    ):
        (row,) = generation.check_sampling(tiny32, [{"temperature": 0.7}])
    assert row.passed is False and row.check == "sampling T=0.7"
    assert (
        "jax logits off float64" in row.note and row.e_jax > row.e_max and row.e_torch <= row.e_max
    )


def _torch_top_p_keeping_one_fewer(logits_BV, knobs, flags):
    """torch's filter_logits with the classic off-by-one: the inclusive cumsum (mass up to and
    including the token) compared with top_p, so the token that crosses p is dropped."""
    x_BV = logits_BV.float() / knobs.temperature
    probs_BV = x_BV.softmax(dim=-1)
    sorted_BV = torch.sort(probs_BV, dim=-1, descending=True).values
    cutoff_B1 = torch.where(sorted_BV.cumsum(-1) < knobs.top_p, sorted_BV, torch.inf).amin(
        dim=-1, keepdim=True
    )
    return torch.where(probs_BV >= cutoff_B1, x_BV, -torch.inf)


def test_top_p_keeping_one_token_fewer_fails_sampling(tiny32, clean_jit):
    with mock.patch.object(tg, "filter_logits", _torch_top_p_keeping_one_fewer):
        (row,) = generation.check_sampling(tiny32, [TOP_P])
    assert row.passed is False and row.check == "sampling T=0.8 top_p=0.9"
    assert "torch drops token" in row.note and "jax drops" not in row.note


def test_temperature_after_the_filters_fails_sampling(tiny32, clean_jit):
    real = jg.filter_logits

    def late_temperature(logits_BV, knobs, flags):
        return (
            real(logits_BV, knobs._replace(temperature=jnp.float32(1.0)), flags) / knobs.temperature
        )

    with mock.patch.object(jg, "filter_logits", late_temperature):
        (row,) = generation.check_sampling(tiny32, [TOP_P])
    assert row.passed is False and row.check == "sampling T=0.8 top_p=0.9"
    assert "jax allows token" in row.note or "jax drops token" in row.note
    assert "torch allows" not in row.note and "torch drops" not in row.note


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="session")  # not module: a worker leaves and re-enters modules (test_gguf.py)
def smollm2_case(smollm2):
    """The real weights' first 4 blocks (embeddings, final norm and tied head included) on Hamlet,
    as the self-test's real target takes them: trained weights and activations at a seventh of the
    30 blocks' cost. `python -m gptmod.parity --weights smollm2` runs the whole model."""
    from gptmod import corpus

    p = smollm2
    cfg = dataclasses.replace(p.cfg, n_layer=4)
    state = {
        k: v for k, v in p.state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 4
    }
    ids = tuple(p.tokenizer.encode(corpus.bundled_text("hamlet")))
    return make_case("smollm2/4L", cfg, "float32", Options(seq_len=32, text_ids=ids), state)


@pytest.mark.slow
def test_rows_pass_on_smollm2(smollm2_case, clean_jit):
    # ragged is left out here: `python -m gptmod.parity --weights smollm2 --check ragged` runs it.
    rows = [
        *generation.check_generate_paths(smollm2_case, 8, paths=["torch-eager", "jax-jit"]),
        *generation.check_sampling(smollm2_case, [generation.SETTINGS[-1]]),
    ]
    assert [r.check for r in rows] == [
        "generate:torch-eager",
        "generate:jax-jit",
        "sampling T=0.6 top_k=40 top_p=0.95 min_p=0.02",
    ]
    failed = [(r.check, r.note) for r in rows if not r.passed]
    assert not failed, failed
    for r in rows:
        assert r.ratio is not None and r.ratio <= 0.8, (r.check, r.ratio, r.note)
