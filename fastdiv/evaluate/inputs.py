"""Any model and any test set in: a user's model factory (``FILE.py:FACTORY`` or ``package.module:FACTORY``),
its weights (``.safetensors``, or a ``.pt`` state dict loaded with ``weights_only=True``), and test data as a
``TensorDataset``, a ``Dataset``, a ``DataLoader``, a pair of tensors or a ``.npz`` / ``.safetensors`` file
holding ``x`` and ``y``.

Every problem is a :mod:`fastdiv.errors` error whose message names the file or argument, what was expected and
what was found: :class:`EvalInputError` (bad input, exit code 2) for what does not fit, and
:class:`~fastdiv.errors.CorruptFileError` / :class:`~fastdiv.errors.UnsafeFileError` (exit code 3) for a file
that is truncated, damaged or a refused pickle. Nothing is written before these checks pass.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .._checks import check_logits_output
from ..attacks.base import RANGE_TOLERANCE  # the attacks' own bound: data they would refuse is refused here
from ..errors import BadInputError, CorruptFileError, UnsafeFileError
from ..files import load_torch_file, match_state_dict, read_file_bytes

__all__ = ["EvalInputError", "as_xy", "check_images", "check_logits", "load_data_file", "load_factory",
           "load_weights"]


class EvalInputError(BadInputError):
    """A model, weights or data file that cannot be used as given; the message says which and why."""


# ------------------------------------------------------------------------------------------ models


def _import_file(path: Path):
    """The module defined by the Python file ``path``, under a private name (so it never shadows a package)."""
    name = "fastdiv_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EvalInputError(f"--model: cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # the file's own folder first, so that it can import its neighbours as a script would
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise EvalInputError(f"--model: importing {path} raised {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def load_factory(spec: str) -> nn.Module:
    """The ``nn.Module`` returned by the factory ``spec``: ``path/to/file.py:FACTORY`` or
    ``package.module:FACTORY`` (a callable taking no arguments, e.g. a class or a function)."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1].strip():
        raise EvalInputError(f"--model: expected FILE.py:FACTORY or package.module:FACTORY, got {spec!r}")
    where, factory_name = (s.strip() for s in spec.rsplit(":", 1))
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise EvalInputError(f"--model: the file {path} does not exist")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise EvalInputError(f"--model: cannot import the module {where!r} ({type(exc).__name__}: {exc}); "
                                 "is it installed, or did you mean a file path ending in .py?") from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
        raise EvalInputError(f"--model: {where} has no callable {factory_name!r}; its callables: "
                             f"{', '.join(public) or 'none'}")
    try:
        model = factory()
    except Exception as exc:
        raise EvalInputError(f"--model: {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise EvalInputError(f"--model: {spec} must return a torch.nn.Module, it returned a "
                             f"{type(model).__name__}")
    return model


def _state_dict_of(obj, path: Path):
    """A state dict from what a weights file holds: the dict itself, or its 'model' / 'state_dict' entry
    (fastdiv's best.pt and the usual training-script checkpoints)."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    if isinstance(obj, dict) and not obj:
        raise EvalInputError(f"--weights: {path} holds an empty dict, expected a state dict (a mapping of parameter "
                             "names to tensors, or one under 'model' / 'state_dict')", path)
    return obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads the state dict in ``path`` (``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
    ``torch.load(weights_only=True)``) into ``model`` strictly; returns ``model``. A missing file, a
    directory or weights that do not fit the model raise :class:`EvalInputError`; a truncated or damaged
    file :class:`~fastdiv.errors.CorruptFileError`, a pickle of other Python objects
    :class:`~fastdiv.errors.UnsafeFileError`."""
    path = Path(path).expanduser()
    fix = ("Save the weights as a state dict (torch.save(model.state_dict(), ...)) or as .safetensors "
           "(safetensors.torch.save_file)")
    data = read_file_bytes(path, "--weights", error=EvalInputError)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
            # non-tensor module state (fastdiv's best.safetensors keeps it as JSON metadata)
            state.update(json.loads(_safetensors_metadata(data).get("extra_state", "{}")))
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise CorruptFileError(f"--weights {path} is not a readable .safetensors file ({len(data)} bytes: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); expected a "
                                   f"file written by safetensors. {fix}", path) from None
    else:
        state = load_torch_file(path, "--weights", data=data, fix=fix)
    match_state_dict(model, _state_dict_of(state, path), "--weights", path, error=EvalInputError)
    return model


def _safetensors_metadata(data: bytes) -> dict:
    """The string metadata in the header of the .safetensors bytes ``data`` (8-byte length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the header's __metadata__ is not a mapping")
    return meta


def check_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Runs ``model`` once on the first examples of ``x`` and returns the number of classes; raises
    :class:`EvalInputError` unless it returns floating-point logits ``[N, C]`` with every label of ``y``
    below ``C``."""
    xs = x[:2]
    try:
        with torch.no_grad():
            out = model(xs)
    except Exception as exc:
        raise EvalInputError(f"model: a forward of inputs {tuple(xs.shape)} raised {type(exc).__name__}: "
                             f"{exc}") from exc
    try:
        check_logits_output(out, xs.shape[0], "model")
    except ValueError as exc:
        raise EvalInputError(str(exc)) from None
    classes = int(out.shape[1])
    if y.numel() and int(y.max()) >= classes:
        raise EvalInputError(f"data: labels must be below the model's {classes} classes, got {int(y.max())}")
    return classes


# -------------------------------------------------------------------------------------------- data


def check_images(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Images float ``[N, ...]`` in [0, 1] and integer labels ``[N]`` >= 0; returns ``(x, y.long())``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise EvalInputError(f"{what}: images must be a floating-point tensor [N, ...], got {got}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise EvalInputError(f"{what}: labels must be an integer tensor [N], got {got}")
    if y.shape != x.shape[:1]:
        raise EvalInputError(f"{what}: labels must have shape [{x.shape[0]}] (one per image), got {tuple(y.shape)}")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):
            raise EvalInputError(f"{what}: images must lie in [0, 1] (the attacks perturb and clip there; put any "
                                 f"normalization inside the model, e.g. fastdiv.nn.Normalize), got values in "
                                 f"[{lo:g}, {hi:g}]")
    if y.numel() and int(y.min()) < 0:
        raise EvalInputError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    return x, y.long()


def _stack(dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of a map-style Dataset or of a DataLoader's batches, stacked."""
    xs, ys = [], []
    items = dataset if isinstance(dataset, torch.utils.data.DataLoader) else (
        dataset[i] for i in range(len(dataset)))
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise EvalInputError(f"{what}: each item must be an (image, label) pair, got {type(item).__name__}")
        xi, yi = item[0], torch.as_tensor(item[1])
        batched = isinstance(dataset, torch.utils.data.DataLoader)
        xs.append(xi if batched else xi.unsqueeze(0))
        ys.append(yi.reshape(-1))
    if not xs:
        raise EvalInputError(f"{what}: the dataset is empty")
    return torch.cat(xs), torch.cat(ys)


def as_xy(data, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a TensorDataset, a DatasetSplits (its test split), a map-style Dataset, a
    DataLoader, or a pair of tensors; checked by :func:`check_images`."""
    if hasattr(data, "test") and not isinstance(data, (tuple, list)):
        data = data.test
    if hasattr(data, "tensors"):
        data = data.tensors
    elif isinstance(data, torch.utils.data.DataLoader) or (
            isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__")):
        data = _stack(data, what)
    if not (isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data[:2])):
        raise TypeError(f"{what}: expected a TensorDataset, a DatasetSplits, a Dataset, a DataLoader or a pair "
                        f"(images [N, C, H, W], labels [N]), got {type(data).__name__}")
    return check_images(data[0], data[1], what)


def load_data_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (images in [0, 1]) and ``y`` (labels) from a ``.npz`` or ``.safetensors`` file. ``.npz`` is
    read without pickles; uint8 images are scaled by 1/255. A missing file, another format or arrays that do
    not fit raise :class:`EvalInputError`; a truncated or damaged file
    :class:`~fastdiv.errors.CorruptFileError`, pickled objects in an ``.npz``
    :class:`~fastdiv.errors.UnsafeFileError`."""
    path = Path(path).expanduser()
    what = f"--data {path}"
    if path.suffix not in (".npz", ".safetensors"):
        raise EvalInputError(f"{what}: expected a .npz or .safetensors file holding 'x' and 'y'", path)
    data = read_file_bytes(path, "--data", error=EvalInputError)
    expected = ("a NumPy .npz archive (numpy.savez) of arrays 'x' and 'y'" if path.suffix == ".npz"
                else "a .safetensors file (safetensors.torch.save_file) of tensors 'x' and 'y'")
    if not data:
        raise CorruptFileError(f"{what}: the file is empty (0 bytes), expected {expected}", path)
    if path.suffix == ".npz":
        tensors = _read_npz(data, what, expected, path)
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(data)
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise CorruptFileError(f"{what}: not a readable .safetensors file ({len(data)} bytes: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); expected "
                                   f"{expected}", path) from None
    if "x" not in tensors or "y" not in tensors:
        raise EvalInputError(f"{what}: the file must hold arrays named 'x' (images) and 'y' (labels); it holds "
                             f"{sorted(tensors) or 'nothing'}", path)
    x, y = tensors["x"], tensors["y"]
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return check_images(x, y, what)


def _read_npz(data: bytes, what: str, expected: str, path: Path) -> dict[str, torch.Tensor]:
    """The arrays of the .npz bytes ``data`` as tensors, read without pickles."""
    import io

    import numpy as np

    if data[:4] != b"PK\x03\x04":  # np.load would take any other bytes for a pickle (and refuse them as one)
        if data[:1] == b"\x80":
            raise UnsafeFileError(f"{what}: refused as unsafe or foreign: it is a Python pickle, which fastdiv never "
                                  f"unpickles; expected {expected}", path)
        raise CorruptFileError(f"{what}: not a readable .npz file ({len(data)} bytes of another format: it starts "
                               f"with {data[:4]!r}); expected {expected}", path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            found = {k: arrays[k] for k in arrays.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise UnsafeFileError(f"{what}: refused as unsafe or foreign: it holds pickled Python objects, which "
                                  f"fastdiv never unpickles; save plain numeric arrays (numpy.savez(path, x=..., "
                                  f"y=...))", path) from None
        raise CorruptFileError(f"{what}: not a readable .npz file ({exc}); expected {expected}", path) from None
    except Exception as exc:  # noqa: BLE001 - zipfile and NumPy report damage as BadZipFile, OSError, EOFError, ...
        raise CorruptFileError(f"{what}: not a readable .npz file ({len(data)} bytes, {type(exc).__name__}: a "
                               f"truncated or damaged archive, or another format); expected {expected}", path) from None
    return {k: torch.from_numpy(v.copy()) for k, v in found.items()}
