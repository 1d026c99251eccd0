"""Speed and scaling of both twins beside Hugging Face `generate` and the machine's memory-bandwidth
roofline, all in one process run so the ratios hold on a noisy machine.

    gptmod bench [--quick] [--preset modern-gpt2 | --weights smollm2] [--json FILE] [--plot DIR]
    (or python -m gptmod.bench)

Random (seeded) weights by default: the torch model's canonical state, loaded into the JAX twin; HF
runs the equivalent Llama config for modern presets (GPT2 for classic ones) with its default dynamic
cache (it has no logit soft-cap, which costs nothing). `--weights` runs a real model instead, the
same weights in all three. Greedy decoding, no eos: every call generates exactly the tokens asked
for. Every time is the median of `--repeats` calls after one warm-up call of the same shape, which
also pays any compilation.

- Modes: jax `jit` (generate as one jitted program, layers unrolled), jax `jit-scan` (the same with
  `scan_layers=True`), torch `eager`, `compile` (torch.compile of the decode step) and `cudagraphs`
  (framework torch-cudagraphs: compile="reduce-overhead", the step as a CUDA graph; --device gpu
  only), hf `generate`.
- ttft_s: generate(..., 1 new token), i.e. prefill plus the first sampled token.
- prefill_tok_s = batch * prompt_len / ttft_s.
- decode_tok_s = batch * (new_tokens - 1) / (t(new_tokens) - t(1)): the difference of two medians
  removes prefill the same way for every framework (None if noise makes it <= 0).
- step_us = 1e6 * (t(new_tokens) - t(1)) / (new_tokens - 1): the wall time of one decode step,
  whatever the batch (launch-bound at small batch on a GPU: what CUDA graphs cut).
- compile_s (jit, jit-scan, compile, cudagraphs): the warm-up call of new_tokens minus the median
  timed call: what the first call of that shape paid to trace and compile (about 0 when an earlier
  cell compiled the same shapes). None for eager torch and HF.
- peak_mem_mb: how much memory one more call of new_tokens needs beyond what is resident before it:
  KV cache, activations, logits (not the weights, which every framework holds
  throughout). CPU: peak RSS (sampled every 2 ms) minus RSS before; glibc is told
  to return every block of 128 KiB or more to the system when freed (mallopt), so
  a block freed by an earlier call is allocated, and counted, anew.
  GPU: the allocator's peak (torch/HF), JAX's peak_bytes_in_use (an upper
  bound: it cannot be reset).
- Weights (`--quant fp32,int8`): the twins on the float weights, on their int8 weight-only
  quantization (gptmod/quant.py), or both, cell by cell in one run; HF runs on the float weights
  only. Each row says which.
- Roofline: every decode step reads all weights once, so bandwidth / weight_bytes
  is the batch-1 decode ceiling, one per byte count (an int8 row's is that of its int8 weights
  and float32 scales and norms); batch-1 rows report decode_tok_s as a fraction of
  their own. Bandwidth, measured before and after the grid (the higher median is the
  ceiling): on the CPU the all-core read bandwidth, torch's multi-threaded sum
  over 1 GiB; on a GPU (--device gpu) the HBM bandwidth of a device-to-device copy
  of 1 GiB (`dst.copy_(src)`, 2 x 1 GiB moved per copy, timed with CUDA events).
- Scaling: per-token decode time at context c with the KV cache and without
  it (the bench's own greedy loop, recompute.py: every step the whole padded
  context recomputed, the same tokens), as
  (t(prompt c-n, n new) - t(prompt c-n, 1 new)) / (n-1).
- Compile: JAX generate traced and compiled ahead of time on abstract weights (no memory needed) at
  the preset's depth and deeper, layers unrolled and scanned: the scan lever for compile time.
- Load: the 1-minute load average before and after each cell; a cell where it is above the CPU
  count gets a warning on stderr (other work shares the cores, and OpenMP's spin-waiting makes
  torch's figures especially unreliable). `--threads N` runs torch, XLA and HF on N threads and
  CPUs (gptmod/threads.py).
- Key figures (prompt 32): JAX and torch batch-1 decode against HF's, the fractions of the
  roofline, int8 against fp32 in each twin and mode, each mode's batch-8 decode against its batch
  1, JAX's compile time. Their targets are
  in docs/bench.md; the bench reports figures, not verdicts.

measure.py (timers, memory, bandwidth), models.py (the three models), runners.py (one callable per
framework and mode), recompute.py (the no-cache baseline), grid.py (the cells), report.py (rows,
tables, JSON), plots.py (PNGs), __main__.py (the command line).
"""

from __future__ import annotations
