"""Reliability, round two (issue 29), items 2, 5, 6 and 7: readers keep only results made from the run's current
inputs (and count the rest), options are checked once by one rule before any work, a known failure ends a script
with one paragraph and no traceback, and workers die with their parent.

Each test first builds the failure on its own small run (``test_repair_sweep.make_run``: a tiny ViT checkpoint,
repair / test state caches and settings); what the old code did is in each test's docstring.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DE = {"pop_size": 4, "generations": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def script(name):
    from test_cli_steps import script as load

    return load(name)


@pytest.fixture
def run(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    return make_run(tmp_path / "run", make_classifier)[0]


def write_model(store, model) -> None:
    """Replace the run's checkpoint by ``model`` and redo what the steps before FL would (state caches, settings):
    the situation after ``epoch=...ckpt`` is replaced and caches and settings are rerun."""
    from test_repair_sweep import write_model as rewrite

    rewrite(store, model)


def one_paragraph_error(err: str, script_name: str) -> str:
    """The error message of a script's stderr: asserted to be there, one paragraph, no traceback."""
    assert "Traceback" not in err, err[-3000:]
    assert err.count(f"{script_name}: error:") == 1, err[-3000:]  # (after a progress bar's last line, maybe)
    tail = err[err.index(f"{script_name}: error:"):].strip()
    assert "\n\n" not in tail and tail.endswith("shows the traceback)"), tail
    return tail


# ------------------------------------------------------------------------------------------- 2. provenance
def test_stale_results_are_left_out_and_counted_by_every_reader(run, make_classifier, capsys):
    """Old behaviour: after the checkpoint was swapped and the steps rerun, the interventions evaluated the FL results
    of the old model as well (4 instead of 2 here) and the aggregation tabulated the old model's repair results
    beside the new one's (2 runs instead of 1), with no warning."""
    from vitfl.pipeline.crossval import aggregate_crossval
    from vitfl.pipeline.evaluate_fl import run_evaluation
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.repair import aggregate, collect_results, run_sweep

    kw = dict(repair_options=DE, progress=False, on_error="raise")
    fold = run.fold(0)  # a fold run of the cross-validated repair: the run's model, its own caches and settings
    for name in ("states", "misclf"):
        shutil.copytree(run.root / name, fold.root / name)

    def steps():
        run_localization(run, ["random", "grad_loss"], settings=["all"], budgets=[6], progress=False)
        run_sweep([run.root], ["random"], ["all"], [6], 1, **kw)

    steps()
    run_sweep([fold.root], ["random"], ["all"], [6], 1, **kw)
    assert aggregate_crossval(run)["n_runs"] == 1
    write_model(run, make_classifier("hf_vit", seed=7))  # the checkpoint is replaced, caches and settings rerun
    steps()
    assert len(run.list_results("fl_result")) == 4 and len(run.list_results("repair_result")) == 2

    # FL evaluation: only the new model's 2 FL results; the 2 old ones counted, logged and recorded
    logs = []
    kw_ev = dict(parts=["interventions"], n_random=1, figures=False, tensorboard=False, log=logs.append)
    res = run_evaluation(run, **kw_ev)
    summary = res["interventions_summary"]
    assert summary["result"].nunique() == 2
    meta = json.loads(run.fl_eval("interventions_meta.json").read_text())
    assert meta["fl_results_checked"] == 4 and meta["evaluated"] == 2 and meta["stale"] == 2
    assert meta["stale_why"]["made by another model"] == 2
    assert any("left out 2 stale FL results" in m and "made by another model" in m for m in logs), logs
    res = run_evaluation(run, include_stale=True, **kw_ev)
    s = res["interventions_summary"].drop_duplicates("result")
    assert len(s) == 4 and sorted(s["stale"] != "") == [False, False, True, True]
    assert all("made by another model" in w for w in s.loc[s["stale"] != "", "stale"])
    assert script("evaluate_fl").main(["--run_dir", str(run.root), "--parts", "interventions", "--no_figures",
                                       "--n_random", "1", "--include_stale"]) == 0
    assert "2 stale FL results" in capsys.readouterr().out
    assert "stale" in run.fl_eval("interventions_summary.csv").read_text().splitlines()[0]

    # aggregation: the new model's 1 repair result; the old one left out, counted, in summary.md and manifest.json
    agg = aggregate([run.root])
    assert agg["n_runs"] == 1 and agg["provenance"]["stale"] == 1
    assert "left out 1 stale repair results" in agg["stale_note"]
    assert "left out 1 stale repair results" in (run.repair_summary_dir / "summary.md").read_text()
    manifest = json.loads((run.repair_summary_dir / "manifest.json").read_text())
    assert manifest["provenance"]["stale"] == 1 and manifest["provenance"]["why"]["made by another model"] == 1
    df = collect_results([run.root], include_stale=True)
    assert len(df) == 2 and sorted(df["stale"] != "") == [False, True]
    assert len(collect_results([run.root])) == 1

    # the same through the script: a printed line, and --include_stale keeps them, labelled
    rs = script("repair_sweep")
    assert rs.main(["--run_dirs", str(run.root), "--aggregate_only"]) == 0
    out = capsys.readouterr().out
    assert "left out 1 stale repair results" in out and "1 runs aggregated" in out
    assert rs.main(["--run_dirs", str(run.root), "--aggregate_only", "--include_stale"]) == 0
    assert "2 runs aggregated" in capsys.readouterr().out
    assert "stale" in (run.repair_summary_dir / "runs.csv").read_text().splitlines()[0]

    # the cross-validated repair's pooling: the fold's result was made by the old model
    cv = aggregate_crossval(run)
    assert cv["n_runs"] == 0 and cv["provenance"]["stale"] == 1 and "made by another model" in cv["stale_note"]
    assert aggregate_crossval(run, include_stale=True)["n_runs"] == 1


def test_results_of_a_run_without_a_model_are_kept_and_counted_unverified(tmp_path):
    """A store of results only (no checkpoint to compare with) is tabulated as before, and says so."""
    from vitfl.pipeline.repair import aggregate
    from test_report import fake_run

    store, recs = fake_run(tmp_path / "d", tb=False, reps=1)
    agg = aggregate({"d": store.root})
    assert agg["n_runs"] == len(recs) and agg["provenance"]["unverified"] == len(recs)
    assert f"{len(recs)} repair results could not be checked" in agg["stale_note"]
    assert "could not be checked" in (store.repair_summary_dir / "summary.md").read_text()


# ------------------------------------------------------------------------------------------- 5. options
BAD_REPAIR_OPTIONS = [
    ({"generations": 2.5}, "generations=2.5 must be an int"),
    ({"generations": "abc"}, "generations='abc' must be an int"),
    ({"generations": 0}, "generations=0 must be >= 1"),
    ({"pop_size": 3}, "pop_size=3 must be >= 4"),
    ({"cr": 1.5}, "cr=1.5 must be in [0, 1]"),
    ({"update": "sideways"}, "update='sideways' must be one of"),
    ({"f_range": [0.5]}, "f_range=[0.5] must be a list of 2 numbers"),
    ({"alpha": True}, "alpha=True must be a number"),
    ({"seed": 3}, "cannot be set as an option"),
]


@pytest.mark.parametrize("opts, message", BAD_REPAIR_OPTIONS, ids=[str(o) for o, _ in BAD_REPAIR_OPTIONS])
def test_a_bad_repair_option_is_one_error_everywhere_before_any_work(run, opts, message, capsys):
    """Old behaviour: generations=2.5 ran 2 generations under an identity recording 2.5, generations=0 stored a
    zero-generation repair, 'abc' failed every run late with "invalid literal for int()", a population of 3 failed
    per run inside the DE. Now the API, the command line and an experiment config give the same error up front."""
    from vitfl.pipeline.experiment import ExperimentConfigError, check_experiment
    from vitfl.pipeline.repair import run_sweep

    with pytest.raises(ValueError, match="repair method 'de'") as e:
        run_sweep([run.root], ["random"], ["all"], [6], 1, repair_options=opts, progress=False)
    assert message in str(e.value)
    argv = ["--run_dirs", str(run.root), "--methods", "random", "--settings", "all", "--budgets", "6", "--reps", "1",
            "--option", *[f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in opts.items()]]
    with pytest.raises(SystemExit) as e:
        script("repair_sweep").main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    cfg = {"name": "t", "variant": "corrected", "datasets": {"d": {"run_dir": str(run.root)}},
           "repair": {"sweeps": [{"methods": ["random"], "budgets": [6], "repair_options": opts}]}}
    with pytest.raises(ExperimentConfigError, match="repair.sweeps\\[0\\]") as e:
        check_experiment(cfg)
    assert message in str(e.value)
    assert run.list_results("repair_result") == [] and run.list_results("fl_result") == []  # nothing ran


def test_integers_stay_integers_and_one_value_has_one_key():
    """Old behaviour: cr=1 and cr=1.0 were two identities of one computation; generations=2.5 was truncated."""
    from vitfl.core.runstore import identity_key
    from vitfl.pipeline.repair import resolved_repair_options

    a, b = resolved_repair_options("de", {"cr": 1}), resolved_repair_options("de", {"cr": 1.0})
    assert a == b and isinstance(a["cr"], float) and identity_key(a) == identity_key(b)
    r = resolved_repair_options("de", {"generations": 3, "f_range": [0, 1], "patience": None})
    assert r["generations"] == 3 and type(r["generations"]) is int and r["f_range"] == [0.0, 1.0]
    assert resolved_repair_options("lp", {"time_limit": 2})["time_limit"] == 2.0
    with pytest.raises(ValueError, match="never rounded"):
        resolved_repair_options("de", {"generations": 2.0})


def test_an_option_given_twice_is_an_error_naming_both(run, capsys, tmp_path):
    """Old behaviour: ``--generations 2 --option generations=abc`` silently used the flag's 2."""
    rs = script("repair_sweep")
    base = ["--run_dirs", str(run.root), "--methods", "random", "--settings", "all", "--budgets", "6"]
    for extra, named in ((["--generations", "2", "--option", "generations=abc"], ["--generations 2",
                                                                                   "--option generations=abc"]),
                         (["--repair_options", "{pop_size: 6}", "--pop_size", "8"], ["--repair_options pop_size=6",
                                                                                     "--pop_size 8"]),
                         (["--option", "cr=0.5", "cr=0.6"], ["--option cr=0.5", "--option cr=0.6"])):
        with pytest.raises(SystemExit) as e:
            rs.main(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "given twice" in err and all(n in err for n in named), err
    # a config's value is overridden by a flag (documented: flags override configs), not "given twice"
    cfg = tmp_path / "de.yaml"
    cfg.write_text("repair_options: {generations: 50, pop_size: 100}\n")
    p = rs.build_parser()
    argv = ["--config", str(cfg), "--generations", "2"]
    assert rs.repair_options(p.parse_args(argv), argv) == {"generations": 2, "pop_size": 100}
    assert run.list_results("repair_result") == []


def test_fl_options_follow_the_same_rule_in_the_api_and_on_the_command_line(run, capsys):
    """Old behaviour: ``ours`` accepted ``two_sided`` through the API (its parent class takes it, though ours fixes
    it) and rejected it on the command line; ``p: "0.5"`` reached the method as a string."""
    from vitfl.pipeline.experiment import check_fl_options
    from vitfl.pipeline.localize import resolved_options, run_localization

    for opts, message in (({"two_sided": False}, "no option(s) ['two_sided']"), ({"p": "0.5"}, "p='0.5' must be"),
                          ({"true_label": 1.5}, "true_label=1.5 must be"), ({"sides": ["neg"]}, "no option")):
        for check in (lambda: resolved_options("ours", opts), lambda: check_fl_options("ours", opts),
                      lambda: run_localization(run, ["ours"], settings=["all"], budgets=[6], progress=False,
                                               method_options={"ours": opts})):
            with pytest.raises(ValueError, match="FL method 'ours'") as e:
                check()
            assert message in str(e.value)
        if opts == {"p": "0.5"}:
            continue  # (the command line's YAML typing reads "0.5" as the number 0.5)
        with pytest.raises(SystemExit) as e:
            script("localize").main(["--run_dir", str(run.root), "--methods", "ours", "--method_options",
                                     json.dumps({"ours": opts})])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert resolved_options("ours", {"p": 1})["p"] == 1.0 and resolved_options("arachne_w", {"two_sided": False})
    assert run.list_results("fl_result") == []


@pytest.mark.parametrize("name", ["localize", "repair_sweep", "evaluate_fl"])
@pytest.mark.parametrize("text, key, what", [("budgets: 9\n", "budgets", "a list of budgets"),
                                             ("methods: random\n", "methods", "a list of strings")])
def test_a_config_value_of_the_wrong_shape_names_the_key_and_type(name, text, key, what, tmp_path, capsys):
    """Old behaviour: "'int' object is not iterable" / "'str' object does not support item assignment"."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        script(name).main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{key} must be {what}" in err and str(cfg) in err, err[-1500:]
    assert "not iterable" not in err and "item assignment" not in err


def test_an_experiment_config_of_the_wrong_shape_names_the_key_and_type():
    """Old behaviour: ``localize.budgets: 9`` -> TypeError "'int' object is not iterable"; ``methods: random``
    -> the letters of 'random' as unknown methods."""
    from vitfl.pipeline.experiment import ExperimentConfigError, check_experiment

    base = {"name": "t", "variant": "corrected", "datasets": {"d": {"run_dir": "r"}}}
    for extra, message in (({"localize": {"budgets": 9}}, "localize.budgets must be a list of budgets"),
                           ({"localize": {"methods": "random"}}, "localize.methods must be a list of strings"),
                           ({"repair": {"sweeps": [{"methods": "random"}]}},
                            "repair.sweeps[0].methods must be a list of strings"),
                           ({"repair": {"sweeps": [{"methods": ["random"], "reps": "5"}]}},
                            "repair.sweeps[0].reps must be an int or a list of ints"),
                           ({"evaluate_fl": {"methods": "ours"}}, "evaluate_fl.methods must be a list of strings"),
                           ({"misclf": {"ranks": 1.5}}, "misclf.ranks must be an int"),
                           ({"steps": "localize"}, "steps must be a list of strings"),
                           ({"localize": 5}, "localize must be a mapping")):
        with pytest.raises(ExperimentConfigError) as e:
            check_experiment({**base, **extra})
        assert message in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------- 6. no tracebacks
def _localized(run):
    from vitfl.pipeline.localize import run_localization

    run_localization(run, ["grad_loss", "bl"], settings=["all"], budgets=[6, "avg"], progress=False)
    return run


def _truncate(path: Path, keep: int = 40) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def test_truncated_results_end_with_one_paragraph_and_status_1(run, capsys):
    """Old behaviour: a truncated FL result JSON, scores file, N_avg file or repair result (--aggregate_only) named
    the file inside an uncaught ResultError traceback."""
    from vitfl.pipeline.repair import run_sweep

    _localized(run)
    run_sweep([run.root], ["grad_loss"], ["all"], [6], 1, repair_options=DE, progress=False, on_error="raise")
    loc, rs, ev = script("localize"), script("repair_sweep"), script("evaluate_fl")

    def fails(main, argv, name, path):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        msg = one_paragraph_error(capsys.readouterr().err, name)
        assert str(path) in msg and "--debug" in msg, msg
        return msg

    rec = next(r for r in run.list_results("repair_result"))
    path = _truncate(run.abs(rec["path"]))
    fails(rs.main, ["--run_dirs", str(run.root), "--aggregate_only"], "repair_sweep", path)
    path.unlink()
    fl = next(r for r in run.list_results("fl_result") if r["method"] == "grad_loss")
    scores = _truncate(run.abs(fl["scores_file"]), 100)
    fails(loc.main, ["--run_dir", str(run.root), "--methods", "grad_loss", "--settings", "all", "--budgets", "7"],
          "localize", scores)
    scores.unlink()
    navg = _truncate(run.abs(run.list_results("n_avg")[0]["path"]))
    fails(loc.main, ["--run_dir", str(run.root), "--methods", "grad_loss", "--settings", "all", "--budgets", "avg"],
          "localize", navg)
    navg.unlink()
    path = _truncate(run.abs(next(r for r in run.list_results("fl_result") if r["method"] == "bl")["path"]))
    fails(ev.main, ["--run_dir", str(run.root), "--parts", "interventions", "--no_figures"], "evaluate_fl", path)
    # --debug and VITFL_DEBUG=1 show the traceback (the exception itself)
    from vitfl.core.runstore import ResultError

    with pytest.raises(ResultError, match=str(path)):
        ev.main(["--run_dir", str(run.root), "--parts", "interventions", "--no_figures", "--debug"])
    os.environ["VITFL_DEBUG"] = "1"
    try:
        with pytest.raises(ResultError):
            ev.main(["--run_dir", str(run.root), "--parts", "interventions", "--no_figures"])
    finally:
        del os.environ["VITFL_DEBUG"]


def test_disk_full_during_localize_names_the_file_and_leaves_nothing_half_written(run, capsys, monkeypatch):
    """Old behaviour: a raw ``SafetensorError ... No space left on device`` traceback naming no file."""
    import safetensors
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)  # a partial write, then the disk is full
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SystemExit) as e:
        script("localize").main(["--run_dir", str(run.root), "--methods", "grad_loss", "--settings", "all",
                                 "--budgets", "6"])
    assert e.value.code == 1
    msg = one_paragraph_error(capsys.readouterr().err, "localize")
    assert "no space left on device while writing" in msg and ".scores.safetensors" in msg, msg
    assert "free space" in msg and "nothing half-written was left" in msg
    left = [p for p in run.fl_dir.rglob("*") if p.is_file() and p.name != "timing.csv"]
    assert left == [], left  # no temporary file, no partial scores, no result


def test_a_broken_plugin_is_a_warning_and_the_rest_keeps_working(run, tmp_path, capsys):
    """Old behaviour: an entry point whose module does not import crashed every script, even --methods random."""
    from vitfl.core.registry import PluginLoadWarning
    from vitfl.localization.base import FL_METHODS

    site = tmp_path / "site"
    dist = site / "vitfl_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vitfl-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vitfl.fl_methods]\nbroken = vitfl_broken_no_such_module\n")
    (site / "vitfl_raises.py").write_text("raise RuntimeError('plugin bug at import')\n")
    sys.path.insert(0, str(site))
    os.environ["VITFL_PLUGINS"] = "vitfl_raises"
    try:
        FL_METHODS._discovered = False
        with pytest.warns(PluginLoadWarning) as w:
            assert script("localize").main(["--run_dir", str(run.root), "--methods", "random", "--settings", "all",
                                            "--budgets", "6"]) == 0
        text = "\n".join(str(x.message) for x in w)
        assert "entry point broken = vitfl_broken_no_such_module" in text and "vitfl_raises" in text, text
        assert "plugin bug at import" in text
        assert "random" in FL_METHODS and len(run.list_results("fl_result")) == 1
    finally:
        sys.path.remove(str(site))
        del os.environ["VITFL_PLUGINS"]
        FL_METHODS.refresh()


CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("extra, data, message", [
    (["--ckpt_path", "last"], "configs/data/digits.yaml", "no checkpoint at"),
    ([], "configs/data/cifar100.yaml", "cifar-100-python"),
])
def test_training_cli_failures_end_with_one_paragraph(extra, data, message, tmp_path, capsys):
    """Old behaviour: scripts/train.py ended a missing resume checkpoint (FitOptionError) and a missing data root
    (DatasetFormatError) with a LightningCLI traceback."""
    train = script("train")
    argv = ["fit", "--config", str(REPO / data), *[a for c in CONFIGS[1:] for a in ("--config", str(REPO / c))],
            "--trainer.default_root_dir", str(tmp_path / "run"), *extra]
    if "cifar100" in data:
        argv += ["--data.init_args.root", str(tmp_path / "no_data")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 1
    msg = one_paragraph_error(capsys.readouterr().err, "train")
    assert message in msg and str(tmp_path) in msg, msg


def test_the_script_itself_prints_one_paragraph_and_exits_1(run):
    """The real command line (a process, not main() in this one): a truncated repair result under
    --aggregate_only. Old behaviour: a ResultError traceback."""
    from vitfl.pipeline.repair import run_sweep

    run_sweep([run.root], ["random"], ["all"], [6], 1, repair_options=DE, progress=False, on_error="raise")
    path = _truncate(run.abs(run.list_results("repair_result")[0]["path"]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("VITFL_DEBUG", None)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "repair_sweep.py"), "--run_dirs", str(run.root),
                          "--aggregate_only"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    msg = one_paragraph_error(out.stderr, "repair_sweep")
    assert str(path) in msg


# ------------------------------------------------------------------------------------------- 7. orphaned workers
def sleepy_task(pid_dir: str, shard) -> list:
    """A sharded task of the kill test: records its pid, then sleeps (a worker busy with a long repair run)."""
    Path(pid_dir, f"{os.getpid()}.pid").write_text(str(list(shard)))
    time.sleep(120)
    return [list(shard)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited (no reaper in some containers)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_workers_die_with_their_killed_parent(tmp_path):
    """Old behaviour: kill -9 of a ``--workers 2`` sweep left the 2 spawned workers (and the resource tracker)
    alive, finishing every task and then idling."""
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
        from vitfl.pipeline.parallel import run_sharded
        import test_reliability_cli as t
        run_sharded(t.sleepy_task, {{"pid_dir": {str(tmp_path)!r}}}, workers=2, threads=1)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    started: list[int] = []
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert parent.poll() is None and time.time() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        started = sorted(set(workers) | set(_children(parent.pid)))  # the workers and the resource tracker
        assert set(workers) <= set(started) and all(_alive(p) for p in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        deadline = time.time() + 5
        while any(_alive(p) for p in started) and time.time() < deadline:
            time.sleep(0.1)
        assert [p for p in started if _alive(p)] == [], "workers outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in started:  # only the processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
