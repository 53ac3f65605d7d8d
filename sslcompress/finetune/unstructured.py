"""The unstructured baseline the bench compares against, trained to comparable accuracy.

The paper compares SSL with non-structured sparsity at the same sparsity. Zeroing the dense model's smallest
weights without retraining (what the bench does when nothing better is given) leaves an accuracy far below the
structured model's, which makes the comparison say more about retraining than about structure. This baseline
ends with exactly as many nonzero weights in every conv and Linear weight as the compact (SSL) model keeps in
that layer, and gets the training SSL got after pretraining: over the sparsify epochs the smallest weights are
pruned gradually (the cubic schedule of Zhu and Gupta, 2017, masks recomputed by magnitude a few times per
epoch), then the survivors are fine-tuned with the zeros held by masks for the fine-tune epochs. Its zeros sit
anywhere, so stock runtimes still compute them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainOptions
from ..data import load_data
from ..errors import CheckpointError
from ..magnitude import largest_magnitude_mask
from . import distributed as D
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .counting import Counter
from .loop import (
    Event,
    EventSink,
    check_finite_weights,
    check_steps,
    evaluate,
    make_optimizer,
    make_schedule,
    train_epoch,
)
from .masks import MaskSet

UNSTRUCTURED = "unstructured.pt"


@dataclass(frozen=True)
class UnstructuredResult:
    checkpoint: Path
    accuracy_pruned: float  # right after the magnitude pruning, before any retraining
    accuracy: float  # after the masked fine-tuning
    nonzeros: dict[str, int]  # per layer weight, equal to the sparse checkpoint's


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The conv and Linear weights of a model, by parameter name: where non-structured zeros go."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def nonzero_targets(sparse_model: nn.Module, input_shape: tuple[int, ...], names: list[str]) -> dict[str, int]:
    """How many nonzero weights each layer of the sparse model keeps once its zero channels are deleted: what
    the compact model holds (a zero filter also takes the next layer's column with it)."""
    kept = Counter(sparse_model, input_shape).nonzeros_after()
    # A layer the channel analysis does not see (behind a wall) keeps what it holds.
    weights = layer_weights(sparse_model)
    return {n: kept[n] if n in kept else int(weights[n].count_nonzero()) for n in names}


def magnitude_masks(model: nn.Module, targets: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per weight tensor, a mask keeping exactly its `targets[name]` largest-magnitude entries."""
    weights = layer_weights(model)
    masks = {}
    for name, k in targets.items():
        w = weights[name].detach()
        keep = largest_magnitude_mask(w.float().cpu().numpy(), k)
        masks[name] = torch.from_numpy(keep).to(w.device)
    return masks


def pruning_schedule(step: int, steps: int, dense: int, target: int) -> int:
    """Weights a layer keeps after `step` of `steps` pruning steps: from `dense` down to `target` along
    s(t) = 1 - (1 - t)^3, fast while there is much to prune and gently at the end."""
    if steps <= 0 or step >= steps:
        return target
    t = step / steps
    return dense - round((dense - target) * (1.0 - (1.0 - t) ** 3))


def train_unstructured(pretrained: str | Path, sparse: str | Path, out: str | Path, *,
                       prune: TrainOptions | None = None, finetune: TrainOptions | None = None,
                       data: str | None = None, limit_train: int | None = None, limit_test: int | None = None,
                       seed: int = 0, device: str = "cpu", eval_batch_size: int = 256, updates_per_epoch: int = 4,
                       on_event: EventSink | None = None) -> UnstructuredResult:
    """Prune the pretrained model gradually to the compact model's nonzeros per layer, fine-tune, save to `out`.

    `prune` and `finetune` (epochs, lr, ...) default to the sparse run's sparsify and fine-tune options, and
    data and limits to its data, so both models get the same training after pretraining.
    """
    dense_ckpt, sparse_ckpt = load_checkpoint(pretrained), load_checkpoint(sparse)
    if dense_ckpt.model.to_dict() != sparse_ckpt.model.to_dict():
        raise CheckpointError(f"{pretrained} and {sparse} are checkpoints of different models")
    run_cfg: dict[str, Any] = dict(sparse_ckpt.config.get("run") or {})
    prune = prune or _options(sparse_ckpt.config.get("sparsify"))
    finetune = finetune or _options(sparse_ckpt.config.get("finetune"))
    data_spec = data or run_cfg.get("data") or "digits"
    limit_train = limit_train if limit_train is not None else run_cfg.get("limit_train")
    limit_test = limit_test if limit_test is not None else run_cfg.get("limit_test")
    torch.manual_seed(seed)
    images = load_data(data_spec, limit_train=limit_train, limit_test=limit_test, seed=seed)
    for opts in (prune, finetune):
        check_steps(images, opts, "unstructured training", limit_train=limit_train)
    model = dense_ckpt.build().to(device)
    names = sorted(layer_weights(model))
    targets = nonzero_targets(sparse_ckpt.build().eval(), sparse_ckpt.model.input_shape, names)
    dense = {n: w.numel() for n, w in layer_weights(model).items()}
    # For the record: what one-shot pruning to the targets leaves before any training.
    probe = dense_ckpt.build().to(device)
    with torch.no_grad():
        for n, m in magnitude_masks(probe, targets).items():
            layer_weights(probe)[n].mul_(m)
    pruned = evaluate(probe, images, eval_batch_size, device)
    del probe
    env = D.DistEnv()
    t0 = time.perf_counter()

    # Phase 1: gradual pruning.
    steps_per_epoch = images.num_batches("train", prune.batch_size, drop_last=True)
    total = prune.epochs * steps_per_epoch
    every = max(1, steps_per_epoch // max(1, updates_per_epoch))
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in layer_weights(model).items()}
    state = {"step": 0}
    weights = layer_weights(model)

    @torch.no_grad()
    def after_prune_step() -> None:
        state["step"] += 1
        if state["step"] % every == 0 or state["step"] == total:
            want = {n: pruning_schedule(state["step"], total, dense[n], targets[n]) for n in names}
            masks.update(magnitude_masks(model, want))
        for n in names:
            weights[n].mul_(masks[n])

    _train(model, images, prune, "unstructured pruning", after_prune_step, seed, env, device, eval_batch_size,
           on_event)
    with torch.no_grad():
        masks.update(magnitude_masks(model, targets))  # exactly the targets, whatever the step count
        for n in names:
            weights[n].mul_(masks[n])

    # Phase 2: masked fine-tuning.
    held = MaskSet(model, masks).attach()
    _train(model, images, finetune, "unstructured fine-tuning", held.apply_, seed, env, device, eval_batch_size,
           on_event)
    held.detach()
    accuracy = evaluate(model, images, eval_batch_size, device, phase="unstructured")
    nonzeros = {n: int((w != 0).sum()) for n, w in layer_weights(model).items()}
    report = {"model": dense_ckpt.model.name, "data": images.name, "method": "unstructured",
              "accuracy": {"one_shot_pruned": pruned, "after_finetune": accuracy},
              "nonzeros": nonzeros, "nonzeros_of": str(sparse),
              "epochs": {"pruning": prune.epochs, "finetune": finetune.epochs},
              "wall_time_s": {"total": time.perf_counter() - t0}}
    path = Path(out)
    save_checkpoint(path, Checkpoint("unstructured", dense_ckpt.model, model.state_dict(), masks=held.state(),
                                     config={"pruning": prune.__dict__, "finetune": finetune.__dict__,
                                             "data": data_spec},
                                     metrics={"accuracy": accuracy, "accuracy_one_shot": pruned}, report=report))
    return UnstructuredResult(path, pruned, accuracy, nonzeros)


def _options(stored: Any) -> TrainOptions:
    stored = dict(stored or {})
    return TrainOptions(**{k: v for k, v in stored.items() if k in TrainOptions.__dataclass_fields__})


def _train(model, images, opts: TrainOptions, phase: str, after_step, seed, env, device, eval_batch_size,
           on_event) -> None:
    opt = make_optimizer(model, opts)
    sched = make_schedule(opt, opts, images.num_batches("train", opts.batch_size, drop_last=True))
    for epoch in range(opts.epochs):
        loss, _ = train_epoch(model, model, images, opt, sched, batch_size=opts.batch_size, epoch=epoch,
                              epochs=opts.epochs, phase=phase, seed=seed, env=env, device=device,
                              after_step=after_step, on_event=on_event)
        check_finite_weights(model, phase)
        if on_event is not None:
            on_event(Event(phase, epoch, opts.epochs, loss=loss,
                           accuracy=evaluate(model, images, eval_batch_size, device), end_of_epoch=True))
