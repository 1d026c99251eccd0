"""GGUF (llama.cpp's file format) in and out, for Llama-architecture models.

`read` maps a llama GGUF file (any tensor type `gguf` can dequantize) to canonical fp32 state, its
ModelConfig and every metadata key; `write` does the reverse, as llama.cpp's convert_hf_to_gguf.py
would write it. Framework-free: numpy and the `gguf` package only.

Layout facts this module relies on (llama.cpp):
- GGUF lists a tensor's dimensions fastest-first (`ne`), the reverse of
  numpy's shape; `gguf` hands float tensors over numpy-shaped and quantized
  ones as raw bytes, whose dequantization is numpy-shaped.
- llama.cpp rotates adjacent pairs (GPT-J style) where HF Llama and gptmod rotate halves, so its
  converter permutes the rows of attn_q and attn_k within each head (`permute_rows`); `read` undoes
  that (`unpermute_rows`).
- `output.weight` absent means the head is tied to `token_embd.weight` (as llama.cpp and
  transformers read it). Present, it is an untied head (tie_embeddings=False), even when its values
  equal token_embd's: the file stores two tensors, and reading it back as one would not round-trip.
- Llama 3.1/3.2 rope scaling is not a metadata key but a tensor, `rope_freqs.weight`: one divisor
  per rotation frequency (llama.cpp rotates by base_freq / factor).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptmod import fileio
from gptmod.config import ModelConfig, RopeScaling
from gptmod.transfer import TransferReport, TransferRow
from gptmod.weights import canonical_shapes, check_state

# `gguf` is imported inside the functions that use it: it costs about 0.2 s and PyYAML, which a
# plain `import gptmod` should not pay.
PathLike = str | os.PathLike[str]
Progress = Callable[[Iterable[Any]], Iterable[Any]]

ARCH = "llama"
OUT_TYPES = ("f32", "f16", "q8_0")
ROPE_FREQS = "rope_freqs.weight"
# Llama 3.1/3.2's rope_scaling apart from its factor: the only one `read`
# can recover from rope_freqs, whose factors depend on original_max_seq_len
# / low_freq_factor and / high_freq_factor alone.
_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
_ROPE_FREQS_RTOL = (
    1e-6  # llama.cpp computes the factors in fp32: measured <= 4.4e-7 relative off the float64 ones
)
_F16_MAX = 65504.0


class GGUFError(ValueError):
    """A GGUF file, or a model to write as one, that gptmod cannot map
    exactly; the message names what and why."""


@dataclass
class GGUFModel:
    """What `read` returns: the model and everything the file said about it."""

    cfg: ModelConfig
    state: dict[str, np.ndarray]  # canonical names, float32, in model order
    fields: dict[str, Any]  # every metadata key, decoded to plain Python (tokenizer.* included)
    # one row per canonical tensor: its GGUF source, type and what was done to it
    report: TransferReport


# -------------------------------------------------------------------------- the q/k row permutation


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF/gptmod q or k rows (half-split rotation) -> llama.cpp's (adjacent pairs): within each
    head, row i of the first half and row i of the second become rows 2i and 2i+1. As
    convert_hf_to_gguf.py's `permute`, with n_head = n_kv_head for k."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rows`: llama.cpp's q or k rows back to the half-split order."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------- names


def _tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """Canonical name -> GGUF tensor name, in model order."""
    names = {"tok_emb.weight": "token_embd.weight"}
    per_block = {
        "attn_norm": "attn_norm",
        "attn.wq": "attn_q",
        "attn.wk": "attn_k",
        "attn.wv": "attn_v",
        "attn.wo": "attn_output",
        "mlp_norm": "ffn_norm",
        "mlp.w_gate": "ffn_gate",
        "mlp.w_up": "ffn_up",
        "mlp.w_down": "ffn_down",
    }
    for i in range(cfg.n_layer):
        for ours, theirs in per_block.items():
            names[f"blocks.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    names["norm.weight"] = "output_norm.weight"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    return names


def _qk_heads(cfg: ModelConfig, canonical: str) -> int | None:
    """How many heads the rows of this tensor are permuted over (None: not permuted)."""
    if canonical.endswith(".attn.wq.weight"):
        return cfg.n_head
    if canonical.endswith(".attn.wk.weight"):
        return cfg.n_kv_head
    return None


# ----------------------------------------------------------------------------- metadata -> config

# llama.* keys `read` understands; any other llama.* key might change the
# computation, so it is an error. rope.scaling.original_context_length is
# accepted because llama.cpp uses it for YaRN only, which is rejected.
_LLAMA_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "expert_count",
    "expert_used_count",
)


# The llama.* keys of _LLAMA_KEYS that are not integers (floats, and the scaling type's string).
_LLAMA_NOT_INT = (
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
)


def _int_key(fields: Mapping[str, Any], key: str, where: str, *, default: int | None = None) -> int:
    if key not in fields:
        if default is None:
            raise GGUFError(f"{where}: metadata key {key!r} is missing (llama.cpp requires it)")
        return default
    v = fields[key]
    if isinstance(v, bool) or not isinstance(v, int):
        what = (
            "per-layer values are not supported" if isinstance(v, list) else "expected an integer"
        )
        raise GGUFError(f"{where}: {key}={_short(v)}: {what}")
    return v


def _float_key(
    fields: Mapping[str, Any], key: str, where: str, *, default: float | None = None
) -> float:
    if key not in fields:
        if default is None:
            raise GGUFError(f"{where}: metadata key {key!r} is missing (llama.cpp requires it)")
        return default
    v = fields[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise GGUFError(f"{where}: {key}={_short(v)}: expected a number")
    return float(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _config(
    fields: Mapping[str, Any],
    vocab_rows: int,
    rope_freqs: np.ndarray | None,
    tied: bool,
    where: str,
) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig a llama GGUF's metadata (and its rope_freqs tensor) describes, plus report
    notes. Anything it cannot express exactly is a GGUFError."""
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{where}: general.architecture={arch!r}: only {ARCH!r} is supported")
    unknown = [
        k for k in fields if k.startswith("llama.") and k.removeprefix("llama.") not in _LLAMA_KEYS
    ]
    if unknown:
        raise GGUFError(
            f"{where}: metadata key(s) {unknown} are not understood by gptmod and may change what "
            f"the model computes; known llama.* keys: {list(_LLAMA_KEYS)}"
        )

    def key(k: str) -> str:
        return f"llama.{k}"

    d_model = _int_key(fields, key("embedding_length"), where)
    n_head = _int_key(fields, key("attention.head_count"), where)
    n_kv_head = _int_key(fields, key("attention.head_count_kv"), where, default=n_head)
    if n_head < 1 or d_model % n_head:
        raise GGUFError(
            f"{where}: llama.embedding_length={d_model} is not divisible by "
            f"llama.attention.head_count={n_head}"
        )
    head_dim = d_model // n_head
    for k in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(k) in fields and fields[key(k)] != head_dim:
            raise GGUFError(
                f"{where}: llama.{k}={_short(fields[key(k)])}, but "
                f"embedding_length/head_count = {d_model}/{n_head} = {head_dim}: a head_dim "
                "other than d_model/n_head is unsupported"
            )
    for k in ("expert_count", "expert_used_count"):
        if _int_key(fields, key(k), where, default=0) > 0:
            raise GGUFError(
                f"{where}: llama.{k}={fields[key(k)]}: mixture-of-experts models are not supported"
            )
    if _int_key(fields, key("attention.sliding_window"), where, default=0) != 0:
        raise GGUFError(
            f"{where}: llama.attention.sliding_window={fields[key('attention.sliding_window')]}: "
            "sliding-window attention is not supported"
        )
    # llama.cpp's default scaling type is "linear" with factor 1, which is no scaling at all.
    scaling = fields.get(key("rope.scaling.type"), "none")
    linear = _float_key(fields, key("rope.scaling.factor"), where, default=0.0) or _float_key(
        fields, key("rope.scale_linear"), where, default=0.0
    )
    if scaling not in ("none", "linear") or (scaling == "linear" and linear not in (0.0, 1.0)):
        raise GGUFError(
            f"{where}: llama.rope.scaling.type={scaling!r} (factor {linear or 1.0}) is not "
            "supported; gptmod maps only plain RoPE and Llama 3's rope_freqs.weight"
        )

    vocab_size = vocab_rows
    for k, n in (
        (key("vocab_size"), fields.get(key("vocab_size"))),
        ("tokenizer.ggml.tokens", len(fields.get("tokenizer.ggml.tokens", [])) or None),
    ):
        if n is not None and n != vocab_rows:
            raise GGUFError(
                f"{where}: {k} gives a vocabulary of {n}, but token_embd.weight has {vocab_rows} "
                "rows (llama.cpp requires them equal)"
            )
    try:
        cfg = ModelConfig(
            vocab_size=vocab_size,
            max_seq_len=_int_key(fields, key("context_length"), where),
            n_layer=_int_key(fields, key("block_count"), where),
            n_head=n_head,
            n_kv_head=n_kv_head,
            d_model=d_model,
            d_ff=_int_key(fields, key("feed_forward_length"), where),
            pos="rope",
            rope_theta=_float_key(fields, key("rope.freq_base"), where, default=10000.0),
            norm="rmsnorm",
            norm_eps=_float_key(fields, key("attention.layer_norm_rms_epsilon"), where),
            mlp="swiglu",
            bias=False,
            logit_softcap=None,
            tie_embeddings=tied,
        )
    except ValueError as e:
        raise GGUFError(f"{where}: the metadata gives an invalid config: {e}") from None
    notes = []
    if rope_freqs is not None:
        cfg = dataclasses.replace(cfg, rope_scaling=_rope_scaling(cfg, rope_freqs, where))
        notes.append(
            f"{ROPE_FREQS}: Llama 3 rope scaling factors, read as "
            f"cfg.rope_scaling={cfg.rope_scaling}"
        )
    return cfg, notes


def _rope_base_inv_freq(cfg: ModelConfig) -> np.ndarray:
    return 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)


def _rope_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs for cfg.rope_scaling: the divisor of each base
    frequency, in float64."""
    assert cfg.rope_scaling is not None
    inv_freq = _rope_base_inv_freq(cfg)
    return inv_freq / cfg.rope_scaling.scale(inv_freq)


def _rope_scaling(cfg: ModelConfig, factors: np.ndarray, where: str) -> RopeScaling:
    """The RopeScaling whose factors these are, when they are Llama 3.1/3.2's (see
    _LLAMA3_SCALING)."""
    factors = factors.astype(np.float64)
    if factors.shape != (cfg.head_dim // 2,):
        raise GGUFError(
            f"{where}: {ROPE_FREQS} has shape {factors.shape}, expected ({cfg.head_dim // 2},) "
            "(one factor per rotation frequency)"
        )
    top = float(np.max(factors)) if np.all(np.isfinite(factors)) else math.nan
    try:
        scaling = RopeScaling(kind="llama3", factor=_shortest_f32(top), **_LLAMA3_SCALING)
    except ValueError as e:
        raise GGUFError(
            f"{where}: {ROPE_FREQS} is not Llama 3 rope scaling (its largest factor: {e})"
        ) from None
    expected = _rope_factors(dataclasses.replace(cfg, rope_scaling=scaling))
    rel = np.abs(factors - expected) / expected
    if not np.all(rel <= _ROPE_FREQS_RTOL):
        i = int(np.argmax(rel))
        raise GGUFError(
            f"{where}: {ROPE_FREQS} does not match Llama 3 rope scaling {scaling} within "
            f"{_ROPE_FREQS_RTOL:g} relative (frequency {i}: {factors[i]:.9g} vs "
            f"{expected[i]:.9g}); other rope_freqs are not supported"
        )
    return scaling


def _shortest_f32(x: float) -> float:
    """The shortest decimal that rounds to this float32 (as numpy prints it): 1e-05, not
    9.999999747378752e-06."""
    return float(str(np.float32(x))) if math.isfinite(x) else x


# ----------------------------------------------------------------------------- read


def _decode(field: Any, key: str, where: str) -> Any:
    """A GGUF metadata value as plain Python; FLOAT32 values as their
    shortest decimal (see _shortest_f32)."""
    from gguf import GGUFValueType

    types = list(field.types)
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[1] == GGUFValueType.ARRAY:
        raise GGUFError(
            f"{where}: metadata key {key!r} is a nested array, which gptmod does not read"
        )
    value = field.contents()
    if types[-1] == GGUFValueType.FLOAT32:
        value = (
            [_shortest_f32(v) for v in value] if isinstance(value, list) else _shortest_f32(value)
        )
    return value


def read(path: PathLike, *, progress: Progress | None = None) -> GGUFModel:
    """Read a llama GGUF file: fp32 canonical state, its config, every metadata key, and a report.

    Every tensor type `gguf` can dequantize is read (F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, K-quants...); the values are those the file encodes,
    exactly. `progress` wraps the loop over tensors (e.g. tqdm)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    where = str(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{where}: not a valid GGUF file ({e})") from None
    # GGUF.* are the header's own counts, not metadata keys.
    fields = {
        k: _decode(f, k, where) for k, f in reader.fields.items() if not k.startswith("GGUF.")
    }
    # before anything else: the usual mistake, said plainly
    if fields.get("general.architecture") != ARCH:
        raise GGUFError(
            f"{where}: general.architecture={fields.get('general.architecture')!r}: "
            f"only {ARCH!r} is supported"
        )

    if fields.get("split.count", 1) != 1:
        raise GGUFError(
            f"{where}: this is shard {fields.get('split.no', 0) + 1} of {fields['split.count']} "
            "of a split GGUF; merge the shards first (llama.cpp's llama-gguf-split --merge)"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{where}: missing tensor token_embd.weight")
    emb = tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise GGUFError(
            f"{where}: token_embd.weight has shape {_numpy_shape(emb)}, expected (vocab, d_model)"
        )
    vocab_rows = _numpy_shape(emb)[0]
    rope_freqs = None
    if ROPE_FREQS in tensors:
        rope_freqs = _dequantize(tensors[ROPE_FREQS], dequantize, where)
    cfg, notes = _config(fields, vocab_rows, rope_freqs, "output.weight" not in tensors, where)

    names = _tensor_names(cfg)
    wanted = set(names.values()) | ({ROPE_FREQS} if rope_freqs is not None else set())
    missing = [n for n in names.values() if n not in tensors]
    unexpected = [n for n in tensors if n not in wanted]
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {', '.join(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {', '.join(unexpected)}"] if unexpected else []
        what = f"n_layer={cfg.n_layer}, tie_embeddings={cfg.tie_embeddings}"
        raise GGUFError(
            f"{where}: the tensors do not match a llama model of this config ({what}): "
            + "; ".join(parts)
        )
    shapes = canonical_shapes(cfg)
    bad = [
        f"{names[k]}: shape {_numpy_shape(tensors[names[k]])}, expected {shapes[k]}"
        for k in names
        if _numpy_shape(tensors[names[k]]) != shapes[k]
    ]
    if bad:
        raise GGUFError(f"{where}: tensor(s) with the wrong shape: " + "; ".join(bad))

    report = TransferReport(notes=notes)
    if rope_freqs is not None:
        report.dropped.append(
            (ROPE_FREQS, "Llama 3 rope scaling factors: read into cfg.rope_scaling")
        )
    state: dict[str, np.ndarray] = {}
    items: Iterable[tuple[str, str]] = list(names.items())
    for canonical, gname in progress(items) if progress else items:
        t = tensors[gname]
        w = _dequantize(t, dequantize, where)
        kind = GGMLQuantizationType(t.tensor_type).name
        how = [f"{kind}: " + ("read as is" if kind == "F32" else f"dequantized {kind} -> fp32")]
        if (n := _qk_heads(cfg, canonical)) is not None:
            w = unpermute_rows(w, n)
            how.append(f"llama.cpp's q/k row permutation undone ({n} heads)")
        state[canonical] = np.ascontiguousarray(w, dtype=np.float32)
        report.rows.append(TransferRow(canonical, "copied", gname, "; ".join(how), int(w.size)))
    if cfg.tie_embeddings:
        report.notes.append(
            "no output.weight: the head is tied to token_embd.weight (tie_embeddings=True)"
        )
    elif np.array_equal(state["lm_head.weight"], state["tok_emb.weight"]):
        report.notes.append(
            "output.weight equals token_embd.weight; kept untied, as the file stores both"
        )
    check_state(shapes, state, what=f"GGUF {where}")
    return GGUFModel(cfg=cfg, state=state, fields=fields, report=report)


def _numpy_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def _dequantize(
    t: Any, dequantize: Callable[[np.ndarray, Any], np.ndarray], where: str
) -> np.ndarray:
    """fp32 values of a reader tensor, owning its memory (never a view of
    the memory-mapped file)."""
    from gguf import GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(t.tensor_type).name
    except ValueError:
        kind = f"type id {int(t.tensor_type)}"
    try:
        w = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise GGUFError(
            f"{where}: tensor {t.name} has type {kind}, which gguf cannot dequantize ({e})"
        ) from None
    if w.dtype != np.float32:  # defensive: a future gguf might pass integer types through
        raise GGUFError(
            f"{where}: tensor {t.name} has type {kind}, which is not a weight type gptmod reads"
        )
    return np.array(w.reshape(_numpy_shape(t)), dtype=np.float32, order="C")


# ----------------------------------------------------------------------------- write

# GGUF value types llama.cpp reads for known keys whose Python value leaves
# the type open (ints, float lists).
_KNOWN_TYPES: dict[str, tuple[str, str | None]] = {
    "general.quantization_version": ("UINT32", None),
    "general.alignment": ("UINT32", None),
    "general.file_type": ("UINT32", None),
    "general.base_model.count": ("UINT32", None),
    "general.dataset.count": ("UINT32", None),
    # llama.cpp reads every integer hyperparameter as UINT32 and refuses a file that stores one
    # as INT32 ("key llama.context_length has wrong type i32 but expected type u32")
    **{f"{ARCH}.{k}": ("UINT32", None) for k in _LLAMA_KEYS if k not in _LLAMA_NOT_INT},
    "tokenizer.ggml.token_type": ("ARRAY", "INT32"),
    "tokenizer.ggml.token_type_count": ("UINT32", None),
    "tokenizer.ggml.scores": ("ARRAY", "FLOAT32"),
    "tokenizer.ggml.precompiled_charsmap": ("ARRAY", "UINT8"),
}
# bos, eos, eot, unknown, padding, ...: UINT32
_TOKEN_ID_KEY = re.compile(r"tokenizer\.ggml\.\w+_token_id")
_INT_RANGES = {
    "UINT8": (0, 2**8),
    "INT32": (-(2**31), 2**31),
    "UINT32": (0, 2**32),
    "INT64": (-(2**63), 2**63),
    "UINT64": (0, 2**64),
}
# llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
# Keys describing how write() encodes the tensors: always its own, whatever `fields` says.
_ENCODING_KEYS = ("general.file_type", "general.quantization_version", "general.alignment")


def _scalar_type(key: str, v: Any) -> str:
    """The GGUF type for one plain-Python metadata value of a key without a fixed type."""
    if isinstance(v, bool):
        return "BOOL"
    if isinstance(v, str):
        return "STRING"
    if isinstance(v, int):
        # gguf-py's own choice for ints, widened only when needed
        for t in ("INT32", "INT64", "UINT64"):
            lo, hi = _INT_RANGES[t]
            if lo <= v < hi:
                return t
        raise GGUFError(f"write: fields[{key!r}]={v}: does not fit a 64-bit integer")
    if isinstance(v, float):
        # FLOAT32 when `read` gives the very same value back (its
        # shortest-decimal rule), else FLOAT64.
        return "FLOAT32" if _shortest_f32(v) == v else "FLOAT64"
    raise GGUFError(
        f"write: fields[{key!r}] holds a {type(v).__name__} ({_short(v)}); metadata values must be "
        "plain Python str, bool, int, float or a list of one of them"
    )


def _typed(key: str, value: Any) -> tuple[Any, str, str | None]:
    """(value, GGUF type, element type) for one metadata value, checked
    against the type llama.cpp reads."""
    vtype, sub = _KNOWN_TYPES.get(
        key, ("UINT32", None) if _TOKEN_ID_KEY.fullmatch(key) else (None, None)
    )
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        if vtype not in (None, "ARRAY"):
            raise GGUFError(
                f"write: fields[{key!r}] is a list, but llama.cpp reads a single {vtype}"
            )
        if not value:
            raise GGUFError(f"write: fields[{key!r}] is an empty list, which GGUF cannot store")
        kinds = {_scalar_type(key, v) for v in value} if sub is None else {sub}
        if sub is None and kinds <= {"INT32", "INT64", "UINT64"}:
            kinds = {max(kinds, key=("INT32", "INT64", "UINT64").index)}
        elif sub is None and kinds <= {"FLOAT32", "FLOAT64"}:
            kinds = {"FLOAT64" if "FLOAT64" in kinds else "FLOAT32"}
        if len(kinds) != 1:
            raise GGUFError(
                f"write: fields[{key!r}] mixes element types {sorted(kinds)}; a GGUF array has one"
            )
        sub = kinds.pop()
        for v in value:
            _check_value(key, v, sub)
        return value, "ARRAY", sub
    if vtype == "ARRAY":
        raise GGUFError(f"write: fields[{key!r}]={_short(value)}: llama.cpp reads a list of {sub}")
    vtype = vtype or _scalar_type(key, value)
    _check_value(key, value, vtype)
    return value, vtype, None


def _check_value(key: str, v: Any, vtype: str) -> None:
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
            raise GGUFError(
                f"write: fields[{key!r}]: {_short(v)} is not a {vtype} (an int in [{lo}, {hi}))"
            )
    elif vtype in ("FLOAT32", "FLOAT64"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFError(f"write: fields[{key!r}]: {_short(v)} is not a number")
    elif vtype == "STRING" and not isinstance(v, str):
        raise GGUFError(f"write: fields[{key!r}]: {_short(v)} is not a str")
    elif vtype == "BOOL" and not isinstance(v, bool):
        raise GGUFError(f"write: fields[{key!r}]: {_short(v)} is not a bool")


def _check_expressible(cfg: ModelConfig) -> None:
    """Llama has one column of the seed's table; name every switch of cfg outside it."""
    off = [
        f"{name}={value!r}"
        for name, value, ok in (
            ("pos", cfg.pos, "rope"),
            ("norm", cfg.norm, "rmsnorm"),
            ("mlp", cfg.mlp, "swiglu"),
            ("bias", cfg.bias, False),
            ("logit_softcap", cfg.logit_softcap, None),
        )
        if value != ok
    ]
    if off:
        raise GGUFError(
            "write: a llama GGUF cannot express this config: " + ", ".join(off) + " (llama needs "
            "pos='rope', norm='rmsnorm', mlp='swiglu', bias=False, logit_softcap=None)"
        )
    rs = cfg.rope_scaling
    if rs is not None and any(getattr(rs, k) != v for k, v in _LLAMA3_SCALING.items()):
        given = ", ".join(f"{k}={getattr(rs, k)}" for k in _LLAMA3_SCALING)
        raise GGUFError(
            f"write: cfg.rope_scaling has {given}; rope_freqs.weight records only the factors, "
            "from which read() recovers Llama 3.1/3.2's own parameters ("
            + ", ".join(f"{k}={v}" for k, v in _LLAMA3_SCALING.items())
            + ") and no others"
        )
    for name in ("rope_theta", "norm_eps"):
        v = getattr(cfg, name)
        if _shortest_f32(v) != v:  # GGUF stores both as FLOAT32
            raise GGUFError(
                f"write: cfg.{name}={v!r} is not exact in GGUF's FLOAT32 (it would read "
                f"back as {_shortest_f32(v)!r})"
            )


def _metadata(
    cfg: ModelConfig, out_type: str, fields: Mapping[str, Any], name: str | None
) -> dict[str, Any]:
    """Every metadata key to write: the ones cfg and out_type pin down, then the caller's."""
    from gguf import GGML_QUANT_VERSION

    derived: dict[str, Any] = {
        "general.architecture": ARCH,
        "general.name": name if name is not None else fields.get("general.name", "gptmod"),
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.d_model,
        "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": cfg.d_ff,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.n_kv_head,
        "llama.rope.freq_base": float(cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "general.file_type": _FILE_TYPES[out_type],
        "general.quantization_version": GGML_QUANT_VERSION,
    }
    clash = [
        f"{k}={_short(v)} (cfg gives {_short(derived[k])})"
        for k, v in fields.items()
        if k in derived and k not in _ENCODING_KEYS and v != derived[k]
    ]
    if clash:
        raise GGUFError("write: fields contradict the config or name: " + "; ".join(clash))
    split = [k for k in fields if k.startswith("split.")]
    if split:
        raise GGUFError(f"write: fields {split} describe a split GGUF; write() writes one file")
    # general.alignment is left out: gguf's writer uses the default alignment, which needs no key.
    return {
        **derived,
        **{k: v for k, v in fields.items() if k not in derived and k not in _ENCODING_KEYS},
    }


def write(
    path: PathLike,
    state: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    out_type: str = "f32",
    fields: Mapping[str, Any] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Write canonical state as a llama GGUF file that llama.cpp (and
    `read`) loads as the same model.

    out_type: "f32", "f16" or "q8_0" for the 2-D weights; norms (and rope_freqs) stay F32, as
    llama.cpp keeps them. `fields`: extra metadata in plain Python (e.g. the tokenizer.ggml.* keys
    and tokenizer.chat_template, or a `read` result's fields), typed as llama.cpp reads each known
    key; llama.* keys must agree with cfg. general.file_type, general.quantization_version and
    general.alignment always describe this file's encoding, whatever `fields` says. `name`:
    general.name (default: fields' general.name, else "gptmod"). `progress`
    wraps the loop over tensors.
    Atomic: written beside `path` under a temporary name, fsynced, then renamed over it."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    if out_type not in OUT_TYPES:
        raise GGUFError(
            f"write: out_type={out_type!r}: must be one of {', '.join(map(repr, OUT_TYPES))}"
        )
    _check_expressible(cfg)
    check_state(canonical_shapes(cfg), state, what=f"state to write to {path}")
    meta = _metadata(cfg, out_type, dict(fields or {}), name)
    typed = {k: _typed(k, v) for k, v in meta.items()}
    # Read the metadata back as read() will: any llama.* or tokenizer key
    # that changes the config is caught here.
    factors = _rope_factors(cfg).astype(np.float32) if cfg.rope_scaling is not None else None
    back, _ = _config(meta, cfg.vocab_size, factors, cfg.tie_embeddings, "write: the metadata")
    # a training setting GGUF has no key for
    back = dataclasses.replace(back, init_std=cfg.init_std)
    if back != cfg:
        diff = [
            f"{f.name}: {getattr(back, f.name)!r} vs cfg's {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(cfg)
            if getattr(back, f.name) != getattr(cfg, f.name)
        ]
        raise GGUFError("write: the file would read back as a different config: " + "; ".join(diff))

    qtype = {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "q8_0": GGMLQuantizationType.Q8_0,
    }
    names = _tensor_names(cfg)
    tensors: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []
    if factors is not None:
        tensors.append((ROPE_FREQS, factors, GGMLQuantizationType.F32))
    items: Iterable[tuple[str, str]] = list(names.items())
    for canonical, gname in progress(items) if progress else items:
        w = np.ascontiguousarray(np.asarray(state[canonical]), dtype=np.float32)
        if (n := _qk_heads(cfg, canonical)) is not None:
            w = np.ascontiguousarray(permute_rows(w, n))
        kind = qtype[out_type] if w.ndim == 2 else GGMLQuantizationType.F32
        tensors.append((gname, _encode(gname, w, kind, quantize), kind))

    def write_gguf(tmp: Path) -> None:
        writer = GGUFWriter(tmp, ARCH)  # adds general.architecture itself
        try:
            for k, (v, vtype, sub) in typed.items():
                if k != "general.architecture":
                    writer.add_key_value(
                        k, v, GGUFValueType[vtype], None if sub is None else GGUFValueType[sub]
                    )
            for gname, data, kind in tensors:
                writer.add_tensor(gname, data, raw_dtype=kind if data.dtype == np.uint8 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    fileio.atomic_write(path, write_gguf)


def _encode(
    gname: str, w: np.ndarray, kind: Any, quantize: Callable[[np.ndarray, Any], np.ndarray]
) -> np.ndarray:
    """The tensor's bytes (or float array) for GGUF type `kind`; an error
    where the type cannot hold it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if kind == GGMLQuantizationType.F32:
        return w
    peak = float(np.max(np.abs(w))) if w.size else 0.0
    if kind == GGMLQuantizationType.F16 and not peak <= _F16_MAX:
        raise GGUFError(
            f"write: {gname} has max |w| = {peak:g}, beyond float16's "
            f"{_F16_MAX:g}; use out_type='f32'"
        )
    block = GGML_QUANT_SIZES[kind][0]
    if w.shape[-1] % block:
        raise GGUFError(
            f"write: {gname} has rows of {w.shape[-1]} values, not a multiple of {kind.name}'s "
            f"block of {block}; use out_type='f16' or 'f32'"
        )
    # its per-block scale is a float16
    if kind == GGMLQuantizationType.Q8_0 and not peak / 127 <= _F16_MAX:
        raise GGUFError(
            f"write: {gname} has max |w| = {peak:g}, too large for Q8_0's float16 block scales"
        )
    return quantize(w, kind)
