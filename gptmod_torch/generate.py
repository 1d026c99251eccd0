"""Generation in PyTorch: the twin of gptmod_jax/generate.py.

The same static KV cache (preallocated per layer, written in place), one prefill pass over the
right-padded prompts, then one `decode_one_token` per step. `compile=True` runs that step through
`torch.compile` (the static cache keeps its shapes fixed, so it compiles once per batch and cache
size); without it, generation runs eagerly. `generate_stream` yields token by token; `generate`
collects it.
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


def sample(logits_BV: torch.Tensor, generator: torch.Generator, knobs: Knobs, flags: Flags) -> torch.Tensor:
    if flags.greedy:
        return logits_BV.argmax(dim=-1)
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


_compiled_decode: Callable | None = None


def _decode_fn(compile: bool) -> Callable:
    global _compiled_decode
    if not compile:
        return decode_one_token
    if _compiled_decode is None:
        # fullgraph: a graph break inside the step would quietly cost the speed compile is for.
        _compiled_decode = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    return _compiled_decode


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
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    `compile=True` compiles `decode_one_token` with torch.compile (first call pays the compile)."""
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
    decode = _decode_fn(compile)
    model.setup_cache(p.batch, p.cache_len)
    try:
        tok_B = sample(prefill(model, tokens_BP, lens_B), generator, knobs, flags)
        done = np.zeros(p.batch, bool)
        for i in range(max_new_tokens):
            if i > 0:
                tok_B = sample(decode(model, tok_B, lens_B + i - 1), generator, knobs, flags)
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
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at `eos_id` inclusive when it is given and emitted."""
    steps = list(generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, eos_id, seed,
                                 compile))  # fmt: skip
    rows = [[s[b] for s in steps if s[b] is not None] for b in range(len(steps[0]))]
    return trim(rows, [len(r) for r in rows], eos_id)
