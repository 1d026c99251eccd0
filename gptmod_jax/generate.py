"""Generation in JAX: the twin of gptmod_torch/generate.py.

`generate` is one jitted function over pure state: `nnx.split` hands it the parameters, it builds
the static KV cache inside (so there is nothing to copy in), prefills the prompts in one pass, runs
a `lax.while_loop` of decode steps with sampling, and stops early once every row has emitted eos.
Prompt and new-token lengths are padded to power-of-two buckets, so a new length recompiles only
when it crosses into a new bucket. `generate_stream` yields token by token for streaming: the same
`decode_step`, jitted on its own with the cache donated, so each step updates the cache in place.
`eos_id` may be several stop ids (Llama 3 has three). `Session` keeps one conversation's KV cache
across calls (chat): each call prefills only what the cache does not already hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptmod.sampling import (
    Flags,
    Plan,
    SamplingParams,
    StopIds,
    bucket,
    check_request,
    check_session_len,
    check_turn,
    common_prefix,
    padded_prompts,
    plan,
    session_capacity,
    trim,
)
from gptmod.sampling import stop_ids as as_stop_ids  # `stop_ids` is Session.stream's argument
from gptmod_jax.model import GPT
from gptmod_jax.scan import ScannedLayers, cache_state

# ----------------------------------------------------------------------------- sampling


class Knobs(NamedTuple):
    """Sampling values as traced scalars: changing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    # (E,) int32, padded with -1: a new set of stop ids of the same size never recompiles
    eos_ids: jax.Array


def _split_params(params: SamplingParams) -> tuple[Knobs, Flags]:
    t, k, p, m, eos = params.knob_values()
    knobs = Knobs(
        jnp.float32(t), jnp.int32(k), jnp.float32(p), jnp.float32(m), jnp.asarray(eos, jnp.int32)
    )
    return knobs, params.flags()


def is_stop(tok_B: jax.Array, knobs: Knobs, flags: Flags) -> jax.Array:
    """Whether each row's token is one of the stop ids, (B,) bool (all False without stop ids)."""
    return jnp.any(tok_B[:, None] == knobs.eos_ids[None], axis=-1) & flags.eos


def filter_logits(logits_BV: jax.Array, knobs: Knobs, flags: Flags) -> jax.Array:
    """Temperature, then top-k, top-p and min-p as thresholds (ties kept),
    in fp32; disallowed -> -inf.
    The same arithmetic as the torch twin, so both allow the very same tokens."""
    # The maximum subtracted first: the top logit is then 0 and no temperature can overflow the
    # others to inf (a tiny T sends them to -inf, which is the argmax, T's limit; see
    # gptmod.sampling.GREEDY_BELOW).
    x_BV = logits_BV.astype(jnp.float32)
    x_BV = (x_BV - x_BV.max(axis=-1, keepdims=True)) / knobs.temperature
    if flags.top_k:
        sorted_BV = -jnp.sort(-x_BV, axis=-1)
        kth_B1 = jnp.take_along_axis(
            sorted_BV, jnp.broadcast_to(knobs.top_k - 1, (x_BV.shape[0], 1)), axis=-1
        )
        x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
    if flags.top_p:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        sorted_BV = -jnp.sort(-probs_BV, axis=-1)
        mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
        cutoff_B1 = jnp.min(
            jnp.where(mass_before_BV < knobs.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True
        )
        x_BV = jnp.where(probs_BV >= cutoff_B1, x_BV, -jnp.inf)
    if flags.min_p:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        x_BV = jnp.where(probs_BV >= knobs.min_p * probs_BV.max(-1, keepdims=True), x_BV, -jnp.inf)
    return x_BV


def argmax(logits_BV: jax.Array) -> jax.Array:
    """`jnp.argmax` over the vocabulary (first maximum; a NaN counts as the maximum, as there), as
    two plain reductions: XLA's CPU argmax is a paired (value, index) reduction, 3x slower (1.0
    against 0.34 ms a decode step at batch 8)."""
    max_B1 = logits_BV.max(axis=-1, keepdims=True)  # NaN if the row has one
    hit_BV = (logits_BV == max_B1) | jnp.isnan(logits_BV)
    return jnp.min(
        jnp.where(hit_BV, jnp.arange(logits_BV.shape[-1], dtype=jnp.int32), logits_BV.shape[-1]),
        axis=-1,
    )


def sample(logits_BV: jax.Array, key: jax.Array, knobs: Knobs, flags: Flags) -> jax.Array:
    if flags.greedy:
        return argmax(logits_BV)
    return jax.random.categorical(key, filter_logits(logits_BV, knobs, flags), axis=-1).astype(
        jnp.int32
    )


# ----------------------------------------------------------------------------- prefill and decode


def prefill(
    model: GPT, tokens_BP: jax.Array, lens_B: jax.Array, start_B: jax.Array | None = None
) -> jax.Array:
    """All prompts in one pass (right-padded), each row's tokens at positions start..start+P-1
    (start 0 by default; a Session passes where its cache ends). Logits of each row's last real
    token, (B, V)."""
    # None: every row from key 0, causal attention without a mask, which cuDNN takes as is
    positions_BP = None
    if start_B is not None:
        positions_BP = jnp.arange(tokens_BP.shape[1])[None] + start_B[:, None]
    x_BPD, _ = model.trunk(tokens_BP, positions_BP)
    return model.head(x_BPD[jnp.arange(tokens_BP.shape[0]), lens_B - 1])


def decode_one_token(model: GPT, tok_B: jax.Array, pos_B: jax.Array) -> jax.Array:
    """One token per row at its own position; the cache supplies the past. Logits (B, V)."""
    x_B1D, _ = model.trunk(tok_B[:, None], pos_B[:, None])
    return model.head(x_B1D[:, 0])


def decode_step(
    model: GPT, tok_B: jax.Array, pos_B: jax.Array, key: jax.Array, knobs: Knobs, flags: Flags
) -> tuple[jax.Array, jax.Array]:
    """The decode loop's body, shared by `generate` (inside its `while_loop`), `generate_stream`
    and Session (each step jitted): feed the last tokens, sample the next. (tokens, next key)."""
    key, sub = jax.random.split(key)
    return sample(decode_one_token(model, tok_B, pos_B), sub, knobs, flags), key


# ----------------------------------------------------------------------------- generate


class _Loop(NamedTuple):
    """What the decode loop carries from step to step."""

    i: jax.Array  # number of tokens generated so far
    tok_B: jax.Array
    done_B: jax.Array
    out_BM: jax.Array
    cache: nnx.State
    key: jax.Array


@partial(jax.jit, static_argnames=("graphdef", "plan", "flags", "scan_layers"))
def _generate(
    graphdef,
    params,
    tokens_BP,
    lens_B,
    live_B,
    max_new,
    knobs: Knobs,
    key,
    *,
    plan: Plan,
    flags: Flags,
    scan_layers: bool = False,
):
    model = nnx.merge(graphdef, params)
    # allocated inside the jit: nothing to transfer or donate
    model.setup_cache(plan.rows, plan.cache_len)
    net = ScannedLayers(model) if scan_layers else model
    key, sub = jax.random.split(key)
    tok_B = sample(prefill(net, tokens_BP, lens_B), sub, knobs, flags)
    cache, with_cache = cache_state(net)
    out_BM = jnp.zeros((plan.rows, plan.new_len), jnp.int32).at[:, 0].set(tok_B)
    done_B = is_stop(tok_B, knobs, flags) | ~live_B  # padding rows are done from the start

    def cond(s: _Loop) -> jax.Array:
        return (s.i < max_new) & ~jnp.all(s.done_B)

    def body(s: _Loop) -> _Loop:
        step_net = with_cache(s.cache)
        pos_B = lens_B + s.i - 1  # where the last generated token sits
        tok_B, key = decode_step(step_net, s.tok_B, pos_B, s.key, knobs, flags)
        done_B = s.done_B | is_stop(tok_B, knobs, flags)
        out_BM = s.out_BM.at[:, s.i].set(tok_B)
        return _Loop(s.i + 1, tok_B, done_B, out_BM, cache_state(step_net)[0], key)

    final = jax.lax.while_loop(cond, body, _Loop(jnp.int32(1), tok_B, done_B, out_BM, cache, key))
    return final.out_BM, final.i


def _prepare(model: GPT, prompts, max_new_tokens: int, params: SamplingParams):
    if model.blocks[0].attn.kv_cache is not None:
        raise ValueError(
            "generate: the model already holds a KV cache; call model.clear_cache() first"
        )
    prompts = check_request(prompts, model.cfg, max_new_tokens, params)
    p = plan(prompts, max_new_tokens, model.cfg)
    tokens_BP, lens_B, live_B = padded_prompts(prompts, p)
    return p, jnp.asarray(tokens_BP), jnp.asarray(lens_B), live_B


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_id: StopIds = None,
    seed: int = 0,
    scan_layers: bool = False,
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at its first stop id inclusive when one is emitted
    (`eos_id`: an int, a sequence of ints such as Llama 3's three, or None).
    `scan_layers=True` runs the blocks under `lax.scan` (gptmod_jax/scan.py): the same tokens,
    compiled once per block instead of once per layer (JAX only: torch has no compile step that
    grows with depth this way)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    p, tokens_BP, lens_B, live_B = _prepare(model, prompts, max_new_tokens, params)
    knobs, flags = _split_params(params)
    graphdef, state = nnx.split(model, nnx.Param)
    # The static plan holds only the rows run (not the real batch), so batch
    # sizes in one bucket share a program.
    out_BM, n = _generate(
        graphdef,
        state,
        tokens_BP,
        lens_B,
        jnp.asarray(live_B),
        jnp.int32(max_new_tokens),
        knobs,
        jax.random.key(seed),
        plan=dataclasses.replace(p, batch=p.rows),
        flags=flags,
        scan_layers=bool(scan_layers),
    )
    n = int(n)
    return trim(np.asarray(out_BM)[: p.batch], [n] * p.batch, eos_id)


# ----------------------------------------------------------------------------- generate_stream


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _prefill_step(graphdef, params, cache, tokens_BP, lens_B, knobs: Knobs, key, *, flags: Flags):
    model = nnx.merge(graphdef, params, cache)
    key, sub = jax.random.split(key)
    tok_B = sample(prefill(model, tokens_BP, lens_B), sub, knobs, flags)
    return tok_B, nnx.state(model, nnx.Cache), key


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _decode_step(graphdef, params, cache, tok_B, pos_B, knobs: Knobs, key, *, flags: Flags):
    """`decode_step` jitted on its own, the cache donated (XLA updates it in place)."""
    model = nnx.merge(graphdef, params, cache)
    tok_B, key = decode_step(model, tok_B, pos_B, key, knobs, flags)
    return tok_B, nnx.state(model, nnx.Cache), key


def generate_stream(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_id: StopIds = None,
    seed: int = 0,
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    The same seed gives the same tokens as `generate`: the same `decode_step`, jitted per step
    instead of inside one `while_loop`. The cache is donated to each jitted step, so XLA updates
    it in place instead of copying it every token."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    p, tokens_BP, lens_B, live_B = _prepare(model, prompts, max_new_tokens, params)
    knobs, flags = _split_params(params)
    model.setup_cache(p.rows, p.cache_len)
    try:
        graphdef, state, cache = nnx.split(model, nnx.Param, nnx.Cache)
    finally:
        model.clear_cache()  # the caller's model is left as it was
    key = jax.random.key(seed)
    tok_B, cache, key = _prefill_step(
        graphdef, state, cache, tokens_BP, lens_B, knobs, key, flags=flags
    )
    done = ~live_B  # padding rows: done from the start, never yielded
    for i in range(max_new_tokens):
        if i > 0:
            pos_B = lens_B + i - 1
            tok_B, cache, key = _decode_step(
                graphdef, state, cache, tok_B, pos_B, knobs, key, flags=flags
            )
        toks = np.asarray(tok_B)
        yield [None if d else int(t) for t, d in zip(toks[: p.batch], done[: p.batch], strict=True)]
        if flags.eos:
            done |= np.isin(toks, params.eos_ids)
            if done.all():
                return


# ----------------------------------------------------------------------------- session


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _extend_step(
    graphdef, params, cache, tokens_BT, lens_B, start_B, knobs: Knobs, key, *, flags: Flags
):
    """A Session's prefill of the new part of its context; the logits too, for Session.feed."""
    model = nnx.merge(graphdef, params, cache)
    key, sub = jax.random.split(key)
    logits_BV = prefill(model, tokens_BT, lens_B, start_B)
    return logits_BV, sample(logits_BV, sub, knobs, flags), nnx.state(model, nnx.Cache), key


class Session:
    """A conversation that keeps its KV cache across calls (batch 1); the
    twin of gptmod_torch's Session.

    Each `stream` gets the whole context so far as token ids, reuses the longest
    prefix of it that the cache already holds, prefills only the rest (rewinding first
    where they diverge), and appends each token it generates once that token is fed
    back. `tokens` is what the cache holds, in order; `last_prefill` and `last_reused`
    say how the last call's context split between new and cached tokens.

    Rewinding is free: entries past len(tokens) stay in the cache, but key s
    is visible from position p only when s <= p, and every position is
    written by a real token before any later query can see it.

    Capacity: up to `max_len` positions (default cfg.max_seq_len), allocated
    lazily in powers of two from SESSION_MIN_CAPACITY and grown by copying,
    so an 8192-context model does not preallocate its whole cache.
    A turn that would not fit raises ContextFullError: nothing is truncated.

    The cache is the session's, pure state outside the model and donated to each
    jitted step (so it is updated in place); the model stays free for `generate`
    between turns. The new part of a context is padded to a power-of-two bucket,
    so its lengths reuse compilations (one per bucket and cache size)."""

    def __init__(self, model: GPT, max_len: int | None = None):
        self.model = model
        self.max_len = check_session_len(max_len, model.cfg)
        self.tokens: list[int] = []
        self.last_prefill = 0
        self.last_reused = 0
        self._graphdef = (
            None  # of the model with a cache: what the jitted steps merge the cache into
        )
        self._cache: nnx.State | None = None
        self._capacity = 0

    @property
    def capacity(self) -> int:
        """Positions allocated now (0 before the first call)."""
        return 0 if self._cache is None else self._capacity

    def reset(self) -> None:
        """Forget the conversation and free the cache."""
        self.tokens, self._graphdef, self._cache = [], None, None
        self.last_prefill = self.last_reused = 0

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold `ids` (reusing what it already holds); the
        next token's logits, (V,)."""
        ids = check_turn(ids, self.model.cfg, self.max_len, 0)
        knobs, flags = _split_params(SamplingParams())
        logits_1V, _, _ = self._extend(ids, 0, knobs, flags, jax.random.key(0))
        return np.asarray(logits_1V[0])

    def stream(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        stop_ids: StopIds = (),
        seed: int = 0,
    ) -> Iterator[int]:
        """Make the context `ids` (the whole conversation so far), then yield up to `max_new_tokens`
        sampled tokens; a token in `stop_ids` is yielded and ends the reply. Validated now, run as
        it is iterated; abandoning the iterator leaves the session consistent (the unfed last token
        is simply not cached)."""
        params = SamplingParams(
            temperature, top_k, top_p, min_p, as_stop_ids(stop_ids, "stop_ids"), seed
        )
        ids = check_turn(ids, self.model.cfg, self.max_len, max_new_tokens, params)
        return self._stream(ids, max_new_tokens, params)

    def _stream(self, ids: list[int], max_new_tokens: int, params: SamplingParams) -> Iterator[int]:
        knobs, flags = _split_params(params)
        _, tok_1, key = self._extend(ids, max_new_tokens, knobs, flags, jax.random.key(params.seed))
        state = nnx.state(self.model, nnx.Param)
        stops, tok = set(params.eos_ids), int(tok_1[0])
        for i in range(max_new_tokens):
            if i > 0:  # feed the token yielded last, at the next position
                pos_1 = np.array([len(self.tokens)], np.int32)
                tok_1, self._cache, key = _decode_step(
                    self._graphdef, state, self._cache, tok_1, pos_1, knobs, key, flags=flags
                )
                self.tokens.append(tok)
                tok = int(tok_1[0])
            yield tok
            if tok in stops:
                return

    def _extend(self, ids: list[int], room: int, knobs: Knobs, flags: Flags, key: jax.Array):
        """Make the cache hold `ids` with `room` positions to spare;
        (logits, first sampled token, key) after it."""
        if self._cache is not None and any(x.is_deleted() for x in jax.tree.leaves(self._cache)):
            # An interrupted step (Ctrl-C) had taken the donated cache with
            # it: start again from an empty one.
            self.reset()
        # At least the last token is prefilled, even when the cache holds
        # all of `ids`: its logits are the answer.
        reuse = min(common_prefix(self.tokens, ids), len(ids) - 1)
        self._reserve(len(ids) + room)
        new = ids[reuse:]
        # The new part is padded to a bucket (new lengths then reuse compilations) and the padding
        # is written to the cache at positions len(ids)..reuse+T-1, past every real token: no real
        # query sees it (key s is visible from p iff s <= p), and each of those positions is
        # overwritten by the token fed there before any query at or after it runs. T stops at the
        # capacity, so no write can fall off the end (JAX would drop it silently).
        T = min(bucket(len(new), self.max_len), self.capacity - reuse)
        tokens_1T = np.zeros((1, T), np.int32)
        tokens_1T[0, : len(new)] = new
        # rewind: what lies past it is invisible until overwritten
        self.tokens = self.tokens[:reuse]
        logits_1V, tok_1, self._cache, key = _extend_step(
            self._graphdef,
            nnx.state(self.model, nnx.Param),
            self._cache,
            tokens_1T,
            np.array([len(new)], np.int32),
            np.array([reuse], np.int32),
            knobs,
            key,
            flags=flags,
        )
        self.tokens = list(ids)
        self.last_prefill, self.last_reused = len(new), reuse
        return logits_1V, tok_1, key

    def _reserve(self, needed: int) -> None:
        """Grow the cache (copying what it holds) to hold `needed`
        positions; check_turn bounded it by max_len."""
        if needed <= self.capacity:
            return
        if self.model.blocks[0].attn.kv_cache is not None:
            raise ValueError(
                "Session: the model already holds a KV cache (setup_cache); call "
                "model.clear_cache() first"
            )
        capacity = session_capacity(needed, self.max_len)
        self.model.setup_cache(1, capacity)
        try:
            graphdef, _, cache = nnx.split(self.model, nnx.Param, nnx.Cache)
        finally:
            self.model.clear_cache()  # the caller's model is left as it was
        # the same layouts, shorter along the sequence axis: copy into the corner
        if self._cache is not None:
            cache = jax.tree.map(
                lambda new, old: jax.lax.dynamic_update_slice(new, old, (0,) * old.ndim),
                cache,
                self._cache,
            )
        self._graphdef, self._cache, self._capacity = graphdef, cache, capacity
