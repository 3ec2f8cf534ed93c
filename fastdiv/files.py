"""Reading fastdiv's files and checking where outputs go: one path for every file, so that every fault
ends in a :mod:`fastdiv.errors` message that names the file, what was expected, what was found and
what to do (never torch's or the json module's text).

* :func:`load_torch_file`: a ``.pt`` file through ``torch.load(weights_only=True)``; a pickle holding
  other Python objects is refused as unsafe (:class:`~fastdiv.errors.UnsafeFileError`), a truncated,
  empty or foreign file is corrupt (:class:`~fastdiv.errors.CorruptFileError`);
* :func:`read_json_file`: a JSON file;
* :func:`match_state_dict`: a state dict checked against a model (missing and unexpected keys, shapes);
* :func:`prepare_output_dir`: an output directory checked before any work (not a file, writable);
* :func:`file_digest`: the size and SHA-256 of a file (checkpoints are verified by them).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from .errors import BadInputError, CorruptFileError, FastdivError, MissingFileError, UnsafeFileError, to_fastdiv_error

__all__ = ["file_digest", "load_torch_file", "match_state_dict", "prepare_output_dir", "read_file_bytes",
           "read_json_file"]

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_TORCH_FILE = "a file written by torch.save (a zip archive of tensors and plain containers)"


def file_digest(data: bytes) -> dict[str, Any]:
    """``{'size', 'sha256'}`` of ``data`` (the bytes of a file)."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_file_bytes(path: str | os.PathLike, what: str, *, error: type[FastdivError] = CorruptFileError,
                    fix: str = "") -> bytes:
    """The bytes of the file ``path`` (``what`` names it in messages, e.g. ``'--weights'`` or
    ``'checkpoint'``). A directory or an unreadable file raises ``error``; a missing one too, as a
    :class:`MissingFileError` (a ``FileNotFoundError``) when ``error`` is a kind of bad input."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    if not path.exists():
        missing = MissingFileError if issubclass(error, BadInputError) else error
        raise missing(f"{what} {path} does not exist{tail}", path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, expected a file{tail}", path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}){tail}", path) from None


def load_torch_file(path: str | os.PathLike, what: str, *, fix: str = "", map_location="cpu",
                    missing: type[FastdivError] = CorruptFileError, data: bytes | None = None) -> Any:
    """``torch.load(path, weights_only=True)``, every failure a fastdiv error naming ``what`` and ``path``:
    a missing file or a directory raises ``missing``; an empty, truncated or foreign file
    :class:`CorruptFileError`; a pickle of other Python objects :class:`UnsafeFileError` (never unpickled).
    ``fix``: what the user can do, appended to the message. ``data``: the file's bytes, when already read."""
    import torch

    path = Path(path)
    tail = f". {fix}" if fix else ""
    if data is None:
        data = read_file_bytes(path, what, error=missing, fix=fix)
    if not data:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes), expected {_TORCH_FILE}: it was cut off before "
                               f"anything was written{tail}", path)
    try:
        with warnings.catch_warnings():  # torch's own advice (weights_only=False, protocols) is not for users here
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch reports damage as RuntimeError, KeyError, EOFError, ...
        found = _GLOBAL.search(str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        # a pickle stream (protocol 2+ starts with 0x80) that the weights-only unpickler refused: foreign content
        if found or (isinstance(exc, pickle.UnpicklingError) and data[:1] == b"\x80"):
            holds = (f"the Python object {found.group(1)}" if found
                     else "pickle instructions that are not tensors and plain containers")
            raise UnsafeFileError(f"{what} {path} was refused as unsafe or foreign: it holds {holds}, and fastdiv "
                                  "loads only tensors and plain containers (it never unpickles arbitrary objects, "
                                  f"which could run code){tail}", path) from None
        head = data[:4]
        kind = ("a zip archive cut off or damaged" if head == b"PK\x03\x04"
                else f"a file of another format (it starts with {head!r})")
        raise CorruptFileError(f"{what} {path} is not a readable PyTorch file: {len(data)} bytes, {kind}; "
                               f"expected {_TORCH_FILE} ({type(exc).__name__}){tail}", path) from None


def read_json_file(path: str | os.PathLike, what: str, *, error: type[FastdivError] = CorruptFileError,
                   fix: str = "", expect: type = dict) -> Any:
    """The JSON value in ``path``, of type ``expect`` (an object by default); a missing file, a directory,
    bytes that are not UTF-8 JSON or a value of another type raise ``error`` naming ``what``."""
    path = Path(path)
    tail = f". {fix}" if fix else ""
    data = read_file_bytes(path, what, error=error, fix=fix)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a text file ({len(data)} bytes that are not UTF-8), expected JSON{tail}",
                    path) from None
    except json.JSONDecodeError as exc:
        found = "an empty file" if not data.strip() else f"invalid JSON at line {exc.lineno}, column {exc.colno} " \
                                                          f"({exc.msg})"
        raise error(f"{what} {path} holds {found}, expected a JSON {_json_kind(expect)}{tail}", path) from None
    if not isinstance(value, expect):
        raise error(f"{what} {path} holds a JSON {_json_kind(type(value))}, expected a JSON "
                    f"{_json_kind(expect)}{tail}", path)
    return value


def _json_kind(tp: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(tp, tp.__name__)


def match_state_dict(model, state: Any, what: str, path: str | os.PathLike | None = None, *,
                     error: type[FastdivError] = CorruptFileError, fix: str = "") -> None:
    """Loads the state dict ``state`` into ``model`` strictly, after checking that it is one and that its
    keys and shapes are the model's; otherwise raises ``error`` listing what is missing, unexpected or of
    another shape (``what`` and ``path`` name the file)."""
    import torch

    where = f"{what} {path}" if path is not None else what
    tail = f". {fix}" if fix else ""
    # values are tensors, except a module's extra state (keys ending in '_extra_state')
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
            for k, v in state.items()):
        raise error(f"{where} holds no state dict (expected a mapping of parameter names to tensors); found "
                    f"{type(state).__name__}{tail}", path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in state and isinstance(own[k], torch.Tensor) and isinstance(state[k], torch.Tensor)
             and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def some(items):
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        parts = ([f"missing in the file: {some(missing)}"] if missing else []) + (
            [f"not in the model: {some(unexpected)}"] if unexpected else []) + (
            [f"shapes differ: {some(wrong)}"] if wrong else [])
        raise error(f"{where} does not match the model ({type(model).__name__}): " + "; ".join(parts) + tail, path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:  # e.g. a module's extra state it cannot take
        raise error(f"{where} does not fit the model ({type(model).__name__}): {str(exc).splitlines()[0]}{tail}",
                    path) from None


def prepare_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Checks, before any work, that ``path`` can be an output directory: not an existing file, no file
    among its parents, and writable (a probe file is created and removed in it, or in its nearest existing
    parent). Creates nothing; raises :class:`BadInputError` naming ``flag`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{flag} {path} is an existing file, expected a directory (or a path that does not "
                            f"exist yet); choose another {flag}", path)
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise BadInputError(f"{flag} {path}: {probe_dir} is a file, so no directory can be created under it; "
                            f"choose another {flag}", path)
    probe = probe_dir / f".fastdiv-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        err = to_fastdiv_error(exc)
        if err is not None and err.exit_code == 4:  # a full disk is reported as one, whichever path hit it
            raise err from None
        cause = "a read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise BadInputError(f"{flag} {path}: cannot write in {probe_dir} ({cause}); choose a writable "
                            f"directory for {flag}", path) from None
    return path
