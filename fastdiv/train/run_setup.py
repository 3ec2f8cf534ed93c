"""Setting up a run: device and ranks, the run directory, data, model and the modules the training and
evaluation forwards go through, the static source model, optimizer, scheduler and DDP, and the
position of a resumed run. :class:`RunSetup` holds all of it; :class:`fastdiv.train.trainer.Trainer`
adds the step and the epoch loop.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._seeds import mix_seed
from ..analysis import members_of
from ..errors import BadInputError, FastdivError
from ..files import prepare_output_dir
from ..nn.randomness import is_stochastic
from ..runtime import atomic_write_text, resolve_device, seed_globals, setup_ranks
from . import streams
from .checkpoint import TrainingCheckpoint, metric_lines, truncate_metrics, write_metrics
from .config import TrainConfig, parse_reg
from .models import MemberLogits, build_model_from_config, load_run
from .source import StaticSource
from .stopping import SignalFlag
from .store import CheckpointStore

__all__ = ["RunSetup"]


class RunSetup:
    """A run's state between steps. ``__init__`` only resolves the device, ranks and paths;
    :meth:`setup` builds the rest (and reads the checkpoint of a resumed run)."""

    def __init__(self, cfg: TrainConfig, quiet: bool) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.device = resolve_device(cfg.device)
        self.dist = setup_ranks(self.device)
        if self.dist.enabled and cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                             f"({self.dist.world}): it is the global batch")
        self.reg_terms = parse_reg(cfg.reg)
        self.run_dir = Path(cfg.out if cfg.out else f"runs/{cfg.preset or 'custom'}-{cfg.dataset}-s{cfg.seed}"
                            + (f"-{cfg.base}" if cfg.base else ""))
        self.store = CheckpointStore(self.run_dir)
        self.ckpt_path = self.store.path
        self.best_path = self.run_dir / "best.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.signals: SignalFlag | None = None

    # -- output helpers ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.main:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stdout)
            except ImportError:  # pragma: no cover
                print(msg, flush=True)
            sys.stdout.flush()

    def _barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Builds the run (rank 0 creates the run directory) and, with ``resume``, restores its checkpoint.
        Everything that can be refused (the output directory, the data, the model, ``init_from``) is checked
        before the run directory is created; a failure after that removes the directories this call created
        while they are still empty."""
        cfg = self.cfg
        # looked up at call time (tests substitute fastdiv.data.load_dataset)
        from ..data import load_dataset

        prepare_output_dir(self.run_dir, "--out")
        if not cfg.resume and self.store.exists():  # every rank sees it: no rank waits for a dead one
            raise FileExistsError(f"{self.run_dir} already holds a checkpoint.pt; pass --resume to continue it "
                                  f"or choose another --out")
        self.data = load_dataset(cfg.dataset, cfg.data_dir, resize=cfg.resize, seed=cfg.seed, limit=cfg.limit)
        self.x_train, self.y_train = self.data.train.tensors
        self.x_val, self.y_val = self.data.val.tensors
        if len(self.x_train) == 0:
            raise ValueError(f"dataset {cfg.dataset!r} has an empty training split")
        self.in_shape = tuple(int(s) for s in self.data.in_shape)
        self.num_classes = int(self.data.num_classes)
        seed_globals(cfg.seed)
        self.model = build_model_from_config(cfg, self.in_shape, self.num_classes).to(self.device)
        if cfg.init_from:
            self._init_from(cfg.init_from)

        created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()] if self.dist.main else []
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.tmp"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)
        self._barrier()
        try:
            self._build()
        except BaseException:
            for d in created:  # innermost first; a directory that holds anything stays
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise

    def _init_from(self, run: str) -> None:
        """Loads the best model of the run directory ``run`` (``--init-from``) into the model."""
        cfg = self.cfg
        try:
            src, _ = load_run(run, which="best", device=str(self.device))
        except FastdivError as exc:
            raise type(exc)(f"--init-from: {exc}", exc.path) from None
        try:
            self.model.load_state_dict(src.state_dict())
        except RuntimeError as e:
            raise BadInputError(f"--init-from {run!r}: its model does not match this run's ({cfg.model}, "
                                f"{cfg.wrapper} of {cfg.members}): {str(e).splitlines()[0]}") from None

    def _build(self) -> None:
        """The rest of :meth:`setup`, once the run directory exists."""
        cfg = self.cfg
        self.members = members_of(self.model)
        # the module the training (and evaluation) forwards go through: a population trains every
        # member on every batch through an Ensemble view of its members (sample s = member s; the
        # population's own forward dispatches at random); a priority-dropout ensemble gives all its
        # members' logits under the dropout in one pass
        self.member_view = None
        if cfg.wrapper == "population":
            from ..nn.ensemble import Ensemble
            self.member_view = Ensemble(self.members)
        self.eval_module = self.member_view if self.member_view is not None else self.model
        self.dropout_logits = cfg.dropout is not None and not self.reg_terms
        if self.dropout_logits:
            self.train_module = MemberLogits(self.model)
        else:
            self.train_module = self.eval_module
        self.randomized = is_stochastic(self.eval_module)
        if cfg.prse_every:
            from ..nn.population import counter_link_masks
            counter_link_masks(self.model, fraction=cfg.link_fraction,
                               generator=mix_seed(cfg.seed, streams.COUNTER_LINK))

        # static source model and offline examples (ens-adv, d3-*-off): rank 0 prepares, others load
        self.source = None
        if cfg.offline != "none":
            source = StaticSource(cfg, run_dir=self.run_dir, device=self.device, dist=self.dist,
                                  in_shape=self.in_shape, num_classes=self.num_classes, x_train=self.x_train,
                                  y_train=self.y_train, x_val=self.x_val, y_val=self.y_val, log=self.log,
                                  barrier=self._barrier)
            if self.dist.main:
                self.source = source.load_or_train()
            self._barrier()
            if not self.dist.main:
                self.source = source.load_or_train()
            if cfg.offline == "pgd":
                x_off, y_off = source.offline_examples(self.source)
                self.x_train = torch.cat([self.x_train, x_off])
                self.y_train = torch.cat([self.y_train, y_off])
        self.n_train = len(self.x_train)

        params = parameter_groups(self.model, cfg.sigma_lr)
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.milestones),
                                                          gamma=cfg.lr_decay)
        self.ddp = None
        if self.dist.enabled:
            # plain DDP supports the double backward of the regularizer: autograd.grad w.r.t. the
            # input does not fire the parameter hooks, the final backward fires each once
            self.ddp = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.local_batch = cfg.batch_size // self.dist.world
        self.steps_per_epoch = self._steps_per_epoch()

        # position
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best = {"val_acc": -1.0, "epoch": 0}
        self.partial = None
        self.metrics: list[dict[str, Any]] = []
        ckpt = self._load_checkpoint() if cfg.resume else None
        if self.dist.main:
            # rewritten on resume too: --epochs may have been extended
            atomic_write_text(json.dumps(self.config_record(), indent=2) + "\n", self.run_dir / "config.json")
            if ckpt is None:
                self.metrics_path.unlink(missing_ok=True)
            elif ckpt.metrics is not None:
                # exactly the epochs the checkpoint completed: a line written after it (the run was killed
                # before the next checkpoint) goes, one it completed but the kill kept out of the file returns
                self.metrics = [dict(r) for r in ckpt.metrics]
                write_metrics(self.metrics_path, self.metrics)
            else:  # a checkpoint of an older version, without the records: the file is cut to its epoch
                truncate_metrics(self.metrics_path, self.epoch)
                self.metrics = metric_lines(self.metrics_path)
        self.log(f"fastdiv train: {cfg.preset or 'custom'} on {self.data.describe()}; {self._model_summary()}; "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {self.device}"
                 + (f" x {self.dist.world} processes" if self.dist.enabled else "")
                 + (f"; resumed at epoch {self.epoch + 1} step {self.step_in_epoch + 1}" if ckpt is not None else "")
                 + f"; run dir {self.run_dir}")

    def _model_summary(self) -> str:
        cfg = self.cfg
        n = sum(p.numel() for p in self.model.parameters())
        what = cfg.model + (f" ({cfg.kind})" if cfg.kind != "deterministic" else "")
        if cfg.wrapper != "single":
            what = f"{cfg.wrapper} of {cfg.members} x {what}"
        return f"{what}, {n:,} parameters"

    def config_record(self) -> dict[str, Any]:
        import fastdiv
        rec = self.cfg.to_dict()
        rec.pop("resume", None)
        rec["out"] = str(self.run_dir)
        rec.update(in_shape=list(self.in_shape), num_classes=self.num_classes, n_train=self.n_train,
                   fastdiv_version=fastdiv.__version__, torch_version=torch.__version__,
                   world_size=self.dist.world)
        return rec

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(self.n_train / self.dist.world)
        return max(1, math.ceil(per_rank / self.local_batch))

    def _load_checkpoint(self) -> TrainingCheckpoint | None:
        """Restores the newest usable checkpoint (:meth:`CheckpointStore.load_latest`: ``checkpoint.pt``,
        else ``checkpoint.prev.pt``, each verified by its checksum and by fitting this run) and returns it;
        None when the run has no checkpoint and recorded no epoch (it starts at epoch 1). A run that
        recorded epochs but lost its checkpoints is refused rather than silently restarted."""

        def decode(state, path):
            ckpt = TrainingCheckpoint.from_state(state, path)
            ckpt.restore(self.model, self.opt, self.sched, self.device, path)
            return ckpt

        # read to the CPU: load_state_dict moves the weights and optimizer state to the run's device, and the RNG
        # states must stay CPU byte tensors (torch.cuda.set_rng_state refuses a CUDA tensor)
        loaded = self.store.load_latest(decode, map_location="cpu")
        if loaded is None:
            recorded = metric_lines(self.metrics_path)
            if recorded:
                best = " and best.pt" if self.best_path.exists() else ""
                raise BadInputError(
                    f"--resume: {self.run_dir} has no checkpoint.pt, but its metrics.jsonl{best} record "
                    f"{len(recorded)} completed epoch(s): resuming would start again at epoch 1 and overwrite them. "
                    f"Restore checkpoint.pt from a copy of the run directory, or train a new run with another --out",
                    self.store.path)
            if self.dist.main:
                print(f"fastdiv train: note: {self.run_dir} has no checkpoint and no completed epoch yet: starting at "
                      "epoch 1", file=sys.stderr, flush=True)
            return None
        ckpt = loaded.checkpoint
        if loaded.skipped and self.dist.main:
            print(f"fastdiv train: warning: skipped {'; skipped '.join(loaded.skipped)}; resuming from {loaded.path} "
                  f"(epoch {ckpt.epoch + 1}, step {ckpt.step_in_epoch + 1}), the last verified checkpoint",
                  file=sys.stderr, flush=True)
        self.epoch = ckpt.epoch
        self.step_in_epoch = ckpt.step_in_epoch
        self.global_step = ckpt.global_step
        self.best = ckpt.best
        self.partial = ckpt.partial
        return ckpt


def parameter_groups(model: nn.Module, sigma_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one group, or with ``sigma_lr`` a second group of the
    Bayesian layers' posterior log sigma parameters (:meth:`BayesianLayer.gaussians`) at that learning rate
    (the schedule scales both groups alike). A run of a few hundred steps at the weights' learning rate moves
    log sigma by at most about lr per step, too little for the posterior std to learn (docs/training.md)."""
    from ..nn.bayes import BayesianLayer

    trainable = [p for p in model.parameters() if p.requires_grad]
    sigma = {id(log_sigma): log_sigma for m in model.modules() if isinstance(m, BayesianLayer)
             for _, _, log_sigma in m.gaussians() if log_sigma.requires_grad}
    if sigma_lr is None or not sigma:
        return [{"params": trainable}]
    return [{"params": [p for p in trainable if id(p) not in sigma]},
            {"params": [p for p in trainable if id(p) in sigma], "lr": sigma_lr}]
