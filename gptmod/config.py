"""ModelConfig: the one config schema both twins are built from, plus the JSON presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

POS_CHOICES = ("learned", "rope")
NORM_CHOICES = ("layernorm", "rmsnorm")
MLP_CHOICES = ("gelu", "swiglu")
ROPE_SCALING_CHOICES = ("llama3",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 RoPE frequency scaling (HF `rope_type: "llama3"`): frequencies
    whose wavelength is longer than `original_max_seq_len / low_freq_factor` are
    divided by `factor`, those shorter than `original_max_seq_len /
    high_freq_factor` are kept, and those between are interpolated smoothly.
    It changes only the rotation frequencies, which both twins take from the
    same host-side function."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_CHOICES:
            raise ValueError(
                f"ModelConfig.rope_scaling.kind={self.kind!r}: must be one of "
                f"{', '.join(map(repr, ROPE_SCALING_CHOICES))}"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_positive_float(f"rope_scaling.{name}", getattr(self, name))
        if self.factor < 1:
            raise ValueError(f"ModelConfig.rope_scaling.factor={self.factor}: must be >= 1")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"ModelConfig.rope_scaling.high_freq_factor={self.high_freq_factor}: must be > "
                f"low_freq_factor={self.low_freq_factor}"
            )
        v = self.original_max_seq_len
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"ModelConfig.rope_scaling.original_max_seq_len={v!r}: must be an int >= 1"
            )

    def scale(self, inv_freq: np.ndarray) -> np.ndarray:
        """The scaled frequencies, in float64 (as HF's
        `_compute_llama3_parameters` computes them)."""
        low_wavelen = self.original_max_seq_len / self.low_freq_factor
        high_wavelen = self.original_max_seq_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(between, (1 - smooth) * scaled / self.factor + smooth * scaled, scaled)

    @classmethod
    def from_dict(cls, data: Any) -> RopeScaling:
        _check_fields(cls, data, "ModelConfig.rope_scaling", "an object or null")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a (modernised) GPT-2. Defaults are GPT-2 small, classic column.

    Every switch of the seed's table is one field; see DESIGN.md. Validated on construction.
    """

    vocab_size: int = 50257
    max_seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    pos: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (tanh form) | "swiglu"
    bias: bool = True
    logit_softcap: float | None = None
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "max_seq_len",
            "n_layer",
            "n_head",
            "n_kv_head",
            "d_model",
            "d_ff",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name}={value!r}: must be an int")
            if value < 1:
                raise ValueError(f"ModelConfig.{name}={value}: must be >= 1")
        for name, choices in (("pos", POS_CHOICES), ("norm", NORM_CHOICES), ("mlp", MLP_CHOICES)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"ModelConfig.{name}={value!r}: must be one of {', '.join(map(repr, choices))}"
                )
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be a bool")
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check_positive_float(name, getattr(self, name))
        if self.logit_softcap is not None:
            _check_positive_float("logit_softcap", self.logit_softcap)
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise ValueError(
                    f"ModelConfig.rope_scaling={self.rope_scaling!r}: must be a RopeScaling or "
                    "None (from_dict/from_json take a JSON object)"
                )
            if self.pos != "rope":
                raise ValueError(
                    f"ModelConfig.rope_scaling is set but pos={self.pos!r}: it needs pos='rope'"
                )
        if self.n_kv_head > self.n_head:
            raise ValueError(
                f"ModelConfig.n_kv_head={self.n_kv_head}: must be <= n_head={self.n_head} "
                "(1 <= n_kv_head <= n_head)"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"ModelConfig.n_kv_head={self.n_kv_head}: n_head={self.n_head} must "
                "be divisible by n_kv_head"
            )
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model}: must be divisible by n_head={self.n_head}"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.pos='rope' needs an even head_dim, got head_dim=d_model/n_head="
                f"{self.d_model}/{self.n_head}={self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def is_classic(self) -> bool:
        """True for the exact GPT-2 column of the table (what Hugging Face GPT-2 computes)."""
        return (
            self.pos == "learned"
            and self.norm == "layernorm"
            and self.mlp == "gelu"
            and self.bias
            and self.n_kv_head == self.n_head
            and self.logit_softcap is None
            and self.tie_embeddings
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error (a typo must not
        silently become a default)."""
        _check_fields(cls, data, "ModelConfig", "a JSON object")
        if data.get("rope_scaling") is not None:
            data = {**data, "rope_scaling": RopeScaling.from_dict(data["rope_scaling"])}
        return cls(**data)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the JSON text; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike[str]) -> ModelConfig:
        """Load from a JSON file path, or from JSON text starting with '{'."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ModelConfig: invalid JSON ({e})") from None
        return cls.from_dict(data)

    def num_params(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        d, hd = self.d_model, self.head_dim
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * hd * (2 * self.n_head + 2 * self.n_kv_head)
        if self.bias:
            attn += hd * (self.n_head + 2 * self.n_kv_head) + d
        n_in = 2 if self.mlp == "swiglu" else 1
        mlp = (n_in + 1) * d * self.d_ff + (self.bias * (n_in * self.d_ff + d))
        total = self.vocab_size * d + self.n_layer * (2 * norm + attn + mlp) + norm
        total += self.max_seq_len * d if self.pos == "learned" else 0
        total += 0 if self.tie_embeddings else self.vocab_size * d
        return total


def _check_fields(cls: type, data: Any, what: str, expected: str) -> None:
    """`data` is a dict of `cls`'s fields only: a typo must not silently become a default."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected {expected}, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known fields are {sorted(known)}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"ModelConfig.{name}={value!r}: must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}: must be finite and > 0")


def _preset_dir() -> Any:
    # configs/ is installed as the package `gptmod.configs` (see pyproject.toml), so this
    # works from a source checkout, an editable install and a wheel alike.
    return resources.files("gptmod.configs")


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> ModelConfig:
    """Load a preset from configs/ by name, e.g. "gpt2" or "modern-gpt2"."""
    known = list_presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return ModelConfig.from_json((_preset_dir() / f"{name}.json").read_text())
