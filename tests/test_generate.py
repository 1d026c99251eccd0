"""KV cache and generation in both twins: cached logits equal full-forward logits, greedy tokens
agree across frameworks, ragged batches equal their rows alone, sampling filters allow the same
tokens in both, and bad requests are refused."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod.config import load_preset
from gptmod.sampling import ContextFullError, SamplingParams, batch_bucket

from conftest import jax_model, reduced, torch_model, torch_pair_state

# The packages export the generate *function* under the same name, so fetch the modules explicitly.
jg = importlib.import_module("gptmod_jax.generate")
tg = importlib.import_module("gptmod_torch.generate")


def _cfg(name: str):
    # Untied head and 8x weights: random models then produce varied tokens, not one repeated id.
    cfg = load_preset("tiny") if name == "tiny" else reduced(name, max_seq_len=128)
    return dataclasses.replace(cfg, tie_embeddings=False)


def _state(cfg, seed=0):
    return {k: v * 8 if v.ndim == 2 else v for k, v in torch_pair_state(cfg, seed).items()}


# tiny holds every modern switch (RoPE, RMSNorm, GQA, SwiGLU, no bias, soft-cap), gpt2 the classic
# ones: between them every code path of the cache and the decode loop.
@pytest.fixture(scope="module", params=["tiny", "gpt2"])
def pair(request):
    cfg = _cfg(request.param)
    state = _state(cfg)
    return cfg, torch_model(cfg, state), jax_model(cfg, state)


PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [120, 8], [33, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]]


# ----------------------------------------------------------------------------- cache


def _torch_forward(model, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx), torch.from_numpy(pos)).double().numpy()


def _jax_forward(model, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx), jnp.asarray(pos)), np.float64)


def _cached_steps(model, forward, seq, prefill_chunks):
    """Prefill `seq[:n]` in chunks, then decode the rest one token at a
    time; logits at each new token (`forward`: one twin's call with positions)."""
    model.setup_cache(1, len(seq))
    out, start = [], 0
    try:
        for end in prefill_chunks + list(range(prefill_chunks[-1] + 1, len(seq) + 1)):
            idx, pos = np.asarray([seq[start:end]]), np.arange(start, end)[None]
            out.append(forward(model, idx, pos)[0, -1])
            start = end
    finally:
        model.clear_cache()
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [[6], [3, 6]], ids=["one-pass-prefill", "chunked-prefill"])
@pytest.mark.parametrize("name", ["tiny", "gpt2"])  # every modern switch; the classic ones
def test_cached_decode_equals_full_forward(name, chunks):
    cfg = _cfg(name)
    # logits O(1), not O(10)
    state = {k: v * 2 if v.ndim == 2 else v for k, v in torch_pair_state(cfg).items()}
    tm, jm = torch_model(cfg, state), jax_model(cfg, state)
    seq = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 40))
    ends = chunks + list(range(chunks[-1] + 1, len(seq) + 1))
    with torch.no_grad():
        full_t = tm(torch.tensor([seq]))[0].double().numpy()
    full_j = np.asarray(jm(jnp.asarray([seq]))[0], np.float64)
    cached_t = _cached_steps(tm, _torch_forward, seq, chunks)
    cached_j = _cached_steps(jm, _jax_forward, seq, chunks)
    rows = [e - 1 for e in ends]
    assert np.abs(full_t).max() > 1.0
    assert np.abs(cached_t - full_t[rows]).max() <= 1e-5
    assert np.abs(cached_j - full_j[rows]).max() <= 1e-5


def test_cache_is_not_part_of_the_state():
    cfg = _cfg("tiny")
    tm, jm = gptmod_torch.GPT(cfg), gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    keys_t, keys_j = set(gptmod_torch.export_state(tm)), set(gptmod_jax.export_state(jm))
    tm.setup_cache(2, 32)
    jm.setup_cache(2, 32)
    assert (
        set(gptmod_torch.export_state(tm)) == keys_t and set(gptmod_jax.export_state(jm)) == keys_j
    )
    assert tuple(tm.blocks[1].attn.kv_cache.k.shape) == (2, cfg.n_kv_head, 32, cfg.head_dim)
    # JAX keeps keys transposed, (B, K, H, S), the layout XLA's CPU dot
    # reads fastest (cached_attention).
    assert tuple(jm.blocks[1].attn.kv_cache.k.shape) == (2, cfg.n_kv_head, cfg.head_dim, 32)
    assert tuple(jm.blocks[1].attn.kv_cache.v.shape) == (2, cfg.n_kv_head, 32, cfg.head_dim)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cache_capacity_is_checked_not_clamped(framework):
    cfg = _cfg("tiny")
    model = gptmod_torch.GPT(cfg) if framework == "torch" else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    arr = torch.tensor if framework == "torch" else jnp.asarray
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match=r"positions: 6\.\.8 exceed the KV cache capacity 8"):
        model(arr([[1, 2, 3]]), arr([[6, 7, 8]]))
    with pytest.raises(ValueError, match="pass \\(batch, time\\) positions"):
        model(arr([[1, 2, 3]]))
    with pytest.raises(ValueError, match="does not match the KV cache batch 1"):
        model(arr([[1], [2]]), arr([[0], [0]]))
    model.clear_cache()
    with pytest.raises(ValueError, match="only meaningful with a KV cache"):
        model(arr([[1]]), arr([[0]]))
    with pytest.raises(ValueError, match=r"cache max_len=300: must be in \[1, max_seq_len=256\]"):
        model.setup_cache(1, 300)


# ----------------------------------------------------------------------------- generation


def test_greedy_tokens_identical_across_frameworks(pair):
    _, tm, jm = pair
    out_t = tg.generate(tm, PROMPTS, 64)
    out_j = jg.generate(jm, PROMPTS, 64)
    assert [len(r) for r in out_t] == [64, 64, 64]
    assert out_t == out_j
    assert min(len(set(r)) for r in out_t) >= 8, "degenerate output proves little"
    # Greedy means: each token is the argmax of the full forward over everything before it.
    seq = PROMPTS[1] + out_t[1]
    with torch.no_grad():
        pred = tm(torch.tensor([seq]))[0, len(PROMPTS[1]) - 1 : -1].argmax(-1).tolist()
    assert pred == out_t[1]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ragged_batch_equals_rows_alone(pair, framework):
    _, tm, jm = pair
    gen, model = (tg.generate, tm) if framework == "torch" else (jg.generate, jm)
    batch = gen(model, PROMPTS, 24)
    for prompt, row in zip(PROMPTS, batch, strict=True):
        assert gen(model, [prompt], 24) == [row]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_sampling_reproducible_and_seed_matters(framework):
    cfg = _cfg("tiny")
    state = _state(cfg)
    gen, model = (
        (tg.generate, torch_model(cfg, state))
        if framework == "torch"
        else (jg.generate, jax_model(cfg, state))
    )
    kw = dict(temperature=1.0, top_k=200, top_p=0.95, min_p=0.01)
    a = gen(model, PROMPTS, 32, seed=7, **kw)
    assert a == gen(model, PROMPTS, 32, seed=7, **kw)
    assert a != gen(model, PROMPTS, 32, seed=8, **kw)
    assert a != gen(model, PROMPTS, 32, temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_stream_equals_one_shot(framework):
    cfg = _cfg("tiny")
    state = _state(cfg)
    if framework == "torch":
        model, gen, stream = torch_model(cfg, state), tg.generate, tg.generate_stream
    else:
        model, gen, stream = jax_model(cfg, state), jg.generate, jg.generate_stream
    kw = dict(temperature=0.9, top_k=50, seed=3)
    steps = list(stream(model, PROMPTS, 20, **kw))
    assert len(steps) == 20 and all(len(s) == 3 for s in steps)
    assert [[s[b] for s in steps] for b in range(3)] == gen(model, PROMPTS, 20, **kw)
    assert model.blocks[0].attn.kv_cache is None  # the caller's model is left without a cache


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_eos_stops_each_row(pair, framework):
    _, tm, jm = pair
    gen, stream, model = (
        (tg.generate, tg.generate_stream, tm)
        if framework == "torch"
        else (jg.generate, jg.generate_stream, jm)
    )
    free = gen(model, PROMPTS, 16)
    eos = free[0][3]  # row 0 emits it at step 3; the others may or may not
    out = gen(model, PROMPTS, 16, eos_id=eos)
    for free_row, row in zip(free, out, strict=True):
        cut = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert row == free_row[:cut]
    assert out[0][-1] == eos and len(out[0]) == free[0].index(eos) + 1
    steps = list(stream(model, PROMPTS, 16, eos_id=eos))
    assert all(s[0] is None for s in steps[len(out[0]) :])


@pytest.mark.slow
def test_jax_scanned_layers_give_the_same_tokens(pair):
    _, _, jm = pair
    assert jg.generate(jm, PROMPTS, 24, scan_layers=True) == jg.generate(jm, PROMPTS, 24)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95, seed=3)
    assert jg.generate(jm, PROMPTS, 16, scan_layers=True, **kw) == jg.generate(
        jm, PROMPTS, 16, **kw
    )
    eos = jg.generate(jm, PROMPTS, 8)[0][3]
    assert jg.generate(jm, PROMPTS, 8, eos_id=eos, scan_layers=True) == jg.generate(
        jm, PROMPTS, 8, eos_id=eos
    )


def test_jax_scanned_program_holds_one_block():
    # The point of scanning is compile time: the lowered program has one
    # block's matmuls, not n_layer copies.
    from gptmod.sampling import plan

    cfg = dataclasses.replace(_cfg("tiny"), n_layer=6)
    jm = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(jm, nnx.Param)
    knobs, flags = jg._split_params(SamplingParams(0.0, None, None, None, None, 0))
    p = plan([[1, 2, 3]], 8, cfg)

    def dots(scan: bool) -> int:
        lowered = jg._generate.lower(
            graphdef,
            params,
            jnp.zeros((1, p.prompt_len), jnp.int32),
            jnp.array([3]),
            jnp.ones((1,), bool),  # live rows
            jnp.int32(8),
            knobs,
            jax.random.key(0),
            plan=p,
            flags=flags,
            scan_layers=scan,
        )
        return lowered.as_text().count("stablehlo.dot_general")

    unrolled, scanned = dots(False), dots(True)
    # Per block: q, k, v, o, gate, up, down and the two attention products,
    # in prefill and in the decode step.
    assert unrolled >= 2 * 9 * cfg.n_layer
    assert scanned <= unrolled / cfg.n_layer + 4


@pytest.mark.slow
def test_jax_prompt_buckets_reuse_compilations():
    cfg = _cfg("tiny")
    model = jax_model(cfg, _state(cfg))
    jg.generate(model, [[1, 2, 3]], 8)
    n0 = jg._generate._cache_size()
    jg.generate(model, [[4, 5, 6, 7, 8, 9, 10, 11, 12]], 12)  # 9 and 12 tokens: the same 16-buckets
    assert jg._generate._cache_size() == n0
    jg.generate(model, [list(range(1, 18))], 8)  # a 17-token prompt: the 32-bucket compiles once
    assert jg._generate._cache_size() == n0 + 1
    # sampling with top-k: another program
    jg.generate(model, [[1, 2]], 8, temperature=0.5, top_k=3)
    # new values: the same program
    jg.generate(model, [[1, 2, 3, 4]], 9, temperature=0.8, top_k=7, seed=5)
    assert jg._generate._cache_size() == n0 + 2


@pytest.mark.slow
def test_torch_compiled_decode_matches_eager():
    cfg = _cfg("tiny")
    model = torch_model(cfg, _state(cfg))
    assert tg.generate(model, PROMPTS, 12, compile=True) == tg.generate(model, PROMPTS, 12)


# ----------------------------------------------------------------------------- sampling filters


FILTERS = [
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=100, top_p=0.8, min_p=0.02),
    dict(temperature=1.0, top_p=1.0),
]


@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_filters_allow_the_same_tokens_in_both(kw):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(6, 1000)).astype(np.float32)
    params = SamplingParams(**kw)
    allowed_t = np.isfinite(
        tg.filter_logits(torch.from_numpy(logits), *tg._split_params(params)).numpy()
    )
    allowed_j = np.isfinite(
        np.asarray(jg.filter_logits(jnp.asarray(logits), *jg._split_params(params)))
    )
    assert np.array_equal(allowed_t, allowed_j)
    probs = np.exp(logits.astype(np.float64) / kw["temperature"])
    probs /= probs.sum(-1, keepdims=True)
    if list(kw) == ["temperature", "top_k"]:
        assert (allowed_t.sum(-1) == kw["top_k"]).all()
        assert np.array_equal(allowed_t, logits >= np.sort(logits, -1)[:, -kw["top_k"]][:, None])
    if kw.get("top_p") == 1.0:
        assert allowed_t.all()  # p = 1 keeps everything
    if list(kw) == ["temperature", "top_p"] and kw["top_p"] < 1:
        for p_row, a_row in zip(probs, allowed_t, strict=True):
            order = np.sort(p_row)[::-1]
            n = a_row.sum()
            assert order[:n].sum() >= kw["top_p"] - 1e-6 and order[: n - 1].sum() < kw["top_p"]
    if list(kw) == ["temperature", "min_p"]:
        assert np.array_equal(allowed_t, probs >= kw["min_p"] * probs.max(-1, keepdims=True))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(temperature=-0.1), "temperature=-0.1: must be a finite number >= 0"),
        (dict(top_k=0), "top_k=0: must be an int >= 1"),
        (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
        (dict(min_p=1.5), r"min_p=1.5: must be in \[0, 1\]"),
        (dict(min_p=-0.1), r"min_p=-0.1: must be in \[0, 1\]"),
        (dict(top_k=10**6), "top_k=1000000: must be <= vocab_size=50257"),
        (dict(eos_id=50257), r"eos_id=50257: out of range"),
    ],
)
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_sampling_values(framework, kw, msg):
    cfg = load_preset("tiny")
    model = gptmod_torch.GPT(cfg) if framework == "torch" else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    gen = tg.generate if framework == "torch" else jg.generate
    with pytest.raises(ValueError, match=msg):
        gen(model, [[1, 2]], 4, **kw)


@pytest.mark.parametrize(
    ("prompts", "max_new", "msg"),
    [
        (
            [[1, 2]],
            255,
            r"2 prompt tokens \+ max_new_tokens=255 = 257 exceeds the "
            r"cache capacity max_seq_len=256",
        ),
        ([[1, 50257]], 4, r"prompts\[0\]: token id 50257 is out of range"),
        ([[1], [-3]], 4, r"prompts\[1\]: token id -3 is out of range"),
        ([[1], []], 4, r"prompts\[1\]: expected a non-empty list"),
        ([], 4, "prompts: expected a non-empty list"),
        ("hello", 4, "prompts: expected a non-empty list"),
        ([[1, 2.5]], 4, r"token 2.5 is not an integer id"),
        ([[1]], 0, "max_new_tokens=0: must be an int >= 1"),
    ],
)
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_requests(framework, prompts, max_new, msg):
    cfg = load_preset("tiny")
    model = gptmod_torch.GPT(cfg) if framework == "torch" else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    gen = tg.generate if framework == "torch" else jg.generate
    with pytest.raises(ValueError, match=msg):
        gen(model, prompts, max_new)
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="already holds a KV cache"):
        gen(model, [[1]], 2)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_argmax_is_the_first_maximum_and_nan_wins(framework):
    logits = np.array(
        [
            [0.0, 3.0, 1.0, 3.0],
            [np.nan, 1.0, np.nan, 2.0],
            [-1.0, -2.0, 5.0, np.nan],
            [2.0, 2.0, 2.0, 2.0],
        ],
        np.float32,
    )
    if framework == "torch":
        got = tg.argmax(torch.from_numpy(logits)).tolist()
    else:
        got = np.asarray(jg.argmax(jnp.asarray(logits))).tolist()
    assert got == [1, 0, 3, 0] == np.argmax(logits, axis=-1).tolist()
    big = np.random.default_rng(0).standard_normal((8, 50257)).astype(np.float32)
    assert np.asarray(jg.argmax(jnp.asarray(big))).tolist() == big.argmax(-1).tolist()


# ----------------------------------------------------------------------------- several stop ids


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = _cfg("tiny")
    state = _state(cfg)
    return cfg, torch_model(cfg, state), jax_model(cfg, state)


def _twin(framework, tiny_pair):
    _, tm, jm = tiny_pair
    return (tg, tm) if framework == "torch" else (jg, jm)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_several_stop_ids_end_each_row_at_the_first_of_them(tiny_pair, framework):
    gen, model = _twin(framework, tiny_pair)
    free = gen.generate(model, PROMPTS, 16)
    a, b = free[0][5], free[1][0]  # b ends row 1 at its very first (prefilled) token
    stops = (a, b)
    out = gen.generate(model, PROMPTS, 16, eos_id=[a, b])
    for free_row, row in zip(free, out, strict=True):
        cuts = [i for i, t in enumerate(free_row) if t in stops]
        assert row == (free_row[: cuts[0] + 1] if cuts else free_row)
    assert len(out[1]) == 1 and out[0][-1] in stops
    assert gen.generate(model, PROMPTS, 16, eos_id=(b, a)) == out
    assert gen.generate(model, PROMPTS, 16, eos_id=[np.int64(a)]) == gen.generate(
        model, PROMPTS, 16, eos_id=a
    )
    assert gen.generate(model, PROMPTS, 16, eos_id=[]) == free
    steps = list(gen.generate_stream(model, PROMPTS, 16, eos_id=[a, b]))
    assert [[s[r] for s in steps if s[r] is not None] for r in range(3)] == out
    assert len(steps) == max(len(r) for r in out)  # the stream ends once every row has stopped


def test_jax_stop_ids_are_traced_not_compiled_in():
    cfg = _cfg("tiny")
    model = jax_model(cfg, _state(cfg))
    jg.generate(model, [[1, 2, 3]], 8, eos_id=5)
    n0 = jg._generate._cache_size()
    jg.generate(model, [[1, 2, 3]], 8, eos_id=[7, 9, 11])
    jg.generate(model, [[1, 2, 3]], 8, eos_id=(1, 2, 3, 4))
    assert jg._generate._cache_size() == n0  # up to four ids: one (4,) int32 array of values
    jg.generate(model, [[1, 2, 3]], 8, eos_id=list(range(5)))
    assert jg._generate._cache_size() == n0 + 1  # five: the next size, (8,)
    assert SamplingParams(eos_id=[np.int32(2), 5]).knob_values()[-1] == (2, 5, -1, -1)
    assert (
        SamplingParams(eos_id=np.int64(3)).eos_id == 3 and SamplingParams(eos_id=None).eos_ids == ()
    )


@pytest.mark.parametrize(
    ("eos_id", "msg"),
    [
        (True, "eos_id=True: must be an int token id, a sequence of them, or None"),
        ("2", "eos_id='2': must be an int token id, a sequence of them, or None"),
        (2.0, "eos_id=2.0: must be an int token id, a sequence of them, or None"),
        ([1, 2.0], r"eos_id\[1\]=2.0: must be an int token id"),
        ([1, None], r"eos_id\[1\]=None: must be an int token id"),
        ([1, 50257], r"eos_id\[1\]=50257: out of range \[0, vocab_size=50257\)"),
        ((-1,), r"eos_id\[0\]=-1: out of range"),
    ],
)
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_stop_ids(framework, eos_id, msg):
    cfg = load_preset("tiny")
    model = gptmod_torch.GPT(cfg) if framework == "torch" else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    gen = tg if framework == "torch" else jg
    with pytest.raises(ValueError, match=msg):
        gen.generate(model, [[1, 2]], 4, eos_id=eos_id)
    with pytest.raises(ValueError, match=msg.replace("eos_id", "stop_ids")):
        gen.Session(model).stream([1, 2], 4, stop_ids=eos_id)


# ----------------------------------------------------------------- sessions: the cache across turns


def _full_logits(framework, model, ids):
    """Next-token logits of a plain forward over the whole context, without any cache."""
    if framework == "torch":
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -1].numpy()
    return np.asarray(model(jnp.asarray([ids]))[0, -1])


def _close(got, want):
    # fp32 noise: the parity budget's 2e-5 of the largest logit.
    return np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


A, B, C = [5, 17, 99, 3, 250, 41, 7], [120, 8, 66], [33, 1, 4, 1, 5]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_reuses_the_prefix_with_the_tokens_and_logits_of_a_fresh_prefill(
    tiny_pair, framework
):
    gen, model = _twin(framework, tiny_pair)
    s = gen.Session(model)
    r1 = list(s.stream(A, 10))
    assert r1 == gen.generate(model, [A], 10)[0]
    assert (s.last_prefill, s.last_reused) == (len(A), 0)
    assert s.tokens == A + r1[:-1]  # the last token was yielded, never fed
    ctx = A + r1 + B
    r2 = list(s.stream(ctx, 12))
    assert (s.last_reused, s.last_prefill) == (len(A) + len(r1) - 1, len(B) + 1)
    assert r2 == gen.generate(model, [ctx], 12)[0]  # generate prefills the whole context afresh
    # A context the cache holds whole still prefills its last token: its logits are the answer.
    ctx3 = ctx + r2[:3]
    got = s.feed(ctx3)
    assert (s.last_reused, s.last_prefill) == (len(ctx3) - 1, 1) and s.tokens == ctx3
    assert _close(got, _full_logits(framework, model, ctx3))
    assert _close(got, gen.Session(model).feed(ctx3))
    # the cache is the session's, not left on the model
    assert model.blocks[0].attn.kv_cache is None


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_rewinds_a_divergent_history(tiny_pair, framework):
    gen, model = _twin(framework, tiny_pair)
    s = gen.Session(model)
    list(s.stream(A + B + C, 20))  # the cache now holds 34 positions
    fed = len(s.tokens)
    got = s.feed(A + C)  # diverges at len(A): what lies past it must no longer count
    assert (s.last_reused, s.last_prefill) == (len(A), len(C)) and fed > len(A + C)
    assert _close(got, _full_logits(framework, model, A + C))
    assert list(s.stream(A + C, 12)) == gen.generate(model, [A + C], 12)[0]
    s.reset()
    assert (s.tokens, s.capacity) == ([], 0)
    assert list(s.stream(B, 6)) == gen.generate(model, [B], 6)[0] and s.last_reused == 0


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_stop_ids_and_an_abandoned_stream(tiny_pair, framework):
    gen, model = _twin(framework, tiny_pair)
    free = gen.generate(model, [A], 12)[0]
    stop = free[4]
    s = gen.Session(model)
    reply = list(s.stream(A, 12, stop_ids=[stop, 50000]))
    assert reply == free[: free.index(stop) + 1] and s.tokens == A + reply[:-1]
    # Stop iterating after three tokens: the cache holds what was fed, and
    # the next turn builds on it.
    it = s.stream([*A, 9, 9], 10)
    part = [next(it) for _ in range(3)]
    it.close()
    assert s.tokens == [*A, 9, 9, *part[:2]]
    ctx = [*A, 9, 9, *part, 3]
    assert (
        list(s.stream(ctx, 6)) == gen.generate(model, [ctx], 6)[0] and s.last_reused == len(A) + 4
    )


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_sampling_follows_generate_with_the_same_seed(tiny_pair, framework):
    gen, model = _twin(framework, tiny_pair)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95, seed=3)
    s = gen.Session(model)
    assert list(s.stream(A, 12, **kw)) == gen.generate(model, [A], 12, **kw)[0]
    assert list(s.stream(A, 12, **kw)) != list(s.stream(A, 12, **{**kw, "seed": 4}))


def test_sessions_agree_across_frameworks(tiny_pair):
    _, tm, jm = tiny_pair
    out = {}
    for name, gen, model in (("torch", tg, tm), ("jax", jg, jm)):
        s, ctx, turns = gen.Session(model), [], []
        for user in (A, B, C):
            ctx = ctx + user
            turns.append(list(s.stream(ctx, 16)))
            ctx = ctx + turns[-1]
        out[name] = turns
    assert out["torch"] == out["jax"]
    assert min(len(set(t)) for t in out["torch"]) >= 4, "degenerate output proves little"


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_cache_grows_lazily_and_a_full_context_is_refused(framework):
    cfg = dataclasses.replace(_cfg("tiny"), max_seq_len=1024)
    state = _state(cfg)
    model = torch_model(cfg, state) if framework == "torch" else jax_model(cfg, state)
    gen = tg if framework == "torch" else jg
    s = gen.Session(model)
    assert (s.max_len, s.capacity) == (1024, 0)
    r1 = list(s.stream(A, 4))
    assert s.capacity == 256  # not max_seq_len
    long = A + r1 + list(np.random.default_rng(1).integers(0, cfg.vocab_size, 300))
    r2 = list(s.stream(long, 4))
    # the cached prefix survived the growth
    assert s.capacity == 512 and s.last_reused == len(A) + 3
    assert r2 == gen.generate(model, [long], 4)[0]
    assert _close(s.feed(long + r2), _full_logits(framework, model, long + r2))
    small = gen.Session(model, max_len=40)
    with pytest.raises(
        ContextFullError,
        match=r"the conversation's 30 tokens \+ max_new_tokens=11 = 41 exceed the "
        r"session's capacity max_len=40",
    ):
        small.stream(list(range(1, 31)), 11)
    assert small.capacity == 0 and small.tokens == []  # refused before anything ran
    assert len(list(small.stream(list(range(1, 31)), 10))) == 10 and small.capacity == 40
    with pytest.raises(
        ValueError, match=r"max_len=2000: must be an int in \[1, max_seq_len=1024\]"
    ):
        gen.Session(model, max_len=2000)
    with pytest.raises(ValueError, match="ids: expected a non-empty list of token ids"):
        s.stream([], 4)
    with pytest.raises(ValueError, match=r"ids: token id 50257 is out of range"):
        s.feed([1, 50257])
    with pytest.raises(ValueError, match="max_new_tokens=0: must be an int >= 1"):
        s.stream([1], 0)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_session_leaves_the_model_free_between_turns(tiny_pair, framework):
    gen, model = _twin(framework, tiny_pair)
    s = gen.Session(model)
    r1 = list(s.stream(A, 8))
    # generate still runs in between
    assert gen.generate(model, PROMPTS, 4) == gen.generate(model, PROMPTS, 4)
    ctx = A + r1 + B
    assert (
        list(s.stream(ctx, 8)) == gen.generate(model, [ctx], 8)[0] and s.last_reused == len(A) + 7
    )
    model.setup_cache(1, 16)
    try:
        with pytest.raises(ValueError, match="Session: the model already holds a KV cache"):
            list(gen.Session(model).stream(A, 4))
    finally:
        model.clear_cache()


@pytest.mark.slow
def test_jax_session_padding_is_written_past_the_context_and_never_seen():
    cfg = _cfg("tiny")
    model = jax_model(cfg, _state(cfg))
    s = jg.Session(model)
    s.feed(A)  # 7 tokens in a 16-bucket: 9 padding positions written after them
    values = [x for x in jax.tree.leaves(s._cache) if x.shape[2] == s.capacity]  # (1, K, S, H)
    assert len(values) == cfg.n_layer
    v = np.asarray(values[0])
    assert np.abs(v[:, :, len(A) : 16]).min(axis=-1).max() > 0  # the padding did land in the cache
    assert not v[:, :, 16:].any()
    # The next real tokens overwrite positions 7, 8, ... before any query can see them.
    for extra in ([9], [9, 4, 2]):
        assert _close(s.feed(A + extra), _full_logits("jax", model, A + extra))
    # New parts of 1..16 tokens share one prefill program per cache size.
    n0 = jg._extend_step._cache_size()
    s.feed([*A, 9, 4, 2, *list(range(10, 22))])
    assert jg._extend_step._cache_size() == n0


def test_jax_session_recovers_a_cache_lost_to_an_interrupted_step():
    cfg = _cfg("tiny")
    model = jax_model(cfg, _state(cfg))
    s = jg.Session(model)
    r1 = list(s.stream(A, 6))
    # what a Ctrl-C between donating the cache and receiving it leaves
    for x in jax.tree.leaves(s._cache):
        x.delete()
    ctx = A + r1 + B
    assert list(s.stream(ctx, 6)) == jg.generate(model, [ctx], 6)[0]
    assert (s.last_reused, s.last_prefill) == (0, len(ctx))  # started again from an empty cache


@pytest.mark.slow
def test_torch_compiled_session_matches_eager(tiny_pair):
    _, tm, _ = tiny_pair
    out = {}
    for compile in (False, True):
        s = tg.Session(tm, compile=compile)
        out[compile] = [list(s.stream(A, 10)), list(s.stream([*A, 3, 4], 10)), s.last_reused]
    assert out[True] == out[False] and out[True][-1] == len(A)


# ---------------------------------------------------------------------- compile modes (CUDA graphs)


@pytest.mark.parametrize(
    ("compile", "mode"),
    [
        (False, None),
        (True, "default"),
        ("default", "default"),
        ("reduce-overhead", "reduce-overhead"),
    ],
)
def test_compile_modes(compile, mode):
    assert tg.compile_mode(compile) == mode


@pytest.mark.parametrize("compile", ["max-autotune", "reduce_overhead", "", None, 1])
def test_an_unknown_compile_mode_is_refused_naming_it(compile):
    cfg = _cfg("tiny")
    model = torch_model(cfg, _state(cfg))
    msg = (
        rf"compile={compile!r}: choose False \(eager\), True \(= 'default'\) or one of "
        r"'default', 'reduce-overhead'"
    )
    for call in (
        lambda: tg.generate(model, PROMPTS, 4, compile=compile),
        lambda: tg.Session(model, compile=compile),
    ):
        with pytest.raises(ValueError, match=msg):
            call()
    assert model.blocks[0].attn.kv_cache is None


def test_reduce_overhead_refuses_a_model_off_cuda():
    cfg = _cfg("tiny")
    model = torch_model(cfg, _state(cfg))
    msg = (
        "compile='reduce-overhead' captures CUDA graphs and needs the model on a "
        "CUDA device, but it is on cpu"
    )
    calls = (
        lambda: tg.generate(model, PROMPTS, 4, compile="reduce-overhead"),
        lambda: next(tg.generate_stream(model, PROMPTS, 4, compile="reduce-overhead")),
        lambda: tg.Session(model, compile="reduce-overhead"),
    )
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    assert model.blocks[0].attn.kv_cache is None and not tg._graph_caches.get(model)


class FakeCompiler:
    """torch.compile stand-in that records its kwargs and, for mode="reduce-overhead", imitates a
    CUDA-graph replay: the step runs eagerly, its output is copied into one static buffer per shape
    and that buffer is returned, so the next replay overwrites what an earlier call returned (as
    cudagraph trees do)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.replays = 0
        self.marks: list[int] = []  # the replay count at each cudagraph_mark_step_begin

    def compile(self, fn, **kw):
        self.calls.append(kw)
        static: dict[tuple, torch.Tensor] = {}

        def compiled(*args):
            out = fn(*args)
            if kw.get("mode") != "reduce-overhead":
                return out
            self.replays += 1
            buf = static.setdefault(tuple(out.shape), torch.empty_like(out))
            return buf.copy_(out)

        return compiled

    def mark_step_begin(self):
        self.marks.append(self.replays)


@pytest.fixture
def fake_compiler(monkeypatch):
    fake = FakeCompiler()
    monkeypatch.setattr(torch, "compile", fake.compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", fake.mark_step_begin)
    monkeypatch.setattr(tg, "_compiled", {})  # nothing compiled by an earlier test is reused
    return fake


def test_compile_true_is_default_mode_and_is_compiled_once(fake_compiler):
    cfg = _cfg("tiny")
    model = torch_model(cfg, _state(cfg))
    eager = tg.generate(model, PROMPTS, 6)
    for compile in (True, "default", True):
        assert tg.generate(model, PROMPTS, 6, compile=compile) == eager
    assert list(tg.Session(model, compile="default").stream(PROMPTS[0], 6)) == eager[0]
    # one step, one compile
    assert fake_compiler.calls == [dict(fullgraph=True, dynamic=False, mode="default")]
    assert fake_compiler.marks == []  # no CUDA-graph step boundaries outside "reduce-overhead"


def test_cudagraph_step_marks_each_step_and_returns_what_the_next_replay_cannot_overwrite(
    fake_compiler,
):
    compiled = fake_compiler.compile(lambda x: x * 2, mode="reduce-overhead")
    raw_1 = compiled(torch.ones(3))
    compiled(torch.zeros(3))
    # the fake is honest: a replay overwrites its earlier output
    assert raw_1.tolist() == [0.0, 0.0, 0.0]
    step = tg._graph_step(compiled)
    out_1 = step(torch.ones(3))
    out_2 = step(torch.full((3,), 5.0))
    assert out_1.tolist() == [2.0, 2.0, 2.0] and out_2.tolist() == [10.0, 10.0, 10.0]
    assert fake_compiler.marks == [2, 3]  # marked before each replay, never after


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.9, top_k=20, seed=3)])
def test_reduce_overhead_generate_replays_with_stable_cache_addresses(
    fake_compiler, monkeypatch, kw
):
    cfg = _cfg("tiny")
    model = torch_model(cfg, _state(cfg))
    eager = tg.generate(model, PROMPTS, 9, **kw)
    # the CUDA check passes; the rest runs on the CPU
    monkeypatch.setattr(tg, "_device_type", lambda model: "cuda")
    ptrs = []
    install = tg._setup_cache

    def spy(model, batch, cache_len, mode):
        install(model, batch, cache_len, mode)
        ptrs.append(
            [(b.attn.kv_cache.k.data_ptr(), b.attn.kv_cache.v.data_ptr()) for b in model.blocks]
        )

    monkeypatch.setattr(tg, "_setup_cache", spy)
    for _ in range(3):
        assert tg.generate(model, PROMPTS, 9, compile="reduce-overhead", **kw) == eager
    assert fake_compiler.calls == [dict(fullgraph=True, dynamic=False, mode="reduce-overhead")]
    # the same buffers every call: the captured graph stays valid
    assert ptrs[0] == ptrs[1] == ptrs[2]
    # one mark before each of the 8 decode steps per call
    assert fake_compiler.marks == list(range(3 * 8))
    # off the model between calls, as after any generate
    assert model.blocks[0].attn.kv_cache is None
    # A reused cache is zeroed: nothing from the last call survives past what this one wrote.
    (caches,) = tg._graph_caches[model].values()
    assert all(int(c.k.count_nonzero()) > 0 for c in caches)  # (the last call wrote them)
    # rows run: bucketed
    tg._setup_cache(model, batch_bucket(len(PROMPTS)), caches[0].capacity, "reduce-overhead")
    assert all(int(c.k.count_nonzero()) == int(c.v.count_nonzero()) == 0 for c in caches)
    model.clear_cache()
    # another batch: another cache of its own
    tg.generate(model, PROMPTS[:1], 9, compile="reduce-overhead", **kw)
    assert len(tg._graph_caches[model]) == 2


def test_reduce_overhead_session_and_stream_match_eager(fake_compiler, monkeypatch, tiny_pair):
    _, tm, _ = tiny_pair
    eager = tg.Session(tm)
    want = [list(eager.stream(A, 8)), list(eager.stream([*A, 3, 4], 8))]
    monkeypatch.setattr(tg, "_device_type", lambda model: "cuda")
    s = tg.Session(tm, compile="reduce-overhead")
    assert [list(s.stream(A, 8)), list(s.stream([*A, 3, 4], 8))] == want
    assert list(tg.generate_stream(tm, [A], 5, compile="reduce-overhead")) == [
        [t] for t in want[0][:5]
    ]
    assert [c["mode"] for c in fake_compiler.calls] == ["reduce-overhead"]


@pytest.mark.parametrize(
    ("framework", "backend"), [("torch", "sdpa"), ("jax", "auto"), ("jax", "reference")]
)
def test_a_prefill_from_key_0_attends_without_a_mask_and_equals_the_masked_one(
    framework, backend, monkeypatch
):
    """prefill without start_B hands cached_attention no mask, and it runs plain
    causal attention over the cache's first T keys (FlashAttention and cuDNN take it;
    JAX's XLA path, "auto" on a CPU, keeps its own einsum with the causal mask). Stale
    keys after T cannot leak in. Its logits and cache equal the masked prefill's
    (explicit positions 0..T-1), which the full forward is tested against."""
    cfg = reduced("tiny")
    state = torch_pair_state(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
    # ragged: row 1's padding is after its last token, so causal alone suffices
    lens = np.array([9, 6])
    twin = tg if framework == "torch" else jg
    mod = importlib.import_module(f"gptmod_{framework}.model")
    # The cached attention the default model runs: JAX's is kernels.py's
    # (the cache layouts), torch's model.py's.
    cached_mod = importlib.import_module("gptmod_jax.kernels") if framework == "jax" else mod
    # the mask each layer's cached_attention and attention were given
    masks, attention_masks = ([], [])
    cached, attention = cached_mod.cached_attention, mod.attention
    monkeypatch.setattr(
        cached_mod,
        "cached_attention",
        lambda *a, **kw: masks.append(kw["mask_BTS"]) or cached(*a, **kw),
    )
    monkeypatch.setattr(
        mod,
        "attention",
        lambda *a, **kw: attention_masks.append(kw.get("mask_BTS")) or attention(*a, **kw),
    )

    def run(start):
        if framework == "torch":
            model = torch_model(cfg, state, backend=backend)
            model.setup_cache(2, 16)
            for block in model.blocks:  # stale keys and values after T, as a reused cache holds
                block.attn.kv_cache.k.fill_(1e3)
                block.attn.kv_cache.v.fill_(1e3)
            with torch.no_grad():
                logits = twin.prefill(
                    model,
                    torch.from_numpy(tokens),
                    torch.from_numpy(lens),
                    None if start is None else torch.from_numpy(start),
                )
            k = model.blocks[0].attn.kv_cache.k[:, :, :9]
            return logits.numpy(), k.numpy()
        model = jax_model(cfg, state, backend=backend)
        model.setup_cache(2, 16)
        for block in model.blocks:
            block.attn.kv_cache.k[...] = jnp.full_like(block.attn.kv_cache.k[...], 1e3)
            block.attn.kv_cache.v[...] = jnp.full_like(block.attn.kv_cache.v[...], 1e3)
        start = None if start is None else jnp.asarray(start)
        logits = twin.prefill(model, jnp.asarray(tokens), jnp.asarray(lens), start)
        return np.asarray(logits), np.asarray(model.blocks[0].attn.kv_cache.k[...][..., :9])

    plain, k_plain = run(None)
    assert len(masks) == cfg.n_layer and all(m is None for m in masks)
    if (framework, backend) == ("jax", "auto"):  # XLA on a CPU: the cached einsum, not attention
        assert attention_masks == []
    else:  # plain causal attention: SDPA's is_causal, the reference's tril
        assert len(attention_masks) == cfg.n_layer and all(m is None for m in attention_masks)
    masks.clear()
    masked, k_masked = run(np.zeros(2, np.int64))
    assert len(masks) == cfg.n_layer and all(m is not None for m in masks)
    np.testing.assert_allclose(plain, masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(k_plain, k_masked)  # layer 0: the same cache write either way


def test_jax_generate_lowers_in_float16_on_the_cpu():
    """float16 under jit on the CPU: jax.nn.dot_product_attention's XLA path cannot lower it there
    (F16_F16_F32 dot_general), so the cached prefill keeps the twin's own XLA attention and generate
    runs. (A full forward without a cache goes through dot_product_attention and still cannot: a
    known limit of float16 on the CPU.)"""
    cfg = reduced("tiny")
    model = gptmod_jax.load_state(
        gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), dtype=jnp.float16), torch_pair_state(cfg)
    )
    out = jg.generate(model, [[5, 9, 2, 7], [3, 1]], 6)
    assert [len(row) for row in out] == [6, 6] and all(
        0 <= t < cfg.vocab_size for row in out for t in row
    )
