"""``scripts/localize.py --devices 2`` (strategy ddp on CPU, gloo): every file and every timing row written once (by
rank 0), the summary printed once, scores equal to a one-process run."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitfl.core.io import load_tensors
from vitfl.core.runstore import RunStore

REPO = Path(__file__).resolve().parents[1]
METHODS = ["grad_loss", "vdiff", "ours", "bl"]


def _localize(root: Path, devices: int) -> str:
    cmd = [sys.executable, str(REPO / "scripts" / "localize.py"), "--run_dir", str(root), "--methods", *METHODS,
           "--settings", "all", "src_tgt_r1", "--budgets", "6", "avg", "--devices", str(devices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_two_process_localize_writes_once_and_matches_one_process(tmp_path, make_classifier):
    from test_repair_sweep import make_run

    one, _, _ = make_run(tmp_path / "one", make_classifier)
    two = RunStore(tmp_path / "two")
    shutil.copytree(one.root, two.root)
    out1 = _localize(one.root, 1)
    out2 = _localize(two.root, 2)
    for out in (out1, out2):  # one summary line per (method, setting)
        assert sum(line.startswith(("grad_loss ", "vdiff ", "ours ", "bl ")) for line in out.splitlines()) == 8
    with open(two.fl_timing) as f:
        rows = list(csv.DictReader(f))
    keys = [(r["method"], r["setting"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per FL run, not one per rank
    assert set(keys) >= {(m, s) for m in METHODS for s in ("all", "src_tgt_r1")}  # (+ BL on the N_avg settings)
    assert {r["world_size"] for r in rows} == {"2"}
    recs1 = {(r["method"], r["setting"], str(r["budget"])): r for r in one.list_results("fl_result")}
    recs2 = {(r["method"], r["setting"], str(r["budget"])): r for r in two.list_results("fl_result")}
    assert recs1.keys() == recs2.keys() and len(recs2) == len(two.list_results("fl_result"))
    assert len(one.list_results("n_avg")) == len(two.list_results("n_avg")) == 1
    assert one.list_results("n_avg")[0]["n_avg"] == two.list_results("n_avg")[0]["n_avg"]
    for k, r1 in recs1.items():
        r2 = recs2[k]
        assert r1["key"] == r2["key"]  # same identity: the number of processes is not an input
        s1 = load_tensors(one.abs(r1["scores_file"]))[0]["scores"]
        s2 = load_tensors(two.abs(r2["scores_file"]))[0]["scores"]
        assert s1.dtype == s2.dtype == torch.float64
        scale = float(s1.abs().max()) or 1.0
        assert float((s1 - s2).abs().max()) <= 1e-5 * scale, k  # float32 model: per-batch order differs
        assert r1["weights"] == r2["weights"], k
