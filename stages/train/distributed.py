"""Data-parallel training across processes (`accelerate launch`, torchrun): one rank per device.

Each rank trains on its share of every global batch; after the micro-batches of an optimizer
step, the LoRA gradients (a few MB) are summed across ranks in one all-reduce. With each
rank's loss divided by the trained tokens of the whole global step, that sum is exactly the
gradient one process would get from the whole batch. Rank 0 writes metrics, checkpoints and
the adapter. NCCL on CUDA, gloo on CPU (how the tests run two processes on one machine).
With a 4-bit base, FSDP shards the base across the ranks instead of replicating it (fsdp.py).

Several machines: `train.nnodes` > 1 with `train.master = "host:port"` (node 0's address). Node 0 runs `doit` as
usual; each other node runs `MEDFORGE_NODE_RANK=<i> python -m stages train <adapter>` in its own copy of the project
(same commit, same data/splits). Ranks are fixed by node (static rendezvous), so rank 0, which writes the
checkpoints and the adapter, is always on node 0.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

NODE_RANK_ENV = "MEDFORGE_NODE_RANK"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    fsdp: bool = False  # the base is sharded (fsdp.py): every forward is collective, ranks run in lockstep

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallelism(self) -> str:
        return "fsdp" if self.fsdp else "ddp" if self.size > 1 else "single"


def launched_world_size() -> int:
    """Processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def node_rank(nnodes: int) -> int:
    """This machine's place among `nnodes` (node 0 by default: where `doit` runs)."""
    from stages.errors import StageError

    value = os.environ.get(NODE_RANK_ENV, "0")
    if not value.isdigit() or int(value) >= nnodes:
        raise StageError(f"{NODE_RANK_ENV}={value!r}: expected a node number from 0 to {nnodes - 1} "
                         f"(train.nnodes = {nnodes}); node 0 runs doit, the others `python -m stages train`")
    return int(value)


def launch_command(nproc: int, nnodes: int = 1, master: str = "", node: int = 0) -> list[str]:
    """torchrun running this very command again (`python -m stages train <a>`, or the script that called
    `train.run`) as `nproc` processes on this node; with `nnodes` > 1 they join the other nodes at `master`."""
    from stages.errors import StageError

    if nnodes == 1:
        topology = ["--standalone"]
    else:
        host, _, port = master.rpartition(":")
        topology = [f"--nnodes={nnodes}", f"--node_rank={node}", f"--master_addr={host}", f"--master_port={port}"]
    module = next((sys.orig_argv[i + 1] for i, a in enumerate(sys.orig_argv[:-1]) if a == "-m"), None)
    if module is not None:
        this = ["--module", module, *sys.argv[1:]]
    elif sys.argv and sys.argv[0] not in ("", "-c"):
        this = sys.argv
    else:
        raise StageError("a multi-process training must start from `python -m stages train <adapter>` or a "
                         "script file: torchrun cannot relaunch `python -c`")
    return [sys.executable, "-m", "torch.distributed.run", *topology, f"--nproc_per_node={nproc}", *this]


def init(device: str, shard_base: bool = False) -> World:
    """Join the process group the launcher set up; a single process needs none. `shard_base`
    (a 4-bit base): with several processes, FSDP shards it instead of each rank holding a replica."""
    import torch
    import torch.distributed as dist

    if launched_world_size() <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), fsdp=shard_base)


def all_sum(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params, world: World) -> None:
    """Sum the gradients of `params` over ranks (one flat all-reduce)."""
    if world.size == 1 or world.fsdp:  # FSDP has summed them already (fsdp.py)
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(p).to(p.dtype)
        at += n


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist
        dist.barrier()


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's decision, on every rank (e.g. early stopping)."""
    if world.size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, 0)
    return bool(t.item())


def shutdown(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
