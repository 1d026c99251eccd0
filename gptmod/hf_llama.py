"""Hugging Face Llama (`LlamaForCausalLM`, and `MistralForCausalLM` without
a sliding window) in and out.

A Llama is gptmod's modern column exactly: RoPE (half-split, as HF stores q/k),
RMSNorm, SwiGLU, GQA, no soft-cap; Llama 3.1/3.2 rope scaling maps to
`RopeScaling`. Every tensor is copied by name, none transformed. Framework-free
when loaded: torch is touched only through the tensors a caller passes in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from gptmod import hf
from gptmod.config import ModelConfig, RopeScaling
from gptmod.transfer import TransferReport, TransferRow
from gptmod.weights import StateError, canonical_shapes, check_state

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")  # Mistral only without a sliding window
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

Progress = Callable[[Iterable[str]], Iterable[str]]


class HFConfigError(ValueError):
    """A Hugging Face config computes something gptmod's Llama cannot (or a
    config Llama cannot express)."""


# What each known non-Llama architecture computes that a Llama cannot express.
_NOT_LLAMA = {
    "gpt2": "learned positions, LayerNorm and a GELU MLP (read it with gptmod.hf_gpt2 instead)",
    "qwen2": "biases on q_proj/k_proj/v_proj only (Llama's attention_bias also puts one on "
    "o_proj) and optional sliding-window layers",
    "qwen3": "per-head RMSNorm on queries and keys (q_norm, k_norm)",
    "qwen2_moe": "a mixture of experts with a shared expert, and q/k/v biases",
    "qwen3_moe": "a mixture of experts and per-head q/k RMSNorm",
    "gemma": "(1 + w) RMSNorm weights, the embedding scaled by "
    "sqrt(hidden_size) and a GELU-tanh gate",
    "gemma2": "(1 + w) RMSNorm weights, the embedding scale, attention and final logit soft-caps, "
    "post-attention/post-MLP norms and alternating sliding-window layers",
    "gemma3": "(1 + w) RMSNorm weights, the embedding scale, q/k norms, post-attention/post-MLP "
    "norms, sliding-window layers with their own RoPE theta (and soft-caps)",
    "gemma3_text": "(1 + w) RMSNorm weights, the embedding scale, q/k norms, "
    "post-attention/post-MLP norms, sliding-window layers with their own "
    "RoPE theta (and soft-caps)",
    "mixtral": "a mixture of experts (num_local_experts) and sliding-window attention",
    "phi": "LayerNorm, partial rotary embeddings, attention and MLP in "
    "parallel, a GELU MLP and biases",
    "phi3": "fused qkv_proj and gate_up_proj, partial rotary / longrope scaling "
    "and sliding-window attention",
    "gpt_neox": "attention and MLP in parallel, partial rotary embeddings, "
    "LayerNorm and a fused qkv",
    "falcon": "attention and MLP in parallel, LayerNorm and multi-query fused qkv",
    "stablelm": "LayerNorm and partial rotary embeddings",
    "starcoder2": "LayerNorm, a GELU MLP, biases and sliding-window attention",
    "olmo2": "q/k RMSNorm and norms after (not before) attention and the MLP",
    "cohere": "LayerNorm, attention and MLP in parallel, a logit scale and "
    "interleaved rotary embeddings",
    "granite": "embedding, residual, attention and logit multipliers",
    "deepseek_v2": "multi-head latent attention and a mixture of experts",
    "deepseek_v3": "multi-head latent attention and a mixture of experts",
}
# Keys that switch a mixture of experts on, under the names different families use.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

# HF's defaults for keys a config.json may leave out (LlamaConfig /
# MistralConfig of transformers 5).
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
_COMMON_DEFAULTS = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
}
_DEFAULT_THETA = 10000.0
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# ModelConfig field -> the config.json key it comes from (to name HF's key
# when ModelConfig rejects a value).
_FIELD_FROM = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "init_std": "initializer_range",
    "rope_scaling": "rope_parameters",
}


# ----------------------------------------------------------------------------- configs


def _model_type(hf_config: Mapping[str, Any]) -> str:
    """model_type, checked against architectures; a named error for anything
    but a Llama causal LM."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        raise HFConfigError(f"config.json: architectures={archs!r}: expected a list of class names")
    if model_type is None:
        known = [a for a in archs if a in SUPPORTED]
        if not known:
            raise HFConfigError(
                f"config.json has no model_type and architectures={archs!r}: gptmod.hf_llama reads "
                f"{', '.join(SUPPORTED)}"
            )
        model_type = {v: k for k, v in _MODEL_TYPES.items()}[known[0]]
    if model_type not in _MODEL_TYPES:
        what = _NOT_LLAMA.get(model_type)
        if what is None:
            why = "its differences from Llama are not known here, so it is not read as one"
        else:
            why = f"it computes {what}, which a Llama cannot express"
        raise HFConfigError(
            f"config.json: model_type={model_type!r} is not a Llama: {why}. gptmod.hf_llama reads "
            f"model_type 'llama' and 'mistral' ({', '.join(SUPPORTED)})"
        )
    other = [a for a in archs if a not in SUPPORTED]
    if other:
        raise HFConfigError(
            f"config.json: architectures={archs!r}: {', '.join(other)} is not a causal LM "
            f"gptmod.hf_llama reads (it reads {', '.join(SUPPORTED)})"
        )
    return model_type


def _rope(
    hf_config: Mapping[str, Any], get: Callable[[str], Any], problems: list[str]
) -> tuple[Any, Any]:
    """(rope_theta, RopeScaling | None) from either layout: transformers 5's `rope_parameters`
    (theta inside) or older configs' top-level `rope_theta` with `rope_scaling`. HF prefers
    `rope_scaling` when both are set."""
    params = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        problems.append(f"rope_parameters={params!r}: expected an object")
        return _DEFAULT_THETA, None
    nested = [k for k, v in params.items() if isinstance(v, Mapping)]
    if nested:
        problems.append(
            f"rope_parameters per layer type ({', '.join(nested)}): one RoPE for every layer only"
        )
        return _DEFAULT_THETA, None
    theta = params.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_THETA))
    top = hf_config.get("rope_theta")
    if top is not None and "rope_theta" in params and top != params["rope_theta"]:
        problems.append(
            f"rope_theta={top!r} disagrees with rope_parameters.rope_theta={params['rope_theta']!r}"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        problems.append(
            f"partial_rotary_factor={partial!r}: partial rotary embeddings "
            "(gptmod rotates every dim)"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        problems.append(
            f"rope type {kind!r}: only 'default' (no scaling) and 'llama3' are supported; {kind!r} "
            "rescales the rotary frequencies (or attention) another way"
        )
        return theta, None
    # As HF's llama3 init: original_max_position_embeddings defaults to max_position_embeddings.
    fields = {
        "factor": params.get("factor"),
        "low_freq_factor": params.get("low_freq_factor"),
        "high_freq_factor": params.get("high_freq_factor"),
        "original_max_seq_len": params.get(
            "original_max_position_embeddings", get("max_position_embeddings")
        ),
    }
    absent = [k for k, v in fields.items() if v is None and k != "original_max_seq_len"]
    if absent:
        problems.append(f"rope type 'llama3' lacks {', '.join(absent)} in rope_parameters")
        return theta, None
    try:
        return theta, RopeScaling(kind="llama3", **fields)
    except ValueError as e:
        problems.append(f"rope_parameters (llama3): {e}")
        return theta, None


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama / Mistral config.json (as a dict).
    Keys it leaves out take transformers' defaults. Anything that computes a
    different model is one HFConfigError listing every problem; another
    architecture is an error naming what it needs that a Llama cannot express."""
    if not isinstance(hf_config, Mapping):
        raise HFConfigError(
            f"config_from_hf: expected a config.json dict, got {type(hf_config).__name__}"
        )
    model_type = _model_type(hf_config)
    defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[model_type]}

    def get(key: str) -> Any:
        return hf_config[key] if key in hf_config else defaults.get(key)

    absent = [k for k in _REQUIRED if hf_config.get(k) is None]
    if absent:
        raise HFConfigError(f"config.json ({model_type}) lacks {', '.join(absent)}")
    problems = []
    for key in _EXPERT_KEYS:
        if hf_config.get(key):
            problems.append(
                f"{key}={hf_config[key]!r}: a mixture of experts (a Llama has one dense MLP)"
            )
    window = get("sliding_window")
    if window is not None:
        problems.append(
            f"sliding_window={window!r}: sliding-window attention (gptmod attends to the whole "
            "context; a Mistral is read only with sliding_window null)"
        )
    act = get("hidden_act")
    if act != "silu":
        problems.append(f"hidden_act={act!r}: gptmod's SwiGLU gate is 'silu'")
    attn_bias, mlp_bias = get("attention_bias"), get("mlp_bias")
    if attn_bias not in (True, False) or mlp_bias not in (True, False) or attn_bias != mlp_bias:
        problems.append(
            f"attention_bias={attn_bias!r} with mlp_bias={mlp_bias!r}: gptmod's one `bias` switch "
            "covers attention and MLP together, so both must be true or both false"
        )
    d_model, n_head = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    sizes = (head_dim, n_head, d_model)
    if head_dim is not None and (
        not all(isinstance(v, int) for v in sizes) or head_dim * n_head != d_model
    ):
        problems.append(
            f"head_dim={head_dim!r} but hidden_size/num_attention_heads={d_model}/{n_head}: "
            "gptmod's head_dim is always hidden_size // num_attention_heads"
        )
    theta, scaling = _rope(hf_config, get, problems)
    if problems:
        raise HFConfigError(
            f"config.json ({model_type}) computes a model gptmod's Llama cannot:\n  "
            + "\n  ".join(problems)
        )
    n_kv = hf_config.get("num_key_value_heads")
    fields = {
        "vocab_size": hf_config["vocab_size"],
        "max_seq_len": get("max_position_embeddings"),
        "n_layer": hf_config["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": n_head if n_kv is None else n_kv,
        "d_model": d_model,
        "d_ff": hf_config["intermediate_size"],
        "pos": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm": "rmsnorm",
        "norm_eps": get("rms_norm_eps"),
        "mlp": "swiglu",
        "bias": attn_bias,
        "logit_softcap": None,
        "tie_embeddings": get("tie_word_embeddings"),
        "init_std": get("initializer_range"),
    }
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        keys = [hk for f, hk in _FIELD_FROM.items() if f"ModelConfig.{f}" in str(e)]
        where = f" (from config.json's {', '.join(keys)})" if keys else ""
        raise HFConfigError(f"config.json ({model_type}): {e}{where}") from None


def llama_problems(cfg: ModelConfig) -> list[str]:
    """Every switch of `cfg` that a Hugging Face Llama cannot express."""
    problems = []
    if cfg.pos != "rope":
        problems.append(f"pos={cfg.pos!r} (Llama has rotary positions: pos='rope')")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm!r} (Llama normalises with RMSNorm: norm='rmsnorm')")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp!r} (Llama's MLP is SwiGLU: mlp='swiglu')")
    if cfg.logit_softcap is not None:
        problems.append(f"logit_softcap={cfg.logit_softcap!r} (Llama has no logit soft-cap: None)")
    return problems


def _check_llama(cfg: ModelConfig, what: str) -> None:
    problems = llama_problems(cfg)
    if problems:
        raise HFConfigError(
            f"{what}: a Hugging Face Llama cannot express this config: " + "; ".join(problems)
        )


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """A config.json dict that transformers loads as LlamaForCausalLM (rope
    as transformers 5 writes it). `bias=True` maps to attention_bias and
    mlp_bias, which put biases on exactly gptmod's seven linears.
    Token ids are left null: they belong to the tokenizer, not to the architecture."""
    _check_llama(cfg, "config_to_hf")
    if dtype not in _DTYPES:
        raise ValueError(
            f"config_to_hf: dtype={dtype!r}: must be one of {', '.join(map(repr, _DTYPES))}"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
            "rope_theta": cfg.rope_theta,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- tensors

# canonical name -> hub name; each pattern's groups go into the template.
_TO_HUB = (
    (re.compile(r"tok_emb\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"norm\.weight"), "model.norm.weight"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight"),
    (re.compile(r"blocks\.(\d+)\.attn_norm\.weight"), "model.layers.{0}.input_layernorm.weight"),
    (
        re.compile(r"blocks\.(\d+)\.mlp_norm\.weight"),
        "model.layers.{0}.post_attention_layernorm.weight",
    ),
    (
        re.compile(r"blocks\.(\d+)\.attn\.w([qkvo])\.(weight|bias)"),
        "model.layers.{0}.self_attn.{1}_proj.{2}",
    ),
    (
        re.compile(r"blocks\.(\d+)\.mlp\.w_(gate|up|down)\.(weight|bias)"),
        "model.layers.{0}.mlp.{1}_proj.{2}",
    ),
)
# Rotary frequency buffers that old checkpoints saved beside the weights;
# recomputed from the config.
_INV_FREQ = re.compile(
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq"
)
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def hub_name(name: str) -> str:
    """The Hugging Face Llama name of a canonical tensor name."""
    for pattern, template in _TO_HUB:
        if m := pattern.fullmatch(name):
            return template.format(*m.groups())
    raise KeyError(f"{name!r} is not a canonical tensor of a Llama-shaped model")


def _float32(value: Any) -> np.ndarray:
    """float32, C-contiguous and owning its memory. numpy has no bf16, so
    torch tensors upcast on their side."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float().numpy() if value.dtype.itemsize < 4 else value.numpy()
    return np.array(value, dtype=np.float32, order="C", copy=True)


def _dtype(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


def _is_float(value: Any) -> bool:
    if hasattr(value, "is_floating_point"):
        return bool(value.is_floating_point())
    return _dtype(value) in ("float16", "bfloat16", "float32", "float64")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


def _inv_freq(cfg: ModelConfig) -> np.ndarray:
    # The same float64 frequencies both twins round to fp32 (gptmod_torch/gptmod_jax rope_inv_freq).
    inv_freq = 1.0 / cfg.rope_theta ** (
        np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    )
    return inv_freq if cfg.rope_scaling is None else cfg.rope_scaling.scale(inv_freq)


def from_hf_llama(
    tensors: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], TransferReport]:
    """Hugging Face Llama tensors (hub names; torch tensors of any float dtype
    or numpy arrays) -> canonical state for `cfg`, float32, C-contiguous and
    owning its memory, with a report. Every tensor is copied.

    A tied config takes lm_head.weight when it equals the embedding (dropped, as the report says); a
    different one is an error. Old checkpoints' rotary inv_freq buffers are dropped once checked
    against the config. Missing, unexpected, mis-shaped and non-float tensors are one StateError
    listing them all."""
    _check_llama(cfg, "from_hf_llama")
    shapes = canonical_shapes(cfg)
    names = {name: hub_name(name) for name in shapes}
    wanted = set(names.values())
    missing = [h for h in names.values() if h not in tensors]
    bad = [
        f"  {h}: shape {_shape(tensors[h])}, expected {shapes[c]}"
        for c, h in names.items()
        if h in tensors and _shape(tensors[h]) != shapes[c]
    ]
    bad += [
        f"  {h}: dtype {_dtype(tensors[h])}, expected a float"
        for h in wanted
        if h in tensors and not _is_float(tensors[h])
    ]
    tied_head = cfg.tie_embeddings and "lm_head.weight" in tensors
    unexpected = [
        k
        for k in tensors
        if k not in wanted
        and not _INV_FREQ.fullmatch(k)
        and not (tied_head and k == "lm_head.weight")
    ]
    if missing or unexpected or bad:
        lines = [
            "from_hf_llama: the tensors do not fit the config (nothing is "
            "guessed, truncated or padded):"
        ]
        if missing:
            lines.append(f" {len(missing)} missing: {', '.join(missing)}")
        if unexpected:
            lines.append(
                f" {len(unexpected)} unexpected (not part of a Llama of this "
                f"config): {', '.join(unexpected)}"
            )
        if bad:
            lines += [f" {len(bad)} mis-shaped or not float:", *bad]
        raise StateError("\n".join(lines))

    report = TransferReport()
    for k in tensors:
        if _INV_FREQ.fullmatch(k):
            report.dropped.append((k, _inv_freq_reason(k, tensors[k], cfg)))
    if tied_head:
        emb, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
        if _shape(head) != _shape(emb) or not np.array_equal(_float32(head), _float32(emb)):
            raise StateError(
                "from_hf_llama: lm_head.weight differs from model.embed_tokens.weight, but "
                "the config ties them (tie_embeddings=True / tie_word_embeddings=true); "
                "refusing to drop an untied head"
            )
        report.dropped.append(
            ("lm_head.weight", "equal to model.embed_tokens.weight (tied: tok_emb.weight)")
        )
    widths = {_dtype(tensors[h]) for h in wanted}
    if "float64" in widths:
        report.notes.append(
            "float64 source tensors rounded to float32 (canonical state is float32)"
        )
    state: dict[str, np.ndarray] = {}
    order: Iterable[str] = list(shapes)
    for name in progress(order) if progress else order:
        src = tensors[names[name]]
        state[name] = _float32(src)
        how = "as is" if _dtype(src) == "float32" else f"as is ({_dtype(src)} upcast to float32)"
        report.rows.append(TransferRow(name, "copied", names[name], how, state[name].size))
    check_state(shapes, state, what="Llama weights")
    return state, report


def _inv_freq_reason(name: str, value: Any, cfg: ModelConfig) -> str:
    got = _float32(value).astype(np.float64)
    want = _inv_freq(cfg)
    rtol = 1e-5 if _dtype(value) in ("float32", "float64") else 1e-2
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=0):
        raise StateError(
            f"from_hf_llama: {name} holds rotary frequencies {got[:4].tolist()}... that "
            f"differ from those of rope_theta={cfg.rope_theta}, "
            f"rope_scaling={cfg.rope_scaling} ({want[:4].tolist()}...): the checkpoint was "
            "trained with a different RoPE than its config says"
        )
    return (
        "rotary frequencies buffer of old checkpoints, equal to the config's "
        "(recomputed by the model)"
    )


def to_hf_llama(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical state -> Hugging Face Llama tensors (hub names), exactly:
    the values are the state's own arrays, renamed. A tied config writes no
    lm_head.weight (transformers ties it on load)."""
    _check_llama(cfg, "to_hf_llama")
    shapes = canonical_shapes(cfg)
    check_state(shapes, state, what="state to export as a Hugging Face Llama")
    return {hub_name(name): np.asarray(state[name]) for name in shapes}


# ----------------------------------------------------------------------------- folders


def read(
    source: hf.PathLike,
    *,
    progress: Progress | None = None,
) -> tuple[ModelConfig, dict[str, np.ndarray], TransferReport, hf.Folder]:
    """A Llama folder (config.json + single or sharded safetensors, or pytorch_model.bin read with
    weights_only) or a hub id: (its config, canonical state, the report, the folder as read)."""
    folder = hf.read_folder(hf.resolve(source))
    if folder.config is None:
        raise FileNotFoundError(f"{folder.path}: no config.json, so its architecture is unknown")
    cfg = config_from_hf(folder.config)
    state, report = from_hf_llama(folder.tensors, cfg, progress=progress)
    report.notes.append(f"read {', '.join(folder.files)} from {folder.path}")
    return cfg, state, report, folder


def write(
    folder: hf.PathLike,
    state: Mapping[str, np.ndarray],
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    extra_files: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Export canonical state as a Hugging Face Llama folder that transformers loads as
    LlamaForCausalLM. `dtype` is the stored dtype (float32, float16, bfloat16; also written to
    config.json). A float16 export of values beyond float16's range is an error, not an inf. Atomic
    (see `hf.write_folder`); the names written."""
    config = config_to_hf(cfg, dtype=dtype)
    tensors = to_hf_llama(state, cfg)
    if dtype == "float16":
        limit = float(np.finfo(np.float16).max)
        peaks = {k: float(np.max(np.abs(v))) for k, v in state.items() if np.asarray(v).size}
        over = [f"{k} ({hub_name(k)}, max |x| {p:.4g})" for k, p in peaks.items() if p > limit]
        if over:
            raise ValueError(
                f"write: dtype='float16' cannot hold values beyond {limit:g}: {', '.join(over)}; "
                "use dtype='bfloat16' or 'float32'"
            )
    tensors = {k: v.astype(_DTYPES[dtype], copy=False) for k, v in tensors.items()}
    return hf.write_folder(
        folder, tensors, config, extra_files=extra_files, max_shard_bytes=max_shard_bytes
    )
