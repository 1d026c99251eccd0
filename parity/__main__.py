"""`python -m parity` (also `gptmod parity`): the whole parity ladder, torch vs JAX, against float64."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptmod.backends import JAX_BACKENDS, TORCH_BACKENDS
from gptmod.config import ModelConfig, list_presets, load_preset
from parity.runner import CHECKS, Options, format_markdown, format_table, run_suite, summary, write_json
from parity.suite import versions

DEFAULT_PRESETS = ("tiny", "gpt2", "modern-gpt2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity",
        description="Run the parity ladder (per-module, logits, per-layer hidden states, cached decode, greedy "
        "tokens, top-k/KL, conversion round trips, HF GPT-2 oracle) on the torch and JAX twins. Each framework is "
        "measured against a float64 torch reference of the same weights; see the README for the budgets.",
    )
    p.add_argument("--preset", action="append", choices=list_presets(),
                   help=f"preset(s), repeatable; default {', '.join(DEFAULT_PRESETS)} (full size)")  # fmt: skip
    p.add_argument("--config", type=Path, action="append", default=[], help="a ModelConfig JSON file (repeatable)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 and bfloat16 (plus float16 on GPU)")  # fmt: skip
    p.add_argument("--weights", default="random",
                   help="random (seeded, offline); random-outliers (random plus injected outlier channels, see "
                   "README); smollm2 (the real SmolLM2-135M-Instruct, offline), a GGUF file, an HF Llama folder or a "
                   "gptmod .safetensors file (the model's own config); or gpt2 or another HF GPT-2 name/folder (exact "
                   "into classic presets, partially transferred into the others)")  # fmt: skip
    p.add_argument("--check", action="append", choices=CHECKS, help="run only these checks (repeatable)")
    p.add_argument("--backend-torch", action="append", choices=TORCH_BACKENDS, help="default: all")
    p.add_argument("--backend-jax", action="append", choices=JAX_BACKENDS, help="default: all")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy-steps", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: torch on CUDA (all SDPA backends), JAX on its GPU (cuDNN attention), "
                   "float16 added")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny and reduced-depth presets (2 layers), 64 tokens, "
                   "a 50-step training curve")  # fmt: skip
    p.add_argument("--inject-fault", metavar="NAME=EPS",
                   help="self-test: scale one canonical tensor by (1+EPS) in the JAX twin only; the report "
                   "must fail")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the rows and versions as JSON")
    p.add_argument("--markdown", type=Path, help="write the report as a Markdown table")
    return p


def _runs(args) -> tuple[list[tuple[str, ModelConfig, dict | None]], tuple[int, ...]]:
    """The (name, config, state) of every run, and the token ids of real text when the weights bring their own
    tokenizer (a real model is then fed Hamlet, not random ids)."""
    import dataclasses

    from gptmod import corpus, hf_gpt2, pretrained

    names = args.preset or ([] if args.config else list(DEFAULT_PRESETS))
    runs = [(n, load_preset(n), None) for n in names]
    runs += [(path.stem, ModelConfig.from_json(path), None) for path in args.config]
    if args.quick:
        runs = [(f"{n}/2L" if c.n_layer > 2 else n, dataclasses.replace(c, n_layer=min(2, c.n_layer)), s)
                for n, c, s in runs]  # fmt: skip
    if args.weights in ("random", "random-outliers"):
        return runs, ()
    p = pretrained.load(args.weights)
    text = () if p.tokenizer is None else tuple(p.tokenizer.encode(corpus.bundled_text("hamlet")))
    if p.report.format != "hf-gpt2":  # a model of its own: its config, not the presets
        if args.preset or args.config:
            raise ValueError(f"--weights {args.weights} is a {p.report.format} model with its own config; "
                             "--preset/--config only choose the targets of GPT-2 weights")  # fmt: skip
        return [(Path(args.weights).stem, p.cfg, p.state)], text
    out = []
    tensors, _ = hf_gpt2.read_hf_gpt2(p.report.path)  # read once; exact into classic presets, partial otherwise
    for name, cfg, _ in runs:
        state, _ = hf_gpt2.from_hf_gpt2(tensors, cfg)
        out.append((name if cfg.is_classic else f"{name} (GPT-2 transferred)", cfg, state))
    return out, text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    import torch

    from gptmod.hf import HubUnavailableError
    from gptmod.weights import canonical_shapes

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32
    torch.backends.cudnn.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.device == "gpu" and (not torch.cuda.is_available() or jax.default_backend() != "gpu"):
        print(f"parity: error: --device gpu needs CUDA in torch (available: {torch.cuda.is_available()}) and JAX on "
              f"a GPU (JAX backend: {jax.default_backend()}; install jax[cuda12])", file=sys.stderr)  # fmt: skip
        return 2
    fault = None
    if args.inject_fault:
        name, _, eps = args.inject_fault.partition("=")
        try:
            fault = (name, float(eps))
        except ValueError:
            print(f"parity: error: --inject-fault {args.inject_fault!r}: expected NAME=EPS", file=sys.stderr)
            return 2
    try:
        runs, text_ids = _runs(args)
    except (ValueError, OSError, HubUnavailableError, NotImplementedError) as e:
        print(f"parity: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if fault is not None and any(fault[0] not in canonical_shapes(c) for _, c, _ in runs):
        print(f"parity: error: --inject-fault: no tensor {fault[0]!r} in every preset", file=sys.stderr)
        return 2
    gpu = args.device == "gpu"
    opts = Options(
        dtypes=tuple(args.dtype or (("float32", "bfloat16", "float16") if gpu else ("float32", "bfloat16"))),
        device="cuda" if gpu else "cpu", weights=args.weights, seq_len=64 if args.quick else args.seq_len,
        batch=args.batch, seed=args.seed, greedy_steps=16 if args.quick else args.greedy_steps,
        train_steps=50 if args.quick else 200,
        checks=tuple(args.check or CHECKS), fault=fault, backends_torch=tuple(args.backend_torch or ()),
        backends_jax=tuple(args.backend_jax or ()), text_ids=text_ids,
    )  # fmt: skip
    start = time.perf_counter()
    rows = run_suite(runs, opts, progress=sys.stderr.isatty())
    ok, counts = summary(rows)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    header = {"device": device, "versions": versions(), "passed": ok, "weights": args.weights}
    print(format_table(rows))
    print(f"\n{counts} in {time.perf_counter() - start:.0f} s on {device} (weights: {args.weights})")
    if args.json:
        write_json(args.json, rows, header)
    if args.markdown:
        args.markdown.write_text(format_markdown(rows, header))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
