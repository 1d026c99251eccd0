"""`gptmod gpu-check` on the CPU: help, the dry run's exact commands, the no-GPU error, the step
runner (a failing, a hung and an interrupted step), and parity's --tf32 option (its CPU error, the
TF32 budget, the label)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gptmod import cli, gpu_check
from gptmod.config import load_preset
from gptmod.parity import suite, text
from gptmod.parity.__main__ import label_tf32
from gptmod.parity.__main__ import main as parity_main
from gptmod.parity.runner import format_markdown, format_table

PY = sys.executable
STEPS = ["parity", "parity-tf32", "bench-gpt2", "bench-gpt2-medium", "bench-modern-gpt2"]


def test_help_names_every_step(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["gpu-check", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "parity-tf32",
        "bench-PRESET",
        "--dry-run",
        "under 8 minutes",
        "gpu-check.md",
        "130",
    ):
        assert word in out, word


def _expected(out: Path) -> list[list[str]]:
    """The five commands as a user would type them: an oracle written out independently of
    gpu_check.plan."""
    parity = [PY, *shlex.split("-m gptmod.parity --device gpu --quick")]
    tf32 = shlex.split(
        "--tf32 --dtype float32 --check modules --check logits --check text --check cached"
        " --check greedy --check divergence"
    )
    bench = shlex.split(
        "--dtype bfloat16 --batch 1 --batch 8 --batch 32 --frameworks jax,torch-eager,"
        "torch-cudagraphs --no-scaling --no-compile-table --json"
    )
    return [
        [*parity, "--json", f"{out}/parity.json", "--markdown", f"{out}/parity.md"],
        [
            *parity,
            *tf32,
            *["--json", f"{out}/parity-tf32.json", "--markdown", f"{out}/parity-tf32.md"],
        ],
        *(
            [
                PY,
                *shlex.split("-m gptmod.cli bench --device gpu --quick --preset"),
                preset,
                *bench,
                f"{out}/bench-{preset}.json",
            ]
            for preset in ("gpt2", "gpt2-medium", "modern-gpt2")
        ),
    ]


def test_dry_run_prints_the_exact_commands(tmp_path, capsys):
    out = tmp_path / "gc"
    assert cli.main(["gpu-check", "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(ln) for ln in lines if not ln.startswith("#")]
    assert commands == _expected(out)
    assert [s.name for s in gpu_check.plan(out)] == STEPS
    assert f"summary {out}/gpu-check.md and {out}/gpu-check.json" in lines[-1]
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in lines[0]
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_only_and_its_errors(tmp_path, capsys):
    assert (
        cli.main(["gpu-check", "--dry-run", "--out", str(tmp_path), "--only", "parity-tf32"]) == 0
    )
    commands = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert [shlex.split(c) for c in commands] == [_expected(tmp_path)[1]]
    assert cli.main(["gpu-check", "--dry-run", "--only", "bench-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only bench-tiny: no such step" in err
    assert cli.main(["gpu-check", "--dry-run", "--timeout-scale", "0"]) == 2
    assert "--timeout-scale 0.0: must be > 0" in capsys.readouterr().err


def test_timeout_scale_multiplies_every_cap(tmp_path):
    caps = {s.name: s.timeout_s for s in gpu_check.plan(tmp_path, timeout_scale=2)}
    assert caps == {k: 2 * v for k, v in gpu_check.TIMEOUTS.items()}
    # caps stay near the 8-minute target
    assert sum(gpu_check.TIMEOUTS.values()) <= 1.25 * gpu_check.TARGET_S


def test_real_run_without_a_gpu_exits_2_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gc"
    p = subprocess.run(
        [PY, "-m", "gptmod.cli", "gpu-check", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(
        "gptmod gpu-check: error: needs a GPU in both twins"
    )
    assert "torch " in p.stderr and "JAX " in p.stderr and "jax[cuda12]" in p.stderr
    assert not out.exists()  # nothing ran


def test_missing_gpu_names_the_twin():
    assert gpu_check.missing_gpu({"torch_cuda": True, "jax_backend": "gpu"}) is None
    only_jax = gpu_check.missing_gpu(
        {"torch_cuda": True, "torch_cuda_version": "13.0", "jax_backend": "cpu"}
    )
    assert only_jax.startswith("JAX ") and "backend cpu" in only_jax and "jax[cuda12]" in only_jax
    only_torch = gpu_check.missing_gpu(
        {"torch": "2.11.0+cpu", "torch_cuda": False, "jax_backend": "gpu"}
    )
    assert only_torch.startswith("torch 2.11.0+cpu sees no CUDA device") and "JAX" not in only_torch


def test_runner_records_each_step_and_goes_on_after_a_failure(tmp_path, capsys):
    out = tmp_path / "gc"
    steps = [
        gpu_check.Step("ok", [PY, "-c", "print('hello from ok')"], 30),
        gpu_check.Step(
            "fails",
            [PY, "-c", "import sys; print('about to fail', file=sys.stderr); sys.exit(3)"],
            30,
        ),
        gpu_check.Step(
            "hangs", [PY, "-c", "import time; print('hanging', flush=True); time.sleep(60)"], 1.5
        ),
        gpu_check.Step("table", [PY, "-c", "print('| a | b |')"], 30, markdown=out / "table.md"),
    ]
    start = time.monotonic()
    assert gpu_check.run_check(steps, out, machine={"torch_devices": []}) == 1
    assert time.monotonic() - start < 20  # the hung step was stopped at its cap
    data = json.loads((out / "gpu-check.json").read_text())
    got = [(s["name"], s["status"], s["rc"]) for s in data["steps"]]
    assert got == [
        ("ok", "pass", 0),
        ("fails", "FAIL", 3),
        ("hangs", "timeout", 124),
        ("table", "pass", 0),
    ]
    assert data["failed"] == ["fails", "hangs"] and data["passed"] is False
    walls = [s["wall_s"] for s in data["steps"]]
    assert all(w > 0 for w in walls) and 1.4 < walls[2] < 10
    assert data["steps"][1]["command"] == shlex.join(steps[1].argv)
    assert {"python", "torch", "jax", "jaxlib", "flax", "transformers"} <= set(data["versions"])
    assert "hello from ok" in (out / "ok.log").read_text()
    assert "about to fail" in (out / "fails.log").read_text()  # stderr is in the log too
    assert "stopped at its cap" in (out / "hangs.log").read_text()
    assert "| a | b |" in (out / "table.md").read_text()
    md = (out / "gpu-check.md").read_text()
    assert (
        "| fails | FAIL | 3 |" in md
        and "| hangs | timeout | 124 |" in md
        and "not passed: fails, hangs" in md
    )
    assert "about to fail" in md  # a failing step's log tail is in the summary
    err = capsys.readouterr().err
    assert "fails: FAIL (rc 3)" in err and "not passed: fails, hangs" in err


RUNNER = """
import sys
from pathlib import Path
from gptmod import gpu_check
py, out = sys.executable, Path(sys.argv[1])
sleeper = "import os, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
steps = [gpu_check.Step("first", [py, "-c", "print('first done')"], 30),
         gpu_check.Step("sleeps", [py, "-c", "import sys; " + sleeper, str(out / "pid")], 120),
         gpu_check.Step("never", [py, "-c", "print('never')"], 30)]
sys.exit(gpu_check.run_check(steps, out))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_the_step_and_writes_the_partial_summary(tmp_path, sig, code):
    out = tmp_path / "gc"
    p = subprocess.Popen(
        [PY, "-c", textwrap.dedent(RUNNER), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "pid").is_file() or not (out / "pid").read_text():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    child = int((out / "pid").read_text())
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the running step is gone, not orphaned
    data = json.loads((out / "gpu-check.json").read_text())
    assert [(s["name"], s["status"]) for s in data["steps"]] == [
        ("first", "pass"),
        ("sleeps", "interrupted"),
        ("never", "not run"),
    ]
    assert data["steps"][1]["wall_s"] > 0 and "interrupted during sleeps" in err
    assert "| never | not run |" in (out / "gpu-check.md").read_text()


# ----------------------------------------------------------------------------- parity --tf32


def test_parity_tf32_is_a_gpu_mode(capsys):
    assert parity_main(["--tf32"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "parity: error: --tf32 is a GPU matmul mode (TF32 tensor cores, Ampere and "
        "later): add --device gpu\n"
    )
    assert parity_main(["--tf32", "--device", "gpu", "--trace"]) == 2
    assert "--tf32 with --trace" in capsys.readouterr().err


def test_parity_tf32_on_a_cpu_machine_is_the_gpu_error(capsys):
    import jax
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = jax.config.jax_default_matmul_precision
    assert parity_main(["--tf32", "--device", "gpu", "--preset", "tiny"]) == 2
    assert "--device gpu needs CUDA in torch" in capsys.readouterr().err
    # an error leaves the process's precision alone
    assert jax.config.jax_default_matmul_precision == before


def _case(dtype: str) -> suite.Case:
    return suite.Case("tiny", load_preset("tiny"), dtype, {}, np.zeros((1, 4), dtype=np.int64))


def test_tf32_budget_is_fp16s_for_fp32_rows_and_restored():
    scale, e = 2.0, 4e-3  # e = 2e-3 of the scale: far out of fp32's 2e-5, inside fp16's 1e-2
    assert not suite.numeric_row("logits", _case("float32"), "sdpa", "xla", e, e, e, scale).passed
    with suite.tf32_budget():
        row = suite.numeric_row("logits", _case("float32"), "sdpa", "xla", e, e, e, scale)
        assert (
            row.passed
            and row.budget == pytest.approx(1e-2 * scale)
            and row.e_max == pytest.approx(2e-2)
        )
        # every module sees it
        assert text.REL["float32"] == 1e-2 and suite.ABS_FLOOR["float32"] == 1e-4
        bf16 = suite.numeric_row("logits", _case("bfloat16"), "sdpa", "xla", e, e, e, scale)
        assert bf16.budget == pytest.approx(5e-2 * scale)  # other dtypes keep theirs
        assert not suite.numeric_row(
            "logits", _case("float32"), "sdpa", "xla", 0.05, e, e, scale
        ).passed
    with pytest.raises(RuntimeError), suite.tf32_budget():
        raise RuntimeError("a check failed")
    assert suite.REL["float32"] == 2e-5 and suite.ABS_FLOOR["float32"] == 1e-6
    with suite.tf32_budget(False):
        assert suite.REL["float32"] == 2e-5


def test_tf32_rows_are_labelled_in_every_report():
    rows = [
        suite.numeric_row("logits", _case(d), "sdpa", "xla", 1e-6, 1e-6, 1e-6, 1.0)
        for d in ("float32", "bfloat16")
    ]
    labelled = label_tf32(rows)
    assert [r.dtype for r in labelled] == ["float32 (tf32)", "bfloat16"] and rows[
        0
    ].dtype == "float32"
    assert "tiny · float32 (tf32)" in format_table(labelled, width=150)
    header = {"device": "cuda", "versions": {"torch": "x"}, "passed": True}
    assert "| logits | tiny | float32 (tf32) |" in format_markdown(labelled, header)


def test_the_shell_wrapper_runs_the_same_command(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    p = subprocess.run(
        [str(script), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": PY},
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert [shlex.split(ln) for ln in p.stdout.splitlines() if not ln.startswith("#")] == _expected(
        tmp_path
    )
