"""Training in PyTorch: the twin of gptmod_jax/train.py.

AdamW from torch.optim (decoupled weight decay on 2-D linear weights only, `training.decays`), the
learning rate set before each update from `training.lr_at`, gradient clipping by global norm,
gradient accumulation over micro-batches, and bf16 autocast with fp32 master weights. The loop, the
checkpoints and the log are shared (gptmod/training.py).

Under `torchrun` (torch.distributed initialised by `gptmod_torch.distributed.init`),
`parallel="ddp"` wraps the model in DistributedDataParallel (gradients all-reduced) and
`parallel="fsdp"` shards it with FSDP2's `fully_shard`, each block a unit (parameters all-gathered
for use, gradients reduce-scattered): `distributed.wrap`. Each process then feeds its slice of the
global batch; the logged loss is the mean over processes, and export/load work in full canonical
tensors (`distributed.full_tensors`, `shard_like`), so checkpoints are the same safetensors as a
one-process run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from gptmod.training import TrainConfig, decays, lr_at
from gptmod.weights import check_state
from gptmod_torch import distributed
from gptmod_torch.distributed import full_tensor, full_tensors, shard_like
from gptmod_torch.model import GPT, export_state, load_state


def loss_fn(model: GPT, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the model's (soft-capped, fp32)
    logits, as logsumexp - the target's logit.

    Not `F.cross_entropy`: on the CPU its fp32 log_softmax is 2e-5 off float64
    over SmolLM2's 49152 logits (loss 8e-6 off, every gradient 20x further from
    float64 than JAX's), where `logsumexp` is 3e-8 off (parity's "train grads
    (own weights)" row found it; random weights' small logits hide it)."""
    logits_RV = model(x_BT).flatten(0, 1)
    target_R = logits_RV.gather(1, y_BT.flatten()[:, None])[:, 0]
    return (torch.logsumexp(logits_RV, dim=-1) - target_R).mean()


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: decayed 2-D linear weights, and everything else undecayed."""
    decay = [p for n, p in model.named_parameters() if decays(n)]
    other = [p for n, p in model.named_parameters() if not decays(n)]
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    # foreach=False: the per-parameter loop is torch's reference arithmetic;
    # it is what the JAX twin matches.
    return torch.optim.AdamW(
        groups, lr=lr_at(tc, 0), betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=False
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    # fp64 stays fp64 (references)
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def _ids(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.long, device=device)  # cross_entropy wants int64 targets


class Trainer:
    """One model, its optimizer and the step count; the methods the shared loop calls."""

    def __init__(
        self, model: GPT, tc: TrainConfig, *, compile: bool = False, parallel: str | None = None
    ) -> None:
        self.model, self.tc, self.parallel = model.train(), tc, parallel
        # after fully_shard the parameters are DTensors: optimizer after
        self.module = distributed.wrap(model, parallel)
        self.optimizer = make_optimizer(model, tc)
        self.count = 0  # updates applied so far
        # compile=True: inductor fuses the soft-cap and cross-entropy passes over the (tokens,
        # vocab) logits, which dominate eager time at GPT-2's vocabulary (about 1.6x faster on a
        # CPU; compiles once, ~30 s).
        self._loss = torch.compile(loss_fn) if compile else loss_fn

    def _autocast(self) -> Any:
        if self.tc.dtype == "bfloat16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return nullcontext()

    def _sync(self, last: bool) -> Any:
        """Gradient synchronisation only on the last micro-batch of a step
        (DDP, FSDP2); one process: none."""
        if self.parallel == "ddp" and not last:
            return self.module.no_sync()
        if self.parallel == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return nullcontext()

    def _backward(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> float:
        """Mean loss over the micro-batches (and processes); leaves the gradient of that mean in
        .grad (not yet clipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        device = next(self.model.parameters()).device
        total = 0.0
        for i, (x_BT, y_BT) in enumerate(zip(x_ABT, y_ABT, strict=True)):
            with self._sync(last=i == len(x_ABT) - 1), self._autocast():
                loss = self._loss(self.module, _ids(x_BT, device), _ids(y_BT, device))
                (loss / len(x_ABT)).backward()
            total += loss.item() / len(x_ABT)
        return self.all_reduce_mean(total)

    def grads(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss and its gradient (not clipped), under canonical names and layout."""
        loss = self._backward(x_ABT, y_ABT)
        return loss, {n: _numpy(full_tensor(p.grad)) for n, p in self.model.named_parameters()}

    def step(self, x_ABT: np.ndarray, y_ABT: np.ndarray) -> dict[str, Any]:
        """One optimizer update from a (grad_accum, batch, time) batch;
        metrics are python floats."""
        loss = self._backward(x_ABT, y_ABT)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        grad_norm = full_tensor(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=False)
        )
        lr = lr_at(self.tc, self.count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.count += 1
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr}

    @torch.no_grad()
    def eval_loss(self, x_BT: np.ndarray, y_BT: np.ndarray) -> float:
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            with self._autocast():
                return float(self._loss(self.module, _ids(x_BT, device), _ids(y_BT, device)))
        finally:
            self.model.train()

    def export_state(self) -> dict[str, np.ndarray]:
        """The canonical state in full tensors (under FSDP a collective:
        every process must call it)."""
        if self.parallel != "fsdp":
            return export_state(self.model)
        return {n: _numpy(t) for n, t in full_tensors(self.model.named_parameters()).items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.parallel != "fsdp":
            load_state(self.model, state)
            return
        check_state({n: tuple(p.shape) for n, p in self.model.named_parameters()}, state)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(shard_like(state[n], p))

    def export_optimizer(self) -> dict[str, Any]:
        """AdamW's moments under canonical names (torch's names and layout
        are canonical) and the count."""
        m, v = {}, {}
        for name, p in self.model.named_parameters():
            s = self.optimizer.state.get(p, {})
            zero = np.zeros(tuple(p.shape), np.float32)  # before the first update
            m[name] = _numpy(full_tensor(s["exp_avg"])) if s else zero
            v[name] = _numpy(full_tensor(s["exp_avg_sq"])) if s else zero.copy()
        return {"count": self.count, "m": m, "v": v}

    def load_optimizer(self, optimizer: Mapping[str, Any]) -> None:
        count = int(optimizer["count"])
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(count)),
                "exp_avg": shard_like(optimizer["m"][name], p),
                "exp_avg_sq": shard_like(optimizer["v"][name], p),
            }
        self.count = count

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a python float over the processes of torch.distributed
        (itself when not distributed)."""
        return distributed.all_reduce_mean(value)
