"""CPU decode fast paths of the JAX twin, swapped into a model by `install`
(`GPT(cfg, kernels=False)` keeps model.py's readable ops everywhere). The
same parameters and results, other arithmetic order.

1. Few-row products turned around. XLA's CPU dot reads a (rows, in) @ (in, out) product with a
   handful of rows at a fraction of the memory bandwidth, but the same product computed as
   weight (out, in) @ x^T (in, rows) streams the weights at close to it: on the 2-core AMD EPYC this
   project is measured on, the tied 50257x768 unembedding at batch 8 takes 10.8 ms as x @ E^T and
   6.4 ms as E @ x^T, and the 12 SwiGLU MLPs of modern-gpt2 15.4 ms against 11.1 ms. That needs the
   (out, in) layout, which is why model.py's `Linear` keeps torch's. With many rows (prefill,
   training) both forms run at the same speed and `x @ weight.T` is kept; accelerators keep it too.
2. Cached attention in the cache's own layouts. Keys (B, K, H, S) and values (B, K, S, H) make both
   products plain matmuls batched over (B, K), with the contracting axis where XLA's CPU dot wants
   it; `jax.nn.dot_product_attention` reads keys as (B, S, K, H) and makes XLA transpose the whole
   cache every step (decode at batch 8 over 288 keys: 10 ms for the 12 layers, 3.8 ms here).

3. Int8 products (model.py's `Int8Linear`, `Int8Embedding`) by row count. One row: model.py's
   `x @ q.T.astype(f32)`, which XLA compiles into one loop fusion that reads the int8 weights and
   converts them in registers (tests/test_kernels.py checks the HLO). model.py ties q to x with an
   optimization barrier: without it XLA hoists every weight's conversion out of generate's decode
   loop, so that each step reads a float32 copy (SmolLM2-135M: 36.5 tok/s and 1.1 GB more memory,
   against 50 tok/s with the barrier). From two rows on that fusion
   recomputes the convert for every row and runs 13x slower, and a convert on its own costs more
   than the fp32 product; written as a multiply and a sum over `in`, XLA emits a reduction that
   reads each int8 weight once for all rows: at 8 rows the SmolLM2-135M chain takes 40 ms against
   182 ms. x is materialised first, or XLA writes it out broadcast to (rows, out, in) for every
   product (SmolLM2 int8 decode at batch 8: 97 tok/s, and 188 with x materialised; fp32: 171).
   Past `INT8_REDUCE_MAX_ROWS` (prefill) the product is compute bound and model.py's form is
   kept.

`python -m gptmod.bench` shows the effect on whole steps. The torch twin's kernels.py does the same
job with oneDNN, and with inductor for int8.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# model.cached_attention looked up per call: parity's mutations patch it
from gptmod_jax import model
from gptmod_jax.model import (
    Attention,
    Embedding,
    Int8Embedding,
    Int8Linear,
    Linear,
    compute_dtype,
    resolve_backend,
)

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
        # Without the barrier XLA folds the transpose back into the dot and
        # picks the slow form again.
        y_OR = jax.lax.optimization_barrier(weight @ x.reshape(rows, d_in).T)
        y = y_OR.T.reshape(*lead, weight.shape[0])
    else:
        y = x @ weight.T
    return y if bias is None else y + bias


# Rows up to which int8 products are a multiply-and-sum reduction (see the module docstring).
INT8_REDUCE_MAX_ROWS = 64


def int8_linear(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """`model.int8_linear(x, q, scale)`: the same product, for 2..INT8_REDUCE_MAX_ROWS rows on the
    CPU as a reduction that reads the int8 weights once."""
    *lead, d_in = x.shape
    rows = math.prod(lead)
    if not (1 < rows <= INT8_REDUCE_MAX_ROWS and jax.default_backend() == "cpu"):
        return model.int8_linear(x, q, scale)
    # Never hoisted out of a loop (see model.py's), and x_RI materialised: left to fuse with its
    # producer (a norm), XLA writes x broadcast to (rows, out, in) out for the reduction.
    q, x_RI = jax.lax.optimization_barrier((q, x.reshape(rows, d_in)))
    y_RO = (x_RI[:, None, :] * q.astype(x.dtype)[None]).sum(-1) * scale.astype(x.dtype)
    return y_RO.reshape(*lead, q.shape[0])


def cached_attention(
    q_BTNH: jax.Array,
    k_BKHS: jax.Array,
    v_BKSH: jax.Array,
    *,
    backend: str,
    mask_BTS: jax.Array | None,
) -> jax.Array:
    """model.cached_attention on XLA without transposing the cache: the query heads grouped per kv
    head, both products batched over (B, K). cuDNN and the reference keep model.py's path.

    `mask_BTS` None (a prefill from key 0) gets the top-left causal mask here:
    jax.nn.dot_product_attention's XLA path cannot lower float16 under jit on the CPU ("precision
    F16_F16_F32 is not supported by dot_general")."""
    B, T, N, H = q_BTNH.shape
    K = v_BKSH.shape[1]
    if resolve_backend(backend, q_BTNH.dtype, H, mask_BTS is not None) != "xla":
        return model.cached_attention(q_BTNH, k_BKHS, v_BKSH, backend=backend, mask_BTS=mask_BTS)
    if mask_BTS is None:
        mask_BTS = (jnp.arange(v_BKSH.shape[2]) <= jnp.arange(T)[:, None])[None]  # (1, T, S)
    ct = compute_dtype(q_BTNH.dtype)
    # Query head h belongs to kv head h // G (consecutive groups, as in `reference_attention`).
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).astype(ct)
    scores_BKGTS = jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS.astype(ct)) / math.sqrt(H)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(ct).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    # Heads-major output, transposed after: asking the dot for (B, T, K, G,
    # H) directly is 2x slower.
    out_BKGTH = jnp.einsum("bkgts,bksh->bkgth", probs_BKGTS, v_BKSH.astype(ct))
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


class CpuDecodeLinear(Linear):
    """`Linear` (the same parameters) computed by `linear`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight[...], None if self.bias is None else self.bias[...])


class CpuDecodeEmbedding(Embedding):
    """`Embedding` whose tied unembedding, the largest matmul of a decode step, runs on `linear`."""

    def attend(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight[...])


class CpuDecodeAttention(Attention):
    """`Attention` whose cached path is `cached_attention` above."""

    def attend_cache(
        self,
        q_BTNH: jax.Array,
        k_BKHS: jax.Array,
        v_BKSH: jax.Array,
        backend: str,
        mask_BTS: jax.Array | None,
    ) -> jax.Array:
        return cached_attention(q_BTNH, k_BKHS, v_BKSH, backend=backend, mask_BTS=mask_BTS)


class CpuDecodeInt8Linear(Int8Linear):
    """`Int8Linear` (the same parameters) computed by `int8_linear`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = int8_linear(x, self.weight[...], self.weight_scale[...])
        return y if self.bias is None else y + self.bias[...]


class CpuDecodeInt8Embedding(Int8Embedding):
    """`Int8Embedding` whose tied unembedding runs on `int8_linear`."""

    def attend(self, x: jax.Array) -> jax.Array:
        return int8_linear(x, self.weight[...], self.weight_scale[...])


SWAPS: dict[type[nnx.Module], type[nnx.Module]] = {
    Linear: CpuDecodeLinear,
    Embedding: CpuDecodeEmbedding,
    Attention: CpuDecodeAttention,
    Int8Linear: CpuDecodeInt8Linear,
    Int8Embedding: CpuDecodeInt8Embedding,
}


def install(model: nnx.Module) -> nnx.Module:
    """Swap the fast classes of `SWAPS` in, in place: the same parameters, names and results (tests/
    test_kernels.py), only the op that computes them changes. Each fast class decides per call
    (rows, backend, device) and falls back to model.py's op where it does not apply."""
    for _, module in nnx.iter_graph(model):
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast  # a subclass that adds no state: variables stay as they are
    return model
