"""`gptmod export`: a loaded model out as a Hugging Face folder or a GGUF
file, tokenizer and chat template included.

Modern configs export as `LlamaForCausalLM` (gptmod.hf_llama), classic ones as `GPT2LMHeadModel`
(gptmod.hf_gpt2), and GGUF takes Llama configs only (gptmod.gguf_llama). A config the target cannot
express is a named error from the mapper, listing its switches. Every write is atomic.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from gptmod.pretrained import Pretrained, cast

FORMATS = ("hf", "gguf")
HF_DTYPES = ("float32", "float16", "bfloat16")
GGUF_TYPES = {"float32": "f32", "float16": "f16", "q8_0": "q8_0"}


def check(
    fmt: str, out: Path, *, dtype: str = "float32", max_shard_mb: float | None = None
) -> None:
    """Every rule on the target alone, so a bad request fails before a model is read."""
    if fmt not in FORMATS:
        raise ValueError(
            f"export: --to {fmt!r}: choose one of {', '.join(FORMATS)} "
            "(--to hf DIR, --to gguf FILE)"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"export: {out.parent} does not exist")
    if fmt == "hf":
        if dtype not in HF_DTYPES:
            raise ValueError(
                f"export --to hf: dtype {dtype!r}: must be one of {', '.join(HF_DTYPES)}"
            )
        if max_shard_mb is not None and not max_shard_mb > 0:
            raise ValueError(f"export: --max-shard-mb {max_shard_mb}: must be > 0")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(
                f"{out} exists and is not an empty folder; choose a new folder to export into"
            )
        return
    if max_shard_mb is not None:
        raise ValueError("export: --max-shard-mb is for --to hf (a GGUF is one file)")
    if out.suffix != ".gguf":
        raise ValueError(f"export --to gguf {out}: the file name must end in .gguf")
    if dtype not in GGUF_TYPES:
        raise ValueError(
            f"export --to gguf: dtype {dtype!r}: must be one of {', '.join(GGUF_TYPES)}"
        )


def export(
    p: Pretrained, fmt: str, out: Path, *, dtype: str = "float32", max_shard_mb: float | None = None
) -> list[str]:
    """Write `p` as `fmt` ("hf": a new folder; "gguf": a file) at `out`; the
    names of the files written."""
    check(fmt, out, dtype=dtype, max_shard_mb=max_shard_mb)
    if fmt == "hf":
        return export_hf(p, out, dtype=dtype, max_shard_mb=max_shard_mb)
    return export_gguf(p, out, dtype=dtype)


def tokenizer_files(p: Pretrained) -> dict[str, str]:
    """The Hugging Face tokenizer files of `p` (tokenizer.json, tokenizer_config.json, ...) as
    texts, with the chat template as chat_template.jinja (where transformers 5 looks first)."""
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        for path in p.tokenizer.save_hf(d):
            files[Path(path).name] = Path(path).read_text(encoding="utf-8")
    if p.chat_template is not None:
        files["chat_template.jinja"] = p.chat_template
    return files


def generation_config(p: Pretrained) -> dict[str, Any]:
    """generation_config.json: the ids `generate` stops at and starts with,
    as the source had them."""
    out: dict[str, Any] = {"_from_model_config": False}
    if p.tokenizer.bos_id is not None:
        out["bos_token_id"] = p.tokenizer.bos_id
    if p.eos_ids:
        out["eos_token_id"] = p.eos_ids[0] if len(p.eos_ids) == 1 else list(p.eos_ids)
    return out


def export_hf(
    p: Pretrained, folder: Path, *, dtype: str = "float32", max_shard_mb: float | None = None
) -> list[str]:
    """A folder `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits."""
    from gptmod import hf

    check("hf", folder, dtype=dtype, max_shard_mb=max_shard_mb)
    if p.cfg.is_classic:
        from gptmod import hf_gpt2 as mapper

        config, tensors = mapper.config_to_hf(p.cfg), mapper.to_hf_gpt2(p.state, p.cfg)
    else:
        from gptmod import hf_llama as mapper

        config, tensors = mapper.config_to_hf(p.cfg), mapper.to_hf_llama(p.state, p.cfg)
    config["dtype"] = dtype
    if p.tokenizer.bos_id is not None:
        config["bos_token_id"] = p.tokenizer.bos_id
    if p.eos_ids:
        config["eos_token_id"] = p.eos_ids[0] if len(p.eos_ids) == 1 else list(p.eos_ids)
    extra = {
        **tokenizer_files(p),
        "generation_config.json": json.dumps(generation_config(p), indent=2) + "\n",
    }
    shard = None if max_shard_mb is None else int(max_shard_mb * 1e6)
    return hf.write_folder(
        folder, cast(tensors, dtype), config, extra_files=extra, max_shard_bytes=shard
    )


def export_gguf(p: Pretrained, path: Path, *, dtype: str = "float32") -> list[str]:
    """A GGUF file llama.cpp (and transformers' GGUF loader) reads: Llama configs, tokenizer and
    template included."""
    from gptmod import gguf_llama

    check("gguf", path, dtype=dtype)
    fields = dict(p.tokenizer.gguf_fields())
    if p.chat_template is not None:
        fields["tokenizer.chat_template"] = p.chat_template
    name = p.report.source if p.report.source not in ("", "random") else None
    gguf_llama.write(
        path, cast(p.state, "float32"), p.cfg, out_type=GGUF_TYPES[dtype], fields=fields, name=name
    )
    return [path.name]
