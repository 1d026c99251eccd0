"""Side-by-side logits of the two twins, each measured against a float64 torch reference.

Both twins get the same canonical weights (exported once from a seeded torch model, cast to the
run dtype) and the same tokens. The float64 reference runs those very weights, so e_torch and e_jax
measure rounding error only, and |Δ| is the cross-framework difference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from gptmod.config import ModelConfig

# fp32 logits: the hard ceiling of DESIGN.md (absolute, at GPT-2-small size).
FP32_LOGIT_CEILING = 1e-4
# Absolute floor of the budget: differences below it are noise at any dtype.
ABS_FLOOR = {"float32": 1e-6, "bfloat16": 1e-3, "float16": 1e-4}
# Budget factor k: |Δ| may be up to k times the larger of the two errors against float64.
BUDGET_K = 2.0
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Row:
    check: str
    preset: str
    dtype: str
    backend_torch: str
    backend_jax: str
    e_torch: float
    e_jax: float
    diff: float
    budget: float
    passed: bool
    note: str = ""


def strict_precision() -> None:
    """fp32 must mean fp32: no TF32 in torch, "highest" matmul precision in JAX (GPU/TPU default lower)."""
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")


def budget(dtype: str, e_torch: float, e_jax: float) -> float:
    b = max(ABS_FLOOR[dtype], BUDGET_K * max(e_torch, e_jax))
    return min(b, FP32_LOGIT_CEILING) if dtype == "float32" else b


def random_state(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded random canonical weights (the torch initialiser), fp32."""
    import torch

    import gptmod_torch

    torch.manual_seed(seed)
    return gptmod_torch.export_state(gptmod_torch.GPT(cfg))


def random_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq_len), dtype=np.int64)


def run_torch(cfg: ModelConfig, state: dict, idx: np.ndarray, dtype: str, backend: str, device: str = "cpu"):
    import torch

    import gptmod_torch

    model = gptmod_torch.GPT(cfg, attn_backend=backend).to(device=device, dtype=getattr(torch, dtype)).eval()
    gptmod_torch.load_state(model, state)
    with torch.no_grad():
        return model(torch.from_numpy(idx).to(device)).double().cpu().numpy()


def run_jax(cfg: ModelConfig, state: dict, idx: np.ndarray, dtype: str, backend: str):
    import jax.numpy as jnp
    from flax import nnx

    import gptmod_jax

    model = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0), attn_backend=backend, dtype=getattr(jnp, dtype))
    gptmod_jax.load_state(model, state)
    return np.asarray(model(jnp.asarray(idx)), dtype=np.float64)


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Round the weights to the run dtype once, so the float64 reference sees the same weights."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: v.astype(np_dtype) for k, v in state.items()}


def compare_logits(
    cfg: ModelConfig,
    *,
    preset: str,
    dtype: str = "float32",
    backend_torch: str = "sdpa",
    backend_jax: str = "auto",
    seq_len: int = 128,
    batch: int = 1,
    seed: int = 0,
    state: dict[str, np.ndarray] | None = None,
    device: str = "cpu",
) -> Row:
    """Whole-model logits, torch vs jax, both against the float64 torch reference."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len}: must be in [1, max_seq_len={cfg.max_seq_len}]")
    state = cast_state(random_state(cfg, seed) if state is None else state, dtype)
    idx = random_tokens(cfg, batch, seq_len, seed)
    ref = run_torch(cfg, state, idx, "float64", "math")
    lt = run_torch(cfg, state, idx, dtype, backend_torch, device)
    lj = run_jax(cfg, state, idx, dtype, backend_jax)
    e_t, e_j = float(np.abs(lt - ref).max()), float(np.abs(lj - ref).max())
    diff = float(np.abs(lt - lj).max())
    b = budget(dtype, e_t, e_j)
    finite = all(math.isfinite(v) for v in (e_t, e_j, diff))
    note = f"max|logit|={np.abs(ref).max():.3g}, {batch}x{seq_len} tokens"
    return Row("logits", preset, dtype, backend_torch, backend_jax, e_t, e_j, diff, b, finite and diff <= b, note)


def format_rows(rows: list[Row]) -> str:
    headers = ["check", "preset", "dtype", "torch", "jax", "e_torch", "e_jax", "|Δ|", "budget", "result", "note"]
    table = [
        [
            r.check, r.preset, r.dtype, r.backend_torch, r.backend_jax,
            f"{r.e_torch:.2e}", f"{r.e_jax:.2e}", f"{r.diff:.2e}", f"{r.budget:.2e}",
            "pass" if r.passed else "FAIL", r.note,
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]
