"""Synchronized batch normalization under DistributedDataParallel, on CPUs with gloo.

Run with two processes on one machine:

    torchrun --nproc_per_node=2 examples/sync_torchrun.py

(add ``--standalone`` if port 29500 is taken). Each rank trains on its own shard with
a *different* batch size; the SyncBatchNorm layers normalize with the statistics of
the global batch, so the run behaves like one process on the concatenated batch. The
script checks that claim once at the start (rank 0 recomputes the first step on the
whole batch) and, at the end, that every rank holds the same running statistics.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import batchnorm as bn


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1, bias=False),  # bias is redundant before BN
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 1),
    )


def shard(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's part of a synthetic global batch; rank r holds 8 + 4r examples.

    The task: predict how much brighter than average an image is.
    """
    sizes = [8 + 4 * r for r in range(world)]
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(sum(sizes), 1, 6, 6, generator=gen) * 3 + 2
    target = 2 * (x.mean(dim=(1, 2, 3)) - 2).unsqueeze(1)
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]], target[start : start + sizes[rank]], sizes


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    plain = make_model()
    single = copy.deepcopy(plain)  # rank 0 uses it to check the first step
    model = DistributedDataParallel(bn.SyncBatchNorm.convert_sync_batchnorm(plain))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = torch.nn.MSELoss(reduction="sum")

    for step in range(30):
        x, target, sizes = shard(step, rank, world)
        # Sum over this rank's examples, divided by the global batch size: DDP averages
        # gradients over ranks, so multiply back by the world size to get the gradient
        # of the mean loss over the whole batch.
        loss = loss_fn(model(x), target) * world / sum(sizes)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            check_first_step(model, single, loss_fn, world, rank)
        optimizer.step()
        total = loss.detach() / world
        dist.all_reduce(total)
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1:2d}: mean loss over the global batch {total.item():.4f}")

    # Every rank computed the same merged statistics, so the running estimates agree.
    sync_bn = model.module[1]
    stats = torch.cat([sync_bn.running_mean, sync_bn.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        spread = max((g - gathered[0]).abs().max().item() for g in gathered)
        print(f"running statistics identical on all {world} ranks: max difference {spread:.1e}")
    # Let every rank finish its collectives before any tears the group down; gloo can
    # abort a process whose peer disconnects while its worker threads still hold work.
    dist.barrier()
    del model
    dist.destroy_process_group()


def check_first_step(
    model: DistributedDataParallel, single: torch.nn.Module, loss_fn: torch.nn.Module,
    world: int, rank: int,
) -> None:
    """Rank 0 runs plain BN on the whole first batch; the gradients must agree."""
    if rank != 0:
        return
    x_all = torch.cat([shard(0, r, world)[0] for r in range(world)])
    t_all = torch.cat([shard(0, r, world)[1] for r in range(world)])
    (loss_fn(single(x_all), t_all) / len(x_all)).backward()
    diff = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.module.parameters(), single.parameters(), strict=True)
    )
    print(f"{world} ranks with batch sizes {shard(0, 0, world)[2]}: gradients equal to one "
          f"process on the whole batch within {diff:.1e}")


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node=2 examples/sync_torchrun.py")
    main()
