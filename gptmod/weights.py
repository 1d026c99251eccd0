"""Canonical weights: names and shapes, state checks, safetensors I/O.

Framework-free. Canonical state is `dict[str, numpy.ndarray]` with torch's
names and (out, in) linear weights; see DESIGN.md. The importers live beside
it: gptmod.hf_gpt2, gptmod.hf_llama, gptmod.gguf_llama.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Registers bfloat16 with numpy, so bf16 checkpoints read in any process.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptmod.config import ModelConfig
from gptmod.fileio import atomic_write

FORMAT = "gptmod-canonical-v1"
_RESERVED_METADATA = ("format", "gptmod_config")
META_QUANT = "gptmod_quant"  # the quantization scheme of an int8 checkpoint (gptmod.quant)
# What a gptmod checkpoint may store. Anything else (float64, integers, bool) is refused, never
# cast: an integer tensor in a float checkpoint is a quantized or foreign file whose values would be
# silently wrong as floats.
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- names and checks


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in model order (DESIGN.md's table)."""
    d, hd, ln = cfg.d_model, cfg.head_dim, cfg.norm == "layernorm"
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, d)}
    if cfg.pos == "learned":
        shapes["pos_emb.weight"] = (cfg.max_seq_len, d)

    def linear(name: str, d_out: int, d_in: int) -> None:
        shapes[f"{name}.weight"] = (d_out, d_in)
        if cfg.bias:
            shapes[f"{name}.bias"] = (d_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (d,)
        if ln:
            shapes[f"{name}.bias"] = (d,)

    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        norm(f"{b}.attn_norm")
        linear(f"{b}.attn.wq", cfg.n_head * hd, d)
        linear(f"{b}.attn.wk", cfg.n_kv_head * hd, d)
        linear(f"{b}.attn.wv", cfg.n_kv_head * hd, d)
        linear(f"{b}.attn.wo", d, cfg.n_head * hd)
        norm(f"{b}.mlp_norm")
        if cfg.mlp == "swiglu":
            linear(f"{b}.mlp.w_gate", cfg.d_ff, d)
        linear(f"{b}.mlp.w_up", cfg.d_ff, d)
        linear(f"{b}.mlp.w_down", d, cfg.d_ff)
    norm("norm")
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


class StateError(ValueError):
    """A state does not fit its model: lists every missing, unexpected and
    mis-shaped key at once."""


class NonFiniteError(ValueError):
    """A state to save holds NaN or infinite values (named by tensor and count)."""


def check_dtypes(state: Mapping[str, Any], *, what: str = "state") -> None:
    """Raise StateError naming every tensor whose dtype is not one of CHECKPOINT_DTYPES."""
    bad = [
        f"  {k}: dtype {np.asarray(v).dtype}"
        for k, v in state.items()
        if str(np.asarray(v).dtype) not in CHECKPOINT_DTYPES
    ]
    if bad:
        raise StateError(
            f"{what}: {len(bad)} tensor(s) of a dtype a gptmod checkpoint does not hold (allowed: "
            f"{', '.join(CHECKPOINT_DTYPES)}; nothing is cast):\n" + "\n".join(bad)
        )


def non_finite(state: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Tensor name -> number of NaN or infinite values, for the tensors that have any."""
    counts = {}
    for k, v in state.items():
        n = int(v.size - np.count_nonzero(np.isfinite(v)))
        if n:
            counts[k] = n
    return counts


def _describe_non_finite(counts: Mapping[str, int], state: Mapping[str, np.ndarray]) -> str:
    shown = ", ".join(f"{k} ({n:,} of {state[k].size:,})" for k, n in list(counts.items())[:8])
    more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
    return f"{len(counts)} tensor(s) hold NaN or infinite values: {shown}{more}"


def check_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], *, what: str = "state"
) -> None:
    """Raise StateError naming every problem of `state` against `expected` names and shapes.

    Generic on purpose: both twins call it with their own parameter shapes, and any array type with
    `.shape` and `.dtype` (numpy, torch, jax) counts as an array."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    for k, shape in expected.items():
        if k not in state:
            continue
        v = state[k]
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            problems.append(f"  {k}: not an array ({type(v).__name__})")
        elif tuple(v.shape) != tuple(shape):
            problems.append(f"  {k}: shape {tuple(v.shape)}, expected {tuple(shape)}")
    if not (missing or unexpected or problems):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f" {len(missing)} missing: " + ", ".join(missing))
    if unexpected:
        lines.append(f" {len(unexpected)} unexpected: " + ", ".join(map(str, unexpected)))
    if problems:
        lines.append(f" {len(problems)} mis-shaped or invalid:")
        lines += problems
    raise StateError("\n".join(lines))


# ----------------------------------------------------------------------------- safetensors I/O


def checkpoint_metadata(
    cfg: ModelConfig, metadata: Mapping[str, str] | None, **own: str
) -> dict[str, str]:
    """A checkpoint's metadata: the caller's (str to str; gptmod's keys are refused), then the
    format, the config and `own` (e.g. a quantization scheme), which gptmod writes itself."""
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"save: metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k in _RESERVED_METADATA or k in own:
            raise ValueError(f"save: metadata key {k!r} is reserved (gptmod writes it itself)")
    return meta | {"format": FORMAT, "gptmod_config": cfg.to_json(), **own}


def save(
    path: PathLike,
    state: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write canonical state as safetensors with the config in its metadata.

    Atomic: the file is written beside `path` under a temporary name, fsynced, then renamed over
    `path`, so a crash leaves either the old file or the new one, never half a file."""
    check_state(canonical_shapes(cfg), state, what=f"state to save to {path}")
    meta = checkpoint_metadata(cfg, metadata)
    arrays = {}
    for k, v in state.items():
        try:  # np.asarray also takes jax arrays; safetensors needs C order
            arrays[k] = np.ascontiguousarray(np.asarray(v))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"save: {k} is not convertible to a numpy array ({type(v).__name__}: {e})"
            ) from None
    check_dtypes(arrays, what=f"state to save to {path}")
    # A checkpoint of NaN weights is a broken run reported as a finished
    # one: refuse it, naming the tensors.
    if bad := non_finite(arrays):
        raise NonFiniteError(f"save: refusing to write {path}: {_describe_non_finite(bad, arrays)}")
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming the path if it is not one."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            # SIM118 is wrong here: safe_open has no __iter__.
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except (FileNotFoundError, PermissionError):
        raise  # an access problem, not a format problem: keep the OS's own error
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], ModelConfig]:
    """(tensors, metadata, config) of a gptmod safetensors checkpoint, float or quantized, before
    any check of its tensors; errors name the path. Never unpickles."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; expected a gptmod .safetensors checkpoint file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state, meta = _read_safetensors(path)
    if "gptmod_config" not in meta:
        raise ValueError(
            f"{path}: no 'gptmod_config' in its metadata, so it is not a gptmod checkpoint "
            "(Hugging Face GPT-2 files go through gptmod.hf_gpt2.from_hf_gpt2)"
        )
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(
            f"{path}: format {meta['format']!r} is not supported (this gptmod reads {FORMAT!r})"
        )
    try:  # not ModelConfig.from_json: it would take non-JSON text for a file name
        cfg = ModelConfig.from_dict(json.loads(meta["gptmod_config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid config in metadata: not JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid config in metadata: {e}") from None
    return state, meta, cfg


def load(path: PathLike) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read a checkpoint written by `save`: (canonical state in model order,
    its config). Never unpickles."""
    path = Path(path)
    state, meta, cfg = read_checkpoint(path)
    if META_QUANT in meta:  # int8 weights and scales: not a float state
        raise ValueError(
            f"{path}: an int8 checkpoint ({meta[META_QUANT]}); read it with gptmod.quant.load"
        )
    expected = canonical_shapes(cfg)
    check_state(expected, state, what=f"checkpoint {path}")
    check_dtypes(state, what=f"checkpoint {path}")
    # Loaded with a warning, not refused: a user may want to inspect a
    # broken checkpoint (`save` refuses them).
    if bad := non_finite(state):
        warnings.warn(
            f"checkpoint {path}: {_describe_non_finite(bad, state)}", RuntimeWarning, stacklevel=2
        )
    return {
        k: state[k] for k in expected
    }, cfg  # safetensors stores keys sorted; give them back in model order


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (gptmod's config, format,
    and anything `save` was given)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
