"""The training step and the epoch loop of :func:`fastdiv.train.train` (see :mod:`fastdiv.train` for what
a step does and what a run writes).

:class:`Trainer` adds them to :class:`~fastdiv.train.run_setup.RunSetup` (device, data, model, optimizer,
position). Every random draw of a step is seeded by its position, so a run stopped anywhere and resumed
from its checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_logits_output
from .._seeds import mix_seed
from ..nn.sampling import supports_batched
from ..runtime import crash_point, seed_globals
from . import streams
from .batches import adversarial_examples, epoch_indices, prepare_batch
from .checkpoint import TrainingCheckpoint, append_metrics, save_best
from .config import TrainConfig, best_from_epoch, config_for_run, lambda_at
from .evaluation import validate
from .run_setup import RunSetup
from .stopping import SignalFlag, TrainingDiverged, TrainingInterrupted

__all__ = ["Trainer", "train"]


class Trainer(RunSetup):
    """A run that trains: :meth:`run` runs the epochs from the current position to ``cfg.epochs``."""

    def save_checkpoint(self) -> None:
        """Saves the run's position (rank 0) through the store: the previous checkpoint is kept until this
        one is complete, and the metric records of the completed epochs go with it."""
        if self.dist.main:
            ckpt = TrainingCheckpoint.capture(epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                                              global_step=self.global_step, model=self.model, optimizer=self.opt,
                                              scheduler=self.sched, device=self.device, best=self.best,
                                              partial=self.partial, preset=self.cfg.preset, metrics=self.metrics)
            self.store.save(ckpt.to_dict(), {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                             "global_step": self.global_step})

    # -- one step ---------------------------------------------------------------------------------
    def _forward_model(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.train_module

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor, epoch: int, step: int, lam: float):
        """One optimization step; returns ``(stats, signum, loss)``: a dict of floats (None when the loss is
        not finite, after all processes agreed on it; then nothing was updated), the stop signal that
        arrived at any process (0: none) and the loss."""
        from ..grads import sample_input_grads
        from ..losses import concentration_stats, diversity_loss
        cfg = self.cfg
        seed = mix_seed(cfg.seed, epoch, step, self.dist.rank)
        x, y = prepare_batch(cfg, xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), seed,
                             self.source)
        stacked = False
        if cfg.adv:
            x = adversarial_examples(cfg, self.model, self.members, x, y, seed)
            stacked = cfg.wrapper == "population"
        n = cfg.samples
        if stacked and n != len(self.members):
            raise ValueError(f"population adversarial training needs samples = members ({len(self.members)}), "
                             f"got samples={n}")
        model = self._forward_model()
        self.model.train()
        sample_seed = mix_seed(seed, streams.SAMPLES)
        grads = None
        reg = torch.zeros((), device=self.device)
        if self.dropout_logits:
            logits = model(x)
            if logits.shape[0] != n:
                raise ValueError(f"a priority-dropout ensemble of {logits.shape[0]} members trains with samples = "
                                 f"members, got samples={n}")
        elif self.reg_terms and lam > 0:
            if stacked:
                raise ValueError("a gradient regularizer with per-member adversarial examples is not supported")
            grads, logits = sample_input_grads(model, x, y, n, loss=cfg.grad_loss, create_graph=True,
                                               strategy=cfg.strategy, generator=sample_seed)
            for name, w in self.reg_terms:
                reg = reg + w * diversity_loss(name, grads, sample_dim=0)
        else:
            logits = sample_logits_with_graph(model, x, n, sample_seed, stacked=stacked, randomized=self.randomized,
                                              batched=cfg.strategy != "loop" and supports_batched(self.train_module))
        classes = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, classes), y.repeat(n))
        loss = ce + lam * reg
        kl = torch.zeros((), device=self.device)
        if cfg.kl_factor > 0:
            from ..nn.bayes import kl_divergence
            kl = kl_divergence(self.model) * (cfg.kl_factor / self.n_train)
            loss = loss + kl
        nonfinite = not bool(torch.isfinite(loss.detach()))
        stop = self._stop_flags(nonfinite)
        if stop["nonfinite"]:
            return None, stop["signal"], float(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self._after_step(epoch, step)
        with torch.no_grad():
            acc = (logits.detach().argmax(-1) == y).float().mean()
            out = {"loss": float(loss.detach()), "ce": float(ce.detach()), "reg": float(reg.detach()),
                   "kl": float(kl.detach()), "acc": float(acc), "examples": int(y.shape[0])}
            if grads is not None:
                d = grads[0, 0].numel()
                out["kappa_p"] = float(concentration_stats(grads.detach(), sample_dim=0).kappa.mean()) / d
        return out, stop["signal"], out["loss"]

    def _stop_flags(self, nonfinite: bool) -> dict[str, Any]:
        """Agree across processes on 'some loss is not finite' and 'a stop signal arrived'."""
        signum = self.signals.signum if self.signals is not None else 0
        if not self.dist.enabled:
            return {"nonfinite": nonfinite, "signal": signum}
        t = torch.tensor([float(nonfinite), float(signum)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return {"nonfinite": bool(t[0] > 0), "signal": int(t[1])}

    def _after_step(self, epoch: int, step: int) -> None:
        cfg = self.cfg
        self.global_step += 1
        if cfg.prse_every and self.global_step % cfg.prse_every == 0:
            from ..nn.population import prse
            rng = random.Random(mix_seed(cfg.seed, streams.PRSE, self.global_step))
            k = len(self.members)
            for i in range(k):
                j = rng.choice([m for m in range(k) if m != i])
                prse(self.model, i, j, alpha=cfg.clm_alpha, delta=cfg.clm_delta)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        self.signals = None
        with SignalFlag() as signals:
            self.signals = signals
            while self.epoch < cfg.epochs:
                self._run_epoch(signals)
        first = best_from_epoch(cfg)
        among = f" (among epochs {first}-{cfg.epochs})" if first > 1 else ""
        self.log(f"done: best val acc {self.best['val_acc']:.4f} at epoch {self.best['epoch']}{among}; "
                 f"run dir {self.run_dir}")
        return self.run_dir

    def _run_epoch(self, signals: SignalFlag) -> None:
        cfg = self.cfg
        epoch = self.epoch
        indices = epoch_indices(self.n_train, self.local_batch, seed=cfg.seed, epoch=epoch,
                                distributed=self.dist.enabled)
        steps = self.steps_per_epoch
        if self.step_in_epoch == 0:
            # every epoch starts from RNG states that depend on (seed, epoch) only
            seed_globals(mix_seed(cfg.seed, streams.EPOCH, epoch, self.dist.rank))
            self.partial = {"loss": 0.0, "ce": 0.0, "reg": 0.0, "kl": 0.0, "correct": 0.0, "examples": 0,
                            "kappa_p": 0.0, "kappa_steps": 0, "time_s": 0.0}
        acc = self.partial
        bar = self._progress(epoch, steps)
        t0 = time.perf_counter()
        for step in range(self.step_in_epoch, steps):
            idx = indices[step * self.local_batch:(step + 1) * self.local_batch]
            lam = lambda_at(epoch + step / steps, cfg.lam, cfg.warmup, cfg.rampup) if self.reg_terms else 0.0
            out, signum, loss_value = self._train_step(self.x_train[idx], self.y_train[idx], epoch, step, lam)
            if out is None:
                if bar is not None:
                    bar.close()
                good = (f"the last good checkpoint is {self.ckpt_path} (after epoch {self.epoch}, step "
                        f"{self.step_in_epoch})" if self.ckpt_path.exists() else "no checkpoint was written yet")
                raise TrainingDiverged(f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {step + 1}: "
                                       f"training stopped; {good}")
            n_ex = out["examples"]
            for key in ("loss", "ce", "reg", "kl"):
                acc[key] += out[key] * n_ex
            acc["correct"] += out["acc"] * n_ex
            acc["examples"] += n_ex
            if "kappa_p" in out:
                acc["kappa_p"] += out["kappa_p"]
                acc["kappa_steps"] += 1
            self.step_in_epoch = step + 1
            crash_point("train-step")
            if bar is not None:
                post = {"loss": f"{out['loss']:.4f}", "acc": f"{out['acc']:.3f}", "λ": f"{lam:.3g}"}
                post["κ̂/p"] = f"{out['kappa_p']:.3g}" if "kappa_p" in out else "-"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if signum:
                acc["time_s"] += time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                self.save_checkpoint()
                name = signal.Signals(signum).name
                raise TrainingInterrupted(f"{name}: saved {self.ckpt_path} at epoch {epoch + 1}, step {step + 1}; "
                                          f"continue with --resume", signum)
        if bar is not None:
            bar.close()
        acc["time_s"] += time.perf_counter() - t0
        self._end_epoch(epoch)
        if signals.signum:
            name = signal.Signals(signals.signum).name
            raise TrainingInterrupted(f"{name}: stopped after epoch {epoch + 1} (checkpoint saved); continue with "
                                      f"--resume", signals.signum)

    def _progress(self, epoch: int, steps: int):
        if self.quiet or not self.dist.main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=steps, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                    leave=False, dynamic_ncols=True)

    def _reduce_partial(self) -> dict[str, float]:
        acc = dict(self.partial)
        if self.dist.enabled:
            keys = ["loss", "ce", "reg", "kl", "correct", "examples", "kappa_p", "kappa_steps"]
            t = torch.tensor([float(acc[k]) for k in keys], device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            acc.update({k: float(v) for k, v in zip(keys, t.tolist())})
        return acc

    def _end_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        acc = self._reduce_partial()
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        if self.dist.main:
            t_eval = time.perf_counter()
            ev = validate(cfg, self.model, self.eval_module, self.x_val, self.y_val, device=self.device,
                          members=self.members, randomized=self.randomized)
            ex = max(acc["examples"], 1)
            record = {
                "epoch": epoch + 1, "step": self.global_step, "lr": lr,
                "lambda": lambda_at(epoch + (self.steps_per_epoch - 1) / self.steps_per_epoch, cfg.lam,
                                    cfg.warmup, cfg.rampup) if self.reg_terms else 0.0,
                "train_loss": acc["loss"] / ex, "train_ce": acc["ce"] / ex, "train_reg": acc["reg"] / ex,
                "train_kl": acc["kl"] / ex, "train_acc": acc["correct"] / ex,
                "train_kappa_p": acc["kappa_p"] / acc["kappa_steps"] if acc["kappa_steps"] else None,
                **ev,
                "train_time_s": acc["time_s"], "time_s": acc["time_s"] + (time.perf_counter() - t_eval),
            }
            # epochs before best_from (the warm-up and ramp-up of lambda) are never kept as best.pt
            improved = epoch + 1 >= best_from_epoch(cfg) and ev["val_acc"] > self.best["val_acc"]
            record["best"] = improved
            if improved:
                self.best = {"val_acc": ev["val_acc"], "epoch": epoch + 1}
                save_best(self.best_path, epoch=epoch + 1, val_acc=ev["val_acc"], model=self.model, preset=cfg.preset,
                          config=self.config_record())
            # the record goes into the checkpoint, and metrics.jsonl gets its line only once the checkpoint
            # is saved: a kill before that re-runs the epoch from the previous checkpoint (whose records
            # metrics.jsonl is rewritten to), a kill after it finds the line in the checkpoint
            self.metrics.append(record)
        self.partial = None
        if self.dist.enabled:
            best = torch.tensor([self.best["val_acc"], float(self.best["epoch"])], device=self.device,
                                dtype=torch.float64)
            torch.distributed.broadcast(best, 0)
            self.best = {"val_acc": float(best[0]), "epoch": int(best[1])}
        self.save_checkpoint()
        if self.dist.main:
            append_metrics(self.metrics_path, record)
            r = record
            stats = "" if r["kappa_p"] is None else (f"  ρ̂ {r['rho']:.3f}  κ̂/p {r['kappa_p']:.4g}  cos "
                                                      f"{r['mean_cos']:.3f}  dpp {r['dpp']:.3g}")
            self.log(f"epoch {epoch + 1}/{cfg.epochs}  loss {r['train_loss']:.4f}  acc {r['train_acc']:.4f}  "
                     f"val {r['val_acc']:.4f}  λ {r['lambda']:.3g}  lr {lr:.3g}{stats}  ({r['time_s']:.1f} s)")
        self._barrier()


def sample_logits_with_graph(model: nn.Module, x: torch.Tensor, n: int, seed: int, *, stacked: bool,
                             randomized: bool, batched: bool) -> torch.Tensor:
    """Logits ``[n, B, C]`` of n sample models with graph, without input gradients (lambda = 0 or
    no regularizer): the forward :func:`fastdiv.sample_input_grads` would do. ``stacked``: x is
    already ``[n*B, ...]`` sample-major (per-member adversarial examples). ``batched``: one replicated
    forward (else one per sample).

    Not :func:`fastdiv.analysis.sample_logits`, which evaluates (no graph), gives a deterministic model
    one sample rather than n and chunks large batches."""
    from ..nn.sampling import sampling

    def forward(inputs: torch.Tensor) -> torch.Tensor:  # floating-point logits [N, C], or a clear error
        return check_logits_output(model(inputs), inputs.shape[0], "fastdiv train")

    batch = x.shape[0] // n if stacked else x.shape[0]
    if not randomized:
        out = forward(x)
        return out.view(n, batch, -1) if stacked else out.unsqueeze(0).expand(n, *out.shape)
    if batched:
        xr = x if stacked else x.repeat(n, *([1] * (x.dim() - 1)))
        with sampling(model, n, seed):
            out = forward(xr)
        return out.view(n, batch, -1)
    parts = []
    for s in range(n):
        xs = x[s * batch:(s + 1) * batch] if stacked else x
        with sampling(model, n, seed, index=s):
            parts.append(forward(xs))
    return torch.stack(parts)


def train(config: dict | TrainConfig, *, quiet: bool = False) -> Path:
    """Trains the run ``config`` describes; returns its run directory.

    ``config``: a :class:`TrainConfig` (used as is) or a dict of settings resolved with
    :func:`resolve_config` (the preset's values for the dataset, overridden by the dict), e.g.
    ``train({'preset': 'graddiv-kappa', 'dataset': 'digits', 'epochs': 3, 'out': 'runs/x'})``.
    ``resume=True`` continues the run in ``out`` from its checkpoint (settings come from its
    ``config.json``; only ``epochs`` and ``device`` may differ).

    Raises :class:`TrainingDiverged` on a non-finite loss and :class:`TrainingInterrupted` after
    SIGINT/SIGTERM (both after keeping a usable checkpoint), ``FileExistsError`` when ``out``
    already holds a checkpoint and ``resume`` is false; a :mod:`fastdiv.errors` error for bad settings,
    an ``out`` that is a file or cannot be written (both before anything is created), a damaged or
    unsafe file (:class:`~fastdiv.errors.CorruptFileError`) and a full disk (an ``OSError`` with
    ``errno.ENOSPC``; the previous checkpoint is kept).
    """
    if isinstance(config, TrainConfig):
        cfg = config
        cfg.validate()
    elif isinstance(config, dict):
        cfg = config_for_run(dict(config))
    else:
        raise TypeError(f"train: config must be a dict or a TrainConfig, got {type(config).__name__}")
    run = Trainer(cfg, quiet)
    try:
        run.setup()
        return run.run()
    finally:
        run.dist.close()
