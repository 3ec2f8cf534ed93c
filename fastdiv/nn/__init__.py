"""Randomized and ensemble models whose n sample models run in one batched pass (the models of docs/design.md §1).

:mod:`fastdiv.nn.sampling` defines how: a replicated batch plus per-sample draws.
"""
from .bayes import BayesBatchNorm2d, BayesConv2d, BayesianLayer, BayesLinear, kl_divergence
from .dropout import PriorityDropout, PriorityDropoutEnsemble
from .ensemble import Ensemble, predict
from .models import MODELS, Classifier, SharedPrefix, build_model
from .noise import NoiseInjection
from .normalize import Normalize
from .population import Population, counter_link_masks, prse
from .randomness import (
    MODEL_MODES,
    PROBE_EXAMPLES,
    Randomness,
    detect_randomness,
    is_stochastic,
    model_mode,
    one_sample,
    seeded_global_rng,
)
from .sampling import (
    RandomizedModule,
    SampleState,
    frozen_sample,
    has_unseeded_randomness,
    is_randomized,
    sample_models,
    sampling,
    supports_batched,
)

__all__ = [
    "RandomizedModule", "SampleState", "frozen_sample", "has_unseeded_randomness", "is_randomized",
    "is_stochastic", "sample_models", "sampling",
    "supports_batched",
]
__all__ += ["BayesBatchNorm2d", "BayesConv2d", "BayesLinear", "BayesianLayer", "kl_divergence"]
__all__ += ["MODEL_MODES", "PROBE_EXAMPLES", "Randomness", "detect_randomness", "model_mode", "one_sample",
            "seeded_global_rng"]
__all__ += ["NoiseInjection", "Normalize"]
__all__ += ["MODELS", "Classifier", "SharedPrefix", "build_model"]
__all__ += ["Ensemble", "Population", "PriorityDropout", "PriorityDropoutEnsemble", "counter_link_masks", "predict",
            "prse"]
