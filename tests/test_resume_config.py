"""--resume continues only the run it was started as, and every phase can be resumed.

A resumed run with other options would mix two configurations in one model; each such option is
refused in one line naming it. Pretraining inside finetune writes resume state like the other
phases; the pretrain command, which has none, says so on Ctrl-C.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions
from sslcompress.finetune import pipeline
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_finetune

FAST = ["--limit-train", "200", "--limit-test", "60", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def lenet_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-pre")
    res = CliRunner().invoke(main, ["pretrain", "--epochs", "1", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    return out / "pretrained.pt"


def _interrupt_at(monkeypatch, phase: str, epoch: int):
    """Ctrl-C at the start of `epoch` of `phase` (after the previous epoch's resume state)."""
    real = pipeline.train_epoch

    def train_epoch(*args, **kw):
        if kw["phase"] == phase and kw["epoch"] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "train_epoch", train_epoch)


def _error_line(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


BASE = ["-s", "filter", "--lr", "0.02", "--method", "ssl", "--sparsify-epochs", "2", "--finetune-epochs", "1"]


@pytest.fixture
def interrupted(lenet_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, "sparsify", 1)
        res = CliRunner().invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--out", str(out), *BASE, *FAST])
    assert res.exit_code == 130, res.output
    assert (out / "state.pt").is_file() and not (out / "sparse.pt").exists()
    return out


def _with(args: list[str], flag: str, value: str | None) -> list[str]:
    """BASE with `flag` set to `value` (or left out when value is None)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == flag:
            if value is not None:
                out += [flag, value]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out if flag in args else [*out, flag, value]


@pytest.mark.parametrize("flag,value,named", [
    ("-s", "filter,channel", "-s/--structures"),
    ("-s", None, "-s/--structures"),  # left out: the default is not what the run started with
    ("--lr", "0.05", "--lr"),
    ("--method", "l1", "--method"),
    ("--sparsify-epochs", "3", "--sparsify-epochs"),
    ("--limit-train", "150", "--limit-train"),
])
def test_resume_refuses_a_changed_option(interrupted, lenet_ckpt, flag, value, named):
    args = ["finetune", "--weights", str(lenet_ckpt), "--out", str(interrupted), "--resume"]
    if flag == "--limit-train":
        args += BASE + [a if a != "200" else value for a in FAST]
    else:
        args += _with(BASE, flag, value) + FAST
    line = _error_line(CliRunner().invoke(main, args))
    assert line.startswith("error: --resume:") and f" {named} " in line, line
    # Refused without touching the state: the same options still resume.
    assert (interrupted / "state.pt").is_file() and not (interrupted / "sparse.pt").exists()


def test_resume_refuses_other_weights(interrupted, lenet_ckpt, tmp_path):
    other = tmp_path / "other.pt"
    shutil.copy(lenet_ckpt, other)
    res = CliRunner().invoke(main, ["finetune", "--weights", str(other), "--out", str(interrupted), "--resume",
                                    *BASE, *FAST])
    line = _error_line(res)
    assert "--weights" in line and str(lenet_ckpt) in line, line


def test_resume_with_the_same_options_finishes(interrupted, lenet_ckpt):
    # Where it runs may change (threads), what it computes may not.
    res = CliRunner().invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--out", str(interrupted), "--resume",
                                    *BASE, *[a if a != "1" else "2" for a in FAST]])
    assert res.exit_code == 0, res.output
    assert (interrupted / "sparse.pt").is_file() and not (interrupted / "state.pt").exists()


def test_state_without_options_is_refused(interrupted, lenet_ckpt):
    state = torch.load(interrupted / "state.pt", weights_only=True)
    del state["config"]
    torch.save(state, interrupted / "state.pt")
    line = _error_line(CliRunner().invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--out", str(interrupted),
                                                 "--resume", *BASE, *FAST]))
    assert "without --resume" in line, line


def _cfg(out, **kw):
    return FinetuneConfig(run=RunOptions(data="digits", out=str(out), limit_train=200, limit_test=60, threads=1),
                          strength=0.3, pretrain=TrainOptions(epochs=3, lr=0.02),
                          sparsify=TrainOptions(epochs=1, lr=0.02, weight_decay=0.0, schedule="constant"),
                          finetune=TrainOptions(epochs=1, lr=0.01, weight_decay=0.0), **kw)


def test_pretraining_inside_finetune_resumes_to_the_same_result(tmp_path, monkeypatch):
    whole = run_finetune(_cfg(tmp_path / "whole"))
    with monkeypatch.context() as m:
        _interrupt_at(m, "pretrain", 2)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(_cfg(tmp_path / "cut"))
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert state["phase"] == "pretrain" and state["epoch"] == 1
    resumed = run_finetune(_cfg(tmp_path / "cut", resume=True))
    a = load_checkpoint(whole.checkpoint).state_dict
    b = load_checkpoint(resumed.checkpoint).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa = load_checkpoint(tmp_path / "whole" / "pretrained.pt").state_dict
    pb = load_checkpoint(tmp_path / "cut" / "pretrained.pt").state_dict
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_pretrain_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    args = ["pretrain", "--epochs", "3", *FAST]
    whole = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    with monkeypatch.context() as m:
        _interrupt_at(m, "pretrain", 2)
        res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cut")])
    assert res.exit_code == 130 and "rerun with --resume" in res.output, res.output
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert (state["command"], state["phase"], state["epoch"]) == ("pretrain", "pretrain", 1)
    # Another learning rate is refused by name; the same options finish the run.
    line = _error_line(CliRunner().invoke(main, [*args, "--lr", "0.5", "--out", str(tmp_path / "cut"), "--resume"]))
    assert "--lr" in line, line
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["pretrained.pt"]
    a = load_checkpoint(tmp_path / "whole" / "pretrained.pt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "pretrained.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_state_of_the_other_command_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, "pretrain", 1)
        assert CliRunner().invoke(main, ["pretrain", "--epochs", "2", *FAST, "--out", str(out)]).exit_code == 130
    line = _error_line(CliRunner().invoke(main, ["finetune", *FAST, "--out", str(out), "--resume"]))
    assert "sslcompress pretrain --out" in line and "--resume" in line, line
    assert (out / "state.pt").is_file()  # refused, not consumed
