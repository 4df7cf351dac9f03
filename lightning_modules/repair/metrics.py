"""Repair metrics (docs/methods.md, section 6) as torchmetrics: sums of counts as state (``dist_reduce_fx="sum"``), so a
multi-process run computes the same numbers as one process (``tests/test_repair_metrics.py`` checks a 2-process
gloo run).

- repair rate  RR = #(target misclassifications now correct) / #(target misclassifications);
- break rate   BR = #(correct before -> wrong after) / #(correct before);
- accuracy before / after and delta = after - before.

A "target misclassification" is one of the setting's (``vitfl.localization.misclf.target_mask`` on the labels and the
predictions *before* repair); with no target given, every misclassification is a target. Empty denominators give
NaN (e.g. a test fold without the setting's confusion), never an error.

Every update takes ``(pred_before [N], pred_after [N], label [N], target [N] bool or None)``; predictions may be
class indices or logits ``[N, C]`` (argmax taken).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RepairRate", "BreakRate", "RepairAccuracy", "repair_rate", "break_rate", "repair_counts",
           "evaluate_patch"]


def _preds(p: Tensor) -> Tensor:
    p = torch.as_tensor(p)
    return p.argmax(-1) if p.is_floating_point() and p.ndim == 2 else p.long().reshape(-1)


def repair_counts(pred_before: Tensor, pred_after: Tensor, label: Tensor, target: Tensor | None = None
                  ) -> dict[str, Tensor]:
    """Counts: ``targets``, ``fixed``, ``correct_before``, ``broken``, ``correct_after``, ``total`` (int64)."""
    b, a, y = _preds(pred_before), _preds(pred_after), torch.as_tensor(label).long().reshape(-1)
    if not (len(b) == len(a) == len(y)):
        raise ValueError(f"pred_before, pred_after and label differ in length: {len(b)}, {len(a)}, {len(y)}")
    ok_b, ok_a = b == y, a == y
    t = ~ok_b if target is None else torch.as_tensor(target, dtype=torch.bool).reshape(-1).to(y.device)
    if len(t) != len(y):
        raise ValueError(f"target mask has {len(t)} entries for {len(y)} inputs")
    if bool((t & ok_b).any()):
        raise ValueError("a target misclassification is correctly classified before repair: the target mask must "
                         "come from the predictions before repair")
    return {"targets": t.sum(), "fixed": (t & ok_a).sum(), "correct_before": ok_b.sum(),
            "broken": (ok_b & ~ok_a).sum(), "correct_after": ok_a.sum(), "total": torch.tensor(len(y))}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num.double() / den.double() if int(den) > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def repair_rate(pred_before: Tensor, pred_after: Tensor, label: Tensor, target: Tensor | None = None) -> Tensor:
    """RR = fixed targets / targets.

    >>> repair_rate(torch.tensor([1, 1, 0, 2]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 0, 2]))
    tensor(0.5000, dtype=torch.float64)
    """
    c = repair_counts(pred_before, pred_after, label, target)
    return _ratio(c["fixed"], c["targets"])


def break_rate(pred_before: Tensor, pred_after: Tensor, label: Tensor) -> Tensor:
    """BR = (correct -> wrong) / correct before.

    >>> break_rate(torch.tensor([1, 1, 0, 2]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 0, 2]))
    tensor(0.5000, dtype=torch.float64)
    """
    c = repair_counts(pred_before, pred_after, label)
    return _ratio(c["broken"], c["correct_before"])


class _CountMetric(Metric):
    full_state_update = False
    _counts: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for k in self._counts:
            self.add_state(k, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_before: Tensor, pred_after: Tensor, label: Tensor, target: Tensor | None = None) -> None:
        c = repair_counts(pred_before, pred_after, label, target)
        for k in self._counts:
            setattr(self, k, getattr(self, k) + c[k].to(self.device))


class RepairRate(_CountMetric):
    """RR = fixed / targets (NaN without targets)."""

    higher_is_better = True
    _counts = ("fixed", "targets")

    def compute(self) -> Tensor:
        return _ratio(self.fixed, self.targets)


class BreakRate(_CountMetric):
    """BR = broken / correct before (NaN without correct inputs)."""

    higher_is_better = False
    _counts = ("broken", "correct_before")

    def compute(self) -> Tensor:
        return _ratio(self.broken, self.correct_before)


class RepairAccuracy(_CountMetric):
    """``{"acc_before", "acc_after", "delta_acc"}`` (after - before)."""

    _counts = ("correct_before", "correct_after", "total")

    def compute(self) -> dict[str, Tensor]:
        before, after = _ratio(self.correct_before, self.total), _ratio(self.correct_after, self.total)
        return {"acc_before": before, "acc_after": after, "delta_acc": after - before}


@torch.no_grad()
def evaluate_patch(head, patch, x: Tensor, label: Tensor, target_fn=None, batch_size: int = 4096
                   ) -> dict[str, float]:
    """RR, BR, accuracy before / after / delta of ``patch`` on cached states ``x [N, d]`` with ``label [N]``
    (a token head's ``x [N, T, d]``, in batches that bound the later blocks' work tensors).

    ``head``: the unpatched FFN head (restored on exit); ``target_fn(label, pred_before) -> bool [N]`` names the
    target misclassifications (e.g. ``lambda y, p: target_mask(setting, y, p)``); None: every misclassification.
    Returns floats plus the counts (``n_targets``, ``n_fixed``, ``n_correct_before``, ``n_broken``, ``n``)."""
    rr, br, acc = RepairRate(), BreakRate(), RepairAccuracy()
    dev = head.fc_bef.weight.device
    x = torch.as_tensor(x)
    if getattr(head, "token_axis", False) and x.dim() == 3:  # token states: the later blocks run per batch
        batch_size = max(1, min(batch_size, (1 << 24) // max(1, x.shape[1] * 4 * x.shape[2])))
    for xb, yb in zip(torch.as_tensor(x).split(batch_size), torch.as_tensor(label).split(batch_size)):
        xb = xb.to(dev, head.fc_bef.weight.dtype)
        before = head(xb).argmax(-1).cpu()
        with patch.applied(head):
            after = head(xb).argmax(-1).cpu()
        target = None if target_fn is None else target_fn(yb.cpu(), before)
        for m in (rr, br, acc):
            m.update(before, after, yb.cpu(), target)
    a = acc.compute()
    return {"rr": float(rr.compute()), "br": float(br.compute()), **{k: float(v) for k, v in a.items()},
            "n_targets": int(rr.targets), "n_fixed": int(rr.fixed), "n_correct_before": int(br.correct_before),
            "n_broken": int(br.broken), "n": int(acc.total)}
