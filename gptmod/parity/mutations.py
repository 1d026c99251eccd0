"""Known-bug mutations for the parity self-test: each breaks ONE twin, at
run time, without editing a file.

A mutation is a set of `unittest.mock.patch` replacements of module functions, class methods or
attributes, applied through the module attribute the twin looks up at call time
(`gptmod_jax.model.apply_rope`, `gptmod_jax.model.RMSNorm.__call__`,
`gptmod_torch.generate.filter_logits`, ...), so models already built see it.
`python -m gptmod.parity --self-test` (gptmod/parity/selftest.py) runs the suite under each one and
demands that some row fails: that is what shows the suite has the power to see the bug.

The float64 reference is torch (`suite.torch_model(case, "float64", ...)`, and the float64 trainer
of gptmod/parity/training.py). A torch mutation must break the twin, not the oracle it is judged
against, so every torch replacement hands float64 inputs to the original.

Entering and leaving a mutation drops compiled programs that may hold the unmutated (or mutated)
code: the jitted generate and train functions take the graphdef (or the trainer) as a static
argument, so an equal graphdef would reuse a stale program. `jax.clear_caches()` would do it too,
but it also drops every eager op's compilation and then costs ~25 s (fp32) to ~50 s (bf16) per run
on the tiny preset (measured), so only the jitted functions of gptmod_jax and gptmod (gptmod.parity
included) are cleared (each jitted function's own `clear_cache`, which evicts its traces as well);
torch's compiled steps (`gptmod_torch.generate._compiled`, torch._dynamo) are reset too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import numpy as np

from gptmod.config import ModelConfig
from gptmod.parity.runner import CHECKS

# The suite checks (gptmod.parity.runner.CHECKS names) a mutation's family runs under `--self-test
# --all-checks`: every model check but the HF oracle and the conversion round trips, which no
# mutation targets; sampling bugs the generation checks; optimizer bugs "train". By default each
# mutation runs only its own `checks` (those expected to catch it): a full pass of the model checks
# compiles afresh under every mutation and takes minutes on a CPU.
MODEL_CHECKS = tuple(c for c in CHECKS if c not in ("roundtrip", "hf", "train"))
SAMPLING_CHECKS = ("sampling", "generate")
TRAIN_CHECKS = ("train",)
FAMILY_CHECKS = {"model": MODEL_CHECKS, "sampling": SAMPLING_CHECKS, "train": TRAIN_CHECKS}
FP32, BF16 = ("float32",), ("bfloat16",)

# the realistic wrong eps (TrainConfig.eps is 1e-8): torch's Adam default is 1e-8, Keras' 1e-7,
ADAMW_EPS = 1e-6
# and 1e-6 is a common hand-typed value; see the self-test report for what 10 AdamW steps can see


@dataclass(frozen=True)
class Mutation:
    """One known bug in one twin. `patches` builds the replacements,
    (object, attribute, new value) triples."""

    name: str
    twin: str  # "torch" | "jax"
    description: str
    dtypes: tuple[str, ...]  # where it shows: logic bugs in fp32, precision bugs only at bf16/fp16
    # the rows expected to catch it (row names or their prefixes; for the report)
    expected: tuple[str, ...]
    # the suite checks the self-test runs under it (gptmod.parity.runner.CHECKS names)
    checks: tuple[str, ...]
    patches: Callable[[], list[tuple[object, str, object]]] = dataclasses.field(repr=False)
    needs: Callable[[ModelConfig], str | None] = dataclasses.field(
        default=lambda cfg: None, repr=False
    )
    family: str = "model"  # "model" | "sampling" | "train": which FAMILY_CHECKS --all-checks runs

    @property
    def dtype(self) -> str:
        """The dtype the self-test runs it at."""
        return self.dtypes[0]

    def applies(self, cfg: ModelConfig) -> str | None:
        """None if the bug can show in this config, else why not (e.g. "no
        soft-cap in this config")."""
        return self.needs(cfg)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The twin mutated inside the block, restored exactly after it
        (compiled programs dropped both ways)."""
        reset_compiled()
        try:
            with contextlib.ExitStack() as stack:
                for obj, attr, new in self.patches():
                    stack.enter_context(mock.patch.object(obj, attr, new))
                yield
        finally:
            reset_compiled()


def reset_compiled() -> None:
    """Drop compiled programs that may have traced a patched (or unpatched) function: see the module
    docstring. Jitted functions are found as module attributes, class attributes, and items of
    module-level lists, tuples and dicts (a lazily built one, as gptmod.parity.generation keeps)."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("gptmod_jax", "gptmod.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type):
                inner = list(vars(value).values())
            elif isinstance(value, (list, tuple)):
                inner = list(value)
            elif isinstance(value, dict):
                inner = list(value.values())
            else:
                inner = []
            for fn in [value, *inner]:
                # a jax.jit function
                if callable(getattr(fn, "clear_cache", None)) and hasattr(fn, "_fun"):
                    fn.clear_cache()
    gen = sys.modules.get("gptmod_torch.generate")
    if gen is not None:
        gen._compiled.clear()
    if "torch" in sys.modules:
        import torch._dynamo

        torch._dynamo.reset()


# ----------------------------------------------------------------------------- applicability


def _rope(cfg: ModelConfig) -> str | None:
    return None if cfg.pos == "rope" else f"no RoPE in this config (pos={cfg.pos})"


def _softcap(cfg: ModelConfig) -> str | None:
    return None if cfg.logit_softcap is not None else "no soft-cap in this config"


def _gelu(cfg: ModelConfig) -> str | None:
    return None if cfg.mlp == "gelu" else f"no GELU (mlp={cfg.mlp})"


def _swiglu(cfg: ModelConfig) -> str | None:
    return None if cfg.mlp == "swiglu" else f"no SwiGLU (mlp={cfg.mlp})"


def _gqa(cfg: ModelConfig) -> str | None:
    if cfg.n_kv_head == cfg.n_head:
        return f"no grouped KV heads (n_kv_head = n_head = {cfg.n_head})"
    if cfg.n_kv_head == 1:
        return "one KV head: tile and repeat give the same map"
    return None


# ----------------------------------------------------------------------------- JAX twin: model


def _jm():
    import gptmod_jax.model as jm

    return jm


def _jk():
    return importlib.import_module("gptmod_jax.kernels")


def _jax_norm_eps_x10():
    import jax
    import jax.numpy as jnp

    jm = _jm()

    def rms(self, x):
        ct = jm.compute_dtype(x.dtype)
        x32 = x.astype(ct)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + 10 * self.eps)
        return (y * self.weight[...].astype(ct)).astype(x.dtype)

    def layer(self, x):
        ct = jm.compute_dtype(x.dtype)
        x32 = x.astype(ct)
        mean = x32.mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(
            jnp.square(x32 - mean).mean(-1, keepdims=True) + 10 * self.eps
        )
        return (y * self.weight[...].astype(ct) + self.bias[...].astype(ct)).astype(x.dtype)

    return [(jm.RMSNorm, "__call__", rms), (jm.LayerNorm, "__call__", layer)]


def _jax_norm_in_dtype():
    import jax
    import jax.numpy as jnp

    jm = _jm()

    def rms(self, x):  # no upcast: square, mean, rsqrt and the gain in the input dtype
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(x.dtype)).astype(x.dtype)

    def layer(self, x):
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)).astype(
            x.dtype
        )

    return [(jm.RMSNorm, "__call__", rms), (jm.LayerNorm, "__call__", layer)]


def _jax_cached_softmax_in_dtype():
    import jax
    import jax.numpy as jnp

    jm, jk = _jm(), _jk()
    orig = jk.cached_attention  # the XLA path of the default model (kernels.py)

    def cached_attention(q_BTNH, k_BKHS, v_BKSH, *, backend, mask_BTS):
        if (
            jm.resolve_backend(backend, q_BTNH.dtype, q_BTNH.shape[-1], mask_BTS is not None)
            != "xla"
        ):
            return orig(q_BTNH, k_BKHS, v_BKSH, backend=backend, mask_BTS=mask_BTS)
        B, T, N, H = q_BTNH.shape
        K = v_BKSH.shape[1]
        if mask_BTS is None:  # a prefill from key 0: the causal mask the XLA path builds for it
            mask_BTS = (jnp.arange(v_BKSH.shape[2]) <= jnp.arange(T)[:, None])[None]
        ct = q_BTNH.dtype  # the bug: scores, softmax and PV in the input dtype instead of fp32
        q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS.astype(ct)) / jnp.asarray(
            math.sqrt(H), ct
        )
        scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(ct).min)
        out = jnp.einsum("bkgts,bksh->bkgth", jax.nn.softmax(scores, axis=-1), v_BKSH.astype(ct))
        return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)

    return [(jk, "cached_attention", cached_attention)]


def _jax_softcap_in_dtype():
    import jax.numpy as jnp

    jm = _jm()

    def head(self, x_BTD):
        x_BTD = self.norm(x_BTD)
        # the bug: the soft-cap in the matmul's dtype, cast to fp32 after it
        logits = self.tok_emb.attend(x_BTD) if self.lm_head is None else self.lm_head(x_BTD)
        cap = self.cfg.logit_softcap
        logits = logits if cap is None else cap * jnp.tanh(logits / cap)
        return logits.astype(jm.compute_dtype(x_BTD.dtype))

    return [(jm.GPT, "head", head)]


def _jax_rope_theta():
    jm = _jm()
    orig = jm.rope_inv_freq
    return [
        (
            jm,
            "rope_inv_freq",
            lambda cfg: orig(dataclasses.replace(cfg, rope_theta=cfg.rope_theta * (1 + 1e-4))),
        )
    ]


def _jax_rope_decode_pos():
    jm = _jm()
    orig = jm.GPT.embed

    def embed(self, idx_BT, positions_BT):
        x_BTD, inputs = orig(self, idx_BT, positions_BT)
        # cached decode
        if inputs.rope is not None and inputs.mask_BTS is not None and idx_BT.shape[1] == 1:
            inputs = inputs._replace(rope=jm.rope_cos_sin(inputs.pos_BT + 1, self.cfg, x_BTD.dtype))
        return x_BTD, inputs

    return [(jm.GPT, "embed", embed)]


def _around_attention(jm, change_q: Callable, change_out: Callable = lambda out, k_heads: out):
    """Replacements of `attention` and both `cached_attention`s (model.py's and kernels.py's XLA
    path) that transform q (and the output) once: a cached path may call another of them
    (kernels.py's calls model.py's for cuDNN; model.py's calls `attention`), which must then pass
    through unchanged."""
    jk = _jk()
    depth = [0]

    def around(orig: Callable, kv_heads: Callable) -> Callable:
        def wrapped(q_BTNH, k, v, **kw):
            if depth[0]:
                return orig(q_BTNH, k, v, **kw)
            depth[0] += 1
            try:
                K = kv_heads(k, v)
                return change_out(orig(change_q(q_BTNH, K), k, v, **kw), K)
            finally:
                depth[0] -= 1

        return wrapped

    return [
        (jm, "attention", around(jm.attention, lambda k_BSKH, v: k_BSKH.shape[2])),
        (jm, "cached_attention", around(jm.cached_attention, lambda k, v_BKSH: v_BKSH.shape[1])),
        (jk, "cached_attention", around(jk.cached_attention, lambda k, v_BKSH: v_BKSH.shape[1])),
    ]


def _jax_attn_scale():
    jm = _jm()

    def scale_q(q_BTNH, K):  # q * sqrt(H / (H+1)) then / sqrt(H): the scores carry 1/sqrt(H+1)
        H = q_BTNH.shape[-1]
        return q_BTNH * np.asarray(math.sqrt(H / (H + 1)), q_BTNH.dtype)

    return _around_attention(jm, scale_q)


def _head_maps(N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """fwd[h] = where query head h must sit for the consecutive-groups code (kv head h' // G) to
    give it kv head h % K (the tiled map); inv its inverse."""
    G = N // K
    fwd = np.array([(h % K) * G + h // K for h in range(N)])
    return fwd, np.argsort(fwd)


def _jax_gqa_tile():
    jm = _jm()
    return _around_attention(
        jm,
        lambda q, K: q[:, :, _head_maps(q.shape[2], K)[1]],
        lambda out, K: out[:, :, _head_maps(out.shape[2], K)[0]],
    )


def _jax_cached_mask_strict():
    import jax.numpy as jnp

    jm = _jm()
    orig = jm.GPT.embed

    def embed(self, idx_BT, positions_BT):
        x_BTD, inputs = orig(self, idx_BT, positions_BT)
        mask_BTS = inputs.mask_BTS
        if mask_BTS is not None:  # s < p instead of s <= p: no token sees its own key
            mask_BTS = mask_BTS & (jnp.arange(mask_BTS.shape[-1]) != inputs.pos_BT[..., None])
        return x_BTD, inputs._replace(mask_BTS=mask_BTS)

    return [(jm.GPT, "embed", embed)]


def _jax_softcap_skipped_in_generate():
    jg = importlib.import_module("gptmod_jax.generate")  # `gptmod_jax.generate` is the function

    jm = _jm()

    class NoCap:
        """The net generate runs (a GPT or ScannedLayers) with a head that forgets the soft-cap."""

        def __init__(self, net):
            self.net = net
            self.model = net.model if isinstance(net, jg.ScannedLayers) else net

        def trunk(self, *args):
            return self.net.trunk(*args)

        def head(self, x_BTD):
            m = self.model
            x_BTD = m.norm(x_BTD)
            logits = m.tok_emb.attend(x_BTD) if m.lm_head is None else m.lm_head(x_BTD)
            return logits.astype(jm.compute_dtype(x_BTD.dtype))

    out = []
    for name in ("prefill", "decode_one_token"):
        orig = getattr(jg, name)
        out.append((jg, name, lambda net, *a, _orig=orig, **kw: _orig(NoCap(net), *a, **kw)))
    return out


def _jax_gelu_exact():
    import jax

    jm = _jm()
    return [
        (
            jm.GeluMLP,
            "__call__",
            lambda self, x: self.w_down(jax.nn.gelu(self.w_up(x), approximate=False)),
        )
    ]


def _jax_silu_on_up():
    import jax

    jm = _jm()
    return [
        (
            jm.SwiGLU,
            "__call__",
            lambda self, x: self.w_down(jax.nn.silu(self.w_up(x)) * self.w_gate(x)),
        )
    ]


def _jax_kv_write_row0():
    import jax.numpy as jnp

    jm = _jm()

    def update(self, pos_BT, k_BTKH, v_BTKH):
        # the bug: every row of the batch writes row 0
        rows_B1 = jnp.zeros((pos_BT.shape[0], 1), jnp.int32)
        self.k[...] = self.k[...].at[rows_B1, :, :, pos_BT].set(k_BTKH)
        self.v[...] = self.v[...].at[rows_B1, :, pos_BT].set(v_BTKH)
        return self.k[...], self.v[...]

    return [(jm.KVCache, "update", update)]


# --------------------------------------------------------------------- JAX twin: sampling, training


def _jax_filter(temperature_last: bool = False, top_k_extra: int = 0):
    """gptmod_jax.generate.filter_logits with one of two bugs: temperature after the filters, or
    top-k keeping `top_k_extra` more tokens than asked. Both wrap the twin's own function (taken
    before the patch)."""
    import jax.numpy as jnp

    jg = importlib.import_module("gptmod_jax.generate")  # `gptmod_jax.generate` is the function
    original = jg.filter_logits

    def filter_logits(logits_BV, knobs, flags):
        if temperature_last:  # the filters on the untempered logits, the temperature after them
            return (
                original(logits_BV, knobs._replace(temperature=jnp.float32(1.0)), flags)
                / knobs.temperature
            )
        top_k = jnp.minimum(knobs.top_k + top_k_extra, logits_BV.shape[-1])
        return original(logits_BV, knobs._replace(top_k=top_k), flags)

    return [(jg, "filter_logits", filter_logits)]


def _jax_decay_everything():
    import gptmod_jax.train as jt

    return [(jt, "decays", lambda name: True)]


# ----------------------------------------------------------------------------- torch twin


def _torch_norm_eps_x10():
    import torch
    import torch.nn.functional as F

    import gptmod_torch.model as tm

    orig_rms, orig_layer = tm.RMSNorm.forward, tm.LayerNorm.forward

    def rms(self, x):
        if x.dtype == torch.float64:  # the float64 reference is the judge, not the twin
            return orig_rms(self, x)
        ct = tm.compute_dtype(x.dtype)
        return F.rms_norm(x.to(ct), x.shape[-1:], self.weight.to(ct), eps=10 * self.eps).to(x.dtype)

    def layer(self, x):
        if x.dtype == torch.float64:
            return orig_layer(self, x)
        ct = tm.compute_dtype(x.dtype)
        y = F.layer_norm(
            x.to(ct), x.shape[-1:], self.weight.to(ct), self.bias.to(ct), eps=10 * self.eps
        )
        return y.to(x.dtype)

    return [(tm.RMSNorm, "forward", rms), (tm.LayerNorm, "forward", layer)]


def _torch_rope_interleaved():
    import torch

    import gptmod_torch.model as tm

    orig = tm.apply_rope

    def apply_rope(x_BTNH, cos_BTh, sin_BTh):
        if x_BTNH.dtype == torch.float64:
            return orig(x_BTNH, cos_BTh, sin_BTh)
        x = x_BTNH.to(cos_BTh.dtype)
        # the bug: GPT-J's interleaved pairs, not the half-split
        x1, x2 = (x[..., 0::2], x[..., 1::2])
        cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
        return (
            torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            .flatten(-2)
            .to(x_BTNH.dtype)
        )

    return [(tm, "apply_rope", apply_rope)]


def _torch_top_p_one_fewer():
    import torch

    tg = importlib.import_module("gptmod_torch.generate")

    orig = tg.filter_logits

    def filter_logits(logits_BV, knobs, flags):
        if logits_BV.dtype == torch.float64 or not flags.top_p:
            return orig(logits_BV, knobs, flags)
        # temperature, top-k
        x_BV = orig(logits_BV, knobs, flags._replace(top_p=False, min_p=False))
        probs_BV = x_BV.softmax(dim=-1)
        sorted_BV = torch.sort(probs_BV, dim=-1, descending=True).values
        mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        # The bug: the smallest set reaching top_p, less its last token (but never empty).
        n_B1 = ((mass_before_BV < knobs.top_p).sum(-1, keepdim=True) - 1).clamp(min=1)
        cutoff_B1 = sorted_BV.gather(-1, n_B1 - 1)
        x_BV = torch.where(probs_BV >= cutoff_B1, x_BV, -torch.inf)
        if flags.min_p:
            probs_BV = x_BV.softmax(dim=-1)
            x_BV = torch.where(
                probs_BV >= knobs.min_p * probs_BV.amax(dim=-1, keepdim=True), x_BV, -torch.inf
            )
        return x_BV

    return [(tg, "filter_logits", filter_logits)]


def _torch_adamw_eps(eps: float = ADAMW_EPS):
    import torch

    import gptmod_torch.train as tt

    orig = tt.make_optimizer

    def make_optimizer(model, tc):
        opt = orig(model, tc)
        if next(model.parameters()).dtype != torch.float64:  # not the float64 reference trainer
            for group in opt.param_groups:
                group["eps"] = eps
        return opt

    return [(tt, "make_optimizer", make_optimizer)]


# ----------------------------------------------------------------------------- the registry

_M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    _M(
        "norm-eps-x10",
        "torch",
        "RMSNorm/LayerNorm eps 10x too large",
        FP32,
        ("module:norm", "trace", "logits"),
        ("modules", "trace"),
        _torch_norm_eps_x10,
    ),
    _M(
        "norm-in-dtype",
        "jax",
        "norms computed in the input dtype (bf16) instead of fp32",
        BF16,
        ("trace", "module:norm"),
        ("modules", "trace", "logits"),
        _jax_norm_in_dtype,
    ),
    _M(
        "cached-softmax-in-dtype",
        "jax",
        "cached_attention (xla path): scores, softmax and PV in bf16, not fp32",
        BF16,
        ("trace (decode)", "cached-decode"),
        ("trace", "cached"),
        _jax_cached_softmax_in_dtype,
    ),
    _M(
        "softcap-in-dtype",
        "jax",
        "soft-cap computed in bf16 (GPT.head), cast to fp32 after it",
        BF16,
        ("trace", "logits"),
        ("trace", "logits", "text"),
        _jax_softcap_in_dtype,
        _softcap,
    ),
    _M(
        "rope-interleaved",
        "torch",
        "RoPE rotates interleaved pairs (GPT-J) instead of the half-split",
        FP32,
        ("module:rope", "trace", "logits"),
        ("modules", "trace"),
        _torch_rope_interleaved,
        _rope,
    ),
    _M(
        "rope-theta",
        "jax",
        "rope theta off by 1e-4 relative (rope_inv_freq)",
        FP32,
        ("module:rope", "trace"),
        ("modules", "trace"),
        _jax_rope_theta,
        _rope,
    ),
    _M(
        "rope-pos-decode",
        "jax",
        "RoPE position off by one in cached decode steps (GPT.embed with a cache, T=1); "
        "a shift of every cached position alike is invisible, RoPE being relative",
        FP32,
        ("trace (decode)", "cached-decode"),
        ("trace", "cached"),
        _jax_rope_decode_pos,
        _rope,
    ),
    _M(
        "attn-scale",
        "jax",
        "softmax scale 1/sqrt(H+1) (attention and cached_attention)",
        FP32,
        ("module:attention", "trace", "logits"),
        ("modules", "trace"),
        _jax_attn_scale,
    ),
    _M(
        "gqa-tile",
        "jax",
        "GQA map tile (kv head h % K) instead of repeat (h // G)",
        FP32,
        ("module:attention", "trace", "logits"),
        ("modules", "trace"),
        _jax_gqa_tile,
        _gqa,
    ),
    _M(
        "cached-mask-strict",
        "jax",
        "cached causal mask s < p instead of s <= p (GPT.embed with a cache)",
        FP32,
        ("trace (decode)", "cached-decode"),
        ("trace", "cached"),
        _jax_cached_mask_strict,
    ),
    _M(
        "softcap-skipped-generate",
        "jax",
        "soft-cap skipped in generate's head only (gptmod_jax.generate), not "
        "in the model's forward",
        FP32,
        ("sampling",),
        ("sampling",),
        _jax_softcap_skipped_in_generate,
        _softcap,
    ),
    _M(
        "gelu-exact",
        "jax",
        "exact (erf) GELU instead of the tanh approximation",
        FP32,
        ("module:mlp", "trace", "logits"),
        ("modules", "trace"),
        _jax_gelu_exact,
        _gelu,
    ),
    _M(
        "silu-on-up",
        "jax",
        "SwiGLU: silu on up instead of gate",
        FP32,
        ("module:mlp", "trace", "logits"),
        ("modules", "trace"),
        _jax_silu_on_up,
        _swiglu,
    ),
    _M(
        "kv-write-row0",
        "jax",
        "KVCache.update: every row of a batch writes row 0 (ragged batches)",
        FP32,
        ("ragged", "trace (decode)"),
        ("trace", "ragged"),
        _jax_kv_write_row0,
    ),
    _M(
        "top-p-one-fewer",
        "torch",
        "top-p keeps one token fewer (the set reaching p, less its last)",
        FP32,
        ("sampling",),
        ("sampling",),
        _torch_top_p_one_fewer,
        family="sampling",
    ),
    _M(
        "temperature-after-filters",
        "jax",
        "temperature applied after top-k/top-p/min-p instead of before",
        FP32,
        ("sampling",),
        ("sampling",),
        lambda: _jax_filter(temperature_last=True),
        family="sampling",
    ),
    _M(
        "top-k-one-more",
        "jax",
        "top-k keeps k+1 tokens",
        FP32,
        ("sampling",),
        ("sampling",),
        lambda: _jax_filter(top_k_extra=1),
        family="sampling",
    ),
    _M(
        "decay-everything",
        "jax",
        "AdamW weight-decay mask: norms and embeddings decayed too",
        FP32,
        ("train params @10 AdamW",),
        TRAIN_CHECKS,
        _jax_decay_everything,
        family="train",
    ),
    _M(
        "adamw-eps",
        "torch",
        f"AdamW eps {ADAMW_EPS:g} instead of 1e-8",
        FP32,
        ("train params @10 AdamW",),
        TRAIN_CHECKS,
        _torch_adamw_eps,
        family="train",
    ),
)
BY_NAME = {m.name: m for m in MUTATIONS}


def get(names: list[str] | tuple[str, ...] | None) -> list[Mutation]:
    """The named mutations (all of them for None), in registry order; an
    unknown name is an error naming it."""
    if names is None:
        return list(MUTATIONS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(
            f"unknown mutation(s) {', '.join(map(repr, unknown))}: choose from {', '.join(BY_NAME)}"
        )
    return [m for m in MUTATIONS if m.name in names]
