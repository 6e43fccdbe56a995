"""A small, complete run: a 3-hidden-layer sigmoid MLP with and without batch norm.

Trains both networks with the same plain SGD on synthetic two-class data for a few
hundred steps and prints their losses, then checks a checkpoint round trip with
torch.nn.BatchNorm1d. Runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import batchnorm as bn


def make_mlp(norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 20
    for i in range(3):
        # The bias before a batch-norm layer is redundant: the mean subtraction removes it.
        layers.append(nn.Linear(width if i else 10, 100, bias=not norm))
        if norm:
            layers.append(bn.BatchNorm1d(100))
        layers.append(nn.Sigmoid())
        width = 100
    layers.append(nn.Linear(100, 2))
    return nn.Sequential(*layers)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2000, 10)
    y = (x[:, :3].sum(dim=1) > 0).long()
    for norm in (False, True):
        torch.manual_seed(1)
        model = make_mlp(norm)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(300):
            idx = torch.randint(0, len(x), (60,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        print(f"{'with BN   ' if norm else 'without BN'}  final loss {loss.item():.3f}  accuracy {acc:.3f}")
    torch.nn.BatchNorm1d(100).load_state_dict(model[1].state_dict())
    print("checkpoint of batchnorm.BatchNorm1d loads into torch.nn.BatchNorm1d: ok")


if __name__ == "__main__":
    main()
