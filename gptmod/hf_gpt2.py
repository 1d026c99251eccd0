"""Hugging Face GPT-2 (`GPT2LMHeadModel`) in and out: the exact import into
classic configs, the partial transfer into modern ones (`gptmod.transfer`),
and the export of classic configs back to GPT-2's layout.

Framework-free when loaded: torch and transformers are imported only inside
the functions that need them.
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

from gptmod import hf, transfer
from gptmod.config import ModelConfig
from gptmod.transfer import TransferReport, TransferRow
from gptmod.weights import StateError, canonical_shapes, check_state

# Old GPT-2 checkpoints carry the causal mask as buffers named like parameters. Only these exact
# names are buffers; h.{i}.attn.c_attn.bias and friends are real weights.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


@dataclass
class _Source:
    """GPT-2 tensors in the hub layout (no `transformer.` prefix), as torch tensors or numpy arrays,
    plus the Hugging Face config when the source has one (a model, or a folder with config.json)."""

    tensors: dict[str, Any]
    hf_config: dict[str, Any] | None


def _read_source(source: Any) -> _Source:
    """Any accepted source -> _Source in the hub layout, without converting values yet."""
    hf_config = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            raw = hf.read_file(path)
        elif path.is_dir() or hf.is_repo_id(source):
            folder = hf.read_folder(hf.resolve(source))
            raw, hf_config = folder.tensors, folder.config
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
    elif hasattr(source, "state_dict"):  # a transformers GPT2LMHeadModel / GPT2Model
        raw = source.state_dict()
        config = getattr(source, "config", None)
        hf_config = config.to_dict() if hasattr(config, "to_dict") else None
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise TypeError(
            f"from_hf_gpt2: cannot read a {type(source).__name__}; pass a model, a "
            "state dict, a path or a hub id"
        )
    tensors = {}
    for name, value in raw.items():
        tensors[str(name).removeprefix("transformer.")] = value
    return _Source(tensors, hf_config)


_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype(value: Any) -> str:
    """A torch or numpy tensor's dtype name, without torch's prefix."""
    return str(value.dtype).removeprefix("torch.")


def _to_numpy(value: Any) -> np.ndarray:
    """A view where possible (the one copy is made when the target is written)."""
    # torch: numpy has no bf16, so upcast non-fp32 floats on the torch side
    if hasattr(value, "detach"):
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype.itemsize != 4:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- GPT-2 -> canonical


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


def _source_dims(tensors: Mapping[str, Any], hf_config: Mapping[str, Any] | None) -> dict[str, int]:
    """The config fields a GPT-2 source pins down: from its shapes, and
    n_head from its HF config."""
    dims: dict[str, int] = {}
    if "wte.weight" in tensors and len(_shape(tensors["wte.weight"])) == 2:
        dims["vocab_size"], dims["d_model"] = _shape(tensors["wte.weight"])
    if "wpe.weight" in tensors and len(_shape(tensors["wpe.weight"])) == 2:
        dims["max_seq_len"] = _shape(tensors["wpe.weight"])[0]
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))}
    if layers:
        dims["n_layer"] = max(layers) + 1
    if "h.0.mlp.c_fc.weight" in tensors and len(_shape(tensors["h.0.mlp.c_fc.weight"])) == 2:
        dims["d_ff"] = _shape(tensors["h.0.mlp.c_fc.weight"])[1]
    if hf_config and isinstance(hf_config.get("n_head"), int):
        dims["n_head"] = hf_config["n_head"]
    return dims


# Config field -> (the HF tensor that shows it, the canonical tensor it sizes).
_DIM_KEYS = {
    "vocab_size": ("wte.weight", "tok_emb.weight"),
    "d_model": ("wte.weight", "tok_emb.weight"),
    "max_seq_len": ("wpe.weight", "pos_emb.weight"),
    "n_layer": ("h.{i}.*", ""),
    "d_ff": ("h.0.mlp.c_fc.weight", "blocks.0.mlp.w_up.weight"),
    "n_head": ("its config's n_head", ""),
}


def _check_dims(cfg: ModelConfig, dims: dict[str, int], tensors: Mapping[str, Any]) -> None:
    """One error for every config field the source contradicts, with the
    preset (or recipe) that fits.

    A partial transfer resizes d_ff (hidden units kept or added) and, with
    RoPE, has no max_seq_len to match."""
    free = set() if cfg.is_classic else {"d_ff"} | ({"max_seq_len"} if cfg.pos == "rope" else set())
    wrong = {k: v for k, v in dims.items() if k not in free and getattr(cfg, k) != v}
    if not wrong:
        return
    expected = canonical_shapes(cfg)
    lines = [
        "from_hf_gpt2: the GPT-2 source does not fit the config (it is never truncated or padded):"
    ]
    for k, v in wrong.items():
        theirs, ours = _DIM_KEYS[k]
        where = f"from {theirs}"
        if ours:
            where = f"{theirs} has shape {_shape(tensors[theirs])}, {ours} expects {expected[ours]}"
        lines.append(f"  {k}: cfg has {getattr(cfg, k)}, the source has {v} ({where})")
    from gptmod.config import list_presets, load_preset

    presets = {p: load_preset(p) for p in list_presets()}
    fits = [
        p
        for p, c in presets.items()
        if c.is_classic and all(getattr(c, k) == v for k, v in dims.items())
    ]
    if not cfg.is_classic:
        args = ", ".join(f"{k}={v}" for k, v in wrong.items())
        lines.append(
            "hint: keep the modern switches and take the source's sizes: "
            f"dataclasses.replace(cfg, {args})"
        )
    elif fits:
        lines.append(f"hint: the source matches preset {fits[0]!r}: use load_preset({fits[0]!r})")
    else:
        args = ", ".join(f"{k}={v}" for k, v in dims.items())
        extra = (
            "" if "n_head" in dims else " (and the source's n_head, which its shapes do not show)"
        )
        lines.append(
            f"hint: no preset matches; use dataclasses.replace(load_preset('gpt2'), {args}){extra}"
        )
    raise StateError("\n".join(lines))


# HF GPT-2 switches whose non-default values compute something our classic model does not.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _check_hf_config(cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf['model_type']!r} (expected 'gpt2')")
    eps = hf.get("layer_norm_epsilon")
    if isinstance(eps, (int, float)) and not math.isclose(eps, cfg.norm_eps, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon={eps} but cfg.norm_eps={cfg.norm_eps}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        problems.append(
            f"activation_function={act!r} (gptmod's GPT-2 MLP is the tanh GELU, {_TANH_GELUS[0]!r})"
        )
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if key in hf and hf[key] != want:
            problems.append(f"{key}={hf[key]!r} (only {want} is supported)")
    if problems:
        raise ValueError(
            "from_hf_gpt2: the source's Hugging Face config computes a different model: "
            + "; ".join(problems)
        )


def from_hf_gpt2(
    source: Any,
    cfg: ModelConfig,
    *,
    seed: int = 0,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> tuple[dict[str, np.ndarray], TransferReport]:
    """Map Hugging Face GPT-2 weights into canonical state for `cfg`, with a
    report of what was done.

    `source`: a transformers GPT2LMHeadModel / GPT2Model; a state dict of torch tensors or numpy
    arrays, with or without the `transformer.` prefix; a local folder (model.safetensors, sharded
    safetensors or pytorch_model.bin, the latter read with weights_only=True); a .safetensors file;
    or a hub repo id such as "gpt2" or "openai-community/gpt2-medium". Classic configs import
    exactly: every tensor is copied. Modern and mixed configs get a partial transfer
    (`gptmod.transfer`): the report lists each target tensor as copied, transformed or new, and each
    source tensor left unused. `seed` draws the few tensors that are random (hidden units beyond
    GPT-2's d_ff); `progress` wraps the loop over target tensor names (e.g. a tqdm). The output is
    float32, C-contiguous and owns its memory (it never aliases the source)."""
    src = _read_source(source)
    tensors = src.tensors
    dims = _source_dims(tensors, src.hf_config)
    _check_dims(cfg, dims, tensors)
    if src.hf_config is not None:
        _check_hf_config(cfg, src.hf_config)
    source_cfg = transfer.source_config(
        cfg, dims.get("d_ff", cfg.d_ff), dims.get("max_seq_len", cfg.max_seq_len)
    )
    plan = transfer.plan(cfg, source_cfg, seed=seed)
    shapes = transfer.gpt2_shapes(source_cfg)

    needed = dict.fromkeys(n for s in plan.steps for n in s.sources)
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(
            f"from_hf_gpt2: the source lacks {len(missing)} GPT-2 tensor(s): {', '.join(missing)}"
        )
    bad = [
        f"  {s.target} (from {n}): source shape {_shape(tensors[n])}, expected {shapes[n]}"
        for s in plan.steps
        for n in s.sources
        if _shape(tensors[n]) != shapes[n]
    ]
    if bad:
        raise StateError(
            "from_hf_gpt2: source tensors with the wrong shape:\n" + "\n".join(dict.fromkeys(bad))
        )
    # Weights are floats; an integer or bool tensor (quantized, or not
    # weights at all) is never cast silently.
    not_float = [
        f"  {n}: dtype {_dtype(tensors[n])}"
        for n in needed
        if _dtype(tensors[n]) not in _FLOAT_DTYPES
    ]
    if not_float:
        raise StateError(
            f"from_hf_gpt2: {len(not_float)} source tensor(s) are not floats (allowed: "
            f"{', '.join(_FLOAT_DTYPES)}; nothing is cast):\n" + "\n".join(not_float)
        )

    report = TransferReport(notes=list(plan.notes))
    if any(_dtype(tensors[n]) == "float64" for n in needed):
        report.notes.append(
            "float64 source tensors rounded to float32 (canonical state is float32)"
        )
    leftover = [k for k in tensors if k not in needed]
    unexpected = [
        k
        for k in leftover
        if k not in plan.dropped and not _MASK_BUFFER.fullmatch(k) and k != "lm_head.weight"
    ]
    if unexpected:
        raise ValueError(
            f"from_hf_gpt2: unexpected source tensor(s), not part of GPT-2: {', '.join(unexpected)}"
        )
    values = {k: _to_numpy(tensors[k]) for k in needed}
    for k in leftover:
        if k == "lm_head.weight":
            lm_head = _to_numpy(tensors[k])
            # GPT-2 ties the head to wte; dropping a head that differs would
            # silently change the model.
            if lm_head.shape != values["wte.weight"].shape or not np.array_equal(
                lm_head, values["wte.weight"]
            ):
                raise ValueError(
                    "from_hf_gpt2: lm_head.weight differs from wte.weight, but GPT-2 ties them "
                    "(tie_embeddings=True); refusing to drop an untied head silently"
                )
            report.dropped.append((k, "tied to wte.weight (tok_emb.weight)"))
        elif k in plan.dropped:
            report.dropped.append((k, plan.dropped[k]))
        else:
            report.dropped.append((k, "causal-mask buffer of old checkpoints, not a weight"))

    # GPT-2's own order, not the file's (often alphabetical)
    order = {k: i for i, k in enumerate(shapes)}
    report.dropped.sort(key=lambda d: (order.get(d[0], len(order)), d[0]))
    # Computed in float32 (bf16/fp16 sources are upcast first); np.array
    # copies, so the state owns its memory.
    values = {k: v.astype(np.float32, copy=False) for k, v in values.items()}
    made = {s.target: s for s in plan.steps}
    state: dict[str, np.ndarray] = {}
    # model order, whatever order the plan made them in
    names: Iterable[str] = list(canonical_shapes(cfg))
    for name in progress(names) if progress else names:
        s = made[name]
        state[name] = np.array(s.get(values), dtype=np.float32, order="C")
        report.rows.append(
            TransferRow(s.target, s.action, ", ".join(s.sources), s.how, state[name].size)
        )
    check_state(canonical_shapes(cfg), state, what="GPT-2 weights")
    return state, report


def read_hf_gpt2(source: Any) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read a GPT-2 source once (any `from_hf_gpt2` source but a bare state dict): its tensors in
    hub layout as float32 numpy arrays, and the classic config it implies. Passing the tensors to
    `from_hf_gpt2` for several configs then reads the source only once."""
    src = _read_source(source)
    dims = _source_dims(src.tensors, src.hf_config)
    if "n_head" not in dims:
        raise ValueError(
            "read_hf_gpt2: the source has no Hugging Face config (config.json), so its n_head is "
            "unknown; pass a model or a folder with config.json"
        )
    hf = src.hf_config or {}
    cfg = dataclasses.replace(
        ModelConfig(),
        **dims,
        n_kv_head=dims["n_head"],
        norm_eps=float(hf.get("layer_norm_epsilon", ModelConfig().norm_eps)),
    )
    _check_hf_config(cfg, hf)
    tensors = {
        k: _to_numpy(v).astype(np.float32)
        for k, v in src.tensors.items()
        if not _MASK_BUFFER.fullmatch(k)
    }
    return tensors, cfg


# ----------------------------------------------------------------------------- canonical -> GPT-2


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the `GPT2LMHeadModel` that computes a classic config;
    a named error for any other config."""
    if not cfg.is_classic:
        raise ValueError(
            "export to GPT-2: only classic configs (learned positions, LayerNorm, "
            "GELU, biases, MHA, tied, no soft-cap) are GPT-2; this config is not "
            "(modern configs export as Llama)"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "dtype": "float32",
    }


def to_hf_gpt2(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical state of a classic config in GPT-2's hub layout (Conv1D weights are (in, out); q,
    k, v fused); the exact inverse of the classic import."""
    config_to_hf(cfg)  # classic only
    check_state(canonical_shapes(cfg), state, what="state to export")
    s = {k: np.asarray(v) for k, v in state.items()}
    out = {
        "transformer.wte.weight": s["tok_emb.weight"],
        "transformer.wpe.weight": s["pos_emb.weight"],
    }
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}", f"transformer.h.{i}"
        qkv = [s[f"{b}.attn.{n}.weight"] for n in ("wq", "wk", "wv")]
        out |= {
            f"{h}.ln_1.weight": s[f"{b}.attn_norm.weight"],
            f"{h}.ln_1.bias": s[f"{b}.attn_norm.bias"],
            f"{h}.attn.c_attn.weight": np.concatenate(qkv, axis=0).T,
            f"{h}.attn.c_attn.bias": np.concatenate(
                [s[f"{b}.attn.{n}.bias"] for n in ("wq", "wk", "wv")]
            ),
            f"{h}.attn.c_proj.weight": s[f"{b}.attn.wo.weight"].T,
            f"{h}.attn.c_proj.bias": s[f"{b}.attn.wo.bias"],
            f"{h}.ln_2.weight": s[f"{b}.mlp_norm.weight"],
            f"{h}.ln_2.bias": s[f"{b}.mlp_norm.bias"],
            f"{h}.mlp.c_fc.weight": s[f"{b}.mlp.w_up.weight"].T,
            f"{h}.mlp.c_fc.bias": s[f"{b}.mlp.w_up.bias"],
            f"{h}.mlp.c_proj.weight": s[f"{b}.mlp.w_down.weight"].T,
            f"{h}.mlp.c_proj.bias": s[f"{b}.mlp.w_down.bias"],
        }
    out |= {"transformer.ln_f.weight": s["norm.weight"], "transformer.ln_f.bias": s["norm.bias"]}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read(source: Any) -> tuple[ModelConfig, dict[str, np.ndarray], TransferReport]:
    """A GPT-2 folder or hub id with its config.json: (its classic config,
    the exact import, the report)."""
    tensors, cfg = read_hf_gpt2(source)
    state, report = from_hf_gpt2(tensors, cfg)
    return cfg, state, report
