"""fastdiv: fused kernels for gradient-diversity defenses of randomized and ensemble networks.

The regularizers (GradDiv, Diversity Training/GAL, Defense through Diverse Directions) take the
input gradients of n sample models, ``grads`` shaped ``[B, n, *features]``, and are differentiable:

    >>> import torch, fastdiv
    >>> grads = torch.randn(128, 10, 3, 32, 32, requires_grad=True)
    >>> fastdiv.dpp_loss(grads).backward()

See docs/losses.md for the math of each loss and docs/backends.md for the backends.
"""
# import order kept by hand (not isort's): ops registers the compiled ops' fake kernels and autograd, and
# attacks and data use the API imported above them
from ._backend import BACKENDS, cuda_built, default_backend, extension_built, triton_available  # noqa: I001
from .eot import eot_step
from .grads import sample_input_grads
from . import nn
from .info import info
from .losses import (
    DIVERSITY_LOSSES,
    ConcentrationStats,
    concentration_stats,
    cosine_gram,
    diversity_loss,
    dpp_loss,
    gal_loss,
    kappa_loss,
    max_cosine_loss,
    mean_cosine_loss,
    mean_penalty,
    normalize,
    smoothmax_cosine_loss,
    sparsity_penalty,
    variance_penalty,
)
from . import ops as _ops  # noqa: F401  (registers fake kernels and autograd for torch.compile)
from . import attacks, data  # noqa: E402  (they use the API above)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "ConcentrationStats", "attacks", "data", "DIVERSITY_LOSSES", "concentration_stats", "cosine_gram",
    "cuda_built", "default_backend", "diversity_loss", "dpp_loss", "eot_step", "extension_built", "nn",
    "sample_input_grads", "gal_loss", "info",
    "kappa_loss", "max_cosine_loss", "mean_cosine_loss", "mean_penalty", "normalize",
    "smoothmax_cosine_loss", "sparsity_penalty", "triton_available", "variance_penalty",
]
