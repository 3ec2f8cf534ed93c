"""The evaluation after every epoch: validation accuracy of the defense's inference and the concentration
statistics of held-out input gradients (the ``val_*`` and ``rho``/``kappa_p``/... fields of
``metrics.jsonl``).

The sample models are drawn from fixed seeds (the same every epoch), so the numbers of two epochs differ
by the training between them only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._seeds import mix_seed
from . import streams
from .config import TrainConfig

__all__ = ["eval_samples", "held_out_stats", "validate"]


def eval_samples(cfg: TrainConfig, members: list[nn.Module] | None, randomized: bool) -> int:
    """Sample models of the validation inference: every member of an ensemble or population, else
    ``cfg.eval_samples`` draws of a randomized model (1 for a deterministic one)."""
    if cfg.wrapper != "single":
        return len(members)
    return cfg.eval_samples if randomized else 1


@torch.no_grad()
def validate(cfg: TrainConfig, model: nn.Module, eval_module: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
             *, device: torch.device, members: list[nn.Module] | None, randomized: bool) -> dict[str, Any]:
    """Validation accuracy of the defense's inference (mean softmax over the sample models; for a
    random-dispatch population the expected accuracy of one random member) and the concentration
    statistics of held-out gradients.

    ``model`` is the trained model (put in eval mode meanwhile), ``eval_module`` the module the sample
    models are drawn from (a population's Ensemble view of its members, else ``model``)."""
    from ..nn.sampling import sampling, supports_batched
    was_training = model.training
    model.eval()
    k = eval_samples(cfg, members, randomized)
    seed = mix_seed(cfg.seed, streams.VALIDATION)
    per = max(1, cfg.eval_rows // k)
    correct_ens, correct_single, total, nll = 0.0, 0.0, 0, 0.0
    for i in range(0, len(x_val), per):
        x = x_val[i:i + per].to(device)
        y = y_val[i:i + per].to(device)
        b = x.shape[0]
        # the forwards of fastdiv.analysis.sample_logits, but over exactly these eval_rows-sized chunks: it
        # splits a chunk whose replicas exceed analysis.MAX_ROWS rows, and noise draws depend on the batch
        if not randomized:
            logits = eval_module(x).unsqueeze(0)
        elif supports_batched(eval_module):
            with sampling(eval_module, k, seed):
                logits = eval_module(x.repeat(k, *([1] * (x.dim() - 1)))).view(k, b, -1)
        else:
            parts = []
            for s in range(k):
                with sampling(eval_module, k, seed, index=s):
                    parts.append(eval_module(x))
            logits = torch.stack(parts)
        probs = logits.float().softmax(-1)
        mean = probs.mean(0)
        correct_ens += float((mean.argmax(-1) == y).sum())
        correct_single += float((logits.argmax(-1) == y).float().mean(0).sum())
        nll += float(-mean.gather(1, y[:, None]).clamp_min(1e-12).log().sum())
        total += b
    total = max(total, 1)
    out = {"val_acc_ensemble": correct_ens / total, "val_acc_single": correct_single / total,
           "val_nll": nll / total}
    out["val_acc"] = out["val_acc_single"] if cfg.wrapper == "population" else out["val_acc_ensemble"]
    n = k if cfg.wrapper != "single" else cfg.stats_samples
    out.update(held_out_stats(cfg, eval_module, x_val, y_val, device=device, num_samples=n, randomized=randomized))
    model.train(was_training)
    return out


def held_out_stats(cfg: TrainConfig, eval_module: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, *,
                   device: torch.device, num_samples: int, randomized: bool) -> dict[str, Any]:
    """Mean concentration statistics (rho, kappa/p, mean cos, coherence, DPP) of the input gradients of
    ``num_samples`` sample models on the first ``cfg.stats_limit`` validation examples; all None when
    they are off or undefined (a deterministic model, fewer than 2 samples)."""
    from ..grads import sample_input_grads
    from ..losses import concentration_stats
    n = num_samples
    if cfg.stats_limit == 0 or not randomized or n < 2 or len(x_val) == 0:
        return {"rho": None, "kappa_p": None, "mean_cos": None, "coherence": None, "dpp": None}
    x_all = x_val[:cfg.stats_limit]
    y_all = y_val[:cfg.stats_limit]
    seed = mix_seed(cfg.seed, streams.HELD_OUT_STATS)
    per = max(1, cfg.eval_rows // n)
    sums = {"rho": 0.0, "kappa_p": 0.0, "mean_cos": 0.0, "coherence": 0.0, "dpp": 0.0}
    for i in range(0, len(x_all), per):
        x, y = x_all[i:i + per].to(device), y_all[i:i + per].to(device)
        with torch.enable_grad():
            grads, _ = sample_input_grads(eval_module, x, y, n, loss=cfg.grad_loss, strategy=cfg.strategy,
                                          generator=seed)
        st = concentration_stats(grads, sample_dim=0)
        d = grads[0, 0].numel()
        sums["rho"] += float(st.rho.sum())
        sums["kappa_p"] += float(st.kappa.sum()) / d
        sums["mean_cos"] += float(st.mean_cos.sum())
        sums["coherence"] += float(st.coherence.sum())
        sums["dpp"] += float(st.dpp.sum())
    return {k: v / len(x_all) for k, v in sums.items()}
