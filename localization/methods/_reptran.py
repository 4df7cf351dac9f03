"""The published RepTran GL / FI sums over the parts of one set (shared by the ``*_reptran`` methods and
``ours_fl5``; the formulas are in ``reptran_compat.py``'s docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localization.ffn import FFNHead
from localization.methods._common import _no_inference_mode, weights_require_grad

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
    if not fi:
        return ReptranSums(gl_bef, gl_aft, None, None, len(sizes), h, a)
    g_z, g_n = g_z.detach(), g_n.detach()
    w_bef, w_aft = w_bef.detach(), w_aft.detach()
    # R = 1 / (o W^T + 1e-8), signed, no |.|: o W^T is the forward's product before its bias (kept above), or
    # computed again where the layer is not a plain nn.Linear
    r_bef = (hw if hw is not None else h @ w_bef.t()).add_(EPS).reciprocal_()  # [N, d_ff]
    r_aft = (aw if aw is not None else a @ w_aft.t()).add_(EPS).reciprocal_()  # [N, d]
    fi_bef, fi_aft = torch.zeros_like(w_bef), torch.zeros_like(w_aft)
    for acc, r, g, o in ((fi_bef, r_bef, g_z, h), (fi_aft, r_aft, g_n, a)):
        _part_products(acc, r, g, o, sizes)
    return ReptranSums(gl_bef, gl_aft, fi_bef, fi_aft, len(sizes), h, a)


#: on the CPU the per-part products are formed for a band of the weight's rows at a time, so that the band of the
#: sum and its two products (3 x band) stay in the last-level cache across the parts: at ViT-B shapes 0.77-0.81x
#: the time of whole-weight products (whose 3 x 9.4 MB per weight spill to memory on every part)
CPU_BAND_BYTES = 8 << 20


def _part_products(acc: Tensor, r: Tensor, g: Tensor, o: Tensor, sizes: Sequence[int]) -> None:
    """acc += sum_b (r_b^T o_b) * (g_b^T o_b) / B_b over the consecutive parts b of the rows (``acc [out, in]``,
    ``r, g [N, out]``, ``o [N, in]``), in row bands of ``acc`` on the CPU."""
    out, inn = acc.shape
    band = out
    if acc.device.type == "cpu":
        band = max(1, min(out, CPU_BAND_BYTES // (3 * inn * acc.element_size())))
    # the two products go into reused buffers (a fresh weight-sized tensor per part costs more in page faults than
    # the product itself: 5x slower at ViT-B shapes)
    p_r, p_g = acc.new_empty(band, inn), acc.new_empty(band, inn)
    for t0 in range(0, out, band):
        t1 = min(out, t0 + band)
        acc_t, r_t, g_t = acc[t0:t1], r[:, t0:t1], g[:, t0:t1]
        q_r, q_g = p_r[: t1 - t0], p_g[: t1 - t0]
        s = 0
        for b in sizes:
            rows = slice(s, s + b)
            torch.mm(r_t[rows].t(), o[rows], out=q_r)
            torch.mm(g_t[rows].t(), o[rows], out=q_g)
            acc_t.addcmul_(q_r, q_g, value=1.0 / b)
            s += b


def _linear(fc: nn.Module, inp: Tensor, keep: bool) -> tuple[Tensor, Tensor | None]:
    """``fc(inp)`` and, when ``keep`` and ``fc`` is a plain :class:`nn.Linear`, its product before the bias
    ``inp W^T`` (detached; the caller overwrites it once the backward passes are done), else None."""
    if not keep or type(fc) is not nn.Linear:
        return fc(inp), None
    pre = inp @ fc.weight.t()
    return (pre + fc.bias if fc.bias is not None else pre), pre.detach()
