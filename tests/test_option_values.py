"""Values click cannot check (a recipe's types, NaN, a float32 overflow, a device name, the user's model) are
refused in one line before any work, from the command line, a recipe and the Python API alike."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, PretrainConfig, RunOptions, TrainOptions, build_config
from sslcompress.errors import ConfigError, UnsupportedModelError
from sslcompress.finetune.pipeline import run_finetune, run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--limit-train", "64", "--limit-test", "32", "--threads", "1", "-q"]


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--device", "foo"], "--device"),
    (["--device", "tpu"], "cpu, cuda or cuda:N"),
    (["--lr", "1e300"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--finetune-lr", "inf"], "--finetune-lr"),
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "-1"], "non-negative"),
    (["--strength", "1e39"], "--strength"),
    (["--lambda", "filter=nan"], "--lambda filter="),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**40)], "--seed"),
    (["--target-params", "0"], "(0, 1]"),
    (["--target-params", "nan"], "--target-params"),
    (["--align", "0"], "--align"),
    (["--align", "-8"], "--align"),
    (["--budget-every", "0"], "--budget-every"),
    (["--method", "l1", "--align", "4"], "needs --method ssl"),
])
def test_flag_values_refused(tmp_path, args, words):
    out = tmp_path / "run"
    line = _one_error_line(CliRunner().invoke(main, ["finetune", *args, *SMALL, "--out", str(out)]))
    assert words in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message of a machine without CUDA")
def test_cuda_without_gpu_refused(tmp_path):
    line = _one_error_line(CliRunner().invoke(main, ["finetune", "--device", "cuda:0", *SMALL,
                                                     "--out", str(tmp_path / "run")]))
    assert "no CUDA GPU" in line


@pytest.mark.parametrize("recipe, words", [
    ('seed = "abc"', "seed (--seed)"),
    ("seed = 1.5", "seed (--seed)"),
    ("structures = 5", "structures"),
    ('structures = ["filter", 3]', "structures"),
    ('[sparsify]\nepochs = "3"', "sparsify.epochs (--sparsify-epochs)"),
    ("[sparsify]\nepochs = 2.0", "sparsify.epochs"),
    ("[sparsify]\nlr = true", "sparsify.lr (--lr)"),
    ("[finetune]\nlr = -0.1", "finetune.lr (--finetune-lr)"),
    ("[finetune]\nmomentum = 1.0", "finetune.momentum"),
    ("[pretrain]\nweight_decay = nan", "pretrain.weight_decay"),
    ('[pretrain]\nschedule = "linear"', "pretrain.schedule"),
    ("[pretrain]\nbatch_size = 0", "pretrain.batch_size (--batch-size)"),
    ("limit_train = -5", "limit_train (--limit-train)"),
    ("limit_test = 0", "limit_test (--limit-test)"),
    ("threads = 0", "threads (--threads)"),
    ("eval_batch_size = true", "eval_batch_size"),
    ('target_flops = "x"', "target_flops (--target-flops)"),
    ("target_flops = 2", "target_flops"),
    ('[lambdas]\nfilter = "x"', "lambdas.filter"),
    ("lambdas = 3", "lambdas"),
    ("strength = -1", "strength (--strength)"),
    ('weighting = "cube"', "weighting"),
    ('solver = "adam"', "solver"),
    ("device = 3", "device (--device)"),
    ('device = "cuda:x"', "device (--device)"),
    ("data = 3", "data"),
    ("model = 7", "model (--model)"),
    ('resume = "yes"', "resume"),
    ("sparsify = 3", "sparsify"),
    ("target_params = 0", "target_params (--target-params) must be a number in (0, 1]"),
    ("target_params = 1.5", "target_params (--target-params)"),
    ('target_params = "half"', "target_params (--target-params)"),
    ("align = 0", "align (--align) must be a whole number"),
    ("align = 2.5", "align (--align)"),
    ("align = true", "align (--align)"),
    ("budget_every = 0", "budget_every (--budget-every) must be a whole number >= 1"),
    ('method = "l1"\ntarget_params = 0.5', "--target-params needs --method ssl"),
    ('method = "l1"\nalign = 8', "--align needs --method ssl"),
    ('structures = ["shape"]\nalign = 8', "needs filter or channel"),
    ('thin = "yes"', "thin (--thin/--no-thin)"),
    ('pace = 1', "pace (--pace/--no-pace)"),
])
def test_recipe_values_refused(tmp_path, recipe, words):
    path = tmp_path / "recipe.toml"
    path.write_text(recipe + "\n")
    out = tmp_path / "run"
    line = _one_error_line(CliRunner().invoke(main, ["finetune", "--recipe", str(path), "--out", str(out), "-q"]))
    assert words in line
    assert not out.exists()


def test_pretrain_recipe_values_refused(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('lr = "x"\n')
    line = _one_error_line(CliRunner().invoke(main, ["pretrain", "--recipe", str(path), "--out", str(tmp_path / "r")]))
    assert "train.lr (--lr)" in line


def test_good_recipe_values_still_accepted():
    cfg = build_config(FinetuneConfig, {"seed": 3, "structures": ["filter"], "lambdas": {"filter": 1},
                                        "sparsify": {"lr": 1, "epochs": 2}, "target_flops": 1}, {})
    assert cfg.run.seed == 3 and cfg.lambda_for("filter") == 1 and cfg.sparsify.lr == 1


@pytest.mark.parametrize("change", [
    {"run": RunOptions(device="foo")},
    {"run": RunOptions(seed=-1)},
    {"run": RunOptions(limit_train=0)},
    {"run": "not options"},
    {"sparsify": TrainOptions(lr=float("nan"))},
    {"sparsify": TrainOptions(lr="0.1")},
    {"finetune": TrainOptions(epochs=True)},
    {"threshold": float("nan")},
    {"strength": float("inf")},
    {"lambdas": {"filter": None}},
    {"lambdas": [("filter", 1.0)]},
    {"weighting": "cube"},
    {"resume": 1},
])
def test_api_configs_refused_before_work(tmp_path, change):
    cfg = dataclasses.replace(FinetuneConfig(run=RunOptions(out=str(tmp_path / "run"))), **change)
    with pytest.raises(ConfigError):
        run_finetune(cfg)
    assert not (tmp_path / "run").exists()


def test_api_pretrain_config_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        run_pretrain(PretrainConfig(run=RunOptions(out=str(tmp_path / "r")), train=TrainOptions(lr=1e300)))


USER_MODELS = textwrap.dedent("""
    import torch.nn as nn

    def frozen():
        m = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def no_params():
        return nn.Sequential(nn.Flatten(), nn.Identity())

    def wrong_input():
        return nn.Sequential(nn.Flatten(), nn.Linear(5, 10))

    def wrong_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 7))

    def returns_tuple():
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(28 * 28, 10)

            def forward(self, x):
                return (self.fc(x.flatten(1)),)
        return M()
""")


@pytest.mark.parametrize("factory, words", [
    ("frozen", "no trainable parameters"),
    ("no_params", "no trainable parameters"),
    ("wrong_input", "cannot run on the data's images"),
    ("wrong_classes", "gives (2, 7)"),
    ("returns_tuple", "gives tuple"),
])
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_user_models_that_cannot_train(tmp_path, factory, words, command):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [command, "--model", f"{tmp_path / 'user_models.py'}:{factory}", *SMALL,
                                    "--out", str(out)])
    assert words in _one_error_line(res)
    assert not out.exists()


def test_user_model_check_is_library_side(tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    cfg = PretrainConfig(run=RunOptions(model=f"{tmp_path / 'user_models.py'}:frozen", out=str(tmp_path / "r"),
                                        limit_train=64, limit_test=32))
    with pytest.raises(UnsupportedModelError, match="no trainable parameters"):
        run_pretrain(cfg)


def _small_file_limit():
    # In the child: writes past 256 KiB fail with EFBIG, as a full disk fails with ENOSPC (an OSError inside
    # torch.save, which torch's own zip writer would turn into a RuntimeError).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs a file size limit (POSIX)")
def test_a_failed_checkpoint_write_is_one_line_naming_the_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pretrained.pt").write_bytes(b"the previous checkpoint")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sslcompress.cli", "pretrain", "--epochs", "1", *SMALL,
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_small_file_limit)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    # The first file over the limit is the resume state written after the first epoch.
    assert str(out / "state.pt") in lines[0] and "File too large" in lines[0] and ".tmp" not in lines[0]
    assert (out / "pretrained.pt").read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in out.iterdir()) == ["pretrained.pt"]  # no temporary file, no lock left


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
    from sslcompress.models import ModelSpec, build_model

    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    save_checkpoint(folder / "sparse.pt", Checkpoint("sparse", spec, build_model(spec).state_dict()))
    res = CliRunner().invoke(main, ["export", str(folder / "sparse.pt"), "--onnx", str(folder / "c.onnx"),
                                    "--uncut", str(folder / "u.onnx")])
    assert res.exit_code == 0, res.output
    return folder


@pytest.mark.parametrize("args, words", [
    (["--threads", str(len(os.sched_getaffinity(0)) + 1)], "CPU(s) this process may use"),
    (["--min-time", "nan"], "--min-time"),
    (["--min-time", "inf"], "--min-time"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**33)], "--seed"),
])
def test_bench_values_refused(small_onnx, tmp_path, args, words):
    res = CliRunner().invoke(main, ["bench", str(small_onnx / "u.onnx"), "--batch", "1", "-q", *args,
                                    "--out", str(tmp_path / "r.json")])
    assert words in _one_error_line(res)
    assert not (tmp_path / "r.json").exists()


def test_export_opset_beyond_the_exporter_is_one_line_and_silent(small_onnx, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sslcompress.cli", "export", str(small_onnx / "sparse.pt"),
                           "--onnx", str(tmp_path / "m.onnx"), "--opset", "99"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--opset must be from 11 to" in proc.stderr
