"""Data-parallel training with torchrun: the ranks, their agreements and their checks.

    torchrun --nproc_per_node N train.py ...

Rank r trains on rows r::world of every global batch (a cache) or on its own documents (a stream,
batches.py). The models are identical on every rank: DDP broadcasts rank 0's at the start and
all-reduces the gradients, core.py reduces the BatchTopK selection, threshold and dead counters
itself (so DDP must leave the buffers alone: `ddp`), and `assert_ranks_agree` checks it once at the
end. Host-side agreements (stop on Ctrl-C, or when a rank's documents run out) go through a CPU
(gloo) group, so they never wait for the GPU.

Randomness in a step (layer masking) is seeded from (seed, rank, step) at the start of each step
(`step_seed`): every rank draws different masks, and a resumed run, on any number of ranks, draws
the masks the uninterrupted run drew, with no RNG state to save.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import os
from dataclasses import dataclass

import torch


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    control: object = None        # a gloo group for host-side flags: agreeing never waits for the GPU
    owns_group: bool = False      # train() initialised the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every rank if it is true on any rank (a CPU all-reduce, no device sync)."""
        if self.world == 1:
            return flags
        t = torch.tensor([int(f) for f in flags])
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX, group=self.control)
        return tuple(bool(v) for v in t.tolist())

    def broadcast(self, models: dict) -> None:
        """Rank 0's parameters and buffers to every rank (b_dec is set from each rank's own data)."""
        if self.world > 1:
            for m in models.values():
                for t in m.state_dict().values():
                    torch.distributed.broadcast(t, 0)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.control)


def setup_ranks(batch_size: int, device: torch.device) -> tuple[Ranks, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join (or reuse) the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of ranks {world}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # rank 0 may harvest a cache for hours while the others wait: a long timeout for the control group
    control = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return Ranks(int(os.environ.get("RANK", "0")), world, control, owns), device


def ddp(model, **kwargs):
    """DistributedDataParallel that leaves the buffers alone in forward (core.py reduces the dead
    counters and the BatchTopK threshold itself); the flag was renamed in torch 2.13."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return torch.nn.parallel.DistributedDataParallel(model, **{name: False}, **kwargs)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one step on one rank (distinct for every rank < 2^16 and step < 2^32)."""
    return ((seed * 2**32 + step) * 2**16 + rank) % 2**63


def assert_ranks_agree(models: dict, ranks: Ranks) -> None:
    """Every parameter and buffer must be bit-identical on all ranks (a SHA-1 per model, gathered)."""
    if ranks.world == 1:
        return
    digests = {}
    for key, m in models.items():
        h = hashlib.sha1()
        for name, t in m.state_dict().items():
            h.update(name.encode() + t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[str(key)] = h.hexdigest()
    gathered = [None] * ranks.world
    torch.distributed.all_gather_object(gathered, digests, group=ranks.control)
    bad = [k for k in digests if len({g[k] for g in gathered}) > 1]
    if bad:
        raise RuntimeError(f"the models {bad} differ between ranks: data-parallel training went out of sync")
