"""GPT in JAX/Flax NNX: the twin of gptmod_torch/model.py (same classes, names and order).

Every switch of the config is resolved in one place (`make_norm`, `Block.__init__`, `GPT.__init__`),
so the modern path reads straight through. Shapes are named by suffix (B batch, T query length,
S key length, D d_model, N query heads, K kv heads, H head_dim, V vocab; the full table is in
docs/DESIGN.md). This file is the readable path; `kernels.py` swaps in the CPU decode fast paths
(`GPT(cfg, kernels=False)` keeps this file's ops everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptmod.backends import BackendUnavailableError, check_backend_name, jax_cudnn_unmet
from gptmod.config import ModelConfig
from gptmod.inputs import check_input
from gptmod.quant import check_quant, quantized_names
from gptmod.sampling import check_cache_shape
from gptmod.weights import check_state
from gptmod_jax import sharding  # logical axis names on parameters and the KV cache


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Norms, RoPE, softmax and soft-cap run in fp32 (fp64 only if x64 is enabled)."""
    return jnp.promote_types(dtype, jnp.float32)


def resid_init_std(cfg: ModelConfig) -> float:
    """GPT-2's init of the projections into the residual stream (wo,
    w_down): init_std / sqrt(2 n_layer)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)


# ----------------------------------------------------------------------------- layers


class Linear(nnx.Module):
    """y = x W^T + b with torch's names and layout: `weight` (out, in), drawn from N(0, std^2) when
    built, and an optional zero `bias` (not nnx.Linear, whose kernel is (in, out)). `axes` are the
    logical axis names of (out, in) for sharding (gptmod_jax/sharding.py)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool,
        std: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None] = (None, None),
    ):
        weight = nnx.initializers.normal(std)(rngs.params(), (d_out, d_in), dtype)
        self.weight = sharding.param(weight, axes)
        self.bias = sharding.param(jnp.zeros((d_out,), dtype), axes[:1]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    """The token (or learned position) table, (V, D), drawn from N(0, std^2); `attend` is the tied
    unembedding, x @ table^T (torch's name, `weight`, where nnx.Embed says `embedding`)."""

    def __init__(
        self,
        n: int,
        d: int,
        *,
        std: float,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None],
    ):
        weight = nnx.initializers.normal(std)(rngs.params(), (n, d), dtype)
        self.weight = sharding.param(weight, axes)

    def __call__(self, idx: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], idx, axis=0)  # an id out of range gathers NaN

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...].T


# ----------------------------------------------------------------------------- int8 layers


def int8_linear(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x W^T for W = q * scale (gptmod/quant.py): the scale is one per output channel, so it
    factors out of each dot product and multiplies the result; q (|q| <= 127) converts exactly."""
    # Tied to this call's x: inside generate's decode loop q is loop-invariant, and XLA would hoist
    # its conversion out of the loop, holding (and reading) a float32 copy of every weight.
    q = jax.lax.optimization_barrier((q, x))[0]
    return (x @ q.T.astype(x.dtype)) * scale.astype(x.dtype)


class Int8Linear(nnx.Module):
    """`Linear` on int8 weights: `weight` (out, in) int8 and `weight_scale` (out,), the bias a float
    parameter. All are nnx.Params, so that the canonical state holds them (torch: buffers)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool,
        dtype: jnp.dtype,
        axes: tuple[str | None, str | None] = (None, None),
    ):
        self.weight = sharding.param(jnp.zeros((d_out, d_in), jnp.int8), axes)
        self.weight_scale = sharding.param(jnp.ones((d_out,), dtype), axes[:1])
        self.bias = sharding.param(jnp.zeros((d_out,), dtype), axes[:1]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = int8_linear(x, self.weight[...], self.weight_scale[...])
        return y if self.bias is None else y + self.bias[...]


class Int8Embedding(nnx.Module):
    """`Embedding` on int8 weights: a lookup scales the rows it reads by their own scales, and the
    tied unembedding is `int8_linear` (each row of the table is one output channel there)."""

    def __init__(self, n: int, d: int, *, dtype: jnp.dtype, axes: tuple[str | None, str | None]):
        self.weight = sharding.param(jnp.zeros((n, d), jnp.int8), axes)
        self.weight_scale = sharding.param(jnp.ones((n,), dtype), axes[:1])

    def __call__(self, idx: jax.Array) -> jax.Array:
        scale = self.weight_scale[...]
        return (
            jnp.take(self.weight[...], idx, axis=0).astype(scale.dtype)
            * jnp.take(scale, idx, axis=0)[..., None]
        )

    def attend(self, x: jax.Array) -> jax.Array:
        return int8_linear(x, self.weight[...], self.weight_scale[...])


def to_int8(model: nnx.Module, cfg: ModelConfig) -> nnx.Module:
    """Swap the layers whose weights `quant.quantized_names` names for their int8 twins, in place
    (zeros until `load_state` copies a quantized state in)."""
    for name in quantized_names(cfg):
        *parents, leaf = name.removesuffix(".weight").split(".")
        parent = model
        for part in parents:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        old = getattr(parent, leaf)
        d_out, d_in = old.weight.shape
        dtype, axes = old.weight.dtype, old.weight.get_metadata().get("out_sharding", (None, None))
        new = (
            Int8Embedding(d_out, d_in, dtype=dtype, axes=axes)
            if isinstance(old, Embedding)
            else Int8Linear(d_in, d_out, bias=old.bias is not None, dtype=dtype, axes=axes)
        )
        setattr(parent, leaf, new)
    return model


# ----------------------------------------------------------------------------- norms


class LayerNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32):
        self.eps = cfg.norm_eps  # explicit: Flax's own default would be 1e-6
        self.weight = sharding.param(jnp.ones((cfg.d_model,), dtype), ("embed",))
        self.bias = sharding.param(jnp.zeros((cfg.d_model,), dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        ct = compute_dtype(x.dtype)
        x32 = x.astype(ct)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(ct) + self.bias[...].astype(ct)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32):
        self.eps = cfg.norm_eps
        self.weight = sharding.param(jnp.ones((cfg.d_model,), dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        ct = compute_dtype(x.dtype)
        x32 = x.astype(ct)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(ct)).astype(x.dtype)


def make_norm(cfg: ModelConfig, dtype: jnp.dtype) -> nnx.Module:
    return RMSNorm(cfg, dtype=dtype) if cfg.norm == "rmsnorm" else LayerNorm(cfg, dtype=dtype)


# ----------------------------------------------------------------------------- rope


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    # float64 on the host: both twins then round the very same frequencies to fp32.
    inv_freq = 1.0 / cfg.rope_theta ** (
        np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    )
    # Llama 3.1/3.2
    return inv_freq if cfg.rope_scaling is None else cfg.rope_scaling.scale(inv_freq)


def rope_cos_sin(
    positions_BT: jax.Array, cfg: ModelConfig, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, (B, T, H/2), in the compute dtype (never bf16)."""
    ct = compute_dtype(dtype)
    inv_freq = jnp.asarray(rope_inv_freq(cfg), dtype=ct)
    angles_BTh = positions_BT.astype(ct)[..., None] * inv_freq
    return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Half-split rotation (rotate_half, as HF Llama / GPT-NeoX / Gemma), not interleaved pairs."""
    x1, x2 = jnp.split(x_BTNH.astype(cos_BTh.dtype), 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------- attention


class BlockInputs(NamedTuple):
    """What every block takes besides the residual stream, made once per forward by `GPT.embed`."""

    rope: tuple[jax.Array, jax.Array] | None  # cos, sin (B, T, H/2); None for learned positions
    pos_BT: jax.Array  # where each token sits: the KV cache's write positions
    mask_BTS: jax.Array | None  # bottom-right causal over the cache; None: top-left is_causal
    backend: str  # the attention kernel, see `attention`


def reference_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array | None
) -> jax.Array:
    """The softmax written out, for reading; scores and softmax in fp32 like the fused kernels."""
    T, N, H = q_BTNH.shape[1:]
    S, K = k_BSKH.shape[1:3]
    # Query head h reads kv head h // (N // K): consecutive groups, i.e. jnp.repeat, never jnp.tile.
    k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, N // K, axis=2)
    ct = compute_dtype(q_BTNH.dtype)
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(ct), k_BSNH.astype(ct)) / math.sqrt(H)
    if mask_BTS is None:  # causal, aligned top-left: query i sees keys 0..i
        mask_BTS = jnp.tril(jnp.ones((T, S), dtype=bool))[None]
    # A finite fill keeps fully masked (padding) rows finite: they average V.
    scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, jnp.finfo(ct).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH.astype(ct)).astype(q_BTNH.dtype)


def resolve_backend(backend: str, dtype: jnp.dtype, head_dim: int, has_mask: bool) -> str:
    """ "auto" -> "cudnn" where its constraints hold, else "xla". `implementation=None` never picks
    cuDNN by itself, so "auto" has to ask for it. A named backend that cannot run is an error."""
    if backend in ("xla", "reference"):
        return backend
    check_backend_name("jax", backend)  # e.g. a name set on model.attn_backend after construction
    device = jax.devices()[0]
    # Masks are always passed at full (B, N, T, S) size below, so only dtype, shape and GPU matter.
    unmet = jax_cudnn_unmet(
        device.platform,
        jnp.dtype(dtype).name,
        head_dim,
        getattr(device, "compute_capability", None),
        has_mask,
        True,
    )
    if backend == "auto":
        return "xla" if unmet else "cudnn"
    if unmet:
        raise BackendUnavailableError(
            f"jax attention backend 'cudnn' cannot run: {'; '.join(unmet)}"
        )
    return backend


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    backend: str,
    mask_BTS: jax.Array | None = None,
) -> jax.Array:
    """Causal attention through `jax.nn.dot_product_attention` (or the written-out reference).

    Without `mask_BTS` the mask is `is_causal`, which is aligned top-left: right only when the query
    block starts at key 0. A KV cache passes an explicit bottom-right `mask_BTS` (True = attend).
    """
    B, T, N, H = q_BTNH.shape
    implementation = resolve_backend(backend, q_BTNH.dtype, H, mask_BTS is not None)
    if implementation == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    # K < N heads is native GQA here; no repeat needed. (B, T, N, H) is JAX's layout, unlike SDPA's.
    mask_BNTS = (
        None
        if mask_BTS is None
        else jnp.broadcast_to(mask_BTS[:, None], (B, N, T, k_BSKH.shape[1]))
    )
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=mask_BNTS,
        scale=1.0 / math.sqrt(H),
        is_causal=mask_BTS is None,
        implementation=implementation,
    )


def cached_attention(
    q_BTNH: jax.Array,
    k_BKHS: jax.Array,
    v_BKSH: jax.Array,
    *,
    backend: str,
    mask_BTS: jax.Array | None,
) -> jax.Array:
    """Attention over the KV cache, keys (B, K, H, S) and values (B, K, S, H), handed to `attention`
    as the (B, S, K, H) views it expects (kernels.py multiplies the cache layouts without them).

    `mask_BTS` None: the T queries sit at positions 0..T-1 in every row (a prefill from the start),
    so plain causal attention over the cache's first T keys is the same arithmetic, which cuDNN
    takes without a mask."""
    if mask_BTS is None:
        T = q_BTNH.shape[1]
        k_BKHS, v_BKSH = k_BKHS[..., :T], v_BKSH[:, :, :T]
    k_BSKH, v_BSKH = k_BKHS.transpose(0, 3, 1, 2), v_BKSH.transpose(0, 2, 1, 3)
    return attention(q_BTNH, k_BSKH, v_BSKH, backend=backend, mask_BTS=mask_BTS)


class KVCache(nnx.Module):
    """Static KV cache of one layer, preallocated: keys (B, K, H, S), values (B, K, S, H), the
    layouts XLA's CPU dot multiplies without a copy (kernels.py); nnx.Cache variables, so that
    `nnx.split(model, nnx.Param, nnx.Cache)` hands it to a jitted loop as pure state.

    Each row writes at its own positions, so ragged batches need no shifting. Capacity is checked by
    the caller (GPT.__call__ and generate) before anything is written; under jit, where it cannot
    be, an out-of-range position's write is dropped (never wrapped onto a real entry) and GPT.embed
    makes that token's logits NaN."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype: jnp.dtype):
        axes = ("batch", "kv_heads", None, None)
        self.k = sharding.cache(jnp.zeros((batch, n_kv_head, head_dim, max_len), dtype), axes)
        self.v = sharding.cache(jnp.zeros((batch, n_kv_head, max_len, head_dim), dtype), axes)

    @property
    def capacity(self) -> int:
        return self.v.shape[2]

    def update(
        self, pos_BT: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        # A negative index would wrap onto the end; sent to `capacity`
        # instead, it is out of bounds and dropped.
        pos_BT = jnp.where((pos_BT >= 0) & (pos_BT < self.capacity), pos_BT, self.capacity)
        # each row written on the devices that hold it: see sharding.write_rows
        if sharding.mesh_active():
            self.k[...], self.v[...] = sharding.write_rows(
                self.k[...], self.v[...], pos_BT, k_BTKH, v_BTKH
            )
        else:
            rows_B1 = jnp.arange(pos_BT.shape[0])[:, None]
            # Index arrays split by slices put their (B, T) axes first: the
            # targets are (B, T, K, H), as given.
            self.k[...] = self.k[...].at[rows_B1, :, :, pos_BT].set(k_BTKH)
            self.v[...] = self.v[...].at[rows_B1, :, pos_BT].set(v_BTKH)
        return self.k[...], self.v[...]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        sharding.check_heads(cfg)  # under a mesh: whole KV heads on every device, or a clear error
        self.kv_cache: KVCache | None = nnx.data(None)  # data, not static: setup_cache fills it in
        std, resid_std = cfg.init_std, resid_init_std(cfg)
        kw = {"bias": cfg.bias, "dtype": dtype, "rngs": rngs}
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.wq = Linear(cfg.d_model, q_dim, std=std, axes=("heads", "embed"), **kw)
        self.wk = Linear(cfg.d_model, kv_dim, std=std, axes=("kv_heads", "embed"), **kw)
        self.wv = Linear(cfg.d_model, kv_dim, std=std, axes=("kv_heads", "embed"), **kw)
        self.wo = Linear(q_dim, cfg.d_model, std=resid_std, axes=("embed", "heads"), **kw)

    def __call__(self, x_BTD: jax.Array, inputs: BlockInputs) -> jax.Array:
        rope, backend, pos_BT, mask_BTS = (
            inputs.rope,
            inputs.backend,
            inputs.pos_BT,
            inputs.mask_BTS,
        )
        B, T, _ = x_BTD.shape
        q_BTNH = self.wq(x_BTD).reshape(B, T, self.n_head, self.head_dim)
        k_BTKH = self.wk(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        v_BTKH = self.wv(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        if self.kv_cache is None:
            out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, backend=backend, mask_BTS=mask_BTS)
        else:
            k_BKHS, v_BKSH = self.kv_cache.update(pos_BT, k_BTKH, v_BTKH)
            out_BTNH = self.attend_cache(q_BTNH, k_BKHS, v_BKSH, backend, mask_BTS)
        return self.wo(out_BTNH.reshape(B, T, self.n_head * self.head_dim))

    def attend_cache(
        self,
        q_BTNH: jax.Array,
        k_BKHS: jax.Array,
        v_BKSH: jax.Array,
        backend: str,
        mask_BTS: jax.Array | None,
    ) -> jax.Array:
        return cached_attention(q_BTNH, k_BKHS, v_BKSH, backend=backend, mask_BTS=mask_BTS)


# ----------------------------------------------------------------------------- mlp


class GeluMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = {"bias": cfg.bias, "dtype": dtype, "rngs": rngs}
        self.w_up = Linear(cfg.d_model, cfg.d_ff, std=cfg.init_std, axes=("mlp", "embed"), **kw)
        self.w_down = Linear(
            cfg.d_ff, cfg.d_model, std=resid_init_std(cfg), axes=("embed", "mlp"), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # GPT-2's GELU is the tanh approximation (jax.nn.gelu's default; spelled out all the same).
        return self.w_down(jax.nn.gelu(self.w_up(x), approximate=True))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = {"bias": cfg.bias, "dtype": dtype, "rngs": rngs}
        self.w_gate = Linear(cfg.d_model, cfg.d_ff, std=cfg.init_std, axes=("mlp", "embed"), **kw)
        self.w_up = Linear(cfg.d_model, cfg.d_ff, std=cfg.init_std, axes=("mlp", "embed"), **kw)
        self.w_down = Linear(
            cfg.d_ff, cfg.d_model, std=resid_init_std(cfg), axes=("embed", "mlp"), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


# ----------------------------------------------------------------------------- model


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        MLP = SwiGLU if cfg.mlp == "swiglu" else GeluMLP
        self.attn_norm = make_norm(cfg, dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = make_norm(cfg, dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, inputs: BlockInputs) -> jax.Array:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), inputs)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class GPT(nnx.Module):
    """The modernised GPT-2. `attn_backend` is a run-time choice: one of
    gptmod.backends.JAX_BACKENDS.

    `dtype` is the parameter dtype and so the compute dtype (torch: `model.to(dtype)`). Each layer
    draws its weights from `rngs` as it is built. `quant="int8"` makes the matmul layers int8 ones
    (`to_int8`), to load a quantized state into. `kernels` swaps in the CPU decode fast paths of
    gptmod_jax/kernels.py (the same parameters and results)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        attn_backend: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        kernels: bool = True,
        quant: str | None = None,
    ):
        self.cfg = cfg
        self.quant = check_quant(quant)
        self.attn_backend = check_backend_name("jax", attn_backend)
        emb = {"std": cfg.init_std, "dtype": dtype, "rngs": rngs}
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), **emb)
        self.pos_emb = (
            Embedding(cfg.max_seq_len, cfg.d_model, axes=(None, "embed"), **emb)
            if cfg.pos == "learned"
            else None
        )
        self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layer)])
        self.norm = make_norm(cfg, dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, axes=("vocab", "embed"), bias=False, **emb)
        )
        if quant is not None:
            to_int8(self, cfg)
        if kernels:
            from gptmod_jax.kernels import install  # imports this file: a late import

            install(self)

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Preallocate a static KV cache in every layer (max_len defaults to cfg.max_seq_len)."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        check_cache_shape(batch, max_len, self.cfg)
        dtype = self.norm.weight.dtype  # float, where an int8 model's tok_emb is not
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch, max_len, self.cfg.n_kv_head, self.cfg.head_dim, dtype
            )

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def check_input(self, idx_BT: jax.Array, pos_BT: jax.Array | None) -> None:
        """Ids, length and positions, up front (gptmod/inputs.py). Under jit only types and shapes
        can be checked: `embed` then turns a bad id or position into NaN logits."""
        cache = self.blocks[0].attn.kv_cache
        check_input(
            self.cfg,
            idx_BT,
            pos_BT,
            None if cache is None else (cache.k.shape[0], cache.capacity),
            is_array=lambda a: isinstance(a, (jax.Array, np.ndarray)),
            is_integer=lambda a: jnp.issubdtype(a.dtype, jnp.integer),
            expected="an integer (batch, time) jax or numpy array",
            values_known=not any(isinstance(a, jax.core.Tracer) for a in (idx_BT, pos_BT)),
        )

    def __call__(
        self, idx_BT: jax.Array, positions_BT: jax.Array | None = None, return_hidden: bool = False
    ):
        """Logits (B, T, V) in fp32; with `return_hidden`, also the residual stream after the
        embedding and after each block (n_layer + 1 arrays).

        Without a KV cache, positions are 0..T-1. With one (`setup_cache`), `positions_BT` says
        where each token sits; each row may be at a different offset (ragged batches)."""
        self.check_input(idx_BT, positions_BT)
        x_BTD, hidden = self.trunk(idx_BT, positions_BT)
        logits_BTV = self.head(x_BTD)
        return (logits_BTV, hidden) if return_hidden else logits_BTV

    def embed(
        self, idx_BT: jax.Array, positions_BT: jax.Array | None
    ) -> tuple[jax.Array, BlockInputs]:
        """The embedded tokens and what every block takes with them. The mask is None when the block
        starts at key 0 in every row (`positions_BT` None, with or without a KV cache): the top-left
        is_causal is then right."""
        cache = self.blocks[0].attn.kv_cache
        mask_BTS = None
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(idx_BT.shape[1])[None], idx_BT.shape)
        # bottom-right causal over the cache: key s is visible from position p iff s <= p
        elif cache is not None:
            mask_BTS = jnp.arange(cache.capacity) <= positions_BT[..., None]
        x_BTD = self.tok_emb(idx_BT)
        # Under jit check_input cannot see values: a bad id (a negative one would wrap onto the
        # vocabulary's end) or a position outside the cache gives NaN, never the logits of some
        # other token or position.
        valid_BT = (idx_BT >= 0) & (idx_BT < self.cfg.vocab_size)
        if cache is not None:
            valid_BT &= (positions_BT >= 0) & (positions_BT < cache.capacity)
        x_BTD = jnp.where(valid_BT[..., None], x_BTD, jnp.nan)
        rope = None
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(positions_BT)
        else:
            rope = rope_cos_sin(positions_BT, self.cfg, x_BTD.dtype)
        x_BTD = sharding.constrain(x_BTD, ("batch", None, None))
        return x_BTD, BlockInputs(rope, positions_BT, mask_BTS, self.attn_backend)

    def trunk(self, idx_BT: jax.Array, positions_BT: jax.Array | None) -> tuple[jax.Array, list]:
        """Embedding and blocks: the residual stream before the final norm (and each layer's)."""
        x_BTD, inputs = self.embed(idx_BT, positions_BT)
        hidden = [x_BTD]
        for block in self.blocks:
            x_BTD = block(x_BTD, inputs)
            x_BTD = sharding.constrain(x_BTD, ("batch", None, None))  # a no-op without a mesh
            hidden.append(x_BTD)
        return x_BTD, hidden

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm, unembedding (tied or not) and soft-cap, in fp32; any leading shape."""
        x_BTD = self.norm(x_BTD)
        logits_BTV = self.tok_emb.attend(x_BTD) if self.lm_head is None else self.lm_head(x_BTD)
        logits_BTV = logits_BTV.astype(compute_dtype(x_BTD.dtype))
        cap = self.cfg.logit_softcap
        return logits_BTV if cap is None else cap * jnp.tanh(logits_BTV / cap)


# ----------------------------------------------------------------------------- canonical state


def _canonical_params(model: nnx.Module) -> dict[str, nnx.Param]:
    """Parameters by canonical name: the NNX paths already are torch's names and layouts."""
    return {
        ".".join(map(str, path)): p for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def export_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Canonical state: torch names, (out, in) weights, the model's own dtype; a copy."""
    # Copies: a view of a buffer that jit may later donate is unsafe.
    return {name: np.array(sharding.gather(p[...])) for name, p in _canonical_params(model).items()}


def load_state(model: nnx.Module, state: Mapping[str, np.ndarray]) -> nnx.Module:
    """Copy canonical state into `model` (any GPT submodule too), cast to the model's dtype.

    Every missing, unexpected and mis-shaped key is reported in one StateError."""
    params = _canonical_params(model)
    check_state({name: tuple(p.shape) for name, p in params.items()}, state)
    for name, p in params.items():
        # A copy (on CPU a device array may alias a numpy buffer, which the caller can still
        # mutate), placed where the parameter is: one device, or its shards under a mesh
        # (gptmod_jax/sharding.py); the default device for a model of shapes only
        # (`nnx.eval_shape`, as gptmod.models.build makes one to load).
        where = p.get_value().sharding
        p.set_value(jax.device_put(np.array(state[name], dtype=p.dtype, copy=True), where))
    return model
