"""The twins' kernels.py: swaps of model.py's layers for CPU decode fast paths that keep the
parameters, their names and the results. torch's oneDNN linear equals F.linear in every shape the
model uses, eager and compiled, and leaves training (autograd) and other dtypes to F.linear; JAX's
weights-first product for few rows equals x @ W.T, both ways, with gradients; JAX's cached attention
in the cache layouts equals model.py's; and a whole model with kernels equals one without."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod import quant as quant_mod
from gptmod_jax import kernels as jkernels
from gptmod_jax import model as jmodel
from gptmod_torch import kernels
from gptmod_torch import model as tmodel

from conftest import reduced, torch_pair_state

NO_ONEDNN = pytest.mark.skipif(
    kernels._ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear"
)


@NO_ONEDNN
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (2, 5, 64), (3, 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    with torch.no_grad():
        assert kernels.uses_onednn(x)
        got = kernels.linear(x, w, b)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*shape[:-1], 96) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@NO_ONEDNN
def test_compiled_linear_uses_the_custom_op_and_agrees():
    layer = kernels.install(tmodel.Linear(64, 32, bias=True, std=0.02))
    assert type(layer) is kernels.OneDNNLinear
    x = torch.randn(4, 1, 64)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6
        )


def test_grad_and_other_dtypes_take_f_linear():
    layer = kernels.install(tmodel.Linear(16, 8, bias=True, std=0.02))
    x = torch.randn(3, 16, requires_grad=True)
    assert not kernels.uses_onednn(x)  # grad enabled: training keeps F.linear and its autograd
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        assert not kernels.uses_onednn(x.bfloat16()) and not kernels.uses_onednn(x.double())
        assert kernels.uses_onednn(x) == (kernels._ONEDNN_LINEAR is not None)


def test_torch_layers_have_canonical_names_and_init():
    torch.manual_seed(0)
    layer = tmodel.Linear(48, 80, bias=True, std=0.5).requires_grad_(False)
    assert set(layer.state_dict()) == {"weight", "bias"} and tuple(layer.weight.shape) == (80, 48)
    assert float(layer.bias.abs().max()) == 0.0 and 0.45 < float(layer.weight.std()) < 0.55
    assert tmodel.Linear(4, 3, bias=False, std=0.02).bias is None
    emb = tmodel.Embedding(100, 16, std=0.02).requires_grad_(False)
    assert set(emb.state_dict()) == {"weight"} and 0.018 < float(emb.weight.std()) < 0.022
    x = torch.randn(2, 16)
    torch.testing.assert_close(emb.attend(x), x @ emb.weight.T)


@pytest.mark.parametrize("lead", [(1,), (8,), (2, 5), (64,), (65,), (3, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_jax_linear_equals_x_at_w_transposed_on_both_paths(lead, bias):
    rng = np.random.default_rng(0)
    x, w, b = (
        rng.standard_normal((*lead, 48)),
        rng.standard_normal((80, 48)),
        rng.standard_normal(80),
    )
    rows = int(np.prod(lead))
    # this machine is a CPU
    assert jkernels.weights_first(rows) == (rows <= jkernels.WEIGHTS_FIRST_MAX_ROWS)
    b32 = jnp.asarray(b, jnp.float32) if bias else None
    got = jax.jit(jkernels.linear)(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), b32)
    ref = x @ w.T + (b if bias else 0.0)
    assert got.shape == (*lead, 80) and got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("rows", [4, 100])
def test_jax_linear_gradients_match_on_both_paths(rows):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.sin(jkernels.linear(x, w))), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.T)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_jax_layers_have_torch_names_layout_and_init():
    layer = jmodel.Linear(48, 80, bias=True, std=0.5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    assert {str(k) for k in state} == {"weight", "bias"}
    assert layer.weight.shape == (80, 48) and layer.weight.dtype == jnp.bfloat16
    assert float(jnp.abs(layer.bias[...]).max()) == 0.0
    assert 0.45 < float(jnp.std(layer.weight[...].astype(jnp.float32))) < 0.55
    assert (
        jmodel.Linear(4, 3, bias=False, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0)).bias is None
    )
    y = jkernels.install(layer)(jnp.ones((2, 48), jnp.bfloat16))
    assert (
        type(layer) is jkernels.CpuDecodeLinear and y.shape == (2, 80) and y.dtype == jnp.bfloat16
    )
    emb = jmodel.Embedding(
        100, 16, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0), axes=(None, None)
    )
    assert {str(k) for k in nnx.state(emb, nnx.Param)} == {"weight"}
    # an id past the table gathers NaN, never a row
    assert bool(jnp.isnan(emb(jnp.array([100]))).all())


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_jax_cached_attention_in_the_cache_layouts_equals_the_readable_one(mask, groups):
    rng = np.random.default_rng(2)
    B, T, K, H, S = 2, 3, 2, 8, 7
    N = K * groups
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k_BKHS = jnp.asarray(rng.standard_normal((B, K, H, S)), jnp.float32)
    v_BKSH = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.float32)
    pos_BT = jnp.asarray([[2, 3, 4], [4, 5, 6]])
    mask_BTS = (jnp.arange(S) <= pos_BT[..., None]) if mask else None
    got = jkernels.cached_attention(q, k_BKHS, v_BKSH, backend="xla", mask_BTS=mask_BTS)
    want = jmodel.cached_attention(q, k_BKHS, v_BKSH, backend="reference", mask_BTS=mask_BTS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "int8"])
def test_install_swaps_every_layer_and_kernels_false_keeps_model_py(quant):
    cfg = reduced("modern-gpt2", tie_embeddings=False)
    torch.manual_seed(0)
    fast_t = gptmod_torch.GPT(cfg, quant=quant)
    plain_t = gptmod_torch.GPT(cfg, kernels=False, quant=quant)
    fast_j = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), quant=quant)
    plain_j = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), kernels=False, quant=quant)
    for fast, plain, swaps in ((fast_t, plain_t, kernels.SWAPS), (fast_j, plain_j, jkernels.SWAPS)):
        modules = [m for _, m in nnx.iter_graph(fast)] if fast is fast_j else list(fast.modules())
        types_fast = {type(m) for m in modules}
        plain_modules = (
            [m for _, m in nnx.iter_graph(plain)] if plain is plain_j else list(plain.modules())
        )
        types_plain = {type(m) for m in plain_modules}
        # every layer the plain model has a fast class for is swapped, and only those
        wanted = {swaps[t] for t in types_plain if t in swaps}
        assert len(wanted) >= 2 and wanted <= types_fast and not set(swaps) & types_fast
        assert not set(swaps.values()) & types_plain
        int8_layers = {t for t in types_plain if t.__name__.startswith("Int8")}
        assert (len(int8_layers) == 2) == (quant == "int8")
    # The same parameters by the same names, and the same logits and tokens
    # with and without kernels.
    state = torch_pair_state(cfg)
    if quant is not None:
        state = quant_mod.quantize(state, cfg)
    assert (
        set(gptmod_torch.export_state(fast_t)) == set(state) == set(gptmod_jax.export_state(fast_j))
    )
    for m in (fast_t, plain_t):
        gptmod_torch.load_state(m.eval(), state)
    for m in (fast_j, plain_j):
        gptmod_jax.load_state(m, state)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        lt, lpt = (m(torch.from_numpy(idx)).numpy() for m in (fast_t, plain_t))
    lj, lpj = (np.asarray(m(jnp.asarray(idx))) for m in (fast_j, plain_j))
    scale = np.abs(lpt).max()
    assert np.abs(lt - lpt).max() <= 2e-5 * scale and np.abs(lj - lpj).max() <= 2e-5 * scale
    prompts = [[5, 9, 2, 7], [3, 1]]
    want = gptmod_torch.generate(plain_t, prompts, 8)
    assert gptmod_torch.generate(fast_t, prompts, 8) == want
    assert (
        gptmod_jax.generate(fast_j, prompts, 8) == gptmod_jax.generate(plain_j, prompts, 8) == want
    )


# ----------------------------------------------------------------------------- int8


def _int8_weights(d_out: int = 512, d_in: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (d_out, d_in)).astype(np.int8)
    return q, rng.uniform(1e-3, 1e-2, d_out).astype(np.float32)


def _int8_reference(x: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) @ q.T.astype(np.float64)) * s.astype(np.float64)


def _entry_shapes(hlo: str) -> list[str]:
    """The result shapes of the instructions of an optimized HLO module's ENTRY computation."""
    entry = hlo[hlo.index("\nENTRY") :].split("\n}")[0]
    return re.findall(r"= (\w+\[[\d,]*\])", entry)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2,), (2, 4), (64,), (65,), (3, 40)])
def test_jax_int8_linear_equals_the_readable_product(lead):
    q, s = _int8_weights()
    x = np.random.default_rng(0).standard_normal((*lead, 256)).astype(np.float32)
    want = _int8_reference(x, q, s)
    for f in (jkernels.int8_linear, jmodel.int8_linear):
        got = np.asarray(jax.jit(f)(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s)))
        assert got.shape == (*lead, 512)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_jax_int8_products_read_the_int8_weights_without_writing_them_out_in_fp32():
    """The compiled HLO of one-row decode (model.py's form) and of 8 rows (kernels.py's reduction)
    holds no fp32 (out, in) array at the top level: XLA converts inside the fusion that reads q.
    model.py's form at 8 rows does write it out, which shows the check can fail."""
    q, s = (jnp.asarray(a) for a in _int8_weights())

    def shapes(f, rows):
        x = jnp.ones((rows, 256), jnp.float32)
        return _entry_shapes(jax.jit(f).lower(x, q, s).compile().as_text())

    assert "f32[512,256]" not in shapes(jmodel.int8_linear, 1)
    assert "f32[512,256]" not in shapes(jkernels.int8_linear, 8)
    assert "f32[512,256]" in shapes(jmodel.int8_linear, 8)


@pytest.mark.parametrize("rows", [1, 4])
def test_torch_int8_linear_equals_the_readable_product_eager_and_compiled(rows):
    from torch._inductor.utils import run_and_get_code

    q, s = _int8_weights()
    x = np.random.default_rng(0).standard_normal((1, rows, 256)).astype(np.float32)
    want = _int8_reference(x, q, s)
    tq, ts, tx = torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(x)
    assert not kernels.fuses_int8(tx)  # eager: model.py's product
    torch._dynamo.reset()
    with torch.no_grad():
        eager = kernels.int8_linear(tx, tq, ts).numpy()
        compiled, codes = run_and_get_code(
            torch.compile(kernels.int8_linear, fullgraph=True), tx, tq, ts
        )
    for got in (eager, compiled.numpy()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    # One row compiles to a reduction over the int8 weights; more rows dequantize into a buffer.
    buffers = [b for c in codes for b in re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", c)]
    assert ("512, 256" in buffers) == (rows > 1), buffers


def test_int8_models_of_both_twins_agree_with_the_dequantized_float64_model():
    cfg = reduced("modern-gpt2", tie_embeddings=False)
    qstate = quant_mod.quantize(torch_pair_state(cfg), cfg)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ref = gptmod_torch.load_state(gptmod_torch.GPT(cfg).double(), quant_mod.dequantize(qstate, cfg))
    tm = gptmod_torch.load_state(gptmod_torch.GPT(cfg, quant="int8").eval(), qstate)
    jm = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), quant="int8"), qstate)
    with torch.no_grad():
        want = ref(torch.from_numpy(idx)).numpy()
        lt = tm(torch.from_numpy(idx)).numpy()
    lj = np.asarray(jm(jnp.asarray(idx)))
    scale = np.abs(want).max()
    assert np.abs(lt - want).max() <= 1e-5 * scale and np.abs(lj - want).max() <= 1e-5 * scale
    # the int8 weights are held as int8 in both, not converted on load
    assert tm.blocks[0].mlp.w_up.weight.dtype == torch.int8
    assert jm.blocks[0].mlp.w_up.weight.dtype == jnp.int8
    assert gptmod_torch.export_state(tm)["lm_head.weight"].dtype == np.int8


def _unfused_shapes(hlo: str) -> list[str]:
    """Result shapes of the instructions outside fusions (ENTRY, loop bodies and conditions)."""
    comps = re.split(r"\n(?=%|ENTRY)", hlo)
    kept = [c for c in comps if not c.startswith(("%fused", "%wrapped", "HloModule"))]
    return [s for c in kept for s in re.findall(r"= (\w+\[[\d,]*\])", c)]


def test_jax_int8_weights_are_not_converted_once_outside_a_decode_loop():
    """In a loop, as in generate's decode, XLA would hoist a loop-invariant q.astype(f32) out and
    read a float32 copy every step; model.py's barrier keeps the conversion in the step's fusion.
    The same loop over the product written without it shows the hoisted copy."""
    q, s = (jnp.asarray(a) for a in _int8_weights(256, 256))
    x = jnp.ones((1, 256), jnp.float32)

    def loop(product):
        step = lambda i, x: product(x, q, s) * 1e-3
        return jax.jit(lambda x: jax.lax.fori_loop(0, 8, step, x)).lower(x).compile().as_text()

    plain = lambda x, q, s: (x @ q.T.astype(x.dtype)) * s
    assert "f32[256,256]" in _unfused_shapes(loop(plain))
    assert "f32[256,256]" not in _unfused_shapes(loop(jmodel.int8_linear))
