"""GPT in PyTorch: the twin of gptmod_jax/model.py (same classes, names and order).

Every switch of the config is resolved in one place (`make_norm`, `Block.__init__`, `GPT.__init__`),
so the modern path reads straight through. Shapes are named by suffix: B batch, T query length,
S key length, D d_model, N query heads, K kv heads, H head_dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptmod.backends import BackendUnavailableError, check_backend_name, torch_pinned_unmet
from gptmod.config import ModelConfig
from gptmod.sampling import check_cache_shape
from gptmod.weights import check_state
from gptmod_torch.kernels import Linear, linear  # nn.Linear / F.linear, on oneDNN for CPU fp32 inference

_PINNED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, RoPE, softmax and soft-cap run in fp32, or in fp64 for the float64 reference."""
    return torch.promote_types(dtype, torch.float32)


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
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    return inv_freq if cfg.rope_scaling is None else cfg.rope_scaling.scale(inv_freq)  # Llama 3.1/3.2


def rope_cos_sin(positions_BT: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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


def reference_attention(
    q_BTNH: torch.Tensor, k_BSKH: torch.Tensor, v_BSKH: torch.Tensor, mask_BTS: torch.Tensor | None
) -> torch.Tensor:
    """The softmax written out, for reading; scores and softmax in fp32 like the fused kernels."""
    T, N, H = q_BTNH.shape[1:]
    S, K = k_BSKH.shape[1:3]
    # Query head h reads kv head h // (N // K): consecutive groups, i.e. repeat_interleave, never tile.
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


def attention(
    q_BTNH: torch.Tensor,
    k_BSKH: torch.Tensor,
    v_BSKH: torch.Tensor,
    *,
    backend: str,
    mask_BTS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention through SDPA (or the written-out reference).

    Without `mask_BTS` the mask is SDPA's `is_causal`, which is aligned top-left: right only when the
    query block starts at key 0. A KV cache passes an explicit bottom-right `mask_BTS` (True = attend).
    """
    if backend == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    N, H, K = q_BTNH.shape[2], q_BTNH.shape[3], k_BSKH.shape[2]
    pinned = _PINNED.get(backend)
    if pinned is None and backend != "sdpa":  # e.g. a name set on model.attn_backend after construction
        check_backend_name("torch", backend)
    if pinned is not None:
        unmet = torch_pinned_unmet(backend, q_BTNH.device.type, str(q_BTNH.dtype)[6:], H, mask_BTS is not None)
        if unmet:
            raise BackendUnavailableError(f"torch attention backend {backend!r} cannot run: {'; '.join(unmet)}")
    # SDPA wants heads before time: (B, N, T, H).
    q, k, v = (t.transpose(1, 2) for t in (q_BTNH, k_BSKH, v_BSKH))
    attn_mask = None if mask_BTS is None else mask_BTS[:, None]
    try:
        with sdpa_kernel(pinned) if pinned is not None else nullcontext():
            out_BNTH = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=mask_BTS is None, scale=1.0 / math.sqrt(H), enable_gqa=K != N
            )
    except RuntimeError as e:
        if pinned is None:
            raise
        raise BackendUnavailableError(
            f"torch attention backend {backend!r} cannot run for device={q.device.type}, dtype={q.dtype}, "
            f"head_dim={H}, heads={N}/{K}, mask={'yes' if mask_BTS is not None else 'causal'}: {str(e).splitlines()[0]}"
        ) from e
    return out_BNTH.transpose(1, 2)


def cached_attention(
    q_BTNH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor, *, backend: str, mask_BTS: torch.Tensor | None
) -> torch.Tensor:
    """Attention over the heads-major KV cache, (B, K, S, H): SDPA's own (B, heads, S, H) layout, so
    the (B, S, K, H) view handed to `attention` turns back into it without a copy.

    `mask_BTS` None: the T queries sit at positions 0..T-1 in every row (a prefill from the start), so plain
    causal attention over the cache's first T keys is the same arithmetic, and SDPA may pick FlashAttention,
    which takes no mask."""
    if mask_BTS is None:
        T = q_BTNH.shape[1]
        k_BKSH, v_BKSH = k_BKSH[:, :, :T], v_BKSH[:, :, :T]
    return attention(q_BTNH, k_BKSH.transpose(1, 2), v_BKSH.transpose(1, 2), backend=backend, mask_BTS=mask_BTS)


class KVCache(nn.Module):
    """Static KV cache of one layer, heads-major (B, K, S, H), preallocated and written in place.

    Each row writes at its own positions, so ragged batches need no shifting. Capacity is checked
    by the caller (GPT.forward and generate) before anything is written."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype, device=None):
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
        # Index tensors split by a slice put their (B, T) axes first: the target is (B, T, K, H), as given.
        self.k[rows_B1, :, pos_BT] = k_BTKH
        self.v[rows_B1, :, pos_BT] = v_BTKH
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.kv_cache: KVCache | None = None
        self.wq = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.wk = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wv = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wo = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
        pos_BT: torch.Tensor,
        mask_BTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
            out_BTNH = cached_attention(q_BTNH, k_BKSH, v_BKSH, backend=backend, mask_BTS=mask_BTS)
        return self.wo(out_BTNH.reshape(B, T, self.n_head * self.head_dim))


# ----------------------------------------------------------------------------- mlp


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU is the tanh approximation; torch's default is the exact erf form.
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

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

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
        pos_BT: torch.Tensor,
        mask_BTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, backend, pos_BT, mask_BTS)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class GPT(nn.Module):
    """The modernised GPT-2. `attn_backend` is a run-time choice: one of gptmod.backends.TORCH_BACKENDS."""

    def __init__(self, cfg: ModelConfig, attn_backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.attn_backend = check_backend_name("torch", attn_backend)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std); residual projections scaled by 1/sqrt(2 n_layer) (GPT-2); norms 1, biases 0."""
        std, resid_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            elif p.ndim == 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Preallocate a static KV cache in every layer (max_len defaults to cfg.max_seq_len)."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        check_cache_shape(batch, max_len, self.cfg)
        p = self.tok_emb.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, max_len, self.cfg.n_kv_head, self.cfg.head_dim, p.dtype, p.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def check_input(self, idx_BT: torch.Tensor, pos_BT: torch.Tensor | None) -> None:
        """Token ids, length and positions are checked up front: a bad id or a write past the cache
        must never reach the kernels (the JAX twin, which cannot check values under jit, NaNs them instead)."""
        if not isinstance(idx_BT, torch.Tensor):
            raise ValueError(f"idx: expected an int32/int64 (batch, time) tensor, got {type(idx_BT).__name__}")
        if idx_BT.ndim != 2 or idx_BT.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"idx: expected an int32/int64 (batch, time) tensor, got {idx_BT.dtype} {tuple(idx_BT.shape)}"
            )
        B, T = idx_BT.shape
        if B < 1:
            raise ValueError(f"idx: batch {B}: must be >= 1")
        if pos_BT is not None and (
            not isinstance(pos_BT, torch.Tensor) or pos_BT.dtype not in (torch.int32, torch.int64)
        ):
            kind = getattr(pos_BT, "dtype", type(pos_BT).__name__)
            raise ValueError(f"positions: expected an integer (batch, time) array, got {kind}")
        if not 1 <= T <= self.cfg.max_seq_len:
            raise ValueError(f"idx: sequence length {T} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        lo, hi = int(idx_BT.min()), int(idx_BT.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"idx: token id {bad} is out of range [0, vocab_size={self.cfg.vocab_size})")
        cache = self.blocks[0].attn.kv_cache
        if cache is None:
            if pos_BT is not None:
                raise ValueError("positions: only meaningful with a KV cache (call setup_cache first)")
            return
        if pos_BT is None or pos_BT.shape != idx_BT.shape:
            raise ValueError(
                f"positions: with a KV cache, pass (batch, time) positions shaped like idx {tuple(idx_BT.shape)}"
            )
        if idx_BT.shape[0] != cache.k.shape[0]:
            raise ValueError(f"idx: batch {idx_BT.shape[0]} does not match the KV cache batch {cache.k.shape[0]}")
        if int(pos_BT.min()) < 0 or int(pos_BT.max()) >= cache.capacity:
            raise ValueError(
                f"positions: {int(pos_BT.min())}..{int(pos_BT.max())} exceed the KV cache capacity {cache.capacity}"
            )

    def forward(self, idx_BT: torch.Tensor, positions_BT: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits (B, T, V) in fp32 (fp64 for a float64 model); with `return_hidden`, also the
        residual stream after the embedding and after each block (n_layer + 1 tensors).

        Without a KV cache, positions are 0..T-1. With one (`setup_cache`), `positions_BT` says where
        each token sits; each row may be at a different offset (ragged batches)."""
        if not torch.compiler.is_compiling():
            self.check_input(idx_BT, positions_BT)
        x_BTD, hidden = self.trunk(idx_BT, positions_BT)
        logits_BTV = self.head(x_BTD)
        return (logits_BTV, hidden) if return_hidden else logits_BTV

    def embed(self, idx_BT: torch.Tensor, positions_BT: torch.Tensor | None) -> tuple:
        """The embedded tokens and what every block takes with them: (x_BTD, rope, positions_BT, mask_BTS);
        rope is None for learned positions. mask_BTS is None when the block starts at key 0 in every row
        (`positions_BT` None, with or without a KV cache): SDPA's top-left is_causal is then right."""
        cache = self.blocks[0].attn.kv_cache
        mask_BTS = None
        if positions_BT is None:
            positions_BT = torch.arange(idx_BT.shape[1], device=idx_BT.device)[None].expand_as(idx_BT)
        elif cache is not None:  # bottom-right causal over the cache: key s is visible from position p iff s <= p
            mask_BTS = torch.arange(cache.capacity, device=idx_BT.device) <= positions_BT[..., None]
        x_BTD = self.tok_emb(idx_BT)
        rope = None
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(positions_BT)
        else:
            rope = rope_cos_sin(positions_BT, self.cfg, x_BTD.dtype)
        return x_BTD, rope, positions_BT, mask_BTS

    def trunk(self, idx_BT: torch.Tensor, positions_BT: torch.Tensor | None) -> tuple[torch.Tensor, list]:
        """Embedding and blocks: the residual stream before the final norm (and each layer's)."""
        x_BTD, rope, positions_BT, mask_BTS = self.embed(idx_BT, positions_BT)
        hidden = [x_BTD]
        for block in self.blocks:
            x_BTD = block(x_BTD, rope, self.attn_backend, positions_BT, mask_BTS)
            hidden.append(x_BTD)
        return x_BTD, hidden

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding (tied or not) and soft-cap, in fp32; any leading shape."""
        x_BTD = self.norm(x_BTD)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits_BTV = linear(x_BTD, head).to(compute_dtype(x_BTD.dtype))
        cap = self.cfg.logit_softcap
        return logits_BTV if cap is None else cap * torch.tanh(logits_BTV / cap)


# ----------------------------------------------------------------------------- canonical state


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16; ml_dtypes' is bit-compatible
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()  # a snapshot: a view would change under the optimizer's in-place updates


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. a view of a JAX array; torch.from_numpy wants to own writable memory
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def export_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Canonical state: `state_dict()` keys as they are, (out, in) weights, the model's own dtype; a copy."""
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
