"""Int8 weight-only quantization of canonical state, framework-free: one quantizer, so both twins
get the identical int8 weights and scales and can be held to the same parity rule as any other pair.

The scheme (`SCHEME`): symmetric, one float32 scale per output channel (per row of an (out, in)
weight), no zero point. For a row w, scale = max|w| / 127 and q = round-half-even(w / scale), so
q lies in [-127, 127] (-128 is never used, which keeps the range symmetric) and every weight is
within scale / 2 of q * scale. A row of zeros gets scale 1 (its q is all zeros either way).

What is quantized (`quantized_names`): every matrix a decode step multiplies by, the bytes that
bound its speed: the blocks' attention and MLP weights, and the token embedding and lm_head. The
embedding's rows are its output channels as the tied lm_head, and a lookup dequantizes the one row
it reads, with that row's scale. Norm weights, biases and learned positions stay float32: they are
small, and the norms are the most sensitive weights of the model.

A quantized state holds NAME (int8) and NAME + "_scale" (float32, (out,)) for each quantized
weight, and the other canonical tensors as they were. On disk it is a gptmod safetensors
checkpoint whose metadata records the scheme (`META_QUANT`); `load` reads it, and `weights.load`
refuses it by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gptmod import weights
from gptmod.config import ModelConfig
from gptmod.fileio import PathLike, atomic_write

SCHEME = "int8-weight-only-per-channel-symmetric-v1"
QUANTS = ("int8",)  # what `--quant` and the twins' `GPT(quant=...)` accept (None: float weights)
META_QUANT = weights.META_QUANT
SCALE_SUFFIX = "_scale"
QMAX = 127
_FLOATS = ("float32", "bfloat16", "float16", "float64")


def check_quant(quant: str | None) -> str | None:
    """`quant` as given when it is None or one of `QUANTS`; anything else is a named error."""
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(QUANTS)} (or None: float)")
    return quant


def is_quantized(state: Mapping[str, np.ndarray]) -> bool:
    """Whether `state` is a quantized state (it holds scales), not a float canonical one."""
    return any(name.endswith(SCALE_SUFFIX) for name in state)


def quantized_names(cfg: ModelConfig) -> list[str]:
    """The canonical weights the scheme quantizes, in model order (see the module docstring)."""
    kept = (".bias", "norm.weight", "pos_emb.weight")  # biases, every norm, learned positions
    return [n for n in weights.canonical_shapes(cfg) if not n.endswith(kept)]


def quant_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a quantized state and its shape: a quantized weight, then its scale."""
    names = set(quantized_names(cfg))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in weights.canonical_shapes(cfg).items():
        shapes[name] = shape
        if name in names:
            shapes[name + SCALE_SUFFIX] = (shape[0],)
    return shapes


def quantize_weight(w: np.ndarray, *, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32 per row) of one (out, in) weight; non-finite values are refused."""
    if w.ndim != 2:
        raise ValueError(f"quantize: {name} has shape {w.shape}; expected an (out, in) matrix")
    if str(w.dtype) not in _FLOATS:
        raise ValueError(f"quantize: {name} has dtype {w.dtype}; expected a float tensor")
    w64 = np.asarray(w, np.float64)
    if not np.isfinite(w64).all():
        bad = int(w64.size - np.count_nonzero(np.isfinite(w64)))
        raise ValueError(f"quantize: {name} holds {bad:,} NaN or infinite value(s)")
    amax = np.abs(w64).max(axis=1)
    scale = (amax / QMAX).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row: any scale gives q = 0; 1 keeps the division defined
    # Divided in float64 by the float32 scale that is stored, so q * scale is what a twin computes.
    q = np.rint(w64 / scale.astype(np.float64)[:, None])
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scale


def quantize(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The int8 state of a canonical float state (checked against `cfg`), in model order."""
    weights.check_state(weights.canonical_shapes(cfg), state, what="state to quantize")
    names = set(quantized_names(cfg))
    out: dict[str, np.ndarray] = {}
    for name, v in state.items():
        if name in names:
            out[name], out[name + SCALE_SUFFIX] = quantize_weight(np.asarray(v), name=name)
        else:
            out[name] = np.asarray(v)
    return {k: out[k] for k in quant_shapes(cfg)}


def dequantize(qstate: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The float32 canonical state that a quantized state stands for: q * scale per row."""
    check(qstate, cfg, what="state to dequantize")
    names = set(quantized_names(cfg))
    return {
        n: (
            qstate[n].astype(np.float32) * qstate[n + SCALE_SUFFIX][:, None]
            if n in names
            else np.asarray(qstate[n], np.float32)
        )
        for n in weights.canonical_shapes(cfg)
    }


def check(qstate: Mapping[str, np.ndarray], cfg: ModelConfig, *, what: str = "state") -> None:
    """Names and shapes against `quant_shapes(cfg)`, int8 weights and float32 scales (named)."""
    weights.check_state(quant_shapes(cfg), qstate, what=f"quantized {what}")
    want = {n: "int8" for n in quantized_names(cfg)}
    want |= {n + SCALE_SUFFIX: "float32" for n in want}
    bad = [
        f"  {n}: dtype {qstate[n].dtype}, expected {d}"
        for n, d in want.items()
        if qstate[n].dtype != d
    ]
    if bad:
        raise weights.StateError(
            f"quantized {what}: {len(bad)} tensor(s) of a wrong dtype:\n" + "\n".join(bad)
        )
    weights.check_dtypes({n: v for n, v in qstate.items() if n not in want}, what=what)


def save(
    path: PathLike,
    qstate: Mapping[str, np.ndarray],
    cfg: ModelConfig,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a quantized state as a gptmod safetensors checkpoint (atomic), the scheme in its
    metadata; either twin reads it through `load`."""
    check(qstate, cfg, what=f"state to save to {path}")
    meta = weights.checkpoint_metadata(cfg, metadata, **{META_QUANT: SCHEME})
    if bad := weights.non_finite({n: v for n, v in qstate.items() if v.dtype != np.int8}):
        raise weights.NonFiniteError(f"save: refusing to write {path}: NaN or inf in {sorted(bad)}")
    arrays = {k: np.ascontiguousarray(v) for k, v in qstate.items()}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))


def load(path: PathLike) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """(quantized state in model order, config) of a checkpoint `save` wrote. Never unpickles."""
    path = Path(path)
    state, meta, cfg = weights.read_checkpoint(path)
    if meta.get(META_QUANT) != SCHEME:
        got = meta.get(META_QUANT)
        raise ValueError(
            f"{path}: not an int8 gptmod checkpoint ({META_QUANT}={got!r}, this gptmod reads "
            f"{SCHEME!r}); a float checkpoint loads with gptmod.weights.load"
        )
    check(state, cfg, what=f"checkpoint {path}")
    return {k: state[k] for k in quant_shapes(cfg)}, cfg
