"""Published batching of the RepTran compat formulas, shared by the methods and by :func:`vitfl.localization.ranking.localize`:
each set S is cut as ``np.array_split(S, ceil(|S| / b))`` (balanced parts), and a batch of rows never splits a part.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["array_split_sizes", "compat_groups", "whole_group_batches", "neg_first_order", "group_sizes"]


def array_split_sizes(n: int, b: int) -> list[int]:
    """The part sizes of ``np.array_split(S, ceil(n / b))`` for a set of n rows: ceil(n / b) parts, the first
    n mod k of them one row longer (70, 32 -> [24, 23, 23]; 40, 32 -> [20, 20]; 0 -> [])."""
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"the compat batch size must be a positive int, got {b!r}")
    if n <= 0:
        return []
    k = -(-n // b)
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def compat_groups(is_neg: Tensor, b: int) -> Tensor:
    """Compat batch id of every row ``[N]`` int64 for rows holding I_neg first, then I_pos (``is_neg [N]`` bool):
    I_neg's rows get ids 0..k_neg-1, I_pos's k_neg..k_neg+k_pos-1, each set split as ``np.array_split`` into
    ceil(|S| / b) consecutive parts (:func:`array_split_sizes`)."""
    is_neg = torch.as_tensor(is_neg).bool().reshape(-1).cpu()
    n_neg = int(is_neg.sum())
    if bool(is_neg[n_neg:].any()) or not bool(is_neg[:n_neg].all()):
        raise ValueError("a method with published batching needs the rows ordered I_neg first (in the published "
                         "order), then I_pos (ascending sample index); got I_neg rows after I_pos rows")
    sizes = array_split_sizes(n_neg, b) + array_split_sizes(is_neg.numel() - n_neg, b)
    return torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.long),
                                   torch.tensor(sizes, dtype=torch.long))


def whole_group_batches(group: Tensor, batch_size: int, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` covering rows lo..hi of ``group`` (ids ascending, as from
    :func:`compat_groups`) with at most ``batch_size`` rows each and never cutting a group (a group longer than
    ``batch_size`` gets a range of its own)."""
    hi = group.numel() if hi is None else hi
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    counts = group_sizes(group[lo:hi])
    out: list[tuple[int, int]] = []
    start = end = lo
    for c in counts:
        if end > start and end + c - start > batch_size:
            out.append((start, end))
            start = end
        end += c
    if end > start:
        out.append((start, end))
    return out


def neg_first_order(is_neg: Tensor) -> Tensor:
    """Row permutation ``[N]`` putting the I_neg rows first, then the I_pos rows, each in the order given (a
    stable partition; the identity when the rows are already so ordered)."""
    is_neg = torch.as_tensor(is_neg).bool().reshape(-1).cpu()
    return torch.cat([torch.nonzero(is_neg).squeeze(1), torch.nonzero(~is_neg).squeeze(1)])


def group_sizes(group: Tensor) -> list[int]:
    """Sizes of the runs of equal consecutive ids in ``group [B]`` (one per compat batch)."""
    if group.numel() == 0:
        return []
    return torch.unique_consecutive(group, return_counts=True)[1].tolist()


# ------------------------------------------------------------------------------------------------------- checks
