"""Measuring: timers, peak memory (RSS, CUDA, JAX) with glibc told to return freed blocks
(mallopt), freed heap handed back between steps (release_memory, also the parity suite's), and the
memory bandwidth behind the batch-1 decode roofline."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

BANDWIDTH_BYTES = 1 << 30


@dataclass
class Peak:
    mb: float | None = None  # set when the block exits; None where it cannot be measured


@contextmanager
def rss_peak(interval_s: float = 0.002) -> Iterator[Peak]:
    """Growth of resident memory (MB) while the block runs: a thread samples /proc/self/statm every
    `interval_s` (None where there is no /proc)."""
    peak = Peak()
    if not os.path.exists("/proc/self/statm"):
        yield peak
        return
    fd, page = os.open("/proc/self/statm", os.O_RDONLY), os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(os.pread(fd, 128, 0).split()[1]) * page
    before = top = rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal top
        while not stop.wait(interval_s):
            top = max(top, rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.mb = (max(top, rss()) - before) / 1e6
        os.close(fd)


@contextmanager
def cuda_peak() -> Iterator[Peak]:
    """torch's CUDA allocator peak (MB) above what was allocated before the block."""
    import torch

    peak = Peak()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield peak
    torch.cuda.synchronize()
    peak.mb = (torch.cuda.max_memory_allocated() - before) / 1e6


@contextmanager
def jax_device_peak(device: Any) -> Iterator[Peak]:
    """JAX's peak_bytes_in_use above bytes_in_use before (MB), where the backend reports them. JAX
    cannot reset its peak, so this is an upper bound once an earlier call peaked higher."""
    peak = Peak()
    before = (device.memory_stats() or {}).get("bytes_in_use")
    yield peak
    top = (device.memory_stats() or {}).get("peak_bytes_in_use")
    peak.mb = None if top is None or before is None else (top - before) / 1e6


# glibc's mallopt parameters (malloc.h) and the values restored after a
# memory measurement: large blocks served from the heap, as they are once
# glibc's dynamic threshold has grown (its maximum, 32 MiB on 64-bit).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP_THRESHOLD, _HEAP_TRIM_THRESHOLD = 32 << 20, 64 << 20


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect what is garbage and hand freed heap back to the system. glibc keeps freed blocks
    below its mmap threshold, which grows with each large block freed, in the heap: a long run of
    steps that each allocate and free large temporaries (the parity checks) would otherwise raise
    the floor that each later step's peak stands on (the per-op trace left 1.2 GB of freed heap on
    SmolLM2). The trim is a no-op where the C library is not glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def fresh_allocations(threshold: int = 128 << 10) -> Iterator[None]:
    """While the block runs, glibc serves every allocation of `threshold` bytes
    or more with its own mapping and returns it to the system when freed, so
    resident memory follows what is live: a block an earlier call freed is not
    silently reused, uncounted. A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, threshold)
    # hand back what earlier calls left on the heap, so it cannot be reused uncounted
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD)


@dataclass
class Timing:
    warmup_s: float
    median_s: float


def time_call(fn: Callable[[], object], repeats: int) -> Timing:
    """One warm-up call, then the median of `repeats` calls."""
    t0 = time.perf_counter()
    fn()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(warmup, statistics.median(times))


def peak_memory(
    fn: Callable[[], object], meter: Callable[[], AbstractContextManager[Peak]]
) -> float | None:
    """MB that one more call of `fn` needs beyond what is resident before it
    (see the package docstring)."""
    with fresh_allocations(), meter() as peak:
        fn()
    return peak.mb


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, device: str = "cpu", passes: int = 5) -> float:
    """Read bandwidth in GB/s (1e9 bytes): torch's multi-threaded sum over an `nbytes` fp32 tensor,
    one warm-up pass, then the median of `passes`."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    # written, so every page is really resident
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    times = []
    for _ in range(passes + 1):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times[1:]) / 1e9


def copy_gb_s(nbytes: int, copies: int, seconds: float) -> float:
    """GB/s (1e9 bytes) of `copies` copies of `nbytes` in `seconds`: each
    reads and writes them, 2 x nbytes."""
    return 2 * nbytes * copies / seconds / 1e9


def measure_copy_bandwidth(
    nbytes: int = BANDWIDTH_BYTES, device: str = "gpu", passes: int = 5, copies: int = 10
) -> float:
    """GPU memory (HBM) bandwidth in GB/s from a device-to-device copy: each
    pass times `copies` of `dst.copy_(src)` over `nbytes` (far past the L2
    cache) between two CUDA events, after one warm-up pass;
    the median of `passes` (`copy_gb_s`). device="cpu" runs the same copies
    timed by the host clock."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    # written, so every page is really resident
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(passes + 1):
        if dev == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(copies):
                dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s, device time between the events
        else:
            t0 = time.perf_counter()
            for _ in range(copies):
                dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return copy_gb_s(src.nbytes, copies, statistics.median(times[1:]))


def bandwidth(device: str, nbytes: int = BANDWIDTH_BYTES) -> float:
    """The roofline's bandwidth in GB/s: the read bandwidth on the CPU, the
    HBM copy bandwidth on a GPU."""
    return (
        measure_copy_bandwidth(nbytes, device)
        if device == "gpu"
        else measure_bandwidth(nbytes, device)
    )


def roofline_tok_s(bandwidth_gb_s: float, wbytes: int) -> float:
    """The batch-1 decode ceiling in tokens/s: every step reads all `wbytes` weight bytes once."""
    return bandwidth_gb_s * 1e9 / wbytes


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: the parameters and persistent buffers of the state
    dict (an int8 model's weights and scales are buffers), each tensor once (a tied one too)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())
