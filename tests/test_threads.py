"""--threads (gptmod.threads): one count applied to torch, XLA and HF by CPU affinity and torch's
own setting, refused by name when out of range or too late, and the load average bench records."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from gptmod import threads

# What limit_threads sets, and the test session sets for its workers (tests/conftest.py): the
# subprocesses here start without them, so that what they see is limit_threads' doing.
THREAD_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("n", [0, -1, threads.available_cpus() + 1])
def test_a_count_out_of_range_is_refused_naming_the_flag(n):
    with pytest.raises(ValueError, match=rf"--threads {n}: must be between 1 and the \d+ CPU"):
        threads.check_threads(n)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
@pytest.mark.parametrize("pin", [True, False])
def test_one_thread_limits_torch_xla_and_the_cpus_before_jax_starts(pin):
    # pin=False (the test session's workers, tests/conftest.py): the same limits, every CPU kept
    r = _python(
        f"from gptmod.threads import limit_threads; limit_threads(1, pin={pin})\n"
        "import os, torch, jax, jax.numpy as jnp\n"
        "print(len(os.sched_getaffinity(0)), torch.get_num_threads(),\n"
        "      os.environ['OMP_NUM_THREADS'])\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(float((jnp.ones((64, 64)) @ jnp.ones((64, 64)))[0, 0]))\n"
    )
    assert r.returncode == 0, r.stderr
    counts, flags, product = r.stdout.splitlines()
    assert counts.split() == ["1" if pin else str(threads.available_cpus()), "1", "1"]
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


def _fake_stat(monkeypatch, busy: dict[int, str]):
    """/proc/stat counters over the sample for every CPU of this process: idle, or busy in `busy`'s
    field ("user" or "steal")."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    field = {"user": 0, "steal": 7}
    calls = itertools.cycle([0, 1])  # before and after, for each sample

    def times():
        t = next(calls)
        out = {}
        for c in cpus:
            row = [0] * 8
            row[field[busy[c]] if c in busy else 3] = 100 * t  # user/steal, or idle
            out[c] = row
        return out

    monkeypatch.setattr(threads, "_cpu_times", times)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    return cpus


def test_idle_cpus_counts_neither_busy_nor_stolen_cpus(monkeypatch):
    cpus = _fake_stat(monkeypatch, {})
    assert threads.idle_cpus() == len(cpus)
    first = cpus[0]
    _fake_stat(monkeypatch, {first: "user"})
    assert threads.idle_cpus() == len(cpus) - 1
    _fake_stat(monkeypatch, {first: "steal"})  # a hypervisor's other guest on that core
    assert threads.idle_cpus() == len(cpus) - 1
    _fake_stat(monkeypatch, {c: "user" for c in cpus})
    assert threads.idle_cpus() == 0 and threads.auto_threads() == 1  # never fewer than one


def test_auto_threads_is_every_cpu_where_idleness_cannot_be_read(monkeypatch):
    def missing():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(threads, "_cpu_times", missing)
    assert threads.idle_cpus() is None and threads.auto_threads() == threads.available_cpus()
