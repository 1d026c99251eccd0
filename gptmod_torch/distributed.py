"""Past one process, the torch way: the twin of gptmod_jax/sharding.py.

JAX spans devices from one process per host with a mesh and rules tables; torch runs one process per
device under `torchrun`, and this module holds the four things such a run needs:

    launch = init()  # torchrun's environment -> process group (gloo on CPU, nccl on GPUs)
    trainer = Trainer(model.to(launch.device), tc, parallel="fsdp")  # wrap(): DDP or FSDP2
    state = full_tensors(model.named_parameters())  # checkpoint: all ranks gather, rank 0 writes
    run_then_exit(main)  # leave together: barrier, destroy the group, skip interpreter teardown

`wrap(model, "ddp")` puts the model in DistributedDataParallel (gradients all-reduced);
`wrap(model, "fsdp")` shards it in place with FSDP2's `fully_shard`, each block a unit and the root
one more (embeddings, the tied head, the final norm): parameters are all-gathered for use and
gradients reduce-scattered. Checkpoints hold full canonical tensors, so they are the same
safetensors as a one-process run's and load in either twin under any launch.

Bad launches fail before any collective with `TorchrunEnvError` (a RuntimeError), which names the
variable, its value and what it must be.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

PARALLEL = ("ddp", "fsdp")
# Set by torchrun in every process it starts; env:// rendezvous (init_process_group's default)
# reads MASTER_ADDR and MASTER_PORT itself.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TorchrunEnvError(RuntimeError):
    """torchrun's environment variables are missing, not integers, or inconsistent."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: its global and local rank, the number of processes, the
    device it computes on and the process-group backend."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    backend: str


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise TorchrunEnvError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


def world_size(env: Mapping[str, str] | None = None) -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 when it is not set)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return 1
    world = _int(env, "WORLD_SIZE")
    if world < 1:
        raise TorchrunEnvError(f"WORLD_SIZE={world} must be at least 1")
    return world


def launch_from_env(env: Mapping[str, str] | None = None, *, gpus: int | None = None) -> Launch:
    """This process's `Launch`, read from torchrun's variables and checked; nothing initialised.

    One process (no WORLD_SIZE, or 1) needs none of them. `gpus` is the number of visible CUDA
    devices (default: torch's count, 0 without CUDA): with GPUs each process takes the one its
    LOCAL_RANK names and nccl, without them the CPU and gloo."""
    env = os.environ if env is None else env
    world = world_size(env)
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world == 1 and "RANK" not in env:
        rank = local = 0
    else:
        missing = [name for name in TORCHRUN_VARS if name not in env]
        if missing:
            raise TorchrunEnvError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, e.g. "
                "torchrun --standalone --nproc_per_node 2 -m gptmod.cli train ..."
            )
        rank, local, port = _int(env, "RANK"), _int(env, "LOCAL_RANK"), _int(env, "MASTER_PORT")
        if not 0 <= rank < world:
            raise TorchrunEnvError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
        # A node's local ranks number its processes from 0, inside the global ranks.
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if not 1 <= local_world <= world:
            raise TorchrunEnvError(
                f"LOCAL_WORLD_SIZE={local_world} must be in [1, WORLD_SIZE={world}]"
            )
        if not 0 <= local <= rank or local >= local_world:
            raise TorchrunEnvError(
                f"LOCAL_RANK={local} must be in [0, LOCAL_WORLD_SIZE={local_world}) and at most "
                f"RANK={rank}"
            )
        if not 0 < port < 65536:
            raise TorchrunEnvError(f"MASTER_PORT={port} must be in [1, 65535]")
    if gpus == 0:
        return Launch(rank, world, local, "cpu", "gloo")
    if local >= gpus:
        raise TorchrunEnvError(
            f"LOCAL_RANK={local} but only {gpus} GPU(s) are visible: start at most one process "
            "per GPU (--nproc_per_node)"
        )
    return Launch(rank, world, local, f"cuda:{local}", "nccl")


def init(env: Mapping[str, str] | None = None) -> Launch:
    """Initialise torch.distributed from torchrun's environment (`launch_from_env`) and return this
    process's `Launch`: its GPU made current under nccl, the CPU under gloo. A process group that is
    already initialised is kept."""
    launch = launch_from_env(env)
    if launch.backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(launch.backend)
    return launch


def initialized() -> bool:
    """Whether torch.distributed is initialised (a multi-process run)."""
    return dist.is_available() and dist.is_initialized()


def wrap(model: torch.nn.Module, parallel: str | None) -> torch.nn.Module:
    """The module a step calls: the model itself (None), DDP around it ("ddp"), or the model sharded
    in place by FSDP2 ("fsdp": `fully_shard` on each of `model.blocks`, then on the root). Build the
    optimizer after: FSDP2 replaces the parameters by DTensors."""
    if parallel is None:
        return model
    if parallel not in PARALLEL:
        raise ValueError(
            f"parallel={parallel!r}: choose one of {', '.join(PARALLEL)} (or None for one process)"
        )
    if not initialized():
        raise RuntimeError(
            f"parallel={parallel!r} needs torch.distributed initialised: launch with torchrun "
            "(the gptmod train command initialises it from torchrun's environment)"
        )
    if parallel == "ddp":
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # one unit per block: its weights are gathered only while it runs
        fully_shard(block)
    fully_shard(model)  # the rest: embeddings (tied head included), final norm
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every process must call it); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each named tensor's full value, for a checkpoint. Under FSDP each is a collective, so every
    process calls this with the same names in the same order and then holds the whole state; the
    writer (rank 0) alone saves it."""
    return {name: full_tensor(t) for name, t in named}


def shard_like(value: Any, p: torch.Tensor) -> torch.Tensor:
    """A full canonical array as a tensor shaped and placed like `p` (this process's shard when `p`
    is a DTensor): the inverse of `full_tensor`, for loading a checkpoint."""
    t = torch.as_tensor(np.array(value), dtype=p.dtype, device=p.device)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, p.device_mesh, p.placements)
    return t


def all_reduce_mean(value: float) -> float:
    """Mean of a python float over the processes (itself when not distributed)."""
    if not initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def run_then_exit(main: Callable[[], int]) -> NoReturn:
    """Run a multi-process command's body and leave with its exit code (`exit_together`). If it
    raises (Ctrl-C included), the process group is destroyed at once and the exception propagates,
    so the command reports it as usual."""
    try:
        code = main()
    except BaseException:
        # no barrier: the other processes may be inside another collective
        dist.destroy_process_group()
        raise
    exit_together(code)


def exit_together(code: int) -> NoReturn:
    """End a finished process of the run: wait for the others, destroy the process group, and exit
    with `code` at once."""
    # leave together: a process exiting while a peer is still in a collective aborts it (gloo)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: on a loaded machine gloo's threads can
    # still be winding down when C++ destructors run, which aborts the process
    # ("terminate called without an active exception", seen in about 1 in 4
    # two-process runs here) after the run has finished and written everything.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
