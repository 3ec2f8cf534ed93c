"""The input gradients of n sample models in one pass: :func:`sample_input_grads`.

Every defense in fastdiv penalizes, and every EOT attack averages, the gradients
``g_s = ∇_x L(f_s(x), y)`` of n sample models ``f_s`` of a randomized or ensemble network. The
'batched' strategy evaluates all n on one replicated batch (one forward, one backward; see
:mod:`fastdiv.nn.sampling`); the 'loop' strategy runs them one by one and is the reference the
batched path is tested against: both give the same gradients for the same seed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._checks import check_logits_output, check_model_and_batch
from .nn.randomness import Randomness, detect_randomness, one_sample
from .nn.sampling import sampling, supports_batched

__all__ = ["LOSSES", "STRATEGIES", "per_example_loss", "resolve_seed", "resolve_strategy",
           "sample_input_grads", "sample_logits", "sample_logits_of"]

STRATEGIES = ("auto", "batched", "loop")
LOSSES = ("ce", "logit", "cw")


def _cw_margin(logits: torch.Tensor, y: torch.Tensor, confidence: float = 0.0) -> torch.Tensor:
    """Carlini–Wagner hinge to maximize: ``min(max_{j≠y} z_j − z_y, confidence)``."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).clamp(max=confidence)


def per_example_loss(loss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-example loss ``[N]`` whose input gradient the attacks ascend.

    'ce': cross-entropy; 'logit': the true-class logit z_y (the output whose gradient Defense
    through Diverse Directions diversifies); 'cw': the Carlini–Wagner hinge
    min(max_{j≠y} z_j − z_y, 0); or a callable ``loss(logits [N, C], y [N]) -> [N]``.
    """
    if callable(loss):
        out = loss(logits, y)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            raise ValueError(f"sample_input_grads: a callable loss must return a per-example tensor of shape "
                             f"{tuple(y.shape)}, got {getattr(out, 'shape', type(out).__name__)}")
        return out
    if loss == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    if loss == "logit":
        return logits.gather(1, y[:, None]).squeeze(1)
    if loss == "cw":
        return _cw_margin(logits, y)
    raise ValueError(f"sample_input_grads: loss must be one of {LOSSES} or a callable, got {loss!r}")


def resolve_seed(generator: torch.Generator | int | None) -> int:
    """A 62-bit seed: ``generator`` itself if it is an int, else drawn from it (or from the global RNG)."""
    if isinstance(generator, bool):
        raise TypeError("generator must be a torch.Generator, an int seed or None, got bool")
    if isinstance(generator, int):
        return generator
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def _check_inputs(model, x, y, num_samples, create_graph, strategy) -> None:
    fn = "sample_input_grads"
    check_model_and_batch(model, x, fn)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{fn}: y must be an integer tensor of labels [B], got "
                        f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"{fn}: y must have shape [{x.shape[0]}] (one label per example of x), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{fn}: y is on {y.device} but x is on {x.device}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{fn}: num_samples must be an int >= 1, got {num_samples!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(create_graph, bool):
        raise TypeError(f"{fn}: create_graph must be a bool, got {type(create_graph).__name__}")


def _logits(model, x: torch.Tensor, fn: str = "sample_input_grads") -> torch.Tensor:
    return check_logits_output(model(x), x.shape[0], fn)


def _check_labels(y: torch.Tensor, classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"sample_input_grads: labels y must be in [0, {classes}) for a model with {classes} "
                         f"classes, got range [{int(y.min())}, {int(y.max())}]")


def _grads_of(model, x, y, loss, create_graph, check_labels=True):
    """(input gradient, logits) of one forward on ``x`` (a replicated or plain batch)."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = _logits(model, leaf)
        if check_labels:  # before the loss: an out-of-range label is a device assert on CUDA
            _check_labels(y, logits.shape[1])
        total = per_example_loss(loss, logits, y.repeat(x.shape[0] // y.shape[0])).sum()
        (grad,) = torch.autograd.grad(total, leaf, create_graph=create_graph)
    return grad, logits


def resolve_strategy(model: nn.Module, x: torch.Tensor, strategy: str, fn: str = "sample_input_grads",
                     randomness: Randomness | None = None) -> str:
    """'batched' or 'loop' for evaluating n sample models of ``model`` at ``x``.

    'auto' is 'batched' for tensors on a GPU when :func:`fastdiv.nn.supports_batched` allows it, else
    'loop': measured (benchmarks/RESULTS.md), on CPU the n-times replicated batch falls out of cache
    and loses to the loop (1.7-2.2x slower single-threaded); on GPUs the one large pass wins. A model
    whose ``randomness`` includes draws from the global RNG is always looped: 'batched' is an error.
    """
    global_rng = randomness is not None and randomness.global_rng
    if strategy == "auto":
        return "batched" if not global_rng and supports_batched(model) and x.device.type != "cpu" else "loop"
    if strategy == "batched" and not supports_batched(model):
        raise ValueError(f"{fn}: strategy='batched' needs a model whose randomness comes from "
                         "fastdiv.nn layers (torch dropout in train mode or a layer without sample batching "
                         "found); use strategy='loop' or 'auto'")
    if strategy == "batched" and global_rng:
        raise ValueError(f"{fn}: strategy='batched' needs a model whose randomness comes from fastdiv.nn layers, "
                         f"but this one draws from the global RNG ({randomness.reason}); in a replicated batch "
                         "a draw made once per forward (e.g. the weights of a Bayesian layer) would be shared "
                         "by all n replicas. Use strategy='loop' or 'auto'")
    return strategy


def sample_logits(model: nn.Module, x: torch.Tensor, num_samples: int, *, seed: int, strategy: str = "auto",
                  stochastic: bool | Randomness | None = None, fn: str = "sample_logits") -> torch.Tensor:
    """Logits ``[n, B, C]`` of ``num_samples`` sample models drawn from ``seed``, without gradient: one
    forward over the replicated batch or n forwards (``strategy`` as in :func:`sample_input_grads`); a
    deterministic model is evaluated once and its logits expanded."""
    return sample_logits_of(model, (x,), num_samples, seed=seed, strategy=strategy, stochastic=stochastic, fn=fn)[0]


def sample_logits_of(model: nn.Module, inputs: Sequence[torch.Tensor], num_samples: int, *, seed: int,
                     strategy: str = "auto", stochastic: bool | Randomness | None = None,
                     fn: str = "sample_logits") -> list[torch.Tensor]:
    """:func:`sample_logits` of each of ``inputs`` on the same sample models (one forward per input, so
    that noise drawn per batch position is shared too between inputs of equal batch size): one
    ``[n, B_i, C]`` per input. fastdiv's layers draw each sample model's weights once for all inputs."""
    x = inputs[0]
    randomness = detect_randomness(model, x, stochastic=stochastic)
    n = num_samples
    with torch.no_grad():
        if not randomness:
            return [_logits(model, xi, fn).unsqueeze(0).expand(n, -1, -1) for xi in inputs]
        if resolve_strategy(model, x, strategy, fn, randomness) == "batched":
            with sampling(model, n, seed):
                return [_logits(model, xi.repeat(n, *([1] * (xi.dim() - 1))), fn).view(n, xi.shape[0], -1)
                        for xi in inputs]
        parts = [[] for _ in inputs]
        for s in range(n):
            if randomness.global_rng:  # the global RNG is re-seeded for each input: the same draws for each
                for part, xi in zip(parts, inputs):
                    with one_sample(model, n, seed, s, randomness, xi.device):
                        part.append(_logits(model, xi, fn))
            else:
                with one_sample(model, n, seed, s, randomness, x.device):
                    for part, xi in zip(parts, inputs):
                        part.append(_logits(model, xi, fn))
        return [torch.stack(part) for part in parts]


def sample_input_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_samples: int,
    *,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ce",
    create_graph: bool = False,
    strategy: str = "auto",
    generator: torch.Generator | int | None = None,
    stochastic: bool | Randomness | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradients of ``num_samples`` sample models of ``model`` at ``(x, y)``.

    Returns ``(grads [n, B, *x.shape[1:]], logits [n, B, C])``. ``grads[s, b]`` is the gradient of
    sample model s's per-example loss at example b (see :func:`per_example_loss` for ``loss``);
    the layout is what every fastdiv loss accepts with ``sample_dim=0`` and what
    :func:`fastdiv.eot_step` takes.

    strategy:
        'batched' — one forward and one backward over the batch replicated n times, each randomized
        layer using per-sample draws (:mod:`fastdiv.nn.sampling`); fastdiv's layers and
        :class:`fastdiv.nn.Ensemble` support it. 'loop' — n forwards/backwards; works for any
        module (torch dropout, custom randomness). 'auto' — 'batched' for tensors on a GPU when
        :func:`fastdiv.nn.supports_batched` says the model supports it, else 'loop' (on CPU the
        loop is faster: the replicated batch falls out of cache). With the same
        ``generator`` seed, 'batched' and 'loop' return the same gradients (up to float rounding).
        A model without any randomness is evaluated once and its gradient expanded to n samples. A
        model that draws from the global RNG (torch dropout in train mode, another library's Bayesian
        layers, ``torch.randn`` in its ``forward``) is always looped, with the global RNG seeded per
        sample from ``generator`` and restored afterwards; 'batched' is then an error.
    create_graph: keep the graph so that a penalty on the gradients can be back-propagated to the
        model's parameters (double backward, for training); ``logits`` then carry the graph too.
    generator: a ``torch.Generator`` or an int seed for the sample draws (default: the global RNG).
    stochastic: ``None`` (default) detects the model's randomness with
        :func:`fastdiv.nn.detect_randomness` (its layers, then a two-forward probe of a few examples);
        ``True`` / ``False`` declares it (``False``: one gradient for all n; ``True`` on a model with
        fastdiv layers still probes whether it also draws from the global RNG, which decides the strategy).

    BatchNorm layers in train mode see each sample's rows separately in the batched pass and update
    their running statistics as n sequential forwards would.
    """
    _check_inputs(model, x, y, num_samples, create_graph, strategy)
    y = y.long()
    n, batch = num_samples, x.shape[0]
    randomness = detect_randomness(model, x, stochastic=stochastic)
    strategy = resolve_strategy(model, x, strategy, randomness=randomness)
    seed = resolve_seed(generator)
    if batch == 0:
        with torch.no_grad(), sampling(model, 1, seed, index=0):
            classes = _logits(model, x).shape[1]
        return x.new_zeros((n, *x.shape)), x.new_zeros((n, 0, classes))

    if not randomness:
        grad, logits = _grads_of(model, x, y, loss, create_graph)
        grads, logits = grad.unsqueeze(0).expand(n, *grad.shape), logits.unsqueeze(0).expand(n, *logits.shape)
    elif strategy == "batched":
        with sampling(model, n, seed):
            grad, logits = _grads_of(model, x.repeat(n, *([1] * (x.dim() - 1))), y, loss, create_graph)
        grads, logits = grad.view(n, *x.shape), logits.view(n, batch, -1)
    else:
        pairs = []
        for s in range(n):
            with one_sample(model, n, seed, s, randomness, x.device):
                pairs.append(_grads_of(model, x, y, loss, create_graph, check_labels=s == 0))
        grads = torch.stack([g for g, _ in pairs])
        logits = torch.stack([z for _, z in pairs])
    return grads, (logits if create_graph else logits.detach())

