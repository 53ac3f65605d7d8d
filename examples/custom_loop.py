"""SSL inside your own training loop: groups, proximal step, frozen zeros, MAC count, checkpoint.

    python examples/custom_loop.py            # resnet20 on random CIFAR-shaped data, a few steps
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from sslcompress import (
    Checkpoint,
    GroupLasso,
    MaskSet,
    ModelSpec,
    build_groups,
    build_model,
    count,
    save_checkpoint,
)


def main(out: str = "custom_sparse.pt", steps: int = 30) -> float:
    spec = ModelSpec("resnet20", num_classes=10, in_channels=3, input_size=(32, 32))
    model = build_model(spec)
    groups = build_groups(model, spec.input_shape, kinds=("filter", "channel", "depth"))
    lasso = GroupLasso(model, groups, weighting="sqrt")
    lambdas = {"filter": 0.6, "channel": 0.6, "depth": 0.6}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))  # your data loader goes here

    for _ in range(steps):  # sparsify: the proximal step after each optimizer step gives exact zeros
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lasso.proximal_step(lr=opt.param_groups[0]["lr"], lambdas=lambdas)

    masks = MaskSet(model, lasso.keep_masks()).attach()  # freeze the zero groups
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps // 3):  # fine-tune: zeros stay zero
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.apply_()

    counted = count(model, spec.input_shape)
    save_checkpoint(out, Checkpoint("sparse", spec, model.state_dict(), masks=masks.state()))
    print(f"MACs kept: {counted.macs_fraction:.1%}, blocks removed: {len(counted.blocks_removed)}, saved {out}")
    return counted.macs_fraction


if __name__ == "__main__":
    main(*sys.argv[1:2])
