"""Replaying a training run's optimizer steps, an SGD ground truth for the checkpoint benchmark, and what the
weight change |dW| follows (docs/methods.md, section 5).

Why: the checkpoint benchmark ranks the last-FFN weights by ``|W(e) - W(e-1)|``. Under Adam(W) that change follows
how *sign-consistent* a weight's gradient was over the epoch's steps (Adam's per-weight normalisation makes the step
about ``lr * m / sqrt(v)``), not how *large* it was, so a gradient-size FL method cannot score against it. This
module (a) replays the recorded optimizer exactly, to read what the run never saved (per-step gradient moments,
Adam's ``m`` and ``v``), (b) runs epoch e again from the recorded W(e-1) with SGD + momentum on the same batches
and the same learning-rate schedule shape, a second ground truth ``|W_sgd(e) - W(e-1)|`` that follows the summed
gradient, and (c) measures what ``|dW|`` follows under each.

The replay (:func:`replay_fit`) runs the training steps of epochs ``start+1 .. end`` as ``Trainer.fit`` ran them,
with the classifier's own code, not a copy: the model in train mode, epoch e's batches from the data module's own
training loader with ``sampler.set_epoch(e - 1)`` (Lightning's fit loop calls ``set_epoch`` with the number of
completed epochs before each epoch), the first ``limit_train_batches`` of them, the loss
:meth:`ImageClassifier.loss` (cross-entropy with the hparams' label smoothing), the optimizer and per-step
``LambdaLR`` of :meth:`ImageClassifier.build_optimizer` for ``total = total_epochs x batches per epoch`` steps,
and per batch: forward, ``zero_grad``, backward, ``optimizer.step``, ``scheduler.step`` (Lightning's automatic
optimization, no gradient clipping or accumulation). No Trainer, no validation, no logging. A run whose config
changes any of this, or whose training draws random numbers (dropout, drop-path, augmentation), is refused
(:func:`replay_settings`, :func:`check_deterministic_training`) with an error naming the setting.

Recorded per replayed epoch (:class:`EpochRecord`): the last-FFN weights after it (``vitfl.callbacks.ffn_weights.
ffn_state``), and over the epoch's T steps, per last-FFN weight (W_bef then W_aft, the global index of
``vitfl.localization.ffn.WeightIndex``), ``sum_t g_t``, ``sum_t g_t^2`` (float64) and T, where ``g_t`` is the gradient
of step t's mean training loss, read from ``.grad`` after the step's own backward (no extra pass). From them the
mean step gradient and the gradient signal-to-noise ratio ``SNR = |mean_t g_t| / std_t g_t`` (population std;
see :func:`gradient_snr` for std = 0). For Adam / AdamW the optimizer state after each replayed epoch's last step
gives ``|m_hat| / (sqrt(v_hat) + eps)`` with the *bias-corrected* moments (``m_hat = m / (1 - beta1^t)``,
``v_hat = v / (1 - beta2^t)``; the size of Adam's next step in units of ``lr``), so epoch e's diagnostics see it
at the epoch's start (the state after epoch e-1: what the optimizer knew at W(e-1)) and at its end.

The replay of the recorded optimizer from W(0) must reproduce the run's ``ffn_weights/epoch=NNN.safetensors``:
:func:`verify_replay` reports ``max |W_replay(e) - W_recorded(e)|`` per epoch and raises
:class:`ReplayMismatchError` above a tolerance. On the machine and torch thread count that trained the run the
replay is bit-identical; another thread count changes float32 reduction orders (the testbed: 1.6e-7 with 1 thread
instead of 2), a GPU-trained run replayed on CPU more; the default tolerance 1e-6 admits the first.

The SGD ground truth (:func:`replay_fit` with ``optimizer="sgd"``): from the recorded W(e-1), epoch e's batches,
``torch.optim.SGD(param_groups, lr=sgd_lr * lr_multiplier(global step), momentum, nesterov=False)`` with a fresh
momentum buffer and the run's parameter groups (weight decay as in the run, applied by SGD as L2), where
``lr_multiplier`` is the recorded run's schedule at the same global steps (``(e-1) T .. e T - 1``). ``momentum=0``
is plain SGD.

**Any block's FFN** (``block``, default -1 the last): every "last-FFN" above is then block L's FFN
(``vitfl.localization.ffn.ffn_head(model, block)``): its weights after each replayed epoch, its per-step gradients,
Adam's state of its parameters, the training gradient, and the recorded weights it is verified against and compared
with (``load_weights(e)``, the caller's reader of block L's weights of epoch e, e.g. the ``block=L.*`` tensors of the
per-epoch weight file). ``block=-1`` is the last-FFN replay as it always was.

Nothing here names a path: checkpoints and weight files come from the caller (``vitfl.core.runstore`` stays above).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from vitfl.callbacks.ffn_weights import ffn_state, load_ffn_weights
from vitfl.evaluation.checkpoint_benchmark import weight_change_ground_truth
from vitfl.lightning_modules.classifier import ImageClassifier, lr_multiplier
from vitfl.localization.ffn import ffn_head

__all__ = ["ReplayError", "ReplayMismatchError", "EpochRecord", "ReplayResult", "replay_settings",
           "check_deterministic_training", "steps_per_epoch", "epoch_batches", "replay_fit", "verify_replay",
           "gradient_snr", "adam_ratio", "sgd_name", "training_gradient", "update_diagnostics", "DIAGNOSTIC_KEYS",
           "optimizer_ground_truths", "DEFAULT_SGD_LR", "DEFAULT_MOMENTUM"]

#: SGD's base learning rate for the ground truth (the testbed's: 0.02 at multiplier 1)
DEFAULT_SGD_LR = 0.02
DEFAULT_MOMENTUM = 0.9
#: Lightning callbacks that change what a training step does (refused by :func:`replay_settings`)
_TRAINING_CALLBACKS = ("StochasticWeightAveraging", "GradientAccumulationScheduler", "BackboneFinetuning",
                       "BaseFinetuning", "LearningRateFinder", "BatchSizeFinder")


class ReplayError(RuntimeError):
    """The run cannot be replayed exactly (a setting the replay does not reproduce, a random training step)."""


class ReplayMismatchError(ReplayError):
    """The replay of the recorded optimizer does not reproduce the run's recorded weights."""


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class EpochRecord:
    """One replayed epoch ``epoch`` (1-based: the model holds W(epoch) afterwards).

    ``grad_sum`` / ``grad_sq_sum``: ``[total]`` float64, ``sum_t g_t`` and ``sum_t g_t^2`` over the epoch's
    ``n_steps`` steps, per last-FFN weight (W_bef then W_aft), ``g_t`` the gradient of step t's mean loss.
    ``train_acc``: share of the epoch's training samples the model classified correctly at the step that used them
    (before that step's update; Lightning's ``train/acc`` of the epoch); ``train_loss``: mean over steps of the step
    loss. ``indices``: per step, the batch's sample indices (``batch[2]``); ``lrs``: per step, the learning rate of
    the first parameter group at that step; ``global_steps``: the steps' 0-based global step numbers."""

    epoch: int
    ffn: dict[str, Tensor]
    grad_sum: Tensor
    grad_sq_sum: Tensor
    n_steps: int
    train_loss: float
    train_acc: float
    n_samples: int
    indices: list[Tensor] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    global_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: Adam's bias-corrected ``|m_hat| / (sqrt(v_hat) + eps)`` ``[total]`` float64 after the epoch's last step
    #: (:func:`adam_ratio`; None for SGD)
    adam_ratio: Tensor | None = None

    @property
    def grad_mean(self) -> Tensor:
        """``[total]`` float64, the mean step gradient ``(1/T) sum_t g_t`` (signed)."""
        return self.grad_sum / max(1, self.n_steps)

    @property
    def grad_snr(self) -> Tensor:
        """``[total]`` float64, :func:`gradient_snr` of the epoch's step gradients."""
        return gradient_snr(self.grad_sum, self.grad_sq_sum, self.n_steps)


@dataclass
class ReplayResult:
    """What :func:`replay_fit` ran: ``optimizer`` ("adamw", "sgd", ...), the replayed epochs in order, Adam's
    bias-corrected ``|m_hat| / (sqrt(v_hat) + eps)`` of the last-FFN weights after the last step (``[total]``
    float64; ``None`` for optimizers without Adam's state), the schedule ``(total, warmup, floor)`` and the
    steps per epoch."""

    optimizer: str
    epochs: list[EpochRecord]
    adam_ratio: Tensor | None
    schedule: tuple[int, int, float]
    steps_per_epoch: int
    start_epoch: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def epoch(self, e: int) -> EpochRecord:
        for r in self.epochs:
            if r.epoch == e:
                return r
        raise KeyError(f"epoch {e} was not replayed (replayed: {[r.epoch for r in self.epochs]})")


# ---------------------------------------------------------------------------------------------- what replays
def _is_off(v: Any, off: Sequence[Any]) -> bool:
    """True for None or one of the values ``off`` (the setting's "not used")."""
    return v is None or any(v == o for o in off)


def _several_devices(devices: Any) -> bool:
    """True for a ``trainer.devices`` that names more than one device (a count > 1, -1 = all, a list of several)."""
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str):
        devices = devices.strip()
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()]) > 1
        if not devices.lstrip("-").isdigit():
            return False  # "auto": one device on CPU
        devices = int(devices)
    return isinstance(devices, int) and (devices > 1 or devices == -1)


def replay_settings(run_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fit settings the replay needs from a run's ``run_config.yaml`` (as a dict): ``total_epochs``
    (``trainer.max_epochs``) and ``limit_train_batches`` (None = all). Raises :class:`ReplayError` naming the key
    for anything the replay does not reproduce: gradient accumulation, gradient clipping, a LightningCLI
    ``optimizer`` / ``lr_scheduler`` override, mixed precision, more than one device, ``max_steps``,
    ``overfit_batches``, or a callback that changes the training step (SWA, fine-tuning schedules, ...)."""
    trainer = dict(run_cfg.get("trainer") or {})
    where = "run config"

    def refuse(key: str, value: Any, why: str) -> ReplayError:
        return ReplayError(f"{where}: {key} = {value!r} {why}; the optimizer replay reproduces plain per-batch "
                           f"steps only (no accumulation, clipping, optimizer override, mixed precision, several "
                           f"devices), so it cannot rebuild this run's weights")

    if not _is_off(trainer.get("accumulate_grad_batches"), (1,)):
        raise refuse("trainer.accumulate_grad_batches", trainer["accumulate_grad_batches"],
                     "accumulates gradients over batches")
    if not _is_off(trainer.get("gradient_clip_val"), (0, 0.0)):
        raise refuse("trainer.gradient_clip_val", trainer["gradient_clip_val"], "clips gradients")
    for key in ("optimizer", "lr_scheduler"):
        if run_cfg.get(key) is not None:
            raise refuse(key, run_cfg[key], "replaces the classifier's configure_optimizers")
    if not _is_off(trainer.get("precision"), (32, "32", "32-true")):
        raise refuse("trainer.precision", trainer["precision"], "is not full float32")
    if not _is_off(trainer.get("max_steps"), (-1,)):
        raise refuse("trainer.max_steps", trainer["max_steps"], "limits the optimizer steps")
    if not _is_off(trainer.get("overfit_batches"), (0, 0.0)):
        raise refuse("trainer.overfit_batches", trainer["overfit_batches"], "changes the training batches")
    devices = trainer.get("devices")
    if _several_devices(devices):
        raise refuse("trainer.devices", devices, "trains on several devices (each sees a shard of the batches)")
    if not _is_off(trainer.get("num_nodes"), (1,)):
        raise refuse("trainer.num_nodes", trainer["num_nodes"], "trains on several nodes")
    for cb in trainer.get("callbacks") or []:
        path = cb.get("class_path", "") if isinstance(cb, Mapping) else str(cb)
        if any(path.endswith(name) for name in _TRAINING_CALLBACKS):
            raise refuse("trainer.callbacks", path, "changes the training step")
    epochs = trainer.get("max_epochs")
    if epochs is None or int(epochs) < 1:
        raise ReplayError(f"{where}: trainer.max_epochs = {epochs!r}; the replay needs the fit's epoch count (the "
                          "learning-rate schedule spans max_epochs x batches per epoch)")
    limit = trainer.get("limit_train_batches")
    return {"total_epochs": int(epochs), "limit_train_batches": None if limit in (None, 1.0) else limit,
            "accelerator": trainer.get("accelerator")}


def steps_per_epoch(n_batches: int, limit_train_batches: int | float | None = None) -> int:
    """Batches per training epoch as Lightning counts them: all ``n_batches``, at most an int limit, or
    ``int(n_batches * limit)`` for a float limit."""
    if limit_train_batches is None:
        return n_batches
    if isinstance(limit_train_batches, bool):
        raise ReplayError(f"limit_train_batches = {limit_train_batches!r}: expected an int or a float")
    if isinstance(limit_train_batches, int):
        return min(n_batches, limit_train_batches)
    return int(n_batches * float(limit_train_batches))


def epoch_batches(loader: torch.utils.data.DataLoader, epoch: int, n_steps: int) -> Iterator[Any]:
    """The first ``n_steps`` training batches of epoch ``epoch`` (1-based) in the order the fit saw them: the
    loader's sampler gets ``set_epoch(epoch - 1)`` first, as Lightning's fit loop does."""
    for obj in {id(o): o for o in (getattr(loader, "sampler", None),
                                   getattr(getattr(loader, "batch_sampler", None), "sampler", None))
                if o is not None}.values():
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch - 1)
    for i, batch in enumerate(loader):
        if i >= n_steps:
            break
        yield batch


@torch.no_grad()
def check_deterministic_training(model: torch.nn.Module, images: Tensor, datamodule: Any = None) -> None:
    """Raise :class:`ReplayError` when a training step draws random numbers the replay cannot reproduce: an
    augmenting data module (``augment``), or a model whose train-mode forward differs between two RNG seeds
    (dropout, drop-path). The global RNG state is left as it was."""
    if datamodule is not None and getattr(datamodule, "augment", False):
        raise ReplayError(f"{type(datamodule).__name__}: data.init_args.augment = True draws random augmentations "
                          "from the global RNG at every step; the replay cannot reproduce them")
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            a = model(images[:4])
            torch.manual_seed(2)
            b = model(images[:4])
    finally:
        model.train(was)
    if not torch.equal(a, b):
        drop = [n for n, m in model.named_modules() if (isinstance(m, torch.nn.modules.dropout._DropoutNd)
                                                        and m.p > 0) or (getattr(m, "drop_prob", 0) or 0) > 0]
        raise ReplayError("the model's train-mode forward is random (dropout / drop-path"
                          + (f": {', '.join(drop[:5])}" if drop else "") + "); the replay cannot reproduce the "
                          "run's random draws, so it cannot rebuild its weights")


# ------------------------------------------------------------------------------------------------- the replay
def sgd_name(momentum: float, nesterov: bool = False) -> str:
    """The SGD variant's name as ground truths record it: "sgd" (momentum 0), "sgd_momentum", "sgd_nesterov"."""
    return "sgd" if not momentum else "sgd_nesterov" if nesterov else "sgd_momentum"


def _block_head(model: torch.nn.Module, block: int = -1):
    """The FFN head whose weights the replay follows: the last FFN's (``block`` -1), else block ``block``'s."""
    return ffn_head(model, -1) if block == -1 else ffn_head(model, block, tokens=True)


def _ffn_params(model: torch.nn.Module, block: int = -1) -> tuple[Tensor, Tensor]:
    return _block_head(model, block).weights()


def _flat_grad(ws: Sequence[Tensor]) -> Tensor:
    return torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).detach().reshape(-1) for w in ws])


def adam_ratio(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """``|m_hat| / (sqrt(v_hat) + eps)`` per element of ``params`` (flattened, concatenated; float64) from an
    Adam / AdamW state, bias-corrected (``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)``; what
    Adam's next step would be in units of ``lr`` without new gradient). ``None`` when the optimizer keeps no
    ``exp_avg`` / ``exp_avg_sq``."""
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg" not in st or "exp_avg_sq" not in st:
            return None
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        b1, b2 = group["betas"]
        eps = group["eps"]
        t = float(st["step"])
        m = st["exp_avg"].double() / (1 - b1 ** t)
        v = st["exp_avg_sq"].double() / (1 - b2 ** t)
        out.append((m.abs() / (v.sqrt() + eps)).reshape(-1))
    return torch.cat(out)


def _train_step(model: ImageClassifier, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                ws: Sequence[Tensor]) -> dict[str, Tensor]:
    """One optimizer step as Lightning's automatic optimization runs it: ``opt.step(closure)`` where the closure is
    the training step's forward and loss, ``zero_grad`` (to None), backward. Returns the step's ``loss``,
    ``logits`` and ``grad`` (``[total]`` float32 copy of the last-FFN weights' gradient, taken before the update)."""
    out: dict[str, Tensor] = {}

    def closure() -> Tensor:
        logits = model(images)
        loss = model.loss(logits, labels, train=True)
        opt.zero_grad()
        loss.backward()
        out["logits"], out["loss"], out["grad"] = logits.detach(), loss.detach(), _flat_grad(ws)
        return loss

    with torch.enable_grad():
        opt.step(closure)
    if "grad" not in out:
        raise ReplayError(f"{type(opt).__name__}.step did not call its closure")
    return out


def replay_fit(model: ImageClassifier, datamodule: Any, total_epochs: int, end_epoch: int, *, start_epoch: int = 0,
               optimizer: str = "recorded", sgd_lr: float = DEFAULT_SGD_LR, momentum: float = DEFAULT_MOMENTUM,
               nesterov: bool = False, limit_train_batches: int | float | None = None,
               check_random: bool = True,
               step_callback: Callable[[dict[str, Any]], None] | None = None, block: int = -1) -> ReplayResult:
    """Run the training steps of epochs ``start_epoch+1 .. end_epoch`` on ``model`` (which must hold W(start_epoch);
    trained *in place*) as ``Trainer.fit(max_epochs=total_epochs)`` ran them (module docstring).

    ``optimizer="recorded"``: the classifier's own optimizer and schedule (:meth:`ImageClassifier.build_optimizer`),
    only from ``start_epoch=0`` (the run saves no optimizer state at later epochs). ``optimizer="sgd"``:
    ``torch.optim.SGD`` over the same parameter groups with a fresh momentum buffer, the learning rate of global
    step s set to ``sgd_lr * lr_multiplier(s, *schedule)`` before the step (the recorded schedule's shape).
    ``limit_train_batches`` as the Trainer's. ``check_random``: refuse a random training step
    (:func:`check_deterministic_training`). ``step_callback(info)`` is called after each step with ``epoch``,
    ``step`` (within the epoch), ``global_step``, ``index`` (``batch[2]``), ``loss``, ``lr`` (the step's) and
    ``grad`` (``[total]`` float32, the gradient the step used, of the last-FFN weights, W_bef then W_aft).
    ``block``: whose FFN weights, gradients and Adam ratios are recorded (default -1, the last; module docstring).
    Returns a :class:`ReplayResult`; the model is left in train mode holding W(end_epoch)."""
    if not 0 <= start_epoch < end_epoch <= total_epochs:
        raise ValueError(f"need 0 <= start_epoch < end_epoch <= total_epochs, got {start_epoch}, {end_epoch}, "
                         f"{total_epochs}")
    if optimizer not in ("recorded", "sgd"):
        raise ValueError(f"optimizer must be 'recorded' or 'sgd', got {optimizer!r}")
    if optimizer == "recorded" and start_epoch != 0:
        raise ReplayError(f"the recorded optimizer's state at epoch {start_epoch} was not saved (per-epoch "
                          "checkpoints hold weights only): replay it from epoch 0")
    t0 = time.perf_counter()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    n_steps = steps_per_epoch(len(loader), limit_train_batches)
    if n_steps < 1:
        raise ReplayError(f"limit_train_batches = {limit_train_batches!r} leaves no training batch of {len(loader)}")
    model.train()
    if check_random:
        first = next(iter(epoch_batches(loader, start_epoch + 1, 1)))
        check_deterministic_training(model, first[0], datamodule)
    schedule = model.schedule_args(n_steps * total_epochs, total_epochs)
    if optimizer == "sgd":
        opt, sched = torch.optim.SGD(model.param_groups(), lr=sgd_lr, momentum=momentum, nesterov=nesterov), None
    else:
        opt, sched = model.build_optimizer(n_steps * total_epochs, total_epochs)
    name = sgd_name(momentum, nesterov) if optimizer == "sgd" else type(opt).__name__.lower()
    ws = _ffn_params(model, block)
    device = ws[0].device
    records = []
    for epoch in range(start_epoch + 1, end_epoch + 1):
        te = time.perf_counter()
        gsum = torch.zeros(sum(w.numel() for w in ws), dtype=torch.float64)
        gsq = torch.zeros_like(gsum)
        losses, correct, seen, indices, lrs, steps = [], 0, 0, [], [], []
        for i, batch in enumerate(epoch_batches(loader, epoch, n_steps)):
            images, labels, index = batch[0].to(device), batch[1].to(device), batch[2]
            gstep = (epoch - 1) * n_steps + i
            if sched is None:
                for g in opt.param_groups:
                    g["lr"] = sgd_lr * lr_multiplier(gstep, *schedule)
            lr = float(opt.param_groups[0]["lr"])
            out = _train_step(model, opt, images, labels, ws)
            if sched is not None:
                sched.step()
            g64 = out["grad"].double()
            gsum.add_(g64)
            gsq.add_(g64 * g64)
            losses.append(float(out["loss"]))
            correct += int((out["logits"].argmax(-1) == labels).sum())
            seen += len(labels)
            indices.append(torch.as_tensor(index).clone())
            lrs.append(lr)
            steps.append(gstep)
            if step_callback is not None:
                step_callback({"epoch": epoch, "step": i, "global_step": gstep, "index": indices[-1],
                               "loss": losses[-1], "lr": lr, "grad": out["grad"]})
        records.append(EpochRecord(epoch, ffn_state(_block_head(model, block)), gsum, gsq, len(losses),
                                   float(np.mean(losses)), correct / max(1, seen), seen, indices, lrs, steps,
                                   time.perf_counter() - te, adam_ratio(opt, ws) if optimizer == "recorded" else None))
    ratio = records[-1].adam_ratio
    settings = {"optimizer": name, "total_epochs": total_epochs, "limit_train_batches": limit_train_batches,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                                 for g in opt.param_groups]}
    if optimizer == "sgd":
        settings.update({"sgd_lr": sgd_lr, "momentum": momentum, "nesterov": nesterov})
    else:
        settings.update({"lr": model.hparams.lr})
    return ReplayResult(name, records, ratio, schedule, n_steps, start_epoch, time.perf_counter() - t0, settings)


def _last_ffn_tensors(path: str | Path) -> dict[str, Tensor]:
    """The last FFN's tensors (plain names) of a per-epoch weight file (without other blocks' ``block=L.*``)."""
    return {k: v for k, v in load_ffn_weights(path).items() if not k.startswith("block=")}


def _max_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    keys = [k for k in a if k in b]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys) if keys else float("nan")


def verify_replay(result: ReplayResult, ffn_weights_path: Callable[[int], str | Path], tol: float = 1e-6,
                  raise_on_mismatch: bool = True,
                  load_weights: Callable[[int], Mapping[str, Tensor]] | None = None) -> dict[int, float]:
    """``{epoch: max |W_replay(e) - W_recorded(e)|}`` over every tensor of the recorded last-FFN weight file
    (W_bef, b_bef, W_aft, b_aft, ls_gamma) of each replayed epoch, ``ffn_weights_path(e)`` naming the file.
    Raises :class:`ReplayMismatchError` (naming the file and the difference) when one exceeds ``tol``.
    ``load_weights(e)``: the recorded weights of epoch e (plain names) where the replay follows another block than
    the last (default: the last FFN's tensors of ``ffn_weights_path(e)``)."""
    out: dict[int, float] = {}
    for rec in result.epochs:
        path = Path(ffn_weights_path(rec.epoch))
        recorded = dict(load_weights(rec.epoch)) if load_weights is not None else _last_ffn_tensors(path)
        missing = sorted(set(recorded) - set(rec.ffn))
        if missing:
            raise ReplayMismatchError(f"{path} holds {missing}, which the replayed model has not")
        diff = _max_diff(rec.ffn, recorded)
        out[rec.epoch] = diff
        if raise_on_mismatch and not diff <= tol:
            worst = max(recorded, key=lambda k: float((rec.ffn[k].double() - recorded[k].double()).abs().max()))
            raise ReplayMismatchError(
                f"the replay of the recorded optimizer ({result.optimizer}) from epoch {result.start_epoch} does not "
                f"reproduce {path}: max |W_replay({rec.epoch}) - W_recorded({rec.epoch})| = {diff:.3g} (in {worst}) "
                f"> tolerance {tol:g}. The weight file is not this run's training result (altered, or trained with "
                f"other settings / data / hardware than the replay uses); per-epoch differences so far: "
                + ", ".join(f"epoch {k}: {v:.3g}" for k, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------------ diagnostics
def gradient_snr(grad_sum: Tensor, grad_sq_sum: Tensor, n: int) -> Tensor:
    """``|mean| / std`` of each weight's step gradients from ``sum g``, ``sum g^2`` and the count ``n`` (float64):
    ``mean = sum g / n``, population ``var = max(sum g^2 / n - mean^2, 0)``, where a var within float64 rounding of
    ``mean^2`` (``<= 8 eps mean_sq``, i.e. the same gradient at every step up to rounding) counts as 0. Where
    std = 0: ``inf`` if mean != 0 (the gradient never changed), 0 if mean = 0 (never any gradient)."""
    if n < 1:
        raise ValueError("gradient_snr needs at least one step")
    s, q = grad_sum.double(), grad_sq_sum.double()
    mean = s / n
    mean_sq = q / n
    var = (mean_sq - mean * mean).clamp_min(0.0)
    var = torch.where(var <= 8 * torch.finfo(torch.float64).eps * mean_sq, torch.zeros_like(var), var)
    std = var.sqrt()
    snr = mean.abs() / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, snr, torch.where(mean != 0, torch.full_like(snr, math.inf), torch.zeros_like(snr)))


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


#: the quantities :func:`update_diagnostics` correlates |dW| with, in the order printed
DIAGNOSTIC_KEYS = ("grad_train", "grad_fl", "grad_steps", "grad_snr", "adam_ratio_start", "adam_ratio_end", "w_prev")


def update_diagnostics(dW: Any, *, grad_train: Any = None, grad_fl: Any = None, grad_steps: Any = None,
                       grad_snr: Any = None, adam_ratio_start: Any = None, adam_ratio_end: Any = None,
                       w_prev: Any = None) -> dict[str, Any]:
    """What the weight change follows, over all last-FFN weights (one value per weight, W_bef then W_aft; every
    argument a ``[total]`` tensor or array, or None to skip it).

    ``dW``: the signed change W(e) - W(e-1). ``grad_train``: dL/dW at W(e-1), L the mean cross-entropy (no label
    smoothing) over the non-augmented training split, model in eval mode (:func:`training_gradient`; signed).
    ``grad_fl``: the gradient on the FL inputs (e.g. ``vitfl.evaluation.injected_faults.loss_gradient`` of the epoch e-1
    head on the repair states; its magnitude is used). ``grad_steps``: the mean of the epoch's step gradients
    (signed; :attr:`EpochRecord.grad_mean`). ``grad_snr``: :func:`gradient_snr` over the epoch's steps.
    ``adam_ratio_start`` / ``adam_ratio_end``: Adam's ``|m_hat| / (sqrt(v_hat) + eps)`` (:func:`adam_ratio`) in the
    state the epoch starts from (after epoch e-1's last step: what the optimizer knew at W(e-1)) / after its last
    step. ``w_prev``: W(e-1).

    Returns ``spearman_<name>``: Spearman's rho of ``|dW|`` with ``|<name>|`` (scipy.stats.spearmanr; NaN when
    either side is constant); ``downhill_<name>`` for the signed gradients (grad_train, grad_steps): the share of
    the weights with ``dW != 0`` and gradient ``!= 0`` whose signs are opposite (moved downhill), over
    ``n_signed_<name>`` such weights; ``n_weights``, ``n_moved`` (dW != 0), ``max_change``, ``mean_change``."""
    d = _np(dW)
    ad = np.abs(d)
    out: dict[str, Any] = {"n_weights": int(d.size), "n_moved": int((d != 0).sum()),
                           "max_change": float(ad.max()) if d.size else float("nan"),
                           "mean_change": float(ad.mean()) if d.size else float("nan")}
    given = {"grad_train": grad_train, "grad_fl": grad_fl, "grad_steps": grad_steps, "grad_snr": grad_snr,
             "adam_ratio_start": adam_ratio_start, "adam_ratio_end": adam_ratio_end, "w_prev": w_prev}
    for name in DIAGNOSTIC_KEYS:
        v = given[name]
        if v is None:
            continue
        x = _np(v)
        if x.shape != d.shape:
            raise ValueError(f"{name} has {x.size} values, dW {d.size}")
        out[f"spearman_{name}"] = _spearman(ad, np.abs(x))
        if name in ("grad_train", "grad_steps"):
            both = (d != 0) & (x != 0)
            n = int(both.sum())
            out[f"n_signed_{name}"] = n
            out[f"downhill_{name}"] = float((np.sign(d[both]) == -np.sign(x[both])).mean()) if n else float("nan")
    return out


def training_gradient(model: torch.nn.Module, datamodule: Any, batch_size: int = 512,
                      block: int = -1) -> tuple[Tensor, int]:
    """(dL/dW over W_bef then W_aft ``[total]`` float64 signed, N): L = the mean cross-entropy on logits (no label
    smoothing) over the N images of the non-augmented training split, the model in eval mode, as
    ``vitfl.evaluation.testbed.checkpoint_diagnostics`` defines it. Only the last-FFN weights need gradients here (the
    others are frozen for the pass and restored); the model's weights are unchanged."""
    import torch.nn.functional as F

    was = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ws = _ffn_params(model, block)
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in ws:
            w.requires_grad_(True)
        n = 0
        with torch.enable_grad():
            for images, labels, _ in datamodule.dataloader("train", batch_size=batch_size):
                images, labels = images.to(ws[0].device), labels.to(ws[0].device)
                F.cross_entropy(model(images), labels, reduction="sum").backward()
                n += len(labels)
        g = _flat_grad(ws).double() / max(1, n)
    finally:
        for w in ws:
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was)
    return g, n


def _flat_w(w: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([w["W_bef"].reshape(-1), w["W_aft"].reshape(-1)]).double()


@torch.no_grad()
def _split_accuracy(model: torch.nn.Module, datamodule: Any, split: str, batch_size: int = 512) -> float:
    was = model.training
    model.eval()
    correct = n = 0
    device = next(model.parameters()).device
    for images, labels, _ in datamodule.dataloader(split, batch_size=batch_size):
        correct += int((model(images.to(device)).argmax(-1).cpu() == labels).sum())
        n += len(labels)
    model.train(was)
    return correct / max(1, n)


# ------------------------------------------------------------------------------------------- the entry point
def optimizer_ground_truths(run_cfg: Mapping[str, Any], datamodule: Any, epoch: int, *,
                            checkpoint_path: Callable[[int], str | Path],
                            ffn_weights_path: Callable[[int], str | Path],
                            load_model: Callable[[str | Path], ImageClassifier] | None = None,
                            sgd_lr: float = DEFAULT_SGD_LR, momentum: float = DEFAULT_MOMENTUM,
                            nesterov: bool = False, replay_recorded: bool = True, verify: bool = True,
                            tol: float = 1e-6, fl_grad: Tensor | None = None, train_grad: bool = True,
                            eval_split: str | None = "val", pos_fraction: float = 0.01,
                            k_rounding: str = "round", batch_size: int = 512, block: int = -1,
                            load_weights: Callable[[int], Mapping[str, Tensor]] | None = None) -> dict[str, Any]:
    """The SGD ground truth of epoch ``epoch`` and the diagnostics of both optimizers, for the FL evaluation step.

    ``run_cfg``: the run's ``run_config.yaml`` as a dict (:func:`replay_settings`); ``datamodule``: built from it
    (``vitfl.lightning_modules.runs.datamodule_from_run``); ``checkpoint_path(e)`` / ``ffn_weights_path(e)``: the run's
    per-epoch checkpoint and last-FFN weight file of epoch e (``RunStore.checkpoint`` / ``RunStore.ffn_weights``);
    ``load_model(path)``: default ``vitfl.lightning_modules.runs.load_classifier``. ``fl_grad``: optional ``[total]``
    gradient on the FL inputs at W(e-1) (its magnitude is correlated). ``block``: whose FFN (default -1, the last;
    module docstring); ``load_weights(e)``: the recorded weights of that block at epoch e (plain names; default the
    last FFN's tensors of ``ffn_weights_path(e)``), needed for a block other than the last.

    Steps: (1) with ``replay_recorded``, replay the recorded optimizer from W(0) through epoch e (e epochs of
    training) and, with ``verify``, check it against the recorded weight files (:func:`verify_replay`, raises above
    ``tol``); (2) from W(e-1) (``checkpoint_path(e-1)``) run epoch e with SGD (``sgd_lr``, ``momentum``; a fresh
    buffer); (3) the training gradient at W(e-1) (:func:`training_gradient`, if ``train_grad``); (4)
    :func:`update_diagnostics` for the recorded change ``W(e) - W(e-1)`` (files) and for ``W_sgd(e) - W(e-1)``.

    Returns a dict: ``optimizer`` (the recorded optimizer's name, e.g. "adamw"), ``epoch``, ``replay`` (``max_diff``
    per epoch, ``tol``, per-epoch ``train_acc`` / ``train_loss``, ``seconds``; None without ``replay_recorded``),
    ``sgd`` (``name``: :func:`sgd_name`; ``weights``: W_sgd(e) with the keys of ``vitfl.callbacks.ffn_weights.ffn_state``;
    ``settings``, ``train_acc``, ``train_loss``, ``seconds``), ``ground_truth_sgd`` (a
    :class:`~vitfl.evaluation.checkpoint_benchmark.GroundTruth` of ``|W_sgd(e) - W(e-1)|``), ``accuracy`` (eval-mode
    accuracy on ``eval_split`` of W(e-1), the recorded W(e) and W_sgd(e), if ``eval_split``), ``diagnostics``
    (``recorded`` and ``sgd``), ``timing`` (seconds per part and total) and ``summary`` (one line per optimizer)."""
    if load_model is None:
        from vitfl.lightning_modules.runs import load_classifier as load_model
    t_all = time.perf_counter()
    e = int(epoch)
    if e < 1:
        raise ValueError(f"epoch must be >= 1 (the change W(e) - W(e-1)), got {epoch}")
    cfg = replay_settings(run_cfg)
    total_epochs, limit = cfg["total_epochs"], cfg["limit_train_batches"]
    if e > total_epochs:
        raise ValueError(f"epoch {e} is past the run's {total_epochs} epochs")
    timing: dict[str, float] = {}
    sgd_label = sgd_name(momentum, nesterov)
    if load_weights is None:
        if block != -1:
            raise ValueError(f"block {block}: pass load_weights, the reader of that block's recorded weights")
        load_weights = lambda ep: _last_ffn_tensors(ffn_weights_path(ep))  # noqa: E731
    w_prev = dict(load_weights(e - 1))
    w_rec = dict(load_weights(e))

    replay = None
    rec_epoch: EpochRecord | None = None
    rec_ratio = rec_start = None
    optimizer_name = None
    if replay_recorded:
        model0 = load_model(checkpoint_path(0))
        res = replay_fit(model0, datamodule, total_epochs, e, optimizer="recorded", limit_train_batches=limit,
                         block=block)
        timing["replay_s"] = res.seconds
        optimizer_name = res.optimizer
        diffs = verify_replay(res, ffn_weights_path, tol, raise_on_mismatch=verify, load_weights=load_weights)
        rec_epoch, rec_ratio = res.epoch(e), res.adam_ratio
        rec_start = res.epoch(e - 1).adam_ratio if e > 1 else None
        replay = {"max_diff": diffs, "tol": tol, "verified": verify, "steps_per_epoch": res.steps_per_epoch,
                  "schedule": {"total": res.schedule[0], "warmup": res.schedule[1], "floor": res.schedule[2]},
                  "train_acc": {r.epoch: r.train_acc for r in res.epochs},
                  "train_loss": {r.epoch: r.train_loss for r in res.epochs}, "seconds": res.seconds,
                  "settings": res.settings}
        del model0

    model = load_model(checkpoint_path(e - 1))
    if optimizer_name is None:
        optimizer_name = type(model.build_optimizer(1, 1)[0]).__name__.lower()
    diff_prev = _max_diff(ffn_state(_block_head(model, block)), w_prev)
    if diff_prev > tol:
        raise ReplayMismatchError(f"checkpoint {checkpoint_path(e - 1)} is not the model of {ffn_weights_path(e - 1)}: "
                                  f"their {'last-FFN' if block == -1 else f'block {block} FFN'} weights differ by up "
                                  f"to {diff_prev:.3g}")
    grad_train = None
    if train_grad:
        t0 = time.perf_counter()
        grad_train, n_train = training_gradient(model, datamodule, batch_size, block)
        timing["train_grad_s"] = time.perf_counter() - t0
    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    if eval_split:
        acc[f"W({e - 1})"] = _split_accuracy(model, datamodule, eval_split, batch_size)
    t_eval = time.perf_counter() - t0
    sgd = replay_fit(model, datamodule, total_epochs, e, start_epoch=e - 1, optimizer="sgd", sgd_lr=sgd_lr,
                     momentum=momentum, nesterov=nesterov, limit_train_batches=limit, block=block)
    timing["sgd_s"] = sgd.seconds
    sgd_epoch = sgd.epoch(e)
    if eval_split:
        t0 = time.perf_counter()
        acc[f"W_sgd({e})"] = _split_accuracy(model, datamodule, eval_split, batch_size)
        acc[f"W({e})"] = _split_accuracy(load_model(checkpoint_path(e)), datamodule, eval_split, batch_size)
        timing["eval_s"] = t_eval + time.perf_counter() - t0

    prev_flat = _flat_w(w_prev)
    d_rec = _flat_w(w_rec) - prev_flat
    d_sgd = _flat_w(sgd_epoch.ffn) - prev_flat
    diag_rec = update_diagnostics(d_rec, grad_train=grad_train, grad_fl=fl_grad,
                                  grad_steps=rec_epoch.grad_mean if rec_epoch else None,
                                  grad_snr=rec_epoch.grad_snr if rec_epoch else None,
                                  adam_ratio_start=rec_start, adam_ratio_end=rec_ratio, w_prev=prev_flat)
    diag_sgd = update_diagnostics(d_sgd, grad_train=grad_train, grad_fl=fl_grad, grad_steps=sgd_epoch.grad_mean,
                                  grad_snr=sgd_epoch.grad_snr, w_prev=prev_flat)
    gt = weight_change_ground_truth(w_prev, sgd_epoch.ffn, e, pos_fraction, optimizer=sgd_label,
                                    k_rounding=k_rounding)
    gt.info.update({"source": f"SGD replay of epoch {e} from W({e - 1})", "sgd_lr": sgd_lr, "momentum": momentum,
                    "nesterov": nesterov})
    timing["total_s"] = time.perf_counter() - t_all

    def line(label: str, dg: dict[str, Any]) -> str:
        parts = [f"|{k}| {dg[f'spearman_{k}']:+.3f}" for k in DIAGNOSTIC_KEYS if f"spearman_{k}" in dg]
        down = [f"-{k} {dg[f'downhill_{k}']:.3f}" for k in ("grad_train", "grad_steps") if f"downhill_{k}" in dg]
        return (f"{label}: Spearman of |dW| with " + ", ".join(parts)
                + ("; sign(dW) agrees with " + ", ".join(down) if down else ""))

    head = (f"epoch {e - 1} -> {e}: replay of {optimizer_name} "
            + (f"max |W_replay - W_recorded| {max(replay['max_diff'].values()):.2g} in {replay['seconds']:.1f} s"
               if replay else "skipped")
            + f"; {sgd_label} (lr {sgd_lr:g}, momentum {momentum:g}) epoch in {sgd.seconds:.1f} s, train acc "
            + f"{sgd_epoch.train_acc:.4f}"
            + (f" vs {optimizer_name} {rec_epoch.train_acc:.4f}" if rec_epoch else ""))
    summary = "\n".join([head, line(f"  {optimizer_name}", diag_rec), line(f"  {sgd_label}", diag_sgd)])
    return {"optimizer": optimizer_name, "epoch": e, "epoch_prev": e - 1, "replay": replay,
            "sgd": {"name": sgd_label, "weights": sgd_epoch.ffn, "settings": sgd.settings,
                    "train_acc": sgd_epoch.train_acc, "train_loss": sgd_epoch.train_loss, "seconds": sgd.seconds},
            "ground_truth_sgd": gt, "accuracy": acc, "eval_split": eval_split,
            "n_train_grad": n_train if train_grad else None,
            "diagnostics": {"recorded": diag_rec, "sgd": diag_sgd},
            "timing": timing, "summary": summary}
