"""A phase that would take no optimizer step is refused before any training (issue 9)."""

from __future__ import annotations

import pytest

from sslcompress.config import FinetuneConfig, PretrainConfig, RunOptions, TrainOptions
from sslcompress.errors import ConfigError
from sslcompress.finetune import pipeline


def _run(out, limit_train, **kw) -> RunOptions:
    return RunOptions(model="lenet5", data="digits", out=str(out), limit_train=limit_train, limit_test=16,
                      threads=1, **kw)


def _no_training(monkeypatch):
    def never(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(pipeline, "train_epoch", never)


def test_pretrain_batch_above_limit_train(monkeypatch, tmp_path):
    _no_training(monkeypatch)
    out = tmp_path / "run"
    cfg = PretrainConfig(run=_run(out, 50), train=TrainOptions(epochs=1, batch_size=64))
    with pytest.raises(ConfigError, match=r"pretrain would take no optimizer step: --batch-size 64 .*50 training "
                                          r"images \(--limit-train 50\)"):
        pipeline.run_pretrain(cfg)
    assert not out.exists()


def test_pretrain_batch_above_the_whole_training_set(monkeypatch, tmp_path):
    _no_training(monkeypatch)
    cfg = PretrainConfig(run=_run(tmp_path / "run", None), train=TrainOptions(epochs=1, batch_size=5000))
    with pytest.raises(ConfigError, match=r"--batch-size 5000 is larger than the \d+ training images;"):
        pipeline.run_pretrain(cfg)


@pytest.mark.parametrize("phase", ["pretrain", "sparsify", "finetune"])
def test_finetune_refuses_before_its_first_phase(monkeypatch, tmp_path, phase):
    _no_training(monkeypatch)
    ok, bad = TrainOptions(epochs=1, batch_size=16), TrainOptions(epochs=1, batch_size=40)
    cfg = FinetuneConfig(run=_run(tmp_path / "run", 32), **{p: (bad if p == phase else ok)
                                                            for p in ("pretrain", "sparsify", "finetune")})
    with pytest.raises(ConfigError, match=f"{phase} would take no optimizer step: --batch-size 40"):
        pipeline.run_finetune(cfg)
    assert not (tmp_path / "run").exists()


def test_zero_epochs_is_not_refused(tmp_path):
    cfg = PretrainConfig(run=_run(tmp_path / "run", 8), train=TrainOptions(epochs=0, batch_size=64))
    assert pipeline.run_pretrain(cfg).checkpoint.exists()


def test_a_batch_equal_to_the_training_set_trains(tmp_path):
    cfg = PretrainConfig(run=_run(tmp_path / "run", 16), train=TrainOptions(epochs=1, batch_size=16))
    assert pipeline.run_pretrain(cfg).checkpoint.exists()
