"""A layer study: FL + repair on several transformer blocks, tabulated per block.

* the experiment config's top-level ``blocks`` is checked before any work (a bad value names the key and the
  expected type; duplicates and a clash with ``cache.block`` / ``localize.block`` are errors), and the published
  configs (``layer_study_mnist.yaml`` and its quick overlay) pass;
* the runner calls each per-block step (cache, localize, evaluate_fl, repair, crossval) once per block with that
  ``block`` (the step functions monkeypatched), and a config without ``blocks`` calls them exactly as before (no
  ``block`` keyword where none was given);
* the per-block table pools counts per (data set, source, repair, FL method, budget, block) with Wilson intervals, and
  a block with no target is "n/a (no targets)" (counted), never 0; results without a ``block`` column are the last
  block;
* ``fl/timing.csv`` names the block, and a log written before that column still reads (and gains it on the next
  row);
* ``token_statistic`` reaches the head and the FL identity, and is refused on the last-block CLS head.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vitfl.core.runstore import RunStore
from vitfl.pipeline import experiment as E

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiment"


def _base(tmp_path: Path, **extra) -> dict:
    cfg = {"name": "ls", "variant": "corrected", "datasets": {"d": {"run_dir": str(tmp_path / "run")}},
           "steps": ["cache", "localize", "evaluate_fl", "repair", "crossval", "aggregate"],
           "localize": {"methods": ["random", "ours"], "budgets": [6]},
           "repair": {"sweeps": [{"name": "de", "repair": "de", "methods": ["random"], "budgets": [6], "reps": 1}]},
           "crossval": {"methods": ["random"], "budgets": [6]}}
    cfg.update(extra)
    return cfg


def _overlay(base: dict, over: dict) -> dict:
    """The command line's --config merge: step blocks option by option; datasets, evaluate_fl and lists whole."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("datasets", "evaluate_fl"):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------- config checks
def test_published_layer_study_configs_check():
    main = yaml.safe_load((CONFIGS / "layer_study_mnist.yaml").read_text())
    quick = _overlay(main, yaml.safe_load((CONFIGS / "layer_study_mnist_quick.yaml").read_text()))
    for cfg in (main, quick):
        steps = E.check_experiment(cfg)
        assert {"localize", "evaluate_fl", "repair", "crossval", "aggregate"} <= set(steps)
        assert len(E.experiment_blocks(cfg)) >= 2
        assert len(cfg["datasets"]) == 2  # the class-token and the average-pooled model
    pools = {name: yaml.safe_load((ROOT / d["train"]["pretrain"]["configs"][1]).read_text())
             for name, d in main["datasets"].items()}
    assert pools["mnist_avg"]["model"]["backbone_kwargs"]["global_pool"] == "avg"
    fine = yaml.safe_load((ROOT / main["datasets"]["mnist_avg"]["train"]["configs"][1]).read_text())
    assert fine["model"]["backbone_kwargs"]["global_pool"] == "avg"  # pretrained and fine-tuned as avg
    assert E.experiment_blocks(yaml.safe_load((CONFIGS / "main_job_mnist.yaml").read_text())) is None


@pytest.mark.parametrize("value, match", [
    (3, r"blocks must be a list of ints, got int 3"),
    (["0", "-1"], r"blocks must be a list of ints, got list"),
    ([0.5], r"blocks must be a list of ints"),
    ([True], r"blocks must be a list of ints"),
    ([], r"blocks must be a non-empty list of ints"),
    ([0, 1, 0], r"blocks: \[0\] given more than once"),
])
def test_bad_blocks_named(tmp_path, value, match):
    with pytest.raises(E.ExperimentConfigError, match=match):
        E.check_experiment(_base(tmp_path, blocks=value))


def test_blocks_and_one_block_options_clash(tmp_path):
    E.check_experiment(_base(tmp_path, blocks=[0, -1]))
    cfg = _base(tmp_path, blocks=[0, -1])
    cfg["localize"]["block"] = 0
    with pytest.raises(E.ExperimentConfigError, match=r"either blocks .* or localize.block"):
        E.check_experiment(cfg)
    cfg = _base(tmp_path, blocks=[0], cache={"block": 1})
    with pytest.raises(E.ExperimentConfigError, match=r"cache.block"):
        E.check_experiment(cfg)


def test_token_statistic_option_checked(tmp_path):
    cfg = _base(tmp_path, steps=["cache", "localize"])
    cfg["localize"]["token_statistic"] = "mean"
    E.check_experiment(cfg)
    cfg["localize"]["token_statistic"] = "median"
    with pytest.raises(E.ExperimentConfigError, match=r"token_statistic: 'median' is not one of"):
        E.check_experiment(cfg)
    cfg["localize"]["token_statistic"] = 1
    with pytest.raises(E.ExperimentConfigError, match=r"localize.token_statistic must be a string"):
        E.check_experiment(cfg)
    cfg = _base(tmp_path)  # the later steps would not find FL results made with another statistic
    cfg["localize"]["token_statistic"] = "cls"
    with pytest.raises(E.ExperimentConfigError, match=r"token_statistic='cls' with steps"):
        E.check_experiment(cfg)
    cfg["localize"]["token_statistic"] = "readout"
    E.check_experiment(cfg)


# --------------------------------------------------------------------------------------------- the runner
@pytest.fixture
def calls(monkeypatch):
    """Every per-block step function replaced by a recorder; the aggregate and the report too."""
    import vitfl.pipeline.cache as cache
    import vitfl.pipeline.context as context
    import vitfl.pipeline.crossval as crossval
    import vitfl.pipeline.evaluate_fl as evaluate_fl
    import vitfl.pipeline.localize as localize
    import vitfl.pipeline.repair as repair
    import vitfl.pipeline.report as report

    log: list[tuple[str, dict]] = []

    def rec(name, ret):
        def f(*args, **kw):
            log.append((name, kw))
            return ret(kw) if callable(ret) else ret
        return f

    monkeypatch.setattr(cache, "step_cache", rec("cache", {"done": 1, "skipped": 0}))
    monkeypatch.setattr(context, "load_misclf", lambda store: {"settings": {"all": {}}, "skipped": {}})
    monkeypatch.setattr(localize, "run_localization",
                        rec("localize", lambda kw: [{"method": m, "setting": "all", "status": "done"}
                                                    for m in kw["methods"]]))
    monkeypatch.setattr(localize, "status_table", lambda rows: "")
    monkeypatch.setattr(evaluate_fl, "run_evaluation", rec("evaluate_fl", {}))
    monkeypatch.setattr(repair, "run_sweep", rec("repair", []))
    monkeypatch.setattr(crossval, "step_crossval", rec("crossval", []))
    monkeypatch.setattr(repair, "aggregate", rec("aggregate", {"n_runs": 0}))
    monkeypatch.setattr(E, "write_block_summary", rec("by_block", {"markdown": "", "files": []}))
    monkeypatch.setattr(report, "write_report", lambda store, cfg: store.root / "report.md")
    return log


def _blocks_of(log, step):
    return [kw.get("block", "absent") for name, kw in log if name == step]


def test_runner_runs_each_per_block_step_once_per_block(tmp_path, calls):
    cfg = _base(tmp_path, blocks=[0, 2, -1])
    out = E.run_experiment(cfg, log=lambda s: None)
    # the cache: the last block's cache (no block: the CLS cache, as before) and each other block's token cache
    assert _blocks_of(calls, "cache") == ["absent", 0, 2]
    # localize: once per block and method (the runner calls run_localization per method)
    assert _blocks_of(calls, "localize") == [0, 0, 2, 2, -1, -1]
    assert _blocks_of(calls, "evaluate_fl") == [0, 2, -1]
    assert _blocks_of(calls, "repair") == [0, 2, -1]
    assert _blocks_of(calls, "crossval") == [0, 2, -1]
    assert [n for n, _ in calls].count("by_block") == 1  # the aggregate step tabulates per block once
    assert [n for n, _ in calls].count("aggregate") == 1
    steps = [r["step"] for r in out["summary"]]
    assert "localize (block 2)" in steps and "crossval (block -1)" in steps and "repair de (block 0)" in steps


def test_runner_without_blocks_is_unchanged(tmp_path, calls):
    E.run_experiment(_base(tmp_path), log=lambda s: None)
    assert _blocks_of(calls, "cache") == ["absent"]
    assert _blocks_of(calls, "localize") == ["absent", "absent"]
    for step in ("evaluate_fl", "repair", "crossval"):  # the step functions get no block keyword at all
        assert _blocks_of(calls, step) == ["absent"], step
    assert "by_block" not in [n for n, _ in calls]
    calls.clear()
    cfg = _base(tmp_path, cache={"block": 1})  # one block for FL alone, as before `blocks`
    cfg["localize"]["block"] = 1
    E.run_experiment(cfg, log=lambda s: None)
    assert _blocks_of(calls, "cache") == ["absent", 1]
    assert _blocks_of(calls, "localize") == [1, 1]
    assert _blocks_of(calls, "repair") == ["absent"]


# --------------------------------------------------------------------------------------------- the table
def _runs(rows):
    keys = ("dataset", "repair", "fl_method", "budget", "block", "n_targets", "n_fixed", "n_correct_before",
            "n_broken")
    return pd.DataFrame([dict(zip(keys, r), n_weights=66) for r in rows])


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def test_block_table_pools_counts_with_wilson_intervals():
    nan = float("nan")
    runs = _runs([("d", "de", "ours", "66", 0, 10, 4, 100, 2),
                  ("d", "de", "ours", "66", 0, 6, 3, 90, 1),
                  ("d", "de", "ours", "66", 2, 0, 0, 95, 5),      # block 2 (the last): no target in either run
                  ("d", "de", "ours", "66", nan, 0, 0, 80, 0),    # no block recorded: the last block
                  ("d", "de", "random", "66", -1, 5, 1, 50, 10)])  # -1: the last block too (3 blocks)
    cv = _runs([("d", "lp", "ours", "66", 0, 20, 15, 200, 4), ("d", "de", "ours", "66", -1, 8, 2, 40, 1)])
    t = E.block_table(runs, cv, {"d": 3})
    ours0 = t[(t.source == "repair") & (t.fl_method == "ours") & (t.block == 0)].iloc[0]
    assert (ours0.runs, ours0.n_targets, ours0.n_fixed, ours0.n_correct, ours0.n_broken) == (2, 16, 7, 190, 3)
    assert ours0.rr == pytest.approx(7 / 16) and ours0.br == pytest.approx(3 / 190)
    assert (ours0.rr_lo, ours0.rr_hi) == pytest.approx(_wilson(7, 16), abs=1e-9)
    assert (ours0.br_lo, ours0.br_hi) == pytest.approx(_wilson(3, 190), abs=1e-9)
    ours2 = t[(t.source == "repair") & (t.fl_method == "ours") & (t.block == 2)].iloc[0]
    assert ours2.block_label == "2 (last)"
    assert (ours2.runs, ours2.n_targets, ours2.runs_without_target) == (2, 0, 2)  # NaN block and block 2: one
    assert math.isnan(ours2.rr) and math.isnan(ours2.rr_lo)  # no target: no rate, not 0
    assert ours2.br == pytest.approx(5 / 175)
    rnd = t[(t.source == "repair") & (t.fl_method == "random")].iloc[0]
    assert rnd.block == 2 and rnd.n_targets == 5
    lp = t[(t.source == "crossval") & (t.repair == "lp")].iloc[0]
    assert lp.metric == "repairability@N" and lp.rr == pytest.approx(0.75) and lp.block == 0
    md = E.block_markdown(t)
    assert "n/a (no targets)" in md
    assert "0.438 [" in md and "(7/16)" in md
    assert "2 of 2" in md  # the runs without a target, counted
    assert "Repairability@N" in md
    lp_line = next(x for x in md.splitlines() if x.startswith("| d | lp | ours"))
    assert "0.750 [" in lp_line and "(15/20)" in lp_line and "(4/200)" in lp_line  # repairability@N and its BR
    de_cv = next(x for x in md.splitlines() if x.startswith("| d | de | ours") and "(2/8)" in x)
    assert "2 (last)" in de_cv
    # a block the cross-validated repair reached without LP rows is named, not left blank
    assert "Repairability@N (`lp`) is not applicable on d block 2 (last)" in md
    line = next(x for x in md.splitlines() if "2 (last)" in x and "ours" in x and "| de " in x)
    assert "| 0.000" not in line
    for i, x in enumerate(md.splitlines()):  # every table follows a line stating its split and n (check_report)
        if x.startswith("|") and not md.splitlines()[i - 1].startswith("|"):
            intro = md.splitlines()[i - 2]
            assert "split:" in intro and "n:" in intro


def test_block_table_without_block_column_is_the_last_block():
    runs = _runs([("d", "de", "ours", "66", 0, 4, 1, 10, 0)]).drop(columns="block")
    t = E.block_table(runs, None, {"d": None})
    assert t.block.tolist() == [-1] and t.block_label.tolist() == ["-1 (last)"]
    t = E.block_table(runs, None, {"d": 4})
    assert t.block.tolist() == [3] and t.block_label.tolist() == ["3 (last)"]
    empty = E.block_table(None, None)
    assert empty.empty and "No repair results" in E.block_markdown(empty)


def test_block_figure_draws_rates_and_says_nothing_when_empty(tmp_path):
    from vitfl.core import style

    runs = _runs([("d", "de", "ours", "66", 0, 10, 4, 100, 2), ("d", "de", "ours", "66", 1, 0, 0, 100, 2),
                  ("d", "de", "random", "66", 0, 10, 1, 100, 2), ("d", "de", "random", "66", 1, 10, 2, 100, 2)])
    fig = E.block_figure(E.block_table(runs, None, {"d": 2}), "d")
    assert style.is_nothing_to_plot(fig) is None
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1 (last)"]
    assert any(t.get_text() == "n/a" for t in ax.texts)  # ours on block 1 had no target
    made = style.save_figure(fig, tmp_path / "rr_by_block")
    assert [p.suffix for p in made] == [".png", ".pdf"]
    assert style.is_nothing_to_plot(E.block_figure(E.block_table(None, None)))


# --------------------------------------------------------------------------------------------- timing log
def test_timing_log_gains_a_block_column_and_old_logs_read(tmp_path):
    from vitfl.pipeline.localize import read_fl_timing

    store = RunStore(tmp_path)
    store.fl_timing.parent.mkdir(parents=True)
    store.fl_timing.write_text("method,setting,scores_key,wall_s\nours,all,abc,0.5\n")  # a log before the column
    old, problems = read_fl_timing(store)
    assert problems == [] and "block" in old.columns and old["block"].isna().all()
    assert old.loc[0, "wall_s"] == 0.5
    store.append_row(store.fl_timing, {"method": "ig", "setting": "all", "block": 0, "scores_key": "d",
                                       "wall_s": 1.5}, widen=True)
    df, problems = read_fl_timing(store)
    assert problems == []
    assert list(df.columns) == ["method", "setting", "scores_key", "wall_s", "block"]
    assert df["method"].tolist() == ["ours", "ig"] and df["wall_s"].tolist() == [0.5, 1.5]
    assert math.isnan(df.loc[0, "block"]) and df.loc[1, "block"] == 0
    store.append_row(store.fl_timing, {"method": "random", "setting": "all", "block": 2, "scores_key": "e",
                                       "wall_s": 2.0}, widen=True)
    df, _ = read_fl_timing(store)
    assert df["block"].tolist()[1:] == [0, 2] and len(df) == 3
    assert not list(tmp_path.rglob("*.tmp"))
    new = RunStore(tmp_path / "new")  # a new log has the column from its first row
    new.append_row(new.fl_timing, {"method": "ours", "setting": "all", "block": 1, "wall_s": 1.0}, widen=True)
    assert read_fl_timing(new)[0]["block"].tolist() == [1]


# --------------------------------------------------------------------------------------------- token statistic
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch tiny digits run (HF ViT, 2 blocks) with the repair split's CLS and block-0 caches and settings."""
    from conftest import HF_KW, _fit_tiny_run
    from vitfl.pipeline.cache import step_cache
    from vitfl.pipeline.misclf import step_misclf

    root = tmp_path_factory.mktemp("layer_run")
    _fit_tiny_run(root, "hf_vit", epochs=1)
    data = {"class_path": "vitfl.datamodules.digits.DigitsDataModule",
            "init_args": {"batch_size": 32, "eval_batch_size": 128, "seed": 0, "folds_path": str(root / "folds.json")}}
    store = RunStore(root)
    store.run_config.write_text(yaml.safe_dump({"data": data, "model": {"backbone": "hf_vit", "num_classes": 10,
                                                                         "backbone_kwargs": dict(HF_KW)}}))
    kw = {"enable_progress_bar": False}
    step_cache(store, splits=("repair",), trainer_kwargs=kw)
    step_cache(store, splits=("repair",), trainer_kwargs=kw, block=0)
    step_misclf(store, ranks=1)
    return store


def test_token_statistic_reaches_head_identity_and_timing(tiny_run):
    from vitfl.lightning_modules.runs import TokenStatisticError
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import fl_results, read_fl_timing, run_localization

    store = tiny_run
    ctx = RunContext(store, block=0, token_statistic="mean")
    assert ctx.head.token_statistic == "mean"
    assert ctx.view() == {"block": 0, "pooling": "token", "tokens": "all", "token_statistic": "mean"}
    # a timing log written before the block column: kept, and widened by the next FL run
    store.fl_timing.parent.mkdir(parents=True, exist_ok=True)
    store.fl_timing.write_text("method,setting,scores_key,wall_s\nold,all,k,0.1\n")
    rows = run_localization(store, ["random"], ["all"], [6], progress=False, block=0, token_statistic="mean")
    assert rows[0]["status"] == "done"
    heads = [(r["identity"]["scores"].get("head") or {}) for r in fl_results(store, ["random"], ["all"])]
    assert {"block": 0, "pooling": "token", "tokens": "all", "token_statistic": "mean"} in heads
    df, problems = read_fl_timing(store)
    assert problems == [] and df["method"].tolist() == ["old", "random"]
    assert math.isnan(df.loc[0, "block"]) and df.loc[1, "block"] == 0
    # the default statistic is another identity (found apart, not reused)
    run_localization(store, ["random"], ["all"], [6], progress=False, block=0)
    stats = {(r["identity"]["scores"].get("head") or {}).get("token_statistic")
             for r in fl_results(store, ["random"], ["all"])}
    assert {"mean", "readout"} <= stats
    # the last-block CLS head: readout and cls are the CLS head (no "head" in the identity), mean is refused
    assert RunContext(store, token_statistic="cls").view() == {}
    assert RunContext(store, block=1, token_statistic="cls").view() == {}
    for block in (-1, 1):
        with pytest.raises(TokenStatisticError, match=r"token_statistic='mean' on the last block of a class-token"):
            RunContext(store, block=block, token_statistic="mean")
    with pytest.raises(TokenStatisticError, match=r"unknown token_statistic 'median'"):
        RunContext(store, block=0, token_statistic="median")
    df, _ = read_fl_timing(store)
    assert df["block"].tolist()[1:] == [0, 0]


def test_layer_study_configs_round_trip_through_the_command_line(tmp_path):
    """The command line knows every key of the layer study's configs (blocks, localize.token_statistic, ...): nothing
    dropped, --print_config reloads to the same config, and the overlay gives the smoke run's blocks."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("run_experiment_ls", ROOT / "scripts" / "run_experiment.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    main, quick = CONFIGS / "layer_study_mnist.yaml", CONFIGS / "layer_study_mnist_quick.yaml"
    for args in (["--config", str(main)], ["--config", str(main), "--config", str(quick)]):
        p = run.build_parser()
        ns = p.parse_args(args)
        cfg = run.experiment_dict(ns)
        again = tmp_path / "again.yaml"
        again.write_text(p.dump(ns, skip_none=False))
        assert run.experiment_dict(run.build_parser().parse_args(["--config", str(again)])) == cfg
        raw = yaml.safe_load(main.read_text())
        assert set(raw) <= set(cfg)
        E.check_experiment(cfg)
    assert cfg["blocks"] == [0, -1] and cfg["datasets"]["mnist_avg"]["train"]["pretrain"]["epochs"] == 3
    ns = run.build_parser().parse_args(["--config", str(main), "--localize.token_statistic", "mean",
                                        "--steps", "[train, cache, misclf, localize]"])
    assert run.experiment_dict(ns)["localize"]["token_statistic"] == "mean"


def test_report_shows_the_per_block_section(tmp_path):
    """The report's own section: the per-block tables (each stating split and n) and the figure, links resolving."""
    from vitfl.core import style
    from vitfl.pipeline.report import check_report, write_report

    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    folder = store.path("repair_summary", name="ls_corrected")
    runs = _runs([("d", "de", "ours", "66", 0, 10, 4, 100, 2), ("d", "de", "ours", "66", -1, 0, 0, 100, 2)])
    t = E.block_table(runs, None, {"d": 3})
    store.write_text(store.summary_file("by_block", folder, "csv"), t.to_csv(index=False))
    store.write_text(store.summary_file("by_block", folder, "md"), "# Repair per transformer block\n\n"
                     + E.block_markdown(t))
    style.save_figure(E.block_figure(t, "d"), store.summary_file("by_block_figure", folder), writer=store.save_figure)
    assert store.path("repair_by_block", name="ls_corrected", ext="md").is_file()  # the layout entry names it
    md = write_report(store).read_text()
    assert "## Repair per transformer block: ls_corrected" in md
    assert "rr_by_block.png" in md and "n/a (no targets)" in md and "2 runs, 2 blocks" in md
    assert check_report(store.path("report", name="report.md")) == []
