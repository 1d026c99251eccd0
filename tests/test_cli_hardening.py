"""Issue 17, CLI and loading: one-line errors for refused pickles, padded
vocabularies, bad seeds, foreign dtypes, non-finite weights, missing paths, run
folders and undecodable text; Ctrl-C exits 130; --version; info's training facts;
and a representative subset of scripts/cli_error_sweep.py run in-process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmod import hf, pretrained, textio, tokenizer, weights
from gptmod.cli import main

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location(
        "cli_error_sweep", ROOT / "scripts" / "cli_error_sweep.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SWEEP = _sweep()
# The sweep's own fixture builders: a 1-layer, 16-wide tiny model, its random state, and a
# gptmod-format file written past weights.save's checks.
_cfg, _state, _raw = SWEEP.tiny_cfg, SWEEP.random_state, SWEEP.raw_checkpoint


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    r = cli(capsys, *argv)
    return r.returncode, r.stdout, r.stderr


class _Payload:
    """Not a tensor: torch's weights_only unpickler refuses to build it."""


# ----------------------------------------------------------------------------- 1. refused pickles


def test_unpicklable_bin_is_one_line_refusal_never_weights_only_false(tmp_path, capsys):
    torch.save({"wte.weight": torch.zeros(2), "x": _Payload()}, tmp_path / "evil.bin")
    refused = (
        r"evil\.bin: refused: torch's restricted unpickler .*\(it holds a [\w.]*_Payload object\)"
    )
    with pytest.raises(hf.UnpicklingRefusedError, match=refused):
        hf.torch_load(tmp_path / "evil.bin")
    rc, _, err = _cli(
        capsys,
        "convert",
        "--from",
        str(tmp_path / "evil.bin"),
        "--out",
        str(tmp_path / "o.safetensors"),
    )
    assert rc == 2 and err.count("\n") == 1 and "which gptmod never does" in err
    assert "weights_only=False" not in err and not (tmp_path / "o.safetensors").exists()
    (tmp_path / "junk.bin").write_bytes(b"\x00not a torch file")
    with pytest.raises(
        ValueError,
        match=r"junk\.bin: (not a readable PyTorch weight file|refused: .*it is corrupt)",
    ):
        hf.torch_load(tmp_path / "junk.bin")


# ----------------------------------------------------------------------------- 2. padded vocabulary


def test_decoders_name_an_id_beyond_the_tokenizer():
    tok = tokenizer.gpt2()
    padded = (
        r"token id 50300 is outside the vocabulary \[0, 50257\) of the "
        r"tokenizer \(50257 tokens\).*padded"
    )
    with pytest.raises(ValueError, match=padded):
        tok.decode([1, 50300])
    stream = tok.stream_decoder()
    assert stream.push(15496) == "Hello"
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary.*padded"):
        stream.push(50257)
    with pytest.raises(ValueError, match=r"token id 50304 is outside the vocabulary \[0, 50257\)"):
        # the module-level GPT-2 helpers too (tiktoken raised a bare KeyError)
        tokenizer.decode([50304])
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        tokenizer.StreamDecoder().push(50257)
    with pytest.raises(
        ValueError,
        match=r"token id -1 is outside the vocabulary \[0, 50257\): ids are never negative",
    ):
        tok.decode([-1])


def _padded_checkpoint(path: Path) -> Path:
    """Vocab 50304 over GPT-2's 50257 tokens; an untied head with zero rows for real tokens and +-v
    for padding ones, so greedy decoding picks a padding id whatever the hidden state."""
    cfg = _cfg(vocab_size=50304, tie_embeddings=False)
    state = _state(cfg)
    v = np.random.default_rng(1).standard_normal(cfg.d_model).astype(np.float32)
    state["lm_head.weight"][:50257] = 0
    state["lm_head.weight"][50257::2], state["lm_head.weight"][50258::2] = v, -v
    weights.save(path, state, cfg)
    return path


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_generate_with_padded_vocab_names_the_id(tmp_path, capsys, framework):
    ckpt = _padded_checkpoint(tmp_path / "pad.safetensors")
    rc, _, err = _cli(
        capsys,
        "generate",
        "--framework",
        framework,
        "--weights",
        str(ckpt),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
    )
    # JAX first says "compiling…" (a progress note)
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert (
        "gptmod generate: error: token id 5025" in err and "of the tokenizer (50257 tokens)" in err
    )
    assert "padded" in err


COMPILING = [
    (["--framework", "torch", "--compile"], True),
    (["--framework", "torch"], False),
    (["--framework", "jax"], True),
]


@pytest.mark.parametrize("flags, expect", COMPILING)
def test_compiling_note_comes_before_a_compiled_first_call(
    tmp_path, capsys, monkeypatch, flags, expect
):
    """Item 9: a first call that compiles (JAX always, torch with --compile)
    says "compiling…" on stderr before it starts; eager torch compiles
    nothing and says nothing. The generator is replaced by one that records
    what stderr held when it was entered, so no compile is paid here."""
    import importlib

    cfg = _cfg()
    weights.save(tmp_path / "m.safetensors", _state(cfg), cfg)
    gen = importlib.import_module(f"gptmod_{flags[1]}.generate")
    seen: dict = {}

    def stream(model, prompts, max_new_tokens, **kw):
        seen["err"], seen["kw"] = capsys.readouterr().err, kw
        yield [7]

    monkeypatch.setattr(gen, "generate_stream", stream)
    rc, _, err = _cli(
        capsys,
        "generate",
        *flags,
        "--weights",
        str(tmp_path / "m.safetensors"),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "1",
    )
    assert rc == 0, err
    assert ("compiling…" in seen["err"]) is expect
    # the flag reached torch's generator; JAX's has no such option (it always jits)
    if flags[1] == "torch":
        assert seen["kw"]["compile"] is expect
    else:
        assert "compile" not in seen["kw"]


# ----------------------------------------------------------------------------- 3. Ctrl-C


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sigint_mid_generation_exits_130_without_traceback(tmp_path, framework):
    cfg = _cfg(max_seq_len=8192)
    weights.save(tmp_path / "long.safetensors", _state(cfg), cfg)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptmod.cli",
            "generate",
            "--framework",
            framework,
            "--weights",
            str(tmp_path / "long.safetensors"),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8000",
            "--no-eos",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        # the prompt, then the first generated token: generation is on
        assert p.stdout.read(3).startswith(b"Hi")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    err = err.decode()
    # JAX segfaulted at exit (-11) before the interrupted frames were collected
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "gptmod generate: interrupted"


def test_keyboard_interrupt_in_a_delegated_command_is_130(monkeypatch, capsys):
    import gptmod.parity.__main__ as parity_main

    def interrupted(argv, *, prog):
        raise KeyboardInterrupt

    monkeypatch.setattr(parity_main, "main", interrupted)
    rc, _, err = _cli(capsys, "parity", "--quick")
    assert rc == 130 and err == "gptmod parity: interrupted\n"


# ----------------------------------------------------------------------------- 4. seeds


def test_seed_type_bounds():
    assert textio.seed_arg("0") == 0 and textio.seed_arg(str(2**63 - 1)) == 2**63 - 1
    for bad in (str(2**63), "-1", "1.5", "x"):
        with pytest.raises(Exception, match=r"\[0, 2\*\*63\)"):
            textio.seed_arg(bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "x", "--seed", str(2**63)],
        ["convert", "--from", "a", "--out", "b.safetensors", "--seed", "-1"],
        ["transfer-report", "--weights", "gpt2", "--seed", str(2**64)],
        ["chat", "--seed", str(2**63)],
        ["parity", "--seed", str(2**63)],
    ],
)
def test_every_seed_flag_refuses_2_63(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed:" in err and "outside [0, 2**63)" in err


# ------------------------------------------------------------------ 5. dtypes and non-finite values


def test_checkpoint_of_a_foreign_dtype_is_refused_naming_the_tensor(tmp_path):
    cfg = _cfg()
    state = _state(cfg)
    i8 = _raw(
        tmp_path / "i8.safetensors",
        {**state, "tok_emb.weight": state["tok_emb.weight"].astype(np.int8)},
        cfg,
    )
    allowed = r"(?s)allowed: float32, bfloat16, float16.*tok_emb\.weight: dtype int8"
    with pytest.raises(weights.StateError, match=allowed):
        weights.load(i8)
    f64 = _raw(
        tmp_path / "f64.safetensors", {k: v.astype(np.float64) for k, v in state.items()}, cfg
    )
    with pytest.raises(weights.StateError, match=r"norm\.weight: dtype float64"):
        pretrained.load(f64)
    mask = {**state, "blocks.0.attn.wq.weight": state["blocks.0.attn.wq.weight"] > 0}
    with pytest.raises(weights.StateError, match=r"blocks\.0\.attn\.wq\.weight: dtype bool"):
        weights.save(tmp_path / "b.safetensors", mask, cfg)
    assert not (tmp_path / "b.safetensors").exists()


def test_hf_gpt2_integer_tensor_is_refused():
    from gptmod import hf_gpt2

    cfg = _cfg(
        **dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, logit_softcap=None, d_ff=64)
    )
    tensors = hf_gpt2.to_hf_gpt2(_state(cfg), cfg)
    tensors["transformer.h.0.mlp.c_fc.bias"] = tensors["transformer.h.0.mlp.c_fc.bias"].astype(
        np.int32
    )
    with pytest.raises(
        weights.StateError, match=r"(?s)not floats.*h\.0\.mlp\.c_fc\.bias: dtype int32"
    ):
        hf_gpt2.from_hf_gpt2(tensors, cfg)


def test_save_refuses_non_finite_and_load_warns(tmp_path):
    cfg = _cfg()
    state = _state(cfg)
    bad = {**state, "norm.weight": np.array([np.nan, np.inf] + [1.0] * 14, np.float32)}
    with pytest.raises(
        weights.NonFiniteError,
        match=r"refusing to write .*m\.safetensors: 1 tensor\(s\) hold NaN or "
        r"infinite values: norm\.weight \(2 of 16\)",
    ):
        weights.save(tmp_path / "m.safetensors", bad, cfg)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    _raw(tmp_path / "nan.safetensors", bad, cfg)
    with pytest.warns(
        RuntimeWarning, match=r"nan\.safetensors: 1 tensor\(s\) hold NaN .*norm\.weight \(2 of 16\)"
    ):
        loaded, _ = weights.load(tmp_path / "nan.safetensors")
    assert np.isnan(loaded["norm.weight"][0])  # loaded as stored, for inspection


# ------------------------------------------------------------------------ 6. local paths vs hub ids


def test_missing_local_paths_never_reach_the_hub(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(
        hf,
        "download",
        lambda repo: (
            asked.append(repo) or (_ for _ in ()).throw(hf.HubUnavailableError(f"offline: {repo}"))
        ),
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"^checkpoint not found: nope\.safetensors: no such file$"
    ):
        pretrained.load("nope.safetensors")
    for spec in ("nope.bin", "org/model.gguf", "config.json"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            pretrained.load(spec)
    for spec in ("./nope", "~/nope-gptmod-xyz", "/nonexistent/x", "a/b/c", "../up", "bad name!"):
        with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*not a hub repo id"):
            pretrained.load(spec)
    assert asked == []
    for repo in ("gpt2", "openai-community/gpt2-medium", "Qwen/Qwen2.5-0.5B"):
        with pytest.raises(hf.HubUnavailableError):
            pretrained.load(repo)
    assert asked == ["gpt2", "openai-community/gpt2-medium", "Qwen/Qwen2.5-0.5B"]
    assert (
        not hf.is_repo_id("nope.safetensors")
        and not hf.is_repo_id("a/../b")
        and hf.is_repo_id("gpt2")
    )


# --------------------------------------------------------------------------- 7. and 10. run folders


def _run_folder(root: Path) -> tuple[Path, dict]:
    """A run as gptmod.training.save_checkpoint lays it out: step_0000002/
    (model, trainer.json), latest, log."""
    cfg = _cfg()
    state = _state(cfg)
    log = '{"step": 1, "loss": 10.0, "val_loss": 9.75}\n{"step": 2, "loss": 9.0, "val_loss": 9.5}\n'
    return SWEEP.run_folder(root / "run", state, cfg, log), state


def test_run_and_step_folders_load_as_checkpoints(tmp_path):
    run, state = _run_folder(tmp_path)
    for spec in (run, run / "step_0000002"):
        p = pretrained.load(spec)
        assert p.report.format == "gptmod" and p.report.path.endswith(
            "step_0000002/model.safetensors"
        )
        assert all(np.array_equal(p.state[k], state[k]) for k in state)
        assert p.report.training == {
            "step": 2,
            "framework": "torch",
            "val_loss": 9.5,
            "val_step": 2,
        }
    # the final model wins
    weights.save(run / "model.safetensors", state, _cfg(), metadata={"step": "3"})
    assert pretrained.load(run).report.path == str(run / "model.safetensors")
    (tmp_path / "steps-only" / "step_0000001").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"a training run folder with step_0000001 but neither"
    ):
        pretrained.load(tmp_path / "steps-only")
    (tmp_path / "empty").mkdir()
    not_a_model = (
        r"empty: no config\.json \(so not a Hugging Face model folder\), and no model\.safetensors"
    )
    with pytest.raises(FileNotFoundError, match=not_a_model):
        pretrained.load(tmp_path / "empty")


def test_info_shows_step_framework_and_val_loss(tmp_path, capsys):
    run, _ = _run_folder(tmp_path)
    rc, out, _ = _cli(capsys, "info", str(run))
    assert (
        rc == 0
        and "  training: step 2, framework torch, val loss 9.5000 (step 2, log.jsonl)" in out
    )
    weights.save(tmp_path / "plain.safetensors", _state(_cfg()), _cfg())
    rc, out, _ = _cli(capsys, "info", str(tmp_path / "plain.safetensors"))
    assert rc == 0 and "training:" not in out  # not a training checkpoint: nothing invented


# ----------------------------------------------------------------------------- 8. text files


def test_read_text_names_the_file_and_the_reason(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"--text .*latin1\.txt: not UTF-8 text: byte 0xe9 at byte offset 3"
    ):
        textio.read_text(tmp_path / "latin1.txt", what="--text")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"fifo: not a regular file \(a FIFO \(named pipe\)\)"):
        textio.read_text(tmp_path / "fifo")  # refused before open(): reading a FIFO would block
    with pytest.raises(ValueError, match=r"not a regular file \(a directory\)"):
        textio.read_text(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: no such file"):
        textio.read_text(tmp_path / "missing.txt")
    (tmp_path / "ok.txt").write_text("naïve\n", encoding="utf-8")
    assert textio.read_text(tmp_path / "ok.txt") == "naïve\n"


def test_hf_side_files_errors_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"tokenizer\.json: not a tokenizer\.json the tokenizers library reads"
    ):
        # the Rust library's bare Exception became a named ValueError
        tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON"):
        tokenizer.hf_chat_template(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    with pytest.raises(
        ValueError, match=r"config\.json: not UTF-8 text: byte 0xe9 at byte offset 19"
    ):
        hf.read_config(tmp_path)


def test_transfer_report_text_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    rc, _, err = _cli(
        capsys, "transfer-report", "--weights", "gpt2", "--text", str(tmp_path / "latin1.txt")
    )
    assert rc == 2 and "latin1.txt: not UTF-8 text" in err and err.count("\n") == 1


# ----------------------------------------------------------------- 9. --version and delegated progs


def test_version_and_delegated_usage_lines(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"gptmod {metadata.version('gptmod')}\n"
    for command in ("parity", "bench", "gpu-check"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: gptmod {command} ")


# --------------------------------------------------------------- 11. the sweep, a subset in-process


SUBSET = (
    "generate --seed 9223372036854775808",
    "generate --weights nope.safetensors",
    "generate --weights evil.bin",
    "generate --weights run-dangling",
    "generate --weights int8.safetensors",
    "generate --weights truncated.safetensors",
    "info run folder",
    "info fifo",
    "convert --from evil",
    "transfer-report --text latin1.txt",
    "export hf q8_0",
    "generate padded vocab (torch)",
    "info --weights hf-bad-tokenizer",
)


def test_sweep_subset_in_process(tmp_path, monkeypatch, capsys):
    by_name = {p.name: p for p in SWEEP.probes()}
    assert len(by_name) >= 120 and set(SUBSET) <= set(by_name)
    SWEEP.make_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in SUBSET:
        probe = by_name[name]
        try:
            rc = main(list(probe.argv))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == probe.expect, (name, err)
        if probe.expect == 2:
            assert err.strip() and "error" in err.splitlines()[-1], (name, err)
