"""Structured vs dense ResNets in PyTorch on a GPU (cuDNN, fp32): issue 4, benchmark 3.

Where onnxruntime-gpu cannot be installed, this measures what a GPU makes of the same structure
through PyTorch: ResNet-18/50 with 50% or 25% of the block-internal channels kept, as the
surgery leaves them (the compact model: thinner convs), against the uncut model with those
channels zeroed (the same kernels as dense), and an unstructured model with the compact model's
nonzero count placed by magnitude (also the same kernels: cuDNN has no sparse path). The compact
model is first checked against the zeroed one (same outputs). Timing: CUDA events, cuDNN
autotuning on, TF32 off (fp32 like the paper), variants interleaved round by round.

Needs only torch (with CUDA) and numpy: `PYTHONPATH=. python benchmarks/torch_cuda_resnet.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sslcompress.models.imagenet import resnet18, resnet50

HERE = Path(__file__).resolve().parent


def block_convs(model: nn.Module):
    """(block, [(conv, bn), ...] whose outputs are block-internal) for every residual block."""
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs = [(block.conv1, block.bn1)]
            if hasattr(block, "conv3"):
                pairs.append((block.conv2, block.bn2))
            yield block, pairs


def zero_and_slim(model: nn.Module, keep: float, gen: torch.Generator) -> tuple[nn.Module, nn.Module]:
    """The uncut model with dropped channels zeroed (conv rows, BN gamma and beta), and the compact one."""
    import copy

    zeroed = model
    slim = copy.deepcopy(model)
    for (_, pairs), (sblock, spairs) in zip(block_convs(zeroed), block_convs(slim), strict=True):
        readers = [sblock.conv2] + ([sblock.conv3] if hasattr(sblock, "conv3") else [])
        for i, ((conv, bn), (sconv, sbn)) in enumerate(zip(pairs, spairs, strict=True)):
            n = conv.out_channels
            kept = torch.randperm(n, generator=gen)[: max(1, round(keep * n))].sort().values
            drop = torch.ones(n, dtype=torch.bool)
            drop[kept] = False
            with torch.no_grad():
                conv.weight[drop] = 0
                bn.weight[drop] = 0
                bn.bias[drop] = 0
            _keep_out(sconv, sbn, kept)
            _keep_in(readers[i], kept)
    return zeroed, slim


def _keep_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, kept: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[kept].clone())
        conv.out_channels = len(kept)
        for name in ("weight", "bias"):
            setattr(bn, name, nn.Parameter(getattr(bn, name)[kept].clone()))
        bn.running_mean = bn.running_mean[kept].clone()
        bn.running_var = bn.running_var[kept].clone()
        bn.num_features = len(kept)


def _keep_in(conv: nn.Conv2d, kept: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[:, kept].clone())
        conv.in_channels = len(kept)


def magnitude_like(model: nn.Module, slim: nn.Module) -> nn.Module:
    """Each conv/linear of `model` keeping as many weights (largest |w|) as `slim`'s matching layer."""
    import copy

    out = copy.deepcopy(model)
    targets = {n: m.weight.numel() for n, m in slim.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    with torch.no_grad():
        for n, m in out.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                k = targets[n]
                w = m.weight.view(-1)
                if k < w.numel():
                    idx = w.abs().argsort()[: w.numel() - k]
                    w[idx] = 0
    return out


def macs(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.shape[2] * out.shape[3] * m.weight.numel()
        else:
            total += m.weight.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hs:
        h.remove()
    return total


def time_rounds(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int) -> dict[str, list[float]]:
    times = {k: [] for k in models}
    names = list(models)
    with torch.no_grad():
        for _ in range(3):
            for m in models.values():
                m(x)
        torch.cuda.synchronize()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    models[name](x)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / calls)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--keep", default="0.5,0.25")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    rows = []
    for name in args.models.split(","):
        for keep in (float(k) for k in args.keep.split(",")):
            torch.manual_seed(0)
            base = {"resnet18": resnet18, "resnet50": resnet50}[name](1000, 3, (224, 224)).eval()
            zeroed, slim = zero_and_slim(base, keep, torch.Generator().manual_seed(0))
            unstructured = magnitude_like(zeroed, slim)
            models = {"dense": zeroed.to(dev), "unstructured": unstructured.to(dev), "structured": slim.to(dev)}
            x224 = torch.randn(2, 3, 224, 224, device=dev)
            with torch.no_grad():
                a, b = models["dense"](x224).double(), models["structured"](x224).double()
            rel = float((a - b).abs().max() / a.abs().max())
            red = macs(zeroed, x224) / macs(slim, x224)
            for batch in (int(v) for v in args.batch.split(",")):
                x = torch.randn(batch, 3, 224, 224, device=dev)
                t = time_rounds(models, x, args.rounds, calls=max(1, 20 // batch))
                med = {k: statistics.median(v) for k, v in t.items()}
                row = {"model": name, "keep": keep, "batch": batch, "mac_reduction": red, "output_rel_diff": rel,
                       "dense_ms": med["dense"], "unstructured_ms": med["unstructured"],
                       "structured_ms": med["structured"],
                       "unstructured_speedup": med["dense"] / med["unstructured"],
                       "structured_speedup": med["dense"] / med["structured"],
                       "efficiency": med["dense"] / med["structured"] / red, "samples_ms": t}
                rows.append(row)
                print(f"{name} keep {keep:g} batch {batch}: MACs {red:.2f}x fewer, dense {med['dense']:.3f} ms, "
                      f"unstructured {row['unstructured_speedup']:.2f}x, structured {row['structured_speedup']:.2f}x "
                      f"(efficiency {row['efficiency']:.2f}); outputs rel diff {rel:.1e}", flush=True)
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch_cuda_resnet.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    md = [f"# ResNets on {env['gpu']} in PyTorch (cuDNN {env['cudnn']}, fp32, TF32 off)", "",
          f"torch {env['torch']}, CUDA {env['cuda']}, {env['created']}. Median ms of {args.rounds} interleaved "
          "rounds; speed-ups over the uncut model with the dropped channels zeroed.", "",
          "| model | kept | MAC reduction | batch | dense ms | unstructured | structured | efficiency |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['keep']:.0%} | {r['mac_reduction']:.2f}x | {r['batch']} | {r['dense_ms']:.3f} | "
           f"{r['unstructured_speedup']:.2f}x | {r['structured_speedup']:.2f}x | {r['efficiency']:.2f} |" for r in rows]
    (out / "torch_cuda_resnet.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
