"""Two processes under torchrun (gloo on CPU) end with identical weights and write one checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from sslcompress.config import PretrainConfig, RunOptions, TrainOptions
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_pretrain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_finetune(tmp_path):
    pre = run_pretrain(PretrainConfig(run=RunOptions(model="lenet5", data="digits", out=str(tmp_path / "pre"),
                                                     limit_train=400),
                                      train=TrainOptions(epochs=2, lr=0.02)))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "sslcompress.cli", "finetune", "--weights", str(pre.checkpoint), "--out", str(out),
           "--limit-train", "400", "--sparsify-epochs", "2", "--finetune-epochs", "1", "--strength", "0.2", "--lr", "0.05", "--target-flops", "0.6",
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 writes: one checkpoint, one report, no leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "sparse.pt"]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["totals"]["macs_fraction"] <= 0.6
    # ranks_in_sync compares sha256 digests of every parameter and buffer gathered from both ranks.
    assert report["ranks_in_sync"] is True
    ckpt = load_checkpoint(out / "sparse.pt")
    for name, keep in ckpt.masks.items():
        assert bool((ckpt.state_dict[name][~keep] == 0).all())
    # Both ranks fine-tuned the thinned model (the zero channels sliced out, the same on each rank); its
    # architecture comes back with those channels exactly zero.
    assert ckpt.thin and report["thinned"]["applied"]
    full = ckpt.dense_state_dict()
    assert any(bool((full[n].flatten(1).abs().sum(1) == 0).any())
               for n in full if n.endswith(".weight") and full[n].dim() > 1)
