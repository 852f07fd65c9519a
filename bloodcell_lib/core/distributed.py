"""torchrun / DistributedDataParallel helpers: process group, device, threads, reductions, sampling.

The same code runs as one plain process or as N processes started by ``torchrun`` (one node
or several with ``--nnodes`` and a rendezvous endpoint): everything is read from the
environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), so no
flag is needed to switch between them. Without those variables every helper degrades to the
single-process answer (rank 0 of 1, reductions are no-ops).
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and sizes from torchrun's environment (single process when the variables are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


DEVICE_NAMES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device of a ``device`` setting: ``auto`` is cuda:LOCAL_RANK when a GPU is
    visible (one GPU per process), else the CPU; ``cpu``; ``cuda`` (or ``cuda:N``) only where
    torch sees a GPU. ValueError naming the parameter otherwise."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or re.fullmatch(r"cuda:\d+", name):
        if not torch.cuda.is_available():
            raise ValueError(f"parameter 'device' = {name!r}: torch sees no CUDA device here; use auto or cpu")
        count = torch.cuda.device_count()
        index = int(name.split(":")[1]) if ":" in name else local_rank
        return torch.device(f"cuda:{index % count}")
    raise ValueError(f"parameter 'device' = {name!r} is not accepted; use one of: {', '.join(DEVICE_NAMES)}")


def device_argument(value: str) -> str:
    """argparse ``type`` of a ``--device`` option (auto, cpu, cuda, cuda:N): the resolved
    device's name, so ``--device auto`` (the default) reads as cpu or cuda:0."""
    import argparse

    try:
        return str(resolve_device(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def select_device(local_rank: int = 0, name: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible and ``name`` allows it, else the CPU (resolve_device)."""
    return resolve_device(name, local_rank)


def set_threads(threads: int = 0, local_world_size: int = 1) -> int:
    """Intra-op threads for this process: ``threads`` if given, else this node's cores shared
    evenly by the processes on it, so N ranks on one machine do not oversubscribe its cores
    (which can make DDP slower than one process)."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed(threads: int = 0, timeout_minutes: float = 30.0, device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun; pick device (``device``: the config's
    setting, resolve_device) and thread count.

    The backend follows the device: NCCL for GPUs, gloo for CPUs. Calling it again is
    harmless (the existing group is reused), so fit() can call it for every fold.
    """
    info = env_info()
    info.device = resolve_device(device, info.local_rank)
    set_threads(threads, info.local_world_size)
    if info.world_size > 1:
        if info.device.type == "cuda":
            torch.cuda.set_device(info.device)
        info.backend = "nccl" if info.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=info.backend, timeout=_dt.timedelta(minutes=timeout_minutes))
        else:
            info.backend = dist.get_backend()
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max/min) ``tensor`` over all ranks in place and return it; no-op for one process.

    Gloo cannot reduce CUDA tensors and NCCL cannot reduce CPU ones, so the tensor travels
    to the backend's device and back.
    """
    if not is_dist():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = tensor.to(backend_device) if tensor.device != backend_device else tensor
    dist.all_reduce(work, op=ops[op])
    if work is not tensor:
        tensor.copy_(work.to(tensor.device))
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled); identity for one process."""
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


# --------------------------------------------------------------------------- sampling

def mixed_seed(seed: int, epoch: int, extra: int = 0) -> int:
    """One seed from (seed, epoch) plus ``extra`` (a stream's or rank's own term): large odd
    multipliers keep the combinations from colliding."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(extra)) % (2**63 - 1)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream): an epoch's draws are the same
    whatever ran before, which is what makes a resumed run repeat the uninterrupted one."""
    gen = torch.Generator()
    gen.manual_seed(mixed_seed(seed, epoch, int(stream) * 104_729))
    return gen


def global_epoch_indices(labels: torch.Tensor | list[int], epoch: int, seed: int, *,
                         shuffle: bool = True, balanced: bool = False) -> torch.Tensor:
    """All ranks' sample order for one epoch, identical on every rank.

    ``balanced`` oversamples minority classes with WeightedRandomSampler's semantics:
    draw ``len(labels)`` indices with replacement, each sample weighted 1 / its class count,
    so every class is drawn about equally often. Otherwise a permutation (or 0..N-1).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(labels)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = epoch_generator(seed, epoch, stream=0)
    if balanced:
        counts = torch.bincount(labels).double()
        weights = 1.0 / counts[labels]
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    if shuffle:
        return torch.randperm(n, generator=gen)
    return torch.arange(n)


def rank_share(indices: torch.Tensor, rank: int, world_size: int, *, pad: bool = True) -> torch.Tensor:
    """This rank's strided share of the global order: positions rank, rank+W, rank+2W, ...

    With ``pad`` the order is first extended (wrapping around, as DistributedSampler does) to
    a multiple of W so every rank gets the same count and takes the same number of steps,
    which DDP requires. Striding (rather than contiguous blocks) means global batch b of a
    single-process run is exactly the union of the ranks' batch b when the per-rank batch is
    batch_size // W, so one process and N processes see the same batches.
    """
    if world_size <= 1:
        return indices
    n = len(indices)
    if pad and n % world_size:
        extra = world_size - n % world_size
        reps = -(-extra // max(n, 1))
        indices = torch.cat([indices, indices.repeat(reps)[:extra]]) if n else indices
    return indices[rank::world_size]


def epoch_indices(labels, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, balanced: bool = False) -> torch.Tensor:
    """This rank's sample order for ``epoch`` (see global_epoch_indices and rank_share)."""
    order = global_epoch_indices(labels, epoch, seed, shuffle=shuffle, balanced=balanced)
    return rank_share(order, rank, world_size, pad=True)


def batches(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an index order into batches; a final batch of one sample joins the previous one,
    because BatchNorm cannot train on a single sample with 1x1 feature maps."""
    out = list(torch.split(indices, max(1, batch_size)))
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = torch.cat([out[-1], last])
    return out
