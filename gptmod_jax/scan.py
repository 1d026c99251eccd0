"""`scan_layers=True` of the JAX twin's `generate`: the blocks run under `lax.scan`.

XLA then compiles one block instead of n_layer copies, so compile time stops growing with depth
(`gptmod bench` measures both). The price is the stacking, a copy of the block weights once per
`generate` call, and with a cache, scan writing the stacked cache out anew every step, so on the CPU
it decodes slower: it is a lever for deep models, where compile time is what hurts. torch has no
compile step that grows with depth this way, so this file has no twin.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gptmod_jax import sharding
from gptmod_jax.model import GPT


class ScannedLayers:
    """`model` with its blocks stacked into one state (leading axis: layer) that `lax.scan` runs
    through. Stands in for the model in `prefill` and `decode_one_token`: it has their `trunk` and
    `head`."""

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


def cache_state(net: GPT | ScannedLayers) -> tuple[nnx.State, Callable]:
    """The KV cache of `net` (a GPT or its ScannedLayers) as pure state for a loop to carry, and
    how to rebuild `net` around a new one."""
    if isinstance(net, ScannedLayers):
        return net.cache_L, net.with_cache
    graphdef, params, cache = nnx.split(net, nnx.Param, nnx.Cache)
    return cache, lambda cache: nnx.merge(graphdef, params, cache)
