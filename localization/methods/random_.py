"""Random FL (docs/methods.md): uniform scores from a seeded generator, the baseline every method is compared
with. Weight level (``random``): one score per weight ``[2 d d_ff]``; neuron level (``random_neuron``): one per
intermediate neuron ``[d_ff]``. Scores are float64 (float32's 2^24 values would tie often among 4.7M weights,
and ties break by index, favouring W_bef). Inputs are ignored (``needs_inputs = False``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.methods._common import InputFreeLocalizer

__all__ = ["random_scores", "RandomWeights", "RandomNeurons"]


def random_scores(n: int, seed: int) -> Tensor:
    """``[n]`` i.i.d. U(0, 1) float64 scores from ``torch.Generator().manual_seed(seed)`` (CPU, reproducible)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, generator=g, dtype=torch.float64)


@register_localizer("random")
class RandomWeights(InputFreeLocalizer):
    """score(w) ~ U(0, 1) with the given seed, ``[2 d d_ff]``."""

    level = "weight"
    #: a repair sweep redraws it with each repetition's seed
    reseed_per_rep = True

    def _size(self) -> int:
        return self.index.total

    def compute(self) -> Tensor:
        return random_scores(self._size(), self.seed)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}


@register_localizer("random_neuron")
class RandomNeurons(RandomWeights):
    """score(j) ~ U(0, 1) with the given seed, ``[d_ff]``."""

    level = "neuron"

    def _size(self) -> int:
        return self.head.d_ff
