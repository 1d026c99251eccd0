"""The `gptmod` command, driven as a user would: a subprocess, its output and its exit code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gptmod import weights
from gptmod.config import load_preset


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptmod.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_generate_streams_prompt_and_continuation(framework):
    r = run("generate", "--framework", framework, "--preset", "tiny", "--prompt", "Hello world",
            "--max-new-tokens", "6", "--no-eos")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world") and len(r.stdout) > len("Hello world\n")
    assert "6 tokens in" in r.stderr and "tokens/s" in r.stderr


def test_same_greedy_text_from_both_frameworks_on_a_checkpoint(tmp_path):
    import torch

    import gptmod_torch

    cfg = load_preset("tiny")
    torch.manual_seed(0)
    state = {k: v * 8 if v.ndim == 2 else v for k, v in gptmod_torch.export_state(gptmod_torch.GPT(cfg)).items()}
    weights.save(tmp_path / "m.safetensors", state, cfg)
    outs = [run("generate", "--framework", fw, "--weights", str(tmp_path / "m.safetensors"), "--prompt", "The king",
                "--max-new-tokens", "16", "--no-eos") for fw in ("jax", "torch")]  # fmt: skip
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout
    info = run("info", str(tmp_path / "m.safetensors"))
    assert info.returncode == 0 and f"parameters: {cfg.num_params():,}" in info.stdout and "float32" in info.stdout


def test_batch_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt\n\nA second, longer prompt here\n")
    r = run("generate", "--preset", "tiny", "--batch-file", str(prompts), "--max-new-tokens", "4", "--no-eos")
    assert r.returncode == 0, r.stderr
    assert "--- [0] First prompt" in r.stdout and "--- [1] A second, longer prompt here" in r.stdout


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["generate", "--preset", "tiny", "--prompt", "x", "--top-p", "2"], "top_p=2.0: must be in (0, 1]"),
        (["generate", "--preset", "tiny", "--prompt", "x", "--max-new-tokens", "300"], "exceeds the cache capacity"),
        (["generate", "--preset", "tiny"], "give exactly one of --prompt TEXT or --batch-file FILE"),
        (["generate", "--preset", "tiny", "--prompt", "x", "--backend", "sdpa"], "'sdpa' is not a jax backend"),
        (["generate", "--weights", "no/such/dir/x", "--prompt", "x"], "no such file or folder"),
        (["info", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    ],
)
def test_errors_are_one_line_without_traceback(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(100))
    r = run("info", str(bad))
    assert r.returncode == 2 and "not a valid safetensors file" in r.stderr and "Traceback" not in r.stderr


def test_help_is_complete():
    r = run("generate", "--help")
    for flag in ("--framework", "--preset", "--weights", "--prompt", "--batch-file", "--max-new-tokens",
                 "--temperature", "--top-k", "--top-p", "--min-p", "--seed", "--compile"):  # fmt: skip
        assert flag in r.stdout
    assert run("--help").returncode == 0
