"""Generation in PyTorch: the twin of gptmod_jax/generate.py.

The same static KV cache (preallocated per layer, written in place), one prefill pass
over the right-padded prompts, then one `decode_one_token` per step. `compile=True` (or
"default") runs that step through `torch.compile` (the static cache keeps its shapes
fixed, so it compiles once per batch and cache size); `compile="reduce-overhead"` also
captures it as a CUDA graph (CUDA only), so a batch-1 step costs one graph launch
instead of hundreds of kernel launches; without it, generation runs eagerly.
`generate_stream` yields token by token; `generate` collects it, so one decode loop serves both.
`eos_id` may be several stop ids (Llama 3 has three). `Session` keeps one conversation's KV cache
across calls (chat): each call prefills only what the cache does not already hold.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from gptmod.sampling import (
    Flags,
    SamplingParams,
    StopIds,
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
from gptmod_torch.model import GPT, KVCache

# ----------------------------------------------------------------------------- sampling


class Knobs(NamedTuple):
    """Sampling values (the twin of JAX's traced scalars)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    eos_ids: tuple[int, ...]  # padded with -1 (see SamplingParams.knob_values)


def _split_params(params: SamplingParams) -> tuple[Knobs, Flags]:
    return Knobs(*params.knob_values()), params.flags()


def is_stop(tok_B: torch.Tensor, knobs: Knobs, flags: Flags) -> torch.Tensor:
    """Whether each row's token is one of the stop ids, (B,) bool (all False without stop ids)."""
    return torch.isin(tok_B, torch.tensor(knobs.eos_ids, device=tok_B.device)) & flags.eos


def filter_logits(logits_BV: torch.Tensor, knobs: Knobs, flags: Flags) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as thresholds (ties kept),
    in fp32; disallowed -> -inf.
    The same arithmetic as the JAX twin, so both allow the very same tokens."""
    # The maximum subtracted first: the top logit is then 0 and no temperature can overflow the
    # others to inf (a tiny T sends them to -inf, which is the argmax, T's limit; see
    # gptmod.sampling.GREEDY_BELOW).
    x_BV = logits_BV.float()
    x_BV = (x_BV - x_BV.amax(dim=-1, keepdim=True)) / knobs.temperature
    if flags.top_k:
        sorted_BV = torch.sort(x_BV, dim=-1, descending=True).values
        kth_B1 = sorted_BV[:, knobs.top_k - 1 : knobs.top_k]
        x_BV = torch.where(x_BV >= kth_B1, x_BV, -torch.inf)
    if flags.top_p:
        probs_BV = x_BV.softmax(dim=-1)
        sorted_BV = torch.sort(probs_BV, dim=-1, descending=True).values
        mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        cutoff_B1 = torch.where(mass_before_BV < knobs.top_p, sorted_BV, torch.inf).amin(
            dim=-1, keepdim=True
        )
        x_BV = torch.where(probs_BV >= cutoff_B1, x_BV, -torch.inf)
    if flags.min_p:
        probs_BV = x_BV.softmax(dim=-1)
        x_BV = torch.where(
            probs_BV >= knobs.min_p * probs_BV.amax(dim=-1, keepdim=True), x_BV, -torch.inf
        )
    return x_BV


def argmax(logits_BV: torch.Tensor) -> torch.Tensor:
    """The first maximum over the vocabulary (a NaN counts as the maximum); the twin of JAX's, which
    spells it as two reductions because XLA's CPU argmax is slow. torch's own is fast as it is."""
    return logits_BV.argmax(dim=-1)


def sample(
    logits_BV: torch.Tensor, generator: torch.Generator, knobs: Knobs, flags: Flags
) -> torch.Tensor:
    if flags.greedy:
        return argmax(logits_BV)
    probs_BV = filter_logits(logits_BV, knobs, flags).softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- prefill and decode


def prefill(
    model: GPT, tokens_BP: torch.Tensor, lens_B: torch.Tensor, start_B: torch.Tensor | None = None
) -> torch.Tensor:
    """All prompts in one pass (right-padded), each row's tokens at positions start..start+P-1
    (start 0 by default; a Session passes where its cache ends). Logits of each row's last real
    token, (B, V)."""
    # None: every row from key 0, causal attention without a mask, which FlashAttention takes
    positions_BP = None
    if start_B is not None:
        positions_BP = (
            torch.arange(tokens_BP.shape[1], device=tokens_BP.device)[None] + start_B[:, None]
        )
    x_BPD, _ = model.trunk(tokens_BP, positions_BP)
    return model.head(x_BPD[torch.arange(tokens_BP.shape[0], device=tokens_BP.device), lens_B - 1])


def decode_one_token(model: GPT, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """One token per row at its own position; the cache supplies the past. Logits (B, V)."""
    x_B1D, _ = model.trunk(tok_B[:, None], pos_B[:, None])
    return model.head(x_B1D[:, 0])


def decode_step(
    model: GPT,
    tok_B: torch.Tensor,
    pos_B: torch.Tensor,
    generator: torch.Generator,
    knobs: Knobs,
    flags: Flags,
    mode: str | None = None,
) -> torch.Tensor:
    """The decode loop's body, shared by `generate_stream` (and so `generate`) and Session: feed the
    last tokens, sample the next. `mode`: torch.compile's mode for the forward (None: eager)."""
    return sample(_step_fn(decode_one_token, mode)(model, tok_B, pos_B), generator, knobs, flags)


# ----------------------------------------------------------------------------- compiling the step


COMPILE_MODES = ("default", "reduce-overhead")
Compile = bool | str  # False (eager), True (= "default") or one of COMPILE_MODES


def compile_mode(compile: Compile) -> str | None:
    """The torch.compile mode that `compile` asks for (None: eager);
    anything else is a ValueError."""
    if isinstance(compile, bool):
        return "default" if compile else None
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(
        f"compile={compile!r}: choose False (eager), True (= 'default') or one of "
        f"{', '.join(repr(m) for m in COMPILE_MODES)}"
    )


def _device_type(model: GPT) -> str:
    return model.tok_emb.weight.device.type


def _check_mode(model: GPT, mode: str | None) -> None:
    """CUDA graphs need CUDA: "reduce-overhead" elsewhere is refused, never
    quietly run as plain compile."""
    if mode == "reduce-overhead" and _device_type(model) != "cuda":
        raise ValueError(
            "compile='reduce-overhead' captures CUDA graphs and needs the model on a CUDA "
            f"device, but it is on {model.tok_emb.weight.device}; use compile=True there"
        )


# (step, mode) -> the compiled step; gptmod.parity.mutations clears it, so a
# patched function is traced anew.
_compiled: dict[tuple[Callable, str], Callable] = {}

# Graphs one compiled step may hold, one per (rows, cache length). Both are bucketed (powers of two,
# see gptmod.sampling.plan), but a notebook or server still meets more than dynamo's default of 8,
# and with fullgraph dynamo would then fail (FailOnRecompileLimitHit) rather than fall back: the
# limit is raised deliberately, for these steps only (the process-wide setting is left alone).
# dynamo's accumulated_recompile_limit (256) still caps it.
RECOMPILE_LIMIT = 64
# The config's name: "recompile_limit" since torch 2.6, "cache_size_limit" (still an alias) before.
_LIMIT_NAME = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)


def _step_fn(step: Callable, mode: str | None) -> Callable:
    if mode is None:
        return step
    if (step, mode) not in _compiled:
        # fullgraph: a graph break inside the step would quietly cost the speed
        # compile is for. dynamic=False: every input is a tensor of fixed shape
        # and dtype (no Python int changes per step), so each batch and cache size
        # is one graph, compiled (and under "reduce-overhead" captured) once.
        compiled = _with_recompile_limit(
            torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
        )
        _compiled[step, mode] = _graph_step(compiled) if mode == "reduce-overhead" else compiled
    return _compiled[step, mode]


def _with_recompile_limit(compiled: Callable) -> Callable:
    """`compiled`, called with dynamo's per-function recompile limit at least RECOMPILE_LIMIT."""

    def step(*args: object) -> torch.Tensor:
        limit = max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, _LIMIT_NAME))
        with torch._dynamo.config.patch(**{_LIMIT_NAME: limit}):
            return compiled(*args)

    return step


def _graph_step(compiled: Callable) -> Callable:
    """A CUDA-graph step, called once per decode step. cudagraph trees copy the inputs that are not
    parameters or buffers (tokens, positions) into the graph's static placeholders, and the next
    replay overwrites the outputs in place, so each call marks a new iteration and hands back a
    clone of its logits (B, V), which stays valid whatever runs next."""

    def step(*args: object) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return step


# CUDA graphs read the KV cache at the addresses they were captured with (module buffers are static
# inputs, mutated in place), and a new address re-records the graph. So under "reduce-overhead" each
# model keeps one cache per (batch, capacity, dtype, device), allocated on first use and zeroed and
# reinstalled by every later call, as gpt-fast keeps its caches; it is freed with the model.
_graph_caches: weakref.WeakKeyDictionary[GPT, dict[tuple, list[KVCache]]] = (
    weakref.WeakKeyDictionary()
)


def _setup_cache(model: GPT, batch: int, cache_len: int, mode: str | None) -> None:
    """`model.setup_cache`, except under "reduce-overhead": the same buffers
    as the last call of this shape."""
    if mode != "reduce-overhead":
        model.setup_cache(batch, cache_len)
        return
    w = model.norm.weight  # float in an int8 model too
    pool = _graph_caches.setdefault(model, {})
    key = (batch, cache_len, w.dtype, w.device)
    if key not in pool:
        model.setup_cache(batch, cache_len)
        pool[key] = [block.attn.kv_cache for block in model.blocks]
        return
    for block, cache in zip(model.blocks, pool[key], strict=True):
        cache.k.zero_()  # in place: the address the graph was captured with stays valid
        cache.v.zero_()
        block.attn.kv_cache = cache


# ----------------------------------------------------------------------------- generate


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
    compile: Compile = False,
) -> list[list[int]]:
    """Continue each prompt (token-id lists of any lengths) by up to `max_new_tokens` tokens.

    Returns one list per prompt, ending at its first stop id inclusive when one is
    emitted (`eos_id`: an int, a sequence of ints such as Llama 3's three, or None).
    `compile`: False (eager), True or "default" (torch.compile of the decode step),
    "reduce-overhead" (that step as a CUDA graph; a CUDA model only). It collects
    `generate_stream`: one decode loop serves both."""
    steps = list(
        generate_stream(
            model,
            prompts,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            eos_id,
            seed,
            compile,
        )
    )
    rows = [[s[b] for s in steps if s[b] is not None] for b in range(len(steps[0]))]
    return trim(rows, [len(r) for r in rows], eos_id)


# ----------------------------------------------------------------------------- generate_stream


@torch.no_grad()
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
    compile: Compile = False,
) -> Iterator[list[int | None]]:
    """Step-wise `generate`: yields one token per row per step (None for rows that have finished).

    `compile=True` (or "default") compiles the step with torch.compile (first call pays the
    compile); "reduce-overhead" also captures it as a CUDA graph (a CUDA model only)."""
    mode = compile_mode(compile)
    params = SamplingParams(temperature, top_k, top_p, min_p, eos_id, seed)
    if model.blocks[0].attn.kv_cache is not None:
        raise ValueError(
            "generate: the model already holds a KV cache; call model.clear_cache() first"
        )
    prompts = check_request(prompts, model.cfg, max_new_tokens, params)
    _check_mode(model, mode)
    p = plan(prompts, max_new_tokens, model.cfg)
    device = model.tok_emb.weight.device
    tokens_np, lens_np, live_B = padded_prompts(prompts, p)
    tokens_BP = torch.from_numpy(tokens_np).long().to(device)
    lens_B = torch.from_numpy(lens_np).long().to(device)
    knobs, flags = _split_params(params)
    generator = torch.Generator(device=device).manual_seed(seed)
    _setup_cache(model, p.rows, p.cache_len, mode)
    try:
        tok_B = sample(prefill(model, tokens_BP, lens_B), generator, knobs, flags)
        done = ~live_B  # padding rows: done from the start, never yielded
        for i in range(max_new_tokens):
            if i > 0:
                tok_B = decode_step(model, tok_B, lens_B + i - 1, generator, knobs, flags, mode)
            toks = tok_B.cpu().numpy()
            yield [
                None if d else int(t) for t, d in zip(toks[: p.batch], done[: p.batch], strict=True)
            ]
            if flags.eos:
                done |= is_stop(tok_B, knobs, flags).cpu().numpy()
                if done.all():
                    return
    finally:
        model.clear_cache()  # the caller's model is left as it was, even if the stream is abandoned


# ----------------------------------------------------------------------------- session


class Session:
    """A conversation that keeps its KV cache across calls (batch 1); the
    twin of gptmod_jax's Session.

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

    The cache is the session's, installed on the model only while a step runs, so `generate` can use
    the model between turns. `compile=True` (or "default") runs the decode step through
    torch.compile (one compile per size); "reduce-overhead" captures it as a CUDA graph (a CUDA
    model only): the session's cache keeps its addresses until it grows, and each growth captures
    the next size once."""

    def __init__(self, model: GPT, max_len: int | None = None, *, compile: Compile = False):
        self.model = model
        self.max_len = check_session_len(max_len, model.cfg)
        self._mode = compile_mode(compile)
        _check_mode(model, self._mode)
        self.compile = compile
        self.tokens: list[int] = []
        self.last_prefill = 0
        self.last_reused = 0
        self._caches: list[KVCache] = []

    @property
    def capacity(self) -> int:
        """Positions allocated now (0 before the first call)."""
        return self._caches[0].capacity if self._caches else 0

    def reset(self) -> None:
        """Forget the conversation and free the cache."""
        self.tokens, self._caches = [], []
        self.last_prefill = self.last_reused = 0

    @torch.no_grad()
    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold `ids` (reusing what it already holds); the
        next token's logits, (V,)."""
        ids = check_turn(ids, self.model.cfg, self.max_len, 0)
        knobs, flags = _split_params(SamplingParams())
        logits_1V, _ = self._extend(ids, 0, knobs, flags, None)
        return logits_1V[0].cpu().numpy()

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

    @torch.no_grad()
    def _stream(self, ids: list[int], max_new_tokens: int, params: SamplingParams) -> Iterator[int]:
        knobs, flags = _split_params(params)
        device = self.model.tok_emb.weight.device
        generator = torch.Generator(device=device).manual_seed(params.seed)
        _, tok_1 = self._extend(ids, max_new_tokens, knobs, flags, generator)
        stops, tok = set(params.eos_ids), int(tok_1[0])
        for i in range(max_new_tokens):
            if i > 0:  # feed the token yielded last, at the next position
                pos_1 = torch.tensor([len(self.tokens)], device=device)
                with self._installed():
                    tok_1 = decode_step(
                        self.model, tok_1, pos_1, generator, knobs, flags, self._mode
                    )
                self.tokens.append(tok)
                tok = int(tok_1[0])
            yield tok
            if tok in stops:
                return

    def _extend(
        self,
        ids: list[int],
        room: int,
        knobs: Knobs,
        flags: Flags,
        generator: torch.Generator | None,
    ):
        """Make the cache hold `ids` with `room` positions to spare;
        (logits, first sampled token) after it."""
        # At least the last token is prefilled, even when the cache holds
        # all of `ids`: its logits are the answer.
        reuse = min(common_prefix(self.tokens, ids), len(ids) - 1)
        self._reserve(len(ids) + room)
        new = ids[reuse:]
        device = self.model.tok_emb.weight.device
        # rewind: what lies past it is invisible until overwritten
        self.tokens = self.tokens[:reuse]
        with self._installed():
            # Eager torch takes any length, so the new part goes in unpadded.
            logits_1V = prefill(
                self.model,
                torch.tensor([new], device=device),
                torch.tensor([len(new)], device=device),
                torch.tensor([reuse], device=device),
            )
        self.tokens = list(ids)
        self.last_prefill, self.last_reused = len(new), reuse
        return logits_1V, sample(logits_1V, generator, knobs, flags)

    def _reserve(self, needed: int) -> None:
        """Grow the cache (copying what it holds) to hold `needed`
        positions; check_turn bounded it by max_len."""
        if needed <= self.capacity:
            return
        with self._model_free():
            self.model.setup_cache(1, session_capacity(needed, self.max_len))
            caches = [block.attn.kv_cache for block in self.model.blocks]
            self.model.clear_cache()
        for old, new in zip(self._caches, caches, strict=False):  # no old caches on the first call
            for name in ("k", "v"):
                # the same layout, shorter along the sequence axis: copy to the corner
                src = getattr(old, name)
                getattr(new, name)[tuple(slice(0, n) for n in src.shape)] = src
        self._caches = caches

    @contextlib.contextmanager
    def _model_free(self) -> Iterator[None]:
        if self.model.blocks[0].attn.kv_cache is not None:
            raise ValueError(
                "Session: the model already holds a KV cache (a generate running on it, or "
                "setup_cache); call model.clear_cache() or let that stream finish first"
            )
        yield

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The session's cache on the model for one step, and off it again whatever happens."""
        with self._model_free():
            for block, cache in zip(self.model.blocks, self._caches, strict=True):
                block.attn.kv_cache = cache
            try:
                yield
            finally:
                self.model.clear_cache()
