"""The published RepTran GL / FI sums over the parts of one set (shared by the ``*_reptran`` methods and
``ours_fl5``; the formulas are in ``reptran_compat.py``'s docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import _no_inference_mode, weights_require_grad

__all__ = ["EPS", "REPTRAN_BATCH", "ReptranSums", "reptran_sums"]

EPS = 1e-8
#: the published batch size (RepTran's ``ViTExperiment.BATCH_SIZE``)
REPTRAN_BATCH = 32


@dataclass
class ReptranSums:
    """Sums over the parts of one set: gl_* = sum_b GL_b, fi_* = sum_b FI_b / W (head dtype), the number of
    parts, and the forward's LN(x) ``h [N, d]`` and activations ``a [N, d_ff]`` (detached)."""

    gl_bef: Tensor
    gl_aft: Tensor
    fi_bef: Tensor | None
    fi_aft: Tensor | None
    n_batches: int
    h: Tensor
    a: Tensor


def reptran_sums(head: FFNHead, x: Tensor, label: Tensor, sizes: Sequence[int], fi: bool = True,
                 gl: bool = True) -> ReptranSums:
    """The published GL / FI summed over the consecutive parts of ``x [N, d]`` with the given ``sizes`` (``gl`` /
    ``fi`` False: that one is not computed and is None).

    FI_b = front_b * back_b = W * [(R_b^T o_b) * (G_b^T o_b)] / B_b with R_b = 1 / (o_b W^T + 1e-8)
    ``[B_b, out]`` and G_b = per-input d(sum logits)/d(layer output before its activation) ``[B_b, out]``, so the
    sums exclude the factor W (the caller multiplies it in once). One forward and two backward passes over all N
    rows give every per-input gradient (rows are independent in the head); only the weight-shaped products run
    per part. GL is linear in the per-input gradients: sum_b GL_b = d/dW sum_x L(x) / B_{b(x)}.

    On a token head (``x [N, T, d]``) GL is the exact gradient through the head (every token); FI is the published
    formula on per-input vectors: o, its pre-bias product o W^T and G are each reduced over the tokens by the head's
    token statistic (:meth:`~vitfl.localization.ffn.TokenFFNHead.reduce_tokens`), as are the returned h and a.
    """
    sizes = [int(s) for s in sizes]
    n = x.shape[0]
    if sum(sizes) != n or any(s < 1 for s in sizes):
        raise ValueError(f"batch sizes {sizes} do not partition the {n} rows")
    _no_inference_mode()
    sz = torch.tensor(sizes, dtype=x.dtype, device=x.device)
    per_row = torch.repeat_interleave(1.0 / sz, torch.tensor(sizes, device=x.device))  # 1 / B_b of each row's part
    w_bef, w_aft = head.fc_bef.weight, head.fc_aft.weight
    with torch.enable_grad(), weights_require_grad(head):
        h = head.norm(x)
        z, hw = _linear(head.fc_bef, h, keep=fi)
        a = head.act(z)
        nn_out, aw = _linear(head.fc_aft, a, keep=fi)
        logits = head.post(x + head.layer_scale(nn_out))
        gl_bef = gl_aft = None
        if gl:
            loss = (F.cross_entropy(logits, label, reduction="none") * per_row).sum()
            gl_bef, gl_aft = torch.autograd.grad(loss, [w_bef, w_aft], retain_graph=fi)
        if fi:
            g_z, g_n = torch.autograd.grad(logits.sum(), [z, nn_out])  # dO/dz: W_bef's output before GELU
    h, a = h.detach(), a.detach()
    if head.token_axis:  # per-token tensors -> one vector per input (the head's token statistic)
        h, a = head.reduce_tokens(h), head.reduce_tokens(a)
    if not fi:
        return ReptranSums(gl_bef, gl_aft, None, None, len(sizes), h, a)
    g_z, g_n = g_z.detach(), g_n.detach()
    if head.token_axis:
        g_z, g_n = head.reduce_tokens(g_z), head.reduce_tokens(g_n)
        hw, aw = (None if t is None else head.reduce_tokens(t) for t in (hw, aw))
    w_bef, w_aft = w_bef.detach(), w_aft.detach()
    # R = 1 / (o W^T + 1e-8), signed, no |.|: o W^T is the forward's product before its bias (kept above), or
    # computed again where the layer is not a plain nn.Linear
    r_bef = (hw if hw is not None else h @ w_bef.t()).add_(EPS).reciprocal_()  # [N, d_ff]
    r_aft = (aw if aw is not None else a @ w_aft.t()).add_(EPS).reciprocal_()  # [N, d]
    fi_bef, fi_aft = torch.zeros_like(w_bef), torch.zeros_like(w_aft)
    for acc, r, g, o in ((fi_bef, r_bef, g_z, h), (fi_aft, r_aft, g_n, a)):
        _part_products(acc, r, g, o, sizes)
    return ReptranSums(gl_bef, gl_aft, fi_bef, fi_aft, len(sizes), h, a)


#: on the CPU the per-part products are formed for a band of the sum's rows at a time, so that the band of the sum
#: and its two products (3 x band) stay in the last-level cache across the parts. 32 MB: whole weights at ViT-B
#: shapes (3 x 9.4 MB), measured 0.63-0.66x the time of 8 MB bands on 2026-12-03 (fewer, larger products); larger
#: weights are banded
CPU_BAND_BYTES = 32 << 20


def _part_products(acc: Tensor, r: Tensor, g: Tensor, o: Tensor, sizes: Sequence[int]) -> None:
    """acc += sum_b (r_b^T o_b) * (g_b^T o_b) / B_b over the consecutive parts b of the rows (``acc [out, in]``,
    ``r, g [N, out]``, ``o [N, in]``). On the CPU the sum is formed with the weight's longer side as its rows
    (where in > out: acc^T = sum_b (o_b^T r_b) * (o_b^T g_b) / B_b, added in transposed at the end; MKL ran the
    per-part ``[768, 32] x [32, 3072]`` products of W_aft 2.8x slower than ``[3072, 32] x [32, 768]``, measured
    2026-12-03), in row bands of at most ``CPU_BAND_BYTES`` for the band of the sum and its two products."""
    out, inn = acc.shape
    if acc.device.type != "cpu":
        _banded(acc, (r, o), (g, o), sizes, out)
        return
    if inn > out:
        acc_t = acc.new_zeros(inn, out)
        _banded(acc_t, (o, r), (o, g), sizes, max(1, CPU_BAND_BYTES // (3 * out * acc.element_size())))
        acc.add_(acc_t.t())
    else:
        _banded(acc, (r, o), (g, o), sizes, max(1, CPU_BAND_BYTES // (3 * inn * acc.element_size())))


def _banded(acc: Tensor, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], sizes: Sequence[int],
            band: int) -> None:
    """acc ``[m, n]`` += sum_b (L_b^T R_b) * (L'_b^T R'_b) / B_b for ``first = (L [N, m], R [N, n])`` and ``second
    = (L', R')``, over the consecutive parts b of the N rows, ``band`` rows of acc at a time."""
    (l1, r1), (l2, r2) = first, second
    m, n = acc.shape
    band = max(1, min(m, band))
    # the two products go into reused buffers (a fresh weight-sized tensor per part costs more in page faults than
    # the product itself: 5x slower at ViT-B shapes)
    p1, p2 = acc.new_empty(band, n), acc.new_empty(band, n)
    for t0 in range(0, m, band):
        t1 = min(m, t0 + band)
        acc_t, l1_t, l2_t = acc[t0:t1], l1[:, t0:t1], l2[:, t0:t1]
        q1, q2 = p1[: t1 - t0], p2[: t1 - t0]
        s = 0
        for b in sizes:
            rows = slice(s, s + b)
            torch.mm(l1_t[rows].t(), r1[rows], out=q1)
            torch.mm(l2_t[rows].t(), r2[rows], out=q2)
            acc_t.addcmul_(q1, q2, value=1.0 / b)
            s += b


def _linear(fc: nn.Module, inp: Tensor, keep: bool) -> tuple[Tensor, Tensor | None]:
    """``fc(inp)`` and, when ``keep`` and ``fc`` is a plain :class:`nn.Linear`, its product before the bias
    ``inp W^T`` (detached; the caller overwrites it once the backward passes are done), else None."""
    if not keep or type(fc) is not nn.Linear:
        return fc(inp), None
    pre = inp @ fc.weight.t()
    return (pre + fc.bias if fc.bias is not None else pre), pre.detach()
