"""GPT in PyTorch: the twin of gptmod_jax/model.py (same classes, names and order).

Every switch of the config is resolved in one place (`make_norm`, `Block.__init__`, `GPT.__init__`),
so the modern path reads straight through. Shapes are named by suffix (B batch, T query length,
S key length, D d_model, N query heads, K kv heads, H head_dim, V vocab; the full table is in
docs/DESIGN.md). This file is the readable path; `kernels.py` swaps in the CPU decode fast paths
(`GPT(cfg, kernels=False)` keeps this file's ops everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import NamedTuple

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptmod.backends import BackendUnavailableError, check_backend_name, torch_pinned_unmet
from gptmod.config import ModelConfig
from gptmod.inputs import check_input
from gptmod.quant import check_quant, quantized_names
from gptmod.sampling import check_cache_shape
from gptmod.weights import check_state

_PINNED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, RoPE, softmax and soft-cap run in fp32, or in fp64 for the float64 reference."""
    return torch.promote_types(dtype, torch.float32)


def resid_init_std(cfg: ModelConfig) -> float:
    """GPT-2's init of the projections into the residual stream (wo,
    w_down): init_std / sqrt(2 n_layer)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)


# ----------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """y = x W^T + b with torch's names and layout: `weight` (out, in), drawn from N(0, std^2) when
    built, and an optional zero `bias`."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in).normal_(0.0, std))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """The token (or learned position) table, (V, D), drawn from N(0, std^2); `attend` is the tied
    unembedding, x @ table^T."""

    def __init__(self, n: int, d: int, *, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d).normal_(0.0, std))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# ----------------------------------------------------------------------------- int8 layers


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x W^T for W = q * scale (gptmod/quant.py): the scale is one per output channel, so it
    factors out of each dot product and multiplies the result; q (|q| <= 127) converts exactly."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """`Linear` on int8 weights: `weight` (out, in) int8 and `weight_scale` (out,) are buffers
    (an integer tensor cannot require grad; nothing here trains), the bias a float parameter."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d_out, d_in, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(d_out))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """`Embedding` on int8 weights: a lookup scales the rows it reads by their own scales, and the
    tied unembedding is `int8_linear` (each row of the table is one output channel there)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n, d, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale
        return F.embedding(idx, self.weight).to(scale.dtype) * F.embedding(idx, scale[:, None])

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale)


def to_int8(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Swap the layers whose weights `quant.quantized_names` names for their int8 twins, in place
    (zeros until `load_state` copies a quantized state in)."""
    for name in quantized_names(cfg):
        path = name.removesuffix(".weight")
        old = model.get_submodule(path)
        d_out, d_in = old.weight.shape
        new = (
            Int8Embedding(d_out, d_in)
            if isinstance(old, Embedding)
            else Int8Linear(d_in, d_out, bias=old.bias is not None)
        )
        model.set_submodule(path, new.to(old.weight.device))
    return model


# ----------------------------------------------------------------------------- norms


class LayerNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = compute_dtype(x.dtype)
        y = F.layer_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), self.bias.to(ct), eps=self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = compute_dtype(x.dtype)
        return F.rms_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg) if cfg.norm == "rmsnorm" else LayerNorm(cfg)


# ----------------------------------------------------------------------------- rope


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    # float64 on the host: both twins then round the very same frequencies to fp32.
    inv_freq = 1.0 / cfg.rope_theta ** (
        np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    )
    # Llama 3.1/3.2
    return inv_freq if cfg.rope_scaling is None else cfg.rope_scaling.scale(inv_freq)


def rope_cos_sin(
    positions_BT: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (B, T, H/2), in the compute dtype (never bf16)."""
    ct = compute_dtype(dtype)
    inv_freq = torch.as_tensor(rope_inv_freq(cfg), dtype=ct, device=positions_BT.device)
    angles_BTh = positions_BT.to(ct)[..., None] * inv_freq
    return angles_BTh.cos(), angles_BTh.sin()


def apply_rope(x_BTNH: torch.Tensor, cos_BTh: torch.Tensor, sin_BTh: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (rotate_half, as HF Llama / GPT-NeoX / Gemma), not interleaved pairs."""
    x1, x2 = x_BTNH.to(cos_BTh.dtype).chunk(2, dim=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTNH.dtype)


# ----------------------------------------------------------------------------- attention


class BlockInputs(NamedTuple):
    """What every block takes besides the residual stream, made once per forward by `GPT.embed`."""

    # cos, sin (B, T, H/2); None for learned positions
    rope: tuple[torch.Tensor, torch.Tensor] | None
    pos_BT: torch.Tensor  # where each token sits: the KV cache's write positions
    mask_BTS: torch.Tensor | None  # bottom-right causal over the cache; None: top-left is_causal
    backend: str  # the attention kernel, see `attention`


def reference_attention(
    q_BTNH: torch.Tensor, k_BSKH: torch.Tensor, v_BSKH: torch.Tensor, mask_BTS: torch.Tensor | None
) -> torch.Tensor:
    """The softmax written out, for reading; scores and softmax in fp32 like the fused kernels."""
    T, N, H = q_BTNH.shape[1:]
    S, K = k_BSKH.shape[1:3]
    # Query head h reads kv head h // (N // K): consecutive groups, i.e.
    # repeat_interleave, never tile.
    k_BSNH = k_BSKH.repeat_interleave(N // K, dim=2)
    v_BSNH = v_BSKH.repeat_interleave(N // K, dim=2)
    ct = compute_dtype(q_BTNH.dtype)
    scores_BNTS = torch.einsum("btnh,bsnh->bnts", q_BTNH.to(ct), k_BSNH.to(ct)) / math.sqrt(H)
    if mask_BTS is None:  # causal, aligned top-left: query i sees keys 0..i
        mask_BTS = torch.ones(T, S, dtype=torch.bool, device=q_BTNH.device).tril()[None]
    # A finite fill keeps fully masked (padding) rows finite: they average V, as in JAX.
    scores_BNTS = scores_BNTS.masked_fill(~mask_BTS[:, None], torch.finfo(ct).min)
    probs_BNTS = scores_BNTS.softmax(dim=-1)
    return torch.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH.to(ct)).to(q_BTNH.dtype)


def resolve_backend(
    backend: str, device: str, dtype: torch.dtype, head_dim: int, has_mask: bool
) -> str:
    """ "sdpa" (PyTorch chooses) and "reference" as they are; a pinned SDPA kernel only where its
    documented constraints hold, otherwise a BackendUnavailableError that says which failed."""
    if backend in ("sdpa", "reference"):
        return backend
    check_backend_name("torch", backend)  # e.g. a name set on model.attn_backend after construction
    unmet = torch_pinned_unmet(
        backend, device, str(dtype).removeprefix("torch."), head_dim, has_mask
    )
    if unmet:
        raise BackendUnavailableError(
            f"torch attention backend {backend!r} cannot run: {'; '.join(unmet)}"
        )
    return backend


def attention(
    q_BTNH: torch.Tensor,
    k_BSKH: torch.Tensor,
    v_BSKH: torch.Tensor,
    *,
    backend: str,
    mask_BTS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention through SDPA (or the written-out reference).

    Without `mask_BTS` the mask is SDPA's `is_causal`, which is aligned
    top-left: right only when the query block starts at key 0. A KV cache
    passes an explicit bottom-right `mask_BTS` (True = attend).
    """
    N, H, K = q_BTNH.shape[2], q_BTNH.shape[3], k_BSKH.shape[2]
    implementation = resolve_backend(
        backend, q_BTNH.device.type, q_BTNH.dtype, H, mask_BTS is not None
    )
    if implementation == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    pinned = _PINNED.get(implementation)
    # SDPA wants heads before time: (B, N, T, H).
    q, k, v = (t.transpose(1, 2) for t in (q_BTNH, k_BSKH, v_BSKH))
    attn_mask = None if mask_BTS is None else mask_BTS[:, None]
    try:
        with sdpa_kernel(pinned) if pinned is not None else nullcontext():
            out_BNTH = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=mask_BTS is None,
                scale=1.0 / math.sqrt(H),
                enable_gqa=K != N,
            )
    except RuntimeError as e:
        if pinned is None:
            raise
        raise BackendUnavailableError(
            f"torch attention backend {backend!r} cannot run for device={q.device.type}, "
            f"dtype={q.dtype}, head_dim={H}, heads={N}/{K}, "
            f"mask={'yes' if mask_BTS is not None else 'causal'}: {str(e).splitlines()[0]}"
        ) from e
    return out_BNTH.transpose(1, 2)


def cached_attention(
    q_BTNH: torch.Tensor,
    k_BKSH: torch.Tensor,
    v_BKSH: torch.Tensor,
    *,
    backend: str,
    mask_BTS: torch.Tensor | None,
) -> torch.Tensor:
    """Attention over the heads-major KV cache, (B, K, S, H): SDPA's own (B, heads, S, H) layout, so
    the (B, S, K, H) view handed to `attention` turns back into it without a copy.

    `mask_BTS` None: the T queries sit at positions 0..T-1 in every row (a prefill from the start),
    so plain causal attention over the cache's first T keys is the same arithmetic, and SDPA may
    pick FlashAttention, which takes no mask."""
    if mask_BTS is None:
        T = q_BTNH.shape[1]
        k_BKSH, v_BKSH = k_BKSH[:, :, :T], v_BKSH[:, :, :T]
    return attention(
        q_BTNH, k_BKSH.transpose(1, 2), v_BKSH.transpose(1, 2), backend=backend, mask_BTS=mask_BTS
    )


class KVCache(nn.Module):
    """Static KV cache of one layer, heads-major (B, K, S, H), preallocated and written in place.

    Each row writes at its own positions, so ragged batches need no shifting. Capacity is checked
    by the caller (GPT.forward and generate) before anything is written."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype,
        device=None,
    ):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        # persistent=False: the cache is run-time state, never part of the canonical weights.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(
        self, pos_BT: torch.Tensor, k_BTKH: torch.Tensor, v_BTKH: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows_B1 = torch.arange(pos_BT.shape[0], device=pos_BT.device)[:, None]
        # Index tensors split by a slice put their (B, T) axes first: the
        # target is (B, T, K, H), as given.
        self.k[rows_B1, :, pos_BT] = k_BTKH
        self.v[rows_B1, :, pos_BT] = v_BTKH
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.kv_cache: KVCache | None = None
        std, resid_std = cfg.init_std, resid_init_std(cfg)
        self.wq = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias, std=std)
        self.wk = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias, std=std)
        self.wv = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias, std=std)
        self.wo = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias, std=resid_std)

    def forward(self, x_BTD: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        rope, backend, pos_BT, mask_BTS = (
            inputs.rope,
            inputs.backend,
            inputs.pos_BT,
            inputs.mask_BTS,
        )
        B, T, _ = x_BTD.shape
        q_BTNH = self.wq(x_BTD).view(B, T, self.n_head, self.head_dim)
        k_BTKH = self.wk(x_BTD).view(B, T, self.n_kv_head, self.head_dim)
        v_BTKH = self.wv(x_BTD).view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        if self.kv_cache is None:
            out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, backend=backend, mask_BTS=mask_BTS)
        else:
            k_BKSH, v_BKSH = self.kv_cache.update(pos_BT, k_BTKH, v_BTKH)
            out_BTNH = self.attend_cache(q_BTNH, k_BKSH, v_BKSH, backend, mask_BTS)
        return self.wo(out_BTNH.reshape(B, T, self.n_head * self.head_dim))

    def attend_cache(
        self,
        q_BTNH: torch.Tensor,
        k_BKSH: torch.Tensor,
        v_BKSH: torch.Tensor,
        backend: str,
        mask_BTS: torch.Tensor | None,
    ) -> torch.Tensor:
        return cached_attention(q_BTNH, k_BKSH, v_BKSH, backend=backend, mask_BTS=mask_BTS)


# ----------------------------------------------------------------------------- mlp


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias, std=cfg.init_std)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias, std=resid_init_std(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU is the tanh approximation; torch's default is the exact erf form.
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias, std=cfg.init_std)
        self.w_up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias, std=cfg.init_std)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias, std=resid_init_std(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        MLP = SwiGLU if cfg.mlp == "swiglu" else GeluMLP
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), inputs)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class GPT(nn.Module):
    """The modernised GPT-2. `attn_backend` is a run-time choice: one of
    gptmod.backends.TORCH_BACKENDS.

    Weights are drawn from the global RNG (`torch.manual_seed`) as each
    layer is built. `quant="int8"` makes the matmul layers int8 ones (`to_int8`), to load a
    quantized state into. `kernels` swaps in the CPU decode fast paths of
    gptmod_torch/kernels.py (the same parameters and results)."""

    def __init__(
        self,
        cfg: ModelConfig,
        attn_backend: str = "sdpa",
        kernels: bool = True,
        quant: str | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.quant = check_quant(quant)
        self.attn_backend = check_backend_name("torch", attn_backend)
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std)
        self.pos_emb = (
            Embedding(cfg.max_seq_len, cfg.d_model, std=cfg.init_std)
            if cfg.pos == "learned"
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, bias=False, std=cfg.init_std)
        )
        if quant is not None:
            to_int8(self, cfg)
        if kernels:
            from gptmod_torch.kernels import install  # imports this file: a late import

            install(self)

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Preallocate a static KV cache in every layer (max_len defaults to cfg.max_seq_len)."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        check_cache_shape(batch, max_len, self.cfg)
        p = self.norm.weight  # float, where an int8 model's tok_emb is not
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch, max_len, self.cfg.n_kv_head, self.cfg.head_dim, p.dtype, p.device
            )

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def check_input(self, idx_BT: torch.Tensor, pos_BT: torch.Tensor | None) -> None:
        """Ids, length and positions, up front (gptmod/inputs.py): a bad id
        or a write past the cache must never reach the kernels. Skipped
        under torch.compile, which cannot raise on values."""
        cache = self.blocks[0].attn.kv_cache
        check_input(
            self.cfg,
            idx_BT,
            pos_BT,
            None if cache is None else (cache.k.shape[0], cache.capacity),
            is_array=lambda a: isinstance(a, torch.Tensor),
            is_integer=lambda a: a.dtype in (torch.int32, torch.int64),
            expected="an int32/int64 (batch, time) tensor",
        )

    def forward(
        self,
        idx_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Logits (B, T, V) in fp32 (fp64 for a float64 model); with `return_hidden`, also the
        residual stream after the embedding and after each block (n_layer + 1 tensors).

        Without a KV cache, positions are 0..T-1. With one (`setup_cache`), `positions_BT` says
        where each token sits; each row may be at a different offset (ragged batches)."""
        if not torch.compiler.is_compiling():
            self.check_input(idx_BT, positions_BT)
        x_BTD, hidden = self.trunk(idx_BT, positions_BT)
        logits_BTV = self.head(x_BTD)
        return (logits_BTV, hidden) if return_hidden else logits_BTV

    def embed(
        self, idx_BT: torch.Tensor, positions_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, BlockInputs]:
        """The embedded tokens and what every block takes with them. The mask is None when the block
        starts at key 0 in every row (`positions_BT` None, with or without a KV cache): SDPA's
        top-left is_causal is then right."""
        cache = self.blocks[0].attn.kv_cache
        mask_BTS = None
        if positions_BT is None:
            positions_BT = torch.arange(idx_BT.shape[1], device=idx_BT.device)[None].expand_as(
                idx_BT
            )
        # bottom-right causal over the cache: key s is visible from position p iff s <= p
        elif cache is not None:
            mask_BTS = torch.arange(cache.capacity, device=idx_BT.device) <= positions_BT[..., None]
        x_BTD = self.tok_emb(idx_BT)
        rope = None
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(positions_BT)
        else:
            rope = rope_cos_sin(positions_BT, self.cfg, x_BTD.dtype)
        return x_BTD, BlockInputs(rope, positions_BT, mask_BTS, self.attn_backend)

    def trunk(
        self, idx_BT: torch.Tensor, positions_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, list]:
        """Embedding and blocks: the residual stream before the final norm (and each layer's)."""
        x_BTD, inputs = self.embed(idx_BT, positions_BT)
        hidden = [x_BTD]
        for block in self.blocks:
            x_BTD = block(x_BTD, inputs)
            hidden.append(x_BTD)
        return x_BTD, hidden

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding (tied or not) and soft-cap, in fp32; any leading shape."""
        x_BTD = self.norm(x_BTD)
        logits_BTV = self.tok_emb.attend(x_BTD) if self.lm_head is None else self.lm_head(x_BTD)
        logits_BTV = logits_BTV.to(compute_dtype(x_BTD.dtype))
        cap = self.cfg.logit_softcap
        return logits_BTV if cap is None else cap * torch.tanh(logits_BTV / cap)


# ----------------------------------------------------------------------------- canonical state


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16; ml_dtypes' is bit-compatible
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    # a snapshot: a view would change under the optimizer's in-place updates
    return t.numpy().copy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    # e.g. a view of a JAX array; torch.from_numpy wants to own writable memory
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def export_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Canonical state: `state_dict()` keys as they are, (out, in) weights,
    the model's own dtype; a copy."""
    return {name: _to_numpy(t) for name, t in model.state_dict().items()}


@torch.no_grad()
def load_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy canonical state into `model` (any GPT submodule too), cast to the model's dtype.

    Every missing, unexpected and mis-shaped key is reported in one StateError."""
    params = model.state_dict()
    check_state({name: tuple(t.shape) for name, t in params.items()}, state)
    for name, t in params.items():
        t.copy_(_to_torch(np.asarray(state[name])))
    return model
