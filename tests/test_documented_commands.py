"""Every command the README and docs/ show runs as written: each names files that exist, and each toolkit script
accepts its arguments exactly as documented (``--print_config`` parses every option and config file without doing
any work; the `--only` bug of the step runner was such a case). The end-to-end run of the main job is
tests/test_main_job.py (slow); the step-by-step block runs for real in the slow test below."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").rglob("*.md"))]
#: placeholders the docs use, and what a test puts there
PLACEHOLDERS = {"k/N": "1/2", "RUN": "outputs/digits", "ROOT": "/data"}
#: the scripts whose parser is jsonargparse (every option and --config checked by --print_config)
PRINT_CONFIG = {"cache_states", "analyze_misclf", "localize", "evaluate_fl", "repair_sweep", "run_experiment",
                "adequacy_rq1", "adequacy_rq2", "adequacy_rq3", "adequacy_rq4", "adequacy_rq5", "report"}


def documented_commands() -> list[tuple[str, str]]:
    """(doc file, command) for every shell line in a fenced code block that runs one of the toolkit's scripts or
    benchmarks (line continuations joined, trailing comments dropped, a leading venv path or `.` line ignored)."""
    out = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|console|shell)?\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                m = re.match(r"^(?:\.venv/bin/)?(python|bash) ((?:scripts|benchmarks)/\S+)(.*)$", line)
                if m:
                    out.append((doc.relative_to(REPO).as_posix(), line))
    return out


COMMANDS = documented_commands()


def _argv(line: str) -> tuple[str, list[str]]:
    for k, v in PLACEHOLDERS.items():
        line = line.replace(k, v)
    words = shlex.split(line)
    return words[1], words[2:]


def test_the_docs_show_commands():
    scripts = {_argv(c)[0] for _, c in COMMANDS}
    assert len(COMMANDS) >= 20 and {"scripts/run_experiment.py", "scripts/train.py", "scripts/localize.py",
                                     "scripts/repair_sweep.py", "scripts/run_main.sh"} <= scripts, scripts


@pytest.mark.parametrize("doc, line", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_a_documented_command_names_existing_files(doc, line):
    script, args = _argv(line)
    assert (REPO / script).is_file(), f"{doc}: {script} does not exist"
    for i, a in enumerate(args):
        if args[i - 1:i] == ["--config"] or a.startswith("--config="):
            cfg = a.split("=", 1)[1] if a.startswith("--config=") else a
            assert (REPO / cfg).is_file(), f"{doc}: `{line}` names {cfg}, which does not exist"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


PARSED = [(d, c) for d, c in COMMANDS if Path(_argv(c)[0]).stem in PRINT_CONFIG]


@pytest.mark.parametrize("doc, line", PARSED, ids=[f"{d}:{c[:60]}" for d, c in PARSED])
def test_a_documented_command_parses_as_written(doc, line):
    """The script accepts every option of the documented command (``--print_config``: parse, no work)."""
    script, args = _argv(line)
    args = [a for a in args if a != "--print_config"]
    out = subprocess.run([sys.executable, str(REPO / script), *args, "--print_config"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{doc}: `{line}` does not parse:\n{out.stderr[-2000:]}"


TRAIN = [(d, c) for d, c in COMMANDS if Path(_argv(c)[0]).stem == "train"]


@pytest.mark.slow  # LightningCLI imports everything (~12 s per command)
@pytest.mark.parametrize("doc, line", TRAIN, ids=[f"{d}:{c[:60]}" for d, c in TRAIN])
def test_a_documented_training_command_parses_as_written(doc, line):
    script, args = _argv(line)
    out = subprocess.run([sys.executable, str(REPO / script), *args, "--print_config"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{doc}: `{line}` does not parse:\n{out.stderr[-2000:]}"


def test_the_parse_check_can_fail():
    """A misspelled option in a 'documented' command is caught by the same check."""
    out = subprocess.run([sys.executable, str(REPO / "scripts/localize.py"), "--run_dir", "outputs/digits",
                          "--metods", "ours", "--print_config"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "did you mean" in out.stderr.lower()


#: what the slow test appends to each step of the README's step-by-step block to keep it short (quick sizes)
QUICK = {"scripts/train.py": ["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
         "scripts/localize.py": ["--settings", "all", "src_tgt_r1", "--progress", "none"],
         "scripts/evaluate_fl.py": ["--quick", "--parts", "interventions", "checkpoint", "--no_figures"],
         "scripts/repair_sweep.py": ["--settings", "all", "--reps", "1", "--generations", "2", "--pop_size", "6",
                                     "--progress", "none"]}


def _step_by_step() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Step by step", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    flat = re.sub(r"\s+", " ", block.replace("\\\n", " "))
    return [c for d, c in documented_commands() if d == "README.md" and re.sub(r"\s+", " ", c) in flat]


@pytest.mark.slow
def test_the_step_by_step_block_runs_as_written(tmp_path):
    """The README's step-by-step commands, in order, on a fresh run directory, each as written plus the quick
    sizes above; each must exit 0, and the last ones must find what the first ones made."""
    steps = _step_by_step()
    assert [Path(_argv(c)[0]).stem for c in steps] == ["train", "cache_states", "analyze_misclf", "localize",
                                                        "evaluate_fl", "repair_sweep", "report", "adequacy_rq1"]
    run = tmp_path / "digits"
    for line in steps:
        script, args = _argv(line.replace("outputs/digits", str(run)))
        extra = QUICK.get(script, [])
        if script == "scripts/adequacy_rq1.py":
            extra = ["--progress", "none"]
        out = subprocess.run([sys.executable, str(REPO / script), *args, *extra], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"`{line}` failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    assert (run / "report" / "report.html").is_file() and list((run / "repair" / "summary").glob("summary.md"))
    assert list((run / "adequacy").rglob("*.md"))
