"""Hugging Face folders and hub ids, for every importer: config.json, single
or sharded weights, the hub download.

Framework-free when loaded (torch and huggingface_hub are imported only where needed). The
architecture mappers (`gptmod.hf_gpt2`, `gptmod.hf_llama`) read through `read_folder` and `resolve`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptmod import textio
from gptmod.fileio import atomic_folder
from gptmod.weights import _read_safetensors

PathLike = str | os.PathLike[str]


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub could not be reached (offline machine, HF_HUB_OFFLINE, no network)."""


class UnpicklingRefusedError(pickle.UnpicklingError, ValueError):
    """A pytorch_model.bin that torch's restricted unpickler (weights_only=True) refuses. A
    ValueError, so the CLI prints it as one line; never retried with weights_only=False."""


# "gpt2" or "org/name": at most one slash, never starting with "." or "/" (those are local paths).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A name ending like a file is a local path that is not there, never a hub repo
# (`nope.safetensors`).
FILE_SUFFIXES = (
    ".safetensors",
    ".gguf",
    ".bin",
    ".json",
    ".pt",
    ".pth",
    ".ckpt",
    ".npz",
    ".h5",
    ".msgpack",
    ".txt",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What an import needs from a hub repo: config, safetensors weights, and the
# tokenizer with its chat template.
HUB_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass
class Folder:
    """A Hugging Face model folder as read: its tensors (hub names, torch
    tensors or numpy arrays), its config.json (None when absent), the folder
    itself (for tokenizer files) and the weight files read, in order."""

    tensors: dict[str, Any]
    config: dict[str, Any] | None
    path: Path
    files: list[str]


def torch_load(path: Path) -> Mapping[str, Any]:
    """A pytorch_model.bin as a dict of tensors, through torch's restricted unpickler
    (weights_only=True): the one place gptmod calls torch.load. A file that needs any other object
    is refused with a one-line error; never retried with weights_only=False, which would run
    whatever code the file carries."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused global ("GLOBAL module.Class") when there
        # is one; a corrupt file has none.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (
            f"it holds a {found.group(1)} object"
            if found
            else "it is corrupt or holds objects beyond tensors"
        )
        raise UnpicklingRefusedError(
            f"{path}: refused: torch's restricted unpickler (weights_only=True) cannot read it "
            f"({what}), and loading it otherwise needs unpickling arbitrary Python objects, which "
            "gptmod never does (it could run code). Convert it to safetensors with a tool you "
            "trust and pass that file or its folder"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
    ) as e:  # not a torch archive, truncated, unreadable
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(
            f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def read_file(path: Path) -> Mapping[str, Any]:
    """One weight file: safetensors, or a pytorch_model.bin read with weights_only=True."""
    if path.suffix == ".bin":
        return torch_load(path)
    return _read_safetensors(path)[0]


def read_config(folder: Path) -> dict[str, Any] | None:
    """config.json of `folder` as a dict, None when there is none."""
    return textio.read_json_object(folder / "config.json")


def read_folder(folder: Path) -> Folder:
    """A local Hugging Face folder. Safetensors are preferred, so pickles
    are read only when nothing else is there."""
    config = read_config(folder)
    for name in WEIGHT_FILES:
        if not (folder / name).is_file():
            continue
        if name.endswith(".index.json"):  # sharded: the index maps each tensor to its shard
            try:
                weight_map = json.loads(textio.read_text(folder / name))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(
                    f"{folder / name}: not a valid shard index ({type(e).__name__}: {e})"
                ) from None
            files = [folder / s for s in shards]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(
                    f"{folder / name} names shard(s) that are not there: {', '.join(absent)}"
                )
        else:
            weight_map, files = None, [folder / name]
        tensors: dict[str, Any] = {}
        for f in files:
            tensors.update(read_file(f))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise ValueError(
                    f"{folder / name} lists tensor(s) that no shard holds: {', '.join(missing[:8])}"
                )
        return Folder(tensors, config, folder, [f.name for f in files])
    raise FileNotFoundError(f"{folder}: none of {', '.join(WEIGHT_FILES)} is there")


def _hub_connection_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    # snapshot_download turns "offline and not cached" into LocalEntryNotFoundError; transport
    # errors can still escape during the file downloads. OfflineModeIsEnabled is a ConnectionError.
    errors: list[type[BaseException]] = [LocalEntryNotFoundError, ConnectionError, TimeoutError]
    # huggingface_hub's HTTP client; the module name differs between releases
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def download(repo_id: str) -> Path:
    """Fetch only what an import needs (`HUB_PATTERNS`) into the hub cache;
    the local folder it is in."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise ImportError(
            f"reading {repo_id!r} from the hub needs huggingface_hub; or pass a local folder"
        ) from e
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
    except _hub_connection_errors() as e:
        why = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        )
        raise HubUnavailableError(
            f"could not download {repo_id!r} from the Hugging Face hub and it is not in "
            f"the local cache: this machine appears to be offline ({why}). Download the "
            f"model on a machine with internet, for example `hf download {repo_id} "
            f"--local-dir {repo_id.split('/')[-1]}`, copy the folder here and pass its "
            "path instead of the repo id."
        ) from e
    if not any(
        (folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise FileNotFoundError(
            f"hub repo {repo_id!r} has no model.safetensors; download its pytorch_model.bin "
            "yourself and pass the folder"
        )
    return folder


def is_repo_id(source: Any) -> bool:
    """Whether `source` reads as a hub repo id, `name` or `owner/name` with
    the hub's characters, and not as a file path (no file suffix such as
    .safetensors, no `..`, no leading `.`, `/` or `~`)."""
    if not isinstance(source, str) or not REPO_ID.fullmatch(source) or ".." in source:
        return False
    return not source.lower().endswith(FILE_SUFFIXES)


def resolve(source: PathLike) -> Path:
    """A local folder as it is, or a hub id downloaded (an existing folder
    wins over a repo id of the same name)."""
    path = Path(source)
    if path.is_dir():
        return path
    if is_repo_id(source) and not path.exists():
        return download(source)
    raise FileNotFoundError(
        f"no such file or folder: {source}" if not path.exists() else f"{source} is not a folder"
    )


def write_folder(
    folder: PathLike,
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    extra_files: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write a Hugging Face folder atomically: config.json, model.safetensors (or shards with their
    index once the tensors exceed `max_shard_bytes`) and `extra_files` (name -> text). Built in a
    temporary folder beside `folder`, then renamed onto it: a crash leaves no half-written folder.
    An existing non-empty folder is an error. Returns the names written."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists and is not an empty folder; choose a new folder to export into"
        )
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"{folder.parent} does not exist")
    with atomic_folder(folder) as tmp:  # an existing (empty) folder is replaced
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        shards: list[dict[str, Any]] = [{}]
        size = 0
        for k, v in arrays.items():
            if max_shard_bytes is not None and size and size + v.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
        names = ["config.json"]
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            names.append("model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                names.append(name)
            index = {
                "metadata": {"total_size": sum(v.nbytes for v in arrays.values())},
                "weight_map": weight_map,
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            names.append("model.safetensors.index.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
            names.append(name)
    return names
