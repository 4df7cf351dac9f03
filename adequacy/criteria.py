"""Baseline coverage criteria on activation tables, after NeuraL-Coverage (Yuan et al., ICSE 2023, "Revisiting
Neuron Coverage for DNN Testing: A Layer-Wise and Distribution-Aware Criterion") and the papers it re-implements.

Every criterion is a :class:`Coverage` used like a torchmetrics metric::

    crit = KMNC(k=100).fit(train_activations)      # criteria that need the training distribution
    crit.update(test_batch_1); crit.update(test_batch_2)
    crit.coverage()                                 # a float; reset() starts over

Activations are one layer's table ``[N, F]`` (a tensor or array) or a dict ``{layer name: table}`` for several
layers (a criterion then counts over all of them, as NeuraL-Coverage does). 3-D outputs ``[N, T, F]`` are reduced
to the CLS token or the token mean (``token_reduction``), 4-D ``[N, C, H, W]`` to the channel means
(:func:`vitfl.adequacy.activations.reduce_output`). Let ``v_j(x)`` be neuron j's value for input x, ``lo_j`` / ``hi_j``
its minimum / maximum over the training inputs.

- **NC(t)** (DeepXplore): per input and layer, values min-max scaled over the layer's neurons; neuron j is covered
  when its scaled value > t for some input. NC = covered / neurons. (A constant row scales to 0.)
- **KMNC(k)** (DeepGauge): [lo_j, hi_j] cut into k equal sections; a section is covered when some input's value
  falls into it; KMNC = covered sections / (k * neurons). A value equal to lo_j is in section 1 (DeepGauge;
  NeuraL-Coverage's ``ceil`` drops it); neurons with hi_j = lo_j have no coverable section.
- **NBC** (DeepGauge): (|{j: some v_j < lo_j}| + |{j: some v_j > hi_j}|) / (2 * neurons).
- **SNAC** (DeepGauge): |{j: some v_j > hi_j}| / neurons.
- **TKNC(k)** (DeepGauge): j covered when it is among the k largest values of its layer for some input
  (ties: lower index). TKNC = covered / neurons.
- **TKNP(k)** (DeepGauge): the number of distinct patterns, a pattern being the tuple over layers of the *set* of
  each layer's top-k neurons (a count, not a ratio).
- **CC(t)** (TensorFuzz): inputs are kept as cluster seeds when their squared Euclidean distance to every kept
  seed of the layer exceeds t (the first input always is); CC = number of seeds over the layers (a count).
- **LSC(t)** (Kim et al., ICSE 2019): LSA(x) = -log KDE_c(v(x)), KDE_c = ``scipy.stats.gaussian_kde`` of the
  training values of x's class c, on the neurons whose training variance within every class is >= ``min_var``
  (Kim et al.; the same neurons serve DSC and MDSC), optionally only the ``max_dims`` most variable of them (a KDE
  needs more inputs per class than dimensions). Coverage = number
  of distinct buckets ``int(LSA / t)`` (NeuraL-Coverage's unbounded count).
- **DSC(t)** (Kim et al.): DSA(x) = ||v(x) - v(x_a)|| / min_{x_b in other classes} ||r - v(x_b)||, x_a the nearest
  training input of x's class; r = v(x) (NeuraL-Coverage, default) or v(x_a) (Kim et al.: ``reference="x_a"``);
  DSA = 1e-6 where the denominator is 0 (NeuraL-Coverage). Coverage = distinct buckets ``int(DSA / t)``.
- **MDSC(t)** (Kim et al., FSE 2020): MDSA(x) = sqrt((v - mu_c)^T Sigma_c^+ (v - mu_c)) with the class mean and
  the population covariance of the training values (pseudo-inverse, so singular covariances are defined);
  coverage = distinct buckets ``int(MDSA / t)``.
- **NLC** (NeuraL-Coverage): per layer the running population covariance Sigma of the test values;
  NLC = sum over layers of sum_{i,k} |Sigma_ik|. As in NeuraL-Coverage a batch that would lower a layer's value is
  not merged into that layer (``monotone=True``), so NLC never decreases.

For the surprise criteria the class of a test input is the ``labels`` passed to :meth:`Coverage.update` (the
predicted class, as Kim et al., or the true one, as NeuraL-Coverage: the caller chooses).
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from vitfl.core.registry import Registry
import torch
from scipy.spatial.distance import cdist
from scipy.stats import gaussian_kde

from vitfl.adequacy.activations import reduce_output

__all__ = ["Coverage", "NC", "KMNC", "NBC", "SNAC", "TKNC", "TKNP", "CC", "LSC", "DSC", "MDSC", "NLC",
           "CRITERIA", "register_criterion", "make_criterion", "DEFAULT_CRITERIA", "as_layers"]



def _table(a, token_reduction: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"activations must be a tensor or an array, got {type(a).__name__}")
    if a.ndim != 2:
        a = reduce_output(a, token_reduction)
    out = a.detach().cpu().double().numpy()
    if not np.isfinite(out).all():
        raise ValueError("activations hold NaN or inf values")
    return out


def as_layers(activations, token_reduction: str = "cls") -> dict[str, np.ndarray]:
    """``{layer: [N, F] float64 array}`` from one table or a dict of tables (all with the same N)."""
    if isinstance(activations, Mapping):
        layers = {str(k): _table(v, token_reduction) for k, v in activations.items()}
    else:
        layers = {"layer": _table(activations, token_reduction)}
    if not layers:
        raise ValueError("no activations given")
    ns = {len(v) for v in layers.values()}
    if len(ns) != 1:
        raise ValueError(f"every layer must hold the same inputs, got row counts {sorted(ns)}")
    return layers


#: every coverage criterion (IDC has its own module, it needs attributions); third-party criteria register under the
#: ``vitfl.coverage_criteria`` entry point
CRITERIA = Registry("coverage criterion", modules=("vitfl.adequacy.criteria",), entry_points="vitfl.coverage_criteria")


def register_criterion(name: str):
    """Class decorator: register a :class:`Coverage` subclass as criterion ``name``."""
    return CRITERIA.register(name)


class Coverage:
    """Base: ``fit(train)`` (a no-op unless the criterion needs the training distribution), ``update(batch)``,
    ``coverage()``, ``reset()``. Subclasses implement ``_fit``, ``_init_state``, ``_update``, ``coverage``."""

    name: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = False
    is_ratio: ClassVar[bool] = True  # a fraction in [0, 1]; False: a count (TKNP, CC, LSC, DSC, MDSC) or NLC's sum

    def __init__(self, token_reduction: str = "cls"):
        self.token_reduction = token_reduction
        self.sizes: dict[str, int] | None = None
        self.fitted = False

    # ---------------------------------------------------------------- public API
    def fit(self, train_activations, labels=None) -> "Coverage":
        layers = as_layers(train_activations, self.token_reduction)
        if len(next(iter(layers.values()))) < 1:
            raise ValueError(f"{self.name}: no training inputs")
        self.sizes = {k: v.shape[1] for k, v in layers.items()}
        self._fit(layers, None if labels is None else self._labels(labels, layers))
        self.fitted = True
        self.reset()
        return self

    def update(self, activations, labels=None) -> None:
        layers = as_layers(activations, self.token_reduction)
        if self.needs_fit and not self.fitted:
            raise RuntimeError(f"{self.name} needs the training distribution: call fit(train_activations) first")
        if self.sizes is None:
            self.sizes = {k: v.shape[1] for k, v in layers.items()}
            self.reset()
        got = {k: v.shape[1] for k, v in layers.items()}
        if got != self.sizes:
            raise ValueError(f"{self.name}: layers/neurons {got} differ from those it was set up with {self.sizes}")
        if len(next(iter(layers.values()))) == 0:
            return
        self._update(layers, None if labels is None else self._labels(labels, layers))

    def reset(self) -> None:
        if self.sizes is not None:
            self._init_state()

    def coverage(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n_neurons(self) -> int:
        if self.sizes is None:
            raise RuntimeError(f"{self.name} has seen no activations yet")
        return int(sum(self.sizes.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def params(self) -> dict:
        return {}

    # ---------------------------------------------------------------- to implement
    def _fit(self, layers: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        pass

    def _init_state(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, layers: dict[str, np.ndarray], labels: np.ndarray | None) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _labels(labels, layers) -> np.ndarray:
        lab = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1).astype(np.int64)
        n = len(next(iter(layers.values())))
        if len(lab) != n:
            raise ValueError(f"{n} inputs but {len(lab)} labels")
        return lab


# ================================================================================================ neuron criteria
class _NeuronSet(Coverage):
    """Criteria with one covered flag per neuron (and layer)."""

    def _init_state(self) -> None:
        self.covered = {k: np.zeros(n, dtype=bool) for k, n in self.sizes.items()}

    def coverage(self) -> float:
        return float(sum(c.sum() for c in self.covered.values()) / self.n_neurons)


@register_criterion("NC")
class NC(_NeuronSet):
    name = "NC"

    def __init__(self, threshold: float = 0.75, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        self.threshold = float(threshold)

    def params(self):
        return {"threshold": self.threshold}

    def _update(self, layers, labels):
        for k, v in layers.items():
            lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
            span = hi - lo
            scaled = np.divide(v - lo, span, out=np.zeros_like(v), where=span > 0)
            self.covered[k] |= (scaled > self.threshold).any(0)


class _RangeCriterion(Coverage):
    needs_fit = True

    def _fit(self, layers, labels):
        self.lo = {k: v.min(0) for k, v in layers.items()}
        self.hi = {k: v.max(0) for k, v in layers.items()}


@register_criterion("KMNC")
class KMNC(_RangeCriterion):
    name = "KMNC"

    def __init__(self, k: int = 100, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        if int(k) < 1:
            raise ValueError(f"KMNC needs k >= 1 sections, got {k}")
        self.k = int(k)

    def params(self):
        return {"k": self.k}

    def _init_state(self):
        self.covered = {name: np.zeros((n, self.k), dtype=bool) for name, n in self.sizes.items()}

    def _update(self, layers, labels):
        for name, v in layers.items():
            lo, hi = self.lo[name], self.hi[name]
            span = hi - lo
            ok = (span > 0) & (v >= lo) & (v <= hi)
            sec = np.ceil(np.divide(v - lo, span, out=np.zeros_like(v), where=span > 0) * self.k)
            sec = np.clip(sec, 1, self.k).astype(np.int64) - 1
            rows, cols = np.nonzero(ok)
            self.covered[name][cols, sec[rows, cols]] = True

    def coverage(self):
        return float(sum(c.sum() for c in self.covered.values()) / (self.n_neurons * self.k))


@register_criterion("NBC")
class NBC(_RangeCriterion):
    name = "NBC"

    def _init_state(self):
        self.lower = {k: np.zeros(n, dtype=bool) for k, n in self.sizes.items()}
        self.upper = {k: np.zeros(n, dtype=bool) for k, n in self.sizes.items()}

    def _update(self, layers, labels):
        for k, v in layers.items():
            self.lower[k] |= (v < self.lo[k]).any(0)
            self.upper[k] |= (v > self.hi[k]).any(0)

    def coverage(self):
        return float((sum(c.sum() for c in self.lower.values()) + sum(c.sum() for c in self.upper.values()))
                     / (2 * self.n_neurons))


@register_criterion("SNAC")
class SNAC(_RangeCriterion):
    name = "SNAC"

    def _init_state(self):
        self.upper = {k: np.zeros(n, dtype=bool) for k, n in self.sizes.items()}

    def _update(self, layers, labels):
        for k, v in layers.items():
            self.upper[k] |= (v > self.hi[k]).any(0)

    def coverage(self):
        return float(sum(c.sum() for c in self.upper.values()) / self.n_neurons)


def _topk(v: np.ndarray, k: int) -> np.ndarray:
    """``[N, min(k, F)]`` indices of each row's k largest values, ties to the lower index."""
    k = min(k, v.shape[1])
    return np.argsort(-v, axis=1, kind="stable")[:, :k]


@register_criterion("TKNC")
class TKNC(_NeuronSet):
    name = "TKNC"

    def __init__(self, k: int = 10, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        if int(k) < 1:
            raise ValueError(f"TKNC needs k >= 1, got {k}")
        self.k = int(k)

    def params(self):
        return {"k": self.k}

    def _update(self, layers, labels):
        for name, v in layers.items():
            self.covered[name][np.unique(_topk(v, self.k))] = True


@register_criterion("TKNP")
class TKNP(Coverage):
    name = "TKNP"
    is_ratio = False

    def __init__(self, k: int = 10, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        if int(k) < 1:
            raise ValueError(f"TKNP needs k >= 1, got {k}")
        self.k = int(k)

    def params(self):
        return {"k": self.k}

    def _init_state(self):
        self.patterns: set[tuple] = set()

    def _update(self, layers, labels):
        per_layer = [np.sort(_topk(v, self.k), axis=1) for v in layers.values()]
        for i in range(len(per_layer[0])):
            self.patterns.add(tuple(tuple(p[i].tolist()) for p in per_layer))

    def coverage(self):
        return float(len(self.patterns))


@register_criterion("CC")
class CC(Coverage):
    name = "CC"
    is_ratio = False

    def __init__(self, threshold: float = 10.0, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        self.threshold = float(threshold)

    def params(self):
        return {"threshold": self.threshold}

    def _init_state(self):
        self.seeds = {k: np.zeros((0, n)) for k, n in self.sizes.items()}

    def _update(self, layers, labels):
        for name, v in layers.items():
            seeds = list(self.seeds[name])
            arr = self.seeds[name]
            for x in v:
                if len(arr) == 0 or ((arr - x) ** 2).sum(1).min() > self.threshold:
                    seeds.append(x)
                    arr = np.asarray(seeds)
            self.seeds[name] = arr.reshape(-1, self.sizes[name])

    def coverage(self):
        return float(sum(len(s) for s in self.seeds.values()))


# ================================================================================================ surprise adequacy
class _Surprise(Coverage):
    """Surprise-adequacy coverage: buckets ``int(SA / threshold)`` of the test inputs' surprise, counted."""

    needs_fit = True
    uses_labels = True
    is_ratio = False

    def __init__(self, threshold: float = 1.0, min_var: float = 1e-5, max_dims: int | None = None,
                 token_reduction: str = "cls"):
        super().__init__(token_reduction)
        if threshold <= 0:
            raise ValueError(f"{self.name}: the bucket width (threshold) must be > 0, got {threshold}")
        self.threshold, self.min_var = float(threshold), float(min_var)
        self.max_dims = None if max_dims is None else int(max_dims)

    def params(self):
        return {"threshold": self.threshold, "min_var": self.min_var, "max_dims": self.max_dims}

    def _features(self, layers) -> np.ndarray:
        return np.concatenate([layers[k] for k in self.sizes], axis=1)[:, self.mask]

    def _fit(self, layers, labels):
        x = np.concatenate([layers[k] for k in self.sizes], axis=1)
        lab = np.zeros(len(x), dtype=np.int64) if labels is None else labels
        var = x.var(0)
        # Kim et al.: drop a neuron whose variance is below min_var within any class (a class KDE / covariance
        # would be degenerate along it)
        class_var = np.stack([x[lab == c].var(0) for c in np.unique(lab)])
        keep = np.flatnonzero((class_var >= self.min_var).all(0))
        if self.max_dims is not None and len(keep) > self.max_dims:
            keep = np.sort(keep[np.argsort(-var[keep], kind="stable")[: self.max_dims]])
        if len(keep) == 0:
            raise ValueError(f"{self.name}: no neuron has a training variance >= min_var = {self.min_var} in every "
                             "class")
        self.mask = keep
        x = x[:, keep]
        self.labels_seen = lab
        self.class_values = {int(c): x[self.labels_seen == c] for c in np.unique(self.labels_seen)}
        self._fit_classes()

    def _fit_classes(self) -> None:
        pass

    def _init_state(self):
        self.buckets: set[int] = set()
        self.values: list[float] = []

    def _class_of(self, labels, n) -> np.ndarray:
        if labels is None:
            if len(self.class_values) > 1:
                raise ValueError(f"{self.name} was fitted per class: pass the test inputs' labels to update()")
            return np.full(n, next(iter(self.class_values)), dtype=np.int64)
        unknown = set(np.unique(labels).tolist()) - set(self.class_values)
        if unknown:
            raise ValueError(f"{self.name}: no training inputs of class(es) {sorted(unknown)}")
        return labels

    def surprise(self, activations, labels=None) -> np.ndarray:
        """The surprise ``[N]`` of each input (without touching the covered buckets)."""
        if not self.fitted:
            raise RuntimeError(f"{self.name} needs the training distribution: call fit(train_activations) first")
        layers = as_layers(activations, self.token_reduction)
        n = len(next(iter(layers.values())))
        labels = None if labels is None else self._labels(labels, layers)
        return self._sa(self._features(layers), self._class_of(labels, n))

    def _sa(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, layers, labels):
        n = len(next(iter(layers.values())))
        sa = self._sa(self._features(layers), self._class_of(labels, n))
        sa = sa[np.isfinite(sa)]
        self.values.extend(sa.tolist())
        self.buckets.update(int(s) for s in (sa / self.threshold).tolist())

    def coverage(self):
        return float(len(self.buckets))


@register_criterion("LSC")
class LSC(_Surprise):
    name = "LSC"

    def _fit_classes(self):
        self.kdes = {}
        for c, x in self.class_values.items():
            if len(x) <= x.shape[1]:
                raise ValueError(f"LSC: class {c} has {len(x)} training inputs for a {x.shape[1]}-dimensional KDE; "
                                 "a Gaussian KDE needs more inputs than dimensions: set max_dims lower")
            try:
                self.kdes[c] = gaussian_kde(x.T)
            except np.linalg.LinAlgError as e:
                raise ValueError(f"LSC: the training activations of class {c} have a singular covariance ({e}); "
                                 "set max_dims lower or min_var higher") from None

    def _sa(self, x, labels):
        out = np.empty(len(x))
        for c in np.unique(labels):
            idx = labels == c
            out[idx] = -self.kdes[int(c)].logpdf(x[idx].T)
        return out


@register_criterion("DSC")
class DSC(_Surprise):
    name = "DSC"

    def __init__(self, threshold: float = 0.1, min_var: float = 1e-5, max_dims: int | None = None,
                 reference: str = "x", token_reduction: str = "cls"):
        super().__init__(threshold, min_var, max_dims, token_reduction)
        if reference not in ("x", "x_a"):
            raise ValueError(f"DSC reference must be 'x' (NeuraL-Coverage) or 'x_a' (Kim et al.), got {reference!r}")
        self.reference = reference

    def params(self):
        return {**super().params(), "reference": self.reference}

    def _fit_classes(self):
        if len(self.class_values) < 2:
            raise ValueError("DSC needs training inputs of at least 2 classes (pass their labels to fit)")

    def _sa(self, x, labels):
        out = np.empty(len(x))
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            same = self.class_values[int(c)]
            other = np.concatenate([v for k, v in self.class_values.items() if k != int(c)])
            d_same = cdist(x[idx], same)
            a = d_same.argmin(1)
            dist_a = d_same[np.arange(len(idx)), a]
            ref = x[idx] if self.reference == "x" else same[a]
            dist_b = cdist(ref, other).min(1)
            out[idx] = np.where(dist_b > 0, dist_a / np.where(dist_b > 0, dist_b, 1.0), 1e-6)
        return out


@register_criterion("MDSC")
class MDSC(_Surprise):
    name = "MDSC"

    def _fit_classes(self):
        self.means, self.precisions = {}, {}
        for c, x in self.class_values.items():
            self.means[c] = x.mean(0)
            cov = np.atleast_2d(np.cov(x, rowvar=False, ddof=0))
            self.precisions[c] = np.linalg.pinv(cov, hermitian=True)

    def _sa(self, x, labels):
        out = np.empty(len(x))
        for c in np.unique(labels):
            idx = labels == c
            d = x[idx] - self.means[int(c)]
            out[idx] = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, self.precisions[int(c)], d), 0.0))
        return out


# ================================================================================================ NLC
@register_criterion("NLC")
class NLC(Coverage):
    name = "NLC"
    is_ratio = False

    def __init__(self, monotone: bool = True, token_reduction: str = "cls"):
        super().__init__(token_reduction)
        self.monotone = bool(monotone)

    def params(self):
        return {"monotone": self.monotone}

    def _init_state(self):
        self.count = {k: 0 for k in self.sizes}
        self.mean = {k: np.zeros(n) for k, n in self.sizes.items()}
        self.cov = {k: np.zeros((n, n)) for k, n in self.sizes.items()}

    @staticmethod
    def _merge(n0, mu0, cov0, x):
        """Population mean/covariance of the union of n0 seen rows (mu0, cov0) and the rows of ``x``."""
        n1 = len(x)
        mu1 = x.mean(0)
        d = x - mu1
        cov1 = d.T @ d / n1
        w = n1 / (n0 + n1)
        delta = (mu0 - mu1)[:, None]
        cov = cov0 * (1 - w) + cov1 * w + w * (1 - w) * (delta @ delta.T)
        return n0 + n1, mu0 * (1 - w) + mu1 * w, cov

    def _update(self, layers, labels):
        for k, x in layers.items():
            n, mu, cov = self._merge(self.count[k], self.mean[k], self.cov[k], x)
            if not self.monotone or np.abs(cov).sum() > np.abs(self.cov[k]).sum():
                self.count[k], self.mean[k], self.cov[k] = n, mu, cov

    def coverage(self):
        return float(sum(np.abs(c).sum() for c in self.cov.values()))



#: NeuraL-Coverage's hyper-parameters where it states them; the surprise bucket widths suit small layers
DEFAULT_CRITERIA: dict[str, dict] = {
    "NC": {"threshold": 0.75}, "KMNC": {"k": 100}, "NBC": {}, "SNAC": {}, "TKNC": {"k": 10}, "TKNP": {"k": 10},
    "CC": {"threshold": 10.0}, "LSC": {"threshold": 1.0, "max_dims": 10}, "DSC": {"threshold": 0.1},
    "MDSC": {"threshold": 1.0}, "NLC": {},
}


def make_criterion(name: str, **params) -> Coverage:
    """A criterion by name (``NC``, ``KMNC``, ... case-insensitive) with its parameters."""
    key = name.upper()
    if key not in CRITERIA:
        raise ValueError(f"unknown coverage criterion {name!r}; known: {', '.join(CRITERIA.names())} (and IDC)")
    return CRITERIA.get(key)(**params)
