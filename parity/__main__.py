"""`python -m parity`: side-by-side logits of the torch and JAX twins against a float64 reference."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gptmod.backends import DEFAULT_BACKEND, JAX_BACKENDS, TORCH_BACKENDS, BackendUnavailableError
from gptmod.config import ModelConfig, list_presets, load_preset
from parity.compare import DTYPES, compare_logits, format_rows, rows_as_dicts, strict_precision


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity",
        description="Compare the torch and JAX twins on the same seeded random weights and tokens. Each framework's "
        "logits are measured against a float64 torch reference (e_torch, e_jax), next to their difference |Δ|.",
    )
    p.add_argument(
        "--preset",
        action="append",
        choices=list_presets(),
        help="preset(s) to run (repeatable); default: tiny, gpt2, modern-gpt2",
    )
    p.add_argument("--config", type=Path, action="append", default=[], help="a ModelConfig JSON file (repeatable)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtype(s) to run; default: float32, bfloat16")
    p.add_argument("--backend-torch", default=DEFAULT_BACKEND["torch"], choices=TORCH_BACKENDS)
    p.add_argument("--backend-jax", default=DEFAULT_BACKEND["jax"], choices=JAX_BACKENDS)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu runs torch on CUDA; JAX uses its default device (install jax[cuda] for GPU)",
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    strict_precision()
    if args.device == "gpu":
        import jax
        import torch

        if not torch.cuda.is_available() or jax.default_backend() != "gpu":
            print(
                f"error: --device gpu needs CUDA in torch (available: {torch.cuda.is_available()}) and a JAX GPU "
                f"backend (JAX backend: {jax.default_backend()})",
                file=sys.stderr,
            )
            return 2
    runs: list[tuple[str, ModelConfig]] = [(name, load_preset(name)) for name in (args.preset or [])]
    for path in args.config:
        try:
            runs.append((path.stem, ModelConfig.from_json(path)))
        except (OSError, ValueError) as e:
            print(f"error: --config {path}: {e}", file=sys.stderr)
            return 2
    if not runs:
        runs = [(name, load_preset(name)) for name in ("tiny", "gpt2", "modern-gpt2")]
    dtypes = args.dtype or ["float32", "bfloat16"]
    rows = []
    start = time.perf_counter()
    for name, cfg in runs:
        for dtype in dtypes:
            print(f"running {name} {dtype} ...", file=sys.stderr, flush=True)
            try:
                rows.append(
                    compare_logits(
                        cfg,
                        preset=name,
                        dtype=dtype,
                        backend_torch=args.backend_torch,
                        backend_jax=args.backend_jax,
                        seq_len=args.seq_len,
                        batch=args.batch,
                        seed=args.seed,
                        device="cuda" if args.device == "gpu" else "cpu",
                    )
                )
            except (ValueError, BackendUnavailableError) as e:
                print(f"error: {name} {dtype}: {e}", file=sys.stderr)
                return 2
    print(format_rows(rows))
    ok = all(r.passed for r in rows)
    print(
        f"\n{sum(r.passed for r in rows)} passed, {sum(not r.passed for r in rows)} failed "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"passed": ok, "rows": rows_as_dicts(rows)}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
