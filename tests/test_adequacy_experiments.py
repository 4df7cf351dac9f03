"""RQ building blocks (adequacy/experiments.py), attacks (adequacy/attacks.py) and the config merge
(pipeline/adequacy.py) on a tiny LeNet-5 and a slice of the digits data."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from vitfl.adequacy.attacks import adversarial_examples
from vitfl.adequacy.experiments import (CoverageSuite, coverage_table, idc_by_mode, normalized_coverage_change,
                                  output_impartiality, perturb_pixels, prune_neurons, random_pixel_mask, rq1_pruning,
                                  stratified_sample, top_pixel_mask)
from vitfl.lightning_modules.cnn import LeNet5

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a busy shared CPU; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images[:300] / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - 0.3053) / 0.376
    return x, torch.tensor(d.target[:300])


@pytest.fixture(scope="module")
def lenet(digits):
    """A LeNet-5 fitted for a few full-batch steps (enough to be better than chance)."""
    torch.manual_seed(0)
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_output_impartiality_hand():
    assert output_impartiality([0, 1, 2, 3], 4) == pytest.approx(1.0)
    assert output_impartiality([2, 2, 2], 4) == pytest.approx(0.0)
    assert output_impartiality([0, 0, 1, 1], 4) == pytest.approx(math.log(2) / math.log(4))
    p = np.array([3, 1]) / 4
    assert output_impartiality([0, 0, 0, 1], 2) == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    with pytest.raises(ValueError):
        output_impartiality([], 3)


def test_normalized_coverage_change_hand():
    # Delta = [0.1, 0.3, -0.1]; max - min = 0.4
    np.testing.assert_allclose(normalized_coverage_change([0.6, 0.8, 0.4], 0.5), [0.25, 0.75, -0.25])
    np.testing.assert_allclose(normalized_coverage_change([0.5, 0.5], 0.5), [0.0, 0.0])


def test_stratified_sample_keeps_class_ratios():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_sample(y, 50, seed=0)
    assert len(idx) == 50 and len(set(idx)) == 50
    assert np.bincount(y[idx]).tolist() == [25, 15, 10]
    assert sorted(stratified_sample(y, 500, seed=0)) == list(range(100))


def test_pixel_masks_and_noise():
    attr = torch.zeros(2, 3, 4, 4)
    attr[0, 1, 2, 3] = -5.0  # |.| summed over channels: the largest
    attr[0, 0, 0, 0] = 2.0
    attr[1, 2, 1, 1] = 1.0
    m = top_pixel_mask(attr, frac=0.1)  # ceil(1.6) = 2 pixels per input
    assert m.sum((1, 2)).tolist() == [2, 2]
    assert m[0, 2, 3] and m[0, 0, 0] and m[1, 1, 1]
    rnd = random_pixel_mask(5, 4, 4, 0.02, np.random.default_rng(0))
    assert rnd.sum((1, 2)).tolist() == [1] * 5  # at least one pixel
    x = torch.zeros(2, 3, 4, 4)
    out = perturb_pixels(x, m, sigma=0.5, clip_values=(-1.0, 1.0), generator=np.random.default_rng(0))
    changed = (out != x).any(1)
    assert torch.equal(changed & ~m, torch.zeros_like(m))
    assert out.min() >= -1 and out.max() <= 1


def test_prune_neurons_zeroes_2d_4d_3d():
    lin, conv, tok = nn.Identity(), nn.Identity(), nn.Identity()
    with prune_neurons(lin, [1]):
        assert lin(torch.ones(2, 3))[:, 1].abs().sum() == 0
    with prune_neurons(conv, [0, 2]):
        out = conv(torch.ones(2, 3, 4, 4))
        assert out[:, [0, 2]].abs().sum() == 0 and out[:, 1].sum() == 32
    with prune_neurons(tok, [3]):
        out = tok(torch.ones(2, 5, 4))
        assert out[..., 3].abs().sum() == 0 and out[..., :3].sum() == 30
    assert lin(torch.ones(1, 3)).sum() == 3  # hook removed


def test_coverage_table_every_criterion_and_zero_delta_on_same_inputs(lenet, digits):
    x, y = digits
    df = coverage_table(lenet, "classifier.3", x[:200], x[200:], x[200:], train_labels=y[:200],
                        idc={"m": 4}, attr_kw={})
    assert df["criterion"].tolist() == ["NC", "KMNC", "NBC", "SNAC", "TKNC", "TKNP", "CC", "LSC", "DSC", "MDSC",
                                        "NLC", "IDC"]
    assert (df["delta"] == 0).all()
    ratios = df[df["kind"] == "ratio"]
    assert ((ratios["clean"] >= 0) & (ratios["clean"] <= 1)).all()
    assert df.attrs["method"] == "lrp"


def test_suite_adversarial_changes_coverage(lenet, digits):
    x, y = digits
    suite = CoverageSuite(lenet, x[:200], y[:200], "classifier.3", criteria={"SNAC": {}, "NBC": {}},
                          idc={"m": 4}, progress=False)
    adv = adversarial_examples(lenet, x[200:], y[200:], method="fgsm", eps=0.3)
    clean, bad = suite.evaluate(x[200:]), suite.evaluate(adv)
    assert set(clean) == {"SNAC", "NBC", "IDC"}
    assert bad["NBC"] >= clean["NBC"] and bad != clean


def test_idc_by_mode_rows(lenet, digits):
    x, y = digits
    common = dict(m=3, method="gradxact", progress=False)
    assert len(idc_by_mode(lenet, x[:150], y[:150], x[150:], y[150:], mode="layer", **common)) == 1
    lbl = idc_by_mode(lenet, x[:150], y[:150], x[150:], y[150:], mode="layer_by_layer", **common)
    assert lbl["layers"].tolist() == ["features.1", "features.4", "classifier.1", "classifier.3"]
    e2e = idc_by_mode(lenet, x[:150], y[:150], x[150:], y[150:], mode="end_to_end", **common)
    assert len(e2e) == 1 and e2e["layers"].iloc[0].count("+") == 3
    pc = idc_by_mode(lenet, x[:150], y[:150], x[150:], y[150:], mode="layer", per_class=True, **common)
    assert len(pc) >= 8 and (pc["IDC"] <= 1).all()
    with pytest.raises(ValueError, match="mode"):
        idc_by_mode(lenet, x, y, x, y, mode="bogus")


def test_rq1_structure(lenet, digits):
    x, y = digits
    res = rq1_pruning(lenet, x[:150], y[:150], x[150:], y[150:], layer="classifier.3", methods=("gradxact", "ig"),
                      ns=(2, 4), random_reps=3, progress=False, n_steps=8)
    s = res["summary"]
    assert set(s["method"]) == {"gradxact", "ig", "vote", "random"}
    assert s[s["method"] == "random"]["reps"].tolist() == [3, 3]
    d = res["detail"]
    assert ((d["drop"] - (d["acc_before"] - d["acc_after"])).abs() < 1e-12).all()


def test_fgsm_within_budget_and_range(lenet, digits):
    x, y = digits
    x = x[:32]
    lo, hi = float(x.min()), float(x.max())
    adv = adversarial_examples(lenet, x, y[:32], method="fgsm", eps=0.1)
    assert (adv - x).abs().max() <= 0.1 * (hi - lo) + 1e-5
    assert adv.min() >= lo - 1e-6 and adv.max() <= hi + 1e-6
    with pytest.raises(ValueError, match="unknown attack"):
        adversarial_examples(lenet, x, y[:32], method="deepfool")
    with pytest.raises(ValueError, match="eps"):
        adversarial_examples(lenet, x, y[:32], eps=3.0)


def test_build_config_merges_quick_and_flags(tmp_path):
    from vitfl.pipeline.adequacy import build_config

    base = tmp_path / "a.yaml"
    base.write_text("seed: 0\ndata: {name: digits, root: null}\nrq1: {ns: [6, 8], random_reps: 20}\n")
    quick = tmp_path / "q.yaml"
    quick.write_text("rq1: {random_reps: 5}\n")
    cfg = build_config([base], quick, {"root": "/data", "seed": 3, "layer": None})
    assert cfg["rq1"] == {"ns": [6, 8], "random_reps": 5}
    assert cfg["data"] == {"name": "digits", "root": "/data"}
    assert cfg["seed"] == 3 and "layer" not in cfg
    with pytest.raises(FileNotFoundError):
        build_config([tmp_path / "missing.yaml"])


@pytest.mark.slow
def test_rq1_script_quick_end_to_end(tmp_path):
    from pathlib import Path

    from vitfl.pipeline.adequacy import build_config, run_rq

    root = Path(__file__).resolve().parents[1] / "configs" / "adequacy"
    cfg = build_config([root / "default.yaml"], root / "quick.yaml")
    cfg["rq1"]["random_reps"] = 2
    out = run_rq("rq1", cfg, tmp_path / "adequacy", progress=False)
    names = {p.name for p in out["paths"]}
    assert {"rq1_pruning.csv", "rq1_pruning.md", "rq1_pruning.png", "rq1_pruning.pdf"} <= names
