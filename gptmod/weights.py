"""Canonical weights: names and shapes, checks, safetensors I/O, and the Hugging Face GPT-2 mapper.

Framework-free when loaded: torch, transformers and huggingface_hub are imported only inside the
functions that need them. Canonical state is `dict[str, numpy.ndarray]` with torch's names and
(out, in) linear weights; see docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptmod.config import ModelConfig

FORMAT = "gptmod-canonical-v1"


# ----------------------------------------------------------------------------- names and checks


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in model order."""
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
    """A state does not fit its model: lists every missing, unexpected and mis-shaped key at once."""


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], *, what: str = "state") -> None:
    """Raise StateError naming every problem of `state` against `expected` names and shapes."""
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
        lines.append(f" {len(unexpected)} unexpected: " + ", ".join(unexpected))
    if problems:
        lines.append(f" {len(problems)} mis-shaped or invalid:")
        lines += problems
    raise StateError("\n".join(lines))


# ----------------------------------------------------------------------------- safetensors I/O


def save(
    path: str | os.PathLike[str], state: Mapping[str, np.ndarray], cfg: ModelConfig, *, metadata: dict | None = None
) -> None:
    """Write canonical state as safetensors, the config in its metadata. Atomic: a crash leaves
    either the old file or the new one, never half a file."""
    check_state(canonical_shapes(cfg), state, what=f"state to save to {path}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT, "gptmod_config": json.dumps(cfg.to_dict())})
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read a checkpoint written by `save`: (canonical state, its config). Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    if "gptmod_config" not in meta:
        raise ValueError(
            f"{path}: no gptmod config in its metadata, so it is not a gptmod checkpoint "
            "(Hugging Face GPT-2 files go through gptmod.weights.from_hf_gpt2)"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["gptmod_config"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid config in metadata: {e}") from None
    expected = canonical_shapes(cfg)
    check_state(expected, state, what=f"checkpoint {path}")
    return {k: state[k] for k in expected}, cfg  # canonical order (safetensors stores keys sorted)


# ----------------------------------------------------------------------------- Hugging Face GPT-2


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub could not be reached (offline machine, HF_HUB_OFFLINE, no network)."""


@dataclass
class TransferRow:
    target: str
    action: str  # "copied" | "transformed" | "new"
    source: str
    how: str


@dataclass
class TransferReport:
    """What a weight import did: every target tensor, and every source tensor left behind."""

    rows: list[TransferRow] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source name, reason)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def fraction_copied(self) -> float:
        """Share of target tensors (by count) whose values are GPT-2's exactly."""
        return self.counts().get("copied", 0) / max(1, len(self.rows))

    def to_text(self) -> str:
        width = max([len(r.target) for r in self.rows] + [6])
        lines = [f"{'target':<{width}}  {'action':<11}  {'source':<28}  how"]
        lines += [f"{r.target:<{width}}  {r.action:<11}  {r.source:<28}  {r.how}" for r in self.rows]
        if self.dropped:
            lines.append("")
            lines += [f"dropped {name}: {reason}" for name, reason in self.dropped]
        counts = ", ".join(f"{n} {a}" for a, n in sorted(self.counts().items()))
        lines.append(f"\n{len(self.rows)} target tensors: {counts}; {len(self.dropped)} source tensors dropped")
        return "\n".join(lines)

    __str__ = to_text

    def to_json(self) -> str:
        return json.dumps(
            {"rows": [dataclasses.asdict(r) for r in self.rows], "dropped": self.dropped, "counts": self.counts()},
            indent=2,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_json() + "\n")


# Old GPT-2 checkpoints carry the causal mask as buffers; they are not weights.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def _is_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", s)) and not s.startswith(".")


def _read_folder(folder: Path) -> dict[str, Any]:
    """A local Hugging Face folder: model.safetensors (single or sharded) or pytorch_model.bin."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    binary = folder / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    elif binary.is_file():
        import torch

        # weights_only: a plain tensor dict; no arbitrary object is ever unpickled.
        return torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    out: dict[str, Any] = {}
    for f in files:
        out.update(_read_safetensors(f))
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub library raises many kinds: connection, offline mode, missing repo
        raise HubUnavailableError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "This machine appears to be offline, or the hub is unreachable. Download the model on a machine with "
            f"internet (for example `hf download {repo_id} --local-dir {repo_id.split('/')[-1]}`), copy the folder "
            "here and pass its path instead."
        ) from e


def _source_tensors(source: Any) -> dict[str, np.ndarray]:
    """Any accepted source -> {hub-layout name (no `transformer.` prefix): float32 numpy array}."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raw = _read_folder(path)
        elif path.is_file():
            raw = _read_safetensors(path)
        elif isinstance(source, str) and _is_repo_id(source):
            raw = _read_folder(_download(source))
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
    elif hasattr(source, "state_dict"):
        raw = source.state_dict()
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise TypeError(f"from_hf_gpt2: cannot read {type(source).__name__}; pass a model, a state dict or a path")
    out = {}
    for name, value in raw.items():
        name = name.removeprefix("transformer.")
        if hasattr(value, "detach"):  # a torch tensor: upcast bf16/fp16 before numpy
            value = value.detach().cpu().float().numpy()
        out[name] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    return out


def from_hf_gpt2(source: Any, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], TransferReport]:
    """Map Hugging Face GPT-2 weights into canonical state for `cfg`, with a report of what was done.

    `source`: a transformers GPT2LMHeadModel / GPT2Model, a state dict (with or without the
    `transformer.` prefix), a local folder or .safetensors file, or a hub name such as "gpt2".
    Classic configs import exactly (every tensor copied)."""
    if not cfg.is_classic:
        classic = ModelConfig()
        diff = [f"{f}={getattr(cfg, f)!r}" for f in ("pos", "norm", "mlp", "bias", "logit_softcap", "tie_embeddings")
                if getattr(cfg, f) != getattr(classic, f)]  # fmt: skip
        if cfg.n_kv_head != cfg.n_head:
            diff.append(f"n_kv_head={cfg.n_kv_head} (< n_head={cfg.n_head})")
        raise NotImplementedError(
            f"from_hf_gpt2: exact import needs a classic GPT-2 config, got {', '.join(diff)}; "
            "partial transfer into modern configs is not implemented yet"
        )
    src = _source_tensors(source)
    d = cfg.d_model
    state: dict[str, np.ndarray] = {}
    report = TransferReport()
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in src:
            raise ValueError(f"from_hf_gpt2: the source has no {name!r} (is it a GPT-2 checkpoint?)")
        used.add(name)
        return src[name]

    def put(target: str, value: np.ndarray, source: str, how: str) -> None:
        state[target] = np.ascontiguousarray(value, dtype=np.float32)
        report.rows.append(TransferRow(target, "copied", source, how))

    put("tok_emb.weight", take("wte.weight"), "wte.weight", "as is")
    put("pos_emb.weight", take("wpe.weight"), "wpe.weight", "as is")
    for i in range(cfg.n_layer):
        h, b = f"h.{i}", f"blocks.{i}"
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for p in ("weight", "bias"):
                put(f"{b}.{ours}.{p}", take(f"{h}.{theirs}.{p}"), f"{h}.{theirs}.{p}", "as is")
        w_qkv, b_qkv = take(f"{h}.attn.c_attn.weight"), take(f"{h}.attn.c_attn.bias")
        if w_qkv.shape != (d, 3 * d):
            raise ValueError(f"from_hf_gpt2: {h}.attn.c_attn.weight has shape {w_qkv.shape}, expected {(d, 3 * d)}")
        for j, name in enumerate(("wq", "wk", "wv")):
            cols = f"[{j * d}:{(j + 1) * d}]"
            # Conv1D stores (in, out); canonical is (out, in).
            put(f"{b}.attn.{name}.weight", w_qkv[:, j * d : (j + 1) * d].T, f"{h}.attn.c_attn.weight",
                f"Conv1D (in,out) columns {cols}, transposed")  # fmt: skip
            put(f"{b}.attn.{name}.bias", b_qkv[j * d : (j + 1) * d], f"{h}.attn.c_attn.bias", f"slice {cols}")
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.w_up", "mlp.c_fc"), ("mlp.w_down", "mlp.c_proj")):
            put(f"{b}.{ours}.weight", take(f"{h}.{theirs}.weight").T, f"{h}.{theirs}.weight",
                "Conv1D (in,out) transposed")  # fmt: skip
            put(f"{b}.{ours}.bias", take(f"{h}.{theirs}.bias"), f"{h}.{theirs}.bias", "as is")
    for p in ("weight", "bias"):
        put(f"norm.{p}", take(f"ln_f.{p}"), f"ln_f.{p}", "as is")

    for name in src:
        if name in used:
            continue
        if _MASK_BUFFER.match(name):
            report.dropped.append((name, "causal-mask buffer of old checkpoints, not a weight"))
        elif name == "lm_head.weight":
            if src[name].shape != src["wte.weight"].shape or not np.array_equal(src[name], src["wte.weight"]):
                raise ValueError(
                    "from_hf_gpt2: lm_head.weight differs from wte.weight, but GPT-2 ties them "
                    "(tie_embeddings=True); refusing to drop an untied head silently"
                )
            report.dropped.append((name, "tied to wte.weight (tok_emb.weight)"))
        else:
            raise ValueError(f"from_hf_gpt2: unexpected source tensor {name!r} for a GPT-2 checkpoint")
    expected = canonical_shapes(cfg)
    try:
        check_state(expected, state, what="GPT-2 weights")
    except StateError as e:
        hint = ("hint: the presets gpt2, gpt2-medium, gpt2-large and gpt2-xl have GPT-2's exact shapes; "
                f"the source has vocab {src['wte.weight'].shape[0]}, {src['wpe.weight'].shape[0]} positions, "
                f"width {src['wte.weight'].shape[1]}")  # fmt: skip
        raise StateError(f"{e}\n{hint}") from None
    return state, report
