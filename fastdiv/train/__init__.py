"""The training driver: ``fastdiv train --preset NAME`` and :func:`train`.

One function trains any defense of :mod:`fastdiv.presets` the way its paper did. Per training step:

1. a batch in an order that is a function of ``(seed, epoch)`` only (so a resumed run sees the same
   batches), augmented (random shifts / flips, D_noise copies, static-model FGSM copies) as the
   recipe says, with every random draw seeded by ``(seed, epoch, step, rank)``;
2. adversarial examples on the fly when the recipe says so (:class:`fastdiv.attacks.PGD`,
   alpha = eps/4, 10 steps, eval-mode model);
3. the input gradients of n sample models in one sample-batched pass with ``create_graph=True``
   (:func:`fastdiv.sample_input_grads`) and the fused regularizer on them
   (:func:`fastdiv.diversity_loss`, ``sample_dim=0``; a weighted sum for Defense through Diverse
   Directions);
4. ``loss = CE averaged over the n samples + lambda(t) * regularizer + kl_factor * KL / N_train``
   with lambda 0 during warm-up and a linear ramp-up after (:func:`lambda_at`);
5. Adam (or SGD) with a multi-step decay per epoch; PRSE for counter-linked populations; priority
   dropout statistics for LPD/PDD.

After every epoch: validation accuracy of the defense's inference, concentration statistics of
held-out gradients (:func:`fastdiv.concentration_stats`: rho, kappa/p, mean cos, coherence, DPP),
``best.pt`` when the validation accuracy improved (from :func:`best_from_epoch` on: not during the
lambda warm-up and ramp-up), ``checkpoint.pt`` (:mod:`fastdiv.train.store`: temp
file + ``os.replace``, the previous one kept as ``checkpoint.prev.pt`` until the new one is complete, both
listed with their size and SHA-256 in ``checkpoint.sha256``), then one line of ``metrics.jsonl``.

Run directory::

    RUN_DIR/config.json     the resolved TrainConfig (+ in_shape, num_classes, n_train, versions)
    RUN_DIR/metrics.jsonl   one JSON object per epoch
    RUN_DIR/checkpoint.pt   model, optimizer, scheduler, position, RNG states, the metric records of the
                            completed epochs (weights_only-loadable)
    RUN_DIR/checkpoint.prev.pt  the checkpoint before it; checkpoint.sha256: the checksums of both
    RUN_DIR/best.pt         the model of the best validation accuracy (from --best-from on)
    RUN_DIR/source.pt       (ens-adv / d3-*-off) the static source model, if trained here
    RUN_DIR/offline.pt      (d3-*-off) the offline adversarial training examples

Resume: ``--resume`` continues from the newest verified checkpoint (``checkpoint.pt``, else
``checkpoint.prev.pt`` with a warning) with the same model, optimizer, scheduler, position (epoch and
step), lambda schedule and RNG states, and rewrites ``metrics.jsonl`` to the epochs it completed.
Checkpoints are written at every epoch end and when SIGINT/SIGTERM arrives (after the current step);
since every random draw of a step is seeded by its position, a run killed at any point (even with
SIGKILL) and resumed produces the same metrics as an uninterrupted one on the same device.

Distributed: ``torchrun --nproc_per_node=K -m fastdiv train ...`` (DDP; nccl on GPU, gloo on CPU;
``--batch-size`` is the global batch, split over the processes; rank 0 writes the run directory).
"""
# one module per job: config (settings), models, batches, source (the static source model), checkpoint
# (the files of a run), store (where checkpoints go), evaluation, run_setup + trainer (the run), stopping
# (errors, signals), cli
from .checkpoint import CHECKPOINT_FORMAT
from .cli import add_parser, main
from .config import TrainConfig, best_from_epoch, lambda_at, parse_reg, resolve_config
from .models import build_model_from_config, load_run
from .stopping import TrainingDiverged, TrainingInterrupted
from .trainer import train

__all__ = [
    "CHECKPOINT_FORMAT", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "add_parser", "best_from_epoch",
    "build_model_from_config", "lambda_at", "load_run", "main", "parse_reg", "resolve_config", "train",
]
