"""Adversarial examples through the Adversarial Robustness Toolbox (``art.attacks.evasion`` on an
``art.estimators.classification.PyTorchClassifier``): FGSM, PGD (L-inf) and Carlini & Wagner (L2).

Budgets are stated relative to the input range: with ``clip_values = (lo, hi)`` (default: the min and max of the
given inputs), FGSM / PGD use ``eps_abs = eps * (hi - lo)`` and step ``eps_step * (hi - lo)``; so ``eps = 0.1`` on
normalised digits is 10% of the pixel range whatever the normalisation. C&W is unbounded in norm (confidence,
learning rate, initial constant, binary-search steps and iterations are its knobs; the defaults, one binary-search
step from c = 3 with 20 iterations, are a fast setting that fools a digits LeNet-5 on ~90% of inputs: ART's
line search makes its default 10 binary-search steps slow on CPU). Untargeted (against the true labels, or the
predictions when no labels are given).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vitfl.adequacy import require

__all__ = ["ATTACKS", "art_classifier", "adversarial_examples"]

ATTACKS = ("fgsm", "pgd", "cw")


def art_classifier(model: nn.Module, input_shape: Sequence[int], nb_classes: int,
                   clip_values: tuple[float, float]):
    """Wrap ``model`` (images -> logits) as an ART ``PyTorchClassifier`` with cross-entropy loss."""
    PyTorchClassifier = require("art.estimators.classification", "adversarial-robustness-toolbox").PyTorchClassifier

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=int(nb_classes), clip_values=(float(clip_values[0]), float(clip_values[1])),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def adversarial_examples(model: nn.Module, inputs: Tensor, labels: Tensor | Sequence[int] | None = None,
                         method: str = "fgsm", eps: float = 0.1, eps_step: float | None = None, max_iter: int = 20,
                         clip_values: tuple[float, float] | None = None, nb_classes: int | None = None,
                         batch_size: int = 128, seed: int = 0, cw_confidence: float = 0.0,
                         cw_learning_rate: float = 0.1, cw_binary_search_steps: int = 1, cw_max_iter: int = 20,
                         cw_initial_const: float = 3.0, cw_max_halving: int = 2, cw_max_doubling: int = 2,
                         verbose: bool = False) -> Tensor:
    """Adversarial versions ``[N, C, H, W]`` of ``inputs`` (untargeted, against ``labels`` or, when None, the
    model's predictions). ``method`` in ``ATTACKS``; see the module docstring for the budgets."""
    evasion = require("art.attacks.evasion", "adversarial-robustness-toolbox")
    CarliniL2Method, FastGradientMethod = evasion.CarliniL2Method, evasion.FastGradientMethod
    ProjectedGradientDescent = evasion.ProjectedGradientDescent

    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}; expected one of {ATTACKS}")
    if not isinstance(inputs, Tensor) or inputs.ndim != 4 or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty image tensor [N, C, H, W]")
    if not 0 < eps <= 1:
        raise ValueError(f"eps is a fraction of the input range, in (0, 1]; got {eps}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            logits = model(inputs[:1].to(device))
        nb_classes = int(nb_classes or logits.shape[-1])
        lo, hi = clip_values if clip_values is not None else (float(inputs.min()), float(inputs.max()))
        if not hi > lo:
            raise ValueError(f"clip_values must satisfy lo < hi, got ({lo}, {hi})")
        clf = art_classifier(model, inputs.shape[1:], nb_classes, (lo, hi))
        x = inputs.detach().cpu().numpy().astype(np.float32)
        y = None
        if labels is not None:
            lab = torch.as_tensor(labels).view(-1).cpu().numpy().astype(np.int64)
            if len(lab) != len(x):
                raise ValueError(f"{len(x)} inputs but {len(lab)} labels")
            y = np.eye(nb_classes, dtype=np.float32)[lab]
        np.random.seed(seed)  # ART's random inits draw from numpy's global generator
        torch.manual_seed(seed)
        span = hi - lo
        if method == "fgsm":
            attack = FastGradientMethod(clf, eps=eps * span, batch_size=batch_size)
        elif method == "pgd":
            step = (eps_step if eps_step is not None else eps / 4) * span
            attack = ProjectedGradientDescent(clf, eps=eps * span, eps_step=step, max_iter=max_iter,
                                              batch_size=batch_size, verbose=verbose)
        else:
            attack = CarliniL2Method(clf, confidence=cw_confidence, learning_rate=cw_learning_rate,
                                     binary_search_steps=cw_binary_search_steps, max_iter=cw_max_iter,
                                     initial_const=cw_initial_const, max_halving=cw_max_halving,
                                     max_doubling=cw_max_doubling, batch_size=batch_size, verbose=verbose)
        adv = attack.generate(x=x, y=y)
    finally:
        model.train(was_training)
    return torch.from_numpy(np.asarray(adv, dtype=np.float32)).to(inputs.dtype)
