"""`gptmod gpu-check` (or scripts/gpu_check.sh): the parity suite and the
bench on one GPU, in one command.

Each step is a subprocess of the same interpreter, its output tee'd to STEP.log in
the output folder, so that one failing (or hung) step loses nothing of the others.
The summary (gpu-check.md, gpu-check.json) holds the machine, the versions, the
date and each step's command, exit status and wall time; it is rewritten after
every step, and on Ctrl-C too, so an interrupted run still leaves what it measured.

It runs nothing but the project's own commands: parity and bench decide what passes. Both twins run
in each step's one process on one GPU, so JAX is told not to preallocate 75% of its memory
(XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the environment sets it already).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptmod.fileio import atomic_write_text

TARGET_S = 480  # the whole check, compilation included, on one H100/H200
BENCH_PRESETS = ("gpt2", "gpt2-medium", "modern-gpt2")
BENCH_BATCHES = (1, 8, 32)
BENCH_FRAMEWORKS = "jax,torch-eager,torch-cudagraphs"
# The TF32 pass: the checks whose fp32 rows stand on matmul precision (the
# rest are CPU-only or dtype-free).
TF32_CHECKS = ("modules", "logits", "text", "cached", "greedy", "divergence")
# Each step's cap in seconds (x --timeout-scale): the target plus headroom
# for a slow compile, so that a hung step cannot eat the machine. A step
# past its cap is stopped (SIGINT, then SIGKILL) and counts as failed.
TIMEOUTS = {
    "parity": 210,
    "parity-tf32": 90,
    "bench-gpt2": 90,
    "bench-gpt2-medium": 120,
    "bench-modern-gpt2": 90,
}
VERSIONS = (
    "torch",
    "jax",
    "jaxlib",
    "flax",
    "transformers",
    "numpy",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
)
# set only where the environment does not set it
STEP_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
INSTALL = {
    "torch": (
        "install a CUDA build, e.g. pip install torch --index-url "
        "https://download.pytorch.org/whl/cu128"
    ),
    "jax": "install its CUDA plugin: pip install -U 'jax[cuda12]' (or 'jax[cuda13]')",
}


@dataclass
class Step:
    """One command of the check. `markdown` names a file the step's stdout
    is saved to (bench prints its tables)."""

    name: str
    argv: list[str]
    timeout_s: float
    what: str = ""
    markdown: Path | None = None


@dataclass
class Result:
    name: str
    argv: list[str]
    timeout_s: float
    log: str
    status: str = "not run"  # pass | FAIL | timeout | interrupted | not run
    rc: int | None = None
    wall_s: float | None = None
    outputs: list[str] = field(default_factory=list)


def plan(out: Path, python: str = sys.executable, timeout_scale: float = 1.0) -> list[Step]:
    """Every step of the check, writing into `out`."""
    out = Path(out)
    parity = [python, "-m", "gptmod.parity", "--device", "gpu", "--quick"]
    steps = [
        Step(
            "parity",
            [*parity, "--json", str(out / "parity.json"), "--markdown", str(out / "parity.md")],
            TIMEOUTS["parity"],
            "every SDPA backend pinned, JAX XLA and cuDNN; fp32 (IEEE), bf16, fp16",
        ),
        Step(
            "parity-tf32",
            [
                *parity,
                "--tf32",
                "--dtype",
                "float32",
                *(a for c in TF32_CHECKS for a in ("--check", c)),
                "--json",
                str(out / "parity-tf32.json"),
                "--markdown",
                str(out / "parity-tf32.md"),
            ],
            TIMEOUTS["parity-tf32"],
            "fp32 with TF32 matmuls on in both twins, judged on fp16's budget",
        ),
    ]
    for preset in BENCH_PRESETS:
        name = f"bench-{preset}"
        argv = [
            python,
            "-m",
            "gptmod.cli",
            "bench",
            "--device",
            "gpu",
            "--quick",
            "--preset",
            preset,
            "--dtype",
            "bfloat16",
            *(a for b in BENCH_BATCHES for a in ("--batch", str(b))),
            "--frameworks",
            BENCH_FRAMEWORKS,
            "--no-scaling",
            "--no-compile-table",
            "--json",
            str(out / f"{name}.json"),
        ]
        steps.append(
            Step(
                name,
                argv,
                TIMEOUTS[name],
                f"{preset} bf16, batch {'/'.join(map(str, BENCH_BATCHES))}: "
                "eager vs CUDA graphs vs JAX, per-step µs, HBM roofline",
                out / f"{name}.md",
            )
        )
    for s in steps:
        s.timeout_s *= timeout_scale
    return steps


def versions() -> dict[str, str]:
    """Installed versions, read from the package metadata (imports nothing)."""
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if not name.startswith("jax-cuda"):
                found[name] = "not installed"
    return found


PROBE = """
import json, os, shutil, subprocess
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import torch
import jax
out = {"torch": torch.__version__, "jax": jax.__version__, "torch_cuda": torch.cuda.is_available(),
       "torch_cuda_version": torch.version.cuda, "torch_devices": []}
if out["torch_cuda"]:
    out["cudnn"] = torch.backends.cudnn.version()
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["torch_devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                     "memory_gib": round(p.total_memory / 2**30, 1), "sms": \
p.multi_processor_count})
out["jax_backend"] = jax.default_backend()
out["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
if shutil.which("nvidia-smi"):
    try:
        q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        out["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True, \
timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
print("PROBE " + json.dumps(out))
"""


def probe(python: str = sys.executable, timeout_s: float = 120) -> dict:
    """The machine as both twins see it, asked in a subprocess: a CUDA context and JAX's GPU client
    held by this process would take memory from every step."""
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"the GPU probe ({python} importing torch and jax) failed with rc "
            f"{proc.returncode}: {tail}"
        )
    return json.loads(lines[-1][len("PROBE ") :])


def missing_gpu(machine: dict) -> str | None:
    """One line naming the twin(s) without a GPU and how to get one, or None when both have one."""
    missing = []
    if not machine.get("torch_cuda"):
        build = machine.get("torch_cuda_version")
        missing.append(
            f"torch {machine.get('torch', '')} sees no CUDA device (torch.cuda.is_available() is "
            f"False{'' if build else ', a CPU-only build'}; {INSTALL['torch']})"
        )
    if machine.get("jax_backend") != "gpu":
        missing.append(
            f"JAX {machine.get('jax', '')} has no GPU (backend "
            f"{machine.get('jax_backend')}; {INSTALL['jax']})"
        )
    return "; ".join(missing) or None


def _pump(src, sinks: Sequence, lock: threading.Lock, keep: list[bytes] | None) -> None:
    """Copy a child's pipe to the log and the terminal as it arrives (progress bars included)."""
    for chunk in iter(lambda: src.read1(65536), b""):
        with lock:
            for s in sinks:
                s.write(chunk)
                s.flush()
        if keep is not None:
            keep.append(chunk)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGINT to the step's whole process group (a Python traceback then
    shows where it was), SIGKILL after."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, log: Path, env: dict[str, str] | None = None) -> Result:
    """Run one step, tee its stdout and stderr to `log` and to this process's, and stop it at its
    cap. A KeyboardInterrupt (Ctrl-C) stops the step and returns its result marked interrupted."""
    res = Result(step.name, step.argv, step.timeout_s, str(log))
    stdout: list[bytes] = []
    start = time.monotonic()
    with open(log, "wb") as f:
        f.write(f"$ {shlex.join(step.argv)}\n".encode())
        f.flush()
        # Its own session: the terminal's Ctrl-C reaches this process only,
        # which then stops the step's group.
        proc = subprocess.Popen(
            step.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        lock = threading.Lock()
        pipes = ((proc.stdout, sys.stdout.buffer, stdout), (proc.stderr, sys.stderr.buffer, None))
        pumps = [
            threading.Thread(target=_pump, args=(src, (f, dst), lock, keep), daemon=True)
            for src, dst, keep in pipes
        ]
        for t in pumps:
            t.start()
        try:
            res.rc = proc.wait(step.timeout_s)
            res.status = "pass" if res.rc == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            _stop(proc)
            res.rc, res.status = 124, "timeout"
        except KeyboardInterrupt:
            _stop(proc)
            res.rc, res.status = 130, "interrupted"
        finally:
            for t in pumps:
                # a grandchild that left the group could hold the pipe open:
                # don't wait on it forever
                t.join(5)
            res.wall_s = time.monotonic() - start
            with lock:
                note = {
                    "timeout": f"stopped at its cap of {step.timeout_s:.0f} s",
                    "interrupted": "interrupted",
                }
                if res.status in note:
                    f.write(f"\ngpu-check: {note[res.status]}\n".encode())
            if step.markdown is not None and stdout:
                text = b"".join(stdout).decode(errors="replace").strip()
                atomic_write_text(
                    step.markdown,
                    f"# {step.name}\n\n`{shlex.join(step.argv)}`\n\n```\n{text}\n```\n",
                )
                res.outputs.append(str(step.markdown))
    res.outputs += [
        a
        for a in step.argv
        if a.endswith((".json", ".md")) and Path(a).is_file() and a not in res.outputs
    ]
    return res


def _tail(path: str, n: int = 15) -> str:
    """The last `n` non-blank lines of a log (progress bars' carriage returns as line breaks)."""
    try:
        lines = Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


def write_summary(out: Path, info: dict, results: list[Result]) -> dict:
    """gpu-check.json and gpu-check.md in `out` (atomic), from what has run so far."""
    failed = [r.name for r in results if r.status != "pass"]
    ran = [r for r in results if r.wall_s is not None]
    data = {
        **info,
        "passed": not failed,
        "failed": failed,
        "total_wall_s": sum(r.wall_s for r in ran),
        "steps": [{**vars(r), "command": shlex.join(r.argv)} for r in results],
    }
    atomic_write_text(out / "gpu-check.json", json.dumps(data, indent=2) + "\n")
    m = info.get("machine", {})
    gpus = ", ".join(
        f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)"
        for d in m.get("torch_devices", [])
    )
    lines = [
        "# gptmod gpu-check\n",
        f"date: {info['date']}; target: under {TARGET_S // 60} min; total wall time: "
        f"{data['total_wall_s']:.0f} s; passed: {data['passed']}"
        + (f" (not passed: {', '.join(failed)})" if failed else "")
        + "\n",
        f"machine: {gpus or '-'}; torch CUDA {m.get('torch_cuda_version', '-')}, cuDNN "
        f"{m.get('cudnn', '-')}; JAX devices: {', '.join(m.get('jax_devices', [])) or '-'}; "
        f"nvidia-smi: {'; '.join(m.get('nvidia_smi', [])) or '-'}\n",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n",
        "| step | result | rc | wall s | cap s | outputs | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        wall = "-" if r.wall_s is None else f"{r.wall_s:.1f}"
        command = shlex.join(r.argv).replace("|", "\\|")  # a pipe would end the table cell
        outs = ", ".join(Path(p).name for p in [*r.outputs, r.log] if Path(p).exists()) or "-"
        lines.append(
            f"| {r.name} | {r.status} | {'-' if r.rc is None else r.rc} | {wall} | "
            f"{r.timeout_s:.0f} | {outs} | `{command}` |"
        )
    for r in results:
        if r.status not in ("pass", "not run") and (tail := _tail(r.log)):
            lines += [
                f"\n## {r.name}: {r.status} (rc {r.rc}), the end of {Path(r.log).name}\n",
                "```",
                tail,
                "```",
            ]
    atomic_write_text(out / "gpu-check.md", "\n".join(lines) + "\n")
    return data


def run_check(steps: Sequence[Step], out: Path, machine: dict | None = None) -> int:
    """Run every step in turn (a failing one does not stop the rest) and write the summary after
    each. Returns 0 when every step passed, 1 otherwise, 130 on Ctrl-C (143 on SIGTERM) after
    stopping the running step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: v for k, v in STEP_ENV.items() if k not in os.environ}}
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine or {},
        "versions": versions(),
        "python": sys.executable,
        "env": {k: env[k] for k in STEP_ENV},
        "target_s": TARGET_S,
    }
    results = [Result(s.name, s.argv, s.timeout_s, str(out / f"{s.name}.log")) for s in steps]
    write_summary(out, info, results)

    stopped_by = [signal.SIGINT]

    def on_term(signum, frame):
        stopped_by[0] = signal.SIGTERM
        raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) ends the run the way Ctrl-C does

    previous = (
        signal.signal(signal.SIGTERM, on_term)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    code = None
    try:
        for i, step in enumerate(steps):
            print(
                f"gpu-check [{i + 1}/{len(steps)}] {step.name} (cap {step.timeout_s:.0f} s): "
                f"{shlex.join(step.argv)}",
                file=sys.stderr,
                flush=True,
            )
            try:
                results[i] = run_step(step, out / f"{step.name}.log", env)
            except KeyboardInterrupt:  # between steps, or while one was being set up
                results[i].status, results[i].rc = "interrupted", 130
            write_summary(out, info, results)
            r = results[i]
            if r.status == "interrupted":
                code = 128 + stopped_by[0]
                print(
                    f"gpu-check: interrupted during {step.name}; the rest not run", file=sys.stderr
                )
                break
            print(
                f"gpu-check [{i + 1}/{len(steps)}] {step.name}: {r.status} (rc "
                f"{r.rc}) in {r.wall_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    data = write_summary(out, info, results)
    walls = ", ".join(f"{r.name} {r.wall_s:.0f} s" for r in results if r.wall_s is not None)
    verdict = "every step passed" if data["passed"] else f"not passed: {', '.join(data['failed'])}"
    print(
        f"gpu-check: {verdict}; {data['total_wall_s']:.0f} s in all (target {TARGET_S} s): "
        f"{walls or '-'}; summary in {out / 'gpu-check.md'}",
        file=sys.stderr,
    )
    if code is not None:
        return code
    return 0 if data["passed"] else 1


def build_parser(prog: str = "gptmod gpu-check") -> argparse.ArgumentParser:
    checks, presets, batches = (
        ", ".join(TF32_CHECKS),
        ", ".join(BENCH_PRESETS),
        "/".join(map(str, BENCH_BATCHES)),
    )
    p = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
The parity suite and the bench on one GPU, in one command, meant to finish under {TARGET_S // 60} \
minutes on one
H100/H200, compilation included (the step caps add up to {sum(TIMEOUTS.values()) // 60} minutes; \
not yet timed on a
GPU). It needs a CUDA build of torch and JAX with its CUDA plugin (jax[cuda12]); after
`pip install --no-deps -e .` it uses whatever torch and JAX the environment brings. The steps, in \
order:
  parity             python -m gptmod.parity --device gpu --quick: every SDPA backend pinned (flash,
                     cuDNN, memory-efficient, math), JAX XLA and cuDNN attention; fp32, bf16, fp16
  parity-tf32        the same in fp32 with TF32 matmuls on in both twins (JAX's default on Ampere \
and
                     Hopper, not torch's), judged on fp16's budget; checks {checks}
  bench-PRESET       gptmod bench --device gpu --quick for {presets}: bf16, batch
                     {batches}, {BENCH_FRAMEWORKS} (eager vs CUDA graphs), per-step µs
                     and the HBM roofline from a measured device copy; no scaling or compile tables
Each step is a subprocess with a cap on its wall time (x --timeout-scale); a failing step does not \
stop the
others. Output (--out DIR): each step's JSON, markdown and log (STEP.log, its stdout and stderr), \
and the summary
gpu-check.md / gpu-check.json: the machine (GPU, CUDA, driver), versions, date, and each step's \
command, exit
status and wall time. Exit status: 0 every step passed, 1 some step failed (the summary names it), \
2 no GPU in
a twin, 130 interrupted (Ctrl-C stops the running step and writes the partial summary).""",
    )
    p.add_argument("--out", type=Path, help="the output folder (default gpu-check-YYYYMMDD-HHMMSS)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands, one per line, and where the output "
        "goes, then exit 0 (needs no GPU)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="STEP",
        help="run only this step (repeatable), e.g. to rerun "
        f"the failed ones: {', '.join(TIMEOUTS)}",
    )
    p.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply every step's cap (default 1; e.g. 2 on an A100 or a cold compile cache)",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "gptmod gpu-check") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.timeout_scale <= 0:
        print(
            f"gptmod gpu-check: error: --timeout-scale {args.timeout_scale}: must be > 0",
            file=sys.stderr,
        )
        return 2
    out = args.out or Path(f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    steps = plan(out, timeout_scale=args.timeout_scale)
    if args.only:
        names = [s.name for s in steps]
        if bad := [n for n in args.only if n not in names]:
            print(
                f"gptmod gpu-check: error: --only {bad[0]}: no such step "
                f"(steps: {', '.join(names)})",
                file=sys.stderr,
            )
            return 2
        steps = [s for s in steps if s.name in args.only]
    if args.dry_run:
        env = " ".join(f"{k}={os.environ.get(k, v)}" for k, v in STEP_ENV.items())
        print(
            f"# gptmod gpu-check: {len(steps)} steps, each with its cap; target under "
            f"{TARGET_S // 60} min on one H100/H200. Environment of every step: {env}"
        )
        for s in steps:
            print(shlex.join(s.argv))
        names = ", ".join(s.name for s in steps)
        print(
            f"# output in {out}/: STEP.log (stdout and stderr) and each step's JSON/markdown, for "
            f"steps {names}; summary {out / 'gpu-check.md'} and {out / 'gpu-check.json'}"
        )
        return 0
    try:
        machine = probe()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"gptmod gpu-check: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptmod gpu-check: interrupted during the GPU probe; nothing run", file=sys.stderr)
        return 130
    if why := missing_gpu(machine):
        print(f"gptmod gpu-check: error: needs a GPU in both twins: {why}", file=sys.stderr)
        return 2
    return run_check(steps, out, machine)


if __name__ == "__main__":
    sys.exit(main())
