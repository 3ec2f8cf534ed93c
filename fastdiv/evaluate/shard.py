"""The typed results of one rank's shard of the test set, and their merge across ranks.

Each stage of :mod:`.stages` returns one of these dataclasses. A field declared with :func:`_examples`
holds per-example values along its last dimension (a tensor, or a dict of tensors), in the order of
one of the shard's example indices: ``'all'`` (:attr:`ShardResult.index`, the whole shard) or a
subset's (:attr:`GradientResult.grad_index`, :attr:`GradientResult.gaas_index`). :func:`merge`
concatenates those fields over the ranks and sorts them into test-set order; every other field is
the same on every rank (settings, labels) or only computed on rank 0 (the gradient samples at test
example 0), so the merge keeps rank 0's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _examples(order: str = "all", *, index: bool = False, default: Any = dataclasses.MISSING):
    """A per-example field in the order of example index ``order``; ``index=True``: the field is that index."""
    return dataclasses.field(default=default, metadata={"examples": order, "index": index})


@dataclasses.dataclass
class Predictions:
    """Correctness flags ``[..., N]`` (bool) of ensemble inference and of the stricter worst case (every
    sample model correct)."""

    ensemble: torch.Tensor = _examples()
    worst: torch.Tensor = _examples()


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row of the robust-accuracy table: an attack in one form (None for a deterministic model)."""

    attack: str
    form: str | None
    label: str
    key: str


@dataclasses.dataclass
class RowResult:
    """A table row: ``flags`` ``[E, R, N]`` (per ε, repeat and example) and the attack settings per ε."""

    spec: RowSpec
    flags: Predictions
    settings: list[dict]
    seconds: float = 0.0  #: wall time of the row (every ε and repeat) on this rank


@dataclasses.dataclass
class CurvePoint:
    """An extra point of the accuracy-vs-ε curve (an ε not in the table): ``flags`` ``[R, N]``."""

    eps: float
    flags: Predictions


@dataclasses.dataclass
class ChecklistResult:
    """The extra runs of the obfuscation checklist: the unbounded attack's ensemble flags ``[N]`` and
    its description, and per ε ``[E, N]`` the examples that survived every white-box attack and those
    of them random search broke (None when not run)."""

    unbounded: torch.Tensor | None = _examples(default=None)
    unbounded_attack: dict | None = None
    random_survived: torch.Tensor | None = _examples(default=None)
    random_found: torch.Tensor | None = _examples(default=None)


@dataclasses.dataclass
class SampleTransfer:
    """Transferability among k sample models or members: ``correct`` ``[k, k, N]`` (source, target,
    example) and the description (k, ε, attack, settings, source, label) results.json reports."""

    correct: torch.Tensor = _examples()
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MRAResult:
    """CLM's model robustness average: member correctness ``[K, N]`` without attack and ``[E, K, N]``
    per ε, with the attack settings per ε."""

    benign: torch.Tensor = _examples()
    correct: torch.Tensor = _examples()
    settings: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SurrogateRow:
    """A transfer attack crafted on the surrogate: ensemble flags ``[E, R, N]``, settings per ε."""

    attack: str
    ensemble: torch.Tensor = _examples()
    settings: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GradientResult:
    """The gradient analysis. Concentration statistics ``{name: [M]}`` and the diversity measures
    (member correctness ``[K, M]``, ``l_d``, ``l_s`` ``[M]``) cover the examples ``grad_index``; GAAS
    counts ``[E, len(gaas_ks), M']`` the examples ``gaas_index``. ``projection`` / ``cosine``: the
    gradient samples at test example 0 (rank 0 only). None: not computed."""

    dimension: int
    grad_index: torch.Tensor = _examples("grad", index=True)
    stats: dict[str, torch.Tensor] | None = _examples("grad", default=None)
    diversity: dict[str, torch.Tensor] | None = _examples("grad", default=None)
    gaas_ks: list[int] = dataclasses.field(default_factory=list)
    gaas_index: torch.Tensor | None = _examples("gaas", index=True, default=None)
    gaas: torch.Tensor | None = _examples("gaas", default=None)
    projection: dict | None = None
    cosine: torch.Tensor | None = None


@dataclasses.dataclass
class ShardResult:
    """Everything one rank computed on its examples ``index`` (test-set positions), stage by stage."""

    index: torch.Tensor = _examples(index=True)
    num_classes: int = 0
    stochastic: bool = False
    members: int | None = None
    strongest: str | None = None
    randomness: str = ""
    clean: Predictions | None = None
    rows: list[RowResult] = dataclasses.field(default_factory=list)
    curve: list[CurvePoint] = dataclasses.field(default_factory=list)
    checklist: ChecklistResult | None = None
    transfer: SampleTransfer | None = None
    mra: MRAResult | None = None
    surrogate: list[SurrogateRow] | None = None
    gradients: GradientResult | None = None


def merge(shards: list[ShardResult]) -> ShardResult:
    """One result in test-set order from the shards of every rank (in rank order)."""
    if len(shards) == 1:
        return shards[0]
    orders: dict[str, torch.Tensor] = {}
    _find_orders(shards, orders)
    return _merge(shards, orders)


def _find_orders(parts: list, orders: dict[str, torch.Tensor]) -> None:
    """The sorting permutation of each example index (concatenated over the ranks), by its name."""
    first = parts[0]
    if _is_record_list(first):
        for items in zip(*parts):
            _find_orders(list(items), orders)
    if not dataclasses.is_dataclass(first):
        return
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in parts]
        if f.metadata.get("index") and values[0] is not None:
            orders[f.metadata["examples"]] = torch.argsort(torch.cat(values))
        elif "examples" not in f.metadata:
            _find_orders(values, orders)


def _merge(parts: list, orders: dict[str, torch.Tensor]):
    first = parts[0]
    if _is_record_list(first):
        return [_merge(list(items), orders) for items in zip(*parts)]
    if not dataclasses.is_dataclass(first):
        return first  # the same on every rank, or rank 0's
    values = {}
    for f in dataclasses.fields(first):
        items = [getattr(p, f.name) for p in parts]
        order = f.metadata.get("examples")
        values[f.name] = _merge(items, orders) if order is None else _concat(items, orders[order])
    return type(first)(**values)


def _is_record_list(value) -> bool:
    return isinstance(value, list) and bool(value) and dataclasses.is_dataclass(value[0])


def _concat(parts: list, order: torch.Tensor):
    if parts[0] is None:
        return None
    if isinstance(parts[0], dict):
        return {k: _concat([p[k] for p in parts], order) for k in parts[0]}
    return torch.cat(parts, dim=-1)[..., order]
