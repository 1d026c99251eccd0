"""The parity suite on reduced sizes: the CPU ladder passes, a deliberately broken twin is caught
and localised, and the report's files and exit codes are what users and CI rely on."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptmod.config import ModelConfig, load_preset
from gptmod.parity import suite
from gptmod.parity.__main__ import main
from gptmod.parity.runner import CHECKS, Options, run_suite, summary

from conftest import reduced, save_tiny_hf_llama

# The fewest training steps that still give every training row ("train params @10 AdamW" needs 10),
# not the CLI's 200: each step runs three trainers, one in float64. The full curve is the CLI's job.
TRAIN_STEPS = 10


def _opts(**kw) -> Options:
    # The ladder's model-level checks; trace, text, ragged, generate,
    # sampling and divergence have their own files.
    base = dict(
        seq_len=32,
        decode_steps=8,
        greedy_steps=12,
        train_steps=TRAIN_STEPS,
        checks=("modules", "logits", "cached", "greedy", "roundtrip", "hf", "train"),
        backends_torch=("sdpa", "math", "efficient"),
        backends_jax=("xla", "reference", "cudnn"),
    )
    return Options(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "gpt2-small"])
def test_cpu_ladder_passes_and_skips_what_cannot_run(name):
    # tiny covers the modern column (RoPE, RMSNorm, GQA 4:2, SwiGLU, no bias, soft-cap), with the
    # training rows of a short curve; gpt2-small the classic one, whose training arithmetic
    # test_train.py holds to float64 (its loss and every gradient, ten AdamW steps), given as a
    # checkpoint's own weights (the same seeded weights, passed in). One ladder per test, not a
    # fixture shared by several tests: pytest-xdist would build that on every worker that runs one
    # of them, while one test per preset lets the two workers share the load.
    cfg = load_preset("tiny") if name == "tiny" else reduced("gpt2")
    state = None if name == "tiny" else suite.random_state(cfg, 0)
    checks = _opts().checks if name == "tiny" else tuple(c for c in _opts().checks if c != "train")
    cpu_rows = run_suite([(name, cfg, state)], _opts(checks=checks), progress=False)
    _ladder_passes(cpu_rows, classic=cfg.is_classic)
    _unavailable_backends_are_skipped_rows_with_reasons(cpu_rows)
    if name == "tiny":
        _training_rows(cpu_rows)


def _ladder_passes(cpu_rows, classic: bool):
    ok, _ = summary(cpu_rows)
    failed = [(r.check, r.preset, r.dtype, r.note) for r in cpu_rows if r.passed is False]
    assert ok, failed
    checks = {r.check for r in cpu_rows}
    for c in (
        "module:norm",
        "module:rope",
        "module:attention",
        "module:mlp",
        "module:block",
        "logits",
        "hidden",
        "top5+kl",
        "cached-decode",
        "greedy",
        "round-trip torch->jax",
        "round-trip jax->file->torch",
        "hf-gpt2",
    ):
        # learned positions: the classic column has no RoPE
        if not (classic and c == "module:rope"):
            assert c in checks, c
    # Every numeric row carries the three numbers and its relative budget,
    # and correct twins keep a margin to it.
    for r in cpu_rows:
        if r.check == "logits" and r.passed is not None:
            assert None not in (r.e_torch, r.e_jax, r.diff, r.budget, r.e_max)
            assert r.budget == max(r.e_max, suite.ABS_FLOOR[r.dtype])
            assert r.ratio <= 0.8, (r.backend_torch, r.backend_jax, r.dtype, r.ratio)
    hf = [r for r in cpu_rows if r.check == "hf-gpt2" and r.passed is not None]
    if classic:
        assert (
            [r.preset for r in hf] == ["gpt2-small"]
            and hf[0].e_torch <= 1e-4
            and hf[0].e_jax <= 1e-4
        )
    else:
        assert hf == []  # Hugging Face's GPT-2 is the oracle of the classic column only


def _unavailable_backends_are_skipped_rows_with_reasons(cpu_rows):
    skipped = {
        (r.backend_torch, r.backend_jax): r.note
        for r in cpu_rows
        if r.passed is None and r.check == "logits"
    }
    assert "has no CPU kernel" in skipped[("efficient", "-")]
    assert "needs an NVIDIA GPU" in skipped[("-", "cudnn")]


def _training_rows(cpu_rows):
    """The training rows of a short curve: all within budget, bf16 skipped with a reason."""
    rows = [r for r in cpu_rows if r.check.startswith("train")]
    fp32 = [r for r in rows if r.dtype == "float32"]
    # 2 layers without biases, tied: 20 tensors
    assert [r.check for r in fp32] == [
        "train loss",
        "train grads (20)",
        "train params @10 AdamW",
        f"train curve {TRAIN_STEPS} steps",
    ]
    assert all(r.passed for r in fp32), [(r.check, r.note) for r in fp32 if not r.passed]
    assert "max |loss gap|" in fp32[-1].note and fp32[-1].diff <= fp32[-1].budget
    assert all("random 2-layer copy" in r.note for r in fp32)
    bf16 = [r for r in rows if r.dtype == "bfloat16"]
    assert len(bf16) == 1 and bf16[0].passed is None and "fp32" in bf16[0].note


def test_own_gradients_reuse_the_cases_models_and_leave_them_as_they_were():
    """The own-weights gradient rows train on the models the case's other checks use, one trainer
    at a time, and hand them back in eval mode with no gradients: a later check sees the model it
    would have seen."""
    from gptmod.parity.runner import make_case
    from gptmod.parity.training import check_training

    cfg = reduced("tiny")
    case = make_case("ckpt", cfg, "float32", Options(seq_len=16), suite.random_state(cfg, 3))
    before = suite.torch_run(suite.torch_model(case, "float64", "math", "cpu"), case.idx)
    # The training check on given weights yields these two rows first; the random copy's rows after
    # them are the ladder's (test_cpu_ladder_passes_and_skips_what_cannot_run[tiny]).
    rows = list(itertools.islice(check_training(case, steps=TRAIN_STEPS, own_weights=True), 2))
    assert [r.check for r in rows] == ["train loss (own weights)", "train grads (20, own weights)"]
    assert all(r.passed for r in rows), [(r.check, r.note) for r in rows]
    assert all("the given weights, 1x15 of its own tokens" in r.note for r in rows)
    torch_models = [m for key, m in case.models.items() if key[0] == "torch"]
    assert len(torch_models) == 2 and len(case.models) == 3  # fp32 and float64 torch, JAX
    for m in torch_models:
        assert not m.training and all(p.grad is None for p in m.parameters())
    after = suite.torch_run(suite.torch_model(case, "float64", "math", "cpu"), case.idx)
    np.testing.assert_array_equal(after, before)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_broken_twin_is_caught_and_the_layer_named(dtype):
    cfg = reduced("modern-gpt2", n_layer=3)
    # fp32 sees a 0.1% weight error; bf16's own rounding hides that much, so
    # there the fault is a sign bug.
    fault = ("blocks.1.mlp.w_down.weight", -2.0 if dtype == "bfloat16" else 1e-3)
    rows = run_suite(
        [("modern", cfg, None)],
        _opts(dtypes=(dtype,), checks=("logits",), fault=fault),
        progress=False,
    )
    logits = [r for r in rows if r.check == "logits" and r.passed is not None]
    hidden = next(r for r in rows if r.check == "hidden")
    assert not summary(rows)[0]
    assert any(r.passed is False for r in logits)
    assert (
        hidden.passed is False and "first layer out of budget: block 1 (hidden[2])" in hidden.note
    )
    clean = run_suite(
        [("modern", cfg, None)], _opts(dtypes=(dtype,), checks=("logits",)), progress=False
    )
    assert summary(clean)[0]  # the same run without the fault passes: the fault is what failed it


@pytest.mark.slow
def test_outlier_weights():
    cfg = reduced("gpt2")
    state = suite.random_state(cfg, 0)
    out = suite.inject_outliers(state, cfg, 0)
    ratio = np.abs(out["tok_emb.weight"]).max(0) / np.abs(state["tok_emb.weight"]).max(0)
    assert sorted(np.round(ratio, 3))[-2:] == [20.0, 20.0] and (np.sort(ratio)[:-2] == 1).all()
    assert (out["blocks.0.attn_norm.weight"] == 10.0).sum() == 2
    rows = run_suite(
        [("gpt2", cfg, None)], _opts(weights="random-outliers", checks=("logits",)), progress=False
    )
    assert summary(rows)[0], [(r.check, r.dtype, r.note) for r in rows if r.passed is False]


@pytest.mark.slow
def test_cli_writes_json_and_markdown_and_exit_codes(tmp_path):
    args = [
        "--preset",
        "tiny",
        "--quick",
        "--check",
        "roundtrip",
        "--check",
        "cached",
        "--dtype",
        "float32",
    ]
    assert (
        main([*args, "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 0
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert (
        data["passed"] is True
        and data["device"] == "cpu"
        and {"torch", "jax", "flax"} <= set(data["versions"])
    )
    for row in data["rows"]:
        assert {
            "check",
            "preset",
            "dtype",
            "backend_torch",
            "backend_jax",
            "e_torch",
            "e_jax",
            "diff",
            "budget",
            "passed",
            "note",
        } <= set(row)
    assert "| cached-decode | tiny | float32 |" in (tmp_path / "r.md").read_text()
    # a 10% fault in one JAX weight: about 8x the cached-decode budget (1% sat at the budget's edge,
    # so whether it failed depended on the random weights)
    assert main([*args, "--inject-fault", "blocks.0.attn.wq.weight=0.1"]) == 1
    assert main([*args, "--inject-fault", "no.such.weight=0.1"]) == 2
    assert set(CHECKS) == {
        "modules",
        "trace",
        "logits",
        "text",
        "cached",
        "ragged",
        "greedy",
        "generate",
        "sampling",
        "divergence",
        "roundtrip",
        "hf",
        "train",
        "quant",
    }


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--preset", "gpt2", "--weights", "gpt2"], "offline"),
        (["--preset", "tiny", "--weights", "no/such/dir"], "no such file or folder: no/such/dir"),
    ],
)
def test_cli_weight_errors(args, msg):
    r = subprocess.run(
        [sys.executable, "-m", "gptmod.parity", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_gpt2_weights_run_in_modern_presets_through_the_partial_transfer(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "hf"
    )
    args = [
        "--preset",
        "tiny",
        "--weights",
        str(tmp_path / "hf"),
        "--check",
        "logits",
        "--dtype",
        "float32",
        "--backend-torch",
        "sdpa",
        "--backend-jax",
        "xla",
        "--seq-len",
        "32",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows and all(r["preset"] == "tiny (GPT-2 transferred)" and r["passed"] for r in rows)


@pytest.mark.slow
def test_a_llama_checkpoint_runs_its_own_config_on_real_text_against_hf_llama(tmp_path):
    """--weights with a model of its own (here a tiny HF Llama folder with a real tokenizer): its
    config, not the presets; its tokenizer on Hamlet instead of random ids; and transformers'
    LlamaForCausalLM as the oracle."""
    from gptmod import corpus, tokenizer

    tok = tokenizer.gpt2()
    save_tiny_hf_llama(tmp_path / "llama", tok, max_position_embeddings=128)
    args = [
        "--weights",
        str(tmp_path / "llama"),
        "--check",
        "hf",
        "--dtype",
        "float32",
        "--dtype",
        "bfloat16",
        "--seq-len",
        "32",
        "--greedy-steps",
        "8",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    rows = {
        (r["check"], r["dtype"]): r for r in json.loads((tmp_path / "r.json").read_text())["rows"]
    }
    assert set(rows) == {
        ("hf-llama", "float32"),
        ("hf-llama greedy torch", "float32"),
        ("hf-llama greedy jax", "float32"),
        ("hf-llama greedy torch", "bfloat16"),
        ("hf-llama greedy jax", "bfloat16"),
    }
    logits = rows[("hf-llama", "float32")]
    assert (
        logits["passed"]
        and logits["e_torch"] <= logits["budget"]
        and logits["e_jax"] <= logits["budget"]
    )
    assert all(
        rows[(f"hf-llama greedy {fw}", "float32")]["note"] == "8 tokens identical to HF's greedy"
        for fw in ("torch", "jax")
    )
    # informational: the oracle runs in fp32
    assert rows[("hf-llama greedy jax", "bfloat16")]["passed"] is None
    # --preset only chooses the targets of GPT-2 weights
    assert main([*args, "--preset", "tiny"]) == 2
    # Real text: the case's ids are Hamlet's first tokens under the checkpoint's tokenizer.
    from gptmod.parity.runner import make_case

    text = tuple(tok.encode(corpus.bundled_text("hamlet")))
    small = ModelConfig(
        vocab_size=tok.vocab_size, n_layer=1, d_model=16, n_head=2, n_kv_head=2, d_ff=32
    )
    case = make_case("x", small, "float32", Options(seq_len=32, text_ids=text), None)
    assert case.idx.tolist() == [list(text[:32])]
    with pytest.raises(ValueError, match="the text has 3 tokens, fewer than batch x seq_len"):
        make_case("x", case.cfg, "float32", Options(seq_len=32, text_ids=(1, 2, 3)), None)


@pytest.mark.slow
def test_trace_cli_writes_html_png_and_json_and_refuses_html_without_trace(tmp_path, capsys):
    args = ["--preset", "tiny", "--quick", "--dtype", "float32", "--seq-len", "16"]
    assert main([*args, "--html", str(tmp_path / "t.html")]) == 2
    assert "add --trace" in capsys.readouterr().err
    out = [tmp_path / "t.html", tmp_path / "t.png", tmp_path / "t.json"]
    assert (
        main([*args, "--trace", "--html", str(out[0]), "--png", str(out[1]), "--json", str(out[2])])
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny · float32:" in printed and "every op within budget" in printed
    assert (
        "block 1 mlp_norm" in out[0].read_text() and out[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )
    entries = json.loads(out[2].read_text())["traces"][0]["entries"]
    assert {e["op"] for e in entries} >= {
        "embedding",
        "attn_norm",
        "q",
        "k",
        "v",
        "attention",
        "logits",
    }
    # A broken twin: the trace names the first op out of budget, in the
    # block the fault is in, and exits 1.
    assert main([*args, "--trace", "--inject-fault", "blocks.1.mlp.w_up.weight=0.01"]) == 1
    assert "FIRST OP OUT OF BUDGET: forward block 1 up (jax)" in capsys.readouterr().out


def test_cli_refuses_counts_below_one_and_lists_mutations(capsys):
    assert main(["--preset", "tiny", "--divergence-steps", "0"]) == 2
    assert "--divergence-steps 0: must be >= 1" in capsys.readouterr().err
    assert main(["--list-mutations"]) == 0
    assert "kv-write-row0" in capsys.readouterr().out


def test_table_groups_by_model_and_dtype_and_fits_the_width():
    from gptmod.parity.runner import format_table

    rows = [
        suite.Row(
            "logits",
            "run/model.safetensors",
            "float32",
            "sdpa",
            "xla",
            1e-5,
            2e-5,
            1e-5,
            7e-4,
            True,
            "a long note " * 20,
            7e-4,
        )
    ]
    text = format_table(rows, width=120)
    assert text.splitlines()[0] == "run/model.safetensors · float32"
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "0.03" in text  # the share of the budget: 2e-5 / 7e-4
