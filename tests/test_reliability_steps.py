"""Every option of the FL and repair steps is checked before any work, and a bad file is named."""
from __future__ import annotations

import pytest

from vitfl.core.io import FileFormatError


@pytest.fixture
def run(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    return make_run(tmp_path / "run", make_classifier)[0]


def test_bad_localize_options_fail_before_any_work(run):
    from vitfl.localization.ranking import BudgetError
    from vitfl.pipeline.localize import run_localization

    bad = [({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": True}, ValueError, "batch_size"),
           ({"trainer_kwargs": {"devices": 0}}, ValueError, "devices"),
           ({"methods": ["nope"]}, KeyError, "registered"), ({"budgets": [0]}, BudgetError, "budget"),
           ({"budgets": [-5]}, BudgetError, "budget"), ({"budgets": [40000]}, BudgetError, "40000"),
           ({"budgets": ["many"]}, BudgetError, "budget"), ({"settings": ["src_tgt_r7"]}, KeyError, "not available"),
           ({"method_options": {"ours": {"q": 1}}}, ValueError, "no option")]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            run_localization(run, **{"methods": ["grad_loss"], "budgets": [6], "progress": False, **kw})
    assert run.list_results("fl_result") == [] and not run.fl_timing.exists()  # nothing was computed


def test_an_invalid_settings_file_is_named(run):
    from vitfl.pipeline.localize import run_localization

    run.misclf_info.write_text('{"settings": {"all": NaN')
    with pytest.raises(FileFormatError, match="misclf_info.json"):
        run_localization(run, ["grad_loss"], budgets=[6], progress=False)
    run.misclf_info.write_text('{"no_settings": 1}')
    with pytest.raises(ValueError, match="misclf_info.json"):
        run_localization(run, ["grad_loss"], budgets=[6], progress=False)


def test_a_folder_where_a_result_belongs_is_an_error_not_done(run):
    from vitfl.core.runstore import ResultError
    from vitfl.pipeline.repair import run_sweep

    kw = dict(repair_options={"pop_size": 4, "generations": 2}, progress=False, on_error="raise")
    rows = run_sweep([run.root], ["random"], ["all"], [6], 1, **kw)
    path = run.abs(rows[0]["path"])
    path.unlink()
    path.mkdir()
    with pytest.raises(ResultError, match="is a directory"):
        run_sweep([run.root], ["random"], ["all"], [6], 1, **kw)
