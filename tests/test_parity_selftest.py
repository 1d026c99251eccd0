"""The mutation self-test (gptmod/parity/mutations.py, gptmod/parity/selftest.py): the suite
catches every mutation on the random targets the CLI's self-test uses (tiny, and gpt2/2L for GELU),
each group of mutations that share a clean baseline in one test (THE test of its power); each
mutation restores what it patched, and the compiled programs it reached are dropped on the way in
and out."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest

from gptmod.parity import mutations as mut
from gptmod.parity import selftest

from conftest import jax_model, reduced, torch_pair_state

jg = importlib.import_module("gptmod_jax.generate")  # `gptmod_jax.generate` is the function


def test_both_twins_carry_mutations():
    assert {m.twin for m in mut.MUTATIONS} == {"torch", "jax"}
    assert sum(m.twin == "torch" for m in mut.MUTATIONS) >= 3


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


def _baseline(m: mut.Mutation) -> str:
    """The clean run a mutation is judged against: its target (the first random target where it
    applies), dtype and checks."""
    target = next(t for t in selftest.random_targets() if m.applies(t.cfg) is None)
    return f"{target.name}-{m.dtype}-{'+'.join(m.checks)}"


# Mutations that share a clean baseline run together, in one process and one test, so that each
# baseline is computed once; the nine groups (5 to 70 s each on 2 cores) spread over the workers.
GROUPS: dict[str, list[str]] = {}
for _m in mut.MUTATIONS:
    GROUPS.setdefault(_baseline(_m), []).append(_m.name)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", list(GROUPS))
def test_self_test_catches_every_mutation_on_random_weights(baseline):
    """THE test of the suite's power: on its clean baseline every row passes, and under each
    mutation some row fails, numerically out of budget (or, for sampling, on the allowed tokens).
    A caught mutation changed its twin's output; leaving, each restored every attribute it patched
    (the compiled programs it reached: test_mutation_reaches_a_jitted_program)."""
    mutations = [mut.BY_NAME[name] for name in GROUPS[baseline]]
    patched = [(obj, attr, getattr(obj, attr)) for m in mutations for obj, attr, _ in m.patches()]
    results = selftest.run_self_test(
        selftest.random_targets(), selftest.OPTIONS, mutations, progress=False
    )
    assert all(getattr(obj, attr) is orig for obj, attr, orig in patched)
    assert [r.mutation for r in results] == GROUPS[baseline]
    missed = []
    for res in results:
        out_of_budget = res.ratio is not None and (
            res.ratio > 1 or all(r.startswith("sampling") for r in res.caught_by)
        )
        expected_target = "gpt2/2L" if res.mutation == "gelu-exact" else "tiny"
        if not (
            res.status == "caught"
            and res.target == expected_target
            and res.caught_by
            and res.where
            and out_of_budget
        ):
            missed.append(
                f"{res.mutation} on {res.target}: {res.status}; {res.where} "
                f"(worst ratio {res.ratio})"
            )
    assert not missed, missed
