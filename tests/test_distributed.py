"""Past one device. JAX: on 8 simulated CPU devices (a subprocess, tests/sharded_worker.py),
the sharded forward, generation and train step equal the unsharded ones for every rules
preset, the parameters carry the shardings their rules give, and a compiled train step holds
the collectives each kind of parallelism needs and no replicated full-size weights. Torch: a
2-process torchrun (gloo) run of `gptmod train` under DDP and under FSDP2 logs the losses of
the one-process run with the same global batch, ends with the same parameters, writes
checkpoints that load anywhere, and resumes exactly.
The rules, mesh and launch checks (torchrun's variables among them, read without starting processes)
fail with errors that name the field, the value and the rule."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from gptmod import training, weights
from gptmod.config import load_preset
from gptmod.data import prepare
from gptmod_jax import sharding
from gptmod_torch import distributed

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
MESH_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


# ------------------------------------------------------------------------- JAX, 8 simulated devices


def _sharded_worker(*args: str, timeout: float) -> dict:
    """tests/sharded_worker.py's JSON from a run on 8 simulated CPU devices (stderr's tail if it
    fails)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_worker.py"), *args],
        env={**os.environ, **MESH_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_on_8_devices_every_rules_table_equals_one_device():
    # One test reading one subprocess: a fixture shared by several tests would run the subprocess
    # once per pytest-xdist worker (grouping with --dist loadgroup does not work with pytest 9.2,
    # pytest-xdist issue 1386).
    sharded = _sharded_worker(timeout=1200)
    for preset in sharding.PRESETS:
        _sharded_equals_unsharded(sharded, preset)
    _parameters_are_sharded_as_their_rules_say(sharded)
    _compiled_train_step_has_the_expected_collectives(sharded)


@pytest.mark.slow
def test_on_8_devices_kv_heads_replicate_over_a_larger_model_axis():
    # tiny has 2 KV heads for 4 query heads; on data=2,model=4 each KV head
    # sits on the 2 devices of its query heads.
    kv = _sharded_worker("kv", timeout=900)
    assert min(len(set(row)) for row in kv["want_tokens"]) >= 4, "degenerate tokens prove little"
    for preset in ("tp", "fsdp"):
        p = kv["presets"][preset]
        assert p["mesh"] == {"data": 2, "model_kv": 2, "model_rep": 2}, preset
        # fp32, another reduction order
        assert p["logits_max_abs_diff"] <= 2e-5 * p["logits_max_abs"], preset
        assert p["tokens_equal"], preset
        # the second step's loss follows a sharded update
        assert p["step_loss_max_diff"] <= 1e-5, preset
        # one whole KV head
        assert p["wk_shard_rows"] == kv["cfg"]["d_model"] // kv["cfg"]["n_head"], preset
    tp = kv["presets"]["tp"]
    assert (
        tp["wq_spec"] == "P(('model_kv', 'model_rep'), None)"
        and tp["wk_spec"] == "P('model_kv', None)"
    )
    assert tp["cache_spec"] == "P('data', 'model_kv')" and tp["cache_shard_heads"] == 1
    # Replication adds no collective: a forward and a decode step compile to the collectives of a
    # model whose 4 KV heads split evenly over model=4, i.e. tp's two all-reduces per layer (after
    # wo and after w_down), nothing else.
    assert tp["collectives"] == kv["even_collectives"]
    n_layer = kv["cfg"]["n_layer"]
    for step in ("forward", "decode"):
        assert tp["collectives"][step] == {
            **dict.fromkeys(tp["collectives"][step], 0),
            "all-reduce": 2 * n_layer,
        }
    assert kv["refusal"] == (
        "n_kv_head=2 KV heads cannot be split over mesh axis model=4; "
        "use_mesh(mesh, rules, cfg=cfg) to replicate them"
    )


def _sharded_equals_unsharded(sharded: dict, preset: str) -> None:
    r = sharded["presets"][preset]
    # fp32 rounding, other reduction order
    assert r["logits_max_abs_diff"] <= 2e-5 * r["logits_max_abs"], preset
    assert min(len(set(row)) for row in sharded["want_tokens"]) >= 4, (
        "degenerate tokens prove little"
    )
    assert r["tokens_equal"] and r["sampled_equal"] and r["stream_equal"], preset
    assert r["grad_loss_diff"] <= 1e-5 and r["grad_max_rel_diff"] <= 1e-5
    assert r["step_loss_max_diff"] <= 1e-5
    # Adam turns rounding noise in a near-zero gradient into a step of up to
    # lr, so after the steps the parameters are judged against the most they
    # can move (embedding rows of tokens seen once, mostly).
    travel = sharded["adam_travel"]
    worst = max(r["param_abs_diff"], key=r["param_abs_diff"].get)
    assert r["param_abs_diff"][worst] <= 0.1 * travel, (preset, worst)


def _parameters_are_sharded_as_their_rules_say(sharded: dict) -> None:
    cfg = sharded["cfg"]
    dp, tp, fsdp = (sharded["presets"][p]["specs"] for p in ("dp", "tp", "fsdp"))
    # data parallel: every weight replicated
    assert all(all(a is None for a in spec) for spec in dp.values())
    assert tp["blocks.0.attn.wq.weight"] == ["model", None] and tp["blocks.0.attn.wo.weight"] == [
        None,
        "model",
    ]
    assert tp["blocks.1.mlp.w_down.weight"] == [None, "model"] and tp["blocks.1.mlp.w_up.bias"] == [
        "model"
    ]
    assert tp["blocks.0.attn.wk.weight"] == ["model", None]
    # the vocabulary stays replicated (257 divides by nothing)
    assert tp["tok_emb.weight"] == [None, None]
    assert fsdp["blocks.0.mlp.w_gate.weight"] == ["model", "data"] and fsdp["lm_head.weight"] == [
        None,
        "data",
    ]
    assert fsdp["blocks.0.attn_norm.weight"] == ["data"] and fsdp["tok_emb.weight"] == [
        None,
        "data",
    ]
    shapes = sharded["presets"]["fsdp"]["shard_shapes"]
    # 1/8 of the weight
    assert shapes["blocks.0.mlp.w_up.weight"] == [cfg["d_ff"] // 4, cfg["d_model"] // 2]
    # Adam's moments follow
    assert sharded["presets"]["fsdp"]["opt_spec_w_up"] == "P('model', 'data')"


def _compiled_train_step_has_the_expected_collectives(sharded: dict) -> None:
    cfg = sharded["cfg"]
    c = {p: sharded["presets"][p]["collectives"] for p in sharding.PRESETS}
    # Data parallel: the gradients all-reduced (combined into one op), nothing gathered.
    assert c["dp"]["all-reduce"] >= 1 and c["dp"]["all-gather"] == 0
    # Tensor parallel: all-reduces of the row-parallel outputs (attention and MLP, forward and
    # backward); weights are never gathered.
    assert c["tp"]["all-reduce"] >= 2 * cfg["n_layer"] and c["tp"]["all-gather"] == 0
    # FSDP: weights all-gathered for use in the forward and again in the backward. The CPU pipeline
    # spells the gradient reduce-scatter as an all-reduce and a slice (GPU and TPU fuse them:
    # ReduceScatterCreator).
    assert c["fsdp"]["all-gather"] >= 2 * 7 * cfg["n_layer"] and c["fsdp"]["all-reduce"] >= 1
    # No unexpected full replication: the compiled step takes no full-size
    # MLP weight under tp or fsdp.
    full_w_up = f"f32[{cfg['d_ff']},{cfg['d_model']}]"
    assert full_w_up in sharded["presets"]["dp"]["hlo_param_shapes"]
    for preset in ("tp", "fsdp"):
        assert full_w_up not in sharded["presets"][preset]["hlo_param_shapes"], preset


# --------------------------------------------------------------------------- JAX, checks in-process


def test_write_rows_equals_the_indexed_cache_write_bit_for_bit():
    """The mesh path of KVCache.update (a vmapped scatter) writes what the
    readable indexed write does."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    b, k, h, s, t = 3, 2, 4, 16, 5
    k_cache, v_cache = (
        jnp.asarray(rng.normal(size=(b, k, h, s))),
        jnp.asarray(rng.normal(size=(b, k, s, h))),
    )
    # each row at its own positions
    pos = jnp.asarray(np.stack([rng.permutation(s)[:t] for _ in range(b)]))
    k_new, v_new = (
        jnp.asarray(rng.normal(size=(b, t, k, h))),
        jnp.asarray(rng.normal(size=(b, t, k, h))),
    )
    rows = jnp.arange(b)[:, None]
    want_k, want_v = k_cache.at[rows, :, :, pos].set(k_new), v_cache.at[rows, :, pos].set(v_new)
    got_k, got_v = sharding.write_rows(k_cache, v_cache, pos, k_new, v_new)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert not np.array_equal(np.asarray(got_k), np.asarray(k_cache))


def test_rules_tables_are_complete_and_checked():
    for preset in sharding.PRESETS:
        assert [a for a, _ in sharding.rules(preset)] == list(sharding.LOGICAL_AXES)
    assert dict(sharding.rules("tp", vocab="model"))["vocab"] == "model"
    for kw, msg in [
        (dict(preset="zp"), "unknown preset 'zp'"),
        (dict(length="data"), "unknown logical axis 'length'"),
        (dict(heads="tensor"), "heads='tensor': the mesh axes are data, model"),
    ]:
        preset = kw.pop("preset", "dp")
        with pytest.raises(ValueError, match=msg):
            sharding.rules(preset, **kw)
    with pytest.raises(ValueError, match="logical axis 'vocab' is not mapped"):
        sharding.rules({a: None for a in sharding.LOGICAL_AXES if a != "vocab"})


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("data=2,model", "'model' is not AXIS=SIZE"),
        ("rows=2", "'rows=2' is not"),
        ("data=0", "data='0' must be a positive integer"),
        ("data=2,data=2", "axis 'data' is given twice"),
        ("", "give at least one"),
    ],
)
def test_mesh_specs_are_checked(text, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.parse_mesh(text)


def test_mesh_size_and_divisibility_are_checked():
    assert sharding.parse_mesh("model=4") == {"data": 1, "model": 4}
    with pytest.raises(ValueError, match=r"mesh data=2,model=1: 2 devices, but 1 are available"):
        sharding.make_mesh("data=2")
    mesh = sharding.make_mesh("data=1")
    assert dict(mesh.shape) == {"data": 1, "model": 1} and all(
        t.name == "Auto" for t in mesh.axis_types
    )

    # check_divisible reads only the axis sizes; 8 real devices are the subprocess's business
    class FakeMesh:
        shape: ClassVar[dict[str, int]] = {"data": 2, "model": 4}

    cfg = load_preset("tiny")  # n_head 4, n_kv_head 2
    # model=4: each KV head replicated twice
    sharding.check_divisible(cfg, FakeMesh(), sharding.rules("tp"))
    FakeMesh.shape = {"data": 1, "model": 8}
    with pytest.raises(
        ValueError,
        match=r"n_head=4 is not divisible by mesh axis model=8 \(the rules shard "
        r"'heads' over 'model'\)",
    ):
        sharding.check_divisible(cfg, FakeMesh(), sharding.rules("tp"))
    # 6 query heads split over 3; 2 KV heads neither split nor replicate
    FakeMesh.shape = {"data": 1, "model": 3}
    six = dataclasses.replace(cfg, n_head=6, d_model=96, d_ff=192)
    with pytest.raises(
        ValueError,
        match=r"n_kv_head=2 neither divides nor is divisible by mesh axis model=3 "
        r"\(the rules shard 'kv_heads' over 'model'\)",
    ):
        sharding.check_divisible(six, FakeMesh(), sharding.rules("tp"))
    # replicated everywhere
    sharding.check_divisible(six, FakeMesh(), sharding.rules("tp", kv_heads=None))
    FakeMesh.shape = {"data": 2, "model": 4}
    with pytest.raises(ValueError, match="batch=3 is not divisible by mesh axis data=2"):
        sharding.check_divisible(cfg, FakeMesh(), sharding.rules("dp"), batch=3)
    sharding.check_divisible(cfg, FakeMesh(), sharding.rules("dp"), batch=4)


@pytest.mark.slow
def test_one_device_mesh_builds_the_same_model():
    import jax.numpy as jnp
    from flax import nnx

    import gptmod_jax

    cfg = load_preset("tiny")
    ref = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    state = gptmod_jax.export_state(ref)
    idx = jnp.asarray([[1, 2, 3, 4]])
    with sharding.use_mesh(sharding.make_mesh("data=1"), "fsdp") as mesh:
        model = gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(1)), state)
        assert model.blocks[0].mlp.w_up.weight[...].sharding.mesh == mesh
        np.testing.assert_allclose(model(idx), ref(idx), atol=1e-6)
    assert model.blocks[0].mlp.w_up.weight.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert not sharding.mesh_active()


# ------------------------------------------------------------------------ torch, torchrun with gloo

TRAIN = [
    "--framework",
    "torch",
    "--preset",
    "tiny",
    "--steps",
    "4",
    "--block-size",
    "32",
    "--log-every",
    "1",
    "--eval-every",
    "0",
    "--eval-batches",
    "2",
    "--warmup-steps",
    "1",
    "--ckpt-every",
    "2",
    "--grad-accum",
    "2",
    "--no-compile",
]


def _gptmod(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "gptmod.cli", *args]
    # --standalone: torchrun finds a free port itself, so parallel test workers do not collide
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "gptmod.cli",
            *args,
        ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The bundled plays as token shards (what `gptmod prepare --input bundled` writes)."""
    out = tmp_path_factory.mktemp("data") / "shk"
    prepare("bundled", out, progress=False)
    return out


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in training.RunLog.read(run / "log.jsonl")]


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp_equal_one_process_and_resume(shards, tmp_path, capsys):
    # One test for the runs that share the one-process reference (see the 8-device test on xdist);
    # the reference runs in this process.
    single = tmp_path / "single"
    r = cli(
        capsys, "train", *TRAIN, "--batch-size", "4", "--data", str(shards), "--out", str(single)
    )
    assert r.returncode == 0, r.stderr
    want, (a, cfg_a) = _losses(single), weights.load(single / "model.safetensors")
    for parallel in ("ddp", "fsdp"):
        run = tmp_path / parallel
        args = [
            "train",
            *TRAIN,
            "--batch-size",
            "2",
            "--parallel",
            parallel,
            "--data",
            str(shards),
            "--out",
            str(run),
        ]
        r = _gptmod(*args, procs=2)
        assert r.stdout.count("done: 4 steps") == 1, parallel  # rank 0 alone reports
        got = _losses(run)
        assert len(got) == 4 and np.abs(np.subtract(got, want)).max() <= 1e-5, (parallel, got, want)
        # canonical full tensors, whatever the sharding was
        b, cfg_b = weights.load(run / "model.safetensors")
        assert cfg_a == cfg_b and set(a) == set(b) and _max_diff(a, b) <= 1e-5, parallel
    # The checkpoint of a sharded run loads in the other framework too.
    from flax import nnx

    import gptmod_jax

    gptmod_jax.load_state(gptmod_jax.GPT(cfg_b, rngs=nnx.Rngs(0)), b)
    # As if the FSDP run had died after its step-2 checkpoint: the same
    # command continues from there.
    shutil.rmtree(run / "step_0000004")
    (run / "model.safetensors").unlink()
    (run / "latest").write_text("step_0000002\n")
    r = _gptmod(*args, procs=2)
    assert "resuming from" in r.stderr
    again, _ = weights.load(run / "model.safetensors")
    assert _max_diff(b, again) <= 1e-6
    assert [row["step"] for row in training.RunLog.read(run / "log.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--parallel", "ddp"], "--parallel ddp needs several processes: launch with torchrun"),
        (["--mesh", "data=1", "--framework", "torch"], "--mesh is for --framework jax"),
        (["--rules", "tp"], "--rules/--rule need --mesh"),
        (["--mesh", "data=1", "--rule", "vocab"], "--rule 'vocab': expected AXIS=MESH_AXIS"),
    ],
)
def test_launch_errors_name_the_option(args, msg, shards, tmp_path, capsys):
    cmd = [
        "train",
        *[a for a in TRAIN if a != "--framework" and a != "torch"],
        "--data",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        *args,
    ]
    if "--framework" not in args:
        cmd += ["--framework", "jax" if "--mesh" in args or "--rules" in args else "torch"]
    r = cli(capsys, *cmd)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


# What torchrun sets in the second of two processes on one node.
TORCHRUN_ENV = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def test_torchrun_env_gives_rank_device_and_backend_without_processes():
    Launch, launch_from_env = distributed.Launch, distributed.launch_from_env
    assert distributed.world_size({}) == 1 and distributed.world_size(TORCHRUN_ENV) == 2
    assert launch_from_env({}, gpus=0) == Launch(0, 1, 0, "cpu", "gloo")
    assert launch_from_env(TORCHRUN_ENV, gpus=0) == Launch(1, 2, 1, "cpu", "gloo")
    assert launch_from_env(TORCHRUN_ENV, gpus=2) == Launch(1, 2, 1, "cuda:1", "nccl")


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"RANK": None}, "WORLD_SIZE=2 but RANK not set: launch with torchrun"),
        ({"RANK": None, "MASTER_PORT": None}, "WORLD_SIZE=2 but RANK, MASTER_PORT not set"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "2"}, r"RANK=2 must be in \[0, WORLD_SIZE=2\)"),
        ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be in \[0, LOCAL_WORLD_SIZE=2\)"),
        ({"RANK": "0"}, "LOCAL_RANK=1 .* at most RANK=0"),
        ({"LOCAL_WORLD_SIZE": "3"}, r"LOCAL_WORLD_SIZE=3 must be in \[1, WORLD_SIZE=2\]"),
        ({"MASTER_PORT": "0"}, r"MASTER_PORT=0 must be in \[1, 65535\]"),
        ({"gpus": 1}, "LOCAL_RANK=1 but only 1 GPU"),
    ],
)
def test_torchrun_env_errors_name_the_variable(change, msg):
    gpus = change.pop("gpus", 0)
    env = {k: v for k, v in {**TORCHRUN_ENV, **change}.items() if v is not None}
    with pytest.raises(distributed.TorchrunEnvError, match=msg):
        distributed.launch_from_env(env, gpus=gpus)


def test_wrap_without_a_process_group_is_a_named_error():
    import gptmod_torch

    model = gptmod_torch.GPT(load_preset("tiny"))
    assert distributed.wrap(model, None) is model and not distributed.initialized()
    with pytest.raises(ValueError, match="parallel='zero': choose one of ddp, fsdp"):
        distributed.wrap(model, "zero")
    with pytest.raises(RuntimeError, match=r"parallel='fsdp' needs torch\.distributed initialised"):
        distributed.wrap(model, "fsdp")
    assert distributed.all_reduce_mean(1.5) == 1.5


def test_cli_names_the_missing_torchrun_variables(shards, tmp_path, monkeypatch, capsys):
    from gptmod import cli

    for name in (*distributed.TORCHRUN_VARS, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", *TRAIN, "--parallel", "ddp", "--data", str(shards), "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "gptmod train: error: WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not "
        "set: launch with torchrun, e.g. torchrun --standalone --nproc_per_node 2 -m gptmod.cli "
        "train ..."
    )


@pytest.mark.slow
def test_cli_generate_and_train_on_a_mesh_match_one_device(shards, tmp_path):
    # One subprocess with 8 devices runs every command (tests/sharded_worker.py, cli_runs).
    runs = _sharded_worker("cli", str(shards), str(tmp_path), timeout=900)
    for name, r in runs.items():
        if name != "generate model=8":
            assert r["code"] == 0, (name, r["stderr"][-4000:])
    # tiny has 4 query and 2 kv heads: a model axis of 2 splits both evenly,
    # one of 4 replicates each KV head twice.
    want = runs["generate"]["stdout"]
    assert want.startswith("To be, or not to be") and len(want) > len("To be, or not to be\n")
    assert runs["generate data=4,model=2"]["stdout"] == want
    assert runs["generate data=2,model=4"]["stdout"] == want
    # What replication cannot serve stays a one-line error: 8 devices on `model` for 4 query heads.
    r = runs["generate model=8"]
    assert r["code"] == 2 and "n_head=4 is not divisible by mesh axis model=8" in r["stderr"], r[
        "stderr"
    ]
    assert "Traceback" not in r["stderr"] and len(r["stderr"].strip().splitlines()) == 1
    want, got = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
    assert len(got) == 3 and np.abs(np.subtract(got, want)).max() <= 1e-5
    a, _ = weights.load(tmp_path / "one" / "model.safetensors")
    # gathered from the shards: canonical, whole
    b, _ = weights.load(tmp_path / "mesh" / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
