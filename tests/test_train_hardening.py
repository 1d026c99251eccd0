"""Issue 17, training: refused eps/seed, no NaN saved, run-folder lock and overwrite, pointer and
key checks, keep-last and best, extending a run, one seeded init for both twins, empty corpus."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import re

import numpy as np
import pytest
from flax import nnx

import gptmod_jax
import gptmod_torch
from gptmod import cli, training
from gptmod.data import prepare, read_manifest
from gptmod.training import TrainConfig
from gptmod_jax.train import Trainer as JaxTrainer
from gptmod_torch.train import Trainer as TorchTrainer

from conftest import interrupt_loader_at, line_shards, reduced

RUN = TrainConfig(
    steps=4,
    warmup_steps=1,
    batch_size=2,
    block_size=16,
    log_every=1,
    eval_every=2,
    eval_batches=1,
    ckpt_every=1,
)
CFG = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return line_shards(tmp_path_factory.mktemp("shards"), 200)


def _run(cfg, tc, data, out, framework="torch", **kw):
    state = training.init_state(cfg, tc.seed)
    if framework == "torch":
        trainer = TorchTrainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg), state), tc)
    else:
        trainer = JaxTrainer(
            gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc
        )
    return training.train(trainer, cfg, tc, data, out, framework=framework, progress=False, **kw)


def test_eps_and_seed_are_checked():
    with pytest.raises(ValueError, match=r"TrainConfig.eps=0: must be > 0"):
        TrainConfig(eps=0)
    with pytest.raises(
        ValueError, match=r"TrainConfig.seed=9223372036854775808: must be < 2\*\*63"
    ):
        TrainConfig(seed=2**63)


def test_non_finite_parameters_are_never_saved(tmp_path):
    state = training.init_state(CFG, 0)
    state["blocks.1.mlp.w_up.weight"][0, 0] = np.nan
    opt = {
        "count": 1,
        "m": {k: np.zeros_like(v) for k, v in state.items()},
        "v": {k: np.zeros_like(v) for k, v in state.items()},
    }
    with pytest.raises(
        training.NonFiniteError,
        match=r"step 7: parameter 'blocks.1.mlp.w_up.weight' holds 1 non-finite",
    ):
        training.save_checkpoint(tmp_path, 7, state, opt, CFG, RUN, framework="torch")
    assert not any(tmp_path.iterdir())


def test_lock_refuses_a_second_run(shards, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another training run holds this run folder"):
            _run(CFG, RUN, shards, tmp_path)
    assert not (tmp_path / "log.jsonl").exists()


def test_no_resume_needs_overwrite_keep_last_and_best(shards, tmp_path):
    _run(CFG, RUN, shards, tmp_path, keep_last=2)
    steps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_0000003", "step_0000004"]
    best = json.loads((tmp_path / "best" / "trainer.json").read_text())
    log = training.RunLog.read(tmp_path / "log.jsonl")
    assert best["val_loss"] == min(r["val_loss"] for r in log if "val_loss" in r)
    with pytest.raises(ValueError, match=r"holds a previous run.*pass --overwrite"):
        _run(CFG, RUN, shards, tmp_path, resume=False)
    assert len(training.RunLog.read(tmp_path / "log.jsonl")) == 4  # untouched
    _run(CFG, dataclasses.replace(RUN, steps=2), shards, tmp_path, resume=False, overwrite=True)
    assert [r["step"] for r in training.RunLog.read(tmp_path / "log.jsonl")] == [1, 2]
    assert not (tmp_path / "step_0000004").exists()


def test_extend_steps_and_named_differences(shards, tmp_path, capsys):
    _run(CFG, dataclasses.replace(RUN, steps=2), shards, tmp_path)
    rows = _run(CFG, RUN, shards, tmp_path)
    assert [r["step"] for r in rows] == [3, 4]
    assert "extending the run from steps=2 to 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(f"(lr: {RUN.lr} -> 0.0125)")):
        _run(CFG, dataclasses.replace(RUN, steps=5, lr=0.0125), shards, tmp_path)


def test_pointer_step_and_missing_keys_are_refused(shards, tmp_path):
    _run(CFG, dataclasses.replace(RUN, steps=2), shards, tmp_path)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(
        ValueError, match=r"names '../elsewhere'; it must name a step_NNNNNNN folder"
    ):
        training.latest_checkpoint(tmp_path)
    meta_file = tmp_path / "step_0000002" / "trainer.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, step=5)))
    with pytest.raises(ValueError, match=r"step=5 disagrees with its folder step_0000002"):
        training.load_checkpoint(tmp_path / "step_0000002")
    meta.pop("count")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"trainer.json: missing key\(s\) count"):
        training.load_checkpoint(tmp_path / "step_0000002")
    m = json.loads((shards / "manifest.json").read_text())
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "splits"}))
    with pytest.raises(ValueError, match=r"missing key\(s\) splits"):
        read_manifest(bad)
    m["splits"]["train"]["shards"][0]["file"] = "/etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"file='/etc/passwd': must be a shard name"):
        read_manifest(bad)


def test_interrupt_names_the_last_checkpoint(shards, tmp_path, monkeypatch, capsys):
    interrupt_loader_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(CFG, RUN, shards, tmp_path)
    assert (
        f"interrupted after 2 of 4 steps: the last checkpoint is {tmp_path / 'step_0000002'}"
        in capsys.readouterr().err
    )


def test_same_seed_same_start_in_both_twins():
    cfg = reduced("modern-gpt2", vocab_size=512, max_seq_len=32)
    tc = dataclasses.replace(RUN, steps=2)
    state = training.init_state(cfg, 3)
    assert (
        abs(float(state["blocks.0.attn.wo.weight"].std()) - cfg.init_std / 2)
        < 0.1 * cfg.init_std / 2
    )
    t = TorchTrainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg), state), tc)
    j = JaxTrainer(
        gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(9)), training.init_state(cfg, 3)),
        tc,
    )
    st, sj = t.export_state(), j.export_state()
    assert all(np.array_equal(st[k], sj[k]) for k in st)
    ids = np.random.default_rng(0).integers(0, 512, (1, 2, 17))
    lt, lj = (
        t.step(ids[..., :-1], ids[..., 1:])["loss"],
        float(j.step(ids[..., :-1], ids[..., 1:])["loss"]),
    )
    assert abs(lt - lj) < 1e-5 * lt


def test_prepare_refuses_an_empty_corpus_and_cli_says_overwrite(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty \(1 document\(s\), 0 tokens"):
        prepare(tmp_path / "empty.txt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "a.txt").write_text("To be or not to be.\n")
    prepare(tmp_path / "a.txt", tmp_path / "out", progress=False)
    assert (
        cli.main(["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert "pass --overwrite to replace them" in err and "overwrite=True" not in err


@pytest.mark.slow
def test_eval_matches_an_independent_cross_entropy_in_both_twins(tmp_path, capsys):
    """`gptmod eval --text`: the printed loss is the mean next-token cross-entropy over
    non-overlapping windows, computed here from torch's logits in float64; torch and JAX agree; bad
    sources are named errors."""
    import re

    import torch

    from gptmod import tokenizer, weights

    cfg = reduced("modern-gpt2", max_seq_len=32, vocab_size=50257)
    state = training.init_state(cfg, 5)
    weights.save(tmp_path / "m.safetensors", state, cfg)
    text = "".join(f"Romeo. Line {i}: what light through yonder window breaks?\n" for i in range(8))
    (tmp_path / "t.txt").write_text(text)
    ids = np.asarray(tokenizer.encode(text))
    block = 16
    wins = np.stack([ids[i : i + block + 1] for i in range(0, len(ids) - block, block)])
    model = gptmod_torch.load_state(gptmod_torch.GPT(cfg), state).double().eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(wins[:, :-1]).long()), -1)
    want = -logp.gather(-1, torch.from_numpy(wins[:, 1:]).long()[..., None]).mean().item()
    got = {}
    for fw in ("torch", "jax"):
        argv = [
            "eval",
            "--weights",
            str(tmp_path / "m.safetensors"),
            "--text",
            str(tmp_path / "t.txt"),
            "--framework",
            fw,
            "--block-size",
            str(block),
            "--batch-size",
            "3",
        ]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        loss, ppl, n = re.search(
            r"loss ([\d.]+), perplexity ([\d.]+) over ([\d,]+) tokens", out
        ).groups()
        assert int(n.replace(",", "")) == wins.shape[0] * block
        assert abs(float(ppl) - np.exp(float(loss))) < 0.01 * float(ppl)
        got[fw] = float(loss)
    assert abs(got["torch"] - want) < 1e-3 and abs(got["jax"] - want) < 1e-3
    # --quant int8: the loss of the float64 model of the int8 weights, in either twin
    from gptmod import quant

    deq = quant.dequantize(quant.quantize(state, cfg), cfg)
    model8 = gptmod_torch.load_state(gptmod_torch.GPT(cfg), deq).double().eval()
    with torch.no_grad():
        logp8 = torch.log_softmax(model8(torch.from_numpy(wins[:, :-1]).long()), -1)
    want8 = -logp8.gather(-1, torch.from_numpy(wins[:, 1:]).long()[..., None]).mean().item()
    for fw in ("torch", "jax"):
        argv = ["eval", "--weights", str(tmp_path / "m.safetensors"), "--text"]
        argv += [str(tmp_path / "t.txt"), "--framework", fw, "--block-size", str(block)]
        assert cli.main([*argv, "--quant", "int8"]) == 0
        out = capsys.readouterr().out
        assert out.rstrip().endswith("int8 weights")
        loss8 = float(re.search(r"loss ([\d.]+)", out).group(1))
        assert abs(loss8 - want8) < 1e-3, (fw, loss8, want8)
    assert cli.main(["eval", "--weights", str(tmp_path / "m.safetensors")]) == 2
    assert "give exactly one of --data DIR or --text FILE" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "eval",
                "--weights",
                str(tmp_path / "m.safetensors"),
                "--text",
                str(tmp_path / "t.txt"),
                "--block-size",
                "64",
            ]
        )
        == 2
    )
    assert "--block-size 64 exceeds the model's max_seq_len=32" in capsys.readouterr().err


# ---------------------------------------------------------------------- the progress bar and Ctrl-C


@pytest.mark.slow
def test_progress_bar_moves_once_per_finished_step(shards, tmp_path, monkeypatch):
    """Item 9: the bar moved only every --log-every steps and counted dispatched (unfinished) JAX
    steps. Each update must now follow the read of that step's loss (the sync on the step), with
    log_every past the run."""
    events: list[tuple[str, int]] = []

    class Loss:  # stands in for the step's device scalar: reading it is the wait for the step
        def __init__(self, value, step):
            self.value, self.step = value, step

        def __float__(self):
            events.append(("read", self.step))
            return float(self.value)

    real_step = JaxTrainer.step

    def step(self, x, y):
        metrics = real_step(self, x, y)
        n = sum(e[0] == "step" for e in events) + 1
        events.append(("step", n))
        return {**metrics, "loss": Loss(metrics["loss"], n)}

    import tqdm as tqdm_module

    class Bar(tqdm_module.tqdm):
        def update(self, n=1):
            events.append(("bar", self.n + n))
            return super().update(n)

    monkeypatch.setattr(JaxTrainer, "step", step)
    monkeypatch.setattr(tqdm_module, "tqdm", Bar)  # training imports it from there when it runs
    tc = dataclasses.replace(RUN, steps=5, log_every=100, eval_every=0, ckpt_every=0)
    state = training.init_state(CFG, tc.seed)
    trainer = JaxTrainer(gptmod_jax.load_state(gptmod_jax.GPT(CFG, rngs=nnx.Rngs(0)), state), tc)
    training.train(trainer, CFG, tc, shards, tmp_path, framework="jax", progress=True)
    per_step = [e for e in events if e[0] in ("step", "read", "bar")]
    assert per_step[:15] == [(kind, s) for s in range(1, 6) for kind in ("step", "read", "bar")]


def test_paused_time_is_left_out_of_the_rate():
    """Item 9: an evaluation or checkpoint inside `paused` moves the bar's
    clocks, so rate and ETA skip it."""
    import io

    from tqdm import tqdm

    bar = tqdm(total=10, file=io.StringIO(), mininterval=0)
    start, last = bar.start_t, bar.last_print_t
    clock = iter([100.0, 107.5]).__next__  # 7.5 s inside the block
    with training.paused(bar, clock=clock):
        pass
    assert (bar.start_t - start, bar.last_print_t - last) == (7.5, 7.5)
    off = tqdm(total=10, disable=True)
    # a disabled bar has no clocks to move
    with training.paused(off, clock=iter([0.0, 9.0]).__next__):
        pass
    bar.close()


def test_ctrl_c_in_cli_training_prints_a_resume_command_that_resumes(
    shards, tmp_path, monkeypatch, capsys
):
    """Item 5: Ctrl-C in `gptmod train` exits 130, names the last checkpoint, and prints a command
    that, run as printed, resumes from it and finishes."""
    import shlex

    from gptmod import data

    config = tmp_path / "cfg.json"
    config.write_text(CFG.to_json())
    out = tmp_path / "run"
    argv = [
        "train",
        "--framework",
        "torch",
        "--no-compile",
        "--config",
        str(config),
        "--data",
        str(shards),
        "--out",
        str(out),
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--ckpt-every",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--eps",
        "1e-07",
    ]
    real = data.TokenLoader.batch
    interrupt_loader_at(monkeypatch, 2)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 2 of 4 steps: the last checkpoint is {out / 'step_0000002'}" in err
    assert "Traceback" not in err and err.rstrip().endswith("gptmod train: interrupted")
    line = next(ln for ln in err.splitlines() if ln.startswith("to resume, run: "))
    resume = shlex.split(line.removeprefix("to resume, run: "))
    assert resume[:2] == ["gptmod", "train"] and "--eps" in resume and "--no-resume" not in resume

    monkeypatch.setattr(data.TokenLoader, "batch", real)
    assert cli.main(resume[1:]) == 0
    captured = capsys.readouterr()
    assert f"resuming from {out / 'step_0000002'}" in captured.err
    assert "done: 4 steps" in captured.out
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize(
    "ckpt_every, guard",
    [
        (1, r"parameter '[\w.]+' holds \d+ non-finite value\(s\)"),
        (0, r"the training loss is (nan|inf)"),
    ],
)
def test_a_diverging_run_stops_with_a_named_error(shards, tmp_path, framework, ckpt_every, guard):
    """Item 1: a run that blows up must stop with a named error, leave every checkpoint it wrote
    finite, and never write model.safetensors (before: it trained on, saved NaN and exited 0).
    Checkpointing every step, the parameter check at the checkpoint fires first (the step's loss was
    computed before its update);
    without checkpoints, the next step's loss does."""
    from safetensors.numpy import load_file

    tc = dataclasses.replace(
        RUN, lr=1e30, min_lr=0.0, steps=6, eval_every=0, grad_clip=0.0, ckpt_every=ckpt_every
    )
    with pytest.raises(training.NonFiniteError, match=rf"step \d+: {guard}.*Lower --lr"):
        _run(CFG, tc, shards, tmp_path, framework=framework)
    assert not (tmp_path / "model.safetensors").exists()
    saved = sorted(tmp_path.glob("step_*"))
    assert len(saved) == (1 if ckpt_every else 0)  # step 1's, before the blow-up
    for ckpt in saved:
        assert all(np.isfinite(v).all() for v in load_file(ckpt / "model.safetensors").values()), (
            ckpt
        )
