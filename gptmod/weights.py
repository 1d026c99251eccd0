"""Canonical weights: names and shapes, state checks, safetensors I/O, and the Hugging Face GPT-2 mapper.

Framework-free when loaded: torch, transformers and huggingface_hub are imported only inside the
functions that need them. Canonical state is `dict[str, numpy.ndarray]` with torch's names and
(out, in) linear weights; see DESIGN.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints read in any process)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptmod import transfer
from gptmod.config import ModelConfig

FORMAT = "gptmod-canonical-v1"
_RESERVED_METADATA = ("format", "gptmod_config")

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
    """A state does not fit its model: lists every missing, unexpected and mis-shaped key at once."""


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], *, what: str = "state") -> None:
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


def save(path: PathLike, state: Mapping[str, Any], cfg: ModelConfig, *, metadata: dict[str, str] | None = None) -> None:
    """Write canonical state as safetensors with the config in its metadata.

    Atomic: the file is written beside `path` under a temporary name, fsynced, then renamed over
    `path`, so a crash leaves either the old file or the new one, never half a file."""
    check_state(canonical_shapes(cfg), state, what=f"state to save to {path}")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"save: metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k in _RESERVED_METADATA:
            raise ValueError(f"save: metadata key {k!r} is reserved (gptmod writes it itself)")
    meta.update({"format": FORMAT, "gptmod_config": cfg.to_json()})
    arrays = {}
    for k, v in state.items():
        try:  # np.asarray also takes jax arrays; safetensors needs C order
            arrays[k] = np.ascontiguousarray(np.asarray(v))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"save: {k} is not convertible to a numpy array ({type(v).__name__}: {e})") from None
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created with 0o666 so the umask applies, as for any new file; its mode is what the checkpoint should get.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)  # keep an existing file's mode
        save_file(arrays, str(tmp), metadata=meta)
        os.chmod(tmp, mode)  # safetensors writes through its own 0o600 temp file and renames it onto tmp
        with open(tmp, "r+b") as f:  # save_file closes its own handle: fsync before the rename makes it durable
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming the path if it is not one."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open has no __iter__)
    except (FileNotFoundError, PermissionError):
        raise  # an access problem, not a format problem: keep the OS's own error
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


def load(path: PathLike) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read a checkpoint written by `save`: (canonical state in model order, its config). Never unpickles."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a gptmod .safetensors checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state, meta = _read_safetensors(path)
    if "gptmod_config" not in meta:
        raise ValueError(
            f"{path}: no 'gptmod_config' in its metadata, so it is not a gptmod checkpoint "
            "(Hugging Face GPT-2 files go through gptmod.weights.from_hf_gpt2)"
        )
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: format {meta['format']!r} is not supported (this gptmod reads {FORMAT!r})")
    try:  # not ModelConfig.from_json: it would take non-JSON text for a file name
        cfg = ModelConfig.from_dict(json.loads(meta["gptmod_config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid config in metadata: not JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid config in metadata: {e}") from None
    expected = canonical_shapes(cfg)
    check_state(expected, state, what=f"checkpoint {path}")
    return {k: state[k] for k in expected}, cfg  # safetensors stores keys sorted; give them back in model order


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (gptmod's config, format, and anything `save` was given)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


# ----------------------------------------------------------------------------- transfer report


@dataclass
class TransferRow:
    """One target tensor: where its values came from."""

    target: str
    action: str  # "copied" (values exact, incl. transposes and splits) | "transformed" | "new"
    source: str  # source tensor name(s), comma-separated
    how: str
    size: int = 0  # number of parameters


_ACTIONS = ("copied", "transformed", "new")


@dataclass
class TransferReport:
    """What a weight import did: every target tensor, every source tensor left unused, and the changes of
    function that involve no tensor (e.g. soft-capping)."""

    rows: list[TransferRow] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source name, reason)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of target tensors per action."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def param_counts(self) -> dict[str, int]:
        """Number of target parameters per action."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.action] = out.get(r.action, 0) + r.size
        return out

    def fraction_copied(self) -> float:
        """Share of target tensors (counted as tensors, not parameters) whose values are the source's exactly."""
        return self.counts().get("copied", 0) / max(1, len(self.rows))

    def summary(self) -> str:
        """One line: tensors and parameters per action, and how many source tensors were dropped."""
        counts, params = self.counts(), self.param_counts()
        total = max(1, sum(params.values()))
        per = ", ".join(f"{counts[a]} {a} ({params[a] / total:.1%} of parameters)" for a in _ACTIONS if a in counts)
        return (f"{len(self.rows)} target tensors, {sum(params.values()):,} parameters: {per or 'none'}; "
                f"{len(self.dropped)} source tensor(s) dropped")  # fmt: skip

    def to_text(self) -> str:
        """A readable aligned table, then the dropped source tensors, the notes and the summary line."""
        header = TransferRow("target", "action", "source", "how")
        rows = [header, *self.rows]
        w_t, w_a, w_s = (max(len(getattr(r, f)) for r in rows) for f in ("target", "action", "source"))
        lines = [f"{r.target:<{w_t}}  {r.action:<{w_a}}  {r.source:<{w_s}}  {r.how}".rstrip() for r in rows]
        if self.dropped:
            lines.append("")
            w_d = max(len(name) for name, _ in self.dropped)
            lines += [f"dropped {name:<{w_d}}  {reason}" for name, reason in self.dropped]
        if self.notes:
            lines += ["", *(f"note: {n}" for n in self.notes)]
        lines += ["", self.summary()]
        return "\n".join(lines)

    __str__ = to_text

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "dropped": [list(d) for d in self.dropped],
                "notes": self.notes,
                "counts": self.counts(),
                "param_counts": self.param_counts(),
                "fraction_copied": self.fraction_copied(),
            },
            indent=2,
        )

    def save(self, path: PathLike) -> None:
        """Write the JSON atomically."""
        atomic_write_text(path, self.to_json() + "\n")


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- reading GPT-2 sources


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub could not be reached (offline machine, HF_HUB_OFFLINE, no network)."""


# Old GPT-2 checkpoints carry the causal mask as buffers named like parameters. Only these exact
# names are buffers; h.{i}.attn.c_attn.bias and friends are real weights.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# "gpt2" or "org/name": at most one slash, never starting with "." or "/" (those are local paths).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class _Source:
    """GPT-2 tensors in the hub layout (no `transformer.` prefix), as torch tensors or numpy arrays,
    plus the Hugging Face config when the source has one (a model, or a folder with config.json)."""

    tensors: dict[str, Any]
    hf_config: dict[str, Any] | None


def _torch_load(path: Path) -> Mapping[str, Any]:
    import torch

    # weights_only: tensors and plain containers only; no arbitrary object is ever unpickled.
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def _read_file(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".bin":
        return _torch_load(path)
    return _read_safetensors(path)[0]


def _read_folder(folder: Path) -> _Source:
    """A local Hugging Face folder. Safetensors are preferred, so pickles are read only when nothing else is there."""
    hf_config = None
    if (folder / "config.json").is_file():
        try:
            hf_config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'config.json'}: invalid JSON ({e})") from None
    for name in _HF_WEIGHTS:
        if not (folder / name).is_file():
            continue
        if name.endswith(".index.json"):  # sharded: the index maps each tensor to its shard
            try:
                shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{folder / name}: not a valid shard index ({type(e).__name__}: {e})") from None
            files = [folder / s for s in shards]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{folder / name} names shard(s) that are not there: {', '.join(absent)}")
        else:
            files = [folder / name]
        tensors: dict[str, Any] = {}
        for f in files:
            tensors.update(_read_file(f))
        return _Source(tensors, hf_config)
    raise FileNotFoundError(f"{folder}: none of {', '.join(_HF_WEIGHTS)} is there")


def _hub_connection_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    # snapshot_download turns "offline and not cached" into LocalEntryNotFoundError; transport errors
    # can still escape during the file downloads. OfflineModeIsEnabled is a ConnectionError.
    errors: list[type[BaseException]] = [LocalEntryNotFoundError, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client; the module name differs between releases
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def _download(repo_id: str) -> Path:
    """Fetch only what the import needs (config and safetensors weights) into the hub cache."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise ImportError(f"reading {repo_id!r} from the hub needs huggingface_hub; or pass a local folder") from e
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except _hub_connection_errors() as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise HubUnavailableError(
            f"could not download {repo_id!r} from the Hugging Face hub and it is not in the local cache: this machine "
            f"appears to be offline ({why}). Download the model on a machine with internet, for example "
            f"`hf download {repo_id} --local-dir {repo_id.split('/')[-1]}`, copy the folder here and pass its path "
            "instead of the repo id."
        ) from e
    if not any((folder / n).is_file() for n in patterns[1:3]):
        raise FileNotFoundError(
            f"hub repo {repo_id!r} has no model.safetensors; download its pytorch_model.bin yourself "
            "and pass the folder"
        )
    return folder


def _read_source(source: Any) -> _Source:
    """Any accepted source -> _Source in the hub layout, without converting values yet."""
    hf_config = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            src = _read_folder(path)
            raw, hf_config = src.tensors, src.hf_config
        elif path.is_file():
            raw = _read_file(path)
        elif isinstance(source, str) and _REPO_ID.fullmatch(source):
            src = _read_folder(_download(source))
            raw, hf_config = src.tensors, src.hf_config
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
            f"from_hf_gpt2: cannot read a {type(source).__name__}; pass a model, a state dict, a path or a hub id"
        )
    tensors = {}
    for name, value in raw.items():
        tensors[str(name).removeprefix("transformer.")] = value
    return _Source(tensors, hf_config)


def _to_numpy(value: Any) -> np.ndarray:
    """A view where possible (the one copy is made when the target is written)."""
    if hasattr(value, "detach"):  # torch: numpy has no bf16, so upcast non-fp32 floats on the torch side
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype.itemsize != 4:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- GPT-2 -> canonical


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


def _source_dims(tensors: Mapping[str, Any], hf_config: Mapping[str, Any] | None) -> dict[str, int]:
    """The config fields a GPT-2 source pins down: from its shapes, and n_head from its HF config."""
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
    """One error for every config field the source contradicts, with the preset (or recipe) that fits.

    A partial transfer resizes d_ff (hidden units kept or added) and, with RoPE, has no max_seq_len to match."""
    free = set() if cfg.is_classic else {"d_ff"} | ({"max_seq_len"} if cfg.pos == "rope" else set())
    wrong = {k: v for k, v in dims.items() if k not in free and getattr(cfg, k) != v}
    if not wrong:
        return
    expected = canonical_shapes(cfg)
    lines = ["from_hf_gpt2: the GPT-2 source does not fit the config (it is never truncated or padded):"]
    for k, v in wrong.items():
        theirs, ours = _DIM_KEYS[k]
        where = f"from {theirs}"
        if ours:
            where = f"{theirs} has shape {_shape(tensors[theirs])}, {ours} expects {expected[ours]}"
        lines.append(f"  {k}: cfg has {getattr(cfg, k)}, the source has {v} ({where})")
    from gptmod.config import list_presets, load_preset

    presets = {p: load_preset(p) for p in list_presets()}
    fits = [p for p, c in presets.items() if c.is_classic and all(getattr(c, k) == v for k, v in dims.items())]
    if not cfg.is_classic:
        args = ", ".join(f"{k}={v}" for k, v in wrong.items())
        lines.append(f"hint: keep the modern switches and take the source's sizes: dataclasses.replace(cfg, {args})")
    elif fits:
        lines.append(f"hint: the source matches preset {fits[0]!r}: use load_preset({fits[0]!r})")
    else:
        args = ", ".join(f"{k}={v}" for k, v in dims.items())
        extra = "" if "n_head" in dims else " (and the source's n_head, which its shapes do not show)"
        lines.append(f"hint: no preset matches; use dataclasses.replace(load_preset('gpt2'), {args}){extra}")
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
        problems.append(f"activation_function={act!r} (gptmod's GPT-2 MLP is the tanh GELU, {_TANH_GELUS[0]!r})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):  # fmt: skip
        if key in hf and hf[key] != want:
            problems.append(f"{key}={hf[key]!r} (only {want} is supported)")
    if problems:
        raise ValueError("from_hf_gpt2: the source's Hugging Face config computes a different model: "
                         + "; ".join(problems))  # fmt: skip


def from_hf_gpt2(source: Any, cfg: ModelConfig, *, seed: int = 0,
                 progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
                 ) -> tuple[dict[str, np.ndarray], TransferReport]:  # fmt: skip
    """Map Hugging Face GPT-2 weights into canonical state for `cfg`, with a report of what was done.

    `source`: a transformers GPT2LMHeadModel / GPT2Model; a state dict of torch tensors or numpy arrays,
    with or without the `transformer.` prefix; a local folder (model.safetensors, sharded safetensors or
    pytorch_model.bin, the latter read with weights_only=True); a .safetensors file; or a hub repo id
    such as "gpt2" or "openai-community/gpt2-medium". Classic configs import exactly: every tensor is
    copied. Modern and mixed configs get a partial transfer (`gptmod.transfer`): the report lists each
    target tensor as copied, transformed or new, and each source tensor left unused. `seed` draws the
    few tensors that are random (hidden units beyond GPT-2's d_ff); `progress` wraps the loop over target
    tensor names (e.g. a tqdm). The output is float32, C-contiguous and owns its memory (it never aliases
    the source)."""
    src = _read_source(source)
    tensors = src.tensors
    dims = _source_dims(tensors, src.hf_config)
    _check_dims(cfg, dims, tensors)
    if src.hf_config is not None:
        _check_hf_config(cfg, src.hf_config)
    source_cfg = transfer.source_config(cfg, dims.get("d_ff", cfg.d_ff), dims.get("max_seq_len", cfg.max_seq_len))
    plan = transfer.plan(cfg, source_cfg, seed=seed)
    shapes = transfer.gpt2_shapes(source_cfg)

    needed = dict.fromkeys(n for s in plan.steps for n in s.sources)
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(f"from_hf_gpt2: the source lacks {len(missing)} GPT-2 tensor(s): {', '.join(missing)}")
    bad = [f"  {s.target} (from {n}): source shape {_shape(tensors[n])}, expected {shapes[n]}"
           for s in plan.steps for n in s.sources if _shape(tensors[n]) != shapes[n]]  # fmt: skip
    if bad:
        raise StateError("from_hf_gpt2: source tensors with the wrong shape:\n" + "\n".join(dict.fromkeys(bad)))

    report = TransferReport(notes=list(plan.notes))
    leftover = [k for k in tensors if k not in needed]
    unexpected = [k for k in leftover if k not in plan.dropped and not _MASK_BUFFER.fullmatch(k)
                  and k != "lm_head.weight"]  # fmt: skip
    if unexpected:
        raise ValueError(f"from_hf_gpt2: unexpected source tensor(s), not part of GPT-2: {', '.join(unexpected)}")
    values = {k: _to_numpy(tensors[k]) for k in needed}
    for k in leftover:
        if k == "lm_head.weight":
            lm_head = _to_numpy(tensors[k])
            # GPT-2 ties the head to wte; dropping a head that differs would silently change the model.
            if lm_head.shape != values["wte.weight"].shape or not np.array_equal(lm_head, values["wte.weight"]):
                raise ValueError("from_hf_gpt2: lm_head.weight differs from wte.weight, but GPT-2 ties them "
                                 "(tie_embeddings=True); refusing to drop an untied head silently")  # fmt: skip
            report.dropped.append((k, "tied to wte.weight (tok_emb.weight)"))
        elif k in plan.dropped:
            report.dropped.append((k, plan.dropped[k]))
        else:
            report.dropped.append((k, "causal-mask buffer of old checkpoints, not a weight"))

    order = {k: i for i, k in enumerate(shapes)}  # GPT-2's own order, not the file's (often alphabetical)
    report.dropped.sort(key=lambda d: (order.get(d[0], len(order)), d[0]))
    # Computed in float32 (bf16/fp16 sources are upcast first); np.array copies, so the state owns its memory.
    values = {k: v.astype(np.float32, copy=False) for k, v in values.items()}
    made = {s.target: s for s in plan.steps}
    state: dict[str, np.ndarray] = {}
    names: Iterable[str] = list(canonical_shapes(cfg))  # model order, whatever order the plan made them in
    for name in progress(names) if progress else names:
        s = made[name]
        state[name] = np.array(s.get(values), dtype=np.float32, order="C")
        report.rows.append(TransferRow(s.target, s.action, ", ".join(s.sources), s.how, state[name].size))
    check_state(canonical_shapes(cfg), state, what="GPT-2 weights")
    return state, report


def read_hf_gpt2(source: Any) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read a GPT-2 source once (any `from_hf_gpt2` source but a bare state dict): its tensors in hub
    layout as float32 numpy arrays, and the classic config it implies. Passing the tensors to
    `from_hf_gpt2` for several configs then reads the source only once."""
    src = _read_source(source)
    dims = _source_dims(src.tensors, src.hf_config)
    if "n_head" not in dims:
        raise ValueError("read_hf_gpt2: the source has no Hugging Face config (config.json), so its n_head is "
                         "unknown; pass a model or a folder with config.json")  # fmt: skip
    hf = src.hf_config or {}
    cfg = dataclasses.replace(ModelConfig(), **dims, n_kv_head=dims["n_head"],
                              norm_eps=float(hf.get("layer_norm_epsilon", ModelConfig().norm_eps)))  # fmt: skip
    _check_hf_config(cfg, hf)
    tensors = {k: _to_numpy(v).astype(np.float32) for k, v in src.tensors.items() if not _MASK_BUFFER.fullmatch(k)}
    return tensors, cfg
