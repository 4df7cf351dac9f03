"""The main job end to end in its --quick form (slow: run with -m slow; CI runs it): the experiment
configs/experiment/main_job_mnist.yaml + main_job_mnist_quick.yaml through the experiment runner."""
import json
import re
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
                "misclf/confusion.png", "fl/timing.csv", "repair/summary/main_job_corrected/summary.md",
                "adequacy/coverage/coverage_table.csv", "report/testbed.json",
                "report/experiments/main_job_corrected.yaml"):
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
    assert "test (held-out fold) top-1" in out.stdout
    saved = (run / "report" / "experiments" / "main_job_corrected.yaml").read_text()
    assert str(tmp_path) not in saved, "the experiment config stored in the run names an absolute path"
    # the same run-store identities (input hashes aside) as the main job made before it became an experiment config
    expected = json.loads((ROOT / "tests" / "data" / "main_job_quick_identities.json").read_text())
    got = stripped_identities(run)
    assert [i for i in expected if i not in got] == [] and [i for i in got if i not in expected] == []
    # the FL table counts what the step did: a fresh run computes every method on every setting
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["method", "computed", "selected"])
    fl_rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 6]}
    assert {"random", "grad_loss", "ours"} <= set(fl_rows), lines[head:head + 8]
    # columns: method, computed, selected, on disk, n/a, failed, ...: every setting accounted for, none failed (BL
    # is computed for N_avg first, so its later row finds most settings on disk)
    assert all(sum(int(r[i]) for i in range(1, 5)) == len(info["settings"]) and r[5] == "0"
               for r in fl_rows.values()), lines[head:head + 8]
    assert all(int(fl_rows[m][1]) == len(info["settings"]) for m in ("random", "grad_loss"))
    assert (run / "repair" / "summary" / "crossval.md").is_file() and "cross-validated repair" in out.stdout
    from vitfl.pipeline.report import check_report

    report = run / "report" / "report.md"
    assert report.is_file() and (run / "report" / "report.html").is_file() and f"report (mnist): {report}" in out.stdout
    assert check_report(report) == []  # every link resolves, every table states split and n
    assert "**Repair (main_job_corrected): which FL method's weights repair best**" in report.read_text()
    pdfs = list(run.rglob("*.pdf"))
    assert pdfs and not [p for p in pdfs if b"/Type3" in p.read_bytes()], "a PDF embeds a Type 3 font"
    # a second run resumes: nothing is trained again
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "main_job.py"), "--quick", "--run_dir", str(run),
                            "--skip", "evaluate_fl", "repair", "crossval", "coverage"], capture_output=True, text=True,
                           env=env,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "training skipped" in again.stdout
    assert "testbed [mnist]: 0 done, 1 skipped" in again.stdout and "0 done" in again.stdout


def _strip(x):
    """An identity without its hashes (they differ between machines): the names of the inputs kept, every content
    hash as "#"."""
    if isinstance(x, dict):
        return {k: (sorted(v) if k == "inputs" and isinstance(v, dict) else _strip(v)) for k, v in x.items()
                if k not in ("checkpoint", "checkpoints")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    if isinstance(x, str) and re.fullmatch(r"[0-9a-f]{12,64}", x):  # a content hash
        return "#"
    return x


def stripped_identities(run: Path) -> list:
    """[folder, identity without hashes] of every result record of a run (report/ and adequacy/ left out)."""
    out = set()
    for p in run.rglob("*.json"):
        if p.relative_to(run).parts[0] in ("report", "adequacy"):
            continue
        rec = json.loads(p.read_text())
        if isinstance(rec, dict) and "identity" in rec:
            out.add(json.dumps([str(p.parent.relative_to(run)), _strip(rec["identity"])], sort_keys=True))
    return [json.loads(i) for i in sorted(out)]
