"""The checks of a forward call's inputs, shared by both twins' `GPT`.

Token ids, length and positions are checked before anything is computed: a bad id would gather
another token's row (a negative one wraps) and a write past the KV cache would land on a real entry
(torch) or be dropped (JAX). Framework-free: each twin says what an integer array is for it and
whether the values are known (under `jax.jit` they are not: the JAX twin then turns a bad id or
position into NaN logits instead, see `gptmod_jax.model.GPT.embed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gptmod.config import ModelConfig


def check_input(
    cfg: ModelConfig,
    idx_BT: Any,
    pos_BT: Any | None,
    cache: tuple[int, int] | None,
    *,
    is_array: Callable[[Any], bool],
    is_integer: Callable[[Any], bool],
    expected: str,
    values_known: bool = True,
) -> None:
    """Raise ValueError naming the argument, its value and the rule.

    `cache` is (batch, capacity) of the model's KV cache, or None without one; `is_array` and
    `is_integer` say what the twin accepts, `expected` names it in the message ("an integer
    (batch, time) ... array")."""
    if not is_array(idx_BT):
        raise ValueError(f"idx: expected {expected}, got {type(idx_BT).__name__}")
    if idx_BT.ndim != 2 or not is_integer(idx_BT):
        shape = tuple(idx_BT.shape)
        raise ValueError(f"idx: expected {expected}, got {idx_BT.dtype} {shape}")
    B, T = idx_BT.shape
    if B < 1:
        raise ValueError(f"idx: batch {B}: must be >= 1")
    if pos_BT is not None and not (is_array(pos_BT) and is_integer(pos_BT)):
        kind = getattr(pos_BT, "dtype", type(pos_BT).__name__)
        raise ValueError(f"positions: expected an integer (batch, time) array, got {kind}")
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"idx: sequence length {T} must be in [1, max_seq_len={cfg.max_seq_len}]")
    if cache is None and pos_BT is not None:
        raise ValueError("positions: only meaningful with a KV cache (call setup_cache first)")
    if cache is not None:
        if pos_BT is None or tuple(pos_BT.shape) != tuple(idx_BT.shape):
            raise ValueError(
                "positions: with a KV cache, pass (batch, time) positions shaped like "
                f"idx {tuple(idx_BT.shape)}"
            )
        if cache[0] != B:
            raise ValueError(f"idx: batch {B} does not match the KV cache batch {cache[0]}")
    if not values_known:
        return
    lo, hi = int(idx_BT.min()), int(idx_BT.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"idx: token id {bad} is out of range [0, vocab_size={cfg.vocab_size})")
    if cache is not None:
        p_lo, p_hi = int(pos_BT.min()), int(pos_BT.max())
        if p_lo < 0 or p_hi >= cache[1]:
            raise ValueError(f"positions: {p_lo}..{p_hi} exceed the KV cache capacity {cache[1]}")
