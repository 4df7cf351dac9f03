"""Masked fine-tuning (docs/methods.md, section 6): gradient descent on the located weights alone.

Minimises a weighted cross-entropy (on logits) of the FFN head over I_neg + I_pos (cached states) with respect to
W_bef and W_aft, where gradient hooks multiply each matrix's gradient by the 0/1 mask of the located weights, so
every other entry gets a zero gradient; every other head parameter is frozen. The optimiser has no weight decay
(decay would move masked entries). At the end the module checks that no entry outside the located weights moved
(bit for bit), records the new values, and restores its head to the original weights; the result is the patch.

The tuned defaults make it a baseline that optimises what DE's fitness rewards (``docs/repair_baselines.md``):

- ``loss_weighting="fitness"``: input i's cross-entropy is weighted as the fitness weights it, so fixing I_neg
  counts ``alpha`` (10) times as much as keeping an I_pos input:
  ``L = sum_i w_i CE_i / sum_i w_i`` with ``w_i = alpha`` on I_neg and 1 on I_pos (fitness "arachne"), or
  ``w_i = alpha / ((1 + alpha) |I_neg|)`` and ``1 / ((1 + alpha) |I_pos|)`` (fitness "reptran");
  ``"mean"``: the plain mean over I_neg + I_pos (the earlier default).
- full-batch Adam (``batch_size=None``: the sets are a few hundred cached states), ``lr`` 0.01, 100 epochs;
- ``keep_best=True``: the fitness of the located values is evaluated after every epoch (one candidate: cheap)
  and the patch is the best epoch's, as DE returns its best individual; the original values compete too, so
  the patch never has a lower in-sample fitness than the unrepaired model. ``False``: the last epoch's values.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from vitfl.core.registry import Range
from vitfl.lightning_modules.repair import register_repair
from vitfl.lightning_modules.repair.base import RepairModule
from vitfl.lightning_modules.repair.patch import RepairInputError, read_values

__all__ = ["FineTuneRepair", "OPTIMIZERS", "LOSS_WEIGHTINGS", "fitness_weights"]

OPTIMIZERS = ("adam", "sgd")
LOSS_WEIGHTINGS = ("fitness", "mean")


def fitness_weights(is_neg: Tensor, alpha: float, variant: str = "arachne") -> Tensor:
    """Per-input loss weights ``[N]`` (float64) matching the repair fitness: ``alpha`` on I_neg and 1 on I_pos
    ("arachne"), or ``alpha / ((1 + alpha) |I_neg|)`` and ``1 / ((1 + alpha) |I_pos|)`` ("reptran")."""
    is_neg = torch.as_tensor(is_neg, dtype=torch.bool)
    n_neg, n_pos = int(is_neg.sum()), int((~is_neg).sum())
    if variant == "arachne":
        w_neg, w_pos = float(alpha), 1.0
    elif variant == "reptran":
        w_neg, w_pos = alpha / ((1 + alpha) * max(n_neg, 1)), 1.0 / ((1 + alpha) * max(n_pos, 1))
    else:
        raise RepairInputError(f"unknown fitness variant {variant!r}; expected 'arachne' or 'reptran'")
    return torch.where(is_neg, torch.tensor(w_neg, dtype=torch.float64), torch.tensor(w_pos, dtype=torch.float64))


@register_repair("finetune")
class FineTuneRepair(RepairModule):
    """Options: ``lr`` (0.01), ``epochs`` (100), ``batch_size`` (None = full batch), ``optimizer`` ("adam" |
    "sgd"), ``momentum`` (SGD only, 0.9), ``loss_weighting`` ("fitness" | "mean"), ``keep_best`` (True).
    Logs ``repair/loss`` per step and ``repair/fitness`` per epoch (with ``keep_best``)."""

    option_ranges = {"lr": Range(0, None, lo_open=True), "epochs": (1, None), "batch_size": (1, None),
                     "momentum": (0, None)}
    option_choices = {"optimizer": OPTIMIZERS, "loss_weighting": LOSS_WEIGHTINGS}

    def __init__(self, head, weights, x_neg, label_neg, x_pos, label_pos, seed: int = 0, alpha: float = 10.0,
                 fitness: str = "arachne", loss: str = "logits", lr: float = 1e-2, epochs: int = 100,
                 batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.9,
                 loss_weighting: str = "fitness", keep_best: bool = True):
        super().__init__(head, weights, x_neg, label_neg, x_pos, label_pos, seed, alpha, fitness, loss)
        if optimizer not in OPTIMIZERS:
            raise RepairInputError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise RepairInputError(f"unknown loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        batch_size = len(self.x) if batch_size is None else batch_size
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise RepairInputError(f"bad fine-tuning options: epochs={epochs}, batch_size={batch_size}, lr={lr}")
        self.ft_options = {"lr": float(lr), "epochs": int(epochs), "batch_size": int(batch_size),
                           "optimizer": optimizer, "momentum": float(momentum), "loss_weighting": loss_weighting,
                           "keep_best": bool(keep_best)}
        self.register_buffer("input_weight", self._input_weights(), persistent=False)
        self._best: tuple[float, int, Tensor] | None = None  # (fitness, epoch, values); epoch 0 = the original
        self._fitness = None
        masks = []
        for k, W in enumerate(self.head.weights()):
            masks.append(self._located_mask(k, W))
            W.requires_grad_(True)
        self.register_buffer("mask_bef", masks[0], persistent=False)
        self.register_buffer("mask_aft", masks[1], persistent=False)
        self._original = [W.detach().clone() for W in self.head.weights()]
        self._hooks: list = []
        self._new: Tensor | None = None
        self._losses: list[float] = []

    def _located_mask(self, matrix: int, W: Tensor) -> Tensor:
        mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        sel = self.weights[:, 0] == matrix
        mask[self.weights[sel, 1], self.weights[sel, 2]] = True
        return mask

    @property
    def max_steps(self) -> int:
        return self.ft_options["epochs"] * math.ceil(len(self.x) / self.ft_options["batch_size"])

    def options(self) -> dict[str, Any]:
        return dict(self.ft_options)

    def setup(self, stage: str) -> None:
        if not self._hooks:
            for W, mask in zip(self.head.weights(), (self.mask_bef, self.mask_aft)):
                self._hooks.append(W.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def _input_weights(self) -> Tensor:
        if self.ft_options["loss_weighting"] == "mean":
            return torch.ones(len(self.x), dtype=torch.float64)
        return fitness_weights(self.is_neg.cpu(), self.fitness_options["alpha"], self.fitness_options["variant"])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x.cpu(), self.label.cpu(), self.input_weight.cpu()),
                          batch_size=self.ft_options["batch_size"], shuffle=True, generator=gen)

    def _score(self, epoch: int) -> None:
        """Fitness of the current located values; kept when it beats the best so far (ties: the earlier)."""
        vals = read_values(self.head, self.weights).detach().cpu()
        f = float(self._fitness(vals.unsqueeze(0)).fitness[0])
        if self._best is None or f > self._best[0]:
            self._best = (f, epoch, vals.clone())
        if epoch > 0:
            self.log("repair/fitness", f, on_step=False, on_epoch=True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.ft_options["keep_best"] and self._best is None:
            self._fitness = self.fitness_evaluator()
            self._score(0)

    def on_train_epoch_end(self) -> None:
        if self.ft_options["keep_best"]:
            self._score(self.current_epoch + 1)

    def configure_optimizers(self):
        params = list(self.head.weights())
        o = self.ft_options
        if o["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=o["lr"], weight_decay=0.0)
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=0.0)

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        w = w.to(x.dtype)
        loss = (F.cross_entropy(self.head(x), y, reduction="none") * w).sum() / w.sum()
        self._losses.append(float(loss.detach()))
        self.log("repair/loss", loss, prog_bar=True, on_step=True, batch_size=len(y))
        return loss

    @torch.no_grad()
    def on_fit_end(self) -> None:
        super().on_fit_end()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for k, (W, W0) in enumerate(zip(self.head.weights(), self._original)):
            W0 = W0.to(W.device)
            mask = self._located_mask(k, W)  # from the located list, not from the hooks' masks
            if not torch.equal(W[~mask], W0[~mask]):
                raise RuntimeError(f"masked fine-tuning moved {int((W[~mask] != W0[~mask]).sum())} weights outside "
                                   "the located ones (the gradient mask failed)")
        self._new = read_values(self.head, self.weights).detach().cpu()
        if self._best is not None:
            self._new = self._best[2].to(self._new.dtype)
        for W, W0 in zip(self.head.weights(), self._original):
            W.copy_(W0.to(W.device))
            W.requires_grad_(False)

    def new_values(self) -> Tensor:
        if self._new is None:
            raise RuntimeError("fine-tuning has not run yet: call Trainer.fit (or fit_repair) first")
        return self._new

    def search_summary(self) -> dict[str, Any]:
        L = self._losses
        out = {"steps": len(L), "loss_first": L[0] if L else None, "loss_last": L[-1] if L else None,
               "loss_min": min(L) if L else None}
        if self._best is not None:
            out["best_epoch"] = self._best[1]  # 0: no epoch beat the original values
        return out
