"""The papers' central claims as experiments: for each, the paper's figure or table and numbers, the defense and
the baseline it is compared with (each a preset, the paper's recipe scaled to the dataset, see
:mod:`fastdiv.presets`), the measurement (:mod:`.measure`) and the direction the paper reports.

ε is given relative to the dataset's training ε (``eps_factors`` of a size): GradDiv's MNIST table puts the
interesting range at 0.67, 1 and 1.33 × ε_train (0.2, 0.3, 0.4 on MNIST; 0.067, 0.1, 0.133 on digits, whose
presets train at ε = 0.1).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import MappingProxyType

from ..presets import PAPERS

__all__ = ["CLAIMS", "SIZES", "Arm", "Claim", "describe_claims", "resolve_claims"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One trained model of an experiment: ``preset`` with ``overrides`` (TrainConfig fields), ``drop`` (preset
    keys removed), ``seed_offset`` (a source model trains on another seed than the models it attacks) and
    ``needs`` (arms it is measured against: the static source model of offline / black-box attacks)."""

    name: str
    preset: str
    overrides: MappingProxyType = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    drop: tuple[str, ...] = ()
    seed_offset: int = 0
    needs: tuple[Arm, ...] = ()

    def record(self) -> dict:
        return {"name": self.name, "preset": self.preset, "overrides": dict(self.overrides),
                "seed_offset": self.seed_offset, "source": [a.name for a in self.needs]}


def _arm(name: str, preset: str, needs: tuple[Arm, ...] = (), seed_offset: int = 0, drop: tuple[str, ...] = (),
         **overrides) -> Arm:
    return Arm(name, preset, MappingProxyType(overrides), drop, seed_offset, needs)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim: ``id``, ``paper`` (a key of :data:`fastdiv.presets.PAPERS`), ``source`` (figure / table),
    ``statement``, ``paper_numbers`` (what the paper reports, in words), ``defense`` and ``baseline`` arms,
    ``metric`` (a :data:`~fastdiv.reproduce.measure.MEASURES` name), ``better`` ('higher' or 'lower': the
    defense relative to the baseline, as the paper reports) and ``notes`` (how the experiment departs from the
    paper's)."""

    id: str
    paper: str
    source: str
    statement: str
    paper_numbers: str
    defense: Arm
    baseline: Arm
    metric: str
    better: str
    notes: str = ""

    def record(self) -> dict:
        return {"id": self.id, "paper": self.paper, "citation": PAPERS[self.paper], "source": self.source,
                "statement": self.statement, "paper_numbers": self.paper_numbers, "defense": self.defense.record(),
                "baseline": self.baseline.record(), "metric": self.metric, "better": self.better,
                "notes": self.notes}


# ------------------------------------------------------------------------------------------------ arms
_ADVBNN = _arm("advbnn", "advbnn")
_GRADDIV = _arm("graddiv-kappa", "graddiv-kappa")  # MNIST's selected GradDiv (R_kappa, λ = 1)
# GAL Table 2's black-box source: a separately trained plain ensemble of the same architecture
_ENS_SOURCE = _arm("ensemble-source", "ensemble", seed_offset=1000)
_ENSEMBLE = _arm("ensemble", "ensemble", needs=(_ENS_SOURCE,))
_GAL = _arm("gal", "gal", needs=(_ENS_SOURCE,))
_ULM = _arm("ulm", "ulm")
_CLM = _arm("clm", "clm")
_LPD = _arm("lpd", "lpd")
_LPD_BASE = _arm("lpd-base", "lpd", dropout=None)  # LPD's "Base": the same K = 3 ensemble without dropout
# D3's black-box examples come from a separately trained deterministic net of the same architecture
_D3_SOURCE = _arm("d3-cnn-source", "d3-mvs", seed_offset=1000, kind="deterministic", reg=None, samples=1)
_D3_BNN = _arm("d3-bnn", "d3-mvs", needs=(_D3_SOURCE,), reg=None)  # D3's "BNN": no penalties
_D3_MVS = _arm("d3-mvs", "d3-mvs", needs=(_D3_SOURCE,))

_GRADDIV_NOTES = ("MNIST's selected GradDiv-κ (λ = 1) against Adv-BNN; EOT-PGD with the size's n, steps and "
                  "ensemble; ε relative to ε_train as the paper's MNIST table (0.2 / 0.3 / 0.4 at ε_train 0.3)")

CLAIMS: tuple[Claim, ...] = (
    Claim("graddiv-mrl", "graddiv", "Fig. 4 (top)",
          "GradDiv shortens the mean resultant length ρ̂ of the unit sample gradients",
          "MNIST, 100 gradients at the first test image: ρ̂ 0.64 (Adv-BNN) → 0.15 (GradDiv), about 75 % shorter",
          _GRADDIV, _ADVBNN, "rho", "lower",
          "ρ̂ is averaged over the evaluated test images (the paper shows one image), from the size's gradient "
          "samples per image"),
    Claim("graddiv-loss-increase", "graddiv", "Fig. 4 (bottom), eq. 11",
          "GradDiv makes the loss increase under EOT-PGD smaller",
          "MNIST, EOT-PGD n = 20, ε = 0.4, α = 0.1, 20 steps: about 75 % smaller (density plots, no numbers)",
          _GRADDIV, _ADVBNN, "loss_increase", "lower",
          "CE of the ensemble prediction at the EOT-PGD example minus at the clean one, at 1.33 × ε_train"),
    Claim("graddiv-below-eps-train", "graddiv", "Fig. 6 / Table 3 (supplement)",
          "at ε below ε_train GradDiv is slightly less robust than Adv-BNN",
          "MNIST EOT-PGD (n = 20, 20 steps), ε = 0.2: 97.43 % (Adv-BNN) vs 95.80 % (GradDiv)",
          _GRADDIV, _ADVBNN, "robust_below", "lower", _GRADDIV_NOTES + "; measured at 0.67 × ε_train"),
    Claim("graddiv-above-eps-train", "graddiv", "Fig. 6 / Table 3 (supplement)",
          "at ε beyond ε_train GradDiv is far more robust than Adv-BNN",
          "MNIST EOT-PGD (n = 20, 20 steps): ε = 0.36: 25.82 % vs 63.34 %; ε = 0.4: 0.02 % vs 15.57 %",
          _GRADDIV, _ADVBNN, "robust_above", "higher", _GRADDIV_NOTES + "; measured at 1.33 × ε_train"),
    Claim("gal-coherence", "gal", "Fig. 4, eq. 7",
          "Diversity Training lowers the coherence (largest pairwise cosine) of the members' gradients",
          "MNIST / CIFAR-10 histograms: GAL's coherence distribution sits lower (no numbers)",
          _GAL, _ENSEMBLE, "coherence", "lower"),
    Claim("gal-member-transfer", "gal", "§4 (GAAS, Fig. 5)",
          "adversarial examples transfer less among the members of a GAL ensemble",
          "not measured among members in the paper (it reports GAAS curves: fewer shared adversarial directions)",
          _GAL, _ENSEMBLE, "member_transfer", "higher",
          "accuracy of each member on PGD examples crafted on another member (higher = less transfer)"),
    Claim("gal-black-box", "gal", "Table 2",
          "a GAL ensemble resists black-box attacks transferred from a separately trained ensemble better",
          "MNIST Conv-3, ε = 0.3: FGSM 9.7 → 34.3 %, I-FGSM 0.7 → 20.4 %, PGD-CW 9.7 → 35.9 % (ε = 0.1: 91.4 → "
          "97.1 %, 86.1 → 97.6 %)",
          _GAL, _ENSEMBLE, "offline", "higher",
          "the worst of the size's transfer attacks crafted on a plain ensemble trained on another seed, at ε_train"),
    Claim("clm-mra", "clm", "Tables 2-3, eq. 6",
          "Counter-Linked Models reach a higher mean robust accuracy (MRA) than unlinked models (ULM)",
          "MNIST ε = 0.3: PGD 35.94 → 54.29 %, FGSM 27.68 → 51.36 %; CIFAR-10 8/255: PGD 12.36 → 35.84 %",
          _CLM, _ULM, "mra", "higher", "MRA under the size's transfer attack at ε_train"),
    Claim("clm-member-transfer", "clm", "Fig. 6",
          "adversarial examples transfer less among counter-linked submodels",
          "saliency-map cosine between submodels closer to 0 under CLM (box plots); no transfer numbers",
          _CLM, _ULM, "member_transfer", "higher",
          "accuracy of each submodel on PGD examples crafted on another (higher = less transfer)"),
    Claim("lpd-ambiguity", "lpd", "Table 1, eq. 7",
          "Laplace Priority Dropout raises the ambiguity entropy of the ensemble",
          "K = 3: CIFAR-100 0.1905 → 0.2631, Tiny-ImageNet 0.2553 → 0.4624",
          _LPD, _LPD_BASE, "ambiguity_entropy", "higher",
          "on the evaluated test images; the paper does not report CIFAR-10 or MNIST"),
    Claim("lpd-gradient-similarity", "lpd", "Table 2",
          "LPD lowers the members' gradient similarity L_d",
          "CIFAR-10, first 2,000 test images, median L_d 0.606 (Base) → 1.04e-11 (LPD)",
          _LPD, _LPD_BASE, "l_d", "lower"),
    Claim("lpd-robustness", "lpd", "Table 4",
          "LPD ensembles are more robust to white-box attacks than the baseline ensemble",
          "CIFAR-10 PGD ε = 0.02: 7.49 → 45.90 %; ε = 0.04: 0.37 → 27.50 %",
          _LPD, _LPD_BASE, "robust_at", "higher", "EOT-PGD on the whole ensemble at ε_train"),
    Claim("d3-omega", "d3", "eq. 14 (Ω_M)",
          "training with the Diverse Directions penalties lowers Ω_M of the unit output gradients",
          "not reported (the penalty is minimized in training)",
          _D3_MVS, _D3_BNN, "omega_mean", "lower", "Ω_M over the size's weight draws, mean over test images"),
    Claim("d3-white-box", "d3", "Table 1",
          "M-V-S is far more robust than the plain BNN to white-box PGD",
          "MNIST ε = 0.3: PGD 0.9 % (BNN) → 95.8 % (M-V-S); the authors flag possible gradient obfuscation",
          _D3_MVS, _D3_BNN, "robust_at", "higher", "EOT-PGD (the size's n) at ε_train"),
    Claim("d3-black-box", "d3", "Table 1",
          "M-V-S is at least as robust as the plain BNN to black-box examples from a separately trained net",
          "MNIST: 56.4 % (BNN) → 59.8 % (M-V-S)",
          _D3_MVS, _D3_BNN, "offline", "higher",
          "the worst of the size's transfer attacks crafted on a deterministic net of the same architecture trained "
          "on another seed (the paper uses MadryLab's challenge examples), at ε_train"),
)

_TRANSFER_ATTACKS = ("fgsm", "bim", "pgdcw")

#: The sizes: ``datasets`` (train overrides and ε_train per dataset), ``evaluate`` (EvalConfig fields),
#: ``measure`` (settings of the extra measurements), ``eps_factors`` (× ε_train) and ``offline_attacks``.
SIZES = MappingProxyType({
    "quick": {
        "datasets": {"digits": {"eps_train": 0.1, "train": dict(epochs=1, limit=96, batch_size=32, adv_steps=2)}},
        "eps_factors": (0.67, 1.0, 1.33),
        "evaluate": dict(attacks=("pgd",), forms=("mean",), steps=3, eot_samples=2, ensemble_samples=4, limit=16,
                         grad_samples=4, grad_examples=8, transfer_models=2, gaas_examples=0, checklist=False,
                         diversity_k=3, repeats=1),
        "measure": {"main_eps_index": 1, "loss_eps_index": 2, "steps": 3, "eot_samples": 2, "ensemble_samples": 4,
                    "omega_samples": 3},
        "offline_attacks": ("fgsm",),
    },
    "standard": {
        "datasets": {"digits": {"eps_train": 0.1, "train": {}}, "mnist5k": {"eps_train": 0.3, "train": {}}},
        "eps_factors": (0.67, 1.0, 1.33),
        # GradDiv's EOT-PGD: n = 20, 20 steps, α = ε/4, ensemble inference over 20 sample models
        "evaluate": dict(attacks=("pgd",), forms=("mean",), steps=20, eot_samples=20, ensemble_samples=20,
                         limit=200, grad_samples=20, transfer_models=4, gaas_examples=0, checklist=False,
                         diversity_k=3, repeats=1),
        "measure": {"main_eps_index": 1, "loss_eps_index": 2, "steps": 20, "eot_samples": 20,
                    "ensemble_samples": 20, "omega_samples": 10},
        "offline_attacks": _TRANSFER_ATTACKS,
    },
})


def resolve_claims(names: Sequence[str] | None) -> list[Claim]:
    """The claims named by id or by paper (``graddiv``, ``gal``, ``clm``, ``lpd``, ``d3``); all when None."""
    if not names:
        return list(CLAIMS)
    chosen = []
    for name in names:
        hits = [c for c in CLAIMS if name in (c.id, c.paper)]
        if not hits:
            raise ValueError(f"unknown claim {name!r}; choose from the ids of `fastdiv reproduce --list` or a paper "
                             f"({', '.join(sorted({c.paper for c in CLAIMS}))})")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def describe_claims() -> str:
    """``fastdiv reproduce --list``: one paragraph per claim."""
    lines = []
    for c in CLAIMS:
        lines.append(f"{c.id}  [{c.paper}, {c.source}]\n    {c.statement} ({c.defense.name} {c.better} than "
                     f"{c.baseline.name}; measure: {c.metric})\n    paper: {c.paper_numbers}")
    return "\n".join(lines)
