"""The one FL runner: every FL score the toolkit computes comes from :class:`vitfl.lightning_modules.fl.FLModule` under a
Lightning Trainer (``test`` loop), through :func:`compute_scores`. The localize step, the checkpoint and
injected-fault benchmarks, the interventions and the repair sweep all call it (the step modules in ``pipeline/``
add naming, saving and resuming through the run store).

* :func:`setting_rows` turns a misclassification setting into the rows a method reads, honouring the method's
  metadata (``vitfl.localization.base.FL_METHODS``): I_neg first, in the published order for methods whose formula
  depends on batching (``batching``), then I_pos (all correct inputs, or a seeded sample of |I_neg| of them for
  ``pos_sample = "n_neg"``), plus ``true_label`` for methods that ask for it (``uses_true_label``).
* :func:`compute_scores` runs the method and measures *this run's* wall time and peak memory (the resident-set
  growth sampled while it runs, and the CUDA allocator's peak on a GPU), not the process's high-water mark.
* Multi-process runs: pass ``trainer_kwargs={"devices": n, "strategy": "ddp"}``; metric states are summed across
  processes, every rank gets the same scores; only rank 0 writes (the run store checks).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import lightning as L
import torch
from torch import Tensor

from vitfl.core.quiet import quiet_lightning
from vitfl.lightning_modules.fl import FLModule
from vitfl.localization.base import FLResult, method_meta
from vitfl.localization.ffn import FFNHead
from vitfl.localization.ranking import select

__all__ = ["setting_rows", "true_label_of", "compute_scores", "ScoresRun", "localize_with_trainer",
           "quiet_lightning", "PeakMemory"]


# ----------------------------------------------------------------------------------------------------- inputs
def true_label_of(setting: Mapping[str, Any]) -> int | None:
    """The setting's true label (src_tgt: s; tgt_fn: l), None where the setting has no single true label."""
    kind = setting.get("kind")
    if kind == "src_tgt":
        return int(setting["true"])
    if kind == "tgt_fn":
        return int(setting["label"])
    return None


def setting_rows(states, setting: Mapping[str, Any], method: str | None = None, seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any], dict[str, Any]]:
    """(x, label, is_neg, extra constructor options, a description of the inputs) of a setting for ``method``.

    ``states``: a :class:`vitfl.core.states.StateCache` of the split the setting was made on; ``setting``: one
    entry of ``misclf_info.json``'s settings (sample indices)."""
    meta = method_meta(method) if method is not None else {}
    published = bool(meta.get("batching"))
    neg_idx = list(setting.get("i_neg_published") or setting["i_neg"]) if published else list(setting["i_neg"])
    pos_idx = list(setting.get("i_pos") or [])
    desc = {"i_neg": "published order" if published and setting.get("i_neg_published") else "ascending index",
            "i_pos": "all correct inputs of the split"}
    if meta.get("pos_sample") == "n_neg":
        from vitfl.localization.methods.reptran_compat import sample_correct_inputs

        if setting.get("kind") in ("tgt_fp", "tgt_fn", "tgt") and setting.get("label") is not None:
            # exp-fl-5-5 drew from the target label's correct inputs for the label-targeted settings
            rows = states.rows_of(torch.tensor(pos_idx, dtype=torch.long))
            keep = states.label[rows] == int(setting["label"])
            pos_idx = [i for i, k in zip(pos_idx, keep.tolist()) if k]
            desc["i_pos"] = f"correct inputs of label {setting['label']}"
        pos_idx = sample_correct_inputs(pos_idx, len(neg_idx), seed).tolist()
        desc["i_pos"] = f"a seeded sample (seed {seed}) of |I_neg| = {len(neg_idx)} of the {desc['i_pos']}"
    extra: dict[str, Any] = {}
    if meta.get("uses_true_label"):
        extra["true_label"] = true_label_of(setting)
    neg = states.rows_of(torch.tensor(neg_idx, dtype=torch.long))
    pos = states.rows_of(torch.tensor(pos_idx, dtype=torch.long))
    rows = torch.cat([neg, pos])
    is_neg = torch.zeros(len(rows), dtype=torch.bool)
    is_neg[: len(neg)] = True
    desc.update(n_neg=len(neg), n_pos=len(pos))
    return states.x[rows], states.label[rows], is_neg, extra, desc


# ----------------------------------------------------------------------------------------------------- running
def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak extra memory of a block: resident-set growth over the block's start, sampled every ``interval`` s by a
    background thread (``extra_mb``), and the CUDA allocator's peak (``cuda_mb``, None without a GPU)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.extra_mb = 0.0
        self.cuda_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        self._start = _rss_mb()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_mb())
        self.extra_mb = max(0.0, self._peak - self._start)
        if torch.cuda.is_available():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2 ** 20


@dataclass
class ScoresRun:
    """One FL run: ``scores`` (``[d_ff]`` or ``[2 d d_ff]``), the method's own selection (BL's front) or None, the
    localizer's options, wall time and peak memory of this run."""

    scores: Tensor
    own: Tensor | None
    options: dict[str, Any]
    wall_s: float
    peak_mb: float
    cuda_peak_mb: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def compute_scores(head: FFNHead, method: str, x: Tensor, label: Tensor, is_neg: Tensor, *,
                   options: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int = 512,
                   trainer_kwargs: Mapping[str, Any] | None = None) -> ScoresRun:
    """Scores of one FL method on one set of rows, computed by the FL LightningModule under a Trainer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    module = FLModule(head, method, x, label, is_neg, method_options=dict(options or {}), seed=seed,
                      batch_size=batch_size)
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
          "enable_model_summary": False, "inference_mode": False, "use_distributed_sampler": False,
          "enable_checkpointing": False, **(trainer_kwargs or {})}
    with quiet_lightning(), PeakMemory() as mem:
        t0 = time.perf_counter()
        trainer = L.Trainer(**kw)
        trainer.test(module, verbose=False)
        own = None
        if method_meta(method)["own_selection"]:
            own = module.localizer.own_selection()  # None where the options rank instead (IG's mean)
        wall = time.perf_counter() - t0
    return ScoresRun(module.scores, None if own is None else torch.as_tensor(own).long().cpu(),
                     module.localizer.options(), wall, mem.extra_mb, mem.cuda_mb,
                     {"world_size": trainer.world_size, "n_neg": int(is_neg.sum()), "n_pos": int((~is_neg).sum())})


def localize_with_trainer(head: FFNHead, x: Tensor, label: Tensor, is_neg: Tensor, method: str,
                          budget: int | str | None, batch_size: int = 512, seed: int = 0,
                          trainer_kwargs: Mapping[str, Any] | None = None, **opts: Any) -> FLResult:
    """:func:`compute_scores` plus the selection of ``budget`` (int N, or "front" / None for the method's own
    selection): an in-memory :class:`FLResult` (the benchmarks' FL path; nothing is written)."""
    run = compute_scores(head, method, x, label, is_neg, options=opts, seed=seed, batch_size=batch_size,
                         trainer_kwargs=trainer_kwargs)
    level = method_meta(method)["level"]
    weights, neurons = select(run.scores, level, budget, head.index, own=run.own)
    return FLResult(method=method, level=level, budget=budget if budget is not None else "front",
                    scores=run.scores, weights=weights, neurons=neurons,
                    provenance={"method": method, "options": run.options, "seed": seed, "wall_time_s": run.wall_s,
                                "peak_mb": run.peak_mb, **run.info})
