"""The adequacy entry points: five thin scripts/adequacy_rqN.py and scripts/adequacy_rq.py --rq rqN, all generated from
one table (scripts/_adequacy_cli.py RQS); each --help prints its RQ's description and usage examples."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def script(name):
    from test_cli_steps import script as load

    return load(name)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _help(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env.pop("VITFL_DEBUG", None)
    out = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_table_has_the_five_rqs():
    cli = script("_adequacy_cli")
    assert list(cli.RQS) == ["rq1", "rq2", "rq3", "rq4", "rq5"]
    for rq, text in cli.RQS.items():
        assert text.startswith(f"{rq.upper()} (") and text.endswith(".")
    with pytest.raises(ValueError, match="unknown research question 'rq9'"):
        cli.doc("rq9")


@pytest.mark.parametrize("rq", ["rq1", "rq2", "rq3", "rq4", "rq5"])
def test_each_script_is_thin_and_its_help_names_its_rq(rq):
    """adequacy_rqN.py is an entry point of a few lines (no description of its own); its docstring and --help are
    the table's paragraph for rqN (and no other RQ's), with the usage examples and the output folder."""
    cli = script("_adequacy_cli")
    path = SCRIPTS / f"adequacy_{rq}.py"
    code = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert len(code) <= 4, code
    assert not ast.get_docstring(ast.parse(path.read_text())), "the description lives in _adequacy_cli.RQS"
    assert script(f"adequacy_{rq}").__doc__ == cli.doc(rq)
    text = _flat(_help(str(path)))
    assert _flat(cli.RQS[rq]) in text
    assert all(_flat(other) not in text for r, other in cli.RQS.items() if r != rq)
    assert f"python scripts/adequacy_{rq}.py --run_dir outputs/digits --quick" in text
    assert f"python scripts/adequacy_rq.py --rq {rq} --run_dir outputs/digits --quick" in text
    assert f"<run_dir>/adequacy/{rq}/" in text and "usage: adequacy_" in text


def test_adequacy_py_help_lists_every_rq_and_with_rq_shows_that_one():
    cli = script("_adequacy_cli")
    path = str(SCRIPTS / "adequacy_rq.py")
    text = _flat(_help(path))
    assert "--rq {rq1,rq2,rq3,rq4,rq5}" in text
    assert all(_flat(d) in text for d in cli.RQS.values())
    one = _flat(_help(path, "--rq", "rq3"))
    assert _flat(cli.RQS["rq3"]) in one and _flat(cli.RQS["rq1"]) not in one


def test_adequacy_py_runs_the_named_rq_with_the_same_options(monkeypatch, tmp_path):
    cli = script("_adequacy_cli")
    ran = []
    monkeypatch.setattr(cli, "_run", lambda rq, a: ran.append((rq, cli.config_dict(a))))
    argv = ["--run_dir", str(tmp_path), "--quick", "--idc.round_centroids", "2"]
    cli.main_any(["--rq", "rq3", *argv])
    cli.main("rq3", None, argv)
    (rq_any, cfg_any), (rq_one, cfg_one) = ran
    assert rq_any == rq_one == "rq3" and cfg_any == cfg_one and "rq" not in cfg_any
    assert cfg_any["idc"]["round_centroids"] == 2
    with pytest.raises(SystemExit):
        cli.main_any(["--run_dir", str(tmp_path)])  # --rq is required
