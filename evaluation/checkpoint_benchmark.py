"""The checkpoint benchmark (the published exp-fl-5; docs/methods.md, section 5): can an FL method, run on the model of
epoch e-1, predict which last-FFN weights the next epoch of training changes most?

Ground truth (:func:`weight_change_ground_truth`): every weight of W_bef and W_aft scored by
``|W(e) - W(e-1)|`` (global index W_bef then W_aft), from the per-epoch FFN weight files
(``RunStore.ffn_weights(epoch)``: safetensors ``W_bef``, ``b_bef``, ``W_aft``, ``b_aft`` of the last FFN, and of any
other block L under ``block=L.W_bef``, ...: :func:`load_ffn_weights` with ``block``; for a run trained before
per-block weight files, :func:`block_weights_of_epoch` reads block L from the epoch's checkpoint); positives = its top
``pos_fraction`` (1 %) with ties broken by index (vitfl.evaluation.ranking_metrics). Biases are not ranked (the
published benchmark ranked the two weight matrices only).

Each FL method runs on the epoch e-1 model: its FFN head with the epoch e-1 W_bef / W_aft / biases loaded into a
copy (:func:`head_at_epoch`) and the states cached for that model, with I_neg / I_pos from that model's own
misclassifications (``vitfl.localization.misclf.analyze`` on its states). Its full score vector (neuron scores spread
onto their neurons' weights) is then compared with the ground truth: P@K, R@K, F1@K, top-K overlap for K in
{0.1, 0.5, 1, 2, 5} % of the weights, AP and Spearman, with random's exact expectation beside each
(:func:`vitfl.evaluation.ranking_metrics.evaluate_ranking`).

Every row records which inputs the FL used (split, setting, |I_neg|, |I_pos|, the states' model hash) and a
``circular`` flag: True when the FL inputs come from the split the model was trained on (the ground truth is
the training update on those very inputs, so a gradient method would partly re-derive it).

**Which ground truth, which comparison.** A :class:`GroundTruth` names the optimizer whose epoch made it
(``optimizer``: ``"recorded"``-run's own, e.g. AdamW, or a replayed ``"sgd_momentum"`` epoch from the same W(e-1),
see :mod:`vitfl.evaluation.optimizer_replay`) and how its positive count was rounded (``k_rounding``). One FL score vector is
compared with every ground truth and under every comparison (:func:`ranking_row`: ``"corrected"``, the weights
themselves, or ``"published_positional"``, exp-fl-5-7's position-by-position comparison of sorted rank arrays,
:func:`vitfl.evaluation.ranking_metrics.positional_metrics`), so the FL runs once per (setting, method).
:func:`worst_possible_scores` is the control ranking (the least-changed weights first): it scores 0 under the
corrected comparison and about as much as the best ranking under the positional one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from vitfl.evaluation.injected_faults import weight_level_scores
from vitfl.evaluation.ranking_metrics import (COMPARISONS, DEFAULT_FRACTIONS, evaluate_ranking, positional_metrics,
                                        top_fraction_positives)
from vitfl.localization.ffn import FFNHead

__all__ = ["WEIGHT_KEYS", "CheckpointMismatchError", "GroundTruth", "load_ffn_weights", "block_weights_of_epoch",
           "weight_change",
           "weight_change_ground_truth", "head_at_epoch", "is_circular", "evaluate_method_on_checkpoint",
           "localize_on_checkpoint", "ranking_row", "worst_possible_scores", "WORST_POSSIBLE"]

#: the control row's method name: the worst possible ranking (least-changed weights first)
WORST_POSSIBLE = "worst_possible"

WEIGHT_KEYS = ("W_bef", "b_bef", "W_aft", "b_aft")
#: split names the model was trained on (FL inputs from these make the benchmark circular)
TRAINING_SPLITS = ("train",)


class CheckpointMismatchError(ValueError):
    """Weight files and head disagree (shapes, or the checkpoint is not the epoch the weights claim)."""


def load_ffn_weights(path: str | Path, block: int = -1, num_blocks: int | None = None) -> dict[str, Tensor]:
    """The FFN weights of one epoch (safetensors written by ``vitfl.callbacks.ffn_weights``) under the plain names
    (``W_bef``, ``b_bef``, ``W_aft``, ``b_aft``, ``ls_gamma``): the last block's (``block`` -1, or the last index of
    a model of ``num_blocks`` blocks), else block ``block``'s ``block=L.*`` tensors
    (:class:`vitfl.callbacks.ffn_weights.MissingBlockError` when the file has none: see
    :func:`block_weights_of_epoch`)."""
    from vitfl.callbacks.ffn_weights import block_ffn_weights
    from vitfl.callbacks.ffn_weights import load_ffn_weights as read

    w = read(path, all_blocks=True)
    if block == -1 or num_blocks is None:
        if block not in (-1, None) and num_blocks is None:
            raise ValueError(f"block {block}: pass the model's num_blocks to read it from {path}")
        w = {k: v for k, v in w.items() if not k.startswith("block=")}
    else:
        w = block_ffn_weights(w, block, num_blocks, path)
    missing = [k for k in WEIGHT_KEYS if k not in w]
    if missing:
        raise CheckpointMismatchError(f"{path} lacks {missing} (has {sorted(w)})")
    return w


def block_weights_of_epoch(weights_path: str | Path, checkpoint_path: str | Path, block: int, num_blocks: int,
                           load_model: Callable[[str | Path], Any] | None = None
                           ) -> tuple[dict[str, Tensor], Path]:
    """Block ``block``'s FFN weights of one epoch and the file they came from: the per-epoch weight file
    (``weights_path``) where it holds the block (every block's FFN since per-block weights; the last block
    always), else -- a file written before per-block weights -- that epoch's checkpoint (``checkpoint_path``,
    ``load_model``: default ``vitfl.lightning_modules.runs.load_classifier``) through
    :func:`vitfl.localization.ffn.ffn_head`. Neither: a FileNotFoundError naming both and what to do."""
    from vitfl.callbacks.ffn_weights import MissingBlockError, ffn_state
    from vitfl.localization.ffn import ffn_head

    weights_path, checkpoint_path = Path(weights_path), Path(checkpoint_path)
    why = f"there is no {weights_path}"
    if weights_path.is_file():
        try:
            return load_ffn_weights(weights_path, block, num_blocks), weights_path
        except MissingBlockError as e:
            why = str(e)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"block {block}'s FFN weights: {why}, and there is no checkpoint {checkpoint_path} to "
                                "read them from. Retrain the run (the training callback "
                                "callbacks.ffn_weights.LastFFNWeightsWriter now writes every block's FFN), restore "
                                "the checkpoint, or evaluate the last block (block -1)")
    if load_model is None:
        from vitfl.lightning_modules.runs import load_classifier as load_model
    model = load_model(checkpoint_path)
    return ffn_state(ffn_head(model, block, tokens=True)), checkpoint_path


def weight_change(prev: Mapping[str, Tensor], nxt: Mapping[str, Tensor]) -> Tensor:
    """``|W(e) - W(e-1)|`` over W_bef then W_aft, ``[2 d d_ff]`` float64."""
    for k in ("W_bef", "W_aft"):
        if prev[k].shape != nxt[k].shape:
            raise CheckpointMismatchError(f"{k} changes shape between epochs: {tuple(prev[k].shape)} -> "
                                          f"{tuple(nxt[k].shape)}")
    return torch.cat([(nxt["W_bef"].double() - prev["W_bef"].double()).abs().reshape(-1),
                      (nxt["W_aft"].double() - prev["W_aft"].double()).abs().reshape(-1)])


@dataclass
class GroundTruth:
    scores: Tensor       #: |W(e) - W(e-1)| ``[total]``
    positives: Tensor    #: bool ``[total]``, the top pos_fraction of scores
    epoch: int           #: e
    prev_epoch: int      #: e - 1
    pos_fraction: float
    info: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "recorded"   #: the optimizer whose epoch e made W(e): the run's own, or a replayed one
    k_rounding: str = "round"     #: how the positive count was made from pos_fraction
    n_first: int | None = None    #: |W_bef| (the first matrix of the global index), for the positional comparison


def weight_change_ground_truth(prev: Mapping[str, Tensor], nxt: Mapping[str, Tensor], epoch: int,
                               pos_fraction: float = 0.01, optimizer: str = "recorded",
                               k_rounding: str = "round") -> GroundTruth:
    """|W(e) - W(e-1)| over W_bef then W_aft; positives = its top ``pos_fraction`` (K rounded as ``k_rounding``).
    ``optimizer`` names what made W(e) (recorded in every row)."""
    s = weight_change(prev, nxt)
    pos = top_fraction_positives(s, pos_fraction, rounding=k_rounding)
    n_unchanged = int((s == 0).sum())
    return GroundTruth(s, pos, epoch, epoch - 1, pos_fraction,
                       {"n_pos": int(pos.sum()), "total": s.numel(), "n_unchanged": n_unchanged,
                        "max_change": float(s.max()), "mean_change": float(s.mean()),
                        "threshold": float(s[pos].min()), "optimizer": optimizer, "k_rounding": k_rounding,
                        "n_pos_in_W_bef": int(pos[:prev["W_bef"].numel()].sum()),
                        "ties": "equal |dW| ranked by ascending global index"},
                       optimizer, k_rounding, int(prev["W_bef"].numel()))


def worst_possible_scores(gt: GroundTruth) -> Tensor:
    """The control ranking: the least-changed weights first (scores = -|dW|)."""
    return -gt.scores


def ranking_row(scores: Tensor, gt: GroundTruth, comparison: str = "corrected",
                fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, Any]:
    """The metrics of one score vector ``[total]`` against ``gt`` under ``comparison`` ("corrected" |
    "published_positional"), with the ground truth's optimizer, comparison and K rounding as columns."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    if comparison == "corrected":
        row = evaluate_ranking(scores, gt.positives, gt_scores=gt.scores, fractions=fractions,
                               k_rounding=gt.k_rounding)
    else:
        if gt.n_first is None:
            raise ValueError("the positional comparison needs the ground truth's W_bef size (n_first)")
        row = positional_metrics(scores, gt.scores, gt.n_first, int(gt.positives.sum()), fractions,
                                 k_rounding=gt.k_rounding)
    return {"optimizer": gt.optimizer, "comparison": comparison, "k_rounding": gt.k_rounding, **row}


@torch.no_grad()
def head_at_epoch(head: FFNHead, weights: Mapping[str, Tensor], check_tol: float | None = None) -> FFNHead:
    """A copy of ``head`` with the epoch's W_bef, b_bef, W_aft, b_aft (and ``ls_gamma`` if present) loaded.
    With ``check_tol``, refuse if the head's own weights differ from the file's by more than that (the head
    then comes from another checkpoint than the weights, and its cached states would not match)."""
    out = head.copy()
    pairs = (("W_bef", out.fc_bef.weight), ("b_bef", out.fc_bef.bias), ("W_aft", out.fc_aft.weight),
             ("b_aft", out.fc_aft.bias))
    for k, p in pairs:
        if p is None:
            continue
        w = weights[k]
        if tuple(w.shape) != tuple(p.shape):
            raise CheckpointMismatchError(f"{k} has shape {tuple(w.shape)} in the weight file but "
                                          f"{tuple(p.shape)} in the head")
        if check_tol is not None:
            diff = float((p.double() - w.double().to(p.device)).abs().max())
            if diff > check_tol:
                raise CheckpointMismatchError(
                    f"{k} of the head differs from the weight file by up to {diff:.3g} (> {check_tol}): the model "
                    "is not the checkpoint of this epoch")
        p.copy_(w.to(p.dtype).to(p.device))
    gamma = getattr(out.layer_scale, "gamma", None)
    if gamma is not None and "ls_gamma" in weights:
        gamma.copy_(weights["ls_gamma"].to(gamma.dtype))
    return out


def is_circular(fl_split: str, training_splits: Sequence[str] = TRAINING_SPLITS) -> bool:
    """True when the FL inputs come from a split the model was trained on."""
    return fl_split in set(training_splits)


def _default_localize(head, x, label, is_neg, method, budget, batch_size, seed, **opts):
    from vitfl.localization.ranking import localize

    return localize(head, x, label, is_neg, method, budget, batch_size=batch_size, seed=seed, **opts)


def localize_on_checkpoint(head_prev: FFNHead, x: Tensor, label: Tensor, is_neg: Tensor, method: str, budget: int,
                           seed: int = 0, batch_size: int = 256, method_opts: Mapping[str, Any] | None = None,
                           localize_fn: Callable | None = None) -> tuple[Tensor, str, float]:
    """One FL method on the epoch e-1 head: (its scores over every weight ``[total]``, its level, wall seconds)."""
    localize_fn = localize_fn or _default_localize
    if not bool(is_neg.any()):
        raise ValueError("the setting has no I_neg inputs on the epoch e-1 model")
    t0 = time.perf_counter()
    res = localize_fn(head_prev, x, label, is_neg, method, int(budget), batch_size, seed, **dict(method_opts or {}))
    return weight_level_scores(res, head_prev.index), res.level, time.perf_counter() - t0


def fl_facts(method: str, level: str, gt: GroundTruth, fl_inputs: Mapping[str, Any], is_neg: Tensor, wall: float,
             seed: int, training_splits: Sequence[str] = TRAINING_SPLITS) -> dict[str, Any]:
    """The facts of one FL run on the checkpoint benchmark (what it ran on), for a result row."""
    split = str(fl_inputs.get("split", "?"))
    return {"method": method, "level": level, "epoch_prev": gt.prev_epoch, "epoch": gt.epoch,
            "pos_fraction": gt.pos_fraction, **{f"fl_{k}": v for k, v in fl_inputs.items()},
            "n_neg": int(is_neg.sum()), "n_pos_inputs": int((~is_neg).sum()),
            "circular": is_circular(split, training_splits),
            "circularity_note": (f"FL inputs from the training split {split!r}: the ground truth is the "
                                 "update on these inputs" if is_circular(split, training_splits) else
                                 f"FL inputs from {split!r}, disjoint from training {list(training_splits)}"),
            "fl_s": wall, "seed": seed}


def evaluate_method_on_checkpoint(head_prev: FFNHead, x: Tensor, label: Tensor, is_neg: Tensor, method: str,
                                  gt: GroundTruth, fl_inputs: Mapping[str, Any],
                                  fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                                  batch_size: int = 256, method_opts: Mapping[str, Any] | None = None,
                                  localize_fn: Callable | None = None,
                                  training_splits: Sequence[str] = TRAINING_SPLITS,
                                  comparison: str = "corrected") -> dict[str, Any]:
    """One method on the epoch e-1 head: a flat row of facts and metrics. ``x [N, d]``, ``label [N]`` and
    ``is_neg [N]`` are the setting's I_neg and I_pos rows; ``fl_inputs`` describes them (split, setting,
    states model hash, ...) and is copied into the row."""
    if not bool(is_neg.any()):
        raise ValueError(f"setting {fl_inputs.get('setting')!r} has no I_neg inputs on the epoch {gt.prev_epoch} "
                         "model")
    scores, level, wall = localize_on_checkpoint(head_prev, x, label, is_neg, method, int(gt.positives.sum()), seed,
                                                 batch_size, method_opts, localize_fn)
    return {**fl_facts(method, level, gt, fl_inputs, is_neg, wall, seed, training_splits),
            **ranking_row(scores, gt, comparison, fractions)}
