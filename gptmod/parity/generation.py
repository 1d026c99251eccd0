"""Parity rows for generation as users run it: every generate path, ragged
batches and the sampling distribution.

The ladder's forward rows (suite.py) cannot see a bug that lives in the generate code alone: a cache
write into the wrong row, a decode step at the wrong position, a sampling head that skips the
soft-cap, a filter that keeps one token too few, a temperature applied in the wrong order. These
rows run the generate modules' own code paths.

- "generate:<path>": greedy tokens of each path users run (torch eager, torch.compile, torch stream,
  JAX jit, JAX stream, JAX scan_layers). Each path's token at step i must be the argmax of its
  framework's FULL forward (no cache) over prompt + its first i tokens, and every path must match
  torch eager's tokens. A mismatch is excused (and counted) only at an exact near-tie: the float64
  logits of the two tokens within 2e_max (e_max = REL * max|logit|), as suite.check_greedy. Only a
  path's first divergence from torch eager is judged: after it the contexts differ.
- "ragged": three prompts of different lengths through each twin's generate prefill and decode steps
  (right-padded, each row at its own positions, the model's static cache), teacher-forced with the
  case's own tokens, against each row run alone: batched logits within e_max of the solo ones,
  batched argmax = solo argmax (near-ties excused), and the usual rules 1-2 against float64.
- "sampling <knobs>": the distribution generate samples from at each step, captured inside
  generate (a spy on the generate module's `sample`, which also feeds the case's next
  token, so both twins see the same contexts): the logits of generate's head, filtered by
  the twin's own `filter_logits`. Each twin's logits against float64 (rule 2), each twin's
  allowed tokens against the float64 reference's under the documented rule
  (SamplingParams) except where a logit error of e_b or fp32 rounding can flip a token
  across a threshold (`near_ties`), and the twins' total-variation distance per step. With
  logits within d of each other on a common support, each probability moves by a factor of
  at most exp(2d/T), so TV <= (exp(2d/T) - 1) / 2, d being rule 1's budget in logit units.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gptmod.parity.suite import (
    ABS_FLOOR,
    REL,
    Case,
    K,
    Row,
    case_row,
    first_difference,
    jax_model,
    numeric_row,
    torch_model,
    torch_run,
)

PROMPT_LEN = 16
U32 = 2.0**-24  # fp32 unit roundoff

SETTINGS: tuple[dict[str, float], ...] = (
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 50},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 0.6, "top_k": 40, "top_p": 0.95, "min_p": 0.02},
)


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """`module.name` replaced by `value` for the block (a measuring spy),
    restored whatever happens."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _gen(framework: str) -> Any:
    """The twin's generate module (the package's `generate` attribute is the
    function of that name)."""
    return importlib.import_module(f"gptmod_{framework}.generate")


class _Forwards:
    """Full forwards (no cache) of token sequences, memoised: float64 torch, and each twin at the
    case's dtype. Sequences are right-padded to a multiple of PROMPT_LEN (causal: the padding cannot
    reach earlier positions), so JAX compiles one program per padded length, not one per length."""

    def __init__(self, case: Case):
        self.case, self.memo = case, {}

    def __call__(self, which: str, seq: Sequence[int]) -> np.ndarray:
        key = (which, tuple(seq))
        if key not in self.memo:
            n = len(seq)
            idx = np.zeros((1, -(-n // PROMPT_LEN) * PROMPT_LEN), np.int64)
            idx[0, :n] = seq
            c = self.case
            if which == "float64":
                out = torch_run(torch_model(c, "float64", "math", "cpu"), idx)
            elif which == "torch":
                out = torch_run(torch_model(c, c.dtype, "sdpa"), idx)
            else:
                out = _jax_forward(jax_model(c, "auto"), idx)
            self.memo[key] = out[0, :n]
        return self.memo[key]


def _jax_forward(model, idx: np.ndarray) -> np.ndarray:
    """The JAX model's logits, jitted (eager JAX compiles every op afresh
    for each new shape: far slower)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(_jit_call(_forward, graphdef, state, None, idx), np.float64)


def _forward(model, idx_BT):
    return model(idx_BT)


def _call(fn: Callable, graphdef, params, cache, *args):
    """`fn(model, *args)` on the model rebuilt from its state; with a cache, its new cache too."""
    from flax import nnx

    if cache is None:
        return fn(nnx.merge(graphdef, params), *args)
    model = nnx.merge(graphdef, params, cache)
    return fn(model, *args), nnx.state(model, nnx.Cache)


_jitted: list[Callable] = []


def _jit_call(fn: Callable, graphdef, params, cache, *args):
    """`_call` under jax.jit, `fn` and the graph static: a patched `fn` is a
    new function, so it is traced anew."""
    import jax

    if not _jitted:
        _jitted.append(jax.jit(_call, static_argnums=(0, 1)))
    return _jitted[0](fn, graphdef, params, cache, *args)


# ---------------------------------------------------------------------- every generate path, greedy


PATHS = ("torch-eager", "torch-compile", "torch-stream", "jax-jit", "jax-stream", "jax-scan")


def _generate_paths(
    case: Case, prompt: list[int], steps: int
) -> dict[str, tuple[str, Callable[[], list[int]]]]:
    """{path: (framework, runner)}: each runner returns the greedy tokens of
    one user-facing generate path."""
    jg, tg = _gen("jax"), _gen("torch")
    tm, jm = torch_model(case, case.dtype, "sdpa"), jax_model(case, "auto")

    def stream(gen: Any, model: Any) -> list[int]:
        return [s[0] for s in gen(model, [prompt], steps)]

    return {
        "torch-eager": ("torch", lambda: tg.generate(tm, [prompt], steps)[0]),
        "torch-compile": ("torch", lambda: tg.generate(tm, [prompt], steps, compile=True)[0]),
        "torch-stream": ("torch", lambda: stream(tg.generate_stream, tm)),
        "jax-jit": ("jax", lambda: jg.generate(jm, [prompt], steps)[0]),
        "jax-stream": ("jax", lambda: stream(jg.generate_stream, jm)),
        "jax-scan": ("jax", lambda: jg.generate(jm, [prompt], steps, scan_layers=True)[0]),
    }


def check_generate_paths(case: Case, steps: int, paths: Sequence[str] = PATHS) -> Iterator[Row]:
    """One row "generate:<path>" per generate path users run (`paths`, of PATHS; torch-eager is
    always run first, as the others' yardstick), greedy on case.idx[0]'s first PROMPT_LEN tokens
    (module docstring). torch-compile is slow to compile on a CPU (tens of seconds); jax-scan is
    JAX's `scan_layers=True`.

    Tokens alone miss bugs that leave the argmax alone (random weights' logits are dominated by the
    current token, so a decode step at the wrong position rarely flips it), so the row also measures
    the logits each step's `sample` got (spy_sample) against float64 over the same context: e_torch
    or e_jax, within e_max (rule 2). The note gives each path's wall time (a jitted or compiled
    path's first call includes its compilation)."""
    prompt = case.idx[0, : min(PROMPT_LEN, case.idx.shape[1])].tolist()
    steps = min(steps, case.cfg.max_seq_len - len(prompt))
    fwd = _Forwards(case)
    base: list[int] | None = None
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(
            f"check_generate_paths: paths {unknown}: unknown; choose from {list(PATHS)}"
        )
    runners = _generate_paths(case, prompt, steps)
    for path in ["torch-eager", *(p for p in PATHS if p in paths and p != "torch-eager")]:
        fw, run = runners[path]
        t0 = time.perf_counter()
        with spy_sample(fw) as rec:
            toks = [int(t) for t in run()]
        wall = time.perf_counter() - t0
        seq = prompt + toks
        ref = fwd("float64", seq)
        e_max = REL[case.dtype] * float(np.abs(ref).max())
        # the full forward's greedy choice per step
        own = fwd(fw, seq)[len(prompt) - 1 : len(seq) - 1].argmax(-1)
        ref_steps = ref[len(prompt) - 1 : len(seq) - 1]
        problems: list[tuple[str, str]] = []
        # (step, token, other token, what the other is, float64 logits of that context)
        mismatches = []
        if len(toks) != steps or len(rec) != steps:
            problems.append(
                ("", f"{len(toks)} tokens and {len(rec)} sample calls for {steps} steps")
            )
        for i in np.flatnonzero(np.asarray(toks) != own[: len(toks)]):
            mismatches.append(
                (int(i), toks[i], int(own[i]), f"{fw} full-forward argmax", ref_steps[i])
            )
        if base is None:
            base = toks
        else:
            i = first_difference(toks, base, strict=False)
            # the contexts agree up to step i: judged there, on the float64 logits of that context
            if i is not None:
                mismatches.append(
                    (i, toks[i], base[i], "torch-eager", fwd("float64", prompt + base[:i])[-1])
                )
        ties, worst = 0, 0.0
        for i, a, b, what, r_V in mismatches:
            margin = float(abs(r_V[a] - r_V[b]))
            worst = max(worst, margin)
            if margin <= 2 * e_max:
                ties += 1
            else:
                problems.append(
                    (
                        f"step {i}",
                        f"{path} token {a} vs {what} {b}, float64 margin {margin:.2e} > "
                        f"2e_max {2 * e_max:.2e}",
                    )
                )
        e = math.inf
        if len(rec) == len(toks):
            err_S = np.abs(np.stack([r[0] for r in rec]) - ref_steps).max(-1)
            e = float(err_S.max())
            if not e <= e_max:
                problems.append(
                    (
                        f"step {int(np.nanargmax(err_S))}",
                        f"{fw} generate's logits off float64 by {e:.2e} > e_max {e_max:.2e}",
                    )
                )
        note = (
            f"{len(toks)} tokens from a {len(prompt)}-token prompt; {ties} near-ties excused; "
            f"logits vs float64 {e:.1e}; {wall:.2f} s" + "".join(f"; {w}: {m}" for w, m in problems)
        )
        torch_side = fw == "torch"
        yield case_row(
            f"generate:{path}",
            case,
            "sdpa" if torch_side else "-",
            "-" if torch_side else "auto",
            e_torch=e if torch_side else None,
            e_jax=None if torch_side else e,
            diff=worst,
            budget=2 * e_max,
            passed=not problems,
            note=note,
            e_max=e_max,
            where=problems[0][0] if problems else "",
        )


# ----------------------------------------------------------------------------- ragged batches


def _ragged_inputs(case: Case, steps: int) -> list[list[int]]:
    """Three token sequences (prompt + `steps` teacher-forced tokens) of
    different prompt lengths, from case.idx."""
    B, T = case.idx.shape
    n = min(PROMPT_LEN, T - steps)
    if n < 3:
        raise ValueError(
            f"ragged: case.idx has {T} tokens a row; needs >= {steps + 3} for {steps} steps"
        )
    lens = [n, max(1, n - 5), max(1, n - 11)] if n > 11 else [n, max(1, 2 * n // 3), max(1, n // 3)]
    return [case.idx[b % B, b : b + L + steps].tolist() for b, L in enumerate(lens)]


def _cached_logits(framework: str, model, seqs: list[list[int]], steps: int) -> np.ndarray:
    """Each row's next-token logits, (B, steps, V) float64, through the generate module's own
    `prefill` and `decode_one_token` on the model's static cache, laid out as generate lays it out
    (right-padded prompts, each row decoding at its own position), each row's decode inputs
    teacher-forced from its sequence."""
    from gptmod.sampling import plan

    prompts = [s[: len(s) - steps] for s in seqs]
    p = plan(prompts, steps, model.cfg)
    tokens_BP = np.zeros((p.batch, p.prompt_len), np.int64)
    for b, ids in enumerate(prompts):
        tokens_BP[b, : len(ids)] = ids
    lens_B = np.array([len(ids) for ids in prompts])
    forced_BS = np.array([s[len(s) - steps :] for s in seqs])
    if framework == "torch":
        import torch

        g = _gen("torch")
        dev = model.tok_emb.weight.device
        arr = lambda a: torch.from_numpy(np.asarray(a)).to(dev)
        out = lambda x: x.double().cpu().numpy()
        ctx = torch.no_grad()
    else:
        import jax.numpy as jnp

        g = _gen("jax")
        arr = lambda a: jnp.asarray(np.asarray(a), jnp.int32)
        out = lambda x: np.asarray(x, np.float64)
        ctx = contextlib.nullcontext()
    rows = []
    with ctx:
        model.setup_cache(p.batch, p.cache_len)
        try:
            if framework == "torch":
                rows.append(out(g.prefill(model, arr(tokens_BP), arr(lens_B))))
                for i in range(1, steps):
                    rows.append(
                        out(
                            g.decode_one_token(model, arr(forced_BS[:, i - 1]), arr(lens_B + i - 1))
                        )
                    )
            # jitted, as generate runs them; the functions looked up now (a
            # patched one is traced in)
            else:
                from flax import nnx

                graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
                logits, cache = _jit_call(
                    g.prefill, graphdef, params, cache, arr(tokens_BP), arr(lens_B)
                )
                rows.append(out(logits))
                for i in range(1, steps):
                    logits, cache = _jit_call(
                        g.decode_one_token,
                        graphdef,
                        params,
                        cache,
                        arr(forced_BS[:, i - 1]),
                        arr(lens_B + i - 1),
                    )
                    rows.append(out(logits))
        finally:
            model.clear_cache()
    return np.stack(rows, axis=1)


def check_ragged(case: Case, steps: int = 4) -> Iterator[Row]:
    """Row "ragged": a batch of three prompts of different lengths through each twin's cached
    generate path, against each row run alone and against float64 (module docstring)."""
    seqs = _ragged_inputs(case, steps)
    fwd = _Forwards(case)
    ref = np.stack([fwd("float64", s[:-1])[len(s) - 1 - steps :] for s in seqs])  # (B, steps, V)
    scale = float(np.abs(ref).max())
    e_max = REL[case.dtype] * scale
    models = {"torch": torch_model(case, case.dtype, "sdpa"), "jax": jax_model(case, "auto")}
    batched, solo = {}, {}
    for fw, m in models.items():
        batched[fw] = _cached_logits(fw, m, seqs, steps)
        solo[fw] = np.concatenate([_cached_logits(fw, m, [s], steps) for s in seqs])
    e_t, e_j = (float(np.abs(batched[fw] - ref).max()) for fw in models)
    row = numeric_row(
        "ragged",
        case,
        "sdpa",
        "auto",
        e_t,
        e_j,
        float(np.abs(batched["torch"] - batched["jax"]).max()),
        scale,
    )
    problems, ties = [], 0
    self_diff = {}
    for fw in models:
        d_BS = np.abs(batched[fw] - solo[fw]).max(-1)
        self_diff[fw] = float(d_BS.max())
        if not self_diff[fw] <= e_max:
            b, i = np.unravel_index(int(np.nanargmax(d_BS)), d_BS.shape)
            problems.append(
                (
                    f"row {b} step {i}",
                    f"{fw} batched vs solo logits differ by "
                    f"{self_diff[fw]:.2e} > e_max {e_max:.2e}",
                )
            )
        a_BS, s_BS = batched[fw].argmax(-1), solo[fw].argmax(-1)
        for b, i in zip(*np.nonzero(a_BS != s_BS), strict=True):
            margin = abs(ref[b, i, a_BS[b, i]] - ref[b, i, s_BS[b, i]])
            if margin <= 2 * e_max:
                ties += 1
            else:
                problems.append(
                    (
                        f"row {b} step {i}",
                        f"{fw} batched argmax {a_BS[b, i]} vs solo {s_BS[b, i]}, "
                        f"float64 margin {margin:.2e} > 2e_max",
                    )
                )
    lens = [len(s) - steps for s in seqs]
    row.note = (
        f"prompts of {lens} tokens + {steps} steps; batched vs solo: torch "
        f"{self_diff['torch']:.1e}, jax {self_diff['jax']:.1e} (<= e_max {e_max:.1e}); "
        f"{ties} argmax near-ties excused"
        + "".join(f"; {w}: {p}" for w, p in problems)
        + (f"; {row.note}" if row.note else "")
    )
    if problems:
        row.passed, row.where = False, problems[0][0]
    elif not row.passed:
        worst = (
            np.abs(batched["torch"] - ref).max(-1)
            if e_t >= e_j
            else np.abs(batched["jax"] - ref).max(-1)
        )
        b, i = np.unravel_index(int(np.nanargmax(worst)), worst.shape)
        row.where = f"row {b} step {i}"
    yield row


# ------------------------------------------------------------------------ the sampling distribution


def _label(setting: dict[str, float]) -> str:
    short = {"temperature": "T", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    return " ".join(f"{short[k]}={v:g}" for k, v in setting.items())


def _softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(-1, keepdims=True)


def reference_support(ref_SV: np.ndarray, setting: dict[str, float]) -> np.ndarray:
    """The tokens SamplingParams' rule allows on float64 logits, (S, V) bool: temperature, then
    top-k (logit >= the k-th largest), top-p (the tokens whose strictly-more-likely mass is < p: the
    smallest likely set, ties at the cut kept), min-p (p >= min_p * max p). Written from the
    documented rule, not from either twin."""
    return _support_and_ties(ref_SV, setting, 0.0, 0)[0]


def near_ties(ref_SV: np.ndarray, setting: dict[str, float], e: float) -> np.ndarray:
    """The tokens whose membership in the allowed set a twin may decide either way, (S, V) bool:
    logits within e of `ref_SV` (float64), filtered in fp32, can put them on either side of a
    filter's threshold."""
    return _support_and_ties(ref_SV, setting, e, ref_SV.shape[-1])[1]


def _support_and_ties(
    ref_SV: np.ndarray, s: dict[str, float], e: float, V: int
) -> tuple[np.ndarray, np.ndarray]:
    x = ref_SV / s["temperature"]
    # Each twin's tempered logits are within u of x: its logit error e/T
    # plus fp32 rounding of the division.
    u = (
        (e / s["temperature"] + U32 * np.abs(x).max(-1, keepdims=True))
        if V
        else np.zeros((x.shape[0], 1))
    )
    keep, amb = np.ones(x.shape, bool), np.zeros(x.shape, bool)
    if s.get("top_k") is not None:
        kth = -np.sort(-x, axis=-1)[:, int(s["top_k"]) - 1 : int(s["top_k"])]
        d = x - kth  # the k-th largest moves by at most u too (an order statistic is 1-Lipschitz)
        # a token alone in the band is the k-th in every twin: kept, no tie
        band = np.abs(d) <= 2 * u
        amb |= band & (band.sum(-1, keepdims=True) > 1)
        keep &= d >= 0
    if s.get("top_p") not in (None, 1.0):
        q = _softmax(np.where(keep, x, -np.inf))
        # A twin's probabilities are within a factor r of these: exp(2u) from its logits, and its
        # fp32 softmax's normaliser (a sum of V terms). Its mass-before comes from an fp32 cumsum:
        # up to (rank) * U32 off.
        r = np.exp(2 * u) * (1 + V * U32)
        for j in range(x.shape[0]):
            qa = np.sort(q[j])  # ascending
            tail = np.concatenate([np.cumsum(qa[::-1])[::-1], [0.0]])  # tail[n] = mass of qa[n:]

            def above(
                level: np.ndarray, side: str, qa: np.ndarray = qa, tail: np.ndarray = tail
            ) -> np.ndarray:
                # mass of the tokens > (or >=) level
                return tail[np.searchsorted(qa, level, side=side)]

            g = above(q[j], "right")  # mass strictly more likely than each token: kept iff g < p
            keep_p = g < s["top_p"]
            if V:
                lo = above(q[j] * r[j], "right") / r[j]  # tokens surely still more likely
                # tokens that may be more likely
                n_up = V - np.searchsorted(qa, q[j] / r[j], side="left")
                hi = (above(q[j] / r[j], "left") - q[j]) * r[j]
                slack = n_up * U32
                amb[j] |= keep[j] & ~((lo - slack >= s["top_p"]) | (hi + slack < s["top_p"]))
            keep[j] &= keep_p
    if s.get("min_p") not in (None, 0.0):
        xm = np.where(keep, x, -np.inf)
        d = xm - xm.max(-1, keepdims=True) - math.log(s["min_p"])  # p / max p >= min_p in log form
        amb |= keep & (np.abs(d) <= 2 * u + 8 * U32)
        keep &= d >= 0
    return keep, amb


@contextlib.contextmanager
def spy_sample(framework: str, forced: Sequence[int] | None = None) -> Iterator[list[tuple]]:
    """Record what the twin's generate module samples from, step by step, while the block runs: a
    list of (logits (V,), filtered logits (V,) or None when greedy, the token `sample` chose) for
    row 0, all float64. The spy wraps the module's `sample` (looked up now, so a patched
    `filter_logits` is seen): it calls the real one, and returns its token, or with `forced`,
    forced[step] (teacher forcing: every twin then sees the same contexts). JAX runs `sample` inside
    jit: the spy reports through io_callback, and the jit caches are cleared before (so it is traced
    in) and after (so no later call reuses a program with the spy in it)."""
    g, rec = _gen(framework), []

    def record(logits, filtered, tok) -> np.ndarray:
        f = None if filtered is None else np.asarray(filtered, np.float64)[0]
        rec.append((np.asarray(logits, np.float64)[0], f, int(np.asarray(tok)[0])))
        return (
            np.asarray(tok)
            if forced is None
            else np.full(np.shape(tok), forced[len(rec) - 1], np.int32)
        )

    real = g.sample
    if framework == "torch":
        import torch

        def spy(logits_BV, generator, knobs, flags):
            filtered = (
                None
                if flags.greedy
                else g.filter_logits(logits_BV, knobs, flags).double().cpu().numpy()
            )
            tok = real(logits_BV, generator, knobs, flags)
            out = record(logits_BV.double().cpu().numpy(), filtered, tok.cpu().numpy())
            return torch.from_numpy(out.astype(np.int64)).to(tok.device)

        with _swapped(g, "sample", spy):
            yield rec
        return
    import jax
    from jax.experimental import io_callback

    def spy(logits_BV, key, knobs, flags):
        tok = real(logits_BV, key, knobs, flags)
        shape = jax.ShapeDtypeStruct(tok.shape, tok.dtype)
        if flags.greedy:
            return io_callback(
                lambda x, t: record(x, None, t).astype(t.dtype), shape, logits_BV, tok
            )
        filtered = g.filter_logits(logits_BV, knobs, flags)
        return io_callback(
            lambda x, f, t: record(x, f, t).astype(t.dtype), shape, logits_BV, filtered, tok
        )

    jax.clear_caches()
    try:
        with _swapped(g, "sample", spy):
            yield rec
    finally:
        jax.clear_caches()


def tv_bound(d: float, temperature: float) -> float:
    """The most total variation two distributions on one support can differ by when their logits
    differ by at most d per entry: each probability moves by a factor within exp(+-2d/T), so TV <=
    (exp(2d/T) - 1) / 2."""
    return math.expm1(2 * d / temperature) / 2


def check_sampling(
    case: Case, settings: Sequence[dict[str, float]] = SETTINGS, steps: int = 8
) -> Iterator[Row]:
    """One row "sampling <knobs>" per setting (keyword arguments of generate: temperature > 0,
    top_k, top_p, min_p): the per-step distribution each twin's generate samples from,
    teacher-forced with case.idx[0]'s own continuation (module docstring). e_torch/e_jax: the logits
    generate used against float64; |Δ|: the largest TV(torch, jax) over the steps, against tv_bound
    of rule 1's budget."""
    T = case.idx.shape[1]
    P = min(PROMPT_LEN, T - steps)
    if P < 1:
        raise ValueError(
            f"sampling: case.idx has {T} tokens a row; needs > {steps} for {steps} steps"
        )
    seq = case.idx[0, : P + steps].tolist()
    prompt, forced = seq[:P], seq[P:]
    # (steps, V): the contexts the forced steps see
    ref = _Forwards(case)("float64", seq[:-1])[P - 1 :]
    scale = float(np.abs(ref).max())
    e_max = REL[case.dtype] * scale
    tm, jm = torch_model(case, case.dtype, "sdpa"), jax_model(case, "auto")
    for setting in settings:
        if not setting.get("temperature"):
            raise ValueError(
                f"sampling: setting {setting}: needs temperature > 0 (0 is greedy, no distribution)"
            )
        check, Temp = f"sampling {_label(setting)}", float(setting["temperature"])
        t0 = time.perf_counter()
        caps = {}
        for fw, gen, m in (("torch", _gen("torch"), tm), ("jax", _gen("jax"), jm)):
            with spy_sample(fw, forced) as rec:
                caps[fw] = (gen.generate(m, [prompt], steps, **setting)[0], rec)
        wall = time.perf_counter() - t0
        problems: list[tuple[str, str]] = []
        for fw, (out, rec) in caps.items():
            if len(rec) != steps or out != forced:
                problems.append(
                    (
                        "",
                        f"{fw} generate made {len(rec)} sample calls for {steps} steps, returned "
                        f"{out[:4]}... instead of the forced tokens",
                    )
                )
        if problems:
            yield case_row(check, case, passed=False, note=problems[0][1], e_max=e_max, where="spy")
            continue
        logits = {fw: np.stack([r[0] for r in rec]) for fw, (_, rec) in caps.items()}
        filt = {fw: np.stack([r[1] for r in rec]) for fw, (_, rec) in caps.items()}
        e_t, e_j = (float(np.abs(logits[fw] - ref).max()) for fw in caps)
        e_b = min(max(e_t, e_j), e_max)  # within rule 2, what each twin's logits may be off by
        d = min(max(ABS_FLOOR[case.dtype], K * max(e_t, e_j)), max(e_max, ABS_FLOOR[case.dtype]))
        budget = tv_bound(d, Temp)
        want, amb = reference_support(ref, setting), near_ties(ref, setting, e_b)
        sup = {fw: np.isfinite(f) for fw, f in filt.items()}
        excused = {fw: 0 for fw in caps}
        same = np.all(sup["torch"] == sup["jax"], axis=-1)
        for fw in caps:
            off = sup[fw] != want
            bad = off & ~amb
            excused[fw] = int(off.sum() - bad.sum())
            if bad.any():
                i, v = (int(a[0]) for a in np.nonzero(bad))
                problems.append(
                    (
                        f"step {i}",
                        f"{fw} {'allows' if sup[fw][i, v] else 'drops'} token {v} "
                        f"({int(bad[i].sum())} such tokens at that step, {int(sup[fw][i].sum())} "
                        f"allowed, float64 rule: {int(want[i].sum())})",
                    )
                )
            outside = [i for i, r in enumerate(caps[fw][1]) if not sup[fw][i, r[2]]]
            if outside:
                problems.append(
                    (
                        f"step {outside[0]}",
                        f"{fw} sampled token {caps[fw][1][outside[0]][2]}, "
                        "outside its own allowed set",
                    )
                )
        p = {fw: _softmax(f) for fw, f in filt.items()}
        tv_S = 0.5 * np.abs(p["torch"] - p["jax"]).sum(-1)
        # where the supports differ (near-ties) TV is not judged
        tv = float(tv_S[same].max()) if same.any() else 0.0
        if not tv <= budget:
            problems.append(
                (f"step {int(np.argmax(np.where(same, tv_S, -1)))}", f"TV {tv:.2e} > {budget:.2e}")
            )
        for fw, e in (("torch", e_t), ("jax", e_j)):
            if not e <= e_max:
                problems.append(
                    ("logits", f"{fw} logits off float64 by {e:.2e} > e_max {e_max:.2e}")
                )
        note = (
            f"{steps} steps from a {P}-token prompt; allowed tokens per step "
            f"{int(want.sum(-1).min())}..{int(want.sum(-1).max())} (float64 rule); near-ties "
            f"excused: torch {excused['torch']}, jax {excused['jax']} tokens, "
            f"{int((~same).sum())} steps left out of TV; TV budget from d={d:.1e}; {wall:.1f} s"
            + "".join(f"; {w}: {m}" for w, m in problems)
        )
        yield case_row(
            check,
            case,
            e_torch=e_t,
            e_jax=e_j,
            diff=tv,
            budget=budget,
            passed=not problems,
            note=note,
            e_max=e_max,
            where=problems[0][0] if problems else "",
        )


CHECKS: dict[str, Callable[..., Iterator[Row]]] = {
    "generate": check_generate_paths,
    "ragged": check_ragged,
    "sampling": check_sampling,
}
