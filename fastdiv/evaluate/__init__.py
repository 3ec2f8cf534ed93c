"""``fastdiv evaluate``: robust accuracy, transferability, gradient analysis and the obfuscation checklist.

Turns a trained run (``fastdiv train``) — or any model and test set, in memory — into the evidence a
robustness paper needs:

* the robust-accuracy table in the shape of GradDiv's Table 1: rows None, FGSM, PGD, APGD-CE,
  APGD-DLR, Square, MI-FGSM, PGD-CW (any names of :data:`fastdiv.attacks.ATTACKS`), each as
  ``[Attack]`` (one fixed sample model), ``EOT¹-[Attack]`` (a fresh sample each iteration) and
  ``EOT-[Attack]`` (the mean gradient of n samples) for stochastic models; columns per ε; mean ± std
  over ``repeats``; a **Total** row = the per-example worst case over None and every attack row.
  Predictions are ensemble inference over ``ensemble_samples`` sample models; the stricter worst case
  (every sample model correct) is reported beside it;
* the accuracy-vs-ε curve (GradDiv Fig. 6), transferability among k sample models or ensemble /
  population members (Fig. 7), MRA for populations (CLM eq. 6), transfer attacks from a surrogate
  run (GAL Table 2);
* gradient analysis: κ̂, ρ̂, mean cosine, DPP and coherence over the test set (Fig. 5, GAL Fig. 4), a
  2-D projection of 100 gradient samples at one input (Fig. 4), their cosine heatmap (Fig. 8), LPD's
  ambiguity entropy and L_d / L_s quantiles, GAAS with regular Hadamard directions (GAL §4.4);
* the gradient-obfuscation checklist of GradDiv §5, each check pass/fail with its numbers.

Outputs (``--out``, default ``RUN_DIR/eval``): ``results.json`` (schema :data:`RESULTS_SCHEMA`,
checked by :func:`validate_results`), ``report.md`` and its PNG plots, each replaced whole; while the table
runs, ``rows.partial.json`` keeps its finished rows for ``--resume``. Under ``torchrun`` every rank
evaluates a shard of the test set and rank 0 gathers the per-example results and writes the files.

The package, one job per module: :mod:`.config` (:class:`EvalConfig`, attack names and labels),
:mod:`.attack_setup` (each attack's settings and construction), :mod:`.stages` (the stages on one
rank's shard, each returning a typed result of :mod:`.shard`, which also merges the ranks' results),
:mod:`.aggregate` (the results dictionary), :mod:`.schema` (:data:`RESULTS_SCHEMA`,
:func:`validate_results`), :mod:`.outputs` (the files, the flag strings, saved adversarial examples),
:mod:`.inputs` (a user's model factory, weights and data files), :mod:`.partial` (the finished table rows kept
for ``--resume``), :mod:`.run` (:func:`evaluate_model`, :func:`evaluate`) and :mod:`.cli` (the flags, generated
from :class:`EvalConfig`).
"""
# resolve_device, setup_ranks (with the entry points): fastdiv.runtime's, which the driver uses
from .cli import add_parser
from .config import DEFAULT_ATTACKS, DEFAULT_TRANSFER_ATTACKS, FORMS, EvalConfig, attack_label, parse_eps
from .inputs import EvalInputError
from .outputs import decode_flags, encode_flags, load_adversarial, save_adversarial, write_outputs
from .run import evaluate, evaluate_model, resolve_device, setup_ranks  # noqa: F401
from .schema import RESULTS_SCHEMA, SCHEMA_NAME, SCHEMA_VERSION, validate_results

__all__ = [
    "DEFAULT_ATTACKS", "DEFAULT_TRANSFER_ATTACKS", "FORMS", "EvalConfig", "RESULTS_SCHEMA", "SCHEMA_NAME",
    "SCHEMA_VERSION", "evaluate", "evaluate_model", "validate_results", "write_outputs", "attack_label",
    "add_parser", "parse_eps", "encode_flags", "decode_flags", "EvalInputError", "load_adversarial",
    "save_adversarial",
]
