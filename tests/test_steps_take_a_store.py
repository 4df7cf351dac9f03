"""Steps take a RunStore, never a path (the scripts make the store once): a path given to a step is a TypeError
that names the step, before anything is read or written."""
import pytest

from vitfl.core.runstore import RunStore, require_store


def _steps():
    from vitfl.lightning_modules.runs import load_run
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.crossval import collect_crossval, prepare_folds
    from vitfl.pipeline.evaluate_fl import run_evaluation
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import step_misclf
    from vitfl.pipeline.report import write_report

    return {"load_run": load_run, "step_cache": step_cache, "RunContext": RunContext,
            "prepare_folds": prepare_folds, "collect_crossval": collect_crossval, "run_evaluation": run_evaluation,
            "run_localization": run_localization, "step_misclf": step_misclf, "write_report": write_report}


@pytest.mark.parametrize("name", sorted(_steps()))
def test_a_path_given_to_a_step_is_refused(name, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(TypeError, match="RunStore"):
        _steps()[name](str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing written


def test_require_store_passes_a_store_through(tmp_path):
    store = RunStore(tmp_path)
    assert require_store(store, "x") is store
    with pytest.raises(TypeError, match="x takes a RunStore"):
        require_store(tmp_path, "x")
