"""torchrun + DistributedDataParallel, the few pieces clipshield needs.

Every rank reads the same global batch stream and keeps its own contiguous slice (decoding only that
slice), so a run on N processes sees exactly the samples, order and global batches of a 1-process run:
no sample twice per epoch, same losses. The contrastive objectives all-gather features with their
gradient (open_clip's gather_with_grad) and compute the loss over the global batch; DDP averages the
parameter gradients. Only rank 0 writes models, metrics, logs and progress.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); False outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return True


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks in rank order, keeping the gradient path to every rank's slice."""
    if world()[1] == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd
    # backward: reduce-scatter (sum) of the gradients, as open_clip's gather_with_grad
    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def mean_over_ranks(value: float) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world()[1]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def local_slice(n: int) -> slice:
    """This rank's contiguous share of a global batch of `n` samples."""
    rank, size = world()
    if n % size:
        raise ValueError(f"the global batch ({n}) must divide evenly over {size} processes; "
                         f"choose a batch_size that is a multiple of train.nproc")
    per = n // size
    return slice(rank * per, (rank + 1) * per)


def available_devices() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"
