"""Generation in JAX: the twin of gptmod_torch/generate.py.

`generate` is one jitted function over pure state: `nnx.split` hands it the parameters, it builds
the static KV cache inside (so there is nothing to copy in), prefills the prompts in one pass, runs a
`lax.while_loop` of decode steps with sampling, and stops early once every row has emitted eos.
Prompt and new-token lengths are padded to power-of-two buckets, so a new length recompiles only when
it crosses into a new bucket. `generate_stream` yields token by token for streaming; its decode step
is jitted with the cache donated, so each step updates the cache in place. `use_cache=False` is the
classic path without a cache, `recompute_logits` over the whole context every step, kept for
measuring what the cache saves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptmod.sampling import Flags, Plan, SamplingParams, check_request, plan, trim
from gptmod_jax import sharding
from gptmod_jax.model import GPT


class Knobs(NamedTuple):
    """Sampling values as traced scalars: changing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    eos_id: jax.Array


def _split_params(params: SamplingParams) -> tuple[Knobs, Flags]:
    t, k, p, m, eos = params.knob_values()
    return Knobs(jnp.float32(t), jnp.int32(k), jnp.float32(p), jnp.float32(m), jnp.int32(eos)), params.flags()


def filter_logits(logits_BV: jax.Array, knobs: Knobs, flags: Flags) -> jax.Array:
    """Temperature, then top-k, top-p and min-p as thresholds (ties kept), in fp32; disallowed -> -inf.
    The same arithmetic as the torch twin, so both allow the very same tokens."""
    x_BV = logits_BV.astype(jnp.float32) / knobs.temperature
    if flags.top_k:
        sorted_BV = -jnp.sort(-x_BV, axis=-1)
        kth_B1 = jnp.take_along_axis(sorted_BV, jnp.broadcast_to(knobs.top_k - 1, (x_BV.shape[0], 1)), axis=-1)
        x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
    if flags.top_p:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        sorted_BV = -jnp.sort(-probs_BV, axis=-1)
        mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < knobs.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        x_BV = jnp.where(probs_BV >= cutoff_B1, x_BV, -jnp.inf)
    if flags.min_p:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        x_BV = jnp.where(probs_BV >= knobs.min_p * probs_BV.max(-1, keepdims=True), x_BV, -jnp.inf)
    return x_BV


def argmax(logits_BV: jax.Array) -> jax.Array:
    """`jnp.argmax` over the vocabulary (first maximum; a NaN counts as the maximum, as there), as two plain
    reductions: XLA's CPU argmax is a paired (value, index) reduction, 3x slower (1.0 against 0.34 ms a
    decode step at batch 8)."""
    max_B1 = logits_BV.max(axis=-1, keepdims=True)  # NaN if the row has one
    hit_BV = (logits_BV == max_B1) | jnp.isnan(logits_BV)
    return jnp.min(jnp.where(hit_BV, jnp.arange(logits_BV.shape[-1], dtype=jnp.int32), logits_BV.shape[-1]), axis=-1)


def sample(logits_BV: jax.Array, key: jax.Array, knobs: Knobs, flags: Flags) -> jax.Array:
    if flags.greedy:
        return argmax(logits_BV)
    return jax.random.categorical(key, filter_logits(logits_BV, knobs, flags), axis=-1).astype(jnp.int32)


def prefill(model: GPT, tokens_BP: jax.Array, lens_B: jax.Array) -> jax.Array:
    """All prompts in one pass (right-padded); logits of each row's last real token, (B, V)."""
    positions_BP = jnp.broadcast_to(jnp.arange(tokens_BP.shape[1])[None], tokens_BP.shape)
    x_BPD, _ = model.trunk(tokens_BP, positions_BP)
    return model.head(x_BPD[jnp.arange(tokens_BP.shape[0]), lens_B - 1])


def decode_one_token(model: GPT, tok_B: jax.Array, pos_B: jax.Array) -> jax.Array:
    """One token per row at its own position; the cache supplies the past. Logits (B, V)."""
    x_B1D, _ = model.trunk(tok_B[:, None], pos_B[:, None])
    return model.head(x_B1D[:, 0])


def recompute_logits(model: GPT, tokens_BL: jax.Array, last_B: jax.Array) -> jax.Array:
    """The classic path without a KV cache: the whole context again, every step. Logits (B, V) at
    each row's last token; the causal mask keeps the padding after it out."""
    x_BLD, _ = model.trunk(tokens_BL, None)
    return model.head(x_BLD[jnp.arange(tokens_BL.shape[0]), last_B])


class ScannedLayers:
    """`model` with its blocks stacked into one state (leading axis: layer) that `lax.scan` runs through:
    XLA then compiles one block instead of n_layer copies, so compile time stops growing with depth
    (`python -m gptmod.bench` measures both). The price is the stacking, a copy of the block weights once
    per `generate` call, and with a cache, scan writing the stacked cache out anew every step. Stands in
    for the model in `prefill`, `decode_one_token` and `recompute_logits`: it has their `trunk` and `head`."""

    def __init__(self, model: GPT):
        splits = [nnx.split(block, nnx.Param, nnx.Cache) for block in model.blocks]  # the same graph each
        stack = lambda *xs: jnp.stack(xs)
        self.model, self.block_graphdef = model, splits[0][0]
        self.params_L = jax.tree.map(stack, *[params for _, params, _ in splits])
        self.cache_L = jax.tree.map(stack, *[cache for _, _, cache in splits])

    def with_cache(self, cache_L: nnx.State) -> ScannedLayers:
        new = copy.copy(self)
        new.cache_L = cache_L
        return new

    def trunk(self, idx_BT: jax.Array, positions_BT: jax.Array | None) -> tuple[jax.Array, list]:
        x_BTD, rope, positions_BT, mask_BTS = self.model.embed(idx_BT, positions_BT)

        def layer(x_BTD: jax.Array, state: tuple) -> tuple[jax.Array, nnx.State]:
            block = nnx.merge(self.block_graphdef, *state)
            x_BTD = block(x_BTD, rope, self.model.attn_backend, positions_BT, mask_BTS)
            return sharding.constrain(x_BTD, ("batch", None, None)), nnx.state(block, nnx.Cache)

        x_BTD, self.cache_L = jax.lax.scan(layer, x_BTD, (self.params_L, self.cache_L))
        return x_BTD, []  # no per-layer hidden states: generation never asks for them

    def head(self, x_BTD: jax.Array) -> jax.Array:
        return self.model.head(x_BTD)


def _cache_state(net: GPT | ScannedLayers) -> tuple[nnx.State, Callable]:
    """The KV cache of `net` as pure state for a loop to carry, and how to rebuild `net` around a new one."""
    if isinstance(net, ScannedLayers):
        return net.cache_L, net.with_cache
    graphdef, params, cache = nnx.split(net, nnx.Param, nnx.Cache)
    return cache, lambda cache: nnx.merge(graphdef, params, cache)


class _Step(NamedTuple):
    i: jax.Array  # number of tokens generated so far
    tok_B: jax.Array
    done_B: jax.Array
    out_BN: jax.Array
    context: nnx.State | jax.Array  # the KV cache, or (use_cache=False) the (B, cache_len) token buffer
    key: jax.Array


@partial(jax.jit, static_argnames=("graphdef", "plan", "flags", "use_cache", "scan_layers"))
def _generate(graphdef, params, tokens_BP, lens_B, max_new, knobs: Knobs, key, *, plan: Plan, flags: Flags,
              use_cache: bool = True, scan_layers: bool = False):  # fmt: skip
    model = nnx.merge(graphdef, params)
    key, sub = jax.random.split(key)
    rows_B = jnp.arange(plan.batch)
    if use_cache:
        model.setup_cache(plan.batch, plan.cache_len)  # allocated inside the jit: nothing to transfer or donate
    net = ScannedLayers(model) if scan_layers else model
    if use_cache:
        tok_B = sample(prefill(net, tokens_BP, lens_B), sub, knobs, flags)
        context, with_cache = _cache_state(net)
    else:
        context = jnp.zeros((plan.batch, plan.cache_len), jnp.int32).at[:, : plan.prompt_len].set(tokens_BP)
        tok_B = sample(recompute_logits(net, context, lens_B - 1), sub, knobs, flags)
    out_BN = jnp.zeros((plan.batch, plan.new_len), jnp.int32).at[:, 0].set(tok_B)
    done_B = (tok_B == knobs.eos_id) & flags.eos

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
        done_B = s.done_B | ((tok_B == knobs.eos_id) & flags.eos)
        return _Step(s.i + 1, tok_B, done_B, s.out_BN.at[:, s.i].set(tok_B), context, key)

    final = jax.lax.while_loop(cond, body, _Step(jnp.int32(1), tok_B, done_B, out_BN, context, key))
    return final.out_BN, final.i


def _prepare(model: GPT, prompts, max_new_tokens: int, params: SamplingParams):
    if model.blocks[0].attn.kv_cache is not None:
        raise ValueError("generate: the model already holds a KV cache; call model.clear_cache() first")
    prompts = check_request(prompts, model.cfg, max_new_tokens, params)
    p = plan(prompts, max_new_tokens, model.cfg)
    tokens_BP = np.zeros((p.batch, p.prompt_len), np.int32)
    for b, ids in enumerate(prompts):
        tokens_BP[b, : len(ids)] = ids
    lens_B = np.array([len(ids) for ids in prompts], np.int32)
    return p, jnp.asarray(tokens_BP), jnp.asarray(lens_B)


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    scan_layers: bool = False,
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at `eos_id` inclusive when it is given and emitted.
    `use_cache=False` recomputes the whole (padded) context every step instead of reading the KV
    cache: the same tokens, at O(T^2) cost, for measuring what the cache saves. `scan_layers=True`
    runs the blocks under `lax.scan` (`ScannedLayers`): the same tokens, compiled once per block
    instead of once per layer (JAX only: torch has no compile step that grows with depth this way)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    p, tokens_BP, lens_B = _prepare(model, prompts, max_new_tokens, params)
    knobs, flags = _split_params(params)
    graphdef, state = nnx.split(model, nnx.Param)
    out_BN, n = _generate(graphdef, state, tokens_BP, lens_B, jnp.int32(max_new_tokens), knobs,
                          jax.random.key(seed), plan=p, flags=flags, use_cache=bool(use_cache),
                          scan_layers=bool(scan_layers))  # fmt: skip
    n = int(n)
    return trim(np.asarray(out_BN), [n] * p.batch, eos_id)


@partial(jax.jit, static_argnames=("graphdef", "flags"), donate_argnames=("cache",))
def _prefill_step(graphdef, params, cache, tokens_BP, lens_B, knobs: Knobs, key, *, flags: Flags):
    model = nnx.merge(graphdef, params, cache)
    key, sub = jax.random.split(key)
    tok_B = sample(prefill(model, tokens_BP, lens_B), sub, knobs, flags)
    return tok_B, nnx.state(model, nnx.Cache), key


@partial(jax.jit, static_argnames=("graphdef", "flags"))
def _recompute_step(graphdef, params, tokens_BL, last_B, knobs: Knobs, key, *, flags: Flags):
    key, sub = jax.random.split(key)
    return sample(recompute_logits(nnx.merge(graphdef, params), tokens_BL, last_B), sub, knobs, flags), key


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
    eos_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    The same seed gives the same tokens as `generate`. The cache is donated to each jitted step, so
    XLA updates it in place instead of copying it every token. `use_cache=False` recomputes the
    whole (padded) context every step instead."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    p, tokens_BP, lens_B = _prepare(model, prompts, max_new_tokens, params)
    knobs, flags = _split_params(params)
    if not use_cache:
        yield from _recompute_stream(model, p, tokens_BP, lens_B, max_new_tokens, knobs, flags, eos_id, seed)
        return
    model.setup_cache(p.batch, p.cache_len)
    try:
        graphdef, state, cache = nnx.split(model, nnx.Param, nnx.Cache)
    finally:
        model.clear_cache()  # the caller's model is left as it was
    tok_B, cache, key = _prefill_step(graphdef, state, cache, tokens_BP, lens_B, knobs, jax.random.key(seed),
                                      flags=flags)  # fmt: skip
    done = np.zeros(p.batch, bool)
    for i in range(max_new_tokens):
        if i > 0:
            tok_B, cache, key = _decode_step(graphdef, state, cache, tok_B, lens_B + i - 1, knobs, key,
                                             flags=flags)  # fmt: skip
        toks = np.asarray(tok_B)
        yield [None if d else int(t) for t, d in zip(toks, done, strict=True)]
        if eos_id is not None:
            done |= toks == eos_id
            if done.all():
                return


def _recompute_stream(model: GPT, p: Plan, tokens_BP, lens_B, max_new_tokens: int, knobs: Knobs, flags: Flags,
                      eos_id: int | None, seed: int) -> Iterator[list[int | None]]:  # fmt: skip
    graphdef, state = nnx.split(model, nnx.Param)
    tokens_BL = jnp.zeros((p.batch, p.cache_len), jnp.int32).at[:, : p.prompt_len].set(tokens_BP)
    rows_B = jnp.arange(p.batch)
    tok_B, key = _recompute_step(graphdef, state, tokens_BL, lens_B - 1, knobs, jax.random.key(seed), flags=flags)
    done = np.zeros(p.batch, bool)
    for i in range(max_new_tokens):
        if i > 0:
            tokens_BL = tokens_BL.at[rows_B, lens_B + i - 1].set(tok_B)
            tok_B, key = _recompute_step(graphdef, state, tokens_BL, lens_B + i - 1, knobs, key, flags=flags)
        toks = np.asarray(tok_B)
        yield [None if d else int(t) for t, d in zip(toks, done, strict=True)]
        if eos_id is not None:
            done |= toks == eos_id
            if done.all():
                return
