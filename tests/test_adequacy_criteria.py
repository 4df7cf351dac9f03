"""Baseline criteria (adequacy/criteria.py): hand-computed values on a tiny table (NC, KMNC, NBC, SNAC, TKNC, TKNP,
CC) and a direct numpy computation for the surprise criteria and NLC."""
import numpy as np
import pytest
import torch

from vitfl.adequacy.criteria import CC, DSC, KMNC, LSC, MDSC, NBC, NC, NLC, SNAC, TKNC, TKNP, make_criterion

# training table: 3 neurons, lo = [0, 0, 0], hi = [2, 4, 8]
TRAIN = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0], [2.0, 4.0, 8.0]])
# test table
TEST = np.array([[1.0, 5.0, -1.0], [0.5, 1.0, 8.0]])


def test_nc_hand():
    # row 1 scaled over the layer: [2/6, 1, 0] -> neuron 1; row 2: [0, 0.5/7.5, 1] -> neuron 2
    c = NC(threshold=0.75)
    c.update(TEST)
    assert c.coverage() == pytest.approx(2 / 3)
    assert c.covered["layer"].tolist() == [False, True, True]
    c2 = NC(threshold=0.3)
    c2.update(TEST)  # 1/3 > 0.3 covers neuron 0 too
    assert c2.coverage() == 1.0


def test_kmnc_hand():
    # k = 4: neuron 0 sections of 0.5: 1.0 -> 2, 0.5 -> 1; neuron 1 sections of 1: 5 out, 1.0 -> 1;
    # neuron 2 sections of 2: -1 out, 8 -> 4. 4 of 12 sections.
    c = KMNC(k=4).fit(TRAIN)
    c.update(TEST)
    assert c.coverage() == pytest.approx(4 / 12)
    assert c.covered["layer"].astype(int).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    c.update(np.array([[0.0, 0.0, 0.0]]))  # the lower bound itself is in section 1 (DeepGauge)
    assert c.coverage() == pytest.approx(5 / 12)


def test_nbc_snac_hand():
    nbc = NBC().fit(TRAIN)
    nbc.update(TEST)  # lower: neuron 2 (-1 < 0); upper: neuron 1 (5 > 4); 8 is not > 8
    assert nbc.coverage() == pytest.approx(2 / 6)
    snac = SNAC().fit(TRAIN)
    snac.update(TEST)
    assert snac.coverage() == pytest.approx(1 / 3)
    snac.update(np.array([[2.5, 0.0, 9.0]]))
    assert snac.coverage() == 1.0


def test_tknc_tknp_hand():
    t1 = TKNC(k=1)
    t1.update(TEST)  # row tops: neuron 1, neuron 2
    assert t1.coverage() == pytest.approx(2 / 3)
    t2 = TKNC(k=2)
    t2.update(TEST)  # {0, 1} and {1, 2}
    assert t2.coverage() == 1.0
    p = TKNP(k=2)
    p.update(TEST)
    assert p.coverage() == 2
    p.update(np.array([[3.0, 2.0, 0.0]]))  # top-2 set {0, 1} again (order differs): no new pattern
    assert p.coverage() == 2
    p.update(np.array([[3.0, 0.0, 2.0]]))  # {0, 2}: new
    assert p.coverage() == 3


def test_multi_layer_counts_over_all_layers():
    c = NC(threshold=0.75)
    c.update({"a": TEST, "b": np.array([[0.0, 1.0], [0.0, 1.0]])})  # a: 2 of 3, b: 1 of 2
    assert c.coverage() == pytest.approx(3 / 5)
    p = TKNP(k=1)
    p.update({"a": TEST, "b": np.array([[0.0, 1.0], [0.0, 1.0]])})
    assert p.patterns == {((1,), (1,)), ((2,), (1,))}


def test_cc_hand():
    # squared distance of the two test rows: 0.25 + 16 + 81 = 97.25
    c = CC(threshold=10.0)
    c.update(TEST)
    assert c.coverage() == 2
    c = CC(threshold=100.0)
    c.update(TEST)
    assert c.coverage() == 1
    # the only seed is row 1 (row 2 was within 100 of it); the new input is 10.1^2 = 102.01 > 100 from it (and only
    # 0.25 + 16 + 1.21 from the unkept row 2, which must not count): a new seed
    c.update(np.array([[1.0, 5.0, -1.0 + 10.1]]))
    assert c.coverage() == 2


def test_3d_and_4d_outputs_are_reduced():
    x3 = torch.randn(4, 5, 3)
    c = NC()
    c.update(x3)
    ref = NC()
    ref.update(x3[:, 0])
    assert c.coverage() == ref.coverage()
    cm = NC(token_reduction="mean")
    cm.update(x3)
    refm = NC()
    refm.update(x3.mean(1))
    assert cm.coverage() == refm.coverage()
    x4 = torch.randn(4, 3, 2, 2)
    k = KMNC(k=3).fit(x4)
    k2 = KMNC(k=3).fit(x4.mean((2, 3)))
    k.update(x4)
    k2.update(x4.mean((2, 3)))
    assert k.coverage() == k2.coverage()


# ------------------------------------------------------------------ surprise criteria vs direct numpy
def _data(seed=0, n=60, d=3, classes=2):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    x = rng.standard_normal((n, d)) + y[:, None] * 2.0
    xt = rng.standard_normal((7, d)) + 1.0
    yt = np.array([0, 1, 0, 1, 1, 0, 1])
    return x, y, xt, yt


def _kde_logpdf_numpy(train, points):
    """Gaussian KDE with Scott's factor, written out: log mean_i N(p; x_i, factor^2 * Cov(train, ddof=1))."""
    n, d = train.shape
    factor = n ** (-1.0 / (d + 4))
    cov = np.cov(train, rowvar=False, ddof=1) * factor ** 2
    inv, (_, logdet) = np.linalg.inv(cov), np.linalg.slogdet(cov)
    out = []
    for p in points:
        diff = train - p
        q = np.einsum("ni,ij,nj->n", diff, inv, diff)
        logk = -0.5 * q - 0.5 * (d * np.log(2 * np.pi) + logdet)
        out.append(np.log(np.mean(np.exp(logk))))
    return np.array(out)


def test_lsc_against_numpy():
    x, y, xt, yt = _data()
    c = LSC(threshold=0.5).fit(x, labels=y)
    sa = c.surprise(xt, labels=yt)
    ref = np.array([-_kde_logpdf_numpy(x[y == yt[i]], xt[i:i + 1])[0] for i in range(len(xt))])
    np.testing.assert_allclose(sa, ref, rtol=1e-6)
    c.update(xt, labels=yt)
    assert c.coverage() == len({int(v / 0.5) for v in ref})


def test_lsc_max_dims_and_singular_error():
    x, y, xt, yt = _data(d=4)
    x[:, 3] = x[:, 0] * 2  # collinear: singular covariance
    with pytest.raises(ValueError, match="singular|max_dims"):
        LSC().fit(x, labels=y)
    x[:, 1] *= 1.5
    c = LSC(max_dims=2).fit(x, labels=y)  # the 2 most variable neurons: 3 (variance ~8) and 1 (~4.5)
    assert c.mask.tolist() == [1, 3]


def test_dsc_against_numpy():
    x, y, xt, yt = _data(seed=1)
    for reference in ("x", "x_a"):
        c = DSC(threshold=0.1, reference=reference).fit(x, labels=y)
        sa = c.surprise(xt, labels=yt)
        ref = []
        for p, lab in zip(xt, yt):
            same, other = x[y == lab], x[y != lab]
            da = np.linalg.norm(same - p, axis=1)
            xa = same[np.argmin(da)]
            r = p if reference == "x" else xa
            ref.append(da.min() / np.linalg.norm(other - r, axis=1).min())
        np.testing.assert_allclose(sa, ref, rtol=1e-10)
        c.update(xt, labels=yt)
        assert c.coverage() == len({int(v / 0.1) for v in ref})


def test_mdsc_against_numpy():
    x, y, xt, yt = _data(seed=2)
    c = MDSC(threshold=0.5).fit(x, labels=y)
    sa = c.surprise(xt, labels=yt)
    ref = []
    for p, lab in zip(xt, yt):
        xc = x[y == lab]
        mu = xc.mean(0)
        cov = (xc - mu).T @ (xc - mu) / len(xc)
        ref.append(np.sqrt((p - mu) @ np.linalg.inv(cov) @ (p - mu)))
    np.testing.assert_allclose(sa, ref, rtol=1e-8)
    c.update(xt, labels=yt)
    assert c.coverage() == len({int(v / 0.5) for v in ref})


def test_surprise_needs_labels_when_fitted_per_class():
    x, y, xt, yt = _data()
    c = MDSC().fit(x, labels=y)
    with pytest.raises(ValueError, match="labels"):
        c.update(xt)
    with pytest.raises(ValueError, match="class"):
        c.update(xt, labels=np.full(len(xt), 7))
    with pytest.raises(ValueError, match="2 classes"):
        DSC().fit(x)


def test_nlc_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 4))
    b = rng.standard_normal((15, 4)) * 3 + 1  # more spread: merging raises the covariance mass
    c = NLC()
    c.update(a)
    assert c.coverage() == pytest.approx(np.abs(np.cov(a, rowvar=False, ddof=0)).sum())
    c.update(b)
    both = np.concatenate([a, b])
    assert c.coverage() == pytest.approx(np.abs(np.cov(both, rowvar=False, ddof=0)).sum())
    before = c.coverage()
    c.update(np.tile(both.mean(0), (200, 1)))  # a batch at the mean shrinks the covariance: not merged
    assert c.coverage() == before
    free = NLC(monotone=False)
    free.update(both)
    free.update(np.tile(both.mean(0), (200, 1)))
    allrows = np.concatenate([both, np.tile(both.mean(0), (200, 1))])
    assert free.coverage() == pytest.approx(np.abs(np.cov(allrows, rowvar=False, ddof=0)).sum())


def test_monotone_and_reset():
    rng = np.random.default_rng(4)
    train = rng.standard_normal((50, 6))
    for name in ("NC", "KMNC", "NBC", "SNAC", "TKNC", "TKNP", "CC", "NLC"):
        c = make_criterion(name).fit(train)
        prev = 0.0
        for _ in range(4):
            c.update(rng.standard_normal((10, 6)) * 2)
            assert c.coverage() >= prev
            prev = c.coverage()
        c.reset()
        assert c.coverage() == 0.0


def test_bad_input_raises():
    with pytest.raises(RuntimeError, match="fit"):
        KMNC().update(TEST)
    c = KMNC().fit(TRAIN)
    with pytest.raises(ValueError, match="neurons"):
        c.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        NC().update(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="unknown coverage criterion"):
        make_criterion("XYZ")
