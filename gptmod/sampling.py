"""Generation settings shared by both twins: sampling options, prompt checks and shape planning.

Framework-free: gptmod_torch.generate and gptmod_jax.generate validate through the same code, so
a bad value is refused with the same message in both, before anything is traced or allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gptmod.config import ModelConfig

MIN_BUCKET = 16


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. Filters apply in this order, on fp32 logits: temperature, top-k
    (keep logits >= the k-th largest, ties kept), top-p (keep the smallest set of most likely tokens
    whose mass reaches p, ties at the cut kept), min-p (keep p >= min_p * max p)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    eos_id: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r}: must be a finite number >= 0 (0 means greedy)")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k={self.top_k!r}: must be an int >= 1, or None for no top-k")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1], or None for no top-p")
        if self.min_p is not None and not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1], or None for no min-p")
        if self.eos_id is not None and (isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int)):
            raise ValueError(f"eos_id={self.eos_id!r}: must be an int token id, or None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an int")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def flags(self) -> Flags:
        # top_p = 1 and min_p = 0 filter nothing; skipping them also keeps fp32 cumsum rounding out of it.
        return Flags(
            greedy=self.greedy,
            top_k=self.top_k is not None,
            top_p=self.top_p not in (None, 1.0),
            min_p=self.min_p not in (None, 0.0),
            eos=self.eos_id is not None,
        )

    def knob_values(self) -> tuple[float, int, float, float, int]:
        """(temperature, top_k, top_p, min_p, eos_id) with neutral values for the options that are off."""
        return (
            1.0 if self.greedy else float(self.temperature),
            self.top_k or 1,
            float(self.top_p or 1.0),
            float(self.min_p or 0.0),
            -1 if self.eos_id is None else self.eos_id,
        )


class Flags(NamedTuple):
    """Which sampling filters are on (static in JAX: they change the program)."""

    greedy: bool
    top_k: bool
    top_p: bool
    min_p: bool
    eos: bool


def _is_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_request(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, params: SamplingParams
) -> list[list[int]]:
    """Validate prompts (a list of token-id lists), the cache capacity they need and the sampling
    options against the model; return the prompts as int lists. Never clamps."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    if params.top_k is not None and params.top_k > cfg.vocab_size:
        raise ValueError(f"top_k={params.top_k}: must be <= vocab_size={cfg.vocab_size}")
    if params.eos_id is not None and not 0 <= params.eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id={params.eos_id}: out of range [0, vocab_size={cfg.vocab_size})")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {type(p).__name__}")
        ids = []
        for t in p:
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise ValueError(f"prompts[{i}]: token {t!r} is not an integer id")
            ids.append(int(t))
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} is out of range [0, vocab_size={cfg.vocab_size})")
        if len(ids) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} = "
                f"{len(ids) + max_new_tokens} exceeds the cache capacity max_seq_len={cfg.max_seq_len}"
            )
        out.append(ids)
    return out


def bucket(n: int, cap: int) -> int:
    """Next power of two >= n (at least MIN_BUCKET), capped at `cap`: new lengths reuse compilations."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@dataclass(frozen=True)
class Plan:
    """Static shapes of one generate call."""

    batch: int
    prompt_len: int  # padded prompt length (bucketed)
    new_len: int  # room for new tokens (bucketed)
    cache_len: int  # KV cache length


def plan(prompts: list[list[int]], max_new_tokens: int, cfg: ModelConfig) -> Plan:
    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest, cfg.max_seq_len)
    new_len = bucket(max_new_tokens, cfg.max_seq_len)
    # >= longest + max_new_tokens (checked by check_prompts) and >= prompt_len: no write can fall off the end.
    cache_len = min(cfg.max_seq_len, prompt_len + new_len)
    return Plan(len(prompts), prompt_len, new_len, cache_len)


def trim(rows: Sequence[Sequence[int]], counts: Sequence[int], eos_id: int | None) -> list[list[int]]:
    """The generated continuations, each cut after its first eos_id (inclusive) or after its count."""
    out = []
    for row, n in zip(rows, counts, strict=True):
        row = [int(t) for t in row[:n]]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out
