"""gptmod_torch.kernels: the oneDNN linear equals F.linear in every shape the model uses, eager and
compiled, and leaves training (autograd), other dtypes and the state names alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
