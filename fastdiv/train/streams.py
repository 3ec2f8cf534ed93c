"""Tags of a training run's random streams.

Every random draw of a run is seeded by :func:`fastdiv._seeds.mix_seed` of the run's seed, the draw's
position and one of these tags, so a resumed run draws exactly what an uninterrupted one draws and the
streams of different jobs are unrelated. The values are part of every run's results: changing one
changes the runs that use it.
"""
from __future__ import annotations

# Per-step streams, mixed into the step's seed mix_seed(seed, epoch, step, rank): the augmentation
# (shift; flip as mix_seed(step_seed, AUGMENT, 1)), the D_noise copy, the static-model FGSM copy, the
# on-the-fly PGD examples and the sample models of the step. PRSE is mixed with the global step and
# EPOCH with (epoch, rank). DROPOUT is reserved: it keeps the numbering of the tags after it.
AUGMENT, NOISE, STATIC_FGSM, ADVERSARIAL, SAMPLES, PRSE, DROPOUT, EPOCH = range(1, 9)

# Streams of the whole run (the tags spell their job in ASCII)
COUNTER_LINK = 0x4C494E4B  # "LINK": which first-layer weights of a population are counter-linked
SOURCE = 0x534F5552  # "SOUR": the static source model's initialization and its data order per epoch
OFFLINE = 0x4F46464C  # "OFFL": the PGD starts of the offline examples, per chunk of 256 images
VALIDATION = 0x4556414C  # "EVAL": the sample models of the validation inference
HELD_OUT_STATS = 0x53544154  # "STAT": the gradient samples of the held-out concentration statistics
