"""The entry points: :func:`evaluate_model` (any model and test set, in memory) and :func:`evaluate` (a run
directory written by ``fastdiv train``). Under ``torchrun`` every rank evaluates every world-th example;
the shards are merged on every rank and rank 0 writes the files."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError, FastdivError, MissingFileError
from ..files import prepare_output_dir
from ..nn.randomness import PROBE_EXAMPLES, detect_randomness, model_mode
from ..runtime import resolve_device, setup_ranks
from .aggregate import aggregate, model_name
from .attack_setup import attack_registry
from .config import EvalConfig
from .inputs import as_xy, check_logits
from .outputs import write_outputs
from .partial import RowCache, fingerprint, partial_path
from .schema import validate_results
from .shard import merge
from .stages import run_shard

__all__ = ["evaluate", "evaluate_model"]


@contextlib.contextmanager
def _mode(model: nn.Module | None, mode: str):
    """:func:`fastdiv.nn.model_mode` for the block (nothing for None)."""
    if model is None:
        yield
        return
    with model_mode(model, mode):
        yield


def evaluate_model(model: nn.Module, data, *, out: str | os.PathLike | None = None, quiet: bool = False,
                   device: str | torch.device | None = "auto", surrogate: nn.Module | None = None,
                   surrogate_name: str | None = None, name: str | None = None, dataset_name: str = "custom",
                   run_info: dict | None = None, command: str | None = None,
                   save_adv: str | os.PathLike | None = None, resume: bool = False, **settings) -> dict:
    """Evaluates ``model`` on ``data`` (a TensorDataset, a DatasetSplits — its test split —, a map-style
    Dataset or a DataLoader of ``(image, label)``, or ``(images, labels)``; images in [0, 1]) and returns
    the results dictionary (schema :data:`RESULTS_SCHEMA`).

    ``settings`` are the fields of :class:`EvalConfig` (attacks, eps, forms, steps, alpha_factor,
    eot_samples, ensemble_samples, repeats, seed, limit, ..., ``stochastic`` and ``model_mode``).
    Whether the model is stochastic is detected (:func:`fastdiv.nn.detect_randomness`: its layers, then
    two forwards of the first test examples) unless ``stochastic=True|False`` declares it; the verdict
    and its reason are in ``results["model"]``. ``model_mode`` is the mode the model runs in
    (:func:`fastdiv.nn.model_mode`; ``'mc-dropout'`` keeps dropout active with BatchNorm in eval).
    ``save_adv``: a directory for the adversarial examples of every table row, ε and repeat
    (:func:`~fastdiv.evaluate.outputs.save_adversarial`, one ``.safetensors`` file each).
    ``surrogate``: a model to craft transfer attacks on (GAL Table 2). ``out``: when given,
    ``results.json``, ``report.md`` and the plots are written there (by rank 0), each file replaced whole,
    and while the table runs its finished rows are kept in ``out/rows.partial.json``
    (:mod:`~fastdiv.evaluate.partial`); ``resume=True`` takes them from there instead of running them again
    (refused when the settings, model or data differ). Invalid settings, an ``out`` that is a file or
    cannot be written raise ``ValueError`` (:class:`~fastdiv.errors.BadInputError`) before any work or file.

    >>> res = fastdiv.evaluate.evaluate_model(model, (x, y), attacks="fgsm,pgd", eps=[0.1, 0.3], repeats=3)
    >>> res["table"]["total"]["results"][0]["ensemble"]["mean"]
    """
    cfg = EvalConfig(**settings).check(attack_registry())
    x_all, y_all = as_xy(data)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    dev = resolve_device(device)
    if cfg.limit is not None:
        x_all, y_all = x_all[:cfg.limit], y_all[:cfg.limit]
    if x_all.shape[0] == 0:
        raise ValueError("data: the test set is empty")
    if resume and out is None:
        raise BadInputError("resume: an evaluation resumes from the partial results in its output directory; "
                            "give out (--out)")
    # before any work: an output directory that is a file or cannot be written is refused now, not at the end
    if out is not None:
        prepare_output_dir(out, "--out")
    if save_adv is not None:
        prepare_output_dir(save_adv, "--save-adv")
    ranks = setup_ranks(dev)
    t_start = time.perf_counter()
    try:
        model = model.to(dev)
        if surrogate is not None:
            surrogate = surrogate.to(dev)
        with _mode(model, cfg.model_mode), _mode(surrogate, "eval"):
            check_logits(model, x_all[:2].to(dev), y_all)
            # judged on the first test examples, so that every rank reaches the same verdict
            randomness = detect_randomness(model, x_all[:PROBE_EXAMPLES].to(dev), stochastic=cfg.stochastic,
                                           seed=cfg.seed)
            shard = torch.arange(x_all.shape[0])[ranks.rank::ranks.world]
            adv_dir = Path(save_adv) if save_adv is not None else None
            cache = None
            if out is not None:
                fp = fingerprint(cfg, model, x_all, y_all, stochastic=randomness.stochastic, world=ranks.world,
                                 save_adv=adv_dir, surrogate=surrogate)
                cache = RowCache(partial_path(Path(out), ranks.rank, ranks.world), fp, resume=resume,
                                 quiet=quiet or ranks.rank != 0)
            result, timing = run_shard(model, x_all[shard].to(dev), y_all[shard].to(dev), shard, cfg,
                                       surrogate=surrogate, ranks=ranks, quiet=quiet, x0=x_all[:1].to(dev),
                                       y0=y_all[:1].to(dev), randomness=randomness, save_adv=adv_dir, cache=cache)
        merged = merge(ranks.gather(result))
    finally:
        ranks.close()
    timing["total_s"] = time.perf_counter() - t_start
    results = aggregate(merged, cfg, model=model, in_shape=list(x_all.shape[1:]), name=name,
                        dataset_name=dataset_name, run_info=run_info,
                        surrogate_name=(surrogate_name or type(surrogate).__name__) if surrogate is not None else None,
                        timing=timing, device=dev, world=ranks.world, command=command)
    validate_results(results)
    if out is not None and ranks.rank == 0:
        write_outputs(results, out)
        # the finished rows are in results.json now: the partial files of every rank go
        for partial in Path(out).glob("rows.partial*.json"):
            partial.unlink(missing_ok=True)
    return results


# ------------------------------------------------------------------------------------------------
# From a run directory
# ------------------------------------------------------------------------------------------------

_CHECKPOINTS = {"best": "best.pt", "last": "checkpoint.pt"}


def _check_run_dir(run_dir, which: str, arg: str = "run_dir") -> Path:
    if which not in _CHECKPOINTS:
        raise ValueError(f"which: must be 'best' or 'last', got {which!r}")
    path = Path(run_dir)
    if not path.is_dir():
        raise MissingFileError(f"{arg}: {str(path)!r} is not a directory (expected a run from `fastdiv train`)", path)
    if not any((path / f).is_file() for f in (*_CHECKPOINTS.values(), "checkpoint.prev.pt")):
        raise MissingFileError(f"{arg}: {str(path)!r} has no checkpoint (best.pt or checkpoint.pt); "
                               "train one with `fastdiv train`", path)
    return path


def _load(run_dir: Path, which: str, device: torch.device, quiet: bool = True, arg: str = "run_dir"):
    from ..train import load_run

    wanted = which
    # exists(), not is_file(): a best.pt that is a directory is a damaged run, reported as such
    have = {"best": (run_dir / "best.pt").exists(),
            "last": any((run_dir / f).exists() for f in ("checkpoint.pt", "checkpoint.prev.pt"))}
    if not have[which]:  # e.g. no best.pt yet: fall back on the other one
        which = "last" if which == "best" else "best"
        if not quiet:
            print(f"fastdiv evaluate: note: {run_dir} has no {_CHECKPOINTS[wanted]}; evaluating "
                  f"{_CHECKPOINTS[which]} ({'the newest checkpoint' if which == 'last' else 'the best model'}) "
                  "instead", file=sys.stderr, flush=True)
    try:
        model, config = load_run(run_dir, which=which, device=str(device), quiet=quiet)
    except FastdivError as exc:
        raise type(exc)(f"{arg}: {exc}", exc.path) from None
    return model, config, which


def load_surrogate(run_dir: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    """The best model of the run ``run_dir`` (``--transfer-from``) and its config."""
    model, config, _ = _load(_check_run_dir(run_dir, "best", "transfer_from"), "best", device, quiet=True,
                             arg="transfer_from")
    return model, config


def _test_data(config: dict):
    from ..data import load_dataset

    return load_dataset(config["dataset"], config.get("data_dir"), resize=config.get("resize"),
                        seed=config.get("seed", 0))


def _jsonable(obj):
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


def evaluate(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, which: str = "best",
             device: str | torch.device | None = "auto", transfer_from: str | os.PathLike | None = None,
             quiet: bool = False, command: str | None = None, write: bool = True,
             save_adv: str | os.PathLike | None = None, resume: bool = False, **settings) -> dict:
    """Evaluates the trained run in ``run_dir`` on its dataset's test split and writes ``results.json``,
    ``report.md`` and the plots into ``out`` (default ``run_dir/eval``; ``write=False`` writes nothing).
    ``transfer_from``: a surrogate run to craft transfer attacks on. ``settings``: :class:`EvalConfig`
    fields. ``resume``: see :func:`evaluate_model`. Without ``best.pt`` the newest checkpoint is
    evaluated (and the other way round for ``which='last'``), with a note on stderr unless ``quiet``.
    Bad input (no checkpoint, unknown attack, ε outside [0, 1]) raises before anything is written.

    >>> fastdiv.evaluate.evaluate("runs/advbnn-digits", eps=[0.1, 0.2, 0.3], repeats=3)
    """
    cfg = EvalConfig(**settings).check(attack_registry())
    path = _check_run_dir(run_dir, which)
    src_path = _check_run_dir(transfer_from, "best", "transfer_from") if transfer_from is not None else None
    out_dir = (Path(out) if out is not None else path / "eval") if write else None
    if out_dir is not None:  # before loading anything: an --out that is a file or read-only is refused now
        prepare_output_dir(out_dir, "--out")
    dev = resolve_device(device)
    model, config, used = _load(path, which, dev, quiet=quiet)
    data = _test_data(config)
    surrogate = surrogate_name = None
    if src_path is not None:
        surrogate, s_config = load_surrogate(src_path, dev)
        surrogate_name = model_name(surrogate, s_config)
    run_info = {"run_dir": str(path), "which": used, "config": _jsonable(config),
                "transfer_from": str(src_path) if src_path else None}
    return evaluate_model(model, data, out=out_dir, quiet=quiet, device=dev, surrogate=surrogate,
                          surrogate_name=surrogate_name, name=model_name(model, config),
                          dataset_name=getattr(data, "name", config["dataset"]), run_info=run_info, command=command,
                          save_adv=save_adv, resume=resume, **dataclasses.asdict(cfg))
