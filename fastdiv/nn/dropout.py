"""Priority dropout on the last FC layer of K ensemble members: Laplace Priority Dropout (LPD,
Wu et al., Algorithm 1, eq. 3–6) and the Priority Diversified Dropout baseline (PDD, eq. 2).

:class:`PriorityDropout` maps the stacked last-layer activations of the K members, ``[K, N, F]``,
to the same tensor with units dropped at priority-dependent keep rates. The statistics couple the
members (the priority medians are ranked over the whole ensemble), which is why it acts on all K
at once. :class:`PriorityDropoutEnsemble` wires it into an :class:`~fastdiv.nn.Ensemble`: it runs
every member up to its head (the last ``nn.Linear`` by default), applies the dropout to the
stacked head inputs and finishes each member with its head.

All statistics are tensor ops on the features' device (sort, searchsorted, top-k): no host sync.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .ensemble import Ensemble, _frozen_member
from .sampling import RandomizedModule, SampleState

__all__ = ["KINDS", "PriorityDropout", "PriorityDropoutEnsemble"]

#: the keep-rate functions of :class:`PriorityDropout`
KINDS = ("lpd", "pdd")

_SENTINEL = torch.iinfo(torch.int64).max  # bin id of non-activated units: sorts last, matches nothing
_MAX_BIN = 2.0 ** 52  # bins stay exactly representable and far from the sentinel


def _number(name: str, value, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    return float(value)


class PriorityDropout(RandomizedModule):
    """Adaptive dropout of the last FC layer's activations of ``num_members`` ensemble members.

    Input: the members' activations stacked on dim 0, ``[K, N, *F]`` (``F`` = the last FC layer's
    units, e.g. 512 for ResNet-18). In train mode, per forward (one mini-batch = one "training
    period"):

    1. every activated unit (activation ``v > eps``, pooled over the batch and the units) gets the
       median of its interval, ``μ(v) = ⌈v/s⌉·s − s/2`` (eq. 3);
    2. ``n_k(μ)`` counts member k's activated units in each interval, ``C_k = Σ_μ n_k(μ)``, and
       ``N(μ) = Σ_k n_k(μ)``;
    3. intervals are ranked by ``N(μ)`` (descending; ties: smaller μ first) and member k gets the
       k-th, its priority median ``r_k`` (with fewer intervals than members they are reused
       cyclically);
    4. keep rates — ``'lpd'`` (eq. 4–6): ``z_k(μ) = γ·n_k(μ)/C_k·(r_k − μ)²``,
       ``p = α·exp(−z/λ)/(2λ) + β``; ``'pdd'`` (eq. 2): ``p = α`` if ``μ = r_k`` else
       ``β·(1 − n_k(μ)/C_k)``. Non-activated units (``v <= eps``) are kept (p = 1);
    5. each unit is kept with probability p (uniform draws from :meth:`draw`, so seeded and
       sample-batchable inside :func:`fastdiv.nn.sampling`; each sample's statistics come from
       its own rows).

    Scaling: kept units are passed unchanged and dropped ones zeroed (``rescale=False``, the
    default), and eval mode is the identity. The paper describes the dropout as a feature
    *selection* — priority units kept (p ≈ α/(2λ)+β ≈ 0.98), the rest suppressed towards β — and
    never rescales; inverted-dropout scaling by 1/p would multiply exactly the low-priority units
    by up to 1/β ≈ 7.9, undoing the suppression. ``rescale=True`` divides kept units by p
    (inverted dropout, unbiased in expectation) for those who want it.

    Args:
        kind: 'lpd' or 'pdd'.
        num_members: K >= 1.
        s: interval width (> 0), paper 0.1.
        lam: Laplace scale λ (> 0), paper 0.5 (LPD only).
        alpha, beta: coefficients in [0, 1], paper 0.85 / 0.127. For LPD the keep rate at the
            priority, α/(2λ) + β, must not exceed 1.
        gamma: density scale γ >= 0 (LPD only; unstated in the paper: 1).
        eps: activation threshold for a unit to count as activated (default 0: ReLU features).
        rescale: divide kept units by their keep rate (see Scaling).

    Buffers (saved in the state dict, for monitoring): ``priority`` [K], the priority medians r_k,
    and ``keep_rate`` [K], the mean keep rate over each member's activated units, of the last
    training forward (its first sample in a sample-batched forward; NaN before any).
    """

    def __init__(self, kind: str = "lpd", num_members: int = 3, s: float = 0.1, lam: float = 0.5,
                 alpha: float = 0.85, beta: float = 0.127, gamma: float = 1.0, eps: float = 0.0,
                 rescale: bool = False):
        super().__init__()
        fn = "PriorityDropout"
        if kind not in KINDS:
            raise ValueError(f"{fn}: kind must be one of {KINDS}, got {kind!r}")
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"{fn}: num_members (K) must be an int >= 1, got {num_members!r}")
        s, lam, alpha, beta, gamma, eps = (_number(n, v, fn) for n, v in (
            ("s", s, ), ("lam", lam), ("alpha", alpha), ("beta", beta), ("gamma", gamma), ("eps", eps)))
        if s <= 0:
            raise ValueError(f"{fn}: s (interval width) must be > 0, got {s}")
        if lam <= 0:
            raise ValueError(f"{fn}: lam must be > 0, got {lam}")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{fn}: {name} must be a probability in [0, 1], got {v}")
        if gamma < 0:
            raise ValueError(f"{fn}: gamma must be >= 0, got {gamma}")
        if kind == "lpd" and alpha / (2 * lam) + beta > 1 + 1e-12:
            raise ValueError(f"{fn}: the LPD keep rate at the priority, alpha/(2*lam) + beta = "
                             f"{alpha / (2 * lam) + beta:.4g}, must be <= 1 (lower alpha or beta, or raise lam)")
        if not isinstance(rescale, bool):
            raise TypeError(f"{fn}: rescale must be a bool, got {type(rescale).__name__}")
        self.kind, self.num_members = kind, num_members
        self.s, self.lam, self.alpha, self.beta, self.gamma, self.eps = s, lam, alpha, beta, gamma, eps
        self.rescale = rescale
        self.register_buffer("priority", torch.full((num_members,), float("nan")))
        self.register_buffer("keep_rate", torch.full((num_members,), float("nan")))

    def _check(self, features: torch.Tensor) -> None:
        fn = "PriorityDropout"
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"{fn}: features must be a floating-point tensor [K, N, *F], got "
                            f"{features.dtype if isinstance(features, torch.Tensor) else type(features).__name__}")
        if features.dim() < 3 or features.shape[0] != self.num_members:
            raise ValueError(f"{fn}: features must be [K={self.num_members}, N, *F] (the members' activations "
                             f"stacked on dim 0), got shape {tuple(features.shape)}")

    def _groups(self, n: int) -> int:
        groups = self.active_samples()
        if n % groups:
            raise ValueError(f"PriorityDropout: a sample-batched input must hold {groups} replicas along dim 1, "
                             f"got {n} rows")
        return groups

    def keep_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """The keep rate of every unit, ``[K, N, *F]`` (Algorithm 1, steps 1–4), whatever the
        train/eval mode. Statistics are pooled over each sample's rows (all N rows outside
        sampling blocks)."""
        self._check(features)
        return self._statistics(features, self._groups(features.shape[1]))[0]

    @torch.no_grad()
    def _statistics(self, features: torch.Tensor, groups: int):
        """(keep rates like ``features``, priority medians [groups, K], activated mask like features)."""
        k = self.num_members
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        v = features.detach().to(dtype).reshape(k, groups, -1).transpose(0, 1).contiguous()  # [G, K, L]
        length = v.shape[-1]
        if length == 0:
            return (torch.ones_like(features), features.new_full((groups, k), float("nan"), dtype=dtype),
                    torch.zeros_like(features, dtype=torch.bool))
        active = v > self.eps
        q = torch.ceil(v / self.s).clamp(-_MAX_BIN, _MAX_BIN)
        bins = torch.where(active, q.to(torch.int64), _SENTINEL)

        # n_k(μ) of each unit's own interval: occurrences in the member's sorted bins
        own = bins.sort(-1).values
        n_k = torch.searchsorted(own, bins, right=True) - torch.searchsorted(own, bins)
        c_k = active.sum(-1, keepdim=True)  # [G, K, 1]

        # N(μ) over the ensemble, and the K most frequent intervals (ties: smaller μ first)
        total = bins.reshape(groups, k * length).sort(-1).values  # [G, KL]
        kl = total.shape[-1]
        first = torch.ones_like(total, dtype=torch.bool)
        first[:, 1:] = total[:, 1:] != total[:, :-1]
        valid = first & (total != _SENTINEL)
        count = torch.searchsorted(total, total, right=True) - torch.searchsorted(total, total)
        position = torch.arange(kl, device=v.device)
        key = torch.where(valid, count * kl + (kl - 1 - position), -1)
        top = key.topk(min(k, kl), dim=-1).indices  # positions of the most frequent intervals, best first
        distinct = valid.sum(-1, keepdim=True).clamp(min=1)
        rank = torch.arange(k, device=v.device) % distinct  # [G, K]: cycle when fewer intervals than members
        r_bin = total.gather(-1, top.gather(-1, rank))  # [G, K]
        none_active = ~valid.any(-1, keepdim=True)
        r_bin = torch.where(none_active, 0, r_bin)

        safe_bins = torch.where(active, bins, 0)
        density = n_k.to(dtype) / c_k.clamp(min=1).to(dtype)
        if self.kind == "lpd":
            dist2 = ((r_bin.unsqueeze(-1) - safe_bins).to(dtype) * self.s) ** 2  # (r_k − μ)²
            z = self.gamma * density * dist2
            p = self.alpha / (2 * self.lam) * torch.exp(-z / self.lam) + self.beta
        else:
            at_priority = safe_bins == r_bin.unsqueeze(-1)
            p = torch.where(at_priority, torch.full_like(density, self.alpha), self.beta * (1 - density))
        p = torch.where(active, p, torch.ones_like(p))
        medians = torch.where(none_active, float("nan"), r_bin.to(dtype) * self.s - self.s / 2)
        shape = features.shape
        p = p.transpose(0, 1).reshape(shape).to(features.dtype)
        active = active.transpose(0, 1).reshape(shape)
        return p, medians, active

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._check(features)
        if not self.training:
            return features
        k, n = self.num_members, features.shape[1]
        groups = self._groups(n)
        p, medians, active = self._statistics(features, groups)
        noise = self.draw((k, n // groups, *features.shape[2:]), like=features, kind="uniform")
        noise = noise.transpose(0, 1).reshape(features.shape)  # [groups, K, B, *F] -> [K, groups*B, *F]
        keep = noise < p
        scale = keep.to(features.dtype)
        if self.rescale:
            scale = scale / p  # p > 0 wherever keep holds (noise >= 0)
        with torch.no_grad():
            first = active[:, : n // groups].reshape(k, -1)
            rates = (p[:, : n // groups].reshape(k, -1) * first).sum(-1) / first.sum(-1)
            self.priority.copy_(medians[0].to(self.priority.dtype))
            self.keep_rate.copy_(rates.to(self.keep_rate.dtype))
        return features * scale

    def extra_repr(self) -> str:
        extra = f", lam={self.lam}, gamma={self.gamma}" if self.kind == "lpd" else ""
        return (f"kind={self.kind!r}, num_members={self.num_members}, s={self.s}, alpha={self.alpha}, "
                f"beta={self.beta}{extra}, eps={self.eps}, rescale={self.rescale}")


def _last_linear(member: nn.Module) -> str | None:
    name = None
    for n, m in member.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


class PriorityDropoutEnsemble(Ensemble):
    """An :class:`Ensemble` whose members are trained with :class:`PriorityDropout` (LPD or PDD)
    on the input of their last layer ("the last FC layer of 512 units before the softmax").

    Args:
        members: K >= 1 networks whose output is the output of their head module.
        kind: 'lpd' or 'pdd'.
        head: name of the head submodule in every member (e.g. ``'fc'``); default: each member's
            last ``nn.Linear`` (in registration order). The dropout acts on the head's input.
        **dropout_kwargs: ``s, lam, alpha, beta, gamma, eps, rescale`` of :class:`PriorityDropout`
            (``num_members`` is ``len(members)``).

    Train mode: every forward runs each member once up to and through its head (hooks capture
    the head's input), stacks the head inputs ``[K, N, F]``, applies :attr:`dropout` to all K
    together and re-applies each head to its dropped features. ``member_logits(x)`` returns the
    K members' logits under the dropout ``[K, N, C]`` (the training loss: e.g. the mean of the
    members' cross-entropies), ``ensemble(x)`` the log of their averaged softmax. Inside
    :func:`fastdiv.nn.sampling`, sample ``s`` is member ``s % K`` under the dropout mask of
    draw ``s`` (all K members run on each sample's rows to get the statistics; batched and loop
    agree). Eval mode: the dropout is the identity and this is a plain :class:`Ensemble`
    (vmapped sample batching).

    >>> ens = PriorityDropoutEnsemble([build_model('resnet18', in_shape=(3, 32, 32)) for _ in range(3)],
    ...                               kind='lpd', s=0.1, lam=0.5, alpha=0.85, beta=0.127)
    >>> ens.train(); loss = F.cross_entropy(ens.member_logits(x).flatten(0, 1), y.repeat(3))
    >>> ens.eval();  probs = fastdiv.nn.predict(ens, x)
    """

    def __init__(self, members: Iterable[nn.Module], kind: str = "lpd", *, head: str | None = None,
                 **dropout_kwargs):
        super().__init__(members)
        if "num_members" in dropout_kwargs:
            raise TypeError("PriorityDropoutEnsemble: num_members is len(members); do not pass it")
        names = []
        for i, member in enumerate(self.members):
            if head is None:
                name = _last_linear(member)
                if name is None:
                    raise ValueError(f"PriorityDropoutEnsemble: members[{i}] has no nn.Linear; pass head=<name of "
                                     "the last layer>")
            else:
                if not isinstance(head, str):
                    raise TypeError(f"PriorityDropoutEnsemble: head must be None or a submodule name, got "
                                    f"{type(head).__name__}")
                try:
                    member.get_submodule(head)
                except AttributeError:
                    raise ValueError(f"PriorityDropoutEnsemble: members[{i}] has no submodule {head!r}") from None
                name = head
            if name == "":
                raise ValueError(f"PriorityDropoutEnsemble: members[{i}] is itself the head; it needs layers "
                                 "before its last one")
            names.append(name)
        self.head_names = names
        self.dropout = PriorityDropout(kind, num_members=len(self.members), **dropout_kwargs)

    def _heads_and_features(self, x: torch.Tensor):
        feats, heads = [], []
        for i, member in enumerate(self.members):
            head = member.get_submodule(self.head_names[i])
            inputs, outputs = [], []
            h1 = head.register_forward_pre_hook(lambda mod, args, inputs=inputs: inputs.append(args[0]))
            h2 = head.register_forward_hook(lambda mod, args, out, outputs=outputs: outputs.append(out))
            try:
                out = member(x)
            finally:
                h1.remove()
                h2.remove()
            if len(inputs) != 1 or out is not outputs[0]:
                raise RuntimeError(f"PriorityDropoutEnsemble: members[{i}]'s output must be the output of its head "
                                   f"{self.head_names[i]!r} called once (it was called {len(inputs)} times"
                                   f"{'' if len(inputs) != 1 else ' and the output differs'}); "
                                   "pass head=<the last layer>")
            feats.append(inputs[0])
            heads.append(head)
        shapes = {tuple(f.shape) for f in feats}
        if len(shapes) != 1:
            raise ValueError(f"PriorityDropoutEnsemble: the members' head inputs must have one shape, got "
                             f"{[tuple(f.shape) for f in feats]}")
        return heads, torch.stack(feats)

    def _dropped_logits(self, x: torch.Tensor) -> torch.Tensor:
        heads, feats = self._heads_and_features(x)
        dropped = self.dropout(feats)
        return self._stack_outputs([h(dropped[i]) for i, h in enumerate(heads)])

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The K members' logits ``[K, N, C]``; in train mode under the priority dropout."""
        if not self.training:
            return super().member_logits(x)
        return self._dropped_logits(x)

    def _sample_forward(self, x: torch.Tensor, state: SampleState) -> torch.Tensor:
        if not self.training:
            return super()._sample_forward(x, state)
        logits = self._dropped_logits(x)  # [K, active*B, C]; the dropout groups rows per sample
        m = len(self.members)
        if state.frozen:
            return logits[_frozen_member(state, self._fastdiv_ordinal, m)]
        if state.index is not None:
            return logits[state.index % m]
        k, n = state.active, x.shape[0]
        batch = n // k
        rows = logits.reshape(m, k, batch, *logits.shape[2:])
        members = torch.arange(k, device=logits.device) % m
        return rows[members, torch.arange(k, device=logits.device)].reshape(n, *logits.shape[2:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", head={self.head_names[0]!r}"
