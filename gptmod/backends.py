"""Attention backends: the names both twins accept and the documented
constraints of the GPU kernels.

Framework-free on purpose: the twins, the parity suite and the CLI share one set of names and one
statement of each kernel's constraints, so that a backend that cannot run is refused with the same
reason everywhere, and never replaced silently by another one.
"""

from __future__ import annotations

TORCH_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "math", "reference")
JAX_BACKENDS = ("auto", "xla", "cudnn", "reference")
DEFAULT_BACKEND = {"torch": "sdpa", "jax": "auto"}


class BackendUnavailableError(RuntimeError):
    """An attention backend asked for by name cannot run on this device, dtype or shape."""


def check_backend_name(framework: str, name: str) -> str:
    known = TORCH_BACKENDS if framework == "torch" else JAX_BACKENDS
    if name not in known:
        raise ValueError(
            f"attention backend {name!r} is not a {framework} backend; choose "
            f"one of {', '.join(known)}"
        )
    return name


def _sm_tuple(compute_capability: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in compute_capability.split(".")) if compute_capability else ()


def jax_cudnn_unmet(
    platform: str,
    dtype: str,
    head_dim: int,
    compute_capability: str | None,
    has_mask: bool,
    mask_full_size: bool,
) -> list[str]:
    """Reasons why `jax.nn.dot_product_attention(implementation="cudnn")`
    cannot run; empty if it can.

    Mirrors jax/_src/cudnn/fused_attention_stablehlo.py (JAX 0.10):
    fp16/bf16, head_dim a multiple of 8 and <= 128 (<= 256 from Hopper,
    sm90), an sm80+ GPU, and a mask only at full (B, N, T, S) size.
    """
    if platform != "gpu":
        return [f"needs an NVIDIA GPU, but the JAX platform is {platform!r}"]
    reasons = []
    sm = _sm_tuple(compute_capability)
    if sm < (8, 0):
        reasons.append(f"needs compute capability >= 8.0 (Ampere), got {compute_capability}")
    if dtype not in ("float16", "bfloat16"):
        reasons.append(f"needs float16 or bfloat16, got {dtype}")
    h_max = 256 if sm >= (9, 0) else 128
    if head_dim % 8 or head_dim > h_max:
        reasons.append(
            f"needs head_dim a multiple of 8 and <= {h_max} on "
            f"sm{''.join(map(str, sm))}, got {head_dim}"
        )
    if has_mask and not mask_full_size:
        reasons.append("takes a mask only at full (B, N, T, S) size")
    return reasons


def torch_pinned_unmet(
    backend: str, device: str, dtype: str, head_dim: int, has_mask: bool
) -> list[str]:
    """Documented constraints of a pinned torch SDPA backend that we can state before calling it.

    torch's own dispatcher remains the final judge (its refusal is re-raised as
    BackendUnavailableError);
    this gives the common reasons in plain words. On the CPU torch has only "math" and its own
    "flash" kernel (any float dtype, masks allowed).
    """
    if backend == "math":
        return []
    if device == "cpu":
        return (
            []
            if backend == "flash"
            else [f"has no CPU kernel (CPU has 'math' and 'flash'); device is {device}"]
        )
    reasons = []
    if device != "cuda":
        reasons.append(f"needs a CUDA device, got {device}")
    if backend in ("flash", "cudnn") and dtype not in ("float16", "bfloat16"):
        reasons.append(f"needs float16 or bfloat16 on CUDA, got {dtype}")
    if backend == "flash" and head_dim > 256:
        reasons.append(f"needs head_dim <= 256, got {head_dim}")
    if backend == "flash" and has_mask:
        reasons.append("takes no attn_mask (causal only, with query and key lengths equal)")
    return reasons
