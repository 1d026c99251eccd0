"""gptmod.gguf_llama: GGUF in and out for Llama models, against
transformers' GGUF loader and llama.cpp's layout.

The real SmolLM2-135M-Instruct GGUF (Q4_1, tied) is read once per module by us and once by
transformers; F16/Q8_0 error bounds, the permutation and the named errors use tiny random models.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

import gptmod_jax
import gptmod_torch
from gptmod import gguf_llama
from gptmod.config import ModelConfig, RopeScaling
from gptmod.corpus import bundled_text
from gptmod.gguf_llama import GGUFError, permute_rows, read, unpermute_rows, write
from gptmod.weights import StateError

from conftest import (
    SMOLLM2_135M,
    jax_logits,
    jax_model,
    llama_cfg,
    smollm2_gguf_path,
    torch_logits,
    torch_model,
    torch_pair_state,
)

# fp32 parity bound, relative to max |logit|: DESIGN.md's fp32 budget. Measured on 200 tokens of
# Hamlet (max |logit| 37): torch 6.2e-6 (2.3e-4 absolute), JAX 4.5e-6 (1.7e-4): about 3x headroom.
FP32_REL = 2e-5
N_TOKENS = 200

TINY = llama_cfg(d_model=64, d_ff=128, rope_theta=500000.0)


def _hf_name(canonical: str) -> str:
    """Canonical name -> transformers' LlamaForCausalLM name (written out
    independently of the module)."""
    fixed = {
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    if canonical in fixed:
        return fixed[canonical]
    i, rest = canonical.removeprefix("blocks.").split(".", 1)
    sub = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.wq.weight": "self_attn.q_proj.weight",
        "attn.wk.weight": "self_attn.k_proj.weight",
        "attn.wv.weight": "self_attn.v_proj.weight",
        "attn.wo.weight": "self_attn.o_proj.weight",
        "mlp.w_gate.weight": "mlp.gate_proj.weight",
        "mlp.w_up.weight": "mlp.up_proj.weight",
        "mlp.w_down.weight": "mlp.down_proj.weight",
    }
    return f"model.layers.{i}.{sub[rest]}"


def _hf_load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _hf_logits(model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.double().numpy()


# ----------------------------------------------------------------------------- the real model

# Session-scoped, not module-scoped: tests are handed out one at a time (--maxschedchunk=1), so a
# worker moves between modules, and pytest tears a module's fixtures down each time it leaves one:
# transformers' GGUF load (about 15 s) ran three times a run.


@pytest.fixture(scope="session")
def real():
    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    model = read(path)
    print(f"\nread() of {path.name}: {time.perf_counter() - t0:.1f} s")
    return path, model


@pytest.fixture(scope="session")
def hf(real):
    return _hf_load(real[0])


@pytest.fixture(scope="session")
def idx(smollm2_hf_tokenizer) -> np.ndarray:
    """The start of Hamlet, tokenized by transformers' own tokenizer from the same GGUF."""
    ids = smollm2_hf_tokenizer(bundled_text("hamlet")[:4000])["input_ids"]
    assert len(ids) >= N_TOKENS
    return np.asarray([ids[:N_TOKENS]])


@pytest.fixture(scope="session")
def hf_ref(hf, idx) -> np.ndarray:
    return _hf_logits(hf, idx)


@pytest.fixture(scope="session")
def ours_torch(real, idx) -> np.ndarray:
    _, m = real
    return torch_logits(torch_model(m.cfg, m.state), idx)


@pytest.mark.slow
def test_real_config_and_fields(real, hf):
    _, m = real
    c = hf.config
    assert m.cfg == SMOLLM2_135M
    assert (m.cfg.n_layer, m.cfg.n_head, m.cfg.n_kv_head) == (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
    )
    assert (m.cfg.d_model, m.cfg.d_ff, m.cfg.vocab_size) == (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
    )
    # theirs is the raw float32 value
    assert math.isclose(m.cfg.norm_eps, c.rms_norm_eps, rel_tol=1e-7)
    assert c.tie_word_embeddings and m.cfg.tie_embeddings
    f = m.fields
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.model"] == "gpt2"
    assert len(f["tokenizer.ggml.tokens"]) == 49152 and len(f["tokenizer.ggml.merges"]) == 48900
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert not any(k.startswith("GGUF.") for k in f)  # the header's counts are not metadata


def test_real_report(real):
    _, m = real
    rows = {r.target: r for r in m.report.rows}
    assert list(rows) == list(m.state)
    assert (rows["tok_emb.weight"].source, rows["tok_emb.weight"].how) == (
        "token_embd.weight",
        "Q8_0: dequantized Q8_0 -> fp32",
    )
    assert rows["blocks.3.attn.wq.weight"].source == "blk.3.attn_q.weight"
    assert rows["blocks.3.attn.wq.weight"].how == (
        "Q4_1: dequantized Q4_1 -> fp32; llama.cpp's q/k row permutation undone (9 heads)"
    )
    assert rows["blocks.3.attn.wk.weight"].how.endswith("undone (3 heads)")
    assert rows["blocks.3.attn.wv.weight"].how == "Q4_1: dequantized Q4_1 -> fp32"
    assert rows["norm.weight"].how == "F32: read as is"
    assert sum(r.size for r in m.report.rows) == m.cfg.num_params() == 134_515_008
    assert any("tied" in n for n in m.report.notes)


def test_real_state_equals_transformers(real, hf):
    _, m = real
    sd = hf.state_dict()
    assert set(sd) == {_hf_name(k) for k in m.state} | {"lm_head.weight"}
    for k, v in m.state.items():
        assert v.dtype == np.float32 and v.flags["C_CONTIGUOUS"], k
        np.testing.assert_array_equal(v, sd[_hf_name(k)].numpy(), err_msg=k)
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), m.state["tok_emb.weight"])  # tied


@pytest.mark.slow
def test_real_logits_both_twins_match_transformers(real, idx, hf_ref, ours_torch):
    _, m = real
    peak = np.abs(hf_ref).max()
    d_torch = np.abs(ours_torch - hf_ref).max()
    d_jax = np.abs(jax_logits(jax_model(m.cfg, m.state), idx) - hf_ref).max()
    print(
        f"\nmax|logit| {peak:.2f}; torch max|dlogit| {d_torch:.3g} ({d_torch / peak:.3g} rel), "
        f"jax {d_jax:.3g} ({d_jax / peak:.3g} rel)"
    )
    assert d_torch <= FP32_REL * peak
    assert d_jax <= FP32_REL * peak
    assert (
        ours_torch.argmax(-1) == hf_ref.argmax(-1)
    ).mean() > 0.99  # not vacuous: the logits are real


@pytest.mark.slow
def test_real_f32_round_trip(real, idx, hf_ref, ours_torch, tmp_path):
    """write(F32) then transformers (an independent reader) and our read()
    get the very same model back."""
    src, m = real
    extra = {k: v for k, v in m.fields.items() if k.startswith(("tokenizer.", "general."))}
    out = tmp_path / "smollm2-f32.gguf"
    write(out, m.state, m.cfg, fields=extra)
    # the temporary file was renamed, not left over
    assert [p.name for p in tmp_path.iterdir()] == [out.name]

    back = read(out)
    assert back.cfg == m.cfg
    assert list(back.state) == list(m.state)
    for k in m.state:
        np.testing.assert_array_equal(back.state[k], m.state[k], err_msg=k)
    assert {k: v for k, v in back.fields.items() if k in extra and k != "general.file_type"} == {
        k: v for k, v in extra.items() if k != "general.file_type"
    }
    assert back.fields["general.file_type"] == 0  # ALL_F32, not the source's Q4_1

    # The value types llama.cpp expects: the same as the source file's for every key both have.
    theirs, ours = GGUFReader(src), GGUFReader(out)
    for k in extra:
        assert list(ours.fields[k].types) == list(theirs.fields[k].types), k
    assert {t.tensor_type for t in ours.tensors} == {GGMLQuantizationType.F32}
    del theirs, ours

    hf_back = _hf_logits(_hf_load(out), idx)
    # transformers reads the same weights from our file
    np.testing.assert_array_equal(hf_back, hf_ref)
    assert np.abs(hf_back - ours_torch).max() <= FP32_REL * np.abs(hf_ref).max()
    out.unlink()  # 540 MB: pytest keeps the last runs' tmp folders


# ------------------------------------------------------------------ tiny models: F16 / Q8_0, llama3


def _tiny_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    # Weights of GPT-2 scale but with outliers, so the per-block scales differ.
    state = torch_pair_state(cfg, seed)
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.standard_normal(v.shape).astype(np.float32) * (0.05 if v.ndim == 2 else 0.3))
        for k, v in state.items()
    }


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_quantized_round_trip_within_its_error(out_type, tmp_path):
    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    state = _tiny_state(cfg)
    out = tmp_path / f"tiny-{out_type}.gguf"
    write(out, state, cfg, out_type=out_type)
    back = read(out)
    assert back.cfg == cfg
    kinds = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    want = GGMLQuantizationType.F16 if out_type == "f16" else GGMLQuantizationType.Q8_0
    assert (
        kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == GGMLQuantizationType.F32
    )
    assert (
        kinds["token_embd.weight"] == kinds["blk.1.attn_q.weight"] == kinds["output.weight"] == want
    )
    assert back.fields["general.file_type"] == {"f16": 1, "q8_0": 7}[out_type]
    worst = 0.0
    for k, w in state.items():
        got = back.state[k]
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w, err_msg=k)  # norms stay F32
            continue
        err = np.abs(got - w)
        # round to nearest: half an ulp of 11 bits (subnormals: 2^-25 absolute)
        if out_type == "f16":
            bound = np.abs(w) * 2.0**-11 + 2.0**-25
        # blocks of 32 along each row: d = max|block|/127, stored as
        # float16; q = round(w/d) in [-127, 127]
        else:
            d = np.abs(w).reshape(-1, 32).max(1, keepdims=True) / 127
            bound = np.broadcast_to(d * (0.5 + 127 * 2.0**-11), (d.shape[0], 32)).reshape(w.shape)
        assert np.all(err <= bound), k
        worst = max(worst, float((err / bound).max()))
        assert err.max() > 0, k  # it was really encoded
    print(f"\n{out_type}: worst error / bound {worst:.3f}")


def _llamacpp_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """rope_freqs.weight exactly as llama.cpp's convert_hf_to_gguf.py
    computes it (fp32 torch), for Llama 3."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low, high, old = 1.0, 4.0, 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def test_tiny_untied_llama3_round_trip(tmp_path):
    cfg = dataclasses.replace(TINY, tie_embeddings=False, rope_scaling=RopeScaling(factor=8.0))
    state = _tiny_state(cfg)
    out = tmp_path / "tiny.gguf"
    write(out, state, cfg, name="tiny")
    back = read(out)
    assert back.cfg == cfg
    assert list(back.state) == list(state)
    for k in state:
        np.testing.assert_array_equal(back.state[k], state[k], err_msg=k)
    assert back.fields["general.name"] == "tiny"
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    assert "output.weight" in tensors and "rope_freqs.weight" in tensors
    # Our rope_freqs are llama.cpp's own (up to its fp32 arithmetic).
    want = _llamacpp_rope_freqs(cfg.rope_theta, cfg.head_dim, 8.0)
    np.testing.assert_allclose(np.asarray(tensors["rope_freqs.weight"].data), want, rtol=1e-6)
    assert [d[0] for d in back.report.dropped] == ["rope_freqs.weight"]


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llamacpp_rope_freqs_read_as_llama3_scaling(factor, tmp_path):
    """A rope_freqs tensor as llama.cpp writes it (Llama 3.1: factor 8; 3.2: factor 32) reads as the
    RopeScaling whose frequencies both twins compute as llama.cpp and transformers do."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = tmp_path / "base.gguf"
    write(base, _tiny_state(TINY), TINY)
    out = tmp_path / "llama3.gguf"
    freqs = _llamacpp_rope_freqs(TINY.rope_theta, TINY.head_dim, factor)
    _rewrite(base, out, add={"rope_freqs.weight": freqs})
    cfg = read(out).cfg
    assert cfg.rope_scaling == RopeScaling(
        factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
    )
    # llama.cpp rotates by base frequency / factor (ggml computes both in fp32).
    hd = TINY.head_dim
    llamacpp = (1.0 / TINY.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(
        np.float32
    ) / freqs
    rope = {
        "rope_type": "llama3",
        "rope_theta": TINY.rope_theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_cfg = LlamaConfig(
        hidden_size=TINY.d_model,
        num_attention_heads=TINY.n_head,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )
    hf_inv = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")[0].double().numpy()
    for twin in (gptmod_torch.model.rope_inv_freq(cfg), gptmod_jax.model.rope_inv_freq(cfg)):
        np.testing.assert_allclose(twin, llamacpp, rtol=1e-6)
        np.testing.assert_allclose(twin, hf_inv, rtol=1e-6)
    # the scaling does change frequencies
    assert not np.allclose(llamacpp, llamacpp * freqs, rtol=1e-3)


def test_output_equal_to_token_embd_stays_untied(tmp_path):
    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    state = _tiny_state(cfg)
    state["lm_head.weight"] = state["tok_emb.weight"].copy()
    write(tmp_path / "t.gguf", state, cfg)
    back = read(tmp_path / "t.gguf")
    assert back.cfg.tie_embeddings is False
    assert any("kept untied" in n for n in back.report.notes)


# ----------------------------------------------------------------------------- the q/k permutation


def test_permutation_matches_llamacpp_layout_and_inverts():
    n_head, head_dim, d_in = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, d_in)).astype(np.float32)
    p = permute_rows(w, n_head)
    # llama.cpp's rows, written out: within head h, GGUF row 2i is HF row i
    # and row 2i+1 is HF row head_dim/2 + i.
    want = np.empty_like(w)
    for h in range(n_head):
        for i in range(head_dim // 2):
            want[h * head_dim + 2 * i] = w[h * head_dim + i]
            want[h * head_dim + 2 * i + 1] = w[h * head_dim + head_dim // 2 + i]
    np.testing.assert_array_equal(p, want)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_rows(p, n_head), w)
    np.testing.assert_array_equal(permute_rows(unpermute_rows(w, n_head), n_head), w)


def test_write_permutes_q_and_k_and_read_undoes_it(tmp_path):
    state = _tiny_state(TINY)
    write(tmp_path / "t.gguf", state, TINY)
    raw = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "t.gguf").tensors}
    for name, ours, n in (
        ("blk.1.attn_q.weight", "blocks.1.attn.wq.weight", TINY.n_head),
        ("blk.1.attn_k.weight", "blocks.1.attn.wk.weight", TINY.n_kv_head),
    ):
        np.testing.assert_array_equal(raw[name], permute_rows(state[ours], n))
        assert not np.array_equal(raw[name], state[ours])
    # v is not permuted
    np.testing.assert_array_equal(raw["blk.1.attn_v.weight"], state["blocks.1.attn.wv.weight"])
    back = read(tmp_path / "t.gguf")
    np.testing.assert_array_equal(
        back.state["blocks.1.attn.wq.weight"], state["blocks.1.attn.wq.weight"]
    )
    np.testing.assert_array_equal(
        back.state["blocks.1.attn.wk.weight"], state["blocks.1.attn.wk.weight"]
    )


# ----------------------------------------------------------------------------- named errors


def _rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str = "llama",
    kv: dict | None = None,
    drop: tuple[str, ...] = (),
    replace: dict | None = None,
    add: dict | None = None,
) -> None:
    """Copy a GGUF file with gguf's own writer, changing metadata (kv: key -> (value,
    GGUFValueType)) and tensors."""
    kv, replace, add = kv or {}, replace or {}, add or {}
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in kv:
            continue
        types = list(f.types)
        w.add_key_value(
            k, f.contents(), types[0], types[-1] if types[0] == GGUFValueType.ARRAY else None
        )
    for k, (v, t) in kv.items():
        w.add_key_value(k, v, t)
    for t in r.tensors:
        if t.name not in drop:
            data = replace.get(t.name, np.asarray(t.data))
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    for name, data in add.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write(path, _tiny_state(TINY), TINY)
    return path


U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
_READ_ERRORS = {
    "architecture": (dict(arch="qwen2"), "general.architecture='qwen2': only 'llama' is supported"),
    "tensor type": (
        dict(replace={"blk.0.attn_norm.weight": np.arange(64, dtype=np.int32)}),
        "tensor blk.0.attn_norm.weight has type I32, which gguf cannot dequantize",
    ),
    "head_dim": (
        dict(kv={"llama.rope.dimension_count": (8, U32)}),
        "llama.rope.dimension_count=8, but embedding_length/head_count = 64/4 = 16: a head_dim "
        "other than d_model/n_head is unsupported",
    ),
    "key_length": (
        dict(kv={"llama.attention.key_length": (32, U32)}),
        "llama.attention.key_length=32, but",
    ),
    "experts": (
        dict(kv={"llama.expert_count": (8, U32)}),
        "llama.expert_count=8: mixture-of-experts models are not supported",
    ),
    "sliding window": (
        dict(kv={"llama.attention.sliding_window": (4096, U32)}),
        "llama.attention.sliding_window=4096: sliding-window attention is not supported",
    ),
    "rope scaling": (
        dict(kv={"llama.rope.scaling.type": ("yarn", STR)}),
        "llama.rope.scaling.type='yarn' (factor 1.0) is not supported",
    ),
    "unknown key": (
        dict(kv={"llama.logit_scale": (2.0, F32)}),
        "metadata key(s) ['llama.logit_scale'] are not understood by gptmod",
    ),
    "missing": (dict(drop=("blk.1.ffn_up.weight",)), "1 missing: blk.1.ffn_up.weight"),
    "unexpected": (
        dict(
            add={
                "blk.0.attn_q.bias": np.zeros(64, np.float32),
                "foo.weight": np.zeros(3, np.float32),
            }
        ),
        "2 unexpected: blk.0.attn_q.bias, foo.weight",
    ),
    "shape": (
        dict(replace={"blk.0.ffn_up.weight": np.zeros((64, 128), np.float32)}),
        "blk.0.ffn_up.weight: shape (64, 128), expected (128, 64)",
    ),
    "vocab": (
        dict(kv={"llama.vocab_size": (100, U32)}),
        "llama.vocab_size gives a vocabulary of 100, but token_embd.weight has 96 rows",
    ),
    "rope_freqs": (
        dict(add={"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)}),
        "rope_freqs.weight does not match Llama 3 rope scaling",
    ),
    "split": (
        dict(kv={"split.count": (2, GGUFValueType.UINT16)}),
        "this is shard 1 of 2 of a split GGUF",
    ),
    "non-integer": (
        dict(kv={"llama.block_count": ("two", STR)}),
        "llama.block_count='two': expected an integer",
    ),
}


@pytest.mark.parametrize("case", list(_READ_ERRORS))
def test_read_named_errors(case, tiny_file, tmp_path):
    change, message = _READ_ERRORS[case]
    bad = tmp_path / f"{case.replace(' ', '_')}.gguf"
    _rewrite(tiny_file, bad, **change)
    with pytest.raises(GGUFError) as e:
        read(bad)
    assert message in str(e.value)
    assert str(bad) in str(e.value)


def test_read_rejects_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a valid GGUF file"):
        read(tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing.gguf")


def test_write_named_errors(tmp_path):
    out = tmp_path / "x.gguf"
    classic = ModelConfig(
        vocab_size=96,
        max_seq_len=32,
        n_layer=1,
        n_head=4,
        d_model=64,
        d_ff=256,
        n_kv_head=4,
        logit_softcap=30.0,
    )
    with pytest.raises(GGUFError) as e:
        write(out, {}, classic)
    assert (
        "a llama GGUF cannot express this config: pos='learned', norm='layernorm', mlp='gelu', "
        "bias=True, logit_softcap=30.0"
    ) in str(e.value)
    state = _tiny_state(TINY)
    with pytest.raises(GGUFError, match=r"out_type='q4_0': must be one of 'f32', 'f16', 'q8_0'"):
        write(out, state, TINY, out_type="q4_0")
    with pytest.raises(GGUFError, match=r"llama\.context_length=4096 \(cfg gives 128\)"):
        write(out, state, TINY, fields={"llama.context_length": 4096})
    with pytest.raises(
        GGUFError, match=r"fields\['tokenizer\.ggml\.bos_token_id'\]: -1 is not a UINT32"
    ):
        write(out, state, TINY, fields={"tokenizer.ggml.bos_token_id": -1})
    with pytest.raises(
        GGUFError, match=r"tokenizer\.ggml\.tokens gives a vocabulary of 2, but token_embd"
    ):
        write(out, state, TINY, fields={"tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(
        GGUFError, match=r"fields\['x\.y'\] mixes element types \['INT32', 'STRING'\]"
    ):
        write(out, state, TINY, fields={"x.y": [1, "a"]})
    odd = dataclasses.replace(TINY, rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=4096))
    with pytest.raises(
        GGUFError,
        match=r"cfg\.rope_scaling has low_freq_factor=1\.0, high_freq_factor=4\.0, "
        r"original_max_seq_len=4096",
    ):
        write(out, state, odd)
    with pytest.raises(
        GGUFError, match=r"cfg\.norm_eps=1\.2345678901e-05 is not exact in GGUF's FLOAT32"
    ):
        write(out, state, dataclasses.replace(TINY, norm_eps=1.2345678901e-5))
    narrow = dataclasses.replace(TINY, d_model=48, n_head=4, n_kv_head=2)
    with pytest.raises(
        GGUFError, match=r"token_embd\.weight has rows of 48 values, not a multiple of Q8_0's block"
    ):
        write(out, _tiny_state(narrow), narrow, out_type="q8_0")
    with pytest.raises(StateError, match=r"1 missing: norm\.weight"):
        write(out, {k: v for k, v in state.items() if k != "norm.weight"}, TINY)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left behind


def test_write_keeps_metadata_types(tmp_path):
    out = tmp_path / "t.gguf"
    fields = {
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.token_type": [1] * 96,
        "tokenizer.ggml.scores": [0.5] * 96,
        "tokenizer.chat_template": "{{ x }}",
        "my.flag": True,
        "my.big": 2**40,
        "my.ratio": 0.1,
    }
    write(out, _tiny_state(TINY), TINY, fields=fields)
    f = GGUFReader(out).fields
    types = {k: [GGUFValueType(t).name for t in f[k].types] for k in fields}
    assert types == {
        "tokenizer.ggml.eos_token_id": ["UINT32"],
        "tokenizer.ggml.token_type": ["ARRAY", "INT32"],
        "tokenizer.ggml.scores": ["ARRAY", "FLOAT32"],
        "tokenizer.chat_template": ["STRING"],
        "my.flag": ["BOOL"],
        "my.big": ["INT64"],
        "my.ratio": ["FLOAT32"],
    }
    back = read(out).fields
    assert {k: back[k] for k in fields} == fields
    assert gguf_llama.OUT_TYPES == ("f32", "f16", "q8_0")


def test_written_hyperparameters_are_uint32_as_llama_cpp_reads_them(tmp_path):
    """llama.cpp refuses a file whose llama.context_length (or any integer hyperparameter) is
    INT32: "key llama.context_length has wrong type i32 but expected type u32"."""
    out = tmp_path / "t.gguf"
    write(out, _tiny_state(TINY), TINY)
    f = GGUFReader(out).fields
    ints = [k for k in f if k.startswith("llama.") and k not in ("llama.rope.freq_base",)]
    ints = [k for k in ints if "epsilon" not in k]
    assert {"llama.context_length", "llama.block_count", "llama.attention.head_count_kv"} <= set(
        ints
    )
    assert {k: [GGUFValueType(t).name for t in f[k].types] for k in ints} == {
        k: ["UINT32"] for k in ints
    }
