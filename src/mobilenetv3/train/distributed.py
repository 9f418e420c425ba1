"""torchrun integration: process group, DDP, SyncBN, and the collectives training and validation use.

The samplers (data order, per-sample seeds, validation shards) live in `mobilenetv3.data.samplers`.

There is no launcher here: `torchrun` (or `python -m torch.distributed.run`) starts the processes and
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python -m mobilenetv3 train`
is world size 1 and never touches torch.distributed.  Under torchrun the process group is joined even at
world size 1 (as torchvision's references do), so `torchrun --nproc_per_node=1` on one GPU really runs
NCCL and DDP: the same code path as a multi-GPU job.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    process_group: bool = False  # joined a torch.distributed group (torchrun, at any world size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """DDP, distributed samplers and collectives are in use."""
        return self.process_group or self.world_size > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def init(device_name: str = "auto") -> DistEnv:
    """Join the torchrun job if there is one: NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it for every worker it starts
    if (world_size > 1 or under_torchrun) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = restart_safe_store(world_size)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                **({} if store is None else {"store": store, "rank": rank, "world_size": world_size}))
        logger.info("distributed: %d process(es), backend %s", world_size, backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   process_group=dist.is_available() and dist.is_initialized())


def restart_safe_store(world_size: int):
    """torchrun's own TCPStore under a per-attempt prefix, or None (init_process_group's default).

    torchrun shares its rendezvous store with the workers (TORCHELASTIC_USE_AGENT_STORE) and keeps it
    across `--max-restarts`, but the process group's keys carry no attempt number: a restarted group reads
    the dead group's addresses and gloo / NCCL fail to connect (pytorch/pytorch#135712).  A prefix per
    TORCHELASTIC_RESTART_COUNT keeps the attempts apart, so a restart resumes by itself.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"mobilenetv3/attempt_{restart}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, sync_bn: bool) -> nn.Module:
    """SyncBN conversion (keeps state-dict keys) and DDP; returns the module to call in training."""
    if sync_bn:
        if env.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU)")
        if not env.distributed:
            logger.warning("--sync-bn has no effect without torchrun (world size 1)")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def group_size() -> int:
    """Processes in the torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum plain numbers across ranks (float64, so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the tensor becomes its sum over the ranks (unchanged without a group); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_(tensor: torch.Tensor) -> None:
    """In place: the tensor becomes its mean over the ranks (unchanged without a group)."""
    size = group_size()
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(size)


def all_gather_objects(value):
    """[value of rank 0, value of rank 1, ...] (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers_(module: nn.Module) -> None:
    """In place: every rank's buffers (BatchNorm running statistics) become rank 0's, as DDP's next forward would
    make them.  Each rank's last training step updated its own statistics from its own batch, so without this
    each rank would validate a slightly different network, and not the one rank 0 saves."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank_zero_first(env: DistEnv) -> Iterator[None]:
    """Run the block (e.g. finding or downloading a dataset) on rank 0 first, then on the first process of each
    other node, then on the rest: a download happens once per filesystem and never into one folder at once.

    Every process passes the same two barriers, so the block's order is: rank 0 | local rank 0 | the rest.
    If the block fails on one rank, torchrun tears the others down (they are waiting at a barrier).
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    turn = 0 if env.rank == 0 else 1 if env.local_rank == 0 else 2
    for _ in range(turn):
        dist.barrier()
    yield
    for _ in range(turn, 2):
        dist.barrier()

