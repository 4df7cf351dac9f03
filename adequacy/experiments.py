"""The test-adequacy experiments (DeepImportance's RQ1-5) and the coverage table of the main job.

Everything here takes a model (images -> logits), tensors and options, and returns pandas DataFrames; the
``report_*`` functions write them (CSV + Markdown tables, PNG + PDF plots, a JSON with the config and provenance)
under a directory the caller gives (a script passes ``RunStore(run_dir).adequacy_dir``). The file names below that
directory are named in :data:`ARTIFACTS`, the one place that does.

- :class:`CoverageSuite`: every criterion (IDC and the baselines of :mod:`vitfl.adequacy.criteria`) set up once on a
  model, its measured layer(s) and training data; ``evaluate(x)`` gives each criterion's coverage of a test suite.
- RQ1 :func:`rq1_pruning`: zero the top-n important neurons (per attribution method, and by rank voting) vs n
  random neurons (seeded, repeated); accuracy drop on the test pool.
- RQ2 :func:`rq2_diversity`: U_O (the test pool), U_I (Gaussian noise on the top ``frac`` pixels by input
  attribution), U_R (noise on ``frac`` random pixels), repeated ``iterations`` times; coverage of U_O, U_R, U_I,
  U_O+U_R and U_O+U_I.
- RQ3 :func:`rq3_sensitivity`: correctly classified suites s0 of each size, ``ratio`` of them replaced by their
  adversarial examples (FGSM, PGD, C&W through ART); NCov(s) = (Cov(s) - Cov(s0)) / (max Delta - min Delta), Delta
  over all mixes of one criterion and size; Pearson r of NCov with the ratio.
- RQ4 :func:`rq4_correlation`: class-stratified samples of each size and their C&W versions; output impartiality
  J = H / ln k (H the Shannon entropy, natural log, of the predicted-class distribution, k classes); Pearson r of
  each criterion's coverage with J (``scipy.stats.pearsonr``).
- RQ5 :func:`rq5_overhead`: wall time of each attribution method and of each criterion (set-up and evaluation);
  :func:`idc_by_mode` for IDC on one layer, layer by layer, end to end (all layers jointly), per class or all.
- :func:`coverage_table`: every criterion on clean vs adversarial inputs, for one layer (default: a ViT's last FFN).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import entropy, pearsonr
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitfl.adequacy.activations import collect_activations, default_layer, candidate_layers, predict, resolve_layers
from vitfl.adequacy.attacks import adversarial_examples
from vitfl.adequacy.attribution import (default_method, input_attributions, neuron_importance, rank_vote,
                                  top_neurons)
from vitfl.adequacy.criteria import DEFAULT_CRITERIA, make_criterion
from vitfl.adequacy.idc import IDC

from vitfl.core import style  # the house style: one figure saver (TrueType fonts), one Markdown table writer

__all__ = [
    "ARTIFACTS", "CoverageSuite", "importance_scores", "prune_neurons", "rq1_pruning", "top_pixel_mask",
    "random_pixel_mask", "perturb_pixels", "rq2_diversity", "normalized_coverage_change", "rq3_sensitivity",
    "output_impartiality", "stratified_sample", "rq4_correlation", "rq5_overhead", "idc_by_mode", "coverage_table",
    "report_rq1", "report_rq2", "report_rq3", "report_rq4", "report_rq5", "report_coverage_table", "write_table",
]

#: file stems (under the adequacy directory) of every table / figure the experiments write
ARTIFACTS = {
    "rq1": ("rq1", ["rq1_pruning", "rq1_pruning_summary", "rq1_attribution_time"]),
    "rq2": ("rq2", ["rq2_diversity", "rq2_summary"]),
    "rq3": ("rq3", ["rq3_sensitivity", "rq3_correlation", "rq3_attacks"]),
    "rq4": ("rq4", ["rq4_sets", "rq4_correlation"]),
    "rq5": ("rq5", ["rq5_overhead", "rq5_idc_modes"]),
    "coverage_table": ("coverage", ["coverage_table"]),
}


def rq_dir(adequacy_dir: str | Path, rq: str) -> Path:
    return Path(adequacy_dir) / ARTIFACTS[rq][0]


# ================================================================================================ output helpers
# Tables and figures go through the toolkit's one writer and one saver (vitfl.core.style.markdown_table, .save_figure).
def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str, title: str | None = None) -> list[Path]:
    """``stem.csv`` (full precision) and ``stem.md`` (``# title`` then :func:`vitfl.core.style.markdown_table`), atomic
    writes."""
    from vitfl.core.io import atomic_write_text

    out_dir = Path(out_dir)
    md = (f"# {title}\n\n" if title else "") + style.markdown_table(df)
    return [atomic_write_text(out_dir / f"{stem}.csv", df.to_csv(index=False)),
            atomic_write_text(out_dir / f"{stem}.md", md)]


def write_meta(out_dir: str | Path, stem: str, config: Mapping, **extra) -> Path:
    from vitfl.core.io import atomic_write_json, provenance

    return atomic_write_json(Path(out_dir) / f"{stem}_meta.json", {"config": dict(config), **provenance(**extra)})


def _grid(n: int):
    """Small panels (:func:`vitfl.core.style.facet_grid`: 1.75 x 1.5 in, at most 4 a row, at most 7 in wide: two columns
    of a paper), text at 7-8 pt; the caller lays them out (``fig.tight_layout()``)."""
    style.apply()  # text sizes are read when the titles and labels are drawn, later
    return style.facet_grid(n, ncols=min(4, n), panel_width=1.75, panel_height=1.5, sharex=False, sharey=False,
                            layout=None)


# ================================================================================================ importance
def importance_scores(model: nn.Module, layers, x: Tensor, y: Tensor, methods: Sequence[str],
                      token_reduction: str = "cls", vote: bool = True, progress: bool = False, **attr_kw
                      ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Importance ``[F_total]`` (the layers' neurons concatenated in order) per attribution method, summed over
    the correctly classified inputs, plus ``"vote"`` (rank voting) when ``vote`` and several methods; and each
    method's wall time in seconds."""
    layers = resolve_layers(model, layers)
    scores, times = {}, {}
    for method in tqdm(list(methods), desc="attribution methods", disable=not progress, leave=False):
        t0 = time.perf_counter()
        imp = neuron_importance(model, layers, x, y, method=method, token_reduction=token_reduction, **attr_kw)
        times[method] = time.perf_counter() - t0
        scores[method] = torch.cat([imp[n] for n in layers])
    if vote and len(scores) > 1:
        scores["vote"] = rank_vote(scores)
    return scores, times


# ================================================================================================ the suite
class CoverageSuite:
    """Every criterion set up once on ``model``'s ``layers`` (names or modules, ``"all"`` for every neuron layer;
    default :func:`default_layer`) and the training data ``train_x [N, ...]``, ``train_y [N]``. With several layers
    the baselines count over all of them and IDC takes its top-m neurons over their concatenation (end to end).

    - baselines: ``criteria`` = {name: params} (default :data:`vitfl.adequacy.criteria.DEFAULT_CRITERIA`), fitted on the
      activations of all training inputs (the surprise criteria per true class);
    - IDC: ``idc`` = IDC's options (``m``, ``ks``, ``use_silhouette``, ...; None leaves IDC out), fitted on the
      correctly classified training inputs with ``importance [F_total]`` (default: computed with ``method``, or
      :func:`vitfl.adequacy.attribution.default_method`).

    ``evaluate(x)`` gives {criterion: coverage of the suite x} (each criterion starts from zero); the surprise
    criteria take the test inputs' predicted classes (``sa_labels="pred"``, Kim et al.) or the labels passed
    (``"true"``). ``fit_seconds`` / ``eval_seconds`` hold the wall times per criterion.
    """

    def __init__(self, model: nn.Module, train_x: Tensor, train_y: Tensor, layers=None,
                 criteria: Mapping[str, Mapping] | None = None, idc: Mapping | None = None,
                 importance: Tensor | None = None, method: str | None = None, token_reduction: str = "cls",
                 sa_labels: str = "pred", attr_kw: Mapping | None = None, batch_size: int = 256,
                 progress: bool = True):
        if sa_labels not in ("pred", "true"):
            raise ValueError(f"sa_labels must be 'pred' or 'true', got {sa_labels!r}")
        self.model = model
        self.layers = resolve_layers(model, layers) if layers is not None else default_layer(model)
        self.token_reduction, self.sa_labels, self.batch_size = token_reduction, sa_labels, batch_size
        self.progress = progress
        self.criteria_params = dict(DEFAULT_CRITERIA if criteria is None else criteria)
        self.idc_params = None if idc is None else dict(idc)
        self.method = method or default_method(model)
        self.fit_seconds: dict[str, float] = {}
        self.eval_seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        acts, pred = self.activations(train_x, desc="train activations")
        self.activation_seconds = time.perf_counter() - t0
        train_y = torch.as_tensor(train_y).long()
        self.correct = pred == train_y
        self.criteria = {}
        for name, params in self.criteria_params.items():
            t0 = time.perf_counter()
            crit = make_criterion(name, token_reduction=token_reduction, **params)
            crit.fit(acts, labels=train_y)
            self.criteria[crit.name] = crit
            self.fit_seconds[crit.name] = time.perf_counter() - t0
        self.importance = None
        if self.idc_params is not None:
            if not self.correct.any():
                raise ValueError("the model classifies no training input correctly: IDC has no important neurons")
            t0 = time.perf_counter()
            if importance is None:
                importance, _ = importance_scores(model, self.layers, train_x, train_y, [self.method],
                                                  token_reduction, vote=False, **dict(attr_kw or {}))
                importance = importance[self.method]
                self.fit_seconds["attribution"] = time.perf_counter() - t0
            self.importance = torch.as_tensor(importance).float().reshape(-1)
            t0 = time.perf_counter()
            table = self._table(acts)[self.correct]
            self.criteria["IDC"] = IDC(**self.idc_params).fit(train_activations=table, importance=self.importance)
            self.fit_seconds["IDC"] = time.perf_counter() - t0

    def activations(self, x: Tensor, desc: str = "activations") -> tuple[dict[str, Tensor], Tensor]:
        """(layer name -> ``[N, F]``, predicted class ``[N]``)."""
        out = collect_activations(self.model, self.layers, x, self.batch_size, self.token_reduction,
                                  progress=self.progress and len(x) > 2000, return_logits=True, desc=desc)
        return {n: out[n] for n in self.layers}, out["logits"].argmax(1)

    def _table(self, acts: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([acts[n] for n in self.layers], dim=1)

    def evaluate(self, x: Tensor | None = None, labels: Tensor | None = None, acts=None, pred=None
                 ) -> dict[str, float]:
        """{criterion: coverage} of the suite ``x`` (or of precomputed ``acts``/``pred``)."""
        if acts is None:
            acts, pred = self.activations(x)
        sa_lab = pred if self.sa_labels == "pred" else labels
        if self.sa_labels == "true" and labels is None:
            raise ValueError("sa_labels='true' needs the test inputs' labels")
        out = {}
        for name, crit in self.criteria.items():
            t0 = time.perf_counter()
            crit.reset()
            if name == "IDC":
                crit.update(self._table(acts))
            else:
                crit.update(acts, labels=sa_lab if crit.uses_labels else None)
            out[name] = crit.coverage()
            self.eval_seconds[name] = time.perf_counter() - t0
        return out

    def describe(self) -> dict:
        """The set-up as plain data (layers, method, each criterion's parameters, IDC's neurons and k)."""
        d = {"layers": list(self.layers), "method": self.method,
             "criteria": {k: v.params() for k, v in self.criteria.items() if k != "IDC"}}
        if "IDC" in self.criteria:
            idc = self.criteria["IDC"]
            d["IDC"] = {**self.idc_params, "neurons": idc.neurons.tolist(), "k": idc.cluster_counts,
                        "total_combinations": idc.total_combinations}
        return d


# ================================================================================================ RQ1
@contextlib.contextmanager
def prune_neurons(layer: nn.Module, neurons: Sequence[int] | Tensor):
    """Within the context ``layer``'s output has the given neurons zeroed: columns of ``[B, F]``, channels of
    ``[B, C, H, W]``, features (at every token) of ``[B, T, F]``."""
    idx = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)

    def hook(_m, _a, out):
        o = out[0] if isinstance(out, (tuple, list)) else out
        o = o.clone()
        if o.ndim == 3:
            o[..., idx.to(o.device)] = 0
        else:
            o[:, idx.to(o.device)] = 0
        return (o, *out[1:]) if isinstance(out, (tuple, list)) else o

    h = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _acc(model, x, y) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def rq1_pruning(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, layer=None,
                methods: Sequence[str] = ("lrp", "ig", "deeplift"), ns: Sequence[int] = (6, 8, 10, 15, 20),
                random_reps: int = 10, seed: int = 0, token_reduction: str = "cls", progress: bool = True,
                **attr_kw) -> dict[str, pd.DataFrame]:
    """Accuracy drop on ``test_x`` after zeroing the top-n neurons of ``layer`` (per method and by rank voting) or n
    random ones (``random_reps`` seeded draws). Returns {"detail": one row per method/n/rep, "summary": mean and
    std per method/n, "timing": attribution seconds per method}."""
    layers = resolve_layers(model, layer) if layer is not None else default_layer(model)
    if len(layers) != 1:
        raise ValueError("RQ1 prunes one layer")
    (lname, lmod), = layers.items()
    scores, times = importance_scores(model, layers, train_x, train_y, methods, token_reduction,
                                      progress=progress, **attr_kw)
    n_neurons = len(next(iter(scores.values())))
    ns = [n for n in ns if n <= n_neurons]
    if not ns:
        raise ValueError(f"layer {lname} has {n_neurons} neurons, fewer than every n asked")
    base = _acc(model, test_x, test_y)
    rows = []
    rng = np.random.default_rng(seed)
    for n in tqdm(ns, desc="RQ1 pruning", disable=not progress, leave=False):
        for method, s in scores.items():
            idx = top_neurons(s, n)
            with prune_neurons(lmod, idx):
                acc = _acc(model, test_x, test_y)
            rows.append({"layer": lname, "method": method, "n": n, "rep": 0, "acc_before": base, "acc_after": acc,
                         "drop": base - acc, "neurons": " ".join(map(str, idx.tolist()))})
        for rep in range(random_reps):
            idx = np.sort(rng.choice(n_neurons, size=n, replace=False))
            with prune_neurons(lmod, idx):
                acc = _acc(model, test_x, test_y)
            rows.append({"layer": lname, "method": "random", "n": n, "rep": rep, "acc_before": base,
                         "acc_after": acc, "drop": base - acc, "neurons": " ".join(map(str, idx.tolist()))})
    detail = pd.DataFrame(rows)
    summary = (detail.groupby(["method", "n"], sort=False)["drop"]
               .agg(drop_mean="mean", drop_std="std", reps="count").reset_index())
    summary["drop_std"] = summary["drop_std"].fillna(0.0)
    timing = pd.DataFrame({"method": list(times), "seconds": list(times.values())})
    return {"detail": detail, "summary": summary, "timing": timing}


def report_rq1(out_dir, res: Mapping[str, pd.DataFrame], config: Mapping) -> list[Path]:
    out = rq_dir(out_dir, "rq1")
    paths = write_table(res["detail"], out, "rq1_pruning", "RQ1: accuracy after pruning important vs random neurons")
    paths += write_table(res["summary"], out, "rq1_pruning_summary", "RQ1: accuracy drop (mean, std over reps)")
    paths += write_table(res["timing"], out, "rq1_attribution_time", "RQ1: attribution time per method (s)")
    fig, (ax,) = _grid(1)
    s = res["summary"]
    for method, g in s.groupby("method", sort=False):
        kw = {"color": "grey", "linestyle": "--"} if method == "random" else {"marker": "o"}
        ax.plot(g["n"], g["drop_mean"], label=method, **kw)
        if method == "random":
            ax.fill_between(g["n"], g["drop_mean"] - g["drop_std"], g["drop_mean"] + g["drop_std"], color="grey",
                            alpha=0.2)
    ax.set_xlabel("pruned neurons n")
    ax.set_ylabel("accuracy drop")
    ax.legend(fontsize=7)
    ax.set_title("RQ1: pruning important vs random")
    fig.set_size_inches(5, 3.5)
    paths += style.save_figure(fig, out / "rq1_pruning")
    paths.append(write_meta(out, "rq1", config))
    return paths


# ================================================================================================ RQ2
def top_pixel_mask(attr: Tensor, frac: float) -> Tensor:
    """``[N, H, W]`` bool: per input the ``ceil(frac * H * W)`` pixels of largest |attribution| summed over
    channels (``attr [N, C, H, W]``); ties to the lower flat index."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    score = attr.abs().sum(1)
    n, h, w = score.shape
    k = max(1, math.ceil(frac * h * w))
    flat = score.reshape(n, -1).double().numpy()
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return torch.from_numpy(mask.reshape(n, h, w))


def random_pixel_mask(n: int, h: int, w: int, frac: float, generator: np.random.Generator) -> Tensor:
    """``[N, H, W]`` bool with ``ceil(frac * H * W)`` random pixels per input."""
    k = max(1, math.ceil(frac * h * w))
    mask = np.zeros((n, h * w), dtype=bool)
    for i in range(n):
        mask[i, generator.choice(h * w, size=k, replace=False)] = True
    return torch.from_numpy(mask.reshape(n, h, w))


def perturb_pixels(x: Tensor, mask: Tensor, sigma: float, clip_values: tuple[float, float],
                   generator: np.random.Generator) -> Tensor:
    """``x`` with Gaussian noise N(0, (sigma * range)^2) added to the masked pixels (all channels), clipped to
    ``clip_values``; ``range = hi - lo``."""
    lo, hi = clip_values
    noise = torch.from_numpy(generator.normal(0.0, sigma * (hi - lo), size=tuple(x.shape))).to(x.dtype)
    return torch.where(mask[:, None].expand_as(x), (x + noise).clamp(lo, hi), x)


def rq2_diversity(suite: CoverageSuite, test_x: Tensor, test_y: Tensor, clip_values: tuple[float, float],
                  frac: float = 0.02, sigma: float = 0.3, iterations: int = 5, input_method: str = "ig",
                  seed: int = 0, progress: bool = True, **attr_kw) -> dict[str, pd.DataFrame]:
    """Coverage of U_O, U_R, U_I, U_O+U_R, U_O+U_I (see the module docstring) for every criterion, ``iterations``
    seeded noise draws. Returns {"detail", "summary" (mean/std per set and criterion, and whether U_I > U_R)}."""
    model = suite.model
    attr = input_attributions(model, test_x, test_y, method=input_method, **attr_kw)
    imp_mask = top_pixel_mask(attr, frac)
    rows = []
    acts_o, pred_o = suite.activations(test_x)
    cov_o = suite.evaluate(acts=acts_o, pred=pred_o, labels=test_y)
    for it in tqdm(range(iterations), desc="RQ2 iterations", disable=not progress, leave=False):
        gen = np.random.default_rng(seed + it)
        n, _, h, w = test_x.shape
        u_i = perturb_pixels(test_x, imp_mask, sigma, clip_values, gen)
        u_r = perturb_pixels(test_x, random_pixel_mask(n, h, w, frac, gen), sigma, clip_values, gen)
        sets = {"U_O": cov_o}
        for name, xs in (("U_R", u_r), ("U_I", u_i)):
            acts, pred = suite.activations(xs)
            sets[name] = suite.evaluate(acts=acts, pred=pred, labels=test_y)
            both = {k: torch.cat([acts_o[k], acts[k]]) for k in acts}
            sets[f"U_O+{name}"] = suite.evaluate(acts=both, pred=torch.cat([pred_o, pred]),
                                                 labels=torch.cat([test_y, test_y]))
        for set_name, cov in sets.items():
            for crit, v in cov.items():
                rows.append({"iteration": it, "set": set_name, "criterion": crit, "coverage": v})
    detail = pd.DataFrame(rows)
    sets_order = ["U_O", "U_R", "U_I", "U_O+U_R", "U_O+U_I"]
    crit_order = list(dict.fromkeys(detail["criterion"]))
    g = detail.groupby(["criterion", "set"])["coverage"]
    mean = g.mean().unstack()[sets_order].loc[crit_order]
    std = g.std().fillna(0.0).unstack()[sets_order].loc[crit_order].add_suffix("_std")
    summary = pd.concat([mean, std], axis=1).reset_index()
    summary["U_I_higher"] = (mean["U_I"] > mean["U_R"]).to_numpy()
    summary["U_O+U_I_higher"] = (mean["U_O+U_I"] > mean["U_O+U_R"]).to_numpy()
    return {"detail": detail, "summary": summary}


def report_rq2(out_dir, res: Mapping[str, pd.DataFrame], config: Mapping) -> list[Path]:
    out = rq_dir(out_dir, "rq2")
    paths = write_table(res["detail"], out, "rq2_diversity", "RQ2: coverage per set and noise draw")
    paths += write_table(res["summary"], out, "rq2_summary", "RQ2: coverage of U_O, U_R, U_I (mean, std)")
    s = res["summary"].set_index("criterion")
    sets_order = ["U_O", "U_R", "U_I", "U_O+U_R", "U_O+U_I"]
    fig, axes = _grid(len(s))
    for ax, crit in zip(axes, s.index):
        ax.bar(sets_order, [s.loc[crit, k] for k in sets_order],
               yerr=[s.loc[crit, f"{k}_std"] for k in sets_order], color=["#777", "#4a7", "#c44", "#9c9", "#e99"])
        ax.set_title(crit, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle("RQ2: coverage of original, random-noise and important-noise suites")
    fig.tight_layout()
    paths += style.save_figure(fig, out / "rq2_diversity")
    paths.append(write_meta(out, "rq2", config))
    return paths


# ================================================================================================ RQ3
def normalized_coverage_change(cov_s: Sequence[float], cov_s0: float) -> np.ndarray:
    """NCov(s) = (Cov(s) - Cov(s0)) / (max Delta - min Delta), Delta = {Cov(s) - Cov(s0) | s in S} (0 where all
    Delta are equal)."""
    delta = np.asarray(cov_s, dtype=np.float64) - float(cov_s0)
    span = delta.max() - delta.min() if len(delta) else 0.0
    return delta / span if span > 0 else np.zeros_like(delta)


def _correct_pool(model, x, y, seed):
    keep = torch.nonzero(predict(model, x).argmax(1) == y).view(-1).numpy()
    return np.random.default_rng(seed).permutation(keep)


def rq3_sensitivity(suite: CoverageSuite, test_x: Tensor, test_y: Tensor, clip_values: tuple[float, float],
                    sizes: Sequence[int] = (100, 1000, 3000), ratios: Sequence[float] = (0.01, 0.05, 0.1),
                    attacks: Sequence[str] = ("fgsm", "pgd", "cw"), seed: int = 0, progress: bool = True,
                    attack_kw: Mapping | None = None) -> dict[str, pd.DataFrame]:
    """See the module docstring. Sizes larger than the correctly classified pool are capped to it (reported in
    ``size``; ``size_asked`` keeps the request). Returns {"detail", "correlation", "attacks"}."""
    model = suite.model
    pool = _correct_pool(model, test_x, test_y, seed)
    if len(pool) == 0:
        raise ValueError("the model classifies no test input correctly")
    plan = sorted({(min(s, len(pool)), s) for s in sizes}, key=lambda t: t[1])
    plan = list({eff: asked for eff, asked in plan}.items())  # one run per effective size
    n_adv = max(max(1, round(r * eff)) for eff, _ in plan for r in ratios)
    src = pool[:n_adv]
    advs, attack_rows = {}, []
    for attack in tqdm(list(attacks), desc="RQ3 attacks", disable=not progress, leave=False):
        t0 = time.perf_counter()
        advs[attack] = adversarial_examples(model, test_x[src], test_y[src], method=attack, clip_values=clip_values,
                                            seed=seed, **dict((attack_kw or {}).get(attack, {})))
        success = float((predict(model, advs[attack]).argmax(1) != test_y[src]).float().mean())
        attack_rows.append({"attack": attack, "n": len(src), "success_rate": success,
                            "seconds": time.perf_counter() - t0})
    rows = []
    for eff, asked in tqdm(plan, desc="RQ3 sizes", disable=not progress, leave=False):
        idx = pool[:eff]
        x0 = test_x[idx]
        cov0 = suite.evaluate(x0, labels=test_y[idx])
        for attack in attacks:
            for r in ratios:
                k = max(1, round(r * eff))
                xs = x0.clone()
                xs[:k] = advs[attack][:k]
                cov = suite.evaluate(xs, labels=test_y[idx])
                for crit, v in cov.items():
                    rows.append({"size": eff, "size_asked": asked, "attack": attack, "ratio": r, "n_adv": k,
                                 "criterion": crit, "cov_s0": cov0[crit], "cov_s": v, "delta": v - cov0[crit]})
    detail = pd.DataFrame(rows)
    detail["ncov"] = 0.0
    for (_, _), g in detail.groupby(["criterion", "size"]):
        detail.loc[g.index, "ncov"] = normalized_coverage_change(g["cov_s"].to_numpy(), g["cov_s0"].iloc[0])
    corr = []
    for crit, g in detail.groupby("criterion", sort=False):
        r, p = _pearson(g["ratio"], g["ncov"])
        corr.append({"criterion": crit, "pearson_r_ratio_ncov": r, "p_value": p, "n": len(g),
                     "mean_ncov": g["ncov"].mean(), "share_increased": float((g["delta"] > 0).mean())})
    return {"detail": detail, "correlation": pd.DataFrame(corr), "attacks": pd.DataFrame(attack_rows)}


def _pearson(a, b) -> tuple[float, float]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    res = pearsonr(a, b)
    return float(res.statistic), float(res.pvalue)


def report_rq3(out_dir, res: Mapping[str, pd.DataFrame], config: Mapping) -> list[Path]:
    out = rq_dir(out_dir, "rq3")
    paths = write_table(res["detail"], out, "rq3_sensitivity", "RQ3: coverage change with adversarial mixes")
    paths += write_table(res["correlation"], out, "rq3_correlation",
                         "RQ3: Pearson r of NCov with the adversarial ratio")
    paths += write_table(res["attacks"], out, "rq3_attacks", "RQ3: attacks (success rate, time)")
    d = res["detail"]
    sizes = sorted(set(d["size"]))
    crits = list(dict.fromkeys(d["criterion"]))
    fig, axes = _grid(len(crits))
    for ax, crit in zip(axes, crits):
        g = d[d["criterion"] == crit]
        for attack, ga in g.groupby("attack", sort=False):
            # one point per ratio: the mean NCov over the suite sizes, bars min-max over them
            s = ga.groupby("ratio")["ncov"].agg(["mean", "min", "max"]).sort_index()
            yerr = [s["mean"] - s["min"], s["max"] - s["mean"]] if len(sizes) > 1 else None
            ax.errorbar(s.index * 100, s["mean"], yerr=yerr, marker="o", markersize=3, capsize=2,
                        elinewidth=0.7, label=attack)
        ax.set_title(crit)
        ax.set_xlabel("adversarial %")
    axes[0].set_ylabel("NCov")
    axes[0].legend()
    fig.suptitle("RQ3: normalised coverage change" + (f"\nmean over suite sizes {sizes} (bars: min-max)"
                                                      if len(sizes) > 1 else f" (suite size {sizes[0]})"))
    fig.tight_layout()
    paths += style.save_figure(fig, out / "rq3_sensitivity")
    paths.append(write_meta(out, "rq3", config))
    return paths


# ================================================================================================ RQ4
def output_impartiality(pred: Tensor | np.ndarray, num_classes: int) -> float:
    """Pielou's evenness of the predicted classes: J = H / ln k, H = -sum_i p_i ln p_i over the k classes."""
    if num_classes < 2:
        raise ValueError("output impartiality needs at least 2 classes")
    pred = np.asarray(torch.as_tensor(pred).cpu()).reshape(-1)
    if len(pred) == 0:
        raise ValueError("no predictions given")
    counts = np.bincount(pred, minlength=num_classes)[:num_classes]
    return float(entropy(counts) / np.log(num_classes))


def stratified_sample(y: Tensor | np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn with the classes' proportions kept (``sklearn.model_selection.train_test_split`` with
    ``stratify``); all indices, shuffled, when ``n >= len(y)``."""
    y = np.asarray(torch.as_tensor(y).cpu()).reshape(-1)
    idx = np.arange(len(y))
    if n >= len(y):
        return np.random.default_rng(seed).permutation(idx)
    sel, _ = train_test_split(idx, train_size=n, stratify=y, random_state=seed)
    return np.asarray(sel)


def rq4_correlation(suite: CoverageSuite, test_x: Tensor, test_y: Tensor, num_classes: int,
                    clip_values: tuple[float, float], sizes: Sequence[int] = (100, 500, 1000), reps: int = 1,
                    seed: int = 0, progress: bool = True, cw_kw: Mapping | None = None) -> dict[str, pd.DataFrame]:
    """Clean stratified suites U_t and their C&W versions U_b per size (capped at the pool) and repetition; J and
    every criterion's coverage per suite; Pearson r of coverage with J. Returns {"sets", "correlation"}."""
    model = suite.model
    rows = []
    plan = list(dict.fromkeys(min(s, len(test_y)) for s in sizes))
    for rep in range(reps):
        for n in tqdm(plan, desc=f"RQ4 sizes (rep {rep})", disable=not progress, leave=False):
            idx = stratified_sample(test_y, n, seed + rep)
            x, y = test_x[idx], test_y[idx]
            adv = adversarial_examples(model, x, y, method="cw", clip_values=clip_values, seed=seed + rep,
                                       **dict(cw_kw or {}))
            for kind, xs in (("clean", x), ("cw", adv)):
                acts, pred = suite.activations(xs)
                cov = suite.evaluate(acts=acts, pred=pred, labels=y)
                rows.append({"rep": rep, "size": n, "kind": kind, "J": output_impartiality(pred, num_classes),
                             "accuracy": float((pred == y).float().mean()), **cov})
    sets = pd.DataFrame(rows)
    crits = [c for c in sets.columns if c not in ("rep", "size", "kind", "J", "accuracy")]
    corr = []
    for crit in crits:
        r, p = _pearson(sets[crit], sets["J"])
        corr.append({"criterion": crit, "pearson_r": r, "p_value": p, "n_sets": len(sets)})
    return {"sets": sets, "correlation": pd.DataFrame(corr)}


def report_rq4(out_dir, res: Mapping[str, pd.DataFrame], config: Mapping) -> list[Path]:
    out = rq_dir(out_dir, "rq4")
    paths = write_table(res["sets"], out, "rq4_sets", "RQ4: coverage and output impartiality J per suite")
    paths += write_table(res["correlation"], out, "rq4_correlation", "RQ4: Pearson r of coverage with J")
    sets, corr = res["sets"], res["correlation"].set_index("criterion")
    crits = list(corr.index)
    fig, axes = _grid(len(crits))
    for ax, crit in zip(axes, crits):
        for kind, g in sets.groupby("kind"):
            ax.scatter(g["J"], g[crit], label=kind, s=18)
        ax.set_title(f"{crit} (r={corr.loc[crit, 'pearson_r']:.2f})", fontsize=9)
        ax.set_xlabel("J", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("RQ4: coverage vs output impartiality")
    fig.tight_layout()
    paths += style.save_figure(fig, out / "rq4_correlation")
    paths.append(write_meta(out, "rq4", config))
    return paths


# ================================================================================================ RQ5 and modes
def idc_by_mode(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                mode: str = "layer", per_class: bool = False, layers=None, m: int = 6, method: str | None = None,
                token_reduction: str = "cls", idc_kw: Mapping | None = None, progress: bool = True, **attr_kw
                ) -> pd.DataFrame:
    """IDC in DeepImportance's modes: ``mode="layer"`` (the given layer(s), default the default layer, as one
    table), ``"layer_by_layer"`` (each of the layers, default every neuron layer, separately), ``"end_to_end"``
    (the top-m neurons over all the layers jointly); ``per_class``: importance and clusters from the training
    inputs of one class, coverage of the test inputs of that class, for every class (else all classes at once).
    One row per (layer group, class) with IDC, the covered / total combinations and timings.

    End to end ranks the raw importances of all layers together (as DeepImportance does); layers whose relevances
    are larger in scale (e.g. conv channels, summed over space) then tend to supply the important neurons."""
    if mode not in ("layer", "layer_by_layer", "end_to_end"):
        raise ValueError(f"mode must be 'layer', 'layer_by_layer' or 'end_to_end', got {mode!r}")
    method = method or default_method(model)
    if layers is None:
        layers = default_layer(model) if mode == "layer" else candidate_layers(model)
    layers = resolve_layers(model, layers)
    groups = ([dict(layers)] if mode in ("layer", "end_to_end") else [{n: mod} for n, mod in layers.items()])
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    keep = predict(model, train_x).argmax(1) == train_y
    xc, yc = train_x[keep], train_y[keep]
    t0 = time.perf_counter()
    rel = neuron_importance(model, layers, xc, yc, method=method, only_correct=False,
                            token_reduction=token_reduction, return_per_input=True, **attr_kw)
    attr_seconds = time.perf_counter() - t0
    tr_acts = collect_activations(model, layers, xc, token_reduction=token_reduction)
    te_acts = collect_activations(model, layers, test_x, token_reduction=token_reduction)
    classes = [int(c) for c in torch.unique(yc)] if per_class else [None]
    rows = []
    for group in tqdm(groups, desc=f"IDC {mode}", disable=not progress, leave=False):
        names = list(group)
        r_all = torch.cat([rel[n] for n in names], 1)
        tr = torch.cat([tr_acts[n] for n in names], 1)
        te = torch.cat([te_acts[n] for n in names], 1)
        for c in classes:
            sel_tr = slice(None) if c is None else (yc == c)
            sel_te = slice(None) if c is None else (test_y == c)
            t1 = time.perf_counter()
            mm = min(m, tr.shape[1])
            idc = IDC(m=mm, **dict(idc_kw or {})).fit(train_activations=tr[sel_tr],
                                                     importance=r_all[sel_tr].sum(0))
            fit_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            idc.update(te[sel_te])
            rows.append({"mode": mode, "layers": "+".join(names), "class": "all" if c is None else c,
                         "method": method, "m": mm, "IDC": idc.coverage(), "covered": len(idc.covered),
                         "total_combinations": idc.total_combinations, "k": " ".join(map(str, idc.cluster_counts)),
                         "n_test": idc.n_inputs, "fit_s": fit_s, "eval_s": time.perf_counter() - t1,
                         "attribution_s_all_groups": attr_seconds})
    return pd.DataFrame(rows)


def rq5_overhead(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, layer=None,
                 methods: Sequence[str] = ("lrp", "ig", "conductance", "deeplift", "gradxact"),
                 criteria: Mapping[str, Mapping] | None = None, idc: Mapping | None = None,
                 modes: Iterable[tuple[str, bool]] = (("layer", False), ("layer_by_layer", False),
                                                      ("end_to_end", False), ("layer", True)),
                 token_reduction: str = "cls", progress: bool = True, **attr_kw) -> dict[str, pd.DataFrame]:
    """Wall time of every attribution method (importance on the training set) and of every criterion (set-up on
    the training set, evaluation of the test pool), and IDC in each (mode, per_class). Returns {"overhead",
    "idc_modes"}."""
    from vitfl.adequacy.attribution import UnsupportedAttributionError

    layers = resolve_layers(model, layer) if layer is not None else default_layer(model)
    rows = []
    for method in tqdm(list(methods), desc="RQ5 attribution", disable=not progress, leave=False):
        t0 = time.perf_counter()
        try:
            neuron_importance(model, layers, train_x, train_y, method=method, token_reduction=token_reduction,
                              **attr_kw)
        except UnsupportedAttributionError:
            continue
        rows.append({"kind": "attribution", "name": method, "setup_s": time.perf_counter() - t0, "eval_s": 0.0,
                     "n_train": len(train_x), "n_test": 0})
    idc_params = dict(idc or {"m": 6})
    suite = CoverageSuite(model, train_x, train_y, layers, criteria, idc_params, token_reduction=token_reduction,
                          attr_kw=attr_kw, progress=progress)
    suite.evaluate(test_x, labels=test_y)
    for name in suite.criteria:
        rows.append({"kind": "criterion", "name": name, "setup_s": suite.fit_seconds.get(name, 0.0)
                     + suite.activation_seconds, "eval_s": suite.eval_seconds[name], "n_train": len(train_x),
                     "n_test": len(test_x)})
    overhead = pd.DataFrame(rows)
    modes_df = [idc_by_mode(model, train_x, train_y, test_x, test_y, mode=mode, per_class=pc,
                            layers=layers if mode == "layer" else None, m=idc_params.get("m", 6),
                            token_reduction=token_reduction,
                            idc_kw={k: v for k, v in idc_params.items() if k != "m"}, progress=progress, **attr_kw)
                .assign(per_class=pc) for mode, pc in modes]
    return {"overhead": overhead, "idc_modes": pd.concat(modes_df, ignore_index=True)}


def report_rq5(out_dir, res: Mapping[str, pd.DataFrame], config: Mapping) -> list[Path]:
    out = rq_dir(out_dir, "rq5")
    paths = write_table(res["overhead"], out, "rq5_overhead", "RQ5: time per attribution method and criterion (s)")
    paths += write_table(res["idc_modes"], out, "rq5_idc_modes", "RQ5: IDC per mode (layer / layer by layer / "
                                                                 "end to end, per class or all)")
    o = res["overhead"]
    fig, (ax,) = _grid(1)
    labels = [f"{k}:{n}" for k, n in zip(o["kind"], o["name"])]
    ax.barh(labels, o["setup_s"], label="set-up")
    ax.barh(labels, o["eval_s"], left=o["setup_s"], label="evaluation")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7)
    ax.set_title("RQ5: overhead")
    fig.set_size_inches(6, 0.3 * len(labels) + 1.5)
    paths += style.save_figure(fig, out / "rq5_overhead")
    paths.append(write_meta(out, "rq5", config))
    return paths


# ================================================================================================ the main job's table
def coverage_table(model: nn.Module, layer, train_inputs: Tensor, clean_inputs: Tensor, adv_inputs: Tensor,
                   train_labels: Tensor | None = None, clean_labels: Tensor | None = None,
                   adv_labels: Tensor | None = None, criteria: Mapping[str, Mapping] | None = None,
                   idc: Mapping | None = None, method: str | None = None, token_reduction: str = "cls",
                   sa_labels: str = "pred", max_train: int | None = 2000, seed: int = 0,
                   attr_kw: Mapping | None = None, progress: bool = False) -> pd.DataFrame:
    """Every criterion (IDC and the baselines) on ``clean_inputs`` vs ``adv_inputs`` for one ``layer`` (a name or
    module of ``model``; None: a ViT's last FFN activation / a CNN's last neuron layer).

    ``train_labels`` (default: the model's predictions) define the correctly classified training inputs for IDC
    and the classes of the surprise criteria; at most ``max_train`` training inputs are used (seeded subset).
    ``attr_kw`` go to the attribution (default for ViTs: ``LayerIntegratedGradients`` with 16 steps).

    Returns one row per criterion: ``criterion``, ``params``, ``clean``, ``adversarial``, ``delta`` (adv - clean),
    ``kind`` ("ratio" in [0, 1] or "count"/"sum"), ``fit_s``, ``eval_s`` (seconds, clean + adversarial)."""
    if train_labels is None:
        train_labels = predict(model, train_inputs).argmax(1)
    train_labels = torch.as_tensor(train_labels).long()
    if max_train is not None and len(train_inputs) > max_train:
        sel = np.sort(np.random.default_rng(seed).choice(len(train_inputs), size=max_train, replace=False))
        train_inputs, train_labels = train_inputs[sel], train_labels[sel]
    akw = dict(attr_kw if attr_kw is not None else {"n_steps": 16})
    suite = CoverageSuite(model, train_inputs, train_labels, layer, criteria, dict(idc or {"m": 6}),
                          method=method, token_reduction=token_reduction, sa_labels=sa_labels, attr_kw=akw,
                          progress=progress)
    clean = suite.evaluate(clean_inputs, labels=clean_labels)
    t_clean = dict(suite.eval_seconds)
    adv = suite.evaluate(adv_inputs, labels=adv_labels)
    rows = []
    for name, crit in suite.criteria.items():
        kind = "ratio" if name == "IDC" or crit.is_ratio else ("sum" if name == "NLC" else "count")
        params = suite.idc_params if name == "IDC" else crit.params()
        rows.append({"criterion": name, "params": ", ".join(f"{k}={v}" for k, v in params.items()),
                     "clean": clean[name], "adversarial": adv[name], "delta": adv[name] - clean[name],
                     "kind": kind, "fit_s": suite.fit_seconds.get(name, 0.0),
                     "eval_s": t_clean[name] + suite.eval_seconds[name]})
    df = pd.DataFrame(rows)
    df.attrs["layers"] = list(suite.layers)
    df.attrs["method"] = suite.method
    return df


def report_coverage_table(out_dir, df: pd.DataFrame, config: Mapping | None = None) -> list[Path]:
    """``coverage/coverage_table.{csv,md}`` (+ meta JSON) under the adequacy directory. The Markdown title and the
    clean / adversarial column headers state the split and n (``config``: ``n_clean``, ``n_train``, ``attack``,
    ``split``, default "eval")."""
    out = rq_dir(out_dir, "coverage_table")
    cfg = dict(config or {})
    layers = ", ".join(df.attrs.get("layers", []))
    split, n, attack = cfg.get("split", "eval"), cfg.get("n_clean"), cfg.get("attack", "adversarial")
    n_txt = f"n = {n}" if n is not None else "n not recorded"
    md = df.rename(columns={"clean": f"clean ({split} split, {n_txt})",
                            "adversarial": f"adversarial ({attack} of the same {split} inputs, {n_txt})"})
    title = (f"Coverage, clean vs adversarial ({layers}): {split} split, {n_txt} inputs each"
             + (f"; criteria fitted on n = {cfg['n_train']} training inputs" if cfg.get("n_train") else ""))
    from vitfl.core.io import atomic_write_text

    paths = [atomic_write_text(out / "coverage_table.csv", df.to_csv(index=False)),
             atomic_write_text(out / "coverage_table.md", f"# {title}\n\n" + style.markdown_table(md))]
    paths.append(write_meta(out, "coverage_table", cfg, layers=df.attrs.get("layers"),
                            method=df.attrs.get("method")))
    return paths
