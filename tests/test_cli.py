"""The command line: the main job, info, recipes, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def lenet_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-pre")
    res = CliRunner().invoke(main, ["pretrain", "--limit-train", "300", "--epochs", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out / "pretrained.pt"


def _error_line(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_finetune_cli_writes_checkpoint_report_and_json(runner, lenet_ckpt, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--out", str(out), "--limit-train", "300",
                               "--sparsify-epochs", "2", "--finetune-epochs", "1", "--lambda", "filter=0.5",
                               "--lambda", "channel=0.2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["lambdas"] == {"filter": 0.5, "channel": 0.2}
    assert (out / "sparse.pt").is_file() and (out / "report.json").is_file()
    info = runner.invoke(main, ["info", str(out / "sparse.pt")])
    assert info.exit_code == 0 and "conv2" in info.output and "accuracy" in info.output
    info_json = runner.invoke(main, ["info", str(out / "sparse.pt"), "--json"])
    assert json.loads(info_json.output) == report


def test_recipe_fills_options_and_flags_win(runner, lenet_ckpt, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('structures = ["filter"]\nstrength = 0.4\n[lambdas]\nfilter = 0.7\n'
                      '[sparsify]\nepochs = 1\n[finetune]\nepochs = 1\n')
    res = runner.invoke(main, ["finetune", "--recipe", str(recipe), "--weights", str(lenet_ckpt), "--out",
                               str(tmp_path / "o"), "--limit-train", "200", "--finetune-epochs", "0", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["structures"] == ["filter"] and report["lambdas"] == {"filter": 0.7}
    assert "finetune" in report["wall_time_s"]


@pytest.mark.parametrize("args, words", [
    (["info", "missing.pt"], "not found"),
    (["finetune", "--model", "nosuchnet", "--limit-train", "10"], "Unknown model"),
    (["finetune", "--data", "nosuchdata"], "nosuchdata"),
    (["finetune", "--data", "mnist:/nonexistent/mnist.npz"], "not found"),
    (["finetune", "--lambda", "filter=-1"], "non-negative"),
    (["finetune", "--strength", "-0.5"], "non-negative"),
    (["finetune", "--lambda", "filter"], "KIND=VALUE"),
    (["finetune", "--lambda", "bogus=1"], "unknown structure"),
    (["finetune", "--structures", "filter,rows"], "unknown group kind"),
    (["finetune", "--target-flops", "0"], "(0, 1]"),
    (["finetune", "--target-flops", "1.5"], "(0, 1]"),
    (["finetune", "--recipe", "missing.toml"], "not found"),
    (["finetune", "--weights", "missing.pt"], "not found"),
])
def test_bad_input_is_one_line_exit_2(runner, tmp_path, args, words):
    out = tmp_path / "never"
    res = runner.invoke(main, [*args, "--out", str(out)] if args[0] != "info" else args)
    assert words in _error_line(res)
    assert not out.exists()


def test_corrupt_and_foreign_checkpoints(runner, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    assert "not a readable checkpoint" in _error_line(runner.invoke(main, ["info", str(bad)]))
    truncated = tmp_path / "trunc.pt"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    assert "not a readable checkpoint" in _error_line(runner.invoke(main, ["info", str(truncated)]))
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, sd)
    assert "not an sslcompress checkpoint" in _error_line(runner.invoke(main, ["info", str(sd)]))


def test_checkpoint_of_another_architecture(runner, lenet_ckpt, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--model", "mlp", "--out", str(out)])
    assert "checkpoint of lenet5, not of mlp" in _error_line(res)
    state = tmp_path / "state.pt"
    torch.save(torch.load(lenet_ckpt, weights_only=True)["state_dict"], state)
    res = runner.invoke(main, ["finetune", "--weights", str(state), "--model", "mlp", "--out", str(out)])
    assert "does not fit this model" in _error_line(res)
    assert not out.exists()


def test_impossible_target_is_refused_before_training(runner, lenet_ckpt, tmp_path):
    out = tmp_path / "o"
    # Shape groups only thin the conv columns; the fully connected layers keep 17.7% of LeNet's MACs.
    res = runner.invoke(main, ["finetune", "--weights", str(lenet_ckpt), "-s", "shape", "--target-flops", "0.1",
                               "--out", str(out)])
    assert "impossible" in _error_line(res)
    assert not (out / "sparse.pt").exists()


def test_resume_without_state_is_an_error(runner, lenet_ckpt, tmp_path):
    res = runner.invoke(main, ["finetune", "--weights", str(lenet_ckpt), "--resume", "--out", str(tmp_path / "o")])
    assert "nothing to continue" in _error_line(res)


def test_unwritable_run_folder_is_one_line(runner, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = runner.invoke(main, ["pretrain", "--out", str(blocker / "run"), "--limit-train", "50", "--epochs", "0",
                               "-q"])
    assert "Not a directory" in _error_line(res)
