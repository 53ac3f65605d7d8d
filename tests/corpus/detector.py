"""Corpus entries shaped like the one-stage detectors users bring (RetinaNet, FCOS, YOLO heads): a strided
backbone, a feature pyramid (1x1 laterals, a nearest upsample added top-down, 3x3 output convs), one head
shared by every level (the same conv weights read by one Conv node per level), per-level predictions
flattened to (N, anchors, C) and concatenated, two outputs; optionally NonMaxSuppression in the graph.

Weighted layers, in the order the exporters list them (`DETECTOR_PLANTED` and `DETECTOR_EXPECT` record them):

    0 stem       conv 3->8 /2 + BN + ReLU
    1 c3         conv 8->16 /2 + BN + ReLU    planted: filters 4, 11
    2 c4         conv 16->24 /2 + BN + ReLU   reads c3: loses inputs 4, 11
    3 lat4       conv 24->16 1x1 + bias       planted: 2, 5 (rows and bias)
    4 lat3       conv 16->16 1x1 + bias       planted: 2, 5; p3 = lat3 + upsample(lat4): zero in both
    5 out3       conv 16->16 3x3 + bias       reads p3 (loses 2, 5); planted: 1, 7
    6 out4       conv 16->16 3x3 + bias       reads p4 (loses 2, 5); planted: 1, 7
    7, 10 tower  the shared cls conv 16->16 + ReLU, at P3 and P4: planted 3, 9; reads out3 / out4 (loses 1, 7)
    8, 11 cls    the shared score conv 16->3 (a graph output's channels: all kept), loses inputs 3, 9
    9, 12 box    the shared box conv 16->4 on the level itself, loses inputs 1, 7

Scores leave through a Sigmoid, boxes as corners around each cell's centre (a constant anchor grid plus the
ReLU of the regressed extents). Every zero is a planted one: BN statistics, gammas and betas are random.

`TinyYolo` is written as YOLO code is: SiLU convs, CSP blocks (`chunk` in two, a residual bottleneck on one
half, everything concatenated), SPPF (three chained 5x5 max pools concatenated), a top-down path that
upsamples and concatenates, and per-level 1x1 detection convs whose outputs are viewed as (N, 3 anchors,
5 + classes, H, W), permuted, concatenated and split into xy, wh, and confidences (`YOLO_*` records):

    0 stem    3->16 /2          1 d1      16->32 /2, planted 3, 7      2 c1.cv1  32->32 (reads d1: 30)
    3 c1.m1   16->16            4 c1.m2   16->16, planted 1, 5: its sum with the chunk stays live, kept
    5 c1.cv2  48->32            6 d2      32->64 /2                    7 c2.cv1  64->64
    8 c2.m1   32->32            9 c2.m2   32->32                      10 c2.cv2  96->64, planted 0, 9, 40
   11 sppf.cv1 64->32 (in 61), planted 2, 6                          12 sppf.cv2 128->64 (in 4 x 30)
   13 up      96->32 (upsampled 64 + c1's 32), planted 4, 8          14 det3 32->24 (in 30)   15 det4 64->24
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from . import Entry, weighted_layers
from .torch_models import ConvBN, _randomize, _zero_filters, dynamo, legacy

DETECTOR_SIDE = 32
CLASSES = 3


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, stride=2)
        self.c3 = ConvBN(8, 16, stride=2)
        self.c4 = ConvBN(16, 24, stride=2)
        self.lat3 = nn.Conv2d(16, 16, 1)
        self.lat4 = nn.Conv2d(24, 16, 1)
        self.out3 = nn.Conv2d(16, 16, 3, padding=1)
        self.out4 = nn.Conv2d(16, 16, 3, padding=1)
        self.tower = nn.Conv2d(16, 16, 3, padding=1)
        self.cls = nn.Conv2d(16, CLASSES, 3, padding=1)
        self.box = nn.Conv2d(16, 4, 3, padding=1)
        self.register_buffer("centres", _centres())

    @staticmethod
    def _flat(y: torch.Tensor) -> torch.Tensor:
        return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])

    def forward(self, x):
        c3 = self.c3(self.stem(x))
        p4 = self.lat4(self.c4(c3))
        p3 = self.lat3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        scores, boxes = [], []
        for level in (self.out3(p3), self.out4(p4)):
            scores.append(self._flat(self.cls(F.relu(self.tower(level)))))
            boxes.append(self._flat(self.box(level)))
        extents = F.relu(torch.cat(boxes, 1))
        corners = torch.cat([self.centres - extents[..., :2], self.centres + extents[..., 2:]], -1)
        return torch.sigmoid(torch.cat(scores, 1)), corners


def _centres() -> torch.Tensor:
    """(anchors, 2) cell centres in pixels, P3 (stride 4) then P4 (stride 8), rows first."""
    out = []
    for stride in (4, 8):
        n = DETECTOR_SIDE // stride
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        out.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride + stride / 2)
    return torch.cat(out)


DETECTOR_PLANTED = {1: (4, 11), 3: (2, 5), 4: (2, 5), 5: (1, 7), 6: (1, 7), 7: (3, 9), 10: (3, 9)}
DETECTOR_EXPECT = {0: 8, 1: 14, 2: 24, 3: 14, 4: 14, 5: 14, 6: 14, 7: 14, 8: CLASSES, 9: 4, 10: 14, 11: CLASSES,
                   12: 4}
DETECTOR_EXPECT_IN = {0: 3, 1: 8, 2: 14, 3: 24, 4: 14, 5: 14, 6: 14, 7: 14, 8: 14, 9: 14, 10: 14, 11: 14, 12: 14}


def detector(seed: int = 4) -> TinyDetector:
    torch.manual_seed(seed)
    m = TinyDetector().eval()
    _randomize(m, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for conv in (m.lat3, m.lat4, m.out3, m.out4, m.tower, m.cls, m.box):  # nonzero biases: zeros are planted
            conv.bias.copy_(torch.from_numpy(rng.uniform(0.05, 0.3, conv.out_channels).astype(np.float32)))
    _zero_filters(m.c3.conv, m.c3.bn, DETECTOR_PLANTED[1])
    for conv in (m.lat4, m.lat3):
        _zero_filters(conv, None, DETECTOR_PLANTED[3])
    for conv in (m.out3, m.out4):
        _zero_filters(conv, None, DETECTOR_PLANTED[5])
    _zero_filters(m.tower, None, DETECTOR_PLANTED[7])
    return m


def _legacy(model: nn.Module, dynamic_batch: bool) -> onnx.ModelProto:
    return legacy(model, side=DETECTOR_SIDE, outputs=("scores", "boxes"), dynamic=(0,) if dynamic_batch else ())


def _dynamo(model: nn.Module) -> onnx.ModelProto:
    return dynamo(model, side=DETECTOR_SIDE, outputs=("scores", "boxes"), dynamic=(0,))


def _with_nms(proto: onnx.ModelProto) -> onnx.ModelProto:
    """NonMaxSuppression appended as exporters of detection models write it: scores transposed to
    (N, classes, anchors), at most 5 boxes a class, IoU 0.5, score threshold 0.3; its (K, 3) selected indices
    become a third output."""
    g = proto.graph
    consts = [helper.make_tensor("nms_max", TensorProto.INT64, [1], [5]),
              helper.make_tensor("nms_iou", TensorProto.FLOAT, [1], [0.5]),
              helper.make_tensor("nms_score", TensorProto.FLOAT, [1], [0.3])]
    g.initializer.extend(consts)
    g.node.extend([
        helper.make_node("Transpose", ["scores"], ["scores_by_class"], name="nms_scores", perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores_by_class", "nms_max", "nms_iou", "nms_score"],
                         ["selected"], name="nms", center_point_box=0),
    ])
    g.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, ["selected_count", 3]))
    return proto


def _entry(name: str, proto: onnx.ModelProto) -> Entry:
    return Entry(name, proto, dict(DETECTOR_PLANTED), dict(DETECTOR_EXPECT), dict(DETECTOR_EXPECT_IN))


def _quantized(proto: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """ONNX Runtime's static QDQ quantization (per-channel int8 weights, uint8 activations), calibrated on
    four random batches. Weights in 7 bits (`reduce_range`, ORT's advice for CPUs without VNNI): ORT's AVX2
    int8 kernels add u8 x s8 products in pairs that saturate at 16 bits, so full-range weights make the fused
    model's outputs depend on which channels sit side by side, and the compact model (fewer channels, the
    same function) lands quantization steps away there; node by node the two agree exactly either way
    (docs/surgery.md, Verification)."""
    from onnxruntime import quantization as q

    class Batches(q.CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, DETECTOR_SIDE, DETECTOR_SIDE))
                                  .astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp / "detector-float.onnx", tmp / "detector-qdq.onnx"
    onnx.save(proto, str(src))
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process first is not for a test
    try:
        q.quantize_static(str(src), str(dst), Batches(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8,
                          reduce_range=True)
    finally:
        logging.getLogger().setLevel(level)
    return onnx.load(str(dst))


def _renumbered(record: dict[int, object], old: list[str], new: list[str]) -> dict[int, object]:
    """The record of layers numbered as in a graph listing them in another order: a layer is known by its
    weight (an index of `old`, `new`: weight names) and the k-th reader of a weight is the k-th there too."""
    where: dict[str, list[int]] = {}
    for j, w in enumerate(new):
        where.setdefault(w, []).append(j)
    seen: dict[str, int] = {}
    out = {}
    for i, w in enumerate(old):
        k = seen[w] = seen.get(w, -1) + 1
        if i in record:
            out[where[w][k]] = record[i]
    return out


def detector_qdq(tmp: Path) -> Entry:
    """The legacy export quantized by ONNX Runtime (QDQ): weights behind DequantizeLinear, the shared head's
    weights read through one DequantizeLinear per weight, layers listed in the quantizer's order."""
    float_model = _legacy(detector(), dynamic_batch=False)
    proto = _quantized(float_model, tmp)
    old = [lay_weight(float_model, i) for i in range(len(DETECTOR_EXPECT))]
    new = [lay_weight(proto, i).removesuffix("_quantized") for i in range(len(DETECTOR_EXPECT))]
    return Entry("detector-qdq", proto, *(_renumbered(r, old, new)
                                          for r in (DETECTOR_PLANTED, DETECTOR_EXPECT, DETECTOR_EXPECT_IN)))


def lay_weight(model: onnx.ModelProto, index: int) -> str:
    """The name of the constant the `index`-th weighted layer's weight comes from (through DequantizeLinear)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = weighted_layers(model)[index].name
    node = next(n for n in model.graph.node if n.name == name)
    w = node.input[1]
    while w in producers and producers[w].op_type == "DequantizeLinear":
        w = producers[w].input[0]
    return w


def detector_legacy() -> Entry:
    return _entry("detector-legacy", _legacy(detector(), dynamic_batch=False))


def detector_dynamo_dynamic_batch() -> Entry:
    return _entry("detector-dynamo-dynamic-batch", _dynamo(detector()))


def detector_legacy_nms() -> Entry:
    return _entry("detector-legacy-nms", _with_nms(_legacy(detector(), dynamic_batch=True)))


class CBS(nn.Module):
    """Conv, BN, SiLU: YOLO's basic conv."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class CSP(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.m1, self.m2 = CBS(c, c), CBS(c // 2, c // 2, 3), CBS(c // 2, c // 2, 3)
        self.cv2 = CBS(c + c // 2, c)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, b + self.m2(self.m1(b))], 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = CBS(c, c // 2), CBS(c * 2, c)

    def forward(self, x):
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1))


class TinyYolo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.d1, self.c1 = CBS(3, 16, 3, 2), CBS(16, 32, 3, 2), CSP(32)
        self.d2, self.c2, self.sppf = CBS(32, 64, 3, 2), CSP(64), SPPF(64)
        self.up = CBS(64 + 32, 32)
        self.det3, self.det4 = nn.Conv2d(32, 3 * (5 + CLASSES), 1), nn.Conv2d(64, 3 * (5 + CLASSES), 1)

    def forward(self, x):
        p3 = self.c1(self.d1(self.stem(x)))
        p4 = self.sppf(self.c2(self.d2(p3)))
        f3 = self.up(torch.cat([F.interpolate(p4, scale_factor=2.0, mode="nearest"), p3], 1))
        outs = []
        for f, det in ((f3, self.det3), (p4, self.det4)):
            y = det(f)
            n, _, h, w = y.shape
            outs.append(y.view(n, 3, 5 + CLASSES, h, w).permute(0, 1, 3, 4, 2).reshape(n, -1, 5 + CLASSES))
        xy, wh, conf = torch.cat(outs, 1).split((2, 2, 1 + CLASSES), -1)
        return torch.cat([xy.sigmoid(), wh.exp(), conf.sigmoid()], -1)


YOLO_SIDE = 64
YOLO_PLANTED = {1: (3, 7), 4: (1, 5), 10: (0, 9, 40), 11: (2, 6), 13: (4, 8)}
YOLO_EXPECT = {0: 16, 1: 30, 2: 32, 3: 16, 4: 16, 5: 32, 6: 64, 7: 64, 8: 32, 9: 32, 10: 61, 11: 30, 12: 64, 13: 30,
               14: 24, 15: 24}
YOLO_EXPECT_IN = {0: 3, 1: 16, 2: 30, 3: 16, 4: 16, 5: 48, 6: 32, 7: 64, 8: 32, 9: 32, 10: 96, 11: 61, 12: 120,
                  13: 96, 14: 30, 15: 64}


def tiny_yolo(seed: int = 5) -> TinyYolo:
    torch.manual_seed(seed)
    m = TinyYolo().eval()
    _randomize(m, np.random.default_rng(seed))
    for cbs, i in ((m.d1, 1), (m.c1.m2, 4), (m.c2.cv2, 10), (m.sppf.cv1, 11), (m.up, 13)):
        _zero_filters(cbs.conv, cbs.bn, YOLO_PLANTED[i])
    return m


def _yolo_entry(name: str, proto: onnx.ModelProto) -> Entry:
    return Entry(name, proto, dict(YOLO_PLANTED), dict(YOLO_EXPECT), dict(YOLO_EXPECT_IN))


def yolo_legacy() -> Entry:
    return _yolo_entry("yolo-legacy", legacy(tiny_yolo(), side=YOLO_SIDE, outputs=("pred",)))


def yolo_dynamo_dynamic_batch() -> Entry:
    return _yolo_entry("yolo-dynamo-dynamic-batch", dynamo(tiny_yolo(), side=YOLO_SIDE, outputs=("pred",),
                                                           dynamic=(0,)))
