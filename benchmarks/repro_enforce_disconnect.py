"""Reproduces a library issue found while benchmarking: budget enforcement can disconnect LeNet.

`_Sparsifier.enforce(target)` (sslcompress/finetune/pipeline.py) zeroes the removable groups with
the smallest norm / sqrt(MAC cost) until the model's MAC fraction is at most `target`. On LeNet
the cheapest groups per MAC are conv1's filters and conv2's channels (filter,channel runs), or
conv1's columns (shape runs), so enforcement removes all of them: conv1 has no live output and
the network's output no longer depends on its input. Meanwhile flops.Counter still counts conv2
filters and fc1 inputs fed only by biases, so the reported fraction looks plausible.

    python benchmarks/repro_enforce_disconnect.py [--weights CKPT]

Without --weights it uses a freshly initialised lenet5 (seed 0). Seen on 2026-11-26: fresh init,
all three cases end with conv1 at 0/20 filters and an output spread of 0 (the output is constant).
With the benchmark's pretrained checkpoint (benchmarks/out/lenet_mnist/pretrained.pt),
filter,channel at 0.05 ends with 0 filters in conv1 and conv2 and a reported fraction of 0.0022,
while 0.08 and shape at 0.19 stay connected. The --quick LeNet benchmark hit the same failure in
its shape run (error 88.95%).
"""

from __future__ import annotations

import argparse

import torch

from sslcompress.config import FinetuneConfig, build_config
from sslcompress.finetune.checkpoint import load_weights, read_weights
from sslcompress.finetune.pipeline import _Sparsifier
from sslcompress.models import ModelSpec, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    for structures, target in ((("filter", "channel"), 0.08), (("filter", "channel"), 0.05), (("shape",), 0.19)):
        torch.manual_seed(0)
        if args.weights:
            state, ckpt = read_weights(args.weights)
            spec = ckpt.model
            model = build_model(spec)
            load_weights(model, state, args.weights)
        else:
            spec = ModelSpec("lenet5", 10, 1, (28, 28))
            model = build_model(spec)
        cfg = build_config(FinetuneConfig, None, {"structures": structures, "target_flops": target})
        sp = _Sparsifier(model, spec, cfg)
        floor = sp.floor()
        forced = sp.enforce(target)
        c = sp.counter.count()
        x = torch.randn(8, 1, 28, 28)
        with torch.no_grad():
            spread = float(model(x).std(0).max())  # 0: the output does not depend on the input
        c1, c2, f1 = c.layer("conv1"), c.layer("conv2"), c.layer("fc1")
        print(f"{','.join(structures)} target {target} (floor {floor:.4f}): forced {forced} groups -> reported "
              f"fraction {c.macs_gemm_fraction if 'shape' in structures else c.macs_fraction:.4f}; "
              f"conv1 filters {c1.filters} columns {c1.columns}; conv2 filters {c2.filters} channels {c2.channels}; "
              f"fc1 inputs {f1.channels}; output spread over 8 random inputs {spread:.2e}")


if __name__ == "__main__":
    main()
