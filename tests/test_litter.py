"""No litter: a refused run leaves no resume state, a killed writer's temporary files and bench folders are
removed by the next one, a killed bench leaves no probe running, and one run folder holds one run at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import sslcompress.io as sio
from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions
from sslcompress.errors import ConfigError, TrainingError
from sslcompress.finetune.pipeline import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--limit-train", "64", "--limit-test", "32", "--threads", "1", "-q"]
ONE = TrainOptions(epochs=1, batch_size=32, lr=0.02)


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_refused_run_leaves_no_resume_state_but_keeps_the_baseline(tmp_path):
    out = tmp_path / "run"
    cfg = FinetuneConfig(run=RunOptions(out=str(out), limit_train=64, limit_test=32, threads=1), pretrain=ONE,
                         sparsify=TrainOptions(epochs=1, batch_size=32, lr=1e30), finetune=ONE)
    with pytest.raises(TrainingError, match="diverged") as info:
        run_finetune(cfg)
    assert not (out / "state.pt").exists()
    assert str(out / "pretrained.pt") in str(info.value) and "--weights" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["pretrained.pt"]
    # --resume has nothing to replay: it says so instead of repeating the divergence.
    with pytest.raises(Exception, match="no resume state"):
        run_finetune(FinetuneConfig(**{**cfg.__dict__, "resume": True}))


def test_refused_resume_keeps_the_state_it_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(b"an interrupted run's state")
    cfg = FinetuneConfig(run=RunOptions(out=str(out), limit_train=64, threads=1), resume=True)
    with pytest.raises(Exception, match="resume state"):
        run_finetune(cfg)
    assert (out / "state.pt").read_bytes() == b"an interrupted run's state"


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".pretrained.pt.{dead}.k2j3.tmp"
    other_stale = tmp_path / f".report.json.{dead}.zz.tmp"
    live = tmp_path / f".pretrained.pt.{alive}.abcd.tmp"
    foreign = tmp_path / ".pretrained.pt.notapid.tmp"
    for p in (stale, other_stale, live, foreign):
        p.write_bytes(b"x")
    sio.atomic_write_bytes(b"new", tmp_path / "pretrained.pt")
    assert (tmp_path / "pretrained.pt").read_bytes() == b"new"
    assert not stale.exists()
    assert other_stale.exists() and live.exists() and foreign.exists()  # another output's, a live one's, not ours
    assert sio.remove_stale_temps(tmp_path) == [other_stale]
    assert live.exists() and foreign.exists()


def test_a_run_clears_its_folder_of_a_killed_runs_temporaries(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".state.pt.{_dead_pid()}.q1.tmp"
    stale.write_bytes(b"half a state")
    res = CliRunner().invoke(main, ["pretrain", "--epochs", "1", *SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["pretrained.pt"]


def test_second_run_into_a_held_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with sio.run_lock(out):
        res = CliRunner().invoke(main, ["pretrain", "--epochs", "1", *SMALL, "--out", str(out)])
        assert res.exit_code == 2
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "another sslcompress run" in lines[0] and str(os.getpid()) in lines[0]
        assert not (out / "pretrained.pt").exists()
    res = CliRunner().invoke(main, ["pretrain", "--epochs", "1", *SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not (out / sio.LOCK_NAME).exists()


def test_run_lock_is_refused_in_process_and_released_on_error(tmp_path):
    with pytest.raises(RuntimeError), sio.run_lock(tmp_path):
        with pytest.raises(ConfigError, match="another sslcompress run"), sio.run_lock(tmp_path):
            pass
        raise RuntimeError("the run failed")
    with sio.run_lock(tmp_path):  # released by the failure
        pass


def test_a_refused_run_removes_the_folder_it_made(tmp_path):
    out = tmp_path / "new" / "run"
    res = CliRunner().invoke(main, ["pretrain", "--data", "synthetic:1x8x8:0", *SMALL, "--out", str(out)])
    assert res.exit_code == 2
    assert not out.exists()


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sslcompress.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_never_blocks_the_next(tmp_path, how):
    out = tmp_path / "run"
    proc = _cli("pretrain", "--epochs", "50", *SMALL, "--out", str(out))
    # SIGKILL as soon as the folder is held; SIGTERM once training runs (past the imports, where an extension
    # module may swallow the interruption: the CLI then sends it again, which takes a moment more).
    started = (out / sio.LOCK_NAME) if how == signal.SIGKILL else (out / "state.pt")
    _wait_for(lambda: started.exists() or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(how)
    _, err = proc.communicate(timeout=120)
    if how == signal.SIGTERM:  # unwinds like Ctrl-C: one line, the lock and every temporary file gone
        assert proc.returncode == 130, err
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err
        assert (out / "state.pt").is_file()  # an interruption keeps the resume state
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == sio.LOCK_NAME]
    res = CliRunner().invoke(main, ["pretrain", "--epochs", "1", *SMALL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["pretrained.pt"]


def test_private_temp_dirs_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"sslcompress-bench-{_dead_pid()}-abc"
    live = tmp_path / f"sslcompress-bench-{os.getpid()}-xyz"
    other = tmp_path / f"sslcompress-plot-{_dead_pid()}-abc"
    for d in (dead, live, other):
        d.mkdir()
        (d / "dense.onnx").write_bytes(b"x")
    with sio.private_temp_dir("sslcompress-bench") as folder:
        assert folder.name.startswith(f"sslcompress-bench-{os.getpid()}-") and folder.is_dir()
        (folder / "m.onnx").write_bytes(b"x")
    assert not folder.exists() and not dead.exists()
    assert live.exists() and other.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_memory_probe_child_dies_with_a_killed_bench(tmp_path):
    # A stand-in bench: starts a long child the way the memory probe is started, prints its pid, waits.
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, pathlib
        from sslcompress.bench.memory import _die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 preexec_fn=_die_with_parent)
        pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))
        child.wait()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    _wait_for(lambda: pid_file.exists() and pid_file.read_text())
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except OSError:
            return True
        return state == "Z"  # ended; waiting for init to reap it

    _wait_for(gone, timeout=30)


def test_bench_models_dir_is_written_with_the_other_outputs(tmp_path, monkeypatch, sparse_ckpt, fail_writes):
    """--models-dir belongs to the all-or-none group: a failed --markdown write leaves no model behind."""
    ckpt = sparse_ckpt
    models, md = tmp_path / "models", tmp_path / "r.md"
    fail_writes(md.name)
    fast = ["--threads", "1", "--batch", "1", "--repeat", "2", "--warmup", "0", "-q"]
    res = CliRunner().invoke(main, ["bench", str(ckpt), *fast, "--models-dir", str(models), "--markdown", str(md)])
    assert res.exit_code == 2, res.output
    assert str(md) in res.output and "No space left" in res.output
    assert not md.exists() and not list(models.glob("*.onnx"))
    monkeypatch.undo()
    res = CliRunner().invoke(main, ["bench", str(ckpt), *fast, "--models-dir", str(models), "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in models.iterdir()) == ["dense.onnx", "structured.onnx", "unstructured.onnx"]
