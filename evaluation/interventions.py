"""Interventions on located neurons or weights (docs/methods.md, section 5): does editing what a method located change
the model's behaviour more than editing as many random neurons / weights?

Everything runs through the FFN head on cached states, no images and no full model: the last block's CLS head on
CLS states ``x [N, d]``, or block L's token head (``vitfl.localization.ffn.TokenFFNHead``, ``--block L``) on the
token states ``x [N, T, d]`` entering its FFN, where an edited neuron is edited at every token and the logits come
from the rest of the network (``head.post``), so the edited logits equal the full model's with the same weights of
block L edited:

* **neuron level** (neuron-level FL results): the located neurons' post-GELU activation a_j (``where="post"``,
  as knowledge neurons did) or pre-GELU value z_j (``where="pre"``, as RepTran scaled before GELU) is set to 0
  (``mode="zero"``) or multiplied by 2 (``mode="double"``):
  ``logits = head.from_activation(x, a_edited)``. (Zeroing is the same at both places since GELU(0) = 0.)
* **weight level** (weight-level FL results): the located weights of W_bef / W_aft are set to 0 or doubled in a
  copy of the head (:func:`patched_head`), whose forward gives the logits.

Per input the prediction and the true-class softmax probability before and after are recorded, with the input's
group: ``I_neg`` (the setting's misclassified inputs), ``I_pos`` (its correctly classified inputs) or ``rest``
(the remainder of the split). Random at the same count (same level, ``n_random`` seeded draws) is the baseline;
:func:`compare_to_random` tests every method's per-input |delta p| against random's (mean over the draws, paired
by input) with Wilcoxon + Holm across methods, per (mode, group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vitfl.evaluation.stats import wilcoxon_holm
from vitfl.localization.base import FLResult
from vitfl.localization.ffn import FFNHead, WeightIndex

__all__ = [
    "MODES",
    "Target",
    "target_of",
    "random_target",
    "patched_head",
    "edited_logits",
    "intervention_records",
    "run_interventions",
    "summarize_interventions",
    "compare_to_random",
    "records_to_wide",
    "wide_to_records",
]

MODES = ("zero", "double")
_FACTOR = {"zero": 0.0, "double": 2.0}
GROUPS = ("I_neg", "I_pos", "rest")


@dataclass(frozen=True)
class Target:
    """What an intervention edits: ``neurons [k]`` (level "neuron") or ``weights [k, 3]`` (matrix, row, col)."""

    level: str
    neurons: Tensor | None = None
    weights: Tensor | None = None

    def __post_init__(self):
        if self.level == "neuron":
            if self.neurons is None or self.neurons.numel() == 0:
                raise ValueError("a neuron-level target needs at least one neuron")
        elif self.level == "weight":
            if self.weights is None or self.weights.numel() == 0 or self.weights.ndim != 2 or self.weights.shape[1] != 3:
                raise ValueError("a weight-level target needs weights of shape [k, 3] (matrix, row, col), k >= 1")
        else:
            raise ValueError(f"level must be 'neuron' or 'weight', got {self.level!r}")

    @property
    def count(self) -> int:
        return int(self.neurons.numel() if self.level == "neuron" else self.weights.shape[0])


def target_of(result: FLResult, level: str | None = None) -> Target:
    """The target of an FL result: its ranked neurons for a neuron-level result (``level="weight"`` forces its
    weights instead), else its located weights."""
    level = level or ("neuron" if result.level == "neuron" and result.neurons is not None else "weight")
    if level == "neuron":
        if result.neurons is None:
            raise ValueError(f"FL result of {result.method!r} has no neurons; intervene on its weights")
        return Target("neuron", neurons=torch.as_tensor(result.neurons, dtype=torch.long).reshape(-1))
    return Target("weight", weights=torch.as_tensor(result.weights, dtype=torch.long).reshape(-1, 3))


def random_target(like: Target, index: WeightIndex, seed: int) -> Target:
    """As many uniformly drawn (without replacement) neurons or weights as ``like`` has, seeded."""
    g = torch.Generator().manual_seed(seed)
    if like.level == "neuron":
        return Target("neuron", neurons=torch.randperm(index.d_ff, generator=g)[:like.count])
    flat = torch.randperm(index.total, generator=g)[:like.count]
    return Target("weight", weights=index.to_triples(flat))


def _check_triples(weights: Tensor, index: WeightIndex) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.long).reshape(-1, 3)
    for m in (0, 1):
        sel = w[w[:, 0] == m]
        rows, cols = index.shape(m)
        if len(sel) and (sel[:, 1].min() < 0 or sel[:, 1].max() >= rows or sel[:, 2].min() < 0
                         or sel[:, 2].max() >= cols):
            raise ValueError(f"weight triples for matrix {m} fall outside its shape {(rows, cols)}")
    if ((w[:, 0] < 0) | (w[:, 0] > 1)).any():
        raise ValueError("the matrix entry of a weight triple must be 0 (W_bef) or 1 (W_aft)")
    return w


@torch.no_grad()
def patched_head(head: FFNHead, weights: Tensor, mode: str = "zero", values: Tensor | None = None) -> FFNHead:
    """An independent copy of ``head`` with the given weights ``[k, 3]`` set to 0 (``"zero"``), doubled
    (``"double"``), or set to ``values [k]`` (``mode="set"``)."""
    if mode not in (*MODES, "set"):
        raise ValueError(f"mode must be one of {MODES + ('set',)}, got {mode!r}")
    w = _check_triples(weights, head.index)
    out = head.copy()
    for m, lin in ((0, out.fc_bef), (1, out.fc_aft)):
        sel = w[:, 0] == m
        if not sel.any():
            continue
        r, c = w[sel, 1], w[sel, 2]
        if mode == "set":
            if values is None:
                raise ValueError("mode 'set' needs values")
            lin.weight[r, c] = torch.as_tensor(values, dtype=lin.weight.dtype).reshape(-1)[sel]
        else:
            lin.weight[r, c] = lin.weight[r, c] * _FACTOR[mode]
    return out


@torch.no_grad()
def edited_logits(head: FFNHead, x: Tensor, target: Target, mode: str = "zero", where: str = "post",
                  batch_size: int = 4096) -> Tensor:
    """Logits ``[N, C]`` of the head on ``x [N, d]`` (a token head: ``[N, T, d]``, the neuron edited at every token)
    with ``target`` edited (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if where not in ("post", "pre"):
        raise ValueError(f"where must be 'post' (after GELU) or 'pre' (before GELU), got {where!r}")
    ndim = 3 if getattr(head, "token_axis", False) else 2
    if x.ndim != ndim or x.shape[-1] != head.d:
        raise ValueError(f"x must be [N, {'T, ' if ndim == 3 else ''}{head.d}], got {tuple(x.shape)}")
    f = _FACTOR[mode]
    if target.level == "weight":
        h = patched_head(head, target.weights, mode)
        return torch.cat([h(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    j = target.neurons
    if j.min() < 0 or j.max() >= head.d_ff:
        raise ValueError(f"neuron ids must lie in [0, {head.d_ff})")
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        z = head.fc_bef(head.norm(xb))
        if where == "pre":
            z[..., j] = z[..., j] * f
            a = head.act(z)
        else:
            a = head.act(z)
            a[..., j] = a[..., j] * f
        out.append(head.from_activation(xb, a))
    return torch.cat(out)


def _groups(sample_index: Tensor, i_neg: Iterable[int], i_pos: Iterable[int]) -> np.ndarray:
    idx = np.asarray(sample_index)
    neg, pos = np.isin(idx, np.asarray(list(i_neg), dtype=np.int64)), np.isin(idx, np.asarray(list(i_pos),
                                                                                         dtype=np.int64))
    if (neg & pos).any():
        raise ValueError("I_neg and I_pos overlap")
    return np.where(neg, "I_neg", np.where(pos, "I_pos", "rest"))


@torch.no_grad()
def intervention_records(head: FFNHead, x: Tensor, label: Tensor, sample_index: Tensor, groups: np.ndarray,
                         target: Target, mode: str, where: str = "post", base_logits: Tensor | None = None,
                         batch_size: int = 4096) -> pd.DataFrame:
    """One row per input: sample_index, group, label, pred_before/after, p_before/after (true-class softmax),
    delta_p = p_after - p_before, abs_delta_p, flipped (prediction changed), fixed (wrong -> right),
    broken (right -> wrong)."""
    if base_logits is None:
        base_logits = torch.cat([head(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    after = edited_logits(head, x, target, mode, where, batch_size)
    lab = label.long().view(-1, 1)
    p0 = torch.softmax(base_logits.double(), -1).gather(1, lab).view(-1)
    p1 = torch.softmax(after.double(), -1).gather(1, lab).view(-1)
    y0, y1 = base_logits.argmax(-1), after.argmax(-1)
    ok0, ok1 = y0 == label, y1 == label
    return pd.DataFrame({
        "sample_index": sample_index.numpy(), "group": groups, "label": label.numpy(),
        "pred_before": y0.numpy(), "pred_after": y1.numpy(), "p_before": p0.numpy(), "p_after": p1.numpy(),
        "delta_p": (p1 - p0).numpy(), "abs_delta_p": (p1 - p0).abs().numpy(), "flipped": (y0 != y1).numpy(),
        "fixed": (~ok0 & ok1).numpy(), "broken": (ok0 & ~ok1).numpy()})


def run_interventions(head: FFNHead, x: Tensor, label: Tensor, sample_index: Tensor, i_neg: Iterable[int],
                      i_pos: Iterable[int], results: Mapping[str, FLResult], modes: Iterable[str] = MODES,
                      where: str = "post", n_random: int = 3, seed: int = 0, batch_size: int = 4096,
                      progress=None) -> pd.DataFrame:
    """Every method in ``results`` (name -> FL result), each mode, plus ``n_random`` random draws at each
    method's count and level (method ``random@<name>``, column ``rep``). Returns the long per-input table with
    columns method, baseline_of, level, count, mode, where, rep, and those of :func:`intervention_records`.
    ``progress``: optional callable(str) told about each step."""
    groups = _groups(sample_index, i_neg, i_pos)
    with torch.no_grad():
        base = torch.cat([head(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    frames = []
    jobs = []
    for name, res in results.items():
        t = target_of(res)
        jobs.append((name, "", t, 0))
        for r in range(n_random):
            jobs.append((f"random@{name}", name, random_target(t, head.index, seed + 1000 * r + hash_name(name)), r))
    modes = list(modes)
    for i, (name, of, t, rep) in enumerate(jobs):
        if progress is not None:
            progress(f"intervention {i + 1}/{len(jobs)}: {name} ({t.level}, {t.count})")
        for mode in modes:
            df = intervention_records(head, x, label, sample_index, groups, t, mode, where, base, batch_size)
            df.insert(0, "method", name)
            df.insert(1, "baseline_of", of)
            df.insert(2, "level", t.level)
            df.insert(3, "count", t.count)
            df.insert(4, "mode", mode)
            df.insert(5, "where", where if t.level == "neuron" else "weight")
            df.insert(6, "rep", rep)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def hash_name(name: str) -> int:
    """A stable small integer of a method name (python's hash() is salted per process)."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % 997


def summarize_interventions(records: pd.DataFrame) -> pd.DataFrame:
    """Per (method, mode, group): n inputs, mean / median |delta p|, mean delta p, flips, fixed, broken (random
    rows: averaged over their draws)."""
    per_rep = (records.groupby(["method", "baseline_of", "level", "count", "mode", "group", "rep"], sort=False)
               .agg(n=("abs_delta_p", "size"), mean_abs_delta_p=("abs_delta_p", "mean"),
                    median_abs_delta_p=("abs_delta_p", "median"), mean_delta_p=("delta_p", "mean"),
                    flips=("flipped", "sum"), fixed=("fixed", "sum"), broken=("broken", "sum"))
               .reset_index())
    out = (per_rep.groupby(["method", "baseline_of", "level", "count", "mode", "group"], sort=False)
           .agg(n=("n", "first"), reps=("rep", "size"), mean_abs_delta_p=("mean_abs_delta_p", "mean"),
                median_abs_delta_p=("median_abs_delta_p", "mean"), mean_delta_p=("mean_delta_p", "mean"),
                flips=("flips", "mean"), fixed=("fixed", "mean"), broken=("broken", "mean"))
           .reset_index())
    out["flip_rate"] = out["flips"] / out["n"].clip(lower=1)
    return out


def compare_to_random(records: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, group): each method's per-input |delta p| against its random baseline's (mean over draws),
    Wilcoxon signed-rank + paired Cliff's delta, Holm across the methods of that (mode, group)."""
    tables = []
    own = records[records["baseline_of"] == ""]
    rnd = records[records["baseline_of"] != ""]
    for (mode, group), sub in own.groupby(["mode", "group"], sort=False):
        values, pairs = {}, []
        for method, msub in sub.groupby("method", sort=False):
            r = rnd[(rnd["baseline_of"] == method) & (rnd["mode"] == mode) & (rnd["group"] == group)]
            if r.empty:
                continue
            rmean = r.groupby("sample_index")["abs_delta_p"].mean()
            m = msub.set_index("sample_index")["abs_delta_p"]
            values[method] = m.to_numpy()
            values[f"random@{method}"] = rmean.reindex(m.index).to_numpy()
            pairs.append((method, f"random@{method}"))
        if not pairs:
            continue
        df = wilcoxon_holm(values, pairs=pairs, question=f"{mode}/{group}")
        df.insert(1, "mode", mode)
        df.insert(2, "group", group)
        tables.append(df)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


_PER_INPUT = ["sample_index", "group", "label", "pred_before", "p_before"]


def records_to_wide(records: pd.DataFrame) -> pd.DataFrame:
    """The long per-input table of one FL result (its rows and its random rows) as one row per input:
    sample_index, group, label, pred_before, p_before, then ``pred_{mode}_{variant}`` and ``p_{mode}_{variant}``
    for variant ``fl`` (the method) and ``rand{r}`` (random draw r). About 8x smaller on disk than the long form."""
    if records["method"][records["baseline_of"] == ""].nunique() != 1:
        raise ValueError("records_to_wide takes the records of exactly one FL result (and its random draws)")
    base = records[(records["baseline_of"] == "")]
    first = base[base["mode"] == base["mode"].iloc[0]]
    wide = first[_PER_INPUT].reset_index(drop=True)
    for (variant, mode, rep), sub in records.groupby([records["baseline_of"] != "", "mode", "rep"], sort=False):
        tag = f"{mode}_{'rand' + str(rep) if variant else 'fl'}"
        if not np.array_equal(sub["sample_index"].to_numpy(), wide["sample_index"].to_numpy()):
            raise ValueError("records of one FL result must list the inputs in the same order")
        wide[f"pred_{tag}"] = sub["pred_after"].to_numpy()
        wide[f"p_{tag}"] = sub["p_after"].to_numpy()
    return wide


def wide_to_records(wide: pd.DataFrame, method: str) -> pd.DataFrame:
    """Inverse of :func:`records_to_wide` (columns method, baseline_of, mode, rep and the per-input ones)."""
    frames = []
    for col in wide.columns:
        if not col.startswith("pred_") or col == "pred_before":
            continue
        mode, variant = col[len("pred_"):].split("_", 1)
        rep = 0 if variant == "fl" else int(variant[len("rand"):])
        df = wide[_PER_INPUT].copy()
        y0, y1, lab = wide["pred_before"].to_numpy(), wide[col].to_numpy(), wide["label"].to_numpy()
        df["pred_after"] = y1
        df["p_after"] = wide[f"p_{mode}_{variant}"].to_numpy()
        df["delta_p"] = df["p_after"] - df["p_before"]
        df["abs_delta_p"] = df["delta_p"].abs()
        df["flipped"] = y0 != y1
        df["fixed"] = (y0 != lab) & (y1 == lab)
        df["broken"] = (y0 == lab) & (y1 != lab)
        df.insert(0, "method", method if variant == "fl" else f"random@{method}")
        df.insert(1, "baseline_of", "" if variant == "fl" else method)
        df.insert(2, "mode", mode)
        df.insert(3, "rep", rep)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
