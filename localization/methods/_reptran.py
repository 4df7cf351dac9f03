"""The published RepTran GL / FI sums over the parts of one set (shared by the ``*_reptran`` methods and
``ours_fl5``; the formulas are in ``reptran_compat.py``'s docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
        z = head.fc_bef(h)
        a = head.act(z)
        nn_out = head.fc_aft(a)
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
    r_bef = 1.0 / (h @ w_bef.t() + EPS)  # [N, d_ff], signed, no |.|
    r_aft = 1.0 / (a @ w_aft.t() + EPS)  # [N, d]
    fi_bef, fi_aft = torch.zeros_like(w_bef), torch.zeros_like(w_aft)
    # the two per-part products go into reused buffers (a fresh weight-sized tensor per part costs more in page
    # faults than the product itself: 5x slower at ViT-B shapes)
    work = [(acc, r, g, o, torch.empty_like(acc), torch.empty_like(acc))
            for acc, r, g, o in ((fi_bef, r_bef, g_z, h), (fi_aft, r_aft, g_n, a))]
    s = 0
    for b in sizes:
        rows = slice(s, s + b)
        for acc, r, g, o, p_r, p_g in work:
            torch.mm(r[rows].t(), o[rows], out=p_r)
            torch.mm(g[rows].t(), o[rows], out=p_g)
            acc.addcmul_(p_r, p_g, value=1.0 / b)
        s += b
    return ReptranSums(gl_bef, gl_aft, fi_bef, fi_aft, len(sizes), h, a)
