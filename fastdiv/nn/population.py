"""Random-dispatch populations (Counter-Linked Models, CLM / ULM): :class:`Population`,
:func:`counter_link_masks` and :func:`prse`.

A population of n submodels answers each query with a submodel drawn uniformly at random
(Jasser & Garibay, "Resilience from diversity", §2). Counter linking keeps the submodels'
first-layer weights apart: a random mask ℓ over about half of the first layer's weights, shared by
all submodels (:func:`counter_link_masks`), and the periodic random similarity examination
(:func:`prse`, eq. 4–5) that moves the masked weights of submodel m_i that are within δ of those of
another submodel m_j by ±α.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .._seeds import mix_seed
from .ensemble import _BatchNorm, _check_members, _frozen_member, _plain_batch_norms, _same_architecture
from .sampling import RandomizedModule

__all__ = ["DISPATCH", "Population", "counter_link_masks", "prse"]

#: dispatch rules of :class:`Population`
DISPATCH = ("random",)


def _first_weight_name(member: nn.Module) -> str | None:
    for name, p in member.named_parameters():
        if p.dim() >= 2:  # a conv kernel or a linear weight matrix, not a bias or a norm scale
            return name
    return None


class Population(RandomizedModule):
    """A population of submodels; each query (example) is answered by a uniformly random member.

    Args:
        members: at least 2 ``nn.Module`` returning logits ``[N, C]`` (same number of classes).
            Counter linking (:func:`counter_link_masks`, :func:`prse`) needs one architecture.
        dispatch: ``'random'`` — every example of every call goes to a member drawn uniformly.
        seed: ``None`` — outside sampling blocks dispatch draws from the global RNG
            (``torch.manual_seed`` makes it reproducible); an int — call ``t`` of the population
            draws from a generator seeded by ``(seed, t)``, so a population built (or loaded from a
            state dict) with the same seed answers the same sequence of calls identically. The
            call counter and seed travel in ``state_dict()`` (extra state). Draws use the input's
            device, so CPU and CUDA sequences differ.
        link_param: name of the counter-linked weight inside a member (e.g. ``'conv1.weight'``);
            default: the first parameter with two or more dims (the first conv/linear weight).

    Returns the dispatched member's raw logits, row by row. :attr:`last_dispatch` holds the member
    index of each row of the last forward. Members see only the rows dispatched to them (one call
    per member that received rows; BatchNorm in train mode normalizes over those rows, so train
    members individually, as CLM does, and use the population for inference and attacks).

    Inside :func:`fastdiv.nn.sampling`, sample ``s``'s dispatch comes from
    ``self.draw(..., kind='uniform')``: a batched forward and the loop give the same members per
    example. :attr:`supports_sample_batching` is ``False`` while a member has a BatchNorm in train
    mode (its statistics would depend on which other rows share the member). Inside
    :func:`fastdiv.nn.frozen_sample` every row goes to one member chosen from the frozen seed
    (the CLM attack "on a random submodel").

    Buffers: ``link_mask`` (bool, the shape of the linked weight; all ``False`` until
    :func:`counter_link_masks`) and ``link_mask_set`` (bool scalar).

    >>> pop = Population([build_model('lenet5', in_shape=(1, 28, 28)) for _ in range(10)], seed=0)
    >>> counter_link_masks(pop, fraction=0.5, generator=0)
    >>> logits = pop(x)           # each example answered by a random submodel
    """

    def __init__(self, members: Iterable[nn.Module], dispatch: str = "random", seed: int | None = None,
                 link_param: str | None = None):
        super().__init__()
        members = _check_members(members, "Population", minimum=2)
        if dispatch not in DISPATCH:
            raise ValueError(f"Population: dispatch must be one of {DISPATCH}, got {dispatch!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Population: seed must be None or an int, got {type(seed).__name__}")
        self.members = nn.ModuleList(members)
        self.dispatch = dispatch
        self.seed = seed
        self._calls = 0
        #: whether all members share one architecture (needed for counter linking)
        self.homogeneous = _same_architecture(members)
        if link_param is None:
            link_param = _first_weight_name(members[0])
            if link_param is None:
                raise ValueError("Population: members[0] has no parameter with >= 2 dims to counter-link; "
                                 "pass link_param")
        params = dict(members[0].named_parameters())
        if link_param not in params:
            raise ValueError(f"Population: link_param {link_param!r} is not a parameter of members[0] "
                             f"(parameters: {list(params)[:8]}...)")
        self.link_param = link_param
        weight = params[link_param]
        self.register_buffer("link_mask", torch.zeros(weight.shape, dtype=torch.bool, device=weight.device))
        self.register_buffer("link_mask_set", torch.zeros((), dtype=torch.bool, device=weight.device))
        #: member index of each row of the last forward (``None`` before the first)
        self.last_dispatch: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def supports_sample_batching(self) -> bool:  # type: ignore[override]
        return not any(isinstance(m, _BatchNorm) and m.training for m in self.members.modules())

    def linked_weight(self, i: int) -> nn.Parameter:
        """The counter-linked (first-layer) weight of member ``i``."""
        self._check_index(i, "i", "linked_weight")
        params = dict(self.members[i].named_parameters())
        if self.link_param not in params:
            raise ValueError(f"Population: members[{i}] has no parameter {self.link_param!r}")
        return params[self.link_param]

    def _check_index(self, i, name: str, fn: str) -> None:
        n = len(self.members)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"{fn}: {name} must be a member index in [0, {n}), got {i!r}")

    # state dict: the dispatch seed and call counter, so a loaded population continues the sequence
    def get_extra_state(self):
        return {"seed": self.seed, "calls": self._calls}

    def set_extra_state(self, state) -> None:
        self.seed = state["seed"]
        self._calls = int(state["calls"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = len(self.members)
        n = x.shape[0]
        state = self.sample_state()
        if state is not None and state.frozen:
            j = _frozen_member(state, self._fastdiv_ordinal, m)
            self.last_dispatch = torch.full((n,), j, dtype=torch.long, device=x.device)
            return self.members[j](x)
        like = torch.empty(0, device=x.device)  # fp32 draws: the dispatch does not depend on the model dtype
        if state is None:
            if self.seed is None:
                u = self.draw((n,), like=like, kind="uniform").reshape(n)
            else:
                gen = torch.Generator(device=x.device)
                gen.manual_seed(mix_seed(self.seed, self._calls))
                self._calls += 1
                u = torch.rand((n,), generator=gen, device=x.device)
        else:
            k = state.active
            if n % k:
                raise ValueError(f"Population: a sample-batched input must hold {k} replicas along dim 0, "
                                 f"got {n} rows")
            u = self.draw((n // k,), like=like, kind="uniform").reshape(n)
        assign = (u * m).long().clamp_(max=m - 1)
        self.last_dispatch = assign
        return self._dispatch(x, assign)

    def _dispatch(self, x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        m = len(self.members)
        if x.shape[0] == 0:
            return self.members[0](x)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=m).tolist()  # the one host sync: sub-batch sizes
        parts = x.index_select(0, order).split(counts)
        with _plain_batch_norms(self.members):
            outs = [self.members[j](parts[j]) for j in range(m) if counts[j] > 0]
        shapes = {tuple(o.shape[1:]) for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"Population: all members must return logits [N, C] with one C, got {sorted(shapes)}")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(outs).index_select(0, inverse)

    def extra_repr(self) -> str:
        return (f"members={len(self.members)}, dispatch={self.dispatch!r}, seed={self.seed}, "
                f"link_param={self.link_param!r}")


def _check_population(population, fn: str) -> Population:
    if not isinstance(population, Population):
        raise TypeError(f"{fn}: population must be a fastdiv.nn.Population, got {type(population).__name__}")
    return population


def _linked_weights(population: Population, fn: str) -> list[nn.Parameter]:
    weights = [population.linked_weight(i) for i in range(len(population.members))]
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1 or tuple(weights[0].shape) != tuple(population.link_mask.shape):
        raise ValueError(f"{fn}: counter linking needs members of one architecture; the linked weight "
                         f"{population.link_param!r} has shapes {[tuple(w.shape) for w in weights]}")
    return weights


def counter_link_masks(population: Population, fraction: float = 0.5, generator=None) -> torch.Tensor:
    """Draw the counter-linking mask ℓ: each weight of the linked (first) layer is a
    counter-linked weight w_c with probability ``fraction`` (CLM: about half), the same positions
    in every member. Stored in ``population.link_mask`` (a buffer, so it is saved in the state
    dict) and returned.

    generator: ``None`` (global RNG), an int seed or a ``torch.Generator``. The mask is drawn on
    the generator's device (CPU for ``None``/int: the same mask on every device) and moved to the
    weights' device.
    """
    fn = "counter_link_masks"
    population = _check_population(population, fn)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{fn}: fraction must be a number in [0, 1], got {fraction!r}")
    _linked_weights(population, fn)
    if isinstance(generator, bool):
        raise TypeError(f"{fn}: generator must be None, an int seed or a torch.Generator, got bool")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be None, an int seed or a torch.Generator, "
                        f"got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    shape = population.link_mask.shape
    mask = torch.rand(shape, generator=generator, device=device) < fraction
    with torch.no_grad():
        population.link_mask.copy_(mask)
        population.link_mask_set.fill_(True)
    return population.link_mask


def prse(population: Population, i: int, j: int, alpha: float, delta: float) -> torch.Tensor:
    """Periodic random similarity examination (CLM eq. 4–5) of member ``i`` against member ``j``.

    With ``W_i``, ``W_j`` the linked (first-layer) weights and ℓ the shared mask::

        β = 1[|W_i − W_j| < δ]                      (eq. 4)
        W_i ← W_i + (−1)^n · α · β ⊙ ℓ               (eq. 5)

    in place on member ``i`` only (``W_j`` and every other parameter are unchanged). ``n`` is the
    paper's 1-based submodel index of m_i, ``n = i + 1`` for the 0-based ``i`` used here: "a
    submodel with an odd index will always be diverged in a negative direction and positively
    otherwise", so ``members[0]``, ``members[2]``, … move by −α and ``members[1]``, ``members[3]``, …
    by +α.

    CLM runs it every 10 training steps of submodel m_i against a random ``j != i``; α, δ =
    0.1/0.1 (LeNet5), 0.5/0.1 (ResNet18); with adversarial training 0.01/5e-3 and 0.1/0.05.
    Call :func:`counter_link_masks` first. Returns the bool tensor β ⊙ ℓ of the weights changed.

    >>> j = random.choice([k for k in range(len(pop)) if k != i])
    >>> prse(pop, i, j, alpha=0.1, delta=0.1)
    """
    fn = "prse"
    population = _check_population(population, fn)
    population._check_index(i, "i", fn)
    population._check_index(j, "j", fn)
    if i == j:
        raise ValueError(f"{fn}: i and j must be different members, got i = j = {i}")
    for name, v in (("alpha", alpha), ("delta", delta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be a finite number, got {v!r}")
    if alpha < 0:
        raise ValueError(f"{fn}: alpha must be >= 0 (the sign comes from the submodel index), got {alpha!r}")
    if delta <= 0:
        raise ValueError(f"{fn}: delta must be > 0, got {delta!r}")
    if not bool(population.link_mask_set):
        raise RuntimeError(f"{fn}: the population has no counter-linking mask yet; call counter_link_masks first")
    weights = _linked_weights(population, fn)
    w_i, w_j = weights[i], weights[j]
    sign = -1.0 if (i + 1) % 2 == 1 else 1.0
    with torch.no_grad():
        beta = (w_i - w_j.to(w_i.device)).abs() < delta
        changed = beta & population.link_mask.to(w_i.device)
        w_i.add_(changed.to(w_i.dtype), alpha=sign * float(alpha))
    return changed
