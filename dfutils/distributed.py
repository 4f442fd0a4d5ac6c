"""Running the same `fit` under torchrun (DistributedDataParallel) or alone.

Alone, every helper here answers as a world of one, so the single-process path is the
distributed path with one rank: the same samplers, the same order, the same numbers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return world()[0] == 0


def quiet_unless_main() -> dict:
    """tqdm arguments: no progress bars from ranks other than 0 (rank 0 keeps the defaults)."""
    return {} if is_main() else {"disable": True}


def device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) when there are GPUs, else the CPU. On a GPU, cuDNN picks
    the fastest convolution for each input shape (the shapes repeat every batch)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def session(timeout_minutes: int = 30) -> Iterator[tuple[int, int]]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); leave it on exit.

    NCCL on GPUs, gloo on CPUs. The group is destroyed on errors and Ctrl-C too, so a
    failing rank ends its process instead of leaving the others waiting in a collective
    (torchrun then stops them and exits non-zero).
    """
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        # Processes on one machine share its cores: one thread pool each would oversubscribe.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        started = True
    try:
        yield world()
    finally:
        if started:
            dist.destroy_process_group()


def per_rank_batch(batch_size: int) -> int:
    """The global batch size split over the ranks; it must divide evenly."""
    _, size = world()
    if batch_size % size:
        raise ValueError(f"batch_size {batch_size} does not divide over {size} processes: "
                         f"use a multiple of {size}")
    return batch_size // size


def gather_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array over all ranks (rank order); unchanged in a world of one."""
    _, size = world()
    if size == 1:
        return list(arrays)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([part[i] for part in gathered]) for i in range(len(arrays))]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, the same on every rank."""
    _, size = world()
    if size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0)
    return bool(value.item())
