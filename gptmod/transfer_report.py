"""`gptmod transfer-report`: how much of GPT-2 survives the transfer into a modern config.

Next-token loss on bundled Shakespeare for GPT-2 itself, the full modern
transfer, GPT-2 with each modern switch alone, and a random init of the modern
config; plus, per layer, how closely the transferred SwiGLU MLP (with its
fitted gate) reproduces GPT-2's GELU MLP on the activations of the real text.
Meaningful only with real GPT-2 weights (`--weights gpt2` online, or a downloaded folder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gptmod import hf_gpt2, models, tokenizer
from gptmod.config import ModelConfig
from gptmod.transfer import TransferReport


@dataclass
class Variant:
    name: str
    cfg: ModelConfig
    state: dict[str, np.ndarray] | None  # None: the model's own seeded random init
    report: TransferReport | None = None
    loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def variants(
    tensors: dict[str, np.ndarray], classic: ModelConfig, target: ModelConfig, seed: int
) -> list[Variant]:
    """GPT-2, each switch in which `target` differs from GPT-2 alone, the
    full transfer, and random init."""
    switches: list[tuple[str, dict[str, Any]]] = []
    for f in ("pos", "norm", "n_kv_head", "mlp", "bias", "logit_softcap", "tie_embeddings"):
        new = getattr(target, f)
        if new == getattr(classic, f):
            continue
        change = {f: new, **({"rope_theta": target.rope_theta} if f == "pos" else {})}
        switches.append((f"{f}={new}", change))
        # also: the usual zero gate, and the target's own d_ff (units pruned or added)
        if f == "mlp":
            switches.append((f"mlp={new}, zero gate", change))
            if target.d_ff != classic.d_ff:
                switches.append((f"mlp={new}, d_ff={target.d_ff}", {**change, "d_ff": target.d_ff}))

    out = [Variant("GPT-2", classic, *hf_gpt2.from_hf_gpt2(tensors, classic, seed=seed))]
    for name, change in switches:
        cfg = replace(classic, **change)
        state, report = hf_gpt2.from_hf_gpt2(tensors, cfg, seed=seed)
        if name.endswith("zero gate"):  # SwiGLU's usual init, to measure what the fitted gate buys
            for k in state:
                if ".mlp.w_gate." in k:
                    state[k] = np.zeros_like(state[k])
        out.append(Variant(name, cfg, state, report))
    out.append(
        Variant("modern (all switches)", target, *hf_gpt2.from_hf_gpt2(tensors, target, seed=seed))
    )
    out.append(Variant("random init (modern)", target, None))
    return out


def windows(text: str, n_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping (n, seq_len + 1) windows covering the first n_tokens + n tokens of `text`."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    n = n_tokens // seq_len
    if n < 1:
        raise ValueError(f"--tokens {n_tokens} is less than one window of --seq-len {seq_len}")
    if len(ids) < n * (seq_len + 1):
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than --tokens {n_tokens} needs "
            f"({n} windows of {seq_len + 1})"
        )
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


class _Evaluator:
    """Mean next-token cross-entropy (nats) of a config + state over fixed
    windows, in one framework."""

    def __init__(self, framework: str, batch: int, seed: int) -> None:
        self.framework, self.batch, self.seed = framework, batch, seed

    def build(self, cfg: ModelConfig, state: dict[str, np.ndarray] | None) -> Any:
        return models.build(self.framework, cfg, state, seed=self.seed)

    def losses(self, model: Any, data: np.ndarray) -> Any:
        """Yield (summed loss, token count) per batch of windows."""
        for i in range(0, len(data), self.batch):
            x, y = data[i : i + self.batch, :-1], data[i : i + self.batch, 1:]
            if self.framework == "torch":
                import torch
                import torch.nn.functional as F

                with torch.no_grad():
                    logits = model(torch.from_numpy(x))
                    loss = F.cross_entropy(
                        logits.flatten(0, 1), torch.from_numpy(y).flatten(), reduction="sum"
                    )
                yield float(loss), y.size
            else:
                yield float(_jax_loss_sum(model, x, y)), y.size


def _jax_loss_sum(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    import jax
    import optax
    from flax import nnx

    @nnx.jit
    def f(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).sum()

    return f(model, x, y)


def gate_errors(
    tensors: dict[str, np.ndarray], classic: ModelConfig, mlp: str, window: np.ndarray
) -> list[float]:
    """Per layer: |SwiGLU MLP (transferred, fitted gate) - GPT-2's MLP| /
    |GPT-2's MLP| on real activations.

    Both sides see the same normalised inputs (the LayerNorms are kept), and GPT-2's c_proj bias,
    which both add unchanged, is left out of the denominator. A zero gate scores 1.0."""
    import torch

    import gptmod_torch

    ref = gptmod_torch.load_state(
        gptmod_torch.GPT(classic).eval(), hf_gpt2.from_hf_gpt2(tensors, classic)[0]
    )
    cfg = replace(classic, mlp=mlp)
    ours = gptmod_torch.load_state(
        gptmod_torch.GPT(cfg).eval(), hf_gpt2.from_hf_gpt2(tensors, cfg)[0]
    )
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        b.mlp.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        for b in ref.blocks
    ]
    try:
        with torch.no_grad():
            ref(torch.from_numpy(window[None, :-1]))
            errors = []
            for block, (x, want) in zip(ours.blocks, seen, strict=True):
                signal = want - block.mlp.w_down.bias
                errors.append(float((block.mlp(x) - want).norm() / signal.norm()))
    finally:
        for h in hooks:
            h.remove()
    return errors


def run(
    source: Any,
    target: ModelConfig,
    *,
    text: str,
    tokens: int = 8192,
    seq_len: int = 1024,
    framework: str = "torch",
    batch: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything the command prints, as a JSON-able dict."""
    from tqdm import tqdm

    tensors, classic = hf_gpt2.read_hf_gpt2(source)
    sizes = ("vocab_size", "d_model", "n_layer", "n_head")
    wrong = [
        f"{k}={getattr(target, k)} (GPT-2 source: {getattr(classic, k)})"
        for k in sizes
        if getattr(target, k) != getattr(classic, k)
    ]
    if wrong:
        raise ValueError(f"the target config does not fit the GPT-2 source: {', '.join(wrong)}")
    if seq_len > min(classic.max_seq_len, target.max_seq_len):
        raise ValueError(
            f"--seq-len {seq_len} exceeds max_seq_len (GPT-2 {classic.max_seq_len}, "
            f"target {target.max_seq_len})"
        )
    data = windows(text, tokens, seq_len)
    runs = variants(tensors, classic, target, seed)
    ev = _Evaluator(framework, batch, seed)
    n_batches = math.ceil(len(data) / batch)
    with tqdm(total=len(runs) * n_batches, unit="batch", disable=not progress, desc="loss") as bar:
        for v in runs:
            bar.set_postfix_str(v.name)
            model = ev.build(v.cfg, v.state)
            total = count = 0
            for loss_sum, n in ev.losses(model, data):
                total, count = total + loss_sum, count + n
                bar.update()
            v.loss = total / count
    gpt2, rand = runs[0].loss, runs[-1].loss
    rows = []
    for v in runs:
        params = v.report.param_counts() if v.report else {"new": v.cfg.num_params()}
        n = sum(params.values())
        rows.append(
            {
                "variant": v.name,
                "loss": v.loss,
                "ppl": math.exp(min(v.loss, 700.0)),
                "recovered": (rand - v.loss) / (rand - gpt2) if rand != gpt2 else math.nan,
                "params": {a: params.get(a, 0) / n for a in ("copied", "transformed", "new")},
                "config": v.cfg.to_dict(),
            }
        )
    result: dict[str, Any] = {
        "tokens": int(data[:, 1:].size),
        "seq_len": seq_len,
        "framework": framework,
        "rows": rows,
        "target": target.to_dict(),
        "transfer_report": json.loads(runs[-2].report.to_json()),
    }
    if target.mlp == "swiglu":
        result["gate_rel_error"] = gate_errors(tensors, classic, "swiglu", data[0])
    return result


def format_table(result: dict[str, Any]) -> str:
    """The loss table and the gate errors, as plain text."""
    head = ("variant", "loss", "ppl", "recovered", "copied", "transformed", "new")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        p = r["params"]
        lines.append(
            f"{r['variant']} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['recovered']:.1%} | "
            f"{p['copied']:.1%} | {p['transformed']:.1%} | {p['new']:.1%}"
        )
    out = [
        f"next-token loss (nats) on {result['tokens']:,} tokens of Shakespeare, "
        f"{result['framework']}, windows of {result['seq_len']}; recovered = (random - loss) / "
        "(random - GPT-2); copied/transformed/new = share of the variant's parameters",
        *lines,
    ]
    if "gate_rel_error" in result:
        errs = ", ".join(f"{e:.3f}" for e in result["gate_rel_error"])
        out.append(
            "\nSwiGLU (fitted gate) vs GPT-2's MLP, relative error per layer "
            f"(zero gate: 1.000): {errs}"
        )
    return "\n".join(out)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
