"""The `gptmod` command, driven as a user would: its arguments, output and exit code. Calls run
in-process (conftest.cli); one test runs the command as a process, for the exit status it gives
the shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from gptmod import hf_gpt2, weights
from gptmod.config import ModelConfig, load_preset

from conftest import cli


def test_the_command_as_a_process_exits_0_or_2_with_one_line():
    """`python -m gptmod.cli` as a process: what main() returns is the exit status the shell sees,
    and an error is one line on stderr, with no traceback."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gptmod.cli", *args], capture_output=True, text=True, timeout=300
        )

    ok = run(
        "generate",
        "--framework",
        "torch",
        "--preset",
        "tiny",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--no-eos",
    )
    assert ok.returncode == 0 and ok.stdout.startswith("Hi"), ok.stderr
    bad = run("info", "missing.safetensors")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "gptmod info: error: checkpoint not found: missing.safetensors: no such file"
    )


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_generate_streams_prompt_and_continuation(framework, capsys):
    r = cli(
        capsys,
        "generate",
        "--framework",
        framework,
        "--preset",
        "tiny",
        "--prompt",
        "Hello world",
        "--max-new-tokens",
        "6",
        "--no-eos",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world") and len(r.stdout) > len("Hello world\n")
    assert "6 tokens in" in r.stderr and "tokens/s" in r.stderr


def test_same_greedy_text_from_both_frameworks_on_a_checkpoint(tmp_path, capsys):
    import torch

    import gptmod_torch

    cfg = load_preset("tiny")
    torch.manual_seed(0)
    state = {
        k: v * 8 if v.ndim == 2 else v
        for k, v in gptmod_torch.export_state(gptmod_torch.GPT(cfg)).items()
    }
    weights.save(tmp_path / "m.safetensors", state, cfg)
    outs = [
        cli(
            capsys,
            "generate",
            "--framework",
            fw,
            "--weights",
            str(tmp_path / "m.safetensors"),
            "--prompt",
            "The king",
            "--max-new-tokens",
            "16",
            "--no-eos",
        )
        for fw in ("jax", "torch")
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout
    info = cli(capsys, "info", str(tmp_path / "m.safetensors"))
    assert (
        info.returncode == 0
        and f"parameters: {cfg.num_params():,}" in info.stdout
        and "float32" in info.stdout
    )


def test_batch_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt\n\nA second, longer prompt here\n")
    r = cli(
        capsys,
        "generate",
        "--preset",
        "tiny",
        "--batch-file",
        str(prompts),
        "--max-new-tokens",
        "4",
        "--no-eos",
    )
    assert r.returncode == 0, r.stderr
    assert "--- [0] First prompt" in r.stdout and "--- [1] A second, longer prompt here" in r.stdout


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (
            ["generate", "--preset", "tiny", "--prompt", "x", "--top-p", "2"],
            "top_p=2.0: must be in (0, 1]",
        ),
        (
            ["generate", "--preset", "tiny", "--prompt", "x", "--max-new-tokens", "300"],
            "exceeds the cache capacity",
        ),
        (
            ["generate", "--preset", "tiny"],
            "give exactly one of --prompt TEXT or --batch-file FILE",
        ),
        (
            ["generate", "--preset", "tiny", "--prompt", "x", "--backend", "sdpa"],
            "'sdpa' is not a jax backend",
        ),
        (["generate", "--weights", "no/such/dir/x", "--prompt", "x"], "no such file or folder"),
        (["info", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
        (["train", "--data", "nowhere", "--out", "r"], "--data nowhere: no manifest.json there"),
        (
            ["train", "--data", ".", "--out", "r", "--block-size", "4096"],
            "exceeds the model's max_seq_len=256",
        ),
        (
            ["train", "--data", ".", "--out", "r", "--lr", "-1"],
            "TrainConfig.lr=-1.0: must be a finite number >= 0",
        ),
        (["prepare", "--input", "missing.txt", "--out", "d"], "missing.txt"),
        (["plot", "nolog.jsonl"], "no training log at nolog.jsonl"),
    ],
)
def test_errors_are_one_line_without_traceback(args, msg, capsys):
    r = cli(capsys, *args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(100))
    r = cli(capsys, "info", str(bad))
    assert (
        r.returncode == 2
        and "not a valid safetensors file" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_help_is_complete(capsys):
    r = cli(capsys, "generate", "--help")
    for flag in (
        "--framework",
        "--preset",
        "--weights",
        "--prompt",
        "--batch-file",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--seed",
        "--compile",
    ):
        assert flag in r.stdout
    assert cli(capsys, "--help").returncode == 0


def test_help_is_complete_for_every_command(capsys):
    from gptmod.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {
        "generate",
        "chat",
        "convert",
        "info",
        "export",
        "transfer-report",
        "side-by-side",
        "prepare",
        "train",
        "eval",
        "plot",
        "parity",
        "bench",
        "gpu-check",
    }
    for name, p in sub.choices.items():
        # their own parsers (gpu-check's: tests/test_gpu_check.py)
        if name in ("parity", "bench", "gpu-check"):
            continue
        r = cli(capsys, name, "--help")
        assert r.returncode == 0 and p.description, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            assert (action.option_strings or [action.dest])[0] in r.stdout, (name, action.dest)
    r = cli(capsys, "parity", "--help")
    assert r.returncode == 0 and "--inject-fault" in r.stdout


def test_model_choice_is_one_option_set_in_every_command(tmp_path):
    """--preset goes with --config wherever a command takes a model config (gptmod.options), both
    are refused together, and a config file is read the same by every command."""
    from gptmod import options
    from gptmod.bench.__main__ import build_parser as bench_parser
    from gptmod.cli import build_parser
    from gptmod.config import load_preset
    from gptmod.parity.__main__ import build_parser as parity_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: sub.choices[name] for name in ("generate", "convert", "transfer-report")}
    parsers |= {name: sub.choices[name] for name in ("train", "eval")}
    parsers |= {"bench": bench_parser(), "parity": parity_parser()}
    for name, parser in parsers.items():
        flags = {f for a in parser._actions for f in a.option_strings}
        assert {"--preset", "--config"} <= flags, name
    path = tmp_path / "small.json"
    load_preset("tiny").to_json(path)
    train = sub.choices["train"]
    args = train.parse_args(["--data", "d", "--out", "o", "--config", str(path)])
    assert options.model_config(args, "shakespeare-small") == load_preset("tiny")
    args = train.parse_args(["--data", "d", "--out", "o"])
    assert options.model_config(args, "shakespeare-small") == load_preset("shakespeare-small")
    args = train.parse_args(["--data", "d", "--out", "o", "--preset", "gpt2", "--config", "x"])
    with pytest.raises(options.CLIError, match="give --preset or --config, not both"):
        options.model_config(args, None)
    args = train.parse_args(["--data", "d", "--out", "o", "--config", str(tmp_path / "no.json")])
    with pytest.raises(options.CLIError, match=r"--config .*no.json: no such file"):
        options.model_config(args, None)
    args = parity_parser().parse_args(["--preset", "gpt2", "--config", str(path)])
    got = options.model_configs(args, ("tiny", "gpt2", "modern-gpt2"))
    assert got == [("gpt2", load_preset("gpt2")), ("small", load_preset("tiny"))]
    args = parity_parser().parse_args([])
    names = [n for n, _ in options.model_configs(args, ("tiny", "gpt2", "modern-gpt2"))]
    assert names == ["tiny", "gpt2", "modern-gpt2"]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random-weight Hugging Face GPT-2 folder (config.json + model.safetensors), and a modern
    config that fits."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)).save_pretrained(
        root / "gpt2-tiny"
    )
    modern = dataclasses.replace(
        load_preset("modern-gpt2"),
        n_layer=2,
        d_model=64,
        n_head=4,
        n_kv_head=2,
        d_ff=160,
        max_seq_len=256,
    )
    modern.to_json(root / "modern-tiny.json")
    return root


def test_convert_writes_checkpoint_and_report(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "modern.safetensors"
    r = cli(
        capsys,
        "convert",
        "--from",
        str(gpt2_folder / "gpt2-tiny"),
        "--config",
        str(gpt2_folder / "modern-tiny.json"),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "blocks.1.mlp.w_gate.weight" in r.stdout and "dropped wpe.weight" in r.stdout
    assert "transfer: 100%" in r.stderr  # the progress bar ran to the end
    report = json.loads((tmp_path / "modern.transfer.json").read_text())
    state, cfg = weights.load(out)
    assert cfg == ModelConfig.from_json(gpt2_folder / "modern-tiny.json")
    assert [row["target"] for row in report["rows"]] == list(state)
    assert set(report["counts"]) == {"copied", "transformed", "new"}
    n = sum(v.size for v in state.values())
    assert (
        r.stdout.rstrip()
        .splitlines()[-1]
        .startswith(f"{len(state)} target tensors, {n:,} parameters: ")
    )
    info = cli(capsys, "info", str(out))
    assert (
        info.returncode == 0
        and "mlp: swiglu" in info.stdout
        and f"parameters: {cfg.num_params():,}" in info.stdout
    )
    assert f"transfer: {len(state)} target tensors" in info.stdout
    gen = cli(
        capsys,
        "generate",
        "--weights",
        str(out),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "3",
        "--no-eos",
    )
    assert gen.returncode == 0 and gen.stdout.startswith("To be"), gen.stderr
    classic = tmp_path / "classic.safetensors"
    cfg_classic = dataclasses.replace(
        load_preset("gpt2"), n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=256, max_seq_len=128
    )
    cfg_classic.to_json(tmp_path / "classic.json")
    r = cli(
        capsys,
        "convert",
        "--from",
        str(gpt2_folder / "gpt2-tiny"),
        "--config",
        str(tmp_path / "classic.json"),
        "--out",
        str(classic),
        "--dtype",
        "bfloat16",
    )
    assert r.returncode == 0, r.stderr
    # save_pretrained omits lm_head
    assert "36 copied (100.0% of parameters); 0 source tensor(s) dropped" in r.stdout
    assert "bfloat16" in cli(capsys, "info", str(classic)).stdout


def test_transfer_report_offline_mechanics(gpt2_folder, tmp_path, capsys):
    """Random weights: the figures mean nothing, so check the mechanics, and
    that the GPT-2 row is HF's loss."""
    import torch
    from transformers import GPT2LMHeadModel

    from gptmod import corpus, tokenizer

    r = cli(
        capsys,
        "transfer-report",
        "--weights",
        str(gpt2_folder / "gpt2-tiny"),
        "--config",
        str(gpt2_folder / "modern-tiny.json"),
        "--tokens",
        "256",
        "--seq-len",
        "64",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    names = [row["variant"] for row in data["rows"]]
    assert names == [
        "GPT-2",
        "pos=rope",
        "norm=rmsnorm",
        "n_kv_head=2",
        "mlp=swiglu",
        "mlp=swiglu, zero gate",
        "mlp=swiglu, d_ff=160",
        "bias=False",
        "logit_softcap=30.0",
        "modern (all switches)",
        "random init (modern)",
    ]
    for name in names:
        assert f"\n{name} | " in r.stdout
    rows = {row["variant"]: row for row in data["rows"]}
    assert rows["GPT-2"]["recovered"] == 1.0 and rows["random init (modern)"]["recovered"] == 0.0
    assert (
        rows["GPT-2"]["params"]["copied"] == 1.0
        and rows["random init (modern)"]["params"]["new"] == 1.0
    )
    assert data["tokens"] == 256 and len(data["gate_rel_error"]) == 2
    # The GPT-2 row is Hugging Face's own loss on the same four windows of Hamlet.
    ids = torch.tensor(tokenizer.encode(corpus.bundled_text("hamlet"))[: 4 * 65]).view(4, 65)
    hf = GPT2LMHeadModel.from_pretrained(gpt2_folder / "gpt2-tiny").eval()
    with torch.no_grad():
        logits = hf(ids[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert abs(rows["GPT-2"]["loss"] - float(want)) < 1e-4


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (
            ["convert", "--from", "no/such/dir", "--preset", "gpt2", "--out", "x.safetensors"],
            "no such file or folder",
        ),
        (["convert", "--from", "gpt2", "--out", "x.bin"], "the file name must end in .safetensors"),
        (
            ["convert", "--from", "gpt2", "--out", "no/such/dir/x.safetensors"],
            "folder no/such/dir does not exist",
        ),
        (
            [
                "convert",
                "--from",
                "gpt2",
                "--preset",
                "gpt2",
                "--config",
                "c.json",
                "--out",
                "x.safetensors",
            ],
            "give --preset or --config, not both",
        ),
        (["transfer-report", "--weights", "no/such/folder"], "no such file or folder"),
        (["side-by-side", "--out", "no/such/dir/x.html"], "folder no/such/dir does not exist"),
    ],
)
def test_more_errors_are_one_line(args, msg, capsys):
    r = cli(capsys, *args)
    assert r.returncode == 2, r.stderr
    assert (
        msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    )


def test_convert_size_mismatch_is_one_line(gpt2_folder, tmp_path, capsys):
    r = cli(
        capsys,
        "convert",
        "--from",
        str(gpt2_folder / "gpt2-tiny"),
        "--preset",
        "gpt2",
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "d_model: cfg has 768, the source has 64" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_prepare_train_resume_plot_generate(tmp_path, capsys):
    """The training path as a user drives it: shards, a short run, a rerun
    that resumes, a plot, generation."""
    text = tmp_path / "play.txt"
    text.write_text(
        "".join(f"KING. My lord, line {i} of the play.\nQUEEN. Aye, my lord.\n" for i in range(300))
    )
    r = cli(
        capsys,
        "prepare",
        "--input",
        str(text),
        "--out",
        str(tmp_path / "data"),
        "--val-fraction",
        "0.1",
    )
    assert r.returncode == 0, r.stderr
    assert "1 document(s); train:" in r.stdout and (tmp_path / "data" / "manifest.json").is_file()
    args = [
        "train",
        "--framework",
        "torch",
        "--no-compile",
        "--config",
        str(tmp_path / "cfg.json"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "6",
        "--warmup-steps",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--log-every",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--ckpt-every",
        "3",
    ]
    dataclasses.replace(load_preset("tiny"), max_seq_len=64).to_json(tmp_path / "cfg.json")
    r = cli(capsys, *args)
    assert r.returncode == 0, r.stderr
    assert "done: 6 steps" in r.stdout and "val loss" in r.stdout
    assert "6/6" in r.stderr  # the progress bar reached the end
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6]
    # The same command again resumes from the last checkpoint and has nothing left to do.
    r = cli(capsys, *args)
    assert r.returncode == 0 and "resuming from" in r.stderr and "step_0000006" in r.stderr, (
        r.stderr
    )
    assert "nothing to do" in r.stdout and "already at step 6" in r.stdout
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 6
    r = cli(
        capsys,
        "plot",
        str(tmp_path / "run"),
        str(tmp_path / "run" / "log.jsonl"),
        "--out",
        str(tmp_path / "l.png"),
    )
    assert r.returncode == 0 and "max |train loss gap| between the first two logs: 0" in r.stdout, (
        r.stdout
    )
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen = cli(
        capsys,
        "generate",
        "--weights",
        str(tmp_path / "run" / "model.safetensors"),
        "--prompt",
        "KING.",
        "--max-new-tokens",
        "4",
        "--no-eos",
    )
    assert gen.returncode == 0 and gen.stdout.startswith("KING."), gen.stderr


@pytest.mark.slow
def test_uptraining_starts_from_transferred_gpt2(gpt2_folder, tmp_path, capsys):
    """--init with GPT-2 weights: the partial transfer is the starting point
    (its first loss is the transfer's)."""
    from gptmod import data, weights

    data.prepare("bundled", tmp_path / "data", progress=False)
    cfg_file = gpt2_folder / "modern-tiny.json"
    r = cli(
        capsys,
        "train",
        "--framework",
        "jax",
        "--config",
        str(cfg_file),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--init",
        str(gpt2_folder / "gpt2-tiny"),
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--log-every",
        "1",
    )
    assert r.returncode == 0, r.stderr
    trained, cfg = weights.load(tmp_path / "run" / "model.safetensors")
    transferred, _ = hf_gpt2.from_hf_gpt2(gpt2_folder / "gpt2-tiny", cfg)
    # Two small AdamW steps from the transfer: close to it, and far from a fresh random init.
    moved = max(float(np.abs(trained[k] - transferred[k]).max()) for k in trained)
    assert 0 < moved < 0.01


def test_transfer_report_reads_back_from_its_json(gpt2_folder):
    """`transfer-report --full` prints the report rebuilt from the run's JSON: the same rows,
    dropped tensors and notes as the report the transfer made."""
    from gptmod.transfer import TransferReport

    cfg = ModelConfig.from_json(gpt2_folder / "modern-tiny.json")
    _, report = hf_gpt2.from_hf_gpt2(gpt2_folder / "gpt2-tiny", cfg)
    back = TransferReport.from_dict(json.loads(report.to_json()))
    assert back == report and back.to_text() == report.to_text()
    assert back.counts()["new"] > 0 and back.dropped  # a partial transfer, not an empty report


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_generate_on_int8_weights(framework, capsys):
    r = cli(
        capsys,
        "generate",
        "--framework",
        framework,
        "--preset",
        "tiny",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--quant",
        "int8",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and f"tokens/s, {framework}, int8, " in r.stderr


def test_int8_with_bfloat16_is_one_line(capsys):
    r = cli(
        capsys,
        "generate",
        "--preset",
        "tiny",
        "--prompt",
        "x",
        "--quant",
        "int8",
        "--dtype",
        "bfloat16",
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--quant int8 with --dtype bfloat16: int8 weights compute in float32" in r.stderr
