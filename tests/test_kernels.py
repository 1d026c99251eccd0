"""The twins' kernels.py: torch's oneDNN linear equals F.linear in every shape the model uses, eager and
compiled, and leaves training (autograd), other dtypes and the state names alone; JAX's weights-first
product for few rows equals x @ W.T, both ways, with gradients, and its Linear has torch's names and layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from gptmod_jax import kernels as jkernels
from gptmod_torch import kernels


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear")
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


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear")
def test_compiled_linear_uses_the_custom_op_and_agrees():
    layer = kernels.Linear(64, 32)
    x = torch.randn(4, 1, 64)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_grad_and_other_dtypes_take_f_linear():
    layer = kernels.Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    assert not kernels.uses_onednn(x)  # grad enabled: training keeps F.linear and its autograd
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        assert not kernels.uses_onednn(x.bfloat16()) and not kernels.uses_onednn(x.double())
        assert kernels.uses_onednn(x) == (kernels._ONEDNN_LINEAR is not None)
    assert set(layer.state_dict()) == {"weight", "bias"}  # nn.Linear's names: canonical state is unchanged


@pytest.mark.parametrize("lead", [(1,), (8,), (2, 5), (64,), (65,), (3, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_jax_linear_equals_x_at_w_transposed_on_both_paths(lead, bias):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((*lead, 48)), rng.standard_normal((80, 48)), rng.standard_normal(80)
    rows = int(np.prod(lead))
    assert jkernels.weights_first(rows) == (rows <= jkernels.WEIGHTS_FIRST_MAX_ROWS)  # this machine is a CPU
    got = jax.jit(jkernels.linear)(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                   jnp.asarray(b, jnp.float32) if bias else None)  # fmt: skip
    ref = x @ w.T + (b if bias else 0.0)
    assert got.shape == (*lead, 80) and got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("rows", [4, 100])
def test_jax_linear_gradients_match_on_both_paths(rows):
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32), jnp.asarray(rng.standard_normal((8, 16)),
                                                                                  jnp.float32)  # fmt: skip
    gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.sin(jkernels.linear(x, w))), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.T)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_jax_linear_module_has_torch_names_layout_and_init():
    layer = jkernels.Linear(48, 80, bias=True, std=0.5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    assert {str(k) for k in state} == {"weight", "bias"}
    assert layer.weight.shape == (80, 48) and layer.weight.dtype == jnp.bfloat16
    assert float(jnp.abs(layer.bias[...]).max()) == 0.0
    assert 0.45 < float(jnp.std(layer.weight[...].astype(jnp.float32))) < 0.55
    assert jkernels.Linear(4, 3, bias=False, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0)).bias is None
    y = layer(jnp.ones((2, 48), jnp.bfloat16))
    assert y.shape == (2, 80) and y.dtype == jnp.bfloat16
