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
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ._seeds import mix_seed
from .grads import sample_input_grads
from .losses import concentration_stats
from .nn.sampling import frozen_sample, is_stochastic, sampling, supports_batched

__all__ = [
    "ONE_STEP_ATTACKS", "ITERATIVE_ATTACKS", "BLACK_BOX_ATTACKS", "STAT_NAMES",
    "is_stochastic", "members_of", "sample_logits", "predict_correct", "gradient_stats",
    "gradient_samples_at", "unit_mean", "projection_basis", "project", "cosine_matrix", "ambiguity_entropy",
    "member_diversity", "regular_hadamard", "gaas", "random_search", "transfer_correct",
    "transfer_summary", "mra_correct", "paired_difference", "obfuscation_checklist", "quantiles",
    "derive_seed",
]

#: The attack families the obfuscation checklist compares (names of :data:`fastdiv.attacks.ATTACKS`).
ONE_STEP_ATTACKS = ("fgsm", "fgm", "rfgsm")
ITERATIVE_ATTACKS = ("pgd", "pgd-l2", "bim", "mifgsm", "pgdcw", "apgd-ce", "apgd-dlr")
BLACK_BOX_ATTACKS = ("square",)

#: The per-example concentration statistics, in report order (names of :class:`fastdiv.ConcentrationStats`
#: fields plus the mean gradient norm).
STAT_NAMES = ("kappa", "rho", "mean_cos", "dpp", "coherence", "rho_q", "grad_norm")

#: Upper bound on the rows of one replicated forward (``num_samples * batch``), to bound memory.
MAX_ROWS = 8192
#: Upper bound on the elements of one ``[n, B, D]`` gradient block.
MAX_GRAD_ELEMENTS = 1 << 24


def derive_seed(*values: int) -> int:
    """A 62-bit seed derived from integers (a splitmix64 hash), so that the seeds of repeats,
    attacks and ε values are unrelated streams yet reproducible."""
    return mix_seed(*values) >> 1


def members_of(model: nn.Module) -> list[nn.Module] | None:
    """The member models of an ensemble or population (its ``members`` attribute), else ``None``."""
    members = getattr(model, "members", None)
    if isinstance(members, (nn.ModuleList, list, tuple)) and len(members) >= 1 and all(
            isinstance(m, nn.Module) for m in members):
        return list(members)
    return None


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + max(1, size)))


@torch.no_grad()
def sample_logits(model: nn.Module, x: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """Logits of ``num_samples`` sample models drawn from ``seed``: ``[S, B, C]`` (``S = 1`` for a
    model without randomness; for a :class:`fastdiv.nn.Ensemble` its members, each once).
    Uses one replicated forward per chunk when the model supports sample
    batching, else one forward per sample. Weight-noise draws depend on ``seed`` only, so the same
    seed gives the same sample models for every batch."""
    if not is_stochastic(model):
        return model(x).unsqueeze(0)
    from .nn.ensemble import Ensemble

    if isinstance(model, Ensemble):  # its sample models are the members: each exactly once (as fastdiv.nn.predict)
        num_samples = len(model.members)
    if x.shape[0] == 0:
        with sampling(model, 1, seed, index=0):
            classes = model(x[:1].new_zeros((1, *x.shape[1:]))).shape[1] if x.dim() > 1 else 0
        return x.new_zeros((num_samples, 0, classes))
    pieces = []
    if supports_batched(model):
        step = max(1, MAX_ROWS // num_samples)
        for sl in _chunks(x.shape[0], step):
            xb = x[sl]
            with sampling(model, num_samples, seed):
                out = model(xb.repeat(num_samples, *([1] * (xb.dim() - 1))))
            pieces.append(out.view(num_samples, xb.shape[0], -1))
        return torch.cat(pieces, dim=1)
    for s in range(num_samples):
        with sampling(model, num_samples, seed, index=s):
            pieces.append(model(x))
    return torch.stack(pieces)


def predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                    *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ensemble_correct [B], worst_case_correct [B])`` (bool, on ``x.device``).

    ensemble: argmax of the mean softmax of ``num_samples`` sample models (GradDiv's inference);
    worst case: every sample model's argmax equals the label (stricter: a stochastic model that is
    queried once may answer with any of its samples).
    """
    ens, worst = [], []
    for sl in _chunks(x.shape[0], batch_size):
        logits = sample_logits(model, x[sl], num_samples, seed)
        yb = y[sl]
        probs = logits.float().softmax(-1).mean(0)
        ens.append(probs.argmax(-1) == yb)
        worst.append((logits.argmax(-1) == yb).all(0))
    if not ens:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return empty, empty
    return torch.cat(ens), torch.cat(worst)


def _grad_batch(num_samples: int, feature_size: int, batch_size: int) -> int:
    return max(1, min(batch_size, MAX_GRAD_ELEMENTS // max(1, num_samples * feature_size)))


def _sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                  members: list[nn.Module] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grads [n, B, ...], logits [n, B, C])`` of n sample models, or of each member once (a
    population's sample models dispatch every example to a random member, so its members are
    differentiated directly)."""
    if members is None:
        grads, logits = sample_input_grads(model, x, y, num_samples, generator=seed)
        return grads.detach(), logits.detach()
    pairs = [sample_input_grads(m, x, y, 1, generator=derive_seed(seed, i)) for i, m in enumerate(members)]
    return torch.cat([g for g, _ in pairs]).detach(), torch.cat([z for _, z in pairs]).detach()


def gradient_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                   *, batch_size: int = 256, members: list[nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Per-example concentration statistics of ``num_samples`` input-gradient samples (GradDiv §3-4),
    or of the members' gradients when ``members`` is given.

    Returns ``{name: [B] float32 tensor}`` for :data:`STAT_NAMES`: κ̂ (``kappa``, with p = the input
    dimension), the mean resultant length ρ̂ (``rho``), the ℓ1-MRL (``rho_q``), the mean pairwise
    cosine, the DPP loss ``-log det(C + εI)``, the coherence (max pairwise cosine, GAL eq. 7) and the
    mean gradient norm. Needs at least 2 samples.
    """
    n = len(members) if members is not None else num_samples
    if n < 2:
        raise ValueError(f"gradient_stats: needs at least 2 gradient samples to measure concentration, got {n}")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in STAT_NAMES}
    step = _grad_batch(n, x[0].numel() if x.shape[0] else 1, batch_size)
    for sl in _chunks(x.shape[0], step):
        grads, _ = _sample_grads(model, x[sl], y[sl], n, seed, members)
        grads = grads.float()
        st = concentration_stats(grads, sample_dim=0)
        for name in st._fields:
            out[name].append(getattr(st, name).float())
        out["grad_norm"].append(grads.flatten(2).norm(dim=-1).mean(0))
    return {k: (torch.cat(v) if v else x.new_zeros(0)) for k, v in out.items()}


def gradient_samples_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int,
                        seed: int, *, members: list[nn.Module] | None = None) -> torch.Tensor:
    """``num_samples`` input-gradient samples (or one per member) at one example ``x [1, ...]``,
    flattened: ``[n, D]``."""
    grads, _ = _sample_grads(model, x, y, num_samples, seed, members)
    return grads.float().flatten(1)


def unit_mean(samples: torch.Tensor) -> torch.Tensor:
    """The sample mean of the unit-normalized rows of ``samples [n, D]`` (length = ρ̂)."""
    return _unit_rows(samples.float()).mean(0)


def _unit_rows(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    norms = v.norm(dim=-1, keepdim=True)
    return torch.where(norms > eps, v / norms.clamp_min(eps), torch.zeros_like(v))


def projection_basis(*directions: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal 2-D basis ``[2, D]`` for projecting gradient samples (GradDiv Fig. 4).

    With two directions (the sample mean vectors of two models) the plane they span, in
    Gram–Schmidt order; with one direction, that direction and the first principal axis of
    ``samples`` orthogonal to it; with none, the first two principal axes of ``samples``. Degenerate
    directions (zero, or parallel to the first) are replaced by principal axes.
    """
    basis: list[torch.Tensor] = []
    for d in directions:
        v = d.flatten().double()
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-8 * max(1.0, float(d.double().norm())):
            basis.append(v / v.norm())
        if len(basis) == 2:
            break
    if len(basis) < 2:
        if samples is None:
            raise ValueError("projection_basis: needs two independent directions or samples for the principal axes")
        rest = samples.flatten(1).double()
        rest = rest - rest.mean(0, keepdim=True)
        for b in basis:
            rest = rest - (rest @ b)[:, None] * b
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        for v in vh:
            for b in basis:
                v = v - (v @ b) * b
            if v.norm() > 1e-8:
                basis.append(v / v.norm())
            if len(basis) == 2:
                break
    while len(basis) < 2:  # rank-deficient samples (e.g. identical gradients): any orthonormal completion
        e = torch.zeros_like(basis[0]) if basis else torch.zeros(samples.shape[-1], dtype=torch.float64)
        for i in range(e.numel()):
            v = torch.zeros_like(e)
            v[i] = 1.0
            for b in basis:
                v = v - (v @ b) * b
            if v.norm() > 1e-6:
                basis.append(v / v.norm())
                break
    return torch.stack(basis).float()


def project(samples: torch.Tensor, basis: torch.Tensor) -> dict:
    """Unit-normalized gradient samples ``[n, D]`` projected on ``basis [2, D]``.

    Returns ``{'points': [n, 2], 'mean': [2], 'rho': float}``: the projected unit vectors, the
    projected sample mean of the unit vectors, and its full-dimensional length ρ̂ (the sample MRL).
    """
    u = _unit_rows(samples.float())
    mean = u.mean(0)
    return {"points": (u @ basis.T.to(u)).cpu(), "mean": (mean @ basis.T.to(u)).cpu(), "rho": float(mean.norm())}


def cosine_matrix(samples: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities ``[n, n]`` of gradient samples ``[n, D]`` (GradDiv Fig. 8)."""
    u = _unit_rows(samples.double())
    return (u @ u.T).clamp(-1, 1).float()


def ambiguity_entropy(correct: torch.Tensor) -> float:
    """LPD eq. (7): ``E = (1/N) Σ_i min(l_i, K − l_i) / (K − ⌈K/2⌉)`` from member correctness
    ``[K, N]`` (``l_i`` = how many of the K members classify example i correctly). 0 = the members
    always agree; 1 = maximal disagreement."""
    k, n = correct.shape
    if k < 2:
        raise ValueError(f"ambiguity_entropy: needs K >= 2 members, got {k}")
    if n == 0:
        return 0.0
    votes = correct.sum(0).double()
    return float(torch.minimum(votes, k - votes).mean() / (k - math.ceil(k / 2)))


def member_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int,
                     *, batch_size: int = 256, members: list[nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Per-example ensemble-diversity measures of LPD §4 over K sample models, or over the members
    when ``members`` is given (K = len(members)).

    Returns ``{'correct': [K, B] bool, 'l_d': [B], 'l_s': [B]}``: each member's clean correctness
    (for the ambiguity entropy, :func:`ambiguity_entropy`), ``L_d = Σ_{i<j} cos(g_i, g_j)`` and
    ``L_s = Σ_k ‖g_k‖₂`` of the members' input gradients.
    """
    k = len(members) if members is not None else k
    if k < 2:
        raise ValueError(f"member_diversity: needs K >= 2 members or sample models, got {k}")
    correct, l_d, l_s = [], [], []
    step = _grad_batch(k, x[0].numel() if x.shape[0] else 1, batch_size)
    for sl in _chunks(x.shape[0], step):
        grads, logits = _sample_grads(model, x[sl], y[sl], k, seed, members)
        g = grads.float().flatten(2)  # [K, B, D]
        correct.append(logits.argmax(-1) == y[sl])
        u = _unit_rows(g.transpose(0, 1))  # [B, K, D]
        cos = u @ u.transpose(1, 2)
        iu = torch.triu_indices(k, k, offset=1, device=cos.device)
        l_d.append(cos[:, iu[0], iu[1]].sum(-1))
        l_s.append(g.norm(dim=-1).sum(0))
    if not correct:
        z = x.new_zeros(0)
        return {"correct": torch.zeros(k, 0, dtype=torch.bool, device=x.device), "l_d": z, "l_s": z}
    return {"correct": torch.cat(correct, 1), "l_d": torch.cat(l_d), "l_s": torch.cat(l_s)}


def regular_hadamard(k: int) -> torch.Tensor:
    """A regular Hadamard matrix of order ``k = 4^m`` (m >= 1): entries ±1, ``H Hᵀ = k I`` and every
    row sums to ``√k`` (so each row, multiplied into ``sign(∇x)``, is aligned with the gradient).
    Built as Kronecker powers of ``J₄ − 2I₄``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 4 or 4 ** round(math.log(k, 4)) != k:
        raise ValueError(f"regular_hadamard: k must be a power of 4 (4, 16, 64, 256, ...), got {k!r}")
    h4 = torch.ones(4, 4) - 2 * torch.eye(4)
    h = h4
    while h.shape[0] < k:
        h = torch.kron(h, h4)
    return h


def _eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    grads, _ = sample_input_grads(model, x, y, num_samples if is_stochastic(model) else 1, generator=seed)
    return grads.detach().mean(0)


def gaas(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ks: Sequence[int], eps: Sequence[float],
         grad_samples: int, pred_samples: int, seed: int, clip: tuple[float, float] = (0.0, 1.0),
         batch_size: int = 128) -> torch.Tensor:
    """Gradient Aligned Adversarial Subspace (Tramèr et al. 2017; GAL §4.4) with regular Hadamard
    directions.

    For each example, the attacker's gradient estimate ``g`` (the mean of ``grad_samples`` sample
    gradients) gives ``k`` orthogonal ℓ∞ directions ``r_i = ε · sign(g) ⊙ h_i``, where ``h_i`` is row i
    of a regular Hadamard matrix of order k expanded over k contiguous blocks of the flattened input
    (exactly orthogonal when k divides the input size). Returns ``[len(eps), len(ks), B]`` int64: how
    many of the k directions are adversarial (ensemble prediction over ``pred_samples`` samples)
    at ``clip(x + r_i)``.
    """
    d = x[0].numel() if x.shape[0] else 0
    bad = [k for k in ks if k > max(d, 1)]
    if bad:
        raise ValueError(f"gaas: k must not exceed the input size {d}, got {bad}")
    out = torch.zeros(len(eps), len(ks), x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return out
    pred_seed = derive_seed(seed, 1)
    for sl in _chunks(x.shape[0], batch_size):
        xb, yb = x[sl], y[sl]
        sign = torch.sign(_eot_gradient(model, xb, yb, grad_samples, seed)).flatten(1)  # [b, D]
        for ki, k in enumerate(ks):
            h = regular_hadamard(k).to(xb)
            block = (torch.arange(d, device=xb.device) * k) // d  # feature -> Hadamard column
            dirs = h[:, block]  # [k, D]
            for ei, e in enumerate(eps):
                pert = (e * sign[None] * dirs[:, None]).view(k * xb.shape[0], *xb.shape[1:])
                xa = (xb.repeat(k, *([1] * (xb.dim() - 1))) + pert).clamp(*clip)
                ok, _ = predict_correct(model, xa, yb.repeat(k), pred_samples, pred_seed)
                out[ei, ki, sl] = (~ok).view(k, xb.shape[0]).sum(0)
    return out


@torch.no_grad()
def random_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, samples: int,
                  pred_samples: int, seed: int, clip: tuple[float, float] = (0.0, 1.0),
                  batch_size: int = 64) -> torch.Tensor:
    """Brute-force random search in the ℓ∞ ball (GradDiv §5, check 4): ``samples`` random vertices
    ``x + ε·s`` (``s`` uniform in {−1, +1}^D) per example. Returns ``[B]`` bool: some sample is
    misclassified (ensemble prediction, ``pred_samples`` sample models)."""
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0] == 0 or samples == 0:
        return found
    gen = torch.Generator(device=x.device)
    gen.manual_seed(derive_seed(seed, 2))
    pred_seed = derive_seed(seed, 1)
    per = max(1, MAX_ROWS // max(1, pred_samples * x.shape[0]))  # random samples per forward
    for sl in _chunks(x.shape[0], batch_size):
        xb, yb = x[sl], y[sl]
        for start in range(0, samples, per):
            m = min(per, samples - start)
            signs = torch.randint(0, 2, (m, *xb.shape), generator=gen, device=x.device).to(xb.dtype) * 2 - 1
            xa = (xb[None] + eps * signs).clamp(*clip).view(m * xb.shape[0], *xb.shape[1:])
            ok, _ = predict_correct(model, xa, yb.repeat(m), pred_samples, pred_seed)
            found[sl] |= (~ok).view(m, xb.shape[0]).any(0)
    return found


@contextlib.contextmanager
def _pinned(model: nn.Module, members: list[nn.Module] | None, index: int, seed: int):
    """The ``index``-th sample model: a member, or ``model`` pinned to one weight draw."""
    if members is not None:
        yield members[index]
    else:
        with frozen_sample(model, seed=derive_seed(seed, 3, index)):
            yield model


def transfer_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_attack: Callable[[nn.Module], Callable],
                     *, k: int, seed: int, members: list[nn.Module] | None = None) -> torch.Tensor:
    """Transferability among ``k`` sample models (GradDiv Fig. 7): adversarial examples crafted on
    source i (a member, or ``model`` pinned with :func:`fastdiv.nn.frozen_sample`), classified by
    target j. Returns ``[k, k, B]`` bool (``[source, target, example]`` correct); the diagonal is
    the white-box accuracy of each sample model."""
    if members is not None:
        k = len(members)
    out = torch.zeros(k, k, x.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0] == 0:
        return out
    for i in range(k):
        with _pinned(model, members, i, seed) as src:
            x_adv = make_attack(src)(x, y).detach()
        for j in range(k):
            with _pinned(model, members, j, seed) as tgt, torch.no_grad():
                out[i, j] = tgt(x_adv).argmax(-1) == y
    return out


def transfer_summary(correct: torch.Tensor) -> dict:
    """Accuracy matrix ``[k, k]`` (fractions) and its off-diagonal mean / min / max and diagonal mean."""
    acc = correct.float().mean(-1) if correct.shape[-1] else torch.zeros(correct.shape[:2])
    k = acc.shape[0]
    off = acc[~torch.eye(k, dtype=torch.bool, device=acc.device)]
    return {
        "matrix": acc.cpu().tolist(),
        "off_diagonal_mean": float(off.mean()) if off.numel() else None,
        "off_diagonal_min": float(off.min()) if off.numel() else None,
        "off_diagonal_max": float(off.max()) if off.numel() else None,
        "diagonal_mean": float(acc.diagonal().mean()),
    }


def mra_correct(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                make_attack: Callable[[nn.Module], Callable] | None, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLM eq. (6): each example is perturbed on a random submodel (uniform, seeded), then every
    submodel classifies the whole perturbed set. Returns ``(correct [K, B] bool, source [B] int64)``;
    ``MRA = correct.float().mean()``. ``make_attack=None`` gives the benign MRA (no perturbation)."""
    k = len(members)
    gen = torch.Generator().manual_seed(derive_seed(seed, 4))
    # drawn on the CPU for every example index up to B so that the draw does not depend on the device
    source = torch.randint(0, k, (x.shape[0],), generator=gen).to(x.device)
    x_adv = x.clone()
    if make_attack is not None:
        for i in range(k):
            sel = source == i
            if sel.any():
                x_adv[sel] = make_attack(members[i])(x[sel], y[sel]).detach()
    with torch.no_grad():
        correct = torch.stack([m(x_adv).argmax(-1) == y for m in members]) if x.shape[0] else \
            torch.zeros(k, 0, dtype=torch.bool, device=x.device)
    return correct, source


def quantiles(values: torch.Tensor, qs: Sequence[float] = (0.25, 0.5, 0.75)) -> dict[str, float]:
    """``{'25%': ..., '50%': ..., '75%': ...}`` of a 1-D tensor (linear interpolation)."""
    v = values.double().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {f"{round(q * 100)}%": None for q in qs}
    return {f"{round(q * 100)}%": float(torch.quantile(v, q)) for q in qs}


# ------------------------------------------------------------------------------------------------
# The gradient-obfuscation checklist (GradDiv §5, after Athalye et al. 2018)
# ------------------------------------------------------------------------------------------------

def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of ``acc(a) − acc(b)`` from per-example correctness of the same examples
    (``[..., N]`` bool; leading dims, e.g. repeats, are pooled). Pairing removes the between-example
    variance that two independent binomial errors would count twice."""
    d = (a.float() - b.float()).flatten()
    if d.numel() == 0:
        return 0.0, 0.0
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    return float(d.mean()), se


def _margin(se: float, min_margin: float) -> float:
    # two standard errors: a difference smaller than that is sampling noise, not evidence of masking
    return max(min_margin, 2.0 * se)


def obfuscation_checklist(
    *,
    rows: dict[str, dict],
    clean: torch.Tensor,
    curve: list[tuple[float, torch.Tensor]] | None,
    unbounded: dict | None,
    random: dict | None,
    min_margin: float = 0.01,
    min_unbounded_success: float = 0.99,
) -> list[dict]:
    """The five checks of GradDiv §5 / Athalye et al. (2018), each ``{'id', 'name', 'status'
    ('pass'|'fail'|'skipped'), 'detail', 'numbers'}``; 'fail' = the behaviour of obfuscated gradients
    was observed.

    rows: ``{key: {'attack': name, 'eps': float, 'correct': [R, N] bool, 'label': str (optional)}}`` —
        every attack row of the robust-accuracy table at every ε (ensemble predictions, all repeats).
    clean: ``[R, N]`` bool, the clean correctness.
    curve: ``[(eps, correct [R, N])]`` of the curve attack, ascending ε (bounded ε only).
    unbounded: ``{'label', 'eps', 'correct': [N] bool}`` of a gradient attack with ε = 1 (or None).
    random: ``{'label', 'samples', 'per_eps': [(eps, attack_correct [N], random_found [N])]}``.

    Differences are paired over the same examples and must exceed ``max(min_margin, 2·SE)`` to count.
    """
    checks = []
    by_eps: dict[float, list[tuple[str, dict]]] = {}
    for label, r in rows.items():
        by_eps.setdefault(float(r["eps"]), []).append((label, r))

    def best(items, names):
        cands = [(lbl, r) for lbl, r in items if r["attack"] in names]
        if not cands:
            return None
        return min(cands, key=lambda lr: float(lr[1]["correct"].float().mean()))

    def compare(cid, name, stronger_names, weaker_names, stronger_kind, weaker_kind):
        # fails when the family that should be weaker (one-step / black-box) beats the other family
        numbers, failures, compared = [], [], 0
        for eps in sorted(by_eps):
            weak = best(by_eps[eps], weaker_names)
            strong = best(by_eps[eps], stronger_names)
            if weak is None or strong is None:
                continue
            compared += 1
            diff, se = paired_difference(strong[1]["correct"], weak[1]["correct"])
            margin = _margin(se, min_margin)
            acc_w, acc_s = float(weak[1]["correct"].float().mean()), float(strong[1]["correct"].float().mean())
            entry = {"eps": eps, f"best_{weaker_kind}": weak[1].get("label", weak[0]), f"{weaker_kind}_accuracy": acc_w,
                     f"best_{stronger_kind}": strong[1].get("label", strong[0]), f"{stronger_kind}_accuracy": acc_s,
                     "difference": diff, "margin": margin}
            numbers.append(entry)
            if diff > margin:
                failures.append(entry)
        if not compared:
            return {"id": cid, "name": name, "status": "skipped", "numbers": [],
                    "detail": f"needs a {weaker_kind} and a {stronger_kind} attack at the same ε "
                              f"({'/'.join(weaker_names)} vs {'/'.join(stronger_names)})"}
        if failures:
            f = failures[0]
            detail = (f"at ε={f['eps']:g} {f[f'best_{weaker_kind}']} leaves {100 * f[f'{weaker_kind}_accuracy']:.2f}% "
                      f"< {f[f'best_{stronger_kind}']} {100 * f[f'{stronger_kind}_accuracy']:.2f}% "
                      f"(by {100 * f['difference']:.2f} pp > margin {100 * f['margin']:.2f} pp)")
        else:
            detail = "; ".join(f"ε={e['eps']:g}: {e[f'best_{weaker_kind}']} "
                               f"{100 * e[f'{weaker_kind}_accuracy']:.2f}% ≥ "
                               f"{e[f'best_{stronger_kind}']} {100 * e[f'{stronger_kind}_accuracy']:.2f}%"
                               f"{'' if e['difference'] <= 0 else ' (within margin)'}" for e in numbers)
        return {"id": cid, "name": name, "status": "fail" if failures else "pass", "detail": detail,
                "numbers": numbers}

    checks.append(compare(1, "one-step attacks are not stronger than iterative attacks",
                          ITERATIVE_ATTACKS, ONE_STEP_ATTACKS, "iterative", "one_step"))
    checks.append(compare(2, "black-box attacks are not stronger than white-box attacks",
                          ONE_STEP_ATTACKS + ITERATIVE_ATTACKS, BLACK_BOX_ATTACKS, "white_box", "black_box"))

    # 3. unbounded attacks reach ~100% success
    if unbounded is None:
        checks.append({"id": 3, "name": "an unbounded attack reaches ~100% success", "status": "skipped",
                       "detail": "no iterative gradient attack available", "numbers": {}})
    else:
        acc = float(unbounded["correct"].float().mean()) if unbounded["correct"].numel() else 0.0
        success = 1.0 - acc
        ok = success >= min_unbounded_success
        checks.append({
            "id": 3, "name": "an unbounded attack reaches ~100% success", "status": "pass" if ok else "fail",
            "detail": (f"{unbounded['label']} with ε={unbounded['eps']:g}: success {100 * success:.2f}% "
                       f"{'≥' if ok else '<'} {100 * min_unbounded_success:.0f}%"),
            "numbers": {"label": unbounded["label"], "eps": unbounded["eps"], "success": success,
                        "threshold": min_unbounded_success}})

    # 4. random sampling does not find adversarial examples that the attack missed
    if random is None or not random["per_eps"]:
        checks.append({"id": 4, "name": "random sampling finds no adversarial examples the attack missed",
                       "status": "skipped", "detail": "random search not run", "numbers": []})
    else:
        numbers, failures = [], []
        for eps, att_ok, found in random["per_eps"]:
            n = att_ok.numel()
            missed = (att_ok & found)
            frac = float(missed.float().mean()) if n else 0.0
            entry = {"eps": eps, "attack_accuracy": float(att_ok.float().mean()) if n else 0.0,
                     "attack_survivors": int(att_ok.sum()), "found_by_random": int(missed.sum()),
                     "accuracy_drop": frac, "margin": min_margin}
            numbers.append(entry)
            if frac > min_margin:
                failures.append(entry)
        if failures:
            f = failures[0]
            detail = (f"at ε={f['eps']:g} {random['samples']} random samples broke {f['found_by_random']} of the "
                      f"{f['attack_survivors']} examples that survived {random['label']} "
                      f"(−{100 * f['accuracy_drop']:.2f} pp > {100 * min_margin:.0f} pp)")
        else:
            detail = "; ".join(f"ε={e['eps']:g}: {e['found_by_random']}/{e['attack_survivors']} survivors of "
                               f"{random['label']} broken by {random['samples']} random samples" for e in numbers)
        checks.append({"id": 4, "name": "random sampling finds no adversarial examples the attack missed",
                       "status": "fail" if failures else "pass", "detail": detail, "numbers": numbers})

    # 5. accuracy falls as ε grows (up to the unbounded attack)
    points = [(0.0, "clean", clean)]
    if curve:
        points += [(float(e), "curve", c) for e, c in curve]
    if unbounded is not None:
        points.append((float(unbounded["eps"]), "unbounded", unbounded["correct"].reshape(1, -1)))
    if len(points) < 2:
        checks.append({"id": 5, "name": "accuracy falls as ε grows", "status": "skipped",
                       "detail": "needs an accuracy-vs-ε curve", "numbers": []})
    else:
        numbers, increases = [], []
        for (e0, _, c0), (e1, _, c1) in zip(points, points[1:]):
            if c0.shape != c1.shape:  # different repeat counts (the unbounded run has one): compare means
                diff, se = float(c1.float().mean() - c0.float().mean()), 0.0
                for c in (c0, c1):
                    p = float(c.float().mean())
                    se += p * (1 - p) / max(1, c.numel())
                se = math.sqrt(se)
            else:
                diff, se = paired_difference(c1, c0)
            entry = {"from_eps": e0, "to_eps": e1, "accuracy_change": diff, "margin": _margin(se, min_margin)}
            numbers.append(entry)
            if diff > entry["margin"]:
                increases.append(entry)
        first, last = points[0], points[-1]
        drop, se = float(first[2].float().mean() - last[2].float().mean()), 0.0
        falls = drop > min_margin
        accs = ", ".join(f"{e:g}: {100 * float(c.float().mean()):.2f}%" for e, _, c in points)
        if increases:
            f = increases[0]
            detail = (f"accuracy rises from ε={f['from_eps']:g} to ε={f['to_eps']:g} by "
                      f"{100 * f['accuracy_change']:.2f} pp (> {100 * f['margin']:.2f} pp) [{accs}]")
        elif not falls:
            detail = f"accuracy does not fall from ε=0 to ε={last[0]:g} [{accs}]"
        else:
            detail = f"monotone within the margins [{accs}]"
        checks.append({"id": 5, "name": "accuracy falls as ε grows",
                       "status": "pass" if falls and not increases else "fail", "detail": detail,
                       "numbers": {"steps": numbers, "total_drop": drop,
                                   "accuracy": [[e, float(c.float().mean())] for e, _, c in points]}})
    return checks
