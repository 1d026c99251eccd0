"""Whole-model twin tests: torch vs JAX on every preset (reduced) and on every combination of
switches, the canonical state round trip, the structural twin check and the input errors."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod.backends import BackendUnavailableError
from gptmod.config import ModelConfig, list_presets
from gptmod.weights import StateError, canonical_shapes

from conftest import (
    cast_state,
    jax_logits,
    jax_model,
    reduced,
    tokens,
    torch_logits,
    torch_model,
    torch_pair_state,
)

ROOT = Path(__file__).resolve().parents[1]


def _scaled_state(cfg: ModelConfig, seed: int = 0, scale: float = 4.0) -> dict[str, np.ndarray]:
    """Random weights with larger matrices than the 0.02 init, so that logits are O(1) and every
    layer moves them: a parity test on near-zero logits would prove little."""
    state = torch_pair_state(cfg, seed)
    return {k: (v * scale if v.ndim == 2 else v) for k, v in state.items()}


def _fp32_check(
    cfg: ModelConfig, state: dict, idx: np.ndarray, backend_t="sdpa", backend_j="auto"
) -> float:
    ref = torch_logits(torch_model(cfg, state, "float64", "math"), idx)
    lt = torch_logits(torch_model(cfg, state, "float32", backend_t), idx)
    lj = jax_logits(jax_model(cfg, state, "float32", backend_j), idx)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(ref).max() > 0.1, "logits too small for the comparison to mean anything"
    assert np.abs(lt - ref).max() <= 2e-5 * scale
    assert np.abs(lj - ref).max() <= 2e-5 * scale
    diff = float(np.abs(lt - lj).max())
    assert diff <= 2e-5 * scale
    return diff


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_reduced_torch_vs_jax(preset):
    cfg = reduced(preset)
    _fp32_check(cfg, _scaled_state(cfg), tokens(cfg, 2, cfg.max_seq_len))


SWITCHES = list(
    itertools.product(
        ["learned", "rope"],
        ["layernorm", "rmsnorm"],
        ["gelu", "swiglu"],
        [True, False],
        [None, 5.0],
        [True, False],
    )
)


@pytest.mark.parametrize("combo", range(len(SWITCHES)))
def test_every_switch_combination(combo):
    """All 2^6 combinations of the table's switches, cycling the GQA ratio (MHA, GQA, MQA)."""
    pos, norm, mlp, bias, cap, tie = SWITCHES[combo]
    n_kv_head = (4, 2, 1)[combo % 3]
    cfg = ModelConfig(
        vocab_size=101,
        max_seq_len=24,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=32,
        d_ff=48,
        pos=pos,
        norm=norm,
        mlp=mlp,
        bias=bias,
        logit_softcap=cap,
        tie_embeddings=tie,
    )
    _fp32_check(cfg, _scaled_state(cfg, seed=combo), tokens(cfg, 2, 24, seed=combo))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_randomised_configs(seed):
    rng = np.random.default_rng(seed)
    n_head = int(rng.choice([1, 2, 3, 4, 6, 8]))
    divisors = [k for k in range(1, n_head + 1) if n_head % k == 0]
    head_dim = int(rng.choice([8, 16, 32]))
    cfg = ModelConfig(
        vocab_size=int(rng.integers(50, 300)),
        max_seq_len=int(rng.integers(8, 48)),
        n_layer=int(rng.integers(1, 4)),
        n_head=n_head,
        n_kv_head=int(rng.choice(divisors)),
        d_model=n_head * head_dim,
        d_ff=int(rng.integers(16, 96)),
        pos=str(rng.choice(["learned", "rope"])),
        rope_theta=float(rng.choice([500.0, 10000.0, 1e6])),
        norm=str(rng.choice(["layernorm", "rmsnorm"])),
        norm_eps=float(rng.choice([1e-5, 1e-6])),
        mlp=str(rng.choice(["gelu", "swiglu"])),
        bias=bool(rng.integers(2)),
        logit_softcap=[None, 10.0, 30.0][int(rng.integers(3))],
        tie_embeddings=bool(rng.integers(2)),
    )
    _fp32_check(cfg, _scaled_state(cfg, seed=seed), tokens(cfg, 3, cfg.max_seq_len, seed=seed))


@pytest.mark.parametrize(
    ("backend_t", "backend_j"), [("math", "xla"), ("flash", "reference"), ("reference", "xla")]
)
def test_backends_agree_whole_model(backend_t, backend_j):
    cfg = reduced("modern-gpt2")
    _fp32_check(cfg, _scaled_state(cfg), tokens(cfg, 2, 40), backend_t, backend_j)


@pytest.mark.slow
def test_bf16_whole_model_close_to_exact():
    cfg = reduced("modern-gpt2")
    state = cast_state(_scaled_state(cfg), "bfloat16")
    idx = tokens(cfg, 2, 32)
    ref = torch_logits(torch_model(cfg, state, "float64", "math"), idx)
    lt = torch_logits(torch_model(cfg, state, "bfloat16"), idx)
    lj = jax_logits(jax_model(cfg, state, "bfloat16"), idx)
    scale = np.abs(ref).max()
    # A dozen bf16 roundings along the way (2^-8 relative each) bound the error well below 10%.
    assert np.abs(lt - ref).max() <= 0.1 * scale and np.abs(lj - ref).max() <= 0.1 * scale
    # The argmax agrees with exact arithmetic nearly everywhere.
    assert (lt.argmax(-1) == ref.argmax(-1)).mean() >= 0.9 and (
        lj.argmax(-1) == ref.argmax(-1)
    ).mean() >= 0.9


def test_soft_cap_bounds_logits():
    cfg = dataclasses.replace(reduced("modern-gpt2"), logit_softcap=2.0)
    idx = tokens(cfg, 1, 16)
    state = _scaled_state(cfg, scale=8.0)  # pre-cap logits ~10: deep in the tanh tails
    lt, lj = torch_logits(torch_model(cfg, state), idx), jax_logits(jax_model(cfg, state), idx)
    assert np.abs(lt).max() < 2.0 and np.abs(lj).max() < 2.0
    assert np.abs(lt).max() > 1.9  # it really was capping
    np.testing.assert_allclose(lt, lj, atol=1e-5)


def test_hidden_states_returned_per_layer():
    cfg = reduced("gpt2")
    state, idx = _scaled_state(cfg), tokens(cfg, 1, 8)
    with torch.no_grad():
        _lt, ht = torch_model(cfg, state)(torch.from_numpy(idx), return_hidden=True)
    _lj, hj = jax_model(cfg, state)(jnp.asarray(idx), return_hidden=True)
    assert len(ht) == len(hj) == cfg.n_layer + 1
    for a, b in zip(ht, hj, strict=True):
        np.testing.assert_allclose(a.numpy(), np.asarray(b), atol=1e-5)


# ----------------------------------------------------------------------------- canonical state


@pytest.mark.parametrize("preset", ["gpt2", "modern-gpt2", "tiny"])
def test_state_names_are_canonical(preset):
    cfg = reduced(preset, tie_embeddings=preset != "tiny")
    expected = canonical_shapes(cfg)
    st = gptmod_torch.export_state(gptmod_torch.GPT(cfg))
    sj = gptmod_jax.export_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)))
    assert list(st) == list(expected)  # torch's state_dict order is the canonical order
    assert {k: v.shape for k, v in st.items()} == expected
    assert {k: v.shape for k, v in sj.items()} == expected
    assert sum(v.size for v in st.values()) == cfg.num_params()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_torch_jax_torch_bit_exact(dtype):
    cfg = reduced("modern-gpt2", tie_embeddings=False, bias=True)
    state0 = cast_state(_scaled_state(cfg), dtype)
    tm = torch_model(cfg, state0, dtype)
    s1 = gptmod_torch.export_state(tm)
    jm = jax_model(cfg, s1, dtype)
    s2 = gptmod_jax.export_state(jm)
    tm2 = torch_model(cfg, s2, dtype)
    s3 = gptmod_torch.export_state(tm2)
    for k in state0:
        assert s1[k].dtype == s2[k].dtype == s3[k].dtype == state0[k].dtype
        assert np.array_equal(state0[k].view(np.uint8), s3[k].view(np.uint8)), k
        assert np.array_equal(s1[k].view(np.uint8), s2[k].view(np.uint8)), k
    for (n1, p1), (n2, p2) in zip(tm.state_dict().items(), tm2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_is_a_snapshot_in_both_directions(dtype):
    """export_state copies (torch's optimizer updates parameters in place),
    and load_state copies (on CPU, jnp.asarray may alias a numpy buffer that
    the caller can still change): no state shares memory."""
    cfg = reduced("modern-gpt2")
    tm = torch_model(cfg, cast_state(torch_pair_state(cfg), dtype), dtype)
    st = gptmod_torch.export_state(tm)
    before = {k: v.copy() for k, v in st.items()}
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(1.0)
    assert all(np.array_equal(st[k].view(np.uint8), before[k].view(np.uint8)) for k in st)
    jm = jax_model(cfg, st, dtype)
    for v in st.values():
        v[...] = 0  # the caller reuses its buffers
    sj = gptmod_jax.export_state(jm)
    assert all(np.array_equal(sj[k].view(np.uint8), before[k].view(np.uint8)) for k in sj)
    sj["norm.weight"][...] = 5  # writable, and not the model's memory
    assert not np.array_equal(gptmod_jax.export_state(jm)["norm.weight"], sj["norm.weight"])


@pytest.mark.parametrize("load", [gptmod_torch.load_state, gptmod_jax.load_state])
def test_load_state_reports_every_problem(load):
    cfg = reduced("gpt2")
    model = (
        gptmod_torch.GPT(cfg)
        if load is gptmod_torch.load_state
        else gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    )
    state = torch_pair_state(cfg)
    del state["blocks.0.attn.wk.weight"], state["norm.bias"]
    state["blocks.1.attn.wq.weight"] = np.zeros((3, 3), np.float32)
    state["blocks.0.attn.c_attn.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(StateError) as info:
        load(model, state)
    msg = str(info.value)
    for key in (
        "blocks.0.attn.wk.weight",
        "norm.bias",
        "blocks.1.attn.wq.weight",
        "blocks.0.attn.c_attn.weight",
    ):
        assert key in msg
    assert "(3, 3)" in msg and "(64, 64)" in msg


def test_checkpoint_from_one_framework_loads_in_the_other(tmp_path):
    from gptmod import weights

    cfg = reduced("modern-gpt2")
    jm = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(3))
    weights.save(tmp_path / "j.safetensors", gptmod_jax.export_state(jm), cfg)
    state, cfg2 = weights.load(tmp_path / "j.safetensors")
    assert cfg2 == cfg
    tm = gptmod_torch.load_state(gptmod_torch.GPT(cfg2), state)
    idx = tokens(cfg, 1, 16)
    np.testing.assert_allclose(torch_logits(tm, idx), jax_logits(jm, idx), atol=1e-5)


# ----------------------------------------------------------------------------- structure


def _class_layout(path: Path) -> dict[str, list[str]]:
    """Class name -> attributes assigned in __init__ (`self.<attr> = ...`), in source order."""
    layout = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            attrs = []  # (line, name): ast.walk is breadth-first, the source order is by line
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                    for sub in ast.walk(fn):
                        targets = sub.targets if isinstance(sub, ast.Assign) else []
                        targets += [sub.target] if isinstance(sub, ast.AnnAssign) else []
                        for t in targets:
                            elts = t.elts if isinstance(t, ast.Tuple) else [t]
                            attrs += [
                                (e.lineno, e.attr) for e in elts if isinstance(e, ast.Attribute)
                            ]
                        # torch's register_buffer("k", ...) is the twin of `self.k = nnx.Cache(...)`
                        if (
                            isinstance(sub, ast.Call)
                            and getattr(sub.func, "attr", "") == "register_buffer"
                        ):
                            attrs.append((sub.lineno, sub.args[0].value))
            layout[node.name] = [name for _, name in sorted(attrs)]
    return layout


def _functions(path: Path) -> list[str]:
    return [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]


def test_twin_files_define_the_same_classes_submodules_and_functions():
    t = _class_layout(ROOT / "gptmod_torch" / "model.py")
    j = _class_layout(ROOT / "gptmod_jax" / "model.py")
    assert list(t) == list(j), "the twins define different classes, or in another order"
    for name in t:
        assert t[name] == j[name], f"{name}: torch has {t[name]}, jax has {j[name]}"
    public = lambda names: [n for n in names if not n.startswith("_")]
    assert public(_functions(ROOT / "gptmod_torch" / "model.py")) == public(
        _functions(ROOT / "gptmod_jax" / "model.py")
    )


def test_twin_modules_have_the_same_parameter_names():
    cfg = reduced("modern-gpt2", bias=True, tie_embeddings=False)
    # model.py's own classes (kernels.py swaps some for framework-specific fast ones)
    tm, jm = (
        gptmod_torch.GPT(cfg, kernels=False),
        gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), kernels=False),
    )
    for name in ("blocks.0", "blocks.0.attn", "blocks.1.mlp", "norm", "lm_head", "tok_emb"):
        t_sub = tm.get_submodule(name)
        j_sub = jm
        for part in name.split("."):
            j_sub = j_sub[int(part)] if part.isdigit() else getattr(j_sub, part)
        assert type(t_sub).__name__ == type(j_sub).__name__
        assert set(gptmod_torch.export_state(t_sub)) == set(gptmod_jax.export_state(j_sub))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_token_ids_and_lengths(framework):
    cfg = reduced("tiny")
    state = torch_pair_state(cfg)
    model = torch_model(cfg, state) if framework == "torch" else jax_model(cfg, state)
    # eager calls: jax_logits jits the forward, where values cannot be checked (the next test)
    run = (
        (lambda x: torch_logits(model, x))
        if framework == "torch"
        else (lambda x: model(jnp.asarray(x)))
    )
    with pytest.raises(ValueError, match=r"token id 257 is out of range \[0, vocab_size=257\)"):
        run(np.array([[1, 2, 257]]))
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        run(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"sequence length 65 must be in \[1, max_seq_len=64\]"):
        run(np.zeros((1, 65), np.int64))
    with pytest.raises(ValueError, match="idx: expected"):
        run(np.zeros((4,), np.int64))


def test_jax_out_of_range_under_jit_is_nan_not_clamped():
    """Under jit the values can't be checked; the gather then fills NaN
    instead of clamping silently."""
    cfg = reduced("tiny")
    model = jax_model(cfg, torch_pair_state(cfg))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.array([[1, 2, 3], [1, 2, 300]]))
    assert np.isfinite(np.asarray(out[0])).all()
    assert np.isnan(np.asarray(out[1, 2])).all()


def test_backend_errors():
    cfg = reduced("tiny")
    with pytest.raises(
        ValueError, match="'nope' is not a torch backend; choose one of sdpa, flash"
    ):
        gptmod_torch.GPT(cfg, attn_backend="nope")
    with pytest.raises(
        ValueError, match="'sdpa' is not a jax backend; choose one of auto, xla, cudnn, reference"
    ):
        gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), attn_backend="sdpa")
    state, idx = torch_pair_state(cfg), tokens(cfg, 1, 8)
    tm, jm = torch_model(cfg, state), jax_model(cfg, state)
    # swapped names, set after construction: refused, not ignored
    tm.attn_backend, jm.attn_backend = ("xla", "sdpa")
    with pytest.raises(ValueError, match="'xla' is not a torch backend"):
        torch_logits(tm, idx)
    with pytest.raises(ValueError, match="'sdpa' is not a jax backend"):
        jax_logits(jm, idx)
    for name in ("efficient", "cudnn"):
        with pytest.raises(
            BackendUnavailableError,
            match=f"torch attention backend '{name}' cannot run: has no CPU",
        ):
            torch_logits(torch_model(cfg, state, backend=name), idx)
    if jax.default_backend() == "cpu":
        with pytest.raises(
            BackendUnavailableError, match="'cudnn' cannot run: needs an NVIDIA GPU"
        ):
            jax_logits(jax_model(cfg, state, backend="cudnn"), idx)


def _public_api(path: Path) -> dict[str, list[str]]:
    """Top-level public functions (under "") and each class's public methods, sorted."""
    api: dict[str, list[str]] = {"": []}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            api[""].append(node.name)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            api[node.name] = sorted(
                n.name
                for n in node.body
                if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
            )
    api[""].sort()
    return api


@pytest.mark.parametrize("module", ["generate.py", "train.py"])
def test_twin_generate_and_train_offer_the_same_api(module):
    t, j = _public_api(ROOT / "gptmod_torch" / module), _public_api(ROOT / "gptmod_jax" / module)
    # torch's Trainer.model is the module it was given; JAX's merges one on demand
    if module == "train.py":
        j["Trainer"] = [m for m in j["Trainer"] if m != "model"]
    if module == "generate.py":
        # torch.compile's modes (CUDA graphs among them) are torch's lever;
        # JAX jits the whole loop once
        t[""].remove("compile_mode")
    assert t == j


TWIN_FILES = [
    ROOT / pkg / f
    for pkg in ("gptmod_torch", "gptmod_jax")
    for f in ("model.py", "generate.py", "train.py", "kernels.py")
]


def test_every_shape_suffix_in_the_twins_is_a_letter_of_the_design_table():
    """`x_BTD`-style names: each letter of a suffix must be one
    docs/DESIGN.md defines, so N never means two axes."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    table = design.split("## Shape suffixes", 1)[1].split("\n## ", 1)[0]
    letters = set(re.findall(r"^\| ([A-Za-z]) \|", table, flags=re.M))
    assert {"B", "T", "S", "N", "K", "H", "V", "M"} <= letters
    bad = {}
    for path in TWIN_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            name = (
                node.id
                if isinstance(node, ast.Name)
                else node.attr
                if isinstance(node, ast.Attribute)
                else None
            )
            name = node.arg if isinstance(node, ast.arg) else name
            m = re.fullmatch(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z][A-Za-z]*)", name or "")
            if m and not set(m.group(1)) <= letters:
                bad.setdefault(f"{path.parent.name}/{path.name}", set()).add(name)
    assert not bad, f"shape suffixes with letters outside DESIGN.md's table: {bad}"


# What only one twin has, by design: the framework's own lever (torch.compile's modes and the code
# that compiles the step; JAX's scan over layers lives in gptmod_jax/scan.py, which has no twin).
ONLY_TORCH = {"generate.py": {"sections": ["compiling the step"], "names": ["compile_mode"]}}


def _sections(path: Path) -> list[str]:
    return re.findall(r"^# -{5,} (\S.*)$", path.read_text(), flags=re.M)


def _public_in_order(path: Path) -> list[str]:
    defs = (ast.FunctionDef, ast.ClassDef)
    body = ast.parse(path.read_text()).body
    return [n.name for n in body if isinstance(n, defs) and not n.name.startswith("_")]


@pytest.mark.parametrize("module", ["model.py", "generate.py", "train.py"])
def test_twin_files_have_the_same_sections_and_public_names_in_the_same_order(module):
    t, j = ROOT / "gptmod_torch" / module, ROOT / "gptmod_jax" / module
    only = ONLY_TORCH.get(module, {})
    sections_t = [s for s in _sections(t) if s not in only.get("sections", [])]
    assert sections_t == _sections(j), f"{module}: the twins' sections differ or are out of order"
    names_t = [n for n in _public_in_order(t) if n not in only.get("names", [])]
    assert names_t == _public_in_order(j), f"{module}: public names differ or are out of order"
    if module == "generate.py":
        assert _sections(j) == [
            "sampling",
            "prefill and decode",
            "generate",
            "generate_stream",
            "session",
        ]
