"""One bench run: build the variants, measure what they are, time them, study their layers."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ConfigError
from ..io import atomic_write_group, private_temp_dir
from ..runtime.providers import PROVIDERS, check_provider, probe_cuda
from ..runtime.sessions import SESSION_CONFIG
from ..runtime.timing import CI_LEVEL, Timing, interleaved, timings
from .config import DEFAULT_BATCHES, BenchConfig
from .results import UNSTRUCTURED_NOTE, BenchResult, VariantInfo
from .variants import (
    Variant,
    VariantSet,
    build_variants,
    image_input,
    input_shape,
    layer_nonzeros,
    nonzero_weights,
    random_feed,
    require_image_input,
)


@dataclass(frozen=True)
class BenchEvent:
    """Progress: a stage, what it is doing, and how far it is (total None: unknown)."""

    stage: str  # build, memory, accuracy, time, layers, paper
    message: str
    done: int = 0
    total: int | None = None


Listener = Callable[[BenchEvent], None]


def check_config(config: BenchConfig) -> None:
    """Everything that can fail before any work: providers (a CUDA session is started once)."""
    for p in config.providers:
        if p not in PROVIDERS:
            raise ConfigError(f"unknown --provider {p!r}; choose from {', '.join(PROVIDERS)}")
        check_provider(p)
    if "cuda" in config.providers:
        probe_cuda()
    from .paper import cpus

    if "cpu" in config.providers and max(config.threads) > cpus():
        # More ORT workers than CPUs time the scheduler's sharing, not the model.
        raise ConfigError(f"--threads {max(config.threads)} is more than the {cpus()} CPU(s) this process may use")


def _env() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from ..runtime.cpu import cpu_isa, cpu_model
    from .paper import cpus

    return {"onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_isa": list(cpu_isa()), "cpus": cpus(),
            # The GPU a CUDA run's figures belong to (torch's view; ORT's CUDA EP runs on device 0 as well).
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _batches(config: BenchConfig, variants: VariantSet) -> tuple[int, ...]:
    static = {v.name: (input_shape(v.model) or (None,))[0] for v in variants}
    fixed = {n: b for n, b in static.items() if b is not None}
    if config.batches is None:
        if not fixed:
            return DEFAULT_BATCHES
        if len(set(fixed.values())) > 1:
            raise ConfigError("the variants have different static batch sizes: "
                              + ", ".join(f"{n} {b}" for n, b in fixed.items()))
        return (next(iter(fixed.values())),)
    for n, b in fixed.items():
        bad = [x for x in config.batches if x != b]
        if bad:
            raise ConfigError(f"the {n} model takes batches of exactly {b} images, not {bad[0]}; use --batch {b}"
                              " or export it with a dynamic batch (export --dynamic-batch)")
    return tuple(dict.fromkeys(config.batches))


def _static_info(variants: VariantSet, files: dict[str, Path]) -> dict[str, VariantInfo]:
    from ..surgery.measure import layers, parameters
    from ..surgery.units import transformer_units

    out = {}
    for v in variants:
        out[v.name] = VariantInfo(
            name=v.name, source=v.source, input_shape=input_shape(v.model), file_bytes=files[v.name].stat().st_size,
            macs=int(sum(lay.macs for lay in layers(v.model))), parameters=parameters(v.model),
            nonzero_weights=nonzero_weights(v.model), layer_nonzeros=layer_nonzeros(v.model),
            units=transformer_units(_float_model(variants, v)).to_dict())
    return out


def _float_model(variants: VariantSet, v: Variant) -> onnx.ModelProto:
    """The model whose attention heads and MLP neurons `v` computes: an INT8 variant's float model, since
    quantizing changes no width, while the QDQ pairs between an MLP's two layers hide it from the search."""
    return variants.get(v.quantized_from).model if v.quantized_from else v.model


def run_bench(config: BenchConfig, on_event: Listener | None = None, *, write_models: bool = True) -> BenchResult:
    """Run what `config` asks for; `on_event` hears progress. Never prints.

    With `config.models_dir`, the ONNX variants are written there at the end, all or none; with
    `write_models=False` they are only kept in `result.models`, for a caller that writes them together with
    its other outputs.
    """
    emit = on_event or (lambda _e: None)
    check_config(config)
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    env = _env()
    notes: list[str] = []
    infos: dict[str, VariantInfo] = {}
    result_kw: dict[str, Any] = {}
    if config.benches_models:
        with private_temp_dir("sslcompress-bench") as tmp:
            result_kw, infos, notes = _bench_models(config, emit, tmp)
    if config.paper_table:
        from .paper import paper_table

        emit(BenchEvent("paper", "Table 4 study"))
        result_kw["paper"] = paper_table(
            config.paper_table, threads=config.threads, repeat=config.rounds or 15, warmup=min(config.warmup, 3),
            seed=config.seed, say=lambda m: emit(BenchEvent("paper", m)))
        notes += [
            "Table 4: AlexNet's conv shapes (torchvision, 224x224, batch 1 per GEMM) with random weights and the"
            " paper's sparsities imposed: l1 zeros placed by magnitude (CSR), SSL zero rows and columns (compact)."
            " Speed-up per layer = dense median / contender median in interleaved rounds; mean = arithmetic mean"
            " over conv1-5, as the paper. The paper's CPU column is 1 thread of a Xeon E5-2630 v2 with MKL.",
            "benchmarks/paper_table4.py is the script form (Caffe's shapes, CUDA, a results file)."]
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = list(os.getloadavg())
    if write_models and result_kw.get("models"):
        atomic_write_group(model_files(config, result_kw["models"]))
    return BenchResult(config=config, created=created, env=env,
                       variants=tuple(infos.values()),  # in the variants' order, dense first
                       notes=tuple(notes), **result_kw)


def _bench_models(config: BenchConfig, emit: Listener, tmp: Path
                  ) -> tuple[dict[str, Any], dict[str, VariantInfo], list[str]]:
    from ..surgery.export import save_onnx

    def say(message: str) -> None:
        emit(BenchEvent("build", message))

    variants = build_variants(config.target, dense=config.dense, unstructured=config.unstructured,
                              structured=config.structured, say=say, input_size=config.input_size,
                              dims=dict(config.dims) or None)
    variants, int8_notes = _with_int8(config, variants, say)
    variants = _with_extra(config, variants)
    batches = _batches(config, variants)
    files: dict[str, Path] = {}
    for v in variants:
        files[v.name] = tmp / f"{v.name}.onnx"
        save_onnx(v.model, files[v.name])
    infos = _static_info(variants, files)
    notes = _notes(config, variants, infos) + int8_notes
    shape = infos["dense"].input_shape
    images = None
    if config.data:  # before any long work: a bad spec or shape is an error at once
        from .accuracy import load_test_images

        require_image_input(variants.dense.model, "--data scores")
        emit(BenchEvent("accuracy", f"loading {config.data}"))
        images = load_test_images(config.data, shape, limit=config.data_limit, seed=config.seed)

    if config.memory:
        threads, batch = max(config.threads), max(batches)
        for i, v in enumerate(variants):
            from .memory import measure

            emit(BenchEvent("memory", f"peak memory of {v.name} (a process of its own)", i, len(variants)))
            mem = measure(files[v.name], (batch, *shape[1:]) if image_input(v.model) else (batch,),
                          threads=threads)
            infos[v.name] = replace(infos[v.name], memory=mem)
        emit(BenchEvent("memory", "peak memory", len(variants), len(variants)))

    if images is not None:
        from ..runtime.sessions import create_session
        from .accuracy import common_images, top1

        # One set of images for all: a static batch B scores whole batches only, so all take the same count.
        images = common_images(images, [input_shape(v.model)[0] for v in variants])
        for i, v in enumerate(variants):
            emit(BenchEvent("accuracy", f"top-1 of {v.name} on {len(images.x)} {images.name} images", i,
                            len(variants)))
            correct, n = top1(create_session(files[v.name], threads=max(config.threads)), images,
                              input_shape(v.model)[0])
            infos[v.name] = replace(infos[v.name], accuracy=correct / n, accuracy_images=n)
        emit(BenchEvent("accuracy", "top-1", len(variants), len(variants)))

    timed = tuple(_time(config, files, _timing_inputs(config, variants.dense.model, shape, batches), emit))
    result_kw: dict[str, Any] = {"matching": variants.matching, "unmatched": variants.unmatched, "timings": timed}
    if config.int8:
        from .int8 import compounding, compounding_note

        note = compounding_note(compounding(timed))
        notes += [note] if note else []
    if config.layers:
        result_kw.update(_layers(config, variants, batches[0], emit, notes))
    if config.models_dir:  # kept as bytes: whoever writes the results writes them in the same group
        models: dict[str, bytes] = {}
        for v in variants:
            models[v.name] = files[v.name].read_bytes()
            infos[v.name] = replace(infos[v.name], path=str(Path(config.models_dir) / f"{v.name}.onnx"))
        result_kw["models"] = models
    return result_kw, infos, notes


def _with_extra(config: BenchConfig, variants: VariantSet) -> VariantSet:
    """The set with each --variant NAME=MODEL.onnx after the others: another tool's pruned model, another export,
    timed in the same rounds; it must take the dense model's inputs and give its outputs."""
    from .variants import check_compatible, fixed_sizes, lift_constants, load_override

    added = []
    for name, path in config.extra:
        flag = f"--variant {name}"
        proto = fixed_sizes(load_override(path, flag), config.input_size, dict(config.dims) or None, flag)
        extra = Variant(name, lift_constants(proto), f"given: {path}")
        check_compatible({"dense": variants.dense, name: extra})
        added.append(extra)
    return variants.plus(*added)


def _with_int8(config: BenchConfig, variants: VariantSet, say: Callable[[str], None]
               ) -> tuple[VariantSet, list[str]]:
    """With --int8, the set with dense-int8 and structured-int8 added, and their notes."""
    if not config.int8:
        return variants, []
    from .int8 import add_int8, int8_note

    data = config.data or ""  # BenchConfig refuses --int8 without --data
    variants, skipped = add_int8(variants, data, config.calibration, seed=config.seed, say=say)
    return variants, [int8_note(data, config.calibration), *skipped]


def model_files(config: BenchConfig, models: dict[str, bytes]) -> list[tuple[Path, bytes]]:
    """(path, bytes) of each variant kept for `config.models_dir`."""
    return [(Path(config.models_dir or ".") / f"{name}.onnx", data) for name, data in models.items()]


def _plan(config: BenchConfig) -> list[tuple[str, int]]:
    """(provider, threads) pairs: every thread count on the CPU, the largest once on CUDA."""
    out: list[tuple[str, int]] = []
    for p in dict.fromkeys(config.providers):
        out += [(p, t) for t in dict.fromkeys(config.threads)] if p == "cpu" else [(p, max(config.threads))]
    return out


def _timing_inputs(config: BenchConfig, dense: onnx.ModelProto, shape: tuple[int | None, ...],
                   batches: tuple[int, ...]) -> dict[int, np.ndarray | dict[str, np.ndarray]]:
    """The one seeded input every variant is timed on, per batch: a standard normal array for an image model
    (in the input's float type when run), else a seeded value of every input in its declared type."""
    if not image_input(dense):
        return {b: random_feed(dense, b, config.seed) for b in batches}
    rng = np.random.default_rng(config.seed)
    return {b: rng.standard_normal((b, *shape[1:]), dtype=np.float32) for b in batches}


def _time(config: BenchConfig, files: dict[str, Path], inputs: dict[int, np.ndarray | dict[str, np.ndarray]],
          emit: Listener) -> list[Timing]:
    plan = [(p, t, b) for p, t in _plan(config) for b in inputs]
    out: list[Timing] = []
    for provider, threads in _plan(config):
        out += _time_sessions(config, files, provider, threads, inputs, plan, emit)
    return out


def _time_sessions(config: BenchConfig, files: dict[str, Path], provider: str, threads: int,
                   inputs: dict[int, np.ndarray | dict[str, np.ndarray]], plan: list[tuple[str, int, int]],
                   emit: Listener) -> list[Timing]:
    """One session per variant at this (provider, threads), timed at every batch; they end with this call."""
    from ..runtime.binding import runner
    from ..runtime.pinning import calling_thread_on, placement
    from ..runtime.sessions import create_session

    where = placement(threads) if config.pin and provider == "cpu" else None
    sessions = {name: create_session(path, provider=provider, threads=threads, pin=where is not None)
                for name, path in files.items()}
    out: list[Timing] = []
    for batch, x in inputs.items():
        step = plan.index((provider, threads, batch))
        label = f"{provider}, {threads} thread(s), batch {batch} [{step + 1}/{len(plan)}]"
        emit(BenchEvent("time", label, 0, config.rounds))
        runs = {name: runner(s, x, provider) for name, s in sessions.items()}
        with calling_thread_on(where[0] if where else None):
            raw = interleaved(runs, repeat=config.rounds, min_time=config.min_time, warmup=config.warmup,
                              sample_time=config.sample_time,
                              progress=lambda r, n, label=label: emit(BenchEvent("time", label, r, n)))
        out += timings(raw, baseline="dense", provider=provider, threads=threads, batch=batch,
                       seed=config.seed + step)
    return out


def _layers(config: BenchConfig, variants: VariantSet, batch: int, emit: Listener, notes: list[str]
            ) -> dict[str, Any]:
    import torch

    from .modelstudy import study_model

    devices = ["cpu"]
    if "cuda" in config.providers:
        if torch.cuda.is_available():
            devices.append("cuda")
        else:
            notes.append("The per-layer study ran on the CPU only: this torch sees no CUDA device.")
    rows, skipped = study_model(variants.dense.model, variants.unstructured.model, variants.structured.model,
                                threads=tuple(dict.fromkeys(config.threads)), devices=devices, batch=batch,
                                repeat=min(config.rounds or 10, 10), warmup=min(config.warmup, 2),
                                seed=config.seed, say=lambda m: emit(BenchEvent("layers", m)))
    notes += _thread_warnings(rows)
    if not rows and not skipped:
        notes.append("--layers: the per-layer study times convolutions (group 1) as GEMMs; this model has none.")
    return {"layers": tuple(rows), "layers_skipped": skipped}


def _thread_warnings(rows: list) -> list[str]:
    """A note where more threads made the dense GEMMs much slower: wake-ups on a busy machine, not the GEMM."""
    from . import layers as L

    one = {r.name: r.unstructured.get(L.DENSE).median_s for r in rows if r.device == "cpu" and r.threads == 1}
    out = []
    for t in sorted({r.threads for r in rows if r.device == "cpu" and r.threads and r.threads > 1}):
        ratios = [r.unstructured.get(L.DENSE).median_s / one[r.name] for r in rows
                  if r.device == "cpu" and r.threads == t and r.name in one]
        if ratios and max(ratios) > 3:
            out.append(f"Per-layer study at {t} threads: the dense GEMM ran up to {max(ratios):.0f}x slower than at 1"
                       " thread. torch's threads waited for cores that other processes held (a busy machine), so"
                       " the speed-ups at that thread count measure the wait, not the GEMMs; read the 1-thread"
                       " rows.")
    return out


def _notes(config: BenchConfig, variants: VariantSet, infos: dict[str, VariantInfo]) -> list[str]:
    from ..runtime.pinning import placement, usable_cpus

    spin = ", ".join(f"{k}={v}" for k, v in SESSION_CONFIG.items())
    unpinned = [t for t in dict.fromkeys(config.threads) if placement(t) is None]
    if not config.pin:
        placed = "; threads not pinned (--no-pin)."
    elif unpinned:
        placed = (f"; threads not pinned at {', '.join(map(str, unpinned))} thread(s): more threads than the"
                  f" {len(usable_cpus())} CPU(s) this process may use, so the workers share cores (oversubscribed).")
    else:
        placed = (". Placement: the timing thread and each session's workers pinned to the same CPUs for every"
                  " variant (session.intra_op_thread_affinities), so that no variant keeps its threads on a busier"
                  " core than another's for the whole run.")
    notes = [
        UNSTRUCTURED_NOTE,
        "Sessions: graph optimisation ORT_ENABLE_ALL, intra-op threads as listed, inter-op 1, sequential, "
        f"{spin} (pool threads spin while a run lasts and stop when it returns, so the variants' sessions, timed in"
        " turn in one process, do not steal each other's cores)" + placed,
        "Latency: a sample is the mean time per call of back-to-back runs lasting at least"
        f" {config.sample_time * 1e3:g} ms (one run when slower), on one seeded random input; the variants take"
        " turns round by round in rotating order; median, p90 and IQR are over the rounds.",
        f"Speed-up: dense median / variant median; [lo, hi] is a {CI_LEVEL:.0%} percentile bootstrap interval"
        f" over paired rounds (seed {config.seed}).",
    ]
    from ..surgery.inputs import INT_HIGH, describe_inputs

    specs = describe_inputs(variants.dense.model)
    if not image_input(variants.dense.model):
        notes.append("Inputs: " + ", ".join(s.describe() for s in specs)
                     + "; every call feeds one seeded random value of each, in its declared type (floats standard"
                     f" normal, integers in [0, {INT_HIGH}), booleans by coin flips), its batch as in the table.")
    elif specs[0].dtype == np.float16:
        notes.append("The models take float16 inputs: the seeded random input and any test images are fed in half"
                     " precision (the same values, rounded).")
    if config.memory:
        notes.append("Memory: peak RSS growth of a fresh process while it creates the CPU session and runs it 3"
                     " times (over its RSS after importing onnxruntime and making the input); host memory only.")
    if variants.matching:
        notes.append("The unstructured variant is not retrained: its accuracy is what magnitude pruning alone"
                     " leaves. Your own l1-trained model (`sslcompress finetune --method l1`, exported with"
                     " `sslcompress export --uncut`) can stand in with --unstructured.")
    if variants.unmatched:
        notes.append("Structured layers without a dense layer of their name (not matched by the unstructured"
                     f" variant): {', '.join(variants.unmatched)}.")
    if infos["structured"].macs >= infos["dense"].macs and \
            infos["structured"].nonzero_weights >= infos["dense"].nonzero_weights:
        notes.insert(0, "The structured model is no smaller than the dense one: this model had no zero filters,"
                        " channels or kernel lines to cut (give the sparse checkpoint of a finetune run), so all"
                        " three variants run the same work.")
    short = [m.name for m in variants.matching if m.kept < m.target]
    if short:
        notes.append(f"Dense layers with fewer nonzeros than the structured model's: {', '.join(short)}.")
    return notes
