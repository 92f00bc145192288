"""Data-parallel training across processes with torch.distributed, launched by ``torchrun``.

``torchrun --nproc_per_node N ...`` sets WORLD_SIZE, RANK and LOCAL_RANK; :func:`setup` joins
the process group (NCCL on CUDA, gloo on CPU) and returns who this process is. Without those
variables everything runs as one process and nothing here does anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes checkpoints."""
        return self.rank == 0

    def place(self, rt):
        """The run's :class:`~histosynth.runtime.Runtime` for this process: its own GPU
        (``cuda:LOCAL_RANK``), its rank and the world size."""
        if not self.active:
            return rt
        dev = torch.device("cuda", self.local_rank) if rt.device.type == "cuda" else rt.device
        return dataclasses.replace(rt, device=dev, rank=self.rank, world=self.world)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """``obj`` as rank 0 has it, on every rank (decisions must not diverge)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DistributedDataParallel does when built)."""
        if self.active:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    torch.distributed.broadcast(t.data, src=0)

    def average_gradients(self, params) -> None:
        """Average the ``.grad`` of ``params`` over ranks in one all-reduce.

        The engine uses this instead of DistributedDataParallel: a GAN step runs D several
        times before one backward and WGAN-GP differentiates through a gradient
        (``create_graph=True``), which DDP does not support; stylegan3 averages its gradients
        the same way."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for g, f in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(f.view(g.shape))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.active:
            x = x.clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return x


def setup(device_type: str) -> Dist:
    """Join the process group torchrun described in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


class DistributedWeightedSampler(torch.utils.data.Sampler):
    """Class-balanced sampling shared out over ranks: each epoch, ``len(weights)`` indices are
    drawn with replacement by the given weights (torchsampler's ImbalancedDatasetSampler weights)
    from a generator seeded by (seed, epoch), and rank r takes every world-th of them."""

    def __init__(self, weights: torch.Tensor, rank: int, world: int, seed: int):
        self.weights, self.rank, self.world, self.seed, self.epoch = weights, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights) // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        idx = torch.multinomial(self.weights, len(self) * self.world, replacement=True, generator=g)
        return iter(idx[self.rank::self.world].tolist())
