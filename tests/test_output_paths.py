"""One path in two roles is refused before any work; multi-file outputs are written all or none."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sslcompress.cli import main

FAST = ["--threads", "1", "--batch", "1", "--repeat", "2", "--warmup", "0", "-q"]


@pytest.fixture()
def uncut_onnx(sparse_ckpt, tmp_path):
    u = tmp_path / "u.onnx"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(tmp_path / "c0.onnx"), "--uncut", str(u)])
    assert res.exit_code == 0, res.output
    return u


def _refused(res, *names: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


def _snapshot(*paths):
    return {p: (p.read_bytes() if p.exists() else None) for p in paths}


def test_surgery_same_path_for_output_and_report(uncut_onnx, tmp_path):
    c = tmp_path / "c.onnx"
    _refused(CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(c), "--report", str(c)]),
             "-o/--output", "--report", str(c))
    assert not c.exists()


def test_surgery_report_or_output_over_the_input(uncut_onnx, tmp_path):
    before = uncut_onnx.read_bytes()
    _refused(CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(tmp_path / "c.onnx"),
                                       "--report", str(uncut_onnx)]), "MODEL", "--report")
    _refused(CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(uncut_onnx)]), "MODEL", "-o/--output")
    assert uncut_onnx.read_bytes() == before and not (tmp_path / "c.onnx").exists()


def test_surgery_symlink_to_the_input(uncut_onnx, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(uncut_onnx)
    before = uncut_onnx.read_bytes()
    _refused(CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(link)]), "MODEL", "-o/--output")
    assert uncut_onnx.read_bytes() == before and link.is_symlink()


def test_export_onnx_over_the_checkpoint_and_uncut_equals_onnx(sparse_ckpt, tmp_path):
    before = sparse_ckpt.read_bytes()
    _refused(CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(sparse_ckpt)]),
             "CHECKPOINT", "--onnx")
    assert sparse_ckpt.read_bytes() == before
    x = tmp_path / "x.onnx"
    _refused(CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(x), "--uncut", str(x)]),
             "--onnx", "--uncut", str(x))
    assert not x.exists()
    # through a symlinked folder
    (tmp_path / "alias").symlink_to(tmp_path)
    _refused(CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(x),
                                       "--report", str(tmp_path / "alias" / "x.onnx")]), "--onnx", "--report")
    assert not x.exists()


def test_export_failed_report_leaves_old_outputs(sparse_ckpt, tmp_path):
    out, uncut = tmp_path / "c.onnx", tmp_path / "u.onnx"
    out.write_bytes(b"old compact")
    uncut.write_bytes(b"old uncut")
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--uncut", str(uncut),
                                    "--report", str(tmp_path / "missing-file-not-dir" / "r.json")])
    assert res.exit_code == 0, res.output  # the report's folder is created
    (tmp_path / "blocker").write_text("a file, not a folder")
    out.write_bytes(b"old compact")
    uncut.write_bytes(b"old uncut")
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--uncut", str(uncut),
                                    "--report", str(tmp_path / "blocker" / "r.json")])
    assert res.exit_code == 2, res.output
    assert out.read_bytes() == b"old compact" and uncut.read_bytes() == b"old uncut"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_failed_verification_keeps_old_uncut(sparse_ckpt, tmp_path, broken_surgery):
    out, uncut = tmp_path / "c.onnx", tmp_path / "u.onnx"
    uncut.write_bytes(b"old uncut")
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--uncut", str(uncut)])
    assert "nothing written" in _refused(res)
    assert uncut.read_bytes() == b"old uncut" and not out.exists()


def test_surgery_failing_report_writer_leaves_old_model(uncut_onnx, tmp_path, fail_writes):
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    out.write_bytes(b"old compact")
    fail_writes(rep.name)
    res = CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(out), "--report", str(rep)])
    line = _refused(res, str(rep))
    assert ".tmp" not in line
    assert out.read_bytes() == b"old compact" and not rep.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bench_same_path_and_inputs(sparse_ckpt, uncut_onnx, tmp_path):
    o = tmp_path / "o.json"
    _refused(CliRunner().invoke(main, ["bench", str(sparse_ckpt), *FAST, "--out", str(o), "--markdown", str(o)]),
             "--out", "--markdown")
    dense = tmp_path / "dense.onnx"
    dense.write_bytes(uncut_onnx.read_bytes())
    before = _snapshot(sparse_ckpt, dense)
    _refused(CliRunner().invoke(main, ["bench", str(sparse_ckpt), *FAST, "--plot", str(sparse_ckpt)]),
             "RUN_DIR_OR_CHECKPOINT", "--plot")
    _refused(CliRunner().invoke(main, ["bench", str(sparse_ckpt), "--dense", str(dense), *FAST,
                                       "--models-dir", str(tmp_path)]), "--dense", "--models-dir (dense.onnx)")
    assert _snapshot(sparse_ckpt, dense) == before and not o.exists()


def test_bench_run_dir_checkpoint_as_output(sparse_ckpt, tmp_path):
    before = sparse_ckpt.read_bytes()
    _refused(CliRunner().invoke(main, ["bench", str(tmp_path), *FAST, "--out", str(sparse_ckpt)]),
             "RUN_DIR_OR_CHECKPOINT (sparse.pt)", "--out")
    assert sparse_ckpt.read_bytes() == before


def test_bench_failing_markdown_leaves_old_json(sparse_ckpt, tmp_path):
    o = tmp_path / "o.json"
    o.write_text("old")
    (tmp_path / "blocker").write_text("a file")
    res = CliRunner().invoke(main, ["bench", str(sparse_ckpt), *FAST, "--out", str(o),
                                    "--markdown", str(tmp_path / "blocker" / "b.md")])
    assert res.exit_code == 2, res.output
    assert o.read_text() == "old"


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_train_weights_inside_out_refused(command, sparse_ckpt, tmp_path):
    target = sparse_ckpt if command == "finetune" else sparse_ckpt.with_name("pretrained.pt")
    if command == "pretrain":
        target.write_bytes(sparse_ckpt.read_bytes())
    before = target.read_bytes()
    _refused(CliRunner().invoke(main, [command, "--weights", str(target), "--out", str(tmp_path)]),
             "--weights", "--out")
    assert target.read_bytes() == before


def test_ctrl_c_in_a_command_without_resume_does_not_promise_one(uncut_onnx, tmp_path, monkeypatch):
    from sslcompress.surgery import compress as compress_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_module, "compress", interrupted)
    res = CliRunner().invoke(main, ["surgery", str(uncut_onnx), "-o", str(tmp_path / "c.onnx")])
    assert res.exit_code == 130 and "only pretrain and finetune can --resume" in res.output
    assert not (tmp_path / "c.onnx").exists()
