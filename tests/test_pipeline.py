"""End to end on the bundled digits: pretrain, SSL, masks, resume, report.

The runs train on a fixed subset of the training images (all 360 test images), in batches of 16:
a few seconds each on one thread, yet enough steps for SSL to prune and the model to learn.
"""

from __future__ import annotations

import json

import pytest
import torch

from sslcompress.config import FinetuneConfig, PretrainConfig, RunOptions, TrainOptions
from sslcompress.errors import TrainingError, UnreachableBudgetError
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_finetune, run_pretrain

LIMIT_TRAIN = 480  # of 1437 training images
BATCH = 16  # 30 steps an epoch: SSL's proximal threshold is lr * lambda per step


def _opts(epochs, lr, **kw) -> TrainOptions:
    return TrainOptions(epochs=epochs, lr=lr, batch_size=BATCH, **kw)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    res = run_pretrain(PretrainConfig(run=RunOptions(model="lenet5", data="digits", out=str(out),
                                                     limit_train=LIMIT_TRAIN),
                                      train=_opts(4, 0.02)))
    return res


def _cfg(out, weights, **kw):
    base = dict(
        run=RunOptions(data="digits", weights=str(weights), out=str(out), limit_train=LIMIT_TRAIN),
        strength=0.3,
        sparsify=_opts(8, 0.02, weight_decay=0.0),
        finetune=_opts(3, 0.01, weight_decay=0.0),
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_pretrained_baseline_is_accurate(pretrained):
    ckpt = load_checkpoint(pretrained.checkpoint)
    assert ckpt.kind == "pretrained" and ckpt.model.name == "lenet5"
    assert ckpt.metrics["accuracy"] > 0.9


def test_ssl_cuts_macs_and_keeps_accuracy(pretrained, tmp_path):
    res = run_finetune(_cfg(tmp_path, pretrained.checkpoint))
    rep = res.report
    acc = rep["accuracy"]
    # The stated margin: at most 5 points of test accuracy lost on digits (360 test images).
    assert acc["after_finetune"] >= acc["before"] - 0.05
    assert rep["totals"]["macs_fraction"] < 0.6
    conv1 = next(lay for lay in rep["layers"] if lay["name"] == "conv1")
    conv2 = next(lay for lay in rep["layers"] if lay["name"] == "conv2")
    assert conv1["filters"][0] < 20 and conv2["channels"][0] == conv1["filters"][0]
    # The files: checkpoint with masks, JSON report equal to the one returned, no resume state left.
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert not (tmp_path / "state.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    ckpt = load_checkpoint(res.checkpoint)
    # Thinned: the zero channels are sliced out; masks hold what zero groups the thinned model still has.
    assert ckpt.kind == "sparse" and ckpt.thin
    # Masks held through fine-tuning: every masked weight is exactly zero in the final weights.
    for name, keep in ckpt.masks.items():
        w = ckpt.state_dict[name]
        assert bool((w[~keep] == 0).all()), name
    assert rep["accuracy"]["after_finetune"] == pytest.approx(ckpt.metrics["after_finetune"])


def test_target_flops_is_met(pretrained, tmp_path):
    res = run_finetune(_cfg(tmp_path, pretrained.checkpoint, strength=0.05, target_flops=0.3,
                            sparsify=_opts(4, 0.02, weight_decay=0.0),
                            finetune=_opts(1, 0.01, weight_decay=0.0)))
    assert res.report["totals"]["macs_fraction"] <= 0.3
    assert res.report["target_flops"] == 0.3
    _assert_connected(res.checkpoint)


def _assert_connected(path):
    """The output still depends on the input: removal did not cut the network."""
    model = load_checkpoint(path).build()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 28, 28))
    assert not torch.equal(y[0], y[1])


def test_forced_target_never_cuts_the_network(pretrained, tmp_path):
    # A weak lambda leaves the target to the forced zeroing, which must stop short of cutting.
    res = run_finetune(_cfg(tmp_path, pretrained.checkpoint, strength=0.001, target_flops=0.03,
                            sparsify=_opts(1, 0.02, weight_decay=0.0),
                            finetune=_opts(1, 0.01, weight_decay=0.0)))
    assert res.report["forced_groups"] > 0
    assert res.report["totals"]["macs_fraction"] <= 0.03
    _assert_connected(res.checkpoint)


def test_target_below_the_smallest_connected_model_is_refused_up_front(pretrained, tmp_path):
    # One conv1 filter alone costs 14,400 of LeNet's 2,293,000 MACs (0.6%). The floor counts the channel each
    # remaining layer must still read (as the export keeps it), so the smallest connected LeNet is the floor,
    # and a target under it is refused before any training (--min-keep 0: no floor under the widths).
    with pytest.raises(UnreachableBudgetError, match=r"impossible: .* at most 99\.3% of the MACs"):
        run_finetune(_cfg(tmp_path, pretrained.checkpoint, strength=0.001, target_flops=0.001, min_keep=0.0,
                          sparsify=_opts(1, 0.02, weight_decay=0.0),
                          finetune=_opts(1, 0.01, weight_decay=0.0)))
    assert not (tmp_path / "sparse.pt").exists()


def test_sparsify_that_cuts_the_network_is_an_error(pretrained, tmp_path):
    with pytest.raises(TrainingError, match="cut the network"):
        run_finetune(_cfg(tmp_path, pretrained.checkpoint, strength=50.0, min_keep=0.0,
                          sparsify=_opts(1, 0.02, weight_decay=0.0)))


def test_shape_structures_cut_gemm_macs(pretrained, tmp_path):
    res = run_finetune(_cfg(tmp_path, pretrained.checkpoint, structures=("shape",), strength=0.3,
                            sparsify=_opts(4, 0.02, weight_decay=0.0),
                            finetune=_opts(1, 0.01, weight_decay=0.0)))
    conv2 = next(lay for lay in res.report["layers"] if lay["name"] == "conv2")
    assert conv2["columns"][0] < conv2["columns"][1]
    assert conv2["macs_gemm_after"] == conv2["filters"][0] * conv2["columns"][0] * 8 * 8


def test_l1_method_gives_elementwise_zeros(pretrained, tmp_path):
    res = run_finetune(_cfg(tmp_path, pretrained.checkpoint, method="l1", strength=0.02,
                            sparsify=_opts(3, 0.02, weight_decay=0.0),
                            finetune=_opts(1, 0.01, weight_decay=0.0)))
    assert res.report["weight_sparsity"] > 0.3
    ckpt = load_checkpoint(res.checkpoint)
    zeros = sum(int((~m).sum()) for m in ckpt.masks.values())
    assert zeros > 0


# With a budget reached over the epochs by the Taylor ranking: the scores start afresh each epoch, as a resumed
# run's do, so the paced zeroings of the resumed epoch are those of the uninterrupted run.
@pytest.mark.parametrize(("extra", "stop_epoch"), [({}, 2), ({"importance": "taylor", "target_flops": 0.15}, 1)],
                         ids=["lambda", "taylor"])
def test_resume_continues_to_the_same_result(pretrained, tmp_path, extra, stop_epoch):
    kw = dict(sparsify=_opts(3, 0.02, weight_decay=0.0),
              finetune=_opts(2, 0.01, weight_decay=0.0), **extra)
    whole = run_finetune(_cfg(tmp_path / "whole", pretrained.checkpoint, **kw))

    class Stop(Exception):
        pass

    def interrupt(event):
        if event.phase == "sparsify" and event.epoch == stop_epoch and event.step == 1:
            raise Stop

    with pytest.raises(Stop):
        run_finetune(_cfg(tmp_path / "cut", pretrained.checkpoint, **kw), interrupt)
    assert (tmp_path / "cut" / "state.pt").exists() and not (tmp_path / "cut" / "sparse.pt").exists()
    resumed = run_finetune(_cfg(tmp_path / "cut", pretrained.checkpoint, resume=True, **kw))
    a = load_checkpoint(whole.checkpoint).state_dict
    b = load_checkpoint(resumed.checkpoint).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
