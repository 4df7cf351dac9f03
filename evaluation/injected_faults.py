"""The injected-fault benchmark (Arachne's RQ1; docs/methods.md, section 5): perturb a few FFN weights of a copy of
the head (the last FFN's, or with a token head block L's) until some predictions change, then ask each FL method to
find the perturbed weights.

Injection (:func:`inject_faults`), per seed:

1. g = |d L / d w| for every weight of W_bef and W_aft, L the cross-entropy (on logits) summed over the split,
   through the *unperturbed* head (:func:`loss_gradient`);
2. candidates = weights whose g is above the mean g of their own matrix, in a seeded random order;
3. weights are taken one at a time; each is set to a value drawn uniformly from [mu - 3 sigma, mu + 3 sigma] of
   its (original) matrix; after each, the split's predictions are recomputed, and injection stops as soon as
   at least ``max(ceil(min_changed_frac N), min_changed)`` predictions differ from the unperturbed head's
   (``min_changed_frac = 0.001``: Arachne's 0.1 %; ``min_changed = 2`` so that variance-based methods get a
   set of >= 2 inputs; set it to 1 for Arachne's criterion alone).

**Strength.** How many predictions must change is the fault's *strength* (:func:`strength_requirement`):
``"published"`` = Arachne's 0.1 % of the split with a floor of 2 (on a split of 1,600 inputs: 2 changed predictions,
too few to localize from), an integer n = at least n changed predictions (the toolkit's default strength is
:data:`DEFAULT_STRENGTH` = 30, so I_neg holds enough inputs), a float f in (0, 1) = at least ceil(f N). A stronger
fault needs more perturbed weights (on the testbed ~10-45 weights change 2 predictions, ~1,000-2,000 change 30);
every row records the strength, the changed count and the perturbed count. A strength that perturbing every
candidate cannot reach is an :class:`InjectionError` naming it.

Each step updates the head's intermediates incrementally (a W_bef change touches one column of z and a; a W_aft
change one column of the FFN output), in float64, so a step costs O(N d), not a full forward; the final head is
re-checked with a full forward pass and the changed set taken from it.

Ground truth = the perturbed weights. Localization uses the perturbed head, the changed inputs as I_neg and the
unchanged ones as I_pos (:func:`run_injected_benchmark`); ranking metrics as in
:mod:`vitfl.evaluation.ranking_metrics` (positives = the perturbed weights; no ground-truth scores, so no top-K
overlap or Spearman). Neuron-level methods' scores are spread onto their neurons' weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from vitfl.evaluation.ranking_metrics import DEFAULT_FRACTIONS, evaluate_ranking, neuron_to_weight_scores
from vitfl.localization.ffn import FFNHead

__all__ = ["loss_gradient", "InjectedFault", "InjectionError", "inject_faults", "fault_facts", "STRENGTHS",
           "DEFAULT_STRENGTH", "strength_requirement", "strength_label", "inject_with_strength",
           "evaluate_method_on_fault", "run_injected_benchmark", "weight_level_scores"]


class InjectionError(RuntimeError):
    """No perturbation among the candidates changed enough predictions."""


#: the named strengths; any positive int (a count) or float in (0, 1) (a share of the split) is a strength too
STRENGTHS = ("published",)
#: the toolkit's default: at least 30 changed predictions (enough I_neg inputs to localize from)
DEFAULT_STRENGTH = 30


def strength_requirement(strength: str | int | float) -> tuple[float, int]:
    """(min_changed_frac, min_changed) of a strength: ``"published"`` -> (0.001, 2) (Arachne's 0.1 %, at least 2);
    an int n >= 1 -> (0, n); a float f in (0, 1) -> (f, 1). Anything else is a ValueError naming it."""
    if strength == "published":
        return 0.001, 2
    if isinstance(strength, bool):
        raise ValueError(f"injected-fault strength must be 'published', a count >= 1 or a share in (0, 1), got "
                         f"{strength!r}")
    if isinstance(strength, str):
        try:
            strength = float(strength) if "." in strength else int(strength)
        except ValueError:
            raise ValueError(f"unknown injected-fault strength {strength!r}: 'published', a count >= 1 (e.g. 30) or "
                             "a share of the split in (0, 1) (e.g. 0.02)") from None
    if isinstance(strength, int) and strength >= 1:
        return 0.0, int(strength)
    if isinstance(strength, float) and 0 < strength < 1:
        return float(strength), 1
    raise ValueError(f"injected-fault strength must be 'published', a count >= 1 or a share in (0, 1), got "
                     f"{strength!r}")


def strength_label(strength: str | int | float) -> str:
    """A file- and table-safe name of a strength: 'published', '30', '0.02'."""
    frac, n = strength_requirement(strength)
    if strength == "published":
        return "published"
    return str(n) if frac == 0 else f"{frac:g}"


def loss_gradient(head: FFNHead, x: Tensor, label: Tensor, batch_size: int = 1024) -> Tensor:
    """|d (sum_x CE(head(x), y)) / d w| over W_bef then W_aft, ``[total]`` (the head is not modified)."""
    if x.shape[0] != label.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, label {label.shape[0]}")
    h = head.copy()
    for p in h.parameters():
        p.requires_grad_(False)
    wb, wa = h.fc_bef.weight, h.fc_aft.weight
    wb.requires_grad_(True)
    wa.requires_grad_(True)
    gb, ga = torch.zeros_like(wb), torch.zeros_like(wa)
    for s in range(0, len(x), batch_size):
        loss = F.cross_entropy(h(x[s:s + batch_size]), label[s:s + batch_size].long(), reduction="sum")
        db, da = torch.autograd.grad(loss, (wb, wa))
        gb += db
        ga += da
    return h.index.join(gb.abs(), ga.abs()).detach()


@dataclass
class InjectedFault:
    head: FFNHead          #: the perturbed copy of the head
    weights: Tensor        #: global indices of the perturbed weights ``[k]``, in the order they were perturbed
    original: Tensor       #: their original values ``[k]``
    values: Tensor         #: their new values ``[k]``
    changed: Tensor        #: ``[N]`` bool, prediction differs from the unperturbed head's
    seed: int
    n_candidates: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_changed(self) -> int:
        return int(self.changed.sum())


@torch.no_grad()
def _logits_from_u(head: FFNHead, x: Tensor, u: Tensor) -> Tensor:
    return head.post(x + head.layer_scale(u.to(x.dtype)))


@torch.no_grad()
def inject_faults(head: FFNHead, x: Tensor, label: Tensor, seed: int = 0, min_changed_frac: float = 0.001,
                  min_changed: int = 2, max_weights: int | None = None, grad: Tensor | None = None,
                  batch_size: int = 1024) -> InjectedFault:
    """Perturb weights of a copy of ``head`` until enough predictions on ``x [N, d]`` change (module docstring);
    a token head (any block L, ``x [N, T, d]``): the same steps on every token's intermediates, each step's
    predictions through the rest of the network (``head.post``), so the fault is exactly a change of block L's
    weights in the full model.
    ``grad``: a precomputed :func:`loss_gradient` (it does not depend on the seed)."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("no inputs to inject faults against")
    if not 0 <= min_changed_frac <= 1:
        raise ValueError(f"min_changed_frac must lie in [0, 1], got {min_changed_frac}")
    need = max(math.ceil(min_changed_frac * n), int(min_changed), 1)
    if need > n:
        raise ValueError(f"need {need} changed predictions but the split has only {n} inputs")
    idx = head.index
    if grad is None:
        with torch.enable_grad():
            grad = loss_gradient(head, x, label, batch_size)
    gb, ga = idx.split(grad)
    cand = torch.cat([torch.nonzero(gb.reshape(-1) > gb.mean()).view(-1),
                      idx.sizes[0] + torch.nonzero(ga.reshape(-1) > ga.mean()).view(-1)])
    if cand.numel() == 0:
        raise InjectionError("no weight has an above-mean loss gradient (is the loss gradient all zero?)")
    gen = torch.Generator().manual_seed(seed)
    cand = cand[torch.randperm(cand.numel(), generator=gen)]
    if max_weights is not None:
        cand = cand[:max_weights]

    faulty = head.copy()
    W = (faulty.fc_bef.weight, faulty.fc_aft.weight)
    stats = [(float(w.mean()), float(w.std())) for w in W]
    base_pred = torch.cat([head(x[s:s + batch_size]).argmax(-1) for s in range(0, n, batch_size)])
    # float64 intermediates updated in place, one weight at a time
    h = faulty.norm(x)
    hN, z = h.double(), faulty.fc_bef(h).double()
    a = faulty.act(z)
    u = a @ W[1].double().T + (faulty.fc_aft.bias.double() if faulty.fc_aft.bias is not None else 0.0)
    triples = idx.to_triples(cand)
    chosen, orig, vals = [], [], []
    changed = torch.zeros(n, dtype=torch.bool)
    for flat, (m, r, c) in zip(cand.tolist(), triples.tolist()):
        mu, sd = stats[m]
        v = mu + sd * (6 * torch.rand((), generator=gen, dtype=torch.float64).item() - 3)
        old = float(W[m][r, c])
        W[m][r, c] = v
        delta = float(W[m][r, c]) - old  # as stored (the matrix's dtype)
        if m == 0:  # (``...``: a token head's intermediates carry a token axis, [N, T, .])
            z[..., r] += delta * hN[..., c]
            a_new = faulty.act(z[..., r])
            u += (a_new - a[..., r]).unsqueeze(-1) * W[1][:, r].double()
            a[..., r] = a_new
        else:
            u[..., r] += delta * a[..., c]
        chosen.append(flat)
        orig.append(old)
        vals.append(float(W[m][r, c]))
        pred = _logits_from_u(faulty, x, u).argmax(-1)
        if int((pred != base_pred).sum()) >= need:
            full = torch.cat([faulty(x[s:s + batch_size]).argmax(-1) for s in range(0, n, batch_size)])
            changed = full != base_pred
            if int(changed.sum()) >= need:
                break
    else:
        raise InjectionError(
            f"perturbing all {len(chosen)} candidate weights changed only {int(changed.sum())} of {n} "
            f"predictions (need {need}); choose a weaker strength (fewer changed predictions) or raise max_weights")
    return InjectedFault(faulty, torch.tensor(chosen, dtype=torch.long), torch.tensor(orig), torch.tensor(vals),
                         changed, seed, int(cand.numel()),
                         {"need": need, "n": n, "min_changed_frac": min_changed_frac, "min_changed": min_changed,
                          "value_range": "uniform in mean +- 3 std of the weight's matrix",
                          "candidates": "above its matrix's mean |dL/dw| (L summed over the split)"})


def inject_with_strength(head: FFNHead, x: Tensor, label: Tensor, seed: int, strength: str | int | float,
                         grad: Tensor | None = None, max_weights: int | None = None) -> InjectedFault:
    """:func:`inject_faults` until ``strength`` (:func:`strength_requirement`) predictions changed; the fault's info
    and every error name the strength."""
    frac, n_min = strength_requirement(strength)
    try:
        fault = inject_faults(head, x, label, seed, frac, n_min, max_weights=max_weights, grad=grad)
    except (InjectionError, ValueError) as e:
        raise InjectionError(f"injected-fault strength {strength_label(strength)!r} (at least "
                             f"{max(math.ceil(frac * len(x)), n_min, 1)} changed predictions of {len(x)}): {e}") from None
    fault.info["strength"] = strength_label(strength)
    return fault


def weight_level_scores(result, index) -> Tensor:
    """An FL result's scores over every weight ``[total]`` (neuron scores spread onto their weights)."""
    s = torch.as_tensor(result.scores).reshape(-1)
    if result.level == "neuron":
        return neuron_to_weight_scores(s, index)
    if s.numel() != index.total:
        raise ValueError(f"{result.method}: {s.numel()} scores for {index.total} weights")
    return s


def _default_localize(head, x, label, is_neg, method, budget, batch_size, seed, **opts):
    from vitfl.localization.ranking import localize

    return localize(head, x, label, is_neg, method, budget, batch_size=batch_size, seed=seed, **opts)


def fault_facts(fault: InjectedFault, head: FFNHead) -> dict[str, Any]:
    """The injection's facts for a result row."""
    return {"strength": fault.info.get("strength", "custom"), "seed": fault.seed, "n_perturbed": len(fault.weights),
            "n_changed": fault.n_changed,
            "n_inputs": int(fault.changed.numel()), "n_candidates": fault.n_candidates,
            "perturbed_in_W_bef": int((fault.weights < head.index.sizes[0]).sum()),
            "perturbed": " ".join(map(str, fault.weights.tolist()))}


def evaluate_method_on_fault(fault: InjectedFault, head: FFNHead, x: Tensor, label: Tensor, method: str,
                             fractions: Sequence[float] = DEFAULT_FRACTIONS, batch_size: int = 256,
                             method_opts: Mapping[str, Any] | None = None,
                             localize_fn: Callable | None = None) -> dict[str, Any]:
    """Localize on the perturbed head (I_neg = changed inputs, I_pos = unchanged) and score the ranking against
    the perturbed weights: one flat row."""
    localize_fn = localize_fn or _default_localize
    t1 = time.perf_counter()
    res = localize_fn(fault.head, x, label, fault.changed, method, len(fault.weights), batch_size, fault.seed,
                      **dict(method_opts or {}))
    row = {**fault_facts(fault, head), "method": method, "level": res.level, "I_neg": "changed",
           "I_pos": "unchanged", "fl_s": time.perf_counter() - t1}
    row.update(evaluate_ranking(weight_level_scores(res, head.index), fault.weights, fractions=fractions))
    return row


def run_injected_benchmark(head: FFNHead, x: Tensor, label: Tensor, methods: Sequence[str],
                           seeds: Iterable[int] = (0, 1, 2), fractions: Sequence[float] = DEFAULT_FRACTIONS,
                           min_changed_frac: float = 0.001, min_changed: int = 2, batch_size: int = 256,
                           method_opts: Mapping[str, dict] | None = None, localize_fn: Callable | None = None,
                           progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per (seed, method): injection facts (n_perturbed, n_changed, ...) and the ranking metrics.
    A method that fails gets a row with its ``error`` (the benchmark goes on)."""
    method_opts = dict(method_opts or {})
    grad = loss_gradient(head, x, label, batch_size=max(batch_size, 1024))
    rows = []
    seeds = list(seeds)
    for si, seed in enumerate(seeds):
        t0 = time.perf_counter()
        fault = inject_faults(head, x, label, seed, min_changed_frac, min_changed, grad=grad)
        t_inj = time.perf_counter() - t0
        for mi, method in enumerate(methods):
            if progress is not None:
                progress(f"injected faults: seed {seed} ({si + 1}/{len(seeds)}), {method} ({mi + 1}/{len(methods)})")
            try:
                row = evaluate_method_on_fault(fault, head, x, label, method, fractions, batch_size,
                                               method_opts.get(method), localize_fn)
                row["error"] = ""
            except Exception as e:  # one method's failure must not stop the others; the row says why
                row = {**fault_facts(fault, head), "method": method, "error": f"{type(e).__name__}: {e}"}
                if progress is not None:
                    progress(f"  {method} failed: {row['error']}")
            row["inject_s"] = t_inj
            rows.append(row)
    return pd.DataFrame(rows)
