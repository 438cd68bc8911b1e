"""Data parallelism with PyTorch's own engine: torchrun sets the environment, DDP syncs gradients.

    torchrun --nproc_per_node=2 train.py ...        # 2 ranks (gloo on CPU, NCCL on CUDA)
    python train.py ...                             # one process, no process group at all

What each part of a run does with N ranks:

    training     every global micro-batch of `batch_size x N` examples is cut into N slices,
                 one per rank; DDP averages the LoRA gradients (the frozen base weights have no
                 gradient and are not synchronised). The loss is computed over the *global*
                 micro-batch: per-group NLL sums and token counts are all-reduced before the
                 softmax (nanogdrt.loss), so every rank sees the Q(g) one process would.
    scoring      Eq. 3 for the catalogue is split across ranks and gathered (`shard` / `gather`).
    evaluation   users are split across ranks, their recommendations gathered back in the
                 original order on every rank (all ranks then agree on the best epoch).
    files        only rank 0 writes and prints.

`Dist` is a small value object; with world size 1 every method is the identity, so the
single-process code path is the same code, not a copy.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of `items`: every N-th one, starting at the rank (sizes differ by <= 1)."""
        return items[self.rank::self.world]

    def split_batch(self, batch: list) -> list:
        """This rank's contiguous slice of a global batch (sizes differ by <= 1; may be empty
        when the batch is shorter than the world)."""
        n = len(batch)
        return batch[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def gather(self, local: list, n: int) -> list:
        """Inverse of `shard` on every rank: the N shards of a list of length `n`, interleaved back."""
        if not self.enabled:
            return list(local)
        shards = [None] * self.world
        dist.all_gather_object(shards, local)
        out = [None] * n
        for r, shard in enumerate(shards):
            out[r::self.world] = shard
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Differentiable SUM across ranks (the backward all-reduces the gradients too)."""
        if not self.enabled:
            return t
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self):
        if self.enabled:
            dist.barrier()


def init(device: str = "cpu") -> Dist:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); else one rank.

    CUDA ranks each take GPU LOCAL_RANK and talk over NCCL; CPU ranks use gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local_rank)


def rank_device(device: str, d: Dist) -> str:
    """`cuda` means this rank's GPU under torchrun; anything else is used as given."""
    return f"cuda:{d.local_rank}" if device == "cuda" and d.enabled else device


def rng_state(device: str) -> dict:
    """This process's generator states (CPU, and its GPU's), to checkpoint each rank's dropout."""
    states = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def shutdown(clean: bool = True):
    """Leave the process group. After a clean run every rank first waits for the others: a rank
    that tears gloo down while its peer is still writing files could abort on exit ("terminate
    called without an active exception", seen once in CI on a 2-rank --max-steps run). After an
    error there is no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
