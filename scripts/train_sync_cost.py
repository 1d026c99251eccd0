"""What the training loop's per-step loss read costs in JAX (issue 17, the progress bar).

The loop reads each step's loss (`float(metrics["loss"])`) so the bar counts finished steps. That
read waits for the step, so the host can no longer load and dispatch step s+1's batch while step s
runs. This times the same steps both ways, on the bundled plays and the default preset, in
alternating rounds so that the machine's drift hits both alike:

    each   read every step's loss (what the loop does)
    every  read only every --log-every steps (what it did before), dispatching ahead in between

    python scripts/train_sync_cost.py [--preset shakespeare-small] [--steps 10]
        [--rounds 3] [--log-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flax import nnx

import gptmod_jax
from gptmod import training
from gptmod.config import load_preset
from gptmod.data import TokenLoader, prepare
from gptmod_jax.train import Trainer


def timed(
    trainer: Trainer, data: TokenLoader, tc: training.TrainConfig, start: int, n: int, every: int
) -> float:
    """Seconds per step over steps [start, start + n), reading the loss
    every `every` steps and at the end."""
    shape = (tc.grad_accum, tc.batch_size, tc.block_size)
    t0 = time.perf_counter()
    for s in range(start, start + n):
        x, y = data.batch(s)
        metrics = trainer.step(x.reshape(shape), y.reshape(shape))
        if (s + 1 - start) % every == 0 or s + 1 == start + n:
            float(metrics["loss"])
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare-small")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    a = ap.parse_args()
    cfg = load_preset(a.preset)
    tc = training.TrainConfig(steps=10_000, warmup_steps=10)
    with tempfile.TemporaryDirectory() as tmp:
        prepare("bundled", Path(tmp) / "shk", progress=False)  # the eight bundled plays
        data = TokenLoader(
            Path(tmp) / "shk", "train", block_size=tc.block_size, batch_size=tc.batch_size, seed=0
        )
        model = gptmod_jax.load_state(
            gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), training.init_state(cfg, 0)
        )
        trainer = Trainer(model, tc)
        step = 0
        timed(trainer, data, tc, step, 2, 1)  # compile
        step += 2
        per = {"each": [], "every": []}
        for r in range(a.rounds):
            for mode in ("each", "every") if r % 2 == 0 else ("every", "each"):
                per[mode].append(
                    timed(trainer, data, tc, step, a.steps, 1 if mode == "each" else a.log_every)
                )
                step += a.steps
    each, every = statistics.median(per["each"]), statistics.median(per["every"])
    print(
        f"{a.preset}, batch {tc.batch_size} x block {tc.block_size}, {a.rounds} "
        f"rounds of {a.steps} steps:"
    )

    def ms(ts: list[float]) -> str:
        return ", ".join(f"{t * 1e3:.0f}" for t in ts)

    print(f"  read each step:      {each * 1e3:8.1f} ms/step  (rounds: {ms(per['each'])})")
    print(
        f"  read every {a.log_every:<3d} steps: {every * 1e3:8.1f} ms/step  "
        f"(rounds: {ms(per['every'])})"
    )
    print(
        f"  cost of the per-step read: {100 * (each / every - 1):+.1f}% "
        "of a step (median of rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
