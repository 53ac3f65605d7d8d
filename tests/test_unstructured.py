"""The unstructured baseline: the compact model's nonzeros per layer, reached by gradual magnitude pruning, then
fine-tuned; the bench takes it from a run folder instead of pruning without training."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sslcompress.bench.variants import build_variants, layer_nonzeros
from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_finetune
from sslcompress.finetune.unstructured import (
    layer_weights,
    magnitude_masks,
    pruning_schedule,
    train_unstructured,
)
from sslcompress.flops import Counter

pytestmark = pytest.mark.usefixtures("one_thread")

ONE = dict(epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = FinetuneConfig(run=RunOptions(out=str(out), limit_train=256, limit_test=96, threads=1),
                         pretrain=TrainOptions(epochs=2, batch_size=32, lr=0.05),
                         sparsify=TrainOptions(epochs=2, batch_size=32, lr=0.02, weight_decay=0.0,
                                               schedule="constant"),
                         finetune=TrainOptions(epochs=1, batch_size=32, lr=0.01), target_flops=0.3)
    run_finetune(cfg)
    return out


@pytest.fixture(scope="module")
def trained(run_dir):
    return train_unstructured(run_dir / "pretrained.pt", run_dir / "sparse.pt", run_dir / "unstructured.pt")


def test_pruning_schedule_ends_on_the_target_and_never_grows():
    kept = [pruning_schedule(s, 40, 1000, 25) for s in range(0, 45)]
    assert kept[0] == 1000 and kept[40] == 25 and kept[-1] == 25
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert kept[10] < 1000 - (1000 - 25) * 0.25  # cubic: most of the pruning early


def test_magnitude_masks_keep_exactly_the_largest():
    w = torch.tensor([[0.5, -3.0, 0.1], [2.0, 0.0, -0.2]])
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(w)
    (mask,) = magnitude_masks(torch.nn.Sequential(model), {"0.weight": 2}).values()
    assert mask.tolist() == [[False, True, False], [True, False, False]]


def test_baseline_keeps_the_compact_models_nonzeros_per_layer(run_dir, trained):
    sparse = load_checkpoint(run_dir / "sparse.pt")
    want = Counter(sparse.build().eval(), sparse.model.input_shape).nonzeros_after()
    got = load_checkpoint(trained.checkpoint)
    assert got.kind == "unstructured"
    weights = layer_weights(got.build())
    assert {n: int(w.count_nonzero()) for n, w in weights.items()} == want == trained.nonzeros
    assert sum(want.values()) < sum(w.numel() for w in weights.values())
    # Unstructured: the zeros are spread, not whole channels.
    fc1 = weights["fc1.weight"]
    assert int((fc1.abs().sum(1) == 0).sum()) < fc1.shape[0] - want["fc1.weight"] // fc1.shape[1]


def test_bench_takes_the_trained_baseline_from_the_run_folder(run_dir, trained):
    variants = build_variants(run_dir)
    assert "unstructured.pt" in variants.unstructured.source and not variants.matching
    assert layer_nonzeros(variants.unstructured.model) == layer_nonzeros(variants.structured.model)


def test_cli_bench_on_the_run_folder_has_no_untrained_note(run_dir, trained):
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--threads", "1", "--batch", "1", "--repeat", "2",
                                    "--warmup", "0", "-q", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    (unstructured,) = [v for v in result["variants"] if v["name"] == "unstructured"]
    assert unstructured["source"].startswith(str(run_dir / "unstructured.pt"))
    assert not any("not retrained" in n for n in result["notes"])


def test_different_models_are_refused(run_dir, tmp_path):
    from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
    from sslcompress.models import ModelSpec, build_model

    spec = ModelSpec("mlp", 10, 1, (28, 28))
    save_checkpoint(tmp_path / "other.pt", Checkpoint("pretrained", spec, build_model(spec).state_dict()))
    with pytest.raises(Exception, match="different models"):
        train_unstructured(tmp_path / "other.pt", run_dir / "sparse.pt", tmp_path / "u.pt")
    assert not (tmp_path / "u.pt").exists()
