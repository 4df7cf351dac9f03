"""The optimizer replay (evaluation/optimizer_replay.py) against a real ``Trainer.fit`` of a tiny ViT on digits: the
recorded optimizer's replay rebuilds the run's per-epoch last-FFN weights (and refuses an altered file), both
replays draw the fit's batches in the fit's order with its learning-rate schedule, SGD + momentum equals a
hand-written float64 update loop, and the diagnostics equal brute-force computations."""
from __future__ import annotations

import copy
import math
import shutil

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from vitfl.callbacks.checkpoints import PerEpochCheckpoint
from vitfl.callbacks.ffn_weights import LastFFNWeightsWriter, load_ffn_weights
from conftest import HF_KW, TIMM_KW, C
from vitfl.core.runstore import RunStore
from vitfl.datamodules import DigitsDataModule
from vitfl.evaluation.optimizer_replay import (ReplayError, ReplayMismatchError, epoch_batches, gradient_snr,
                                         optimizer_ground_truths, replay_fit, replay_settings, training_gradient,
                                         update_diagnostics, verify_replay)
from vitfl.lightning_modules.classifier import ImageClassifier
from vitfl.lightning_modules.runs import load_classifier
from vitfl.localization.ffn import last_ffn_head

EPOCHS, LIMIT, LR = 2, 6, 2e-3
HPARAMS = dict(lr=LR, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.1, min_lr_ratio=0.01)


class BatchRecorder(L.Callback):
    """What the Trainer fed each step: ``batch[2]`` and the first parameter group's learning rate."""

    def __init__(self):
        self.indices: list[list[torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.indices.append([])
        self.lrs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices[-1].append(batch[2].clone())
        self.lrs[-1].append(float(trainer.optimizers[0].param_groups[0]["lr"]))


def _datamodule(root):
    return DigitsDataModule(batch_size=32, eval_batch_size=128, folds_path=str(root / "folds.json"))


def _classifier(backbone: str) -> ImageClassifier:
    torch.manual_seed(0)
    kw = dict(HF_KW) if backbone == "hf_vit" else dict(TIMM_KW, init_values=0.1)
    return ImageClassifier(backbone=backbone, num_classes=C, backbone_kwargs=kw, **HPARAMS)


_RUNS: dict = {}


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """``fit_run(backbone)``: a real 2-epoch fit (6 batches per epoch, AdamW with weight decay, warm-up, label
    smoothing) with per-epoch checkpoints, last-FFN weight files and the batches / LRs it used."""
    def make(backbone: str = "hf_vit") -> dict:
        if backbone not in _RUNS:
            root = tmp_path_factory.mktemp(f"replay_{backbone}")
            L.seed_everything(0, verbose=False)
            rec = BatchRecorder()
            trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_train_batches=LIMIT,
                                limit_val_batches=1, default_root_dir=str(root), logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[PerEpochCheckpoint(), LastFFNWeightsWriter(), rec])
            trainer.fit(_classifier(backbone).train(), datamodule=_datamodule(root))
            _RUNS[backbone] = {"root": root, "layout": RunStore(root), "rec": rec, "backbone": backbone}
        return _RUNS[backbone]

    yield make
    _RUNS.clear()


def _replay(run, start: int = 0, **kw):
    """Replay epochs start+1 .. 2 of ``run`` from its checkpoint of epoch ``start`` (a fresh data module, as a
    later step rebuilds it); (ReplayResult, the trained model)."""
    model = load_classifier(run["layout"].checkpoint(start))
    return replay_fit(model, _datamodule(run["root"]), EPOCHS, EPOCHS, start_epoch=start, limit_train_batches=LIMIT,
                      **kw), model


# ------------------------------------------------------------------------------------------- exact replay
@pytest.mark.parametrize("backbone", ["hf_vit", "timm_vit"])
def test_recorded_optimizer_replay_reproduces_the_fit(fit_run, backbone, tmp_path):
    run = fit_run(backbone)
    layout = run["layout"]
    res, model = _replay(run)
    assert res.optimizer == "adamw" and [r.epoch for r in res.epochs] == [1, 2] and res.steps_per_epoch == LIMIT
    diffs = verify_replay(res, layout.ffn_weights, tol=1e-6)
    assert set(diffs) == {1, 2} and max(diffs.values()) <= 1e-6, diffs
    # the whole model, not only the last FFN, is the fit's final checkpoint
    final = load_classifier(layout.checkpoint(2)).state_dict()
    worst = max(float((v.double() - final[k].double()).abs().max()) for k, v in model.state_dict().items()
                if v.is_floating_point())
    assert worst <= 1e-6, worst
    if backbone == "timm_vit":
        assert "ls_gamma" in res.epochs[-1].ffn
    # an altered recorded file is refused, naming the file and the difference
    shutil.copytree(layout.ffn_weights_dir, tmp_path / "ffn_weights")
    altered = RunStore(tmp_path)
    w = load_ffn_weights(altered.ffn_weights(2))
    w["W_aft"][3, 5] += 1e-3
    from safetensors.torch import save_file
    save_file(w, str(altered.ffn_weights(2)))
    assert verify_replay(res, altered.ffn_weights, tol=1e-6, raise_on_mismatch=False)[2] >= 1e-3 - 1e-9
    with pytest.raises(ReplayMismatchError, match=r"epoch=002\.safetensors.*1e-03|epoch=002\.safetensors.*0\.001"):
        verify_replay(res, altered.ffn_weights, tol=1e-6)


def test_recorded_replay_needs_epoch_zero(fit_run):
    run = fit_run("hf_vit")
    with pytest.raises(ReplayError, match="replay it from epoch 0"):
        replay_fit(load_classifier(run["layout"].checkpoint(1)), _datamodule(run["root"]), EPOCHS, 2, start_epoch=1,
                   limit_train_batches=LIMIT)


# ----------------------------------------------------------------------------------- same batches, same LRs
def test_replays_use_the_fits_batches_and_schedule(fit_run):
    run = fit_run("hf_vit")
    rec = run["rec"]
    res, _ = _replay(run)
    sgd_lr = 0.05
    sgd, _ = _replay(run, start=1, optimizer="sgd", sgd_lr=sgd_lr)
    assert [r.epoch for r in sgd.epochs] == [2] and sgd.optimizer == "sgd_momentum"
    for e in (1, 2):
        fit_idx = rec.indices[e - 1]
        assert len(fit_idx) == LIMIT
        assert all(torch.equal(a, b) for a, b in zip(res.epoch(e).indices, fit_idx))
        assert np.allclose(res.epoch(e).lrs, rec.lrs[e - 1], rtol=0, atol=1e-15)
    assert not torch.equal(rec.indices[0][0], rec.indices[1][0])  # the epochs are shuffled differently
    assert all(torch.equal(a, b) for a, b in zip(sgd.epoch(2).indices, rec.indices[1]))
    # SGD at the same global steps follows the recorded schedule's shape: lr_t = sgd_lr * (fit lr_t / lr)
    want = [sgd_lr * lr / LR for lr in rec.lrs[1]]
    assert np.allclose(sgd.epoch(2).lrs, want, rtol=1e-12, atol=0)
    assert sgd.epoch(2).global_steps == list(range(LIMIT, 2 * LIMIT))


# ---------------------------------------------------------------------------- SGD vs a hand-written loop
def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and "norm" not in name.lower() and "bias" not in name


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_equals_hand_written_float64_loop(fit_run, momentum):
    run = fit_run("hf_vit")
    sgd_lr = 0.05
    res, model = _replay(run, start=1, optimizer="sgd", sgd_lr=sgd_lr, momentum=momentum)
    assert res.optimizer == ("sgd_momentum" if momentum else "sgd")
    ref = load_classifier(run["layout"].checkpoint(1)).double().train()
    named = list(ref.named_parameters())
    buf = {n: torch.zeros_like(p) for n, p in named}
    lrs = [sgd_lr * lr / LR for lr in run["rec"].lrs[1]]
    dm = _datamodule(run["root"])
    dm.setup()
    loader = dm.train_dataloader()
    seen = []
    for t, (images, labels, index) in enumerate(epoch_batches(loader, 2, LIMIT)):
        seen.append(index)
        loss = F.cross_entropy(ref(images.double()), labels, label_smoothing=HPARAMS["label_smoothing"])
        grads = torch.autograd.grad(loss, [p for _, p in named])
        with torch.no_grad():
            for (n, p), g in zip(named, grads):
                if _decays(n, p):
                    g = g + HPARAMS["weight_decay"] * p
                buf[n] = momentum * buf[n] + g      # v = mu v + g
                p -= lrs[t] * buf[n]                # w -= lr_t v
    assert all(torch.equal(a, b) for a, b in zip(seen, run["rec"].indices[1]))
    got, want = (torch.cat([w.detach().double().reshape(-1) for w in last_ffn_head(m).weights()])
                 for m in (model, ref))
    assert float((got - want).abs().max()) < 1e-6
    start = torch.cat([w.detach().double().reshape(-1)
                       for w in last_ffn_head(load_classifier(run["layout"].checkpoint(1))).weights()])
    assert float((got - start).abs().max()) > 1e-4  # the check would notice a replay that did nothing


# ------------------------------------------------------------------------------------------ diagnostics
def test_moments_snr_adam_ratio_and_diagnostics_equal_brute_force(fit_run):
    run = fit_run("hf_vit")
    layout = run["layout"]
    steps: list[dict] = []
    res, _ = _replay(run, step_callback=steps.append)
    ep = res.epoch(2)
    G = np.stack([s["grad"].double().numpy() for s in steps if s["epoch"] == 2])  # [T, total]
    assert G.shape[0] == LIMIT == ep.n_steps
    assert np.allclose(ep.grad_mean.numpy(), G.mean(0), rtol=1e-10, atol=1e-15)
    snr = ep.grad_snr.numpy()
    for j in range(G.shape[1]):  # per weight: |mean| / population std of its step gradients
        m, sd = G[:, j].mean(), G[:, j].std(ddof=0)
        want = abs(m) / sd if sd > 0 else (math.inf if m != 0 else 0.0)
        assert snr[j] == pytest.approx(want, rel=1e-6, abs=1e-12), j
    # Adam's bias-corrected |m_hat| / (sqrt(v_hat) + eps) after the last step, from the stored gradients (float64)
    b1, b2, eps = 0.9, 0.999, 1e-8
    mo, v = np.zeros(G.shape[1]), np.zeros(G.shape[1])
    for t, s in enumerate(steps, 1):
        g = s["grad"].double().numpy()
        mo, v = b1 * mo + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    want_ratio = np.abs(mo / (1 - b1 ** len(steps))) / (np.sqrt(v / (1 - b2 ** len(steps))) + eps)
    assert np.allclose(res.adam_ratio.numpy(), want_ratio, rtol=1e-4, atol=1e-5)

    # the diagnostics dict against scipy / explicit loops
    flat = lambda w: torch.cat([w["W_bef"].reshape(-1), w["W_aft"].reshape(-1)]).double()  # noqa: E731
    w1, w2 = flat(load_ffn_weights(layout.ffn_weights(1))), flat(load_ffn_weights(layout.ffn_weights(2)))
    dW = (w2 - w1).numpy()
    model1 = load_classifier(layout.checkpoint(1))
    dm = _datamodule(run["root"])
    dm.setup()
    g_train, n = training_gradient(model1, dm, batch_size=100)
    # reference: evaluation.testbed.checkpoint_diagnostics' definition (all parameters with gradients, eval mode, sum / N)
    ref = load_classifier(layout.checkpoint(1))
    wb, wa = last_ffn_head(ref).weights()
    total = 0
    for images, labels, _ in dm.dataloader("train", batch_size=512):
        F.cross_entropy(ref(images), labels, reduction="sum").backward()
        total += len(labels)
    want_train = torch.cat([wb.grad.reshape(-1), wa.grad.reshape(-1)]).double() / total
    assert n == total == len(dm.dataset("train"))
    assert torch.allclose(g_train, want_train, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model1.parameters()) and all(p.requires_grad for p in model1.parameters())
    fl = torch.rand(len(dW), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = update_diagnostics(dW, grad_train=g_train, grad_fl=fl, grad_steps=ep.grad_mean, grad_snr=ep.grad_snr,
                             adam_ratio_end=res.adam_ratio, adam_ratio_start=res.epoch(1).adam_ratio, w_prev=w1)
    ad = np.abs(dW)
    for key, x in (("grad_train", g_train), ("grad_fl", fl), ("grad_steps", ep.grad_mean), ("grad_snr", ep.grad_snr),
                   ("adam_ratio_end", res.adam_ratio), ("adam_ratio_start", res.epoch(1).adam_ratio),
                   ("w_prev", w1)):
        assert out[f"spearman_{key}"] == pytest.approx(spearmanr(ad, np.abs(x.numpy())).statistic, abs=1e-12), key
    for key, x in (("grad_train", g_train.numpy()), ("grad_steps", ep.grad_mean.numpy())):
        agree = counted = 0
        for j in range(len(dW)):
            if dW[j] != 0 and x[j] != 0:
                counted += 1
                agree += (dW[j] > 0) != (x[j] > 0)  # opposite signs: moved downhill
        assert out[f"n_signed_{key}"] == counted and out[f"downhill_{key}"] == pytest.approx(agree / counted)
    assert out["n_weights"] == len(dW) and out["n_moved"] == int((dW != 0).sum())
    assert out["downhill_grad_steps"] > 0.5  # a trained epoch moves weights downhill along its own steps


def test_gradient_snr_edge_cases_and_diagnostics_errors():
    # weight 0: constant nonzero gradient (std 0, mean != 0) -> inf; weight 1: never a gradient -> 0;
    # weight 2: +1, -1 -> mean 0 -> 0; weight 3: 1, 3 -> mean 2, std 1 -> 2
    G = torch.tensor([[0.3, 0.0, 1.0, 1.0], [0.3, 0.0, -1.0, 3.0]], dtype=torch.float64)
    snr = gradient_snr(G.sum(0), (G * G).sum(0), 2)
    assert snr[0] == math.inf and snr[1] == 0 and snr[2] == 0 and snr[3] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one step"):
        gradient_snr(G.sum(0), (G * G).sum(0), 0)
    with pytest.raises(ValueError, match="grad_train has 3 values"):
        update_diagnostics(np.ones(4), grad_train=np.ones(3))
    out = update_diagnostics(np.array([1.0, -2.0, 0.0, 3.0]), grad_train=np.array([-1.0, -1.0, 5.0, 0.0]))
    assert out["n_signed_grad_train"] == 2 and out["downhill_grad_train"] == 0.5
    assert math.isnan(update_diagnostics(np.ones(4), w_prev=np.arange(4.0))["spearman_w_prev"])  # constant |dW|


# ------------------------------------------------------------------------------------------------ refusals
def test_replay_settings_refuse_what_the_replay_does_not_reproduce():
    ok = {"trainer": {"max_epochs": 2, "accumulate_grad_batches": 1, "gradient_clip_val": None, "precision": None,
                      "devices": 1, "limit_train_batches": None}, "optimizer": None, "lr_scheduler": None}
    assert replay_settings(ok) == {"total_epochs": 2, "limit_train_batches": None, "accelerator": None}
    bad = [({"accumulate_grad_batches": 4}, "trainer.accumulate_grad_batches"),
           ({"gradient_clip_val": 1.0}, "trainer.gradient_clip_val"),
           ({"precision": "16-mixed"}, "trainer.precision"),
           ({"devices": 2}, "trainer.devices"),
           ({"max_steps": 10}, "trainer.max_steps"),
           ({"max_epochs": None}, "trainer.max_epochs"),
           ({"callbacks": [{"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging"}]},
            "trainer.callbacks")]
    for change, key in bad:
        cfg = copy.deepcopy(ok)
        cfg["trainer"].update(change)
        with pytest.raises(ReplayError, match=key.replace(".", r"\.")):
            replay_settings(cfg)
    with pytest.raises(ReplayError, match="optimizer"):
        replay_settings({**ok, "optimizer": {"class_path": "torch.optim.SGD"}})


def test_random_training_steps_are_refused(tmp_path):
    dm = _datamodule(tmp_path)
    model = ImageClassifier(backbone="hf_vit", num_classes=C, backbone_kwargs=dict(HF_KW, hidden_dropout_prob=0.2))
    with pytest.raises(ReplayError, match="dropout"):
        replay_fit(model, dm, 1, 1, limit_train_batches=1)
    aug = DigitsDataModule(batch_size=32, folds_path=str(tmp_path / "folds.json"), augment=True)
    with pytest.raises(ReplayError, match="augment"):
        replay_fit(_classifier("hf_vit"), aug, 1, 1, limit_train_batches=1)


# ------------------------------------------------------------------------------------------ the entry point
def test_optimizer_ground_truths_on_the_tiny_run(fit_run):
    run = fit_run("hf_vit")
    layout = run["layout"]
    cfg = {"trainer": {"max_epochs": EPOCHS, "limit_train_batches": LIMIT}}
    fl = torch.rand(2 * 16 * 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = optimizer_ground_truths(cfg, _datamodule(run["root"]), 2, checkpoint_path=layout.checkpoint,
                                  ffn_weights_path=layout.ffn_weights, sgd_lr=0.05, fl_grad=fl)
    assert out["optimizer"] == "adamw" and max(out["replay"]["max_diff"].values()) <= 1e-6
    w_sgd = out["sgd"]["weights"]
    assert set(w_sgd) == set(load_ffn_weights(layout.ffn_weights(1)))
    # the same SGD epoch run directly gives the same weights; the ground truth is |W_sgd(2) - W(1)|
    direct, _ = _replay(run, start=1, optimizer="sgd", sgd_lr=0.05)
    assert all(torch.equal(w_sgd[k], direct.epoch(2).ffn[k]) for k in w_sgd)
    w1 = load_ffn_weights(layout.ffn_weights(1))
    gt = out["ground_truth_sgd"]
    want = torch.cat([(w_sgd[k].double() - w1[k].double()).abs().reshape(-1) for k in ("W_bef", "W_aft")])
    assert torch.equal(gt.scores, want) and gt.optimizer == "sgd_momentum" and gt.epoch == 2
    for name in ("recorded", "sgd"):
        d = out["diagnostics"][name]
        assert {"spearman_grad_train", "spearman_grad_fl", "spearman_grad_snr", "downhill_grad_train"} <= set(d)
    assert "spearman_adam_ratio_end" in out["diagnostics"]["recorded"]
    assert "spearman_adam_ratio_end" not in out["diagnostics"]["sgd"]
    assert set(out["accuracy"]) == {"W(1)", "W(2)", "W_sgd(2)"}
    assert 0 <= out["sgd"]["train_acc"] <= 1 and set(out["replay"]["train_acc"]) == {1, 2}
    assert out["timing"]["total_s"] > 0 and "adamw" in out["summary"] and "sgd_momentum" in out["summary"]
    # a checkpoint that is not the weight file's epoch is refused
    with pytest.raises(ReplayMismatchError, match="is not the model of"):
        optimizer_ground_truths(cfg, _datamodule(run["root"]), 2, checkpoint_path=lambda e: layout.checkpoint(2),
                                ffn_weights_path=layout.ffn_weights, replay_recorded=False, train_grad=False,
                                eval_split=None)
