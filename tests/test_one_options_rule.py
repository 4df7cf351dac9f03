"""One rule for an FL method's options (vitfl.core.registry.Registry.check_options): the API (vitfl.pipeline.localize
.resolved_options), the command line (scripts/localize.py --method_options) and an experiment config
(vitfl.pipeline.experiment.check_experiment) accept exactly the same options, for every registered method."""

import pytest

import vitfl.localization.methods  # noqa: F401 - registers the methods
from vitfl.localization.base import FL_METHODS


def _localize_script():
    from test_cli_steps import script  # the tests' one loader of a script module

    return script("localize")


class Accepted(Exception):
    """The command line checked the options and went on to the step (stubbed)."""


def accepted_by(method: str, options: dict, tmp_path, monkeypatch) -> dict[str, bool]:
    import json

    from vitfl.pipeline import localize
    from vitfl.pipeline.experiment import ExperimentConfigError, check_experiment

    out = {}
    try:
        localize.resolved_options(method, options)
        out["api"] = True
    except ValueError:
        out["api"] = False

    def stop(*a, **k):
        raise Accepted

    monkeypatch.setattr(localize, "run_localization", stop)
    script = _localize_script()
    try:
        script.main(["--run_dir", str(tmp_path), "--methods", method, "--method_options",
                     json.dumps({method: options})])
        out["cli"] = "returned without running the step"
    except Accepted:
        out["cli"] = True
    except SystemExit as e:  # a usage error (exit 2) is the refusal
        out["cli"] = False if e.code == 2 else f"exit {e.code}"
    cfg = {"name": "x", "variant": "corrected", "datasets": {"d": {"run_dir": str(tmp_path)}}, "steps": ["localize"],
           "localize": {"methods": [method], "method_options": {method: options}}}
    try:
        check_experiment(cfg)
        out["config"] = True
    except ExperimentConfigError:
        out["config"] = False
    return out


@pytest.mark.parametrize("method", FL_METHODS.names())
def test_api_command_line_and_config_accept_the_same_options(method, tmp_path, monkeypatch):
    defaults = {k: v for k, v in FL_METHODS.options(method).items() if k != "seed"}
    got = accepted_by(method, defaults, tmp_path, monkeypatch)
    assert got == {"api": True, "cli": True, "config": True}, (method, defaults, got)
    got = accepted_by(method, {**defaults, "no_such_option": 1}, tmp_path, monkeypatch)
    assert got == {"api": False, "cli": False, "config": False}, (method, got)


def test_ours_two_sided_is_refused_everywhere(tmp_path, monkeypatch):
    """Ours fixes two_sided (vdiff is signed); before the one rule the API took it and the command line refused it."""
    assert accepted_by("ours", {"two_sided": True}, tmp_path, monkeypatch) == {"api": False, "cli": False,
                                                                              "config": False}
