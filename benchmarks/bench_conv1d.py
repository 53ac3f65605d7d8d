"""Conv1d models on ORT: dense vs unstructured-sparse vs structured-sparse.

ORT runs 1-D Convs without the blocked layout (NCHWc) it gives 2-D ones, so how far a channel cut pays there is
its own question. Two 1-D CNNs with random weights and BatchNorm statistics:

- m5: a raw-waveform classifier in the layout of M5 (Dai et al., 2017): a stride-4, 80-tap front end, then
  three 3-tap stages of 128, 256 and 512 channels, each conv followed by BatchNorm, ReLU and a 4x max pool;
  16,000 samples (1 s at 16 kHz), 35 classes (Speech Commands' count). A random (1 - keep) of every conv's
  output channels zeroed.
- tcn: a temporal convolutional network (a 1-D ResNet): a 64-channel stem, eight residual blocks of a dilated
  3-tap conv to 256 channels (dilation 1, 2, ..., 128) and a 1-tap conv back to 64, 2,000 steps. A random
  (1 - keep) of the block-internal channels zeroed; the residual stream stays whole.

Zeroed channels take their BatchNorm scale and shift with them. Each model is exported with a dynamic batch, cut
by the surgery and verified, then timed with bench_resnet.py's rows: interleaved rounds, the unstructured
variant built by the bench (the dense weights with as many nonzeros per layer as the structured model keeps).
Writes results/bench_conv1d.json and results/bench_conv1d.md.

    python benchmarks/bench_conv1d.py [--models m5,tcn] [--keep 0.5,0.25] [--batch 1,8] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet import (  # noqa: E402  (the same export, timing and table)
    add_timing_options,
    export_and_cut,
    run_cases,
    timing_options_ok,
)
from surgery_resnet import randomize_bn  # noqa: E402

HERE = Path(__file__).resolve().parent
LENGTHS = {"m5": 16000, "tcn": 2000}


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation),
            nn.BatchNorm1d(cout), nn.ReLU()]


class M5(nn.Module):
    def __init__(self, width: int = 128, num_classes: int = 35):
        super().__init__()
        stages = [(1, width, 80, 4), (width, width, 3, 1), (width, 2 * width, 3, 1), (2 * width, 4 * width, 3, 1)]
        layers: list[nn.Module] = []
        for cin, cout, kernel, stride in stages:
            layers += [*_conv_bn_relu(cin, cout, kernel, stride), nn.MaxPool1d(4)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(-1))


class TcnBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, dilation: int):
        super().__init__()
        self.branch = nn.Sequential(*_conv_bn_relu(channels, hidden, 3, dilation=dilation),
                                    nn.Conv1d(hidden, channels, 1), nn.BatchNorm1d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.branch(x))


class Tcn(nn.Module):
    def __init__(self, channels: int = 64, hidden: int = 256, blocks: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(1, channels, 3))
        self.blocks = nn.Sequential(*(TcnBlock(channels, hidden, 2 ** i) for i in range(blocks)))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(-1))


def _zeroed_convs(model: nn.Module) -> list[tuple[nn.Conv1d, nn.BatchNorm1d]]:
    """The (conv, its BatchNorm) pairs whose output channels go: every one of M5, the block-internal ones of the
    TCN."""
    seqs = [model.features] if isinstance(model, M5) else [b.branch[:3] for b in model.blocks]
    pairs = []
    for seq in seqs:
        mods = list(seq)
        pairs += [(c, n) for c, n in zip(mods, mods[1:]) if isinstance(c, nn.Conv1d) and isinstance(n, nn.BatchNorm1d)]
    return pairs


def sparse_model(name: str, keep: float, seed: int) -> tuple[nn.Module, dict]:
    """The model with a random (1 - keep) of its zeroed convs' channels zeroed; (model, what was zeroed)."""
    torch.manual_seed(seed)
    model = M5() if name == "m5" else Tcn()
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen)
    zeroed = total = 0
    with torch.no_grad():
        for conv, norm in _zeroed_convs(model):
            n = conv.out_channels
            gone = torch.randperm(n, generator=gen)[: n - max(1, round(n * keep))]
            for t in (conv.weight, conv.bias, norm.weight, norm.bias):
                t[gone] = 0
            zeroed, total = zeroed + len(gone), total + n
    return model.eval(), {"convs_zeroed": len(_zeroed_convs(model)), "channels_zeroed": zeroed,
                          "channels_total": total}


def cut_case(name: str, keep: float, args, work: Path) -> tuple[Path, Path, dict, dict]:
    """bench_resnet.cut_case for these models: (dense path, structured path, the surgery's totals, zeroing)."""
    model, zeroing = sparse_model(name, keep, args.seed)
    return (*export_and_cut(model, (1, 1, args.length or LENGTHS[name]), f"{name}_{keep:g}", work), zeroing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="m5,tcn")
    p.add_argument("--keep", default="0.5,0.25", help="fractions of the zeroed convs' channels kept")
    p.add_argument("--length", type=int, default=None, help="samples per input (default: m5 16000, tcn 2000)")
    add_timing_options(p, "bench_conv1d")
    args = p.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(LENGTHS))
    if unknown:
        print(f"error: --models takes {', '.join(LENGTHS)}, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not timing_options_ok(args):
        return 2
    run_cases(args, argv, "bench_conv1d.py", cut_case,
              title="Conv1d models: dense vs unstructured vs structured on ONNX Runtime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
