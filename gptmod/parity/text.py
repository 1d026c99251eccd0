"""Real-text rows of the parity suite: next-token distributions, loss and
greedy trajectories, as a user reads them.

Both twins and a float64 torch reference of the same (dtype-rounded) weights see the case's tokens
(Hamlet through the model's own tokenizer for real weights). Every budget here is derived from one
premise, the suite's rules 1 and 2: each twin's logits are within e_max = REL[dtype] * max|float64
logit| of float64's, and within e_max of each other. From a logit error of at most e per entry
follow, exactly (no small-e approximation):

- log-probabilities move by at most 2e: log p_i = z_i - logsumexp(z), and logsumexp is 1-Lipschitz
  in the max-norm; so a mean next-token loss moves by at most 2e.
- KL(p||q) <= e^2 / 2 per position. With d = z - z', KL(p||q) = E_p[d] + log E_p[exp(-d)], and
  Hoeffding's lemma (d takes values in a range of width 2e) bounds log E_p[exp(-d)] by -E_p[d] +
  (2e)^2 / 8. The log-ratio bound KL <= 2e also holds and is the tighter one for e > 4; the budget
  is the smaller of the two.
- a top-k choice can differ only between tokens whose float64 logits are within 2e (each moved by at
  most e): a disagreement between two top-k sets is a near-tie, and excused, when every token in one
  set but not the other is within 2e_max in float64 of every token in the other but not the one.
  That implies the float64 gap between the k-th and (k+1)-th is <= 2e_max, and is stricter: a twin
  that swaps in a far-down token is not excused.
- greedy decoding: at the first step where a twin's token differs from float64's (all earlier tokens
  shared, so the contexts are identical), the float64 logits of the two tokens must be within
  2e_max. After that first flip the contexts differ, and later differences are legitimate: only the
  FIRST divergence is judged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gptmod.parity import suite
from gptmod.parity.suite import REL, Case, Row, case_row, jax_model, jax_run, torch_model, torch_run

PROMPT_LEN = 16
# positions per chunk: the (positions, vocab) float64 temporaries stay ~25 MB each at vocab 49152
CHUNK = 64


def kl_bound(e: float) -> float:
    """The most KL(p||q) per position that logits differing by at most e per entry can produce
    (module docstring)."""
    return min(e * e / 2, 2 * e)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(p||q) for each row of two (N, V) log-probability arrays."""
    return (np.exp(lp) * (lp - lq)).sum(-1)


def topk_sets(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of the k largest logits of each row; ties go to the
    lower index (as the twins' argmax)."""
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


@dataclass
class Agreement:
    """Top-k agreement of two models over N positions, judged on float64 logits."""

    n: int
    disagree: np.ndarray  # (N,) bool: the two top-k sets differ
    unexplained: np.ndarray  # (N,) bool: they differ and it is not a near-tie
    # (N,) the largest float64 gap between two swapped tokens (0 where the sets agree)
    worst_gap: np.ndarray

    @property
    def rate(self) -> float:
        return 1.0 - float(self.disagree.mean())

    @property
    def near_ties(self) -> int:
        return int(self.disagree.sum() - self.unexplained.sum())


def agreement(ref: np.ndarray, top_a: np.ndarray, top_b: np.ndarray, tol: float) -> Agreement:
    """Compare top-k sets `top_a` and `top_b` (N, k) position by position. A disagreement is excused
    when every token in one set but not the other has a float64 logit (`ref`, (N, V)) within `tol`
    of every token in the other set but not the one: only then can logit errors of tol/2 each have
    swapped them (module docstring)."""
    n = top_a.shape[0]
    disagree, unexplained, worst = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n)
    for i in range(n):
        a, b = set(top_a[i].tolist()), set(top_b[i].tolist())
        if a == b:
            continue
        only_a, only_b = sorted(a - b), sorted(b - a)
        gap = float(np.abs(ref[i, only_a][:, None] - ref[i, only_b][None, :]).max())
        # a NaN gap is unexplained
        disagree[i], unexplained[i], worst[i] = (True, not gap <= tol, gap)
    return Agreement(n, disagree, unexplained, worst)


def _forwards(case: Case, fault) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64, torch, jax) logits of case.idx, each (B, T, V) float64: one
    full forward per model."""
    ref = torch_run(torch_model(case, "float64", "math", "cpu"), case.idx)
    lt = torch_run(torch_model(case, case.dtype, "sdpa"), case.idx)
    lj = jax_run(jax_model(case, "auto", fault), case.idx)
    return ref, lt, lj


PAIRS = {
    "torch|f64": ("torch", "float64"),
    "jax|f64": ("jax", "float64"),
    "torch|jax": ("torch", "jax"),
}


@dataclass
class TextMetrics:
    """Everything check_text reports, per position where it has one. Models
    are "float64", "torch", "jax"."""

    e_max: float  # REL[dtype] * max|float64 logit|: the logit error the dtype explains
    kl: dict[str, np.ndarray]  # "torch||jax", "f64||torch", "f64||jax": KL per position, (N,)
    loss: dict[str, float]  # mean next-token cross-entropy (nats) per model
    n_targets: int
    top: dict[int, dict[str, Agreement]]  # k (1, 5) -> pair (PAIRS) -> agreement


def next_token_targets(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the (B*T,) flattened positions of idx: the next token of the same
    row, and whether there is one (position t of each row predicts token t+1
    of that row; a row's last position predicts nothing)."""
    B, T = idx.shape
    targets, has_next = np.zeros((B, T), np.int64), np.zeros((B, T), bool)
    targets[:, :-1], has_next[:, :-1] = idx[:, 1:], True
    return targets.reshape(-1), has_next.reshape(-1)


def measure_text(case: Case, fault: tuple[str, float] | None = None) -> TextMetrics:
    """One full forward of case.idx per twin and the float64 reference, reduced to KL, top-k
    agreement and loss."""
    ref3, lt3, lj3 = _forwards(case, fault)
    V = ref3.shape[-1]
    e_max = REL[case.dtype] * float(np.abs(ref3).max())
    logits = {
        "float64": ref3.reshape(-1, V),
        "torch": lt3.reshape(-1, V),
        "jax": lj3.reshape(-1, V),
    }
    N = logits["float64"].shape[0]
    targets, has_next = next_token_targets(case.idx)
    kl_pairs = {
        "torch||jax": ("torch", "jax"),
        "f64||torch": ("float64", "torch"),
        "f64||jax": ("float64", "jax"),
    }
    kl = {k: np.empty(N) for k in kl_pairs}
    nll = {m: np.empty(N) for m in logits}
    tops: dict[int, dict[str, list]] = {k: {m: [] for m in logits} for k in (1, 5)}
    for s in range(0, N, CHUNK):  # in chunks of positions: a few (CHUNK, V) temporaries at a time
        sl = slice(s, min(N, s + CHUNK))
        lp = {m: log_softmax(x[sl]) for m, x in logits.items()}
        for k, (p, q) in kl_pairs.items():
            kl[k][sl] = kl_per_position(lp[p], lp[q])
        for m, x in logits.items():
            nll[m][sl] = -lp[m][np.arange(sl.stop - s), targets[sl]]
            tops[5][m].append(topk_sets(x[sl], 5))
            # the first maximum, as greedy decoding picks
            tops[1][m].append(x[sl].argmax(-1)[:, None])
    top = {
        k: {
            p: agreement(logits["float64"], np.concatenate(d[a]), np.concatenate(d[b]), 2 * e_max)
            for p, (a, b) in PAIRS.items()
        }
        for k, d in tops.items()
    }
    loss = {m: float(v[has_next].mean()) for m, v in nll.items()}
    return TextMetrics(e_max, kl, loss, int(has_next.sum()), top)


def check_text(
    case: Case, fault: tuple[str, float] | None = None, text: str | None = None
) -> Iterator[Row]:
    """Rows "kl", "top1", "top5" and "loss" on the case's tokens (module
    docstring for every budget).

    `text` names what case.idx is (e.g. "hamlet"); None means random ids,
    for which the rows are still computed (the twins must still agree) but
    the loss is at chance level (perplexity ~ vocab) and says so."""
    yield from text_rows(case, measure_text(case, fault), text)


def text_rows(case: Case, m: TextMetrics, text: str | None = None) -> Iterator[Row]:
    """check_text's rows from metrics already measured (see check_text)."""
    e_max, kl = m.e_max, m.kl
    what = f"{case.idx.size} tokens of {text}" if text else f"{case.idx.size} random ids"

    # "kl": the row's e_torch/e_jax are max KL(float64||twin), its diff max
    # KL(torch||jax); all bounded alike.
    bound = kl_bound(e_max)
    ok = all(math.isfinite(float(v.max())) and float(v.max()) <= bound for v in kl.values())
    # a NaN is the worst position
    flagged = {k: np.where(np.isnan(v), np.inf, v) for k, v in kl.items()}
    worst = max(flagged, key=lambda k: float(flagged[k].max()))
    where = (
        "" if ok else f"position {int(flagged[worst].argmax())} (KL {worst} {kl[worst].max():.2e})"
    )
    stats = ", ".join(f"{k} {v.max():.2e}/{v.mean():.2e}" for k, v in kl.items())
    note = (
        f"KL per position max/mean: {stats}; bound min(e^2/2, 2e) at e = "
        f"{REL[case.dtype]:g}*max|logit| = {e_max:.2e}; {what}"
    )
    e_t, e_j, diff = (float(kl[k].max()) for k in ("f64||torch", "f64||jax", "torch||jax"))
    yield case_row(
        "kl",
        case,
        e_torch=e_t,
        e_jax=e_j,
        diff=diff,
        budget=bound,
        passed=ok,
        note=note,
        e_max=bound,
        where=where,
    )

    # "top1", "top5": each twin against float64 and against each other, near-ties (2e_max) excused.
    for k, ag in m.top.items():
        bad = [
            (p, int(np.flatnonzero(a.unexplained)[0])) for p, a in ag.items() if a.unexplained.any()
        ]
        where = "; ".join(
            f"{p} at position {i} (float64 gap {ag[p].worst_gap[i]:.2e})" for p, i in bad
        )
        rates = ", ".join(f"{p} {a.rate:.1%} ({a.near_ties} near-ties)" for p, a in ag.items())
        note = (
            f"top-{k} {'token' if k == 1 else 'set'} agrees at: {rates}, of "
            f"{ag['torch|f64'].n} positions; a near-tie: swapped tokens within 2e_max = "
            f"{2 * e_max:.2e} in float64; {what}"
        )
        yield case_row(
            f"top{k}",
            case,
            e_torch=1 - ag["torch|f64"].rate,
            e_jax=1 - ag["jax|f64"].rate,
            diff=1 - ag["torch|jax"].rate,
            budget=None,
            passed=not bad,
            note=note,
            where=where,
        )

    # "loss": mean next-token cross-entropy; each log-probability moves by
    # at most 2e_max, so does the mean.
    loss = m.loss
    e_t, e_j = abs(loss["torch"] - loss["float64"]), abs(loss["jax"] - loss["float64"])
    diff = abs(loss["torch"] - loss["jax"])
    lb = 2 * e_max
    ok = all(math.isfinite(v) for v in (e_t, e_j, diff)) and max(e_t, e_j, diff) <= lb
    V = case.cfg.vocab_size
    chance = (
        "" if text else f"; random ids: chance level is ln V = {math.log(V):.2f} (perplexity {V})"
    )
    ppl = ", ".join(f"{k} {v:.4f} ({math.exp(v):.4g})" for k, v in loss.items())
    note = (
        f"next-token loss (perplexity) on {m.n_targets} targets of {what}: "
        f"{ppl}; bound 2e_max{chance}"
    )
    yield case_row(
        "loss", case, e_torch=e_t, e_jax=e_j, diff=diff, budget=lb, passed=ok, note=note, e_max=lb
    )


# ----------------------------------------------------------------------------- greedy divergence


def check_divergence(
    case: Case, steps: int = 256, fault: tuple[str, float] | None = None
) -> Iterator[Row]:
    """Greedy decoding at the case's dtype in each twin against float64 greedy, for `steps` tokens
    from the first PROMPT_LEN tokens of case.idx[0] (capped by max_seq_len, said in the note).

    Three rows: "divergence torch|f64", "divergence jax|f64", "divergence torch|jax". Each reports
    the first step at which the two token streams differ and the float64 logit margin there between
    the two tokens (the contexts are still identical at that step), and passes when the margin is <=
    2e_max, a near-tie the dtype explains (module docstring). e_max = REL[dtype] * the largest
    |float64 logit| along the twins' streams. Later differences are not judged: once the context
    differs, so may everything after. fp32 is included: its e_max is tiny, so a flip there must be
    an exact near-tie, and it is the cheapest of the three to run."""
    import gptmod_jax
    import gptmod_torch

    if steps < 1:
        raise ValueError(f"check_divergence: steps={steps}: must be >= 1")
    prompt = case.idx[0, : min(PROMPT_LEN, case.idx.shape[1])].tolist()
    n = min(steps, case.cfg.max_seq_len - len(prompt))
    capped = f" (capped from {steps} by max_seq_len {case.cfg.max_seq_len})" if n < steps else ""
    if n < 1:
        room = f"prompt {len(prompt)} tokens, max_seq_len {case.cfg.max_seq_len}"
        yield case_row("divergence", case, note=f"no room to decode: {room}")
        return
    ref_m = torch_model(case, "float64", "math", "cpu")
    secs, outs = {}, {}
    for name, gen, model in (
        ("torch", gptmod_torch.generate, torch_model(case, case.dtype, "sdpa")),
        ("jax", gptmod_jax.generate, jax_model(case, "auto", fault)),
    ):
        start = time.perf_counter()
        outs[name] = gen(model, [prompt], n)[0]
        secs[name] = time.perf_counter() - start
    # float64 greedy, verified rather than generated (cached float64 decoding is memory-bound: ~1 GB
    # of weights read per token). One float64 forward over each twin's stream gives float64's logits
    # on every prefix of it; float64's greedy token after a prefix the twin shares is their argmax,
    # so float64's own stream first differs from the twin's at the first step where that argmax is
    # not the twin's token. All margins come from these two.
    start = time.perf_counter()
    ref = {
        name: torch_run(ref_m, np.array([prompt + out[:-1]]))[0, len(prompt) - 1 :]
        for name, out in outs.items()
    }
    secs["float64 verify"] = time.perf_counter() - start
    e_max = REL[case.dtype] * max(float(np.abs(r).max()) for r in ref.values())
    f64_first = {
        name: suite.first_difference(outs[name], ref[name].argmax(-1).tolist()) for name in outs
    }
    times = (
        ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + " (jax: including its JIT compile)"
    )
    for a, b in (("torch", "float64"), ("jax", "float64"), ("torch", "jax")):
        label = f"{a}|{'f64' if b == 'float64' else b}"
        step = f64_first[a] if b == "float64" else suite.first_difference(outs[a], outs[b])
        if step is None:
            note = f"{n} greedy tokens identical{capped}; {times}"
            yield case_row(
                f"divergence {label}", case, diff=0.0, budget=2 * e_max, passed=True, note=note
            )
            continue
        logits = ref[a][step]  # float64 on the shared context: a's stream up to this step (b's too)
        tb = int(logits.argmax()) if b == "float64" else outs[b][step]
        ta = outs[a][step]
        margin = float(abs(logits[ta] - logits[tb]))
        top = np.sort(logits)[-2:]
        tie = margin <= 2 * e_max
        note = (
            f"first differ at step {step} of {n}{capped}: {a} {ta} vs {b} {tb}, float64 margin "
            f"{margin:.3g} {'<=' if tie else '>'} 2e_max {2 * e_max:.3g} "
            f"({'near-tie' if tie else 'NOT a near-tie'}; float64 top-2 margin there "
            f"{top[1] - top[0]:.3g}); {times}"
        )
        yield case_row(
            f"divergence {label}",
            case,
            diff=margin,
            budget=2 * e_max,
            passed=tie,
            note=note,
            where="" if tie else f"step {step}",
        )
