"""`python -m gptmod.parity` (also `gptmod parity`): the whole parity ladder, torch
vs JAX, against float64."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

from gptmod import options
from gptmod.backends import JAX_BACKENDS, TORCH_BACKENDS
from gptmod.config import ModelConfig
from gptmod.fileio import atomic_write_text
from gptmod.parity import generation, selftest
from gptmod.parity.runner import (
    CHECKS,
    Options,
    format_markdown,
    format_table,
    run_suite,
    summary,
    write_json,
)
from gptmod.parity.suite import TF32_LABEL, Row, tf32_budget, versions
from gptmod.quant import QUANTS
from gptmod.textio import seed_arg

DEFAULT_PRESETS = ("tiny", "gpt2", "modern-gpt2")
QUICK_PATHS = ("torch-eager", "torch-stream", "jax-jit", "jax-stream")
# temperature alone, top-p, all four filters
QUICK_SETTINGS = tuple(generation.SETTINGS[i] for i in (0, 2, 4))


def build_parser(prog: str = "python -m gptmod.parity") -> argparse.ArgumentParser:
    """The parity options; `prog` is how usage lines name the command
    (`gptmod parity` from the gptmod CLI)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the parity ladder (per-module, logits, per-layer hidden states, cached "
        "decode, greedy tokens, top-k/KL, conversion round trips, HF GPT-2 oracle) on the "
        "torch and JAX twins. Each framework is measured against a float64 torch reference of "
        "the same weights; see the README for the budgets.",
    )
    options.add_config_options(p, DEFAULT_PRESETS, repeatable=True)
    p.add_argument(
        "--dtype",
        action="append",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 and bfloat16 (plus float16 on GPU)",
    )
    p.add_argument(
        "--weights",
        default="random",
        help="random (seeded, offline); random-outliers (random plus injected outlier "
        "channels, see README); smollm2 (the real SmolLM2-135M-Instruct, offline), a GGUF "
        "file, an HF Llama folder or a gptmod .safetensors file (the model's own config); "
        "or gpt2 or another HF GPT-2 name/folder (exact into classic presets, partially "
        "transferred into the others)",
    )
    p.add_argument(
        "--check", action="append", choices=CHECKS, help="run only these checks (repeatable)"
    )
    p.add_argument("--backend-torch", action="append", choices=TORCH_BACKENDS, help="default: all")
    p.add_argument("--backend-jax", action="append", choices=JAX_BACKENDS, help="default: all")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--seed",
        type=seed_arg,
        default=0,
        help="seed of the random weights and prompts, in [0, 2**63)",
    )
    p.add_argument("--greedy-steps", type=int, default=32)
    p.add_argument(
        "--divergence-steps",
        type=int,
        default=256,
        help="greedy steps of each twin against float64 in the divergence check "
        "(default 256; 32 with --quick)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: torch on CUDA (all SDPA backends), JAX on its GPU (cuDNN "
        "attention), float16 added",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="with --device gpu: fp32 matmuls on TF32 tensor cores in both twins (JAX's default "
        "on Ampere and Hopper, not torch's), fp32 rows judged on fp16's budget (TF32 keeps "
        f"10 mantissa bits) and labelled {TF32_LABEL!r}; --dtype defaults to float32 alone",
    )
    p.add_argument(
        "--quant",
        choices=QUANTS,
        help="int8: both twins run on the int8 weights of each preset (gptmod/quant.py), judged "
        "against the float64 model of the same int8 weights, plus the `quant` check (int8 "
        "against float32: perplexity within 1%%, greedy agreement over --divergence-steps); "
        "float32 only",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny and reduced-depth presets (2 layers), 64 tokens, 16 greedy and 32 divergence "
        "steps, a 50-step training curve, 3 of the 5 sampling settings over 4 steps, and "
        "generate paths without torch.compile and scan_layers (each costs minutes on a CPU "
        "for a real model; the full run has them)",
    )
    p.add_argument(
        "--inject-fault",
        metavar="NAME=EPS",
        help="self-test: scale one canonical tensor by (1+EPS) in the JAX twin "
        "only; the report must fail",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="only the per-op trace: every op of every layer in both twins, teacher-forced against "
        "float64; prints each model and dtype's worst op and the first op out of budget",
    )
    p.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="with --trace: write the trace as a self-contained HTML page (heatmap of layers x "
        "ops, error as a share of budget, and a table of every op)",
    )
    p.add_argument(
        "--png",
        type=Path,
        metavar="FILE",
        help="with --trace: write the heatmap as a PNG for bug reports (one file per model and "
        "dtype: FILE, or FILE's stem plus -NAME-DTYPE when there are several)",
    )
    selftest.add_arguments(p)
    p.add_argument("--json", type=Path, help="write the rows and versions as JSON")
    p.add_argument("--markdown", type=Path, help="write the report as a Markdown table")
    return p


def describe(cfg: ModelConfig) -> str:
    """A config in one line: depth, width, heads and each switch."""
    parts = [
        f"{cfg.n_layer} layers",
        f"d_model {cfg.d_model}",
        f"heads {cfg.n_head}/{cfg.n_kv_head}",
        f"{cfg.mlp} {cfg.d_ff}",
        f"{cfg.norm} eps {cfg.norm_eps:g}",
        f"rope θ {cfg.rope_theta:g}" if cfg.pos == "rope" else "learned positions",
        "bias" if cfg.bias else "no bias",
        "no soft-cap" if cfg.logit_softcap is None else f"soft-cap {cfg.logit_softcap:g}",
        f"vocab {cfg.vocab_size}",
        f"{cfg.num_params() / 1e6:.1f}M params",
    ]
    return ", ".join(parts)


def _runs(args) -> tuple[list[tuple[str, ModelConfig, dict | None]], tuple[int, ...], str]:
    """The (name, config, state) of every run, the token ids of real text
    when the weights bring their own tokenizer (a real model is then fed
    Hamlet, not random ids), and what the weights are, in words."""
    import dataclasses

    from gptmod import corpus, hf_gpt2, pretrained

    runs = [(n, c, None) for n, c in options.model_configs(args, DEFAULT_PRESETS)]
    if args.quick:
        runs = [
            (
                f"{n}/2L" if c.n_layer > 2 else n,
                dataclasses.replace(c, n_layer=min(2, c.n_layer)),
                s,
            )
            for n, c, s in runs
        ]
    if args.weights in ("random", "random-outliers"):
        what = "random weights" + (
            " with injected outlier channels" if args.weights == "random-outliers" else ""
        )
        return runs, (), f"{what} (seed {args.seed}), random token ids"
    p = pretrained.load(args.weights)
    text = () if p.tokenizer is None else tuple(p.tokenizer.encode(corpus.bundled_text("hamlet")))
    tokens = "Hamlet through its tokenizer" if text else "random token ids"
    if p.report.format != "hf-gpt2":  # a model of its own: its config, not the presets
        if args.preset or args.config:
            raise ValueError(
                f"--weights {args.weights} is a {p.report.format} model with its own config; "
                "--preset/--config only choose the targets of GPT-2 weights"
            )
        what = f"{p.report.summary()}; config: {describe(p.cfg)}; tokens: {tokens}"
        return [(args.weights, p.cfg, p.state)], text, what
    out = []
    # read once; exact into classic presets, partial otherwise
    tensors, _ = hf_gpt2.read_hf_gpt2(p.report.path)
    for name, cfg, _ in runs:
        state, _ = hf_gpt2.from_hf_gpt2(tensors, cfg)
        out.append((name if cfg.is_classic else f"{name} (GPT-2 transferred)", cfg, state))
    return out, text, f"{p.report.summary()}; tokens: {tokens}"


def label_tf32(rows: list[Row]) -> list[Row]:
    """The fp32 rows of a --tf32 run, relabelled so that no report reads them as IEEE fp32."""
    return [dataclasses.replace(r, dtype=TF32_LABEL) if r.dtype == "float32" else r for r in rows]


def main(argv: list[str] | None = None, *, prog: str = "python -m gptmod.parity") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.tf32 and args.device != "gpu":
        print(
            "parity: error: --tf32 is a GPU matmul mode (TF32 tensor cores, Ampere "
            "and later): add --device gpu",
            file=sys.stderr,
        )
        return 2
    if args.quant is not None and (
        args.trace or args.tf32 or any(d != "float32" for d in args.dtype or ())
    ):
        print(
            f"parity: error: --quant {args.quant}: int8 weights compute in float32; it takes "
            "neither --trace, --tf32 nor a --dtype other than float32",
            file=sys.stderr,
        )
        return 2
    if args.tf32 and args.trace:
        print(
            "parity: error: --tf32 with --trace: the per-op trace has fp32's budgets only",
            file=sys.stderr,
        )
        return 2
    if selftest.wants_self_test(args):
        return selftest.run_cli(args)
    import jax
    import torch

    from gptmod.hf import HubUnavailableError
    from gptmod.weights import canonical_shapes

    if args.device == "gpu" and (not torch.cuda.is_available() or jax.default_backend() != "gpu"):
        print(
            "parity: error: --device gpu needs CUDA in torch (available: "
            f"{torch.cuda.is_available()}) and JAX on a GPU (JAX backend: "
            f"{jax.default_backend()}; install jax[cuda12])",
            file=sys.stderr,
        )
        return 2
    # fp32 must mean fp32, unless --tf32 asks for TF32 in both twins
    # ("tensorfloat32": JAX's name for it).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    for flag in ("seq_len", "batch", "greedy_steps", "divergence_steps"):
        if getattr(args, flag) < 1:
            print(
                f"parity: error: --{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1",
                file=sys.stderr,
            )
            return 2
    fault = None
    if args.inject_fault:
        name, _, eps = args.inject_fault.partition("=")
        try:
            fault = (name, float(eps))
        except ValueError:
            print(
                f"parity: error: --inject-fault {args.inject_fault!r}: expected NAME=EPS",
                file=sys.stderr,
            )
            return 2
    try:
        runs, text_ids, what = _runs(args)
    except (ValueError, OSError, HubUnavailableError, NotImplementedError, options.CLIError) as e:
        print(f"parity: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if fault is not None and any(fault[0] not in canonical_shapes(c) for _, c, _ in runs):
        print(
            f"parity: error: --inject-fault: no tensor {fault[0]!r} in every preset",
            file=sys.stderr,
        )
        return 2
    if (args.html or args.png) and not args.trace:
        print("parity: error: --html/--png write the per-op trace: add --trace", file=sys.stderr)
        return 2
    gpu = args.device == "gpu"
    opts = Options(
        dtypes=tuple(
            args.dtype
            or (
                ("float32",)
                if args.tf32 or args.quant
                else ("float32", "bfloat16", "float16")
                if gpu
                else ("float32", "bfloat16")
            )
        ),
        device="cuda" if gpu else "cpu",
        weights=args.weights,
        seq_len=64 if args.quick else args.seq_len,
        batch=args.batch,
        seed=args.seed,
        greedy_steps=16 if args.quick else args.greedy_steps,
        divergence_steps=32
        if args.quick and args.divergence_steps == 256
        else args.divergence_steps,
        sampling_steps=4 if args.quick else 8,
        sampling_settings=QUICK_SETTINGS if args.quick else generation.SETTINGS,
        generate_paths=QUICK_PATHS if args.quick else generation.PATHS,
        train_steps=50 if args.quick else 200,
        checks=tuple(args.check or CHECKS),
        fault=fault,
        backends_torch=tuple(args.backend_torch or ()),
        backends_jax=tuple(args.backend_jax or ()),
        text_ids=text_ids,
        text_name="hamlet" if text_ids else None,
        quant=args.quant,
    )
    start = time.perf_counter()
    if args.trace:
        return _trace_main(args, runs, opts, what)
    with tf32_budget(args.tf32):
        rows = run_suite(runs, opts, progress=sys.stderr.isatty())
    if args.tf32:
        rows = label_tf32(rows)
    ok, counts = summary(rows)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    header = {
        "device": device,
        "versions": versions(),
        "passed": ok,
        "weights": args.weights,
        "judged": what,
        "fp32_matmul": "tf32" if args.tf32 else "ieee",
    }
    print(f"weights: {what}")
    for name, cfg, state in runs:
        print(f"{name}: {describe(cfg)}" + ("" if state is None else " (the given weights)"))
    print(format_table(rows))
    mode = "; fp32 matmuls on TF32, judged on fp16's budget" if args.tf32 else ""
    print(
        f"\n{counts} in {time.perf_counter() - start:.0f} s on {device} "
        f"(weights: {args.weights}{mode})"
    )
    if args.json:
        write_json(args.json, rows, header)
    if args.markdown:
        atomic_write_text(args.markdown, format_markdown(rows, header))
    return 0 if ok else 1


def _trace_main(args, runs, opts: Options, what: str) -> int:
    """--trace: one trace per model and dtype, a summary line each, and the HTML/PNG reports."""
    from tqdm import tqdm

    from gptmod.parity import trace, trace_html
    from gptmod.parity.runner import make_case

    traces = []
    plan = [(n, c, s, d) for n, c, s in runs for d in opts.dtypes]
    for name, cfg, state, dtype in tqdm(
        plan, desc="trace", unit="case", disable=not sys.stderr.isatty(), leave=False
    ):
        traces.append(
            trace.run_trace(
                make_case(name, cfg, dtype, opts, state), fault=opts.fault, weights=what
            )
        )
    print(f"weights: {what}")
    for t in traces:
        bad, worst = t.first_bad(), t.worst()
        verdict = (
            "every op within budget"
            if bad is None
            else (
                f"FIRST OP OUT OF BUDGET: {bad.mode} {bad.label} ({bad.culprit}) at "
                f"{bad.ratio:.3g} of its budget"
            )
        )
        print(
            f"{t.case} · {t.dtype}: {len(t.entries)} ops, worst {worst.mode} {worst.label} at "
            f"{worst.ratio:.2f}; {verdict} ({t.seconds:.0f} s)"
        )
    if args.html:
        print(f"wrote {trace_html.write_html(traces, args.html)}")
    if args.png:
        for t in traces:
            # a checkpoint's name may be a path
            tag = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{t.case}-{t.dtype}")
            path = (
                args.png if len(traces) == 1 else args.png.with_name(f"{args.png.stem}-{tag}.png")
            )
            print(f"wrote {trace_html.write_png(t, path)}")
    if args.json:
        import json

        data = {
            "weights": what,
            "traces": [
                {"case": t.case, "dtype": t.dtype, "entries": trace.rows_of(t)} for t in traces
            ],
        }
        atomic_write_text(args.json, json.dumps(data, indent=2) + "\n")
    return 0 if all(t.first_bad() is None for t in traces) else 1


if __name__ == "__main__":
    sys.exit(main())
