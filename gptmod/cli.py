"""The `gptmod` command: generate (streaming), chat, info, convert, export, eval, prepare, train,
plot, transfer-report, side-by-side, and the parity, bench and gpu-check commands.

A thin layer: each `cmd_*` checks its flags, calls the library and prints. Options several
commands share are `gptmod.options`. Frameworks are imported only by the subcommand that needs
them, so `gptmod --help` is instant. Expected failures (bad arguments, missing or corrupt files,
offline hub) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptmod import options, pretrained
from gptmod.config import ModelConfig
from gptmod.options import WEIGHTS_HELP, CLIError
from gptmod.sampling import check_request
from gptmod.training import TrainConfig


def torch_distributed(args: argparse.Namespace) -> tuple[int, int, str]:
    """(rank, world_size, device) from torchrun's environment, initialising torch.distributed (gloo
    on the CPU, nccl on GPUs) through `gptmod_torch.distributed`; (0, 1, "cpu") for one process."""
    if args.framework != "torch":
        # WORLD_SIZE read here, not by gptmod_torch.distributed: a JAX run never imports torch
        if os.environ.get("WORLD_SIZE", "1") != "1":
            raise CLIError(
                "several processes (torchrun) are for --framework torch; "
                "JAX spans devices with --mesh"
            )
        return 0, 1, "cpu"
    from gptmod_torch import distributed

    world = distributed.world_size()
    if world == 1:
        if args.parallel is not None:
            raise CLIError(
                f"--parallel {args.parallel} needs several processes: launch with torchrun, e.g. "
                "torchrun --nproc_per_node 2 -m gptmod.cli train ..."
            )
        return 0, 1, "cpu"
    if args.parallel is None:
        raise CLIError(
            f"running under torchrun with {world} processes: choose "
            "--parallel ddp or --parallel fsdp"
        )
    launch = distributed.init()
    return launch.rank, launch.world_size, launch.device


def cmd_generate(args: argparse.Namespace) -> int:
    backend = options.generation_backend(args)
    if (args.prompt is None) == (args.batch_file is None):
        raise CLIError("give exactly one of --prompt TEXT or --batch-file FILE")
    if args.batch_file is not None:
        from gptmod import textio

        texts = [
            line
            for line in textio.read_text(args.batch_file, what="--batch-file").splitlines()
            if line.strip()
        ]
        if not texts:
            raise CLIError(f"--batch-file {args.batch_file}: no prompts in it (one per line)")
    else:
        texts = [args.prompt]
    p = pretrained.resolve(args.weights, options.model_config(args, None))
    cfg, tok = p.cfg, p.tokenizer
    if tok is None:
        raise CLIError(
            f"{args.weights} has no tokenizer ({p.report.tokenizer}), so it "
            "cannot read a text prompt"
        )
    if cfg.vocab_size < tok.vocab_size:
        raise CLIError(
            f"the model's vocab_size={cfg.vocab_size} is smaller than its "
            f"tokenizer's ({tok.vocab_size})"
        )
    prompts = [tok.encode(t) for t in texts]
    if any(len(ids) == 0 for ids in prompts):
        raise CLIError("empty prompt: give at least one character")
    eos = None if args.no_eos or not p.eos_ids else p.eos_ids
    kw = {f: getattr(args, f) for f in options.SAMPLING_FIELDS} | {"eos_id": eos}
    # ignored filters: one note, not library warnings
    with options.sampling_params("gptmod generate", kw) as params:
        check_request(prompts, cfg, args.max_new_tokens, params)  # before any output or model build
        # --mesh: parameters are created sharded, generation runs on it
        with options.jax_mesh(args, cfg, batch=None):
            return _generate(args, p, backend, texts, prompts, kw)


def _generate(
    args: argparse.Namespace,
    p: Any,
    backend: str,
    texts: list[str],
    prompts: list[list[int]],
    kw: dict,
) -> int:

    model = options.generation_model(args, p, backend)
    gen = importlib.import_module(f"gptmod_{args.framework}.generate")
    if args.framework == "torch":
        kw["compile"] = args.compile
    stops = set(p.eos_ids) if kw["eos_id"] is not None else set()
    if args.framework == "jax" or args.compile:  # one generate per process: the first call compiles
        print("compiling…", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if len(prompts) == 1:
        decoder = p.tokenizer.stream_decoder()
        sys.stdout.write(texts[0])
        out: list[int] = []
        for step in gen.generate_stream(model, prompts, args.max_new_tokens, **kw):
            if step[0] is None:  # the row has ended at an end-of-sequence id
                break
            out.append(step[0])
            if step[0] in stops:  # counted, not printed
                break
            sys.stdout.write(decoder.push(step[0]))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        n = len(out)
    else:
        outs = gen.generate(model, prompts, args.max_new_tokens, **kw)
        n = sum(len(o) for o in outs)
        for i, (text, out) in enumerate(zip(texts, outs, strict=True)):
            print(f"--- [{i}] {text}{p.tokenizer.decode([t for t in out if t not in stops])}")
    elapsed = time.perf_counter() - start
    print(
        f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s, {args.framework}"
        f"{', int8' if model.quant else ''}, {_threads(args.threads)}, first call includes "
        "compilation]",
        file=sys.stderr,
    )
    return 0


def _threads(n: int) -> str:
    """The thread count for a summary line, with why when it is fewer than the CPUs."""
    from gptmod.threads import available_cpus

    cpus = available_cpus()
    return f"{n} thread{'s' if n > 1 else ''}" + (f" of {cpus} CPUs" if n < cpus else "")


def cmd_info(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.weights is None):
        raise CLIError("give exactly one of FILE or --weights SOURCE")
    if str(args.file or args.weights) == "random":
        raise CLIError(
            "info reads a model: give a checkpoint, GGUF file, HF folder or hub id, not random"
        )
    print(pretrained.describe(pretrained.resolve(str(args.file or args.weights), None)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gptmod import convert

    done = convert.convert(  # --out is checked before the (slow) read
        args.source,
        args.out,
        target=options.model_config(args, None),
        dtype=args.dtype,
        seed=args.seed,
    )
    print(done.read)
    if done.transfer_path is not None:
        print(f"transfer report: {done.transfer_path}", file=sys.stderr)
    print(f"\nwrote {args.out} ({done.parameters:,} parameters, {args.dtype})", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gptmod import export

    fmt, out = args.to
    out = Path(out)
    # before the weights are read
    export.check(fmt, out, dtype=args.dtype, max_shard_mb=args.max_shard_mb)
    if args.weights == "random":
        raise CLIError(
            "--weights random: export writes real weights; give a checkpoint, GGUF "
            "file, HF folder or hub id"
        )
    p = pretrained.resolve(args.weights, None)
    written = export.export(p, fmt, out, dtype=args.dtype, max_shard_mb=args.max_shard_mb)
    print(f"wrote {out}: {', '.join(written)}", file=sys.stderr)
    return 0


def cmd_transfer_report(args: argparse.Namespace) -> int:
    from gptmod import corpus, fileio, textio, transfer, transfer_report

    target = options.model_config(args, "modern-gpt2")
    text = (
        textio.read_text(args.text, what="--text") if args.text else corpus.bundled_text("hamlet")
    )
    result = transfer_report.run(
        args.weights,
        target,
        text=text,
        tokens=args.tokens,
        seq_len=args.seq_len,
        framework=args.framework,
        batch=args.batch,
        seed=args.seed,
    )
    if args.full:
        print(transfer.TransferReport.from_dict(result["transfer_report"]).to_text() + "\n")
    print(transfer_report.format_table(result))
    if args.json:
        fileio.atomic_write_text(args.json, transfer_report.to_json(result) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_side_by_side(args: argparse.Namespace) -> int:
    from gptmod import side_by_side

    if args.out.parent and not args.out.parent.is_dir():
        raise CLIError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.out.is_dir():
        raise CLIError(f"--out {args.out}: is a folder; give the HTML file to write")
    side_by_side.render(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptmod import data

    inputs = [str(p) for p in args.input]
    try:
        manifest = data.prepare(
            inputs if len(inputs) > 1 else inputs[0],
            args.out,
            val_fraction=args.val_fraction,
            overwrite=args.overwrite,
        )
    except data.ShardsExistError as e:
        raise CLIError(
            f"--out {e.folder}: holds token shards already; pass --overwrite to replace them"
        ) from None
    splits = manifest["splits"]
    parts = ", ".join(
        f"{s}: {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for s, v in splits.items()
    )
    print(f"wrote {args.out}: {len(manifest['documents'])} document(s); {parts}")
    return 0


# TrainConfig field -> help text; every field is a flag (a test checks none is missing).
TRAIN_HELP = {
    "steps": "optimizer updates in all",
    "batch_size": "windows per micro-batch (per process)",
    "grad_accum": "micro-batches per update",
    "block_size": "tokens per window (<= the model's max_seq_len)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine",
    "warmup_steps": "linear warmup updates",
    "weight_decay": "AdamW decoupled decay on 2-D linear weights",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "max global gradient norm (0 = off)",
    "dtype": "float32, or bfloat16 compute (fp32 master weights)",
    "seed": "seed of the data order and of a fresh init",
    "log_every": "log every N updates",
    "eval_every": "validation loss every N updates (0 = at the end only)",
    "eval_batches": "validation batches per evaluation",
    "ckpt_every": "checkpoint every N updates (0 = at the end)",
}


def cmd_train(args: argparse.Namespace) -> int:
    from gptmod import training

    cfg = options.model_config(args, "shakespeare-small")
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(training.TrainConfig)
        if getattr(args, f.name) is not None
    }
    tc = training.TrainConfig(**given)
    if tc.block_size > cfg.max_seq_len:
        raise CLIError(
            f"--block-size {tc.block_size} exceeds the model's max_seq_len={cfg.max_seq_len}"
        )
    if not (args.data / "manifest.json").is_file():
        raise CLIError(
            f"--data {args.data}: no manifest.json there; make one with `gptmod prepare`"
        )
    if args.parallel is not None and args.framework != "torch":
        raise CLIError(
            "--parallel is for --framework torch under torchrun; JAX spans devices with --mesh"
        )
    if args.overwrite and not args.no_resume:
        raise CLIError(
            "--overwrite goes with --no-resume (it deletes the previous "
            "run); without it a run resumes"
        )
    if args.keep_last is not None and args.keep_last < 1:
        raise CLIError(
            f"--keep-last {args.keep_last}: must be >= 1 (leave it out to keep every checkpoint)"
        )
    rank, world, device = torch_distributed(args)
    if world == 1:
        return _train(args, cfg, tc, rank, world, device)
    from gptmod_torch import distributed

    # the processes leave together, past the interpreter's teardown (see exit_together)
    distributed.run_then_exit(lambda: _train(args, cfg, tc, rank, world, device))


def _train(
    args: argparse.Namespace, cfg: ModelConfig, tc: TrainConfig, rank: int, world: int, device: str
) -> int:
    from gptmod import training

    resuming = None if args.no_resume else training.latest_checkpoint(args.out)
    state = None
    if args.init and resuming is None:
        state = pretrained.resolve(str(args.init), cfg).state
    elif resuming is None:  # one numpy init from the seed: both twins start from the same weights
        state = training.init_state(cfg, tc.seed)
    # --mesh: sharded parameters, batches and steps
    with options.jax_mesh(args, cfg, batch=tc.batch_size):
        trainer = training.build_trainer(
            args.framework,
            cfg,
            state,
            tc,
            device=device,
            compile=not args.no_compile,
            parallel=args.parallel,
        )
    if args.framework == "jax":  # one process per host: each reads whole batches, host 0 writes
        import jax

        read_rank, writer = 0, jax.process_index() == 0
    else:  # torchrun: each process reads its slice of the global batch, rank 0 writes
        read_rank, writer = rank, rank == 0
    if resuming is not None and writer:
        print(f"resuming from {resuming}", file=sys.stderr)
    try:
        rows = training.train(
            trainer,
            cfg,
            tc,
            args.data,
            args.out,
            framework=args.framework,
            resume=not args.no_resume,
            overwrite=args.overwrite,
            keep_last=args.keep_last,
            rank=read_rank,
            world_size=world,
            writer=writer,
        )
    except KeyboardInterrupt:
        if writer:  # training printed the last checkpoint; the command that resumes from it:
            print(
                f"to resume, run: {_resume_command(args)}"
                + (" (under the same torchrun)" if world > 1 else ""),
                file=sys.stderr,
            )
        raise
    if not writer:
        return 0
    if not rows:
        print(
            f"nothing to do: {args.out} is already at step {tc.steps}; model in "
            f"{args.out / 'model.safetensors'}"
        )
        return 0
    last = rows[-1]
    val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
    print(
        f"done: {tc.steps} steps, train loss {last['loss']:.4f}{val}; model in "
        f"{args.out / 'model.safetensors'}, log in {args.out / 'log.jsonl'}"
    )
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The `gptmod train` command that resumes this run: its own options,
    less --no-resume and --overwrite."""
    import shlex

    parts = [
        "gptmod",
        "train",
        "--framework",
        args.framework,
        "--data",
        str(args.data),
        "--out",
        str(args.out),
    ]
    for opt in ("preset", "config", "init", "parallel", "mesh", "rules", "keep_last"):
        if getattr(args, opt) is not None:
            parts += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    for rule in args.rule:
        parts += ["--rule", rule]
    if args.no_compile:
        parts.append("--no-compile")
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name) is not None:
            parts += [f"--{f.name.replace('_', '-')}", str(getattr(args, f.name))]
    return shlex.join(parts)


def cmd_plot(args: argparse.Namespace) -> int:
    from gptmod import plots

    gap = plots.plot_logs(args.logs, args.out, title=args.title)
    both = (
        f"; max |train loss gap| between the first two logs: {gap:.3g}" if gap is not None else ""
    )
    print(f"wrote {args.out}{both}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Loss and perplexity of a checkpoint on a text file or a shard folder,
    in non-overlapping windows (`gptmod.evaluate`)."""
    from gptmod import evaluate, models

    if (args.data is None) == (args.text is None):
        raise CLIError("give exactly one of --data DIR or --text FILE")
    options.apply_threads(args)
    for flag, v in (
        ("--batch-size", args.batch_size),
        ("--max-batches", args.max_batches),
        ("--block-size", args.block_size),
    ):
        if v is not None and v < 1:
            raise CLIError(f"{flag} {v}: must be >= 1")
    p = pretrained.resolve(args.weights, options.model_config(args, None))
    block = args.block_size or min(p.cfg.max_seq_len, 1024)
    if block > p.cfg.max_seq_len:
        raise CLIError(f"--block-size {block} exceeds the model's max_seq_len={p.cfg.max_seq_len}")
    if args.text is not None:
        streams, source = [evaluate.text_stream(p, args.text)], str(args.text)
    else:
        streams, source = evaluate.shard_streams(p, args.data)
    wins = evaluate.windows(streams, block, p.cfg.vocab_size, source)
    model = models.build(args.framework, p.cfg, p.state, quant=args.quant)
    s = evaluate.score(
        model, args.framework, wins, batch_size=args.batch_size, max_batches=args.max_batches
    )
    part = (
        ""
        if s.tokens == s.all_tokens
        else f" (of {s.all_tokens:,} in windows; --max-batches {args.max_batches})"
    )
    print(
        f"{source}: loss {s.loss:.4f}, perplexity {s.perplexity:.2f} over {s.tokens:,} "
        f"tokens{part}, block size {block}{', int8 weights' if args.quant else ''}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gptmod import __version__

    # --seed: an int in [0, 2**63), so JAX's 64-bit keys never overflow
    from gptmod.textio import seed_arg

    p = argparse.ArgumentParser(
        prog="gptmod", description="A modernised GPT-2 as twins in PyTorch and JAX/Flax NNX."
    )
    p.add_argument("--version", action="version", version=f"gptmod {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="generate text, streamed to the terminal",
        description="Generate text from a prompt with the checkpoint's own tokenizer, streaming it "
        "as it is produced, then report tokens/s. Stops at the checkpoint's end-of-sequence ids "
        "(GPT-2: <|endoftext|>) unless --no-eos.",
    )
    options.add_framework_option(g, "jax")
    options.add_config_options(g, None)
    g.add_argument("--weights", default="random", help=WEIGHTS_HELP)
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument(
        "--batch-file",
        type=Path,
        help="a file of prompts, one per line, generated as one ragged batch",
    )
    g.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)"
    )
    options.add_sampling_options(g, "seed of sampling and of random weights")
    g.add_argument(
        "--no-eos", action="store_true", help="do not stop at the checkpoint's end-of-sequence ids"
    )
    options.add_generation_options(g)
    options.add_mesh_options(g, "tp")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "info",
        help="config, parameter count, dtype and tokenizer of a model",
        description="Print a model's format, parameter count, dtype, config, tokenizer, "
        "end-of-sequence ids and chat template, and the summary of its transfer report when "
        "it was made by `gptmod convert`.",
    )
    i.add_argument(
        "file", type=Path, nargs="?", help="a gptmod .safetensors checkpoint (or use --weights)"
    )
    i.add_argument("--weights", help=WEIGHTS_HELP.replace(", or random (seeded init; default)", ""))
    i.set_defaults(func=cmd_info)

    c = sub.add_parser(
        "convert",
        help="any model into a gptmod checkpoint; GPT-2 into a preset (exact or partial)",
        description="Write a canonical safetensors checkpoint that carries the model's tokenizer, "
        "chat template and end-of-sequence ids. GPT-2 sources map into a gptmod config: "
        "classic presets import exactly, modern ones get a partial transfer, whose report is "
        "printed and saved as JSON next to the checkpoint (FILE.transfer.json).",
    )
    c.add_argument(
        "--from",
        "--weights",
        dest="source",
        required=True,
        help=WEIGHTS_HELP.replace(
            ", or random (seeded init; default)", ", or a bare GPT-2 .safetensors/.bin file"
        ),
    )
    options.add_config_options(c, None, what="target (GPT-2 sources only)")
    c.add_argument(
        "--out", type=Path, required=True, help="the checkpoint to write (.safetensors; atomic)"
    )
    c.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="stored dtype",
    )
    c.add_argument(
        "--seed",
        type=seed_arg,
        default=0,
        help="seed of the few random tensors (units beyond GPT-2's d_ff)",
    )
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser(
        "export",
        help="write a model as a Hugging Face folder or a GGUF file",
        description="Export any --weights source: --to hf DIR writes a folder that transformers "
        "loads (LlamaForCausalLM for modern configs, GPT2LMHeadModel for classic ones), "
        "tokenizer and chat template included when the source has them; --to gguf FILE writes "
        "llama.cpp's format (Llama configs only). A config the target cannot express is an "
        "error naming its switches.",
    )
    e.add_argument(
        "--weights",
        required=True,
        help=WEIGHTS_HELP.replace(", or random (seeded init; default)", ""),
    )
    e.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "PATH"),
        help="hf DIR (a new or empty folder) or gguf FILE",
    )
    e.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "q8_0"),
        default="float32",
        help="stored dtype: float32 (default), float16, bfloat16 (hf only), q8_0 (gguf only)",
    )
    e.add_argument(
        "--max-shard-mb",
        type=float,
        help="hf: split model.safetensors into shards of at most this size",
    )
    e.set_defaults(func=cmd_export)

    t = sub.add_parser(
        "transfer-report",
        help="how much of GPT-2 survives each modern switch (loss on Shakespeare)",
        description="Next-token loss on bundled Shakespeare (Hamlet) of GPT-2, the full "
        "transfer into the target config, GPT-2 with each modern switch alone, and a "
        "random init of the target; plus how closely the transferred SwiGLU MLP reproduces "
        "GPT-2's, layer by layer. Needs real GPT-2 weights to mean anything: --weights "
        "gpt2 online, or a downloaded folder.",
    )
    t.add_argument(
        "--weights", required=True, help="gpt2 (hub name; needs network) or an HF GPT-2 folder"
    )
    options.add_config_options(t, "modern-gpt2", what="target")
    t.add_argument(
        "--text", type=Path, help="evaluate on this UTF-8 text file instead of the bundled Hamlet"
    )
    t.add_argument(
        "--tokens", type=int, default=8192, help="tokens to score (default 8192: 8 windows of 1024)"
    )
    t.add_argument("--seq-len", type=int, default=1024, help="window length (default 1024)")
    t.add_argument("--batch", type=int, default=2, help="windows per forward pass (default 2)")
    options.add_framework_option(t, "torch", "scores")
    t.add_argument(
        "--seed", type=seed_arg, default=0, help="seed of the random-init row and of new tensors"
    )
    t.add_argument(
        "--full", action="store_true", help="also print the tensor-by-tensor transfer report"
    )
    t.add_argument("--json", type=Path, help="also write the figures as JSON")
    t.set_defaults(func=cmd_transfer_report)

    s = sub.add_parser(
        "side-by-side",
        help="render the torch and JAX twins side by side as HTML",
        description="Render model.py, generate.py and train.py of gptmod_torch/ and gptmod_jax/ "
        "as two aligned columns, definition by definition and method by method, with the "
        "differences within each pair highlighted and notes on each framework difference. "
        "Generated from the installed code, so it never drifts.",
    )
    s.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    s.set_defaults(func=cmd_side_by_side)

    pr = sub.add_parser(
        "prepare",
        help="tokenize text into uint16 shards for training",
        description="Tokenize text with the bundled GPT-2 tokenizer into uint16 .npy shards plus "
        "manifest.json. Each document's last --val-fraction of tokens goes to the val split.",
    )
    pr.add_argument(
        "--input",
        nargs="+",
        type=Path,
        default=[Path("bundled")],
        help="text file(s) or folder(s) of "
        ".txt files; 'bundled' = the eight bundled plays (default)",
    )
    pr.add_argument(
        "--out", type=Path, required=True, help="the shard folder to write (atomically)"
    )
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each document for validation (default 0.1; 0 = no val split)",
    )
    pr.add_argument(
        "--overwrite", action="store_true", help="replace a previous shard folder at --out"
    )
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser(
        "train",
        help="train a model (or resume a run) in either framework",
        description="Train on shards from `gptmod prepare` with AdamW, warmup + cosine, clipping "
        "and accumulation; log to RUN/log.jsonl, checkpoint to RUN/step_N/ (canonical "
        "safetensors plus optimizer state, atomic) and write RUN/model.safetensors at the "
        "end. Rerunning the same command resumes from the latest checkpoint.",
    )
    options.add_framework_option(tr, "jax", "trains")
    options.add_config_options(tr, "shakespeare-small")
    tr.add_argument(
        "--data", type=Path, required=True, help="a shard folder made by `gptmod prepare`"
    )
    tr.add_argument(
        "--out", type=Path, required=True, help="the run folder (log, checkpoints, final model)"
    )
    tr.add_argument(
        "--init",
        help="start from these weights instead of a random init: a gptmod checkpoint, or "
        "GPT-2 (gpt2 / an HF folder), transferred into the preset (uptraining)",
    )
    tr.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh; over a folder that holds a run it needs --overwrite",
    )
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="with --no-resume: delete the previous run in --out "
        "(log, checkpoints, best, model) before the new one writes anything",
    )
    tr.add_argument(
        "--keep-last",
        type=int,
        metavar="N",
        help="keep only the newest N step_ checkpoints (never "
        "the one `latest` names; RUN/best is kept apart); default: keep all. Not part of the run's "
        "config: it may change between resumes",
    )
    tr.add_argument(
        "--no-compile", action="store_true", help="torch: run eagerly instead of torch.compile"
    )
    tr.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        help="torch under torchrun: DistributedDataParallel "
        "or FSDP2 (fully_shard per block); gloo on the CPU, nccl on GPUs; "
        "--batch-size is per process",
    )
    options.add_mesh_options(tr, "fsdp")
    for f in dataclasses.fields(TrainConfig):
        tr.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=None,
            help=f"{TRAIN_HELP[f.name]} (default {f.default})",
        )
    tr.set_defaults(func=cmd_train)

    pl = sub.add_parser(
        "plot",
        help="draw loss curves from training logs (PNG)",
        description="Plot train (and val) loss against step for one or more "
        "RUN/log.jsonl files (or run folders) on one figure; with two logs, also "
        "report their largest train-loss gap.",
    )
    pl.add_argument("logs", nargs="+", type=Path, help="log.jsonl files or run folders")
    pl.add_argument(
        "--out", type=Path, default=Path("loss.png"), help="the PNG to write (default loss.png)"
    )
    pl.add_argument("--title", default="training loss", help="figure title")
    pl.set_defaults(func=cmd_plot)

    ev = sub.add_parser(
        "eval",
        help="loss and perplexity of a checkpoint on a text file or a shard folder",
        description="Score a model's next-token loss and perplexity on --text (tokenized with the "
        "model's own tokenizer) or on --data (a `gptmod prepare` folder: its val split, or "
        "train if it has none), in non-overlapping windows of --block-size tokens.",
    )
    ev.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    options.add_config_options(ev, None, what="model (random, or a GPT-2 transfer)")
    ev.add_argument("--data", type=Path, help="a shard folder made by `gptmod prepare`")
    ev.add_argument("--text", type=Path, help="a UTF-8 text file")
    options.add_framework_option(ev, "torch")
    options.add_quant_option(ev)
    options.add_threads_option(ev)
    ev.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    ev.add_argument(
        "--block-size", type=int, help="tokens per window (default min(max_seq_len, 1024))"
    )
    ev.add_argument("--max-batches", type=int, help="score at most this many batches (default all)")
    ev.set_defaults(func=cmd_eval)

    from gptmod import chat as chat_cmd  # its own module: templates, sessions and the terminal loop

    chat_cmd.add_parser(sub)

    sub.add_parser(
        "parity",
        help="run the parity suite (same options as python -m gptmod.parity)",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="speed and scaling of both twins vs HF and the memory-bandwidth roofline "
        "(same options as python -m gptmod.bench)",
        add_help=False,
    )
    sub.add_parser(
        "gpu-check",
        help="parity and bench on one GPU in one command (see gptmod gpu-check --help)",
        add_help=False,
    )
    return p


# The subcommands with their own parsers (and modules), dispatched before
# gptmod's own parser sees the argv.
_DELEGATED = {
    "parity": "gptmod.parity.__main__",
    "bench": "gptmod.bench.__main__",
    "gpu-check": "gptmod.gpu_check",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    name = f"gptmod {command}".strip()
    try:
        # their --help and errors say `gptmod COMMAND`, not `python -m ...`
        if command in _DELEGATED:
            module = importlib.import_module(_DELEGATED[command])
            return module.main(argv[1:], prog=name)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: a clean stop, the shell's 128 + SIGINT
        print(f"{name}: interrupted", file=sys.stderr)
    except (
        CLIError,
        ValueError,
        FileNotFoundError,
        NotImplementedError,
        RuntimeError,
        OSError,
    ) as e:
        msg = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"{name}: error: {msg}", file=sys.stderr)
        return 2
    # Out of the except block, the interrupted frames (a suspended JAX
    # generation among them) are unreachable: collect them now, while XLA is
    # alive. Left to interpreter shutdown, their device buffers segfault.
    gc.collect()
    return 130


if __name__ == "__main__":
    # `python -m gptmod.cli`: run the imported gptmod.cli, not this __main__ copy, so that a
    # CLIError raised by a module that imports gptmod.cli (gptmod.chat) is the class main() catches.
    from gptmod.cli import main as _main

    sys.exit(_main())
