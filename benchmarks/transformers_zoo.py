"""Hugging Face transformers' image classifiers through the whole analysis: which groups each one has, whether the
count is its export's, and whether zero groups are cut as counted and thinned exactly.

For each model (a small config at 32x32, random weights, wrapped to return logits): the structured groups
`finetune` would regularise (filters, channels, MLP neurons, attention heads, residual branches), the dense MAC
count against the MACs of its export (torch's legacy exporter, opset 17, onnxsim) before any zero, then three
groups of every kind zeroed (one residual branch) at a fixed seed, the count after against the MACs after the
surgery (verified in ONNX Runtime against the uncut export), and the torch model thinned (`thin`, outputs
checked). Each model runs in its own process: after a TorchScript export, torch.export of some models (Swin)
stops working in that process.

transformers is no dependency of sslcompress: install it beside the venv (`pip install transformers`) or put an
installation on PYTHONPATH. Without it the script says so and exits.

Usage (from the repository root):

    python benchmarks/transformers_zoo.py                    # every model below, about 10 minutes on 2 cores
    python benchmarks/transformers_zoo.py --models vit swin  # some of them

Results: benchmarks/results/transformers_zoo.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEM = "transformers_zoo"
SHAPE = (1, 3, 32, 32)
KINDS = ("filter", "channel", "neuron", "head", "depth")

# name -> (model class, config class, config arguments); num_labels=10 is added.
MODELS: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "deit": ("DeiTForImageClassification", "DeiTConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        use_relative_position_bias=True)),
    "data2vec_vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2)),
    "dinov2_swiglu": ("Dinov2ForImageClassification", "Dinov2Config", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        use_swiglu_ffn=True)),
    "ijepa": ("IJepaForImageClassification", "IJepaConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)),
    "swinv2": ("Swinv2ForImageClassification", "Swinv2Config", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)),
    "focalnet": ("FocalNetForImageClassification", "FocalNetConfig", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1])),
    "cvt": ("CvtForImageClassification", "CvtConfig", dict(
        embed_dim=[16, 24, 32], num_heads=[1, 2, 2], depth=[1, 2, 3], patch_sizes=[7, 3, 3], patch_stride=[4, 2, 2],
        patch_padding=[2, 1, 1], mlp_ratio=[2.0] * 3, attention_drop_rate=[0.0] * 3, drop_rate=[0.0] * 3,
        drop_path_rate=[0.0] * 3, qkv_bias=[True] * 3, cls_token=[False, False, True],
        qkv_projection_method=["dw_bn"] * 3, kernel_qkv=[3] * 3, padding_kv=[1] * 3, stride_kv=[2] * 3,
        padding_q=[1] * 3, stride_q=[1] * 3)),
    "levit": ("LevitForImageClassification", "LevitConfig", dict(
        image_size=32, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8])),
    "segformer": ("SegformerForImageClassification", "SegformerConfig", dict(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        patch_sizes=[7, 3], strides=[4, 2])),
    "pvt": ("PvtForImageClassification", "PvtConfig", dict(
        image_size=32, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], patch_sizes=[4, 2], strides=[4, 2], mlp_ratios=[2, 2])),
    "pvt_v2": ("PvtV2ForImageClassification", "PvtV2Config", dict(
        image_size=32, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig", dict(
        image_size=32, hidden_sizes=[24, 32, 40], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2)),
    "swiftformer": ("SwiftFormerForImageClassification", "SwiftFormerConfig", dict(
        depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48])),
    "poolformer": ("PoolFormerForImageClassification", "PoolFormerConfig", dict(
        hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2],
        padding=[2, 1])),
    "hiera": ("HieraForImageClassification", "HieraConfig", dict(
        image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=16,
        num_heads=[1, 2, 4], depths=[1, 1, 2], query_stride=[2, 2], masked_unit_size=[4, 4], num_query_pool=2)),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", dict(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")),
    "bit": ("BitForImageClassification", "BitConfig", dict(
        embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8)),
    "regnet": ("RegNetForImageClassification", "RegNetConfig", dict(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config", dict(
        image_size=32, depth_multiplier=0.25)),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", dict(
        image_size=32, depth_multiplier=0.35)),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig", dict(
        image_size=32, width_coefficient=1.0, depth_coefficient=0.2, hidden_dim=1280)),
}


def _zero(model, groups) -> None:
    """Every slice of each group set to zero, as a finished sparsification leaves it."""
    import torch

    from sslcompress.finetune.groups import axis_dim

    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in groups:
            for s in g.slices:
                t = params[s.param]
                d = axis_dim(s.axis, t.ndim)
                if s.axis == "all":
                    t.zero_()
                elif d is not None:
                    t.index_fill_(d, torch.tensor(list(s.index)), 0.0)


def one(name: str) -> dict:
    """The whole check of one model, in this process."""
    import torch
    import transformers

    from sslcompress.finetune.counting import count
    from sslcompress.finetune.groups import build_groups
    from sslcompress.finetune.thin import thin
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).logits

    model_cls, config_cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = Logits(getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=10, **kwargs))).eval()
    row: dict = {"model": name, "class": model_cls}
    groups = [g for g in build_groups(model, SHAPE, KINDS) if g.removable]
    row["groups"] = dict(sorted(Counter(g.kind for g in groups).items()))
    dense = copy.deepcopy(model)
    row["macs"] = count(model, SHAPE).macs
    rng = random.Random(0)
    # Head 0 of every attention is kept so that no attention loses all its heads (the count keeps its last head
    # by design, the zeroed model would not).
    pools = {k: [g for g in groups if g.kind == k and not (k == "head" and g.name.endswith("[0]"))]
             for k in sorted({g.kind for g in groups})}
    _zero(model, [g for k, pool in pools.items() for g in rng.sample(pool, min(1 if k == "depth" else 3, len(pool)))])
    counted = count(model, SHAPE)  # before any TorchScript export in this process
    row["macs_after_counted"] = counted.macs_after
    thinned = copy.deepcopy(model)
    result = thin(thinned, SHAPE)
    row["thinned"] = result.applied
    row["thin_note"] = result.reason
    row["macs_export"] = compress(export_onnx(dense, SHAPE).model).report["totals"]["macs"]
    cut = compress(export_onnx(model, SHAPE).model)
    row["macs_after_export"] = cut.report["totals"]["macs_after"]
    row["verified"] = cut.verification.passed
    row["max_abs"] = cut.verification.max_abs
    row["walls"] = sorted(cut.report["blocked_by"], key=lambda k: -cut.report["blocked_by"][k])[:2]
    row["ok"] = row["verified"] and row["macs"] == row["macs_export"] and \
        row["macs_after_counted"] == row["macs_after_export"]
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# Hugging Face transformers' image classifiers through the analysis ({meta['date']})", "",
             f"transformers {meta['transformers']}, torch {meta['torch']}, inputs {SHAPE}, random weights; three "
             "groups of each kind zeroed (one residual branch; never head 0 of an attention), seed 0. "
             "*Count = export*: the dense MAC count is the export's; *cut as counted*: the surgery's MACs after are the count's and the cut model verifies "
             "against the uncut one in ONNX Runtime; *thinned*: the torch model sliced with the same outputs.", "",
             "| model | groups | count = export (MACs) | cut as counted (MACs after) | thinned "
             "| walls the surgery reports |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | |")
            continue
        groups = ", ".join(f"{k} {n}" for k, n in r["groups"].items()) or "none"
        dense = f"{'yes' if r['macs'] == r['macs_export'] else 'NO'} ({r['macs']:,} / {r['macs_export']:,})"
        after = f"{'yes' if r['macs_after_counted'] == r['macs_after_export'] and r['verified'] else 'NO'} " \
                f"({r['macs_after_counted']:,} / {r['macs_after_export']:,})"
        thinned = "yes" if r["thinned"] else f"no: {r['thin_note']}"
        walls = "; ".join(r["walls"]) or "none"
        lines.append(f"| {r['model']} | {groups} | {dense} | {after} | {thinned} | {walls} |")
    ok = sum(1 for r in rows if r.get("ok"))
    lines += ["", f"{ok} of {len(rows)} models counted as exported and cut as counted."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON on stdout
    args = parser.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        print("error: transformers is not installed (pip install transformers, or put an installation on "
              "PYTHONPATH)", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(one(args.one)))
        return 0

    import torch
    import transformers

    from sslcompress.io import atomic_write_bytes, atomic_write_json

    rows = []
    for name in args.models:
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"model": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"over {args.timeout} s"}
        row["seconds"] = round(time.time() - start, 1)
        print(f"{name}: {'ok' if row.get('ok') else row.get('error') or 'MISMATCH'} ({row['seconds']} s)", flush=True)
        rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "transformers": transformers.__version__, "torch": torch.__version__}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"meta": meta, "rows": rows}, out / f"{STEM}.json")
    atomic_write_bytes(render(rows, meta).encode(), out / f"{STEM}.md")
    print(f"results: {out / STEM}.md")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
