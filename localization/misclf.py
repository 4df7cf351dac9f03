"""Misclassification settings (what is localized and repaired).

From a split's labels and predictions:

- ``src_tgt_r{r}``: the r-th most frequent confusion pair, true s predicted as t (I_neg = those inputs);
- ``tgt_fp_r{r}``: the label l with the r-th worst precision (I_neg = inputs wrongly predicted as l);
- ``tgt_fn_r{r}``: the label l with the r-th worst recall (I_neg = inputs of l predicted as something else);
- ``tgt_r{r}`` (published setting, opt-in with ``kinds``): the label l with the r-th worst F1; I_neg = the union of
  l's tgt_fp and tgt_fn inputs (misclassified inputs predicted as l or of true label l);
- ``all``: every misclassification.

The 9 benchmark settings are src_tgt / tgt_fp / tgt_fn x rank 1-3; ``all`` and ``tgt`` come on top.

Ranks (see ``docs/compat_settings.md`` for the published code each rule follows):

- src_tgt: counts descending; equal counts ordered by (predicted, true) label, as the published code did
  (``tie_order="pred_true"``, the default), so published rank numbers come out the same; ``tie_order="true_pred"``
  orders them by (true, predicted) instead.
- tgt_fp / tgt_fn / tgt: precision / recall / F1 ascending, equal values by label (as published).
  Precision of a label never predicted is 0 (its I_neg is empty: the setting is reported under ``skipped``).
  A label with no true input has no recall: by default (``no_true_input="skip"``) it is left out of tgt_fn and
  reported under ``skipped`` as ``"tgt_fn label {l}"``; ``no_true_input="recall_zero"`` ranks it with recall 0,
  as the published code did (its tgt_fn setting then has an empty I_neg and is reported as skipped too).
  F1 = 2 P R / (P + R) (0 when P + R = 0), with P and R computed as in the published code (0 on a zero
  division); a label neither true nor predicted anywhere has no F1 and is left out of tgt (reported).

Pairs are named (true, predicted); the published code keyed them (pred, true), so its ``{s}to{t}`` reads the other
way round: each src_tgt setting carries that key as ``published_key`` (``"{pred}to{true}"``).

Each setting carries sample indices (the split's ``index``, not cache rows):
``i_neg`` (ascending); ``i_neg_published`` = the same inputs in the published code's order (grouped by
(predicted, true) pair in lexicographic order, ascending index inside a pair; for src_tgt simply ascending);
``i_pos`` = every correctly classified input; ``i_pos_label`` = the correct inputs of the setting's label
(src_tgt: s, tgt_fn and tgt: l; None for tgt_fp and all; for methods that ask for it); ``i_pos_repair`` = the
repair set's I_pos, a sample of int(0.05 |split|) correct inputs stratified by predicted label,
floor-proportional per label with the remainder given one by one to the labels with the most leftover capacity
(seeded).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

KINDS = ("src_tgt", "tgt_fp", "tgt_fn")  # the benchmark kinds (x rank 1-3: the 9 settings)
ALL_KINDS = ("src_tgt", "tgt_fp", "tgt_fn", "tgt", "all")
DEFAULT_KINDS = ("src_tgt", "tgt_fp", "tgt_fn", "all")
TIE_ORDERS = ("pred_true", "true_pred")
NO_TRUE_INPUT_RULES = ("skip", "recall_zero")
PAIR_ORDER = "(true, pred)"  # how settings name a pair (src_tgt's "true" / "pred"), not the rank's tie order
# the upstream call (``identfy_tgt_misclf(misclf_type, fpfn, tgt_rank)``) that selects the same setting
_UPSTREAM = {"src_tgt": ("src_tgt", None), "tgt_fp": ("tgt", "fp"), "tgt_fn": ("tgt", "fn"), "tgt": ("tgt", None),
             "all": ("all", None)}


def confusion(label: Tensor, pred: Tensor, num_classes: int) -> np.ndarray:
    """``C[s, t]`` = number of inputs of true label s predicted as t."""
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (np.asarray(label), np.asarray(pred)), 1)
    return c


def setting_name(kind: str, rank: int | None) -> str:
    return "all" if kind == "all" else f"{kind}_r{rank}"


def target_mask(setting: dict[str, Any], label: Tensor, pred: Tensor) -> Tensor:
    """Which inputs (of any split) are the setting's target misclassifications (``[N]`` bool)."""
    label, pred = torch.as_tensor(label), torch.as_tensor(pred)
    kind = setting["kind"]
    if kind == "src_tgt":
        return (label == setting["true"]) & (pred == setting["pred"])
    if kind == "tgt_fp":
        return (pred == setting["label"]) & (label != setting["label"])
    if kind == "tgt_fn":
        return (label == setting["label"]) & (pred != setting["label"])
    if kind == "tgt":
        return (label != pred) & ((pred == setting["label"]) | (label == setting["label"]))
    if kind == "all":
        return label != pred
    raise ValueError(f"unknown setting kind {kind!r}; expected one of {list(ALL_KINDS)}")


def stratified_positive_sample(label: np.ndarray, pred: np.ndarray, index: np.ndarray, n_total: int,
                               seed: int) -> list[int]:
    """int(0.05 |split|)-style sample of correct inputs, stratified by predicted label (see module docstring)."""
    correct = label == pred
    labels = np.unique(pred[correct])
    pools = {int(l): index[correct & (pred == l)] for l in labels}
    n_correct = int(correct.sum())
    n_total = min(n_total, n_correct)
    if n_total == 0:
        return []
    take = {l: (len(p) * n_total) // n_correct for l, p in pools.items()}
    left = n_total - sum(take.values())
    while left > 0:
        # one more for the labels with the most leftover capacity (ties by label order)
        for l in sorted(pools, key=lambda l: (-(len(pools[l]) - take[l]), l)):
            if left == 0:
                break
            if len(pools[l]) - take[l] > 0:
                take[l] += 1
                left -= 1
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for l in sorted(pools):
        if take[l]:
            out.extend(int(i) for i in rng.choice(pools[l], size=take[l], replace=False))
    return sorted(out)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def pair_ranking(c: np.ndarray, tie_order: str = "pred_true") -> list[tuple[int, int, int]]:
    """The confusion pairs with at least one input as (count, true, pred), most frequent first; equal counts by
    (pred, true) (``tie_order="pred_true"``, as published) or (true, pred) (``"true_pred"``)."""
    _check_choice("tie_order", tie_order, TIE_ORDERS)
    k = c.shape[0]
    off = [(int(c[s, t]), s, t) for s in range(k) for t in range(k) if s != t and c[s, t] > 0]
    if tie_order == "pred_true":
        off.sort(key=lambda v: (-v[0], v[2], v[1]))
    else:
        off.sort(key=lambda v: (-v[0], v[1], v[2]))
    return off


def label_metrics(c: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label precision, recall and F1 ``[C]`` of a confusion table ``c[true, pred]``.

    precision = TP / #predicted (0 for a label never predicted); recall = TP / #true (NaN for a label with no true
    input); f1 = 2 P R / (P + R) with both P and R taken as 0 on a zero division, 0 when P + R = 0 (the published
    code's definition, float operations in that order); NaN for a label neither true nor predicted."""
    tp = np.diag(c).astype(np.float64)
    n_pred, n_true = c.sum(0), c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
        recall = np.where(n_true > 0, tp / np.maximum(n_true, 1), np.nan)
        r0 = np.nan_to_num(recall, nan=0.0)
        denom = precision + r0
        f1 = np.where(denom > 0, 2 * precision * r0 / np.where(denom > 0, denom, 1.0), 0.0)
    f1 = np.where((n_pred > 0) | (n_true > 0), f1, np.nan)
    return {"precision": precision, "recall": recall, "f1": f1}


def published_order(index: np.ndarray, label: np.ndarray, pred: np.ndarray) -> list[int]:
    """Sample indices in the published code's I_neg order: grouped by (pred, true) pair in lexicographic order,
    ascending sample index inside a group (the published code listed a pair's inputs in split order)."""
    order = np.lexsort((index, label, pred))
    return index[order].tolist()


def analyze(label: Tensor, pred: Tensor, index: Tensor, num_classes: int, ranks: int = 3,
            pos_fraction: float = 0.05, seed: int = 0, split: str = "repair", tie_order: str = "pred_true",
            no_true_input: str = "skip", kinds: Sequence[str] = DEFAULT_KINDS) -> dict[str, Any]:
    """The settings of one split as a JSON-serialisable dict (``settings``, ``skipped``, ``options``, ...).

    Args:
        label, pred, index: ``[N]`` true labels, predictions and sample indices of the split.
        num_classes: C; labels and predictions must lie in 0..C-1.
        ranks: ranks 1..ranks of each ranked kind.
        pos_fraction, seed: the repair I_pos sample (``int(pos_fraction N)`` inputs, seeded).
        tie_order: ``"pred_true"`` (default, as published) or ``"true_pred"``: how equal src_tgt counts are ordered.
        no_true_input: ``"skip"`` (default: a label with no true input is left out of tgt_fn and reported) or
            ``"recall_zero"`` (ranked with recall 0, as published).
        kinds: which kinds to build, a subset of ``ALL_KINDS`` (default: the benchmark kinds and ``all``; add
            ``"tgt"`` for the published F1 setting).
    """
    _check_choice("tie_order", tie_order, TIE_ORDERS)
    _check_choice("no_true_input", no_true_input, NO_TRUE_INPUT_RULES)
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise ValueError(f"unknown setting kind(s) {bad}; expected a subset of {list(ALL_KINDS)}")
    if int(ranks) < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    label = np.asarray(torch.as_tensor(label)).astype(np.int64).reshape(-1)
    pred = np.asarray(torch.as_tensor(pred)).astype(np.int64).reshape(-1)
    index = np.asarray(torch.as_tensor(index)).astype(np.int64).reshape(-1)
    if not (len(label) == len(pred) == len(index)):
        raise ValueError(f"label, pred and index differ in length: {len(label)}, {len(pred)}, {len(index)}")
    if len(label) and (label.min() < 0 or label.max() >= num_classes or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"labels or predictions outside 0..{num_classes - 1}")
    if len(np.unique(index)) != len(index):
        raise ValueError("index holds duplicate sample indices; expected one row per sample")
    c = confusion(label, pred, num_classes)
    correct = label == pred
    pos_all = sorted(index[correct].tolist())
    n_pos_repair = int(pos_fraction * len(label))
    pos_repair = stratified_positive_sample(label, pred, index, n_pos_repair, seed)
    met = label_metrics(c)
    precision, recall, f1 = met["precision"], met["recall"], met["f1"]
    n_pred, n_true = c.sum(0), c.sum(1)
    never_predicted = [int(l) for l in range(num_classes) if n_pred[l] == 0]
    no_true = [int(l) for l in range(num_classes) if n_true[l] == 0]

    settings: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    def add(kind: str, rank: int | None, neg_mask: np.ndarray, **info: Any) -> None:
        name = setting_name(kind, rank)
        neg = sorted(index[neg_mask].tolist())
        if not neg:
            skipped[name] = f"{name}: no misclassified inputs ({info}); skipped"
            return
        pos_label = None
        if kind == "src_tgt":
            pos_label = sorted(index[correct & (label == info["true"])].tolist())
        elif kind in ("tgt_fn", "tgt"):
            pos_label = sorted(index[correct & (label == info["label"])].tolist())
        mtype, fpfn = _UPSTREAM[kind]
        upstream = {"misclf_type": mtype, "fpfn": fpfn, "tgt_rank": rank}
        if kind == "src_tgt":
            info["published_key"] = f"{info['pred']}to{info['true']}"
        settings[name] = {"kind": kind, "rank": rank, "true": None, "pred": None, "label": None, **info,
                          "n_neg": len(neg), "i_neg": neg,
                          "i_neg_published": published_order(index[neg_mask], label[neg_mask], pred[neg_mask]),
                          "i_pos": pos_all, "i_pos_label": pos_label, "i_pos_repair": pos_repair,
                          "upstream": upstream}

    if "src_tgt" in kinds:
        off = pair_ranking(c, tie_order)
        for r in range(1, ranks + 1):
            if r <= len(off):
                _, s, t = off[r - 1]
                add("src_tgt", r, (label == s) & (pred == t), true=s, pred=t)
            else:
                skipped[setting_name("src_tgt", r)] = f"only {len(off)} distinct confusion pairs; no rank {r}"

    ranked = {
        # kind: (metric name, values, labels that take part, I_neg of a label)
        "tgt_fp": ("precision", precision, list(range(num_classes)), lambda l: (pred == l) & (label != l)),
        "tgt_fn": ("recall", np.nan_to_num(recall, nan=0.0) if no_true_input == "recall_zero" else recall,
                   [l for l in range(num_classes) if n_true[l] > 0 or (no_true_input == "recall_zero"
                                                                       and n_pred[l] > 0)],
                   lambda l: (label == l) & (pred != l)),
        "tgt": ("f1", f1, [l for l in range(num_classes) if not np.isnan(f1[l])],
                lambda l: (label != pred) & ((pred == l) | (label == l))),
    }
    for kind, (metric_name, metric, labels, neg_of) in ranked.items():
        if kind not in kinds:
            continue
        for l in range(num_classes):
            if l in labels:
                continue
            if kind == "tgt_fn" and n_pred[l] > 0:
                skipped[f"tgt_fn label {l}"] = (
                    f"label {l} has no true input: recall undefined; left out of the tgt_fn ranking "
                    "(no_true_input='recall_zero' ranks it first with recall 0, as published)")
            else:
                skipped[f"{kind} label {l}"] = (f"label {l} is neither a true label nor predicted: no "
                                                f"{metric_name}; left out of the {kind} ranking")
        order = sorted(labels, key=lambda l: (metric[l], l))
        for r in range(1, ranks + 1):
            if r > len(order):
                skipped[setting_name(kind, r)] = f"fewer than {r} labels"
                continue
            l = order[r - 1]
            extra = {metric_name: float(metric[l])}
            if kind == "tgt_fn" and n_true[l] == 0:
                extra["no_true_input"] = True
            add(kind, r, neg_of(l), label=int(l), **extra)
    if "all" in kinds:
        add("all", None, ~correct)
    options = {"ranks": int(ranks), "pos_fraction": pos_fraction, "seed": seed, "tie_order": tie_order,
               "no_true_input": no_true_input, "kinds": list(kinds)}
    return {"split": split, "n": int(len(label)), "num_classes": num_classes, "accuracy": float(correct.mean())
            if len(label) else float("nan"), "pair_order": PAIR_ORDER, "confusion": c.tolist(),
            "precision": precision.tolist(), "recall": [None if np.isnan(v) else float(v) for v in recall],
            "f1": [None if np.isnan(v) else float(v) for v in f1], "never_predicted": never_predicted,
            "no_true_input_labels": no_true, "pos_fraction": pos_fraction, "seed": seed, "options": options,
            "settings": settings, "skipped": skipped}
