"""The linear layer of the JAX twin: weights stored (out, in) like torch's, and for the few rows of a
decode step on the CPU the product is turned around so the weights are its left operand.

XLA's CPU dot reads a (rows, in) @ (in, out) product with a handful of rows at a fraction of the
memory bandwidth, but the same product computed as weight (out, in) @ x^T (in, rows) streams the
weights at close to it: on the 2-core AMD EPYC this project is measured on, the tied 50257x768
unembedding at batch 8 takes 10.8 ms as x @ E^T and 6.4 ms as E @ x^T, and the 12 SwiGLU MLPs of
modern-gpt2 15.4 ms against 11.1 ms (`python -m gptmod.bench` shows the effect on whole steps).
That needs the (out, in) layout: from Flax's (in, out) kernels the turned product would first
transpose every weight. With many rows (prefill, training) both forms run at the same speed, and
the usual `x @ weight.T` is kept. Accelerators keep it too: the turn was measured on the CPU only.

The torch twin has the same module for the same reason (gptmod_torch/kernels.py, oneDNN instead of
MKL), so the two model files build their layers from the same `Linear(d_in, d_out, bias=...)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptmod_jax import sharding

# Up to this many rows (batch x tokens) the weights-first product wins on the CPU; from about 128 on
# the two forms take the same time, measured for 768 <-> 2048 and 768 -> 50257.
WEIGHTS_FIRST_MAX_ROWS = 64


def weights_first(rows: int) -> bool:
    """Whether `linear` computes weight @ x^T for this many rows (static: decided while tracing)."""
    return rows <= WEIGHTS_FIRST_MAX_ROWS and jax.default_backend() == "cpu"


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x @ weight.T (+ bias) for `weight` in (out, in) layout; any leading shape of x."""
    *lead, d_in = x.shape
    rows = math.prod(lead)
    if weights_first(rows):
        # Without the barrier XLA folds the transpose back into the dot and picks the slow form again.
        y_OR = jax.lax.optimization_barrier(weight @ x.reshape(rows, d_in).T)
        y = y_OR.T.reshape(*lead, weight.shape[0])
    else:
        y = x @ weight.T
    return y if bias is None else y + bias


class Linear(nnx.Module):
    """A linear layer with torch's parameter names and layout: `weight` (out, in), optional `bias`,
    weights drawn from N(0, std^2) in `dtype` at construction, bias zero. `axes` are the logical axis
    names of (out, in) for sharding (gptmod_jax/sharding.py)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, dtype: jnp.dtype, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None] = (None, None)):  # fmt: skip
        self.weight = sharding.param(nnx.initializers.normal(std)(rngs.params(), (d_out, d_in), dtype), axes)
        self.bias = sharding.param(jnp.zeros((d_out,), dtype), axes[:1]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight[...], None if self.bias is None else self.bias[...])
