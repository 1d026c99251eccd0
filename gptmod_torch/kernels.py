"""The linear layer of the torch twin, routed to oneDNN for fp32 inference on the CPU.

PyTorch's CPU build computes fp32 `F.linear` with MKL, whose matrix-vector path runs on one thread
and streams weights at about half of what oneDNN (also inside PyTorch) reaches on the AMD EPYC this
project is measured on. Decoding at small batch is exactly that matrix-vector product, so the torch
twin calls oneDNN's matmul there: the tied 50257x768 unembedding at batch 1 takes 13.0 ms with MKL
and 5.8 ms with oneDNN on 2 cores (`python -m gptmod.bench` shows the effect on whole steps).
Training (grad enabled), other dtypes and other devices keep `F.linear`. `install` swaps the model's
`Linear` and `Embedding` for subclasses that call `linear`; model.py itself keeps `F.linear`, the
readable path (`GPT(cfg, kernels=False)` runs it everywhere).

The int8 layers (model.py's `Int8Linear`, `Int8Embedding`) get `int8_linear`: under
`torch.compile`, a one-row product on the CPU written as a multiply and a sum, which inductor turns
into one reduction loop that reads the int8 weights once and converts them in registers. Eager
PyTorch has no such kernel on this CPU: over SmolLM2-135M's 211 matrices at one row, fp32 (oneDNN)
took 55 ms, `aten._weight_int8pack_mm` 112 ms and a dequantize-then-matmul 103 ms, so eager and
many-row calls keep model.py's arithmetic (the compiled reduction: 33 ms).

The JAX twin has its own kernels.py for the same step: the few-row product turned around for XLA's
CPU dot, and cached attention in the cache's own layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptmod_torch import model
from gptmod_torch.model import Embedding, Int8Embedding, Int8Linear, Linear

# oneDNN's fused linear (`mkldnn::_linear_pointwise`, what inductor emits for frozen CPU graphs),
# where this build of PyTorch has it; None elsewhere, and `linear` is then `F.linear`.
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


@torch.library.custom_op("gptmod::onednn_linear", mutates_args=())
def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether `linear` takes the oneDNN path for this input (fp32 on the CPU, no autograd)."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
    return _ONEDNN_LINEAR is not None and cpu_fp32 and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: the same result, computed by oneDNN where `uses_onednn(x)`."""
    if not uses_onednn(x):
        return F.linear(x, weight, bias)
    # as a custom op: inductor would lower a plain linear to MKL again
    if torch.compiler.is_compiling():
        return _onednn_linear(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class OneDNNLinear(Linear):
    """`Linear` (the same parameters) computed by `linear`: oneDNN where `uses_onednn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNEmbedding(Embedding):
    """`Embedding` whose tied unembedding, the largest matmul of a decode step, runs on `linear`."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def fuses_int8(x: torch.Tensor) -> bool:
    """Whether `int8_linear` takes the multiply-and-sum form: one row, on the CPU, compiled."""
    one_row = x.numel() == x.shape[-1]
    return one_row and x.device.type == "cpu" and torch.compiler.is_compiling()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`model.int8_linear(x, q, scale)`: the same product, as a fused reduction where
    `fuses_int8(x)` (a matmul would make inductor write the converted weights out first)."""
    if not fuses_int8(x):
        return model.int8_linear(x, q, scale)
    return (x[..., None, :] * q.to(x.dtype)).sum(-1) * scale.to(x.dtype)


class FastInt8Linear(Int8Linear):
    """`Int8Linear` (the same buffers) computed by `int8_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


class FastInt8Embedding(Int8Embedding):
    """`Int8Embedding` whose tied unembedding runs on `int8_linear`."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale)


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    Linear: OneDNNLinear,
    Embedding: OneDNNEmbedding,
    Int8Linear: FastInt8Linear,
    Int8Embedding: FastInt8Embedding,
}


def install(model: nn.Module) -> nn.Module:
    """Swap the fast classes of `SWAPS` in, in place: the same parameters, names and results (tests/
    test_kernels.py), only the op that computes them changes. `GPT(cfg, kernels=False)` skips it."""
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = (
                fast  # a subclass that adds no state: parameters and hooks stay as they are
            )
    return model
