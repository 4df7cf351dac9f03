"""The repair LightningModule base (docs/methods.md, section 6).

A repair module holds a *copy* of the FFN head, the located weights ``[K, 3]`` (matrix, row, col) and the cached
states of I_neg and I_pos (CLS states ``[N, d]`` for the last-block CLS head; every token ``[N, T, d]`` for a
:class:`~vitfl.localization.ffn.TokenFFNHead` of any block, whose copy carries the later blocks); it changes only
the located weights and returns a :class:`~.patch.Patch` (old and new values, and the block of a token head).
A method that cannot run exactly on a token head refuses it up front (:meth:`RepairModule.refuse_token_head`).
The science lives in plain functions (:mod:`.fitness`, :mod:`.de`); the module feeds them
and logs, and the Trainer supplies the progress bar, TensorBoard logging and checkpoint/resume.

Search methods (DE, prune, reinit) use manual optimisation: one training step = one generation (or one shot),
driven by a dummy dataloader of ``max_steps`` items. Their ``configure_optimizers`` returns a no-op SGD on a
detached dummy tensor; stepping it is what makes the Trainer count a step (``global_step``), so ``max_steps``,
``ModelCheckpoint(every_n_train_steps=...)`` and the logger's step axis work as in ordinary training.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitfl.core.quiet import KNOWN_WARNINGS
from vitfl.lightning_modules.repair.fitness import FITNESS_VARIANTS, LOSSES, make_fitness, PopulationFitness
from vitfl.lightning_modules.repair.patch import (Patch, RepairInputError, UnsupportedRepairHeadError, check_weights,
                                                 patch_block, read_values)
from vitfl.localization.ffn import FFNHead

__all__ = ["RepairModule", "fit_repair"]


class _Steps(torch.utils.data.Dataset):
    """``n`` dummy items: one per training step (generation)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class RepairModule(L.LightningModule):
    """Base of the repair methods.

    ``head``: the FFN head (copied here, so the caller's model never changes); ``weights [K, 3]`` located weights;
    ``x_neg [N_neg, d]``, ``label_neg [N_neg]``: cached states of I_neg (non-empty); ``x_pos [N_pos, d]``,
    ``label_pos [N_pos]``: of I_pos. On a token head (``ffn_head(model, block)``) the states are ``[N, T, d]``.
    ``alpha``, ``fitness`` ("arachne" | "reptran"), ``loss`` ("logits" |
    "softmax_ce") define the fitness every method reports (and DE maximises).

    After ``Trainer.fit``: :meth:`patch` (old and new values) and :meth:`summary` (JSON-serialisable: options,
    fitness of the original and the patched weights, search statistics, timings). The module's own head is left
    at the original values.
    """

    name: ClassVar[str] = "?"
    #: why the method cannot run exactly on a token head (None: it can); see :meth:`refuse_token_head`
    token_head_refusal: ClassVar[str | None] = None

    #: the options' ranges and choices (``vitfl.core.registry.Registry.check_options``; subclasses add theirs): checked once,
    #: before any work, by the API, the command line and the experiment configs alike
    option_ranges: ClassVar[dict[str, Any]] = {"alpha": (0, None)}
    option_choices: ClassVar[dict[str, tuple]] = {"fitness": FITNESS_VARIANTS, "loss": LOSSES}

    def __init__(self, head: FFNHead, weights: Tensor, x_neg: Tensor, label_neg: Tensor, x_pos: Tensor,
                 label_pos: Tensor, seed: int = 0, alpha: float = 10.0, fitness: str = "arachne",
                 loss: str = "logits"):
        super().__init__()
        if not isinstance(head, FFNHead):
            raise RepairInputError(f"head must be an FFNHead (vitfl.localization.ffn.last_ffn_head), got "
                                   f"{type(head).__name__}")
        self.refuse_token_head(head)
        self.head = head.copy().eval()
        self.head.requires_grad_(False)
        self.weights = check_weights(weights, self.head.index)
        dt = self.head.fc_bef.weight.dtype
        x_neg, x_pos = torch.as_tensor(x_neg), torch.as_tensor(x_pos)
        label_neg = torch.as_tensor(label_neg).long().reshape(-1)
        label_pos = torch.as_tensor(label_pos).long().reshape(-1)
        if self.head.token_axis:  # token states [N, T, d] of block L's FFN
            if x_neg.numel() == 0:
                raise RepairInputError(f"I_neg is empty (x_neg has shape {tuple(x_neg.shape)}): nothing to repair")
            if x_pos.numel() == 0 and x_neg.ndim == 3:
                x_pos = x_pos.reshape(0, *x_neg.shape[1:])
            if (x_neg.ndim != 3 or x_neg.shape[2] != self.head.d or x_pos.shape[1:] != x_neg.shape[1:]
                    or x_neg.shape[1] < self.head.min_tokens):
                raise RepairInputError(f"the FFN head of block {self.head.block} takes the token states entering "
                                       f"that block's FFN, [N, T, d={self.head.d}] (the same T for I_neg and I_pos), "
                                       f"got x_neg {tuple(x_neg.shape)}, x_pos {tuple(x_pos.shape)}")
        else:
            if x_neg.ndim != 2 or len(x_neg) == 0:
                raise RepairInputError(f"I_neg is empty (x_neg has shape {tuple(x_neg.shape)}): nothing to repair")
            if x_pos.ndim != 2 and x_pos.numel() == 0:
                x_pos = x_pos.reshape(0, x_neg.shape[1])
            if x_neg.shape[1] != self.head.d or x_pos.shape[1] != self.head.d:
                raise RepairInputError(f"cached states must be [N, d={self.head.d}], got x_neg "
                                       f"{tuple(x_neg.shape)}, x_pos {tuple(x_pos.shape)}")
        if len(label_neg) != len(x_neg) or len(label_pos) != len(x_pos):
            raise RepairInputError("labels and cached states differ in length")
        self.register_buffer("x", torch.cat([x_neg, x_pos]).to(dt), persistent=False)
        self.register_buffer("label", torch.cat([label_neg, label_pos]), persistent=False)
        self.register_buffer("is_neg", torch.arange(len(x_neg) + len(x_pos)) < len(x_neg), persistent=False)
        self.old_values = read_values(self.head, self.weights).detach().cpu()
        self.seed = int(seed)
        self.fitness_options = {"alpha": float(alpha), "variant": fitness, "loss": loss}
        # validates fitness options, labels and states once, up front (clear errors before any Trainer starts)
        if self.head.token_axis:  # the checks alone: the sparse set-up over every token is the method's to make
            PopulationFitness(self.head, self.weights, self.x, self.label, self.is_neg, **self.fitness_options)
        else:
            make_fitness("sparse", self.head, self.weights, self.x, self.label, self.is_neg, **self.fitness_options)
        self.timings: dict[str, float] = {}
        self._t0 = None

    # ------------------------------------------------------------------ what a method provides
    @property
    def max_steps(self) -> int:
        """Training steps the Trainer runs (generations for DE)."""
        return 1

    def new_values(self) -> Tensor:  # pragma: no cover - abstract
        """``[K]`` new values of the located weights (after fit)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, recorded in every result."""
        return {}

    def search_summary(self) -> dict[str, Any]:
        """Method-specific statistics (generations run, early stop, ...), summarised, not per step."""
        return {}

    # ------------------------------------------------------------------ common
    @classmethod
    def refuse_token_head(cls, head: FFNHead) -> None:
        """A :class:`RepairInputError` naming the method, the block and why, when ``head`` is a token head (any
        block's FFN but the last-block CLS head) and the method declares :attr:`token_head_refusal`."""
        if getattr(head, "token_axis", False) and cls.token_head_refusal:
            raise UnsupportedRepairHeadError(
                f"repair {cls.name!r} cannot run on the FFN head of block {head.block} ({head.pooling} pooling, "
                f"token states): {cls.token_head_refusal}")

    @property
    def block(self) -> int | None:
        """The block its patch records: None for the last-block CLS head, else the token head's block."""
        return patch_block(self.head)

    @property
    def n_neg(self) -> int:
        return int(self.is_neg.sum())

    def fitness_evaluator(self, evaluator: str = "sparse", **kwargs: Any) -> PopulationFitness:
        """The method's fitness on I_neg + I_pos (any evaluator of :mod:`.fitness`)."""
        return make_fitness(evaluator, self.head, self.weights, self.x, self.label, self.is_neg,
                            **self.fitness_options, **kwargs)

    def patch(self) -> Patch:
        return Patch(self.weights, self.old_values, self.new_values().detach().cpu(), block=patch_block(self.head))

    def summary(self) -> dict[str, Any]:
        """Options, fitness before/after (with patched / broken counts), search statistics and timings."""
        ev = self.fitness_evaluator()
        vals = torch.stack([self.old_values, self.new_values().detach().cpu()])
        res = ev(vals)
        return {"method": self.name, "options": {**self.options(), **self.fitness_options, "seed": self.seed},
                "n_weights": len(self.weights), "n_neg": self.n_neg, "n_pos": len(self.x) - self.n_neg,
                "fitness_original": float(res.fitness[0]), "fitness_patched": float(res.fitness[1]),
                "n_patched": int(res.n_patched[1]), "n_broken": int(res.n_broken[1]),
                **self.search_summary(), "timings": dict(self.timings)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.max_steps), batch_size=None, shuffle=False)

    def configure_optimizers(self):
        # a no-op optimizer on a detached dummy tensor: stepping it makes the Trainer count steps (see module doc)
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    def _count_step(self) -> None:
        self.optimizers().step()

    def on_train_start(self) -> None:
        self.head.eval()  # no dropout / batch statistics inside the head, whatever mode the Trainer sets

    def on_fit_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_fit_end(self) -> None:
        if self._t0 is not None:
            self.timings["fit_s"] = self.timings.get("fit_s", 0.0) + time.perf_counter() - self._t0


def fit_repair(module: RepairModule, *, logger: Any = False, callbacks: list | None = None,
               ckpt_path: str | None = None, accelerator: str = "cpu", enable_progress_bar: bool = True,
               default_root_dir: str | None = None, max_steps: int | None = None, quiet: bool = True,
               **trainer_kwargs: Any) -> Patch:
    """Run ``module`` with a one-device Trainer and return its patch.

    ``max_steps`` defaults to the module's (generations for DE); a smaller value stops early (e.g. to checkpoint
    and resume later with ``ckpt_path``). Checkpointing is on only when ``callbacks`` holds a ModelCheckpoint.
    ``quiet``: silence the Trainer's start-up info lines (a sweep runs thousands of these)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks or [])
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    if quiet:
        lightning_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=max_steps or module.max_steps,
                            max_epochs=-1, logger=logger, callbacks=callbacks,
                            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                            enable_model_summary=False, enable_progress_bar=enable_progress_bar,
                            num_sanity_val_steps=0, default_root_dir=default_root_dir, **trainer_kwargs)
        try:
            trainer.fit(module, ckpt_path=ckpt_path)
        finally:
            lightning_log.setLevel(level)
    return module.patch()
