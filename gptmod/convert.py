"""Any model into a gptmod checkpoint (`gptmod convert`): one canonical safetensors file that
carries the config, tokenizer, chat template and end-of-sequence ids.

GPT-2 sources map into any gptmod config (`gptmod.hf_gpt2`): exactly into the classic presets,
partially into modern ones, with a `TransferReport` saved beside the checkpoint as
FILE.transfer.json. Every other source keeps its own config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptmod import hf_gpt2, pretrained, weights
from gptmod.config import ModelConfig, load_preset
from gptmod.transfer import TransferReport


@dataclass
class Converted:
    """What `convert` wrote: the checkpoint's config and parameter count, what was read (one line
    or the transfer table), and the transfer report with its JSON path for a GPT-2 source."""

    path: Path
    cfg: ModelConfig
    parameters: int
    read: str
    transfer: TransferReport | None = None
    transfer_path: Path | None = None


def is_gptmod_file(path: Path) -> bool:
    """Whether a .safetensors file is a gptmod checkpoint (its metadata holds a config)."""
    try:
        return "gptmod_config" in weights.read_metadata(path)
    except ValueError:
        return False


def _check_out(out: Path) -> None:
    """Refuse a checkpoint path that is not a .safetensors file in an existing folder."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the file name must end in .safetensors")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")


def convert(
    source: str,
    out: Path,
    *,
    target: ModelConfig | None = None,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> Converted:
    """Read `source` (anything `pretrained.load` reads, or a bare GPT-2 .safetensors/.bin file),
    map a GPT-2 source into `target` (default: its own config; `seed` draws the few new tensors),
    cast to `dtype` and write `out` atomically. A non-GPT-2 source refuses another `target`."""
    _check_out(out)
    path = Path(source)
    # A bare GPT-2 weight file (no config.json beside it) is GPT-2 by convention; anything else is
    # read by the loader, which tells its format.
    bare = path.is_file() and path.suffix in (".bin", ".safetensors") and not is_gptmod_file(path)
    p = None if bare else pretrained.load(source)
    meta = {"source": str(source)}
    transfer = None
    if p is None or p.report.format == "hf-gpt2":
        cfg = target or (p.cfg if p is not None else load_preset("gpt2"))
        state, transfer = hf_gpt2.from_hf_gpt2(
            p.report.path if p is not None else path,
            cfg,
            seed=seed,
            progress=_bar(len(weights.canonical_shapes(cfg))) if progress else None,
        )
        read = transfer.to_text()
        meta["transfer"] = transfer.summary()
    else:
        if target is not None and target != p.cfg:
            raise ValueError(
                f"--preset/--config: {source} is a {p.report.format} model with its own "
                "config; only GPT-2 sources transfer into another config"
            )
        cfg, state, read = p.cfg, p.state, p.report.summary()
        meta |= pretrained.checkpoint_metadata(p)
    state = pretrained.cast(state, dtype)
    weights.save(out, state, cfg, metadata=meta)
    done = Converted(out, cfg, sum(int(np.prod(v.shape)) for v in state.values()), read, transfer)
    if transfer is not None:
        done.transfer_path = out.with_name(out.name.removesuffix(".safetensors") + ".transfer.json")
        transfer.save(done.transfer_path)
    return done


def _bar(n: int) -> Callable[[Iterable[str]], Iterable[str]]:
    from tqdm import tqdm

    return lambda it: tqdm(it, total=n, desc="transfer", unit="tensor")
