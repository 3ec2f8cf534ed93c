"""The settings of one evaluation: :class:`EvalConfig` (every field is a ``fastdiv evaluate`` flag, generated
from its metadata by :mod:`.cli`), the attack names and forms, and the row labels of the robust-accuracy table."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

from .._checks import check_budget
from ..nn.randomness import MODEL_MODES

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_TRANSFER_ATTACKS", "FORMS", "EvalConfig", "attack_label", "parse_eps"]

#: GradDiv Table 1's attacks (B&B and FAB are not in fastdiv; Square, MI-FGSM and PGD-CW are added).
DEFAULT_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "mifgsm", "pgdcw")
#: The three forms of an attack on a stochastic model, in table order.
FORMS = ("fixed", "one", "mean")
_FORM_PREFIX = {"fixed": "", "one": "EOT¹-", "mean": "EOT-"}
_DISPLAY = {"fgsm": "FGSM", "fgm": "FGM", "rfgsm": "R-FGSM", "bim": "I-FGSM", "pgd": "PGD", "pgd-l2": "PGD-ℓ2",
            "mifgsm": "MI-FGSM", "pgdcw": "PGD-CW", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR",
            "square": "Square"}
#: GAL Table 2's transfer attacks (crafted on the surrogate).
DEFAULT_TRANSFER_ATTACKS = ("fgsm", "rfgsm", "bim", "mifgsm", "pgdcw")
#: The threat models: the attacks' ball around the clean input.
NORMS = ("linf", "l2")
#: What the attack fields mean when left out, per threat model (the ℓ2 rows: fastdiv's ℓ2 attacks).
NORM_DEFAULTS = {
    "linf": {"attacks": DEFAULT_ATTACKS, "curve_attack": "pgd", "transfer_attack": "pgd",
             "transfer_attacks": DEFAULT_TRANSFER_ATTACKS},
    "l2": {"attacks": ("fgm", "pgd-l2", "apgd-ce", "apgd-dlr"), "curve_attack": "pgd-l2",
           "transfer_attack": "pgd-l2", "transfer_attacks": ("fgm", "pgd-l2")},
}


def attack_label(name: str, form: str | None) -> str:
    """``('pgd', 'mean') -> 'EOT-PGD'``; ``form=None`` (deterministic model) gives the plain name."""
    return _FORM_PREFIX.get(form or "fixed", "") + _DISPLAY.get(name, name.upper())


def parse_eps(text: str | Sequence, norm: str = "linf") -> list[float]:
    """ε values from ``'0.1,0.2,8/255'`` or a sequence of numbers / strings; each must lie in [0, 1] for
    ``norm='linf'`` (inputs live in [0, 1]), and be finite and >= 0 for ``'l2'``."""
    items = [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise ValueError("eps: give at least one ε value, e.g. --eps 0.1,0.2,0.3")
    out = []
    for t in items:
        try:
            float(Fraction(t)) if isinstance(t, str) else float(t)
        except (ValueError, ZeroDivisionError, TypeError):
            raise ValueError(f"eps: {t!r} is not a number (write 0.03 or 8/255)") from None
        # the one check of a budget that training (--eps-train, ...) uses too
        out.append(check_budget(t, "eps: every ε" if norm == "linf" else "eps: every ℓ2 ε", norm=norm))
    return out


def protocol_clash(protocol: str, given: dict, labels: dict | None = None) -> str:
    """The error for settings (field -> value) that ``protocol`` fixes otherwise; ``labels`` names the
    fields (their command-line flags)."""
    from .protocols import PROTOCOLS

    fixed = PROTOCOLS[protocol].config
    listed = ", ".join(f"{(labels or {}).get(field, field)} {_shown(value)} (the protocol's: {_shown(fixed[field])})"
                       for field, value in given.items())
    return (f"protocol {protocol} fixes {listed}: leave them out to run the protocol, or ask for a smaller budget "
            f"as a declared deviation (--deviations FIELD=VALUE / deviations={{...}}), which the results name")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _names(text: str | Sequence[str] | None) -> list[str]:
    """Lower-case names from ``'a,b'`` or a sequence, blanks and repeats dropped, first occurrence kept."""
    if text is None:
        return []
    items = [t.strip().lower() for t in text.split(",")] if isinstance(text, str) else [str(t).lower() for t in text]
    return list(dict.fromkeys(t for t in items if t))


_DECLARED = {"auto": None, "none": None, "yes": True, "true": True, "no": False, "false": False}


def _declared(value) -> bool | None:
    """``stochastic`` as None (detect), True or False, from a bool, None or 'auto' / 'yes' / 'no'."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _DECLARED:
        return _DECLARED[value.strip().lower()]
    raise ValueError(f"stochastic: must be auto, yes or no (or None, True, False), got {value!r}")


def _field(default, help: str, *, shown: bool | str | None = True):
    """A field with its command-line help in the metadata. ``help``: what the flag sets (for a bool
    field, whose flag is ``--no-NAME``: what turning it off does). ``shown``: the default as the help
    prints it; True derives it from ``default`` (a sequence comma-joined), None prints none."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown})


@dataclasses.dataclass
class EvalConfig:
    """The settings of one evaluation, validated by :meth:`check`. Every field is a flag of ``fastdiv
    evaluate`` (``--NAME-WITH-DASHES``; a bool field is turned off by ``--no-NAME``), its help in
    the field's metadata. Sequences may also be given as comma-separated strings."""

    attacks: Sequence[str] | None = _field(None, "comma-separated attack names", shown=",".join(DEFAULT_ATTACKS)
                                           + "; with --norm l2: " + ",".join(NORM_DEFAULTS["l2"]["attacks"]))
    eps: Sequence[float] = _field((0.1, 0.2, 0.3), "comma-separated budgets, ℓ∞ in [0, 1] (fractions like 8/255 "
                                                   "ok) or ℓ2 >= 0")
    forms: Sequence[str] = _field(FORMS, "attack forms for stochastic models: fixed ([Attack]), one (EOT¹-), "
                                         "mean (EOT-)")
    steps: int = _field(20, "attack iterations")
    square_queries: int = _field(200, "queries of the Square attack (one query: n sample models for EOT-Square)")
    alpha_factor: float = _field(0.25, "step size α = factor·ε")
    eot_samples: int = _field(10, "n of EOT-[Attack]")
    ensemble_samples: int = _field(20, "sample models of ensemble inference")
    repeats: int = _field(1, "independent evaluations, mean ± std")
    seed: int = _field(0, "seed of the sample models, attacks and random search")
    limit: int | None = _field(None, "evaluate only the first N test examples", shown=None)
    batch_size: int = _field(128, "examples per batch of the attacks and the gradient analysis")
    curve_eps: Sequence[float] = _field((), "extra ε of the accuracy-vs-ε curve (comma-separated)", shown=None)
    curve_attack: str | None = _field(None, "attack of the curve, strongest form", shown="pgd; ℓ2: pgd-l2")
    transfer_models: int = _field(5, "k sample models of the transferability matrix, 0 = off")
    transfer_attack: str | None = _field(None, "attack of the matrix and MRA", shown="pgd; ℓ2: pgd-l2")
    transfer_attacks: Sequence[str] | None = _field(None, "attacks crafted on the surrogate",
                                                    shown=",".join(DEFAULT_TRANSFER_ATTACKS) + "; ℓ2: fgm,pgd-l2")
    analysis: bool = _field(True, "skip the gradient analysis")
    grad_samples: int = _field(100, "gradient samples per input")
    grad_examples: int | None = _field(None, "examples of the concentration statistics", shown="all")
    diversity_k: int = _field(3, "K of the LPD measures")
    gaas_k: Sequence[int] = _field((4, 16, 64), "Hadamard orders, powers of 4")
    gaas_examples: int = _field(100, "first N test examples of the GAAS analysis")
    checklist: bool = _field(True, "skip the obfuscation checklist")
    random_samples: int = _field(100, "random-search samples per example for check 4")
    min_margin: float = _field(0.01, "smallest difference the checks count")
    per_example: bool = _field(True, "leave per-example flags out of results.json")
    stochastic: str | bool | None = _field(None, "auto: detect whether the model is stochastic (its layers, then two "
                                                 "forwards of a few examples that must agree); yes / no: declare it",
                                           shown="auto")
    model_mode: str = _field("eval", "mode the model runs in: eval, mc-dropout (eval with dropout active), train or "
                                     "keep")
    norm: str = _field("linf", "threat model: linf (the ℓ∞ ball) or l2 (the ℓ2 ball); sets the default attacks")
    protocol: str | None = _field(None, "a named protocol (autoattack-standard, autoattack-rand, fastdiv-rand; see "
                                        "--list-protocols): fixes the attacks and their budgets, runs them as a "
                                        "cascade", shown="none")
    deviations: str | dict | None = _field(None, "with --protocol: budgets changed from the protocol's, as "
                                                 "FIELD=VALUE pairs (steps, square_queries, eot_samples, "
                                                 "ensemble_samples), named beside the protocol in results.json and "
                                                 "the report", shown="none")

    def check(self, attack_names: Sequence[str] | None = None) -> EvalConfig:
        """Normalizes and validates every field; raises ``ValueError`` naming the argument."""
        self.norm = self.norm.lower() if isinstance(self.norm, str) else self.norm
        if self.norm not in NORMS:
            raise ValueError(f"norm: must be one of {NORMS} (any case), got {self.norm!r}")
        if self.protocol is not None:
            from .protocols import PROTOCOLS, conflicts, parse_deviations, same_setting

            if self.protocol not in PROTOCOLS:
                raise ValueError(f"protocol: unknown protocol {self.protocol!r}; choose from {sorted(PROTOCOLS)}")
            self.deviations = parse_deviations(self.deviations, self.protocol)
            # a field left at its default is the protocol's to set; any other value must be the protocol's
            fixed = PROTOCOLS[self.protocol].config
            given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name in fixed and not same_setting(getattr(self, f.name), f.default)}
            clash = conflicts(self.protocol, given, self.deviations)
            if clash:
                raise ValueError(protocol_clash(self.protocol, {f: given[f] for f in clash}))
            for field, value in {**PROTOCOLS[self.protocol].config, **self.deviations}.items():
                setattr(self, field, value)
            if self.norm == "l2":  # fastdiv's Square searches the ℓ∞ ball only
                self.attacks = tuple(a for a in self.attacks if a != "square")
        else:
            from .protocols import parse_deviations

            self.deviations = parse_deviations(self.deviations, None)
        for field, default in NORM_DEFAULTS[self.norm].items():
            if getattr(self, field) is None:
                setattr(self, field, default)
        self.attacks = _names(self.attacks)
        self.transfer_attacks = _names(self.transfer_attacks)
        self.forms = _names(self.forms)
        self.eps = parse_eps(self.eps, self.norm)
        given = self.curve_eps if isinstance(self.curve_eps, str) else len(self.curve_eps)
        self.curve_eps = parse_eps(self.curve_eps, self.norm) if given else []
        if self.protocol is not None and self.curve_eps:
            raise ValueError("curve_eps: under a protocol the accuracy-vs-ε curve is its Total at each --eps; put "
                             "the extra ε into --eps")
        if attack_names is not None:
            self._check_attack_names(attack_names)
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ValueError(f"forms: each must be one of {FORMS}, got {list(self.forms) or 'nothing'}")
        self.forms = [f for f in FORMS if f in self.forms]
        for field, lo in (("steps", 1), ("square_queries", 1), ("eot_samples", 1), ("ensemble_samples", 1),
                          ("repeats", 1), ("batch_size", 1), ("grad_samples", 2), ("diversity_k", 2),
                          ("gaas_examples", 0), ("random_samples", 0), ("transfer_models", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{field}: must be an int >= {lo}, got {v!r}")
        if self.transfer_models == 1:
            raise ValueError("transfer_models: must be 0 (off) or >= 2, got 1")
        for field in ("limit", "grad_examples"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{field}: must be None or an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an int, got {self.seed!r}")
        for field, ok in (("alpha_factor", lambda v: 0 < v <= 10), ("min_margin", lambda v: 0 <= v < 1)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"{field}: out of range, got {v!r}")
        self.gaas_k = self._hadamard_orders()
        self.stochastic = _declared(self.stochastic)
        if self.model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode: must be one of {MODEL_MODES}, got {self.model_mode!r}")
        return self

    def _check_attack_names(self, attack_names: Sequence[str]) -> None:
        known = sorted(attack_names)
        for field, names in (("attacks", self.attacks), ("transfer_attacks", self.transfer_attacks)):
            bad = [a for a in names if a not in attack_names]
            if bad:
                raise ValueError(f"{field}: unknown attack(s) {bad}; choose from {known}")
        for field in ("curve_attack", "transfer_attack"):
            if getattr(self, field) not in attack_names:
                raise ValueError(f"{field}: unknown attack {getattr(self, field)!r}; choose from {known}")
        if isinstance(attack_names, dict):  # the registry: each class says which balls it attacks in
            wrong = [a for a in [*self.attacks, *self.transfer_attacks, self.curve_attack, self.transfer_attack]
                     if self.norm not in getattr(attack_names[a], "norms", (self.norm,))]
            if wrong:
                fits = sorted(a for a, cls in attack_names.items() if self.norm in getattr(cls, "norms", ()))
                raise ValueError(f"attacks: {sorted(set(wrong))} have no {self.norm} version; for norm={self.norm} "
                                 f"choose from {fits}")

    def _hadamard_orders(self) -> list[int]:
        try:
            ks = [int(k) for k in (self.gaas_k.split(",") if isinstance(self.gaas_k, str) else self.gaas_k)]
        except (TypeError, ValueError):
            raise ValueError(f"gaas_k: expected Hadamard orders like 4,16,64, got {self.gaas_k!r}") from None
        bad = [k for k in ks if k < 4 or 4 ** round(math.log(k, 4)) != k]
        if bad:
            raise ValueError(f"gaas_k: regular Hadamard orders must be powers of 4 (4, 16, 64, 256, ...), got {bad}")
        return ks
