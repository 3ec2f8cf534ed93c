"""The static source model of Ensemble Adversarial Training (ens-adv: an FGSM copy of every batch) and
of Defense through Diverse Directions 'Off' (d3-*-off: PGD examples added to the training set once).

The source model is a deterministic network of the run's architecture: loaded from ``--source-run``,
from the run directory's ``source.pt``, or trained here first by a plain cross-entropy loop of its own
(Adam, its own data order) and saved as ``source.pt``. Its offline PGD examples go to ``offline.pt``.
Rank 0 prepares both files; the other ranks load them after a barrier.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._seeds import mix_seed
from ..errors import CorruptFileError
from ..files import load_torch_file, match_state_dict
from ..runtime import Ranks, atomic_save
from . import streams
from .batches import offline_eps
from .config import TrainConfig
from .models import load_run

__all__ = ["StaticSource"]


class StaticSource:
    """Prepares the static source model and its offline examples for a run.

    ``x_train``/``y_train`` are the clean training examples (without offline examples), ``x_val``/``y_val``
    the validation split (the source model's accuracy is logged); ``log`` writes a line on rank 0 and
    ``barrier`` waits for every rank.
    """

    def __init__(self, cfg: TrainConfig, *, run_dir: Path, device: torch.device, dist: Ranks, in_shape: tuple,
                 num_classes: int, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, log: Callable[[str], None], barrier: Callable[[], None]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.dist = dist
        self.in_shape = in_shape
        self.num_classes = num_classes
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        self.log = log
        self.barrier = barrier

    def load_or_train(self) -> nn.Module:
        """The source model in eval mode: ``--source-run``'s best model, else ``source.pt``, else one
        trained now (rank 0 only: the other ranks call this after rank 0 wrote ``source.pt``)."""
        cfg = self.cfg
        if cfg.source_run:
            model, _ = load_run(cfg.source_run, which="best", device=str(self.device))
            return model.eval()
        from ..nn.models import build_model
        path = self.run_dir / "source.pt"
        torch.manual_seed(mix_seed(cfg.seed, streams.SOURCE))
        src = build_model(cfg.model, in_shape=self.in_shape, num_classes=self.num_classes,
                          kind="deterministic").to(self.device)
        if path.exists():
            fix = f"delete {path} to train the source model again"
            state = load_torch_file(path, "source model", fix=fix, map_location=self.device)
            match_state_dict(src, state.get("model") if isinstance(state, dict) else state, "source model", path,
                             fix=fix)
            return src.eval()
        if not self.dist.main:
            raise RuntimeError(f"{path} is missing on rank {self.dist.rank}")
        epochs = cfg.epochs if cfg.source_epochs is None else cfg.source_epochs
        self.log(f"training the static source model ({cfg.model}, deterministic) for {epochs} epochs")
        self._train(src, epochs)
        src.eval()
        acc = self._plain_accuracy(src)
        self.log(f"source model: val acc {acc:.4f}")
        atomic_save({"model": src.state_dict(), "epochs": epochs, "val_acc": acc}, path)
        return src

    def _train(self, src: nn.Module, epochs: int) -> None:
        """Plain cross-entropy training on the clean examples (no augmentation, no schedule)."""
        cfg = self.cfg
        opt = torch.optim.Adam(src.parameters(), lr=cfg.lr)
        n = len(self.x_train)
        for e in range(epochs):
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, streams.SOURCE, e))
            order = torch.randperm(n, generator=g)
            src.train()
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                x, y = self.x_train[idx].to(self.device), self.y_train[idx].to(self.device)
                loss = F.cross_entropy(src(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    @torch.no_grad()
    def _plain_accuracy(self, model: nn.Module) -> float:
        correct = 0
        for i in range(0, len(self.x_val), 512):
            x, y = self.x_val[i:i + 512].to(self.device), self.y_val[i:i + 512].to(self.device)
            correct += int((model(x).argmax(1) == y).sum())
        return correct / max(1, len(self.x_val))

    def offline_examples(self, source: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """PGD examples of every clean training image on ``source`` (``offline.pt``, crafted once by
        rank 0), on the CPU: ``(x, y)``."""
        cfg = self.cfg
        path = self.run_dir / "offline.pt"
        n = len(self.x_train)
        if self.dist.main and not path.exists():
            from ..attacks import PGD
            eps = offline_eps(cfg)
            alpha = cfg.offline_alpha if cfg.offline_alpha is not None else eps / 30
            self.log(f"crafting offline PGD-{cfg.offline_steps} examples (eps {eps:g}, step {alpha:g}) of "
                     f"{n} training images on the source model")
            xs = []
            for k, i in enumerate(range(0, n, 256)):
                x = self.x_train[i:i + 256].to(self.device)
                y = self.y_train[i:i + 256].to(self.device)
                atk = PGD(source, eps=eps, alpha=alpha, steps=cfg.offline_steps,
                          seed=mix_seed(cfg.seed, streams.OFFLINE, k))
                xs.append(atk(x, y).cpu())
            atomic_save({"x": torch.cat(xs), "y": self.y_train[:n].clone()}, path)
        self.barrier()
        fix = f"delete {path} to craft the offline examples again"
        state = load_torch_file(path, "offline examples", fix=fix)
        x, y = (state.get("x"), state.get("y")) if isinstance(state, dict) else (None, None)
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape[1:] == self.x_train.shape[1:]
                and y.shape == x.shape[:1]):
            shape = ", ".join(map(str, self.in_shape))
            raise CorruptFileError(f"offline examples {path}: expected tensors 'x' [N, {shape}] and 'y' [N]; found "
                                   f"{_shapes(state)}. {fix}", path)
        return x, y


def _shapes(state) -> str:
    """What a loaded file holds, in a few words (for messages)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    return ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                     for k, v in list(state.items())[:6]) or "an empty dict"
