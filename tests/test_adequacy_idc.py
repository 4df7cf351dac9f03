"""IDC (adequacy/idc.py): known-by-construction toy model, silhouette k, monotonicity, and the three upstream bugs
of the published PyTorch port (each test below fails on an implementation that has the bug)."""
import numpy as np
import pytest
import torch
from torch import nn

from vitfl.adequacy.attribution import neuron_importance
from vitfl.adequacy.idc import IDC, choose_k, cluster_neuron, idc_coverage, nearest_centroids


def _clustered(centres, n_per, rng, spread=0.05):
    return np.concatenate([c + spread * rng.standard_normal(n_per) for c in centres])


class Toy(nn.Module):
    """x [N, 6] -> hidden = x (identity Linear, the measured layer) -> logits [h0 + h1, -(h0 + h1)]."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(6))
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.weight[0, :2] = 1.0
            self.out.weight[1, :2] = -1.0

    def forward(self, x):
        return self.out(self.hidden(x))


def test_toy_model_important_neurons_and_clusters_known_by_construction():
    rng = np.random.default_rng(0)
    n = 240
    x = np.abs(rng.standard_normal((n, 6))) * 3  # noise neurons 2..5 (zero weight -> zero importance)
    x[:, 0] = rng.permutation(_clustered([1.0, 5.0, 9.0], n // 3, rng))  # 3 clusters
    x[:, 1] = rng.permutation(_clustered([2.0, 8.0], n // 2, rng))  # 2 clusters
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.zeros(n, dtype=torch.long)  # h0 + h1 > 0: every input is class 0, correctly classified
    model = Toy().eval()
    imp = neuron_importance(model, "hidden", x, y, method="ig", n_steps=16)["hidden"]
    # linear model, zero baseline: IG_j(x) = w_j x_j exactly, so I_j = sum_x x_j for j < 2 and 0 otherwise
    np.testing.assert_allclose(imp[:2].numpy(), x[:, :2].sum(0).numpy(), rtol=1e-4)
    assert torch.all(imp[2:].abs() < 1e-4)

    idc = IDC(m=2).fit(train_activations=x, importance=imp)
    assert sorted(idc.neurons.tolist()) == [0, 1]
    counts = dict(zip(idc.neurons.tolist(), idc.cluster_counts))
    assert counts == {0: 3, 1: 2}
    assert idc.total_combinations == 6
    cents = dict(zip(idc.neurons.tolist(), idc.centroids))
    np.testing.assert_allclose(cents[0], [1, 5, 9], atol=0.05)
    np.testing.assert_allclose(cents[1], [2, 8], atol=0.05)

    test = torch.zeros(5, 6)
    test[:, 0] = torch.tensor([1.1, 4.8, 9.2, 1.0, 5.1])
    test[:, 1] = torch.tensor([2.0, 2.1, 7.9, 1.9, 8.2])
    idc.update(test)  # combos: (1,2) (5,2) (9,8) (1,2) (5,8) -> 4 distinct of 6
    assert len(idc.covered) == 4
    assert idc.coverage() == pytest.approx(4 / 6)


@pytest.mark.parametrize("k_true", [2, 3, 4])
def test_silhouette_picks_the_generating_k(k_true):
    rng = np.random.default_rng(k_true)
    values = _clustered(np.arange(k_true) * 10.0, 60, rng, spread=0.5)
    k, scores, models = choose_k(values, ks=(2, 3, 4))
    assert k == k_true
    assert set(scores) == {2, 3, 4}
    assert models[k].n_clusters == k_true


def test_silhouette_on_a_sample_for_large_sets():
    rng = np.random.default_rng(1)
    values = _clustered([0.0, 10.0, 20.0], 2000, rng, spread=0.5)
    nc = cluster_neuron(values, ks=(2, 3, 4), silhouette_sample=300)
    assert nc.k == 3


def test_monotone_when_inputs_are_added():
    rng = np.random.default_rng(2)
    train = rng.standard_normal((200, 8))
    idc = IDC(m=4).fit(train_activations=train, importance=rng.standard_normal(8))
    test = rng.standard_normal((300, 8)) * 1.5
    previous = 0.0
    for chunk in np.array_split(test, 15):
        idc.update(chunk)
        assert idc.coverage() >= previous
        previous = idc.coverage()
    whole = IDC(m=4).fit(train_activations=train, importance=idc_importance(idc, 8))
    whole.update(test)
    assert whole.coverage() == pytest.approx(previous)
    assert 0 < previous <= 1


def idc_importance(idc, f):
    imp = np.zeros(f)
    imp[idc.neurons] = np.arange(len(idc.neurons), 0, -1)
    return imp


# ------------------------------------------------------------------ upstream bug 1: argument order
def _two_group_tables():
    rng = np.random.default_rng(3)
    train = np.stack([_clustered([0.0, 10.0], 50, rng), rng.permutation(_clustered([0.0, 10.0], 50, rng))], 1)
    test = np.array([[0.1, 0.2], [0.0, -0.1], [0.2, 0.1]])  # all three in combination (0, 0)
    return train, test, np.array([1.0, 1.0])


def test_bug_argument_order_train_test_not_swapped():
    train, test, imp = _two_group_tables()
    cov = idc_coverage(train_activations=train, test_activations=test, importance=imp, m=2)
    # 4 combinations; the training set covers all 4, the test set one. A swapped call would report 1.0.
    assert cov == pytest.approx(1 / 4)
    assert idc_coverage(train_activations=train, test_activations=train, importance=imp, m=2) == 1.0
    with pytest.raises(TypeError):
        idc_coverage(train, test, imp)  # positional use (where a swap could hide) is refused
    with pytest.raises(TypeError):
        IDC(m=2).fit(train, imp)


def test_bug_argument_order_activations_centroids_not_swapped():
    acts = np.array([[0.9, 5.0], [0.1, 2.4], [3.0, 4.0]])
    cents = [np.array([0.0, 1.0, 3.0]), np.array([2.0, 5.0])]
    np.testing.assert_array_equal(nearest_centroids(acts, cents), [[1, 1], [0, 0], [2, 1]])
    with pytest.raises(TypeError, match="swap"):
        nearest_centroids(cents, acts)
    with pytest.raises(ValueError, match="swap"):
        nearest_centroids(acts.T, cents)


# ------------------------------------------------------------------ upstream bug 2: the combination total
def test_bug_total_is_product_of_actual_cluster_counts_and_not_accumulated():
    rng = np.random.default_rng(4)
    train = np.stack([rng.permutation(_clustered(np.arange(k) * 10.0, 120 // k, rng, 0.3)) for k in (2, 3, 4)], 1)
    imp = np.array([3.0, 2.0, 1.0])
    idc = IDC(m=3).fit(train_activations=train, importance=imp)
    assert idc.cluster_counts == [2, 3, 4]
    assert idc.total_combinations == 24  # not 2**3 (fixed n_cluster) nor 4**3
    idc.update(train[:10])
    first = idc.coverage()
    idc.update(train[:10])
    idc.coverage()
    assert idc.total_combinations == 24  # not multiplied again on later calls
    assert idc.coverage() == first == len(idc.covered) / 24
    idc.update(train)
    assert idc.coverage() == pytest.approx(1.0)  # every combination reachable: the denominator is right


# ------------------------------------------------------------------ upstream bug 3: silhouette k ignored
def test_bug_silhouette_k_is_really_used():
    rng = np.random.default_rng(5)
    values = rng.permutation(_clustered([0.0, 10.0, 20.0, 30.0], 50, rng, 0.3))
    train = values[:, None]
    imp = np.array([1.0])
    sil = IDC(m=1, use_silhouette=True, n_clusters=2).fit(train_activations=train, importance=imp)
    assert sil.cluster_counts == [4]  # the fixed n_clusters=2 is ignored when silhouette is on
    np.testing.assert_allclose(sil.centroids[0], [0, 10, 20, 30], atol=0.2)
    sil.update(np.array([[0.0], [10.0], [20.0], [30.0]]))
    assert sil.coverage() == 1.0
    fixed = IDC(m=1, use_silhouette=False, n_clusters=2).fit(train_activations=train, importance=imp)
    assert fixed.cluster_counts == [2]


# ------------------------------------------------------------------ edge cases and bad input
def test_constant_neuron_has_one_centroid():
    nc = cluster_neuron(np.full(20, 3.0))
    assert nc.k == 1
    train = np.stack([np.full(30, 1.0), np.r_[np.zeros(15), np.ones(15) * 5]], 1)
    idc = IDC(m=2).fit(train_activations=train, importance=[2.0, 1.0])
    assert idc.total_combinations == 2


def test_bad_input_raises():
    train = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="importance has 2"):
        IDC(m=1).fit(train_activations=train, importance=[1.0, 2.0])
    with pytest.raises(ValueError, match="m = 5"):
        IDC(m=5).fit(train_activations=train, importance=[1.0, 2.0, 3.0])
    idc = IDC(m=2).fit(train_activations=train, importance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="fitted on 3"):
        idc.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        idc.update(np.full((2, 3), np.nan))
    with pytest.raises(RuntimeError, match="not fitted"):
        IDC(m=1).coverage()


# ------------------------------------------------------------------ the published TF options
def published_quantize(train: np.ndarray, imp: np.ndarray, m: int, drop_zero, round_to, kmeans_centres):
    """The original DeepImportance ``quantizeSilhouette`` + ``limit_precision`` re-derived in plain numpy: the top-m
    columns by importance; per column the non-zero training values (where ``drop_zero[j]``); fewer than 10 ->
    [0]; else ``kmeans_centres(values)``; every centroid rounded with ``np.round(c, round_to)``."""
    out = []
    for j in np.argsort(-imp, kind="stable")[:m]:
        v = train[:, j]
        if drop_zero[j]:
            v = v[v != 0]
            if len(v) < 10:
                out.append([0.0])
                continue
        c = list(kmeans_centres(v))
        out.append([float(np.round(x, round_to)) if round_to is not None else float(x) for x in c])
    return list(np.argsort(-imp, kind="stable")[:m]), out


def published_coverage(test: np.ndarray, neurons, quantized) -> float:
    """``measure_idc``: per input the closest centroid value of each neuron (first minimum in list order), the set
    of combinations over the product of the list lengths."""
    covered = set()
    for x in test:
        covered.add(tuple(min(q, key=lambda c: abs(c - x[j])) for j, q in zip(neurons, quantized)))
    return len(covered) / int(np.prod([len(q) for q in quantized]))


def _kmeans_3(v):
    from sklearn.cluster import KMeans

    return np.sort(KMeans(n_clusters=3, n_init=10, random_state=0).fit(v.reshape(-1, 1)).cluster_centers_.ravel())


@pytest.mark.parametrize("seed", range(3))
def test_drop_zero_and_round_against_published_rederivation(seed):
    rng = np.random.default_rng(10 + seed)
    n, f, m = 240, 8, 4
    train = np.maximum(rng.standard_normal((n, f)) * 2 + 0.3, 0)  # post-ReLU: ~45 % exact zeros
    train[rng.permutation(n)[:n - 9], 2] = 0.0  # column 2: only 9 non-zero values -> the single centroid 0
    test = np.maximum(rng.standard_normal((150, f)) * 2 + 0.3, 0)
    imp = rng.permutation(f).astype(float)
    imp[2] = f + 1.0  # column 2 is the most important
    assert (train == 0).mean() > 0.3
    kw = dict(m=m, use_silhouette=False, n_clusters=3)
    idc = IDC(**kw, drop_zero_activations=True, round_centroids=2).fit(train_activations=train, importance=imp)
    neurons, quantized = published_quantize(train, imp, m, [True] * f, 2, _kmeans_3)
    assert idc.neurons.tolist() == [int(j) for j in neurons]
    for got, ref in zip(idc.centroids, quantized):
        np.testing.assert_array_equal(got, np.sort(ref))
    assert idc.centroids[0].tolist() == [0.0] and idc.cluster_counts[0] == 1
    assert idc.clusters[1].n_dropped == int((train[:, neurons[1]] == 0).sum()) > 0
    idc.update(test)
    assert idc.coverage() == published_coverage(test, neurons, quantized)
    # the options really change the result on this data (else the test above could not fail on them)
    plain = IDC(**kw).fit(train_activations=train, importance=imp)
    assert any(len(a) != len(b) or not np.allclose(a, b) for a, b in zip(plain.centroids, idc.centroids))
    s = idc.summary()
    assert s["options"]["drop_zero_activations"] is True and s["options"]["round_centroids"] == 2
    assert plain.summary()["options"]["drop_zero_activations"] is False
    assert plain.summary()["options"]["round_centroids"] is None


def test_drop_zero_per_column_mask():
    rng = np.random.default_rng(7)
    train = np.maximum(rng.standard_normal((200, 3)) + 0.2, 0)
    imp = np.array([3.0, 2.0, 1.0])
    mask = [True, False, True]
    idc = IDC(m=3, use_silhouette=False, n_clusters=3, drop_zero_activations=mask).fit(
        train_activations=train, importance=imp)
    neurons, quantized = published_quantize(train, imp, 3, mask, None, _kmeans_3)
    for got, ref in zip(idc.centroids, quantized):
        np.testing.assert_allclose(got, np.sort(ref), rtol=0, atol=1e-12)
    assert [c.n_dropped for c in idc.clusters] == [int((train[:, 0] == 0).sum()), 0, int((train[:, 2] == 0).sum())]
    assert idc.summary()["options"]["drop_zero_activations"] == mask
    with pytest.raises(ValueError, match="drop_zero_activations has 2 entries"):
        IDC(m=1, drop_zero_activations=[True, False]).fit(train_activations=train, importance=imp)
    with pytest.raises(ValueError, match="boolean sequence"):
        IDC(m=1, drop_zero_activations=[1, 0, 1])


def test_drop_zero_on_known_clusters_and_silhouette():
    # non-zero values in 3 tight groups; 40 % exact zeros would be a 4th group if kept
    rng = np.random.default_rng(8)
    groups = np.repeat([2.0, 5.0, 8.0], 40) + 0.01 * rng.standard_normal(120)
    v = rng.permutation(np.r_[groups, np.zeros(80)])
    nc = cluster_neuron(v, drop_zero_activations=True)
    nz = v[v != 0]
    means = np.sort([nz[np.abs(nz - c) < 1].mean() for c in (2.0, 5.0, 8.0)])
    assert nc.k == 3 and nc.n_dropped == 80
    np.testing.assert_allclose(nc.centroids, means, rtol=0, atol=1e-12)
    kept = cluster_neuron(v)
    assert kept.k == 4 and kept.centroids[0] == pytest.approx(0.0, abs=1e-12)


def test_round_centroids_on_known_clusters():
    # centres 1.004 (-> 1.0) and 1.5 (-> 1.5); 3.0021 and 3.0049 (both -> 3.0); symmetric groups: mean = centre
    d = np.array([-1e-4, 1e-4])
    col0 = np.r_[np.repeat(1.004 + d, 30), np.repeat(1.5 + d, 30)]
    col1 = np.r_[np.repeat(3.0021 + d / 10, 30), np.repeat(3.0049 + d / 10, 30)]
    train = np.stack([col0, col1], 1)
    imp = np.array([2.0, 1.0])
    kw = dict(m=2, use_silhouette=False, n_clusters=2)
    plain = IDC(**kw).fit(train_activations=train, importance=imp)
    rounded = IDC(**kw, round_centroids=2).fit(train_activations=train, importance=imp)
    np.testing.assert_allclose(plain.centroids[0], [1.004, 1.5], atol=1e-9)
    np.testing.assert_array_equal(rounded.centroids[0], np.round([1.004, 1.5], 2))
    # equal after rounding: both kept, both counted in the total (as the published list length)
    np.testing.assert_array_equal(rounded.centroids[1], [3.0, 3.0])
    assert rounded.total_combinations == 4 and plain.total_combinations == 4
    # 1.251: nearer 1.004 than 1.5 unrounded (midpoint 1.252), nearer 1.5 than 1.0 rounded (midpoint 1.25)
    test = np.array([[1.251, 3.0049]])
    assert plain.combinations(test).tolist() == [[0, 1]]
    assert rounded.combinations(test).tolist() == [[1, 0]]
    ref_cov = published_coverage(np.r_[train, test], [0, 1], [list(np.round([1.004, 1.5], 2)), [3.0, 3.0]])
    rounded.update(np.r_[train, test])
    assert rounded.coverage() == ref_cov == 2 / 4
    assert idc_coverage(train_activations=train, test_activations=np.r_[train, test], importance=imp,
                        round_centroids=2, **kw) == ref_cov
    with pytest.raises(ValueError, match="round_centroids"):
        IDC(round_centroids=-1)
