"""The int8 weight-only quantizer (gptmod.quant): its error bound, what it quantizes, its agreement
with torch's own per-channel quantizer, the checkpoint format and its named errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gptmod import quant, weights
from gptmod.config import load_preset

from conftest import llama_cfg, random_state


@pytest.fixture(scope="module")
def modern():
    cfg = llama_cfg()
    return cfg, random_state(cfg, seed=3, scale=0.05)


def test_every_weight_is_within_half_a_step_and_each_row_reaches_127(modern):
    cfg, state = modern
    q = quant.quantize(state, cfg)
    back = quant.dequantize(q, cfg)
    for name in quant.quantized_names(cfg):
        w, qw, s = state[name], q[name], q[name + quant.SCALE_SUFFIX]
        assert qw.dtype == np.int8 and s.dtype == np.float32 and s.shape == (w.shape[0],)
        err = np.abs(w.astype(np.float64) - back[name].astype(np.float64))
        # half a quantization step, plus float32 rounding of q * scale
        assert (err <= s[:, None] * 0.5 * (1 + 1e-6) + np.abs(w) * 2e-7).all(), name
        assert (np.abs(qw).max(axis=1) == quant.QMAX).all(), name  # the row's largest maps to ±127
        assert qw.min() >= -quant.QMAX  # -128 is never used: the range is symmetric


def test_q_and_scales_follow_the_rule_computed_by_torch(modern):
    """The rule written out in torch float64 (scale = amax / 127 per row, round half to even):
    the same ints and scales, not one off anywhere."""
    cfg, state = modern
    q = quant.quantize(state, cfg)
    for name in quant.quantized_names(cfg):
        w = torch.from_numpy(state[name]).double()
        s = (w.abs().amax(dim=1) / 127).float()
        assert torch.equal(torch.from_numpy(q[name + quant.SCALE_SUFFIX]), s), name
        ref = torch.round(w / s.double()[:, None]).clamp(-127, 127).to(torch.int8)
        assert np.array_equal(ref.numpy(), q[name]), name


@pytest.mark.parametrize("preset", ["gpt2", "modern-gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_the_matmul_weights_are_quantized_and_norms_biases_positions_stay_float(preset, tie):
    cfg = dataclasses.replace(load_preset(preset), n_layer=1, tie_embeddings=tie)
    names = quant.quantized_names(cfg)
    layer = ["attn.wq", "attn.wk", "attn.wv", "attn.wo"]
    layer += ["mlp.w_gate"] if cfg.mlp == "swiglu" else []
    layer += ["mlp.w_up", "mlp.w_down"]
    want = ["tok_emb.weight", *(f"blocks.0.{m}.weight" for m in layer)]
    want += [] if tie else ["lm_head.weight"]
    assert names == want
    kept = set(weights.canonical_shapes(cfg)) - set(names)
    assert all(k.endswith((".bias", "norm.weight", "pos_emb.weight")) for k in kept), kept


def test_an_all_zero_row_is_zero_and_bad_weights_are_named():
    w = np.array([[0.0, 0.0], [1.0, -0.5]], np.float32)
    q, s = quant.quantize_weight(w)
    assert q.tolist() == [[0, 0], [127, -64]] and s[0] == 1.0  # -63.5 rounds half to even
    with pytest.raises(ValueError, match=r"blocks.0.attn.wq.weight holds 1 NaN"):
        quant.quantize_weight(np.array([[np.nan, 1.0]], np.float32), name="blocks.0.attn.wq.weight")
    with pytest.raises(ValueError, match=r"shape \(3,\); expected an \(out, in\) matrix"):
        quant.quantize_weight(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="dtype int8; expected a float tensor"):
        quant.quantize_weight(np.ones((2, 2), np.int8))


def test_checkpoint_round_trips_bit_exact_and_each_loader_refuses_the_other(modern, tmp_path):
    cfg, state = modern
    q = quant.quantize(state, cfg)
    path = tmp_path / "m.int8.safetensors"
    quant.save(path, q, cfg, metadata={"source": "test"})
    meta = weights.read_metadata(path)
    assert meta[quant.META_QUANT] == quant.SCHEME and meta["source"] == "test"
    back, cfg2 = quant.load(path)
    assert cfg2 == cfg and list(back) == list(quant.quant_shapes(cfg))
    assert all(back[k].dtype == q[k].dtype and np.array_equal(back[k], q[k]) for k in q)
    with pytest.raises(ValueError, match=r"an int8 checkpoint .* read it with gptmod\.quant\.load"):
        weights.load(path)
    weights.save(tmp_path / "f.safetensors", state, cfg)
    with pytest.raises(ValueError, match=r"not an int8 gptmod checkpoint .*weights\.load"):
        quant.load(tmp_path / "f.safetensors")


def test_a_wrong_quantized_state_is_refused_by_name(modern, tmp_path):
    cfg, state = modern
    q = quant.quantize(state, cfg)
    bad = {**q, "blocks.0.attn.wq.weight": q["blocks.0.attn.wq.weight"].astype(np.int16)}
    with pytest.raises(weights.StateError, match=r"wq\.weight: dtype int16, expected int8"):
        quant.save(tmp_path / "x.safetensors", bad, cfg)
    missing = {k: v for k, v in q.items() if k != "tok_emb.weight_scale"}
    with pytest.raises(weights.StateError, match=r"1 missing: tok_emb\.weight_scale"):
        quant.dequantize(missing, cfg)
    with pytest.raises(ValueError, match="reserved"):
        quant.save(tmp_path / "x.safetensors", q, cfg, metadata={quant.META_QUANT: "int4"})
    with pytest.raises(TypeError, match="metadata must map str to str, got 'step': int"):
        quant.save(tmp_path / "x.safetensors", q, cfg, metadata={"step": 3})
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- int8 twins


def test_build_quantizes_once_and_both_twins_hold_the_same_int8_state(modern):
    import gptmod_jax
    import gptmod_torch
    from gptmod import models

    cfg, state = modern
    want = quant.quantize(state, cfg)
    tm = models.build("torch", cfg, state, quant="int8")
    jm = models.build("jax", cfg, want)  # a quantized state implies int8 on its own
    assert tm.quant == jm.quant == "int8"
    for got in (gptmod_torch.export_state(tm), gptmod_jax.export_state(jm)):
        assert set(got) == set(want)
        for name, v in want.items():
            assert got[name].dtype == v.dtype and np.array_equal(got[name], v), name


@pytest.mark.parametrize(
    ("framework", "kw", "msg"),
    [
        ("hf", {"quant": "int8"}, "the hf model has no int8 path here"),
        ("torch", {"quant": "int8", "dtype": "bfloat16"}, "int8 twins compute in float32"),
        ("jax", {"quant": "int4"}, "quant='int4': choose one of int8"),
    ],
)
def test_build_refuses_what_int8_cannot_do(modern, framework, kw, msg):
    from gptmod import models

    cfg, state = modern
    with pytest.raises(ValueError, match=msg):
        models.build(framework, cfg, state, **kw)


def test_a_quantized_state_of_another_config_is_refused_by_name(modern):
    from gptmod import models

    cfg, state = modern
    qstate = quant.quantize(state, cfg)
    qstate.pop("blocks.0.mlp.w_up.weight_scale")
    with pytest.raises(weights.StateError, match=r"blocks\.0\.mlp\.w_up\.weight_scale"):
        models.build("torch", cfg, qstate)


def test_next_token_loss_and_kl_are_torch_s():
    from gptmod.parity.quant_agreement import mean_kl, next_token_loss

    rng = np.random.default_rng(0)
    logits, idx = rng.standard_normal((2, 7, 11)) * 3, rng.integers(0, 11, (2, 7))
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).reshape(-1, 11), torch.from_numpy(idx[:, 1:]).reshape(-1)
    )
    assert next_token_loss(logits, idx) == pytest.approx(float(want), rel=1e-12)
    other = rng.standard_normal((2, 7, 11))
    lp, lq = (torch.from_numpy(x).log_softmax(-1) for x in (logits, other))
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean()
    assert mean_kl(logits, other) == pytest.approx(float(kl), rel=1e-12)
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.slow
def test_parity_on_int8_weights(modern):
    """--quant int8: the int8 twins pass against their float64 int8 model, the `quant` rows compare
    int8 with float32 in each twin, and the checks int8 cannot run are skipped with a reason."""
    from gptmod.parity.runner import Options, run_suite

    cfg, state = modern
    opts = Options(
        dtypes=("float32",),
        seq_len=32,
        greedy_steps=8,
        divergence_steps=16,
        checks=("logits", "cached", "roundtrip", "quant", "hf", "modules"),
        quant="int8",
    )
    rows = run_suite([("llama", cfg, state)], opts, progress=False)
    assert {r.preset for r in rows} == {"llama int8"}
    by_check = {r.check: r for r in rows}
    assert {"quant int8|fp32 torch", "quant int8|fp32 jax"} <= set(by_check)
    for check in ("hf", "modules"):
        assert by_check[check].status == "skip"
        assert by_check[check].note.startswith("not run on int8 weights")
    judged = [r for r in rows if r.check not in ("hf", "modules") and r.passed is not None]
    assert len(judged) >= 6 and all(r.passed for r in judged), [
        (r.check, r.note) for r in judged if not r.passed
    ]
    assert "greedy" in by_check["quant int8|fp32 jax"].note


@pytest.mark.slow
def test_the_quant_check_fails_when_int8_is_not_the_model_it_claims(modern):
    """The `quant` row can fail: int8 weights of other weights than the float32 ones."""
    from gptmod.parity import quant_agreement
    from gptmod.parity.suite import Case

    cfg = modern[0]
    # weights large enough that the next-token distributions are far from uniform
    state, other = (random_state(cfg, seed=s, scale=0.5) for s in (3, 4))
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 32))
    case = Case("llama int8", cfg, "float32", quant.quantize(other, cfg), idx, float_state=state)
    rows = list(quant_agreement.check_quant(case, steps=4))
    assert [r.check for r in rows] == ["quant int8|fp32 torch", "quant int8|fp32 jax"]
    assert all(r.passed is False and r.diff > quant_agreement.QUANT_PPL_BUDGET for r in rows)


def test_perplexity_is_scored_on_thousands_of_tokens_of_real_text(modern):
    from gptmod.parity import quant_agreement as qa
    from gptmod.parity.suite import Case

    cfg, state = modern
    idx = np.zeros((2, 16), np.int64)
    case = Case("c", cfg, "float32", quant.quantize(state, cfg), idx, float_state=state)
    text = np.random.default_rng(1).integers(0, 90, 5400).tolist()  # 5,400 tokens of "text"
    wins = qa.scoring_windows(case, text)
    block = min(qa.QUANT_BLOCK, cfg.max_seq_len)
    assert wins.shape == (qa.QUANT_TOKENS // block, block)
    # contiguous windows from the text's first token to its last
    starts = [next(i for i in range(len(text)) if text[i : i + block] == w.tolist()) for w in wins]
    assert starts[0] == 0 and starts[-1] == len(text) - block and starts == sorted(starts)
    assert qa.scoring_windows(case) is idx  # random ids: the case's own
