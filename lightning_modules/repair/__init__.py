"""Repair of an FFN's located weights (the last block's, or any block's through
``vitfl.localization.ffn.ffn_head(model, block)``): a registry of repair LightningModules (formulas:
docs/methods.md, section 6; a method that cannot run exactly on a token head declares ``token_head_refusal``).

Each method is one file in this package (found by the registry: no list to edit), or a module of a plugin package
advertised under the ``vitfl.repair_methods`` entry point, that registers itself::

    @register_repair("my_repair", optimises="what its search or training maximises / minimises")
    class MyRepair(RepairModule):
        '''what it changes, and how (formula)'''
        def training_step(self, batch, batch_idx): ...
        def new_values(self) -> Tensor: ...        # [K] new values of the located weights

and the sweep (``scripts/repair_sweep.py --repair my_repair``), tables and plots pick it up by name.

Registered here: ``de`` (Arachne/RepTran differential evolution, :mod:`.de`), ``lp`` (sequential linear programs on the
exact FFN head, a repairability oracle, :mod:`.lp`), ``finetune`` (masked gradient
descent, :mod:`.finetune`), ``prune`` and ``reinit`` (:mod:`.prune`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitfl.core.registry import Registry, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from vitfl.lightning_modules.repair.base import RepairModule


class UnknownRepairError(UnknownNameError):
    """A repair method name no file registered."""


#: every repair method; metadata: ``optimises`` (what the method maximises or minimises, for tables and docs)
REPAIRS = Registry("repair method", packages=("vitfl.lightning_modules.repair",), entry_points="vitfl.repair_methods",
                   meta_fields={"optimises": ""}, error=UnknownRepairError)


def register_repair(name: str, **meta: Any):
    """Class decorator: register a :class:`~vitfl.lightning_modules.repair.base.RepairModule` under ``name``."""
    return REPAIRS.register(name, **meta)


def registered_repairs() -> list[str]:
    return REPAIRS.names()


def get_repair(name: str) -> type["RepairModule"]:
    """The repair class registered as ``name`` (unknown names raise, listing the registered ones)."""
    return REPAIRS.get(name)


__all__ = ["REPAIRS", "register_repair", "get_repair", "registered_repairs", "UnknownRepairError"]
