"""Named evaluation protocols: the attack lists and budgets that others report, so that a robust accuracy means
what the reader expects.

``autoattack-standard`` and ``autoattack-rand`` are AutoAttack's versions (Croce & Hein, ICML 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks", arXiv:2003.01690):
the same attacks, iterations, restarts, target classes, EOT draws and query budget, run as a cascade (each attack
only on the points every earlier attack left correct), with AutoAttack's single-forward verdict.
``fastdiv-rand`` is ``autoattack-rand`` plus what that verdict misses on a randomized model: ensemble inference over
``ensemble_samples`` draws with the per-example worst case beside it, and EOT-Square.

A protocol fixes the fields of :class:`~fastdiv.evaluate.EvalConfig` it names (:attr:`Protocol.config`) and the
per-attack settings (:attr:`Protocol.attack_settings`); the rest (ε, the test set, seeds, repeats, the analyses)
stays the caller's. Setting a field the protocol fixes is an error, so that a number reported under a protocol's
name was measured with its settings; a smaller budget must be asked for as a *deviation*
(``deviations={"square_queries": 500}``, ``--deviations square_queries=500``: only the budgets in
:data:`DEVIATABLE`), which results.json and the report print beside the protocol's name.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

__all__ = ["DEVIATABLE", "PROTOCOLS", "Protocol", "conflicts", "describe_protocols", "parse_deviations", "same_setting"]

#: The protocol fields a run may change as a declared deviation: budgets, not the attacks or their forms.
DEVIATABLE = ("steps", "square_queries", "eot_samples", "ensemble_samples")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One protocol: ``config`` (EvalConfig fields it sets), ``attack_settings`` (per attack name, keyword
    arguments of its class beyond the common ones), ``cascade`` (attacks run in table order, each on the
    points still robust) and a one-line ``description``."""

    name: str
    description: str
    config: MappingProxyType
    attack_settings: MappingProxyType
    cascade: bool = True

    def record(self, deviations: dict | None = None) -> dict:
        """What results.json stores of the protocol; ``deviations`` (field -> value used) beside the
        protocol's own value of each."""
        return {"name": self.name, "description": self.description, "cascade": self.cascade,
                "config": dict(self.config), "attack_settings": {k: dict(v) for k, v in self.attack_settings.items()},
                "deviations": {k: {"protocol": self.config.get(k), "used": v} for k, v in (deviations or {}).items()}}


def _protocol(name: str, description: str, config: dict, attack_settings: dict) -> Protocol:
    return Protocol(name, description, MappingProxyType(config),
                    MappingProxyType({k: MappingProxyType(v) for k, v in attack_settings.items()}))


# AutoAttack's 'standard' version: 100 iterations, 1 restart, 9 target classes for APGD-T and FAB-T, Square with
# 5,000 queries. On a randomized model each forward draws afresh (EOT¹), as AutoAttack's attacks see it; its
# verdict is one forward, hence ensemble_samples = 1.
_STANDARD = _protocol(
    "autoattack-standard",
    "AutoAttack 'standard': APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100 iterations, "
    "1 restart, as a cascade; single-forward verdict",
    {"attacks": ("apgd-ce", "apgd-t", "fab-t", "square"), "forms": ("one",), "steps": 100, "square_queries": 5000,
     "ensemble_samples": 1},
    {"apgd-ce": {"restarts": 1}, "apgd-t": {"restarts": 1, "n_target_classes": 9},
     "fab-t": {"restarts": 1, "n_target_classes": 9}, "square": {"restarts": 1}},
)
# AutoAttack's 'rand' version: APGD-CE and APGD-DLR, 100 iterations, 1 restart, EOT over 20 draws per step.
_RAND = _protocol(
    "autoattack-rand",
    "AutoAttack 'rand': APGD-CE and APGD-DLR, 100 iterations, 1 restart, EOT over 20 draws, as a cascade; "
    "single-forward verdict",
    {"attacks": ("apgd-ce", "apgd-dlr"), "forms": ("mean",), "steps": 100, "eot_samples": 20, "ensemble_samples": 1},
    {"apgd-ce": {"restarts": 1}, "apgd-dlr": {"restarts": 1}},
)
_FASTDIV_RAND = _protocol(
    "fastdiv-rand",
    "autoattack-rand plus EOT-Square (5000 queries), judged by ensemble inference over ensemble_samples draws with "
    "the per-example worst case, as a cascade",
    {"attacks": ("apgd-ce", "apgd-dlr", "square"), "forms": ("mean",), "steps": 100, "eot_samples": 20,
     "square_queries": 5000},
    {"apgd-ce": {"restarts": 1}, "apgd-dlr": {"restarts": 1}, "square": {"restarts": 1}},
)

#: name -> :class:`Protocol`.
PROTOCOLS = MappingProxyType({p.name: p for p in (_STANDARD, _RAND, _FASTDIV_RAND)})


def describe_protocols() -> str:
    """The protocols, one paragraph each (``fastdiv evaluate --list-protocols``)."""
    lines = []
    for p in PROTOCOLS.values():
        fixed = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in p.config.items())
        lines.append(f"{p.name}: {p.description}\n    sets {fixed}")
    return "\n".join(lines)


def parse_deviations(value, protocol: str | None) -> dict[str, int]:
    """``deviations`` as ``{field: int}`` from a mapping or ``'square_queries=500,steps=50'`` (dashes allowed in
    the names); each field must be in :data:`DEVIATABLE` and fixed by ``protocol``, each value an int >= 1."""
    if value is None or value == "" or value == {}:
        return {}
    if protocol is None:
        raise ValueError("deviations: only with a protocol (--protocol NAME); without one every flag is yours")
    if isinstance(value, str):
        pairs = {}
        for item in filter(None, (t.strip() for t in value.split(","))):
            name, sep, number = item.partition("=")
            if not sep:
                raise ValueError(f"deviations: write FIELD=VALUE pairs, e.g. square_queries=500, got {item!r}")
            try:
                pairs[name.strip()] = int(number)
            except ValueError:
                raise ValueError(f"deviations: {name.strip()}: {number.strip()!r} is not an int") from None
        value = pairs
    if not isinstance(value, dict):
        raise ValueError(f"deviations: must be a dict or 'FIELD=VALUE,...', got {type(value).__name__}")
    out = {}
    for name, number in value.items():
        field = str(name).replace("-", "_")
        if field not in DEVIATABLE:
            raise ValueError(f"deviations: {name!r} cannot deviate from a protocol; the budgets that can: "
                             f"{', '.join(DEVIATABLE)} (for other attacks or forms, leave --protocol out)")
        if field not in PROTOCOLS[protocol].config:
            raise ValueError(f"deviations: protocol {protocol} does not fix {field}; set it as usual")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"deviations: {field} must be an int >= 1, got {number!r}")
        out[field] = number
    return out


def conflicts(protocol: str, given: dict, deviations: dict | None = None) -> list[str]:
    """The fields of ``given`` (field -> value as set) that ``protocol`` fixes to another value (with
    ``deviations``, parsed by :func:`parse_deviations`, in place of the protocol's)."""
    fixed = {**PROTOCOLS[protocol].config, **(deviations or {})}
    return [field for field, value in given.items() if field in fixed and not same_setting(value, fixed[field])]


def same_setting(value, reference) -> bool:
    """Whether a setting as given (a name list may be a comma-separated string) equals ``reference``."""
    if isinstance(reference, (tuple, list)):
        items = value.split(",") if isinstance(value, str) else (value or ())
        value = tuple(dict.fromkeys(str(t).strip().lower() for t in items if str(t).strip()))
        reference = tuple(reference)
    return value == reference
