"""Importance-driven coverage (IDC, DeepImportance; Gerasimou et al., ICSE 2020) on activation tables.

Inputs are plain tables: ``train_activations [N_train, F]`` and ``test_activations [N_test, F]`` hold one value per
neuron (:mod:`vitfl.adequacy.activations`; several layers may be concatenated along F for the end-to-end mode), and
``importance [F]`` the neurons' importance (:func:`vitfl.adequacy.attribution.neuron_importance`, summed with sign over
the correctly classified training inputs).

Definition:

1. the important neurons are the top ``m`` by importance (ties: lower index first);
2. each important neuron j's training activations are clustered by k-means (``sklearn.cluster.KMeans``) with
   ``k_j`` in ``ks`` (default {2, 3, 4}) chosen by the silhouette score (``sklearn.metrics.silhouette_score``, on a
   random sample of ``silhouette_sample`` values when there are more), or a fixed ``n_clusters`` when
   ``use_silhouette=False``. The chosen ``k_j`` is the one whose centroids are used. A neuron with fewer distinct
   training values than a candidate k skips that k; a constant neuron has one centroid;
3. an input x covers the *combination* ``(c_1(x), ..., c_m(x))``, ``c_j(x)`` = index of the centroid of neuron j
   nearest to x's activation;
4. ``IDC(T) = |{combinations covered by T}| / prod_j k_j`` (the product of the *actual* per-neuron centroid
   counts). Covered combinations only accumulate, so IDC is monotone in the test set.

Published options (off by default; see ``docs/compat_settings.md``), as the original TensorFlow/Keras code of
DeepImportance (``coverages/idc.py``, ``quantizeSilhouette`` / ``limit_precision``) had them:

- ``drop_zero_activations``: the training activations that are exactly 0 are dropped before a neuron is
  clustered; a neuron left with fewer than 10 values gets the single centroid 0 (the published code did this for
  dense layers only, whose values are post-ReLU outputs; conv channels were spatial means and kept their zeros).
  ``True`` applies it to every column, a boolean sequence ``[F]`` to the columns marked True (e.g. the dense
  layers' columns of an end-to-end table). Test inputs are never filtered: a test activation 0 goes to its nearest
  centroid as in the published code;
- ``round_centroids``: centroids rounded to this many decimals (published: 2, ``round(c, 2)`` of a NumPy float,
  i.e. ``np.round``); two centroids that round to the same value both stay and both count in ``prod_j k_j``
  (the lower index is the nearest one), as the published combination total counted the rounded list.

Upstream bugs of the published PyTorch port that this module avoids (each has a test in
``tests/test_adequacy_idc.py``): the coverage call with train/test or activations/centroids swapped (here every
entry point is keyword-only or type-checked); the combination total multiplied up across calls instead of taken
from the centroids (here ``total_combinations`` is recomputed from the fitted centroids); the silhouette k ignored
in favour of a fixed ``n_cluster`` (here the k-means model with the chosen k is the one stored and used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

__all__ = ["NeuronClusters", "choose_k", "cluster_neuron", "nearest_centroids", "IDC", "idc_coverage",
           "PUBLISHED_MIN_NONZERO", "PUBLISHED_ROUND_DECIMALS"]

PUBLISHED_MIN_NONZERO = 10  # drop_zero_activations: fewer non-zero training values -> the single centroid 0
PUBLISHED_ROUND_DECIMALS = 2  # the published centroid precision


def _as_2d(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D table [inputs, neurons], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return a


@dataclass
class NeuronClusters:
    """k-means clusters of one neuron's training activations.

    ``neuron``: column in the activation table; ``centroids [k]`` sorted ascending; ``k = len(centroids)``;
    ``silhouette``: candidate k -> score (empty when k was fixed); ``n_dropped``: training values left out
    (exact zeros, with ``drop_zero_activations``)."""

    neuron: int
    centroids: np.ndarray
    silhouette: dict[int, float] = field(default_factory=dict)
    n_dropped: int = 0

    @property
    def k(self) -> int:
        return int(len(self.centroids))


def choose_k(values: np.ndarray, ks: Sequence[int] = (2, 3, 4), silhouette_sample: int = 1000, seed: int = 0,
             n_init: int = 10) -> tuple[int, dict[int, float], dict[int, KMeans]]:
    """The k in ``ks`` with the highest silhouette score of k-means on the 1-D ``values [N]``; returns
    (k, {k: score}, {k: fitted KMeans}). The score is computed on at most ``silhouette_sample`` values (random,
    seeded). Candidate k above the number of distinct values are skipped; with fewer than 2 distinct values k = 1."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    distinct = len(np.unique(values))
    cand = [int(k) for k in ks if 2 <= int(k) <= distinct and int(k) < len(values)]
    if not cand:
        return 1, {}, {}
    scores, models = {}, {}
    sample = min(silhouette_sample, len(values))
    for k in cand:
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(values)
        labels = km.labels_
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(values, labels, sample_size=sample if sample < len(values) else None,
                                           random_state=seed))
        models[k] = km
    if not scores:
        return 1, {}, {}
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores, models


def cluster_neuron(values, neuron: int = 0, ks: Sequence[int] = (2, 3, 4), use_silhouette: bool = True,
                   n_clusters: int = 2, silhouette_sample: int = 1000, seed: int = 0, n_init: int = 10,
                   drop_zero_activations: bool = False, round_centroids: int | None = None) -> NeuronClusters:
    """Cluster one neuron's training activations ``values [N]`` (see the module docstring for the two published
    options). KMeans runs single-threaded: 1-D k-means gains nothing from OpenMP threads, and loses much on a busy
    CPU."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("cannot cluster a neuron with no training activations")
    n_dropped = 0
    if drop_zero_activations:
        kept = values[values != 0]
        n_dropped = int(values.size - kept.size)
        if kept.size < PUBLISHED_MIN_NONZERO:
            return NeuronClusters(neuron, np.zeros(1), {}, n_dropped)
        values = kept
    with threadpool_limits(limits=1, user_api="openmp"):
        nc = _cluster_neuron(values, neuron, ks, use_silhouette, n_clusters, silhouette_sample, seed, n_init)
    nc.n_dropped = n_dropped
    if round_centroids is not None:
        nc.centroids = np.sort(np.round(nc.centroids, int(round_centroids)))
    return nc


def _cluster_neuron(values, neuron, ks, use_silhouette, n_clusters, silhouette_sample, seed, n_init):
    distinct = np.unique(values)
    if len(distinct) < 2:
        return NeuronClusters(neuron, distinct.copy())
    if use_silhouette:
        k, scores, models = choose_k(values, ks, silhouette_sample, seed, n_init)
        if k == 1:
            return NeuronClusters(neuron, np.array([values.mean()]))
        km = models[k]
    else:
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        k, scores = min(int(n_clusters), len(distinct)), {}
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(values[:, None])
    centroids = np.sort(km.cluster_centers_.reshape(-1))
    return NeuronClusters(neuron, centroids, scores)


def nearest_centroids(activations, centroids: Sequence[np.ndarray]) -> np.ndarray:
    """Index of the nearest centroid per input and important neuron.

    Args:
        activations: ``[N, m]`` activations of the m important neurons (column j belongs to ``centroids[j]``).
        centroids: m 1-D arrays, ``centroids[j] [k_j]``.

    Returns: ``[N, m]`` int64 (ties go to the lower centroid index)."""
    if not isinstance(centroids, (list, tuple)) or not all(np.ndim(c) == 1 for c in centroids):
        raise TypeError("centroids must be a list of 1-D arrays (one per important neuron); did you swap "
                        "activations and centroids?")
    acts = _as_2d(activations, "activations")
    if acts.shape[1] != len(centroids):
        raise ValueError(f"activations have {acts.shape[1]} columns but there are {len(centroids)} neurons' "
                         "centroids; did you swap activations and centroids?")
    out = np.empty(acts.shape, dtype=np.int64)
    for j, c in enumerate(centroids):
        c = np.asarray(c, dtype=np.float64)
        out[:, j] = np.abs(acts[:, j:j + 1] - c[None, :]).argmin(axis=1)
    return out


class IDC:
    """Importance-driven coverage as a stateful criterion: :meth:`fit` on the training table and importance,
    :meth:`update` with test tables (accumulating covered combinations), :meth:`coverage` in [0, 1].

    Args:
        m: number of important neurons.
        ks: candidate cluster counts for the silhouette choice.
        use_silhouette: choose each neuron's k by silhouette (else ``n_clusters`` for all).
        n_clusters: the fixed k when ``use_silhouette`` is off.
        silhouette_sample: largest sample the silhouette score is computed on.
        seed: seeds KMeans and the silhouette sample.
        n_init: KMeans restarts per k.
        drop_zero_activations: published option (off): drop exact-zero training activations before clustering
            (True: every column; a boolean sequence ``[F]``: the columns marked True, e.g. dense layers only).
        round_centroids: published option (None: off; published 2): round centroids to this many decimals.
    """

    name = "IDC"

    def __init__(self, m: int = 6, ks: Sequence[int] = (2, 3, 4), use_silhouette: bool = True, n_clusters: int = 2,
                 silhouette_sample: int = 1000, seed: int = 0, n_init: int = 10,
                 drop_zero_activations: bool | Sequence[bool] = False, round_centroids: int | None = None):
        if m < 1:
            raise ValueError(f"m (important neurons) must be >= 1, got {m}")
        if use_silhouette and (not ks or any(int(k) < 2 for k in ks)):
            raise ValueError(f"ks must be cluster counts >= 2, got {list(ks)}")
        if round_centroids is not None and (isinstance(round_centroids, bool) or int(round_centroids) != round_centroids
                                            or round_centroids < 0):
            raise ValueError(f"round_centroids must be None or a number of decimals >= 0, got {round_centroids!r}")
        if isinstance(drop_zero_activations, (bool, np.bool_)):
            drop = bool(drop_zero_activations)
        else:
            drop = np.asarray(drop_zero_activations)
            if drop.ndim != 1 or drop.dtype != np.bool_:
                raise ValueError("drop_zero_activations must be a bool or a 1-D boolean sequence, one entry per "
                                 f"neuron column; got {drop_zero_activations!r:.80}")
            drop = [bool(v) for v in drop]
        self.m, self.ks, self.use_silhouette = int(m), tuple(int(k) for k in ks), bool(use_silhouette)
        self.n_clusters, self.silhouette_sample, self.seed = int(n_clusters), int(silhouette_sample), int(seed)
        self.n_init = int(n_init)
        self.drop_zero_activations: bool | list[bool] = drop
        self.round_centroids = None if round_centroids is None else int(round_centroids)
        self.clusters: list[NeuronClusters] | None = None
        self.n_features: int | None = None
        self.covered: set[tuple[int, ...]] = set()
        self.n_inputs = 0

    # ---------------------------------------------------------------- fit
    def fit(self, *, train_activations, importance) -> "IDC":
        """Select the top-m neurons by ``importance [F]`` and cluster their ``train_activations [N, F]``.
        Keyword-only, so train and test tables cannot be swapped by position. Resets the covered set."""
        acts = _as_2d(train_activations, "train_activations")
        imp = np.asarray(torch.as_tensor(importance).detach().cpu(), dtype=np.float64).reshape(-1)
        if imp.size != acts.shape[1]:
            raise ValueError(f"importance has {imp.size} entries but the activation table has {acts.shape[1]} "
                             "neurons")
        if self.m > imp.size:
            raise ValueError(f"m = {self.m} important neurons requested but the layer(s) have {imp.size}")
        if len(acts) < 2:
            raise ValueError("IDC needs at least 2 training inputs to cluster")
        drop = self.drop_zero_activations
        if isinstance(drop, list) and len(drop) != acts.shape[1]:
            raise ValueError(f"drop_zero_activations has {len(drop)} entries but the activation table has "
                             f"{acts.shape[1]} neurons")
        order = np.lexsort((np.arange(imp.size), -imp))[: self.m]
        self.clusters = [cluster_neuron(acts[:, j], int(j), self.ks, self.use_silhouette, self.n_clusters,
                                        self.silhouette_sample, self.seed, self.n_init,
                                        drop_zero_activations=drop[j] if isinstance(drop, list) else drop,
                                        round_centroids=self.round_centroids) for j in order]
        self.n_features = acts.shape[1]
        self.reset()
        return self

    def _check_fitted(self) -> list[NeuronClusters]:
        if self.clusters is None:
            raise RuntimeError("IDC is not fitted: call fit(train_activations=..., importance=...) first")
        return self.clusters

    @property
    def neurons(self) -> np.ndarray:
        """Columns of the important neurons, most important first ``[m]``."""
        return np.array([c.neuron for c in self._check_fitted()], dtype=np.int64)

    @property
    def cluster_counts(self) -> list[int]:
        """The actual per-neuron centroid counts k_j."""
        return [c.k for c in self._check_fitted()]

    @property
    def centroids(self) -> list[np.ndarray]:
        return [c.centroids for c in self._check_fitted()]

    @property
    def total_combinations(self) -> int:
        """prod_j k_j, recomputed from the fitted centroids every time (never accumulated)."""
        return int(prod(self.cluster_counts))

    # ---------------------------------------------------------------- coverage
    def combinations(self, test_activations) -> np.ndarray:
        """``[N, m]`` nearest-centroid combination of each test input (``test_activations [N, F]``)."""
        clusters = self._check_fitted()
        acts = _as_2d(test_activations, "test_activations")
        if acts.shape[1] != self.n_features:
            raise ValueError(f"test_activations have {acts.shape[1]} neurons, the IDC was fitted on "
                             f"{self.n_features}")
        return nearest_centroids(acts[:, self.neurons], [c.centroids for c in clusters])

    def update(self, test_activations) -> None:
        """Add the combinations covered by ``test_activations [N, F]``."""
        combos = self.combinations(test_activations)
        self.covered.update(map(tuple, combos.tolist()))
        self.n_inputs += len(combos)

    def coverage(self) -> float:
        """|covered combinations| / prod_j k_j."""
        return len(self.covered) / self.total_combinations

    def reset(self) -> None:
        self.covered = set()
        self.n_inputs = 0

    def params(self) -> dict:
        """Every constructor option (JSON-serialisable), the published ones included."""
        return {"m": self.m, "ks": list(self.ks), "use_silhouette": self.use_silhouette,
                "n_clusters": self.n_clusters, "silhouette_sample": self.silhouette_sample, "seed": self.seed,
                "n_init": self.n_init, "drop_zero_activations": self.drop_zero_activations,
                "round_centroids": self.round_centroids}

    def summary(self) -> dict:
        """Coverage, the fitted clusters and the options that made them (``options``: :meth:`params`)."""
        clusters = self._check_fitted()
        return {"criterion": self.name, "coverage": self.coverage(), "covered": len(self.covered),
                "total_combinations": self.total_combinations, "neurons": self.neurons.tolist(),
                "k": self.cluster_counts, "centroids": [c.centroids.tolist() for c in clusters],
                "n_dropped": [c.n_dropped for c in clusters], "n_inputs": self.n_inputs, "options": self.params()}


def idc_coverage(*, train_activations, test_activations, importance, m: int = 6, ks: Sequence[int] = (2, 3, 4),
                 use_silhouette: bool = True, n_clusters: int = 2, silhouette_sample: int = 1000,
                 seed: int = 0, drop_zero_activations: bool | Sequence[bool] = False,
                 round_centroids: int | None = None) -> float:
    """IDC of ``test_activations [N_test, F]`` given ``train_activations [N_train, F]`` and ``importance [F]``
    (keyword-only: train and test cannot be swapped by position)."""
    idc = IDC(m, ks, use_silhouette, n_clusters, silhouette_sample, seed,
              drop_zero_activations=drop_zero_activations, round_centroids=round_centroids).fit(
        train_activations=train_activations, importance=importance)
    idc.update(test_activations)
    return idc.coverage()
