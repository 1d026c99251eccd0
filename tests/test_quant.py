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
