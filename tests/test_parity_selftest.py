"""The mutation self-test (gptmod/parity/mutations.py, gptmod/parity/selftest.py): every mutation
really changes its twin and is restored exactly, and the suite catches every applicable mutation on
the tiny preset (THE test of its power)."""

from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptmod.parity import mutations as mut
from gptmod.parity import selftest
from gptmod.sampling import SamplingParams
from gptmod.training import TrainConfig

from conftest import jax_model, reduced, torch_model, torch_pair_state

jg = importlib.import_module("gptmod_jax.generate")  # `gptmod_jax.generate` is the function
tg = importlib.import_module("gptmod_torch.generate")

# How each mutation shows in its twin: the output a probe compares with and without it.
PROBES = {
    "norm-eps-x10": "forward",
    "norm-in-dtype": "forward",
    "cached-softmax-in-dtype": "cached",
    "softcap-in-dtype": "forward",
    "rope-interleaved": "forward",
    "rope-theta": "forward",
    "rope-pos-decode": "cached",
    "attn-scale": "forward",
    "gqa-tile": "forward",
    "cached-mask-strict": "cached",
    "softcap-skipped-generate": "generate-head",
    "gelu-exact": "forward",
    "silu-on-up": "forward",
    "kv-write-row0": "cached",
    "top-p-one-fewer": "filter",
    "temperature-after-filters": "filter",
    "top-k-one-more": "filter",
    "decay-everything": "train",
    "adamw-eps": "train",
}


def _cfg(m: mut.Mutation):
    cfg = reduced("tiny")
    return cfg if m.applies(cfg) is None else reduced("gpt2")


def _probe(m: mut.Mutation, kind: str, cfg, state) -> np.ndarray:
    """The mutated twin's output for `kind`, at the mutation's dtype, as float64."""
    dtype, twin = m.dtype, m.twin
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, size=(2, 12))
    if kind == "forward":
        if twin == "torch":
            with torch.no_grad():
                return torch_model(cfg, state, dtype)(torch.from_numpy(idx)).double().numpy()
        return np.asarray(jax_model(cfg, state, dtype)(jnp.asarray(idx)), np.float64)
    # a ragged batch: prefill 8 and 5 tokens, then 3 decode steps each at its own position
    if kind == "cached":
        assert twin == "jax"
        model = jax_model(cfg, state, dtype)
        model.setup_cache(2, 16)
        lens = np.array([8, 5])
        pos = np.arange(8)[None].repeat(2, 0)
        out = [np.asarray(model(jnp.asarray(idx[:, :8]), jnp.asarray(pos)), np.float64)]
        for i in range(3):
            p = (lens + i)[:, None]
            out.append(
                np.asarray(model(jnp.asarray(idx[:, 8 + i : 9 + i]), jnp.asarray(p)), np.float64)
            )
        return np.concatenate(out, axis=1)
    if kind == "generate-head":
        logits = jg.prefill(jax_model(cfg, state, dtype), jnp.asarray(idx), jnp.asarray([12, 12]))
        return np.asarray(logits, np.float64)
    # peaked logits, each filter where it binds: top-k, top-p and min-p alone, then together
    if kind == "filter":
        logits = rng.normal(size=(4, 64)) * 3
        out = []
        for kw in (
            {"top_k": 5},
            {"top_p": 0.8},
            {"min_p": 0.1},
            {"top_k": 20, "top_p": 0.9, "min_p": 0.02},
        ):
            params = SamplingParams(temperature=0.7, **kw)
            if twin == "torch":
                knobs, flags = tg._split_params(params)
                out.append(
                    tg.filter_logits(torch.from_numpy(logits).float(), knobs, flags)
                    .double()
                    .numpy()
                )
            else:
                knobs, flags = jg._split_params(params)
                out.append(
                    np.asarray(
                        jg.filter_logits(jnp.asarray(logits, jnp.float32), knobs, flags), np.float64
                    )
                )
        return np.concatenate(out)
    if kind == "train":  # two AdamW steps of the twin's trainer
        tc = TrainConfig(
            steps=4, warmup_steps=1, batch_size=2, grad_accum=1, block_size=11, lr=1e-3, min_lr=1e-4
        )
        x, y = idx[None, :, :-1], idx[None, :, 1:]
        if twin == "torch":
            import gptmod_torch
            from gptmod_torch.train import Trainer

            trainer = Trainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg), state), tc)
        else:
            from flax import nnx

            import gptmod_jax
            from gptmod_jax.train import Trainer

            trainer = Trainer(
                gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc
            )
        for _ in range(2):
            trainer.step(x, y)
        return np.concatenate(
            [v.ravel().astype(np.float64) for v in trainer.export_state().values()]
        )
    raise AssertionError(kind)


def test_probes_cover_every_mutation():
    assert set(PROBES) == set(mut.BY_NAME)
    assert sum(m.twin == "torch" for m in mut.MUTATIONS) >= 3


@pytest.mark.parametrize("name", list(mut.BY_NAME))
def test_mutation_changes_its_twin_and_is_restored(name):
    m = mut.BY_NAME[name]
    cfg = _cfg(m)
    assert m.applies(cfg) is None
    state = torch_pair_state(cfg)
    targets = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in m.patches()]
    clean = _probe(m, PROBES[name], cfg, state)
    with m.applied():
        assert all(getattr(obj, attr) is not orig for obj, attr, orig in targets)
        mutated = _probe(m, PROBES[name], cfg, state)
    assert all(getattr(obj, attr) is orig for obj, attr, orig in targets)
    restored = _probe(m, PROBES[name], cfg, state)
    assert mutated.shape == clean.shape
    assert not np.array_equal(mutated, clean), (
        f"{name}: the mutated twin's output is identical to the clean one"
    )
    # restored exactly (-inf where a filter drops a token)
    np.testing.assert_array_equal(restored, clean)


def test_mutation_reaches_a_jitted_program():
    """A jitted program that takes the graphdef as a static argument
    (Session's prefill step) sees the mutation, and after it the clean code
    again: the compiled programs are dropped on the way in and out."""
    m = mut.BY_NAME["silu-on-up"]
    cfg = reduced("tiny")
    model = jax_model(cfg, torch_pair_state(cfg))
    ids = list(range(1, 11))
    clean = jg.Session(model).feed(ids)
    with m.applied():
        mutated = jg.Session(model).feed(ids)
    restored = jg.Session(model).feed(ids)
    assert float(np.abs(mutated - clean).max()) > 1e-3
    np.testing.assert_array_equal(restored, clean)


def test_applies_names_the_missing_feature():
    gpt2, tiny = reduced("gpt2"), reduced("tiny")
    assert mut.BY_NAME["gelu-exact"].applies(tiny) == "no GELU (mlp=swiglu)"
    assert mut.BY_NAME["gelu-exact"].applies(gpt2) is None
    assert mut.BY_NAME["softcap-in-dtype"].applies(gpt2) == "no soft-cap in this config"
    assert mut.BY_NAME["rope-theta"].applies(gpt2) == "no RoPE in this config (pos=learned)"
    assert mut.BY_NAME["gqa-tile"].applies(gpt2) == "no grouped KV heads (n_kv_head = n_head = 4)"
    assert (
        mut.BY_NAME["gqa-tile"]
        .applies(dataclasses.replace(tiny, n_kv_head=1))
        .startswith("one KV head")
    )
    with pytest.raises(ValueError, match="unknown mutation\\(s\\) 'nope'"):
        mut.get(["nope"])


def test_plan_puts_each_mutation_on_the_first_random_target_it_applies_to():
    targets = [
        *selftest.random_targets(),
        selftest.Target("real", reduced("tiny", logit_softcap=None), state={}),
    ]
    plan = {(m.name, t.name): why for m, t, why in selftest._plan(targets, mut.get(None))}
    assert ("gelu-exact", "gpt2/2L") in plan and ("gelu-exact", "tiny") not in plan
    assert plan[("silu-on-up", "tiny")] is None and ("silu-on-up", "gpt2/2L") not in plan
    assert plan[("softcap-in-dtype", "real")] == "no soft-cap in this config"
    assert plan[("gelu-exact", "real")] == "no GELU (mlp=swiglu)"
    assert plan[("adamw-eps", "real")].startswith("the optimizer rows train a random copy")
    assert plan[("adamw-eps", "tiny")] is None and plan[("rope-pos-decode", "real")] is None


def test_format_results_fits_140_columns_and_wraps_long_cells():
    where = "trace (decode): block 1 attention (cached) (jax) " + "and a long note " * 30
    results = [
        selftest.Result(
            "cached-softmax-in-dtype",
            "jax",
            "smollm2",
            "bfloat16",
            "caught",
            ("trace (decode)", "cached-decode", "generate:jax-jit", "ragged"),
            12.5,
            where,
            3.0,
        ),
        selftest.Result(
            "softcap-skipped-generate",
            "jax",
            "tiny",
            "float32",
            "MISSED",
            (),
            0.4,
            "expected: sampling",
        ),
    ]
    lines = selftest.format_results(results).splitlines()
    assert max(len(line) for line in lines) <= 140
    assert lines[2].split()[:5] == ["cached-softmax-in-dtype", "jax", "smollm2", "bf16", "caught"]
    assert "12.5" in lines[2] and lines[2].endswith("  3")
    # The first result's long cells wrap onto 3 lines (the last shortened
    # with …), under their own columns.
    col = lines[0].index("caught by"), lines[0].index("localised to")
    caught = " ".join(line[col[0] : col[0] + 30].strip() for line in lines[2:5])
    assert caught.strip() == "trace (decode), cached-decode, generate:jax-jit, ragged"
    where_lines = [
        line[col[1] :].rsplit("  ", 1)[0].strip() if k == 0 else line[col[1] :].strip()
        for k, line in enumerate(lines[2:5])
    ]
    assert " ".join(where_lines).startswith(
        "trace (decode): block 1 attention (cached) (jax) and a long note"
    )
    assert where_lines[2].endswith("…")
    assert lines[5].split()[:5] == ["softcap-skipped-generate", "jax", "tiny", "fp32", "MISSED"]
    assert lines[5].split()[-3:] == ["expected:", "sampling", "0"] and len(lines) == 6
    assert selftest.summary(results) == (False, "1 caught, 1 MISSED")


# ----------------------------------------------------------------------------- the power test

BASELINES: dict = {}  # clean runs by (target, dtype, checks), shared by the cases one process runs


def _group(m: mut.Mutation) -> str:
    """Mutations that share clean baselines run in one xdist group (`-n 2 --dist loadgroup`): each
    baseline is then computed once, and the two groups of about equal cost run side by side."""
    return "train-bf16" if m.family == "train" or m.dtype != "float32" else "fp32"


@pytest.mark.parametrize(
    "name", [pytest.param(m.name, marks=pytest.mark.xdist_group(_group(m))) for m in mut.MUTATIONS]
)
def test_self_test_catches_the_mutation_on_random_weights(name):
    (res,) = selftest.run_self_test(
        selftest.random_targets(),
        selftest.OPTIONS,
        [mut.BY_NAME[name]],
        progress=False,
        baselines=BASELINES,
    )
    assert res.target == ("gpt2/2L" if name == "gelu-exact" else "tiny")
    assert res.status == "caught", (
        f"{name} on {res.target}: {res.status}; {res.where} (worst ratio {res.ratio})"
    )
    assert res.caught_by and res.where
    # A numeric catch is out of budget; the sampling rows fail on the
    # allowed tokens, not on a ratio.
    assert res.ratio is not None and (
        res.ratio > 1 or all(r.startswith("sampling") for r in res.caught_by)
    )
