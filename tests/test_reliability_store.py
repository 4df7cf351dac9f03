"""Reliability, round two (issue 29), the run store's part: names from files are data, never paths (item 1);
content checksums that readers verify, checkpoints included (item 3); append-only logs that cannot lose or glue
rows (item 4); a run directory that holds no path of the machine and can be moved (item 8).

Each test first sets up the failure the issue reproduced, on its own small temporary run, and asserts the
behaviour that replaces it (on the code before the issue, each fails: it wrote outside the run, trusted the
flipped bytes, lost or glued rows, or stored absolute paths).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from vitfl.core.io import CorruptFileError, LogDamagedWarning, atomic_write_json, read_json
from vitfl.core.runstore import ResultError, RunStore, UnsafeNameError, UnsafePathError

pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter",
                                         "ignore:.*has no recorded content hash"),
              pytest.mark.usefixtures("one_thread")]

ESCAPE = "../../../ESCAPE_dir"


@pytest.fixture
def run(tmp_path, make_classifier):
    """A small run as the pipeline leaves it (checkpoint, repair/test state caches, settings), in its own folder
    ``tmp_path/box/run`` so that anything written outside it shows up beside it."""
    from test_repair_sweep import make_run

    return make_run(tmp_path / "box" / "run", make_classifier)[0]


def _flip(path: Path, start: int, end: int, n: int = 64, seed: int = 0) -> None:
    """Flip (xor 0xFF) ``n`` distinct bytes of ``path`` in ``[start, end)``."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randperm(end - start, generator=g)[:n] + start).tolist()
    b = bytearray(path.read_bytes())
    for p in pos:
        b[p] ^= 0xFF
    path.write_bytes(bytes(b))


def _flip_safetensors_data(path: Path, n: int = 64) -> None:
    """Flip bytes in the data of the largest tensor of a safetensors file (a float tensor: the damage stays silent
    for a reader that does not check, e.g. ``a`` of a state cache, not its sample indices)."""
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    lo, hi = max((v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0])
    _flip(path, 8 + hlen + lo, 8 + hlen + hi, n)


def _flip_checkpoint_tensor_data(path: Path, n: int = 64) -> None:
    """Flip bytes inside the largest tensor record of a torch zip checkpoint (torch does not check the CRC)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if re.search(r"/data/\d+$", i.filename)), key=lambda i: i.file_size)
    raw = path.read_bytes()
    h = info.header_offset
    name_len, extra_len = int.from_bytes(raw[h + 26:h + 28], "little"), int.from_bytes(raw[h + 28:h + 30], "little")
    start = h + 30 + name_len + extra_len
    _flip(path, start, start + info.file_size, n)


def _fl_error(store: RunStore, methods: list[str], **kw) -> str:
    """The error of a localize run: raised, or reported in its status rows (the step goes on with the other
    methods and settings, and the script exits non-zero)."""
    from vitfl.core.states import CacheError
    from vitfl.pipeline.localize import run_localization

    try:
        rows = run_localization(store, methods, progress=False, **kw)
    except (ResultError, CacheError) as e:
        return str(e)
    errors = [r["status"] for r in rows if r["status"].startswith("error")]
    assert errors, rows
    return errors[0]


def _files_outside(tmp_path: Path, run_root: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if run_root not in p.parents and p != run_root
            and p.name not in ("box",) and "ESCAPE" in str(p)]


# =========================================================================================== 1. names are data
def _plant_setting(store: RunStore, name: str) -> None:
    info = read_json(store.misclf_info)
    info["settings"][name] = dict(info["settings"]["all"])
    atomic_write_json(store.misclf_info, info)  # as a received run would carry it


def test_a_setting_name_from_misclf_info_cannot_reach_outside_the_run(run, tmp_path):
    """The issue: ``localize.py --methods random --budgets 9`` (no --settings) wrote scores and results to
    ``$X/../../ESCAPE_dir``; ``repair_sweep.py`` its result and TensorBoard run likewise."""
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.repair import run_sweep

    _plant_setting(run, ESCAPE)
    with pytest.raises(UnsafeNameError) as e:
        run_localization(run, ["random"], budgets=[9], progress=False)
    msg = str(e.value)
    assert str(run.misclf_info) in msg and repr(ESCAPE) in msg and "not a valid name" in msg
    with pytest.raises(UnsafeNameError, match="misclf_info.json"):
        run_sweep([run.root], ["random"], None, [9], 1, repair_options={"pop_size": 4, "generations": 2},
                  progress=False, on_error="raise")
    assert _files_outside(tmp_path, run.root) == []
    assert run.list_results("fl_result") == [] and run.list_results("repair_result") == []


def test_a_fold_runs_settings_are_checked_where_read(run):
    from vitfl.pipeline.context import load_misclf

    fold = run.fold(0)
    info = read_json(run.misclf_info)
    info["settings"] = {"ok_name": info["settings"]["all"], "a/b": info["settings"]["all"]}
    atomic_write_json(fold.misclf_info, info)
    with pytest.raises(UnsafeNameError, match=r"cv/fold=0/misclf/misclf_info.json.*'a/b'"):
        load_misclf(fold)


def test_a_method_name_cannot_reach_outside_the_run(run, tmp_path):
    """A plugin registering a method named like a path: the store refuses to build its paths."""
    from vitfl.localization.base import FL_METHODS
    from vitfl.localization.methods.random_ import RandomWeights

    bad = "../../../ESCAPE_method"
    try:
        FL_METHODS.register(bad)(type("Escape", (RandomWeights,), {}))
    except (ValueError, KeyError, TypeError):  # the registry itself refuses such a name: as good
        pass
    else:
        try:
            msg = _fl_error(run, [bad], settings=["all"], budgets=[6])
            assert "ESCAPE_method" in msg and "not a valid name" in msg
        finally:
            FL_METHODS._items.pop(bad, None)
            FL_METHODS._meta.pop(bad, None)
    assert _files_outside(tmp_path, run.root) == []
    with pytest.raises(UnsafeNameError, match="fl_scores"):
        run.fl_scores_path({"setting": "all", "method": bad})


@pytest.mark.parametrize("kind, fields", [
    ("fl_result", {"setting": "..", "method": "m", "budget": 6, "key": "k"}),
    ("fl_result", {"setting": "all", "method": "m", "budget": "6/../../x", "key": "k"}),
    ("fl_result", {"setting": "all", "method": "m", "budget": 6, "key": ".hidden"}),
    ("repair_result", {"setting": "all", "label": "a/b", "budget": 6, "rep": 0, "key": "k"}),
    ("repair_result", {"setting": "all", "label": "ours", "budget": 6, "rep": "0/..", "key": "k"}),
    ("tb_repair_run", {"setting": "", "label": "ours", "budget": 6, "rep": 0, "key": "k"}),
    ("states", {"split": "repair", "tag": "/../../x"}),
    ("states", {"split": "re pair", "tag": ""}),
    ("fl_eval", {"name": "stats/../../../x.md"}),
    ("report", {"name": "/etc/passwd"}),
    ("lock", {"key": "a\\b"}),
])
def test_every_layout_field_is_checked(tmp_path, kind, fields):
    with pytest.raises(UnsafeNameError, match="not"):
        RunStore(tmp_path).path(kind, **fields)


def test_good_names_still_work(tmp_path):
    store = RunStore(tmp_path)
    assert store.path("repair_result", setting="src_tgt_r1", label="arachne_w+finetune", budget=6, rep=0,
                      key="abc").name == "arachne_w+finetune_n6_rep0-abc.json"
    assert store.states("repair", "epoch=001").name == "repair.epoch=001.safetensors"
    assert store.fl_eval("stats/x.md") == tmp_path / "fl_eval" / "stats" / "x.md"
    assert store.checkpoint(2).name == "epoch=002.ckpt"


def test_no_path_resolves_outside_the_run(tmp_path):
    root = tmp_path / "run"
    store = RunStore(root)
    for stored in ("../../etc/passwd", "/etc/passwd", "fl/../../x"):
        with pytest.raises(UnsafePathError, match="outside the run directory"):
            store.abs(stored)
    assert store.abs("fl/all/x.json") == root / "fl" / "all" / "x.json"
    # a folder of the run that is a symbolic link to elsewhere
    (tmp_path / "elsewhere").mkdir()
    (root / "fl").mkdir(parents=True)
    (root / "fl" / "all").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="outside the run directory"):
        store.path("fl_result", setting="all", method="random", budget=6, key="k")
    with pytest.raises(UnsafePathError):
        store.write_json(root / "fl" / "all" / "x.json", {"a": 1})
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_fold_runs_parent_pointer_must_be_its_run(tmp_path):
    store = RunStore(tmp_path / "run")
    fold = store.fold(1)
    assert fold.model_store() == RunStore(store.root.resolve())
    atomic_write_json(fold.path("parent"), {"parent": "../../../other_run"})
    with pytest.raises(UnsafePathError, match="parent pointer"):
        fold.model_store()


# =========================================================================================== 3. checksums
def test_flipped_bytes_in_a_state_cache_are_refused(run):
    """The issue: 64 flipped bytes in ``states/repair.safetensors``: localize computed and stored a new result from
    them (rc 0)."""
    from vitfl.core.states import CacheError, CorruptCacheError, load_states
    from vitfl.pipeline.localize import run_localization

    path = run.states("repair")
    _flip_safetensors_data(path)
    with pytest.raises(CorruptCacheError) as e:
        run_localization(run, ["random", "grad_loss"], settings=["all"], budgets=[9], progress=False)
    msg = str(e.value)
    assert str(path) in msg and "corrupt" in msg and "cache_states.py" in msg
    assert isinstance(e.value, CacheError)  # the scripts' catchable type; the cache step rebuilds on a CacheError
    assert run.list_results("fl_result") == []
    with pytest.raises(CorruptCacheError):
        load_states(path)


def test_flipped_bytes_in_an_fl_scores_file_are_refused(run):
    """The issue: 64 flipped bytes in an FL scores file: localize at a new budget selected from them (rc 0)."""
    from vitfl.pipeline.localize import run_localization

    run_localization(run, ["grad_loss"], settings=["all"], budgets=[6], progress=False)
    (scores,) = [p for p in run.fl_dir.rglob("*.scores.safetensors")]
    _flip_safetensors_data(scores)
    msg = _fl_error(run, ["grad_loss"], settings=["all"], budgets=[9])
    assert str(scores) in msg and "corrupt" in msg and "delete it" in msg
    assert [r["budget"] for r in run.list_results("fl_result")] == [6]
    with pytest.raises(CorruptFileError) as e:  # the store's reader itself
        run.load_fl_scores(json.loads(__import__("safetensors").safe_open(str(scores), "pt").metadata()["identity"]))
    assert isinstance(e.value, ResultError)


def test_an_edited_result_json_is_refused(run):
    from vitfl.pipeline.localize import run_localization

    run_localization(run, ["random"], settings=["all"], budgets=[6], progress=False)
    (rec,) = run.list_results("fl_result")
    path = run.abs(rec["path"])
    text = path.read_text()
    w = rec["weights"][0]
    edited = text.replace(f"{w[2]}\n", f"{w[2] + 1}\n", 1)  # one weight index changed, still valid JSON
    assert edited != text
    path.write_text(edited)
    with pytest.raises(CorruptFileError, match=f"{path.name} is corrupt"):
        run.list_results("fl_result")
    assert f"{path.name} is corrupt" in _fl_error(run, ["random"], settings=["all"], budgets=[6])


def test_a_text_artifact_has_a_sidecar_and_a_kill_before_it_leaves_it_unverified(tmp_path):
    """Text artifacts: ``<name>.sha256`` written after the file; a kill between the two leaves the file without a
    checksum (unverified, recomputed by its step), never beside the previous version's checksum."""
    store = RunStore(tmp_path)
    p = tmp_path / "repair" / "summary" / "summary.csv"
    store.write_text(p, "a,b\n1,2\n")
    assert store.verify(p) is True and store.read_text(p) == "a,b\n1,2\n"
    assert (tmp_path / "repair" / "summary" / "summary.csv.sha256").read_text().endswith("  summary.csv\n")
    p.write_text("a,b\n1,3\n")
    with pytest.raises(CorruptFileError, match="summary.csv is corrupt"):
        store.read_text(p)
    store.write_text(p, "a,b\n1,2\n")
    code = ("from vitfl.core.runstore import RunStore\n"
            f"RunStore({str(tmp_path)!r}).write_text({str(p)!r}, 'a,b\\n5,6\\n')\n")
    env = {**os.environ, "VITFL_FAULT_AT": "2", "PYTHONPATH": str(REPO)}  # 1: the file, 2: its sidecar
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == -9
    assert p.read_text() == "a,b\n5,6\n" and store.verify(p) is False  # unverified, not corrupt
    env.pop("VITFL_FAULT_AT")
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0
    assert store.verify(p) is True


def test_a_large_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    from vitfl.core import io as core_io
    from vitfl.core.states import load_states, save_states

    calls = []
    real = core_io.tensors_content_hash
    monkeypatch.setattr(core_io, "tensors_content_hash", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "states" / "repair.safetensors"
    n = 50
    save_states(path, torch.randn(n, 4), torch.randn(n, 16), torch.randn(n, 3), torch.zeros(n, dtype=torch.long),
                torch.arange(n), {"model_hash": "m"})
    assert len(calls) == 1  # at write
    for _ in range(3):
        load_states(path, expected_hash="m")
    assert len(calls) == 1  # this version was hashed by its writer in this process
    core_io._verified.clear()
    load_states(path, expected_hash="m")
    load_states(path, expected_hash="m")
    assert len(calls) == 2  # another process: hashed once at the first read


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny run written by the training callbacks (checkpoints with their sha256 sidecars)."""
    from conftest import _fit_tiny_run

    root = tmp_path_factory.mktemp("trained")
    _fit_tiny_run(root, "hf_vit")
    return RunStore(root)


def test_flipped_bytes_in_a_checkpoint_are_refused(trained, tmp_path):
    """The issue: torch skips the zip CRC, so flipped bytes in ``epoch=NNN.ckpt`` loaded silently, and the error
    that followed invited the user to adopt the corrupt model ("rerun analyze_misclf")."""
    from vitfl.lightning_modules.runs import (CorruptCheckpointError, RunError, load_classifier, load_run_model,
                                        safe_torch_load)

    shutil.copytree(trained.root, tmp_path / "run")
    store = RunStore(tmp_path / "run")
    path = store.checkpoint(2)
    assert (path.parent / "epoch=002.ckpt.sha256").is_file()
    load_classifier(path)
    _flip_checkpoint_tensor_data(path)
    torch.load(path, map_location="cpu", weights_only=True)  # the damage is live: torch loads it silently
    for load in (lambda: load_classifier(path), lambda: load_run_model(store), lambda: safe_torch_load(path)):
        with pytest.raises(CorruptCheckpointError) as e:
            load()
        msg = str(e.value)
        assert str(path) in msg and "corrupt" in msg and "restore it from a backup or retrain" in msg
        assert "rerun" not in msg and isinstance(e.value, RunError)


def test_a_checkpoint_without_a_recorded_hash_loads_with_one_warning(trained, tmp_path):
    from vitfl.lightning_modules.runs import UnverifiedCheckpointWarning, load_classifier

    shutil.copytree(trained.root, tmp_path / "run")
    path = RunStore(tmp_path / "run").checkpoint(1)
    (path.parent / "epoch=001.ckpt.sha256").unlink()  # an older run's checkpoint
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_classifier(path)
        load_classifier(path)
    mine = [x for x in w if issubclass(x.category, UnverifiedCheckpointWarning)]
    assert len(mine) == 1 and str(path) in str(mine[0].message)
    assert not (path.parent / "epoch=001.ckpt.sha256").exists()  # nothing adopted: no hash recorded for it


def test_a_damaged_last_ffn_weight_file_is_named(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from vitfl.callbacks.ffn_weights import load_ffn_weights

    shutil.copytree(trained.root, tmp_path / "run")
    store = RunStore(tmp_path / "run")
    path = store.ffn_weights(2)
    good = load_ffn_weights(path)
    _flip_safetensors_data(path)
    with pytest.raises(CorruptFileError, match=f"{path} is corrupt"):
        load_ffn_weights(path)
    good["W_aft"][0, 0] = float("nan")
    save_file(good, str(path))  # written by hand, no content hash: its values are checked
    with pytest.raises(ResultError, match=rf"{path}: tensor 'W_aft' holds NaN"):
        load_ffn_weights(path)
    assert load_file(str(path))  # the file itself is readable


def test_settings_of_another_model_do_not_invite_adopting_it(run):
    from vitfl.pipeline.context import RunContext, SettingsModelMismatchError

    info = read_json(run.misclf_info)
    info["model_hash"] = "0123456789abcdef"
    atomic_write_json(run.misclf_info, info)
    with pytest.raises(SettingsModelMismatchError) as e:
        RunContext(run).misclf
    assert "restore it from a backup" in str(e.value) and str(run.misclf_info) in str(e.value)
    assert isinstance(e.value, ResultError)


# =========================================================================================== 4. logs
def _writer(root: str, w: int, n: int, barrier) -> None:
    store = RunStore(root)
    barrier.wait()
    for i in range(n):
        store.append_row(store.fl_timing, {"method": f"m{w}", "setting": "all", "i": i, "wall_s": 0.001 * i,
                                           "note": "x" * 40})


def test_two_concurrent_writers_lose_no_row(tmp_path):
    """The issue: two localize processes on one run left 29 of 30 timing rows (a read-modify-write race)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = RunStore(tmp_path)
    df, problems = store.read_log(store.fl_timing)
    assert problems == [] and len(df) == 100
    assert sorted(zip(df["method"], df["i"])) == sorted((f"m{w}", i) for w in range(2) for i in range(50))
    assert store.fl_timing.read_text().count("\n") == 101  # header + one whole line per row


def test_a_log_cut_mid_line_is_set_aside_not_glued(tmp_path):
    """The issue: a ``fl/timing.csv`` cut mid-line got the next row glued onto it (rc 0)."""
    store = RunStore(tmp_path)
    store.append_row(store.fl_timing, {"method": "random", "setting": "all", "wall_s": 0.5})
    cut = store.fl_timing.read_bytes() + b"grad_loss,src_tg"
    store.fl_timing.write_bytes(cut)
    with pytest.warns(LogDamagedWarning) as w:
        store.append_row(store.fl_timing, {"method": "ours", "setting": "all", "wall_s": 1.5})
    (aside,) = list(store.fl_dir.glob("timing.csv.damaged-*"))
    msg = str(w[0].message)
    assert str(store.fl_timing) in msg and str(aside) in msg and "cut" in msg
    assert aside.read_bytes() == cut  # kept as it was, for the user to look at
    df, problems = store.read_log(store.fl_timing)
    assert problems == [] and df.to_dict("records") == [{"method": "ours", "setting": "all", "wall_s": 1.5}]
    df_old, problems_old = store.read_log(aside)
    assert len(df_old) == 1 and len(problems_old) == 1 and "line 3 is cut" in problems_old[0]


def test_a_garbage_log_never_fails_an_fl_run(run):
    """The issue: a garbage ``timing.csv`` made a new FL run fail with a bare ``'utf-8' codec can't decode`` after
    its scores were saved, so its selection was never written."""
    from vitfl.pipeline.localize import run_localization

    run.fl_timing.parent.mkdir(parents=True, exist_ok=True)
    run.fl_timing.write_bytes(bytes(range(256)) * 4)
    with pytest.warns(LogDamagedWarning, match="not UTF-8"):
        rows = run_localization(run, ["random"], settings=["all"], budgets=[6], progress=False)
    assert [r["status"] for r in rows] == ["done"]
    assert [r["budget"] for r in run.list_results("fl_result")] == [6]
    df, problems = run.read_log(run.fl_timing)
    assert problems == [] and list(df["method"]) == ["random"]
    assert len(list(run.fl_dir.glob("timing.csv.damaged-*"))) == 1


def test_read_log_skips_and_reports_bad_lines(tmp_path):
    store = RunStore(tmp_path)
    p = store.fl_timing
    p.parent.mkdir(parents=True)
    p.write_bytes(b"method,setting,wall_s\n"
                  b"random,all,0.5\n"
                  b"grad_loss,src_tgrandom,all,0.7\n"  # a glued row: too many fields
                  b"\xff\xfe,all,1\n"                  # not UTF-8
                  b"ours,all,2.5\n"
                  b"bl,al")                             # cut
    df, problems = store.read_log(p)
    assert df.to_dict("records") == [{"method": "random", "setting": "all", "wall_s": 0.5},
                                     {"method": "ours", "setting": "all", "wall_s": 2.5}]
    assert [q.split(": ", 1)[1].split(" ", 2)[:2] for q in problems] == [["line", "3"], ["line", "4"], ["line", "6"]]
    assert all(str(p) in q for q in problems)
    assert store.read_log(tmp_path / "fl" / "absent.csv")[0].empty


def test_the_report_reads_a_damaged_timing_log(tmp_path):
    """``pd.read_csv`` failed on a glued row; the report now leaves damaged lines out and says so."""
    import pandas as pd

    from vitfl.pipeline.report import _fl_cost_vs_quality, _Page

    store = RunStore(tmp_path)
    store.fl_timing.parent.mkdir(parents=True)
    store.fl_timing.write_text("method,setting,wall_s\nrandom,all,0.5\nours,all,1.5\nours,all,2,grad_loss,x,9\n")
    store.write_text(store.fl_eval("checkpoint_benchmark.csv"),
                     pd.DataFrame({"method": ["random", "ours"], "P@1%": [0.01, 0.2]}).to_csv(index=False))
    page = _Page(store)
    _fl_cost_vs_quality(page)
    text = "\n".join(page.lines)
    assert "1 damaged line(s) of fl/timing.csv left out" in text and "line 4" in text
    assert store.path("report", name="fl_cost_vs_quality.png").is_file()


# =========================================================================================== 8. relative paths
CLI_CONFIGS = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]


def _fit_args(root: Path, epochs: int = 1, *extra: str) -> list[str]:
    return ["fit", *[a for c in CLI_CONFIGS for a in ("--config", str(REPO / c))], "--trainer.default_root_dir",
            str(root), f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.init_args.batch_size=32", *extra]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 1-epoch run made by the training CLI (TensorBoard logger on), then cached, analysed and localized."""
    from vitfl.lightning_modules.cli import ToolkitCLI
    from vitfl.lightning_modules.runs import cache_run_states
    from vitfl.pipeline.localize import run_localization
    from vitfl.pipeline.misclf import step_misclf

    root = tmp_path_factory.mktemp("origin") / "run"
    ToolkitCLI(args=_fit_args(root))
    store = RunStore(root)
    cache_run_states(store, ["repair", "test"], trainer_kwargs={"enable_progress_bar": False})
    step_misclf(store, ranks=1)
    run_localization(store, ["random", "grad_loss"], settings=["all"], budgets=[6], progress=False)
    return store


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_run_config_holds_no_path_of_the_machine(cli_run):
    """The issue: run_config.yaml stored absolute paths (``pretrained_path``, ``folds_path``, the logger's
    ``save_dir``) though the docs say a run holds relative paths."""
    for path in (cli_run.run_config, cli_run.path("tb_run", name="fit") / "config.yaml"):
        text = path.read_text()
        cfg = yaml.safe_load(text)
        assert str(cli_run.root) not in text and str(REPO) not in text, path
        assert not [s for s in _strings(cfg) if s.startswith("/")], path
        assert cfg["trainer"]["default_root_dir"] == "."
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "."
        assert cfg["data"]["init_args"]["folds_path"] == "folds.json"
        assert cfg["config"] == [f"toolkit:{c}" for c in CLI_CONFIGS]
        assert set(cfg["external_inputs"]) == set(cfg["config"])
        assert all(v.startswith("sha256:") for v in cfg["external_inputs"].values())


def test_a_relative_pretrained_path_is_read_from_the_run(tmp_path, monkeypatch):
    """The train step records a pretraining export relative to the run (``finetune_model.yaml``), and the training
    CLI reads such a path from the run directory, wherever the run lies and whatever the working directory."""
    from vitfl.lightning_modules.cli import _pretrained_in_run, run_relative_config
    from vitfl.pipeline.train import finetune_model_config

    root = tmp_path / "run"
    (root / "pretrain" / "export").mkdir(parents=True)
    (root / "pretrain" / "export" / "config.json").write_text("{}")
    spec = yaml.safe_load(finetune_model_config(RunStore(root), REPO / "configs/model/vit_mnist_finetune.yaml",
                                                root / "pretrain" / "export").read_text())
    assert spec["model"]["backbone_kwargs"]["pretrained_path"] == "pretrain/export"
    monkeypatch.chdir(tmp_path)
    model = {"backbone_kwargs": {"pretrained_path": "pretrain/export"}}
    _pretrained_in_run(model, root)
    assert model["backbone_kwargs"]["pretrained_path"] == str(root / "pretrain" / "export")
    out = run_relative_config({"model": model, "trainer": {"default_root_dir": str(root)}}, root)
    assert out["model"]["backbone_kwargs"]["pretrained_path"] == "pretrain/export"
    ext = tmp_path / "vit-in21k"
    ext.mkdir()
    (ext / "w.bin").write_bytes(b"weights")
    out = run_relative_config({"model": {"backbone_kwargs": {"pretrained_path": str(ext)}}}, root)
    assert out["model"]["backbone_kwargs"]["pretrained_path"] == "external:vit-in21k"
    assert out["external_inputs"]["external:vit-in21k"].startswith("sha256:")


_MOVED = r'''
import json, os, sys
OLD, NEW, REPO = sys.argv[1], sys.argv[2], sys.argv[3]
seen = []

def _note(event, path):
    try:
        text = os.fsdecode(path)
    except TypeError:
        return
    if OLD in text:
        seen.append(f"{event} {text}")

def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod",
                 "os.utime", "os.truncate", "shutil.copyfile", "shutil.rmtree") and args:
        _note(event, args[0])

sys.addaudithook(hook)
for name in ("stat", "lstat"):
    real = getattr(os, name)
    def wrapped(p, *a, _real=real, _name=name, **k):
        if isinstance(p, (str, bytes, os.PathLike)):
            _note(_name, p)
        return _real(p, *a, **k)
    setattr(os, name, wrapped)
# the watch itself works: a look at the old place is seen (then forgotten)
from pathlib import Path
Path(OLD, "run_config.yaml").is_file()
open(os.devnull).close()
try:
    open(os.path.join(OLD, "folds.json"))
except OSError:
    pass
assert [s.split()[0] for s in seen] == ["stat", "open"], seen
seen.clear()

import torch
torch.set_num_threads(1)
from vitfl.core.runstore import RunStore
from vitfl.lightning_modules.runs import cache_run_states, datamodule_from_run, load_run_model
from vitfl.pipeline.localize import run_localization

store = RunStore(NEW)
cache_run_states(store, ["repair", "test"], trainer_kwargs={"enable_progress_bar": False})
load_run_model(store)
rows = run_localization(store, ["random", "grad_loss"], settings=["all"], budgets=[6], progress=False)
datamodule_from_run(store).setup()
statuses = [r["status"] for r in rows]
before_resume = list(seen)
from vitfl.lightning_modules.cli import ToolkitCLI
cfgs = ["configs/data/digits.yaml", "configs/model/vit_digits.yaml", "configs/trainer/cpu.yaml"]
ToolkitCLI(args=["fit", *[a for c in cfgs for a in ("--config", os.path.join(REPO, c))],
                 "--trainer.default_root_dir", NEW, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--data.init_args.batch_size=32", "--ckpt_path", "last"])
print("RESULT " + json.dumps({"statuses": statuses, "seen": before_resume, "seen_resume": seen[len(before_resume):]}))
'''


def test_a_moved_run_reruns_as_exists_and_reads_nothing_of_its_old_place(cli_run, tmp_path):
    """``mv run /elsewhere/run``: every step after training finds its results ("exists"), recomputes nothing and
    touches no path of the old location (every open / listing / stat is watched); resuming the fit there with
    ``--ckpt_path last`` reads the moved run's own files too."""
    old = tmp_path / "origin" / "run"
    shutil.copytree(cli_run.root, old)
    new = tmp_path / "moved" / "run"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    before = {p.relative_to(new): p.stat().st_mtime_ns for p in new.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "-c", _MOVED, str(old), str(new), str(REPO)], capture_output=True,
                         text=True, timeout=600, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["statuses"] == ["exists", "exists"]
    assert res["seen"] == [] and res["seen_resume"] == []
    after = {p.relative_to(new): p.stat().st_mtime_ns for p in new.rglob("*") if p.is_file()}
    results = [p for p in before if p.parts[0] in ("states", "fl", "misclf")]
    assert results and all(after[p] == before[p] for p in results)  # nothing recomputed
    assert RunStore(new).checkpoint_epochs() == [0, 1, 2]  # the resumed fit trained on, in place
    cfg = yaml.safe_load((new / "run_config.yaml").read_text())
    assert cfg["trainer"]["default_root_dir"] == "." and str(tmp_path) not in (new / "run_config.yaml").read_text()
