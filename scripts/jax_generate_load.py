"""Load test of JAX generation: many `generate` calls at random batch sizes and prompt lengths.

Prints how many executables the jitted generation function holds and the
process RSS before and after, so a per-shape compile cache that grows
without bound shows up (issue 17). Tiny random model, CPU is enough:

    python scripts/jax_generate_load.py [--calls 300] [--max-batch 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib
import random
import resource
import sys
import time

import jax
from flax import nnx

import gptmod_jax
from gptmod.config import load_preset

# the package exports the function under the same name
jg = importlib.import_module("gptmod_jax.generate")


def rss_mb() -> float:
    """Resident set size now, in MB (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class CompileCounter:
    """Counts XLA compilations through jax.monitoring's duration events
    (public API in jax 0.4.x-0.12)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **kw: object) -> None:
        if event == self.EVENT:
            self.n += 1


def executables() -> int | None:
    """Entries in the jitted generate's executable cache (None where jax
    does not expose `_cache_size`)."""
    size = getattr(jg._generate, "_cache_size", None)
    return size() if callable(size) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_preset("tiny")
    model = gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0))
    rng = random.Random(args.seed)
    counter = CompileCounter()
    # warm up: the first executable and jax's own start-up allocations
    jg.generate(model, [[1, 2, 3]], 2)
    rss0, exe0, comp0 = rss_mb(), executables(), counter.n
    start = time.perf_counter()
    batches = set()
    for _ in range(args.calls):
        b = rng.randint(1, args.max_batch)
        batches.add(b)
        prompts = [
            [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, args.max_prompt))]
            for _ in range(b)
        ]
        jg.generate(model, prompts, args.max_new_tokens)
    elapsed = time.perf_counter() - start
    rss1, exe1 = rss_mb(), executables()
    print(
        f"jax {jax.__version__}: {args.calls} calls, batch sizes 1-{args.max_batch} "
        f"({len(batches)} distinct), prompt lengths 1-{args.max_prompt}, {elapsed:.1f} s"
    )
    print(
        f"executables of generate's jitted function: {exe0} after warm-up -> {exe1} after the calls"
    )
    print(f"XLA compilations during the calls: {counter.n - comp0}")
    print(f"RSS: {rss0:.0f} MB -> {rss1:.0f} MB ({rss1 - rss0:+.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
