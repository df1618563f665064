"""torch.distributed glue for `torchrun --nproc-per-node N -m cifarkit train ...`.

Design: every rank holds the whole uint8 data set, draws the same global permutation and the same
augmentation of each *global* batch (same generators), then keeps its own slice of it. So a run on
N processes computes exactly what one process computes with the same global batch (up to float
summation order), and a resume may use a different world size: the saved state is global.
Only rank 0 downloads data (others wait at a barrier), logs, writes TensorBoard and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def all_min(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return float(t.item())

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # gloo for CPUs (and CI); nccl between GPUs
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world, local_rank, local_world)


def local_slice(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's share of a global batch (interleaved, so sizes differ by at most one)."""
    return x[d.rank::d.world] if d.enabled else x
