"""The main job end to end in its --quick form (slow: run with -m slow; CI runs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_quick_writes_every_artifact(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "main_job.py"), "--quick", "--run_dir", str(run)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    for sub in ("checkpoints/epoch=000.ckpt", "checkpoints/epoch=002.ckpt", "ffn_weights/epoch=002.safetensors",
                "states/repair.safetensors", "states/test.safetensors", "misclf/misclf_info.json",
                "misclf/confusion.png", "fl/timing.csv", "repair/summary/summary.md",
                "adequacy/coverage/coverage_table.csv"):
        assert (run / sub).exists(), sub
    info = json.loads((run / "misclf" / "misclf_info.json").read_text())
    assert "all" in info["settings"]
    assert list((run / "fl" / "all").glob("*.json")), "no FL result for the 'all' setting"
    assert not list(run.rglob("*.pt")), "no pickled result files: tensors are safetensors, records JSON"

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    for p in run.rglob("*.json"):  # every JSON is strict (NaN / inf written as null)
        json.loads(p.read_text(), parse_constant=refuse)
    assert list((run / "fl_eval").rglob("*.png")), "no FL evaluation figure"
    assert "ViT test accuracy" in out.stdout
    # the FL table counts what the step did: a fresh run computes every method on every setting
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["method", "computed", "selected"])
    fl_rows = {line.split()[0]: line.split() for line in lines[head + 2:head + 7]}
    assert {"random", "grad_loss", "ours"} <= set(fl_rows), lines[head:head + 8]
    # columns: method, computed, selected, on disk, n/a, failed, ...: every setting accounted for, none failed (BL
    # is computed for N_avg first, so its later row finds most settings on disk)
    assert all(sum(int(r[i]) for i in range(1, 5)) == len(info["settings"]) and r[5] == "0"
               for r in fl_rows.values()), lines[head:head + 8]
    assert all(int(fl_rows[m][1]) == len(info["settings"]) for m in ("random", "grad_loss"))
    assert (run / "repair" / "summary" / "crossval.md").is_file() and "cross-validated repair" in out.stdout
    from pipeline.report import check_report

    report = run / "report" / "report.md"
    assert report.is_file() and (run / "report" / "report.html").is_file() and f"report: {report}" in out.stdout
    assert check_report(report) == []  # every link resolves, every table states split and n
    pdfs = list(run.rglob("*.pdf"))
    assert pdfs and not [p for p in pdfs if b"/Type3" in p.read_bytes()], "a PDF embeds a Type 3 font"
    # a second run resumes: nothing is trained again
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "main_job.py"), "--quick", "--run_dir", str(run),
                            "--skip", "evaluate", "repair", "coverage"], capture_output=True, text=True, env=env,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "training skipped" in again.stdout
