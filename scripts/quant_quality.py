"""int8 against float32 on a real model, per twin: perplexity on the plays, greedy agreement.

    python scripts/quant_quality.py [--weights smollm2] [--windows 2] [--block 512] [--steps 256]
        [--json docs/bench/quant_quality.json]

Perplexity: --windows windows of --block tokens spread evenly through each of the eight bundled
plays, scored by `gptmod.evaluate` (what `gptmod eval --quant int8` runs on one file). Greedy:
--steps tokens from the first 32 tokens of Hamlet and of Macbeth; "agreement" is the share of
positions of float32's stream at which int8's top token, teacher-forced on that stream, is
float32's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from gptmod import corpus, evaluate, models, pretrained
from gptmod.fileio import atomic_write_text

PROMPT_LEN = 32
GREEDY_PLAYS = ("hamlet", "macbeth")


def _logits(framework: str, model, ids: list[int]) -> np.ndarray:
    if framework == "torch":
        import torch

        with torch.no_grad():
            return model(torch.tensor([ids])).double().numpy()[0]
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray([ids])), np.float64)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="smollm2")
    p.add_argument("--windows", type=int, default=2, help="windows per play (default 2)")
    p.add_argument("--block", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--steps", type=int, default=256, help="greedy tokens per prompt (default 256)")
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    pt = pretrained.load(args.weights, progress=False)
    streams = {
        play: np.asarray(pt.tokenizer.encode(corpus.bundled_text(play)), np.int64)
        for play in corpus.bundled_files()
    }
    wins = []
    for play, stream in streams.items():  # --windows of each play, spread evenly through it
        every = evaluate.windows([stream], args.block, pt.cfg.vocab_size, play)
        wins += every[:: max(1, len(every) // args.windows)][: args.windows]
    out: dict = {"weights": args.weights, "windows": len(wins), "block": args.block, "rows": []}
    for framework in args.frameworks.split(","):
        built = {q: models.build(framework, pt.cfg, pt.state, quant=q) for q in (None, "int8")}
        row: dict = {"framework": framework}
        for q, model in built.items():
            t0 = time.perf_counter()
            s = evaluate.score(model, framework, wins, batch_size=4)
            row[f"ppl_{q or 'fp32'}"] = s.perplexity
            row["scored_tokens"] = s.tokens
            print(
                f"{framework} {q or 'fp32'}: perplexity {s.perplexity:.4f} over {s.tokens:,} "
                f"tokens ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
        row["ppl_rise"] = row["ppl_int8"] / row["ppl_fp32"] - 1
        gen = __import__(f"gptmod_{framework}.generate", fromlist=["generate"]).generate
        greedy = []
        for play in GREEDY_PLAYS:
            prompt = streams[play][:PROMPT_LEN].tolist()
            s32, s8 = (gen(built[q], [prompt], args.steps)[0] for q in (None, "int8"))
            first = next((i for i, (a, b) in enumerate(zip(s32, s8, strict=True)) if a != b), None)
            top8 = _logits(framework, built["int8"], prompt + s32[:-1])[PROMPT_LEN - 1 :].argmax(-1)
            greedy.append(
                {
                    "play": play,
                    "first_difference": first,
                    "agreement": float(np.mean(top8 == np.array(s32))),
                }
            )
        row["greedy"] = greedy
        out["rows"].append(row)
    print(f"{args.weights}: {len(wins)} windows of {args.block} tokens from 8 plays")
    for r in out["rows"]:
        g = "; ".join(
            f"{x['play']}: {x['agreement'] * 100:.1f}% agree, first difference at "
            f"{'none' if x['first_difference'] is None else x['first_difference']}"
            for x in r["greedy"]
        )
        print(
            f"{r['framework']}: perplexity fp32 {r['ppl_fp32']:.4f}, int8 {r['ppl_int8']:.4f} "
            f"({100 * r['ppl_rise']:+.2f}%); greedy over {args.steps}: {g}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0 if all(math.isfinite(r["ppl_rise"]) for r in out["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
