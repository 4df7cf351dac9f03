"""The testbed science the main job prints and the report shows (docs/testbed.md): which block's FFN the model
needs, and what the checkpoint benchmark's ground truth follows.

**Layer matters, the last block** (:func:`layer_matters`, on the cached CLS states of the last FFN, as before):
top-1 as is, with every post-GELU activation of the last FFN set to 0 (``acc_zeroed``: the FFN then adds only its
output bias), and ``ffn_ratio`` = mean over inputs of ||FFN out|| / ||x||.

**The per-block curve** (:func:`layer_curve`, through :func:`vitfl.localization.ffn.ffn_head` on the states entering
each block's FFN, captured in one forward of the full model). For every transformer block ``b`` and every input
``n``, with ``x`` the residual stream entering block b's FFN (every token), ``a`` its post-GELU activation and
``o = ls(W_aft a + b_aft)`` its output (after LayerScale, before the residual add), ``r = x + o``:

* ``acc_ffn_removed``: top-1 with block b's FFN output removed from the residual stream, ``logits = post(x)``
  (``o = 0`` at every token; the same as zeroing ``fc2``'s weight **and** bias in the full model). This is the
  curve's accuracy; ``drop_ffn_removed`` = acc - acc_ffn_removed.
* ``acc_zeroed`` / ``drop``: top-1 with block b's activations zeroed (``a = 0`` at every token, so ``o =
  ls(b_aft)``; the same as zeroing fc2's weight only): the last block's entry is :func:`layer_matters`' number.
* ``residual_share``: the FFN output's share of the residual stream after the add, **on the token the classifier
  reads**, averaged over inputs: ``mean_n ||o_n|| / ||x_n + o_n||`` with ``o_n``, ``x_n`` at the CLS token (token
  pooling: HF ViT, timm ``global_pool='token'``); for average / max / attention pooling the per-token share averaged
  over the tokens the pool reads, for a DeiT distillation token over tokens 0 and 1 (the head's ``readout`` token
  statistic, :meth:`vitfl.localization.ffn.TokenFFNHead.reduce_tokens`). 0 means the FFN writes nothing; it is usually
  below 1, but not bounded by 1: an output that points against the incoming stream shrinks ``||x + o||``.
* ``ffn_ratio``: the same with ``||x_n||`` in the denominator (:func:`layer_matters`' quantity; the last block's
  entry is that number).

Every entry also has :func:`layer_matters`' keys (``n``, ``acc``, ``acc_zeroed``, ``drop``, ``ffn_ratio``) with
their definitions, so the last block's entry carries the last-block numbers. Every number is exact against the
full model (tests/test_testbed.py: zeroed fc2 weights in a float64 copy of the model; hooks on the blocks).

**Checkpoint diagnostics** (:func:`checkpoint_diagnostics`): Spearman's rho of the ground truth |W(e) - W(e-1)|
with |W(e-1)| and with |dL/dW at W(e-1)|.

:func:`testbed_checks` runs all three on a run (the testbed step, :mod:`vitfl.pipeline.testbed`, writes its result to ``report/testbed.json``, which
:mod:`vitfl.pipeline.report` reads and draws with :func:`vitfl.evaluation.figures.layer_curve`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from vitfl.localization.ffn import FFNHead, capture_ffn_states, ffn_head, num_ffn_blocks

__all__ = ["ffn_effects", "layer_matters", "layer_curve", "step_layer_matters", "step_layer_curve",
           "checkpoint_diagnostics", "testbed_checks", "LAYER_MATTERS_KEYS", "CURVE_KEYS"]

#: the keys of :func:`layer_matters` before the per-block curve (kept, with their definitions, in every entry)
LAYER_MATTERS_KEYS = ("n", "acc", "acc_zeroed", "drop", "ffn_ratio")
#: the keys the per-block curve adds to every entry
CURVE_KEYS = ("acc_ffn_removed", "drop_ffn_removed", "residual_share")


def ffn_effects(head: FFNHead, x: Tensor) -> dict[str, Tensor]:
    """Per input (``[N]``), for the FFN of ``head`` on the states ``x`` entering it (``[N, d]`` for the last-block
    CLS head, ``[N, T, d]`` for a :class:`~vitfl.localization.ffn.TokenFFNHead`): the predicted class as is (``pred``),
    with the FFN's activations zeroed (``pred_zeroed``: ``o = ls(b_aft)``), with its output removed
    (``pred_removed``: ``o = 0``), ``ffn_ratio`` = ||o|| / ||x|| and ``residual_share`` = ||o|| / ||x + o||, the
    two ratios on the readout token (the CLS token for token pooling; the head's ``readout`` token statistic
    otherwise, see the module docstring). Every token of the view is edited, so the predictions are the full
    model's under the same edit."""
    with torch.no_grad():
        a = head.activation(x)
        o = head.layer_scale(head.fc_aft(a))
        logits = head.post(x + o)
        zeroed = head.from_activation(x, torch.zeros_like(a))
        removed = head.post(x)
        o_norm = o.norm(dim=-1)
        ratio = o_norm / x.norm(dim=-1).clamp_min(1e-12)
        share = o_norm / (x + o).norm(dim=-1).clamp_min(1e-12)
    if head.token_axis:  # per token [N, T] -> per input [N]: the tokens the classifier reads
        ratio, share = head.reduce_tokens(ratio, "readout"), head.reduce_tokens(share, "readout")
    return {"pred": logits.argmax(-1), "pred_zeroed": zeroed.argmax(-1), "pred_removed": removed.argmax(-1),
            "ffn_ratio": ratio, "residual_share": share}


def _summary(eff: dict[str, Tensor], label: Tensor) -> dict[str, Any]:
    """:data:`LAYER_MATTERS_KEYS` + :data:`CURVE_KEYS` from :func:`ffn_effects`' per-input values."""
    def acc(pred):
        return (pred == label).double().mean().item()

    a, a0, a_rm = acc(eff["pred"]), acc(eff["pred_zeroed"]), acc(eff["pred_removed"])
    return {"n": len(label), "acc": a, "acc_zeroed": a0, "drop": a - a0, "ffn_ratio": eff["ffn_ratio"].mean().item(),
            "acc_ffn_removed": a_rm, "drop_ffn_removed": a - a_rm,
            "residual_share": eff["residual_share"].mean().item()}


def _check_states(head: FFNHead, x: Tensor, label: Tensor, who: str) -> None:
    shape = f"[N, T, d={head.d}]" if head.token_axis else f"[N, d={head.d}]"
    if x.ndim != (3 if head.token_axis else 2) or x.shape[-1] != head.d or len(x) == 0:
        raise ValueError(f"{who}: x must be non-empty cached states {shape}, got {tuple(x.shape)}")
    if len(label) != len(x):
        raise ValueError(f"{who}: {len(label)} labels for {len(x)} states")


def layer_matters(head: FFNHead, x, label) -> dict:
    """How much the model needs the FFN of ``head``: top-1 accuracy of the FFN head on states ``x`` (the cached CLS
    states ``[N, d]`` of the last FFN; or a block's token states ``[N, T, d]``) with labels ``[N]``, as is and with
    every post-GELU activation of the FFN set to 0 (the FFN then adds only its output bias ``b_aft``). With CLS
    pooling this equals the full model with the last block's activations zeroed (at every token: only token 0
    reaches the logits).

    Returns ``n``, ``acc``, ``acc_zeroed``, ``drop`` (= acc - acc_zeroed, in [-1, 1]) and ``ffn_ratio`` (the
    mean over inputs of ||FFN output|| / ||x||, how large the FFN's write is beside the residual stream), and the
    per-block curve's ``acc_ffn_removed``, ``drop_ffn_removed`` and ``residual_share`` (module docstring)."""
    x = torch.as_tensor(x)
    label = torch.as_tensor(label).long().reshape(-1)
    _check_states(head, x, label, "layer_matters")
    x = x.to(head.fc_bef.weight.dtype)
    return _summary(ffn_effects(head, x), label)


def _logits(out) -> Tensor:
    """The logits of a model's output (a Hugging Face model returns an output object with ``.logits``)."""
    return out.logits if hasattr(out, "logits") else out


def _block_indices(model, blocks: Sequence[int] | None) -> list[int]:
    n = num_ffn_blocks(model)
    if blocks is None:
        return list(range(n))
    out = []
    for b in blocks:
        head = ffn_head(model, b)  # raises BlockIndexError / TypeError for a bad index
        idx = head.block if head.block is not None else n - 1
        if idx not in out:
            out.append(idx)
    return sorted(out)


def layer_curve(model: torch.nn.Module, batches: Iterable, blocks: Sequence[int] | None = None) -> dict[str, Any]:
    """The per-block layer study of ``model`` (an HF / timm ViT or a module wrapping one) on ``batches`` (an iterable
    of ``(images, labels, ...)``, e.g. a DataLoader): for each transformer block (``blocks``: indices as in
    :func:`~vitfl.localization.ffn.ffn_head`, default all) the numbers of the module docstring, computed through
    ``ffn_head(model, b)`` on the states entering block b's FFN (every block's states are captured in one forward
    of the full model per batch).

    Returns ``{"n", "acc" (the full model's top-1), "num_blocks", "pooling", "blocks": [{"block": b, **numbers}]}``
    (``blocks`` in block order). The model runs in eval mode (its mode is restored). Memory: one batch's states of
    every block asked for (``B x T x d`` each; at ViT-B shapes 155 MB per block for B = 256, float32); cost: one
    forward of the full model plus three passes through the blocks after b, per block and batch."""
    idx = _block_indices(model, blocks)
    heads = {b: ffn_head(model, b) for b in idx}
    effects: dict[int, list[dict[str, Tensor]]] = {b: [] for b in idx}
    preds, labels = [], []
    was = model.training
    model.eval()
    try:
        for batch in batches:
            images, label = batch[0], torch.as_tensor(batch[1]).long().reshape(-1)
            with torch.no_grad(), contextlib.ExitStack() as stack:
                states = {b: stack.enter_context(capture_ffn_states(model, block=b)) for b in idx}
                logits = _logits(model(images))
            preds.append(logits.argmax(-1))
            labels.append(label)
            for b in idx:
                effects[b].append(ffn_effects(heads[b], states[b]["x"]))
    finally:
        model.train(was)
    if not labels or sum(len(v) for v in labels) == 0:
        raise ValueError("layer_curve: no inputs (the batches were empty)")
    label = torch.cat(labels)
    rows = []
    for b in idx:
        eff = {k: torch.cat([e[k] for e in effects[b]]) for k in effects[b][0]}
        rows.append({"block": b, **_summary(eff, label)})
    return {"n": len(label), "acc": (torch.cat(preds) == label).double().mean().item(),
            "num_blocks": num_ffn_blocks(model), "pooling": heads[idx[0]].pooling, "blocks": rows}


# ------------------------------------------------------------------------------------------------ on a run
def step_layer_matters(layout) -> dict[str, dict]:
    """:func:`layer_matters` of the run's last checkpoint on the cached test fold, repair fold and both."""
    from vitfl.lightning_modules.runs import load_run

    run = load_run(layout)
    head = run.head
    st = {s: run.states(s) for s in ("test", "repair")}
    out = {s: layer_matters(head, c.x, c.label) for s, c in st.items()}
    out["eval"] = layer_matters(head, torch.cat([st["test"].x, st["repair"].x]),
                                torch.cat([st["test"].label, st["repair"].label]))
    for s, r in out.items():
        print(f"layer matters ({s}, n={r['n']}): top-1 {r['acc']:.4f}, last-FFN activations zeroed "
              f"{r['acc_zeroed']:.4f}, drop {100 * r['drop']:.1f} points; ||FFN out|| / ||x|| = {r['ffn_ratio']:.2f}")
    return out


def step_layer_curve(layout, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    """:func:`layer_curve` of the run's last checkpoint on the images of ``split`` (the held-out test fold by
    default), with ``split`` and ``epoch`` added; prints one line per block."""
    from vitfl.lightning_modules.runs import datamodule_from_run, load_run_model

    model, epoch = load_run_model(layout)
    dm = datamodule_from_run(layout)
    dm.setup()
    out = {"split": split, "epoch": epoch,
           **layer_curve(model, dm.dataloader(split, batch_size=batch_size))}
    print(f"layer study ({split}, n={out['n']}, {out['num_blocks']} blocks, top-1 {out['acc']:.4f}): per block, "
          "top-1 with its FFN output removed / with its activations zeroed; ||FFN out|| / ||x + FFN out||")
    for r in out["blocks"]:
        print(f"  block {r['block']}: {r['acc_ffn_removed']:.4f} (drop {100 * r['drop_ffn_removed']:.1f} points) / "
              f"{r['acc_zeroed']:.4f}; share {r['residual_share']:.3f}")
    return out


def checkpoint_diagnostics(layout, epoch: int | None = None, batch_size: int = 512) -> dict:
    """What the checkpoint benchmark's ground truth |W(e) - W(e-1)| follows, over all last-FFN weights (W_bef then
    W_aft): Spearman's rho with |W(e-1)| (weight decay / scale) and with |dL/dW at W(e-1)| (L = the mean
    cross-entropy on logits over the non-augmented training split, the epoch e-1 model in eval mode).
    ``epoch=None``: the last epoch."""
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    from vitfl.callbacks.ffn_weights import load_ffn_weights
    from vitfl.lightning_modules.runs import datamodule_from_run, last_epoch, load_run_model
    from vitfl.localization.ffn import ffn_head

    e = last_epoch(layout) if epoch is None else epoch
    prev, nxt = load_ffn_weights(layout.ffn_weights(e - 1)), load_ffn_weights(layout.ffn_weights(e))
    def flat(d):
        return torch.cat([d["W_bef"].reshape(-1), d["W_aft"].reshape(-1)]).double()

    change, mag = (flat(nxt) - flat(prev)).abs(), flat(prev).abs()
    model, _ = load_run_model(layout, e - 1)
    head = ffn_head(model, -1)
    dm = datamodule_from_run(layout)
    dm.setup()
    for W in head.weights():
        W.requires_grad_(True)
        W.grad = None
    n = 0
    for images, labels, _ in dm.dataloader("train", batch_size=batch_size):
        F.cross_entropy(model(images), labels, reduction="sum").backward()
        n += len(labels)
    grad = torch.cat([W.grad.reshape(-1) for W in head.weights()]).double().abs() / n
    out = {"epoch": e, "n_weights": len(change), "n_train": n,
           "spearman_magnitude": float(spearmanr(change.numpy(), mag.numpy()).statistic),
           "spearman_gradient": float(spearmanr(change.numpy(), grad.numpy()).statistic)}
    print(f"checkpoint benchmark ground truth |W({e}) - W({e - 1})| over {out['n_weights']:,} last-FFN weights: "
          f"Spearman with |W({e - 1})| {out['spearman_magnitude']:.3f}, with |dL/dW| at W({e - 1}) on the "
          f"{n} training inputs {out['spearman_gradient']:.3f}")
    return out


def testbed_checks(layout) -> dict[str, Any]:
    """What the testbed step writes to ``report/testbed.json``: ``layer_matters`` (:func:`step_layer_matters`: test,
    repair, eval), ``layer_curve`` (:func:`step_layer_curve` on the test fold) and, with at least two checkpoints,
    ``checkpoint_diagnostics``."""
    out = {"layer_matters": step_layer_matters(layout), "layer_curve": step_layer_curve(layout)}
    if len(layout.checkpoint_epochs()) >= 2:
        out["checkpoint_diagnostics"] = checkpoint_diagnostics(layout)
    return out
