"""The image-classifier LightningModule (fit / validate / test / predict) for every backbone in the registry.

Top-1 and top-5 accuracy via torchmetrics, logged to TensorBoard; AdamW with linear warm-up then cosine decay
(per optimizer step; :meth:`ImageClassifier.build_optimizer` and :func:`lr_multiplier`, which
``evaluation/optimizer_replay.py`` reuses to replay a run's steps). ``predict_step`` returns per sample the logits, label and split index and, for ViTs, the
CLS token's residual stream entering the last FFN (``x [B, d]``) and the post-GELU activation (``a [B, 4d]``):
the state cache is one predict pass (see ``callbacks/state_cache.py``).
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from vitfl.lightning_modules.backbones import architecture_kwargs, build_backbone
from vitfl.localization.ffn import UnsupportedModelError, capture_ffn_states


class ImageClassifier(L.LightningModule):
    def __init__(self, backbone: str = "hf_vit", num_classes: int = 10, backbone_kwargs: dict[str, Any] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
                 label_smoothing: float = 0.0, min_lr_ratio: float = 0.01, backbone_arch: dict | None = None):
        """``backbone_arch`` is recorded by the module itself, never set by hand: the architecture a
        ``backbone_kwargs.pretrained_path`` resolved to at the first build (see ``architecture_kwargs``). A checkpoint
        carries it in its hyperparameters, so loading one builds that architecture from scratch and reads no
        pretrained folder (which may have moved) before its own weights replace the random ones."""
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(backbone_kwargs or {})
        if backbone_arch is not None:
            self.backbone = build_backbone(backbone, num_classes, **backbone_arch)
        else:
            self.backbone = build_backbone(backbone, num_classes, **kwargs)
            if kwargs.get("pretrained_path"):
                self.hparams["backbone_arch"] = architecture_kwargs(self.backbone, kwargs)
        top5 = min(5, num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_acc_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.loss(logits, labels, train=stage == "train")
        acc, acc5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_acc_top5")
        acc(logits, labels)
        acc5(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(labels))
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log(f"{stage}/acc_top5", acc5, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        # the HParams tab compares runs by their test accuracy (TensorBoard's ``hp_metric``)
        if self.logger is not None and self.trainer.is_global_zero:
            hp = {k: v for k, v in self.hparams.items() if k != "backbone_arch"}  # a whole ViTConfig: not a knob
            self.logger.log_hyperparams(hp, {"hp_metric": float(self.test_acc.compute())})

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, labels, index = batch[0], batch[1], batch[2]
        try:
            with capture_ffn_states(self.backbone) as states:
                logits = self(images)
        except UnsupportedModelError:  # CNNs: no last FFN to capture
            states, logits = {}, self(images)
        return {"logits": logits.float(), "label": labels, "index": index, **{k: v.float() for k, v in states.items()}}

    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        opt, sched = self.build_optimizer(total, epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ the optimizer, shared with the replay
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, train: bool = True) -> torch.Tensor:
        """The mean cross-entropy of a batch; training uses the hparams' label smoothing, evaluation none."""
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing if train else 0.0)

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: ``decay`` (weight matrices, ``weight_decay`` from the hparams) then
        ``no_decay`` (biases, norms, every parameter with fewer than 2 dimensions; weight decay 0), each in
        ``named_parameters()`` order; frozen parameters are left out."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() or "bias" in name else decay).append(p)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def schedule_args(self, total_steps: int, epochs: int) -> tuple[int, int, float]:
        """``(total, warmup, floor)`` of :func:`lr_multiplier` for a fit of ``total_steps`` optimizer steps over
        ``epochs`` epochs (warm-up = ``warmup_epochs`` epochs' worth of steps, at most ``total - 1``)."""
        total = max(1, int(total_steps))
        epochs = max(1, int(epochs))
        warmup = min(total - 1, int(round(self.hparams.warmup_epochs * total / epochs)))
        return total, warmup, self.hparams.min_lr_ratio

    def build_optimizer(self, total_steps: int, epochs: int):
        """(AdamW over :meth:`param_groups` at ``lr``, a ``LambdaLR`` of :func:`lr_multiplier` to be stepped once per
        optimizer step): what ``configure_optimizers`` returns for a fit of ``total_steps`` steps over ``epochs``
        epochs (and what ``vitfl.evaluation.optimizer_replay`` replays)."""
        opt = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr)
        total, warmup, floor = self.schedule_args(total_steps, epochs)

        def schedule(step: int) -> float:  # a plain function: LambdaLR's state_dict then stores nothing for it
            return lr_multiplier(step, total, warmup, floor)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def lr_multiplier(step: int, total: int, warmup: int, floor: float) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of a fit of ``total`` steps: linear
    warm-up ``(step + 1) / (warmup + 1)`` for the first ``warmup`` steps, then a cosine from 1 down to ``floor``
    (reached at step ``total``; ``floor`` = ``min_lr_ratio``)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
