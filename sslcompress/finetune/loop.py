"""Training and evaluation loops shared by pretraining, sparsifying and fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainOptions
from ..data import ImageData
from ..errors import ConfigError, TrainingError
from .distributed import DistEnv, all_sum, broadcast_buffers


@dataclass(frozen=True)
class Event:
    """Progress of a long run, for whoever shows it (the CLI draws bars from these)."""

    phase: str  # "pretrain" | "sparsify" | "finetune" | "info"
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    accuracy: float | None = None  # running train accuracy, or test accuracy at epoch end
    macs_fraction: float | None = None
    zero_groups: float | None = None  # fraction of regularised groups that are zero
    lambdas: dict[str, float] | None = None
    message: str | None = None
    end_of_epoch: bool = False


EventSink = Callable[[Event], None]


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases: decay would pull a BN shift that SSL left
    # nonzero towards zero for no reason, and it is the common practice for CNNs.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr, momentum=opts.momentum, nesterov=opts.momentum > 0,
    )


def make_schedule(opt: torch.optim.Optimizer, opts: TrainOptions, steps_per_epoch: int):
    total = max(1, opts.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if opts.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if opts.schedule == "step":
            return 0.1 ** (step // max(1, int(total * 0.5)) + (step >= int(total * 0.75)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_steps(data: ImageData, opts: TrainOptions, phase: str, *, world_size: int = 1,
                limit_train: int | None = None) -> None:
    """ConfigError when a phase with epochs to run would take no optimizer step: every epoch drops
    its last partial batch, so a batch larger than the (per-rank) training set trains nothing."""
    if opts.epochs <= 0 or data.num_batches("train", opts.batch_size, world_size=world_size, drop_last=True) > 0:
        return
    n = data.num_batches("train", 1, world_size=world_size, drop_last=True)  # images per rank
    images = f"{n} training images" + (f" per rank ({world_size} ranks)" if world_size > 1 else "")
    limit = f" (--limit-train {limit_train})" if limit_train is not None else ""
    raise ConfigError(f"{phase} would take no optimizer step: --batch-size {opts.batch_size} is larger than the "
                      f"{images}{limit}; lower --batch-size to at most {n}, or train on more images")


def check_finite_weights(model: nn.Module, phase: str) -> None:
    """TrainingError naming the first NaN or infinite weight or buffer, so nothing is saved from it."""
    for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise TrainingError(f"{phase} diverged: {bad} value(s) of the {kind} {name} became NaN or infinite; "
                                    "the model was not saved; lower the learning rate")


def current_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])


def train_epoch(
    model: nn.Module,
    trained: nn.Module,
    data: ImageData,
    opt: torch.optim.Optimizer,
    sched,
    *,
    batch_size: int,
    epoch: int,
    epochs: int,
    phase: str,
    seed: int,
    env: DistEnv,
    device: str,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    on_event: EventSink | None = None,
) -> tuple[float, float]:
    """One pass over this rank's shard; returns (mean loss, accuracy) over all ranks.

    `trained` is the module that runs forward (the DDP wrapper under torchrun), `model` the
    plain module whose parameters it shares.
    """
    trained.train()
    steps = data.num_batches("train", batch_size, world_size=env.world_size, drop_last=True)
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    for step, (x, y) in enumerate(data.batches("train", batch_size, shuffle=True, seed=seed, epoch=epoch,
                                               rank=env.rank, world_size=env.world_size, augment=True,
                                               drop_last=True)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = trained(x)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise TrainingError(f"{phase} diverged: the loss became {float(loss.detach())} in epoch {epoch + 1}, step "
                                f"{step + 1}; lower the learning rate (now {current_lr(opt):g})")
        total = loss + extra_loss() if extra_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if after_step is not None:
            after_step()  # before the schedule moves on: the proximal step uses the lr of this step
        sched.step()
        n = y.numel()
        loss_sum += float(loss.detach()) * n
        correct += float((out.detach().argmax(1) == y).sum())
        seen += n
        if on_event is not None:
            on_event(Event(phase, epoch, epochs, step + 1, steps, loss_sum / seen, correct / seen))
    loss_sum, correct, seen = all_sum([loss_sum, correct, seen], env, device)
    broadcast_buffers(model, env)
    if seen == 0:
        return float("nan"), float("nan")
    return loss_sum / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int, device: str, *, phase: str | None = None) -> float:
    """Top-1 accuracy on the whole test split (every rank scores all of it: exact and identical).

    With ``phase``, the weights and every test logit must be finite (TrainingError otherwise): a
    model trained in that phase is checked before anything is saved from it.
    """
    if phase is not None:
        check_finite_weights(model, phase)
    was = model.training
    model.eval()
    correct, seen = 0.0, 0.0
    for x, y in data.batches("test", batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if phase is not None and not bool(torch.isfinite(logits).all()):
            model.train(was)
            raise TrainingError(f"{phase} diverged: the model gives NaN or infinite outputs on the test images; "
                                "the model was not saved; lower the learning rate")
        correct += float((logits.argmax(1) == y).sum())
        seen += y.numel()
    model.train(was)
    return correct / seen if seen else float("nan")
