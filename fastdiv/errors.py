"""fastdiv's error types: one per kind of fault, each with the exit code the ``fastdiv`` command ends with.

Every file fastdiv reads (checkpoints, best weights, ``config.json``, ``metrics.jsonl``, the partial rows of
an evaluation, datasets, ``--config``, ``--weights``, ``--data``, saved adversarial examples) and every
setting it checks fails with one of these, and the message says which file or argument, what was expected,
what was found and what to do. :func:`fastdiv.cli.main` prints that one message as
``fastdiv COMMAND: error: MESSAGE`` (no traceback unless ``--debug`` or ``FASTDIV_DEBUG=1``) and exits with
the error's :attr:`~FastdivError.exit_code`:

* 0: done;
* 1: an unexpected internal error (a bug: rerun with ``--debug`` for the traceback);
* 2: bad input: a bad flag value or setting, a missing file, a file the user gave that does not fit
  (:class:`BadInputError`, :class:`MissingFileError`), and argparse's own usage errors;
* 3: a corrupted or unsafe file (:class:`CorruptFileError`, :class:`UnsafeFileError`), or a training loss
  that became NaN/Inf;
* 4: an output could not be written: the disk is full or the device failed (:class:`WriteError`);
* 130: interrupted by Ctrl-C (KeyboardInterrupt); ``fastdiv train`` stopped by signal N exits 128+N.

The types also derive from the builtin exception a caller of the Python API would expect (``ValueError``
for bad values and unreadable files, ``OSError`` for write failures), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["EXIT_CODES", "BadInputError", "CorruptFileError", "FastdivError", "MissingFileError", "UnsafeFileError",
           "WriteError", "debug_enabled", "to_fastdiv_error"]

#: The exit codes of ``fastdiv``, as documented in docs/errors.md (a test keeps the two in step).
EXIT_CODES = {
    0: "done",
    1: "unexpected internal error (a bug; --debug shows the traceback)",
    2: "bad input: a flag value, a setting or a file the user gave",
    3: "a corrupted or unsafe file, or a non-finite training loss",
    4: "an output could not be written (disk full, I/O error)",
    130: "interrupted (Ctrl-C)",
}

#: errno values that mean "the device is full" (ENOSPC; EDQUOT: the user's quota)
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class FastdivError(Exception):
    """A fault fastdiv recognizes, with a message for the user. ``path``: the file concerned (or None);
    ``exit_code``: the exit code of the ``fastdiv`` command line (see the module docs)."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:  # OSError subclasses would print their args tuple otherwise
        return str(self.args[0]) if self.args else ""


class BadInputError(FastdivError, ValueError):
    """A flag value, setting or user-given file that cannot be used as given (exit code 2)."""

    exit_code = 2


class MissingFileError(BadInputError, FileNotFoundError):
    """A file or directory the user named (or that a run directory must hold) does not exist (exit code 2)."""


class CorruptFileError(FastdivError, ValueError):
    """A file that exists but cannot be read as what it should be: truncated, damaged, of another format,
    or inconsistent with the run it belongs to (exit code 3)."""

    exit_code = 3


class UnsafeFileError(CorruptFileError):
    """A pickle that holds Python objects other than tensors and plain containers: refused, never
    unpickled (exit code 3)."""


class WriteError(FastdivError, OSError):
    """An output that could not be written: the disk is full, or the device failed (exit code 4). The
    file being replaced, if any, is left as it was."""

    exit_code = 4


def debug_enabled() -> bool:
    """``FASTDIV_DEBUG`` set to anything but '', '0', 'false' or 'no': tracebacks are shown."""
    return os.environ.get("FASTDIV_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def to_fastdiv_error(exc: BaseException) -> FastdivError | None:
    """``exc`` as the :class:`FastdivError` the command line reports, or None when it is not a fault
    fastdiv recognizes (a bug, reported as one).

    A full disk becomes a :class:`WriteError`; the ``ValueError`` / ``FileNotFoundError`` /
    ``FileExistsError`` / ``NotADirectoryError`` that the drivers raise for bad settings and paths
    become :class:`BadInputError` (exit code 2, as before there were fastdiv error types)."""
    if isinstance(exc, FastdivError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return WriteError(f"no space left on the device{where} ({os.strerror(exc.errno)}): the file being "
                          "replaced, if any, was kept; free some space or choose another --out, then rerun "
                          "(fastdiv train --resume and fastdiv evaluate --resume continue where the run stopped)",
                          exc.filename)
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return WriteError(f"input/output error on {exc.filename or 'a file'}: the device failed; check it and "
                          "rerun", exc.filename)
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError)):
        text = str(exc) if exc.filename is None else f"{exc.filename}: {exc.strerror}"
        return BadInputError(text, exc.filename)
    if isinstance(exc, ValueError):
        return BadInputError(str(exc))
    return None
