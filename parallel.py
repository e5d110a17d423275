"""Data parallelism with PyTorch's own engine (torch.distributed), for torchrun:

    torchrun --nproc_per_node 2 train.py ...      each rank: its share of every iteration's chains
    torchrun --nproc_per_node 2 evaluate.py ...   each rank: every second prompt; rank 0 writes
    torchrun --nproc_per_node 2 selfgen.py ...    each rank: every second question of a batch; rank 0 writes

Without torchrun (no WORLD_SIZE in the environment) there is one rank, and every function here is
the one-process identity: the same code runs either way.
"""
import os
import sys

import torch
import torch.distributed as dist


def join(batch_size: int = 0) -> int:
    """Under torchrun join the process group, gloo on CPU or nccl on CUDA, each rank on its own GPU;
    a world size that does not divide batch_size (when given) is one line. -> this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    if batch_size and batch_size % world:
        sys.exit(f"error: torchrun: {world} processes do not divide --batch-size {batch_size}; give a multiple of {world}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(t):
    """Sum a tensor over the ranks, in place (the identity on one rank). -> t"""
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and not t.is_cuda:
            t.copy_(all_sum(t.cuda()))
        else:
            dist.all_reduce(t)
    return t


def share(items: list) -> list:
    """This rank's share of a list (or a tensor, along its first dimension): every world-th item,
    starting at the rank's own."""
    rank, world = rank_and_world()
    return items[rank::world]


def gather(mine: list) -> list:
    """The inverse of share, on every rank: each rank's results (in share's order) -> all of them,
    in the order of the list that was shared."""
    rank, world = rank_and_world()
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(sum(map(len, parts)))]
