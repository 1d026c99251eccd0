"""A scripted sweep of bad command-line inputs: every `gptmod` subcommand fed bad numbers, missing
and wrong files, corrupt checkpoints, bad --weights specs and conflicting flags, each in its own
`python -m gptmod.cli` subprocess.

The CLI contract (docs/DESIGN.md): an expected failure is one line on stderr and exit code 2, never
a traceback; Ctrl-C exits 130. Each probe records its exit code and whether stderr holds
"Traceback"; a probe fails when it shows a traceback, times out, or exits with a code other than the
one it expects (2, or 0 for the few probes that must succeed). Runs offline (HF_HUB_OFFLINE=1) in a
temporary folder, on tiny fixtures.

    python scripts/cli_error_sweep.py [--jobs 2] [--only SUBSTRING] [--verbose]

Exit status: 0 when every probe passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Probe:
    """One CLI call: `argv` after `gptmod`, the exit code it must give, and
    its stdin (None: empty)."""

    name: str
    argv: tuple[str, ...]
    expect: int = 2
    stdin: str | None = None
    timeout: float = 120.0


@dataclass
class Result:
    probe: Probe
    rc: int | None  # None: timed out
    traceback: bool
    first_line: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == self.probe.expect and not self.traceback


# ----------------------------------------------------------------------------- fixtures
# (tests/test_cli_hardening.py builds its checkpoints with these too)


def tiny_cfg(**overrides):
    from gptmod.config import load_preset

    small = dict(d_model=16, n_head=2, n_kv_head=2, d_ff=32, n_layer=1, max_seq_len=64)
    return dataclasses.replace(load_preset("tiny"), **{**small, **overrides})


def random_state(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    from gptmod import weights

    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(s) * 0.02).astype(np.float32)
        if len(s) == 2
        else np.ones(s, np.float32)
        for k, s in weights.canonical_shapes(cfg).items()
    }


def raw_checkpoint(path: Path, state: dict[str, np.ndarray], cfg, **meta: str) -> Path:
    """A gptmod-format file written past `weights.save`'s checks (bad
    dtypes, NaN), as a foreign tool might."""
    from safetensors.numpy import save_file

    from gptmod import weights

    save_file(
        state,
        str(path),
        metadata={"format": weights.FORMAT, "gptmod_config": cfg.to_json(), **meta},
    )
    return path


def run_folder(run: Path, state: dict[str, np.ndarray], cfg, log: str) -> Path:
    """A training run as `gptmod train` lays it out (gptmod.training.save_checkpoint), written by
    hand: step_0000002/ (the model, trainer.json), latest, and `log` as log.jsonl."""
    from gptmod import weights

    step = run / "step_0000002"
    step.mkdir(parents=True)
    weights.save(step / "model.safetensors", state, cfg, metadata={"step": "2"})
    (step / "trainer.json").write_text(
        json.dumps({"format": "gptmod-train-v1", "step": 2, "framework": "torch"})
    )
    (run / "latest").write_text("step_0000002\n")
    (run / "log.jsonl").write_text(log)
    return run


def make_fixtures(d: Path) -> None:
    """Every file the probes read, in `d` (cheap: a 1-layer, 16-wide model)."""
    import torch

    from gptmod import weights

    cfg = tiny_cfg()
    state = random_state(cfg)
    weights.save(d / "tiny.safetensors", state, cfg)
    llama = tiny_cfg(logit_softcap=None)  # what a Llama (HF export) can express
    weights.save(d / "llama.safetensors", random_state(llama), llama)
    # Padded vocabulary: untied head whose real-token rows are 0 and padding
    # rows +-v, so greedy picks a padding id.
    pad_cfg = tiny_cfg(vocab_size=50304, tie_embeddings=False)
    pad = random_state(pad_cfg)
    v = np.random.default_rng(1).standard_normal(pad_cfg.d_model).astype(np.float32)
    pad["lm_head.weight"][:50257] = 0
    pad["lm_head.weight"][50257::2], pad["lm_head.weight"][50258::2] = v, -v
    weights.save(d / "pad.safetensors", pad, pad_cfg)
    small_cfg = tiny_cfg(vocab_size=300)  # no tokenizer: cannot read a text prompt
    weights.save(d / "small-vocab.safetensors", random_state(small_cfg), small_cfg)
    classic = tiny_cfg(**_classic())
    weights.save(d / "classic.safetensors", random_state(classic), classic)
    # HF GPT-2 folders with one broken side file each (the weights themselves are fine).
    from gptmod import hf, hf_gpt2

    hf_tensors, hf_config = (
        hf_gpt2.to_hf_gpt2(random_state(classic), classic),
        hf_gpt2.config_to_hf(classic),
    )
    broken = {
        "hf-bad-tokenizer": {"tokenizer.json": "{not json"},
        "hf-bad-tokenizer-config": {"tokenizer.json": "", "tokenizer_config.json": "{not json"},
        "hf-latin1-template": {"chat_template.jinja": "caf\xe9"},
        "hf-ok": {},
    }
    for name, files in broken.items():
        hf.write_folder(d / name, hf_tensors, hf_config)
        for file, text in files.items():
            (d / name / file).write_bytes(text.encode("latin-1"))
    (d / "hf-bad-tokenizer-config" / "tokenizer.json").unlink()
    (d / "hf-latin1-config").mkdir()
    (d / "hf-latin1-config" / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    raw_checkpoint(
        d / "nan.safetensors",
        {**state, "norm.weight": np.full_like(state["norm.weight"], np.nan)},
        cfg,
    )
    raw_checkpoint(d / "f64.safetensors", {k: v.astype(np.float64) for k, v in state.items()}, cfg)
    raw_checkpoint(
        d / "int8.safetensors",
        {**state, "tok_emb.weight": state["tok_emb.weight"].astype(np.int8)},
        cfg,
    )
    raw_checkpoint(
        d / "wrong-shape.safetensors", {**state, "norm.weight": np.ones(3, np.float32)}, cfg
    )
    from safetensors.numpy import save_file

    save_file(
        state,
        str(d / "bad-config.safetensors"),
        metadata={"format": weights.FORMAT, "gptmod_config": "{no"},
    )
    save_file(
        state,
        str(d / "foreign-config.safetensors"),
        metadata={"format": weights.FORMAT, "gptmod_config": json.dumps({"vocab_size": -4})},
    )
    save_file({"x": np.zeros(2, np.float32)}, str(d / "not-gptmod.safetensors"))
    raw = (d / "tiny.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.safetensors").write_bytes(os.urandom(256))
    (d / "empty.safetensors").write_bytes(b"")
    (d / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(200))
    (d / "garbage.bin").write_bytes(os.urandom(300))
    torch.save({"wte.weight": torch.zeros(2), "x": _Payload()}, d / "evil.bin")
    (d / "evil").mkdir()
    torch.save({"wte.weight": torch.zeros(2), "x": _Payload()}, d / "evil" / "pytorch_model.bin")
    (d / "evil" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 2}))
    configs = {
        "badjson": "{not json",
        "listjson": "[1, 2]",
        "llama-noweights": '{"model_type": "llama"}',
    }
    for name, text in configs.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(text)
    (d / "emptydir").mkdir()
    run_folder(
        d / "run",
        state,
        cfg,
        '{"step": 1, "loss": 10.0}\n{"step": 2, "loss": 9.0, "val_loss": 9.5}\n',
    )
    dangling = d / "run-dangling"
    dangling.mkdir()
    (dangling / "latest").write_text("step_0000009\n")
    (d / "run-steps-only" / "step_0000001").mkdir(parents=True)
    # Text inputs.
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    (d / "prompts.txt").write_text("one\ntwo\n")
    (d / "blank.txt").write_text("\n\n")
    (d / "empty.txt").write_text("")
    (d / "ok.txt").write_text("To be, or not to be, that is the question.\n" * 4)
    os.mkfifo(d / "fifo.txt")
    (d / "bad.json").write_text("{not json")
    (d / "cfg-bad-value.json").write_text(json.dumps({"n_layer": 0}))
    (d / "bad-log.jsonl").write_text("not json\n")
    (d / "nonempty-dir").mkdir()
    (d / "nonempty-dir" / "x").write_text("x")
    (d / "data-bad").mkdir()
    (d / "data-bad" / "manifest.json").write_text('{"format": "nope"}')
    (d / "data-nokeys").mkdir()
    (d / "data-nokeys" / "manifest.json").write_text("{}")


def _classic() -> dict:
    return dict(
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        logit_softcap=None,
        n_kv_head=2,
        d_ff=64,
    )


class _Payload:
    """Not a tensor: torch's weights_only unpickler refuses it."""


# ----------------------------------------------------------------------------- probes


def probes() -> list[Probe]:
    """Every probe, grouped by subcommand. Paths are relative to the fixture
    folder (the probes' cwd)."""
    out: list[Probe] = []

    def add(
        name: str, *argv: str, expect: int = 2, stdin: str | None = None, timeout: float = 120.0
    ) -> None:
        out.append(Probe(name, tuple(argv), expect, stdin, timeout))

    tiny = ("--weights", "tiny.safetensors")
    gen = ("generate", *tiny, "--prompt", "hi", "--max-new-tokens", "2")
    # ---- top level
    add("version", "--version", expect=0)
    add("no command")
    add("unknown command", "frobnicate")
    add("help", "--help", expect=0)
    # ---- generate: numbers
    add("generate ok", *gen, expect=0)
    for flag, values in {
        "--max-new-tokens": ("0", "-1", "abc", "1e3", "1000000000"),
        "--temperature": ("-1", "nan", "inf", "abc"),
        "--top-k": ("0", "-5", "1.5"),
        "--top-p": ("0", "1.5", "nan", "-0.1"),
        "--min-p": ("2", "-1", "nan"),
        "--seed": ("-1", str(2**63), str(2**64), "abc", "1.0"),
    }.items():
        for v in values:
            add(f"generate {flag} {v}", *gen, flag, v)
    # ---- generate: inputs and flags
    add("generate no prompt", "generate", *tiny)
    add(
        "generate prompt and batch file",
        "generate",
        *tiny,
        "--prompt",
        "x",
        "--batch-file",
        "prompts.txt",
    )
    add("generate empty prompt", "generate", *tiny, "--prompt", "")
    add("generate batch-file missing", "generate", *tiny, "--batch-file", "missing.txt")
    add("generate batch-file dir", "generate", *tiny, "--batch-file", "emptydir")
    add("generate batch-file fifo", "generate", *tiny, "--batch-file", "fifo.txt", timeout=30)
    add("generate batch-file latin1", "generate", *tiny, "--batch-file", "latin1.txt")
    add("generate batch-file blank", "generate", *tiny, "--batch-file", "blank.txt")
    add(
        "generate batch-file ok",
        "generate",
        *tiny,
        "--batch-file",
        "prompts.txt",
        "--max-new-tokens",
        "2",
        expect=0,
    )
    pad = ("--weights", "pad.safetensors", "--prompt", "hi", "--max-new-tokens", "3")
    add("generate padded vocab (jax)", "generate", *pad)
    add("generate padded vocab (torch)", "generate", "--framework", "torch", *pad)
    add(
        "generate padded vocab batch",
        "generate",
        "--weights",
        "pad.safetensors",
        "--batch-file",
        "prompts.txt",
        "--max-new-tokens",
        "3",
    )
    add(
        "generate small vocab, no tokenizer",
        "generate",
        "--weights",
        "small-vocab.safetensors",
        "--prompt",
        "x",
    )
    add("generate unknown backend torch", *gen, "--framework", "torch", "--backend", "nope")
    add("generate unknown backend jax", *gen, "--backend", "nope")
    add("generate --compile with jax", *gen, "--compile")
    add("generate --mesh bogus", *gen, "--mesh", "bogus")
    add("generate --mesh too many devices", *gen, "--mesh", "data=3")
    add("generate --mesh zero", *gen, "--mesh", "data=0")
    add("generate --mesh torch", *gen, "--framework", "torch", "--mesh", "data=1")
    add("generate --rule without =", *gen, "--mesh", "data=1", "--rule", "vocab")
    add("generate --rule unknown axis", *gen, "--mesh", "data=1", "--rule", "nope=model")
    add("generate --rules without mesh", *gen, "--rules", "tp")
    add("generate --preset mismatch", *gen, "--preset", "gpt2")
    add("generate --preset unknown", "generate", "--preset", "nope", "--prompt", "x")
    add("generate --dtype unknown", *gen, "--dtype", "float64")
    # ---- --weights specs (generate and info)
    for spec in (
        "nope.safetensors",
        "nope.gguf",
        "nope.bin",
        "./nope",
        "~/nope-gptmod",
        "/nonexistent/x",
        "a/b/c",
        "bad name!",
        "emptydir",
        "run-dangling",
        "run-steps-only",
        "badjson",
        "listjson",
        "llama-noweights",
        "evil",
        "garbage.safetensors",
        "truncated.safetensors",
        "empty.safetensors",
        "not-gptmod.safetensors",
        "bad-config.safetensors",
        "foreign-config.safetensors",
        "wrong-shape.safetensors",
        "f64.safetensors",
        "int8.safetensors",
        "garbage.gguf",
        "garbage.bin",
        "evil.bin",
        "latin1.txt",
        "fifo.txt",
        "gpt2",
        "owner/name",
    ):
        add(
            f"generate --weights {spec}",
            "generate",
            "--weights",
            spec,
            "--prompt",
            "x",
            "--max-new-tokens",
            "1",
            timeout=60,
        )
    for spec in (
        "nope.safetensors",
        "emptydir",
        "garbage.safetensors",
        "int8.safetensors",
        "evil",
        "gpt2",
    ):
        add(f"info --weights {spec}", "info", "--weights", spec)
    for spec in (
        "hf-bad-tokenizer",
        "hf-bad-tokenizer-config",
        "hf-latin1-template",
        "hf-latin1-config",
    ):
        add(f"info --weights {spec}", "info", "--weights", spec)
    add("info hf-ok", "info", "--weights", "hf-ok", expect=0)
    one_token = ("--prompt", "x", "--max-new-tokens", "1")
    add("generate run folder", "generate", "--weights", "run", *one_token, expect=0)
    add("generate step folder", "generate", "--weights", "run/step_0000002", *one_token, expect=0)
    add(
        "generate nan checkpoint (warns)",
        "generate",
        "--weights",
        "nan.safetensors",
        *one_token,
        expect=0,
    )
    # ---- info
    add("info ok", "info", "tiny.safetensors", expect=0)
    add("info run folder", "info", "run", expect=0)
    add("info step folder", "info", "--weights", "run/step_0000002", expect=0)
    add("info nothing", "info")
    add("info both", "info", "tiny.safetensors", "--weights", "tiny.safetensors")
    add("info random", "info", "--weights", "random")
    add("info dir", "info", "emptydir")
    add("info fifo", "info", "fifo.txt", timeout=30)
    add("info missing", "info", "missing.safetensors")
    add("info wrong shape", "info", "wrong-shape.safetensors")
    # ---- convert
    conv = ("convert", "--from", "tiny.safetensors")
    add("convert ok", *conv, "--out", "out.safetensors", expect=0)
    add("convert out not .safetensors", *conv, "--out", "out.bin")
    add("convert out folder missing", *conv, "--out", "nodir/out.safetensors")
    add("convert out is a dir", *conv, "--out", "emptydir")
    add("convert missing --out", *conv)
    add(
        "convert --preset and --config",
        *conv,
        "--preset",
        "gpt2",
        "--config",
        "bad.json",
        "--out",
        "o.safetensors",
    )
    add(
        "convert --config bad json",
        "convert",
        "--from",
        "evil",
        "--config",
        "bad.json",
        "--out",
        "o.safetensors",
    )
    add(
        "convert --config missing",
        "convert",
        "--from",
        "evil",
        "--config",
        "missing.json",
        "--out",
        "o.safetensors",
    )
    add(
        "convert --config bad value",
        "convert",
        "--from",
        "evil",
        "--config",
        "cfg-bad-value.json",
        "--out",
        "o.safetensors",
    )
    add("convert gptmod into preset", *conv, "--preset", "gpt2", "--out", "o.safetensors")
    add("convert --dtype unknown", *conv, "--dtype", "int8", "--out", "o.safetensors")
    add("convert --seed -1", *conv, "--seed", "-1", "--out", "o.safetensors")
    for src in (
        "garbage.safetensors",
        "evil.bin",
        "garbage.bin",
        "evil",
        "latin1.txt",
        "nope.safetensors",
        "nan.safetensors",
        "int8.safetensors",
    ):
        add(f"convert --from {src}", "convert", "--from", src, "--out", "o.safetensors")
    # ---- export
    add(
        "export hf ok",
        "export",
        "--weights",
        "llama.safetensors",
        "--to",
        "hf",
        "exported",
        expect=0,
    )
    add("export hf softcap", "export", *tiny, "--to", "hf", "softcapped")
    add("export unknown format", "export", *tiny, "--to", "onnx", "x.onnx")
    add("export hf into non-empty dir", "export", *tiny, "--to", "hf", "nonempty-dir")
    add(
        "export gguf of a classic config",
        "export",
        "--weights",
        "classic.safetensors",
        "--to",
        "gguf",
        "x.gguf",
    )
    add("export hf q8_0", "export", *tiny, "--to", "hf", "q8dir", "--dtype", "q8_0")
    add("export gguf bfloat16", "export", *tiny, "--to", "gguf", "x.gguf", "--dtype", "bfloat16")
    add("export --max-shard-mb 0", "export", *tiny, "--to", "hf", "shard0", "--max-shard-mb", "0")
    add(
        "export --max-shard-mb nan",
        "export",
        *tiny,
        "--to",
        "hf",
        "shardnan",
        "--max-shard-mb",
        "nan",
    )
    add(
        "export --max-shard-mb -1",
        "export",
        *tiny,
        "--to",
        "hf",
        "shardneg",
        "--max-shard-mb",
        "-1",
    )
    add("export parent missing", "export", *tiny, "--to", "hf", "nodir/sub")
    add("export gguf into a dir", "export", *tiny, "--to", "gguf", "emptydir")
    add("export missing weights", "export", "--weights", "nope.safetensors", "--to", "hf", "x")
    add("export random", "export", "--weights", "random", "--to", "hf", "rnd")
    # ---- transfer-report (no GPT-2 offline: every probe fails before scoring)
    tr = ("transfer-report", "--weights", "gpt2")
    for text in ("latin1.txt", "fifo.txt", "emptydir", "missing.txt", "empty.txt"):
        add(f"transfer-report --text {text}", *tr, "--text", text, timeout=60)
    add("transfer-report offline hub", *tr)
    add("transfer-report --tokens 0", *tr, "--tokens", "0")
    add("transfer-report --seq-len 0", *tr, "--seq-len", "0")
    add("transfer-report --batch 0", *tr, "--batch", "0")
    add("transfer-report --seed 2**63", *tr, "--seed", str(2**63))
    add("transfer-report --preset and --config", *tr, "--preset", "gpt2", "--config", "bad.json")
    add("transfer-report gptmod checkpoint", "transfer-report", *tiny)
    add("transfer-report missing weights", "transfer-report", "--weights", "nope.safetensors")
    # ---- side-by-side
    add("side-by-side folder missing", "side-by-side", "--out", "nodir/x.html")
    add("side-by-side out is a dir", "side-by-side", "--out", "emptydir")
    add("side-by-side no --out", "side-by-side")
    # ---- prepare
    for inp in ("missing.txt", "latin1.txt", "fifo.txt", "emptydir", "empty.txt"):
        add(f"prepare --input {inp}", "prepare", "--input", inp, "--out", f"data-{inp}", timeout=60)
    for v in ("1.5", "-0.1", "nan", "1"):
        add(
            f"prepare --val-fraction {v}",
            "prepare",
            "--input",
            "ok.txt",
            "--out",
            "d",
            "--val-fraction",
            v,
        )
    add(
        "prepare --out existing non-data dir",
        "prepare",
        "--input",
        "ok.txt",
        "--out",
        "nonempty-dir",
    )
    add("prepare --out is a file", "prepare", "--input", "ok.txt", "--out", "ok.txt")
    # ---- train (all fail before a step)
    trn = ("train", "--preset", "tiny", "--out", "trainrun")
    add("train data missing", *trn, "--data", "nodata")
    add("train data empty dir", *trn, "--data", "emptydir")
    add("train data bad manifest", *trn, "--data", "data-bad")
    add("train manifest lacks keys", *trn, "--data", "data-nokeys")
    for flag, v in (
        ("--steps", "0"),
        ("--steps", "-1"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--eps", "0"),
        ("--batch-size", "0"),
        ("--block-size", "100000"),
        ("--beta1", "1"),
        ("--dtype", "int8"),
        ("--warmup-steps", "5000"),
        ("--seed", "-1"),
        ("--steps", "abc"),
    ):
        add(f"train {flag} {v}", *trn, "--data", "data-bad", flag, v)
    add("train --init missing", *trn, "--data", "data-bad", "--init", "nope.safetensors")
    bad_config = ("--config", "bad.json", "--data", "data-bad", "--out", "trainrun")
    add("train --preset and --config", "train", "--preset", "tiny", *bad_config)
    add("train --config bad json", "train", *bad_config)
    add(
        "train --parallel without torchrun",
        *trn,
        "--data",
        "data-bad",
        "--framework",
        "torch",
        "--parallel",
        "ddp",
    )
    add(
        "train --mesh with torch",
        *trn,
        "--data",
        "data-bad",
        "--framework",
        "torch",
        "--mesh",
        "data=1",
    )
    # ---- plot
    add("plot missing log", "plot", "missing.jsonl", "--out", "x.png")
    add("plot bad log", "plot", "bad-log.jsonl", "--out", "x.png")
    add("plot latin1 log", "plot", "latin1.txt", "--out", "x.png")
    add("plot empty dir", "plot", "emptydir", "--out", "x.png")
    add("plot fifo", "plot", "fifo.txt", "--out", "x.png", timeout=30)
    add("plot out folder missing", "plot", "run", "--out", "nodir/x.png")
    # ---- chat (stdin empty)
    add("chat no template", "chat", *tiny, stdin="")
    add("chat missing weights", "chat", "--weights", "nope.gguf", stdin="")
    add("chat --seed -1", "chat", *tiny, "--seed", "-1", stdin="")
    add("chat --max-new-tokens 0", "chat", *tiny, "--max-new-tokens", "0", stdin="")
    add("chat --max-context 0", "chat", *tiny, "--max-context", "0", stdin="")
    add("chat --temperature -1", "chat", *tiny, "--temperature", "-1", stdin="")
    # ---- parity, bench, gpu-check (delegated parsers)
    add("parity --help", "parity", "--help", expect=0)
    add("parity --seq-len 0", "parity", "--seq-len", "0")
    add("parity --seed -1", "parity", "--seed", "-1")
    add("parity --preset unknown", "parity", "--preset", "nope")
    add("parity --tf32 on cpu", "parity", "--tf32")
    add("parity --inject-fault bad", "parity", "--inject-fault", "nope")
    add("parity --html without --trace", "parity", "--html", "x.html")
    add("bench --batch 0", "bench", "--batch", "0")
    add("bench --config missing", "bench", "--config", "missing.json")
    add("bench --frameworks bogus", "bench", "--frameworks", "bogus")
    add("bench --new-tokens -1", "bench", "--new-tokens", "-1")
    add("gpu-check --timeout-scale 0", "gpu-check", "--timeout-scale", "0")
    add("gpu-check --only nope", "gpu-check", "--only", "nope")
    add("gpu-check --dry-run", "gpu-check", "--dry-run", "--out", "gc", expect=0)
    return out


# ----------------------------------------------------------------------------- running


def run_probe(probe: Probe, cwd: Path) -> Result:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "default",
    }
    start = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "gptmod.cli", *probe.argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            input=probe.stdin or "",
            timeout=probe.timeout,
            env=env,
        )
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = (
            None,
            (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""),
        )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln or "Error" in ln), lines[-1] if lines else "")
    return Result(probe, rc, "Traceback" in err, first.strip()[:160], time.perf_counter() - start)


def summarize(results: list[Result]) -> str:
    failing = [r for r in results if not r.ok]
    tracebacks = sum(r.traceback for r in results)
    wrong_rc = sum(r.rc != r.probe.expect for r in results if r.probe.expect != 0)
    bad_successes = sum(r.rc != 0 for r in results if r.probe.expect == 0)
    timeouts = sum(r.rc is None for r in results)
    lines = [
        "| probes run | tracebacks | rc != expected 2 | expected successes failing | timeouts |",
        "|---|---|---|---|---|",
        f"| {len(results)} | {tracebacks} | {wrong_rc} | {bad_successes} | {timeouts} |",
    ]
    if failing:
        lines += ["", "failing probes:"]
        for r in failing:
            why = "timeout" if r.rc is None else f"rc {r.rc} (expected {r.probe.expect})"
            tb = ", traceback" if r.traceback else ""
            lines.append(
                f"  - {r.probe.name}: {why}{tb}: gptmod "
                f"{' '.join(r.probe.argv)}\n      {r.first_line}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cli_error_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="probes run at once (default 2)")
    p.add_argument("--only", help="run only the probes whose name contains this")
    p.add_argument(
        "--verbose", action="store_true", help="print every probe's result, not only the failures"
    )
    args = p.parse_args(argv)
    selected = [pr for pr in probes() if args.only is None or args.only in pr.name]
    with tempfile.TemporaryDirectory(prefix="gptmod-sweep-") as tmp:
        cwd = Path(tmp)
        make_fixtures(cwd)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda pr: run_probe(pr, cwd), selected))
    if args.verbose:
        for r in results:
            mark = "ok  " if r.ok else "FAIL"
            print(f"{mark} rc={r.rc} {r.seconds:5.1f}s {r.probe.name}: {r.first_line}")
        print()
    print(summarize(results))
    print(f"\n{len(results)} probes in {time.perf_counter() - start:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
