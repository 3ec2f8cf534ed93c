"""Every preset of fastdiv.presets trains one short epoch on the synthetic data (in-process), with the
regularizer switched on from the first step, and leaves a loadable run directory."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastdiv.presets import PRESETS
from fastdiv.train import load_run, parse_reg, resolve_config, train

TINY = dict(dataset="synthetic", limit=16, batch_size=16, epochs=1, eval_samples=2, stats_limit=8, stats_samples=3,
            adv_steps=1, offline_steps=1, source_epochs=1, warmup=0, rampup=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_trains_one_epoch(name, tmp_path):
    extra = {"prse_every": 1} if name.startswith("clm") else {}
    out = tmp_path / name
    run_dir = train({"preset": name, **TINY, **extra, "out": str(out)}, quiet=True)
    assert run_dir == out
    cfg = resolve_config({"preset": name, **TINY, **extra})
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    clean = 16
    n_train = 2 * clean if cfg.offline == "pgd" else clean  # D3 'Off' adds the PGD examples once
    assert record["epoch"] == 1 and record["step"] == math.ceil(n_train / 16)
    assert math.isfinite(record["train_loss"]) and 0 <= record["val_acc"] <= 1 and 0 <= record["train_acc"] <= 1
    assert record["train_ce"] > 0
    if parse_reg(cfg.reg):
        assert record["lambda"] == cfg.lam and record["train_reg"] != 0
        assert record["train_loss"] == pytest.approx(record["train_ce"] + cfg.lam * record["train_reg"]
                                                     + record["train_kl"], rel=1e-5)
    else:
        assert record["lambda"] == 0 and record["train_reg"] == 0
    assert (record["train_kl"] > 0) == (cfg.kind == "bayes" and cfg.kl_factor > 0)
    # held-out concentration statistics for every randomized or ensemble model
    assert (record["kappa_p"] is None) == (cfg.kind == "deterministic" and cfg.wrapper == "single")

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.load(out / "best.pt", weights_only=True)
    model, config = load_run(out, which="last")
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, ckpt["model"][k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        logits = model(torch.rand(3, *config["in_shape"]))
    assert logits.shape == (3, config["num_classes"]) and torch.isfinite(logits).all()

    assert config["n_train"] == n_train
    if cfg.offline == "pgd":
        assert (out / "offline.pt").exists() and (out / "source.pt").exists()
        offline = torch.load(out / "offline.pt", weights_only=True)
        assert offline["x"].shape == (clean, 1, 8, 8) and 0 <= offline["x"].min() and offline["x"].max() <= 1
    if cfg.offline == "fgsm":
        assert (out / "source.pt").exists()
    if cfg.prse_every:  # the counter-linking mask was drawn (about half the first-layer weights)
        mask = ckpt["model"]["link_mask"]
        assert bool(ckpt["model"]["link_mask_set"]) and 0.2 < mask.float().mean() < 0.8
