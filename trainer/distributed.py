"""The process group: joined (or made, for one plain process) once per run, with a timeout on every
collective, and the few host-side collectives the loop needs. Every helper here is a no-op with one
process, so the loop reads the same at any world size."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


def multi_rank() -> bool:
    """True when a collective has other ranks to talk to."""
    return torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    if multi_rank():
        torch_dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> float:
    """A per-rank scalar averaged over the ranks (all must call it): the logged loss is the global
    batch's, the loss one process with the global batch would log. A device sync: logging steps only."""
    if multi_rank():
        value = value.detach().clone()
        torch_dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= torch_dist.get_world_size()
    return value.item()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on any (a host-side all_reduce on a gloo group)."""
    if not multi_rank():
        return flag
    tensor = torch.tensor([flag], dtype=torch.int32)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def union_over_ranks(items: set[int], group=None) -> set[int]:
    """The union of a small set of ints over all ranks (all must call it)."""
    if not multi_rank():
        return set(items)
    every = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(every, sorted(items), group=group)
    return set().union(*every)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    # a gloo group over all ranks for small host-side agreements (the stop request): no device sync.
    # None means the default group, which is gloo already on the CPU
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's accelerator (the CPU when there is none)."""
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().device_name(self.local_rank))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> Distributed:
    """Join the launcher's process group (deepspeed/torchrun set RANK etc.), or make
    a group of one when started as plain `python -m trainer`.

    timeout_s bounds every collective (gloo and NCCL honour the group's timeout): when a rank
    dies or hangs, the others raise instead of waiting forever."""
    _quiet_import_notices()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
    world_size = int(os.environ["WORLD_SIZE"])
    # DeepSpeed (0.19) reduces gradients over its own clone of the world group, which it makes with
    # torch's default timeout (30 min), not the one above: a stuck rank held the others that long
    # whatever timeout_s said. Make the clone here, with ours; DeepSpeed then uses it.
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = torch_dist.new_group(ranks=list(range(world_size)), timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() == "cpu":
        _share_cores()
    cpu_group = None
    if world_size > 1 and torch_dist.get_backend() != "gloo":
        cpu_group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)), cpu_group)


def _quiet_import_notices() -> None:
    """On a machine without a GPU, torch ("No CUDA runtime is found") and DeepSpeed ("Setting
    accelerator to CPU") warn while importing; the run's banner names the device instead, and
    stderr stays for what needs reading (a config error is then the only line)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from deepspeed.utils import logger as deepspeed_logger

    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.ERROR)
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()  # detection happens, and warns, on the first call
    finally:
        deepspeed_logger.setLevel(level)


def _share_cores() -> None:
    """CPU ranks on one machine split its cores: each torch defaults to all of them, and N ranks x
    all cores oversubscribe (2 ranks x 2 threads on 2 cores ran 50x slower). OMP_NUM_THREADS, set by
    the user or by `deepspeed --bind_cores_to_rank`, wins."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // local_world))


