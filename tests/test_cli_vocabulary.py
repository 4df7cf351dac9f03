"""Issue 31, items 1 and 4 (the command lines): the documented ``run_experiment.py --only ...`` forms parse, every
script's ``--help`` works without importing torch, option names are never abbreviated, a misspelled one gets a
"did you mean", one progress option and one method-options name (old spellings: deprecated aliases that warn);
and a script stopped by SIGTERM exits non-zero saying where it stopped and how to resume (worker processes pass
the signal on instead of ending as a success).

What the old code did is in each test's docstring.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SCRIPTS = REPO / "scripts"
EXP_DIR = REPO / "configs" / "experiment"
#: every runnable script (the underscore files are their shared modules)
ALL_SCRIPTS = sorted(p.stem for p in SCRIPTS.glob("*.py") if not p.stem.startswith("_"))


def script(name):
    from test_cli_steps import script as load

    return load(name)


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e.pop("VITFL_DEBUG", None)
    return e


# ------------------------------------------------------------------------------------------------ item 1: --only
ONLY = [
    (["--only", "prepare"], ["prepare"]),
    (["--only", "work", "--shard", "3/8"], ["work"]),
    (["--only", "final"], ["final"]),
    (["--only", "prepare", "work"], ["prepare", "work"]),
    (["--only", "prepare,work"], ["prepare", "work"]),
    (["--only", "localize", "repair"], ["localize", "repair"]),
]


@pytest.mark.parametrize("argv, steps", ONLY, ids=[" ".join(a) for a, _ in ONLY])
def test_only_parses_as_documented(argv, steps):
    """README / docs/cli.md: ``--only prepare``, ``--only work --shard 3/8``, ``--only final``. Old behaviour:
    'Parser key "only": ... Given value type: <class 'str'>' (only ``--only+ prepare`` parsed)."""
    run = script("run_experiment")
    ns = run.build_parser().parse_args(["--config", str(EXP_DIR / "exp_repair_4.yaml"), *argv])
    assert run.only_steps(ns.only) == steps
    assert "only" not in run.experiment_dict(ns)


def test_only_runs_the_final_phase_and_refuses_an_unknown_step(tmp_path, capsys):
    run = script("run_experiment")
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"datasets": {"digits": {"run_dir": str(tmp_path / "digits"), "train": None}}}))
    base = ["--config", str(EXP_DIR / "exp_repair_4_digits.yaml"), "--config", str(over)]
    assert run.main([*base, "--only", "final"]) == 0
    out = capsys.readouterr().out
    assert "steps aggregate" in out and "aggregate [digits]" in out
    with pytest.raises(SystemExit) as e:
        run.main([*base, "--only", "prepar"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--only prepar: not a step or phase; did you mean prepare?" in err


# ------------------------------------------------------------------------------------------------ item 4: --help
@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help_exits_zero(name):
    """Every script's --help (its time is in the closing note of issue 31; old: up to 35 s for train.py)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--help"], capture_output=True, text=True,
                         cwd=str(REPO), env=env(), timeout=300)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "Traceback" not in out.stderr
    print(f"{name} --help: {wall:.2f} s")


HELP_PROBE = """
import os, runpy, sys
sys.argv = [{path!r}, "--help"]
sys.path.insert(0, os.path.dirname({path!r}))  # as `python scripts/x.py` does
code = 0
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in ("torch", "lightning", "transformers", "timm", "pandas") if m in sys.modules)
print("HEAVY:", " ".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help_imports_nothing_heavy(name):
    """--help parses before any heavy import. Old behaviour: cache_states, evaluate_fl, analyze_misclf and train
    imported torch (evaluate_fl the whole FL evaluation, train LightningCLI and the model) to print their help."""
    path = str(SCRIPTS / f"{name}.py")
    out = subprocess.run([sys.executable, "-c", HELP_PROBE.format(path=path)], capture_output=True, text=True,
                         cwd=str(REPO), env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy = out.stderr.rsplit("HEAVY:", 1)[1].split()
    assert heavy == [], f"{name} --help imported {heavy}"


def test_spelled_out_choices_match_the_libraries():
    """The scripts spell out a few constants so that --help imports no torch; they must agree with the libraries."""
    from vitfl.datamodules.base import SPLITS
    from vitfl.evaluation.interventions import MODES
    from vitfl.localization.misclf import DEFAULT_KINDS
    from vitfl.pipeline.evaluate_fl import PARTS
    from vitfl.pipeline.experiment import PHASES, STEPS

    assert tuple(script("evaluate_fl").PARTS) == tuple(PARTS)
    assert tuple(script("evaluate_fl").MODES) == tuple(MODES)
    assert tuple(script("analyze_misclf").DEFAULT_KINDS) == tuple(DEFAULT_KINDS)
    assert tuple(script("cache_states").SPLITS) == tuple(SPLITS)
    run = script("run_experiment")
    assert tuple(run.STEPS) == tuple(STEPS) and tuple(run.PHASES) == tuple(PHASES)
    from vitfl.localization.ranking import DEFAULT_BUDGETS
    from vitfl.pipeline.repair import DEFAULT_BUDGETS as REPAIR_DEFAULT

    assert script("_cli").DEFAULT_BUDGETS == [*DEFAULT_BUDGETS, "avg"] == list(REPAIR_DEFAULT)


# ------------------------------------------------------------------------ item 4: abbreviations, did you mean
#: (script, an abbreviation of one of its options, the option it abbreviates, a value)
ABBREVIATED = [
    ("localize", "--meth", "--methods", "random"),
    ("repair_sweep", "--gen", "--generations", "3"),
    ("evaluate_fl", "--part", "--parts", "checkpoint"),
    ("cache_states", "--spl", "--splits", "[repair]"),
    ("analyze_misclf", "--rank", "--ranks", "2"),
    ("run_experiment", "--localize.meth", "--localize.methods", "random"),
    ("report", "--include", "--include_stale", None),
    ("adequacy_rq1", "--idc.round", "--idc.round_centroids", "2"),
]


def _main(name):
    if name.startswith("adequacy_rq"):
        return lambda argv: script("_adequacy_cli").main(name.split("_")[1], "doc\n\nmore", argv)
    return script(name).main


@pytest.mark.parametrize("name, short, full, value", ABBREVIATED, ids=[a[0] for a in ABBREVIATED])
def test_an_abbreviated_option_is_refused(name, short, full, value, tmp_path, capsys):
    """Old behaviour: argparse's prefix matching took ``--gen 3`` for ``--generations 3`` (and repair_sweep's
    ``--run_dir`` for ``--run_dirs``, starting a 180-run sweep on the wrong budgets)."""
    argv = [short] + ([value] if value is not None else [])
    with pytest.raises(SystemExit) as e:
        _main(name)(argv + ["--list"] if name in ("localize", "repair_sweep") else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option {short}; did you mean {full}?" in err, err
    assert "usage:" not in err  # one line, not the whole usage first


def test_argparse_parsers_refuse_abbreviations_too(capsys):
    """``_cli.ArgParser``: the same vocabulary for a plain argparse command line."""
    mod = script("_cli")
    p = mod.ArgParser(prog="x.py")
    p.add_argument("--run_dirs", nargs="+")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--run_dir", "a"])
    assert e.value.code == 2
    assert "unknown option --run_dir; did you mean --run_dirs?" in capsys.readouterr().err


MISSPELLED = [
    ("localize", ["--metods", "random", "--list"], "--metods", "--methods"),
    ("repair_sweep", ["--budget", "6", "--list"], "--budget", "--budgets"),
    ("run_experiment", ["--localize.methds", "random"], "--localize.methds", "--localize.methods"),
    ("evaluate_fl", ["--no_figure"], "--no_figure", "--no_figures"),
]


@pytest.mark.parametrize("name, argv, wrong, right", MISSPELLED, ids=[m[0] for m in MISSPELLED])
def test_a_misspelled_option_says_did_you_mean(name, argv, wrong, right, capsys):
    """Old behaviour: the whole usage (30+ lines for run_experiment), then "unrecognized arguments"."""
    with pytest.raises(SystemExit) as e:
        _main(name)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option {wrong}; did you mean {right}?" in err, err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err


def test_a_misspelled_option_of_a_script_run_as_a_command(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPTS / "localize.py"), "--run_dri", str(tmp_path)],
                         capture_output=True, text=True, cwd=str(REPO), env=env(), timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == ("localize.py: error: unknown option --run_dri; did you mean --run_dir? (option "
                                  "names are never abbreviated; localize.py --help lists them)")


def test_train_refuses_abbreviations_and_says_did_you_mean(capsys):
    """train.py's LightningCLI parsers (main and subcommands) follow the same vocabulary. Old behaviour:
    ``--trainer.max_epoch 3`` was taken for ``--trainer.max_epochs 3``."""
    train = script("train")
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--trainer.max_epoch", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert " fit: error: unknown option --trainer.max_epoch; did you mean --trainer.max_epochs?" in err, err
    assert "usage:" not in err


# ---------------------------------------------------------------------------- item 4: one name for each option
def test_repair_sweep_takes_run_dir_as_every_other_script_spells_it():
    p = script("repair_sweep").build_parser()
    assert p.parse_args(["--run_dir", "a", "b"]).run_dirs == ["a", "b"]
    assert p.parse_args(["--run_dirs", "a"]).run_dirs == ["a"]
    assert "--run_dirs RUN_DIRS [RUN_DIRS ...], --run_dir" in p.format_help()


@pytest.mark.parametrize("name, old, value", [
    ("localize", ["--no_progress"], "none"),
    ("repair_sweep", ["--progress_bar"], "all"),
    ("repair_sweep", ["--no_progress"], "none"),
    ("adequacy_rq1", ["--no_progress"], "none"),
])
def test_old_progress_flags_are_deprecated_aliases(name, old, value, capsys):
    """One progress option, ``--progress {none,bar,all}``. Old: localize / adequacy ``--no_progress``, repair_sweep
    ``--progress_bar`` (and no way to switch its sweep bar off)."""
    p = (script("_adequacy_cli") if name.startswith("adequacy") else script(name)).build_parser()
    assert p.parse_args([]).progress == "bar"
    assert p.parse_args(old).progress == value
    assert f"{old[0]} is deprecated; use --progress {value}" in capsys.readouterr().err
    assert p.parse_args(["--progress", value]).progress == value
    assert capsys.readouterr().err == ""


def test_method_options_is_the_one_name(capsys):
    """``--method_options`` everywhere; ``--method_opts`` (run_evaluation's keyword) is a deprecated alias, and an
    experiment's evaluate_fl block takes ``method_options`` like its localize block."""
    for name in ("localize", "evaluate_fl"):
        p = script(name).build_parser()
        assert p.parse_args(["--method_opts", "{ig: {n_steps: 4}}"]).method_options == {"ig": {"n_steps": 4}}
        assert "--method_opts is deprecated; use --method_options" in capsys.readouterr().err
    run = script("run_experiment")
    p = run.build_parser()
    ns = p.parse_args(["--config", str(EXP_DIR / "exp_fl_5_digits.yaml"),
                       "--evaluate_fl", "{method_options: {vdiff: {vscore: signed_mean}}}"])
    assert run.experiment_dict(ns)["evaluate_fl"]["method_opts"] == {"vdiff": {"vscore": "signed_mean"}}
    ns = p.parse_args(["--localize.method_opts", "{ig: {n_steps: 4}}"])
    assert ns.localize.method_options == {"ig": {"n_steps": 4}}


# ------------------------------------------------------------------------------------------------ item 3: signals
def _wait_for(proc, path: Path, text: str, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while True:
        seen = path.read_text() if path.is_file() else ""
        if text in seen:
            return seen
        assert proc.poll() is None, f"ended before {text!r}: {seen[-3000:]}"
        assert time.time() < deadline, f"no {text!r} after {timeout} s: {seen[-3000:]}"
        time.sleep(0.2)


def test_lightning_sigterm_exit_is_an_interruption_not_a_success(capsys):
    """Lightning's loops end a fit on SIGTERM with ``SIGTERMException``, a ``SystemExit`` of status None (= 0).
    Old behaviour: a script ended by it exited 0 without a word."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vitfl.pipeline.parallel import set_step

    cli = script("_cli")

    @cli.guard("demo")
    def main(argv=None):
        set_step("repair de")
        raise SIGTERMException()

    try:
        with pytest.raises(SystemExit) as e:
            main(["--run_dir", "x"])
    finally:
        set_step(None)
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.count("stopped by SIGTERM") == 1 and "demo: stopped by SIGTERM in step 'repair de'" in err
    assert err.rstrip().endswith("--run_dir x")


@pytest.mark.slow
def test_sigterm_during_a_step_exits_non_zero_and_says_how_to_resume(tmp_path, make_classifier):
    """run_experiment.py --only work, SIGTERM while the repair step fits. Old behaviour: Lightning's SIGTERM
    handling ended the fit with SystemExit(None): exit status 0 and no message."""
    from test_repair_sweep import make_run

    store, _, info = make_run(tmp_path / "digits", make_classifier)
    setting = sorted(info["settings"])[0]
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({
        "datasets": {"digits": {"run_dir": str(store.root), "train": None}},
        "compat": [],  # the published DE sweep is replaced by a fine-tuning run that does not end by itself
        "localize": {"methods": ["random"], "settings": [setting], "budgets": [6]},
        "repair": {"sweeps": [{"name": "long", "repair": "finetune", "methods": ["random"], "settings": [setting],
                               "budgets": [6], "reps": 1, "repair_options": {"epochs": 10_000_000}}],
                   "tensorboard": False},
    }))
    log = tmp_path / "out.txt"
    cmd = [sys.executable, str(SCRIPTS / "run_experiment.py"), "--config", str(EXP_DIR / "exp_repair_4_digits.yaml"),
           "--config", str(over), "--only", "work", "--root", str(REPO)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(tmp_path), env=env())
    try:
        _wait_for(proc, log, "localize [digits]")  # the localize step is done: the repair step is fitting
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    msg = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    assert len(msg) == 1, out[-3000:]
    assert "run_experiment: stopped by SIGTERM in step 'repair'" in msg[0]
    assert "rerun the same command" in msg[0] and "--only work" in msg[0] and "run_experiment.py" in msg[0]
    assert "Traceback" not in out


def sleepy_task(pid_dir: str, shard) -> list:
    """A sharded task: records its pid, then sleeps (a worker busy with a long repair run)."""
    Path(pid_dir, f"{os.getpid()}.pid").write_text(str(list(shard)))
    time.sleep(120)
    return [list(shard)]


WORKERS = """
import sys
sys.path[:0] = [{repo!r}, {scripts!r}, {tests!r}]
import _cli
from vitfl.pipeline.parallel import run_sharded
import test_cli_vocabulary as t

@_cli.guard("sweep")
def main(argv=None):
    run_sharded(t.sleepy_task, {{"pid_dir": {pid_dir!r}}}, workers=2, threads=1)
    return 0

sys.exit(main())
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see the worker processes")
@pytest.mark.parametrize("target", ["parent", "worker"])
def test_sigterm_with_worker_processes(target, tmp_path):
    """``--workers 2``: SIGTERM to the parent, or to one worker, ends the run with status 143 and the message; the
    workers are gone at once. Old behaviour: a worker's Lightning SIGTERM came back as SystemExit(None) (exit 0),
    and a signalled parent waited in the pool's shutdown for the workers' whole sub-shards."""
    from test_reliability_cli import _alive

    pids = tmp_path / "pids"
    pids.mkdir()
    code = textwrap.dedent(WORKERS.format(repo=str(REPO), scripts=str(SCRIPTS), tests=str(TESTS),
                                          pid_dir=str(pids)))
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, env=env())
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while len(list(pids.glob("*.pid"))) < 2:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = [int(p.stem) for p in pids.glob("*.pid")]
        t0 = time.time()
        os.kill(proc.pid if target == "parent" else workers[0], signal.SIGTERM)
        rc = proc.wait(60)
        assert time.time() - t0 < 30, "the run waited for its workers' tasks"
        deadline = time.time() + 10
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert [p for p in workers if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert out.count("stopped by SIGTERM") == 1 and "sweep: stopped by SIGTERM in step 'sweep'" in out, out
    assert "Traceback" not in out, out[-3000:]
