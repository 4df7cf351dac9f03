"""Cross-validated repair: every evaluation input is tested exactly once over the folds, fold runs are ordinary runs
of the store (resumable), and the pooled RR is the count-weighted mean of the per-run RRs with Wilson intervals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from conftest import REPO
from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.cli import ToolkitCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv_run")
    ToolkitCLI(args=["fit", *[a for c in CONFIGS for a in ("--config", str(REPO / c))],
                     "--trainer.default_root_dir", str(root), "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--trainer.logger=false"])
    return RunStore(root)


def test_wilson_matches_scipy_and_stays_in_unit_interval():
    from vitfl.pipeline.crossval import wilson

    for k, n in ((0, 10), (3, 10), (10, 10), (1, 1), (17, 412), (0, 1)):
        lo, hi = wilson(k, n)
        ref = binomtest(k, n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert all(v != v for v in wilson(0, 0))  # no denominator: NaN, never 0


def test_folds_test_every_eval_input_once_and_pool_by_counts(run):
    from vitfl.core.states import load_states
    from vitfl.pipeline.crossval import aggregate_crossval, collect_crossval, prepare_folds, run_crossval

    folds = prepare_folds(run, trainer_kwargs={"enable_progress_bar": False})
    ev = load_states(run.states("eval"))
    tested = torch.cat([load_states(f.states("test")).index for f in folds])
    assert sorted(tested.tolist()) == sorted(ev.index.tolist())  # each eval input tested exactly once
    for f in folds:
        rep, test = load_states(f.states("repair")), load_states(f.states("test"))
        assert not set(rep.index.tolist()) & set(test.index.tolist())
        assert len(rep) + len(test) == len(ev)
        assert f.model_store() == RunStore(run.root.resolve())
    rows = run_crossval(run, ["random"], ["all"], [20], 2, repair_options={"pop_size": 6, "generations": 2})
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 2 * len(folds)
    again = run_crossval(run, ["random"], ["all"], [20], 2, repair_options={"pop_size": 6, "generations": 2})
    assert {r["status"] for r in again} == {"exists"}
    # two worker processes: each fold's grid split between them, the new repetition run exactly once per fold
    more = run_crossval(run, ["random"], ["all"], [20], 3, repair_options={"pop_size": 6, "generations": 2},
                        workers=2)
    assert sorted(r["status"] for r in more) == sorted(["exists"] * 2 * len(folds) + ["done"] * len(folds))
    df = collect_crossval(run)
    assert sorted(df["fold"].unique()) == list(range(len(folds)))
    agg = aggregate_crossval(run)
    row = agg["table"].iloc[0]
    assert row["test_targets"] == df["n_targets"].sum() and row["runs"] == len(df)
    ok = df[df["n_targets"] > 0]
    if len(ok):  # pooled RR = count-weighted mean of the runs' RRs
        assert row["rr"] == pytest.approx(float(np.average(ok["rr"], weights=ok["n_targets"])))
    assert row["runs_without_test_target"] == int((df["n_targets"] == 0).sum())
    assert 0.0 <= row["br_lo"] <= row["br"] <= row["br_hi"] <= 1.0
    md = (run.repair_summary_dir / "crossval.md").read_text()
    assert f"{int(row['test_fixed'])} / {int(row['test_targets'])}" in md
