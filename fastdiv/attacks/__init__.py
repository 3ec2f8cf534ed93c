"""EOT-aware adversarial attacks on randomized and ensemble models (torchattacks-style objects).

>>> from fastdiv.attacks import PGD
>>> atk = PGD(model, eps=8/255, alpha=2/255, steps=10, eot='mean', eot_samples=10, seed=0)
>>> x_adv = atk(images, labels)
>>> x_tgt = atk(images, labels, target=target_classes)   # targeted: descend the loss toward the targets

Every gradient attack gets the n sample models' input gradients from one
:func:`fastdiv.sample_input_grads` call per step and updates with the fused :func:`fastdiv.eot_step`.
``eot='fixed'`` / ``'one'`` / ``'mean'`` are GradDiv's [Attack], EOT¹-[Attack] and EOT-[Attack]
(see :class:`Attack`). :data:`ATTACKS` maps the names used by the CLI and the evaluation driver to
the classes.
"""
from .apgd import APGD, APGDDLR, APGDT, apgd_checkpoints
from .base import EOT_MODES, MODEL_MODES, NORMS, Attack
from .fab import FAB, fab_projection
from .gradient import BIM, FGM, FGSM, MIFGSM, PGD, PGDCW, PGDL2, RFGSM
from .losses import cw_loss, dlr_loss, dlr_targeted_loss, ensemble_margin, targeted_loss
from .square import Square, p_selection
from .transfer import SurrogateEnsemble, TransferAttack

#: name -> attack class; every class is called as ``ATTACKS[name](model, eps=..., ...)``.
ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "fgm": FGM,
    "rfgsm": RFGSM,
    "bim": BIM,
    "pgd": PGD,
    "pgd-l2": PGDL2,
    "mifgsm": MIFGSM,
    "pgdcw": PGDCW,
    "apgd-ce": APGD,
    "apgd-dlr": APGDDLR,
    "apgd-t": APGDT,
    "fab-t": FAB,
    "square": Square,
}

__all__ = [
    "APGD",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "BIM",
    "FAB",
    "EOT_MODES",
    "FGM",
    "FGSM",
    "MIFGSM",
    "MODEL_MODES",
    "NORMS",
    "PGD",
    "PGDCW",
    "PGDL2",
    "RFGSM",
    "Attack",
    "Square",
    "SurrogateEnsemble",
    "TransferAttack",
    "apgd_checkpoints",
    "cw_loss",
    "dlr_loss",
    "dlr_targeted_loss",
    "ensemble_margin",
    "fab_projection",
    "p_selection",
    "targeted_loss",
]
