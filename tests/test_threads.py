"""--threads (gptmod.threads): one count applied to torch, XLA and HF by CPU affinity and torch's
own setting, refused by name when out of range or too late, and the load average bench records."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gptmod import threads


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("n", [0, -1, threads.available_cpus() + 1])
def test_a_count_out_of_range_is_refused_naming_the_flag(n):
    with pytest.raises(ValueError, match=rf"--threads {n}: must be between 1 and the \d+ CPU"):
        threads.check_threads(n)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_one_thread_limits_torch_xla_and_the_cpus_before_jax_starts():
    r = _python(
        "from gptmod.threads import limit_threads; limit_threads(1)\n"
        "import os, torch, jax, jax.numpy as jnp\n"
        "print(len(os.sched_getaffinity(0)), torch.get_num_threads(),\n"
        "      os.environ['OMP_NUM_THREADS'])\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(float((jnp.ones((64, 64)) @ jnp.ones((64, 64)))[0, 0]))\n"
    )
    assert r.returncode == 0, r.stderr
    counts, flags, product = r.stdout.splitlines()
    assert counts.split() == ["1", "1", "1"]
    assert "--xla_cpu_multi_thread_eigen=false" in flags
    assert product == "64.0"  # XLA still computes, on the one CPU


def test_too_late_once_jax_has_started():
    r = _python(
        "import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n"
        "import os; before = os.sched_getaffinity(0)\n"
        "from gptmod.threads import limit_threads\n"
        "try:\n    limit_threads(1)\nexcept RuntimeError as e:\n    print(e)\n"
        "print(os.sched_getaffinity(0) == before)\n"
    )
    assert r.returncode == 0, r.stderr
    message, unchanged = r.stdout.splitlines()
    assert "JAX's backend has already started" in message and unchanged == "True"


def test_generate_takes_threads_and_refuses_a_bad_count():
    base = [sys.executable, "-m", "gptmod.cli", "generate", "--preset", "tiny", "--prompt", "x"]
    ok = subprocess.run(
        [*base, "--threads", "1", "--max-new-tokens", "4", "--framework", "torch"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 tokens in" in ok.stderr
    bad = subprocess.run([*base, "--threads", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--threads 0: must be between 1 and the" in bad.stderr


def test_load_average_is_the_one_minute_figure():
    load = threads.load_average()
    assert load is None or (load >= 0 and load == pytest.approx(os.getloadavg()[0], abs=5.0))
