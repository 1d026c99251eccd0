"""One CPU thread count for torch, XLA and HF alike (`--threads` of generate, chat and bench), and
the machine's load, which bench records around every cell.

JAX has no thread-count setting: XLA's CPU client sizes its thread pools by the CPUs the process may
run on when its backend starts. So `limit_threads(n)` restricts the process's CPU affinity to n of
its CPUs (which XLA then counts), sets torch's intra-op threads to n (HF's models run on them too),
and exports the OpenMP/MKL variables for any library that starts later. It must run before JAX's
backend starts, and says so by name when it is too late. Without --threads a command takes
`auto_threads()`: one thread per CPU that is idle as it starts.

Why it matters: OpenMP threads spin-wait for each other, so on a machine whose cores are busy with
other work, two threads on two contended cores can run several times slower than one (docs/bench.md
has the figures measured here).
"""

from __future__ import annotations

import os
import sys
import time

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(n: int, flag: str = "--threads") -> int:
    """`n` when 1 <= n <= available_cpus(); otherwise a ValueError naming `flag`."""
    cpus = available_cpus()
    if not 1 <= n <= cpus:
        raise ValueError(
            f"{flag} {n}: must be between 1 and the {cpus} CPU(s) this process may use"
        )
    return n


def idle_cpus(sample_s: float = 0.2) -> int | None:
    """How many of this process's CPUs were idle over the next `sample_s` seconds (idle at least
    half the time, from /proc/stat; time stolen by a hypervisor's other guests counts as busy);
    None where there is no /proc/stat."""
    try:
        before = _cpu_times()
        time.sleep(sample_s)
        after = _cpu_times()
    except OSError:
        return None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(after)
    idle = 0
    for cpu in cpus & set(before) & set(after):
        d = [b - a for a, b in zip(before[cpu], after[cpu], strict=True)]
        total = sum(d[:8])  # user nice system idle iowait irq softirq steal
        idle += total > 0 and (d[3] + d[4]) / total >= 0.5
    return idle


def _cpu_times() -> dict[int, list[int]]:
    with open("/proc/stat") as f:
        rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    return {int(r[0][3:]): [int(v) for v in r[1:9]] + [0] * (9 - len(r)) for r in rows}


def auto_threads() -> int:
    """The default thread count: the CPUs idle as the command starts (`idle_cpus`), at least 1,
    or all of them where that cannot be measured. On this project's 2-core machine one thread per
    idle CPU was the faster choice both ways: 1.3-1.6x faster with two threads on a quiet machine,
    and 14-17x faster (torch, HF) with one thread beside a busy neighbour (docs/bench.md)."""
    idle = idle_cpus()
    return available_cpus() if idle is None else max(1, idle)


def jax_started() -> bool:
    """Whether JAX's backend (and so XLA's thread pools) has started in this process."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # the one place that knows whether XLA has started

    return xla_bridge.backends_are_initialized()


def limit_threads(n: int, pin: bool = True) -> None:
    """Run torch, XLA and HF on `n` threads and CPUs (see the module docstring). `pin=False` leaves
    the CPU affinity as it is, for processes that share the CPUs with siblings doing the same (the
    test session's xdist workers): pinning would put each of them on the same first `n` CPUs."""
    check_threads(n)
    if jax_started():
        raise RuntimeError(
            "limit_threads: JAX's backend has already started with its own thread pools; "
            "call it before the first JAX computation"
        )
    if pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:n]
        os.sched_setaffinity(0, cpus)
    for name in _ENV:
        os.environ[name] = str(n)
    if n == 1:  # Eigen's own pool inside XLA's CPU matmuls
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    import torch

    torch.set_num_threads(n)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
