"""Deterministic ensembles as randomized models: :class:`Ensemble` and :func:`predict`.

An ensemble of m members is treated as a distribution over its members: inside a
:func:`fastdiv.nn.sampling` block, sample model ``s`` is member ``s % m``, so
:func:`fastdiv.sample_input_grads` returns the members' input gradients (what GAL and the other
gradient-diversity losses penalize) and the EOT attacks average over members. When the members
share one architecture, the batched forward evaluates all samples in one ``torch.vmap``-ed
``torch.func.functional_call`` over parameters stacked with ``torch.stack`` on every forward, so
gradients (double backward included) reach the members' own parameters.

Outside sampling blocks the ensemble predicts with its averaged softmax,
``log(clamp(mean_k softmax(f_k(x)), min=1e-12))``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call, vmap

from .._checks import check_model_and_batch
from .._seeds import mix_seed
from .randomness import detect_randomness, one_sample
from .sampling import RandomizedModule, SampleState, is_randomized, sampling, supports_batched

__all__ = ["Ensemble", "predict"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _check_members(members, owner: str, minimum: int = 1) -> list[nn.Module]:
    """The members as a list, with clear errors for what an ensemble cannot hold."""
    if isinstance(members, nn.Module) and not isinstance(members, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{owner}: members must be an iterable of nn.Module, got a single {type(members).__name__}")
    try:
        members = list(members)
    except TypeError:
        raise TypeError(f"{owner}: members must be an iterable of nn.Module, got {type(members).__name__}") from None
    if len(members) < minimum:
        raise ValueError(f"{owner}: needs at least {minimum} member{'s' if minimum > 1 else ''}, got {len(members)}")
    for i, m in enumerate(members):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{owner}: members[{i}] must be an nn.Module, got {type(m).__name__}")
        if is_randomized(m):
            # a member's own draws would see the ensemble's replicated batch as its own samples
            raise ValueError(f"{owner}: members[{i}] contains a fastdiv.nn RandomizedModule; members must be "
                             "deterministic networks (the ensemble itself is the randomized model)")
    if len({id(m) for m in members}) != len(members):
        raise ValueError(f"{owner}: the same module appears twice in members; pass distinct networks")
    return members


def _signature(module: nn.Module):
    """What must agree for one module to run as another with swapped tensors (functional_call)."""
    return (
        tuple(type(m) for m in module.modules()),
        repr(module),  # includes strides, paddings, activation slopes, ...
        tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()),
    )


def _same_architecture(members: list[nn.Module]) -> bool:
    first = _signature(members[0])
    return all(_signature(m) == first for m in members[1:])


@contextlib.contextmanager
def _plain_batch_norms(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Temporarily remove the per-sample BatchNorm forwards that a batched :func:`sampling` block
    installs, for members that the ensemble itself runs on one sample's rows."""
    removed = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, _BatchNorm) and "forward" in m.__dict__:
                removed.append((m, m.__dict__.pop("forward")))
    try:
        yield
    finally:
        for m, fwd in removed:
            m.forward = fwd


def _has_training_batch_norm(modules: Iterable[nn.Module]) -> bool:
    return any(isinstance(m, _BatchNorm) and m.training for root in modules for m in root.modules())


def _cumulative_batch_norm(modules: Iterable[nn.Module]) -> bool:
    # momentum=None reads num_batches_tracked as a Python float, which vmap cannot do
    return any(isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.momentum is None
               for root in modules for m in root.modules())


def _frozen_member(state: SampleState, ordinal: int, count: int) -> int:
    """The member that a :func:`frozen_sample` pins: a function of the frozen seed and the layer."""
    return mix_seed(state.seed, ordinal, 0x454E53) % count


class Ensemble(RandomizedModule):
    """An ensemble of deterministic networks, usable as a randomized model.

    Args:
        members: one or more ``nn.Module`` mapping a batch to logits ``[N, C]`` (all with the
            same number of classes). They are kept in :attr:`members` (an ``nn.ModuleList``), so
            ``ensemble.parameters()``, ``.to()`` and ``state_dict()`` cover them.

    Outside sampling blocks, ``ensemble(x)`` returns the log of the averaged softmax,
    ``log(clamp(mean_k softmax(f_k(x)), min=1e-12))``: "logits" whose softmax is the ensemble's
    prediction and whose cross-entropy is the NLL of the averaged prediction. The clamp keeps the
    log finite when every member gives a class (numerically) zero probability; it also zeroes the
    gradient of those entries.

    Inside :func:`fastdiv.nn.sampling` (what :func:`fastdiv.sample_input_grads` and the attacks
    use), sample ``s`` is member ``s % m`` and its output is that member's raw logits. With
    ``index=i`` member ``i % m`` runs on the plain batch; with ``index=None`` the input is the
    batch replicated ``k`` times and the k samples run together:

    * members of one architecture (same module types, reprs, parameter and buffer shapes): one
      ``torch.vmap`` over ``torch.func.functional_call`` with the parameters and buffers stacked
      by ``torch.stack`` on every forward, so gradients flow to each member's own parameters and
      ``create_graph=True`` double backward works.
    * BatchNorm in train mode: vmapped as above while each member serves at most one sample
      (``k <= m``); the updated running statistics are copied back into the members. With
      ``k > m`` (a member serving several samples, whose running statistics must be updated
      sequentially) or ``momentum=None`` the samples run one after the other instead — the same
      results, without the vmap speed-up.
    * mixed architectures: :attr:`supports_sample_batching` is ``False``, so
      :func:`fastdiv.sample_input_grads` uses its loop strategy; a direct batched forward still
      works (sample by sample).

    Inside :func:`fastdiv.nn.frozen_sample` the ensemble is pinned to one member, chosen from
    the frozen seed.

    >>> ens = Ensemble([build_model('conv3', in_shape=(1, 28, 28)) for _ in range(5)])
    >>> grads, logits = fastdiv.sample_input_grads(ens, x, y, 5, create_graph=True)  # one per member
    >>> loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(5)) + 0.5 * fastdiv.gal_loss(grads, sample_dim=0)
    """

    #: probabilities are clamped to this value before the log in the averaged-softmax output
    prob_floor: float = 1e-12

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        members = _check_members(members, type(self).__name__)
        self.members = nn.ModuleList(members)
        #: whether all members share one architecture (vmapped sample-batched forward)
        self.homogeneous = _same_architecture(members)
        if not self.homogeneous:
            self.supports_sample_batching = False

    def __len__(self) -> int:
        return len(self.members)

    # ---------------------------------------------------------------------------------------------
    # forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.sample_state()
        if state is None:
            return self.average_log_probs(self.member_logits(x))
        return self._sample_forward(x, state)

    def average_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log(clamp(mean_k softmax(logits[k]), min=prob_floor))`` for member logits ``[m, N, C]``."""
        return logits.softmax(-1).mean(0).clamp(min=self.prob_floor).log()

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits on the same batch, ``[m, N, C]`` (vmapped for one architecture).

        Independent of sampling blocks: members are deterministic. BatchNorm layers in train mode
        normalize each member's batch with that member's statistics and update its running stats.
        """
        members = list(self.members)
        if self._vmappable(len(members)):
            return self._vmapped(list(range(len(members))), x, batched_input=False)
        with _plain_batch_norms(members):
            outs = [m(x) for m in members]
        return self._stack_outputs(outs)

    def _stack_outputs(self, outs: list[torch.Tensor]) -> torch.Tensor:
        shapes = {tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in outs}
        if len(shapes) != 1 or None in shapes:
            raise ValueError(f"{type(self).__name__}: all members must return logits of one shape [N, C], "
                             "got "
                             f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in outs]}")
        return torch.stack(outs)

    def _sample_forward(self, x: torch.Tensor, state: SampleState) -> torch.Tensor:
        m = len(self.members)
        if state.frozen:
            # pinned member on every row; a batched sampling block's per-sample BatchNorm applies
            return self.members[_frozen_member(state, self._fastdiv_ordinal, m)](x)
        if state.index is not None:
            return self.members[state.index % m](x)
        k = state.active
        if x.shape[0] % k:
            raise ValueError(f"{type(self).__name__}: a sample-batched input must hold {k} replicas along dim 0, "
                             f"got {x.shape[0]} rows")
        batch = x.shape[0] // k
        indices = [s % m for s in range(k)]
        xs = x.reshape(k, batch, *x.shape[1:])
        if self._vmappable(k):
            # k > m stacks a member's parameters once per sample it serves (k copies in all)
            out = self._vmapped(indices, xs, batched_input=True)
        else:
            with _plain_batch_norms(self.members):
                out = self._stack_outputs([self.members[i](xs[s]) for s, i in enumerate(indices)])
        return out.reshape(k * batch, *out.shape[2:])

    def _vmappable(self, uses: int) -> bool:
        """Whether one vmapped call can evaluate ``uses`` samples (member ``s % m`` each)."""
        if not self.homogeneous:
            return False
        members = self.members
        if _has_training_batch_norm(members):
            # running statistics of a member serving several samples must be updated sequentially
            return uses <= len(members) and not _cumulative_batch_norm(members)
        return True

    def _vmapped(self, indices: list[int], x: torch.Tensor, *, batched_input: bool) -> torch.Tensor:
        """Members ``indices`` in one vmapped functional call; ``x`` is ``[len(indices), B, ...]``
        when ``batched_input`` else one batch shared by all."""
        members = [self.members[i] for i in indices]
        params = [dict(m.named_parameters()) for m in members]
        buffers = [dict(m.named_buffers()) for m in members]
        # torch.stack (not torch.func.stack_module_state, which detaches) keeps the graph to each
        # member's own parameters, so training and create_graph double backward reach them
        stacked_p = {n: torch.stack([p[n] for p in params]) for n in params[0]}
        stacked_b = {n: torch.stack([b[n] for b in buffers]) for n in buffers[0]}
        base = self.members[0]

        def run(p, b, inp):
            return functional_call(base, (p, b), (inp,))

        train_bn = _has_training_batch_norm(members)
        with _plain_batch_norms(self.members):
            out = vmap(run, in_dims=(0, 0, 0 if batched_input else None), randomness="different")(
                stacked_p, stacked_b, x)
        if train_bn:
            # BatchNorm updated the stacked copies of the running statistics in place
            with torch.no_grad():
                for pos, b in enumerate(buffers):
                    for n, buf in b.items():
                        buf.copy_(stacked_b[n][pos])
        return out

    def extra_repr(self) -> str:
        return f"members={len(self.members)}, homogeneous={self.homogeneous}"


def _check_predict_args(model, x, num_samples, chunk) -> None:
    fn = "predict"
    check_model_and_batch(model, x, fn)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{fn}: num_samples must be an int >= 1, got {num_samples!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{fn}: chunk must be None or an int >= 1 (examples per forward), got {chunk!r}")


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"predict: the model must return logits [N, C], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    # half-precision models: average probabilities in fp32
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    return logits.softmax(-1, dtype=dtype)


_ROWS_PER_FORWARD = 2048


def predict(model: nn.Module, x: torch.Tensor, num_samples: int = 20, seed=None, chunk: int | None = None, *,
            stochastic: bool | None = None) -> torch.Tensor:
    """Ensemble inference: the mean softmax over sample models of ``model``, ``[B, C]``.

    * :class:`Ensemble` (and subclasses): the sample models are the members, whatever
      ``num_samples`` says — the averaged-softmax prediction.
    * a randomized model (``fastdiv.nn`` layers, :class:`fastdiv.nn.Population`): ``num_samples``
      sample models drawn from ``seed`` (an int, a ``torch.Generator`` or ``None`` for the global
      RNG), evaluated in one sample-batched pass per chunk when :func:`fastdiv.nn.supports_batched`
      allows it, else one sample at a time. The same ``seed`` gives the same sample models in every
      chunk (per-element noise layers draw per chunk).
    * a model that draws from the global RNG (torch dropout in train mode, another library's Bayesian
      layers, ``torch.randn`` in ``forward``; found by :func:`fastdiv.nn.detect_randomness`):
      ``num_samples`` forwards, the global RNG seeded per sample from ``seed`` and restored after.
    * a deterministic model: its softmax, one forward per chunk.

    ``stochastic`` declares the model stochastic (``True``) or deterministic (``False``) instead of
    detecting it (``None``).

    ``chunk`` bounds memory: at most ``chunk`` examples go through one forward (each replicated
    ``num_samples`` times); default: about 2048 rows per forward. Runs under ``torch.no_grad()``
    and leaves train/eval mode as it is (RandomizedModule draws are active in both).

    >>> probs = fastdiv.nn.predict(bnn, x, num_samples=20, seed=0)   # GradDiv: 20-sample inference
    >>> acc = (probs.argmax(1) == y).float().mean()
    """
    from ..grads import resolve_seed

    _check_predict_args(model, x, num_samples, chunk)
    ensemble = isinstance(model, Ensemble)
    if ensemble:
        num_samples = len(model.members)
    randomness = detect_randomness(model, x, stochastic=stochastic)
    randomized = randomness.stochastic
    n = num_samples if randomized else 1
    if chunk is None:
        chunk = max(1, _ROWS_PER_FORWARD // n)
    seed = resolve_seed(seed) if randomized else 0
    batched = randomized and not randomness.global_rng and supports_batched(model)
    rest = [1] * (x.dim() - 1)
    outs = []
    with torch.no_grad():
        if x.shape[0] == 0:
            with sampling(model, 1, seed, index=0):
                classes = model(x).shape[-1]
            return x.new_zeros((0, classes))
        for xc in x.split(chunk):
            b = xc.shape[0]
            if not randomized:
                outs.append(_softmax(model(xc)))
            elif batched:
                with sampling(model, n, seed):
                    probs = _softmax(model(xc.repeat(n, *rest)))
                outs.append(probs.reshape(n, b, -1).mean(0))
            else:
                total = 0
                for s in range(n):
                    with one_sample(model, n, seed, s, randomness, xc.device):
                        total = total + _softmax(model(xc))
                outs.append(total / n)
    return torch.cat(outs)
