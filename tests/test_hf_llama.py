"""gptmod.hf_llama: Hugging Face Llama folders in and out, against transformers as the oracle.

Every model here is random and made by transformers itself
(save_pretrained), so the tests run offline.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import gptmod_jax
import gptmod_torch
from gptmod import hf_llama
from gptmod.config import ModelConfig, RopeScaling, load_preset
from gptmod.hf_llama import HFConfigError
from gptmod.weights import StateError

from conftest import llama_cfg

BOUND = 1e-5  # max |Δlogit| relative to max |logit|, fp32
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Llama 3.2's switches at test size: llama3 rope scaling, theta 500000, GQA
# 8/2, head_dim 16, untied head.
LLAMA32 = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=LLAMA3_ROPE,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
# SmolLM2-135M's switches scaled down: 9 heads / 3 KV heads, theta 100000, tied embeddings.
SMOL = dict(
    vocab_size=512,
    hidden_size=144,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: norms away from 1 (so swapped norms show) and q/k large enough that
    attention depends on the rotary angles (so a wrong rope scaling shows far above the bound)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.08 if ("q_proj" in name or "k_proj" in name) else 0.04
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else std * noise)
    return model.eval()


def _tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def _hf_logits(model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.double().numpy()


def _torch_logits(cfg: ModelConfig, state: dict, idx: np.ndarray) -> np.ndarray:
    m = gptmod_torch.load_state(gptmod_torch.GPT(cfg).eval(), state)
    with torch.no_grad():
        return m(torch.from_numpy(idx)).double().numpy()


def _jax_logits(cfg: ModelConfig, state: dict, idx: np.ndarray) -> np.ndarray:
    m = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state)
    return np.asarray(m(jnp.asarray(idx)), dtype=np.float64)


def _rel(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    err = float(np.abs(got - ref).max())
    return err, err / float(np.abs(ref).max())


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(LlamaForCausalLM(LlamaConfig(**LLAMA32)), seed=1)
    folder = tmp_path_factory.mktemp("llama32")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(LlamaForCausalLM(LlamaConfig(**SMOL)), seed=2)
    folder = tmp_path_factory.mktemp("smol")
    model.save_pretrained(folder)
    return model, folder


# ------------------------------------------------------------------------ import, logits against HF


@pytest.mark.slow
def test_llama32_logits_of_both_twins_match_transformers(llama32, capsys):
    model, folder = llama32
    cfg, state, report, read = hf_llama.read(folder)
    assert cfg == llama_cfg(
        vocab_size=512,
        max_seq_len=131072,
        n_layer=2,
        n_head=8,
        n_kv_head=2,
        d_model=128,
        d_ff=256,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        norm_eps=1e-5,
        tie_embeddings=False,
    )
    assert read.files == ["model.safetensors"]
    # tok_emb, norm, lm_head, 9 per block and not report.dropped
    assert report.counts() == {"copied": 3 + 2 * 9}
    row = next(r for r in report.rows if r.target == "blocks.1.mlp.w_gate.weight")
    assert row.source == "model.layers.1.mlp.gate_proj.weight"
    for k, v in state.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous and v.flags.owndata, k

    # positions up to 383: angles of the scaled (interpolated) frequencies matter
    idx = _tokens(512, 3, 384)
    ref = _hf_logits(model, idx)
    t_abs, t_rel = _rel(_torch_logits(cfg, state, idx), ref)
    j_abs, j_rel = _rel(_jax_logits(cfg, state, idx), ref)
    # The test can fail: the same weights without the llama3 scaling are far off.
    n_abs, n_rel = _rel(_torch_logits(dataclasses.replace(cfg, rope_scaling=None), state, idx), ref)
    with capsys.disabled():
        print(
            f"\nllama32 vs HF: torch {t_abs:.3g} ({t_rel:.3g} rel), jax {j_abs:.3g} ({j_rel:.3g} "
            f"rel); without rope scaling {n_abs:.3g} ({n_rel:.3g} rel)"
        )
    assert t_rel < BOUND and j_rel < BOUND
    assert n_rel > 1000 * BOUND


def test_sharded_and_half_precision_copies_import_exactly(llama32, tmp_path):
    model, folder = llama32
    _, state, _, _ = hf_llama.read(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    cfg_s, state_s, _, read_s = hf_llama.read(tmp_path / "sharded")
    assert (
        len(read_s.files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    )
    _assert_bit_exact(state, state_s)

    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(model).to(dtype)
        half.save_pretrained(tmp_path / str(dtype))
        cfg_h, state_h, report, _ = hf_llama.read(tmp_path / str(dtype))
        assert cfg_h == cfg_s
        hub = half.state_dict()
        for name, v in state_h.items():  # exactly the stored values, upcast by torch
            want = hub[hf_llama.hub_name(name)].float().numpy()
            assert v.dtype == np.float32 and np.array_equal(v, want), name
        assert all(
            r.how == f"as is ({str(dtype).removeprefix('torch.')} upcast to float32)"
            for r in report.rows
        )


@pytest.mark.slow
def test_smollm2_shaped_tied_model(smol, capsys):
    model, folder = smol
    cfg, state, _, _ = hf_llama.read(folder)
    assert (cfg.tie_embeddings, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rope_theta) == (
        True,
        9,
        3,
        16,
        1e5,
    )
    assert cfg.rope_scaling is None and "lm_head.weight" not in state
    idx = _tokens(512, 2, 256, seed=3)
    ref = _hf_logits(model, idx)
    t_abs, t_rel = _rel(_torch_logits(cfg, state, idx), ref)
    j_abs, j_rel = _rel(_jax_logits(cfg, state, idx), ref)
    with capsys.disabled():
        print(
            f"\nsmollm2-shaped vs HF: torch {t_abs:.3g} ({t_rel:.3g} rel), jax "
            f"{j_abs:.3g} ({j_rel:.3g} rel)"
        )
    assert t_rel < BOUND and j_rel < BOUND

    # A state dict carries the tied head as its own entry: equal to the
    # embedding, it is dropped and said so.
    hub = model.state_dict()
    assert "lm_head.weight" in hub
    state2, report2 = hf_llama.from_hf_llama(hub, cfg)
    _assert_bit_exact(state, state2)
    assert report2.dropped == [
        ("lm_head.weight", "equal to model.embed_tokens.weight (tied: tok_emb.weight)")
    ]
    untied = {k: v.clone() for k, v in hub.items()}
    untied["lm_head.weight"][0, 0] += 1
    with pytest.raises(
        StateError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"
    ):
        hf_llama.from_hf_llama(untied, cfg)


def test_mistral_without_sliding_window_reads_as_llama(tmp_path):
    torch.manual_seed(0)
    model = _randomize(MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)), seed=4)
    model.save_pretrained(tmp_path)
    cfg, state, _, _ = hf_llama.read(tmp_path)
    idx = _tokens(64, 2, 48)
    assert _rel(_torch_logits(cfg, state, idx), _hf_logits(model, idx))[1] < BOUND


# ----------------------------------------------------------------------------- export, round trips


def test_export_loads_in_transformers_and_round_trips(llama32, smol, tmp_path):
    for name, (_, folder) in (("llama32", llama32), ("smol", smol)):
        cfg, state, _, _ = hf_llama.read(folder)
        out = tmp_path / name
        names = hf_llama.write(out, state, cfg, extra_files={"README.md": "test\n"})
        assert names == ["config.json", "model.safetensors", "README.md"]
        hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf_model) is LlamaForCausalLM
        assert hf_model.config.rope_parameters["rope_type"] == (
            "llama3" if name == "llama32" else "default"
        )
        idx = _tokens(512, 2, 320, seed=5)
        assert _rel(_hf_logits(hf_model, idx), _torch_logits(cfg, state, idx))[1] < BOUND, name
        cfg2, state2, _, _ = hf_llama.read(out)  # gptmod -> HF -> gptmod: bit-exact
        assert cfg2 == cfg
        _assert_bit_exact(state, state2)


def test_bias_true_is_attention_bias_and_mlp_bias(tmp_path):
    cfg = llama_cfg(bias=True, tie_embeddings=False)
    torch.manual_seed(0)
    tm = gptmod_torch.GPT(cfg)
    with torch.no_grad():
        for n, p in tm.named_parameters():  # HF-style init leaves biases at 0; make every one count
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    state = gptmod_torch.export_state(tm)
    hf_llama.write(tmp_path / "b", state, cfg)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["attention_bias"], config["mlp_bias"]) == (True, True)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    hub = hf_model.state_dict()
    assert all(
        f"model.layers.0.{p}.bias" in hub
        for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    )
    idx = _tokens(96, 2, 40)
    assert _rel(_hf_logits(hf_model, idx), _torch_logits(cfg, state, idx))[1] < BOUND
    cfg2, state2, _, _ = hf_llama.read(tmp_path / "b")
    assert cfg2 == cfg
    _assert_bit_exact(state, state2)


def test_stored_dtypes(smol, tmp_path):
    cfg, state, _, _ = hf_llama.read(smol[1])
    for dtype, np_dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        hf_llama.write(tmp_path / dtype, state, cfg, dtype=dtype, max_shard_bytes=100_000)
        assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
        assert (tmp_path / dtype / "model.safetensors.index.json").is_file()
        shard = next((tmp_path / dtype).glob("model-*.safetensors"))
        with safe_open(str(shard), framework="numpy") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {dtype}  # noqa: SIM118
        cfg2, state2, _, _ = hf_llama.read(tmp_path / dtype)
        assert cfg2 == cfg
        for k, v in state.items():
            assert np.array_equal(state2[k], v.astype(np_dtype).astype(np.float32)), k
    big = {k: v.copy() for k, v in state.items()}
    big["blocks.1.mlp.w_up.weight"][3, 4] = 70000.0
    over = (
        r"float16.*65504: blocks\.1\.mlp\.w_up\.weight "
        r"\(model\.layers\.1\.mlp\.up_proj\.weight, max \|x\| 7e\+04\)"
    )
    with pytest.raises(ValueError, match=over):
        hf_llama.write(tmp_path / "over", big, cfg, dtype="float16")
    assert not (tmp_path / "over").exists()


# ----------------------------------------------------------------------------- configs


def test_old_and_new_rope_layouts_agree():
    new = LlamaConfig(**LLAMA32).to_dict()  # transformers 5: rope_parameters with rope_theta inside
    assert "rope_scaling" not in new and new["rope_parameters"]["rope_theta"] == 500000.0
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    # transformers 4.x style
    old |= {"rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}}
    del old["rope_scaling"]["rope_type"]
    assert hf_llama.config_from_hf(old) == hf_llama.config_from_hf(new)
    assert hf_llama.config_from_hf(new).rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    plain = hf_llama.config_from_hf(LlamaConfig(**TINY).to_dict())
    assert (plain.rope_theta, plain.rope_scaling, plain.n_kv_head) == (10000.0, None, 2)
    clash = {**new, "rope_theta": 10000.0}
    with pytest.raises(
        HFConfigError, match=r"rope_theta=10000.0 disagrees with rope_parameters.rope_theta=500000"
    ):
        hf_llama.config_from_hf(clash)


def test_config_to_hf_round_trips_through_transformers():
    cfg = hf_llama.config_from_hf(LlamaConfig(**LLAMA32).to_dict())
    config = hf_llama.config_to_hf(cfg)
    assert (config["architectures"], config["model_type"], config["dtype"]) == (
        ["LlamaForCausalLM"],
        "llama",
        "float32",
    )
    reloaded = LlamaConfig.from_dict(config)  # what transformers makes of it, written back out
    assert reloaded.rope_parameters == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert hf_llama.config_from_hf(reloaded.to_dict()) == cfg


def _qwen2_folder(tmp_path):
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: GemmaConfig(**TINY, head_dim=8).to_dict(),
            r"model_type='gemma' is not a Llama: it computes \(1 \+ w\) RMSNorm "
            r"weights, the embedding scaled",
        ),
        (
            lambda: Gemma2Config(**TINY, head_dim=8).to_dict(),
            r"'gemma2'.*attention and final logit soft-caps",
        ),
        (
            lambda: MistralConfig(**TINY, sliding_window=4096).to_dict(),
            r"sliding_window=4096: sliding-window attention",
        ),
        (lambda: MixtralConfig(**TINY).to_dict(), r"model_type='mixtral'.*a mixture of experts"),
        (
            lambda: LlamaConfig(**TINY).to_dict() | {"num_local_experts": 4},
            r"num_local_experts=4: a mixture of experts",
        ),
        (
            lambda: LlamaConfig(**TINY, head_dim=16).to_dict(),
            r"head_dim=16 but hidden_size/num_attention_heads=32/4",
        ),
        (
            lambda: LlamaConfig(
                **TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}
            ).to_dict(),
            r"rope type 'linear': only 'default' \(no scaling\) and 'llama3'",
        ),
        (
            lambda: LlamaConfig(
                **TINY,
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 512,
                },
            ).to_dict(),
            r"rope type 'yarn'",
        ),
        (
            lambda: LlamaConfig(**TINY, hidden_act="gelu").to_dict(),
            r"hidden_act='gelu': gptmod's SwiGLU gate is",
        ),
        (
            lambda: LlamaConfig(**TINY, attention_bias=True, mlp_bias=False).to_dict(),
            r"attention_bias=True with mlp_bias=False: .* both must be true or both false",
        ),
        (
            lambda: (
                LlamaConfig(**TINY).to_dict()
                | {"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}
            ),
            r"model_type='rwkv' is not a Llama: its differences from Llama are not known here",
        ),
        (
            lambda: (
                LlamaConfig(**TINY).to_dict()
                | {"architectures": ["LlamaForSequenceClassification"]}
            ),
            r"LlamaForSequenceClassification is not a causal LM",
        ),
        (
            lambda: {
                k: v for k, v in LlamaConfig(**TINY).to_dict().items() if k != "intermediate_size"
            },
            r"config.json \(llama\) lacks intermediate_size",
        ),
    ],
)
def test_config_from_hf_named_errors(make, message):
    with pytest.raises(HFConfigError, match=message):
        hf_llama.config_from_hf(make())


def test_every_config_problem_is_listed_at_once():
    bad = LlamaConfig(**TINY, hidden_act="relu", attention_bias=True).to_dict() | {"num_experts": 8}
    with pytest.raises(HFConfigError) as e:
        hf_llama.config_from_hf(bad)
    assert all(
        s in str(e.value) for s in ("num_experts=8", "hidden_act='relu'", "attention_bias=True")
    )


def test_qwen2_folder_is_refused_with_what_it_needs(tmp_path):
    with pytest.raises(HFConfigError, match=r"'qwen2'.*biases on q_proj/k_proj/v_proj only"):
        hf_llama.read(_qwen2_folder(tmp_path))


def test_config_to_hf_lists_every_switch_llama_cannot_express():
    with pytest.raises(HFConfigError) as e:
        hf_llama.config_to_hf(load_preset("gpt2"))
    msg = str(e.value)
    assert "pos='learned'" in msg and "norm='layernorm'" in msg and "mlp='gelu'" in msg
    assert "logit_softcap" not in msg and "bias" not in msg
    with pytest.raises(HFConfigError, match=r"logit_softcap=30.0 \(Llama has no logit soft-cap"):
        hf_llama.config_to_hf(load_preset("modern-gpt2"))


# ----------------------------------------------------------------------------- tensors


def test_missing_unexpected_misshaped_tensors_in_one_error(llama32):
    model, folder = llama32
    cfg, _, _, _ = hf_llama.read(folder)
    hub = dict(model.state_dict())
    del hub["model.layers.1.mlp.up_proj.weight"]
    hub["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    hub["model.norm.weight"] = torch.ones(127)
    hub["model.layers.0.input_layernorm.weight"] = torch.ones(128, dtype=torch.int32)
    with pytest.raises(StateError) as e:
        hf_llama.from_hf_llama(hub, cfg)
    msg = str(e.value)
    assert "1 missing: model.layers.1.mlp.up_proj.weight" in msg
    assert (
        "1 unexpected (not part of a Llama of this config): model.layers.0.self_attn.q_norm.weight"
        in msg
    )
    assert "model.norm.weight: shape (127,), expected (128,)" in msg
    assert "model.layers.0.input_layernorm.weight: dtype int32, expected a float" in msg


def test_old_rotary_buffers_are_checked_then_dropped(llama32):
    model, folder = llama32
    cfg, state, _, _ = hf_llama.read(folder)
    hub = dict(model.state_dict())
    inv_freq = model.model.rotary_emb.inv_freq  # transformers' own llama3-scaled frequencies
    for i in range(cfg.n_layer):
        hub[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state2, report = hf_llama.from_hf_llama(hub, cfg)
    _assert_bit_exact(state, state2)
    assert [d[0] for d in report.dropped] == [
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)
    ]
    assert "rotary frequencies buffer of old checkpoints" in report.dropped[0][1]
    plain = LlamaForCausalLM(
        LlamaConfig(**{**LLAMA32, "rope_scaling": None})
    ).model.rotary_emb.inv_freq
    hub["model.layers.0.self_attn.rotary_emb.inv_freq"] = plain  # unscaled: the config would lie
    with pytest.raises(
        StateError, match=r"rotary_emb.inv_freq holds rotary frequencies .* different RoPE"
    ):
        hf_llama.from_hf_llama(hub, cfg)


def test_to_hf_llama_names_and_checks(smol):
    cfg, state, _, _ = hf_llama.read(smol[1])
    hub = hf_llama.to_hf_llama(state, cfg)
    assert "lm_head.weight" not in hub and hub["model.layers.1.self_attn.o_proj.weight"] is not None
    assert set(hub) == {k for k in smol[0].state_dict() if k != "lm_head.weight"}
    bad = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(StateError, match=r"1 missing: norm\.weight"):
        hf_llama.to_hf_llama(bad, cfg)
