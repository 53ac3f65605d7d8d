"""One child process of `surgery_resnet.py --against`: load an ONNX file, call compress() on it, report.

Run by the parent with PYTHONPATH set to the source tree under test (this tree, or a git worktree of
an older revision) and the same venv. Only the standard library is imported at the top, so the
sslcompress that is measured is the one PYTHONPATH names; the child checks that and refuses otherwise.

For each of `--calls` compress() calls (the first is cold: lazy imports and ORT's first session fall
in it) it records:

- wall time of the whole call and compress()'s own report["seconds"];
- peak RSS of the process during the call (VmHWM after resetting it through /proc/self/clear_refs
  just before the call; the whole process: Python, torch, ORT, the loaded model) and the increase
  over the RSS just before the call;
- a stage breakdown: every function that compress's module imports by name (load, passes, report,
  verification), onnx_ir's (de)serialization, every onnx_ir pass, shape inference, the checker and ORT
  session creation and runs are wrapped with a timer; each stage's time is its own (exclusive: what
  it calls that is also timed is counted there), so the stages sum to the call's wall time less
  "compress body" (what compress does between them: the report's sizes and counts). The RSS and its
  high-water mark are read at the end of every top-level stage, which shows where the peak falls.
  The timers cost microseconds per stage (a few hundred stages per call).

Usage: python benchmarks/surgery_child.py MODEL.onnx RESULT.json --root ROOT [--lowering off]
       [--calls 2] [--save COMPACT.onnx]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time

from rss import peak_kib, reset_peak, status_kib  # beside this script; imports nothing of sslcompress


class Stages:
    """Exclusive time per label; RSS and its high-water mark at the end of each top-level stage."""

    def __init__(self) -> None:
        self.stack: list[list] = []  # [label, start, time in timed callees]
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.timeline: list[dict] = []
        self.t0 = time.perf_counter()

    def wrap(self, label, fn):
        if getattr(fn, "_stage_wrapped", False):
            return fn

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = label(args) if callable(label) else label
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, inner = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
                self.counts[name] = self.counts.get(name, 0) + 1
                if self.stack:
                    self.stack[-1][2] += elapsed
                if len(self.stack) <= 1:  # top-level stages (inside compress): where the memory goes
                    self.timeline.append({"stage": name, "end_s": time.perf_counter() - self.t0,
                                          "rss_mib": (status_kib("VmRSS") or 0) / 1024,
                                          "hwm_mib": (status_kib("VmHWM") or 0) / 1024})

        timed._stage_wrapped = True
        return timed


def _pass_label(args) -> str:
    p = args[0]
    name = getattr(p, "name", None)
    return f"pass: {name if isinstance(name, str) and name else type(p).__name__}"


def instrument(stages: Stages) -> None:
    """Wrap what compress() calls (see the module docstring); names missing in a revision are skipped."""
    import onnx
    import onnx_ir
    import onnx_ir.passes
    import onnxruntime.capi.onnxruntime_inference_collection as ortc

    import sslcompress.surgery.compress as cm

    for name, obj in list(vars(cm).items()):
        if name != "compress" and inspect.isfunction(obj) and (obj.__module__ or "").startswith("sslcompress"):
            setattr(cm, name, stages.wrap(name, obj))
    for mod, names, prefix in ((onnx_ir.serde, ("deserialize_model", "serialize_model"), "onnx_ir."),
                               (onnx.shape_inference, ("infer_shapes",), "onnx."),
                               (onnx.checker, ("check_model",), "onnx.")):
        for name in names:
            setattr(mod, name, stages.wrap(prefix + name, getattr(mod, name)))
    base = onnx_ir.passes.PassBase
    base.__call__ = stages.wrap(_pass_label, base.__call__)
    ortc.InferenceSession.__init__ = stages.wrap("ORT session", ortc.InferenceSession.__init__)
    ortc.Session.run = stages.wrap("ORT run", ortc.Session.run)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("result")
    ap.add_argument("--root", required=True, help="the source tree whose sslcompress must be imported")
    ap.add_argument("--lowering", default=None, help="shape_lowering= (default: the revision's own default)")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--save", default=None, help="write the last call's compact model here")
    args = ap.parse_args()

    import onnx

    import sslcompress
    import sslcompress.surgery.compress as cm

    where = os.path.realpath(sslcompress.__file__)
    if not where.startswith(os.path.realpath(args.root) + os.sep):
        print(f"error: imported sslcompress from {where}, not from {args.root}", file=sys.stderr)
        return 2
    try:
        import torch  # compress's verification imports it already; keep it off the second core

        torch.set_num_threads(1)
    except ImportError:
        pass
    stages = Stages()
    if not args.no_stages:
        instrument(stages)
    proto = onnx.load(args.model)
    kwargs = {} if args.lowering is None else {"shape_lowering": args.lowering}
    calls, res = [], None
    for _ in range(args.calls):
        del res  # free the previous result first: two compact models alive would inflate the peak
        res = None
        baseline = status_kib("VmRSS") or 0
        reset_ok = reset_peak()
        stages.reset()
        t0 = time.perf_counter()
        res = cm.compress(proto, **kwargs)
        wall = time.perf_counter() - t0
        peak = peak_kib(reset_ok)
        totals, ver = res.report["totals"], res.report["verification"]
        calls.append({
            "wall_s": wall, "seconds": dict(res.report["seconds"]),
            "peak_rss_mib": peak / 1024, "baseline_rss_mib": baseline / 1024, "increase_mib": (peak - baseline) / 1024,
            "peak_method": "VmHWM after clear_refs reset" if reset_ok else "ru_maxrss of the whole process",
            "passed": bool(res.verification.passed), "rel": ver["rel"], "macs": totals["macs"],
            "macs_after": totals["macs_after"], "params_after": totals["params_after"],
            "nodes_after": totals["nodes_after"], "bytes_after": totals["bytes_after"],
            "shape_lowering": (res.report.get("shape_lowering") or {}).get("mode"),
            "stages": {k: {"s": v, "n": stages.counts[k]} for k, v in stages.seconds.items()},
            "timeline": stages.timeline,
        })
    if args.save:
        onnx.save(res.model, args.save)
    with open(args.result, "w") as f:
        json.dump({"sslcompress": where, "pid": os.getpid(), "calls": calls}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
