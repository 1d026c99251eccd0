"""How each GPT-2 tensor becomes a canonical tensor: the transfer plan behind
`hf_gpt2.from_hf_gpt2`; and `TransferReport`, what any weight import did, tensor by tensor.

A classic config imports exactly (every tensor copied, at most transposed or
split). A modern or mixed config gets a partial transfer;
docs/architecture.md explains each rule and gives measured figures:

- GQA: each group's K and V heads are mean-pooled (Ainslie et al. 2023).
- RMSNorm: the LayerNorm gain becomes the RMSNorm weight. The LayerNorm bias b is folded into the
  biases of the linears that read the norm (W(g*x + b) + c = W(g*x) + (Wb + c)) when the config has
  biases; otherwise, and for the final norm (the tied unembedding has no bias), it is dropped.
- SwiGLU: w_up from c_fc, w_down from c_proj, and a new w_gate that is c_fc
  scaled per unit (`gate_init`).
- d_ff differing from GPT-2's: the d_ff hidden units with the largest |c_fc unit| * |c_proj unit|
  are kept; extra units get a random w_up/w_gate and a zero w_down, so they add nothing at first.
- RoPE: learned positions are dropped. No bias: every linear bias is
  dropped. Soft-capping has no weights.
Pure numpy; nothing here reads files (`TransferReport.save` writes one).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gptmod import fileio
from gptmod.config import ModelConfig
from gptmod.fileio import PathLike

Values = Mapping[str, np.ndarray]

# SwiGLU gate init. With w_up = c_fc, unit j computes silu(g_j) * u_j where GPT-2 computed gelu(u_j)
# = u_j * Phi(u_j). Without biases the gate can only be a multiple of u_j: g_j = (GATE_STD / r_j) *
# u_j, with r_j the RMS of u_j estimated from the weights (`gate_init`). GATE_STD is the
# least-squares fit of silu(GATE_STD * u/s) * u to gelu(u) for u ~ N(0, s^2) (relative error 0.52 of
# |gelu(u)|; a zero gate, the usual SwiGLU init, has error 1.0). With biases the gate can add a
# constant: g_j = GATE_STD_BIAS * u_j / r_j + GATE_BIAS fits with relative error 0.24. Tests
# re-derive all three.
GATE_STD = 0.6354
GATE_STD_BIAS = 0.3266
GATE_BIAS = 0.6694


@dataclass(frozen=True)
class Step:
    """How one target tensor is made from GPT-2 tensors (hub-layout names,
    no `transformer.` prefix)."""

    target: str
    sources: tuple[str, ...]
    how: str
    get: Callable[[Values], np.ndarray]
    action: str = (
        "copied"  # "copied" (values exact, incl. transposes and splits) | "transformed" | "new"
    )


@dataclass
class Plan:
    """Every target's step, the GPT-2 tensors left unused with the reason,
    and notes on weightless changes."""

    steps: list[Step]
    dropped: dict[str, str]
    notes: list[str]


def source_config(cfg: ModelConfig, d_ff: int, max_seq_len: int) -> ModelConfig:
    """The classic GPT-2 config a source must have to transfer into `cfg`."""
    return replace(
        cfg,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        n_kv_head=cfg.n_head,
        logit_softcap=None,
        tie_embeddings=True,
        d_ff=d_ff,
        max_seq_len=max_seq_len,
    )


def gpt2_shapes(src: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face GPT-2 with config `src`, in hub layout
    (Conv1D weights are (in, out))."""
    d, f = src.d_model, src.d_ff
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (src.vocab_size, d),
        "wpe.weight": (src.max_seq_len, d),
    }
    for i in range(src.n_layer):
        h = f"h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (d,),
            f"{h}.ln_1.bias": (d,),
            f"{h}.attn.c_attn.weight": (d, 3 * d),
            f"{h}.attn.c_attn.bias": (3 * d,),
            f"{h}.attn.c_proj.weight": (d, d),
            f"{h}.attn.c_proj.bias": (d,),
            f"{h}.ln_2.weight": (d,),
            f"{h}.ln_2.bias": (d,),
            f"{h}.mlp.c_fc.weight": (d, f),
            f"{h}.mlp.c_fc.bias": (f,),
            f"{h}.mlp.c_proj.weight": (f, d),
            f"{h}.mlp.c_proj.bias": (d,),
        }
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
    return shapes


def keep_units(c_fc: np.ndarray, c_proj: np.ndarray, gain: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the n GPT-2 hidden units with the largest
    |gain * c_fc[:, j]| * |c_proj[j]|:
    the size of unit j's typical contribution to the block's output."""
    score = np.linalg.norm(gain[:, None] * c_fc, axis=0) * np.linalg.norm(c_proj, axis=1)
    return np.sort(np.argsort(-score, kind="stable")[:n])


def gate_init(
    w_up: np.ndarray, b_up: np.ndarray | None, gain: np.ndarray, ln_bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """SwiGLU gate (weight (f, d), bias (f,) or None) that makes silu(gate
    x) * (w_up x + b_up) approximate GELU.

    `gain` and `ln_bias` are the norm's (ln_bias None for RMSNorm). Unit j's
    pre-activation u_j has, for unit-variance normalised inputs, std |gain *
    w_up[j]| and mean b_up[j] + w_up[j] @ ln_bias; the gate is u_j divided by their
    root-sum-square r_j, times the fitted constant (plus GATE_BIAS with biases)."""
    s2 = np.sum((w_up * gain[None, :]) ** 2, axis=1)
    mean = (0.0 if b_up is None else b_up) + (0.0 if ln_bias is None else w_up @ ln_bias)
    r = np.sqrt(s2 + mean**2)
    scale = GATE_STD if b_up is None else GATE_STD_BIAS
    # a dead unit (r = 0) gets a zero gate
    alpha = np.divide(scale, r, out=np.zeros_like(r), where=r > 0)
    if b_up is None:
        return alpha[:, None] * w_up, None
    return alpha[:, None] * w_up, alpha * b_up + GATE_BIAS


def _rng(seed: int, target: str) -> np.random.Generator:
    # per tensor: independent of plan order
    return np.random.default_rng([seed, zlib.crc32(target.encode())])


def plan(cfg: ModelConfig, src: ModelConfig, *, seed: int = 0) -> Plan:
    """The plan for GPT-2 weights of config `src` (see `source_config`) into `cfg`."""
    p = _Planner(cfg, src, seed)
    p.add("tok_emb.weight", ("wte.weight",), "as is", lambda v: v["wte.weight"])
    if cfg.pos == "learned":
        p.add("pos_emb.weight", ("wpe.weight",), "as is", lambda v: v["wpe.weight"])
    else:
        p.dropped["wpe.weight"] = "learned positions; pos='rope' rotates q and k instead"
        p.notes.append(
            "pos='rope': GPT-2's q and k were trained with learned positions; RoPE now rotates them"
        )
    for i in range(cfg.n_layer):
        p.attention(i)
        p.mlp(i)
    p.norm("norm", "ln_f", "")
    if not cfg.tie_embeddings:
        p.add(
            "lm_head.weight",
            ("wte.weight",),
            "untied copy of wte (GPT-2 ties it)",
            lambda v: v["wte.weight"],
        )
    if cfg.norm == "rmsnorm":
        p.notes.append("norm='rmsnorm': inputs are no longer mean-centred before scaling")
    if cfg.logit_softcap is not None:
        p.notes.append(
            f"logit_softcap={cfg.logit_softcap}: logits are soft-capped; "
            "GPT-2's were not (no weights)"
        )
    return Plan(p.steps, p.dropped, p.notes)


_T = "Conv1D (in,out) transposed"


class _Planner:
    """Builds the steps block by block; a class only so the helpers share cfg and the lists."""

    def __init__(self, cfg: ModelConfig, src: ModelConfig, seed: int) -> None:
        self.cfg, self.src, self.seed = cfg, src, seed
        # LayerNorm biases go into the next linears' biases
        self.fold = cfg.norm == "rmsnorm" and cfg.bias
        self.steps: list[Step] = []
        self.dropped: dict[str, str] = {}
        self.notes: list[str] = []

    def add(
        self,
        target: str,
        sources: tuple[str, ...],
        how: str,
        get: Callable[[Values], np.ndarray],
        action: str = "copied",
    ) -> None:
        self.steps.append(Step(target, sources, how, get, action))

    def norm(self, ours: str, theirs: str, folded_into: str) -> None:
        w, b = f"{theirs}.weight", f"{theirs}.bias"
        if self.cfg.norm == "layernorm":
            self.add(f"{ours}.weight", (w,), "as is", lambda v: v[w])
            self.add(f"{ours}.bias", (b,), "as is", lambda v: v[b])
            return
        self.add(f"{ours}.weight", (w,), "LayerNorm gain as RMSNorm weight", lambda v: v[w])
        if self.fold and folded_into:
            return  # the bias is a source of the biases it is folded into (see `bias`)
        if not self.cfg.bias:
            self.dropped[b] = (
                "LayerNorm bias; RMSNorm has none and bias=False leaves nothing to fold it into"
            )
        else:
            self.dropped[b] = (
                "final LayerNorm bias; the tied unembedding has no bias to fold it into"
            )

    def bias(
        self,
        target: str,
        name: str,
        get: Callable[[Values], np.ndarray],
        how: str,
        changed: bool,
        ln_bias: str = "",
        weight: Callable[[Values], np.ndarray] | None = None,
    ) -> None:
        """A linear bias; `ln_bias`/`weight` for a linear that reads a norm,
        whose LayerNorm bias is folded in."""
        if not self.cfg.bias:
            self.dropped.setdefault(name, "linear bias; bias=False")
        elif self.fold and weight is not None:
            self.add(
                target,
                (name, ln_bias),
                f"{how}, + W @ {ln_bias} (LayerNorm bias folded in)",
                lambda v: get(v) + weight(v) @ v[ln_bias],
                "transformed",
            )
        else:
            self.add(target, (name,), how, get, "transformed" if changed else "copied")

    def attention(self, i: int) -> None:
        cfg, h, b = self.cfg, f"h.{i}", f"blocks.{i}"
        d, hd, nkv = cfg.d_model, cfg.head_dim, cfg.n_kv_head
        group = cfg.n_head // nkv
        ca_w, ca_b, ln_b = f"{h}.attn.c_attn.weight", f"{h}.attn.c_attn.bias", f"{h}.ln_1.bias"
        self.norm(f"{b}.attn_norm", f"{h}.ln_1", "wq, wk and wv")
        for j, name in enumerate(("wq", "wk", "wv")):  # c_attn's output dim is [q | k | v]
            lo, hi, pooled = j * d, (j + 1) * d, j > 0 and group > 1

            def w(v: Values, lo: int = lo, hi: int = hi, pooled: bool = pooled) -> np.ndarray:
                x = v[ca_w][:, lo:hi].T
                return x.reshape(nkv, group, hd, d).mean(1).reshape(nkv * hd, d) if pooled else x

            def bias(v: Values, lo: int = lo, hi: int = hi, pooled: bool = pooled) -> np.ndarray:
                x = v[ca_b][lo:hi]
                return x.reshape(nkv, group, hd).mean(1).reshape(nkv * hd) if pooled else x

            pool = f", mean of each group of {group} heads (GQA)" if pooled else ""
            self.add(
                f"{b}.attn.{name}.weight",
                (ca_w,),
                f"split from c_attn [{lo}:{hi}], {_T}{pool}",
                w,
                "transformed" if pooled else "copied",
            )
            self.bias(
                f"{b}.attn.{name}.bias",
                ca_b,
                bias,
                f"split from c_attn [{lo}:{hi}]{pool}",
                pooled,
                ln_b,
                w,
            )
        cp_w, cp_b = f"{h}.attn.c_proj.weight", f"{h}.attn.c_proj.bias"
        self.add(f"{b}.attn.wo.weight", (cp_w,), _T, lambda v: v[cp_w].T)
        self.bias(f"{b}.attn.wo.bias", cp_b, lambda v: v[cp_b], "as is", False)

    def mlp(self, i: int) -> None:
        cfg, h, b = self.cfg, f"h.{i}", f"blocks.{i}"
        fc_w, fc_b, pr_w, pr_b = (
            f"{h}.mlp.c_fc.weight",
            f"{h}.mlp.c_fc.bias",
            f"{h}.mlp.c_proj.weight",
            f"{h}.mlp.c_proj.bias",
        )
        ln_w, ln_b = f"{h}.ln_2.weight", f"{h}.ln_2.bias"
        f, f_src = cfg.d_ff, self.src.d_ff
        swiglu, resized, extra = cfg.mlp == "swiglu", f != f_src, max(0, f - f_src)
        self.norm(f"{b}.mlp_norm", f"{h}.ln_2", "w_gate and w_up" if swiglu else "w_up")
        if f < f_src:
            units = f", the {f} of {f_src} units with the largest |c_fc|*|c_proj|"
        else:
            units = f", {f_src} units + {extra} new" if extra else ""

        def idx(v: Values) -> np.ndarray:
            return keep_units(v[fc_w], v[pr_w], v[ln_w], f) if f < f_src else np.arange(f_src)

        def up_w(v: Values) -> np.ndarray:
            w = v[fc_w].T[idx(v)]
            if extra:  # new units: random in, zero out (w_down), so they start silent
                rng = _rng(self.seed, f"{b}.mlp.w_up.weight")
                w = np.concatenate(
                    [w, rng.normal(0, cfg.init_std, (extra, cfg.d_model)).astype(np.float32)]
                )
            return w

        def up_b(v: Values) -> np.ndarray:
            return np.concatenate([v[fc_b][idx(v)], np.zeros(extra, np.float32)])

        def gate(v: Values) -> tuple[np.ndarray, np.ndarray | None]:
            w = up_w(v)
            if not cfg.bias:  # an RMSNorm's LayerNorm bias is dropped; a LayerNorm keeps it
                return gate_init(w, None, v[ln_w], v[ln_b] if cfg.norm == "layernorm" else None)
            if self.fold:  # w_up's bias as stored: the LayerNorm bias folded in
                return gate_init(w, up_b(v) + w @ v[ln_b], v[ln_w], None)
            return gate_init(w, up_b(v), v[ln_w], v[ln_b])

        def down_w(v: Values) -> np.ndarray:
            return np.concatenate(
                [v[pr_w][idx(v)].T, np.zeros((cfg.d_model, extra), np.float32)], axis=1
            )

        scored = (fc_w, pr_w, ln_w) if resized else ()
        self.add(
            f"{b}.mlp.w_up.weight",
            tuple(dict.fromkeys((fc_w, *scored))),
            f"{_T}{units}",
            up_w,
            "transformed" if resized else "copied",
        )
        self.bias(
            f"{b}.mlp.w_up.bias", fc_b, up_b, units.lstrip(", ") or "as is", resized, ln_b, up_w
        )
        if swiglu:
            std = (
                f"gate std {GATE_STD_BIAS}, bias +{GATE_BIAS}"
                if cfg.bias
                else f"gate std {GATE_STD}"
            )
            how = f"c_fc scaled per unit so that silu(gate)*up approximates GELU ({std})"
            sources = tuple(
                dict.fromkeys(
                    (
                        fc_w,
                        *scored,
                        ln_w,
                        *((fc_b, ln_b) if cfg.bias else ()),
                        *((ln_b,) if cfg.norm == "layernorm" else ()),
                    )
                )
            )
            self.add(f"{b}.mlp.w_gate.weight", sources, how, lambda v: gate(v)[0], "new")
            if cfg.bias:
                self.add(f"{b}.mlp.w_gate.bias", sources, how, lambda v: gate(v)[1], "new")
        self.add(
            f"{b}.mlp.w_down.weight",
            tuple(dict.fromkeys((pr_w, *scored))),
            f"{_T}{units}{' (new units: zero)' if extra else ''}",
            down_w,
            "transformed" if resized else "copied",
        )
        self.bias(f"{b}.mlp.w_down.bias", pr_b, lambda v: v[pr_b], "as is", False)


# ----------------------------------------------------------------------------- transfer report


@dataclass
class TransferRow:
    """One target tensor: where its values came from."""

    target: str
    action: str  # "copied" (values exact, incl. transposes and splits) | "transformed" | "new"
    source: str  # source tensor name(s), comma-separated
    how: str
    size: int = 0  # number of parameters


_ACTIONS = ("copied", "transformed", "new")


@dataclass
class TransferReport:
    """What a weight import did: every target tensor, every source tensor left unused, and the
    changes of function that involve no tensor (e.g. soft-capping)."""

    rows: list[TransferRow] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source name, reason)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of target tensors per action."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def param_counts(self) -> dict[str, int]:
        """Number of target parameters per action."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + r.size
        return out

    def fraction_copied(self) -> float:
        """Share of target tensors (counted as tensors, not parameters) whose values are the
        source's exactly."""
        return self.counts().get("copied", 0) / max(1, len(self.rows))

    def summary(self) -> str:
        """One line: tensors and parameters per action, and how many source tensors were dropped."""
        counts, params = self.counts(), self.param_counts()
        total = max(1, sum(params.values()))
        per = ", ".join(
            f"{counts[a]} {a} ({params[a] / total:.1%} of parameters)"
            for a in _ACTIONS
            if a in counts
        )
        return (
            f"{len(self.rows)} target tensors, {sum(params.values()):,} parameters: "
            f"{per or 'none'}; {len(self.dropped)} source tensor(s) dropped"
        )

    def to_text(self) -> str:
        """A readable aligned table, then the dropped source tensors, the
        notes and the summary line."""
        header = TransferRow("target", "action", "source", "how")
        rows = [header, *self.rows]
        w_t, w_a, w_s = (
            max(len(getattr(r, f)) for r in rows) for f in ("target", "action", "source")
        )
        lines = [
            f"{r.target:<{w_t}}  {r.action:<{w_a}}  {r.source:<{w_s}}  {r.how}".rstrip()
            for r in rows
        ]
        if self.dropped:
            lines.append("")
            w_d = max(len(name) for name, _ in self.dropped)
            lines += [f"dropped {name:<{w_d}}  {reason}" for name, reason in self.dropped]
        if self.notes:
            lines += ["", *(f"note: {n}" for n in self.notes)]
        lines += ["", self.summary()]
        return "\n".join(lines)

    __str__ = to_text

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "dropped": [list(d) for d in self.dropped],
                "notes": self.notes,
                "counts": self.counts(),
                "param_counts": self.param_counts(),
                "fraction_copied": self.fraction_copied(),
            },
            indent=2,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransferReport:
        """The report back from `to_json`'s fields (the derived counts are recomputed)."""
        return cls(
            rows=[TransferRow(**r) for r in data["rows"]],
            dropped=[tuple(d) for d in data["dropped"]],
            notes=list(data["notes"]),
        )

    def save(self, path: PathLike) -> None:
        """Write the JSON atomically."""
        fileio.atomic_write_text(path, self.to_json() + "\n")
