"""The FL LightningModule: one localizer run by the Trainer's ``test`` loop over cached CLS states.

The science is in ``localization/methods/*`` (a ``Localizer`` is a torchmetrics Metric whose sums over inputs are
``dist_reduce_fx="sum"`` float64 states); this module only feeds batches of cached states ``(x [B, d], label [B],
is_neg [B])`` to ``localizer.update`` and calls ``compute`` at the end of the epoch, where torchmetrics syncs the
states across processes. So a 2-process run gives the same scores as one process (``tests/test_fl_module.py``).

Gradients: every parameter of the FFN head except the last FFN's two weight matrices is frozen, so gradient
hooks and autograd touch only W_bef / W_aft. Run with ``Trainer(inference_mode=False)``.

Sharding and batching:

* ordinary methods: each process gets a contiguous, unpadded share of the rows (:class:`ContiguousShardSampler`;
  a padding sampler would count inputs twice), in loader batches of ``batch_size``;
* methods whose published formula depends on its batches (the localizer's ``batching`` = b, e.g. the
  ``*_reptran`` family, ``ours_fl5``, ``bl_fl5``): the I_neg rows are fed first in the order given (the runner
  gives the published order), then the I_pos rows in the order given (ascending sample index). Each set is cut
  as ``np.array_split(S, ceil(|S| / b))``
  (:func:`vitfl.localization.methods._common.compat_groups`); :class:`CompatBatchSampler` gives each process whole
  parts only and never cuts a part across loader batches (a loader batch holds whole parts up to ``batch_size``
  rows, or one part if it is longer), and ``test_step`` passes the part ids as ``update(..., group=ids)``. The
  scores are then independent of ``batch_size`` and of the number of processes, and equal
  :func:`vitfl.localization.ranking.localize`'s.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import compat_groups, neg_first_order, whole_group_batches


class ContiguousShardSampler(Sampler[int]):
    """Rank r of w gets rows [r*n/w, (r+1)*n/w): every row exactly once over all ranks, no padding."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.lo, self.hi = n * rank // world_size, n * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.lo, self.hi))

    def __len__(self) -> int:
        return self.hi - self.lo


class CompatBatchSampler(Sampler[list[int]]):
    """Batches of row indices that never cut a compat batch: rank r of w gets the parts (runs of equal id in
    ``group [N]``, ascending) whose first row lies in [r*n/w, (r+1)*n/w), in loader batches of whole parts with at
    most ``batch_size`` rows (a longer part is a batch of its own). Every row exactly once over all ranks."""

    def __init__(self, group: torch.Tensor, batch_size: int, rank: int, world_size: int):
        group = torch.as_tensor(group).reshape(-1)
        n = group.numel()
        starts = torch.ones(n, dtype=torch.bool)
        if n:
            starts[1:] = group[1:] != group[:-1]
        start_rows = torch.nonzero(starts).squeeze(1).tolist() + [n]
        lo_b, hi_b = n * rank // world_size, n * (rank + 1) // world_size
        mine = [i for i, s in enumerate(start_rows[:-1]) if lo_b <= s < hi_b]
        lo = start_rows[mine[0]] if mine else 0
        hi = start_rows[mine[-1] + 1] if mine else 0
        self.ranges = whole_group_batches(group, batch_size, lo, hi) if mine else []
        self.rows = hi - lo

    def __iter__(self):
        return iter([list(range(a, b)) for a, b in self.ranges])

    def __len__(self) -> int:
        return len(self.ranges)


class FLModule(L.LightningModule):
    def __init__(self, head: FFNHead, method: str, x: torch.Tensor, label: torch.Tensor, is_neg: torch.Tensor,
                 method_options: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 512):
        super().__init__()
        if getattr(head, "token_axis", False):
            head.check_states(x)  # a token head: x [N, T, d] entering its block's FFN
        elif x.ndim != 2 or x.shape[1] != head.d:
            raise ValueError(f"cached states x must be [N, {head.d}], got {tuple(x.shape)}")
        if not (len(x) == len(label) == len(is_neg)):
            raise ValueError("x, label and is_neg must have the same number of rows")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.head = head
        for name, p in head.named_parameters():
            p.requires_grad_(name in ("fc_bef.weight", "fc_aft.weight"))
        self.localizer = get_localizer(method)(head, seed=seed, **(method_options or {}))
        self.batching = getattr(self.localizer, "batching", None)
        is_neg = is_neg.bool()
        if self.batching is not None:  # I_neg rows first, then I_pos, each set in the order given
            order = neg_first_order(is_neg)
            x, label, is_neg = x[order], label[order], is_neg[order]
            group = compat_groups(is_neg, self.batching)  # part ids of the published batching
        else:
            group = torch.full((len(x),), -1, dtype=torch.long)
        self.data = TensorDataset(x, label.long(), is_neg, group)
        self.batch_size = batch_size
        self.scores: torch.Tensor | None = None

    def test_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer else (1, 0)
        if self.batching is not None:
            return DataLoader(self.data, batch_sampler=CompatBatchSampler(self.data.tensors[3], self.batch_size,
                                                                          rank, world))
        return DataLoader(self.data, batch_size=self.batch_size,
                          sampler=ContiguousShardSampler(len(self.data), rank, world))

    def on_test_epoch_start(self) -> None:
        # fresh states for every run, owned by this process: ddp_spawn hands the module to its workers with every
        # tensor in shared memory and Lightning un-shares only parameters and buffers, not metric states
        self.localizer.reset()

    def test_step(self, batch, batch_idx) -> None:
        x, label, is_neg, group = batch
        if not self.localizer.needs_inputs:
            return
        if self.batching is not None:
            self.localizer.update(x, label, is_neg, group=group)
        else:
            self.localizer.update(x, label, is_neg)

    def on_test_epoch_end(self) -> None:
        self.scores = self.localizer.compute().detach().cpu().double()
