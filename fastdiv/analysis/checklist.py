"""The gradient-obfuscation checklist (GradDiv §5, after Athalye et al. 2018) and the random search its
fourth check runs."""
from __future__ import annotations

import math

import torch
from torch import nn

from .predict import MAX_ROWS, _chunks, derive_seed, predict_correct

#: The attack families the obfuscation checklist compares (names of :data:`fastdiv.attacks.ATTACKS`).
ONE_STEP_ATTACKS = ("fgsm", "fgm", "rfgsm")
ITERATIVE_ATTACKS = ("pgd", "pgd-l2", "bim", "mifgsm", "pgdcw", "apgd-ce", "apgd-dlr")
BLACK_BOX_ATTACKS = ("square",)


@torch.no_grad()
def random_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, samples: int,
                  pred_samples: int, seed: int, clip: tuple[float, float] = (0.0, 1.0),
                  batch_size: int = 64, norm: str = "linf") -> torch.Tensor:
    """Brute-force random search on the boundary of the ε-ball (GradDiv §5, check 4): ``samples`` random
    points per example, ℓ∞: the vertices ``x + ε·s`` (``s`` uniform in {−1, +1}^D); ℓ2: ``x + ε·z/‖z‖₂``
    (``z ~ N(0, I)``, uniform on the sphere). Returns ``[B]`` bool: some sample is misclassified
    (ensemble prediction, ``pred_samples`` sample models)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"random_search: norm must be 'linf' or 'l2', got {norm!r}")
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
            if norm == "linf":
                step = torch.randint(0, 2, (m, *xb.shape), generator=gen, device=x.device).to(xb.dtype) * 2 - 1
            else:
                z = torch.randn((m, *xb.shape), generator=gen, device=x.device, dtype=xb.dtype)
                step = z / z.flatten(2).norm(dim=-1).clamp_min(torch.finfo(z.dtype).tiny).view(
                    m, xb.shape[0], *([1] * (xb.dim() - 1)))
            xa = (xb[None] + eps * step).clamp(*clip).view(m * xb.shape[0], *xb.shape[1:])
            ok, _ = predict_correct(model, xa, yb.repeat(m), pred_samples, pred_seed)
            found[sl] |= (~ok).view(m, xb.shape[0]).any(0)
    return found


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
