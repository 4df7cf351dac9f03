"""The repair sweep through the run store: identities, resuming, shards, N_avg, aggregation, the script."""
import json
import subprocess
import sys

import lightning
import numpy as np
import pytest
import torch

from vitfl.core.io import atomic_write_json, read_json
from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.repair.patch import Patch
from vitfl.core.states import save_states
from vitfl.localization.ffn import capture_ffn_states, last_ffn_head, model_fingerprint
from vitfl.localization.misclf import analyze
from vitfl.pipeline.repair import aggregate, build_grid, collect_results, parse_shard, run_sweep, shard_tasks

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DE = {"pop_size": 6, "generations": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root, make_classifier):
    """A run directory as the pipeline leaves it: a checkpoint, repair and test state caches, misclf_info."""
    model = make_classifier("hf_vit", seed=0)
    store = RunStore(root)
    return store, model, write_model(store, model)


def write_model(store, model):
    """Write ``model`` as the run's checkpoint (replacing one) and redo what the steps before FL do: the repair and
    test state caches and the settings; returns the settings."""
    store.checkpoint(0).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0},
               store.checkpoint(0))
    g = torch.Generator().manual_seed(0)
    info = None
    for split, n, seed in (("repair", 160, 1), ("test", 120, 2)):
        images = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), capture_ffn_states(model) as st:
            logits = model(images)
        pred = logits.argmax(1)
        label = torch.where(torch.rand(n, generator=g) < 0.35, torch.randint(0, 10, (n,), generator=g), pred)
        save_states(store.states(split), st["x"], st["a"], logits, label, torch.arange(n) * 3 + 1,
                    {"model_hash": model_fingerprint(model), "split": split, "backbone": "hf"})
        if split == "repair":
            info = analyze(label, pred, torch.arange(n) * 3 + 1, num_classes=10, ranks=1)
            info["model_hash"] = model_fingerprint(model)
            atomic_write_json(store.misclf_info, info)
    return info


@pytest.fixture
def run_dir(tmp_path, make_classifier):
    return make_run(tmp_path / "digits", make_classifier)


def _results(store):
    return store.list_results("repair_result")


def test_shards_partition_the_grid_and_bad_options_fail_first(run_dir):
    store, _, info = run_dir
    grid = build_grid([store.root], ["ours", "random", "bl"], None, [6, "avg"], 3)
    assert len(grid) == len(info["settings"]) * (2 * 2 * 3 + 3)  # BL: its front only
    parts = [shard_tasks(grid, f"{k}/4") for k in range(4)]
    assert sorted(map(str, sum(parts, []))) == sorted(map(str, grid))
    assert sum(len(p) for p in parts) == len(grid)
    assert grid == build_grid([store.root], ["ours", "random", "bl"], None, [6, "avg"], 3)  # deterministic
    assert parse_shard("2/5") == (2, 5)
    with pytest.raises(ValueError, match="k/n"):
        parse_shard("2")
    with pytest.raises(ValueError, match="0 <= k < n"):
        parse_shard("5/5")
    with pytest.raises(KeyError, match="registered"):
        build_grid([store.root], ["ours"], None, [6], 1, repair="nope")
    with pytest.raises(KeyError, match="registered"):
        build_grid([store.root], ["nope"], None, [6], 1)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="budget"):
            build_grid([store.root], ["ours"], None, [bad], 1)
    with pytest.raises(ValueError, match="repetition"):
        build_grid([store.root], ["ours"], None, [6], 0)
    with pytest.raises(ValueError, match="unknown setting"):
        build_grid([store.root], ["ours"], ["src_tgt_r9"], [6], 1)
    with pytest.raises(ValueError, match="no option"):
        run_sweep([store.root], ["random"], ["all"], [6], 1, repair_options={"generationz": 3}, progress=False)
    with pytest.raises(ValueError, match="budget 40000"):
        run_sweep([store.root], ["random"], ["all"], [40000], 1, progress=False)
    assert _results(store) == []  # nothing ran


def test_killed_sweep_resumes_with_exactly_the_remaining_runs(run_dir):
    store, model, info = run_dir
    kw = dict(methods=["arachne_w", "random"], settings=["all", "src_tgt_r1"], budgets=[6, 12], reps=2,
              repair_options=DE, progress=False, on_error="raise")
    done = []

    def kill_after_three(res):
        done.append(res)
        if len(done) == 3:
            raise KeyboardInterrupt  # the sweep is killed after its third run

    with pytest.raises(KeyboardInterrupt):
        run_sweep({"digits": store.root}, on_result=kill_after_three, **kw)
    first = {r["path"]: store.abs(r["path"]).stat().st_mtime_ns for r in _results(store)}
    assert len(first) == 3
    rows = run_sweep({"digits": store.root}, **kw)
    n_grid = 2 * 2 * 2 * 2
    assert len(rows) == n_grid and [r["status"] for r in rows].count("exists") == 3
    assert {r["path"] for r in rows if r["status"] == "done"} | set(first) == {r["path"] for r in rows}
    assert all(store.abs(p).stat().st_mtime_ns == m for p, m in first.items())  # nothing redone
    assert {r["status"] for r in run_sweep({"digits": store.root}, **kw)} == {"exists"}
    assert len(_results(store)) == n_grid

    r = next(r for r in _results(store) if r["method"] == "arachne_w" and r["setting"] == "all"
             and r["budget"] == 6 and r["rep"] == 1)
    assert r["n_weights"] == 6 and r["seed"] == 1 and r["run_dir"] == "."
    assert not any(str(store.root) in json.dumps(x) for x in (r["fl"], r["path"]))  # paths are relative
    fl = read_json(store.abs(r["fl"]["path"]))
    assert fl["identity"] == r["identity"]["fl"] and fl["n_located"] == 6
    patch = Patch.from_dict(r["patch"])
    assert patch.weights.tolist() == fl["weights"]
    assert set(r["metrics"]) == {"test", "repair"}
    f = r["fitness"]
    assert f["generations_run"] <= 3 and f["fitness_best"] >= f["fitness_first_best"]
    assert {"fl_s", "repair_s", "eval_s", "total_s"} <= set(r["timings"])
    assert r["provenance"]["model_hash"] == model_fingerprint(model) and "versions" in r["provenance"]
    # the stored metrics agree with applying the patch to the head on the cached test states
    from vitfl.core.states import load_states
    from vitfl.localization.misclf import target_mask

    test = load_states(store.states("test"))
    head = last_ffn_head(model).copy()
    with torch.no_grad():
        before = head(test.x).argmax(1)
        patch.apply(head)
        after = head(test.x).argmax(1)
    tm = target_mask(info["settings"]["all"], test.label, before)
    assert r["metrics"]["test"]["n_targets"] == int(tm.sum())
    if int(tm.sum()):
        assert r["metrics"]["test"]["rr"] == pytest.approx(float((tm & (after == test.label)).sum() / tm.sum()))
    # random is redrawn per repetition (its FL seed is the repetition), arachne_w is localized once
    rand = {r["rep"]: r for r in _results(store) if r["method"] == "random" and r["budget"] == 6
            and r["setting"] == "all"}
    assert rand[0]["fl"]["seed"] == 0 and rand[1]["fl"]["seed"] == 1
    assert rand[0]["patch"]["weights"] != rand[1]["patch"]["weights"]
    aw = [r for r in _results(store) if r["method"] == "arachne_w" and r["budget"] == 6 and r["setting"] == "all"]
    assert len({r["fl"]["key"] for r in aw}) == 1

    agg = aggregate({"digits": store.root})
    assert agg["n_runs"] == n_grid
    for name in ("summary.csv", "summary.md", "runs.csv", "bar_digits_de.png", "bar_digits_de.pdf",
                 "stats_wilcoxon_holm.csv", "stats_mann_whitney.md"):
        assert (store.repair_summary_dir / name).is_file(), name
    df = collect_results({"digits": store.root})
    sub = df[(df.fl_method == "random") & (df.budget == "12")]
    row = agg["table"].query("fl_method == 'random' and budget == '12'").iloc[0]
    assert row["br_mean"] == pytest.approx(sub["br"].mean()) and row["n_runs"] == 4
    assert row["br_std"] == pytest.approx(np.std(sub["br"], ddof=1))
    assert row["runs_without_target"] == int((sub["n_targets"] == 0).sum())
    assert set(zip(agg["paired"]["method_a"], agg["paired"]["method_b"])) == {("arachne_w", "random")}


def test_two_sweeps_differing_in_one_option_keep_both_results(run_dir):
    store, _, _ = run_dir
    kw = dict(methods=["random"], settings=["all"], budgets=[6], reps=1, progress=False, on_error="raise")
    a = run_sweep([store.root], repair_options={"pop_size": 6, "generations": 2}, **kw)
    b = run_sweep([store.root], repair_options={"pop_size": 6, "generations": 3}, **kw)
    c = run_sweep([store.root], repair_options={"pop_size": 6, "generations": 2, "fitness": "reptran"}, **kw)
    assert [r["status"] for r in a + b + c] == ["done"] * 3
    res = _results(store)
    assert len(res) == 3 and len({r["key"] for r in res}) == 3
    assert sorted(r["fitness"]["options"]["generations"] for r in res) == [2, 2, 3]
    for opts in ({"pop_size": 6, "generations": 2}, {"pop_size": 6, "generations": 3}):
        assert [r["status"] for r in run_sweep([store.root], repair_options=opts, **kw)] == ["exists"]
    # the defaults spelled out are the same identity as the defaults left out
    assert [r["status"] for r in run_sweep([store.root], repair_options={"pop_size": 6, "generations": 2,
                                                                         "fitness": "arachne"}, **kw)] == ["exists"]
    df = collect_results([store.root])
    assert len(df) == 3 and df["options"].nunique() == 3


def test_n_avg_is_resolved_once_and_used_everywhere(run_dir):
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import n_avg_settings, resolve_n_avg, run_localization

    store, _, info = run_dir
    rows = run_localization(store, ["bl", "random"], budgets=["avg"], progress=False)
    assert {r["status"] for r in rows} <= {"done", "exists"}
    navg = store.list_results("n_avg")
    assert len(navg) == 1
    ctx = RunContext(store)
    sizes = {s: len(read_json(store.abs(r["path"]))["weights"]) for r in store.list_results("fl_result")
             if r["method"] == "bl" for s in [r["setting"]]}
    settings = n_avg_settings(ctx)
    assert navg[0]["n_avg"] == max(1, round(sum(sizes[s] for s in settings) / len(settings)))
    # the sweep over other settings uses the same N_avg; nothing recomputes it
    mtime = store.abs(navg[0]["path"]).stat().st_mtime_ns
    rows = run_sweep([store.root], ["random"], ["tgt_fn_r1"], ["avg"], 1, repair_options=DE, progress=False,
                     on_error="raise")
    assert rows[0]["status"] == "done" and rows[0]["budget_n"] == navg[0]["n_avg"]
    assert store.abs(navg[0]["path"]).stat().st_mtime_ns == mtime
    assert resolve_n_avg(ctx)["n_avg"] == navg[0]["n_avg"]
    r = _results(store)[0]
    assert r["n_weights"] == navg[0]["n_avg"] and r["budget"] == "avg"
    assert len(store.list_results("n_avg")) == 1


def test_not_applicable_and_other_repairs(run_dir):
    store, _, info = run_dir
    assert "tgt_fp_r1" in info["skipped"]  # a label never predicted: no I_neg
    rows = run_sweep({"digits": store.root}, ["random"], ["all", "tgt_fp_r1"], [6], 1,
                     repair_options=DE, progress=False, on_error="raise")
    assert rows[0]["status"] == "done" and rows[1]["status"].startswith("not applicable")
    run_sweep({"digits": store.root}, ["arachne_w"], ["all"], [6], 1, repair="prune", progress=False,
              on_error="raise")
    r = next(r for r in _results(store) if r["repair"] == "prune")
    assert r["label"] == "arachne_w+prune" and r["repair"] == "prune"
    new, old = r["patch"]["new"], r["patch"]["old"]  # pruned weights are 0, the others keep their value
    assert all(n == 0.0 or n == o for n, o in zip(new, old)) and 0.0 in new


def test_copied_run_reads_only_its_own_files(run_dir, tmp_path):
    import shutil

    store, _, _ = run_dir
    run_sweep([store.root], ["random"], ["all"], [6], 1, repair_options=DE, progress=False, on_error="raise")
    copy = RunStore(tmp_path / "elsewhere" / "digits")
    shutil.copytree(store.root, copy.root)
    shutil.rmtree(store.root)  # the original is gone: a copy that reached back would fail
    rows = run_sweep([copy.root], ["random"], ["all"], [6], 1, repair_options=DE, progress=False,
                     on_error="raise")
    assert [r["status"] for r in rows] == ["exists"]
    agg = aggregate([copy.root])
    assert agg["n_runs"] == 1
    text = "".join(p.read_text() for p in copy.root.rglob("*.json")) + (copy.repair_summary_dir / "runs.csv").read_text()
    assert str(store.root) not in text


def test_script_runs_a_shard_and_aggregates(run_dir):
    store, _, _ = run_dir
    cmd = [sys.executable, str(REPO / "scripts" / "repair_sweep.py"), "--run_dirs", f"digits={store.root}",
           "--methods", "arachne_w", "--settings", "all", "--budgets", "6", "--reps", "2", "--shard", "1/2",
           "--generations", "2", "--pop_size", "5", "--no_tensorboard", "--aggregate", "--option", "cr=0.5"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = _results(store)
    assert [r["rep"] for r in res] == [1]  # shard 1/2 of the two repetitions
    assert res[0]["fitness"]["options"]["cr"] == 0.5 and res[0]["fitness"]["options"]["generations"] == 2
    assert "1 runs aggregated" in out.stdout
    bad = subprocess.run(cmd[:2] + ["--repair", "nope"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "registered" in bad.stderr


def test_sub_shards_partition_a_shard():
    from vitfl.pipeline.parallel import resolve_workers, sub_shards

    tasks = list(range(53))
    for shard in ((0, 1), (1, 3), (2, 4)):
        for w in (1, 2, 3):
            mine = tasks[shard[0]::shard[1]]
            parts = [tasks[k::n] for k, n in sub_shards(shard, w)]
            assert sorted(sum(parts, [])) == mine and sum(map(len, parts)) == len(mine)
    assert resolve_workers(None) == 1 and 1 <= resolve_workers("auto") <= 4
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="workers"):
            resolve_workers(bad)


def test_two_worker_sweep_writes_the_one_process_results(run_dir, tmp_path, make_classifier):
    """workers=2: two spawned processes, one sub-shard each; every run once, and each result (patch, metrics)
    equal to the one-process sweep's on an identical run directory."""
    store, _, _ = run_dir
    other, _, _ = make_run(tmp_path / "other" / "digits", make_classifier)
    kw = dict(methods=["random", "ours"], settings=["all"], budgets=[6], reps=2, repair_options=DE, progress=False,
              on_error="raise")
    one = run_sweep({"digits": store.root}, **kw)
    two = run_sweep({"digits": other.root}, workers=2, **kw)
    assert sorted(r["status"] for r in two) == ["done"] * 4 and len(one) == 4
    run_of = lambda rows: {(r["method"], r["rep"]): r for r in rows}  # noqa: E731
    assert sorted(run_of(two)) == sorted(run_of(one)) and len(run_of(two)) == 4  # the same runs, each once
    with pytest.raises(ValueError, match="on_result"):
        run_sweep({"digits": other.root}, workers=2, on_result=print, **kw)
    for k, r in run_of(one).items():
        a = read_json(store.root / r["path"])
        b = read_json(other.root / run_of(two)[k]["path"])
        assert a["patch"]["weights"] == b["patch"]["weights"]
        np.testing.assert_allclose(a["patch"]["new"], b["patch"]["new"], rtol=1e-5, atol=1e-6)
        assert a["metrics"]["test"]["n_fixed"] == b["metrics"]["test"]["n_fixed"]
    assert {r["status"] for r in run_sweep({"digits": other.root}, workers=2, **kw)} == {"exists"}
