"""configs/experiment/*.yaml: every file loads, round-trips through --print_config, names only options that exist,
has its twin; a shrunk digits experiment runs end to end through scripts/run_experiment.py and a rerun skips
everything (slow suite)."""
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXP_DIR = REPO / "configs" / "experiment"
#: the published experiments (each with its twins); the main job's configs are tested on their own below, the layer
#: study's (no published counterpart) in tests/test_layer_study.py
FILES = sorted(f for f in EXP_DIR.glob("*.yaml") if not f.stem.startswith(("main_job", "layer_study")))
MAIN_JOB = EXP_DIR / "main_job_mnist.yaml"
EXPERIMENTS = ("exp_fl_2", "exp_fl_3", "exp_fl_5", "exp_repair_4", "deepimportance")


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("run_experiment", REPO / "scripts" / "run_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUN = _script()


def load(path, *extra):
    p = RUN.build_parser()
    return p, p.parse_args(["--config", str(path), *extra])


def _assert_within(raw, parsed, where):
    """Every value the YAML sets is in the parsed config unchanged (the parser adds defaults only)."""
    if isinstance(raw, dict):
        assert isinstance(parsed, dict), where
        for k, v in raw.items():
            assert k in parsed, f"{where}.{k} dropped"
            _assert_within(v, parsed[k], f"{where}.{k}")
    else:
        assert raw == parsed, where


def test_every_experiment_has_vit_and_digits_files_and_a_corrected_twin():
    names = {f.stem for f in FILES}
    for e in EXPERIMENTS:
        for stem in (e, f"{e}_corrected", f"{e}_digits", f"{e}_digits_corrected"):
            assert stem in names, f"configs/experiment/{stem}.yaml missing"
    assert len(FILES) == 4 * len(EXPERIMENTS), sorted(names)


@pytest.mark.parametrize("overlays", [[], ["main_job_mnist_quick"], ["main_job_digits"]],
                         ids=["main_job", "quick", "digits"])
def test_the_main_job_is_an_experiment_config_with_overlays(overlays, tmp_path):
    """main_job_mnist.yaml (+ an overlay) passes every check of the runner, runs every step and the report's steps,
    and main_job.py stands for exactly that run_experiment.py command line; --run_dir replaces the run directory."""
    from vitfl.pipeline.experiment import STEPS, check_experiment

    extra = [a for o in overlays for a in ("--config", str(EXP_DIR / f"{o}.yaml"))]
    parser, ns = load(MAIN_JOB, *extra, "--run_dir", str(tmp_path / "r"))
    cfg = RUN.experiment_dict(ns)
    assert check_experiment(cfg) == [s for s in STEPS if s != "adequacy"]
    (name, ds), = cfg["datasets"].items()
    assert ds["run_dir"] == str(tmp_path / "r") and ds["train"]["test"] is True
    if overlays == ["main_job_digits"]:
        assert name == "digits" and "pretrain" not in ds["train"] and ds["train"]["epochs"] == 40
    else:
        assert name == "mnist" and ds["train"]["pretrain"]["epochs"] == (3 if overlays else 30)
    quick = overlays == ["main_job_mnist_quick"]
    assert cfg["evaluate_fl"].get("quick", False) is quick and cfg["coverage"]["quick"] is quick
    assert [sw["reps"] for sw in cfg["repair"]["sweeps"]] == ([1, 1, 1] if quick else [2, 1, 1])
    assert cfg["crossval"]["budgets"] == (["0.1%"] if quick else ["0.5%"])
    sys.path.insert(0, str(REPO / "scripts"))
    import main_job

    argv = main_job.runner_args([*(["--quick"] if quick else []),
                                 *(["--testbed", "digits"] if overlays == ["main_job_digits"] else []), "--x", "1"])
    assert argv == ["--config", str(MAIN_JOB), *extra, "--root", str(REPO), "--x", "1"]
    with pytest.raises(SystemExit):
        main_job.runner_args(["--quick", "--testbed", "digits"])
    skip = main_job.runner_args(["--skip", "repair", "coverage"])
    assert skip[skip.index("--only") + 1:skip.index("--root")] == [s for s in cfg["steps"] if s not in
                                                                   ("repair", "coverage")]


def test_run_dir_needs_one_dataset(tmp_path):
    _, ns = load(EXP_DIR / "exp_repair_4.yaml", "--run_dir", str(tmp_path))
    with pytest.raises(ValueError, match="one data set"):
        RUN.experiment_dict(ns)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_config_loads_round_trips_and_names_existing_options(path, tmp_path):
    from vitfl.lightning_modules.repair import REPAIRS
    from vitfl.localization.base import FL_METHODS
    from vitfl.localization.misclf import ALL_KINDS, NO_TRUE_INPUT_RULES, TIE_ORDERS
    from vitfl.pipeline.adequacy import RQS
    from vitfl.pipeline.evaluate_fl import run_evaluation
    from vitfl.pipeline.experiment import STEPS, check_experiment

    parser, ns = load(path)
    cfg = RUN.experiment_dict(ns)
    # --print_config round trip: print, reload, equal
    printed = parser.dump(ns, skip_none=False)
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert RUN.experiment_dict(load(again)[1]) == cfg
    # the YAML's own keys are all known to the parser (nothing silently dropped)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(cfg), set(raw) - set(cfg)
    _assert_within(raw, cfg, path.name)
    check_experiment(cfg)
    assert cfg["variant"] == ("corrected" if path.stem.endswith("corrected") else "published")
    assert all(s in STEPS for s in cfg["steps"])

    # every option name exists, checked here against the registries directly (not through check_experiment)
    def fl(methods, options=None):
        for m in methods or []:
            assert m in FL_METHODS.names(), f"{path.name}: FL method {m!r} not registered"
        for m, opts in (options or {}).items():
            known = FL_METHODS.options(m)
            assert set(opts) <= set(known), f"{path.name}: {m} has no option(s) {set(opts) - set(known)}"

    loc = cfg.get("localize") or {}
    fl(loc.get("methods"), loc.get("method_options"))
    ev = cfg.get("evaluate_fl") or {}
    fl(ev.get("methods"), ev.get("method_opts"))
    params = set(inspect.signature(run_evaluation).parameters) | {"ckpt_epoch"}
    assert set(ev) <= params, set(ev) - params
    for sw in (cfg.get("repair") or {}).get("sweeps") or []:
        fl(sw["methods"], sw.get("fl_options"))
        assert sw["repair"] in REPAIRS.names()
        known = REPAIRS.options(sw["repair"])
        assert set(sw.get("repair_options") or {}) <= set(known), (path.name, sw.get("repair_options"))
        for b in sw["budgets"]:
            assert (isinstance(b, int) and b > 0) or b in ("avg", "front")
    m = cfg["misclf"]
    assert m["tie_order"] in TIE_ORDERS and m["no_true_input"] in NO_TRUE_INPUT_RULES
    assert set(m["kinds"]) <= set(ALL_KINDS)
    assert set((cfg.get("adequacy") or {}).get("rqs") or []) <= set(RQS)

    # every published-compat entry is set in the config, and a corrected twin lists none
    def lookup(dotted):
        node = cfg
        for part in dotted.split("."):
            if isinstance(node, list):  # repair.sweeps.<name>
                node = next(s for s in node if s.get("name") == part)
            else:
                assert part in node, f"{path.name}: compat entry {dotted!r} is not set"
                node = node[part]
        return node

    for entry in cfg["compat"]:
        key, _, value = entry.partition("=")
        got = lookup(key)
        want = yaml.safe_load(value) if "," not in value else value.split(",")
        if isinstance(got, list) and isinstance(want, list):
            assert set(want) <= set(got), (entry, got)
        elif isinstance(got, list):
            assert want in got, (entry, got)
        else:
            assert got == want, (entry, got)
    if cfg["variant"] == "published":
        assert cfg["compat"], f"{path.name}: a published variant must name its compat options"
    else:
        assert cfg["compat"] == []


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("digits", [False, True])
def test_twins_share_the_protocol(name, digits):
    """Published and corrected differ in options, never in the protocol: data sets, steps, settings, budgets,
    repetitions, generations and alpha are the same."""
    stem = name + ("_digits" if digits else "")
    pub = RUN.experiment_dict(load(EXP_DIR / f"{stem}.yaml")[1])
    cor = RUN.experiment_dict(load(EXP_DIR / f"{stem}_corrected.yaml")[1])
    assert pub["datasets"].keys() == cor["datasets"].keys() and pub["steps"] == cor["steps"]
    assert pub["misclf"]["kinds"] == cor["misclf"]["kinds"]
    for key in ("settings", "budgets"):
        assert pub["localize"].get(key) == cor["localize"].get(key), key
    for a, b in zip(pub["repair"]["sweeps"], cor["repair"]["sweeps"]):
        for key in ("repair", "settings", "budgets", "reps", "seed"):
            assert a.get(key) == b.get(key), key
        for key in ("generations", "alpha", "pop_size"):
            assert (a.get("repair_options") or {}).get(key) == (b.get("repair_options") or {}).get(key), key


def test_exp_repair_4_is_the_published_protocol():
    for stem in ("exp_repair_4", "exp_repair_4_corrected"):
        cfg = RUN.experiment_dict(load(EXP_DIR / f"{stem}.yaml")[1])
        (sw,) = cfg["repair"]["sweeps"]
        assert sw["settings"] == [f"{k}_r{r}" for k in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3)]
        assert sw["budgets"] == [236, 472, 944] and sw["reps"] == 5
        assert sw["repair_options"]["alpha"] == 10 and sw["repair_options"]["generations"] == 50
        assert len(sw["methods"]) == 3 and "random" in sw["methods"]
        assert set(cfg["datasets"]) == {"c100", "tiny_imagenet"}
        for d in cfg["datasets"].values():
            assert d["train"]["epochs"] == 2 and "configs/model/vit_b16_hf.yaml" in d["train"]["configs"]


@pytest.mark.parametrize("override, message", [
    (["--localize.methods", "[nope]"], "nope"),
    (["--localize.budgets", "[0]"], "budget 0"),
    (["--misclf.tie_order", "sideways"], "tie_order"),
    (["--repair.sweeps", "[{name: de, repair: de, methods: [random], budgets: [5], reps: 1, "
                         "repair_options: {generationz: 3}}]"], "generationz"),
    (["--steps", "[train, polish]"], "polish"),
    (["--shard", "3/3"], "0 <= k < n"),
    (["--variant", "improved"], "variant must be"),
    (["--compat", "[misclf.nope=1]"], "misclf.nope"),
])
def test_bad_values_exit_non_zero_with_a_clear_message(override, message, capsys):
    with pytest.raises(SystemExit) as e:
        RUN.main(["--config", str(EXP_DIR / "exp_repair_4_digits_corrected.yaml"), *override])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err + str(e.value.code)
    assert message in err, err[-2000:]


def test_sharded_run_refuses_unsharded_steps():
    from vitfl.pipeline.experiment import ExperimentConfigError, run_experiment

    cfg = RUN.experiment_dict(load(EXP_DIR / "exp_repair_4_digits.yaml")[1])
    with pytest.raises(ExperimentConfigError, match="not sharded"):
        run_experiment(cfg, steps=["prepare", "work"], shard="1/4", log=lambda m: None)


# ------------------------------------------------------------------------------------------------ end to end
def _counts(out: str, step: str) -> dict[str, int]:
    m = re.search(rf"^{re.escape(step)} \[digits\]: (.*)$", out, re.M)
    assert m, f"no '{step}' line in:\n{out[-3000:]}"
    return {k: int(v) for v, k in re.findall(r"(\d+) (done|skipped|not applicable|failed)", m.group(1))}


@pytest.mark.slow
def test_shrunk_digits_exp_repair_4_end_to_end_and_rerun_skips(tmp_path):
    """exp-repair-4 digits, shrunk (a 1-epoch fit of 2 batches, 2 settings, 1 budget, 1 repetition, 3 generations),
    through the one command; the rerun does no work."""
    run_dir = tmp_path / "digits"
    over = tmp_path / "shrink.yaml"
    over.write_text(yaml.safe_dump({
        "datasets": {"digits": {"run_dir": str(run_dir), "train": {
            "configs": ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"],
            "args": ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     "--trainer.enable_progress_bar=false"], "epochs": 1}}},
        "localize": {"settings": ["src_tgt_r1", "tgt_fp_r1"], "budgets": [33]},
        "repair": {"sweeps": [{"name": "de", "repair": "de", "methods": ["ours_reptran", "arachne_w_reptran", "random"],
                               "settings": ["src_tgt_r1", "tgt_fp_r1"], "budgets": [33], "reps": 1, "seed": 0,
                               "repair_options": {"alpha": 10.0, "generations": 3, "pop_size": 10,
                                                  "fitness": "reptran", "loss": "softmax_ce", "update": "immediate",
                                                  "early_stop": "published", "best": "first"}}],
                   "accelerator": "cpu"},
    }))
    cmd = [sys.executable, str(REPO / "scripts" / "run_experiment.py"), "--config",
           str(EXP_DIR / "exp_repair_4_digits.yaml"), "--config", str(over), "--root", str(REPO)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=1800, env=env)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert _counts(out, "train")["done"] == 1
    loc = _counts(out, "localize")
    # 3 methods x 2 settings; a setting the analysis could not build (or a method that cannot run on it) is
    # counted as not applicable and printed once
    assert loc["done"] + loc.get("not applicable", 0) == 3 * 2 and loc.get("failed", 0) == 0 and loc["done"] >= 2
    assert ("recorded, not retried" in out) == bool(loc.get("not applicable"))
    rep = _counts(out, "repair de")
    assert rep["done"] + rep.get("not applicable", 0) == 3 * 2 and rep["done"] >= 1
    assert "Tip:" not in out and "GPU available" not in out
    assert "repair 0/1" in first.stderr  # the sweep shows its progress bar (tqdm, with an ETA)
    from vitfl.core.runstore import RunStore

    store = RunStore(run_dir)
    results = store.list_results("repair_result")
    assert len(results) == rep["done"]
    for r in results:
        opts = r["identity"]["repair_options"]
        assert (opts["generations"], opts["fitness"], opts["update"]) == (3, "reptran", "immediate")
    assert (store.path("repair_summary", name="exp_repair_4_published") / "summary.md").is_file()
    saved = yaml.safe_load(store.path("report", name="experiments/exp_repair_4_published.yaml").read_text())
    assert saved["repair"]["sweeps"][0]["repair_options"]["generations"] == 3  # the config as run
    from vitfl.pipeline.experiment import experiment_results
    from vitfl.pipeline.repair import run_sweep

    cfg = RUN.experiment_dict(load(EXP_DIR / "exp_repair_4_digits.yaml", "--config", str(over))[1])
    assert {r["key"] for r in experiment_results(cfg, store)} == {r["key"] for r in results}
    other = run_sweep({"digits": run_dir}, ["random"], ["src_tgt_r1"], [33], 1, progress=False,
                      repair_options={"generations": 2, "pop_size": 10})  # another configuration in the same run
    assert [r["status"] for r in other] == ["done"]
    assert {r["key"] for r in experiment_results(cfg, store)} == {r["key"] for r in results}

    second = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=900, env=env)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    for step in ("train", "cache", "misclf", "localize", "repair de"):
        c = _counts(out2, step)
        assert c["done"] == 0 and c["skipped"] >= 1, (step, c)
    assert "recorded, not retried" not in out2  # known not-applicable cases are counted, not re-printed
    assert len(store.list_results("repair_result")) == len(results) + 1

    # the run moved to another folder: every step finds its results ("skipped"), nothing stored names the old path
    moved = tmp_path / "elsewhere" / "digits_moved"
    moved.parent.mkdir()
    run_dir.rename(moved)
    third = subprocess.run([*cmd, "--run_dir", str(moved)], capture_output=True, text=True, cwd=str(tmp_path),
                           timeout=900, env=env)
    out3 = third.stdout + third.stderr
    assert third.returncode == 0, out3[-4000:]
    for step in ("train", "cache", "misclf", "localize", "repair de"):
        c = _counts(out3, step)
        assert c["done"] == 0 and c["skipped"] >= 1, (step, c)
    named = [p for p in moved.rglob("*") if p.suffix in (".json", ".yaml", ".csv", ".md", ".txt", ".html")
             and str(tmp_path) in p.read_text(errors="replace")]
    assert named == [], f"files in the run name an absolute path: {named}"


def test_shards_split_the_localize_work_and_a_full_rerun_skips_it(tmp_path, make_classifier):
    """Two shards of the localize step together do each (method, setting) once; the unsharded rerun finds all of it
    in the store. A setting the analysis skipped is counted as not applicable, recorded once, not re-printed."""
    from test_repair_sweep import make_run

    from vitfl.pipeline.experiment import run_experiment

    store, _, info = make_run(tmp_path / "digits", make_classifier)
    settings = sorted(info["settings"])[:2]
    skipped = sorted(info.get("skipped", {}))[:1]
    assert skipped, "the fixture run should have a setting the analysis skipped"
    cfg = RUN.experiment_dict(load(EXP_DIR / "exp_repair_4_digits_corrected.yaml")[1])
    cfg["datasets"] = {"digits": {"run_dir": str(store.root), "train": None}}
    cfg["localize"] = {"methods": ["random", "magnitude"], "settings": settings + skipped, "budgets": [6]}
    logs = []
    rows = []
    for k in range(2):
        out = run_experiment(cfg, steps=["localize"], shard=f"{k}/2", log=logs.append)
        rows += out["summary"]
    assert sum(r["done"] for r in rows) == 2 * len(settings)  # each pair once, over both shards
    assert all(r["error"] == 0 for r in rows)
    keys = [(r["method"], r["setting"]) for r in store.list_results("fl_result")]
    assert sorted(keys) == sorted((m, s) for m in ("random", "magnitude") for s in settings)
    na_lines = [m for m in logs if "recorded, not retried" in m]
    assert len(na_lines) == len(skipped)  # printed by the first shard only
    logs.clear()
    (again,) = run_experiment(cfg, steps=["localize"], log=logs.append)["summary"]
    assert again["done"] == 0 and again["skipped"] == 2 * len(settings)
    assert again["not applicable"] == 2 * len(skipped) and not [m for m in logs if "recorded, not retried" in m]


def test_only_selects_among_the_experiments_own_steps(tmp_path):
    from vitfl.pipeline.experiment import ExperimentConfigError, run_experiment

    cfg = RUN.experiment_dict(load(EXP_DIR / "exp_repair_4_digits.yaml")[1])
    cfg["datasets"] = {"digits": {"run_dir": str(tmp_path / "none"), "train": None}}
    with pytest.raises(ExperimentConfigError, match="not steps of experiment"):
        run_experiment(cfg, steps=["evaluate_fl"], log=lambda m: None)  # exp-repair-4 has no FL evaluation
    logs = []
    out = run_experiment(cfg, steps=["final"], log=logs.append)  # the final phase of exp-repair-4: aggregate only
    assert out["steps"] == ["aggregate"]


def test_checkpoint_epochs_are_a_config_value_checked_before_work(tmp_path, make_classifier):
    """exp-fl-5's pair of epochs comes from the config: a pair the run does not have is a clear error."""
    from test_repair_sweep import make_run

    from vitfl.pipeline.experiment import ExperimentConfigError, run_experiment

    store, _, _ = make_run(tmp_path / "digits", make_classifier)  # one checkpoint, no per-epoch FFN weights
    cfg = RUN.experiment_dict(load(EXP_DIR / "exp_fl_5_digits.yaml")[1])
    assert cfg["evaluate_fl"]["ckpt_epoch"] == 40 and cfg["datasets"]["digits"]["train"]["epochs"] == 40
    cfg["datasets"] = {"digits": {"run_dir": str(store.root), "train": None}}
    with pytest.raises(ExperimentConfigError, match="ckpt_epoch=40"):
        run_experiment(cfg, steps=["evaluate_fl"], log=lambda m: None)


def test_reps_and_generations_shorten_every_search_and_print_config_shows_it(tmp_path, capsys):
    """--reps / --generations (a CPU-sized run of a published protocol) reach every sweep and the cross-validated
    repair, DE only; --print_config prints the experiment as it will run, and that output loads back unchanged."""
    _, ns = load(EXP_DIR / "exp_repair_4_digits.yaml", "--reps", "1", "--generations", "7", "--run_dir",
                 str(tmp_path / "r"))
    cfg = RUN.experiment_dict(ns)
    assert [sw["reps"] for sw in cfg["repair"]["sweeps"]] == [1] * len(cfg["repair"]["sweeps"]) and cfg["crossval"][
        "reps"] == 1
    assert all(sw["repair_options"]["generations"] == 7 for sw in cfg["repair"]["sweeps"] if sw["repair"] == "de")
    assert [r.get("repair_options", {}).get("generations") for r in cfg["crossval"]["repairs"]] == [7, None]
    assert RUN.main(["--config", str(EXP_DIR / "exp_repair_4_digits.yaml"), "--reps", "1", "--generations", "7",
                     "--run_dir", str(tmp_path / "r"), "--print_config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert RUN.experiment_dict(load(printed)[1]) == cfg
    with pytest.raises(ValueError, match="--reps must be >= 1"):
        RUN.experiment_dict(load(EXP_DIR / "exp_repair_4_digits.yaml", "--reps", "0")[1])


def test_two_experiments_in_one_run_keep_their_own_adequacy_results(tmp_path, monkeypatch):
    """A published adequacy config and its corrected twin in one run directory: each writes adequacy/<name>_<variant>/
    with its own markers (before: one adequacy/rq1.done.json, and the twin stopped with "another identity"); a
    rerun of either is skipped."""
    import vitfl.pipeline.adequacy as pa
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.experiment import _adequacy, _Log

    calls = []

    def fake_run_rq(rq, cfg, out_dir, progress=True):
        calls.append((rq, Path(out_dir).name, cfg["idc"]["round_centroids"]))
        f = Path(out_dir) / rq / "table.md"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("# t\n")
        return {"paths": [f]}

    monkeypatch.setattr(pa, "run_rq", fake_run_rq)
    store = RunStore(tmp_path / "run")
    log = _Log(lambda m: None)
    for tag, rounding in (("deep_published", 2), ("deep_corrected", None), ("deep_published", 2)):
        opts = {"rqs": ["rq1"], "use_run_checkpoint": False, "overrides": {"idc": {"round_centroids": rounding}}}
        _adequacy(store, "d", tag, opts, None, (0, 1), REPO, log)
    assert calls == [("rq1", "deep_published", 2), ("rq1", "deep_corrected", None)]  # the third: skipped
    assert (store.path("adequacy_marker", name="deep_published", rq="rq1")).is_file()
    assert (store.path("adequacy_marker", name="deep_corrected", rq="rq1")).is_file()
    assert [s["skipped"] for s in log.summary] == [0, 0, 1]


@pytest.mark.parametrize("path", sorted(EXP_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_states_its_expected_time_on_a_cpu_and_a_gpu(path):
    head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Expected time" in head and "CPU" in head and "GPU" in head, path.name
