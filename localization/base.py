"""The FL method base class, its registry and the FL result (formulas: ``docs/methods.md``).

A localizer is a ``torchmetrics.Metric``: sums over inputs (GL, FI parts, V-score moments, IG, spectrum counts)
are declared with ``add_state(..., dist_reduce_fx="sum")`` and accumulated in :meth:`Localizer.update`, one batch
of cached states at a time; :meth:`Localizer.compute` turns them into scores. So a 2-process run gives the same
scores as one process, and the FL LightningModule only feeds batches.

Adding a method is one file in ``localization/methods/`` (found by the registry: no list to edit), or a module of a
plugin package advertised under the ``vitfl.fl_methods`` entry point::

    @register_localizer("my_method")
    class MyMethod(Localizer):
        '''score_ij = ... (its formula, and any deviation from the published one)'''
        level = "weight"                       # or "neuron"
        def __init__(self, head, **options): super().__init__(head); self.add_state("s", ..., dist_reduce_fx="sum")
        def update(self, x, label, is_neg): ...
        def compute(self): return scores          # [total weights] or [d_ff]

Then ``scripts/localize.py --methods my_method`` and every sweep, table and plot pick it up by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torchmetrics
from torch import Tensor

from vitfl.core.registry import Derived, Registry, UnknownNameError
from vitfl.localization.ffn import FFNHead, WeightIndex

class UnknownMethodError(UnknownNameError):
    """An FL method name no file registered."""


class UnsupportedHeadError(ValueError):
    """An FL method that is not defined on a token head (a non-last block or a non-CLS pooling: states
    ``[N, T, d]``); the message names the method, the block and why."""


def _has_own_selection(cls) -> bool:
    return callable(getattr(cls, "own_selection", None))


#: Every FL method, found by importing each module of ``vitfl.localization.methods`` (no hand-kept list) and the
#: ``vitfl.fl_methods`` entry points. Metadata the runners read instead of testing names:
#: ``level`` ("weight" | "neuron"), ``needs_inputs`` (False: no data pass), ``own_selection`` (True: the method
#: picks its own set, like BL's Pareto front: budget "front"), ``reseed_per_rep`` (True: redrawn with the
#: repetition's seed in a repair sweep, like random), ``batching`` (None or the batch size b of a published
#: formula that depends on its batches: the runner feeds the published input order and the method batches each
#: set as ``np.array_split`` into ceil(|S| / b) parts), ``uses_true_label`` (the runner passes ``true_label``,
#: the setting's true label), ``pos_sample`` (None or "n_neg": the runner gives a seeded sample of |I_neg|
#: correct inputs as I_pos).
FL_METHODS = Registry(
    "FL method", packages=("vitfl.localization.methods",), entry_points="vitfl.fl_methods", error=UnknownMethodError,
    meta_fields={"level": "weight", "needs_inputs": True, "own_selection": Derived(_has_own_selection),
                 "reseed_per_rep": False, "batching": None, "uses_true_label": False, "pos_sample": None})


def register_localizer(name: str, **meta: Any):
    """Class decorator: register a :class:`Localizer` subclass as FL method ``name`` (metadata: see
    :data:`FL_METHODS`; by default read from the class attributes of the same names)."""
    return FL_METHODS.register(name, **meta)


def registered_localizers() -> list[str]:
    return FL_METHODS.names()


def get_localizer(name: str) -> type["Localizer"]:
    return FL_METHODS.get(name)


def method_meta(name: str) -> dict[str, Any]:
    """The runner-facing metadata of FL method ``name``."""
    return FL_METHODS.meta(name)


def selects_own(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether method ``name`` with ``options`` selects its own set (budget "front"): its ``own_selection``
    metadata, refined by the class's ``uses_own_selection(options)`` where it has one (IG: only the paper rule)."""
    if not method_meta(name)["own_selection"]:
        return False
    fn = getattr(FL_METHODS.get(name), "uses_own_selection", None)
    return bool(fn(dict(options or {}))) if callable(fn) else True


#: states of at least this many elements made by :func:`lazy_zeros` are allocated at the first update (every
#: non-scalar one, so that the small heads of the tests take the same path as ViT-B's 4.7M-entry states)
LAZY_MIN_NUMEL = 2


def lazy_zeros(*shape: int, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    """A zero state default of ``shape`` that costs no memory until the first update (a read-only zero-stride view
    of one zero; :meth:`Localizer.add_state` keeps it so). Small shapes get an ordinary zero tensor."""
    if math.prod(shape) < LAZY_MIN_NUMEL:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def is_lazy_zeros(t: Any) -> bool:
    """Whether ``t`` is a :func:`lazy_zeros` view (a tensor of >= LAZY_MIN_NUMEL elements, every stride 0)."""
    return isinstance(t, Tensor) and t.numel() >= LAZY_MIN_NUMEL and all(st == 0 for st in t.stride())


class Localizer(torchmetrics.Metric):
    """Base of every FL method. ``update(x [B, d], label [B], is_neg [B] bool)`` on cached CLS states of I_neg and
    I_pos (on a token head, :class:`~vitfl.localization.ffn.TokenFFNHead`: the token states ``x [B, T, d]`` entering
    its block's FFN; docs/methods.md, section 1, says what each method computes there); ``compute()`` -> scores, ``[d_ff]`` for ``level == "neuron"`` or ``[2 d d_ff]`` (global weight index,
    W_bef then W_aft) for ``level == "weight"``. Higher score = more suspicious."""

    name: ClassVar[str] = "?"
    level: ClassVar[str] = "weight"
    #: False for methods that ignore inputs (random, magnitude): the FL module then skips the data pass.
    needs_inputs: ClassVar[bool] = True
    #: False for a method not defined on a token head (``head.token_axis``: the FFN of a non-last block or of a
    #: non-CLS-pooled model, states ``[N, T, d]``); constructing it on one raises :class:`UnsupportedHeadError`
    #: naming the method, the block and ``token_heads_why``. Every built-in method supports token heads.
    token_heads: ClassVar[bool] = True
    token_heads_why: ClassVar[str] = ""
    full_state_update = False

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        if getattr(head, "token_axis", False) and not type(self).token_heads:
            raise UnsupportedHeadError(
                f"FL method {self.name!r} cannot run on the FFN head of block {head.block} "
                f"({getattr(head, 'pooling', '?')} pooling, token states [N, T, d]): "
                f"{self.token_heads_why or 'it is defined on one CLS state per input only'}. It runs on the last "
                "block of a CLS-pooled model (vitfl.localization.ffn.last_ffn_head).")
        super().__init__(**kwargs)
        # held in a tuple, so nn.Module does not make it a submodule: the head's parameters are not metric state
        self._head_ref = (head,)
        self.seed = seed

    @property
    def head(self) -> FFNHead:
        return self._head_ref[0]

    # ------------------------------------------------------------------------------ lazily allocated zero states
    def add_state(self, name: str, default: Any, *args: Any, **kwargs: Any) -> None:
        """``torchmetrics.Metric.add_state``; a default made by :func:`lazy_zeros` (a zero-stride view of one zero)
        is kept as it is: the state's memory is allocated at the first :meth:`materialize_states`, and neither
        construction nor :meth:`reset` writes (or copies into ``_defaults``) the 38 MB of a per-weight state."""
        if not is_lazy_zeros(default):
            super().add_state(name, default, *args, **kwargs)
            return
        super().add_state(name, default.new_zeros(()), *args, **kwargs)  # registers the reduction, persistence
        self._lazy_states = {**getattr(self, "_lazy_states", {}), name: tuple(default.shape)}
        self._defaults[name] = default
        setattr(self, name, default)

    def materialize_states(self) -> None:
        """Give every lazily allocated state that is still a zero view its own zero tensor (on its device); an
        ``update`` calls this before writing into its states (:class:`~vitfl.localization.methods._common.SetLocalizer`
        does)."""
        for name, shape in getattr(self, "_lazy_states", {}).items():
            t = getattr(self, name)
            if is_lazy_zeros(t):
                setattr(self, name, torch.zeros(shape, dtype=t.dtype, device=t.device))

    def reset(self) -> None:
        """``torchmetrics.Metric.reset``; lazily allocated states go back to zero views (their memory is freed)."""
        lazy = getattr(self, "_lazy_states", {})
        keep = {name: (getattr(self, name).dtype, getattr(self, name).device) for name in lazy}
        for name in lazy:  # torchmetrics' reset clones every default: give it a one-element stand-in
            self._defaults[name] = self._defaults[name].new_zeros(())
        super().reset()
        for name, shape in lazy.items():
            z = lazy_zeros(*shape, dtype=keep[name][0], device=keep[name][1])
            self._defaults[name] = z
            setattr(self, name, z)

    @property
    def index(self) -> WeightIndex:
        return self.head.index

    def update(self, x: Tensor, label: Tensor, is_neg: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, recorded in the result's provenance."""
        return {}


@dataclass
class FLResult:
    """What an FL run produces (plain tensors; the run store, ``vitfl.core.runstore``, writes and reads it).

    ``scores``: the full score vector (``[d_ff]`` or ``[total weights]``), for rank-based benchmarks.
    ``weights``: ``[n, 3]`` (matrix, row, col) of the located weights, most suspicious first.
    ``neurons``: ranked located neurons for neuron-level methods (their weights are row j of W_bef and column j
    of W_aft), else None.
    """

    method: str
    level: str
    budget: int | str
    scores: Tensor
    weights: Tensor
    neurons: Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "level": self.level, "budget": self.budget, "scores": self.scores,
                "weights": self.weights, "neurons": self.neurons, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FLResult":
        return cls(**{k: d.get(k) for k in ("method", "level", "budget", "scores", "weights", "neurons",
                                             "provenance")})
