"""The `sslcompress` command: a thin click layer over the library. Only this package talks to the user.

One module per stage: train (pretrain, finetune, info), cut (surgery, export), bench (bench, demo).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import SSLCompressError

EPILOG_DATA = ("Data sets: digits (default, bundled with scikit-learn), mnist:PATH, cifar10:PATH, "
               "imagefolder:PATH, npz:PATH, synthetic[:CxHxW:K].")


class _Group(click.Group):
    """Turns our typed errors into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SSLCompressError as exc:
            # One line, whatever the message holds.
            click.echo("error: " + " ".join(str(exc).split()), err=True)
            sys.exit(2)
        except OSError as exc:
            # A full disk, a folder we may not write: the user's to fix, so one line, no traceback.
            click.echo(f"error: {exc.strerror or exc} ({exc.filename or 'I/O'})", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if ctx.invoked_subcommand == "finetune":
                click.echo("interrupted; rerun with --resume to continue from the last finished epoch", err=True)
            else:  # no other command keeps a resume state
                click.echo("interrupted; rerun the command to start over (only finetune can --resume)", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sslcompress")
def main() -> None:
    """Structured Sparsity Learning for CNNs: finetune -> export -> bench."""



from . import bench, cut, train  # noqa: E402,F401  (the commands register themselves on `main`)
