"""Typed errors: the CLI turns each into one clear line and exit code 2."""

from __future__ import annotations


class SSLCompressError(Exception):
    """Base of every error a user can cause; its message is one sentence meant for them."""


class ConfigError(SSLCompressError):
    """An option or recipe value is out of range or inconsistent."""


class UnreachableBudgetError(ConfigError):
    """A budget no connected model of the chosen structures (and --align step) can meet, found before training."""


class UnsupportedModelError(SSLCompressError):
    """The model cannot be built, loaded or analysed."""


class DataError(SSLCompressError):
    """A data set spec or path is wrong or the files are unreadable."""


class CheckpointError(SSLCompressError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class VerificationError(SSLCompressError):
    """A rewritten model does not compute what the original computed."""


class TrainingError(SSLCompressError):
    """Training went wrong in a way a user can fix (diverged loss, empty data)."""


class SurgeryError(SSLCompressError):
    """A surgery pass wrote an invalid graph: a bug in a rule, reported instead of a broken file."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, cut to `limit` characters (its type's name when it says nothing): what a
    one-line message of ours quotes from a library's error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
