"""Per-module twin tests: norm, rope, attention (every CPU backend), MLP and
block, in fp32 and bf16.

Each module runs in torch and in JAX on the same weights and inputs, and both are measured against
the torch module in float64. fp32 must agree to ~1e-6 of the output scale. bf16 must stay within a
few bf16 roundings of the exact result, which is what separates a correct module from a wrong one.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax.model as jm
import gptmod_torch.model as tm

from conftest import JAX_DTYPES, NP_DTYPES, TORCH_DTYPES, cast_state, reduced

BF16_EPS = 2.0**-8
# Per-dtype bound on |module(x) - exact| relative to max|exact|. fp32: a few hundred ulps of
# accumulation. bf16: the inputs, weights and output are each rounded to bf16 (relative 2^-9 each),
# plus products; 4 eps covers that with room, while any real bug (a wrong sign, eps, scale or head
# grouping) is off by far more.
REL_TOL = {"float32": 2e-6, "bfloat16": 4 * BF16_EPS}
CPU_BACKENDS = [("sdpa", "auto"), ("math", "xla"), ("flash", "xla"), ("reference", "reference")]


def _cfg(**kw):
    # GQA 4:2 with head_dim 16, RoPE, bias on: every code path of the attention in one config.
    return dataclasses.replace(
        reduced("modern-gpt2"), **{"n_head": 4, "n_kv_head": 2, "d_model": 64, "bias": True, **kw}
    )


def _pair(torch_cls, jax_cls, cfg, dtype, seed=0):
    """The same random weights (std 0.3, so that every term matters) in both frameworks."""
    torch.manual_seed(seed)
    t64 = torch_cls(cfg).double()
    with torch.no_grad():
        for p in t64.parameters():
            p.normal_(0.0, 0.3) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    state = cast_state(tm.export_state(t64), dtype)
    tm.load_state(t64, state)  # the reference runs the weights rounded to `dtype`
    tmod = tm.load_state(torch_cls(cfg).to(TORCH_DTYPES[dtype]), state)
    kwargs = {"dtype": JAX_DTYPES[dtype]}
    if jax_cls not in (jm.LayerNorm, jm.RMSNorm):
        kwargs["rngs"] = nnx.Rngs(0)
    jmod = jm.load_state(jax_cls(cfg, **kwargs), state)
    return t64, tmod, jmod


def _input(shape, dtype, seed=1):
    x = np.random.default_rng(seed).normal(size=shape).astype(NP_DTYPES[dtype])
    return (
        x,
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(x.astype(np.float32)).to(TORCH_DTYPES[dtype]),
    )


def _check(ref, out_t, out_j, dtype):
    ref = ref.detach().double().numpy()
    e_t = np.abs(out_t.detach().double().numpy() - ref).max()
    e_j = np.abs(np.asarray(out_j, dtype=np.float64) - ref).max()
    tol = REL_TOL[dtype] * np.abs(ref).max()
    assert e_t <= tol, f"torch error {e_t:.3g} > {tol:.3g} ({dtype})"
    assert e_j <= tol, f"jax error {e_j:.3g} > {tol:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_twins(norm, dtype):
    # a large eps, so a framework default in its place would show
    cfg = _cfg(norm=norm, norm_eps=1e-3)
    cls_t, cls_j = (tm.RMSNorm, jm.RMSNorm) if norm == "rmsnorm" else (tm.LayerNorm, jm.LayerNorm)
    t64, tmod, jmod = _pair(cls_t, cls_j, cfg, dtype)
    x, x64, xt = _input((2, 5, cfg.d_model), dtype)
    x64 = x64 * 0.05  # small activations: eps matters at this scale
    xt, xj = xt * 0.05, jnp.asarray(x) * 0.05
    _check(t64(x64), tmod(xt), jmod(xj), dtype)


def test_rope_matches_closed_form():
    """Half-split rotation by position * theta^(-2i/H), checked against numpy in float64."""
    cfg = _cfg()
    H = cfg.head_dim
    pos = np.array([[0, 1, 7, 63]])
    x = np.random.default_rng(0).normal(size=(1, 4, 2, H))
    angles = pos[..., None] * cfg.rope_theta ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out_t = tm.apply_rope(
        torch.from_numpy(x).float(), *tm.rope_cos_sin(torch.from_numpy(pos), cfg, torch.float32)
    )
    out_j = jm.apply_rope(
        jnp.asarray(x, jnp.float32), *jm.rope_cos_sin(jnp.asarray(pos), cfg, jnp.float32)
    )
    np.testing.assert_allclose(out_t.numpy(), expected, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out_j), expected, atol=2e-5)
    # Position 0 is the identity, and the rotation keeps the norm of each pair.
    np.testing.assert_allclose(out_t.numpy()[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out_j), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_twins_in_fp32_even_for_bf16(dtype):
    cfg = _cfg()
    pos = np.arange(64)[None]
    cos_t, _ = tm.rope_cos_sin(torch.from_numpy(pos), cfg, TORCH_DTYPES[dtype])
    cos_j, _ = jm.rope_cos_sin(jnp.asarray(pos), cfg, JAX_DTYPES[dtype])
    assert cos_t.dtype == torch.float32 and cos_j.dtype == jnp.float32  # angles never in bf16
    np.testing.assert_allclose(cos_t.numpy(), np.asarray(cos_j), atol=1e-6)
    x, x64, xt = _input((2, 64, 4, cfg.head_dim), dtype)
    ref = tm.apply_rope(x64, *tm.rope_cos_sin(torch.from_numpy(pos), cfg, torch.float64))
    out_t = tm.apply_rope(xt, *tm.rope_cos_sin(torch.from_numpy(pos), cfg, TORCH_DTYPES[dtype]))
    out_j = jm.apply_rope(
        jnp.asarray(x), *jm.rope_cos_sin(jnp.asarray(pos), cfg, JAX_DTYPES[dtype])
    )
    _check(ref, out_t, out_j, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("backend_t", "backend_j"), CPU_BACKENDS)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_twins(backend_t, backend_j, n_kv_head, dtype):
    cfg = _cfg(n_kv_head=n_kv_head)
    t64, tmod, jmod = _pair(tm.Attention, jm.Attention, cfg, dtype)
    x, x64, xt = _input((2, 12, cfg.d_model), dtype)
    x64, xt, xj = x64 * 0.3, xt * 0.3, jnp.asarray(x) * 0.3
    pos = np.broadcast_to(np.arange(12), (2, 12)).copy()
    tpos, jpos = torch.from_numpy(pos), jnp.asarray(pos)
    ref = t64(x64, tm.BlockInputs(tm.rope_cos_sin(tpos, cfg, torch.float64), tpos, None, "math"))
    rope_t = tm.rope_cos_sin(tpos, cfg, TORCH_DTYPES[dtype])
    out_t = tmod(xt, tm.BlockInputs(rope_t, tpos, None, backend_t))
    rope_j = jm.rope_cos_sin(jpos, cfg, JAX_DTYPES[dtype])
    out_j = jmod(xj, jm.BlockInputs(rope_j, jpos, None, backend_j))
    _check(ref, out_t, out_j, dtype)


@pytest.mark.parametrize(("backend_t", "backend_j"), CPU_BACKENDS)
def test_attention_explicit_mask_is_bottom_right(backend_t, backend_j):
    """A query block that starts at key position 3 (as in a KV cache) with an explicit mask equals
    the last rows of full causal attention; `is_causal` alone would be wrong here (top-left)."""
    rng = np.random.default_rng(0)
    B, S, T, N, K, H = 2, 9, 6, 4, 2, 16
    q, k, v = (
        rng.normal(size=(B, n, N if i == 0 else K, H)).astype(np.float32)
        for i, n in enumerate((S, S, S))
    )
    mask_BTS = np.arange(S)[None, None, :] <= np.arange(S - T, S)[None, :, None]
    mask_BTS = np.broadcast_to(mask_BTS, (B, T, S))
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    full_t = tm.attention(tq, tk, tv, backend=backend_t)[:, S - T :]
    part_t = tm.attention(
        tq[:, S - T :], tk, tv, backend=backend_t, mask_BTS=torch.from_numpy(mask_BTS.copy())
    )
    full_j = jm.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend=backend_j)[
        :, S - T :
    ]
    part_j = jm.attention(
        jnp.asarray(q[:, S - T :]),
        jnp.asarray(k),
        jnp.asarray(v),
        backend=backend_j,
        mask_BTS=jnp.asarray(mask_BTS),
    )
    np.testing.assert_allclose(part_t.numpy(), full_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(part_j), np.asarray(full_j), atol=1e-6)
    np.testing.assert_allclose(np.asarray(part_j), part_t.numpy(), atol=1e-5)


def test_gqa_grouping_is_consecutive():
    """Query head h reads kv head h // (N/K): repeat_interleave, not tile."""
    B, T, N, K, H = 1, 3, 4, 2, 8
    q = np.zeros((B, T, N, H), np.float32)
    k = np.zeros((B, T, K, H), np.float32)
    v = np.stack([np.full((B, T, H), 1.0), np.full((B, T, H), 2.0)], axis=2).astype(np.float32)
    expected = np.array([1.0, 1.0, 2.0, 2.0])  # heads 0,1 -> kv 0; heads 2,3 -> kv 1
    for backend in ("sdpa", "math", "flash", "reference"):
        out = tm.attention(*map(torch.from_numpy, (q, k, v)), backend=backend)
        np.testing.assert_allclose(out.numpy()[0, -1, :, 0], expected)
    for backend in ("auto", "xla", "reference"):
        out = jm.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend=backend)
        np.testing.assert_allclose(np.asarray(out)[0, -1, :, 0], expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_mlp_twins(mlp, dtype):
    cfg = _cfg(mlp=mlp)
    cls_t, cls_j = (tm.SwiGLU, jm.SwiGLU) if mlp == "swiglu" else (tm.GeluMLP, jm.GeluMLP)
    t64, tmod, jmod = _pair(cls_t, cls_j, cfg, dtype)
    x, x64, xt = _input((2, 5, cfg.d_model), dtype)
    x64, xt, xj = x64 * 0.2, xt * 0.2, jnp.asarray(x) * 0.2
    _check(t64(x64), tmod(xt), jmod(xj), dtype)


def test_gelu_is_the_tanh_form():
    cfg = _cfg(mlp="gelu", bias=False)
    _, tmod, jmod = _pair(tm.GeluMLP, jm.GeluMLP, cfg, "float32")
    # Identity-like weights isolate the activation: out = gelu_tanh(x) summed through w_down.
    with torch.no_grad():
        tmod.w_up.weight.zero_()
        tmod.w_up.weight[: cfg.d_model].copy_(torch.eye(cfg.d_model))
        tmod.w_down.weight.zero_()
        tmod.w_down.weight[:, : cfg.d_model].copy_(torch.eye(cfg.d_model))
    jm.load_state(jmod, tm.export_state(tmod))
    x = np.linspace(-4, 4, cfg.d_model, dtype=np.float32)[None, None]
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(tmod(torch.from_numpy(x)).detach().numpy(), tanh_form, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jmod(jnp.asarray(x))), tanh_form, atol=1e-6)
    erf_form = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    # the two forms really differ: the test can tell
    assert np.abs(erf_form - tanh_form).max() > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["gpt2", "modern-gpt2"])
def test_block_twins(preset, dtype):
    cfg = reduced(preset)
    t64, tmod, jmod = _pair(tm.Block, jm.Block, cfg, dtype)
    with torch.no_grad():  # realistic projection scale, so the residual branches matter
        for _name, p in t64.named_parameters():
            if p.ndim == 2:
                p.mul_(0.1)
    state = cast_state(tm.export_state(t64), dtype)
    tm.load_state(t64, state), tm.load_state(tmod, state), jm.load_state(jmod, state)
    x, x64, xt = _input((2, 10, cfg.d_model), dtype)
    pos = np.broadcast_to(np.arange(10), (2, 10)).copy()
    rope = cfg.pos == "rope"
    tpos, jpos = torch.from_numpy(pos), jnp.asarray(pos)
    rope_ref = tm.rope_cos_sin(tpos, cfg, torch.float64) if rope else None
    rope_t = tm.rope_cos_sin(tpos, cfg, TORCH_DTYPES[dtype]) if rope else None
    rope_j = jm.rope_cos_sin(jpos, cfg, JAX_DTYPES[dtype]) if rope else None
    ref = t64(x64, tm.BlockInputs(rope_ref, tpos, None, "math"))
    out_t = tmod(xt, tm.BlockInputs(rope_t, tpos, None, "sdpa"))
    out_j = jmod(jnp.asarray(x), jm.BlockInputs(rope_j, jpos, None, "auto"))
    _check(ref, out_t, out_j, dtype)
