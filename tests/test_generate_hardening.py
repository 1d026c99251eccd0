"""Issue 17, generation: batch buckets (torch.compile, JAX executables), NaN
instead of wrong logits under jit, tiny temperatures, named errors,
ignored-filter warnings, the CLI's "compiling…" line and seed bounds."""

from __future__ import annotations

import importlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod.config import ModelConfig
from gptmod.sampling import IgnoredFiltersWarning, SamplingParams

jg = importlib.import_module("gptmod_jax.generate")
tg = importlib.import_module("gptmod_torch.generate")

CFG = ModelConfig(
    vocab_size=97,
    max_seq_len=64,
    n_layer=1,
    n_head=2,
    n_kv_head=1,
    d_model=16,
    d_ff=32,
    tie_embeddings=False,
)
PROMPTS = [[5, 17, 9], [3], [1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tm = gptmod_torch.GPT(CFG).eval()
    with torch.no_grad():  # larger weights: varied tokens, not one repeated id
        for p in tm.parameters():
            if p.ndim == 2:
                p.mul_(8)
    jm = gptmod_jax.load_state(gptmod_jax.GPT(CFG, rngs=nnx.Rngs(0)), gptmod_torch.export_state(tm))
    return tm, jm


# ----------------------------------------------------------------- 1. torch.compile, 12 batch sizes


@pytest.mark.slow
def test_torch_compile_twelve_batch_sizes_match_eager(models):
    tm, _ = models
    for B in range(1, 13):
        prompts = [[1 + b, 2, 3] for b in range(B)]
        assert tg.generate(tm, prompts, 2, compile=True) == tg.generate(tm, prompts, 2), B


def test_torch_compiled_step_runs_with_raised_recompile_limit():
    seen = []
    step = tg._with_recompile_limit(
        lambda: seen.append(getattr(torch._dynamo.config, tg._LIMIT_NAME))
    )
    before = getattr(torch._dynamo.config, tg._LIMIT_NAME)
    step()
    assert seen == [max(tg.RECOMPILE_LIMIT, before)] and seen[0] >= 64
    # the process-wide setting is left alone
    assert getattr(torch._dynamo.config, tg._LIMIT_NAME) == before


# ----------------------------------------------------------------- 2. bad ids / positions under jit


@nnx.jit
def _jit_forward(model, idx, pos):
    return model(idx, pos)


@nnx.jit
def _jit_forward_nocache(model, idx):
    return model(idx)


@pytest.mark.parametrize("bad", [-1, CFG.vocab_size])
def test_jax_jit_bad_token_id_gives_nan(models, bad):
    _, jm = models
    logits = np.asarray(_jit_forward_nocache(jm, jnp.array([[4, bad, 7], [4, 5, 7]], jnp.int32)))
    assert np.isnan(
        logits[0, 1:]
    ).all()  # the bad token and everything that attends to it (masked 0 * NaN too)
    assert np.isfinite(logits[1]).all()  # other rows are untouched


@pytest.mark.parametrize("bad", [-1, 8, 9])
def test_jax_jit_cache_position_out_of_range_gives_nan(models, bad):
    _, jm = models
    jm.setup_cache(1, 8)
    try:
        logits = np.asarray(
            _jit_forward(jm, jnp.array([[4]], jnp.int32), jnp.array([[bad]], jnp.int32))
        )
        cache = jm.blocks[0].attn.kv_cache
        k, v = np.asarray(cache.k[...]), np.asarray(cache.v[...])
    finally:
        jm.clear_cache()
    assert np.isnan(logits).all()
    assert not k.any() and not v.any()  # the write was dropped, not wrapped onto position 7


@pytest.mark.parametrize("bad", [-1, CFG.vocab_size])
def test_torch_bad_token_id_is_a_named_error(models, bad):
    tm, _ = models
    with pytest.raises(
        ValueError, match=rf"idx: token id {bad} is out of range \[0, vocab_size=97\)"
    ):
        tm(torch.tensor([[4, bad, 7]]))


@pytest.mark.parametrize("bad", [-1, 8])
def test_cache_position_out_of_range_is_a_named_error_eager(models, bad):
    tm, jm = models
    for m, arr in ((tm, torch.tensor), (jm, jnp.array)):
        m.setup_cache(1, 8)
        try:
            with pytest.raises(
                ValueError, match=rf"positions: {bad}\.\.{bad} exceed the KV cache capacity 8"
            ):
                m(arr([[4]]), arr([[bad]]))
        finally:
            m.clear_cache()


# ----------------------------------------------------------------------------- 3. tiny temperatures


@pytest.mark.parametrize("gen", [tg, jg], ids=["torch", "jax"])
@pytest.mark.parametrize("t", [1e-38, 1e-45, 2e-38, 1e-30])
def test_tiny_temperature_is_argmax(models, gen, t):
    m = models[0] if gen is tg else models[1]
    greedy = gen.generate(m, PROMPTS, 6)
    assert gen.generate(m, PROMPTS, 6, temperature=t, seed=1) == greedy
    assert gen.generate(m, PROMPTS, 6, temperature=t, top_k=3, top_p=0.9, seed=1) == greedy


def test_greedy_threshold_is_documented_value():
    assert (
        SamplingParams(temperature=1e-38).greedy and not SamplingParams(temperature=1.2e-38).greedy
    )


# ----------------------------------------------------------------------------- 4. JAX batch buckets


def test_jax_batch_sizes_in_one_bucket_share_an_executable(models):
    _, jm = models
    jg.generate(jm, [[1, 2]] * 5, 2)
    n = jg._generate._cache_size()
    for B in (6, 7, 8):
        jg.generate(jm, [[1, 2]] * B, 2)
    assert jg._generate._cache_size() == n


@pytest.mark.parametrize("gen", [tg, jg], ids=["torch", "jax"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padding_rows_do_not_change_real_rows(models, gen, temperature):
    m = models[0] if gen is tg else models[1]
    # rows run: 4, one of them padding
    three = gen.generate(m, PROMPTS, 6, temperature=temperature, seed=4)
    four = gen.generate(
        m, [*PROMPTS, [60, 61, 62, 63, 64, 65, 66]], 6, temperature=temperature, seed=4
    )
    assert len(three) == 3 and three == four[:3]
    if temperature == 0:
        assert three == [gen.generate(m, [p], 6)[0] for p in PROMPTS]


@pytest.mark.parametrize("gen", [tg, jg], ids=["torch", "jax"])
def test_padding_rows_never_hold_up_eos(models, gen):
    m = models[0] if gen is tg else models[1]
    first = gen.generate(m, [PROMPTS[0]], 1)[0][0]
    out = gen.generate(m, [PROMPTS[0]] * 3, 8, eos_id=first)  # 3 real rows, 1 padding row
    assert out == [[first]] * 3


# ---------------------------------------------------------------------- 5. named errors, both twins


@pytest.mark.parametrize("which", ["torch", "jax"])
def test_named_model_errors(models, which):
    m = models[0] if which == "torch" else models[1]
    arr = torch.tensor if which == "torch" else jnp.array
    with pytest.raises(ValueError, match=r"idx: expected an .*\(batch, time\) .*, got list"):
        m([[1, 2]])
    with pytest.raises(ValueError, match=r"idx: batch 0: must be >= 1"):
        m(arr(np.zeros((0, 3), np.int64)))
    for bad in (-1, 0, 1.5):
        with pytest.raises(ValueError, match=rf"cache batch={bad!r}: must be an int >= 1"):
            m.setup_cache(bad)
    with pytest.raises(
        ValueError, match=r"cache max_len=65: must be in \[1, max_seq_len=64\], an int"
    ):
        m.setup_cache(1, 65)
    m.setup_cache(1, 8)
    try:
        with pytest.raises(
            ValueError, match=r"positions: expected an integer \(batch, time\) array, got .*float32"
        ):
            m(arr([[1]]), arr([[1.0]]))
    finally:
        m.clear_cache()
    gen = tg if which == "torch" else jg
    with pytest.raises(ValueError, match=r"prompts: expected a non-empty list of token-id lists"):
        gen.generate(m, [], 3)


# ------------------------------------------------------------------- 6. filters without temperature


@pytest.mark.parametrize("gen", [tg, jg], ids=["torch", "jax"])
def test_filters_at_greedy_warn(models, gen):
    m = models[0] if gen is tg else models[1]
    with pytest.warns(
        IgnoredFiltersWarning, match=r"top_k=5, min_p=0\.1 ignored: temperature=0\.0 is greedy"
    ):
        gen.generate(m, PROMPTS, 2, top_k=5, min_p=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredFiltersWarning)
        # sampling: the filters apply, no warning
        gen.generate(m, PROMPTS, 2, temperature=0.7, top_k=5)


# ----------------------------------------------------------------------------- 6 + 7. the CLI


def _cli(capsys, *extra):
    from gptmod.cli import main

    rc = main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-new-tokens", "2", *extra])
    return rc, capsys.readouterr().err.splitlines()


def test_cli_notes_ignored_filters_once(capsys):
    rc, err = _cli(capsys, "--framework", "torch", "--top-k", "5", "--top-p", "0.9")
    assert rc == 0
    notes = [line for line in err if "ignored" in line]
    assert notes == [
        "gptmod generate: note: --top-k --top-p ignored: greedy without --temperature > 0"
    ]


def test_cli_says_compiling_for_jax_only_when_it_compiles(capsys):
    rc, err = _cli(capsys, "--framework", "jax")
    assert rc == 0 and err.count("compiling…") == 1 and err.index("compiling…") == 0
    rc, err = _cli(capsys, "--framework", "torch")  # eager torch compiles nothing
    assert rc == 0 and "compiling…" not in err and not any("ignored" in line for line in err)


# ----------------------------------------------------------------------------- 8. seed bounds


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, True, 1.0])
def test_seed_out_of_range_is_named(seed):
    with pytest.raises(ValueError, match=r"seed=.*: must be an int in \[0, 2\*\*63\)"):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("gen", [tg, jg], ids=["torch", "jax"])
def test_largest_seed_samples(models, gen):
    m = models[0] if gen is tg else models[1]
    out = gen.generate(m, PROMPTS, 3, temperature=1.0, seed=2**63 - 1)
    assert [len(o) for o in out] == [3, 3, 3]
    with pytest.raises(
        ValueError, match=r"seed=9223372036854775808: must be an int in \[0, 2\*\*63\)"
    ):
        gen.generate(m, PROMPTS, 3, temperature=1.0, seed=2**63)
