"""The `sslcompress` command: a thin click layer over the library. Only this package talks to the user.

One module per stage: train (pretrain, finetune, info), cut (surgery, export), bench (bench, demo).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

import click

from ..errors import SSLCompressError

EPILOG_DATA = ("Data sets: digits (default, bundled with scikit-learn), mnist:PATH, cifar10:PATH, "
               "imagefolder:PATH, npz:PATH, synthetic[:CxHxW:K].")


def align_value(value: str | None) -> int | str | None:
    """--align's value as given (finetune, export, surgery): a whole number, auto, or not given."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number nor auto") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_line(exc: click.ClickException) -> str:
    """click's three-line usage error as our one line: what was wrong, in which command, where help is."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "sslcompress"
    message = _one_line(exc.format_message()).rstrip(".")
    return f"error: {where}: {message[:1].lower() + message[1:]} (see '{where} --help')"


_stopping = threading.Event()  # set once an interruption reached the command's handler and cleanup runs
_signalled = threading.Event()  # set by the first SIGTERM: its watcher resends it until the stop arrives


def _terminated(signum: int, _frame: Any) -> None:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: temporary files and folders are removed and
    the run folder is released, instead of the process vanishing mid-write."""
    if _stopping.is_set():
        return
    # An exception raised from a signal handler can be lost inside C code (an extension module's import
    # swallows it): until the stop is seen to arrive, the signal is sent again every half second.
    if not _signalled.is_set():
        _signalled.set()

        def again() -> None:
            while not _stopping.wait(0.5):
                os.kill(os.getpid(), signum)

        threading.Thread(target=again, daemon=True).start()
    raise KeyboardInterrupt


class _Group(click.Group):
    """Turns our typed errors into one line on stderr and exit code 2, never a traceback."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (SystemExit, KeyboardInterrupt) as exc:
            if _signalled.is_set():
                # Stopped by SIGTERM, cleanup done while unwinding: leave now. An interruption that an extension
                # module swallowed can resurface during the interpreter's shutdown and turn exit code 130 into
                # a death by SIGINT.
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130)
            raise
        except click.exceptions.NoArgsIsHelpError as exc:  # `sslcompress` alone: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(_usage_line(exc) if isinstance(exc, click.UsageError) else f"error: {_one_line(exc.format_message())}",
                       err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SSLCompressError as exc:
            # One line, whatever the message holds.
            click.echo("error: " + " ".join(str(exc).split()), err=True)
            sys.exit(2)
        except OSError as exc:
            # A full disk, a folder we may not write: the user's to fix, so one line, no traceback.
            reason = exc.strerror or _one_line(str(exc))
            click.echo(f"error: {exc.filename}: {reason}" if exc.filename else f"error: {reason}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _stopping.set()
            if ctx.invoked_subcommand in ("finetune", "pretrain"):
                click.echo("interrupted; rerun with --resume to continue from the last finished epoch", err=True)
            else:  # no other command keeps a resume state
                click.echo("interrupted; rerun the command to start over (only pretrain and finetune can "
                           "--resume)", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sslcompress")
def main() -> None:
    """Structured Sparsity Learning for CNNs: finetune -> export -> bench."""



from . import bench, cut, profile, quantize, train  # noqa: E402,F401  (the commands register themselves on `main`)
