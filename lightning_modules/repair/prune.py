"""Simple repair baselines (docs/methods.md, section 6): set located weights to 0 (``prune``) or re-initialise them from
N(mean, std) of their matrix (``reinit``, seeded; population std).

Replacing *every* located weight is what a prune / re-init baseline did before; on a layer the model needs it
mostly breaks inputs (fitness far below the original). The tuned default, ``select="prefix"``, keeps the idea
(the only change is to zero / re-draw located weights) but lets the repair fitness choose which (see
``docs/repair_baselines.md``):

1. for each located weight i alone, the fitness gain g_i = F(replace i) - F(original) (K candidates, one batched
   evaluation);
2. order the weights by g_i (descending, ties by position) and evaluate the K prefixes "replace the m best",
   m = 1..K (one more batched evaluation); the patch is the prefix with the highest fitness (ties: the smaller m).

That is 2K fitness evaluations, against DE's 100 per generation. ``select="all"`` replaces every located weight
(the earlier behaviour). Both are one-shot LightningModules (one training step) so that the sweep treats every
method alike."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitfl.lightning_modules.repair import register_repair
from vitfl.lightning_modules.repair.base import RepairModule
from vitfl.lightning_modules.repair.de import matrix_init_stats
from vitfl.lightning_modules.repair.patch import RepairInputError

__all__ = ["PruneRepair", "ReinitRepair", "SELECTS", "best_prefix"]


SELECTS = ("prefix", "all")


def best_prefix(old: Tensor, new: Tensor, fitness) -> tuple[Tensor, dict[str, Any]]:
    """The values of :mod:`this module`'s ``select="prefix"``: ``old``, ``new`` ``[K]`` (original and replacement
    values), ``fitness`` maps candidates ``[P, K]`` to a :class:`~.fitness.FitnessResult`. Returns the chosen
    values ``[K]`` and statistics (``n_replaced``, ``fitness_best``, ``evaluations``)."""
    old, new = old.double(), new.double()
    k = len(old)
    f0 = float(fitness(old.unsqueeze(0)).fitness[0])
    single = old.repeat(k, 1)
    single[torch.arange(k), torch.arange(k)] = new
    gain = fitness(single).fitness.double() - f0
    order = torch.from_numpy(np.lexsort((np.arange(k), -gain.cpu().numpy()))).long()  # gain desc, then index
    rank = torch.empty(k, dtype=torch.long)
    rank[order] = torch.arange(k)
    take = rank.unsqueeze(0) < torch.arange(1, k + 1).unsqueeze(1)  # row m-1: the m best weights replaced
    prefixes = torch.where(take, new.unsqueeze(0), old.unsqueeze(0))
    f = fitness(prefixes).fitness.double()
    m = int(torch.argmax(f))  # first maximum: ties go to the smaller prefix
    return prefixes[m].clone(), {"n_replaced": m + 1, "fitness_best": float(f[m]), "evaluations": 1 + 2 * k,
                                 "n_positive_gain": int((gain > 0).sum())}


class _OneShotRepair(RepairModule):
    """One training step computes the new values (:meth:`compute_values`: the replacement of every located
    weight), then ``select`` decides which located weights take them."""

    option_choices = {"select": SELECTS}

    def __init__(self, *args, select: str = "prefix", **kwargs):
        super().__init__(*args, **kwargs)
        if select not in SELECTS:
            raise RepairInputError(f"unknown select {select!r}; expected one of {SELECTS}")
        self.select = select
        self.automatic_optimization = False
        self._new: Tensor | None = None
        self._stats: dict[str, Any] = {}

    def compute_values(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {"select": self.select}

    def search_summary(self) -> dict[str, Any]:
        return dict(self._stats)

    def training_step(self, batch, batch_idx):
        if self._new is None:
            new = self.compute_values().detach().cpu()
            if self.select == "prefix":
                new, self._stats = best_prefix(self.old_values, new, self.fitness_evaluator())
            else:
                self._stats = {"n_replaced": len(new)}
            self._new = new
        self._count_step()
        self.trainer.should_stop = True
        return None

    def new_values(self) -> Tensor:
        if self._new is None:
            raise RuntimeError(f"{self.name} has not run yet: call Trainer.fit (or fit_repair) first")
        return self._new

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._new is not None:
            checkpoint["repair_new_values"] = self._new
            checkpoint["repair_stats"] = self._stats

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._new = checkpoint.get("repair_new_values")
        self._stats = checkpoint.get("repair_stats", {})


@register_repair("prune")
class PruneRepair(_OneShotRepair):
    """w <- 0 for the located weights ``select`` picks (default: the fitness-best prefix; "all": every one)."""

    def compute_values(self) -> Tensor:
        return torch.zeros(len(self.weights), dtype=torch.float64)


@register_repair("reinit")
class ReinitRepair(_OneShotRepair):
    """w <- N(mean(W), std(W)) of the weight's matrix W, drawn with ``torch.Generator().manual_seed(seed)``, for
    the located weights ``select`` picks (default: the fitness-best prefix; "all": every one)."""

    def compute_values(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(len(self.weights), generator=gen, dtype=torch.float64)
        out = torch.empty(len(self.weights), dtype=torch.float64)
        for k, W in enumerate(self.head.weights()):
            sel = self.weights[:, 0] == k
            mean, std = matrix_init_stats(W.detach())
            out[sel] = mean + std * noise[sel]
        return out
