"""A short `sslcompress finetune` on the bundled digits through the CLI, for the latency-budget tests."""

from __future__ import annotations

from click.testing import CliRunner

from sslcompress.cli import main


def short_finetune(tmp_path, *extra):
    """(run folder, click result) of a one-epoch-a-phase finetune of LeNet-5 on 256 digits, JSON report."""
    out = tmp_path / "run"
    return out, CliRunner().invoke(main, ["finetune", "--out", str(out), "--pretrain-epochs", "1", "--sparsify-epochs",
                                          "1", "--finetune-epochs", "1", "--limit-train", "256", "--limit-test",
                                          "64", "--threads", "1", "--json", *extra])
