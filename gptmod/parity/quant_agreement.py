"""The `quant` check of an int8 case: each twin on int8 weights against the same twin on the float32
weights they were quantized from.

Quantization changes the model, so no error budget of the twins applies. What the check judges
is what a user of int8 weights cares about: the next-token loss on the case's tokens, whose
perplexity may rise by at most QUANT_PPL_BUDGET (1%, the bar torchao and gpt-fast report int8
weight-only quantization meeting). The note adds the greedy agreement: the first step at which
int8's greedy stream leaves float32's, and over float32's stream, teacher-forced, the share of
positions where int8's top token is float32's; and the mean KL divergence of int8's next-token
distribution from float32's. On random weights and random ids (both near uniform) these say little;
on a real model and text (`--weights smollm2`) they are the figures that matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from gptmod import models
from gptmod.parity import suite
from gptmod.parity.suite import Case, Row, case_row, jax_model, jax_run, torch_model, torch_run

QUANT_PPL_BUDGET = 0.01  # the relative rise of perplexity an int8 case may show
PROMPT_LEN = 16  # the greedy prompt: case.idx[0]'s first tokens, as the divergence check's
# Perplexity on real text is scored over this many tokens, in windows of up to QUANT_BLOCK: a 1%
# bound needs thousands of tokens spread through the text (SmolLM2: +2.0% over Hamlet's first 63
# tokens, +1.1% over its first 4,088, +0.8% over 4,088 spread through it, +0.6% over 16,384 from
# all eight plays).
QUANT_TOKENS = 4096
QUANT_BLOCK = 512


def next_token_loss(logits_BTV: np.ndarray, idx_BT: np.ndarray) -> float:
    """Mean cross-entropy (nats) of each token given the ones before it, in float64."""
    x = logits_BTV[:, :-1].astype(np.float64)
    top = x.max(-1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(x, idx_BT[:, 1:, None], axis=-1)[..., 0]
    return float((log_z - picked).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def mean_kl(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean KL(p || q) in nats over every position of two logit arrays of one shape."""
    lp, lq = _log_softmax(logits_p), _log_softmax(logits_q)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def scoring_windows(case: Case, text_ids: Sequence[int] = ()) -> np.ndarray:
    """The (windows, block) token ids perplexity is scored on: QUANT_TOKENS of `text_ids` (real
    text) in windows of min(QUANT_BLOCK, max_seq_len) spread evenly from its start to its end (a
    play's opening, its title and list of characters, is no sample of it), or case.idx without
    text."""
    block = min(QUANT_BLOCK, case.cfg.max_seq_len)
    n = min(QUANT_TOKENS // block, len(text_ids) // block)
    if n == 0:
        return case.idx
    text = np.asarray(text_ids, np.int64)
    starts = np.linspace(0, len(text) - block, n).astype(np.int64)
    return np.stack([text[i : i + block] for i in starts])


def check_quant(case: Case, steps: int = 256, text_ids: Sequence[int] = ()) -> Iterator[Row]:
    """One row per twin, "quant int8|fp32 torch" and "... jax" (see the module docstring), scored
    on `scoring_windows(case, text_ids)`."""
    import gptmod_jax
    import gptmod_torch

    if case.float_state is None:  # not an int8 case
        return
    wins = scoring_windows(case, text_ids)
    prompt = case.idx[0, : min(PROMPT_LEN, case.idx.shape[1])].tolist()
    n = min(steps, case.cfg.max_seq_len - len(prompt))
    runs = (
        ("torch", gptmod_torch.generate, torch_run, torch_model(case, "float32", "sdpa")),
        ("jax", gptmod_jax.generate, jax_run, jax_model(case, "auto")),
    )
    for name, generate, run, int8 in runs:
        fp32 = models.build(name, case.cfg, case.float_state)
        sums = np.zeros(3)  # int8 loss, fp32 loss, KL; one window at a time (logits are large)
        for w in wins:
            l8, l32 = run(int8, w[None]), run(fp32, w[None])
            sums += [next_token_loss(l8, w[None]), next_token_loss(l32, w[None]), mean_kl(l32, l8)]
        loss8, loss32, kl = sums / len(wins)
        rise = math.exp(loss8 - loss32) - 1.0
        scored = wins.shape[0] * (wins.shape[1] - 1)
        note = (
            f"perplexity over {scored:,} tokens {math.exp(loss32):.4g} (fp32) -> "
            f"{math.exp(loss8):.4g} (int8), KL(fp32||int8) {kl:.3g} nats/token"
        )
        if n >= 1:
            s8, s32 = (generate(m, [prompt], n)[0] for m in (int8, fp32))
            first = suite.first_difference(s8, s32)
            # teacher-forced on float32's stream: int8's top token after each of its prefixes
            stream = np.array([prompt + s32[:-1]])
            top8 = run(int8, stream)[0, len(prompt) - 1 :].argmax(-1)
            agree = float(np.mean(top8 == np.array(s32)))
            note += (
                f"; greedy: {n} tokens identical"
                if first is None
                else f"; greedy: int8 leaves fp32 at step {first} of {n}"
            ) + f", top-1 agreement {100 * agree:.1f}% over fp32's {n} tokens"
        yield case_row(
            f"quant int8|fp32 {name}",
            case,
            "sdpa" if name == "torch" else "-",
            "auto" if name == "jax" else "-",
            diff=abs(rise),
            budget=QUANT_PPL_BUDGET,
            passed=abs(rise) <= QUANT_PPL_BUDGET,
            note=f"{note} ({100 * rise:+.2f}%)",
        )
