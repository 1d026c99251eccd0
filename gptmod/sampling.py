"""Generation settings shared by both twins: sampling options, prompt checks and shape planning.

Framework-free: gptmod_torch.generate and gptmod_jax.generate validate through the same code, so
a bad value is refused with the same message in both, before anything is traced or allocated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gptmod.config import ModelConfig

MIN_BUCKET = 16
STOP_BUCKET = (
    4  # stop ids travel as a fixed-size array padded with -1: up to 4 ids share one JAX program
)
SESSION_MIN_CAPACITY = 256  # a Session's first KV cache; it grows by doubling, up to its max_len
# Temperatures below the smallest normal fp32 number are greedy, their limit: the fp32 sampling
# arithmetic cannot hold them (XLA's CPU flushes subnormals to zero, so T would become 0 and 0/0
# NaN). Above it, filter_logits subtracts each row's maximum before dividing, so a tiny T sends
# every other logit to -inf, never to NaN.
GREEDY_BELOW = 2.0**-126  # 1.1754944e-38
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): JAX's key takes a signed 64-bit integer

StopIds = int | Sequence[int] | None


class IgnoredFiltersWarning(UserWarning):
    """top_k / top_p / min_p given with a greedy temperature: they change
    nothing (greedy takes the argmax)."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (so is any T below GREEDY_BELOW, its limit). Filters apply in this
    order, on fp32 logits: temperature, top-k (keep logits >= the k-th largest, ties kept), top-p
    (keep the smallest set of most likely tokens whose mass reaches p, ties at the cut kept), min-p
    (keep p >= min_p * max p)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    eos_id: StopIds = (
        None  # one stop id, several (Llama 3 has three), or None; kept as an int or a tuple
    )
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
        object.__setattr__(self, "eos_id", _check_stop_ids(self.eos_id))
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed={self.seed!r}: must be an int in [0, 2**63)")
        if self.greedy and (self.top_k, self.top_p, self.min_p) != (None, None, None):
            given = ", ".join(
                f"{k}={v}"
                for k, v in (("top_k", self.top_k), ("top_p", self.top_p), ("min_p", self.min_p))
                if v is not None
            )
            warnings.warn(
                f"{given} ignored: temperature={t} is greedy (argmax); set "
                "temperature > 0 to sample",
                IgnoredFiltersWarning,
                stacklevel=3,
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def flags(self) -> Flags:
        # top_p = 1 and min_p = 0 filter nothing; skipping them also keeps
        # fp32 cumsum rounding out of it.
        return Flags(
            greedy=self.greedy,
            top_k=self.top_k is not None,
            top_p=self.top_p not in (None, 1.0),
            min_p=self.min_p not in (None, 0.0),
            eos=len(self.eos_ids) > 0,
        )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The stop ids as a tuple (empty when there are none)."""
        return stop_ids(self.eos_id)

    def knob_values(self) -> tuple[float, int, float, float, tuple[int, ...]]:
        """(temperature, top_k, top_p, min_p, eos_ids) with neutral values
        for the options that are off;
        eos_ids padded with -1 (no token's id) to a multiple of STOP_BUCKET,
        so its size rarely changes."""
        ids = self.eos_ids
        size = STOP_BUCKET * max(1, -(-len(ids) // STOP_BUCKET))
        return (
            1.0 if self.greedy else float(self.temperature),
            self.top_k or 1,
            float(self.top_p or 1.0),
            float(self.min_p or 0.0),
            ids + (-1,) * (size - len(ids)),
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


def _is_int(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int)


def _is_id(x: object) -> bool:
    """An integer token id: a Python or NumPy int, never a bool or a float."""
    return not isinstance(x, bool) and hasattr(x, "__index__")


def _check_stop_ids(eos_id: object, name: str = "eos_id") -> StopIds:
    """eos_id as an int, a tuple of ints or None; anything else is refused
    with its position named."""
    if eos_id is None:
        return None
    if _is_id(eos_id):
        return int(eos_id)
    if isinstance(eos_id, (str, bytes)) or not isinstance(eos_id, Sequence):
        raise ValueError(f"{name}={eos_id!r}: must be an int token id, a sequence of them, or None")
    for i, t in enumerate(eos_id):
        if not _is_id(t):
            raise ValueError(f"{name}[{i}]={t!r}: must be an int token id")
    return tuple(int(t) for t in eos_id)


def stop_ids(eos_id: StopIds, name: str = "eos_id") -> tuple[int, ...]:
    """Stop ids (an int, a sequence of ints or None) as a tuple; validated as SamplingParams does,
    errors naming the argument `name`."""
    eos_id = _check_stop_ids(eos_id, name)
    return () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else eos_id


def check_request(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, params: SamplingParams
) -> list[list[int]]:
    """Validate prompts (a list of token-id lists), the cache capacity they need and the sampling
    options against the model; return the prompts as int lists. Never clamps."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    _check_against_model(params, cfg)
    out = []
    for i, p in enumerate(prompts):
        ids = _check_ids(p, f"prompts[{i}]", cfg)
        if len(ids) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} = "
                f"{len(ids) + max_new_tokens} exceeds the cache capacity "
                f"max_seq_len={cfg.max_seq_len}"
            )
        out.append(ids)
    return out


def _check_against_model(
    params: SamplingParams, cfg: ModelConfig, stop_name: str = "eos_id"
) -> None:
    """The sampling options that depend on the model: top_k and the stop ids
    against the vocabulary."""
    if params.top_k is not None and params.top_k > cfg.vocab_size:
        raise ValueError(f"top_k={params.top_k}: must be <= vocab_size={cfg.vocab_size}")
    for i, t in enumerate(params.eos_ids):
        if not 0 <= t < cfg.vocab_size:
            name = stop_name if isinstance(params.eos_id, int) else f"{stop_name}[{i}]"
            raise ValueError(f"{name}={t}: out of range [0, vocab_size={cfg.vocab_size})")


def _check_ids(p: object, name: str, cfg: ModelConfig) -> list[int]:
    """A non-empty sequence of in-vocabulary token ids, as an int list."""
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
        raise ValueError(f"{name}: expected a non-empty list of token ids, got {type(p).__name__}")
    ids = []
    for t in p:
        if not _is_id(t):
            raise ValueError(f"{name}: token {t!r} is not an integer id")
        ids.append(int(t))
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(
            f"{name}: token id {bad[0]} is out of range [0, vocab_size={cfg.vocab_size})"
        )
    return ids


def bucket(n: int, cap: int) -> int:
    """Next power of two >= n (at least MIN_BUCKET), capped at `cap`: new
    lengths reuse compilations."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def batch_bucket(n: int) -> int:
    """Next power of two >= n: the rows a generate call runs, so new batch
    sizes reuse compilations (JAX's jit, torch.compile) instead of compiling
    one program per size. The extra rows are padding, marked done from the
    start; rows never interact, so they cannot change the real rows' tokens."""
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """Static shapes of one generate call."""

    batch: int  # prompts: the real rows
    prompt_len: int  # padded prompt length (bucketed)
    new_len: int  # room for new tokens (bucketed)
    cache_len: int  # KV cache length
    rows: int = (
        0  # rows run (batch_bucket(batch)): the batch real ones, then padding; 0 means batch
    )

    def __post_init__(self) -> None:
        if self.rows == 0:
            object.__setattr__(self, "rows", self.batch)


def plan(prompts: list[list[int]], max_new_tokens: int, cfg: ModelConfig) -> Plan:
    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest, cfg.max_seq_len)
    new_len = bucket(max_new_tokens, cfg.max_seq_len)
    # >= longest + max_new_tokens (checked by check_prompts) and >=
    # prompt_len: no write can fall off the end.
    cache_len = min(cfg.max_seq_len, prompt_len + new_len)
    return Plan(len(prompts), prompt_len, new_len, cache_len, batch_bucket(len(prompts)))


def padded_prompts(prompts: list[list[int]], p: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (rows, prompt_len) int32 right-padded with 0, lengths (rows,), live (rows,) bool):
    the padding rows are a one-token prompt of id 0 and not live."""
    tokens_BP = np.zeros((p.rows, p.prompt_len), np.int32)
    for b, ids in enumerate(prompts):
        tokens_BP[b, : len(ids)] = ids
    lens_B = np.ones(p.rows, np.int32)
    lens_B[: p.batch] = [len(ids) for ids in prompts]
    return tokens_BP, lens_B, np.arange(p.rows) < p.batch


def check_cache_shape(batch: object, max_len: object, cfg: ModelConfig) -> None:
    """setup_cache's arguments, in both twins: batch an int >= 1, max_len an
    int in [1, max_seq_len]."""
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"cache batch={batch!r}: must be an int >= 1")
    if not _is_int(max_len) or not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"cache max_len={max_len!r}: must be in [1, max_seq_len={cfg.max_seq_len}], an int"
        )


def trim(rows: Sequence[Sequence[int]], counts: Sequence[int], eos_id: StopIds) -> list[list[int]]:
    """The generated continuations, each cut after its first stop id
    (inclusive) or after its count."""
    stops = set(stop_ids(eos_id))
    out = []
    for row, n in zip(rows, counts, strict=True):
        row = [int(t) for t in row[:n]]
        ends = [i for i, t in enumerate(row) if t in stops]
        out.append(row[: ends[0] + 1] if ends else row)
    return out


# ---------------------------------------------------------------------------- sessions (multi-turn)


class ContextFullError(ValueError):
    """A Session's conversation would not fit its KV cache (max_len): it is
    refused, never truncated."""


def check_session_len(max_len: int | None, cfg: ModelConfig) -> int:
    """A Session's capacity bound: max_len, or cfg.max_seq_len when None."""
    if max_len is None:
        return cfg.max_seq_len
    if not _is_int(max_len) or not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"max_len={max_len!r}: must be an int in [1, max_seq_len={cfg.max_seq_len}]"
        )
    return max_len


def check_turn(
    ids: Sequence[int],
    cfg: ModelConfig,
    max_len: int,
    max_new_tokens: int,
    params: SamplingParams | None = None,
) -> list[int]:
    """Validate one turn of a Session: the whole context `ids`, the room it
    needs and the sampling options. Without `params` (Session.feed: no
    sampling) max_new_tokens may be 0. Never truncates."""
    lo = 0 if params is None else 1
    if not _is_int(max_new_tokens) or max_new_tokens < lo:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= {lo}")
    if params is not None:
        _check_against_model(params, cfg, "stop_ids")
    ids = _check_ids(ids, "ids", cfg)
    if len(ids) + max_new_tokens > max_len:
        raise ContextFullError(
            f"the conversation's {len(ids)} tokens + max_new_tokens={max_new_tokens} = "
            f"{len(ids) + max_new_tokens} exceed the session's capacity max_len={max_len}; start "
            "a new session (reset) or lower max_new_tokens"
        )
    return ids


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one bounds it
        if x != y:
            break
        n += 1
    return n


def session_capacity(needed: int, max_len: int) -> int:
    """The KV cache length a Session allocates for `needed` positions: a power of two >= needed (at
    least SESSION_MIN_CAPACITY), capped at max_len. Growing lazily by doubling keeps an 8192-context
    model from preallocating its whole cache, and keeps JAX to one compilation per size."""
    return min(max_len, max(SESSION_MIN_CAPACITY, 1 << (needed - 1).bit_length()))
