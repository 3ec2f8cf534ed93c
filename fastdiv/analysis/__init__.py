"""Analysis primitives of ``fastdiv evaluate``: predictions, gradient statistics, GAAS, transferability,
MRA and the gradient-obfuscation checklist.

Everything here works on any ``nn.Module`` that returns logits ``[N, C]``: deterministic nets,
randomized nets built from :class:`fastdiv.nn.RandomizedModule` layers, ensembles and populations.
Functions that evaluate examples return *per-example* tensors (so that :mod:`fastdiv.evaluate` can
shard the test set across ranks and gather the pieces); the aggregations are separate functions.

Conventions:

* accuracies are fractions in [0, 1]; per-example results are ``bool`` tensors (``True`` = correct);
* a *prediction* is ensemble inference: the mean softmax of ``num_samples`` sample models drawn with
  a fixed seed (GradDiv uses 20), and beside it the stricter *worst case*: an example counts as
  correct only if every one of those sample models classifies it correctly;
* gradients are the input gradients of the per-example cross-entropy from
  :func:`fastdiv.sample_input_grads`, shaped ``[n, B, ...]``.

The modules: :mod:`.predict` (seeds, members, sample logits, predictions), :mod:`.gradients`
(concentration statistics, projection, diversity, GAAS), :mod:`.transfer` (transferability, MRA) and
:mod:`.checklist` (the obfuscation checklist and its random search). Every name is importable from
``fastdiv.analysis``.
"""
from ..nn.randomness import is_stochastic
from .checklist import (
    BLACK_BOX_ATTACKS,
    ITERATIVE_ATTACKS,
    ONE_STEP_ATTACKS,
    obfuscation_checklist,
    paired_difference,
    random_search,
)
from .gradients import (
    MAX_GRAD_ELEMENTS,
    STAT_NAMES,
    ambiguity_entropy,
    cosine_matrix,
    gaas,
    gradient_samples_at,
    gradient_stats,
    member_diversity,
    project,
    projection_basis,
    quantiles,
    regular_hadamard,
    unit_mean,
)
from .predict import MAX_ROWS, derive_seed, members_of, predict_correct, sample_logits
from .transfer import mra_correct, transfer_correct, transfer_summary

__all__ = [
    "ONE_STEP_ATTACKS", "ITERATIVE_ATTACKS", "BLACK_BOX_ATTACKS", "STAT_NAMES",
    "is_stochastic", "members_of", "sample_logits", "predict_correct", "gradient_stats",
    "gradient_samples_at", "unit_mean", "projection_basis", "project", "cosine_matrix", "ambiguity_entropy",
    "member_diversity", "regular_hadamard", "gaas", "random_search", "transfer_correct",
    "transfer_summary", "mra_correct", "paired_difference", "obfuscation_checklist", "quantiles",
    "derive_seed", "MAX_ROWS", "MAX_GRAD_ELEMENTS",
]
