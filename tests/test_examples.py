"""The examples a user copies from still run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sslcompress.finetune.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_custom_loop_example(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_loop", ROOT / "examples" / "custom_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    fraction = mod.main(str(tmp_path / "s.pt"), steps=15)
    assert 0 < fraction < 1
    ckpt = load_checkpoint(tmp_path / "s.pt")
    for name, keep in ckpt.masks.items():
        assert bool((ckpt.state_dict[name][~keep] == 0).all())
