"""The scaling table's recompute baseline: greedy decoding without a KV cache, the bench's own loop
for both twins. Every step runs the model's whole forward over the context so far and takes the
argmax at the last real position: O(T) work per token, where the cached decode step is O(1).

The context is right-padded to the length the twins' generate would give the call's KV cache (its
power-of-two buckets, `gptmod.sampling.plan`), so one call is one compiled program (JAX jit, or
torch.compile with static shapes) and a step recomputes as many positions as the cache would hold;
the causal mask keeps the padding after the last real token out of its logits. The prompts are
equal-length rows (the bench's are), so every row's last real position is the same."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from gptmod.sampling import plan


def padded_len(cfg: Any, prompt_len: int, new_tokens: int) -> int:
    """The context length a call recomputes every step: the twins' KV-cache length for it."""
    return plan([[0] * prompt_len], new_tokens, cfg).cache_len


@functools.cache
def _jax_next_token() -> Callable:
    """The jitted step (built on first use, so importing the bench needs no JAX): the argmax of the
    logits at `last` over the whole padded context, and the context with that token written after
    it. Traced once per (batch, padded length): `last` is an argument, not a constant."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnames="graphdef")
    def step(graphdef: Any, params: Any, tokens_BS: jax.Array, last: jax.Array) -> tuple:
        model = nnx.merge(graphdef, params)
        x_BSD, _ = model.trunk(tokens_BS, None)
        tok_B = jnp.argmax(model.head(x_BSD[:, last]), axis=-1).astype(jnp.int32)
        return tok_B, tokens_BS.at[:, last + 1].set(tok_B, mode="drop")

    return step


def jax_recompute(model: Any, prompts_BP: np.ndarray, n: int) -> list[list[int]]:
    """`n` greedy tokens per row of `prompts_BP` from the JAX twin, the context recomputed every
    step. Host lists: the device work is done when it returns."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    step = _jax_next_token()
    batch, prompt_len = prompts_BP.shape
    graphdef, params = nnx.split(model, nnx.Param)
    tokens_BS = (
        jnp.zeros((batch, padded_len(model.cfg, prompt_len, n)), jnp.int32)
        .at[:, :prompt_len]
        .set(jnp.asarray(prompts_BP, jnp.int32))
    )
    # committed where the weights are, as the step's own outputs are: an uncommitted first context
    # would be a second compile of the same step
    tokens_BS = jax.device_put(tokens_BS, jax.tree.leaves(params)[0].sharding)
    out = []
    for i in range(n):
        tok_B, tokens_BS = step(graphdef, params, tokens_BS, jnp.int32(prompt_len + i - 1))
        out.append(tok_B)
    return np.stack([np.asarray(t) for t in out], axis=1).tolist()


def _torch_last_token(model: Any, tokens_BS: Any, last_B: Any) -> Any:
    """The argmax of the logits at each row's `last_B` over the whole padded context."""
    import torch

    x_BSD, _ = model.trunk(tokens_BS, None)
    rows_B = torch.arange(tokens_BS.shape[0], device=tokens_BS.device)
    return model.head(x_BSD[rows_B, last_B]).argmax(dim=-1)


@functools.cache
def _torch_step(compile: bool) -> Callable:
    """The step, eager or torch.compile'd (static shapes: one graph per (batch, padded length);
    `last_B` is a tensor, so a new position is new data, not a recompile)."""
    import torch

    if not compile:
        return _torch_last_token
    return torch.compile(_torch_last_token, fullgraph=True, dynamic=False)


def torch_recompute(
    model: Any, prompts_BP: np.ndarray, n: int, compile: bool = False
) -> list[list[int]]:
    """`n` greedy tokens per row of `prompts_BP` from the torch twin, the context recomputed every
    step, eager or with the step torch.compile'd."""
    import torch

    step = _torch_step(compile)
    device = model.tok_emb.weight.device
    batch, prompt_len = prompts_BP.shape
    tokens_BS = torch.zeros(
        (batch, padded_len(model.cfg, prompt_len, n)), dtype=torch.long, device=device
    )
    tokens_BS[:, :prompt_len] = torch.from_numpy(np.asarray(prompts_BP, np.int64)).to(device)
    out = []
    with torch.no_grad():
        for i in range(n):
            last_B = torch.full((batch,), prompt_len + i - 1, dtype=torch.long, device=device)
            tok_B = step(model, tokens_BS, last_B)
            out.append(tok_B)
            if i + 1 < n:
                tokens_BS[:, prompt_len + i] = tok_B
    return torch.stack(out, dim=1).cpu().tolist()
