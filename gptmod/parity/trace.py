"""The per-op trace: where, op by op, the torch and JAX twins leave what their dtype explains.

`run_trace(case)` answers "why does my JAX port disagree with PyTorch, and where?". A float64
reference (written here from DESIGN.md on the case's dtype-rounded weights, independent of both
twins, so a patched twin never patches its own judge) runs the whole forward and records every op's
input. The trace is TEACHER-FORCED: each op of each twin gets the reference's input rounded to the
case's dtype, and so does a float64 evaluation of the op. The op's error is then its own: nothing
accumulates from the ops before it, and the first op that leaves its budget is where the fault is.
Each twin's ops are reached through its own module at call time (`block.attn_norm`, `block.attn.wq`,
`jm.apply_rope`, `jm.attention`, `Attention.attend_cache`, the MLP class's own activation,
`GPT.embed`, `GPT.head`, `KVCache.update`), so a monkeypatched twin is traced as patched.

Forward ops (names as in the report): "embedding"; per block "attn_norm", "q", "k" (after RoPE;
before it with learned positions), "v", "attention" (before wo), "wo", "resid_attn", "mlp_norm",
"gate" (SwiGLU), "up", "act" (silu(gate) * up, or gelu_tanh(up)), "down", "resid"; then "norm" and
"logits" (the head, soft-cap included). Decode ops: per block "attention (cached)": two rows of
different lengths (a ragged batch), `decode_steps` tokens each, one at a time, through the twin's
own cache path: `GPT.setup_cache`, `GPT.embed` at the decode positions (RoPE and the bottom-right
mask), the reference's prefix keys and values written by the twin's `KVCache.update`, then the
twin's `Attention` with its projections stubbed to hand over the reference's (rounded) q, k, v, so
RoPE, the cache write, the mask and `cached_attention` are the twin's own.

Budgets. u is the dtype's unit roundoff (fp32 2^-24, bf16 2^-8, fp16 2^-11) and u32 = 2^-24 (every
twin computes in fp32 inside its ops: matmul accumulators, norms, RoPE, softmax, soft-cap). For
every output element the reference computes beta, the worst-case error of a CORRECT implementation
of the op, from float64 values of the op's own intermediates:
  * the final rounding to the output dtype: half an ulp of the exact value,
    h(y) (exact, not u|y|: the twins round correctly, and this is what keeps
    budgets tight enough to see one extra rounding);
  * every rounding to the dtype a correct implementation may make INSIDE the op, charged h(t) of the
    intermediate t times the output's sensitivity to it: the matmul before RoPE (q, k) and before
    the bias add (JAX adds it to the rounded product), the logits before the soft-cap, jax.nn.silu's
    exp, 1 + e, reciprocal and product, and GELU's chain (jax.nn computes elementwise chains in the
    input dtype, one rounding per op);
  * attention probabilities, charged per twin, for what its kernel does: torch SDPA (CPU flash and
    math kernels, FlashAttention and cuDNN on GPUs) and `jax.nn.dot_product_attention` round them to
    the dtype before the PV product, unnormalised in flash kernels (exp(s - running max)), so u
    relative each: u * sum_s p_s |v_s|; gptmod_jax's `cached_attention` on XLA writes its two
    products out and keeps scores, softmax and probabilities in fp32 (DESIGN.md), so JAX's cached
    path has no such term and a softmax in bf16 there is a fault (|Δ| is then measured in units of
    the larger of the two bounds);
  * fp32 arithmetic, with the probabilistic bound for sums (Higham & Mary 2019):
    sqrt(n) u32 sum|x_i w_i| for a length-n dot product (which covers cancellation,
    where |y| << sum|x_i w_i|), (sqrt(D) + 4) u32 on the norms' reductions, (2|angle|
    + 4) u32 for RoPE's fp32 angles (pos x fp32(inv_freq) is itself rounded, and cos
    and sin carry an ulp each), and the softmax's exponent and normaliser.
An op's error e (for each twin against the reference, and |Δ| between the twins) is max over
elements of |error| / beta: e = 1 means a twin reached the worst case a correct implementation can.
The budget is 2 (twice the worst case, room for the probabilistic sqrt(n) terms); the diff's budget
is 2 x 2, since by the triangle inequality |Δ| <= e_torch + e_jax always. ratio = max(e_torch,
e_jax, diff / 2) / 2: a correct twin stays at <= 0.5 by construction, and a fault must at least
double the worst case to show. Why elementwise and not a share of max|y|: a share of the op's scale
hides a rounding fault on the many small elements under the few large ones. RMSNorm computed in bf16
adds four roundings, about 2 ulps on every element: under 1% of max|y|, invisible to any
scale-relative bound bf16 needs elsewhere, but 2.5 to 3.4 times the correct worst case in ulps
(ratio 1.25 to 1.7). Faults of one or two extra roundings therefore land at ratios of 1.2 to 1.6;
structural faults (a wrong eps, RoPE layout or frequency, scale, GQA map, mask, cache row,
activation) at 10 to 10^6.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from gptmod.parity.suite import Case, Row, case_row, jax_model, torch_model

U32 = 2.0**-24
PRECISION = {"float32": 24, "bfloat16": 8, "float16": 11}  # significand bits, hidden bit included
MIN_EXP = {"float32": -126, "bfloat16": -126, "float16": -14}  # smallest normal exponent
BUDGET = 2.0  # in units of beta, the op's worst-case error bound (see the module docstring)
K_DIFF = 2.0  # |Δ| <= e_torch + e_jax <= K_DIFF * BUDGET whenever both twins pass
DECODE_RAGGED = 3  # the second decode row is this many tokens shorter than the first
GELU_C, GELU_A = math.sqrt(2.0 / math.pi), 0.044715


@dataclass
class Entry:
    """One op of one mode: each twin's error e (max over elements of |error|
    / beta) and the ratio to budget."""

    mode: str  # "forward" | "decode"
    layer: int | None  # None: embedding, final norm, logits
    op: str
    e_torch: float
    e_jax: float
    diff: float  # |torch - jax| / beta, max over elements
    budget: float
    ratio: float  # max(e_torch, e_jax, diff / K_DIFF) / budget: > 1 fails
    scale: float = 0.0  # max |reference|
    err_torch: float = 0.0  # max absolute errors, for the reader
    err_jax: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    @property
    def culprit(self) -> str:
        """Which twin leaves the budget (or "torch vs jax" when only their difference does)."""
        over = [
            n for n, e in (("torch", self.e_torch), ("jax", self.e_jax)) if not e <= self.budget
        ]
        return " and ".join(over) if over else ("torch vs jax" if not self.passed else "")

    @property
    def label(self) -> str:
        return self.op if self.layer is None else f"block {self.layer} {self.op}"


@dataclass
class Trace:
    case: str
    dtype: str
    config: str  # a one-line summary of the ModelConfig
    tokens: str  # what was fed
    backends: tuple[str, str]  # (torch, jax) attention backends
    entries: list[Entry] = field(default_factory=list)
    weights: str = (
        ""  # where the weights came from, when the caller says (e.g. "SmolLM2-135M-Instruct Q4_1")
    )
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def select(self, mode: str | None = None) -> list[Entry]:
        return [e for e in self.entries if mode is None or e.mode == mode]

    def first_bad(self, mode: str | None = None) -> Entry | None:
        """The first op in forward order (the forward ops, then the cached
        decode) out of its budget."""
        return next((e for e in self.select(mode) if not e.passed), None)

    def worst(self, mode: str | None = None) -> Entry | None:
        entries = self.select(mode)
        return max(entries, key=lambda e: e.ratio) if entries else None

    def max_ratio(self, mode: str | None = None) -> float:
        w = self.worst(mode)
        return 0.0 if w is None else w.ratio

    def ratios(self) -> dict[tuple[str, int | None, str], float]:
        return {(e.mode, e.layer, e.op): e.ratio for e in self.entries}


def forward_ops(cfg) -> list[str]:
    """The per-block op names of the forward mode, in order."""
    mlp = ["gate", "up", "act", "down"] if cfg.mlp == "swiglu" else ["up", "act", "down"]
    return ["attn_norm", "q", "k", "v", "attention", "wo", "resid_attn", "mlp_norm", *mlp, "resid"]


def config_summary(cfg) -> str:
    heads = (
        f"{cfg.n_head}/{cfg.n_kv_head} heads"
        if cfg.n_kv_head != cfg.n_head
        else f"{cfg.n_head} heads"
    )
    pos = (
        f"rope θ {cfg.rope_theta:g}" + (" (llama3 scaling)" if cfg.rope_scaling else "")
        if cfg.pos == "rope"
        else ("learned positions")
    )
    cap = f", soft-cap {cfg.logit_softcap:g}" if cfg.logit_softcap else ""
    return (
        f"{cfg.n_layer} layers, d_model {cfg.d_model}, {heads} (head_dim {cfg.head_dim}), {pos}, "
        f"{cfg.norm} eps {cfg.norm_eps:g}, {cfg.mlp} "
        f"{cfg.d_ff}{', bias' if cfg.bias else ''}{cap}, vocab "
        f"{cfg.vocab_size}{', tied' if cfg.tie_embeddings else ''}"
    )


# ----------------------------------------------------------------------------- float64 reference


def half_ulp(y, dtype: str):
    """Half an ulp of `dtype` at each float64 value: the largest error of a
    correctly rounded result."""
    import torch

    _, e = torch.frexp(y)  # |y| in [2^(e-1), 2^e); e = 0 for y = 0
    # Subnormals (and zero) have the smallest normal binade's spacing.
    e = torch.where(y == 0, MIN_EXP[dtype] + 1, torch.clamp(e, min=MIN_EXP[dtype] + 1))
    return torch.ldexp(torch.ones_like(y), e - 1 - PRECISION[dtype])


class _Reference:
    """DESIGN.md's forward in float64 on the case's (dtype-rounded) weights: each op returns its
    exact output and beta, its worst-case error bound for a correct implementation in `dtype` (see
    the module docstring)."""

    def __init__(self, case: Case):
        import torch

        self.cfg, self.dtype = case.cfg, case.dtype
        self.u = 2.0 ** -PRECISION[case.dtype]
        # False while the forward records values only (the bounds of big matmuls cost as much)
        self.bounds = True
        self.w = {
            k: torch.from_numpy(np.asarray(v).astype(np.float64)) for k, v in case.state.items()
        }
        cfg = case.cfg
        inv = 1.0 / cfg.rope_theta ** (
            np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
        )
        self.inv_freq = torch.from_numpy(
            inv if cfg.rope_scaling is None else cfg.rope_scaling.scale(inv)
        )

    def h(self, y, dtype: str | None = None):
        return half_ulp(y, dtype or self.dtype)

    def rounded(self, y, inner, dtype: str | None = None):
        """The bound of a result the twin rounds once to `dtype` after an
        error of at most `inner`: half an ulp at the largest value it can
        hold (|y| + inner may cross into the next binade), plus `inner`."""
        return self.h(y.abs() + inner, dtype) + inner

    def held(self, y, inner, tw: _Twins):
        """What a correct twin holds after rounding a result within `inner` of exact `y` to the
        dtype, and the bound on its error: round(y) exactly, unless [y - inner, y + inner] straddles
        a rounding boundary, where it may hold the neighbour (one ulp, plus `inner` where fp32
        arithmetic is the dtype). Tighter than `rounded`, which charges every element half an ulp:
        on trained q and k that charge alone hides a bf16 softmax."""
        import torch

        r = tw.rounded(y)[2]
        ambiguous = (y - r).abs() + inner >= self.h(r)
        return r, torch.where(ambiguous, 2 * self.h(r) + inner, torch.zeros_like(r))

    def get(self, name: str):
        return self.w.get(name)

    # --- ops: (output, beta)

    def embedding(self, idx, pos):
        y = self.w["tok_emb.weight"][idx]
        if self.cfg.pos == "learned":
            y = y + self.w["pos_emb.weight"][pos]
        return y, self.h(y)

    def norm(self, prefix: str, x):
        import torch

        w, b = self.w[f"{prefix}.weight"], self.get(f"{prefix}.bias")
        D = x.shape[-1]
        if self.cfg.norm == "rmsnorm":
            r = torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps)
            y, a = x * r * w, x.abs() * r * w.abs()
        else:
            xc = x - x.mean(-1, keepdim=True)
            r = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + self.cfg.norm_eps)
            y = xc * r * w + b
            a = (xc.abs() + x.abs().mean(-1, keepdim=True)) * r * w.abs() + b.abs()
        return y, self.rounded(y, U32 * (math.sqrt(D) + 4) * a)

    def linear_parts(self, prefix: str, x):
        """(y, the error a correct twin may have in y before its final rounding)."""
        w, b = self.w[f"{prefix}.weight"], self.get(f"{prefix}.bias")
        z = x @ w.T
        if not self.bounds:
            return (z if b is None else z + b), None
        acc = U32 * math.sqrt(x.shape[-1]) * (x.abs() @ w.abs().T + (0 if b is None else b.abs()))
        if b is None:
            return z, acc
        # JAX rounds the product to the dtype before adding the bias
        return z + b, self.rounded(z, acc)

    def linear(self, prefix: str, x):
        y, inner = self.linear_parts(prefix, x)
        return y, None if inner is None else self.rounded(y, inner)

    def angles(self, pos):
        return pos.double()[..., None] * self.inv_freq  # (B, T, H/2)

    def rope(self, z, theta, dz):
        """Half-split rotation of z (B, T, heads, H) by `theta` (B, T, H/2): the output, the error
        propagated from dz (z's own error, as the twin holds it) and RoPE's fp32 error."""
        import torch

        c, s = theta.cos()[:, :, None], theta.sin()[:, :, None]
        z1, z2 = z.chunk(2, dim=-1)
        d1, d2 = dz.chunk(2, dim=-1)
        y = torch.cat([z1 * c - z2 * s, z2 * c + z1 * s], dim=-1)
        prop = torch.cat([d1 * c.abs() + d2 * s.abs(), d2 * c.abs() + d1 * s.abs()], dim=-1)
        fp32 = U32 * (2 * theta.abs()[:, :, None] + 4) * (z1.abs() + z2.abs())
        return y, prop + torch.cat([fp32, fp32], dim=-1)

    def qk(self, prefix: str, x, theta, heads: int):
        """q or k: the projection, then RoPE (when the config has it) on the
        dtype-rounded projection."""
        B, T, _ = x.shape
        H = self.cfg.head_dim
        z, inner = self.linear_parts(prefix, x)
        z, inner = z.view(B, T, heads, H), inner.view(B, T, heads, H)
        if theta is None:
            return z, self.rounded(z, inner)
        y, err = self.rope(z, theta, self.rounded(z, inner))
        return y, self.rounded(y, err)

    def attention(self, q, k, v, mask, rounds_probs: tuple[bool, bool], dq=None, dk=None):
        """Causal attention; mask (B, T, S) (True = attend) or None for top-left causal. dq, dk:
        errors the twin may have in q and k (the cached path applies RoPE itself). rounds_probs:
        whether each twin's kernel (torch, jax) rounds the probabilities to the dtype before the PV
        product. Returns (y, (beta_torch, beta_jax))."""
        import torch

        B, T, N, H = q.shape
        S, K = k.shape[1:3]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool).tril()[None].expand(B, T, S)
        kr, vr = k.repeat_interleave(N // K, dim=2), v.repeat_interleave(N // K, dim=2)
        s = torch.einsum("btnh,bsnh->bnts", q, kr) / math.sqrt(H)
        m4 = mask[:, None]
        s = s.masked_fill(~m4, -math.inf)
        p = s.softmax(-1)
        y = torch.einsum("bnts,bsnh->btnh", p, vr)
        ds = (
            U32
            * (math.sqrt(H) + 2)
            * torch.einsum("btnh,bsnh->bnts", q.abs(), kr.abs())
            / math.sqrt(H)
        )
        if dq is not None:
            ds = ds + torch.einsum("btnh,bsnh->bnts", dq, kr.abs()) / math.sqrt(H)
        if dk is not None:
            ds = ds + torch.einsum(
                "btnh,bsnh->bnts", q.abs(), dk.repeat_interleave(N // K, dim=2)
            ) / math.sqrt(H)
        gap = torch.where(m4, s - s.amax(-1, keepdim=True), torch.zeros_like(s)).abs()
        eps = U32 * (gap + math.sqrt(S) + 4)  # fp32 exp of the shifted score, normaliser
        wgt = p * (ds + eps)  # each probability's relative error, weighted by the probability
        absv = vr.abs()
        inner = (
            torch.einsum("bnts,bsnh->btnh", wgt, absv)
            + wgt.sum(-1).transpose(1, 2)[..., None] * y.abs()
        )
        inner = inner + U32 * math.sqrt(S) * torch.einsum("bnts,bsnh->btnh", p, absv)
        # A kernel that rounds the probabilities may round them unnormalised
        # (FlashAttention rounds exp(s - running max), torch's CPU flash
        # kernel too): u relative each, not half an ulp of p.
        probs = self.u * torch.einsum("bnts,bsnh->btnh", p, absv)
        return y, tuple(
            self.rounded(y, inner + probs) if r else self.rounded(y, inner) for r in rounds_probs
        )

    def add(self, a, b):
        y = a + b
        # XLA may round through fp32 first (double rounding)
        return y, self.rounded(y, U32 * (a.abs() + b.abs()))

    def act(self, gate, up):
        """silu(gate) * up, or gelu_tanh(up) (gate None), with every
        rounding jax.nn makes in the dtype."""
        import torch

        u = self.u
        # jax.nn.silu in bf16: e = exp(-g), d = 1 + e, sg = 1 / d, si = g * sg, each rounded
        if gate is not None:
            e = torch.exp(-gate)
            sg = 1 / (1 + e)
            si = gate * sg
            y = si * up
            dsg = self.h(sg) + sg * sg * (self.h(e) + self.h(1 + e)) + 4 * U32 * sg
            return y, self.rounded(y, (self.h(si) + gate.abs() * dsg) * up.abs())
        x = up
        w = GELU_C * (x + GELU_A * x**3)
        t = torch.tanh(w)
        y = 0.5 * x * (1 + t)
        dw = 4 * max(u, U32) * GELU_C * (x.abs() + GELU_A * x.abs() ** 3)
        dcdf = 0.5 * ((1 - t * t) * dw + self.h(t) + self.h(1 + t) + 4 * U32 * (1 + t.abs()))
        return y, self.rounded(y, x.abs() * dcdf)

    def logits(self, x):
        """The head on the (rounded) final-norm output: the product, rounded to the dtype (the
        twins' linear returns the model dtype), then the soft-cap in fp32; logits are fp32."""
        import torch

        w = self.w["tok_emb.weight" if self.cfg.tie_embeddings else "lm_head.weight"]
        z = x @ w.T
        if not self.bounds:
            return z if self.cfg.logit_softcap is None else self.cfg.logit_softcap * torch.tanh(
                z / self.cfg.logit_softcap
            ), None
        dz = self.rounded(z, U32 * math.sqrt(x.shape[-1]) * (x.abs() @ w.abs().T))
        cap = self.cfg.logit_softcap
        if cap is None:
            return z, self.rounded(z, dz, "float32")
        t = torch.tanh(z / cap)
        y = cap * t
        return y, self.rounded(y, (1 - t * t) * dz + 4 * U32 * y.abs(), "float32")

    # --- the whole forward, recording every op's input

    def forward(self, idx) -> dict:
        """The float64 forward (bounds skipped: only the values are kept),
        recording every op's input."""
        self.bounds = False
        try:
            return self._forward(idx)
        finally:
            self.bounds = True

    def _forward(self, idx) -> dict:
        B, T = idx.shape
        pos = np.broadcast_to(np.arange(T), (B, T))
        import torch

        pos = torch.from_numpy(pos.copy())
        theta = self.angles(pos) if self.cfg.pos == "rope" else None
        cfg = self.cfg
        rec: dict = {"pos": pos, "theta": theta, "blocks": []}
        x, _ = self.embedding(torch.from_numpy(np.asarray(idx)), pos)
        rec["x0"] = x
        for i in range(cfg.n_layer):
            p = f"blocks.{i}"
            r = {"x": x}
            h1, _ = self.norm(f"{p}.attn_norm", x)
            r["h1"] = h1
            q_pre, _ = self.linear(f"{p}.attn.wq", h1)
            k_pre, _ = self.linear(f"{p}.attn.wk", h1)
            v, _ = self.linear(f"{p}.attn.wv", h1)
            q_pre, k_pre = q_pre.view(B, T, cfg.n_head, -1), k_pre.view(B, T, cfg.n_kv_head, -1)
            r["q_pre"], r["k_pre"], r["v"] = q_pre, k_pre, v.view(B, T, cfg.n_kv_head, -1)
            zq, zk = torch.zeros_like(q_pre), torch.zeros_like(k_pre)
            r["q"] = q_pre if theta is None else self.rope(q_pre, theta, zq)[0]
            r["k"] = k_pre if theta is None else self.rope(k_pre, theta, zk)[0]
            att, _ = self.attention(r["q"], r["k"], r["v"], None, (False, False))
            r["att"] = att.reshape(B, T, -1)
            o, _ = self.linear(f"{p}.attn.wo", r["att"])
            r["o"] = o
            x = x + o
            r["x_mid"] = x
            h2, _ = self.norm(f"{p}.mlp_norm", x)
            r["h2"] = h2
            up, _ = self.linear(f"{p}.mlp.w_up", h2)
            r["up"] = up
            gate = self.linear(f"{p}.mlp.w_gate", h2)[0] if cfg.mlp == "swiglu" else None
            r["gate"] = gate
            a, _ = self.act(gate, up)
            r["a"] = a
            d, _ = self.linear(f"{p}.mlp.w_down", a)
            r["d"] = d
            x = x + d
            rec["blocks"].append(r)
        rec["x_final"] = x
        rec["normed"] = self.norm("norm", x)[0]
        rec["logits"] = self.logits(rec["normed"])[0]
        return rec


# ----------------------------------------------------------------------------- the twins' ops


class _Twins:
    """Rounds float64 inputs to the dtype, calls an op of each twin, and
    returns both outputs in float64."""

    def __init__(self, case: Case, backend_torch: str, backend_jax: str, fault):
        import jax.numpy as jnp
        import torch

        self.case = case
        self.tdt, self.jdt = getattr(torch, case.dtype), getattr(jnp, case.dtype)
        self.tm_model = torch_model(case, case.dtype, backend_torch)
        self.jm_model = jax_model(case, backend_jax, fault)
        self.bt, self.bj = backend_torch, backend_jax
        self.device = self.tm_model.tok_emb.weight.device

    def rounds_probs(self, cached: bool) -> tuple[bool, bool]:
        """Whether each twin's attention kernel rounds the probabilities to the dtype before the PV
        product: torch SDPA does (its CPU flash and math kernels for bf16/fp16, FlashAttention and
        cuDNN on GPUs), and so does `jax.nn.dot_product_attention` (xla and cudnn); the written-out
        "reference" backends and gptmod_jax's `cached_attention` on XLA keep them in fp32."""
        import gptmod_jax.model as jm

        impl = jm.resolve_backend(self.bj, self.jdt, self.case.cfg.head_dim, cached)
        return self.bt != "reference", impl != "reference" and not (cached and impl == "xla")

    def rounded(self, x64):
        """(torch input, jax input, the float64 value both hold)."""
        import jax.numpy as jnp

        xt = x64.to(self.tdt)
        xj = jnp.asarray(xt.float().numpy(), dtype=self.jdt)  # exact: every value is representable
        return xt.to(self.device), xj, xt.double()

    def to64(self, out_t, out_j):
        import torch

        return out_t.detach().double().cpu(), torch.from_numpy(np.asarray(out_j, dtype=np.float64))


def _stub(value):
    """A stand-in for a projection inside a twin's module: hands over
    `value` whatever it is given."""
    return lambda _x: value


def _measure(mode, layer, op, y, beta, out_t, out_j, note="") -> Entry:
    """e = max |error| / beta per twin (beta: one bound, or (torch's,
    jax's)); |Δ| in units of the larger."""
    import torch

    tiny = torch.finfo(torch.float64).tiny
    beta_t, beta_j = (
        b.clamp_min(tiny) for b in (beta if isinstance(beta, tuple) else (beta, beta))
    )
    errs = []
    for out, beta in ((out_t, beta_t), (out_j, beta_j)):
        if out.shape != y.shape:
            errs.append((math.inf, math.inf))
            note = f"shape {tuple(out.shape)} != reference {tuple(y.shape)}; " + note
            continue
        d = (out - y).abs()
        e = (d / beta).max().item() if torch.isfinite(d).all() else math.inf
        errs.append((e, d.max().item() if torch.isfinite(d).all() else math.inf))
    (e_t, a_t), (e_j, a_j) = errs
    if out_t.shape == out_j.shape == y.shape:
        dd = (out_t - out_j).abs()
        diff = (
            (dd / torch.maximum(beta_t, beta_j)).max().item()
            if torch.isfinite(dd).all()
            else math.inf
        )
    else:
        diff = math.inf
    ratio = max(e_t, e_j, diff / K_DIFF) / BUDGET
    return Entry(
        mode, layer, op, e_t, e_j, diff, BUDGET, ratio, y.abs().max().item(), a_t, a_j, note
    )


def run_trace(
    case: Case,
    *,
    backend_torch: str = "sdpa",
    backend_jax: str = "auto",
    decode_steps: int = 4,
    fault: tuple[str, float] | None = None,
    modes: tuple[str, ...] = ("forward", "decode"),
    weights: str = "",
) -> Trace:
    """Trace every op of both twins on `case`: the forward on case.idx, the cached decode on a
    ragged pair of rows (see the module docstring). `fault` perturbs one tensor of the JAX twin
    (suite.jax_model)."""
    if not modes or set(modes) - {"forward", "decode"}:
        raise ValueError(
            f"run_trace: modes={modes!r}: must be a non-empty subset of ('forward', 'decode')"
        )
    import torch

    from gptmod.parity.suite import versions

    start = time.perf_counter()
    cfg = case.cfg
    B, T = case.idx.shape
    if decode_steps + DECODE_RAGGED + 1 > T:
        raise ValueError(
            f"run_trace: seq_len {T} is too short for {decode_steps} decode steps on a ragged "
            f"pair of rows; it must be >= decode_steps + {DECODE_RAGGED + 1} = "
            f"{decode_steps + DECODE_RAGGED + 1}"
        )
    # One float64 pass covers both modes: the decode pair is case.idx's
    # first two rows, or its row and the same row rotated by half its length
    # (another token sequence, so a row mix-up in the cache shows).
    idx = case.idx if B >= 2 else np.concatenate([case.idx, np.roll(case.idx[:1], T // 2, axis=1)])
    ref = _Reference(case)
    with torch.no_grad():
        rec = ref.forward(idx)
        tw = _Twins(case, backend_torch, backend_jax, fault)
        entries = list(_forward_entries(ref, tw, rec, case.idx)) if "forward" in modes else []
        if "decode" in modes:
            entries += list(_decode_entries(ref, tw, rec, idx[:2], decode_steps))
    fed = [f"forward: {B} x {T} tokens"] if "forward" in modes else []
    if "decode" in modes:
        fed.append(
            f"decode: 2 rows (ragged), {decode_steps} steps each from positions "
            f"{T - decode_steps} and {T - decode_steps - DECODE_RAGGED}"
        )
    return Trace(
        case=case.name,
        dtype=case.dtype,
        config=config_summary(cfg),
        tokens="; ".join(fed),
        backends=(backend_torch, backend_jax),
        entries=entries,
        weights=weights,
        seconds=time.perf_counter() - start,
        versions=versions(),
    )


def _forward_entries(ref: _Reference, tw: _Twins, rec: dict, idx_np: np.ndarray) -> Iterator[Entry]:
    """The forward ops in order: the embedding, every block's, the final norm and the head."""
    import jax.numpy as jnp
    import torch

    B, T = idx_np.shape
    tmod, jmod = tw.tm_model, tw.jm_model

    def rows(x):
        # the forward mode runs case.idx; the reference pass may hold an extra decode row
        return x[:B]

    # embedding: the twins' own GPT.embed, which also makes the RoPE tables the blocks use
    idx_t = torch.from_numpy(np.asarray(idx_np)).to(tw.device)
    x_t, inputs_t = tmod.embed(idx_t, None)
    x_j, inputs_j = jmod.embed(jnp.asarray(idx_np), None)
    rope_t, rope_j = inputs_t.rope, inputs_j.rope
    y, beta = ref.embedding(torch.from_numpy(np.asarray(idx_np)), rows(rec["pos"]))
    yield _measure("forward", None, "embedding", y, beta, *tw.to64(x_t, x_j))
    theta = None if rec["theta"] is None else rows(rec["theta"])

    for i, (bt, bj) in enumerate(zip(tmod.blocks, jmod.blocks, strict=True)):
        yield from _block_entries(ref, tw, i, rec["blocks"][i], bt, bj, theta, rope_t, rope_j, B, T)

    xt, xj, x64 = tw.rounded(rows(rec["x_final"]))
    y, beta = ref.norm("norm", x64)
    yield _measure("forward", None, "norm", y, beta, *tw.to64(tmod.norm(xt), jmod.norm(xj)))
    xt, xj, x64 = tw.rounded(rows(rec["normed"]))
    y, beta = ref.logits(x64)
    yield _measure("forward", None, "logits", y, beta, *tw.to64(_head(tmod, xt), _head(jmod, xj)))


def _block_entries(
    ref: _Reference, tw: _Twins, i: int, r: dict, bt, bj, theta, rope_t, rope_j, B: int, T: int
):
    """The forward ops of block i: torch's block `bt`, JAX's `bj`, the reference's records `r`."""
    import jax.numpy as jnp
    import torch

    import gptmod_jax.model as jm
    import gptmod_torch.model as tm

    cfg, p = ref.cfg, f"blocks.{i}"
    tmod, jmod = tw.tm_model, tw.jm_model
    N, K, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def op(name, ref_fn, t_fn, j_fn, *inputs):
        """Round the inputs, run the op in the reference and in both twins, and measure."""
        # the reference pass may hold an extra (decode) row
        rt = [tw.rounded(x[:B]) for x in inputs]
        y, beta = ref_fn(*(x[2] for x in rt))
        out = tw.to64(t_fn(*(x[0] for x in rt)), j_fn(*(x[1] for x in rt)))
        yield _measure("forward", i, name, y, beta, *out)

    yield from op(
        "attn_norm", lambda x: ref.norm(f"{p}.attn_norm", x), bt.attn_norm, bj.attn_norm, r["x"]
    )
    for name, heads, pname in (("q", N, "wq"), ("k", K, "wk")):
        yield from op(
            name,
            lambda x, heads=heads, pname=pname: ref.qk(f"{p}.attn.{pname}", x, theta, heads),
            lambda x, heads=heads, pname=pname: _rope_t(
                getattr(bt.attn, pname)(x), heads, H, rope_t
            ),
            lambda x, heads=heads, pname=pname: _rope_j(
                getattr(bj.attn, pname)(x), heads, H, rope_j
            ),
            r["h1"],
        )
    yield from op(
        "v",
        lambda x: _heads(ref.linear(f"{p}.attn.wv", x), K, H),
        lambda x: bt.attn.wv(x).view(B, T, K, H),
        lambda x: bj.attn.wv(x).reshape(B, T, K, H),
        r["h1"],
    )
    yield from op(
        "attention",
        lambda q, k, v: ref.attention(q, k, v, None, tw.rounds_probs(cached=False)),
        lambda q, k, v: tm.attention(q, k, v, backend=tmod.attn_backend),
        lambda q, k, v: jm.attention(q, k, v, backend=jmod.attn_backend),
        r["q"],
        r["k"],
        r["v"],
    )
    yield from op("wo", lambda a: ref.linear(f"{p}.attn.wo", a), bt.attn.wo, bj.attn.wo, r["att"])
    yield from op("resid_attn", ref.add, torch.add, jnp.add, r["x"], r["o"])
    yield from op(
        "mlp_norm", lambda x: ref.norm(f"{p}.mlp_norm", x), bt.mlp_norm, bj.mlp_norm, r["x_mid"]
    )
    if cfg.mlp == "swiglu":
        yield from op(
            "gate",
            lambda x: ref.linear(f"{p}.mlp.w_gate", x),
            bt.mlp.w_gate,
            bj.mlp.w_gate,
            r["h2"],
        )
    yield from op("up", lambda x: ref.linear(f"{p}.mlp.w_up", x), bt.mlp.w_up, bj.mlp.w_up, r["h2"])
    if cfg.mlp == "swiglu":
        yield from op(
            "act",
            ref.act,
            lambda g, u: _mlp_act(bt.mlp, "forward", g, u),
            lambda g, u: _mlp_act(bj.mlp, "__call__", g, u),
            r["gate"],
            r["up"],
        )
    else:
        yield from op(
            "act",
            lambda u: ref.act(None, u),
            lambda u: _mlp_act(bt.mlp, "forward", None, u),
            lambda u: _mlp_act(bj.mlp, "__call__", None, u),
            r["up"],
        )
    yield from op(
        "down", lambda a: ref.linear(f"{p}.mlp.w_down", a), bt.mlp.w_down, bj.mlp.w_down, r["a"]
    )
    yield from op("resid", ref.add, torch.add, jnp.add, r["x_mid"], r["d"])


def _heads(yb, heads, H):
    y, beta = yb
    B, T, _ = y.shape
    return y.view(B, T, heads, H), beta.view(B, T, heads, H)


def _rope_t(z, heads, H, rope):
    import gptmod_torch.model as tm

    B, T, _ = z.shape
    z = z.view(B, T, heads, H)
    return z if rope is None else tm.apply_rope(z, *rope)


def _rope_j(z, heads, H, rope):
    import gptmod_jax.model as jm

    B, T, _ = z.shape
    z = z.reshape(B, T, heads, H)
    return z if rope is None else jm.apply_rope(z, *rope)


def _mlp_act(mlp, method: str, gate, up):
    """The activation exactly as the twin's MLP class computes it: its own forward/__call__ (looked
    up on the class now, so a patched class is traced as patched) with the projections stubbed to
    hand over the reference's rounded gate/up, and w_down the identity."""
    proxy = types.SimpleNamespace(w_up=_stub(up), w_down=lambda a: a)
    if gate is not None:
        proxy.w_gate = _stub(gate)
    return getattr(type(mlp), method)(proxy, up)


def _head(model, x):
    """The twin's own GPT.head on the (rounded) final-norm output: its norm
    stubbed to the identity."""
    proxy = types.SimpleNamespace(
        norm=lambda a: a, tok_emb=model.tok_emb, lm_head=model.lm_head, cfg=model.cfg
    )
    return type(model).head(proxy, x)


def _decode_entries(
    ref: _Reference, tw: _Twins, rec: dict, idx2: np.ndarray, steps: int
) -> Iterator[Entry]:
    """Per block, the twin's cached attention at `steps` positions of two
    rows of different lengths."""
    import jax.numpy as jnp
    import torch

    cfg = ref.cfg
    T = idx2.shape[1]
    # row b decodes positions starts[b] .. starts[b] + steps - 1
    starts = [T - steps, T - steps - DECODE_RAGGED]
    pos_BS = torch.tensor([[s + j for j in range(steps)] for s in starts])  # (2, steps)
    theta = None if rec["theta"] is None else rec["theta"][:2]
    theta_dec = None if theta is None else torch.stack([theta[b, pos_BS[b]] for b in range(2)])
    # The reference's view: row b attends keys 0..p at its step at position p.
    mask = torch.arange(T)[None, None] <= pos_BS[..., None]  # (2, steps, T)
    tmod, jmod = tw.tm_model, tw.jm_model
    tmod.setup_cache(2, T)
    jmod.setup_cache(2, T)
    try:
        # The twins' GPT.embed at each decode step: its RoPE tables and its
        # bottom-right mask over the cache.
        ids = torch.from_numpy(np.asarray(idx2))
        embeds_t, embeds_j = [], []
        for j in range(steps):
            tok = torch.stack([ids[b, pos_BS[b, j]] for b in range(2)])[:, None]
            pj = pos_BS[:, j : j + 1]
            embeds_t.append(tmod.embed(tok.to(tw.device), pj.to(tw.device)))
            embeds_j.append(jmod.embed(jnp.asarray(tok.numpy()), jnp.asarray(pj.numpy())))
        for i in range(cfg.n_layer):
            r = rec["blocks"][i]
            q_pre, k_pre, v, k_post = (r[n][:2] for n in ("q_pre", "k_pre", "v", "k"))
            # The reference's keys: the prefix as the forward computed it,
            # rounded (what the twin's cache gets); at decode positions, RoPE
            # in float64 on the rounded pre-RoPE keys (what the twin rotates).
            qd_pre = torch.stack([q_pre[b, pos_BS[b]] for b in range(2)])
            qd_pre_r = tw.rounded(qd_pre)[2]
            k_ref, dk = tw.rounded(k_post)[2].clone(), torch.zeros_like(k_post)
            v_r = tw.rounded(v)[2]
            if theta is None:
                q_ref, dq = qd_pre_r, None
                for b in range(2):
                    k_ref[b, pos_BS[b]] = tw.rounded(k_pre[b, pos_BS[b]])[2]
                dk = None
            else:
                # The twin rotates the rounded pre-RoPE q and k itself and rounds the result: the
                # reference holds the correctly rounded rotation, and allows an ulp only where the
                # rounding is ambiguous.
                q_ref, dq = ref.held(*ref.rope(qd_pre_r, theta_dec, torch.zeros_like(qd_pre_r)), tw)
                for b in range(2):
                    kb, dkb = ref.held(
                        *ref.rope(
                            tw.rounded(k_pre[b : b + 1, pos_BS[b]])[2],
                            theta[b : b + 1, pos_BS[b]],
                            torch.zeros_like(k_pre[b : b + 1, pos_BS[b]]),
                        ),
                        tw,
                    )
                    k_ref[b, pos_BS[b]], dk[b, pos_BS[b]] = kb[0], dkb[0]
            y, beta = ref.attention(
                q_ref, k_ref, v_r, mask, tw.rounds_probs(cached=True), dq=dq, dk=dk
            )
            out_t = _cached_twin(
                tw, "torch", tmod.blocks[i].attn, k_post, v, q_pre, k_pre, pos_BS, starts, embeds_t
            )
            out_j = _cached_twin(
                tw, "jax", jmod.blocks[i].attn, k_post, v, q_pre, k_pre, pos_BS, starts, embeds_j
            )
            yield _measure("decode", i, "attention (cached)", y, beta, *tw.to64(out_t, out_j))
    finally:
        tmod.clear_cache()
        jmod.clear_cache()


def _cached_twin(tw: _Twins, fw: str, attn, k_post, v, q_pre, k_pre, pos_BS, starts, embeds):
    """One twin's cached attention: the reference's rounded prefix written through its
    KVCache.update, then its Attention (class method, stubbed projections) one step at a time.
    Returns (2, steps, N, H)."""
    import jax.numpy as jnp
    import torch

    cfg = tw.case.cfg
    N, K, H = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    steps = pos_BS.shape[1]
    pick = 0 if fw == "torch" else 1
    # Prefix positions 0..start-1 per row; the shorter row repeats its last
    # position (same value) to fill.
    L = max(starts)
    pre = torch.tensor([[min(j, s - 1) for j in range(L)] for s in starts])
    k_pre_w = torch.stack([k_post[b, pre[b]] for b in range(2)])
    v_pre_w = torch.stack([v[b, pre[b]] for b in range(2)])
    kw, vw = tw.rounded(k_pre_w)[pick], tw.rounded(v_pre_w)[pick]
    pos_w = pre.to(tw.device) if fw == "torch" else jnp.asarray(pre.numpy())
    attn.kv_cache.update(pos_w, kw, vw)
    outs = []
    for j in range(steps):
        pj = pos_BS[:, j : j + 1]
        q = tw.rounded(torch.stack([q_pre[b, pj[b]] for b in range(2)]).reshape(2, 1, N * H))[pick]
        k = tw.rounded(torch.stack([k_pre[b, pj[b]] for b in range(2)]).reshape(2, 1, K * H))[pick]
        vv = tw.rounded(torch.stack([v[b, pj[b]] for b in range(2)]).reshape(2, 1, K * H))[pick]
        captured: list = []  # what the twin's Attention hands to wo: its attention output
        proxy = types.SimpleNamespace(
            n_head=N,
            n_kv_head=K,
            head_dim=H,
            kv_cache=attn.kv_cache,
            wq=_stub(q),
            wk=_stub(k),
            wv=_stub(vv),
            wo=lambda a, captured=captured: captured.append(a) or a,
        )
        # the twin's own (kernels.py's)
        proxy.attend_cache = types.MethodType(type(attn).attend_cache, proxy)
        _, inputs = embeds[j]  # the twin's rope tables, positions, mask and backend
        x_dummy = (
            q[..., :1].expand(2, 1, cfg.d_model)
            if fw == "torch"
            else jnp.zeros((2, 1, cfg.d_model), tw.jdt)
        )
        method = "forward" if fw == "torch" else "__call__"
        getattr(type(attn), method)(proxy, x_dummy, inputs)
        outs.append(captured[0].reshape(2, 1, N, H))
    return torch.cat(outs, dim=1) if fw == "torch" else jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- rows for the suite


def check_trace(
    case: Case, fault: tuple[str, float] | None = None, decode_steps: int = 4
) -> Iterator[Row]:
    """Rows "trace" (the forward ops) and "trace (decode)" (the cached
    attention): each with its worst op's numbers (e in units of that op's
    worst-case bound beta: Row.budget bounds |Δ|, Row.e_max each twin), and
    when failing, `where` names the first op out of budget and the twin."""
    trace = run_trace(case, fault=fault, decode_steps=decode_steps)
    for mode, check in (("forward", "trace"), ("decode", "trace (decode)")):
        worst, bad = trace.worst(mode), trace.first_bad(mode)
        if worst is None:
            continue
        note = (
            f"worst: {worst.label} at {worst.ratio:.2f} of budget; e in units of the op's "
            f"worst-case bound ({len(trace.select(mode))} ops, {trace.seconds:.0f} s)"
        )
        if bad is not None:
            note = (
                f"first op out of budget: {bad.label} ({bad.culprit}), {bad.ratio:.2f} of budget; "
                + note
            )
        yield case_row(
            check,
            case,
            *trace.backends,
            e_torch=worst.e_torch,
            e_jax=worst.e_jax,
            diff=worst.diff,
            budget=K_DIFF * worst.budget,
            passed=bad is None,
            note=note,
            e_max=worst.budget,
            where="" if bad is None else f"{bad.label} ({bad.culprit})",
        )


def rows_of(trace: Trace) -> list[dict]:
    """The entries as plain dicts (JSON)."""
    return [
        {**dataclasses.asdict(e), "passed": e.passed, "culprit": e.culprit} for e in trace.entries
    ]


__all__ = [
    "BUDGET",
    "K_DIFF",
    "Entry",
    "Trace",
    "check_trace",
    "forward_ops",
    "half_ulp",
    "rows_of",
    "run_trace",
]
