"""Generation in PyTorch: the twin of gptmod_jax/generate.py.

The same static KV cache (preallocated per layer, written in place), one prefill pass over the
right-padded prompts, then one `decode_one_token` per step. `compile=True` runs that step through
`torch.compile` (the static cache keeps its shapes fixed, so it compiles once per batch and cache
size); without it, generation runs eagerly. `use_cache=False` is the classic path without a cache,
`recompute_logits` over the whole context every step, kept for measuring what the cache saves.
`generate_stream` yields token by token; `generate` collects it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from gptmod.sampling import Flags, SamplingParams, check_request, plan, trim
from gptmod_torch.model import GPT


class Knobs(NamedTuple):
    """Sampling values (the twin of JAX's traced scalars)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    eos_id: int


def _split_params(params: SamplingParams) -> tuple[Knobs, Flags]:
    return Knobs(*params.knob_values()), params.flags()


def filter_logits(logits_BV: torch.Tensor, knobs: Knobs, flags: Flags) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as thresholds (ties kept), in fp32; disallowed -> -inf.
    The same arithmetic as the JAX twin, so both allow the very same tokens."""
    x_BV = logits_BV.float() / knobs.temperature
    if flags.top_k:
        sorted_BV = torch.sort(x_BV, dim=-1, descending=True).values
        kth_B1 = sorted_BV[:, knobs.top_k - 1 : knobs.top_k]
        x_BV = torch.where(x_BV >= kth_B1, x_BV, -torch.inf)
    if flags.top_p:
        probs_BV = x_BV.softmax(dim=-1)
        sorted_BV = torch.sort(probs_BV, dim=-1, descending=True).values
        mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        cutoff_B1 = torch.where(mass_before_BV < knobs.top_p, sorted_BV, torch.inf).amin(dim=-1, keepdim=True)
        x_BV = torch.where(probs_BV >= cutoff_B1, x_BV, -torch.inf)
    if flags.min_p:
        probs_BV = x_BV.softmax(dim=-1)
        x_BV = torch.where(probs_BV >= knobs.min_p * probs_BV.amax(dim=-1, keepdim=True), x_BV, -torch.inf)
    return x_BV


def argmax(logits_BV: torch.Tensor) -> torch.Tensor:
    """The first maximum over the vocabulary (a NaN counts as the maximum); the twin of JAX's, which spells
    it as two reductions because XLA's CPU argmax is slow. torch's own is fast as it is."""
    return logits_BV.argmax(dim=-1)


def sample(logits_BV: torch.Tensor, generator: torch.Generator, knobs: Knobs, flags: Flags) -> torch.Tensor:
    if flags.greedy:
        return argmax(logits_BV)
    probs_BV = filter_logits(logits_BV, knobs, flags).softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def prefill(model: GPT, tokens_BP: torch.Tensor, lens_B: torch.Tensor) -> torch.Tensor:
    """All prompts in one pass (right-padded); logits of each row's last real token, (B, V)."""
    positions_BP = torch.arange(tokens_BP.shape[1], device=tokens_BP.device)[None].expand_as(tokens_BP)
    x_BPD, _ = model.trunk(tokens_BP, positions_BP)
    return model.head(x_BPD[torch.arange(tokens_BP.shape[0], device=tokens_BP.device), lens_B - 1])


def decode_one_token(model: GPT, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """One token per row at its own position; the cache supplies the past. Logits (B, V)."""
    x_B1D, _ = model.trunk(tok_B[:, None], pos_B[:, None])
    return model.head(x_B1D[:, 0])


def recompute_logits(model: GPT, tokens_BL: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """The classic path without a KV cache: the whole context again, every step. Logits (B, V) at
    each row's last token; the causal mask keeps the padding after it out."""
    x_BLD, _ = model.trunk(tokens_BL, None)
    return model.head(x_BLD[torch.arange(tokens_BL.shape[0], device=tokens_BL.device), last_B])


_compiled: dict[Callable, Callable] = {}


def _step_fn(step: Callable, compile: bool) -> Callable:
    if not compile:
        return step
    if step not in _compiled:
        # fullgraph: a graph break inside the step would quietly cost the speed compile is for.
        _compiled[step] = torch.compile(step, fullgraph=True, dynamic=False)
    return _compiled[step]


@torch.no_grad()
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
    compile: bool = False,
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    `compile=True` compiles the step with torch.compile (first call pays the compile). `use_cache=False`
    recomputes the whole (padded) context every step instead of reading the KV cache."""
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    if model.blocks[0].attn.kv_cache is not None:
        raise ValueError("generate: the model already holds a KV cache; call model.clear_cache() first")
    prompts = check_request(prompts, model.cfg, max_new_tokens, params)
    p = plan(prompts, max_new_tokens, model.cfg)
    device = model.tok_emb.weight.device
    tokens_BP = torch.zeros((p.batch, p.prompt_len), dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        tokens_BP[b, : len(ids)] = torch.tensor(ids)
    lens_B = torch.tensor([len(ids) for ids in prompts], device=device)
    knobs, flags = _split_params(params)
    generator = torch.Generator(device=device).manual_seed(seed)
    if use_cache:
        decode = _step_fn(decode_one_token, compile)
        model.setup_cache(p.batch, p.cache_len)
    else:
        recompute = _step_fn(recompute_logits, compile)
        tokens_BL = torch.zeros((p.batch, p.cache_len), dtype=torch.long, device=device)
        tokens_BL[:, : p.prompt_len] = tokens_BP
        rows_B = torch.arange(p.batch, device=device)
    try:
        if use_cache:
            tok_B = sample(prefill(model, tokens_BP, lens_B), generator, knobs, flags)
        else:
            tok_B = sample(recompute(model, tokens_BL, lens_B - 1), generator, knobs, flags)
        done = np.zeros(p.batch, bool)
        for i in range(max_new_tokens):
            if i > 0 and use_cache:
                tok_B = sample(decode(model, tok_B, lens_B + i - 1), generator, knobs, flags)
            elif i > 0:
                tokens_BL[rows_B, lens_B + i - 1] = tok_B
                tok_B = sample(recompute(model, tokens_BL, lens_B + i - 1), generator, knobs, flags)
            toks = tok_B.cpu().numpy()
            yield [None if d else int(t) for t, d in zip(toks, done, strict=True)]
            if eos_id is not None:
                done |= toks == eos_id
                if done.all():
                    return
    finally:
        model.clear_cache()  # the caller's model is left as it was, even if the stream is abandoned


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
    compile: bool = False,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at `eos_id` inclusive when it is given and emitted.
    `use_cache=False` recomputes the whole (padded) context every step instead of reading the KV
    cache: the same tokens, at O(T^2) cost, for measuring what the cache saves."""
    steps = list(generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, eos_id, seed,
                                 compile, use_cache))  # fmt: skip
    rows = [[s[b] for s in steps if s[b] is not None] for b in range(len(steps[0]))]
    return trim(rows, [len(r) for r in rows], eos_id)
