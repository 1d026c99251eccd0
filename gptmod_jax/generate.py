"""Generation in JAX: the twin of gptmod_torch/generate.py.

`generate` is one jitted function over pure state: `nnx.split` hands it the parameters, it builds
the static KV cache inside (so there is nothing to copy in), prefills the prompts in one pass, runs
a `lax.while_loop` of decode steps with sampling, and stops early once every row has emitted eos.
Prompt and new-token lengths are padded to power-of-two buckets, so a new length recompiles only
when it crosses into a new bucket. `generate_stream` yields token by token for streaming; its decode
step is jitted with the cache donated, so each step updates the cache in place. `use_cache=False` is
the classic path without a cache, `recompute_logits` over the whole context every step, kept for
measuring what the cache saves.
`eos_id` may be several stop ids (Llama 3 has three). `Session` keeps one conversation's KV cache
across calls (chat): each call prefills only what the cache does not already hold.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
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
from gptmod_jax import sharding
from gptmod_jax.model import GPT


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


def prefill(
    model: GPT, tokens_BP: jax.Array, lens_B: jax.Array, start_B: jax.Array | None = None
) -> jax.Array:
    """All prompts in one pass (right-padded), each row's tokens at
    positions start..start+P-1 (start 0 by default; a Session passes where
    its cache ends). Logits of each row's last real token, (B, V)."""
    positions_BP = (
        None  # every row from key 0: causal attention without a mask, which cuDNN takes as is
    )
    if start_B is not None:
        positions_BP = jnp.arange(tokens_BP.shape[1])[None] + start_B[:, None]
    x_BPD, _ = model.trunk(tokens_BP, positions_BP)
    return model.head(x_BPD[jnp.arange(tokens_BP.shape[0]), lens_B - 1])


def decode_one_token(model: GPT, tok_B: jax.Array, pos_B: jax.Array) -> jax.Array:
    """One token per row at its own position; the cache supplies the past. Logits (B, V)."""
    x_B1D, _ = model.trunk(tok_B[:, None], pos_B[:, None])
    return model.head(x_B1D[:, 0])


def recompute_logits(model: GPT, tokens_BS: jax.Array, last_B: jax.Array) -> jax.Array:
    """The classic path without a KV cache: the whole context again, every step. Logits (B, V) at
    each row's last token; the causal mask keeps the padding after it out."""
    x_BSD, _ = model.trunk(tokens_BS, None)
    return model.head(x_BSD[jnp.arange(tokens_BS.shape[0]), last_B])


class ScannedLayers:
    """`model` with its blocks stacked into one state (leading axis: layer)
    that `lax.scan` runs through:
    XLA then compiles one block instead of n_layer copies, so compile time stops growing with depth
    (`python -m gptmod.bench` measures both). The price is the stacking, a copy of the block weights
    once per `generate` call, and with a cache, scan writing the stacked cache out anew every step.
    Stands in for the model in `prefill`, `decode_one_token` and `recompute_logits`: it has their
    `trunk` and `head`."""

    def __init__(self, model: GPT):
        # the same graph each
        splits = [nnx.split(block, nnx.Param, nnx.Cache) for block in model.blocks]
        stack = lambda *xs: jnp.stack(xs)
        self.model, self.block_graphdef = model, splits[0][0]
        self.params_L = jax.tree.map(stack, *[params for _, params, _ in splits])
        self.cache_L = jax.tree.map(stack, *[cache for _, _, cache in splits])

    def with_cache(self, cache_L: nnx.State) -> ScannedLayers:
        new = copy.copy(self)
        new.cache_L = cache_L
        return new

    def trunk(self, idx_BT: jax.Array, positions_BT: jax.Array | None) -> tuple[jax.Array, list]:
        x_BTD, inputs = self.model.embed(idx_BT, positions_BT)

        def layer(x_BTD: jax.Array, state: tuple) -> tuple[jax.Array, nnx.State]:
            block = nnx.merge(self.block_graphdef, *state)
            x_BTD = block(x_BTD, inputs)
            return sharding.constrain(x_BTD, ("batch", None, None)), nnx.state(block, nnx.Cache)

        x_BTD, self.cache_L = jax.lax.scan(layer, x_BTD, (self.params_L, self.cache_L))
        return x_BTD, []  # no per-layer hidden states: generation never asks for them

    def head(self, x_BTD: jax.Array) -> jax.Array:
        return self.model.head(x_BTD)


def _cache_state(net: GPT | ScannedLayers) -> tuple[nnx.State, Callable]:
    """The KV cache of `net` as pure state for a loop to carry, and how to
    rebuild `net` around a new one."""
    if isinstance(net, ScannedLayers):
        return net.cache_L, net.with_cache
    graphdef, params, cache = nnx.split(net, nnx.Param, nnx.Cache)
    return cache, lambda cache: nnx.merge(graphdef, params, cache)


class _Step(NamedTuple):
    i: jax.Array  # number of tokens generated so far
    tok_B: jax.Array
    done_B: jax.Array
    out_BM: jax.Array
    # the KV cache, or (use_cache=False) the (B, cache_len) token buffer
    context: nnx.State | jax.Array
    key: jax.Array


@partial(jax.jit, static_argnames=("graphdef", "plan", "flags", "use_cache", "scan_layers"))
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
    use_cache: bool = True,
    scan_layers: bool = False,
):
    model = nnx.merge(graphdef, params)
    key, sub = jax.random.split(key)
    rows_B = jnp.arange(plan.rows)
    if use_cache:
        # allocated inside the jit: nothing to transfer or donate
        model.setup_cache(plan.rows, plan.cache_len)
    net = ScannedLayers(model) if scan_layers else model
    if use_cache:
        tok_B = sample(prefill(net, tokens_BP, lens_B), sub, knobs, flags)
        context, with_cache = _cache_state(net)
    else:
        context = (
            jnp.zeros((plan.rows, plan.cache_len), jnp.int32)
            .at[:, : plan.prompt_len]
            .set(tokens_BP)
        )
        tok_B = sample(recompute_logits(net, context, lens_B - 1), sub, knobs, flags)
    out_BM = jnp.zeros((plan.rows, plan.new_len), jnp.int32).at[:, 0].set(tok_B)
    done_B = is_stop(tok_B, knobs, flags) | ~live_B  # padding rows are done from the start

    def cond(s: _Step) -> jax.Array:
        return (s.i < max_new) & ~jnp.all(s.done_B)

    def body(s: _Step) -> _Step:
        key, sub = jax.random.split(s.key)
        pos_B = lens_B + s.i - 1  # where the last generated token sits
        if use_cache:
            step_net = with_cache(s.context)
            tok_B = sample(decode_one_token(step_net, s.tok_B, pos_B), sub, knobs, flags)
            context, _ = _cache_state(step_net)
        else:
            context = s.context.at[rows_B, pos_B].set(s.tok_B)
            tok_B = sample(recompute_logits(net, context, pos_B), sub, knobs, flags)
        done_B = s.done_B | is_stop(tok_B, knobs, flags)
        return _Step(s.i + 1, tok_B, done_B, s.out_BM.at[:, s.i].set(tok_B), context, key)

    final = jax.lax.while_loop(cond, body, _Step(jnp.int32(1), tok_B, done_B, out_BM, context, key))
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
    use_cache: bool = True,
    scan_layers: bool = False,
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at its first stop id inclusive when one is emitted
    (`eos_id`: an int, a sequence of ints such as Llama 3's three, or None).
    `use_cache=False` recomputes the whole (padded) context every step instead of
    reading the KV cache: the same tokens, at O(T^2) cost, for measuring what the
    cache saves. `scan_layers=True` runs the blocks under `lax.scan`
    (`ScannedLayers`): the same tokens, compiled once per block instead of once per
    layer (JAX only: torch has no compile step that grows with depth this way)."""
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
        use_cache=bool(use_cache),
        scan_layers=bool(scan_layers),
    )
    n = int(n)
    return trim(np.asarray(out_BM)[: p.batch], [n] * p.batch, eos_id)


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _prefill_step(graphdef, params, cache, tokens_BP, lens_B, knobs: Knobs, key, *, flags: Flags):
    model = nnx.merge(graphdef, params, cache)
    key, sub = jax.random.split(key)
    tok_B = sample(prefill(model, tokens_BP, lens_B), sub, knobs, flags)
    return tok_B, nnx.state(model, nnx.Cache), key


@partial(jax.jit, static_argnames=("graphdef", "flags"))
def _recompute_step(graphdef, params, tokens_BS, last_B, knobs: Knobs, key, *, flags: Flags):
    key, sub = jax.random.split(key)
    return sample(
        recompute_logits(nnx.merge(graphdef, params), tokens_BS, last_B), sub, knobs, flags
    ), key


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _decode_step(graphdef, params, cache, tok_B, pos_B, knobs: Knobs, key, *, flags: Flags):
    model = nnx.merge(graphdef, params, cache)
    key, sub = jax.random.split(key)
    tok_B = sample(decode_one_token(model, tok_B, pos_B), sub, knobs, flags)
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
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    The same seed gives the same tokens as `generate`. The cache is donated to each jitted step, so
    XLA updates it in place instead of copying it every token. `use_cache=False` recomputes the
    whole (padded) context every step instead."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    p, tokens_BP, lens_B, live_B = _prepare(model, prompts, max_new_tokens, params)
    knobs, flags = _split_params(params)
    if not use_cache:
        yield from _recompute_stream(
            model, p, tokens_BP, lens_B, live_B, max_new_tokens, knobs, flags, params
        )
        return
    model.setup_cache(p.rows, p.cache_len)
    try:
        graphdef, state, cache = nnx.split(model, nnx.Param, nnx.Cache)
    finally:
        model.clear_cache()  # the caller's model is left as it was
    tok_B, cache, key = _prefill_step(
        graphdef, state, cache, tokens_BP, lens_B, knobs, jax.random.key(seed), flags=flags
    )
    done = ~live_B  # padding rows: done from the start, never yielded
    for i in range(max_new_tokens):
        if i > 0:
            tok_B, cache, key = _decode_step(
                graphdef, state, cache, tok_B, lens_B + i - 1, knobs, key, flags=flags
            )
        toks = np.asarray(tok_B)
        yield [None if d else int(t) for t, d in zip(toks[: p.batch], done[: p.batch], strict=True)]
        if flags.eos:
            done |= np.isin(toks, params.eos_ids)
            if done.all():
                return


def _recompute_stream(
    model: GPT,
    p: Plan,
    tokens_BP,
    lens_B,
    live_B: np.ndarray,
    max_new_tokens: int,
    knobs: Knobs,
    flags: Flags,
    params: SamplingParams,
) -> Iterator[list[int | None]]:
    graphdef, state = nnx.split(model, nnx.Param)
    tokens_BS = jnp.zeros((p.rows, p.cache_len), jnp.int32).at[:, : p.prompt_len].set(tokens_BP)
    rows_B = jnp.arange(p.rows)
    tok_B, key = _recompute_step(
        graphdef, state, tokens_BS, lens_B - 1, knobs, jax.random.key(params.seed), flags=flags
    )
    done = ~live_B
    for i in range(max_new_tokens):
        if i > 0:
            tokens_BS = tokens_BS.at[rows_B, lens_B + i - 1].set(tok_B)
            tok_B, key = _recompute_step(
                graphdef, state, tokens_BS, lens_B + i - 1, knobs, key, flags=flags
            )
        toks = np.asarray(tok_B)
        yield [None if d else int(t) for t, d in zip(toks[: p.batch], done[: p.batch], strict=True)]
        if flags.eos:
            done |= np.isin(toks, params.eos_ids)
            if done.all():
                return


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
