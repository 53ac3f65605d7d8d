"""The two commands as library calls: pretrain a dense baseline; SSL (or l1) fine-tuning.

Phases of `run_finetune`: [pretrain when no weights] -> sparsify (group Lasso, exact zeros;
optional budget of MACs and/or parameters, checked every few dozen steps; optional width
alignment) -> freeze zero groups -> fine-tune -> count, report, save. Each
epoch of every phase ends with an atomic resume state in the run folder, holding the run's
options too, so `resume=True` continues an interrupted run from the last finished epoch and
refuses options other than those it started with. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    FinetuneConfig,
    PretrainConfig,
    TrainOptions,
    check_resume_fingerprint,
    resume_fingerprint,
    to_plain,
)
from ..data import ImageData, load_data
from ..errors import (
    CheckpointError,
    SSLCompressError,
    TrainingError,
    UnreachableBudgetError,
    UnsupportedModelError,
    first_line,
)
from ..io import atomic_torch_save, atomic_write_json, run_lock
from ..models import ModelSpec, build_model
from . import distributed as D
from .checkpoint import Checkpoint, expand_tensors, load_failure, load_weights, read_weights, save_checkpoint
from .controller import Budget, BudgetController, check_interval
from .counting import Counter
from .latency_budget import LatencyBudget, latency_budget, resolve_align
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
from .progressive import MIN_SAVING, ProgressiveThinner, compose
from .report import build_report
from .sparsifier import BudgetWatch, Sparsifier
from .thin import ThinPlan, apply_plan, slice_tensors, thin

PRETRAINED = "pretrained.pt"
SPARSE = "sparse.pt"
REPORT = "report.json"
STATE = "state.pt"
DEFAULT_MODEL = "lenet5"
# --importance taylor: the training batches whose gradients score the groups for the one-shot pruning that
# sparsify is compared with (a few seconds on a CIFAR ResNet; sparsify's own steps score its ranking).
ONE_SHOT_TAYLOR_BATCHES = 32


@dataclass(frozen=True)
class RunResult:
    checkpoint: Path
    report: dict[str, Any]
    report_path: Path | None = None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _emit(on_event: EventSink | None, env: D.DistEnv, event: Event) -> None:
    if on_event is not None and env.is_main:
        on_event(event)


def _prepare(run, world_size: int = 1, phases=None) -> tuple[ImageData, ModelSpec, nn.Module, Checkpoint | None, dict | None]:
    """Data, model spec and model (with --weights loaded) for a run.

    ``phases(state)`` lists the (name, options) of the phases to run, given the --weights state (None
    without); each must take at least one optimizer step, refused before the run folder is made.
    """
    if run.threads:
        torch.set_num_threads(run.threads)
    data = load_data(run.data, limit_train=run.limit_train, limit_test=run.limit_test, seed=run.seed)
    state, ckpt = (read_weights(run.weights) if run.weights else (None, None))
    name = run.model or (ckpt.model.name if ckpt else DEFAULT_MODEL)
    if ckpt is not None and run.model and run.model != ckpt.model.name:
        raise CheckpointError(f"{run.weights} is a checkpoint of {ckpt.model.name}, not of {run.model}")
    spec = ModelSpec(name, num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.image_size)
    if ckpt is not None and (ckpt.model.num_classes, ckpt.model.in_channels) != (spec.num_classes, spec.in_channels):
        raise CheckpointError(
            f"{run.weights} was trained for {ckpt.model.num_classes} classes and {ckpt.model.in_channels} input "
            f"channel(s); {data.name} has {spec.num_classes} and {spec.in_channels}")
    model = build_model(spec).to(run.device)
    if state is not None:
        load_weights(model, state, source=str(run.weights))
    check_trainable(model, spec, run.device)
    for name, opts in (phases(state) if phases is not None else []):
        check_steps(data, opts, name, world_size=world_size, limit_train=run.limit_train)
    # Before any training: a run folder that cannot be made should fail now, not after an hour.
    Path(run.out).mkdir(parents=True, exist_ok=True)
    return data, spec, model, ckpt, state


def check_trainable(model: nn.Module, spec: ModelSpec, device: str) -> None:
    """A model training can work on: it has parameters that learn, and it maps a batch of the data's images to
    one score per class. A user's model that does not would otherwise fail deep in the first step."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedModelError(f"model {spec.name} has no trainable parameters (none, or all with "
                                    "requires_grad=False): there is nothing to train")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *spec.input_shape[1:]), device=device))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is theirs to see, in one line
        first = first_line(exc)
        raise UnsupportedModelError(f"model {spec.name} cannot run on the data's images (a batch of shape "
                                    f"2x{'x'.join(map(str, spec.input_shape[1:]))}): {first}") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModelError(f"model {spec.name} must give one score per class, shape (batch, "
                                    f"{spec.num_classes}), for the data's images; it gives {got}")


def _train_phase(model, data, opts: TrainOptions, phase: str, run, env, on_event, *, start_epoch=0,
                 opt=None, sched=None, extra_loss=None, after_step=None, end_epoch=None, save_state=None):
    """Runs epochs [start_epoch, opts.epochs); `end_epoch(epoch, loss, acc)` may return True to stop."""
    if start_epoch < opts.epochs:
        check_steps(data, opts, phase, world_size=env.world_size, limit_train=run.limit_train)
    trained = D.wrap(model, env, run.device)
    if opt is None:
        opt = make_optimizer(model, opts)
        sched = make_schedule(opt, opts, data.num_batches("train", opts.batch_size, world_size=env.world_size,
                                                          drop_last=True))
    for epoch in range(start_epoch, opts.epochs):
        loss, acc = train_epoch(model, trained, data, opt, sched, batch_size=opts.batch_size, epoch=epoch,
                                epochs=opts.epochs, phase=phase, seed=run.seed, env=env, device=run.device,
                                extra_loss=extra_loss, after_step=after_step,
                                on_event=(lambda e: _emit(on_event, env, e)))
        check_finite_weights(model, phase)  # before the epoch's evaluation and resume state
        stop = bool(end_epoch(epoch, loss, acc)) if end_epoch is not None else False
        if save_state is not None:
            save_state(epoch, opt, sched, stop)
        if stop:
            break
    return opt, sched


def _hold(out: str, env: D.DistEnv):
    """The run folder, held by rank 0 against a second run into it."""
    return run_lock(out) if env.is_main else contextlib.nullcontext()


def run_pretrain(cfg: PretrainConfig, on_event: EventSink | None = None) -> RunResult:
    """Train a dense baseline and write `<out>/pretrained.pt`; `resume=True` continues an interrupted one."""
    cfg.check()
    env = D.init_from_env(cfg.run.device)
    owns_state = [False]
    try:
        with _hold(cfg.run.out, env):
            _seed_everything(cfg.run.seed)
            try:
                return _pretrain_run(cfg, env, on_event, owns_state)
            except SSLCompressError:
                if owns_state[0] and env.is_main:  # as in run_finetune: a refusal would only come back
                    (Path(cfg.run.out) / STATE).unlink(missing_ok=True)
                raise
    finally:
        D.shutdown(env)


def _resume_state(cfg: PretrainConfig | FinetuneConfig, command: str) -> tuple[dict | None, dict[str, Any]]:
    """The resume state `cfg.resume` asks for (checked against the options given) and this run's fingerprint.

    A changed option is refused before any data is loaded or model built.
    """
    out = Path(cfg.run.out)
    fingerprint = resume_fingerprint(cfg)
    if not cfg.resume:
        return None, fingerprint
    resume = _load_state(out / STATE)
    if resume is None:
        raise CheckpointError(f"--resume: no resume state in {out} (nothing to continue)")
    written_by = resume.get("command", "finetune")  # states without the key come from finetune
    if written_by != command:
        raise CheckpointError(f"--resume: the resume state in {out} is of an interrupted `{written_by}` run; "
                              f"continue it with `sslcompress {written_by} --out {out} --resume`")
    check_resume_fingerprint(resume["config"], fingerprint, str(out / STATE))
    return resume, fingerprint


def _state_saver(command: str, phase: str, spec: ModelSpec, model: nn.Module, fingerprint: dict[str, Any],
                 env: D.DistEnv, out: Path, owns_state: list[bool], extra=lambda: {}):
    """The end-of-epoch hook that writes the resume state (rank 0), atomically."""
    def save(epoch, opt, sched, stop):
        owns_state[0] = True
        if env.is_main:
            atomic_torch_save({"command": command, "phase": phase, "epoch": epoch, "stop": stop,
                               "model": spec.to_dict(), "config": fingerprint, "model_state": model.state_dict(),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "lambdas": {}, "metrics": {}, "masks": {}, **extra()}, out / STATE)
    return save


def _pretrain_run(cfg: PretrainConfig, env: D.DistEnv, on_event: EventSink | None, owns_state: list[bool]
                  ) -> RunResult:
    out = Path(cfg.run.out)
    resume, fingerprint = _resume_state(cfg, "pretrain")
    data, spec, model, _, _ = _prepare(cfg.run, env.world_size, lambda _state: [("pretrain", cfg.train)])
    start, opt, sched = 0, None, None
    if resume is not None:
        if resume["model"] != spec.to_dict():
            raise CheckpointError(f"--resume: {out / STATE} belongs to another model or data set")
        load_weights(model, resume["model_state"], source=str(out / STATE))
        owns_state[0] = True
        start = resume["epoch"] + 1
        opt, sched = _restore_optimizer(model, cfg.train, data, env, resume)
    result = _pretrain(model, spec, data, cfg.train, cfg.run, env, on_event, to_plain(cfg), start_epoch=start,
                       opt=opt, sched=sched,
                       save_state=_state_saver("pretrain", "pretrain", spec, model, fingerprint, env, out, owns_state))
    if env.is_main:
        (out / STATE).unlink(missing_ok=True)
    D.barrier(env)
    return result


def _pretrain(model, spec, data, opts, run, env, on_event, config_plain, *, start_epoch=0, opt=None, sched=None,
              save_state=None) -> RunResult:
    t0 = time.perf_counter()

    def end_epoch(epoch, loss, acc):
        test_acc = evaluate(model, data, run.eval_batch_size, run.device, phase="pretrain")
        _emit(on_event, env, Event("pretrain", epoch, opts.epochs, loss=loss, accuracy=test_acc, end_of_epoch=True))

    _train_phase(model, data, opts, "pretrain", run, env, on_event, start_epoch=start_epoch, opt=opt, sched=sched,
                 end_epoch=end_epoch, save_state=save_state)
    acc = evaluate(model, data, run.eval_batch_size, run.device, phase="pretrain")
    counted = Counter(model, spec.input_shape).count()
    report = build_report(spec, data.name, counted, {"pretrained": acc}, method="dense", groups=None,
                          extra={"wall_time_s": {"pretrain": time.perf_counter() - t0},
                                 "world_size": env.world_size, "ranks_in_sync": D.ranks_agree(model, env)})
    path = Path(run.out) / PRETRAINED
    if env.is_main:
        save_checkpoint(path, Checkpoint("pretrained", spec, model.state_dict(), config=config_plain,
                                         metrics={"accuracy": acc}, report=report))
    D.barrier(env)
    return RunResult(path, report)


def run_finetune(cfg: FinetuneConfig, on_event: EventSink | None = None) -> RunResult:
    """SSL on a pretrained model; writes `<out>/sparse.pt` and `<out>/report.json`."""
    cfg.check()
    cfg, step = resolve_align(cfg)  # before the resume fingerprint: a resumed `auto` resolves the same
    env = D.init_from_env(cfg.run.device)
    if step is not None:
        _emit(on_event, env, Event("info", message=f"--align auto: {step.describe()}"))
    owns_state = [False]  # set once the resume state in the folder is this run's own
    try:
        with _hold(cfg.run.out, env):
            _seed_everything(cfg.run.seed)
            try:
                return _finetune(cfg, env, on_event, owns_state)
            except SSLCompressError as exc:
                # A refusal after training began would come back on --resume (its options cannot change), so
                # its resume state goes; an interruption (Ctrl-C, a kill) keeps it.
                if owns_state[0] and env.is_main:
                    (Path(cfg.run.out) / STATE).unlink(missing_ok=True)
                    baseline = Path(cfg.run.out) / PRETRAINED
                    if cfg.run.weights is None and baseline.is_file():
                        raise type(exc)(f"{exc}; the dense baseline it trained first is kept in {baseline}: "
                                        "give it as --weights to start from there") from exc
                raise
    finally:
        D.shutdown(env)


@dataclass
class _FinetuneRun:
    """What the phases of one finetune run share; each phase reads it and leaves its results in it."""

    cfg: FinetuneConfig
    env: D.DistEnv
    on_event: EventSink | None
    owns_state: list[bool]
    fingerprint: dict[str, Any]
    resume: dict | None  # the resume state while the phase it names has not finished; None after
    data: ImageData
    spec: ModelSpec
    model: nn.Module
    weights_given: bool
    t_start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    masks_state: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: ThinPlan | None = None  # once fine-tuning runs on the thinned model
    sp: Sparsifier | None = None
    budget: Budget | None = None
    steps: int = 0  # sparsify steps per epoch
    counted: Any = None  # the count before thinning, in the model's own architecture
    reached: dict[str, float] = field(default_factory=dict)
    widths: Any = None
    dense_totals: tuple[int, int] = (1, 1)  # MACs and parameters of the dense model in its own architecture
    controllers: dict[str, BudgetController] = field(default_factory=dict)
    latency: LatencyBudget | None = None  # with --target-latency: the table's prediction of the dense model

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.out)

    def emit(self, event: Event) -> None:
        _emit(self.on_event, self.env, event)

    def resumes(self, phase: str) -> bool:
        return self.resume is not None and self.resume["phase"] == phase

    def saver(self, phase: str):
        return _state_saver("finetune", phase, self.spec, self.model, self.fingerprint, self.env, self.out,
                            self.owns_state,
                            lambda: {"lambdas": dict(self.sp.lambdas) if self.sp is not None else {},
                                     "metrics": self.metrics, "masks": self.masks_state,
                                     "thin": self.plan.to_dict() if self.plan is not None else {}})


def _finetune(cfg: FinetuneConfig, env: D.DistEnv, on_event: EventSink | None, owns_state: list[bool]
              ) -> RunResult:
    """pretrain (without --weights) -> sparsify -> thin -> fine-tune -> report, each resumable."""
    r = _start(cfg, env, on_event, owns_state)
    if not r.weights_given and (r.resume is None or r.resumes("pretrain")):
        _pretrain_phase(r)
    if "before" not in r.metrics:
        r.metrics["before"] = evaluate(r.model, r.data, cfg.run.eval_batch_size, cfg.run.device)
    _sparsify_phase(r)
    masks = _thin_phase(r)
    mask_set = _finetune_phase(r, masks)
    return _finish(r, mask_set)


def _start(cfg: FinetuneConfig, env: D.DistEnv, on_event: EventSink | None, owns_state: list[bool]
           ) -> _FinetuneRun:
    """Options checked against a resume state, data and model prepared, the resumed weights loaded."""
    def phases(state):  # pretraining only without --weights (a resumed pretraining checks its own steps)
        first = [("pretrain", cfg.pretrain)] if state is None and not cfg.resume else []
        return [*first, ("sparsify", cfg.sparsify), ("finetune", cfg.finetune)]

    resume, fingerprint = _resume_state(cfg, "finetune")
    data, spec, model, _, state = _prepare(cfg.run, env.world_size, phases)
    r = _FinetuneRun(cfg, env, on_event, owns_state, fingerprint, resume, data, spec, model, state is not None)
    # The latency table is read for the dense architecture, which pretraining does not change: a missing or
    # foreign table is one sentence before any training, not after the baseline.
    r.latency = latency_budget(cfg, model, spec.input_shape, spec.name)
    if resume is not None:
        if resume["model"] != spec.to_dict():
            raise CheckpointError(f"--resume: {r.out / STATE} belongs to another model or data set")
        if resume.get("thin"):
            # Fine-tuning was running thinned: the model in its own architecture first (for the counts), thinned
            # again where fine-tuning starts.
            r.plan = ThinPlan.from_dict(resume["thin"])
            load_weights(model, expand_tensors(resume["model_state"], r.plan), source=str(r.out / STATE))
        else:
            load_weights(model, resume["model_state"], source=str(r.out / STATE))
        owns_state[0] = True
        r.metrics = dict(resume["metrics"])
    return r


def _pretrain_phase(r: _FinetuneRun) -> None:
    cfg = r.cfg
    start, opt, sched = 0, None, None
    if r.resume is None:
        r.emit(Event("info", message=f"no --weights given: pretraining a dense {r.spec.name} baseline on "
                                     f"{r.data.name} first"))
    else:
        start = r.resume["epoch"] + 1
        opt, sched = _restore_optimizer(r.model, cfg.pretrain, r.data, r.env, r.resume)
    t0 = time.perf_counter()
    pre = _pretrain(r.model, r.spec, r.data, cfg.pretrain, cfg.run, r.env, r.on_event, to_plain(cfg),
                    start_epoch=start, opt=opt, sched=sched, save_state=r.saver("pretrain"))
    r.timings["pretrain"] = time.perf_counter() - t0
    r.emit(Event("info", message=f"pretrained baseline written to {pre.checkpoint}"))
    r.resume = None


def _sparsify_phase(r: _FinetuneRun) -> None:
    """The regulariser and its budget; the sparsify epochs (unless resumed past them), the model thinned as
    channels die; the budget landed."""
    _setup_sparsify(r)
    if r.resume is not None and not r.resumes("sparsify"):
        return  # resumed in fine-tuning: sparsify finished before the interruption
    if r.resume is not None and r.plan is not None:
        _rethin(r)  # the interrupted sparsify had thinned the model
    t0 = time.perf_counter()
    if not (r.resume and r.resume["stop"]):
        _SparsifyEpochs(r).run()
    _land(r)
    r.timings["sparsify"] = time.perf_counter() - t0
    r.resume = None


def _setup_sparsify(r: _FinetuneRun) -> None:
    """The sparsifier over the model in its own architecture, the budget and its controllers, one-shot
    pruning beside it, and the lambdas a resumed run had reached."""
    run = r.cfg.run
    r.sp = Sparsifier(r.model, r.spec, r.cfg, latency=r.latency)
    r.dense_totals = r.sp.dense_totals()
    if r.resume is None and not r.sp.connected():  # no strength is to blame here: the weights came that way
        source = f"the weights of {run.weights}" if run.weights else "the model"
        raise TrainingError(f"{source} already compute a constant before sparsify (every channel of some layer "
                            "is zero, so the output does not depend on the input); give weights whose every "
                            "layer has a nonzero channel")
    r.budget, r.controllers = _budget(r)
    if r.budget is not None and r.resume is None:
        _one_shot(r)
    r.steps = r.data.num_batches("train", r.cfg.sparsify.batch_size, world_size=r.env.world_size, drop_last=True)
    if r.resume:
        r.sp.lambdas = dict(r.resume["lambdas"])


class _SparsifyEpochs:
    """The sparsify epochs: proximal steps, the budget watched, the model thinned as channels die."""

    def __init__(self, r: _FinetuneRun):
        self.r, cfg = r, r.cfg
        self.start, self.opt, self.sched = 0, None, None
        if r.resume:
            self.start = r.resume["epoch"] + 1
            self.opt, self.sched = _restore_optimizer(r.model, cfg.sparsify, r.data, r.env, r.resume)
        else:
            self.opt = make_optimizer(r.model, cfg.sparsify)
            self.sched = make_schedule(self.opt, cfg.sparsify, r.steps)
        self.watch = None
        if r.budget is not None and self.start < cfg.sparsify.epochs:
            self.watch = BudgetWatch(r.sp, r.budget, r.controllers, steps_per_epoch=r.steps,
                                     every=cfg.budget_every, align=cfg.align, epoch=self.start, pace=cfg.pace)
        self.thinner = _thinner(r)
        self.step = r.sp.after_step(self.opt)

    def run(self) -> None:
        r = self.r
        penalty = r.sp.extra_loss()
        # The penalty of whichever sparsifier is current: thinning replaces it mid-phase.
        extra_loss = (lambda: r.sp.extra_loss()()) if penalty is not None else None
        _train_phase(r.model, r.data, r.cfg.sparsify, "sparsify", r.cfg.run, r.env, r.on_event,
                     start_epoch=self.start, opt=self.opt, sched=self.sched, extra_loss=extra_loss,
                     after_step=self.after_step, end_epoch=self.end_epoch, save_state=r.saver("sparsify"))
        if self.thinner is not None and self.thinner.count:
            r.metrics["thinned_in_sparsify"] = self.thinner.count

    def tell(self) -> None:
        for message in (self.watch.take_messages() if self.watch is not None else []):
            self.r.emit(Event("info", message=message))

    def after_step(self) -> None:
        watch = self.watch
        if watch is None or not watch.holding:
            self.step()
        if watch is not None:
            watch.after_step()
            self.tell()
            if watch.checked:  # the weights a check just kept: thinning here leaves its copy valid
                watch.checked = False
                self.thin(MIN_SAVING)

    def end_epoch(self, epoch: int, loss: float, acc: float) -> bool:
        r, watch, run = self.r, self.watch, self.r.cfg.run
        stop = watch.end_epoch() if watch is not None else False
        if watch is not None:
            watch.checked = False  # the epoch's last check: the next epoch's first steps are not at a check
        self.tell()
        if not stop and epoch + 1 < r.cfg.sparsify.epochs:
            self.thin(0.0)  # before the resume state: a resumed run starts from the same thinned model
        test_acc = evaluate(r.model, r.data, run.eval_batch_size, run.device, phase="sparsify")
        r.emit(Event("sparsify", epoch, r.cfg.sparsify.epochs, loss=loss, accuracy=test_acc,
                     macs_fraction=r.sp.macs_fraction(), zero_groups=r.sp.zero_fraction(),
                     lambdas=dict(r.sp.lambdas), end_of_epoch=True))
        if watch is not None:
            r.metrics["forced_groups"] = r.metrics.get("forced_groups", 0) + watch.forced
            r.metrics["paced_groups"] = r.metrics.get("paced_groups", 0) + watch.paced
            watch.forced = watch.paced = 0
            if watch.met_at is not None:
                r.metrics["budget_met_at"] = dict(watch.met_at)
        return stop

    def thin(self, min_saving: float) -> None:
        """Thin the model when the channels dead now take `min_saving` of its MACs (any, at 0)."""
        r, thinner = self.r, self.thinner
        if thinner is None or not thinner.worth_it(r.sp, min_saving):
            return
        done = thinner.thin(r.sp, self.opt)
        if done is None:
            r.emit(Event("info", message=f"sparsify goes on with the full model: {thinner.failed}"))
            return
        r.sp, r.plan = done.sparsifier, thinner.plan
        self.step = r.sp.after_step(self.opt)
        if self.watch is not None:
            self.watch.rebind(r.sp)
        r.emit(Event("info", message=f"sparsify thinned the model: {done.params_before} -> {done.params_after} "
                                     f"parameters; {done.summary}"))


def _thinner(r: _FinetuneRun) -> ProgressiveThinner | None:
    """Thinning during sparsify, unless thinning is off, the method is l1 (no channel dies whole), or DDP runs
    (its wrapper holds the parameters it was built with until the phase ends)."""
    if not (r.cfg.thin and r.cfg.method == "ssl") or r.env.world_size > 1:
        return None
    return ProgressiveThinner(r.spec, r.cfg, r.dense_totals, r.plan, latency=r.latency)


def _rethin(r: _FinetuneRun) -> None:
    """A resumed sparsify whose model was thinned: the full model (loaded by _start) cut to the plan again and
    the resumed weights loaded into it, with a sparsifier of the thinned model."""
    lambdas = r.sp.lambdas
    floors = r.sp.min_widths  # found on the full model, before thinning changes it under that sparsifier
    apply_plan(r.model, r.plan)
    load_weights(r.model, r.resume["model_state"], source=str(r.out / STATE))
    r.sp = Sparsifier(r.model, r.spec, r.cfg, reference=r.dense_totals, latency=r.latency, min_widths=floors)
    r.sp.lambdas = lambdas


def _budget(r: _FinetuneRun) -> tuple[Budget | None, dict[str, BudgetController]]:
    """The budget the options ask for, refused when the structures cannot reach it, and its controllers."""
    cfg, sp = r.cfg, r.sp
    targets = cfg.targets()
    if r.latency is not None and cfg.target_latency is not None:  # --weighting latency reads the table too
        targets["latency"] = cfg.target_latency / r.latency.dense_ms
    budget = r.budget = Budget(targets) if targets else None
    controllers: dict[str, BudgetController] = {}
    if budget is None:
        return None, controllers
    floors = sp.floors()
    names = {"macs": ("FLOPs", "MACs"), "params": ("parameters", "parameters"),
             "latency": ("latency", "predicted latency")}
    for metric, target in budget.targets.items():
        if target < floors[metric]:
            asked, what = names[metric]
            kept = (f" and each width that carries the network kept at --min-keep {cfg.min_keep:g}"
                    if sp.min_widths else "")
            raise UnreachableBudgetError(f"target {asked} {target:.3f} is impossible: with structures "
                              f"{', '.join(cfg.structures)}{kept} at most {1 - floors[metric]:.1%} of the "
                              f"{what} can be removed")
        controllers[metric] = BudgetController(target, cfg.sparsify.epochs, start=dict(sp.lambdas))
    return budget, controllers


def _one_shot(r: _FinetuneRun) -> None:
    """What pruning the starting weights to the same budget in one shot gives (the weakest groups as the ranking
    scores them zeroed, no training; with --importance taylor, scored from a few training batches' gradients):
    the accuracy sparsify has to beat, recorded beside its own.

    It is also the budget's reachability, found before any training: the ranking tries every removable group
    and keeps each that leaves the network connected, so where it finds no connected model inside the budget
    the landing at the end of sparsify, the same ranking on the trained weights, finds none either."""
    probe = copy.deepcopy(r.model)
    try:
        probe_sp = Sparsifier(probe, r.spec, r.cfg, latency=r.latency, min_widths=r.sp.min_widths)
        if r.cfg.importance == "taylor" and probe_sp.lasso is not None:
            _observe_taylor(probe, probe_sp, r)
        probe_sp.enforce(r.budget, r.cfg.align)
    except TrainingError as exc:
        step = f", with widths in steps of {r.cfg.align} (--align)" if (r.cfg.align or 1) > 1 else ""
        raise UnreachableBudgetError(f"{exc}{step}; refused before sparsify: ask for a looser target"
                          + (" or a smaller --align" if step else "")) from exc
    r.metrics["one_shot"] = evaluate(probe, r.data, r.cfg.run.eval_batch_size, r.cfg.run.device)


def _observe_taylor(model: nn.Module, sp: Sparsifier, r: _FinetuneRun) -> None:
    """Taylor scores for a one-shot ranking: the gradients of ONE_SHOT_TAYLOR_BATCHES training batches (the
    same on every rank) folded in as sparsify's steps fold theirs, the weights and batch-norm statistics left
    as they were."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was = model.training
    model.train()
    device = r.cfg.run.device
    batches = r.data.batches("train", r.cfg.sparsify.batch_size, shuffle=True, seed=r.cfg.run.seed, drop_last=True)
    for _, (x, y) in zip(range(ONE_SHOT_TAYLOR_BATCHES), batches):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        sp.observe()
    model.zero_grad(set_to_none=True)
    model.train(was)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])


def _land(r: _FinetuneRun) -> None:
    """After the sparsify epochs: widths aligned, the budget met by ranking, the network still connected."""
    cfg, run, sp, metrics = r.cfg, r.cfg.run, r.sp, r.metrics
    forced = sp.align_down(cfg.align)
    if r.budget is not None and not r.budget.met(sp.fractions()):
        zeroed = sp.enforce(r.budget, cfg.align)
        forced += zeroed
        r.emit(Event("info", message=f"budget not met by lambda alone: zeroed the {zeroed} weakest removable "
                                     "groups"))
    if not sp.connected():
        raise TrainingError(
            "sparsify cut the network: every channel of some layer is zero, so the output no longer "
            "depends on the input; lower the strength (--strength/--lambda) or set --target-flops")
    metrics["forced_groups"] = metrics.get("forced_groups", 0) + forced
    metrics["after_sparsify"] = evaluate(r.model, r.data, run.eval_batch_size, run.device, phase="sparsify")
    metrics["macs_fraction_after_sparsify"] = sp.macs_fraction()
    metrics["fractions_after_sparsify"] = sp.fractions()


def _thin_phase(r: _FinetuneRun) -> dict[str, torch.Tensor]:
    """The counts (before thinning, in the model's own architecture: fine-tuning never revives a masked zero,
    so they hold for the final model too), then the masks, with the model thinned where it can be."""
    cfg, live = r.cfg, r.sp
    if r.plan is not None and r.resume is None:
        r.sp = _full_sparsifier(r)  # sparsify thinned the model: count and report in its own architecture
    sp = r.sp
    r.counted, r.reached = sp.counter.count(), sp.fractions()
    r.widths = sp.widths(cfg.align) if (cfg.align or 1) > 1 else None
    if r.resume and r.plan is not None:
        apply_plan(r.model, r.plan)
        load_weights(r.model, r.resume["model_state"], source=str(r.out / STATE))
        return dict(r.resume["masks"])
    masks = dict(r.resume["masks"]) if r.resume and r.resume.get("masks") else live.masks()
    if cfg.thin and cfg.method == "ssl" and r.resume is None:
        masks = _thin(r, masks)
    return masks


def _full_sparsifier(r: _FinetuneRun) -> Sparsifier:
    """A sparsifier over the model in its own architecture holding the thinned model's weights (zeros where
    thinning cut), for the counts and the report."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the run's random stream stays
        full = build_model(r.spec)
    full = full.to(next(r.model.parameters()).device)
    load_weights(full, expand_tensors(r.model.state_dict(), r.plan), source="the thinned model")
    sp = Sparsifier(full, r.spec, r.cfg, latency=r.latency, min_widths=r.sp.min_widths)
    sp.lambdas = dict(r.sp.lambdas)
    return sp


def _finetune_phase(r: _FinetuneRun, masks: dict[str, torch.Tensor]) -> MaskSet:
    cfg, run, model, data = r.cfg, r.cfg.run, r.model, r.data
    t0 = time.perf_counter()
    r.masks_state.clear()
    r.masks_state.update(masks)
    mask_set = MaskSet(model, masks).attach()
    resume = r.resume
    start = resume["epoch"] + 1 if resume else 0
    opt = sched = None
    if resume:
        opt, sched = _restore_optimizer(model, cfg.finetune, data, r.env, resume)
    fraction = r.counted.macs_after / max(1, r.counted.macs)

    def end_finetune(epoch, loss, acc):
        test_acc = evaluate(model, data, run.eval_batch_size, run.device, phase="finetune")
        r.emit(Event("finetune", epoch, cfg.finetune.epochs, loss=loss, accuracy=test_acc, macs_fraction=fraction,
                     end_of_epoch=True))

    if not (resume and resume["stop"]):
        _train_phase(model, data, cfg.finetune, "finetune", run, r.env, r.on_event, start_epoch=start, opt=opt,
                     sched=sched, after_step=mask_set.apply_, end_epoch=end_finetune, save_state=r.saver("finetune"))
    mask_set.detach()
    r.timings["finetune"] = time.perf_counter() - t0
    r.metrics["after_finetune"] = evaluate(model, data, run.eval_batch_size, run.device, phase="finetune")
    return mask_set


def _finish(r: _FinetuneRun, mask_set: MaskSet) -> RunResult:
    """The report, the checkpoint (the thinned weights and their plan) and report.json, by rank 0."""
    cfg, env, sp, metrics, budget = r.cfg, r.env, r.sp, r.metrics, r.budget
    in_sync = D.ranks_agree(r.model, env)
    if not in_sync:
        raise RuntimeError("ranks ended with different weights; the run is not reproducible")
    r.timings["total"] = time.perf_counter() - r.t_start
    budget_row = None
    if budget is not None:
        budget_row = {m: {"asked": budget.targets.get(m), "reached": r.reached[m]} for m in r.reached}
        budget_row.update({"measure": "gemm macs" if "shape" in cfg.structures else "macs",
                           "tolerance": budget.tolerance, "met_at": metrics.get("budget_met_at"),
                           "pace": cfg.pace, "paced_groups": metrics.get("paced_groups", 0),
                           "checked_every": check_interval(r.steps, cfg.budget_every)})
    report = build_report(
        r.spec, r.data.name, r.counted,
        {"before": metrics["before"], "one_shot_same_budget": metrics.get("one_shot"),
         "after_sparsify": metrics.get("after_sparsify"), "after_finetune": metrics["after_finetune"]},
        method=cfg.method, groups=sp.lasso,
        extra={"structures": list(cfg.structures), "lambdas": dict(sp.lambdas), "solver": cfg.solver,
               "weighting": cfg.weighting, "target_flops": cfg.target_flops, "target_params": cfg.target_params,
               "budget": budget_row, "align": cfg.align, "widths": r.widths, "thinned": metrics.get("thinned"),
               "min_keep": cfg.min_keep if cfg.method == "ssl" else None,
               "min_widths": sp.floor_widths() if sp.lasso is not None else None,
               "importance": cfg.importance if cfg.method == "ssl" else None,
               "latency": _latency_row(r),
               "forced_groups": metrics.get("forced_groups", 0), "masked_weights": mask_set.zeros,
               "wall_time_s": r.timings, "world_size": env.world_size, "ranks_in_sync": in_sync,
               "weight_sparsity": sp.zero_fraction() if cfg.method == "l1" else None},
    )
    path = r.out / SPARSE
    if env.is_main:
        save_checkpoint(path, Checkpoint("sparse", r.spec, r.model.state_dict(), masks=mask_set.state(),
                                         config=to_plain(cfg), metrics=metrics, report=report,
                                         thin=r.plan.to_dict() if r.plan is not None else {}))
        atomic_write_json(report, r.out / REPORT)
        (r.out / STATE).unlink(missing_ok=True)
    D.barrier(env)
    return RunResult(path, report, r.out / REPORT)


def _latency_row(r: _FinetuneRun) -> dict[str, Any] | None:
    """With --target-latency: what the table predicts for the dense model and for the one the count keeps."""
    if r.latency is None or r.cfg.target_latency is None:
        return None
    cfg = r.cfg
    return {"asked_ms": cfg.target_latency, "dense_ms": r.latency.dense_ms, "predicted_ms": r.latency.ms(r.counted),
            "table": r.latency.path, "provider": cfg.latency_provider, "threads": cfg.latency_threads,
            "batch": cfg.latency_batch, "table_key": r.latency.table.key.to_dict()}


def _thin(r: _FinetuneRun, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice the zero channels out of the model before fine-tuning; returns the masks cut the same way.

    Checked in `thin`: the thinned model must give the masked model's outputs, else it stays as it was and
    the run says why (fine-tuning then runs on the model sparsify left, as it would with --no-thin).
    """
    earlier = r.plan  # what sparsify already thinned
    result = thin(r.model, r.spec.input_shape)
    if not result.applied and earlier is None:
        r.metrics["thinned"] = {"applied": False, "reason": result.reason}
        r.emit(Event("info", message=f"fine-tuning the full model: {result.reason}"))
        return masks
    if result.applied:
        r.plan = compose(earlier, result.plan) if earlier is not None else result.plan
        masks = slice_tensors(masks, result.plan)
    else:
        r.emit(Event("info", message=f"thinning after sparsify left the model as sparsify did: {result.reason}"))
    params_before = r.dense_totals[1] if earlier is not None else result.params_before
    params_after = sum(p.numel() for p in r.model.parameters())
    r.metrics["thinned"] = {"applied": True, "params_before": params_before, "params_after": params_after,
                            "summary": r.plan.summary(),
                            "during_sparsify": r.metrics.get("thinned_in_sparsify", 0)}
    r.emit(Event("info", message=f"fine-tuning the thinned model: {params_before} -> {params_after} parameters; "
                                 f"{r.plan.summary()}"))
    return masks


def _restore_optimizer(model, opts, data, env, resume):
    opt = make_optimizer(model, opts)
    sched = make_schedule(opt, opts, data.num_batches("train", opts.batch_size, world_size=env.world_size,
                                                      drop_last=True))
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    return opt, sched


def _load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError("resume state: " + load_failure(path, exc, "a readable resume state")) from exc
    missing = [k for k in _STATE_KEYS if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise CheckpointError(f"resume state {path} lacks {', '.join(missing)} (damaged, or written by an older "
                              "sslcompress); start over without --resume")
    if raw["phase"] not in ("pretrain", "sparsify", "finetune"):
        raise CheckpointError(f"resume state {path} names an unknown phase {raw['phase']!r}")
    return raw


_STATE_KEYS = ("phase", "epoch", "stop", "model", "config", "model_state", "optimizer", "scheduler", "lambdas",
               "metrics", "masks")


def checkpoint_report(ckpt: Checkpoint) -> dict[str, Any]:
    """The stored report, or one computed from the weights for checkpoints saved through the API."""
    if ckpt.report:
        return ckpt.report
    model = ckpt.build()
    counted = Counter(model, ckpt.model.input_shape).count()
    return build_report(ckpt.model, "(not recorded)", counted, {}, method=ckpt.kind, groups=None,
                        extra={"masked_weights": int(sum(int((~m).sum()) for m in ckpt.masks.values()))})
