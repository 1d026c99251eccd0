"""Peak memory of a training step in each twin, and where it goes (issue 17:
"JAX training took 4.8 GB").

Each twin runs in its own process: build the preset, take a few steps of the default recipe on
random tokens, and report the process's peak RSS over its RSS before the trainer was built. For JAX
it also prints XLA's own account of the compiled step (`memory_analysis`: arguments, outputs,
temporaries), and for both the size of one micro-batch's fp32 logits, the tensor that dominates:
tokens x vocab x 4 bytes.

    python scripts/train_memory.py [--preset shakespeare-small] [--batch-size 16]
        [--grad-accum 1] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: kilobytes


def one(framework: str, preset: str, batch: int, accum: int, steps: int, block: int) -> dict:
    import numpy as np

    from gptmod import training
    from gptmod.config import load_preset

    cfg = load_preset(preset)
    tc = training.TrainConfig(
        steps=max(steps, 2), warmup_steps=1, batch_size=batch, grad_accum=accum, block_size=block
    )
    state = training.init_state(cfg, 0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (accum, batch, block), dtype=np.int64).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (accum, batch, block), dtype=np.int64).astype(np.int32)
    out: dict = {"framework": framework}
    if framework == "jax":
        from flax import nnx

        import gptmod_jax
        from gptmod_jax.train import Trainer

        base = rss_mb()
        trainer = Trainer(gptmod_jax.load_state(gptmod_jax.GPT(cfg, rngs=nnx.Rngs(0)), state), tc)
    else:
        import torch

        import gptmod_torch
        from gptmod_torch.train import Trainer

        torch.manual_seed(0)
        base = rss_mb()
        # as the CLI
        trainer = Trainer(gptmod_torch.load_state(gptmod_torch.GPT(cfg), state), tc, compile=True)
    for _ in range(steps):
        float(trainer.step(x, y)["loss"])
    peak = peak_mb()
    out.update(
        base_rss_mb=base,
        peak_rss_mb=peak,
        step_peak_over_base_mb=peak - base,
        params_m=sum(v.size for v in state.values()) / 1e6,
        logits_mb=batch * block * cfg.vocab_size * 4 / 1e6,
    )
    if framework == "jax":  # after the peak is read: this second compile must not count in it
        import jax.numpy as jnp

        lowered = trainer._step.lower(
            trainer.params, trainer.opt_state, jnp.asarray(x), jnp.asarray(y)
        )
        m = lowered.compile().memory_analysis()
        if m is not None:
            out["xla_mb"] = {
                k: getattr(m, f"{k}_size_in_bytes") / 1e6 for k in ("argument", "output", "temp")
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--preset", default="shakespeare-small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", choices=["jax", "torch"], help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.preset, a.batch_size, a.grad_accum, a.steps, a.block_size)))
        return 0
    for fw in ("jax", "torch"):
        sizes = [
            f"--batch-size={a.batch_size}",
            f"--grad-accum={a.grad_accum}",
            f"--block-size={a.block_size}",
        ]
        cmd = [
            sys.executable,
            __file__,
            "--one",
            fw,
            "--preset",
            a.preset,
            *sizes,
            "--steps",
            str(a.steps),
        ]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        xla = r.get("xla_mb")
        extra = (
            f"; XLA: arguments {xla['argument']:.0f} MB, temporaries {xla['temp']:.0f} MB"
            if xla
            else ""
        )
        print(
            f"{fw:5s} {a.preset} batch {a.batch_size}x{a.grad_accum} block {a.block_size}: "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['step_peak_over_base_mb']:.0f} MB over "
            "the process before the trainer; one micro-batch's fp32 logits "
            f"{r['logits_mb']:.0f} MB{extra}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
