"""The FL step's per-method status table (what the main job and the experiment runner print) counts what each
status row says: computed, already on disk, not applicable, failed."""
from __future__ import annotations

import pytest


@pytest.fixture
def run(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    return make_run(tmp_path / "run", make_classifier)[0]


def test_status_summary_counts_the_real_status_rows(run):
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import run_localization, status_summary

    n = len(RunContext(run).settings)
    first = {r["method"]: r for r in status_summary(run_localization(run, ["grad_loss", "random"], budgets=[6],
                                                                     progress=False))}
    for m in ("grad_loss", "random"):
        r = first[m]
        assert (r["computed"], r["on disk"], r["n/a"], r["failed"]) == (n, 0, 0, 0), r
        assert r["mean_s"] != "-" and float(r["max_s"]) >= float(r["mean_s"]) > 0
        assert r["N"] == "6" and r["not run"] == "-"
    again = {r["method"]: r for r in status_summary(run_localization(run, ["grad_loss", "random"], budgets=[6, 9],
                                                                     progress=False))}
    # budget 9 is new: selected from the stored scores, not recomputed
    assert (again["grad_loss"]["computed"], again["grad_loss"]["selected"]) == (0, n)
    assert again["grad_loss"]["mean_s"] == "-" and again["grad_loss"]["N"] == "6 9"
    third = status_summary(run_localization(run, ["grad_loss"], budgets=[6, 9], progress=False))
    assert (third[0]["on disk"], third[0]["computed"]) == (n, 0)


def test_status_summary_names_not_applicable_and_failed_and_refuses_unknown_status():
    from vitfl.pipeline.localize import status_summary

    rows = [{"method": "vdiff", "setting": "s1", "budgets": "6", "status": "not applicable: needs 2 I_neg"},
            {"method": "vdiff", "setting": "s2", "budgets": "6", "status": "error: boom"}]
    (r,) = status_summary(rows)
    assert (r["n/a"], r["failed"], r["computed"]) == (1, 1, 0)
    assert "s1 (needs 2 I_neg)" in r["not run"] and "s2 (boom)" in r["not run"]
    with pytest.raises(ValueError, match="unknown FL status 'ok'"):
        status_summary([{"method": "m", "setting": "s", "status": "ok"}])
