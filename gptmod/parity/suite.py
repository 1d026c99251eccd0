"""The parity ladder: where, and by how much, the torch and JAX twins differ.

Every numeric row runs the same (dtype-rounded) weights and tokens through
torch, JAX and a float64 torch reference, and reports e_torch and e_jax (each
framework's max error against float64), |Δ| (torch vs JAX) and the budget. With
scale = max|float64 value| and e_max = REL[dtype] * scale, a row passes when
  1. e_torch <= e_max and e_jax <= e_max: each twin is within what the
     dtype's rounding explains, and
  2. |Δ| <= budget = max(e_max, ABS_FLOOR[dtype]): the twins agree to the same relative bound.
Rule 1 is what catches a broken twin: judged against the other twin alone, a twin's own large error
would raise the budget with it. Both bounds scale with the reference, never with an absolute number:
a trained model's logits reach 35 where random weights' stay below 3, and the same relative rounding
error is then 10x larger in absolute terms. (The old rule |Δ| <= K * max(e_torch, e_jax) with K = 2
could never fail: |Δ| <= e_torch + e_jax by the triangle inequality.) Row.ratio is the worst of
|Δ|/budget, e_torch/e_max and e_jax/e_max.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptmod import models
from gptmod.backends import BackendUnavailableError, jax_cudnn_unmet, torch_pinned_unmet
from gptmod.config import ModelConfig

K = 2.0  # |Δ| <= K * max(e) is implied by the triangle inequality at K = 2: never a test on its own
ABS_FLOOR = {"float32": 1e-6, "bfloat16": 1e-3, "float16": 1e-4}
REL = {"float32": 2e-5, "bfloat16": 5e-2, "float16": 1e-2}
TOP_K = 5
TF32_LABEL = "float32 (tf32)"  # the dtype column of fp32 rows run with TF32 matmuls (`--tf32`)


@contextlib.contextmanager
def tf32_budget(on: bool = True) -> Iterator[None]:
    """Judge fp32 rows as TF32 matmuls while inside: TF32 keeps fp16's 10 mantissa bits, so fp16's
    REL and ABS_FLOOR. Swaps the float32 entries in place (every check reads these dicts at call
    time) and restores them."""
    saved = REL["float32"], ABS_FLOOR["float32"]
    if on:
        REL["float32"], ABS_FLOOR["float32"] = REL["float16"], ABS_FLOOR["float16"]
    try:
        yield
    finally:
        REL["float32"], ABS_FLOOR["float32"] = saved


@dataclass
class Row:
    check: str
    preset: str
    dtype: str
    backend_torch: str
    backend_jax: str
    # None where not measured; passed None: skipped (see note)
    e_torch: float | None = None
    e_jax: float | None = None
    diff: float | None = None
    budget: float | None = None
    passed: bool | None = None
    note: str = ""
    e_max: float | None = None  # rule 2's bound on e_torch and e_jax, where the row has one
    where: str = (
        ""  # where a failing row localises the fault (e.g. "block 3 mlp.w_gate"), if it can
    )

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else ("pass" if self.passed else "FAIL")

    @property
    def ratio(self) -> float | None:
        """The row's worst share of its budget (> 1 fails): |Δ|/budget, or
        e/e_max for either twin."""
        shares = []
        if self.diff is not None and self.budget is not None:
            shares.append(
                self.diff / self.budget
                if self.budget > 0
                else (0.0 if self.diff == 0 else math.inf)
            )
        if self.e_max is not None and self.e_max > 0:
            shares += [e / self.e_max for e in (self.e_torch, self.e_jax) if e is not None]
        return max(shares) if shares else None


@dataclass
class Case:
    """One preset at one dtype: its weights (rounded to the dtype) and tokens."""

    name: str
    cfg: ModelConfig
    dtype: str
    state: dict[str, np.ndarray]
    idx: np.ndarray
    device: str = "cpu"
    # built once per case, see torch_model
    models: dict = dataclasses.field(default_factory=dict, repr=False)
    # an int8 case (`state` quantized, gptmod/quant.py): the float32 weights it was quantized from
    float_state: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)


def case_row(
    check: str, case: Case, backend_torch: str = "sdpa", backend_jax: str = "auto", **fields: Any
) -> Row:
    """A row of `case` (its preset and dtype), by default on the twins' default backends; `fields`
    are Row's others by name, and with no figures and no verdict the row is skipped (its note says
    why)."""
    return Row(check, case.name, case.dtype, backend_torch, backend_jax, **fields)


def numeric_row(check, case, bt, bj, e_t, e_j, diff, scale, note="") -> Row:
    e_max = REL[case.dtype] * scale
    budget = max(e_max, ABS_FLOOR[case.dtype])
    values = (e_t, e_j, diff)
    ok = all(math.isfinite(v) for v in values) and diff <= budget and e_t <= e_max and e_j <= e_max
    if not ok and all(math.isfinite(v) for v in values):
        worst = "torch" if e_t > e_max else "jax" if e_j > e_max else None
        note = (f"{worst} error > {REL[case.dtype]:g}*scale={e_max:.2e}; " if worst else "") + note
    return Row(check, case.name, case.dtype, bt, bj, e_t, e_j, diff, budget, ok, note, e_max)


# ----------------------------------------------------------------------------- weights


def random_state(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    import gptmod_torch

    return gptmod_torch.export_state(models.build("torch", cfg, seed=seed))


def inject_outliers(
    state: dict[str, np.ndarray], cfg: ModelConfig, seed: int
) -> dict[str, np.ndarray]:
    """Trained LLMs carry a few hidden channels with activations ~100x the rest ("outlier features",
    Dettmers et al. 2022; "massive activations", Sun et al. 2024), which is what stresses bf16. We
    reproduce that: 2 channels (chosen by `seed`) get 20x token-embedding columns (outliers in the
    residual stream) and 10x norm gains (outliers in every matmul input)."""
    out = dict(state)
    channels = np.random.default_rng(seed).choice(cfg.d_model, size=2, replace=False)
    emb = out["tok_emb.weight"].copy()
    emb[:, channels] *= 20.0
    out["tok_emb.weight"] = emb
    for name in out:
        if name.endswith("norm.weight"):
            w = out[name].copy()
            w[channels] *= 10.0
            out[name] = w
    return out


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: np.asarray(v).astype(np_dtype) for k, v in state.items()}


# ----------------------------------------------------------------------------- models


def torch_model(
    case: Case, dtype: str, backend: str, device: str | None = None, fresh: bool = False
):
    """The case's weights in torch at `dtype`; built once per case and dtype (the backend is a
    run-time switch)."""
    device = device or case.device

    def build():
        gpu = "gpu" if device.startswith("cuda") else "cpu"
        return models.build("torch", case.cfg, case.state, dtype=dtype, device=gpu)

    return _model(case, ("torch", dtype, device), build, backend, fresh)


def jax_model(
    case: Case, backend: str, fault: tuple[str, float] | None = None, fresh: bool = False
):
    """The case's weights in JAX; `fault` perturbs one tensor (a deliberately broken twin)."""

    def build():
        state = case.state
        if fault is not None:
            name, eps = fault
            state = dict(state)
            state[name] = (state[name].astype(np.float64) * (1.0 + eps)).astype(state[name].dtype)
        return models.build("jax", case.cfg, state, dtype=case.dtype)

    return _model(case, ("jax", fault), build, backend, fresh)


def _model(case: Case, key: tuple, build: Callable, backend: str, fresh: bool):
    """Built once per case and key (or afresh, uncached); the attention
    backend is a run-time switch."""
    m = build() if fresh else case.models.get(key)
    if m is None:
        m = case.models[key] = build()
    m.attn_backend = backend
    return m


def torch_run(model, idx: np.ndarray, **kw):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(idx).to(model.tok_emb.weight.device), **kw)
    if isinstance(out, tuple):
        return out[0].double().cpu().numpy(), [h.double().cpu().numpy() for h in out[1]]
    return out.double().cpu().numpy()


def jax_run(model, idx: np.ndarray, **kw):
    import jax.numpy as jnp

    out = model(jnp.asarray(idx), **kw)
    if isinstance(out, tuple):
        return np.asarray(out[0], np.float64), [np.asarray(h, np.float64) for h in out[1]]
    return np.asarray(out, np.float64)


def unmet(framework: str, backend: str, case: Case) -> list[str]:
    """Why a backend cannot run for this case (empty if it can)."""
    H = case.cfg.head_dim
    if framework == "torch":
        return (
            torch_pinned_unmet(backend, case.device, case.dtype, H, False)
            if backend not in ("sdpa", "reference")
            else []
        )
    if backend == "cudnn":
        import jax

        d = jax.devices()[0]
        return jax_cudnn_unmet(
            d.platform, case.dtype, H, getattr(d, "compute_capability", None), False, True
        )
    return []


# ----------------------------------------------------------------------------- the ladder


def check_modules(case: Case, fault=None) -> Iterator[Row]:
    """Layer 0's norm, rope, attention, MLP and the whole block, on unit-scale random inputs."""
    import jax.numpy as jnp
    import torch

    import gptmod_jax.model as jm
    import gptmod_torch.model as tm

    ref_m, t_m = torch_model(case, "float64", "math", "cpu"), torch_model(case, case.dtype, "sdpa")
    j_m = jax_model(case, "auto", fault)
    rng = np.random.default_rng(0)
    B, T, D = 2, min(32, case.cfg.max_seq_len), case.cfg.d_model
    x = rng.normal(size=(B, T, D))
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    tdt = getattr(torch, case.dtype)
    x_ref, x_t = torch.from_numpy(x), torch.from_numpy(x).to(tdt).to(case.device)
    x_j = jnp.asarray(x, getattr(jnp, case.dtype))
    x_ref = x_t.double().cpu()  # the reference sees the very inputs the dtype can hold
    p_ref, p_t, p_j = torch.from_numpy(pos), torch.from_numpy(pos).to(case.device), jnp.asarray(pos)
    rope = case.cfg.pos == "rope"
    rope_ref = tm.rope_cos_sin(p_ref, case.cfg, torch.float64) if rope else None
    rope_t = tm.rope_cos_sin(p_t, case.cfg, tdt) if rope else None
    rope_j = jm.rope_cos_sin(p_j, case.cfg, getattr(jnp, case.dtype)) if rope else None
    b_ref, b_t, b_j = ref_m.blocks[0], t_m.blocks[0], j_m.blocks[0]
    in_ref = tm.BlockInputs(rope_ref, p_ref, None, "math")
    in_t = tm.BlockInputs(rope_t, p_t, None, "sdpa")
    in_j = jm.BlockInputs(rope_j, p_j, None, "auto")
    probes: list[tuple[str, Callable, Callable, Callable]] = [
        (
            "norm",
            lambda: b_ref.attn_norm(x_ref),
            lambda: b_t.attn_norm(x_t),
            lambda: b_j.attn_norm(x_j),
        ),
        (
            "attention",
            lambda: b_ref.attn(x_ref, in_ref),
            lambda: b_t.attn(x_t, in_t),
            lambda: b_j.attn(x_j, in_j),
        ),
        ("mlp", lambda: b_ref.mlp(x_ref), lambda: b_t.mlp(x_t), lambda: b_j.mlp(x_j)),
        (
            "block",
            lambda: b_ref(x_ref, in_ref),
            lambda: b_t(x_t, in_t),
            lambda: b_j(x_j, in_j),
        ),
    ]
    if rope:
        q = rng.normal(size=(B, T, case.cfg.n_head, case.cfg.head_dim))
        q_t = torch.from_numpy(q).to(tdt).to(case.device)
        q_ref, q_j = q_t.double().cpu(), jnp.asarray(q, getattr(jnp, case.dtype))
        probes.insert(
            1,
            (
                "rope",
                lambda: tm.apply_rope(q_ref, *rope_ref),
                lambda: tm.apply_rope(q_t, *rope_t),
                lambda: jm.apply_rope(q_j, *rope_j),
            ),
        )
    with torch.no_grad():
        for name, f_ref, f_t, f_j in probes:
            ref = f_ref().double().numpy()
            ot, oj = f_t().double().cpu().numpy(), np.asarray(f_j(), np.float64)
            e_t, e_j, diff = (
                float(np.abs(a - b).max()) for a, b in ((ot, ref), (oj, ref), (ot, oj))
            )
            yield numeric_row(
                f"module:{name}", case, "sdpa", "auto", e_t, e_j, diff, float(np.abs(ref).max())
            )


def check_logits_and_hidden(case: Case, backends_t, backends_j, fault=None) -> Iterator[Row]:
    """Whole-model logits for every backend pair, per-layer hidden states,
    top-k agreement and KL."""
    ref_logits, ref_hidden = torch_run(
        torch_model(case, "float64", "math", "cpu"), case.idx, return_hidden=True
    )
    scale = float(np.abs(ref_logits).max())
    out_t, out_j = {}, {}
    for b in backends_t:
        reasons = unmet("torch", b, case)
        if reasons:
            yield case_row("logits", case, b, "-", note="; ".join(reasons))
            continue
        try:
            out_t[b] = torch_run(torch_model(case, case.dtype, b), case.idx, return_hidden=True)
        except BackendUnavailableError as e:
            yield case_row("logits", case, b, "-", note=str(e))
    for b in backends_j:
        reasons = unmet("jax", b, case)
        if reasons:
            yield case_row("logits", case, "-", b, note="; ".join(reasons))
            continue
        out_j[b] = jax_run(jax_model(case, b, fault), case.idx, return_hidden=True)
    if not out_t or not out_j:
        return
    bt0, bj0 = next(iter(out_t)), next(iter(out_j))
    pairs = [(b, bj0) for b in out_t] + [(bt0, b) for b in out_j if b != bj0]
    for bt, bj in pairs:
        lt, lj = out_t[bt][0], out_j[bj][0]
        e_t, e_j = float(np.abs(lt - ref_logits).max()), float(np.abs(lj - ref_logits).max())
        yield numeric_row(
            "logits",
            case,
            bt,
            bj,
            e_t,
            e_j,
            float(np.abs(lt - lj).max()),
            scale,
            f"max|logit|={scale:.3g}",
        )
    # Per-layer hidden states (default backends): name the first layer whose difference leaves its
    # budget. The scale is the largest value the residual stream has held so far, not this layer's:
    # the stream keeps the absolute rounding errors of its largest values, and a block that cancels
    # them (SmolLM2's block 10 takes its residual from 760 down to 120 before block 11 builds 2.5e4
    # "massive activations") keeps those errors.
    (lt, ht), (lj, hj) = out_t[bt0], out_j[bj0]
    first_bad, worst, sc = None, (0.0, 0.0, 0.0, 1.0), 0.0
    for layer, (r, a, b) in enumerate(zip(ref_hidden, ht, hj, strict=True)):
        sc = max(sc, float(np.abs(r).max()))
        e_t, e_j, diff = (
            float(np.abs(a - r).max()),
            float(np.abs(b - r).max()),
            float(np.abs(a - b).max()),
        )
        if (
            first_bad is None
            and not numeric_row("hidden", case, bt0, bj0, e_t, e_j, diff, sc).passed
        ):
            first_bad = layer
        if diff / sc > worst[2] / worst[3]:
            worst = (e_t, e_j, diff, sc)
    where = (
        "embedding"
        if first_bad == 0
        else f"block {first_bad - 1}"
        if first_bad is not None
        else None
    )
    row = numeric_row("hidden", case, bt0, bj0, *worst, note="worst layer (relative)")
    if where is not None:
        row.passed, row.note = False, f"first layer out of budget: {where} (hidden[{first_bad}])"
    yield row
    # Next-token distributions: top-k agreement (near-ties excused) and KL.
    yield _topk_kl_row(case, bt0, bj0, ref_logits, lt, lj, scale)


def _topk_kl_row(case, bt, bj, ref, lt, lj, scale) -> Row:
    V = ref.shape[-1]
    ref2, lt2, lj2 = ref.reshape(-1, V), lt.reshape(-1, V), lj.reshape(-1, V)
    top_t = np.argsort(-lt2, axis=-1)[:, :TOP_K]
    top_j = np.argsort(-lj2, axis=-1)[:, :TOP_K]
    agree = np.array([set(a) == set(b) for a, b in zip(top_t, top_j, strict=True)])
    e_max = REL[case.dtype] * scale
    sorted_ref = -np.sort(-ref2, axis=-1)
    # how close the k-th and (k+1)-th are, exactly
    gap = sorted_ref[:, TOP_K - 1] - sorted_ref[:, TOP_K]
    unexplained = (~agree) & (gap > 2 * e_max)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp_t, lp_j = log_softmax(lt2), log_softmax(lj2)
    kl = float((np.exp(lp_t) * (lp_t - lp_j)).sum(-1).mean())
    # what a logit error of e_max can produce, at most ~ e^2/2 per position
    kl_max = max(2 * e_max**2, 1e-12)
    ok = not unexplained.any() and kl <= kl_max and math.isfinite(kl)
    note = (
        f"top-{TOP_K} agree at {agree.mean():.1%} of {len(agree)} positions "
        f"({(~agree).sum() - unexplained.sum()} near-ties); KL(torch||jax)={kl:.2e} <= {kl_max:.1e}"
    )
    return case_row(f"top{TOP_K}+kl", case, bt, bj, diff=kl, budget=kl_max, passed=ok, note=note)


def check_cached_decode(case: Case, steps: int, fault=None) -> Iterator[Row]:
    """Prefill then `steps` cached decode steps, against the full forward, in each framework."""
    import jax.numpy as jnp
    import torch

    seq = case.idx[:1]
    T = seq.shape[1]
    start = T - steps
    t_m, j_m = torch_model(case, case.dtype, "sdpa"), jax_model(case, "auto", fault)
    full_t, full_j = torch_run(t_m, seq)[0], jax_run(j_m, seq)[0]
    ref = torch_run(torch_model(case, "float64", "math", "cpu"), seq)[0]
    cached = {}
    for name, model, arr in (
        ("torch", t_m, lambda a: torch.from_numpy(a).to(case.device)),
        ("jax", j_m, jnp.asarray),
    ):
        model.setup_cache(1, T)
        try:
            rows = []
            for s, e in [(0, start)] + [(i, i + 1) for i in range(start, T)]:
                pos = np.arange(s, e)[None]
                out = (
                    torch_run(model, seq[:, s:e], positions_BT=arr(pos))
                    if name == "torch"
                    else jax_run(model, seq[:, s:e], positions_BT=arr(pos))
                )
                rows.append(out[0, -1])
        finally:
            model.clear_cache()
        cached[name] = np.stack(rows)
    at = [start - 1, *range(start, T)]
    # e: cached logits against float64 (like every row); and each
    # framework's cached vs its own full forward.
    e_t, e_j = (float(np.abs(cached[n] - ref[at]).max()) for n in ("torch", "jax"))
    self_t, self_j = (
        float(np.abs(cached["torch"] - full_t[at]).max()),
        float(np.abs(cached["jax"] - full_j[at]).max()),
    )
    diff = float(np.abs(cached["torch"] - cached["jax"]).max())
    scale = float(np.abs(ref[at]).max())
    row = numeric_row(
        "cached-decode",
        case,
        "sdpa",
        "auto",
        e_t,
        e_j,
        diff,
        scale,
        f"{steps} steps after a {start}-token prefill; cached vs full forward: torch "
        f"{self_t:.1e}, jax {self_j:.1e}",
    )
    if max(self_t, self_j) > REL[case.dtype] * scale:
        row.passed = False
    yield row


def first_difference(a: Sequence[int], b: Sequence[int], strict: bool = True) -> int | None:
    """The first step at which two token streams differ (None: they agree); `strict`: they must be
    as long as each other, else only the shorter's length is compared."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=strict)) if x != y), None)


def greedy_row(
    check: str,
    case: Case,
    prompt: list[int],
    ours: tuple[str, list[int]],
    theirs: tuple[str, list[int]],
    identical: str,
    show_bound: bool = True,
) -> Row:
    """Two greedy streams from `prompt`, each (whose, tokens): the note `identical` if they agree,
    else judged where they first differ, on the float64 reference's logits after the shared context:
    a near-tie the dtype explains (the two tokens' margin <= 2 e_max at that logit scale) passes.
    `show_bound` puts the comparison with 2 e_max in the note too."""
    (a_name, a), (b_name, b) = ours, theirs
    step = first_difference(a, b)
    if step is None:
        return case_row(check, case, diff=0.0, budget=0.0, passed=True, note=identical)
    f64 = torch_model(case, "float64", "math", "cpu")
    ref_V = torch_run(f64, np.array([prompt + a[:step]]))[0, -1]
    margin = float(abs(ref_V[a[step]] - ref_V[b[step]]))
    e_max = REL[case.dtype] * float(np.abs(ref_V).max())
    tie = margin <= 2 * e_max
    bound = f" {'<=' if tie else '>'} {2 * e_max:.2e}" if show_bound else ""
    note = (
        f"diverge at step {step}: {a_name} {a[step]} vs {b_name} {b[step]}, float64 margin "
        f"{margin:.2e}{bound} ({'near-tie' if tie else 'not a tie'})"
    )
    return case_row(check, case, diff=margin, budget=2 * e_max, passed=tie, note=note)


def check_greedy(case: Case, steps: int, fault=None) -> Iterator[Row]:
    """Cross-framework greedy tokens; a divergence at a near-tie is reported
    with its position and margin."""
    import gptmod_jax
    import gptmod_torch

    prompt = case.idx[0, : min(16, case.idx.shape[1])].tolist()
    steps = min(steps, case.cfg.max_seq_len - len(prompt))
    out_t = gptmod_torch.generate(torch_model(case, case.dtype, "sdpa"), [prompt], steps)[0]
    out_j = gptmod_jax.generate(jax_model(case, "auto", fault), [prompt], steps)[0]
    identical = f"{steps} tokens identical"
    yield greedy_row("greedy", case, prompt, ("torch", out_t), ("jax", out_j), identical)


def check_round_trips(case: Case) -> Iterator[Row]:
    """torch -> state -> jax -> state -> torch and back, bit for bit,
    through a safetensors file too."""
    import tempfile
    from pathlib import Path

    import gptmod_jax
    import gptmod_torch
    from gptmod import quant, weights

    # an int8 case goes through the int8 checkpoint format
    fmt = quant if case.float_state is not None else weights
    s1 = gptmod_torch.export_state(torch_model(case, case.dtype, "sdpa", "cpu"))
    s2 = gptmod_jax.export_state(gptmod_jax.load_state(jax_model(case, "auto", fresh=True), s1))
    with tempfile.TemporaryDirectory() as d:
        fmt.save(Path(d) / "rt.safetensors", s2, case.cfg)
        s3, _ = fmt.load(Path(d) / "rt.safetensors")
    s4 = gptmod_torch.export_state(
        gptmod_torch.load_state(torch_model(case, case.dtype, "sdpa", "cpu", fresh=True), s3)
    )
    for name, a, b in (("torch->jax", s1, s2), ("jax->file->torch", s2, s4)):
        bad = [
            k for k in case.state if a[k].tobytes() != b[k].tobytes() or a[k].dtype != b[k].dtype
        ]
        yield case_row(
            f"round-trip {name}",
            case,
            "-",
            "-",
            diff=float(len(bad)),
            budget=0.0,
            passed=not bad,
            note="bit-exact" if not bad else f"{len(bad)} tensors differ, e.g. {bad[0]}",
        )


def check_hf(case: Case, seed: int, greedy_steps: int = 32) -> Iterator[Row]:
    """transformers as an outside oracle: GPT2LMHeadModel for classic presets (its own random init,
    imported), LlamaForCausalLM on the case's own weights for Llama-shaped configs (a real model
    such as SmolLM2 included): logits in fp32, and greedy tokens against HF's greedy."""
    from gptmod.hf_llama import llama_problems

    llama = not case.cfg.is_classic and not llama_problems(case.cfg)
    check = "hf-gpt2" if case.cfg.is_classic or not llama else "hf-llama"
    if not case.cfg.is_classic and not llama:
        why = "; ".join(llama_problems(case.cfg))
        yield case_row(check, case, note=f"neither GPT-2 nor a Llama: {why}")
        return
    if llama:
        yield from _check_hf_llama(case, greedy_steps)
        return
    if case.dtype != "float32":
        yield case_row(check, case, note="HF oracle runs in fp32")
        return
    from gptmod.hf_gpt2 import from_hf_gpt2

    hf = models.build("hf", case.cfg, seed=seed)
    state, _ = from_hf_gpt2(hf, case.cfg)
    yield _hf_logits_row("hf-gpt2", dataclasses.replace(case, state=state, models={}), hf, ".2g")


def _hf_logits_row(check: str, case: Case, hf, scale_format: str) -> Row:
    """Both twins' fp32 logits on the case's weights against those of `hf`, the HF model of the same
    weights: each twin within REL[float32] of HF's logit scale (printed in the note with
    `scale_format`)."""
    import torch

    with torch.no_grad():
        ref = hf(torch.from_numpy(case.idx)).logits.double().numpy()
    lt = torch_run(torch_model(case, "float32", "sdpa", "cpu"), case.idx)
    lj = jax_run(jax_model(case, "auto"), case.idx)
    e_t, e_j = float(np.abs(lt - ref).max()), float(np.abs(lj - ref).max())
    scale = float(np.abs(ref).max())
    bound = REL["float32"] * scale
    return case_row(
        check,
        case,
        e_torch=e_t,
        e_jax=e_j,
        diff=float(np.abs(lt - lj).max()),
        budget=bound,
        passed=e_t <= bound and e_j <= bound,
        note=f"e = vs HF {type(hf).__name__} logits; budget {REL['float32']:g} of "
        f"max|logit| {scale:{scale_format}}",
        e_max=bound,
    )


def _check_hf_llama(case: Case, steps: int) -> Iterator[Row]:
    """HF Llama in fp32 on the case's weights (already rounded to its dtype). Logits (fp32 only):
    each twin within REL[float32] of the logit scale of HF's. Greedy: both twins' tokens against
    HF's greedy, EOS off; in fp32 they must agree, and a divergence is judged as in `check_greedy`
    (a near-tie of the float64 reference passes); in bf16/fp16 the number of agreeing tokens is
    reported (informational: the oracle runs in fp32)."""
    import torch

    import gptmod_jax
    import gptmod_torch

    hf = models.build("hf", case.cfg, {k: np.asarray(v, np.float32) for k, v in case.state.items()})
    if case.dtype == "float32":
        yield _hf_logits_row("hf-llama", case, hf, ".1f")
    prompt = case.idx[0, : min(16, case.idx.shape[1])].tolist()
    steps = min(steps, case.cfg.max_seq_len - len(prompt))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        theirs = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    outs = {
        "torch": gptmod_torch.generate(torch_model(case, case.dtype, "sdpa"), [prompt], steps)[0],
        "jax": gptmod_jax.generate(jax_model(case, "auto"), [prompt], steps)[0],
    }
    for fw, out in outs.items():
        check = f"hf-llama greedy {fw}"
        if case.dtype != "float32":
            first = first_difference(out, theirs)
            agree = steps if first is None else first
            note = f"{agree} of {steps} greedy tokens agree with HF's fp32 greedy (informational)"
            yield case_row(check, case, note=note)
            continue
        identical = f"{steps} tokens identical to HF's greedy"
        yield greedy_row(check, case, prompt, (fw, out), ("HF", theirs), identical, False)


def versions() -> dict[str, str]:
    import flax
    import jax
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
